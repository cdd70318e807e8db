//! `medvlm bench train`: GRPO optimizer steps on the benchmark model (src/model/presets/qwen2-vl-bench.json,
//! random weights; or another shape, `--preset` / `--config`) with one synthetic image per prompt, timed phase by phase: generation of
//! the G completions, the reference model's log-probs, the policy's forward and backward
//! passes, and the optimizer (clipping + AdamW). It calls the trainer's own step functions
//! ([`crate::rl::step`]), so it measures what `medvlm train grpo` does.
//! tools/bench_train_pytorch.py runs the same step in PyTorch, the way TRL does it.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{peak_rss_mib, reset_peak_rss, text_ids};
use crate::generate::{Completion, Engine, FinishReason, Request, SamplingParams};
use crate::kernels::quant::QuantKind;
use crate::model::random::random_var_builder;
use crate::model::{Qwen2Vl, Qwen2VlConfig};
use crate::processor::Prompt;
use crate::rl::grpo::{self, LossConfig, ScaleRewards, SeqRef};
use crate::rl::step::{self, StepBatch};
use crate::train::{AdamW, AdamWConfig, TrainableModel};

/// The workload of one benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainWorkload {
    /// Prompts per step (B).
    pub prompts: usize,
    /// Completions per prompt (G).
    pub group: usize,
    /// Tokens in every completion (generation never stops early).
    pub completion_len: usize,
    /// Completions per forward/backward pass.
    pub micro_batch: usize,
    pub beta: f64,
    /// Optimizer steps timed.
    pub steps: usize,
    /// Side of the square test image in pixels (224 -> 64 image tokens).
    pub image_size: u32,
    /// Prompt length in tokens, image tokens included.
    pub prompt_tokens: usize,
    /// Train only the language model and the merger.
    pub freeze_vision: bool,
    /// Report each phase's peak memory (resets the kernel's peak counter at every phase
    /// boundary, so outside tools then see only the last phase's peak).
    pub phase_memory: bool,
    /// Time an SFT step instead: `prompts x group` items with `completion_len`-token
    /// targets, each its own prompt; no generation, no reference model.
    pub sft: bool,
    /// Recompute each layer in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// GRPO: compute each completion token's entropy in the policy pass, as `train grpo` does
    /// for its `entropy` metric.
    pub entropy: bool,
    /// The shape of the random model (default: the benchmark shape); ignored with `model`.
    pub shape: super::Shape,
    /// A checkpoint to train instead of a random model (e.g. `medvlm init --preset
    /// qwen2-vl-2b`).
    pub model: Option<std::path::PathBuf>,
    /// LoRA rank (alpha = 2r, bf16 base, PEFT's default targets); 0 trains everything.
    pub lora_r: usize,
    /// Compute dtype: "f32" or "bf16".
    pub dtype: String,
    /// GRPO without LoRA: the reference model quantized to this format (`q8_0`, `q4_1`), as
    /// `train grpo`'s `reference_quantize` builds it.
    pub reference_quantize: Option<String>,
}

impl Default for TrainWorkload {
    /// The workload of the issue that asked for this benchmark: B=1, G=8, 256-token
    /// completions, micro-batch 2, beta 0.04, a 261-token prompt with 64 image tokens.
    fn default() -> Self {
        Self {
            prompts: 1,
            group: 8,
            completion_len: 256,
            micro_batch: 2,
            beta: 0.04,
            steps: 3,
            image_size: 224,
            prompt_tokens: 261,
            freeze_vision: false,
            phase_memory: false,
            sft: false,
            gradient_checkpointing: false,
            entropy: true,
            shape: super::Shape::bench(),
            model: None,
            lora_r: 0,
            dtype: "f32".into(),
            reference_quantize: None,
        }
    }
}

/// Seconds spent in each phase of one optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepTimes {
    pub generation_s: f64,
    pub reference_s: f64,
    pub policy_s: f64,
    pub optimizer_s: f64,
    /// reference + policy + optimizer: the training half of the step.
    pub train_s: f64,
    pub total_s: f64,
    pub loss: f64,
    pub grad_norm: f64,
    /// Peak resident memory during each phase, MiB.
    pub generation_peak_mib: f64,
    pub reference_peak_mib: f64,
    pub policy_peak_mib: f64,
    pub optimizer_peak_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchReport {
    pub parameters: usize,
    pub threads: usize,
    pub workload: TrainWorkload,
    pub image_tokens: usize,
    pub steps: Vec<StepTimes>,
    /// Peak resident memory of the whole run (models, optimizer state, every phase), MiB.
    pub peak_rss_mib: f64,
    /// Whether the per-phase peaks could be measured (Linux).
    pub per_phase_peaks: bool,
    /// The memory plan's estimate of the peak for this workload, MiB.
    pub planned_peak_mib: f64,
    /// The whole plan: each term, the phase it expects the peak in.
    pub plan: crate::train::plan::Plan,
}

