//! `medvlm demo`: the MedVLM-R1 experiment in miniature, offline, on a laptop CPU.
//!
//! 1. Synthetic scans: a training set and a held-out set of MRI- and CT-like images, and an
//!    out-of-domain set of X-ray-like images (a modality never trained on).
//! 2. A fresh tiny Qwen2-VL with its own tokenizer.
//! 3. A short SFT warm start that teaches the `<think>…</think><answer>X</answer>` format
//!    with *random* answer letters: the model learns how to answer, not what.
//! 4. GRPO from the warm start (format + accuracy rewards).
//! 5. The baseline: SFT from the warm start on the correct answers, for the same number of
//!    optimizer steps and items per step.
//! 6. Greedy evaluation of all three, per modality, in and out of domain; reward curves;
//!    a few reasoning traces.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::Serialize;

use crate::data::{self, PromptTemplate};
use crate::eval::{self, ItemResult};
use crate::model::Qwen2Vl;
use crate::processor::{Processor, ProcessorOptions};
use crate::rl::config::{GrpoConfig, GrpoMethod};
use crate::sft::{SftConfig, SftMethod};
use crate::synth::{Kind, Style, SynthSpec};
use crate::train::config::RunConfig;

#[derive(Debug, Clone)]
pub struct DemoSpec {
    pub out: PathBuf,
    pub seed: u64,
    pub n_train: usize,
    pub n_test: usize,
    pub kinds: Vec<Kind>,
    pub warm_steps: u64,
    pub rl_steps: u64,
    pub batch_prompts: usize,
    pub num_generations: usize,
    pub rl_lr: f64,
    pub temperature: f32,
    pub template: PromptTemplate,
}

impl DemoSpec {
    /// The full demo, or a reduced one (`quick`) for a first look and for tests.
    pub fn new(out: PathBuf, quick: bool, seed: u64) -> Self {
        let full = Self {
            out,
            seed,
            // Enough scans that GRPO sees each about once or twice (B=8 per step): with 128
            // scans over 150 steps some seeds memorised them and stayed at chance held out.
            n_train: 512,
            n_test: 96,
            kinds: vec![Kind::Presence],
            // Long enough for the format to be learnt to near certainty, so that the answer
            // letter is the only token GRPO's samples differ in. After 80 steps (loss 0.052,
            // about 0.975 per reasoning token) a sampled completion changed its reasoning
            // often enough that those changes, rewarded at random, drowned the letter's
            // signal: seed 0 stayed at the warm start's accuracy. After 200 (loss 0.033, the
            // random letter's own floor) it learnt by step 50.
            warm_steps: 200,
            rl_steps: 200,
            batch_prompts: 8,
            num_generations: 8,
            // 3e-4 left seed 9 of the quick demo at chance after 100 steps (its training
            // accuracy crept from 0.50 to 0.56); 6e-4 learnt it by step 32.
            rl_lr: 6e-4,
            temperature: 0.7,
            template: PromptTemplate::Simple,
        };
        if quick {
            Self {
                n_train: 256,
                n_test: 48,
                rl_steps: 100,
                ..full
            }
        } else {
            full
        }
    }
}

/// The names `demo` writes in its output directory.
pub const ENTRIES: &[&str] = &[
    "data-train",
    "data-test",
    "data-ood",
    "data-warm",
    "model-init",
    "warm-start",
    "grpo",
    "sft",
    "eval",
    "demo.json",
];

/// Memory one GRPO sequence of the demo's tiny model takes while the group is generated
/// and scored (KV cache, logits, log-probs, bookkeeping), rounded up from about 150 KiB:
/// enough to refuse a batch that cannot fit before any work, not a plan.
const DEMO_SEQUENCE_BYTES: u128 = 256 << 10;
/// Memory a training row takes once loaded (its JSON value and item), rounded up.
const DEMO_ROW_BYTES: u128 = 4 << 10;

