//! GRPO end to end on a task a tiny model can learn on a CPU in minutes: a fresh random
//! Qwen2-VL, a short supervised warm start that teaches the answer format with random
//! letters (so it knows how to answer but not what), then GRPO, which must raise held-out
//! accuracy well above the warm start's. Also: resuming an interrupted run ends with exactly
//! the weights of an uninterrupted one, and bad configs fail before any work.

use std::path::{Path, PathBuf};

use crate::common::*;
use candle_core::{DType, Device};
use medvlm::data::{self, PromptTemplate};
use medvlm::model::Qwen2VlConfig;
use medvlm::processor::{Processor, ProcessorOptions};
use medvlm::rl::config::{GrpoConfig, GrpoMethod};
use medvlm::sft::{SftConfig, SftMethod};
use medvlm::train::config::RunConfig;
use medvlm::train::{checkpoint, TrainableModel};
use rand::{Rng, SeedableRng};

/// "Is this image bright or dark?" over noisy grey images: the answer is in the image
/// and nowhere else (classes balanced, option order fixed). `random_answers` writes a random
/// option as the answer (a format-only warm-start set).
pub(crate) fn make_task(
    dir: &Path,
    name: &str,
    n: usize,
    seed: u64,
    random_answers: bool,
) -> PathBuf {
    make_task_sized(dir, name, n, seed, random_answers, 56)
}

pub(crate) fn make_task_sized(
    dir: &Path,
    name: &str,
    n: usize,
    seed: u64,
    random_answers: bool,
    side: u32,
) -> PathBuf {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows = Vec::new();
    for i in 0..n {
        let bright = i % 2 == 0;
        let base: f32 = if bright { 190.0 } else { 65.0 };
        let img = image::GrayImage::from_fn(side, side, |_, _| {
            image::Luma([(base + rng.random_range(-40.0..40.0f32)).clamp(0.0, 255.0) as u8])
        });
        let file = format!("{name}-{i}.png");
        img.save(dir.join(&file)).unwrap();
        let answer = if random_answers {
            if rng.random::<bool>() {
                "bright"
            } else {
                "dark"
            }
        } else if bright {
            "bright"
        } else {
            "dark"
        };
        rows.push(serde_json::json!({
            "image": [file], "question": "Is this image bright or dark?",
            "options": ["bright", "dark"], "answer": answer,
            "dataset": "synthetic", "subset": "MR (Mag-netic Resonance Imaging)",
            "rationale": "I look at the image.",
        }));
    }
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string(&rows).unwrap()).unwrap();
    path
}

/// A fresh tiny Qwen2-VL (tiny-a's architecture and tokenizer, random N(0, 0.02) weights).
pub(crate) fn fresh_model(dir: &Path) -> PathBuf {
    let src = fixtures().join("tiny-a");
    let cfg = Qwen2VlConfig::from_file(&src.join("config.json")).unwrap();
    let m = TrainableModel::random(cfg, 0.02, 7, &src, &Device::Cpu).unwrap();
    checkpoint::save(dir, "init", &m, DType::F32, None).unwrap()
}

/// Pixel budget of the learning test: 112x112 images, 16 image tokens each.
const MAX_PIXELS: usize = 112 * 112;

fn held_out_accuracy(model: &Path, data_file: &Path, template: PromptTemplate) -> f64 {
    adapted_accuracy(model, None, data_file, template)
}

/// Greedy held-out accuracy of `model`, with a LoRA adapter merged in when given.
fn adapted_accuracy(
    model: &Path,
    adapter: Option<&Path>,
    data_file: &Path,
    template: PromptTemplate,
) -> f64 {
    let opts = ProcessorOptions {
        max_pixels: Some(MAX_PIXELS),
        ..Default::default()
    };
    let proc = Processor::from_dir(model, &opts).unwrap();
    let mut m = medvlm::model::Qwen2Vl::load(model, DType::F32, &Device::Cpu).unwrap();
    if let Some(a) = adapter {
        m.merge_adapter(a).unwrap();
    }
    let ds = data::load(data_file, None).unwrap();
    let r = medvlm::eval::run_greedy(&m, &proc, &ds.items, template, 24, 16, |_, _| {}).unwrap();
    let format_ok = r.iter().filter(|x| x.format_ok).count() as f64 / r.len() as f64;
    println!("  format ok {format_ok:.2}, first output {:?}", r[0].output);
    medvlm::eval::accuracy(&r)
}

/// The learning tests' warm start: 80 SFT steps (batch 8, lr 5e-3) on `data`, whose random
/// answers teach the answer form and nothing else.
fn warm_start(init: PathBuf, data: PathBuf, out: &Path, template: PromptTemplate) -> PathBuf {
    medvlm::sft::train(
        SftConfig {
            run: RunConfig {
                model: init,
                train_data: data,
                output_dir: out.to_path_buf(),
                template,
                micro_batch: 8,
                learning_rate: 5e-3,
                max_steps: 80,
                save_steps: 0,
                max_pixels: Some(MAX_PIXELS),
                device: Some("cpu".into()),
                ..SftConfig::default().run
            },
            method: SftMethod { batch_size: 8 },
        },
        false,
        None,
    )
    .unwrap()
}

/// The learning tests' GRPO run: 40 steps of B=8 prompts x G=8 completions of at most 24
/// tokens, lr 1e-3, temperature 0.7, beta 0.04, one completion logged per step.
fn learning_grpo(
    model: PathBuf,
    data: PathBuf,
    out: PathBuf,
    template: PromptTemplate,
) -> GrpoConfig {
    GrpoConfig {
        run: RunConfig {
            model,
            train_data: data,
            output_dir: out,
            template,
            micro_batch: 32,
            learning_rate: 1e-3,
            max_steps: 40,
            save_steps: 0,
            max_pixels: Some(MAX_PIXELS),
            device: Some("cpu".into()),
            ..GrpoConfig::default().run
        },
        method: GrpoMethod {
            num_generations: 8,
            batch_prompts: 8,
            max_completion_length: 24,
            temperature: 0.7,
            beta: 0.04,
            log_completions: 1,
            ..GrpoMethod::default()
        },
    }
}

