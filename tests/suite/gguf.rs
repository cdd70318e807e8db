//! `medvlm import-gguf` on GGUF files made by llama.cpp's own converter from the tiny
//! fixtures (tools/make_gguf_fixture.py): f32 files import to a checkpoint that gives
//! transformers' numbers (prompt text from the GGUF's chat template, ids from the tokenizer
//! rebuilt from its vocabulary and merges, M-RoPE positions, logits, greedy continuations,
//! log-probs); quantized files import bit for bit (each Q8_0 / Q4_1 / Q4_K / Q6_K tensor is
//! the weight ggml's quantizers made of the fixture's values, each float tensor the
//! fixture's in the file's type); and bad files or pairs are one line naming the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use candle_core::{DType, Device};
use medvlm::kernels::quant::{QWeight, QuantKind};
use medvlm::model::CheckpointWeights;

fn gguf(name: &str) -> PathBuf {
    fixtures().join("gguf").join(name)
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("medvlm-gguf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The fixture's pixel bounds (a GGUF does not carry them), as `import-gguf` flags.
fn pixel_flags(fixture: &str) -> Vec<String> {
    let p: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(fixture).join("preprocessor_config.json"))
            .unwrap(),
    )
    .unwrap();
    vec![
        "--min-pixels".into(),
        p["size"]["shortest_edge"].to_string(),
        "--max-pixels".into(),
        p["size"]["longest_edge"].to_string(),
    ]
}

/// Imports `model` + `mmproj` through the command line into `out`.
fn import(model: &str, mmproj: &str, fixture: &str, out: &Path) {
    let (m, v) = (gguf(model), gguf(mmproj));
    let mut args = vec![
        "import-gguf",
        "--model",
        s(&m),
        "--mmproj",
        s(&v),
        "--out",
        s(out),
    ];
    let flags = pixel_flags(fixture);
    args.extend(flags.iter().map(String::as_str));
    let (ok, stdout, stderr) = medvlm(&args);
    assert!(ok, "import-gguf {model} failed: {stderr}");
    assert_eq!(stdout.trim(), out.display().to_string());
}

