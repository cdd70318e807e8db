//! The GRPO training loop: sample G completions per prompt with the rollout engine, score
//! them, compute group-relative advantages, and take AdamW steps on the clipped objective
//! with a KL penalty; log, checkpoint, resume, evaluate.
//!
//! Every random draw of optimizer step `s` derives from `(seed, s)` (data order from
//! `(seed, epoch)`), so a run resumed from a checkpoint replays exactly what the
//! uninterrupted run would have done.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;

use super::config::GrpoConfig;
use super::grpo::{self, SeqRef, StepShape};
use super::reward::{extract_answer, Extraction, RewardContext, RewardSet};
use super::rewards_from_names;
use crate::data::{self, VqaItem};
use crate::generate::{Completion, Engine, Request, SamplingParams};
use crate::model::Qwen2Vl;
use crate::processor::{Processor, ProcessorOptions, Prompt};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::metrics::{mean_std, JsonlWriter, Record};
use crate::train::{AdamW, AdamWConfig, GradAccumulator, TrainableModel};

/// SplitMix64 finaliser: derives independent seeds from (seed, counter).
pub fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The order items are visited in: a fresh seeded shuffle per epoch.
pub struct DataOrder {
    n: usize,
    seed: u64,
}

impl DataOrder {
    pub fn new(n: usize, seed: u64) -> Self {
        Self { n, seed }
    }
    /// The item index visited at global position `k` (k-th item drawn since the start).
    pub fn at(&self, k: u64) -> usize {
        let epoch = k / self.n as u64;
        let mut idx: Vec<usize> = (0..self.n).collect();
        idx.shuffle(&mut StdRng::seed_from_u64(mix(self.seed, epoch)));
        idx[(k % self.n as u64) as usize]
    }
}

/// One generated batch: prompts, their completions, rewards and advantages, and the
/// log-probabilities that stay fixed while the batch is reused.
struct Rollout {
    items: Vec<usize>,
    prompts: Vec<Prompt>,
    /// Grouped by prompt, G each.
    completions: Vec<Vec<Completion>>,
    texts: Vec<String>,
    rewards: Vec<f32>,
    per_reward: Vec<Vec<f32>>,
    advantages: Vec<f32>,
    old_logps: Option<Vec<Tensor>>,
    ref_logps: Option<Vec<Tensor>>,
    gen_seconds: f64,
}

impl Rollout {
    fn seqs(&self) -> Vec<SeqRef<'_>> {
        let mut v = Vec::new();
        for (pi, group) in self.completions.iter().enumerate() {
            for c in group {
                v.push(SeqRef {
                    prompt: &self.prompts[pi],
                    prompt_index: pi,
                    tokens: &c.tokens,
                });
            }
        }
        v
    }
    fn flat(&self) -> Vec<&Completion> {
        self.completions.iter().flatten().collect()
    }
}

/// Everything a run needs, loaded and checked.
pub struct GrpoRun {
    pub config: GrpoConfig,
    pub policy: TrainableModel,
    /// A view of the policy's weights outside the autograd graph, for sampling.
    sampler_model: Qwen2Vl,
    reference: Option<Qwen2Vl>,
    pub processor: Processor,
    train: Vec<VqaItem>,
    eval: Vec<VqaItem>,
    rewards: RewardSet,
    optimizer: AdamW,
    step: u64,
    total_steps: u64,
    stop: Vec<u32>,
    banned: Vec<u32>,
    device: Device,
}

/// Where a run starts from.
pub enum Start {
    Fresh,
    /// Continue from the newest checkpoint of the run directory.
    Resume,
}