#[test]
fn grpo_learns_what_the_warm_start_could_not() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // 112x112 images (16 image tokens) and the paper's short "simple" question template:
    // with the long reasoning template the 16 image tokens are a small share of what a
    // 2-layer model attends to and learning takes several times longer.
    let template = PromptTemplate::Simple;
    let warm_data = make_task_sized(dir, "warm", 64, 1, true, 112);
    let train_data = make_task_sized(dir, "train", 64, 2, false, 112);
    let held_out = make_task_sized(dir, "heldout", 40, 3, false, 112);
    let init = fresh_model(&dir.join("init-run"));

    let t = std::time::Instant::now();
    let sft = warm_start(init, warm_data, &dir.join("sft"), template);
    println!("warm start: {:.1}s", t.elapsed().as_secs_f64());
    let before = held_out_accuracy(&sft, &held_out, template);
    println!("held-out accuracy after the warm start: {before:.3}");

    let grpo_run = |name: &str, tweak: &dyn Fn(&mut GrpoConfig)| {
        let t = std::time::Instant::now();
        let mut cfg = learning_grpo(sft.clone(), train_data.clone(), dir.join(name), template);
        cfg.method.eval_data = Some(held_out.clone());
        cfg.method.eval_steps = 10;
        tweak(&mut cfg);
        let out = medvlm::rl::trainer::train(cfg, false, None).unwrap();
        println!("{name}: {:.1}s", t.elapsed().as_secs_f64());
        out
    };
    let grpo = grpo_run("grpo", &|_| {});
    let after = held_out_accuracy(&grpo, &held_out, template);
    println!("held-out accuracy after GRPO: {after:.3}");
    // The run logged every step, sampled completions and the in-loop evaluations.
    let metrics = std::fs::read_to_string(dir.join("grpo/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 40);
    assert_eq!(metrics.matches("eval_accuracy").count(), 4);
    assert!(dir.join("grpo/completions.jsonl").is_file());
    assert!(dir.join("grpo/final/config.json").is_file());
    assert!(
        after >= before + 0.25,
        "GRPO {after} vs warm start {before}"
    );
    assert!(after >= 0.8, "GRPO reached only {after}");

    // Gradient checkpointing changes memory, not the run: the same final weights.
    let ckpt = grpo_run("grpo-checkpointing", &|c| {
        c.run.gradient_checkpointing = true
    });
    let load = |d: &Path| {
        candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap()
    };
    let (a, b) = (load(&grpo), load(&ckpt));
    for (k, t) in &a {
        assert_eq!(
            max_abs_diff(t, &b[k]).0,
            0.0,
            "{k}: checkpointing changed the run"
        );
    }

    // LoRA adapters (rank 16 on every linear layer, dropout on) learn it too.
    let lora = grpo_run("grpo-lora", &|c| {
        c.run.lora.r = 16;
        c.run.lora.alpha = 32.0;
        c.run.lora.base_dtype = "f32".into();
        c.run.lora.target_modules = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "qkv",
            "proj",
            "fc1",
            "fc2",
            "mlp.0",
            "mlp.2",
        ]
        .map(String::from)
        .to_vec();
        c.run.learning_rate = 1e-2;
    });
    let with_lora = adapted_accuracy(&sft, Some(&lora), &held_out, template);
    println!("held-out accuracy after GRPO with LoRA: {with_lora:.3}");
    assert!(
        with_lora >= before + 0.25 && with_lora >= 0.8,
        "GRPO with LoRA reached only {with_lora} (warm start {before})"
    );

    // A reward that lives only in a Python file (the README's example, which reads the
    // answer letter by its own regex) in place of the built-in accuracy teaches it too.
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/rewards/answer_letter.py");
    let python = grpo_run("grpo-python", &|c| {
        c.method.rewards = vec![
            toml::Value::try_into(toml::Value::Table(
                toml::from_str(&format!(
                    "name = \"letter\"\ncommand = [\"python3\", {:?}]",
                    script.display().to_string()
                ))
                .unwrap(),
            ))
            .unwrap(),
            medvlm::rl::config::RewardEntry::Builtin("format".into()),
        ];
    });
    let with_python = held_out_accuracy(&python, &held_out, template);
    println!("held-out accuracy after GRPO with the Python reward: {with_python:.3}");
    assert!(
        with_python >= before + 0.25 && with_python >= 0.8,
        "GRPO with the Python reward reached only {with_python} (warm start {before})"
    );
    let samples = std::fs::read_to_string(dir.join("grpo-python/completions.jsonl")).unwrap();
    assert!(
        samples.contains("\"letter\":"),
        "the reward is logged by its name"
    );
}

