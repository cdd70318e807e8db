//! Qwen3-VL (dense) in Rust against Hugging Face transformers 5.24 (tools/make_qwen3_fixtures.py),
//! through the public loading path: checkpoint directories and image files on disk in; the
//! chat-templated text, token ids, pixel values (bit for bit), M-RoPE positions, logits, greedy
//! continuations and teacher-forced log-probabilities out, within the bounds model_parity.rs
//! holds Qwen2-VL to; in bf16, against transformers' own bf16 error, as tiny-b is.
//!
//! The image processor is transformers' torchvision backend (the checkpoints' preprocessor
//! config names `Qwen2VLImageProcessorFast`): pixels/qwen3 fixtures check its resize byte for
//! byte and its pixel values bit for bit on every test image.
//!
//! tiny-3a is laid out as the released checkpoints are (rope_scaling, legacy vision
//! model_type, tied, f32, chat_template.json); tiny-3b as transformers 5.24 saves (untied, bf16
//! weights, explicit head_dim wider than hidden / heads, DeepStack blocks listed out of order).

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use medvlm::generate::{self, Engine, FinishReason, Request, SamplingParams, SeqOptions};
use medvlm::model::{Mode, Qwen2Vl};
use medvlm::processor::image::{load_rgb_checked, Alpha};
use medvlm::processor::{PixelPatches, Processor, ProcessorOptions, Prompt};

struct Loaded {
    model: Qwen2Vl,
    proc: Processor,
}

fn load(name: &str, dtype: DType) -> Loaded {
    let dir = fixtures().join(name);
    Loaded {
        model: Qwen2Vl::load(&dir, dtype, &Device::Cpu).unwrap(),
        proc: Processor::from_dir(&dir, &ProcessorOptions::default()).unwrap(),
    }
}

fn prompt_for(l: &Loaded, case: &serde_json::Value) -> Prompt {
    case_prompt(&l.proc, case)
}

/// Our processor's pixel values must be transformers' to the bit.
fn assert_pixels_equal(name: &str, prompt: &Prompt, cases: &Cases, cname: &str) {
    let Some(ours) = prompt.pixel_values(&Device::Cpu).unwrap() else {
        return;
    };
    let theirs = cases.tensor(&format!("{cname}.pixel_values"));
    assert_eq!(ours.dims(), theirs.dims(), "{name}/{cname}: pixel shape");
    let a: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = theirs.flatten_all().unwrap().to_vec1().unwrap();
    let differ = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(differ, 0, "{name}/{cname}: {differ} pixel values differ");
    let grids: Vec<Vec<i64>> = cases
        .tensor(&format!("{cname}.image_grid_thw"))
        .to_vec2()
        .unwrap();
    let ours: Vec<Vec<i64>> = prompt
        .grids()
        .iter()
        .map(|g| g.iter().map(|&x| x as i64).collect())
        .collect();
    assert_eq!(ours, grids, "{name}/{cname}: image grids");
}

fn check_model(name: &str) {
    check_layout(name, false);
    check_layout(name, true);
}

