//! The GRPO training loop: sample G completions per prompt with the rollout engine, score
//! them, compute group-relative advantages, and take AdamW steps on the clipped objective
//! with a KL penalty; log, checkpoint, resume, evaluate.
//!
//! Every random draw of optimizer step `s` derives from `(seed, s)` (data order from
//! `(seed, epoch)`), so a run resumed from a checkpoint replays exactly what the
//! uninterrupted run would have done.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::config::GrpoConfig;
use super::grpo::{self, SeqRef};
use super::reward::{RewardContext, RewardSet, Sample};
use super::rewards_of;
use super::step::{self, StepBatch};
use crate::data::{self, VqaItem};
use crate::generate::{Completion, Engine, FinishReason, Request, SamplingParams};
use crate::model::Qwen2Vl;
use crate::processor::{Processor, Prompt};
use crate::seed::mix;
use crate::train::logps;
use crate::train::metrics::{mean_std, Record};
use crate::train::run::{self, DataOrder, RunInputs};
use crate::train::session::{export_dtype, Session};
use crate::train::TrainableModel;

/// One generated batch: prompts, their completions, rewards and advantages, and the
/// log-probabilities that stay fixed while the batch is reused.
struct Rollout {
    /// Its generation number (a rollout serves `num_iterations` steps).
    gen: u64,
    items: Vec<usize>,
    prompts: Vec<Prompt>,
    /// Grouped by prompt, G each.
    completions: Vec<Vec<Completion>>,
    texts: Vec<String>,
    rewards: Vec<f32>,
    per_reward: Vec<Vec<f32>>,
    /// Extra metrics the rewards reported, `{reward}/{metric}`, over every generated batch.
    reward_metrics: Vec<(String, Vec<f64>)>,
    advantages: Vec<f32>,
    /// One per completion: whether it hit the length limit.
    truncated: Vec<bool>,
    /// Per completion, fixed over the batch's iterations.
    old_logps: Option<Vec<Vec<f32>>>,
    ref_logps: Option<Vec<Vec<f32>>>,
    gen_seconds: f64,
    /// Dynamic sampling: generation batches this rollout took, groups dropped.
    generation_batches: u64,
    groups_dropped: usize,
}

impl Rollout {
    /// Keeps the groups (prompts with their G completions) where `keep` is true.
    fn retain_groups(&mut self, keep: &[bool], g: usize) {
        per_seq_retain(&mut self.items, keep, 1);
        per_seq_retain(&mut self.prompts, keep, 1);
        per_seq_retain(&mut self.completions, keep, 1);
        per_seq_retain(&mut self.texts, keep, g);
        per_seq_retain(&mut self.rewards, keep, g);
        per_seq_retain(&mut self.truncated, keep, g);
        for v in &mut self.per_reward {
            per_seq_retain(v, keep, g);
        }
    }

    /// Appends another generation batch's groups.
    fn append(&mut self, mut o: Rollout) {
        self.items.append(&mut o.items);
        self.prompts.append(&mut o.prompts);
        self.completions.append(&mut o.completions);
        self.texts.append(&mut o.texts);
        self.rewards.append(&mut o.rewards);
        self.truncated.append(&mut o.truncated);
        for (mine, theirs) in self.per_reward.iter_mut().zip(o.per_reward) {
            mine.extend(theirs);
        }
        for (name, vals) in o.reward_metrics {
            match self.reward_metrics.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.extend(vals),
                None => self.reward_metrics.push((name, vals)),
            }
        }
        self.gen_seconds += o.gen_seconds;
    }

    /// Keeps the first `n` groups.
    fn truncate_groups(&mut self, n: usize, g: usize) {
        self.items.truncate(n);
        self.prompts.truncate(n);
        self.completions.truncate(n);
        self.texts.truncate(n * g);
        self.rewards.truncate(n * g);
        self.truncated.truncate(n * g);
        for v in &mut self.per_reward {
            v.truncate(n * g);
        }
    }

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
    fn batch(&self) -> StepBatch<'_> {
        StepBatch {
            seqs: self.seqs(),
            advantages: &self.advantages,
            truncated: &self.truncated,
        }
    }
    fn flat(&self) -> Vec<&Completion> {
        self.completions.iter().flatten().collect()
    }
}

