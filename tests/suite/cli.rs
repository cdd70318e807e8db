//! The `medvlm` binary as a user runs it: results equal to transformers' for the same files,
//! and bad input answered with one line naming the problem, a non-zero exit and no panic.

use std::path::PathBuf;

use crate::common::*;
use serde_json::Value;

/// A failing run must say one line, starting with "error:", mentioning every `needles`
/// (RUST_BACKTRACE unset: with it, a library's backtrace may follow the line).
fn assert_clean_error(args: &[&str], needles: &[&str]) {
    let (ok, _out, err) = medvlm_with_backtrace(args, None);
    assert!(!ok, "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line for {args:?}, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} missing from: {err}", n);
    }
}

/// A copy of a fixture checkpoint that a test may break.
fn scratch_copy(model: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(model);
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(fixtures().join(model)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (tmp, dst)
}

fn case(model: &str, name: &str) -> Value {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("cases-{model}.json"))).unwrap(),
    )
    .unwrap();
    meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

fn user_text(case: &Value) -> String {
    let user = case["messages"].as_array().unwrap().last().unwrap();
    user["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect()
}

fn generate_json(model: &str, image: &str, prompt: &str) -> Value {
    let model = fixtures().join(model);
    let img = fixture_image(image);
    let (ok, out, err) = medvlm(&[
        "generate",
        "--model",
        s(&model),
        "--image",
        s(&img),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "24",
        "--json",
    ]);
    assert!(ok, "{err}");
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn generate_json_matches_transformers_greedy() {
    let c = case("tiny-b", "real_mri");
    let j = generate_json("tiny-b", "mri-brain.png", &user_text(&c));
    assert_eq!(u32s(&j["prompt_token_ids"]), u32s(&c["input_ids"]));
    assert_eq!(
        u32s(&j["completion_token_ids"]),
        u32s(&c["greedy_new_tokens"])
    );
    assert_eq!(j["finish_reason"], "length");
}

/// transformers' greedy decoding of this random model emits <|video_pad|> at step 8, the
/// crash TRL users meet ("Image features and image tokens do not match"). medvlm never
/// samples a vision token: it agrees up to that step, then takes the best allowed token.
#[test]
fn generate_never_emits_vision_tokens() {
    let c = case("tiny-b", "one_image");
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("cases-tiny-b.json")).unwrap(),
    )
    .unwrap();
    let ids = &meta["special_token_ids"];
    let vision: Vec<u32> = [
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    .iter()
    .map(|t| ids[t].as_u64().unwrap() as u32)
    .collect();
    let reference = u32s(&c["greedy_new_tokens"]);
    let first_bad = reference.iter().position(|t| vision.contains(t)).unwrap();
    let j = generate_json("tiny-b", "square.png", &user_text(&c));
    let got = u32s(&j["completion_token_ids"]);
    assert_eq!(got[..first_bad], reference[..first_bad]);
    assert!(!vision.contains(&got[first_bad]));
    assert!(got.iter().all(|t| !vision.contains(t)), "{got:?}");
}

#[test]
fn score_json_matches_transformers_logprobs() {
    let c = case("tiny-a", "system_large");
    let model = fixtures().join("tiny-a");
    let img = fixture_image("large.png");
    let system = c["messages"][0]["content"].as_str().unwrap();
    let (ok, out, err) = medvlm(&[
        "score",
        "--model",
        s(&model),
        "--image",
        s(&img),
        "--system",
        system,
        "--prompt",
        &user_text(&c),
        "--completion",
        c["completion"].as_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let j: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(u32s(&j["completion_token_ids"]), u32s(&c["completion_ids"]));
    let want = f32s(&c["completion_logprobs"]);
    let got: Vec<f32> = j["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap() as f32)
        .collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-4, "{g} vs {w}");
    }
    let sum = j["logprob_sum"].as_f64().unwrap();
    assert!((sum - c["completion_logprob_sum"].as_f64().unwrap()).abs() < 1e-3);
}

#[test]
fn inspect_reports_transformers_parameter_count() {
    for model in ["tiny-a", "tiny-b"] {
        let meta: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("cases-{model}.json"))).unwrap(),
        )
        .unwrap();
        let dir = fixtures().join(model);
        let (ok, out, err) = medvlm(&["inspect", "--model", s(&dir), "--json"]);
        assert!(ok, "{err}");
        let j: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["parameters"], meta["num_parameters"], "{model}");
        let (ok, out, _) = medvlm(&["inspect", "--model", s(&dir)]);
        assert!(ok && out.contains("Qwen2-VL"));
    }
    let (_, out, _) = medvlm(&["inspect", "--model", s(&fixtures().join("tiny-b"))]);
    assert!(out.contains("bf16"), "{out}");
}