impl GrpoRun {
    /// Loads models and data for `config`. All validation happens here, before any work.
    pub fn prepare(config: GrpoConfig, start: Start) -> Result<Self> {
        config.validate()?;
        let device = crate::cli::parse_device(config.device.as_deref())?;
        let out = &config.output_dir;
        let ckpt = match start {
            Start::Fresh => {
                if let Some(c) = checkpoint::latest(out).ok().flatten() {
                    bail!(
                        "{}: the run directory already has checkpoints ({}); resume it with \
                         --resume {} or choose another output_dir",
                        out.display(),
                        c.display(),
                        out.display()
                    );
                }
                None
            }
            Start::Resume => Some(checkpoint::latest(out)?.with_context(|| {
                format!("{}: no checkpoint to resume from", out.display())
            })?),
        };
        let popts = ProcessorOptions {
            min_pixels: config.min_pixels,
            max_pixels: config.max_pixels,
            max_prompt_tokens: None,
        };
        let processor = Processor::from_dir(&config.model, &popts)?;
        let ds = data::load(&config.train_data, config.image_root.as_deref())?;
        for s in ds.skipped.iter().take(5) {
            eprintln!("warning: skipped {s}");
        }
        if ds.skipped.len() > 5 {
            eprintln!("warning: {} rows skipped in all", ds.skipped.len());
        }
        let train = data::filter_modalities(ds.items, &config.modalities);
        if train.is_empty() {
            bail!(
                "{}: no usable training rows{}",
                config.train_data.display(),
                if config.modalities.is_empty() { String::new() } else { format!(" for modalities {:?}", config.modalities) }
            );
        }
        let eval = match &config.eval_data {
            Some(p) => {
                let ds = data::load(p, config.image_root.as_deref())?;
                let mut items = data::filter_modalities(ds.items, &config.modalities);
                if config.eval_limit > 0 {
                    items.truncate(config.eval_limit);
                }
                items
            }
            None => vec![],
        };
        let gens_per_epoch = train.len().div_ceil(config.batch_prompts) as f64;
        let total_steps = if config.max_steps > 0 {
            config.max_steps
        } else {
            ((gens_per_epoch * config.epochs).ceil() as u64).max(1) * config.num_iterations
        };

        let mut policy = match &ckpt {
            Some(c) => TrainableModel::load(c, &device)?,
            None => TrainableModel::load(&config.model, &device)?,
        };
        // Tokenizer and processor files always come from the starting checkpoint.
        policy.source_dir = config.model.clone();
        if config.freeze_vision {
            policy.freeze_vision();
        }
        let sampler_model = policy.detached()?;
        let reference = if config.beta != 0.0 {
            Some(Qwen2Vl::load(&config.model, DType::F32, &device)?)
        } else {
            None
        };
        let mut optimizer = AdamW::new(AdamWConfig {
            lr: config.learning_rate,
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_epsilon,
            weight_decay: config.weight_decay,
        });
        let mut step = 0;
        if let Some(c) = &ckpt {
            let (state, moments) = checkpoint::load_trainer_state(c)?;
            if state.config_hash != config.fingerprint()? {
                bail!(
                    "{}: the run's settings changed since this checkpoint was written; resume \
                     with the run's own config.toml",
                    c.display()
                );
            }
            let moments = moments
                .into_iter()
                .map(|(k, t)| Ok((k, t.to_device(&device)?)))
                .collect::<Result<HashMap<_, _>>>()?;
            optimizer.load_state(state.step, moments)?;
            step = state.step;
        }
        let weights = if config.reward_weights.is_empty() {
            vec![1.0; config.rewards.len()]
        } else {
            config.reward_weights.clone()
        };
        let rewards = rewards_from_names(&config.rewards, &weights, config.answer_mode)?;
        let s = &processor.tokenizer.special;
        let mut stop: Vec<u32> = [s.im_end, s.endoftext, processor.tokenizer.eos_token_id]
            .into_iter()
            .flatten()
            .collect();
        stop.dedup();
        let banned = s.vision_ids().to_vec();
        Ok(Self {
            config,
            policy,
            sampler_model,
            reference,
            processor,
            train,
            eval,
            rewards,
            optimizer,
            step,
            total_steps,
            stop,
            banned,
            device,
        })
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }
    pub fn step(&self) -> u64 {
        self.step
    }

    fn prompt_for(&self, item: &VqaItem) -> Result<Prompt> {
        let images = item
            .images
            .iter()
            .map(|p| self.processor.load_image(p))
            .collect::<Result<Vec<_>>>()?;
        self.processor
            .prepare(&self.config.template.messages(item), images, true)
    }

    fn context<'a>(item: &'a VqaItem, sol: &'a str) -> RewardContext<'a> {
        RewardContext {
            solution: sol,
            num_options: Some(item.options.len()),
        }
    }

