//! LoRA against PEFT (tools/make_lora_fixture.py, PEFT 0.21 / transformers 5.24): an adapter
//! PEFT wrote on tiny-a (language-model projections and vision attn.qkv / mlp.fc1) gives
//! PEFT's logits and log-probs in medvlm, merged or not; switched off it gives the base;
//! `medvlm merge` writes a checkpoint equal to base + adapter; training touches only the
//! adapters. The other way round, adapters medvlm trained (on tiny-a, and on the Qwen3-VL
//! tiny-3a / tiny-3b with the vision tower, merger and DeepStack mergers adapted too) load in
//! PEFT without missing or unexpected keys and give PEFT medvlm's log-probs.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use medvlm::model::Qwen2Vl;
use medvlm::processor::{Message, Processor, ProcessorOptions, Prompt};
use medvlm::train::config::LoraConfig;
use medvlm::train::logps::{self, SeqRef};
use medvlm::train::TrainableModel;
use serde_json::Value;

struct Case {
    prompt: Prompt,
    completion: Vec<u32>,
    with_adapter: Vec<f32>,
    adapter_off: Vec<f32>,
    logits: Tensor,
}

fn cases() -> (Value, Vec<Case>) {
    cases_from("lora-a-cases.json", Some("lora-a-cases.safetensors"))
}

/// Reads a fixture's prompts (rebuilt by our processor for the fixture's `base_model`, which
/// must give the same ids), completions, PEFT's log-probs and (when given) PEFT's prompt
/// logits.
fn cases_from(json: &str, logits: Option<&str>) -> (Value, Vec<Case>) {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(json)).unwrap()).unwrap();
    let tensors = match logits {
        Some(f) => candle_core::safetensors::load(fixtures().join(f), &Device::Cpu).unwrap(),
        None => Default::default(),
    };
    let base = fixtures().join(meta["base_model"].as_str().unwrap());
    let proc = Processor::from_dir(&base, &ProcessorOptions::default()).unwrap();
    let cases = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let img = proc
                .load_image(&fixture_image(p["image"].as_str().unwrap()))
                .unwrap();
            let prompt = proc
                .prepare(
                    &[Message::user_with_images(1, p["text"].as_str().unwrap())],
                    vec![img],
                    true,
                )
                .unwrap();
            assert_eq!(prompt.input_ids, u32s(&p["input_ids"]), "prompt {i}");
            Case {
                prompt,
                completion: u32s(&p["completion_ids"]),
                with_adapter: f32s(&p["logprobs_adapter"]),
                adapter_off: f32s(&p["logprobs_adapter_disabled"]),
                logits: tensors
                    .get(&format!("logits.{i}"))
                    .cloned()
                    .unwrap_or_else(|| Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap()),
            }
        })
        .collect();
    (meta, cases)
}