#[test]
fn sampling_is_reproducible_from_the_seed() {
    let model = fixtures().join("tiny-a");
    let img = fixture_image("square.png");
    let run = |seed: &str| {
        let (ok, out, err) = medvlm(&[
            "generate",
            "--model",
            s(&model),
            "--image",
            s(&img),
            "--prompt",
            "Describe.",
            "--temperature",
            "1.0",
            "--top-p",
            "0.95",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--max-new-tokens",
            "16",
            "--json",
        ]);
        assert!(ok, "{err}");
        let j: Value = serde_json::from_str(out.trim()).unwrap();
        u32s(&j["completion_token_ids"])
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn missing_weights_are_reported() {
    let (_tmp, dir) = scratch_copy("tiny-a");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_clean_error(
        &["inspect", "--model", s(&dir)],
        &["no *.safetensors", s(&dir)],
    );
}

#[test]
fn corrupt_weights_are_reported() {
    let (_tmp, dir) = scratch_copy("tiny-a");
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(
        &["generate", "--model", s(&dir), "--prompt", "hi"],
        &["model.safetensors", "not a valid safetensors file"],
    );
    std::fs::write(&f, b"garbage").unwrap();
    assert_clean_error(&["inspect", "--model", s(&dir)], &["model.safetensors"]);
}

#[test]
fn another_model_type_is_reported() {
    let (_tmp, dir) = scratch_copy("tiny-a");
    let p = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["model_type"] = "llava".into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    assert_clean_error(
        &["generate", "--model", s(&dir), "--prompt", "hi"],
        &["config.json", "llava", "qwen2_vl"],
    );
}

#[test]
fn weights_that_disagree_with_the_config_are_reported() {
    let (_tmp, dir) = scratch_copy("tiny-a");
    let p = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["text_config"]["num_hidden_layers"] = 3.into();
    cfg["text_config"]["layer_types"]
        .as_array_mut()
        .unwrap()
        .push("full_attention".into());
    std::fs::write(&p, cfg.to_string()).unwrap();
    assert_clean_error(&["inspect", "--model", s(&dir)], &["layers.2"]);
    // A config that contradicts itself is reported before the weights are read.
    cfg["text_config"]["layer_types"]
        .as_array_mut()
        .unwrap()
        .pop();
    std::fs::write(&p, cfg.to_string()).unwrap();
    assert_clean_error(
        &["inspect", "--model", s(&dir)],
        &["layer_types", "num_hidden_layers"],
    );
}

#[test]
fn truncated_png_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("cut.png");
    let bytes = std::fs::read(fixture_image("square.png")).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let model = fixtures().join("tiny-a");
    assert_clean_error(
        &[
            "generate",
            "--model",
            s(&model),
            "--image",
            s(&bad),
            "--prompt",
            "hi",
        ],
        &["cut.png"],
    );
}

#[test]
fn unreadable_paths_are_reported() {
    let model = fixtures().join("tiny-a");
    assert_clean_error(
        &[
            "generate",
            "--model",
            s(&model),
            "--image",
            "/no/such/scan.png",
            "--prompt",
            "hi",
        ],
        &["/no/such/scan.png"],
    );
    assert_clean_error(
        &["generate", "--model", "/no/such/model", "--prompt", "hi"],
        &["/no/such/model"],
    );
}

#[test]
fn prompts_longer_than_the_limit_fail_instead_of_truncating_images() {
    let model = fixtures().join("tiny-a");
    let img = fixture_image("large.png");
    assert_clean_error(
        &[
            "generate",
            "--model",
            s(&model),
            "--image",
            s(&img),
            "--prompt",
            "hi",
            "--max-prompt-tokens",
            "20",
        ],
        &["limit is 20", "never truncated"],
    );
}

#[test]
fn reserved_tokens_in_the_prompt_are_refused() {
    let model = fixtures().join("tiny-a");
    assert_clean_error(
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "look <|image_pad|> here",
        ],
        &["<|image_pad|>"],
    );
}