/// Full fine-tuning's KL reference: the checkpoint `dir` in storage of its own, computing in
/// `dtype`. Dense, it is prepared for scoring (a bf16 one runs on the bf16 inference
/// kernels; an f32 one gives the numbers of the policy's own pass). Quantized to `quantize`,
/// it is built exactly as `score --quantize` builds an inference model
/// ([`crate::infer::inference_model`]: quantized, the dense weights freed, prepared for
/// inference), so its log-probs are that model's, bit for bit.
pub fn reference_copy(
    dir: &std::path::Path,
    dtype: candle_core::DType,
    quantize: Option<crate::kernels::quant::QuantKind>,
    device: &candle_core::Device,
) -> Result<Qwen2Vl> {
    if quantize.is_some() {
        return crate::infer::inference_model(
            dir,
            dtype,
            device,
            None,
            quantize,
            "reference_quantize",
        );
    }
    let mut r = Qwen2Vl::load(dir, dtype, device)?;
    r.prepare_for_scoring()?;
    Ok(r)
}

/// Keeps the entries of per-completion `v` whose group (`index / g`) is kept.
fn per_seq_retain<T>(v: &mut Vec<T>, keep: &[bool], g: usize) {
    let mut n = 0;
    v.retain(|_| {
        n += 1;
        keep[(n - 1) / g]
    });
}

/// DAPO's filter (verl's `filter_groups`): a group carries signal when its rewards are not
/// all equal (population standard deviation above 0, exactly, as verl tests it).
fn has_signal(group: &[f32]) -> bool {
    group.iter().any(|&r| r != group[0])
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
    session: Session,
    stop: Vec<u32>,
    banned: Vec<u32>,
}