/// The benchmark prompt: text, one image, text, `total` tokens in all.
pub fn bench_prompt(config: &Qwen2VlConfig, size: u32, total: usize) -> Result<(Prompt, usize)> {
    let patches = super::image_processor(config).preprocess(&super::test_card(size))?;
    let image_tokens = patches.num_tokens();
    let before = 20;
    let fixed = before + image_tokens + 2;
    if total < fixed + 1 {
        bail!(
            "--prompt-tokens {total} is too short: a {size}x{size} image alone takes {} tokens",
            image_tokens + 2
        );
    }
    let prompt = super::prompt_with_image(config, patches, before, total - fixed);
    Ok((prompt, image_tokens))
}

/// The models and inputs of a benchmark run.
struct Setup {
    config: Qwen2VlConfig,
    policy: TrainableModel,
    /// The KL reference: the policy's initial weights in storage of their own.
    reference: Option<Qwen2Vl>,
    sampler: Qwen2Vl,
    prompts: Vec<Prompt>,
    optimizer: AdamW,
    /// The previous step's completions and reference log-probs: the trainer holds a rollout
    /// until the next one has replaced it, through that one's generation and reference pass.
    previous: Option<Rollout>,
}

/// A step's completions per prompt and, with a KL term, their reference log-probs.
type Rollout = (Vec<Vec<Completion>>, Option<Vec<Vec<f32>>>);

/// Tracks peak memory per phase (when asked to) and over the whole run.
struct Peaks {
    per_phase: bool,
    overall: f64,
}

impl Peaks {
    /// The peak since the previous call (which, when measuring phases, starts a new one).
    fn phase(&mut self) -> f64 {
        let p = peak_rss_mib();
        self.overall = self.overall.max(p);
        if self.per_phase {
            reset_peak_rss();
        }
        p
    }
}