#[test]
fn num_samples_returns_a_group_and_settings_are_reported() {
    let model = fixtures().join("tiny-a");
    let img = fixture_image("square.png");
    let (ok, out, err) = medvlm(&[
        "generate",
        "--model",
        s(&model),
        "--image",
        s(&img),
        "--prompt",
        "Describe.",
        "--num-samples",
        "3",
        "--temperature",
        "1",
        "--seed",
        "5",
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    assert!(ok, "{err}");
    // Every effective setting is reported with its source.
    assert!(err.contains("temperature=1 (set by you)"), "{err}");
    assert!(err.contains("top_k=1 (generation_config.json)"), "{err}");
    assert!(err.contains("max_new_tokens=12 (set by you)"), "{err}");
    let j: Value = serde_json::from_str(out.trim()).unwrap();
    let samples = j["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3);
    for smp in samples {
        let n = smp["completion_token_ids"].as_array().unwrap().len();
        assert_eq!(smp["logprobs"].as_array().unwrap().len(), n);
        assert!((1..=12).contains(&n));
    }
}

#[test]
fn stream_prints_the_same_text_as_a_plain_run() {
    let model = fixtures().join("tiny-a");
    let img = fixture_image("mri-brain.png");
    let args = |extra: &'static str| {
        let mut v = vec![
            "generate".to_string(),
            "--model".into(),
            s(&model).into(),
            "--image".into(),
            s(&img).into(),
            "--prompt".into(),
            "What is this?".into(),
            "--max-new-tokens".into(),
            "20".into(),
            "--temperature".into(),
            "0".into(),
        ];
        if !extra.is_empty() {
            v.push(extra.into());
        }
        v
    };
    let plain = args("");
    let streamed = args("--stream");
    let (ok1, out1, e1) = medvlm(&plain.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok2, out2, e2) = medvlm(&streamed.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok1 && ok2, "{e1}{e2}");
    assert_eq!(out1, out2);
}

#[test]
fn bench_generate_runs_and_reports_every_figure() {
    let (ok, out, err) = medvlm(&[
        "bench",
        "generate",
        "--new-tokens",
        "2",
        "--group",
        "2",
        "--threads",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["parameters"], 119_719_168);
    assert_eq!(j["image_tokens"], 256);
    for k in [
        "prefill_ms",
        "decode_tok_s_batch1",
        "group_decode_tok_s",
        "peak_rss_mib",
    ] {
        assert!(j[k].as_f64().unwrap() > 0.0, "{k}");
    }
}

/// `bench generate --model DIR` times the checkpoint's own weights: its parameter count
/// (transformers' count of the fixture), its quantization when asked, and it does not mix
/// with the random shapes' flags.
#[test]
fn bench_generate_times_a_checkpoint() {
    let dir = fixtures().join("tiny-a");
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("cases-tiny-a.json")).unwrap(),
    )
    .unwrap();
    for quantize in [None, Some("q8_0")] {
        let mut args = vec![
            "bench",
            "generate",
            "--model",
            s(&dir),
            "--new-tokens",
            "2",
            "--group",
            "2",
            "--json",
        ];
        if let Some(q) = quantize {
            args.extend(["--quantize", q]);
        }
        let (ok, out, err) = medvlm(&args);
        assert!(ok, "{err}");
        let j: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["random"], false);
        assert_eq!(j["parameters"], want["num_parameters"]);
        assert_eq!(j["quantize"].as_str(), quantize);
        assert!(j["decode_tok_s_batch1"].as_f64().unwrap() > 0.0);
    }
    let (ok, _, err) = medvlm(&[
        "bench",
        "generate",
        "--model",
        s(&dir),
        "--preset",
        "qwen2-vl-2b",
    ]);
    assert!(!ok && err.contains("--preset"), "{err}");
}

#[test]
fn bench_train_runs_grpo_and_sft_steps_and_reports_every_phase() {
    for sft in [false, true] {
        let mut args = vec![
            "bench",
            "train",
            "--completion-len",
            "3",
            "--group",
            "2",
            "--micro-batch",
            "1",
            "--steps",
            "1",
            "--threads",
            "2",
            "--json",
        ];
        if sft {
            args.push("--sft");
        }
        let (ok, out, err) = medvlm(&args);
        assert!(ok, "{err}");
        let j: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["parameters"], 119_719_168);
        assert_eq!(j["image_tokens"], 64);
        let step = &j["steps"][0];
        let mut timed = vec!["policy_s", "optimizer_s", "total_s"];
        if !sft {
            timed.extend(["generation_s", "reference_s"]);
        }
        for k in timed {
            assert!(step[k].as_f64().unwrap() > 0.0, "sft={sft}: {k}");
        }
        // SFT's gradient is never zero; GRPO's first step is exactly zero when every
        // completion of a group gets the same reward (a random model's always do: no
        // advantage) and the reference pass computes the policy's very numbers (no KL), as
        // it does where both run the same kernels (CPUs without AVX-512).
        let grad = step["grad_norm"].as_f64().unwrap();
        assert!(
            grad.is_finite() && grad >= 0.0,
            "sft={sft}: grad norm {grad}"
        );
        if sft {
            assert!(grad > 0.0, "SFT grad norm {grad}");
        }
        // The loss of random weights on 151,936 classes: about ln(151936) = 11.9 for SFT;
        // GRPO's is a small advantage-weighted term.
        let loss = step["loss"].as_f64().unwrap();
        assert!(loss.is_finite(), "sft={sft}: loss {loss}");
        if sft {
            assert!((loss - 151_936f64.ln()).abs() < 0.5, "SFT loss {loss}");
        }
        assert!(j["peak_rss_mib"].as_f64().unwrap() > 0.0);
    }
    let (ok, _, err) = medvlm(&["bench", "train", "--group", "1"]);
    assert!(!ok && err.contains("--group must be at least 2"), "{err}");
}