/// Makes `out` ready for the demo: new, empty, or (with `force`) an earlier demo's output,
/// which is removed. A directory holding anything else is refused, --force or not.
pub fn prepare_output(out: &Path, force: bool) -> Result<()> {
    let state = crate::files::check_output_dir(
        out,
        &crate::files::OutputSpec {
            command: "demo",
            flag: "--out",
            entries: ENTRIES,
            legacy: None,
        },
        crate::files::Earlier::Replace { force },
    )?;
    if state == crate::files::OutputState::Earlier {
        std::fs::remove_dir_all(out)
            .map_err(|e| crate::files::io_error(out, "cannot replace", e))?;
    }
    std::fs::create_dir_all(out).map_err(|e| crate::files::io_error(out, "cannot create", e))?;
    crate::files::mark_output(out, "demo")
}

impl DemoSpec {
    /// The demo's settings as its flags name them, checked before any work: counts, the
    /// learning rate and temperature, and the sizes against the disk and memory.
    pub fn validate(&self) -> Result<()> {
        if self.n_train < 2 {
            bail!(
                "--train-items must be at least 2 (the warm start draws half as many other \
                 scans), got {}",
                self.n_train
            );
        }
        if self.n_test < 2 {
            bail!(
                "--test-items must be at least 2 (the out-of-domain set has half as many), got {}",
                self.n_test
            );
        }
        if self.warm_steps == 0 {
            bail!("--warm-steps must be at least 1");
        }
        if self.rl_steps == 0 {
            bail!("--rl-steps must be at least 1");
        }
        if self.kinds.is_empty() {
            bail!("--task: at least one question kind is needed");
        }
        // The training runs' own checks, with their keys named by the demo's flags.
        let flag = |key: &str| match key {
            "learning_rate" => "--rl-lr".to_string(),
            "max_steps" => "--rl-steps".to_string(),
            "num_generations" => "--group".to_string(),
            "batch_prompts" => "--rl-batch".to_string(),
            "micro_batch" => "--rl-batch".to_string(),
            "temperature" => "--temperature".to_string(),
            "seed" => "--seed".to_string(),
            other => format!("the demo's {other}"),
        };
        let (sft, grpo) = self.configs(Path::new("."), Path::new("."), Path::new("."));
        for r in [sft.validate_settings(), grpo.validate_settings()] {
            if let Err(e) = r {
                bail!(
                    "{} {}",
                    flag(&e.key),
                    e.problem.replace("{0}", &e.related.join(", "))
                );
            }
        }
        // Disk: every scan set; memory: the rows loaded to train and the GRPO group.
        let rows = self.n_train + self.n_train / 2 + self.n_test + self.n_test / 2;
        let need = rows as u128 * crate::synth::ROW_BYTES as u128;
        if let Some(free) = crate::train::checkpoint::free_disk_bytes(&self.out) {
            if need > free {
                bail!(
                    "--train-items {} and --test-items {} make {rows} scans, about {} on disk, \
                     but the disk holding {} has {} free",
                    self.n_train,
                    self.n_test,
                    crate::train::checkpoint::human_bytes(need),
                    self.out.display(),
                    crate::train::checkpoint::human_bytes(free)
                );
            }
        }
        let sequences = self.batch_prompts as u128 * self.num_generations as u128;
        let memory = sequences * DEMO_SEQUENCE_BYTES + self.n_train as u128 * DEMO_ROW_BYTES;
        let (what, available) = crate::device::available_memory(&Device::Cpu);
        if let Some(a) = available {
            if memory > a as u128 {
                bail!(
                    "--rl-batch {} x --group {} ({sequences} sequences per step) with \
                     --train-items {} need about {} of memory but {what} is {}",
                    self.batch_prompts,
                    self.num_generations,
                    self.n_train,
                    crate::train::checkpoint::human_bytes(memory),
                    crate::train::checkpoint::human_bytes(a as u128)
                );
            }
        }
        Ok(())
    }

