//! Qwen2-VL in Rust against Hugging Face transformers, through the public loading path:
//! checkpoint directories and image files on disk in, token ids, M-RoPE positions, logits,
//! greedy continuations and teacher-forced log-probabilities out, each compared with what
//! transformers 4.57 computed for the same files (tools/make_fixtures.py).

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use medvlm::generate::{self, Engine, FinishReason, Request, SamplingParams};
use medvlm::model::{Mode, Qwen2Vl};
use medvlm::processor::{Processor, ProcessorOptions, Prompt};

struct Loaded {
    model: Qwen2Vl,
    proc: Processor,
}

fn load(name: &str, dtype: DType) -> Loaded {
    load_dir(&fixtures().join(name), dtype)
}

fn load_dir(dir: &std::path::Path, dtype: DType) -> Loaded {
    let dir = dir.to_path_buf();
    Loaded {
        model: Qwen2Vl::load(&dir, dtype, &Device::Cpu).unwrap(),
        proc: Processor::from_dir(&dir, &ProcessorOptions::default()).unwrap(),
    }
}

fn prompt_for(l: &Loaded, case: &serde_json::Value) -> Prompt {
    case_prompt(&l.proc, case)
}

fn stop_ids(l: &Loaded) -> Vec<u32> {
    l.proc.tokenizer.stop_tokens().to_vec()
}

/// Every check, with the weights as loaded (the layout training uses) and packed for
/// inference (input-major, as `infer::load` leaves them): both must match transformers.
fn check_model(name: &str) {
    check_layout(name, false);
    check_layout(name, true);
}

fn check_layout(name: &str, packed: bool) {
    check_checkpoint(&fixtures().join(name), name, packed);
}