/// `init --preset qwen2-vl-bench` writes a real-layout checkpoint: bf16 weights in two
/// shards with an index, Qwen2's special-token ids, and it loads and answers.
#[test]
fn init_preset_writes_a_sharded_bf16_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bench");
    let (ok, stdout, err) = medvlm(&["init", "--preset", "qwen2-vl-bench", "--out", s(&out)]);
    assert!(ok, "{err}");
    assert_eq!(stdout.trim(), out.display().to_string());
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "preprocessor_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let (ok, j, err) = medvlm(&["inspect", "--model", s(&out), "--json"]);
    assert!(ok, "{err}");
    let j: Value = serde_json::from_str(&j).unwrap();
    assert_eq!(j["parameters"], 119_719_168, "{j}");
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(151_643));
    assert_eq!(tok.token_to_id("<|image_pad|>"), Some(151_655));
    let (ok, _, err) = medvlm(&[
        "generate",
        "--model",
        s(&out),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "2",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = medvlm(&["init", "--preset", "qwen2-vl-bench", "--out", s(&out)]);
    assert!(!ok && err.contains("already exists"), "{err}");
}

/// `inspect` names the family and lists what came from transformers' defaults; a Qwen2.5-VL
/// config without its window size is one line naming the file and the field.
#[test]
fn inspect_names_the_architecture_defaults_and_refusals() {
    for (model, arch) in [
        ("tiny-25a", "Qwen2.5-VL"),
        ("tiny-25b", "Qwen2.5-VL"),
        ("tiny-c", "Qwen2-VL"),
    ] {
        let (ok, out, err) = medvlm(&["inspect", "--model", s(&fixtures().join(model)), "--json"]);
        assert!(ok, "{err}");
        let j: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["architecture"], arch, "{model}");
        // transformers' own count (cases-*.json, num_parameters).
        assert_eq!(
            j["parameters"],
            case_meta(model)["num_parameters"],
            "{model}"
        );
    }
    let (_tmp, dir) = scratch_copy("tiny-25b");
    let p = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["vision_config"]
        .as_object_mut()
        .unwrap()
        .remove("rope_parameters");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let (ok, out, err) = medvlm(&["inspect", "--model", s(&dir)]);
    assert!(ok, "{err}");
    assert!(
        out.contains("vision_config.rope_parameters.rope_theta = 10000"),
        "{out}"
    );
    cfg["vision_config"]
        .as_object_mut()
        .unwrap()
        .remove("window_size");
    std::fs::write(&p, cfg.to_string()).unwrap();
    assert_clean_error(
        &["inspect", "--model", s(&dir)],
        &["config.json", "vision_config.window_size"],
    );
}

fn case_meta(model: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("cases-{model}.json"))).unwrap(),
    )
    .unwrap()
}

/// A reader that stops early (`| head`) ends medvlm quietly with success, whatever it was
/// printing.
#[test]
fn a_closed_pipe_ends_quietly() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_medvlm");
    let model = fixtures().join("tiny-a");
    let cases: Vec<Vec<&str>> = vec![
        vec![
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "24",
            "--json",
            "--num-samples",
            "4",
        ],
        vec![
            "score",
            "--model",
            s(&model),
            "--prompt",
            "hi",
            "--completion",
            "hello there, the scan shows",
            "--json",
        ],
        vec!["train", "grpo", "--print-config"],
    ];
    for args in cases {
        let mut child = Command::new(bin)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read one byte, then hang up, as `head -c 1` does.
        let mut out = child.stdout.take().unwrap();
        let mut one = [0u8; 1];
        let _ = out.read(&mut one);
        drop(out);
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
        assert!(status.success(), "{args:?}: {status:?} {err}");
    }
}

/// Sizes a user controls are checked against the model's context before anything is
/// allocated: one line, not an allocation abort.
#[test]
fn sizes_beyond_the_context_are_refused_before_allocating() {
    let model = fixtures().join("tiny-a");
    for n in ["99999999999", "4096", "18446744073709551615"] {
        assert_error_line(
            &[
                "generate",
                "--model",
                s(&model),
                "--prompt",
                "hi",
                "--max-new-tokens",
                n,
            ],
            &["max_new_tokens", "context", "4096"],
        );
    }
    let long = "scan ".repeat(5000);
    assert_error_line(
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            &long,
            "--max-new-tokens",
            "4",
        ],
        &["prompt", "context is 4096"],
    );
    assert_error_line(
        &[
            "score",
            "--model",
            s(&model),
            "--prompt",
            &long,
            "--completion",
            "yes",
        ],
        &["prompt", "context is 4096"],
    );
}

/// `data synth` and `demo` refuse a non-empty output directory; --force replaces only
/// their own earlier output, never a directory of anything else.
#[test]
fn non_empty_output_directories_need_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("synth");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("old.txt"), "earlier work").unwrap();
    assert_clean_error(
        &["data", "synth", "--out", s(&out), "--n", "2"],
        &["--out", "not empty", "old.txt"],
    );
    // --force does not make a user's directory medvlm's.
    assert_clean_error(
        &["data", "synth", "--out", s(&out), "--n", "2", "--force"],
        &["--out", "not empty"],
    );
    assert!(out.join("old.txt").is_file(), "nothing may be touched");
    let demo_out = tmp.path().join("demo");
    std::fs::create_dir(&demo_out).unwrap();
    std::fs::write(demo_out.join("keep"), "x").unwrap();
    assert_clean_error(
        &["demo", "--quick", "--out", s(&demo_out), "--force"],
        &["--out", "not empty"],
    );
    assert!(demo_out.join("keep").is_file());
    // Its own earlier output: refused without --force, replaced with it.
    let own = tmp.path().join("own");
    let (ok, _, err) = medvlm(&["data", "synth", "--out", s(&own), "--n", "2"]);
    assert!(ok, "{err}");
    assert_clean_error(
        &["data", "synth", "--out", s(&own), "--n", "3"],
        &["earlier `medvlm data synth`", "--force"],
    );
    let (ok, _, err) = medvlm(&["data", "synth", "--out", s(&own), "--n", "3", "--force"]);
    assert!(ok, "{err}");
    let rows: Value =
        serde_json::from_str(&std::fs::read_to_string(own.join("data.json")).unwrap()).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 3, "--force replaced it");
    // ... but not when a user's file was put into it.
    std::fs::write(own.join("notes.txt"), "mine").unwrap();
    assert_clean_error(
        &["data", "synth", "--out", s(&own), "--n", "2", "--force"],
        &["does not write (notes.txt)"],
    );
    assert!(own.join("notes.txt").is_file());
    // An empty directory is fine without --force.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, err) = medvlm(&["data", "synth", "--out", s(&empty), "--n", "2"]);
    assert!(ok, "{err}");
    assert_only(tmp.path(), &["synth", "demo", "own", "empty"]);
}