    /// The SFT (warm start and baseline) and GRPO configurations of the demo's runs, with
    /// `model`, `data` and `out` filled in where each run sets them.
    fn configs(&self, model: &Path, data: &Path, out: &Path) -> (SftConfig, GrpoConfig) {
        let sft = SftConfig {
            run: RunConfig {
                model: model.to_path_buf(),
                train_data: data.to_path_buf(),
                output_dir: out.to_path_buf(),
                template: self.template,
                micro_batch: 8,
                learning_rate: 5e-3,
                save_steps: 0,
                max_pixels: None,
                device: Some("cpu".into()),
                seed: self.seed,
                ..SftConfig::default().run
            },
            method: SftMethod { batch_size: 8 },
        };
        let grpo = GrpoConfig {
            run: RunConfig {
                model: model.to_path_buf(),
                train_data: data.to_path_buf(),
                output_dir: out.to_path_buf(),
                template: self.template,
                micro_batch: 64,
                learning_rate: self.rl_lr,
                max_steps: self.rl_steps,
                save_steps: 0,
                max_pixels: None,
                seed: self.seed,
                device: Some("cpu".into()),
                ..GrpoConfig::default().run
            },
            method: GrpoMethod {
                num_generations: self.num_generations,
                batch_prompts: self.batch_prompts,
                max_completion_length: 48,
                temperature: self.temperature,
                beta: 0.04,
                log_completions: 2,
                eval_steps: (self.rl_steps / 6).max(1),
                ..GrpoMethod::default()
            },
        };
        (sft, grpo)
    }
}

/// Accuracy of one model on one modality.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub model: String,
    pub modality: String,
    pub in_domain: bool,
    pub n: usize,
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub cells: Vec<Cell>,
    pub seconds: f64,
    pub curves: Option<PathBuf>,
}

impl DemoReport {
    pub fn accuracy(&self, model: &str, in_domain: bool) -> f64 {
        let (mut k, mut n) = (0.0, 0usize);
        for c in self
            .cells
            .iter()
            .filter(|c| c.model == model && c.in_domain == in_domain)
        {
            k += c.accuracy * c.n as f64;
            n += c.n;
        }
        k / n.max(1) as f64
    }
}

fn step(msg: &str) {
    eprintln!("\n== {msg}");
}

/// Greedy results of one checkpoint on each of `sets` (loaded once for all of them).
fn evaluate(
    model_dir: &Path,
    sets: &[&[data::VqaItem]],
    template: PromptTemplate,
) -> Result<Vec<Vec<ItemResult>>> {
    let processor = Processor::from_dir(model_dir, &ProcessorOptions::default())?;
    let mut model = Qwen2Vl::load(model_dir, DType::F32, &Device::Cpu)?;
    model.prepare_for_inference()?;
    sets.iter()
        .map(|items| eval::run_greedy(&model, &processor, items, template, 48, 32, |_, _| {}))
        .collect()
}