    /// Samples, scores and prepares the batch for generation number `gen`.
    fn rollout(&self, gen: u64) -> Result<Rollout> {
        let c = &self.config;
        let order = DataOrder::new(self.train.len(), c.seed);
        let items: Vec<usize> = (0..c.batch_prompts as u64)
            .map(|j| order.at(gen * c.batch_prompts as u64 + j))
            .collect();
        let prompts = items
            .iter()
            .map(|&i| self.prompt_for(&self.train[i]))
            .collect::<Result<Vec<_>>>()?;
        let sampling = SamplingParams {
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: mix(c.seed, gen),
        };
        let requests: Vec<Request> = prompts
            .iter()
            .map(|p| Request {
                prompt: p,
                sampling: sampling.clone(),
                max_new_tokens: c.max_completion_length,
                num_samples: c.num_generations,
            })
            .collect();
        let t = Instant::now();
        let engine = Engine::new(&self.sampler_model, self.stop.clone(), self.banned.clone());
        let completions = engine.generate(&requests, |_, _, _| {})?;
        let gen_seconds = t.elapsed().as_secs_f64();

        let mut texts = Vec::new();
        let mut rewards = Vec::new();
        let mut per_reward = vec![Vec::new(); self.rewards.names().len()];
        for (pi, group) in completions.iter().enumerate() {
            let item = &self.train[items[pi]];
            let sol = item.solution.to_string();
            for comp in group {
                let text = self.processor.tokenizer.decode(comp.content_tokens(), true)?;
                let (total, parts) = self.rewards.score(&text, &Self::context(item, &sol));
                rewards.push(total);
                for (k, p) in parts.into_iter().enumerate() {
                    per_reward[k].push(p);
                }
                texts.push(text);
            }
        }
        let advantages = grpo::advantages(&rewards, c.num_generations, c.scale_rewards)?;
        let mut r = Rollout {
            items,
            prompts,
            completions,
            texts,
            rewards,
            per_reward,
            advantages,
            old_logps: None,
            ref_logps: None,
            gen_seconds,
        };
        // Log-probs that stay fixed over the batch's iterations, one tensor per micro-batch.
        let (old, reference) = {
            let seqs = r.seqs();
            let prompt_refs: Vec<&Prompt> = r.prompts.iter().collect();
            let chunks: Vec<&[SeqRef]> = seqs.chunks(c.micro_batch).collect();
            let t = c.temperature as f64;
            let logps_of = |m: &Qwen2Vl| -> Result<Vec<Tensor>> {
                chunks
                    .iter()
                    .map(|ch| Ok(grpo::completion_logps(m, &prompt_refs, ch, t)?.0))
                    .collect()
            };
            let old = if c.num_iterations > 1 {
                Some(logps_of(&self.sampler_model)?)
            } else {
                None
            };
            let reference = match &self.reference {
                Some(m) => Some(logps_of(m)?),
                None => None,
            };
            (old, reference)
        };
        r.old_logps = old;
        r.ref_logps = reference;
        Ok(r)
    }

    /// One optimizer step on a rollout; returns (loss, grad norm, kl, clip ratio).
    fn optimize(&mut self, r: &Rollout) -> Result<(f64, f64, f64, f64)> {
        let c = &self.config;
        let loss_cfg = c.loss();
        let seqs = r.seqs();
        let flat = r.flat();
        let prompt_refs: Vec<&Prompt> = r.prompts.iter().collect();
        let truncated_all: Vec<bool> = flat
            .iter()
            .map(|c| c.finish == crate::generate::FinishReason::Length)
            .collect();
        let tokens_all: usize = flat
            .iter()
            .zip(&truncated_all)
            .filter(|(_, &t)| !(loss_cfg.mask_truncated_completions && t))
            .map(|(c, _)| c.tokens.len())
            .sum();
        let chunks: Vec<&[SeqRef]> = seqs.chunks(c.micro_batch).collect();
        let shape = StepShape {
            completions: seqs.len(),
            tokens: tokens_all,
            micro_batches: chunks.len(),
        };
        let mut grads = GradAccumulator::new(self.policy.params.len());
        let (mut loss_sum, mut kl_sum, mut clip_sum) = (0f64, 0f64, 0f64);
        let mut start = 0;
        for (k, ch) in chunks.iter().enumerate() {
            let n = ch.len();
            let (logp, mask) = grpo::completion_logps(&self.policy.model, &prompt_refs, ch, loss_cfg.temperature)?;
            let old = r.old_logps.as_ref().map(|v| &v[k]);
            let reference = r.ref_logps.as_ref().map(|v| &v[k]);
            let (loss, stats) = grpo::loss(
                &loss_cfg,
                &logp,
                &mask,
                &r.advantages[start..start + n],
                old,
                reference,
                &truncated_all[start..start + n],
                shape,
            )?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            kl_sum += stats.kl * n as f64;
            clip_sum += stats.clip_ratio * n as f64;
            grads.add(&self.policy.params, &loss.backward()?)?;
            start += n;
        }
        let norm = grads.clip(c.max_grad_norm)?;
        let lr = crate::train::optim::linear_lr(c.learning_rate, self.step, self.total_steps);
        self.optimizer.update(&self.policy.params, &grads, lr)?;
        self.step += 1;
        let n = seqs.len() as f64;
        Ok((loss_sum, norm, kl_sum / n, clip_sum / n))
    }