/// `dir` holds exactly `names` (no hidden temporary directory left beside them).
fn assert_only(dir: &std::path::Path, names: &[&str]) {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    found.sort();
    let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    want.sort();
    assert_eq!(found, want, "in {}", dir.display());
}

/// Bytes of every file under `dir`, by relative path: to check that nothing was touched.
fn snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// No command writes over files it did not write: a training run into a directory of the
/// user's (even the --config file itself), a run of another kind, an evaluation into a
/// training run or an earlier evaluation, a plot over a config, a synth or init over
/// anything. Each is refused in one line naming the flag, and every file is left as it was.
#[test]
fn commands_never_write_over_files_they_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = fixtures().join("tiny-a");
    let data_dir = dir.join("data");
    let (ok, _, err) = medvlm(&["data", "synth", "--out", s(&data_dir), "--n", "2"]);
    assert!(ok, "{err}");
    let data = data_dir.join("data.json");

    // A user's directory holding their commented config.
    let mine = dir.join("mine");
    std::fs::create_dir(&mine).unwrap();
    let config = mine.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "# my settings, with comments\nmodel = {:?}\ntrain_data = {:?}\noutput_dir = {:?}\n\
             max_steps = 1\nmax_pixels = 3136\n",
            s(&model),
            s(&data),
            s(&mine)
        ),
    )
    .unwrap();
    std::fs::write(mine.join("notes.txt"), "mine").unwrap();
    let before = snapshot(&mine);
    // The --config file itself would become the resolved config.
    assert_clean_error(
        &["train", "sft", "--config", s(&config)],
        &["--config", "config.toml", "--output-dir"],
    );
    // The same settings from elsewhere: the directory is still the user's.
    let elsewhere = dir.join("elsewhere.toml");
    std::fs::copy(&config, &elsewhere).unwrap();
    assert_clean_error(
        &["train", "sft", "--config", s(&elsewhere)],
        &["--output-dir", "not empty", "config.toml", "notes.txt"],
    );
    std::fs::remove_file(&elsewhere).unwrap();
    assert_clean_error(
        &[
            "eval",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&mine),
            "--force",
        ],
        &["--out", "not empty"],
    );
    assert_clean_error(
        &["plot", s(&mine), "--out", s(&config)],
        &["--out", "config.toml", ".png"],
    );
    std::fs::write(mine.join("fake.png"), "not a picture").unwrap();
    assert_clean_error(
        &["plot", s(&mine), "--out", s(&mine.join("fake.png"))],
        &["--out", "not a PNG"],
    );
    std::fs::remove_file(mine.join("fake.png")).unwrap();
    assert_clean_error(&["init", "--out", s(&mine)], &["--out", "already exists"]);
    assert_eq!(snapshot(&mine), before, "the user's files are untouched");

    // A medvlm run without checkpoints (stopped before its first) may be restarted, but not
    // from its own config.toml, which the new run would replace.
    let run = dir.join("run");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "sft",
            "--model",
            s(&model),
            "--train-data",
            s(&data),
            "--output-dir",
            s(&run),
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--max-pixels",
            "3136",
        ];
        args.extend_from_slice(extra);
        medvlm(&args)
    };
    let (ok, _, err) = train(&["--stop-after", "0"]);
    assert!(
        !ok && err.contains("stopped before any checkpoint"),
        "{err}"
    );
    assert!(run.join("medvlm-output.json").is_file());
    let run_config = run.join("config.toml");
    let written = std::fs::read(&run_config).unwrap();
    assert_clean_error(
        &["train", "sft", "--config", s(&run_config)],
        &["--config", "config.toml", "--output-dir"],
    );
    assert_eq!(std::fs::read(&run_config).unwrap(), written);
    // Another kind of run in it: refused, named.
    assert_clean_error(
        &[
            "train",
            "grpo",
            "--model",
            s(&model),
            "--train-data",
            s(&data),
            "--output-dir",
            s(&run),
        ],
        &["--output-dir", "`medvlm train sft`"],
    );
    assert_clean_error(
        &["train", "grpo", "--resume", s(&run)],
        &["--resume", "train sft", "medvlm train sft --resume"],
    );
    // An evaluation into the training run: refused.
    assert_clean_error(
        &[
            "eval",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&run),
        ],
        &["--out", "`medvlm train sft`"],
    );
    // The run itself restarts in place.
    let (ok, _, err) = train(&[]);
    assert!(ok, "{err}");

    // An earlier evaluation is replaced only with --force.
    let ev = dir.join("ev");
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--max-new-tokens",
            "2",
            "--out",
            s(&ev),
        ];
        args.extend_from_slice(extra);
        medvlm(&args)
    };
    let (ok, _, err) = eval(&[]);
    assert!(ok, "{err}");
    let t = std::time::Instant::now();
    let (ok, _, err) = eval(&[]);
    assert!(!ok && err.contains("--force"), "{err}");
    assert!(t.elapsed().as_secs_f64() < 5.0, "refused before evaluating");
    let (ok, _, err) = eval(&["--force"]);
    assert!(ok, "{err}");
    assert!(ev.join("report.json").is_file());
    assert_only(dir, &["data", "mine", "run", "ev"]);
}

