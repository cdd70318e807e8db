//! `medvlm bench train`: GRPO optimizer steps on the benchmark model (tools/bench_config.json,
//! random weights) with one synthetic image per prompt, timed phase by phase: generation of
//! the G completions, the reference model's log-probs, the policy's forward and backward
//! passes, and the optimizer (clipping + AdamW). It calls the trainer's own step functions
//! ([`crate::rl::step`]), so it measures what `medvlm train grpo` does.
//! tools/bench_train_pytorch.py runs the same step in PyTorch, the way TRL does it.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{count_parameters, peak_rss_mib, reset_peak_rss, text_ids, BENCH_CONFIG};
use crate::generate::{Engine, FinishReason, Request, SamplingParams};
use crate::model::random::random_var_builder;
use crate::model::{Qwen2Vl, Qwen2VlConfig, WeightLayout};
use crate::processor::{ImageProcessor, ImageProcessorConfig, Prompt};
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
}

/// The benchmark prompt: text, one image, text, `total` tokens in all.
pub fn bench_prompt(config: &Qwen2VlConfig, size: u32, total: usize) -> Result<(Prompt, usize)> {
    let img = image::RgbImage::from_fn(size, size, |x, y| {
        let r = ((x * 7 + y * 3) % 256) as u8;
        let g = (((x as f32 / 9.0).sin() * 120.0 + 128.0) as u8).wrapping_add((y % 17) as u8);
        let b = ((x ^ y) % 256) as u8;
        image::Rgb([r, g, b])
    });
    let patches = ImageProcessor::new(ImageProcessorConfig::default()).preprocess(&img)?;
    let m = config.vision.spatial_merge_size;
    let image_tokens = patches.grid_thw.iter().product::<usize>() / (m * m);
    let before = 20;
    let fixed = before + image_tokens + 2;
    if total < fixed + 1 {
        bail!(
            "--prompt-tokens {total} is too short: a {size}x{size} image alone takes {} tokens",
            image_tokens + 2
        );
    }
    let mut ids = text_ids(before, 1);
    ids.push(config.vision_start_token_id);
    ids.extend(std::iter::repeat_n(config.image_token_id, image_tokens));
    ids.push(config.vision_end_token_id);
    ids.extend(text_ids(total - fixed, 2));
    Ok((
        Prompt {
            text: String::new(),
            input_ids: ids,
            images: vec![patches],
        },
        image_tokens,
    ))
}