/// Runs the demo; prints the comparison table and writes `out/demo.json`.
pub fn run(spec: &DemoSpec) -> Result<DemoReport> {
    let t0 = Instant::now();
    let out = &spec.out;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let in_domain = vec![Style::Mri, Style::Ct];
    let synth = |name: &str, n: usize, seed: u64, styles: Vec<Style>| {
        crate::synth::write(
            &out.join(name),
            &SynthSpec {
                n,
                seed,
                styles,
                kinds: spec.kinds.clone(),
            },
        )
    };
    step("1/6 synthetic scans (MRI and CT to train on, X-ray held out of domain)");
    let train = synth(
        "data-train",
        spec.n_train,
        spec.seed.wrapping_mul(10).wrapping_add(1),
        in_domain.clone(),
    )?;
    let test = synth(
        "data-test",
        spec.n_test,
        spec.seed.wrapping_mul(10).wrapping_add(2),
        in_domain.clone(),
    )?;
    let ood = synth(
        "data-ood",
        spec.n_test / 2,
        spec.seed.wrapping_mul(10).wrapping_add(3),
        vec![Style::XRay],
    )?;
    // The warm-start set: other scans of the same kinds, with random answer letters. Other
    // scans, because a model that has memorised a random letter for each training image
    // starts GRPO confidently wrong on half of them and barely explores.
    let warm_rows = synth(
        "data-warm",
        spec.n_train / 2,
        spec.seed.wrapping_mul(10).wrapping_add(4),
        in_domain.clone(),
    )?;
    let warm = out.join("data-warm").join("warm.json");
    randomize_answers(&warm_rows, &warm, spec.seed)?;

    step("2/6 a fresh tiny Qwen2-VL");
    let model_dir = out.join("model-init");
    if model_dir.exists() {
        std::fs::remove_dir_all(&model_dir)?;
    }
    let init = crate::init::write(
        &model_dir,
        &crate::init::InitSpec {
            seed: spec.seed,
            ..Default::default()
        },
    )?;

    step("3/6 SFT warm start on the answer format (random letters)");
    let (sft_common, grpo_config) = spec.configs(Path::new(""), Path::new(""), Path::new(""));
    let warm_dir = fresh(&out.join("warm-start"))?;
    let mut warm_cfg = sft_common.clone();
    warm_cfg.run.model = init;
    warm_cfg.run.train_data = warm;
    warm_cfg.run.output_dir = warm_dir;
    warm_cfg.run.max_steps = spec.warm_steps;
    let warm_model = crate::sft::train(warm_cfg, false, None)?;

    step("4/6 GRPO from the warm start");
    let grpo_dir = fresh(&out.join("grpo"))?;
    let mut grpo_cfg = grpo_config;
    grpo_cfg.run.model = warm_model.clone();
    grpo_cfg.run.train_data = train.clone();
    grpo_cfg.run.output_dir = grpo_dir.clone();
    // Held-out greedy accuracy along the way, for the curves.
    grpo_cfg.method.eval_data = Some(test.clone());
    let grpo_model = crate::rl::trainer::train(grpo_cfg, false, None)?;

    step("5/6 the SFT baseline: correct answers, same steps and items per step");
    let sft_dir = fresh(&out.join("sft"))?;
    let mut sft_cfg = sft_common;
    sft_cfg.run.model = warm_model.clone();
    sft_cfg.run.train_data = train;
    sft_cfg.run.output_dir = sft_dir;
    sft_cfg.run.max_steps = spec.rl_steps;
    sft_cfg.run.micro_batch = spec.batch_prompts;
    sft_cfg.run.learning_rate = spec.rl_lr;
    sft_cfg.method.batch_size = spec.batch_prompts;
    let sft_model = crate::sft::train(sft_cfg, false, None)?;

    step("6/6 evaluation (greedy, strict answer rule)");
    let mut cells = Vec::new();
    let mut traces = Vec::new();
    let eval_dir = out.join("eval");
    std::fs::create_dir_all(&eval_dir)
        .with_context(|| format!("{}: cannot create", eval_dir.display()))?;
    let test_items = data::load(&test, None)?.items;
    let ood_items = data::load(&ood, None)?.items;
    for (name, dir) in [
        ("warm start", &warm_model),
        ("SFT", &sft_model),
        ("GRPO", &grpo_model),
    ] {
        let per_set = evaluate(dir, &[&test_items, &ood_items], spec.template)?;
        for (results, in_dom) in per_set.into_iter().zip([true, false]) {
            // Every item's output, for a reader (and a test) to check the table against.
            let file = eval_dir.join(format!(
                "{}-{}.jsonl",
                name.replace(' ', "-").to_lowercase(),
                if in_dom { "in-domain" } else { "out-of-domain" }
            ));
            let mut lines = String::new();
            for r in &results {
                lines.push_str(&serde_json::to_string(r)?);
                lines.push('\n');
            }
            std::fs::write(&file, lines)
                .with_context(|| format!("{}: cannot write", file.display()))?;
            let report = eval::Report::new(
                &results,
                name,
                "",
                "greedy",
                spec.template,
                &[],
                &Default::default(),
                &eval::Scoring::default(),
                serde_json::Value::Null,
            );
            for row in report.rows.iter().filter(|r| r.modality != "all") {
                cells.push(Cell {
                    model: name.to_string(),
                    modality: row.modality.clone(),
                    in_domain: in_dom,
                    n: row.n,
                    accuracy: row.accuracy.unwrap_or(0.0),
                });
            }
            if name == "GRPO" {
                traces.extend(results.into_iter().filter(|r| r.format_ok).take(2));
            }
        }
    }
    let curves = crate::plot::plot_run(&grpo_dir, &crate::plot::PlotOptions::default()).ok();
    let report = DemoReport {
        cells,
        seconds: t0.elapsed().as_secs_f64(),
        curves,
    };
    std::fs::write(
        out.join("demo.json"),
        serde_json::to_string_pretty(&report)?,
    )
    .with_context(|| format!("{}: cannot write demo.json", out.display()))?;
    print_summary(&report, &traces);
    Ok(report)
}