/// Sizes no machine can hold are refused at once, in one line naming the flag, before
/// anything is allocated or written; nothing is left behind.
#[test]
fn impossible_sizes_are_refused_at_once_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = dir.join("out");
    let o = s(&out);
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["init", "--out", o, "--hidden-size", "1000000000"],
            vec!["--hidden-size", "1000000000"],
        ),
        (
            vec!["init", "--out", o, "--hidden-size", "0"],
            vec!["--hidden-size"],
        ),
        (
            vec!["init", "--out", o, "--layers", "100000"],
            vec!["--layers", "100000"],
        ),
        (vec!["init", "--out", o, "--layers", "0"], vec!["--layers"]),
        (
            vec![
                "init",
                "--out",
                o,
                "--hidden-size",
                "16384",
                "--layers",
                "256",
            ],
            vec!["parameters", "--hidden-size"],
        ),
        (
            vec!["data", "synth", "--out", o, "--n", "1000000000000"],
            vec!["--n 1000000000000", "free"],
        ),
        (
            vec!["demo", "--out", o, "--train-items", "1000000000000"],
            vec!["--train-items"],
        ),
        (
            vec!["demo", "--out", o, "--test-items", "1"],
            vec!["--test-items"],
        ),
        (
            vec![
                "demo",
                "--out",
                o,
                "--rl-batch",
                "100000",
                "--group",
                "100000",
            ],
            vec!["--rl-batch"],
        ),
        (
            vec!["bench", "train", "--prompts", "1000000000"],
            vec!["--prompts"],
        ),
        (
            vec!["bench", "train", "--image-size", "100000"],
            vec!["--image-size"],
        ),
        (
            vec!["bench", "train", "--completion-len", "100000000"],
            vec!["--completion-len", "context"],
        ),
        (vec!["bench", "train", "--steps", "0"], vec!["--steps"]),
        (vec!["bench", "train", "--beta", "nan"], vec!["--beta"]),
        (vec!["plot", o, "--width", "100000"], vec!["--width 100000"]),
    ];
    for (args, needles) in cases {
        let t = std::time::Instant::now();
        assert_clean_error(&args, &needles);
        assert!(
            t.elapsed().as_secs_f64() < 5.0,
            "{args:?} worked before refusing"
        );
        assert_only(dir, &[]);
    }
}