pub fn run(device: &Device, w: &TrainWorkload) -> Result<TrainBenchReport> {
    if w.group < 2 || w.prompts == 0 || w.completion_len == 0 || w.micro_batch == 0 {
        bail!("the workload needs --group >= 2, --prompts >= 1, --completion-len >= 1 and --micro-batch >= 1");
    }
    let config = Qwen2VlConfig::from_json_str(BENCH_CONFIG, "tools/bench_config.json")?;
    let mut policy =
        TrainableModel::random(config.clone(), 0.02, 0, std::path::Path::new("."), device)
            .context("building the benchmark policy")?;
    if w.freeze_vision {
        policy.freeze_vision();
    }
    // The reference: the same initial weights in storage of its own (the policy's change).
    let reference = Qwen2Vl::from_var_builder(
        random_var_builder(0.02, 0, DType::F32, device),
        WeightLayout::Legacy,
        config.clone(),
        DType::F32,
        device,
    )?;
    let sampler = policy.detached()?;
    let (prompt, image_tokens) = bench_prompt(&config, w.image_size, w.prompt_tokens)?;
    let prompts = vec![prompt; w.prompts];
    let loss_cfg = LossConfig {
        beta: w.beta,
        max_completion_length: w.completion_len,
        ..Default::default()
    };
    let mut optimizer = AdamW::new(AdamWConfig {
        lr: 1e-6,
        ..Default::default()
    });
    let mut steps = Vec::with_capacity(w.steps);
    let mut overall_peak = peak_rss_mib();
    let per_phase_peaks = reset_peak_rss();
    // The peak since the last call, which then starts a new one.
    let mut phase_peak = || {
        let p = peak_rss_mib();
        overall_peak = overall_peak.max(p);
        reset_peak_rss();
        p
    };
    for s in 0..w.steps {
        let t0 = Instant::now();
        // No stop tokens: every completion runs to completion_len, as the PyTorch side forces.
        let engine = Engine::new(&sampler, vec![], vec![config.image_token_id]);
        let requests: Vec<Request> = prompts
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
        let generation_s = t0.elapsed().as_secs_f64();
        let generation_peak_mib = phase_peak();

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
        let seqs: Vec<SeqRef> = completions
            .iter()
            .enumerate()
            .flat_map(|(pi, g)| {
                let prompts = &prompts;
                g.iter().map(move |c| SeqRef {
                    prompt: &prompts[pi],
                    prompt_index: pi,
                    tokens: &c.tokens,
                })
            })
            .collect();
        let batch = StepBatch {
            prompts: &prompts,
            seqs,
            advantages: &advantages,
            truncated: &truncated,
        };

        let t1 = Instant::now();
        let reference_logps = if w.beta != 0.0 {
            Some(step::fixed_logps(&reference, &batch, w.micro_batch, 1.0)?)
        } else {
            None
        };
        let reference_s = t1.elapsed().as_secs_f64();
        let reference_peak_mib = phase_peak();
        let t2 = Instant::now();
        let (mut grads, stats) = step::policy_gradients(
            &policy,
            &batch,
            &loss_cfg,
            w.micro_batch,
            None,
            reference_logps.as_deref(),
        )?;
        let policy_s = t2.elapsed().as_secs_f64();
        let policy_peak_mib = phase_peak();
        let t3 = Instant::now();
        let grad_norm = grads.clip(1.0)?;
        optimizer.update(&policy.params, &grads, 1e-6)?;
        drop(grads);
        let optimizer_s = t3.elapsed().as_secs_f64();
        let optimizer_peak_mib = phase_peak();
        let train_s = reference_s + policy_s + optimizer_s;
        let st = StepTimes {
            generation_s,
            reference_s,
            policy_s,
            optimizer_s,
            train_s,
            total_s: t0.elapsed().as_secs_f64(),
            loss: stats.loss,
            grad_norm,
            generation_peak_mib,
            reference_peak_mib,
            policy_peak_mib,
            optimizer_peak_mib,
        };
        eprintln!(
            "step {}: generation {:.2}s  reference {:.2}s  policy fwd+bwd {:.2}s  optimizer {:.2}s  \
             train {:.2}s  total {:.2}s  (peak MiB: {:.0} / {:.0} / {:.0} / {:.0})",
            s + 1,
            st.generation_s,
            st.reference_s,
            st.policy_s,
            st.optimizer_s,
            st.train_s,
            st.total_s,
            st.generation_peak_mib,
            st.reference_peak_mib,
            st.policy_peak_mib,
            st.optimizer_peak_mib,
        );
        steps.push(st);
    }
    Ok(TrainBenchReport {
        parameters: count_parameters(&config),
        threads: candle_core::utils::get_num_threads(),
        workload: w.clone(),
        image_tokens,
        steps,
        peak_rss_mib: overall_peak.max(peak_rss_mib()),
        per_phase_peaks,
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
            "model            random Qwen2-VL, {:.1}M parameters (tools/bench_config.json), f32, {} threads",
            self.parameters as f64 / 1e6,
            self.threads
        )?;
        writeln!(
            f,
            "workload         B={} x G={} completions of {} tokens, prompt {} tokens ({} image), \
             micro-batch {}, beta {}{}",
            w.prompts,
            w.group,
            w.completion_len,
            w.prompt_tokens,
            self.image_tokens,
            w.micro_batch,
            w.beta,
            if w.freeze_vision {
                ", vision frozen"
            } else {
                ""
            }
        )?;
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
        write!(f, "peak memory      {:.0} MiB resident", self.peak_rss_mib)
    }
}