/// Interrupting a run after a checkpoint and resuming it ends with exactly the weights,
/// optimizer trajectory and metrics of the same run left uninterrupted: for SFT, and for
/// GRPO (with two iterations per batch, so the clipped ratio and the KL term are live).
#[test]
fn resumed_runs_equal_uninterrupted_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = make_task(dir, "d", 16, 5, false);
    let warm_data = make_task(dir, "w", 16, 6, true);
    let init = fresh_model(&dir.join("init-run"));
    let sft = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "sft",
            "--model",
            s(&init),
            "--train-data",
            s(&warm_data),
            "--output-dir",
            s(out),
            "--max-steps",
            "60",
            "--save-steps",
            "30",
            "--batch-size",
            "8",
            "--micro-batch",
            "4",
            "--learning-rate",
            "5e-3",
            "--max-pixels",
            "3136",
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        medvlm(&args)
    };
    let (sa, sb) = (dir.join("sft-a"), dir.join("sft-b"));
    let (ok, _, err) = sft(&sa, &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = sft(&sb, &["--stop-after", "30"]);
    assert!(ok, "{err}");
    assert!(
        !sb.join("final").exists(),
        "the interrupted run must not have finished"
    );
    let (ok, _, err) = medvlm(&["train", "sft", "--resume", s(&sb)]);
    assert!(ok, "{err}");
    assert_same_run(&sa, &sb, &init, 60);

    // GRPO from the warm-started model: format is learnt, the letter is a coin flip, so
    // rewards vary within groups and every step moves the weights.
    let warm = sa.join("final");
    let grpo = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "grpo",
            "--model",
            s(&warm),
            "--train-data",
            s(&data),
            "--output-dir",
            s(out),
            "--max-steps",
            "4",
            "--save-steps",
            "2",
            "--num-generations",
            "4",
            "--batch-prompts",
            "2",
            "--micro-batch",
            "3",
            "--max-completion-length",
            "24",
            "--learning-rate",
            "1e-3",
            "--beta",
            "0.04",
            "--temperature",
            "0.7",
            "--num-iterations",
            "2",
            "--seed",
            "3",
            "--max-pixels",
            "3136",
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        medvlm(&args)
    };
    let (ga, gb) = (dir.join("grpo-a"), dir.join("grpo-b"));
    let (ok, _, err) = grpo(&ga, &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = grpo(&gb, &["--stop-after", "2"]);
    assert!(ok, "{err}");
    assert!(gb.join("checkpoint-000002/trainer_state.json").is_file());
    assert!(!gb.join("final").exists());
    let (ok, _, err) = medvlm(&["train", "grpo", "--resume", s(&gb), "--device", "cpu"]);
    assert!(ok, "{err}");
    assert_same_run(&ga, &gb, &warm, 4);

    // The same with the reference quantized to q8_0: a resumed run rebuilds it from the
    // starting model as the uninterrupted run built it. The first step, where the policy is
    // still the starting model, shows q8_0's own KL; the dense reference's is 0 there.
    let (qa, qb) = (dir.join("q8-a"), dir.join("q8-b"));
    let q8 = ["--reference-quantize", "q8_0"];
    let (ok, _, err) = grpo(&qa, &q8);
    assert!(ok, "{err}");
    assert!(err.contains("reference model (q8_0 weights)"), "{err}");
    let (ok, _, err) = grpo(&qb, &[&q8[..], &["--stop-after", "2"]].concat());
    assert!(ok, "{err}");
    let (ok, _, err) = medvlm(&["train", "grpo", "--resume", s(&qb), "--device", "cpu"]);
    assert!(ok, "{err}");
    assert_same_run(&qa, &qb, &warm, 4);
    let first_kl = |d: &Path| -> f64 {
        let text = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        v["kl"].as_f64().unwrap()
    };
    let (kl_dense, kl_q8) = (first_kl(&ga), first_kl(&qa));
    eprintln!("first step's KL: f32 reference {kl_dense:e}, q8_0 reference {kl_q8:e}");
    assert_eq!(kl_dense, 0.0);
    assert!(kl_q8 > 0.0 && kl_q8 < 1e-2, "{kl_q8}");

    // The same with LoRA (dropout on: its masks must repeat too) and gradient checkpointing:
    // the run directories hold PEFT adapters, equal bit for bit, and the KL reference is the
    // frozen base.
    let lora = [
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--lora-dropout",
        "0.1",
        "--lora-base-dtype",
        "f32",
    ];
    let (la, lb) = (dir.join("lora-a"), dir.join("lora-b"));
    let (ok, _, err) = grpo(&la, &lora);
    assert!(ok, "{err}");
    let (ok, _, err) = grpo(&lb, &[&lora[..], &["--stop-after", "2"]].concat());
    assert!(ok, "{err}");
    let (ok, _, err) = medvlm(&["train", "grpo", "--resume", s(&lb), "--device", "cpu"]);
    assert!(ok, "{err}");
    let adapter = |d: &Path| {
        candle_core::safetensors::load(d.join("final/adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
    };
    let (aa, ab) = (adapter(&la), adapter(&lb));
    assert!(!aa.is_empty() && aa.keys().all(|k| k.starts_with("base_model.model.")));
    for (k, t) in &aa {
        assert_eq!(max_abs_diff(t, &ab[k]).0, 0.0, "{k} differs after resuming");
    }
    assert!(
        aa.iter()
            .filter(|(k, _)| k.contains("lora_B"))
            .any(|(_, t)| t
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0),
        "the adapters did not move"
    );
    assert!(la.join("final/adapter_config.json").is_file());
    assert!(!la.join("final/model.safetensors").exists());

    // And the run directory plots.
    let (ok, out, err) = medvlm(&["plot", s(&ga)]);
    assert!(ok, "{err}");
    assert!(Path::new(out.trim()).is_file());
}

/// Two run directories hold the same final weights (bit for bit, and different from the
/// start) and the same per-step losses.
fn assert_same_run(a: &Path, b: &Path, start: &Path, steps: usize) {
    let load = |d: &Path| {
        candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap()
    };
    let (wa, wb, w0) = (load(&a.join("final")), load(&b.join("final")), load(start));
    assert_eq!(wa.len(), wb.len());
    let mut moved = false;
    for (name, ta) in &wa {
        let (d, _) = max_abs_diff(ta, &wb[name]);
        assert_eq!(d, 0.0, "{name} differs after resuming");
        moved |= max_abs_diff(ta, &w0[name]).0 > 0.0;
    }
    if !moved {
        eprintln!(
            "{}",
            std::fs::read_to_string(a.join("metrics.jsonl")).unwrap()
        );
        eprintln!(
            "{}",
            std::fs::read_to_string(a.join("completions.jsonl")).unwrap_or_default()
        );
    }
    assert!(moved, "training changed no weight");
    let losses = |d: &Path| -> Vec<(u64, f64)> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
            })
            .collect()
    };
    assert_eq!(losses(a), losses(b));
    assert_eq!(losses(a).len(), steps);
}