impl GrpoRun {
    /// Loads models and data for `config` and opens (or resumes) the run directory. All
    /// validation happens before any model is loaded.
    pub fn prepare(config: GrpoConfig, resume: bool) -> Result<Self> {
        let inputs = RunInputs::prepare(&config, resume)?;
        // The held-out rows are read before the memory plan is printed, so that a setting
        // they refuse is the only thing said.
        let eval = match &config.method.eval_data {
            Some(p) => {
                let ds = run::load_rows(&config.run, p, &config.method.eval_split, "eval_split")?;
                let mut items = data::filter_modalities(ds.items, &config.run.modalities);
                if config.method.eval_limit > 0 {
                    items.truncate(config.method.eval_limit);
                }
                items
            }
            None => vec![],
        };
        run::check_memory(&config, &inputs)?;
        if let Some(w) = config.loss().sequence_level_warning() {
            eprintln!("warning: {w}");
        }
        let RunInputs {
            device,
            resume_from,
            processor,
            train,
        } = inputs;
        let gens_per_epoch = train.len().div_ceil(config.method.batch_prompts) as f64;
        let total_steps = if config.run.max_steps > 0 {
            config.run.max_steps
        } else {
            ((gens_per_epoch * config.run.epochs).ceil() as u64).max(1)
                * config.method.num_iterations
        };

        let policy = run::load_policy(&config.run, resume_from.as_deref(), &device)?;
        let sampler_model = policy.detached()?;
        let reference = if config.method.beta != 0.0 && policy.adapter.is_some() {
            // Under LoRA the reference is the frozen base itself, adapters off: no copy.
            Some(policy.model.without_adapters())
        } else if config.method.beta != 0.0 {
            // Always from the starting checkpoint (`run.model`), also when resuming: a
            // resumed run's reference is the one the uninterrupted run had, quantized or
            // not (quantizing is a pure function of the weights).
            Some(reference_copy(
                &config.run.model,
                config.run.compute_dtype()?,
                config.method.reference_quantize,
                &device,
            )?)
        } else {
            None
        };
        let session = run::open_session(&config, total_steps, resume, &device)?;
        let rewards = rewards_of(&config, &session.dir)?;
        let s = &processor.tokenizer.special;
        let stop = processor.tokenizer.stop_tokens().to_vec();
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
            session,
            stop,
            banned,
        })
    }

    /// The KL reference model (`None` with beta = 0): a copy of the starting weights
    /// (quantized with `reference_quantize`), or under LoRA the base with adapters off.
    pub fn reference(&self) -> Option<&Qwen2Vl> {
        self.reference.as_ref()
    }

    pub fn total_steps(&self) -> u64 {
        self.session.total_steps
    }

    pub fn step(&self) -> u64 {
        self.session.step
    }

    fn prompt_for(&self, item: &VqaItem) -> Result<Prompt> {
        self.config.run.template.prompt(&self.processor, item)
    }

    /// The rollout of generation number `gen`: G completions for each of B prompts, scored,
    /// with group-relative advantages and the log-probabilities that stay fixed while the
    /// batch is reused (the sampling policy's, when it is reused, and the reference model's).
    ///
    /// With dynamic sampling, groups whose rewards all agree are dropped and further
    /// batches of prompts generated until B groups remain (the surplus of the last batch
    /// dropped too, as verl does). Batch `a > 0` of generation `gen` draws its prompts from a
    /// second shuffle of the data at a position fixed by `(gen, a)`, and its samples from
    /// `(seed, gen, a)`, so a resumed run repeats them.
    fn fresh_rollout(&mut self, gen: u64) -> Result<Rollout> {
        let m = &self.config.method;
        let (b, g) = (m.batch_prompts, m.num_generations);
        let items = self.batch_items(gen, 0);
        let mut r = self.generate(gen, items, mix(self.config.run.seed, gen))?;
        self.score(&mut r)?;
        if self.config.method.dynamic_sampling {
            let max = self.config.method.max_generation_batches;
            let mut kept = self.filter_groups(&mut r);
            let mut a = 0;
            while kept < b {
                a += 1;
                if a >= max {
                    bail!(
                        "dynamic sampling: {a} generation batches gave {kept} of the {b} groups \
                         with different rewards that a step needs (max_generation_batches = \
                         {max}); the data may be too hard or too easy for the rewards, or raise \
                         max_generation_batches"
                    );
                }
                let items = self.batch_items(gen, a);
                let seed = mix(mix(self.config.run.seed, gen), a);
                let mut more = self.generate(gen, items, seed)?;
                self.score(&mut more)?;
                kept += self.filter_groups(&mut more);
                r.groups_dropped += more.groups_dropped;
                r.append(more);
            }
            r.truncate_groups(b, g);
            r.generation_batches = a + 1;
        }
        r.advantages = grpo::advantages(&r.rewards, g, self.config.method.scale_rewards)?;
        self.fixed_logps(&mut r)?;
        Ok(r)
    }

    /// The data rows of generation batch `a` of generation `gen` (see [`Self::fresh_rollout`]).
    fn batch_items(&self, gen: u64, a: u64) -> Vec<usize> {
        let c = &self.config;
        let b = c.method.batch_prompts as u64;
        if a == 0 {
            let order = DataOrder::new(self.train.len(), c.run.seed);
            (0..b).map(|j| order.at(gen * b + j)).collect()
        } else {
            let order = DataOrder::new(self.train.len(), mix(c.run.seed, 0xDA9_5A3));
            let slot = gen * c.method.max_generation_batches + a;
            (0..b).map(|j| order.at(slot * b + j)).collect()
        }
    }

    /// Drops the groups without signal; returns how many remain.
    fn filter_groups(&self, r: &mut Rollout) -> usize {
        let g = self.config.method.num_generations;
        let keep: Vec<bool> = r.rewards.chunks(g).map(has_signal).collect();
        r.groups_dropped += keep.iter().filter(|&&k| !k).count();
        r.retain_groups(&keep, g);
        r.items.len()
    }

    /// Samples G completions for each of `items` with sampling seed `seed`.
    fn generate(&self, gen: u64, items: Vec<usize>, seed: u64) -> Result<Rollout> {
        let c = &self.config;
        let prompts = items
            .iter()
            .map(|&i| self.prompt_for(&self.train[i]))
            .collect::<Result<Vec<_>>>()?;
        let sampling = SamplingParams {
            temperature: c.method.temperature,
            top_k: c.method.top_k,
            top_p: c.method.top_p,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed,
        };
        let requests: Vec<Request> = prompts
            .iter()
            .map(|p| Request {
                prompt: p,
                sampling: sampling.clone(),
                max_new_tokens: c.method.max_completion_length,
                num_samples: c.method.num_generations,
            })
            .collect();
        let t = Instant::now();
        let fast = self.policy.rollout_model()?;
        let model = fast.as_ref().unwrap_or(&self.sampler_model);
        let engine = Engine::new(model, self.stop.clone(), self.banned.clone());
        let completions = engine.generate(&requests, |_, _, _| {})?;
        drop(engine);
        drop(fast);
        let gen_seconds = t.elapsed().as_secs_f64();
        let texts = completions
            .iter()
            .flatten()
            .map(|comp| self.processor.decode_completion(comp.content_tokens()))
            .collect::<Result<Vec<_>>>()?;
        let truncated = completions
            .iter()
            .flatten()
            .map(|c| c.finish == FinishReason::Length)
            .collect();
        Ok(Rollout {
            gen,
            truncated,
            items,
            prompts,
            completions,
            texts,
            rewards: vec![],
            per_reward: vec![],
            reward_metrics: vec![],
            advantages: vec![],
            old_logps: None,
            ref_logps: None,
            gen_seconds,
            generation_batches: 1,
            groups_dropped: 0,
        })
    }

    /// The log-probabilities that stay fixed over the rollout's iterations.
    fn fixed_logps(&self, r: &mut Rollout) -> Result<()> {
        let c = &self.config;
        let t = c.method.temperature as f64;
        if c.method.num_iterations > 1 {
            r.old_logps = Some(step::fixed_logps(
                &self.sampler_model,
                &r.batch(),
                c.run.micro_batch,
                t,
            )?);
        }
        if let Some(m) = &self.reference {
            r.ref_logps = Some(step::fixed_logps(m, &r.batch(), c.run.micro_batch, t)?);
        }
        Ok(())
    }

    /// Rewards of every completion: the weighted total, each reward's own, and the metrics
    /// rewards report. A reward that fails stops the run here, before the step changes
    /// anything, so the last checkpoint is where a resumed run starts.
    fn score(&mut self, r: &mut Rollout) -> Result<()> {
        let g = self.config.method.num_generations;
        let samples: Vec<Sample> = r
            .texts
            .iter()
            .enumerate()
            .map(|(k, text)| Sample {
                prompt: &r.prompts[k / g].text,
                completion: text,
                item: &self.train[r.items[k / g]],
                group: k / g,
            })
            .collect();
        // Reported as the step the rollout's first update will be.
        let scored = self.rewards.score_step(self.session.step + 1, &samples)?;
        r.rewards = scored.totals;
        r.per_reward = scored.per_reward;
        r.reward_metrics = scored.metrics;
        Ok(())
    }

    /// One optimizer step on a rollout.
    fn optimize(&mut self, r: &Rollout) -> Result<StepOutcome> {
        let c = &self.config;
        let (mut grads, stats) = step::policy_gradients(
            &self.policy,
            &r.batch(),
            &c.loss(),
            c.run.micro_batch,
            r.old_logps.as_deref(),
            r.ref_logps.as_deref(),
            logps::TrainOptions {
                // LoRA dropout masks: a function of (seed, step) only, so resuming repeats them.
                dropout_seed: Some(mix(c.run.seed ^ 0xD80_0A7, self.session.step)),
                checkpointing: c.run.gradient_checkpointing,
                // The `entropy` metric (TRL's), always logged.
                entropy: true,
            },
        )?;
        let (norm, lr) = self.session.apply(&self.policy, &mut grads)?;
        Ok(StepOutcome {
            loss: stats.loss,
            grad_norm: norm,
            lr,
            kl: stats.kl,
            clip_ratio: stats.clip_ratio,
            entropy: stats.entropy,
        })
    }

    /// Greedy decoding of the held-out items; accuracy by the strict letter rule for
    /// multiple choice and by the reward's protocols for closed and open questions, so the
    /// held-out number measures what the reward trains for.
    pub fn evaluate(&self) -> Result<f64> {
        let scoring = crate::eval::Scoring {
            closed: self.config.method.closed_reward_protocol,
            open: vec![self.config.method.open_reward_protocol],
        };
        let fast = self.policy.rollout_model()?;
        let evaluated = crate::eval::greedy(
            fast.as_ref().unwrap_or(&self.sampler_model),
            &self.processor,
            &self.eval,
            self.config.run.template,
            &scoring,
            self.config.method.max_completion_length,
            16,
            |_, _| {},
        )?;
        for s in &evaluated.skipped {
            eprintln!("warning: skipped held-out row {}: {}", s.row, s.reason);
        }
        Ok(crate::eval::accuracy(&evaluated.results))
    }

    fn items_seen(&self) -> u64 {
        (self.session.step / self.config.method.num_iterations)
            * self.config.method.batch_prompts as u64
    }

    /// Runs until the planned number of steps (or until `stop_after` steps, which simulates
    /// an interruption for tests). Returns the exported final model's directory, or the last
    /// checkpoint when stopped early.
    pub fn run(&mut self, stop_after: Option<u64>) -> Result<PathBuf> {
        let iterations = self.config.method.num_iterations;
        let mut rollout: Option<Rollout> = None;
        let mut last_ckpt = None;
        while !self.session.done() {
            if stop_after.is_some_and(|s| self.session.step >= s) {
                self.session.abandon("stopped early");
                return last_ckpt.context("stopped before any checkpoint was written");
            }
            let t = Instant::now();
            let done = self.session.step; // optimizer updates before this one
            let fresh = done.is_multiple_of(iterations) || rollout.is_none();

            // Rollout: every `num_iterations` steps, G completions for each of B prompts.
            // Rewards: each completion scored, advantages relative to its group.
            if fresh {
                rollout = Some(self.fresh_rollout(done / iterations)?);
            }
            let r = rollout.as_ref().context("no rollout")?;

            // Optimize: one AdamW step on the clipped objective with the KL penalty.
            let out = self.optimize(r)?;

            // Log: the step's metrics, and a few completions of a fresh rollout.
            let step = self.session.step; // this step's number
            let mut rec = self.record(r, &out, fresh, t.elapsed().as_secs_f64());
            if fresh {
                self.log_samples(r)?;
            }

            // Evaluate: greedy accuracy on the held-out items.
            let eval_every = self.config.method.eval_steps;
            if eval_every > 0
                && !self.eval.is_empty()
                && (step.is_multiple_of(eval_every) || step == self.session.total_steps)
            {
                let acc = self.evaluate()?;
                rec.num("eval_accuracy", acc);
                self.session
                    .note(&format!("step {step}: held-out accuracy {acc:.3}"));
            }
            let summary = summary(&rec);
            self.session.log(rec, &summary)?;

            // Checkpoint: only where a rollout ends, so a resumed run samples afresh.
            let save_every = self.config.run.save_steps;
            if save_every > 0
                && step.is_multiple_of(save_every)
                && step.is_multiple_of(iterations)
                && !self.session.done()
            {
                last_ckpt = Some(self.session.checkpoint(&self.policy, self.items_seen())?);
            }
        }
        let dtype = export_dtype(&self.config.run.final_dtype)?;
        self.session.finish(&self.policy, self.items_seen(), dtype)
    }

    /// The metrics of the step that just ran on `r` (TRL's names where TRL has one).
    fn record(&self, r: &Rollout, out: &StepOutcome, fresh: bool, step_time: f64) -> Record {
        let c = &self.config;
        let flat = r.flat();
        let lens: Vec<f32> = flat.iter().map(|c| c.tokens.len() as f32).collect();
        let (len_mean, _) = mean_std(&lens);
        let (reward_mean, reward_std) = mean_std(&r.rewards);
        let groups: Vec<&[f32]> = r.rewards.chunks(c.method.num_generations).collect();
        let zero_std = groups.iter().filter(|g| mean_std(g).1 < 1e-6).count();
        let truncated = r.truncated.iter().filter(|&&t| t).count();
        let mut rec = Record::new(self.session.step);
        rec.num(
            "epoch",
            (r.gen * c.method.batch_prompts as u64) as f64 / self.train.len() as f64,
        )
        .num("loss", out.loss)
        .num("reward_mean", reward_mean)
        .num("reward_std", reward_std);
        for (name, vals) in self.rewards.names().iter().zip(&r.per_reward) {
            let (m, s) = mean_std(vals);
            rec.num(&format!("reward_{name}_mean"), m)
                .num(&format!("reward_{name}_std"), s);
        }
        for (name, vals) in &r.reward_metrics {
            let v: Vec<f32> = vals.iter().map(|&x| x as f32).collect();
            rec.num(&format!("{name}_mean"), mean_std(&v).0);
        }
        if c.method.dynamic_sampling {
            rec.num("generation_batches", r.generation_batches as f64)
                .num("groups_dropped", r.groups_dropped as f64);
        }
        rec.num(
            "frac_reward_zero_std",
            zero_std as f64 / groups.len() as f64,
        )
        .num("kl", out.kl)
        .num("clip_ratio", out.clip_ratio);
        if let Some(h) = out.entropy {
            rec.num("entropy", h);
        }
        rec.num("completion_length_mean", len_mean)
            .num(
                "completion_length_max",
                lens.iter().copied().fold(0.0, f32::max) as f64,
            )
            .num("clipped_ratio", truncated as f64 / flat.len() as f64)
            .num("lr", out.lr)
            .num("grad_norm", out.grad_norm)
            .num("step_time_s", step_time);
        if fresh {
            let tokens: f64 = lens.iter().map(|&x| x as f64).sum();
            rec.num("tokens_per_s", tokens / r.gen_seconds.max(1e-9));
        }
        rec
    }

    /// The first `log_completions` completions of a fresh rollout, with their rewards, into
    /// completions.jsonl.
    fn log_samples(&mut self, r: &Rollout) -> Result<()> {
        let g = self.config.method.num_generations;
        let names = self.rewards.names();
        for (k, text) in r
            .texts
            .iter()
            .enumerate()
            .take(self.config.method.log_completions)
        {
            let item = &self.train[r.items[k / g]];
            let parts: serde_json::Map<String, serde_json::Value> = names
                .iter()
                .zip(&r.per_reward)
                .map(|(n, v)| (n.clone(), json!(v[k])))
                .collect();
            self.session.log_sample(&json!({
                "step": self.session.step,
                "item": item.index,
                "id": item.id,
                "question": item.question,
                "kind": item.answer.kind(),
                "solution": RewardContext::of(item).solution(),
                "completion": text,
                "reward": r.rewards[k],
                "rewards": parts,
                "advantage": r.advantages[k],
            }))?;
        }
        Ok(())
    }
}

/// The progress bar's line for a step's record.
fn summary(rec: &Record) -> String {
    let num = |k: &str| rec.get(k).map_or("-".into(), crate::train::metrics::num);
    format!(
        "reward {}  kl {}  len {}  {}s/step",
        num("reward_mean"),
        num("kl"),
        rec.get("completion_length_mean")
            .map_or("-".into(), |l| format!("{l:.0}")),
        rec.get("step_time_s")
            .map_or("-".into(), |t| format!("{t:.1}"))
    )
}

/// What one optimizer step reports.
struct StepOutcome {
    loss: f64,
    grad_norm: f64,
    lr: f64,
    kl: f64,
    clip_ratio: f64,
    entropy: Option<f64>,
}

/// Prepares and runs (the CLI's and the tests' entry point).
pub fn train(config: GrpoConfig, resume: bool, stop_after: Option<u64>) -> Result<PathBuf> {
    let mut run = GrpoRun::prepare(config, resume)?;
    run.run(stop_after)
}