/// Removes a previous run's directory so the demo can be rerun in place.
fn fresh(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("{}: cannot clear", dir.display()))?;
    }
    Ok(dir.to_path_buf())
}

/// Copies a dataset with every answer replaced by a random option (seeded).
fn randomize_answers(src: &Path, dst: &Path, seed: u64) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let mut rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(src)?)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    for r in rows.iter_mut() {
        let opts = r["options"].as_array().cloned().unwrap_or_default();
        if opts.is_empty() {
            continue;
        }
        let k = rng.random_range(0..opts.len());
        r["answer"] = opts[k].clone();
        r["solution"] = serde_json::Value::String(crate::data::LETTERS[k].to_string());
    }
    std::fs::write(dst, serde_json::to_string_pretty(&rows)?)
        .with_context(|| format!("{}: cannot write", dst.display()))
}

fn print_summary(r: &DemoReport, traces: &[ItemResult]) {
    let mut mods: Vec<(String, bool)> = Vec::new();
    for c in &r.cells {
        if !mods.iter().any(|(m, _)| *m == c.modality) {
            mods.push((c.modality.clone(), c.in_domain));
        }
    }
    let mut header = String::from("| model |");
    let mut rule = String::from("| --- |");
    for (m, d) in &mods {
        header.push_str(&format!(
            " {m}{} |",
            if *d { "" } else { " (out of domain)" }
        ));
        rule.push_str(" ---: |");
    }
    header.push_str(" in domain | out of domain |");
    rule.push_str(" ---: | ---: |");
    println!("\nHeld-out accuracy (greedy decoding):\n\n{header}\n{rule}");
    for model in ["warm start", "SFT", "GRPO"] {
        let mut line = format!("| {model} |");
        for (m, _) in &mods {
            let c = r
                .cells
                .iter()
                .find(|c| c.model == model && &c.modality == m);
            line.push_str(&format!(
                " {} |",
                c.map(|c| format!("{:.1}%", 100.0 * c.accuracy))
                    .unwrap_or_else(|| "-".into())
            ));
        }
        line.push_str(&format!(
            " {:.1}% | {:.1}% |",
            100.0 * r.accuracy(model, true),
            100.0 * r.accuracy(model, false)
        ));
        println!("{line}");
    }
    if let Some(c) = &r.curves {
        println!("\nGRPO reward curves: {}", c.display());
    }
    if !traces.is_empty() {
        println!("\nA few GRPO answers:");
        for t in traces {
            let (reasoning, _) = crate::infer::split_reasoning(&t.output);
            println!(
                "  [{}] reasoning: {:?} -> answer {} (correct: {})",
                t.modality,
                reasoning.unwrap_or_default(),
                t.letter.map(String::from).unwrap_or_else(|| "?".into()),
                t.solution.map(String::from).unwrap_or_default()
            );
        }
    }
    println!("\ndone in {:.0}s", r.seconds);
}