/// Bad settings are reported before any model is loaded or step taken.
#[test]
fn bad_configs_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = make_task(dir, "d", 2, 5, false);
    let model = fixtures().join("tiny-a");
    let cfg = dir.join("grpo.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ntrain_data = {:?}\noutput_dir = {:?}\nlerning_rate = 1e-5\n",
            s(&model),
            s(&data),
            s(&dir.join("out"))
        ),
    )
    .unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--config".into(), s(&cfg).into()], "lerning_rate"),
        (
            vec![
                "--model".into(),
                s(&model).into(),
                "--train-data".into(),
                s(&data).into(),
                "--num-generations".into(),
                "1".into(),
            ],
            "--num-generations",
        ),
        (
            vec![
                "--model".into(),
                s(&model).into(),
                "--train-data".into(),
                "/no/such/train.json".into(),
            ],
            "/no/such/train.json",
        ),
        (
            vec![
                "--model".into(),
                s(&model).into(),
                "--train-data".into(),
                s(&data).into(),
                "--loss-type".into(),
                "ppo".into(),
            ],
            "ppo",
        ),
        (
            vec!["--resume".into(), s(&dir.join("nothing")).into()],
            "nothing",
        ),
        // A quantized reference where there is no reference copy: refused in one line.
        (
            vec![
                "--model".into(),
                s(&model).into(),
                "--train-data".into(),
                s(&data).into(),
                "--reference-quantize".into(),
                "q8_0".into(),
                "--beta".into(),
                "0".into(),
            ],
            "--reference-quantize (q8_0) is set but --beta is 0",
        ),
        (
            vec![
                "--model".into(),
                s(&model).into(),
                "--train-data".into(),
                s(&data).into(),
                "--reference-quantize".into(),
                "q8_0".into(),
                "--lora-r".into(),
                "4".into(),
            ],
            "--reference-quantize (q8_0) is set but so is --lora-r",
        ),
        (
            vec![
                "--model".into(),
                s(&model).into(),
                "--train-data".into(),
                s(&data).into(),
                "--reference-quantize".into(),
                "q8".into(),
            ],
            "expected `none`, `q8_0`, `q4_1`, `q4_k` or `q6_k`",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["train", "grpo"];
        full.extend(args.iter().map(String::as_str));
        let t = std::time::Instant::now();
        let (ok, _, err) = medvlm(&full);
        assert!(!ok, "{full:?} should fail");
        assert!(
            err.starts_with("error: ") && err.trim().lines().count() == 1,
            "{err}"
        );
        assert!(err.contains(needle), "{needle:?} not in {err}");
        assert!(!err.contains("panicked"));
        assert!(
            t.elapsed().as_secs_f64() < 5.0,
            "{full:?} did work before failing"
        );
        assert!(!dir.join("out").exists(), "no run directory may be created");
    }
}