    /// Greedy decoding of the held-out items; accuracy with the strict answer rule.
    pub fn evaluate(&self) -> Result<f64> {
        if self.eval.is_empty() {
            return Ok(f64::NAN);
        }
        let engine = Engine::new(&self.sampler_model, self.stop.clone(), self.banned.clone());
        let mut correct = 0usize;
        for chunk in self.eval.chunks(8) {
            let prompts = chunk.iter().map(|it| self.prompt_for(it)).collect::<Result<Vec<_>>>()?;
            let reqs: Vec<Request> = prompts
                .iter()
                .map(|p| Request {
                    prompt: p,
                    sampling: SamplingParams::default(),
                    max_new_tokens: self.config.max_completion_length,
                    num_samples: 1,
                })
                .collect();
            let out = engine.generate(&reqs, |_, _, _| {})?;
            for (item, group) in chunk.iter().zip(&out) {
                let text = self.processor.tokenizer.decode(group[0].content_tokens(), true)?;
                if let Extraction::Letter { letter, .. } = extract_answer(&text, Some(item.options.len())) {
                    if letter == item.solution {
                        correct += 1;
                    }
                }
            }
        }
        Ok(correct as f64 / self.eval.len() as f64)
    }

    fn save(&self, name: &str) -> Result<PathBuf> {
        let state = TrainerState {
            kind: "grpo".into(),
            step: self.step,
            total_steps: self.total_steps,
            seed: self.config.seed,
            items_seen: (self.step / self.config.num_iterations) * self.config.batch_prompts as u64,
            config_hash: self.config.fingerprint()?,
        };
        checkpoint::save(
            &self.config.output_dir,
            name,
            &self.policy,
            DType::F32,
            Some((&self.optimizer, &state)),
        )
    }