fn lora_of(meta: &Value) -> LoraConfig {
    let c = &meta["lora_config"];
    LoraConfig {
        r: c["r"].as_u64().unwrap() as usize,
        alpha: c["lora_alpha"].as_f64().unwrap(),
        dropout: 0.0,
        target_modules: c["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect(),
        base_dtype: "f32".into(),
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn logps_of(model: &Qwen2Vl, cases: &[Case]) -> Vec<Vec<f32>> {
    let seqs: Vec<SeqRef> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| SeqRef {
            prompt: &c.prompt,
            prompt_index: i,
            tokens: &c.completion,
        })
        .collect();
    logps::logps(model, &seqs, 2, 1.0).unwrap()
}

/// medvlm's training-side adapters (unmerged, the adapter a separate low-rank term) and its
/// inference-side merge (`--adapter`) both reproduce PEFT; adapters off give the base.
#[test]
fn peft_adapter_matches_peft_merged_and_unmerged() {
    let (meta, cases) = cases();
    let dev = Device::Cpu;
    let policy = TrainableModel::load_lora(
        &fixtures().join("tiny-a"),
        &lora_of(&meta),
        DType::F32,
        Some(&fixtures().join("lora-a")),
        0,
        &dev,
    )
    .unwrap();
    assert_eq!(
        policy.params.len(),
        36,
        "every adapter tensor is a parameter"
    );
    assert!(policy.params.iter().all(|p| p.name.contains(".lora_")));
    let unmerged = logps_of(&policy.model, &cases);
    let off = logps_of(&policy.model.without_adapters(), &cases);
    let mut merged_model = Qwen2Vl::load(&fixtures().join("tiny-a"), DType::F32, &dev).unwrap();
    merged_model
        .merge_adapter(&fixtures().join("lora-a"))
        .unwrap();
    let merged = logps_of(&merged_model, &cases);
    for (i, c) in cases.iter().enumerate() {
        let (d1, d2, d3) = (
            max_diff(&unmerged[i], &c.with_adapter),
            max_diff(&merged[i], &c.with_adapter),
            max_diff(&off[i], &c.adapter_off),
        );
        println!("prompt {i}: log-probs vs PEFT: unmerged {d1:.2e}, merged {d2:.2e}, adapters off {d3:.2e}");
        assert!(d1 < 1e-4 && d2 < 1e-4 && d3 < 1e-4);
        // The adapter matters: with it off the log-probs are far from PEFT's adapted ones.
        assert!(max_diff(&off[i], &c.with_adapter) > 0.1);
        // Logits at every prompt position, merged model.
        let ids = &c.prompt.input_ids;
        let px = c.prompt.pixel_values(&dev).unwrap();
        let logits = merged_model
            .forward_logits(ids, px.as_ref(), &c.prompt.grids())
            .unwrap();
        let (d, scale) = max_abs_diff(&logits, &c.logits);
        println!("prompt {i}: logits vs PEFT {d:.2e} (max |logit| {scale:.2})");
        assert!(
            d < 1e-4 * scale.max(1.0),
            "prompt {i}: logits differ by {d}"
        );
    }
}

/// `medvlm merge` writes base + adapter as one checkpoint: it loads like any model and
/// gives PEFT's adapted logits; the adapter's untouched tensors are the base's, bit for bit.
#[test]
fn merged_checkpoint_equals_base_plus_adapter() {
    let (_, cases) = cases();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let (ok, stdout, err) = medvlm(&[
        "merge",
        "--model",
        s(&fixtures().join("tiny-a")),
        "--adapter",
        s(&fixtures().join("lora-a")),
        "--out",
        s(&out),
    ]);
    assert!(ok, "{err}");
    assert_eq!(stdout.trim(), out.display().to_string());
    assert!(err.contains("merged 18 adapted weights"), "{err}");
    let dev = Device::Cpu;
    let merged = Qwen2Vl::load(&out, DType::F32, &dev).unwrap();
    for (i, c) in cases.iter().enumerate() {
        let px = c.prompt.pixel_values(&dev).unwrap();
        let logits = merged
            .forward_logits(&c.prompt.input_ids, px.as_ref(), &c.prompt.grids())
            .unwrap();
        let (d, scale) = max_abs_diff(&logits, &c.logits);
        assert!(
            d < 1e-4 * scale.max(1.0),
            "prompt {i}: logits differ by {d}"
        );
    }
    let base =
        candle_core::safetensors::load(fixtures().join("tiny-a/model.safetensors"), &dev).unwrap();
    let after = candle_core::safetensors::load(out.join("model.safetensors"), &dev).unwrap();
    assert_eq!(base.len(), after.len());
    let mut changed = 0;
    for (k, t) in &base {
        let (d, _) = max_abs_diff(t, &after[k]);
        if d > 0.0 {
            changed += 1;
            assert!(
                k.contains("proj") || k.contains("qkv") || k.contains("fc1"),
                "{k} changed"
            );
        }
    }
    assert_eq!(changed, 18);
    // Refuses to overwrite, and names a wrong adapter directory.
    let (ok, _, err) = medvlm(&[
        "merge",
        "--model",
        s(&fixtures().join("tiny-a")),
        "--adapter",
        s(&fixtures().join("lora-a")),
        "--out",
        s(&out),
    ]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = medvlm(&[
        "merge",
        "--model",
        s(&fixtures().join("tiny-a")),
        "--adapter",
        s(&fixtures().join("tiny-b")),
        "--out",
        s(&tmp.path().join("x")),
    ]);
    assert!(!ok && err.contains("adapter_config.json"), "{err}");
}

/// Training with LoRA: only adapters are parameters and only they move; the frozen base
/// (every linear weight, the embeddings) stays bit for bit. Fresh adapters start at the base
/// model (B = 0), so the first step's gradient reaches only the B matrices, the second
/// reaches all of them.
#[test]
fn lora_training_moves_only_the_adapters() {
    use medvlm::train::{AdamW, AdamWConfig};
    let (meta, cases) = cases();
    let dev = Device::Cpu;
    let mut cfg = lora_of(&meta);
    cfg.dropout = 0.1;
    let policy =
        TrainableModel::load_lora(&fixtures().join("tiny-a"), &cfg, DType::F32, None, 3, &dev)
            .unwrap();
    let snapshot = |m: &Qwen2Vl| -> Vec<Tensor> {
        let mut m = m.clone();
        let mut v: Vec<Tensor> = m
            .linears_mut()
            .into_iter()
            .map(|(_, l)| l.weight().copy().unwrap())
            .collect();
        v.push(m.text.embed_weight().copy().unwrap());
        v
    };
    let base_before = snapshot(&policy.model);
    // (Outside the graph: the same kernels run with and without adapters.)
    let start = logps_of(&policy.detached().unwrap(), &cases);
    let off = logps_of(&policy.model.without_adapters(), &cases);
    for (a, b) in start.iter().zip(&off) {
        assert_eq!(a, b, "fresh adapters are the identity");
    }
    let seqs: Vec<SeqRef> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| SeqRef {
            prompt: &c.prompt,
            prompt_index: i,
            tokens: &c.completion,
        })
        .collect();
    let mut opt = AdamW::new(AdamWConfig {
        lr: 1e-2,
        ..Default::default()
    });
    for step in 0..3u64 {
        let (grads, _) = medvlm::sft::gradients(
            &policy,
            &seqs,
            2,
            logps::TrainOptions {
                dropout_seed: Some(step),
                ..Default::default()
            },
        )
        .unwrap();
        for (i, p) in policy.params.iter().enumerate() {
            let n = grads
                .get(i)
                .map(|g| {
                    g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                })
                .unwrap_or(0.0);
            let is_b = p.name.contains("lora_B");
            if step == 0 && !is_b {
                assert_eq!(n, 0.0, "{}: A has no gradient while B is zero", p.name);
            } else {
                assert!(n > 0.0, "step {step}: no gradient for {}", p.name);
            }
        }
        opt.update(&policy.params, &grads, 1e-2).unwrap();
    }
    for (a, b) in base_before.iter().zip(snapshot(&policy.model)) {
        assert_eq!(max_abs_diff(a, &b).0, 0.0, "a base weight moved");
    }
    let after = logps_of(&policy.detached().unwrap(), &cases);
    assert!(
        max_diff(&after[0], &start[0]) > 1e-3,
        "the adapters did not move"
    );
}

/// An adapter medvlm trained and saved (tests/fixtures/lora-medvlm: `medvlm train sft
/// --lora-r 4 --lora-alpha 8 --lora-dropout 0.1` on tiny-a, language model, vision qkv/fc1 and
/// merger mlp.0) loads in PEFT without missing or unexpected keys, and PEFT's log-probs with
/// it (`make_lora_fixture.py --check-adapter`) are medvlm's. Saving it again writes the same
/// tensors under the same names.
#[test]
fn medvlm_adapter_is_one_peft_reads() {
    check_medvlm_adapter("lora-medvlm", "lora-medvlm-peft.json");
}

/// The same for Qwen3-VL: tests/fixtures/lora-medvlm-3a and -3b, trained by medvlm on tiny-3a
/// (released layout, tied) and tiny-3b (transformers 5 layout, bf16 weights) with adapters on
/// the decoder's projections and on every linear layer of the vision tower: the blocks'
/// `attn.qkv`, `attn.proj`, `mlp.linear_fc1/2`, the merger's and the DeepStack mergers'
/// `linear_fc1/2`. Made with (from the repository root; `N` is 3a or 3b):
///
/// ```text
/// medvlm data synth --out /tmp/q3data --n 16 --seed 3
/// medvlm train sft --model tests/fixtures/tiny-N --train-data /tmp/q3data/data.json \
///   --output-dir /tmp/q3run-N --max-pixels 12288 --min-pixels 4096 --micro-batch 2 \
///   --batch-size 2 --learning-rate 1e-2 --max-steps 6 --lora-r 4 --lora-alpha 8 \
///   --lora-dropout 0.1 --device cpu --lora-target-modules \
///   q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,qkv,proj,linear_fc1,linear_fc2
/// cp -r /tmp/q3run-N/final tests/fixtures/lora-medvlm-N   # less medvlm.json
/// tools/make_lora_fixture.py --base tiny-N --check-adapter tests/fixtures/lora-medvlm-N \
///   --out tests/fixtures/lora-medvlm-N-peft.json
/// ```
///
/// `proj` also names the patch embedding (a Conv3d, no adapter in medvlm): the adapter's
/// config must exclude it, or PEFT gives it an adapter and reports its keys missing.
#[test]
fn medvlm_qwen3_adapters_are_ones_peft_reads() {
    for n in ["3a", "3b"] {
        let dir = format!("lora-medvlm-{n}");
        check_medvlm_adapter(&dir, &format!("{dir}-peft.json"));
        let acfg = medvlm::model::lora::AdapterConfig::read(&fixtures().join(&dir)).unwrap();
        assert_eq!(
            acfg.exclude_modules,
            Some(serde_json::json!(["model.visual.patch_embed.proj"])),
            "{dir}"
        );
        let file = candle_core::safetensors::load(
            fixtures().join(&dir).join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        // Each part of the tower's adapters matters to the log-probs by far more than the
        // bound on the agreement with PEFT: the agreement covers them.
        let (_, cases) = cases_from(&format!("{dir}-peft.json"), None);
        let base = fixtures().join(format!("tiny-{n}"));
        let cfg = LoraConfig {
            r: acfg.r,
            alpha: acfg.lora_alpha,
            dropout: 0.0,
            target_modules: serde_json::from_value(acfg.target_modules.clone().unwrap()).unwrap(),
            base_dtype: "f32".into(),
        };
        let policy = TrainableModel::load_lora(
            &base,
            &cfg,
            DType::F32,
            Some(&fixtures().join(&dir)),
            0,
            &Device::Cpu,
        )
        .unwrap();
        for part in [
            "model.visual.blocks.",
            "model.visual.merger.",
            "model.visual.deepstack_merger_list.",
        ] {
            let mut m = policy.detached().unwrap();
            for (path, lin) in m.linears_mut() {
                if path.starts_with(part) {
                    lin.set_lora(None);
                }
            }
            let without = logps_of(&m, &cases);
            let moved = cases
                .iter()
                .zip(&without)
                .map(|(c, w)| max_diff(w, &c.with_adapter))
                .fold(0.0, f32::max);
            println!("{dir}: without the adapters of {part}* the log-probs move by {moved:.2e}");
            assert!(
                moved > 1e-2,
                "{dir}: {part} adapters move the log-probs by {moved}"
            );
        }
        for module in [
            "model.language_model.layers.0.self_attn.q_proj",
            "model.language_model.layers.0.mlp.down_proj",
            "model.visual.blocks.0.attn.qkv",
            "model.visual.blocks.0.attn.proj",
            "model.visual.blocks.0.mlp.linear_fc1",
            "model.visual.blocks.0.mlp.linear_fc2",
            "model.visual.merger.linear_fc1",
            "model.visual.merger.linear_fc2",
            "model.visual.deepstack_merger_list.0.linear_fc1",
            "model.visual.deepstack_merger_list.1.linear_fc2",
        ] {
            let b = &file[&format!("base_model.model.{module}.lora_B.weight")];
            let (norm, _) = max_abs_diff(b, &b.zeros_like().unwrap());
            assert!(norm > 0.0, "{dir}: {module} was not trained");
        }
    }
}

/// `medvlm merge` of the Qwen3-VL adapter on the f32 tiny-3a: the checkpoint gives PEFT's
/// log-probs with the adapter, and only the 52 adapted weights differ from the base's.
/// (tiny-3b's merge is stored in bf16, so it is W + s B A rounded: `make_lora_fixture.py
/// --base tiny-3b --check-merged DIR --adapter tests/fixtures/lora-medvlm-3b` finds its weights
/// bit for bit PEFT's f32 merge rounded to bf16.)
#[test]
fn merged_qwen3_checkpoint_gives_peft_log_probs() {
    let (_, cases) = cases_from("lora-medvlm-3a-peft.json", None);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let (base, adapter) = (
        fixtures().join("tiny-3a"),
        fixtures().join("lora-medvlm-3a"),
    );
    let (ok, _, err) = medvlm(&[
        "merge",
        "--model",
        s(&base),
        "--adapter",
        s(&adapter),
        "--out",
        s(&out),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("merged 52 adapted weights"), "{err}");
    let dev = Device::Cpu;
    let merged = logps_of(&Qwen2Vl::load(&out, DType::F32, &dev).unwrap(), &cases);
    for (i, c) in cases.iter().enumerate() {
        let d = max_diff(&merged[i], &c.with_adapter);
        println!("prompt {i}: merged tiny-3a checkpoint vs PEFT: {d:.2e}");
        assert!(d < 1e-4, "prompt {i}: {d}");
    }
    let before = candle_core::safetensors::load(base.join("model.safetensors"), &dev).unwrap();
    let after = candle_core::safetensors::load(out.join("model.safetensors"), &dev).unwrap();
    assert_eq!(before.len(), after.len());
    let changed = before
        .iter()
        .filter(|(k, t)| max_abs_diff(t, &after[*k]).0 > 0.0)
        .count();
    assert_eq!(changed, 52);
}

/// medvlm's log-probs with the adapter it wrote in `fixtures/dir` (training's unmerged
/// adapters and `--adapter`'s merge) are PEFT's in `peft_json`, which PEFT got loading the
/// directory with no missing or unexpected keys; saving it again writes the same tensors and
/// config.
fn check_medvlm_adapter(dir: &str, peft_json: &str) {
    let (meta, cases) = cases_from(peft_json, None);
    let report = &meta["load_report"];
    assert_eq!(report["missing_keys"], serde_json::json!([]), "{dir}");
    assert_eq!(report["unexpected_keys"], serde_json::json!([]), "{dir}");
    assert_eq!(report["file_keys_equal_peft_save_names"], true, "{dir}");
    let dir = fixtures().join(dir);
    let acfg = medvlm::model::lora::AdapterConfig::read(&dir).unwrap();
    let cfg = LoraConfig {
        r: acfg.r,
        alpha: acfg.lora_alpha,
        dropout: acfg.lora_dropout,
        target_modules: serde_json::from_value(acfg.target_modules.clone().unwrap()).unwrap(),
        base_dtype: "f32".into(),
    };
    let dev = Device::Cpu;
    let base = fixtures().join(meta["base_model"].as_str().unwrap());
    let policy = TrainableModel::load_lora(&base, &cfg, DType::F32, Some(&dir), 0, &dev).unwrap();
    let ours = logps_of(&policy.detached().unwrap(), &cases);
    let mut merged = Qwen2Vl::load(&base, DType::F32, &dev).unwrap();
    merged.merge_adapter(&dir).unwrap();
    let ours_merged = logps_of(&merged, &cases);
    let off = logps_of(&policy.model.without_adapters(), &cases);
    for (i, c) in cases.iter().enumerate() {
        let (d1, d2, d3) = (
            max_diff(&ours[i], &c.with_adapter),
            max_diff(&ours_merged[i], &c.with_adapter),
            max_diff(&off[i], &c.adapter_off),
        );
        let change = max_diff(&c.with_adapter, &c.adapter_off);
        println!(
            "{} prompt {i}: medvlm vs PEFT on medvlm's adapter: {d1:.2e} (merged {d2:.2e}, \
             adapter off {d3:.2e}); the adapter moves PEFT's log-probs by {change:.3}",
            dir.display()
        );
        assert!(d1 < 1e-4 && d2 < 1e-4 && d3 < 1e-4);
        assert!(change > 0.1, "the adapter matters");
    }
    let tmp = tempfile::tempdir().unwrap();
    let again =
        medvlm::train::checkpoint::save(tmp.path(), "again", &policy, DType::F32, None).unwrap();
    let load = |d: &std::path::Path| {
        candle_core::safetensors::load(d.join("adapter_model.safetensors"), &dev).unwrap()
    };
    let (a, b) = (load(&dir), load(&again));
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect::<std::collections::BTreeSet<_>>()
    );
    for (k, t) in &a {
        assert_eq!(max_abs_diff(t, &b[k]).0, 0.0, "{k}");
    }
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(again.join("adapter_config.json")).unwrap())
            .unwrap();
    for k in [
        "peft_type",
        "r",
        "lora_alpha",
        "target_modules",
        "task_type",
    ] {
        assert!(!written[k].is_null(), "{k}");
        assert_eq!(written[k], meta["adapter_config"][k], "{k}");
    }
    assert_eq!(
        written["exclude_modules"],
        meta["adapter_config"]["exclude_modules"]
    );
}

/// With LoRA dropout on, gradient checkpointing draws the same masks when it runs a layer
/// again: the gradients equal those of the pass that kept its graph.
#[test]
fn checkpointed_lora_gradients_equal_kept_ones() {
    let (meta, cases) = cases();
    let dev = Device::Cpu;
    let mut cfg = lora_of(&meta);
    cfg.dropout = 0.2;
    // PEFT's adapter as the starting point, so A and B both get gradients.
    let policy = TrainableModel::load_lora(
        &fixtures().join("tiny-a"),
        &cfg,
        DType::F32,
        Some(&fixtures().join("lora-a")),
        0,
        &dev,
    )
    .unwrap();
    let seqs: Vec<SeqRef> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| SeqRef {
            prompt: &c.prompt,
            prompt_index: i,
            tokens: &c.completion,
        })
        .collect();
    let run = |checkpointing, seed| {
        let opts = logps::TrainOptions {
            dropout_seed: Some(seed),
            checkpointing,
            ..Default::default()
        };
        medvlm::sft::gradients(&policy, &seqs, 2, opts).unwrap()
    };
    let ((kept, l1), (ckpt, l2), (other, _)) = (run(false, 5), run(true, 5), run(false, 6));
    assert_eq!(l1, l2);
    let mut differs = false;
    for i in 0..policy.params.len() {
        let (a, b, c) = (
            kept.get(i).unwrap(),
            ckpt.get(i).unwrap(),
            other.get(i).unwrap(),
        );
        assert_eq!(max_abs_diff(a, b).0, 0.0, "{}", policy.params[i].name);
        differs |= max_abs_diff(a, c).0 > 0.0;
    }
    assert!(differs, "another dropout seed must give other masks");
}