pub fn run(device: &Device, w: &TrainWorkload) -> Result<TrainBenchReport> {
    if w.group == 0 || w.prompts == 0 || w.completion_len == 0 || w.micro_batch == 0 {
        bail!(
            "the workload needs --prompts, --group, --completion-len and --micro-batch of at least 1"
        );
    }
    if !w.sft && w.group < 2 {
        bail!("GRPO compares completions within a group: --group must be at least 2");
    }
    let compute = crate::train::config::parse_dtype(&w.dtype, "--dtype")?;
    let reference_quantize = match &w.reference_quantize {
        None => None,
        Some(name) => Some(
            QuantKind::from_name(name)
                .with_context(|| format!("--reference-quantize: unknown format {name:?}"))?,
        ),
    };
    if reference_quantize.is_some() && (w.sft || w.beta == 0.0 || w.lora_r > 0) {
        bail!(
            "--reference-quantize needs a reference copy to quantize: GRPO with --beta above 0 \
             and no --lora-r"
        );
    }
    if reference_quantize.is_some() && !device.is_cpu() {
        bail!("--reference-quantize: quantized models run on the CPU only");
    }
    if w.model.is_none() && w.lora_r > 0 {
        bail!("--lora-r needs --model DIR (e.g. a checkpoint from `medvlm init --preset`)");
    }
    // The plan needs only the shape: it refuses a workload that cannot fit before any
    // model is built.
    let config = match &w.model {
        None => w.shape.config()?,
        Some(dir) => Qwen2VlConfig::from_file(&dir.join("config.json"))?,
    };
    let (prompt, image_tokens) = bench_prompt(&config, w.image_size, w.prompt_tokens)?;
    let plan_input = crate::train::plan::PlanInput {
        config: config.clone(),
        objective: if w.sft {
            crate::train::plan::Objective::Sft {
                items: w.prompts * w.group,
            }
        } else {
            crate::train::plan::Objective::Grpo {
                prompts: w.prompts,
                group: w.group,
                beta: w.beta != 0.0,
                iterations: 1,
                reference_quantize,
            }
        },
        prompt_tokens: prompt.input_ids.len(),
        image_patches: prompt.images.iter().map(|i| i.num_patches).sum(),
        completion_tokens: w.completion_len,
        micro_batch: w.micro_batch,
        compute,
        lora: (w.lora_r > 0).then(|| crate::train::config::LoraConfig {
            r: w.lora_r,
            alpha: 2.0 * w.lora_r as f64,
            ..Default::default()
        }),
        checkpointing: w.gradient_checkpointing,
        freeze_vision: w.freeze_vision,
        cpu: device.is_cpu(),
    };
    let (avail_what, available) = crate::device::available_memory(device);
    let plan = crate::train::plan::estimate(&plan_input, &avail_what, available)?;
    eprintln!("{plan}");
    if !plan.fits() {
        bail!(
            "the workload needs about {:.2} GiB at its peak ({}) but {} has {:.2} GiB: use a \
             smaller --group, --prompts, --micro-batch or --completion-len",
            plan.peak as f64 / (1u64 << 30) as f64,
            plan.peak_phase,
            plan.device,
            plan.available.unwrap_or(0) as f64 / (1u64 << 30) as f64
        );
    }
    let (mut policy, reference) = match &w.model {
        None => {
            let mut policy =
                TrainableModel::random(config.clone(), 0.02, 0, std::path::Path::new("."), device)
                    .context("building the benchmark policy")?;
            policy.model.set_compute_dtype(compute);
            // The reference: the same initial weights in storage of their own.
            let reference = if !w.sft && w.beta != 0.0 {
                let mut r = Qwen2Vl::from_var_builder(
                    random_var_builder(0.02, 0, compute, device),
                    config.arch.released_layout(),
                    config.clone(),
                    compute,
                    device,
                )?;
                r.set_compute_dtype(compute);
                // As `train grpo` builds its reference (`rl::trainer::reference_copy`).
                match reference_quantize {
                    Some(_) => crate::infer::ready_for_inference(&mut r, reference_quantize)?,
                    None => {
                        r.prepare_for_scoring()?;
                    }
                }
                Some(r)
            } else {
                None
            };
            (policy, reference)
        }
        Some(dir) => {
            let policy = if w.lora_r > 0 {
                let lora = crate::train::config::LoraConfig {
                    r: w.lora_r,
                    alpha: 2.0 * w.lora_r as f64,
                    ..Default::default()
                };
                TrainableModel::load_lora(dir, &lora, compute, None, 0, device)?
            } else {
                let mut p = TrainableModel::load(dir, device)?;
                p.model.set_compute_dtype(compute);
                p
            };
            let reference = match (!w.sft && w.beta != 0.0, w.lora_r > 0) {
                (false, _) => None,
                (true, true) => Some(policy.model.without_adapters()),
                (true, false) => Some(crate::rl::trainer::reference_copy(
                    dir,
                    compute,
                    reference_quantize,
                    device,
                )?),
            };
            (policy, reference)
        }
    };
    if w.freeze_vision {
        policy.freeze_vision();
    }
    let sampler = policy.detached()?;
    let mut setup = Setup {
        config: config.clone(),
        policy,
        reference,
        sampler,
        prompts: vec![prompt; w.prompts],
        optimizer: AdamW::new(AdamWConfig {
            lr: 1e-6,
            ..Default::default()
        }),
        previous: None,
    };
    let mut peaks = Peaks {
        per_phase: false,
        overall: peak_rss_mib(),
    };
    peaks.per_phase = w.phase_memory && reset_peak_rss();
    let mut steps = Vec::with_capacity(w.steps);
    for s in 0..w.steps {
        let st = if w.sft {
            sft_step(&mut setup, w, s, &mut peaks)?
        } else {
            grpo_step(&mut setup, w, s, &mut peaks)?
        };
        eprintln!(
            "step {}: generation {:.2}s  reference {:.2}s  policy fwd+bwd {:.2}s  optimizer {:.2}s  \
             train {:.2}s  total {:.2}s",
            s + 1,
            st.generation_s,
            st.reference_s,
            st.policy_s,
            st.optimizer_s,
            st.train_s,
            st.total_s,
        );
        steps.push(st);
    }
    Ok(TrainBenchReport {
        parameters: crate::model::num_parameters(&config)?,
        threads: candle_core::utils::get_num_threads(),
        workload: w.clone(),
        image_tokens,
        steps,
        peak_rss_mib: peaks.overall.max(peak_rss_mib()),
        per_phase_peaks: peaks.per_phase,
        planned_peak_mib: plan.peak as f64 / (1u64 << 20) as f64,
        plan,
    })
}

/// LoRA dropout and checkpointing settings of step `s`.
fn train_options(w: &TrainWorkload, s: usize) -> crate::train::logps::TrainOptions {
    crate::train::logps::TrainOptions {
        dropout_seed: Some(crate::seed::mix(7, s as u64)),
        checkpointing: w.gradient_checkpointing,
        entropy: !w.sft && w.entropy,
    }
}