/// Numbers outside their meaning are refused, named by the flag the user wrote, before
/// any model is loaded: the training family (NaN, inf, negative, zero, probabilities and
/// betas out of range, lengths beyond the context) and the inference commands' flags,
/// whatever the decoding.
#[test]
fn nonsense_values_are_refused_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = fixtures().join("tiny-a");
    let m = s(&model);
    let img = fixture_image("square.png");
    let i = s(&img);
    let data_dir = dir.join("data");
    let (ok, _, err) = medvlm(&["data", "synth", "--out", s(&data_dir), "--n", "2"]);
    assert!(ok, "{err}");
    let data = data_dir.join("data.json");
    let d = s(&data);
    let run = dir.join("run");
    let r = s(&run);
    let train = |kind: &'static str, extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            kind,
            "--model",
            m,
            "--train-data",
            d,
            "--output-dir",
            r,
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let args = |v: &[&str]| -> Vec<String> { v.iter().map(|x| x.to_string()).collect() };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            train("grpo", &["--learning-rate", "inf"]),
            vec!["--learning-rate", "inf"],
        ),
        (
            train("grpo", &["--learning-rate", "-1e-5"]),
            vec!["--learning-rate"],
        ),
        (
            train("grpo", &["--epsilon-low", "2"]),
            vec!["--epsilon-low", "2"],
        ),
        (
            train("grpo", &["--adam-beta1", "1.5"]),
            vec!["--adam-beta1", "1.5"],
        ),
        (
            train("grpo", &["--adam-beta2", "nan"]),
            vec!["--adam-beta2", "NaN"],
        ),
        (train("grpo", &["--top-p", "0"]), vec!["--top-p"]),
        (train("grpo", &["--beta", "-0.1"]), vec!["--beta"]),
        (
            train("grpo", &["--temperature", "inf"]),
            vec!["--temperature"],
        ),
        (
            train("grpo", &["--seed", "18446744073709551615"]),
            vec!["--seed", "9223372036854775807"],
        ),
        (
            train("grpo", &["--learning-rate", "fast"]),
            vec!["--learning-rate", "expected a number"],
        ),
        (
            train("grpo", &["--max-completion-length", "100000"]),
            vec!["--max-completion-length", "context"],
        ),
        (
            train(
                "grpo",
                &["--min-pixels", "100000000", "--max-pixels", "100000000"],
            ),
            vec!["--min-pixels", "16777216"],
        ),
        (
            train("grpo", &["--lora-r", "4", "--lora-dropout", "1"]),
            vec!["--lora-dropout"],
        ),
        (
            train("grpo", &["--rewards", "accuracy,speed"]),
            vec!["--rewards", "speed"],
        ),
        (train("sft", &["--batch-size", "0"]), vec!["--batch-size"]),
        (
            train("sft", &["--max-grad-norm", "nan"]),
            vec!["--max-grad-norm"],
        ),
        (
            train("sft", &["--weight-decay", "-1"]),
            vec!["--weight-decay"],
        ),
        (
            train("sft", &["--epochs", "0"]),
            vec!["--epochs", "max_steps"],
        ),
        (
            args(&[
                "train",
                "sft",
                "--model",
                m,
                "--train-data",
                d,
                "--plan",
                "--plan-gpu-gib",
                "inf",
            ]),
            vec!["--plan-gpu-gib"],
        ),
        (
            args(&["generate", "--model", m, "--prompt", "hi", "--min-p", "2"]),
            vec!["--min-p", "2"],
        ),
        (
            args(&["generate", "--model", m, "--prompt", "hi", "--top-p", "0"]),
            vec!["--top-p"],
        ),
        (
            args(&[
                "generate",
                "--model",
                m,
                "--prompt",
                "hi",
                "--temperature=-1",
            ]),
            vec!["--temperature"],
        ),
        (
            args(&[
                "generate",
                "--model",
                m,
                "--prompt",
                "hi",
                "--repetition-penalty",
                "0",
            ]),
            vec!["--repetition-penalty"],
        ),
        (
            args(&[
                "generate",
                "--model",
                m,
                "--prompt",
                "hi",
                "--max-pixels",
                "0",
            ]),
            vec!["--max-pixels"],
        ),
        (
            args(&[
                "eval",
                "--model",
                m,
                "--data",
                d,
                "--batch-size",
                "0",
                "--out",
                r,
            ]),
            vec!["--batch-size"],
        ),
        (
            args(&[
                "eval",
                "--model",
                m,
                "--data",
                d,
                "--max-new-tokens",
                "0",
                "--out",
                r,
            ]),
            vec!["--max-new-tokens"],
        ),
        (
            args(&[
                "eval",
                "--model",
                m,
                "--data",
                d,
                "--min-pixels",
                "5000",
                "--max-pixels",
                "4000",
                "--out",
                r,
            ]),
            vec!["--min-pixels", "--max-pixels"],
        ),
        (
            args(&[
                "ask",
                "--model",
                m,
                "--image",
                i,
                "--question",
                "q",
                "--max-new-tokens",
                "0",
            ]),
            vec!["--max-new-tokens"],
        ),
        (
            args(&[
                "eval",
                "--model",
                m,
                "--data",
                d,
                "--max-new-tokens",
                "1000000000",
                "--out",
                r,
            ]),
            vec!["--max-new-tokens 1000000000", "context of 4096"],
        ),
        (
            args(&[
                "ask",
                "--model",
                m,
                "--image",
                i,
                "--question",
                "q",
                "--max-new-tokens",
                "4096",
            ]),
            vec!["--max-new-tokens 4096", "context"],
        ),
    ];
    for (a, needles) in cases {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let t = std::time::Instant::now();
        assert_clean_error(&a, &needles);
        assert!(t.elapsed().as_secs_f64() < 5.0, "{a:?} did work first");
        assert!(!run.exists(), "{a:?} created its output");
    }
}

/// List settings take what a newcomer writes: one value, comma-separated values, or a TOML
/// array; and --help says so.
#[test]
fn list_flags_take_one_value_or_commas_and_help_says_so() {
    let (ok, help, _) = medvlm(&["train", "grpo", "--help"]);
    assert!(ok);
    assert!(
        help.contains("--modalities <LIST>") && help.contains("comma-separated"),
        "{help}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let (ok, _, err) = medvlm(&[
        "data",
        "synth",
        "--out",
        s(&data_dir),
        "--n",
        "6",
        "--modality",
        "MRI,CT",
    ]);
    assert!(ok, "{err}");
    let model = fixtures().join("tiny-a");
    let data = data_dir.join("data.json");
    for lists in [
        ["--modalities", "MRI", "--rewards", "accuracy,format"],
        ["--modalities", "MRI,CT", "--rewards", "accuracy"],
        [
            "--modalities",
            "[\"MRI\"]",
            "--rewards",
            "[\"format\", \"accuracy\"]",
        ],
    ] {
        let mut a = vec![
            "train",
            "grpo",
            "--model",
            s(&model),
            "--train-data",
            s(&data),
            "--plan",
        ];
        a.extend_from_slice(&lists);
        let (ok, out, err) = medvlm(&a);
        assert!(ok, "{lists:?}: {err}");
        assert!(out.contains("peak"), "{out}");
    }
}