fn check_layout(name: &str, packed: bool) {
    let mut l = load(name, DType::F32);
    if packed && !medvlm::kernels::has_avx512() && !medvlm::kernels::has_avx2() {
        note_without_simd(
            "the packed and few-row kernels (AVX-512F or AVX2): gemm takes the products",
        );
    }
    if packed {
        let n = l.model.prepare_for_inference().unwrap();
        assert!(n > 0, "{name}: no layer was packed");
    }
    let cases = load_cases(name);
    // Both checkpoints have the same processor files; their pixels are stored once.
    let pixels_in = cases.meta["pixel_values_in"].as_str().unwrap();
    let pixel_cases = load_cases(
        pixels_in
            .strip_prefix("cases-")
            .and_then(|s| s.strip_suffix(".safetensors"))
            .unwrap(),
    );
    let name = &format!("{name}{}", if packed { " (packed)" } else { "" });
    for case in cases.list() {
        let cname = case["name"].as_str().unwrap();
        let prompt = prompt_for(&l, case);

        // The checkpoint's own chat template rendered, and the expanded ids, exactly.
        assert_eq!(
            prompt.text,
            case["prompt"].as_str().unwrap(),
            "{name}/{cname}: prompt text"
        );
        assert_eq!(
            prompt.input_ids,
            u32s(&case["input_ids"]),
            "{name}/{cname}: input ids"
        );
        assert_pixels_equal(name, &prompt, &pixel_cases, cname);

        // M-RoPE positions exactly; logits at every prompt position within 1e-4 relative.
        check_positions_and_logits(
            &l.model,
            &prompt,
            cases.tensor(&format!("{cname}.position_ids")),
            case["rope_delta"].as_i64().unwrap(),
            cases.tensor(&format!("{cname}.logits")),
            &format!("{name}/{cname}"),
        );

        // Greedy continuation, token for token (nothing banned: transformers does emit
        // vision tokens from these random models).
        let want_new = u32s(&case["greedy_new_tokens"]);
        let engine = Engine::new(&l.model, l.proc.tokenizer.stop_tokens().to_vec(), vec![]);
        let req = Request {
            prompt: &prompt,
            sampling: SamplingParams::default(),
            max_new_tokens: 24,
            num_samples: 1,
        };
        let out = engine
            .generate(&[req], |_, _, _| {})
            .unwrap()
            .remove(0)
            .remove(0);
        assert_eq!(out.tokens, want_new, "{name}/{cname}: greedy continuation");
        assert_eq!(want_new.len(), 24);
        assert_eq!(out.finish, FinishReason::Length);

        // Teacher-forced log-probabilities of a completion.
        if let Some(c) = case.get("completion") {
            let comp = l.proc.tokenizer.encode(c.as_str().unwrap()).unwrap();
            assert_eq!(
                comp,
                u32s(&case["completion_ids"]),
                "{name}/{cname}: completion ids"
            );
            let lps = generate::score(&l.model, &prompt, &comp).unwrap();
            let want = f32s(&case["completion_logprobs"]);
            let worst = lps
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            println!("{name}/{cname}: max |logprob diff| {worst:.3e}");
            assert!(worst <= 1e-4, "{name}/{cname}: log-probs differ by {worst}");
        }
    }
}

/// Released layout: rope_scaling + rope_theta in text_config, vision model_type "qwen3_vl",
/// tied (no lm_head.weight), f32, DeepStack from blocks 0, 1, 3.
#[test]
fn tiny_3a_released_layout_matches_transformers() {
    check_model("tiny-3a");
}

/// transformers 5.24's own save: rope_parameters, untied, bf16 weights computed in f32,
/// 4 x 32 query width over a hidden size of 96, DeepStack blocks [2, 0].
#[test]
fn tiny_3b_transformers5_layout_matches_transformers() {
    check_model("tiny-3b");
}

/// The last position's logits for the one-image case, and transformers' f32 logits there:
/// what the two bf16 checks compare (with transformers' own bf16 run,
/// `one_image.logits_last_bf16`).
fn last_logits(l: &Loaded, cases: &Cases) -> (Tensor, Tensor) {
    let case = cases
        .list()
        .iter()
        .find(|c| c["name"] == "one_image")
        .unwrap();
    last_logits_and_reference(&l.model, &prompt_for(l, case), cases)
}