/// `--plan` prints the memory plan without loading the model or creating the run; a run
/// whose plan exceeds the machine stops before loading, with the plan and what to change.
#[test]
fn memory_plan_is_printed_and_a_run_that_cannot_fit_stops_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = make_task(dir, "d", 2, 5, false);
    let out = dir.join("out");
    let (ok, stdout, err) = medvlm(&[
        "train",
        "grpo",
        "--model",
        s(&fixtures().join("tiny-a")),
        "--train-data",
        s(&data),
        "--output-dir",
        s(&out),
        "--plan",
    ]);
    assert!(ok, "{err}");
    for needle in [
        "memory plan",
        "weights (f32 masters)",
        "optimizer state",
        "reference model",
        "peak (",
        "CPU RAM available",
    ] {
        assert!(stdout.contains(needle), "{needle:?} not in {stdout}");
    }
    assert!(!out.exists(), "--plan must not start the run");

    // A 70B-shaped config.json over tiny-a's files: the weights would never load, and must
    // not be read, since the plan (about a terabyte) refuses first.
    let big = dir.join("big");
    std::fs::create_dir(&big).unwrap();
    for e in std::fs::read_dir(fixtures().join("tiny-a")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), big.join(e.file_name())).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(big.join("config.json")).unwrap()).unwrap();
    cfg["hidden_size"] = 8192.into();
    cfg["num_hidden_layers"] = 80.into();
    cfg["intermediate_size"] = 29568.into();
    cfg["num_attention_heads"] = 64.into();
    cfg["num_key_value_heads"] = 8.into();
    cfg["vision_config"]["hidden_size"] = 8192.into();
    cfg["rope_scaling"]["mrope_section"] = serde_json::json!([16, 24, 24]);
    cfg.as_object_mut().unwrap().remove("text_config");
    std::fs::write(big.join("config.json"), cfg.to_string()).unwrap();
    let t = std::time::Instant::now();
    let (ok, _, err) = medvlm(&[
        "train",
        "grpo",
        "--model",
        s(&big),
        "--train-data",
        s(&data),
        "--output-dir",
        s(&out),
    ]);
    assert!(!ok, "a terabyte run must not start");
    assert!(
        err.contains("memory plan") && err.contains("peak ("),
        "{err}"
    );
    let last = err.trim().lines().last().unwrap();
    assert!(last.starts_with("error: the run needs about"), "{err}");
    assert!(last.contains("memory_check = false"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        t.elapsed().as_secs_f64() < 10.0,
        "it loaded something first"
    );
    assert!(!out.exists(), "no run directory may be created");

    // The same plan for an 80 GiB GPU names what to change, or says nothing would do.
    let (ok, stdout, err) = medvlm(&[
        "train",
        "grpo",
        "--model",
        s(&big),
        "--train-data",
        s(&data),
        "--output-dir",
        s(&out),
        "--plan",
        "--plan-gpu-gib",
        "80",
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("a GPU with 80 GiB free"), "{stdout}");
    assert!(stdout.contains("does not fit"), "{stdout}");
}

/// Qwen2.5-VL trains through the CLI (GRPO and SFT, images of several attention windows)
/// and its checkpoints keep the layout they were read in: the same tensor names (released
/// `model.layers.*` / `visual.*`, or transformers 5's `model.language_model.*`), the same
/// config layout and dtype key. (tools/check_checkpoint.py loads such directories in
/// transformers 5 and compares log-probs.)
#[test]
fn qwen25_trains_and_saves_in_the_layout_it_was_read_in() {
    use safetensors::SafeTensors;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = make_task_sized(dir, "d", 4, 5, false, 112);
    let names = |p: &Path| -> Vec<String> {
        let bytes = std::fs::read(p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut n: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        n.sort();
        n
    };
    let config = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
    };
    for (fixture, method) in [
        ("tiny-25a", "grpo"),
        ("tiny-25b", "sft"),
        ("tiny-25a", "sft"),
    ] {
        let src = fixtures().join(fixture);
        let out = dir.join(format!("{fixture}-{method}"));
        let mut args = vec![
            "train",
            method,
            "--model",
            s(&src),
            "--train-data",
            s(&data),
            "--output-dir",
            s(&out),
            "--max-steps",
            "2",
            "--learning-rate",
            "1e-3",
        ];
        if method == "grpo" {
            args.extend(["--max-completion-length", "8", "--batch-prompts", "2"]);
            // TRL's loss options on the way: GSPO's sequence-level ratio (off-policy on the
            // rollout's second step) and the high-entropy token mask.
            args.extend([
                "--num-iterations",
                "2",
                "--importance-sampling-level",
                "sequence",
                "--top-entropy-quantile",
                "0.2",
            ]);
        }
        let (ok, _, err) = medvlm(&args);
        assert!(ok, "{fixture} {method}: {err}");
        if method == "grpo" {
            // Every step logs TRL's `entropy`: a mean entropy in nats, at most ln(vocab).
            let vocab = config(&src)["vocab_size"].as_f64().unwrap();
            let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
            assert_eq!(metrics.lines().count(), 2);
            for line in metrics.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let h = v["entropy"].as_f64().unwrap();
                assert!(h > 0.0 && h <= vocab.ln() + 1e-6, "{line}");
            }
            assert!(!err.contains("warning"), "{err}");
        }
        let fin = out.join("final");
        assert_eq!(
            names(&fin.join("model.safetensors")),
            names(&src.join("model.safetensors")),
            "{fixture} {method}: tensor names"
        );
        let (a, b) = (config(&src), config(&fin));
        assert_eq!(a["model_type"], b["model_type"]);
        for key in ["text_config", "torch_dtype", "rope_scaling"] {
            assert_eq!(
                a.get(key).is_some(),
                b.get(key).is_some(),
                "{fixture} {method}: config key {key}"
            );
        }
        // It trained: some weight moved.
        let before = std::fs::read(src.join("model.safetensors")).unwrap();
        let after = std::fs::read(fin.join("model.safetensors")).unwrap();
        assert_ne!(before, after);
        // And it loads and answers.
        let (ok, _, err) = medvlm(&[
            "generate",
            "--model",
            s(&fin),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ]);
        assert!(ok, "{err}");
    }

    // GRPO with LoRA adapters on every linear layer, checkpointed: the run saves a PEFT
    // adapter that `generate --adapter` applies to the base.
    let src = fixtures().join("tiny-3a");
    let out = dir.join("tiny-3a-grpo-lora");
    let (ok, _, err) = medvlm(&[
        "train", "grpo", "--model", s(&src), "--train-data", s(&data), "--output-dir", s(&out),
        "--max-steps", "2", "--learning-rate", "1e-2", "--max-completion-length", "8",
        "--batch-prompts", "2", "--gradient-checkpointing", "true", "--lora-r", "4",
        "--lora-target-modules",
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,qkv,attn.proj,linear_fc1,linear_fc2",
    ]);
    assert!(ok, "{err}");
    let adapter = out.join("final");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    let (ok, _, err) = medvlm(&[
        "generate",
        "--model",
        s(&src),
        "--adapter",
        s(&adapter),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ]);
    assert!(ok, "{err}");
}