/// Qwen2-VL and Qwen2.5-VL (window attention, RMSNorm, gated MLP) with every tensor in
/// f32: the imported checkpoint passes the same checks against transformers as the
/// fixture itself, with its weights as loaded and packed for inference.
#[test]
fn f32_ggufs_import_to_transformers_numbers() {
    let dir = scratch("f32");
    for fixture in ["tiny-a", "tiny-25a"] {
        let out = dir.join(fixture);
        import(
            &format!("{fixture}-f32.gguf"),
            &format!("mmproj-{fixture}-f32.gguf"),
            fixture,
            &out,
        );
        crate::model_parity::check_checkpoint(&out, fixture, false);
        crate::model_parity::check_checkpoint(&out, fixture, true);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every tensor of an imported quantized checkpoint against the Hugging Face fixture it was
/// converted from: a quantized one must hold exactly the weight our quantizer makes of the
/// fixture's values in its format (which is ggml's, bit for bit: `quant` tests), a float
/// one the fixture's values in the GGUF's type. Returns the formats seen, with counts.
/// `tables` names tensors the file held in `QuantKind` blocks that are no linear layer's (an
/// untied embedding table): they must hold exactly the dequantized weight, in f32.
fn check_against_fixture(
    out: &Path,
    fixture: &str,
    tables: &[(&str, QuantKind)],
) -> HashMap<String, usize> {
    let kinds = CheckpointWeights::open(out).unwrap().quantized().clone();
    let got = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let want = candle_core::safetensors::load(
        fixtures().join(fixture).join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        got.keys().collect::<std::collections::BTreeSet<_>>(),
        want.keys().collect::<std::collections::BTreeSet<_>>(),
        "{fixture}: tensor names"
    );
    let mut seen = HashMap::new();
    for (name, t) in &got {
        let w = &want[name];
        let table = tables.iter().find(|(n, _)| n == name).map(|(_, k)| *k);
        let label = match kinds.get(name) {
            Some(&kind) => {
                let (n, k) = w.dims2().unwrap();
                let values: Vec<f32> = w
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let expect = QWeight::quantize(kind, &values, n, k);
                let bytes: Vec<u8> = t.to_vec1().unwrap();
                assert!(
                    bytes == expect.bytes(),
                    "{fixture}: {name} is not the {} weight of the fixture's values",
                    kind.name()
                );
                kind.name().to_string()
            }
            None => {
                assert_eq!(t.dims(), w.dims(), "{fixture}: {name} shape");
                let expect = match table {
                    Some(kind) => {
                        let (n, k) = w.dims2().unwrap();
                        let values: Vec<f32> = w
                            .to_dtype(DType::F32)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap();
                        let deq = QWeight::quantize(kind, &values, n, k).dequantize();
                        candle_core::Tensor::from_vec(deq, (n, k), &Device::Cpu).unwrap()
                    }
                    None => w.to_dtype(t.dtype()).unwrap(),
                };
                let f32s = |x: &candle_core::Tensor| x.to_dtype(DType::F32).unwrap();
                let (d, _) = max_abs_diff(&f32s(t), &f32s(&expect));
                assert_eq!(d, 0.0, "{fixture}: {name} differs from the fixture's");
                format!("{:?}", t.dtype())
            }
        };
        *seen.entry(label).or_default() += 1;
    }
    seen
}

/// A Q4_K_M file (Q4_K with Q6_K for the tied embedding table / head and the "more bits"
/// layers' attn_v and ffn_down, as llama-quantize mixes them; an f16 vision tower) and a
/// Q8_0 file with a Q4_1 vision tower (whose 48-wide MLP output stayed f16: not whole
/// blocks) import bit for bit, and run: the Q4_K_M model stays within the q4_k bound of
/// transformers' f32 logits.
#[test]
fn quantized_ggufs_import_bit_for_bit() {
    let dir = scratch("quant");
    let out = dir.join("tiny-k");
    import(
        "tiny-k-q4_k_m.gguf",
        "mmproj-tiny-k-f16.gguf",
        "tiny-k",
        &out,
    );
    let seen = check_against_fixture(&out, "tiny-k", &[]);
    println!("tiny-k Q4_K_M: {seen:?}");
    assert!(seen["q4_k"] >= 10 && seen["q6_k"] >= 3, "{seen:?}");
    assert!(
        seen.contains_key("F16") && seen.contains_key("F32"),
        "{seen:?}"
    );
    let kinds = CheckpointWeights::open(&out).unwrap().quantized().clone();
    assert_eq!(kinds["model.embed_tokens.weight"], QuantKind::Q6K);
    assert_eq!(
        kinds["model.layers.1.self_attn.v_proj.weight"],
        QuantKind::Q6K
    );
    assert_eq!(
        kinds["model.layers.0.self_attn.v_proj.weight"],
        QuantKind::Q4K
    );

    // It loads as any quantized checkpoint and stays as close to transformers' f32 as
    // `--quantize q4_k` must (quantized.rs's bound).
    let loaded = medvlm::infer::load(
        &medvlm::infer::ModelSource {
            model: out.clone(),
            ..Default::default()
        },
        &Default::default(),
    )
    .unwrap();
    assert_eq!(loaded.model.quantization(), Some(QuantKind::Q4K));
    let cases = load_cases("tiny-k");
    let case = cases
        .list()
        .iter()
        .find(|c| c["name"] == "one_image")
        .unwrap();
    let prompt = case_prompt(&loaded.processor, case);
    assert_eq!(prompt.input_ids, u32s(&case["input_ids"]), "tiny-k ids");
    let pixels = prompt.pixel_values(&Device::Cpu).unwrap();
    let logits = loaded
        .model
        .forward_logits(&prompt.input_ids, pixels.as_ref(), &prompt.grids())
        .unwrap();
    let (kl, top) = crate::quantized::kl_and_top1(&logits, cases.tensor("one_image.logits"));
    println!("tiny-k imported Q4_K_M: KL {kl:.3e}, top-1 {top:.3}");
    assert!(kl <= 0.6 && top >= 0.2, "KL {kl}, top-1 {top}");

    let out = dir.join("tiny-25a");
    import(
        "tiny-25a-q8_0.gguf",
        "mmproj-tiny-25a-q4_1.gguf",
        "tiny-25a",
        &out,
    );
    let seen = check_against_fixture(&out, "tiny-25a", &[]);
    println!("tiny-25a Q8_0 + Q4_1 vision: {seen:?}");
    assert!(
        seen["q8_0"] >= 10 && seen["q4_1"] >= 10 && seen["F16"] >= 1,
        "{seen:?}"
    );

    // Untied: the Q8_0 embedding table is looked up, not multiplied, so it is stored
    // dequantized (exactly); the head stays q8_0.
    let out = dir.join("tiny-c");
    import("tiny-c-q8_0.gguf", "mmproj-tiny-c-f16.gguf", "tiny-c", &out);
    let embed = "model.embed_tokens.weight";
    let seen = check_against_fixture(&out, "tiny-c", &[(embed, QuantKind::Q8_0)]);
    println!("tiny-c Q8_0, untied: {seen:?}");
    let kinds = CheckpointWeights::open(&out).unwrap().quantized().clone();
    assert_eq!(kinds["lm_head.weight"], QuantKind::Q8_0);
    assert!(!kinds.contains_key(embed));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A copy of `name` with `edit` applied to its bytes.
fn edited(dir: &Path, name: &str, tag: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = std::fs::read(gguf(name)).unwrap();
    edit(&mut b);
    let p = dir.join(format!("{tag}-{name}"));
    std::fs::write(&p, b).unwrap();
    p
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

/// Each way a pair of files can be wrong is refused in one line that names the file, and
/// leaves no output behind.
#[test]
fn bad_gguf_files_are_refused_in_one_line() {
    let dir = scratch("bad");
    let (model, mmproj) = (
        gguf("tiny-25a-q8_0.gguf"),
        gguf("mmproj-tiny-25a-q4_1.gguf"),
    );
    let truncated = edited(&dir, "tiny-25a-q8_0.gguf", "truncated", |b| {
        b.truncate(b.len() - 100)
    });
    let header_cut = edited(&dir, "tiny-25a-q8_0.gguf", "header_cut", |b| {
        b.truncate(3000)
    });
    // A Qwen3-VL text model: another architecture of the same name length.
    let other_arch = edited(&dir, "tiny-25a-q8_0.gguf", "other_arch", |b| {
        let at = find(b, b"qwen2vl");
        b[at..at + 7].copy_from_slice(b"qwen3vl");
    });
    // A tensor in a type medvlm does not compute with: Q8_0 (34 bytes a block) relabelled
    // Q5_1 (24), which still lies inside the file.
    let q5 = edited(&dir, "tiny-25a-q8_0.gguf", "q5", |b| {
        let at = find(b, b"blk.0.ffn_up.weight") + "blk.0.ffn_up.weight".len();
        let ty = at + 4 + 2 * 8;
        assert_eq!(b[ty..ty + 4], 8u32.to_le_bytes());
        b[ty..ty + 4].copy_from_slice(&7u32.to_le_bytes());
    });
    let not_gguf = fixtures().join("tiny-a").join("model.safetensors");
    // Another model's vision tower (256-wide projector, 64-wide text model).
    let other_mmproj = gguf("mmproj-tiny-k-f16.gguf");
    let cases: Vec<(&Path, &Path, &str, &Path)> = vec![
        (&mmproj, &model, "pass the text model as --model", &mmproj),
        (&truncated, &mmproj, "truncated", &truncated),
        (&header_cut, &mmproj, "not a valid GGUF file", &header_cut),
        (&other_arch, &mmproj, "\"qwen3vl\"", &other_arch),
        (&q5, &mmproj, "Q5_1", &q5),
        (
            &not_gguf,
            &mmproj,
            "does not start with \"GGUF\"",
            &not_gguf,
        ),
        (&model, &model, "not an mmproj", &model),
        (&model, &other_mmproj, "not one model's", &model),
        (&dir, &mmproj, "directory", &dir),
    ];
    for (m, v, says, names) in cases {
        let out = dir.join("out");
        let (ok, _, stderr) = medvlm(&[
            "import-gguf",
            "--model",
            s(m),
            "--mmproj",
            s(v),
            "--out",
            s(&out),
        ]);
        let line = stderr.trim();
        assert!(!ok, "{} + {}: accepted", m.display(), v.display());
        assert!(line.contains(says), "{}: {line}", m.display());
        assert!(line.contains(&names.display().to_string()), "{line}");
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(!line.contains("panicked"), "{line}");
        assert!(!out.exists(), "{line}: left an output");
    }
    // An existing output is never written over.
    let out = dir.join("taken");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let (ok, _, stderr) = medvlm(&[
        "import-gguf",
        "--model",
        s(&model),
        "--mmproj",
        s(&mmproj),
        "--out",
        s(&out),
    ]);
    assert!(!ok && stderr.contains("already exists"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The tokenizer rebuilt from a GGUF's vocabulary and merges encodes and decodes as the
/// fixture's tokenizer.json (transformers' own) does, on text the cases do not cover:
/// the chat markers, every special token, mixed scripts, digits, whitespace runs.
#[test]
fn the_rebuilt_tokenizer_is_the_original() {
    let dir = scratch("tok");
    let out = dir.join("tiny-a");
    import("tiny-a-f32.gguf", "mmproj-tiny-a-f32.gguf", "tiny-a", &out);
    let ours = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let theirs =
        tokenizers::Tokenizer::from_file(fixtures().join("tiny-a/tokenizer.json")).unwrap();
    let mut texts: Vec<String> = vec![
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n".into(),
        "Is there a lesion? A) left  B) right\n\n\tC) 1234567 89".into(),
        "naïve café — Ünïcödé 😀 ️ 中文 العربية\r\n  trailing   ".into(),
        "<think>x</think><answer>B</answer><|endoftext|>".into(),
        "'s 't 're 've 'm 'll 'd 'S 'LL don't".into(),
    ];
    texts.extend(
        medvlm::init::SPECIAL_TOKENS
            .iter()
            .map(|t| format!("a{t}b {t}")),
    );
    for t in &texts {
        let a = ours.encode(t.as_str(), false).unwrap();
        let b = theirs.encode(t.as_str(), false).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "{t:?}");
        assert_eq!(
            ours.decode(a.get_ids(), false).unwrap(),
            theirs.decode(b.get_ids(), false).unwrap(),
            "{t:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Linear layers stored in f16 (an imported f16 mmproj; here tiny-a with every float tensor
/// in f16) stay f16 when a model is loaded for inference in f32, and give what the same
/// checkpoint widened to f32 by candle at load gives: the prompt's logits through the
/// vision tower and prefill (many rows: blocks of widened rows into gemm) and a single
/// token's (one row: the streaming kernel, or gemm without AVX-512). An adapter merged
/// into an f16 layer yields the f32 model's merged weight bit for bit. `--dtype f16` on the
/// CPU gives the same numbers (f16 weights, f32 activations).
#[test]
fn f16_linear_layers_stay_f16_with_the_widened_numbers() {
    use medvlm::model::Qwen2Vl;
    let dir = scratch("f16");
    let src = fixtures().join("tiny-a");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "json") {
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let halves: HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&halves, dir.join("model.safetensors")).unwrap();

    let loaded = medvlm::infer::load(
        &medvlm::infer::ModelSource {
            model: dir.clone(),
            ..Default::default()
        },
        &Default::default(),
    )
    .unwrap();
    let mut kept = loaded.model.clone();
    let mut widened = Qwen2Vl::load(&dir, DType::F32, &Device::Cpu).unwrap();
    widened.prepare_for_inference().unwrap();
    let linears = kept.linears_mut().len();
    assert!(linears > 10);
    assert!(
        kept.linears_mut()
            .iter()
            .all(|(_, l)| l.weight().dtype() == DType::F16),
        "every linear layer kept in f16"
    );
    assert!(widened
        .linears_mut()
        .iter()
        .all(|(_, l)| l.weight().dtype() == DType::F32));

    let cases = load_cases("tiny-a");
    let case = cases
        .list()
        .iter()
        .find(|c| c["name"] == "one_image")
        .unwrap();
    let prompt = case_prompt(&loaded.processor, case);
    let pixels = prompt.pixel_values(&Device::Cpu).unwrap();
    let ids = &prompt.input_ids;
    for (what, ids, pixels, grids) in [
        ("prompt", &ids[..], pixels.as_ref(), prompt.grids()),
        ("one token", &ids[..1], None, vec![]),
    ] {
        let a = kept.forward_logits(ids, pixels, &grids).unwrap();
        let b = widened.forward_logits(ids, pixels, &grids).unwrap();
        let (d, m) = max_abs_diff(&a, &b);
        println!("{what}: f16 kept vs widened at load: max |diff| {d:.2e} of {m:.2e}");
        assert!(m > 0.1 && d <= 2e-5 * m.max(1.0), "{what}: {d} of {m}");
        // The f16 weights moved the model: the numbers are the f16 checkpoint's, not
        // the fixture's (so the comparison above is not between two f32 models).
        if what == "prompt" {
            let (d, _) = max_abs_diff(&a, cases.tensor("one_image.logits"));
            assert!(d > 1e-6, "f16 rounding must show against the f32 fixture");
        }
    }

    // `--dtype f16` inference on the CPU: f16 weights as stored, activations in f32 (as for
    // bf16), so the numbers are the widened model's up to summation order. With f16
    // activations (candle's generic f16 path, 3x slower than f32 on a 2B vision tower) the
    // prompt's logits moved by 3.5e-2 of 7.5 (here 6e-6).
    let in_f16 =
        medvlm::infer::inference_model(&dir, DType::F16, &Device::Cpu, None, None, "--dtype")
            .unwrap();
    for (what, ids, pixels, grids) in [
        ("prompt", &ids[..], pixels.as_ref(), prompt.grids()),
        ("one token", &ids[..1], None, vec![]),
    ] {
        let a = in_f16.forward_logits(ids, pixels, &grids).unwrap();
        let b = widened.forward_logits(ids, pixels, &grids).unwrap();
        assert_eq!(a.dtype(), DType::F32, "{what}: f32 activations");
        let (d, m) = max_abs_diff(&a, &b);
        println!("{what}: --dtype f16 vs widened at load: max |diff| {d:.2e} of {m:.2e}");
        assert!(m > 0.1 && d <= 2e-5 * m.max(1.0), "{what}: {d} of {m}");
    }

    // An adapter merged into a kept f16 layer: the f32 model's weight, bit for bit.
    let adapter = fixtures().join("lora-a");
    let mut kept = Qwen2Vl::load_for_inference(&dir, DType::F32, &Device::Cpu).unwrap();
    let mut widened = Qwen2Vl::load(&dir, DType::F32, &Device::Cpu).unwrap();
    kept.merge_adapter(&adapter).unwrap();
    widened.merge_adapter(&adapter).unwrap();
    let mut merged = 0;
    for ((name, a), (_, b)) in kept.linears_mut().into_iter().zip(widened.linears_mut()) {
        let (a, b) = (a.weight(), b.weight());
        if a.dtype() == DType::F16 {
            continue;
        }
        merged += 1;
        assert_eq!(a.dtype(), DType::F32, "{name}");
        let (d, _) = max_abs_diff(a, b);
        assert_eq!(d, 0.0, "{name}");
    }
    assert!(merged > 0, "the adapter touched no kept layer");
    std::fs::remove_dir_all(&dir).unwrap();
}