    /// Runs until the planned number of steps (or `stop_after` steps, to simulate an
    /// interruption in tests). Returns the final checkpoint path.
    pub fn run(&mut self, stop_after: Option<u64>) -> Result<PathBuf> {
        let c = self.config.clone();
        std::fs::create_dir_all(&c.output_dir)
            .with_context(|| format!("{}: cannot create run directory", c.output_dir.display()))?;
        std::fs::write(c.output_dir.join("config.toml"), c.to_toml()?)
            .with_context(|| format!("{}: cannot write config.toml", c.output_dir.display()))?;
        let resumed_at = self.step;
        let mut metrics = JsonlWriter::open(&c.output_dir.join("metrics.jsonl"), Some(resumed_at))?;
        let mut samples = JsonlWriter::open(&c.output_dir.join("completions.jsonl"), Some(resumed_at))?;
        let pb = ProgressBar::new(self.total_steps);
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_prefix("grpo");
        pb.set_position(self.step);
        let mut rollout: Option<Rollout> = None;
        let mut last_ckpt = None;
        while self.step < self.total_steps {
            if stop_after.is_some_and(|s| self.step >= s) {
                pb.abandon_with_message("stopped early");
                return last_ckpt.context("stopped before any checkpoint was written");
            }
            let t = Instant::now();
            let gen = self.step / c.num_iterations;
            let fresh = self.step % c.num_iterations == 0 || rollout.is_none();
            if fresh {
                rollout = Some(self.rollout(gen)?);
            }
            let r = rollout.as_ref().context("no rollout")?;
            let (loss, grad_norm, kl, clip) = self.optimize(r)?;
            let step_time = t.elapsed().as_secs_f64();

            let flat = r.flat();
            let lens: Vec<f32> = flat.iter().map(|c| c.tokens.len() as f32).collect();
            let (rm, rs) = mean_std(&r.rewards);
            let g = c.num_generations;
            let zero_std = r
                .rewards
                .chunks(g)
                .filter(|grp| mean_std(grp).1 < 1e-6)
                .count() as f64
                / (r.rewards.len() / g) as f64;
            let mut rec = Record::new(self.step);
            rec.num("epoch", (gen * c.batch_prompts as u64) as f64 / self.train.len() as f64)
                .num("loss", loss)
                .num("reward_mean", rm)
                .num("reward_std", rs);
            for (name, vals) in self.rewards.names().iter().zip(&r.per_reward) {
                let (m, s) = mean_std(vals);
                rec.num(&format!("reward_{name}_mean"), m)
                    .num(&format!("reward_{name}_std"), s);
            }
            let truncated = flat
                .iter()
                .filter(|c| c.finish == crate::generate::FinishReason::Length)
                .count() as f64
                / flat.len() as f64;
            rec.num("frac_reward_zero_std", zero_std)
                .num("kl", kl)
                .num("clip_ratio", clip)
                .num("completion_length_mean", mean_std(&lens).0)
                .num("completion_length_max", lens.iter().copied().fold(0.0, f32::max) as f64)
                .num("clipped_ratio", truncated)
                .num(
                    "lr",
                    crate::train::optim::linear_lr(c.learning_rate, self.step - 1, self.total_steps),
                )
                .num("grad_norm", grad_norm)
                .num("step_time_s", step_time);
            if fresh {
                let toks: f64 = lens.iter().map(|&x| x as f64).sum();
                rec.num("tokens_per_s", toks / r.gen_seconds.max(1e-9));
            }
            if c.eval_steps > 0 && (self.step % c.eval_steps == 0 || self.step == self.total_steps) && !self.eval.is_empty() {
                let acc = self.evaluate()?;
                rec.num("eval_accuracy", acc);
                pb.println(format!("step {}: held-out accuracy {:.3}", self.step, acc));
            }
            if fresh {
                for (k, text) in r.texts.iter().enumerate().take(c.log_completions) {
                    let item = &self.train[r.items[k / g]];
                    samples.write(&json!({
                        "step": self.step,
                        "item": item.index,
                        "question": item.question,
                        "solution": item.solution.to_string(),
                        "completion": text,
                        "reward": r.rewards[k],
                        "rewards": self.rewards.names().iter().zip(&r.per_reward).map(|(n, v)| (n.clone(), v[k])).collect::<HashMap<_, _>>(),
                        "advantage": r.advantages[k],
                    }))?;
                }
            }
            pb.set_message(format!(
                "reward {:.3}  kl {:.4}  len {:.0}  {:.1}s/step",
                rm,
                kl,
                mean_std(&lens).0,
                step_time
            ));
            metrics.write(&rec.into_value())?;
            pb.set_position(self.step);
            if pb.is_hidden() {
                // No terminal to draw a bar on (CI, a log file): one line per step instead.
                eprintln!(
                    "step {}/{}: reward {:.3} kl {:.4} len {:.1} loss {:.4} {:.1}s",
                    self.step,
                    self.total_steps,
                    rm,
                    kl,
                    mean_std(&lens).0,
                    loss,
                    step_time
                );
            }
            let at_boundary = self.step % c.num_iterations == 0;
            if c.save_steps > 0 && self.step % c.save_steps == 0 && at_boundary && self.step < self.total_steps {
                last_ckpt = Some(self.save(&checkpoint::checkpoint_name(self.step))?);
            }
        }
        pb.finish_with_message("done");
        self.save(&checkpoint::checkpoint_name(self.step))?;
        let final_dtype = if c.final_dtype == "bf16" { DType::BF16 } else { DType::F32 };
        checkpoint::save(&c.output_dir, "final", &self.policy, final_dtype, None)
    }
}

/// Convenience for the CLI and tests: prepare and run.
pub fn train(config: GrpoConfig, start: Start, stop_after: Option<u64>) -> Result<PathBuf> {
    let mut run = GrpoRun::prepare(config, start)?;
    run.run(stop_after)
}