/// As model_parity.rs holds tiny-b to: bf16 compute (every op rounded to 8 bits of
/// mantissa, in another order than PyTorch's) is about as close to transformers' f32 logits
/// as transformers' own bf16 run (within 2x of its error), with the same argmax. tiny-3b has
/// bf16 weights; tiny-3a's f32 weights are rounded to bf16 on load, as transformers does with
/// `dtype=torch.bfloat16`.
#[test]
fn qwen3_in_bf16_is_as_accurate_as_transformers_bf16() {
    for name in ["tiny-3a", "tiny-3b"] {
        let l = load(name, DType::BF16);
        let cases = load_cases(name);
        let (last, f32_ref) = last_logits(&l, &cases);
        let hf_bf16 = cases.tensor("one_image.logits_last_bf16");
        let (ours, scale) = max_abs_diff(&last, &f32_ref);
        let (theirs, _) = max_abs_diff(hf_bf16, &f32_ref);
        let (between, _) = max_abs_diff(&last, hf_bf16);
        println!(
            "{name} bf16 vs f32 reference: ours {ours:.3e}, transformers {theirs:.3e} \
             (ours vs transformers bf16 {between:.3e}; max |logit| {scale:.2})"
        );
        assert!(
            ours <= 2.0 * theirs,
            "{name}: bf16 error {ours} vs transformers' {theirs}"
        );
        let a: u32 = last.argmax(0).unwrap().to_scalar().unwrap();
        let b: u32 = f32_ref.argmax(0).unwrap().to_scalar().unwrap();
        assert_eq!(a, b, "{name}");
    }
}

/// `--dtype bf16` on the CPU as the inference commands load it: bf16 weights, f32
/// activations, rounded to bf16 only inside the products. Less is rounded than in
/// transformers' all-bf16 run, so the logits must be closer to transformers' f32 reference
/// than that run is, with the same argmax.
#[test]
fn qwen3_bf16_weights_on_cpu_are_closer_than_transformers_bf16() {
    if !medvlm::kernels::bf16dot::available() {
        note_without_simd("bf16 dot products (AVX-512 BF16): bf16 weights are widened");
    }
    for name in ["tiny-3a", "tiny-3b"] {
        let mut l = load(name, DType::BF16);
        assert!(l.model.prepare_for_inference().unwrap() > 0);
        for (path, lin) in l.model.linears_mut() {
            assert_eq!(lin.weight().dtype(), DType::BF16, "{name}: {path}");
        }
        let cases = load_cases(name);
        let (last, f32_ref) = last_logits(&l, &cases);
        assert_eq!(last.dtype(), DType::F32);
        let (ours, _) = max_abs_diff(&last, &f32_ref);
        let (theirs, _) = max_abs_diff(cases.tensor("one_image.logits_last_bf16"), &f32_ref);
        println!(
            "{name} bf16 weights, f32 activations: error {ours:.3e} (transformers bf16 {theirs:.3e})"
        );
        assert!(
            ours < theirs,
            "{name}: error {ours} vs transformers' bf16 {theirs}"
        );
        let a: u32 = last.argmax(0).unwrap().to_scalar().unwrap();
        let b: u32 = f32_ref.argmax(0).unwrap().to_scalar().unwrap();
        assert_eq!(a, b, "{name}");
    }
}

/// The decoder adds DeepStack features at the image tokens of whatever part of the prompt a
/// prefill call covers: prefilled 5 tokens at a time (image runs split across calls, the
/// vision tower a few blocks per call), the greedy continuations are still transformers'.
#[test]
fn chunked_prefill_keeps_deepstack_in_place() {
    for name in ["tiny-3a", "tiny-3b"] {
        let l = load(name, DType::F32);
        let cases = load_cases(name);
        let engine = Engine::new(&l.model, l.proc.tokenizer.stop_tokens().to_vec(), vec![]);
        let prompts: Vec<Prompt> = cases.list().iter().map(|c| prompt_for(&l, c)).collect();
        let mut run = Default::default();
        for (i, p) in prompts.iter().enumerate() {
            let req = Request {
                prompt: p,
                sampling: SamplingParams::default(),
                max_new_tokens: 24,
                num_samples: 1,
            };
            engine
                .admit(&mut run, i, &req, SeqOptions::default())
                .unwrap();
        }
        let mut got = vec![Vec::new(); prompts.len()];
        let mut steps = 0;
        loop {
            engine.prefill_chunk(&mut run, 5).unwrap();
            for t in engine.sample(&mut run).unwrap() {
                got[t.request].push(t.token);
            }
            if run.is_empty() {
                break;
            }
            engine.decode(&mut run).unwrap();
            steps += 1;
            assert!(steps < 1000, "{name}: never finished");
        }
        for (i, g) in got.iter().enumerate() {
            let want = u32s(&cases.list()[i]["greedy_new_tokens"]);
            assert_eq!(g, &want, "{name} case {i}");
        }
    }
}