/// Qwen3-VL trains too (GRPO with gradient checkpointing on tiny-3a: the DeepStack features
/// replayed layer by layer; SFT on tiny-3b), and saves in the layout it was read in: the
/// released tensor names (`model.language_model.*`, `model.visual.*`, no lm_head when tied),
/// the config's layout.
#[test]
fn qwen3_trains_and_saves_in_the_layout_it_was_read_in() {
    use safetensors::SafeTensors;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = make_task_sized(dir, "d", 4, 5, false, 112);
    let names = |p: &Path| -> Vec<String> {
        let bytes = std::fs::read(p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut n: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        n.sort();
        n
    };
    for (fixture, method) in [("tiny-3a", "grpo"), ("tiny-3b", "sft")] {
        let src = fixtures().join(fixture);
        let out = dir.join(format!("{fixture}-{method}"));
        let mut args = vec![
            "train",
            method,
            "--model",
            s(&src),
            "--train-data",
            s(&data),
            "--output-dir",
            s(&out),
            "--max-steps",
            "2",
            "--learning-rate",
            "1e-3",
        ];
        if method == "grpo" {
            args.extend([
                "--max-completion-length",
                "8",
                "--batch-prompts",
                "2",
                "--gradient-checkpointing",
                "true",
            ]);
        }
        let (ok, stdout, err) = medvlm(&args);
        assert!(ok, "{fixture} {method}: {err}");
        assert!(
            !stdout.contains("NaN") && !err.contains("NaN"),
            "{stdout}{err}"
        );
        let fin = out.join("final");
        assert_eq!(
            names(&fin.join("model.safetensors")),
            names(&src.join("model.safetensors")),
            "{fixture} {method}: tensor names"
        );
        let config = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
        };
        let (a, b) = (config(&src), config(&fin));
        assert_eq!(b["model_type"], "qwen3_vl");
        assert_eq!(
            a["text_config"].get("rope_scaling").is_some(),
            b["text_config"].get("rope_scaling").is_some()
        );
        assert_eq!(a["tie_word_embeddings"], b["tie_word_embeddings"]);
        let before = std::fs::read(src.join("model.safetensors")).unwrap();
        let after = std::fs::read(fin.join("model.safetensors")).unwrap();
        assert_ne!(before, after);
        let (ok, _, err) = medvlm(&[
            "generate",
            "--model",
            s(&fin),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ]);
        assert!(ok, "{err}");
    }
}

/// Qwen3-VL under a Thinking template (the prompt ends `<think>\n`, so the model writes its
/// reasoning, `</think>`, then the answer): the warm start supervises
/// `rationale</think><answer>X</answer>`, the paper's format and accuracy rewards read the
/// completion with the template's opening in front, and GRPO takes a fresh random tiny
/// Qwen3-VL (DeepStack on 3 of 4 vision blocks) from guessing to the answer.
#[test]
fn qwen3_with_a_thinking_template_learns_under_the_papers_rewards() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let template = PromptTemplate::Simple;
    let warm_data = make_task_sized(dir, "warm", 64, 1, true, 112);
    let train_data = make_task_sized(dir, "train", 64, 2, false, 112);
    let held_out = make_task_sized(dir, "heldout", 40, 3, false, 112);
    let src = thinking_copy("tiny-3a", &dir.join("tiny-3a-thinking"));
    let cfg = Qwen2VlConfig::from_file(&src.join("config.json")).unwrap();
    let m = TrainableModel::random(cfg, 0.02, 7, &src, &Device::Cpu).unwrap();
    let init = checkpoint::save(&dir.join("init-run"), "init", &m, DType::F32, None).unwrap();
    let proc = Processor::from_dir(&init, &ProcessorOptions::default()).unwrap();
    assert_eq!(proc.template.reasoning_opening(), "<think>\n");

    let sft = warm_start(init, warm_data, &dir.join("sft"), template);
    let before = held_out_accuracy(&sft, &held_out, template);
    let mut cfg = learning_grpo(sft.clone(), train_data, dir.join("grpo"), template);
    cfg.run.learning_rate = 1.5e-3;
    cfg.run.max_steps = 60;
    let grpo = medvlm::rl::trainer::train(cfg, false, None).unwrap();
    let after = held_out_accuracy(&grpo, &held_out, template);
    println!("Qwen3-VL, Thinking template: held-out accuracy {before:.3} -> {after:.3}");
    assert!(
        after >= before + 0.25 && after >= 0.8,
        "GRPO {after} vs warm start {before}"
    );

    // What the rewards saw: the template's opening, the generated reasoning, `</think>`, the
    // answer block; scored 1 by the paper's format rule (the regex of data::answer, applied
    // here by hand) on the text the model generated after the prompt.
    let samples = std::fs::read_to_string(dir.join("grpo/completions.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(samples.lines().last().unwrap()).unwrap();
    let text = last["completion"]
        .as_str()
        .unwrap_or_else(|| panic!("{last}"));
    let generated = text
        .strip_prefix("<think>\n")
        .unwrap_or_else(|| panic!("{text:?}"));
    let (reasoning, rest) = generated.split_once("</think>").unwrap();
    assert!(!reasoning.contains("<think>"), "{text:?}");
    assert!(
        rest.trim_start().starts_with("<answer>") && rest.trim_end().ends_with("</answer>"),
        "{text:?}"
    );
    assert_eq!(last["rewards"]["format"], 1.0, "{last}");
}

/// `--resume` names the settings that changed, lets a finished run be extended with a
/// larger --max-steps, and, when the newest checkpoint is damaged, points at the newest
/// intact one.
#[test]
fn resume_names_changes_extends_runs_and_points_past_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = make_task(dir, "d", 8, 5, false);
    let init = fresh_model(&dir.join("init-run"));
    let out = dir.join("run");
    let (ok, _, err) = medvlm(&[
        "train",
        "sft",
        "--model",
        s(&init),
        "--train-data",
        s(&data),
        "--output-dir",
        s(&out),
        "--max-steps",
        "2",
        "--save-steps",
        "1",
        "--batch-size",
        "2",
        "--max-pixels",
        "3136",
    ]);
    assert!(ok, "{err}");
    assert!(out.join("final").is_dir());

    // A changed setting is named with both values.
    let (ok, _, err) = medvlm(&[
        "train",
        "sft",
        "--resume",
        s(&out),
        "--learning-rate",
        "0.5",
    ]);
    assert!(!ok);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.contains("learning_rate") && last.contains("0.5 now"),
        "{err}"
    );

    // The same through a config file given with --resume: what the file sets is checked
    // like flags (a changed key named), and a file that agrees with the run is accepted.
    let changed = dir.join("changed.toml");
    std::fs::write(&changed, "learning_rate = 0.25\n").unwrap();
    let (ok, _, err) = medvlm(&["train", "sft", "--config", s(&changed), "--resume", s(&out)]);
    assert!(!ok);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.contains("learning_rate") && last.contains("0.25 now"),
        "{err}"
    );
    let same = dir.join("same.toml");
    std::fs::write(
        &same,
        format!(
            "model = {:?}\ntrain_data = {:?}\nbatch_size = 2\n",
            s(&init),
            s(&data)
        ),
    )
    .unwrap();
    let (ok, _, err) = medvlm(&["train", "sft", "--config", s(&same), "--resume", s(&out)]);
    assert!(ok, "{err}");

    // A finished run extended to 4 steps.
    let (ok, _, err) = medvlm(&["train", "sft", "--resume", s(&out), "--max-steps", "4"]);
    assert!(ok, "{err}");
    assert!(err.contains("re-planned"), "{err}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint-000004/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 4);
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().filter(|l| l.contains("\"step\"")).count(), 4);

    // The newest checkpoint damaged (truncated weights): refused, pointing at checkpoint 3.
    let w = out.join("checkpoint-000004/model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, err) = medvlm(&["train", "sft", "--resume", s(&out), "--max-steps", "5"]);
    assert!(!ok);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.contains("damaged") && last.contains("checkpoint-000003"),
        "{err}"
    );
    // Following the advice works.
    std::fs::rename(out.join("checkpoint-000004"), dir.join("damaged")).unwrap();
    let (ok, _, err) = medvlm(&["train", "sft", "--resume", s(&out), "--max-steps", "5"]);
    assert!(ok, "{err}");
    assert!(out.join("checkpoint-000005/trainer_state.json").is_file());
}