/// Clipping and AdamW, timed.
fn optimizer_phase(
    setup: &mut Setup,
    mut grads: crate::train::GradAccumulator,
) -> Result<(f64, f64)> {
    let t = Instant::now();
    let grad_norm = grads.clip(1.0)?;
    setup.optimizer.update(&setup.policy.params, &grads, 1e-6)?;
    drop(grads);
    Ok((grad_norm, t.elapsed().as_secs_f64()))
}

/// One GRPO step: sample, reference log-probs, policy forward/backward, update.
fn grpo_step(
    setup: &mut Setup,
    w: &TrainWorkload,
    s: usize,
    peaks: &mut Peaks,
) -> Result<StepTimes> {
    let t0 = Instant::now();
    // No stop tokens: every completion runs to completion_len, as the PyTorch side forces.
    // The trainer's rollout model: bf16 runs decode through the inference kernels.
    let fast = setup.policy.rollout_model()?;
    let engine = Engine::new(
        fast.as_ref().unwrap_or(&setup.sampler),
        vec![],
        vec![setup.config.image_token_id],
    );
    let requests: Vec<Request> = setup
        .prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            prompt: p,
            sampling: SamplingParams::with_temperature(1.0, (s * 1000 + i) as u64),
            max_new_tokens: w.completion_len,
            num_samples: w.group,
        })
        .collect();
    let completions = engine.generate(&requests, |_, _, _| {})?;
    drop(engine);
    drop(fast);
    let generation_s = t0.elapsed().as_secs_f64();
    let generation_peak_mib = peaks.phase();

    // Rewards stand in for the reward functions (which cost nothing next to the model):
    // fixed random values, so advantages are non-zero.
    let mut rng = StdRng::seed_from_u64(s as u64);
    let rewards: Vec<f32> = (0..w.prompts * w.group)
        .map(|_| rng.random_range(0..3) as f32)
        .collect();
    let advantages = grpo::advantages(&rewards, w.group, ScaleRewards::Group)?;
    let truncated: Vec<bool> = completions
        .iter()
        .flatten()
        .map(|c| c.finish == FinishReason::Length)
        .collect();
    let prompts = &setup.prompts;
    let seqs: Vec<SeqRef> = completions
        .iter()
        .enumerate()
        .flat_map(|(pi, g)| {
            g.iter().map(move |c| SeqRef {
                prompt: &prompts[pi],
                prompt_index: pi,
                tokens: &c.tokens,
            })
        })
        .collect();
    let batch = StepBatch {
        seqs,
        advantages: &advantages,
        truncated: &truncated,
    };
    let t1 = Instant::now();
    let reference_logps = match &setup.reference {
        Some(m) => Some(step::fixed_logps(m, &batch, w.micro_batch, 1.0)?),
        None => None,
    };
    let reference_s = t1.elapsed().as_secs_f64();
    let reference_peak_mib = peaks.phase();
    setup.previous = None;
    let loss_cfg = LossConfig {
        beta: w.beta,
        max_completion_length: w.completion_len,
        ..Default::default()
    };
    let t2 = Instant::now();
    let (grads, stats) = step::policy_gradients(
        &setup.policy,
        &batch,
        &loss_cfg,
        w.micro_batch,
        None,
        reference_logps.as_deref(),
        train_options(w, s),
    )?;
    let policy_s = t2.elapsed().as_secs_f64();
    let policy_peak_mib = peaks.phase();
    drop(batch);
    let (grad_norm, optimizer_s) = optimizer_phase(setup, grads)?;
    let optimizer_peak_mib = peaks.phase();
    setup.previous = Some((completions, reference_logps));
    Ok(StepTimes {
        generation_s,
        reference_s,
        policy_s,
        optimizer_s,
        train_s: reference_s + policy_s + optimizer_s,
        total_s: t0.elapsed().as_secs_f64(),
        loss: stats.loss,
        grad_norm,
        generation_peak_mib,
        reference_peak_mib,
        policy_peak_mib,
        optimizer_peak_mib,
    })
}