/// DeepStack is not a no-op on these fixtures: the tower hands the decoder one feature level
/// per listed block, and images give different logits without them than with.
#[test]
fn deepstack_features_reach_the_decoder() {
    let l = load("tiny-3a", DType::F32);
    let cases = load_cases("tiny-3a");
    let case = &cases.list()[1];
    let prompt = prompt_for(&l, case);
    let pixels = prompt.pixel_values(&Device::Cpu).unwrap().unwrap();
    let grids = prompt.grids();
    let f = l.model.encode_images(&pixels, &grids, Mode::Infer).unwrap();
    assert_eq!(f.deepstack.len(), 3);
    let n: usize = prompt.images.iter().map(PixelPatches::num_tokens).sum();
    for level in &f.deepstack {
        assert_eq!(level.dims(), f.tokens.dims());
        assert_eq!(level.dim(0).unwrap(), n);
    }
    let rows = [prompt.input_ids.clone()];
    let embeds = l.model.input_embeds(&rows, Some(&f.tokens)).unwrap();
    let (pos, _) = l.model.positions(&prompt.input_ids, &grids).unwrap();
    let without = l
        .model
        .text
        .forward(
            &embeds,
            &[pos],
            medvlm::model::Caching::None,
            None,
            Mode::Infer,
        )
        .unwrap();
    let logits = l.model.text.logits(&without).unwrap().squeeze(0).unwrap();
    let (diff, _) = max_abs_diff(&logits, cases.tensor("one_image.logits"));
    assert!(diff > 1e-2, "DeepStack changed the logits by only {diff}");
    // The text before the first image token is not touched by it.
    let first = prompt
        .input_ids
        .iter()
        .position(|&t| t == l.model.config.image_token_id)
        .unwrap();
    let (before, _) = max_abs_diff(
        &logits.narrow(0, 0, first).unwrap(),
        &cases
            .tensor("one_image.logits")
            .narrow(0, 0, first)
            .unwrap(),
    );
    assert!(before < 1e-4, "{before}");
}