/// A trained checkpoint carries its prompt template; `ask` and `eval` use it unless
/// --template says otherwise.
#[test]
fn checkpoints_carry_their_template_to_ask_and_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = make_task(dir, "d", 4, 5, false);
    let init = fresh_model(&dir.join("init-run"));
    let out = dir.join("run");
    let (ok, _, err) = medvlm(&[
        "train",
        "sft",
        "--model",
        s(&init),
        "--train-data",
        s(&data),
        "--output-dir",
        s(&out),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--max-pixels",
        "3136",
        "--template",
        "simple",
    ]);
    assert!(ok, "{err}");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("final/medvlm.json")).unwrap())
            .unwrap();
    assert_eq!(info["template"], "simple");
    let image = dir.join("d-0.png");
    let fin = out.join("final");
    let eval_out = dir.join("eval");
    let ask = |extra: &[&str]| {
        let mut args = vec![
            "ask",
            "--model",
            s(&fin),
            "--image",
            s(&image),
            "--question",
            "Is this image bright or dark?",
            "--options",
            "bright;dark",
            "--max-new-tokens",
            "2",
        ];
        args.extend_from_slice(extra);
        medvlm(&args)
    };
    let (ok, _, err) = ask(&[]);
    assert!(ok, "{err}");
    assert!(err.contains("template: simple"), "{err}");
    let (ok, _, err) = ask(&["--template", "paper"]);
    assert!(ok, "{err}");
    assert!(!err.contains("template: simple"), "{err}");
    let (ok, _, err) = medvlm(&[
        "eval",
        "--model",
        s(&fin),
        "--data",
        s(&data),
        "--max-new-tokens",
        "2",
        "--out",
        s(&eval_out),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("template: simple"), "{err}");
}

/// A resume continues only the run the checkpoint belongs to: a base model or data file
/// replaced under the same path is refused with both records (in the checkpoint, now) and
/// accepted again once restored. save_total_limit keeps the newest checkpoints, the one a
/// resume continues from among them.
#[test]
fn resume_checks_model_and_data_and_checkpoints_rotate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = make_task(dir, "d", 8, 5, false);
    let init = fresh_model(&dir.join("init-run"));
    let out = dir.join("run");
    let (ok, _, err) = medvlm(&[
        "train",
        "sft",
        "--model",
        s(&init),
        "--train-data",
        s(&data),
        "--output-dir",
        s(&out),
        "--max-steps",
        "3",
        "--save-steps",
        "1",
        "--save-total-limit",
        "2",
        "--batch-size",
        "2",
        "--max-pixels",
        "3136",
    ]);
    assert!(ok, "{err}");
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains("checkpoint-"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&out), vec!["checkpoint-000002", "checkpoint-000003"]);
    assert!(
        err.contains("removed") && err.contains("save_total_limit = 2"),
        "{err}"
    );
    let resume = |steps: &str| medvlm(&["train", "sft", "--resume", s(&out), "--max-steps", steps]);

    // Another model under the same path: same architecture, other weights.
    let weights = init.join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let src = fixtures().join("tiny-a");
    let cfg = Qwen2VlConfig::from_file(&src.join("config.json")).unwrap();
    let other = TrainableModel::random(cfg, 0.02, 8, &src, &Device::Cpu).unwrap();
    let other_dir = checkpoint::save(dir, "other", &other, DType::F32, None).unwrap();
    std::fs::copy(other_dir.join("model.safetensors"), &weights).unwrap();
    let (ok, _, err) = resume("4");
    assert!(!ok);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.contains("base model's model.safetensors")
            && last.contains("in the checkpoint")
            && last.contains("now"),
        "{err}"
    );
    // Another model altogether (another config).
    std::fs::write(&weights, &original).unwrap();
    let config = init.join("config.json");
    let config_text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        config_text.replace("\"rms_norm_eps\"", "\"x\": 1, \"rms_norm_eps\""),
    )
    .unwrap();
    let (ok, _, err) = resume("4");
    assert!(!ok && err.contains("base model's config.json"), "{err}");
    std::fs::write(&config, &config_text).unwrap();
    // Other data under the same path: one row's answer changed, same size.
    let rows = std::fs::read_to_string(&data).unwrap();
    let changed = rows.replacen("\"answer\":\"bright\"", "\"answer\":\"dark\"  ", 1);
    assert!(rows != changed && rows.len() == changed.len());
    std::fs::write(&data, &changed).unwrap();
    let (ok, _, err) = resume("4");
    let last = err.trim().lines().last().unwrap();
    assert!(
        !ok && last.contains("training data") && last.contains("in the checkpoint"),
        "{err}"
    );
    // Restored: the run continues, and rotation keeps the newest two.
    std::fs::write(&data, &rows).unwrap();
    let (ok, _, err) = resume("4");
    assert!(ok, "{err}");
    assert_eq!(names(&out), vec!["checkpoint-000003", "checkpoint-000004"]);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint-000004/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert!(state["inputs"]["model"]["model.safetensors"]
        .as_str()
        .unwrap()
        .starts_with("size "));
    // A GRPO resume of this SFT run says what it is.
    let (ok, _, err) = medvlm(&["train", "grpo", "--resume", s(&out)]);
    assert!(!ok && err.contains("`medvlm train sft --resume"), "{err}");
}