/// One SFT step over `prompts x group` items, each its own prompt (SFT items share
/// nothing) with a target of `completion_len` tokens.
fn sft_step(
    setup: &mut Setup,
    w: &TrainWorkload,
    s: usize,
    peaks: &mut Peaks,
) -> Result<StepTimes> {
    let n = w.prompts * w.group;
    let targets: Vec<Vec<u32>> = (0..n)
        .map(|i| text_ids(&setup.config, w.completion_len, (3 + s * n + i) as u32))
        .collect();
    // A prompt (with its image's pixels) per item, as `train sft` prepares its batch: the
    // items of a step are held together, so their memory grows with the batch.
    let prompts: Vec<Prompt> = (0..n)
        .map(|i| setup.prompts[i % setup.prompts.len()].clone())
        .collect();
    let seqs: Vec<SeqRef> = targets
        .iter()
        .zip(&prompts)
        .enumerate()
        .map(|(i, (t, p))| SeqRef {
            prompt: p,
            prompt_index: i,
            tokens: t,
        })
        .collect();
    let t0 = Instant::now();
    let (grads, loss) =
        crate::sft::gradients(&setup.policy, &seqs, w.micro_batch, train_options(w, s))?;
    let policy_s = t0.elapsed().as_secs_f64();
    let policy_peak_mib = peaks.phase();
    let (grad_norm, optimizer_s) = optimizer_phase(setup, grads)?;
    let optimizer_peak_mib = peaks.phase();
    Ok(StepTimes {
        generation_s: 0.0,
        reference_s: 0.0,
        policy_s,
        optimizer_s,
        train_s: policy_s + optimizer_s,
        total_s: t0.elapsed().as_secs_f64(),
        loss,
        grad_norm,
        generation_peak_mib: 0.0,
        reference_peak_mib: 0.0,
        policy_peak_mib,
        optimizer_peak_mib,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

impl std::fmt::Display for TrainBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = &self.workload;
        writeln!(
            f,
            "model            {}, {:.1}M parameters, {} compute{}{}, {} threads",
            match &w.model {
                Some(d) => d.display().to_string(),
                None => format!("random Qwen2-VL ({})", w.shape.name),
            },
            self.parameters as f64 / 1e6,
            w.dtype,
            if w.lora_r > 0 {
                format!(", LoRA r={}", w.lora_r)
            } else {
                String::new()
            },
            if w.gradient_checkpointing {
                ", gradient checkpointing"
            } else {
                ""
            },
            self.threads
        )?;
        let frozen = if w.freeze_vision {
            ", vision frozen"
        } else {
            ""
        };
        if w.sft {
            writeln!(
                f,
                "workload         SFT: {} items with {}-token targets, prompt {} tokens ({} image) \
                 each, micro-batch {}{frozen}",
                w.prompts * w.group,
                w.completion_len,
                w.prompt_tokens,
                self.image_tokens,
                w.micro_batch,
            )?;
        } else {
            writeln!(
                f,
                "workload         GRPO: B={} x G={} completions of {} tokens, prompt {} tokens \
                 ({} image), micro-batch {}, beta {}{frozen}{}",
                w.prompts,
                w.group,
                w.completion_len,
                w.prompt_tokens,
                self.image_tokens,
                w.micro_batch,
                w.beta,
                if w.entropy { "" } else { ", no entropies" },
            )?;
        }
        let col = |g: fn(&StepTimes) -> f64, mem: Option<fn(&StepTimes) -> f64>| {
            let v: Vec<f64> = self.steps.iter().map(g).collect();
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(0.0, f64::max);
            let peak = match mem {
                Some(m) if self.per_phase_peaks => format!(
                    "   peak {:.0} MiB",
                    self.steps.iter().map(m).fold(0.0, f64::max)
                ),
                _ => String::new(),
            };
            format!(
                "{:7.2} s  (min {:.2}, max {:.2}){peak}",
                median(v),
                min,
                max
            )
        };
        writeln!(f, "median over {} steps:", self.steps.len())?;
        if !w.sft {
            writeln!(
                f,
                "  generation     {}",
                col(|s| s.generation_s, Some(|s| s.generation_peak_mib))
            )?;
            writeln!(
                f,
                "  reference fwd  {}",
                col(|s| s.reference_s, Some(|s| s.reference_peak_mib))
            )?;
        }
        writeln!(
            f,
            "  policy fwd+bwd {}",
            col(|s| s.policy_s, Some(|s| s.policy_peak_mib))
        )?;
        writeln!(
            f,
            "  optimizer      {}",
            col(|s| s.optimizer_s, Some(|s| s.optimizer_peak_mib))
        )?;
        writeln!(f, "  training half  {}", col(|s| s.train_s, None))?;
        writeln!(f, "  whole step     {}", col(|s| s.total_s, None))?;
        write!(
            f,
            "peak memory      {:.0} MiB resident (memory plan: {:.0} MiB)",
            self.peak_rss_mib, self.planned_peak_mib
        )
    }
}