fn read_manifest() -> serde_json::Value {
    let path = fixtures().join("pixels-qwen3/manifest.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// torch's uint8 antialiased bicubic resize (what torchvision's `resize` runs for
/// transformers' torchvision backend), byte for byte, on every test image at six sizes each:
/// shrinking, enlarging, one side kept.
#[test]
fn torch_resize_matches_torchvision_byte_for_byte() {
    use medvlm::processor::resize::{resize_torch, Filter};
    let manifest = read_manifest();
    let want = candle_core::safetensors::load(
        fixtures().join("pixels-qwen3/resized.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut checked = 0;
    for run in manifest["runs"].as_array().unwrap() {
        let name = run["image"].as_str().unwrap();
        // RGB as transformers 5.24 makes it (transparency over white).
        let img = load_rgb_checked(
            &fixture_image(name),
            &Default::default(),
            Alpha::OverWhite,
            &|_, _| Ok(()),
        )
        .unwrap();
        for size in run["resized"].as_array().unwrap() {
            let (h, w) = (size[0].as_u64().unwrap(), size[1].as_u64().unwrap());
            let ours = resize_torch(&img, w as u32, h as u32, Filter::Bicubic).unwrap();
            let theirs: Vec<Vec<Vec<u8>>> = want[&format!("{name}@{h}x{w}")].to_vec3().unwrap();
            let mut differ = 0;
            for (c, plane) in theirs.iter().enumerate() {
                for (y, row) in plane.iter().enumerate() {
                    for (x, &v) in row.iter().enumerate() {
                        if ours.get_pixel(x as u32, y as u32).0[c] != v {
                            differ += 1;
                        }
                    }
                }
            }
            assert_eq!(differ, 0, "{name} to {h}x{w}: {differ} bytes differ");
            checked += 1;
        }
    }
    assert!(checked >= 60, "{checked}");
}

/// The torchvision backend's pixel values and grids, bit for bit, for every test image at a
/// budget of 2..4 merged tokens (every image resized).
#[test]
fn qwen3_pixel_values_match_transformers_bit_for_bit() {
    let manifest = read_manifest();
    let want = candle_core::safetensors::load(
        fixtures().join("pixels-qwen3/pixels.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let (lo, hi) = (
        manifest["min_pixels"].as_u64().unwrap() as usize,
        manifest["max_pixels"].as_u64().unwrap() as usize,
    );
    let config = medvlm::processor::ImageProcessorConfig::from_file(
        &fixtures().join("tiny-3a/preprocessor_config.json"),
    )
    .unwrap()
    .with_pixel_limits(Some(lo), Some(hi))
    .unwrap();
    assert_eq!(
        config.backend,
        medvlm::processor::image_processor::Backend::Torchvision
    );
    let proc = medvlm::processor::ImageProcessor { config };
    for run in manifest["runs"].as_array().unwrap() {
        let name = run["image"].as_str().unwrap();
        let img = load_rgb_checked(
            &fixture_image(name),
            &Default::default(),
            proc.config.backend.alpha(),
            &|_, _| Ok(()),
        )
        .unwrap();
        let out = proc.preprocess(&img).unwrap();
        let grid: Vec<i64> = want[&format!("{name}.image_grid_thw")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            out.grid_thw.map(|g| g as i64).to_vec(),
            grid,
            "{name}: grid"
        );
        let theirs: Vec<f32> = want[&format!("{name}.pixel_values")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(out.data.len(), theirs.len(), "{name}: length");
        let differ = out
            .data
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{name}: {differ} pixel values differ");
    }
}

/// `medvlm inspect` describes a Qwen3-VL checkpoint: family and class, the Qwen3 decoder's
/// head width and rotary layout, the learned positions and DeepStack, the image backend.
#[test]
fn inspect_describes_qwen3_vl() {
    let dir = fixtures().join("tiny-3b");
    let (ok, out, err) = medvlm(&["inspect", "--model", s(&dir), "--json"]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["model_type"], "qwen3_vl");
    assert_eq!(j["architecture"], "Qwen3-VL");
    assert_eq!(j["text"]["head_dim"], 32);
    assert_eq!(j["text"]["mrope_interleaved"], true);
    assert_eq!(j["text"]["qk_norm"], true);
    assert_eq!(j["text"]["tie_word_embeddings"], false);
    assert_eq!(j["vision"]["num_position_embeddings"], 100);
    assert_eq!(
        j["vision"]["deepstack_visual_indexes"],
        serde_json::json!([2, 0])
    );
    assert_eq!(
        j["image_processor"]["backend"],
        "torchvision (transformers 5.24)"
    );
    assert_eq!(j["weight_layout"], "nested");
    let (ok, out, err) = medvlm(&["inspect", "--model", s(&fixtures().join("tiny-3a"))]);
    assert!(ok, "{err}");
    assert!(out.contains("Qwen3VLForConditionalGeneration"), "{out}");
    assert!(out.contains("DeepStack: blocks [0, 1, 3]"), "{out}");
    assert!(out.contains("interleaved"), "{out}");
}