/// The bright/dark task as free-text questions in SLAKE's layout (`{name}/test.json` and
/// `imgs/`): the answer is the word, not a letter. `random_answers` as in [`make_task`].
fn make_open_task(dir: &Path, name: &str, n: usize, seed: u64, random_answers: bool) -> PathBuf {
    let root = dir.join(name);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows = Vec::new();
    for i in 0..n {
        let bright = i % 2 == 0;
        let base: f32 = if bright { 190.0 } else { 65.0 };
        let img = image::GrayImage::from_fn(112, 112, |_, _| {
            image::Luma([(base + rng.random_range(-40.0..40.0f32)).clamp(0.0, 255.0) as u8])
        });
        let rel = format!("xmlab{i}/source.png");
        std::fs::create_dir_all(root.join("imgs").join(format!("xmlab{i}"))).unwrap();
        img.save(root.join("imgs").join(&rel)).unwrap();
        let answer = match (random_answers, bright) {
            (true, _) if rng.random::<bool>() => "bright",
            (true, _) => "dark",
            (false, true) => "bright",
            (false, false) => "dark",
        };
        rows.push(serde_json::json!({
            "img_id": i, "img_name": rel, "question": "Is this image bright or dark?",
            "answer": answer, "q_lang": "en", "location": "Brain", "modality": "MRI",
            "answer_type": "OPEN", "base_type": "vqa", "content_type": "Color",
            "triple": ["vhead", "_", "_"], "qid": i,
        }));
    }
    std::fs::write(
        root.join("test.json"),
        serde_json::to_string(&rows).unwrap(),
    )
    .unwrap();
    root
}

/// GRPO on free-text questions with the token-F1 reward alone: the warm start (answers in
/// the right form, random words) is at chance on held-out questions; GRPO lifts exact-match
/// accuracy (lmms-eval's normaliser, scored as `medvlm eval` scores it) well above it.
#[test]
fn grpo_learns_open_answers_from_token_f1() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let template = PromptTemplate::Simple;
    let warm = make_open_task(dir, "warm", 64, 11, true);
    let train = make_open_task(dir, "train", 64, 12, false);
    let held_out = make_open_task(dir, "heldout", 40, 13, false);
    let init = fresh_model(&dir.join("init-run"));
    let sft = warm_start(init, warm, &dir.join("sft"), template);
    let accuracy = |model: &Path| {
        let opts = ProcessorOptions {
            max_pixels: Some(MAX_PIXELS),
            ..Default::default()
        };
        let proc = Processor::from_dir(model, &opts).unwrap();
        let m = medvlm::model::Qwen2Vl::load(model, DType::F32, &Device::Cpu).unwrap();
        let (ds, _) = data::load_data(&held_out, &data::DataOptions::default()).unwrap();
        assert_eq!(ds.items.len(), 40);
        assert!(ds.items.iter().all(|i| i.answer.kind() == "open"));
        let scoring = medvlm::eval::Scoring {
            closed: medvlm::data::score::Protocol::Closed,
            open: vec![medvlm::data::score::Protocol::OpenExact],
        };
        let r = medvlm::eval::greedy(&m, &proc, &ds.items, template, &scoring, 16, 16, |_, _| {})
            .unwrap();
        println!("  first output {:?}", r.results[0].output);
        medvlm::eval::accuracy(&r.results)
    };
    let before = accuracy(&sft);
    println!("open held-out exact match after the warm start: {before:.3}");
    let mut cfg = learning_grpo(sft, train, dir.join("grpo"), template);
    cfg.method.max_completion_length = 16;
    cfg.method.rewards = vec![medvlm::rl::config::RewardEntry::Builtin("token_f1".into())];
    let grpo = medvlm::rl::trainer::train(cfg, false, None).unwrap();
    let after = accuracy(&grpo);
    println!("open held-out exact match after GRPO: {after:.3}");
    assert!(
        after >= before + 0.25 && after >= 0.8,
        "GRPO {after} vs warm start {before}"
    );
}