/// Every check of [`check_model`] on the checkpoint in `dir` against the cases of fixture
/// `cases` (a checkpoint made from that fixture some other way: `import-gguf`).
pub(crate) fn check_checkpoint(dir: &std::path::Path, name: &str, packed: bool) {
    let mut l = load_dir(dir, DType::F32);
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
    let name = &format!("{name}{}", if packed { " (packed)" } else { "" });
    for case in cases.list() {
        let cname = case["name"].as_str().unwrap();
        let prompt = prompt_for(&l, case);

        // The chat template's text and the expanded ids, exactly.
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

        // M-RoPE positions exactly; logits at every prompt position within 1e-4 relative.
        check_positions_and_logits(
            &l.model,
            &prompt,
            cases.tensor(&format!("{cname}.position_ids")),
            case["rope_delta"].as_i64().unwrap(),
            cases.tensor(&format!("{cname}.logits")),
            &format!("{name}/{cname}"),
        );

        // Greedy continuation, token for token.
        // (Nothing banned: transformers does sample vision tokens from these random models.)
        let want_new = u32s(&case["greedy_new_tokens"]);
        let engine = Engine::new(&l.model, stop_ids(&l), vec![]);
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
        assert!(want_new.len() >= 20);
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

#[test]
fn tiny_a_matches_transformers() {
    check_model("tiny-a");
}

#[test]
fn tiny_b_matches_transformers() {
    check_model("tiny-b");
}

/// Qwen2-VL as transformers 5 saves it (text_config, rope_parameters with rope theta 5000,
/// dtype, layer_types, untied).
#[test]
fn tiny_c_transformers5_layout_matches_transformers() {
    check_model("tiny-c");
}

/// A 256-wide decoder with heads of 128 and Qwen2-VL-2B's mrope split (16, 24, 24), bf16
/// weights, tied: the fixture the q4_k quality check runs on.
#[test]
fn tiny_k_wide_heads_match_transformers() {
    check_model("tiny-k");
}

/// Qwen2.5-VL in the released layout (flat config, `model.layers.*` / `visual.*` names,
/// tied), window attention over several windows per image, block 1 full.
#[test]
fn tiny_25a_qwen25_released_layout_matches_transformers() {
    check_model("tiny-25a");
}

/// Qwen2.5-VL as transformers 5 saves it (untied, bf16 weights, blocks 0 and 3 full).
#[test]
fn tiny_25b_qwen25_transformers5_layout_matches_transformers() {
    check_model("tiny-25b");
}

/// The last position's logits for tiny-b's one-image case, and transformers' f32 logits
/// there: what the two bf16 checks compare.
fn last_logits(l: &Loaded, cases: &Cases) -> (Tensor, Tensor) {
    let case = &cases.list()[1];
    last_logits_and_reference(&l.model, &prompt_for(l, case), cases)
}

/// bf16 compute rounds every op to 8 bits of mantissa, in a different order here than in
/// PyTorch, so bit equality is not the bar. The bar: our bf16 logits are about as close to the
/// f32 reference as transformers' own bf16 logits are (within 2x of its error), and pick the
/// same token.
#[test]
fn tiny_b_in_bf16_is_as_accurate_as_transformers_bf16() {
    let l = load("tiny-b", DType::BF16);
    let cases = load_cases("tiny-b");
    let (last, f32_ref) = last_logits(&l, &cases);
    let hf_bf16 = cases.tensor("one_image.logits_last_bf16");
    let (ours, scale) = max_abs_diff(&last, &f32_ref);
    let (theirs, _) = max_abs_diff(hf_bf16, &f32_ref);
    let (between, _) = max_abs_diff(&last, hf_bf16);
    println!(
        "tiny-b bf16 vs f32 reference: ours {ours:.3e}, transformers {theirs:.3e} \
         (ours vs transformers bf16 {between:.3e}; max |logit| {scale:.2})"
    );
    assert!(
        ours <= 2.0 * theirs,
        "bf16 error {ours} vs transformers' {theirs}"
    );
    let a: u32 = last.argmax(0).unwrap().to_scalar().unwrap();
    let b: u32 = f32_ref.argmax(0).unwrap().to_scalar().unwrap();
    assert_eq!(a, b);
}

/// `--dtype bf16` on the CPU as the inference commands load it: bf16 weights (half the
/// memory), f32 activations, rounded to bf16 only inside the products (bf16 dot products,
/// f32 sums). Less is rounded than in transformers' all-bf16 run, so the logits must be
/// closer to transformers' f32 reference than that run is, with the same argmax.
#[test]
fn tiny_b_bf16_weights_on_cpu_are_closer_than_transformers_bf16() {
    if !medvlm::kernels::bf16dot::available() {
        note_without_simd("bf16 dot products (AVX-512 BF16): bf16 weights are widened");
    }
    let mut l = load("tiny-b", DType::BF16);
    assert!(l.model.prepare_for_inference().unwrap() > 0);
    for (path, lin) in l.model.linears_mut() {
        assert_eq!(lin.weight().dtype(), DType::BF16, "{path}");
    }
    let cases = load_cases("tiny-b");
    let (last, f32_ref) = last_logits(&l, &cases);
    assert_eq!(last.dtype(), DType::F32);
    let (ours, _) = max_abs_diff(&last, &f32_ref);
    let (theirs, _) = max_abs_diff(cases.tensor("one_image.logits_last_bf16"), &f32_ref);
    println!(
        "tiny-b bf16 weights, f32 activations: error {ours:.3e} (transformers bf16 {theirs:.3e})"
    );
    assert!(ours < theirs, "error {ours} vs transformers' bf16 {theirs}");
    let a: u32 = last.argmax(0).unwrap().to_scalar().unwrap();
    let b: u32 = f32_ref.argmax(0).unwrap().to_scalar().unwrap();
    assert_eq!(a, b);
}

/// Several images per prompt share one vision-tower call; each image's tokens must equal the
/// tower run on that image alone (attention never crosses images).
#[test]
fn images_do_not_attend_to_each_other() {
    let l = load("tiny-a", DType::F32);
    let a = l.proc.load_image(&fixture_image("wide.png")).unwrap();
    let b = l.proc.load_image(&fixture_image("gray.png")).unwrap();
    let both = medvlm::processor::pixel_tensor(&[a.clone(), b.clone()], &Device::Cpu)
        .unwrap()
        .unwrap();
    let joint = l
        .model
        .encode_images(&both, &[a.grid_thw, b.grid_thw], Mode::Infer)
        .unwrap()
        .tokens;
    let pa = medvlm::processor::pixel_tensor(std::slice::from_ref(&a), &Device::Cpu)
        .unwrap()
        .unwrap();
    let pb = medvlm::processor::pixel_tensor(std::slice::from_ref(&b), &Device::Cpu)
        .unwrap()
        .unwrap();
    let ea = l
        .model
        .encode_images(&pa, &[a.grid_thw], Mode::Infer)
        .unwrap()
        .tokens;
    let eb = l
        .model
        .encode_images(&pb, &[b.grid_thw], Mode::Infer)
        .unwrap()
        .tokens;
    let sep = Tensor::cat(&[&ea, &eb], 0).unwrap();
    let (diff, _) = max_abs_diff(&joint, &sep);
    assert!(diff < 1e-5, "{diff}");
}