/// `demo` checks every flag before drawing a scan, naming it as the user wrote it.
#[test]
fn demo_checks_its_flags_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    for (flag, value, needle) in [
        ("--group", "1", "--group must be at least 2"),
        ("--rl-lr", "inf", "--rl-lr must be a finite number"),
        ("--temperature", "0", "--temperature"),
        ("--rl-steps", "0", "--rl-steps"),
        ("--task", "size", "--task size"),
    ] {
        let t = std::time::Instant::now();
        assert_clean_error(
            &["demo", "--quick", "--out", s(&out), flag, value],
            &[needle],
        );
        assert!(t.elapsed().as_secs_f64() < 5.0, "{flag} checked late");
        assert!(!out.exists(), "{flag}: nothing may be written");
    }
    let (ok, _, err) = medvlm(&["demo", "--out", s(&out), "--seed", "18446744073709551615"]);
    assert!(!ok && err.contains("--seed"), "{err}");
}

/// An error is one line; with RUST_BACKTRACE=1 a library's backtrace carried by a cause
/// (candle's) follows on lines of its own instead of being flattened into the line, and a
/// user's mistake stays one line; RUST_BACKTRACE=full adds medvlm's own backtrace.
#[test]
fn errors_stay_one_line_and_backtraces_come_only_when_asked() {
    let missing = ["inspect", "--model", "/no/such/model"];
    for bt in [None, Some("0"), Some("1")] {
        let (ok, _, err) = medvlm_with_backtrace(&missing, bt);
        assert!(!ok);
        assert_eq!(err.trim().lines().count(), 1, "{bt:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains("/no/such/model"),
            "{err}"
        );
    }
    let (_, _, err) = medvlm_with_backtrace(&missing, Some("full"));
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("/no/such/model"),
        "{err}"
    );
    assert!(lines.len() > 3 && lines.contains(&"backtrace:"), "{err}");

    // A candle error (weights that disagree with the config) carries candle's backtrace.
    let (_tmp, dir) = scratch_copy("tiny-a");
    let p = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["text_config"]["num_hidden_layers"] = 3.into();
    if let Some(t) = cfg["text_config"]["layer_types"].as_array_mut() {
        t.push("full_attention".into());
    }
    std::fs::write(&p, cfg.to_string()).unwrap();
    let args = ["inspect", "--model", s(&dir)];
    let (_, _, plain) = medvlm_with_backtrace(&args, None);
    assert_eq!(plain.trim().lines().count(), 1, "{plain}");
    let (_, _, asked) = medvlm_with_backtrace(&args, Some("1"));
    let lines: Vec<&str> = asked.lines().collect();
    assert_eq!(lines[0], plain.trim_end(), "the same first line");
    assert!(plain.len() < 500, "{plain}");
    assert!(
        lines.len() > 2,
        "the backtrace on lines of its own: {asked}"
    );
}

/// A failing run whose last stderr line is the one error line (informational lines such as
/// the sampling settings may come first), with no panic.
fn assert_error_line(args: &[&str], needles: &[&str]) {
    let (ok, _out, err) = medvlm(args);
    assert!(!ok, "expected failure for {args:?}");
    assert!(
        !err.contains("panicked") && !err.contains("memory allocation"),
        "{err}"
    );
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(last.starts_with("error: "), "{err}");
    for n in needles {
        assert!(last.contains(n), "{n:?} missing from: {err}");
    }
}

/// `ask` says what the model saw: the medical file's slice and window, and the image size
/// after resizing with its token count.
#[test]
fn ask_says_what_the_model_saw() {
    let ct = fixtures().join("medical/CT_small.dcm");
    let model = fixtures().join("tiny-a");
    let (ok, _, err) = medvlm(&[
        "ask",
        "--model",
        s(&model),
        "--image",
        s(&ct),
        "--window",
        "lung",
        "--question",
        "Which?",
        "--max-new-tokens",
        "2",
    ]);
    assert!(ok, "{err}");
    // The lung preset is centre -600, width 1500; CT_small is 128x128.
    assert!(err.contains("DICOM, grey, 128x128"), "{err}");
    assert!(
        err.contains("window centre -600 / width 1500 (--window)"),
        "{err}"
    );
    // 128x128 within tiny-a's 9408-pixel limit: smart_resize gives 84x84, 9 tokens.
    assert!(
        err.contains("resized to 84x84 pixels, 9 image tokens"),
        "{err}"
    );
}

/// Data paths that are neither a data file nor a benchmark folder are named as what they
/// are, not "no such file" (and never read: /dev/zero would never end); a folder is read as
/// a benchmark as downloaded, and one that is none says what was looked for.
#[test]
fn data_paths_that_are_not_files_are_named_by_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-a");
    let run = tmp.path().join("run");
    let rows = tmp.path().join("rows.json");
    std::fs::write(&rows, "[]").unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let cases = [
        ("--train-data", "/dev/zero", "is a character device"),
        ("--eval-data", "/dev/zero", "is a character device"),
        (
            "--train-data",
            s(&empty),
            "not a medical VQA benchmark medvlm knows",
        ),
    ];
    for (flag, data, says) in cases {
        let mut args = vec![
            "train",
            "grpo",
            "--model",
            s(&model),
            "--output-dir",
            s(&run),
        ];
        if flag == "--eval-data" {
            args.extend(["--train-data", s(&rows), "--eval-data", data]);
        } else {
            args.extend(["--train-data", data]);
        }
        let (ok, _, err) = medvlm(&args);
        assert!(!ok, "{args:?}");
        assert!(
            err.contains(data) && err.contains(says) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
}
