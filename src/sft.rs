//! Supervised fine-tuning, the baseline MedVLM-R1 compares GRPO against: cross-entropy on
//! the assistant's tokens only, with the same optimizer, checkpoints, resume, progress and
//! metrics as GRPO (the shared [`crate::train::session`]).
//!
//! The target is `<think>rationale</think><answer>X</answer>` when a row has a rationale,
//! else `<answer>X</answer>`, followed by `<|im_end|>` so the model learns to stop.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::{self, PromptTemplate, VqaItem};
use crate::processor::{Processor, ProcessorOptions};
use crate::rl::trainer::DataOrder;
use crate::train::logps::{self, SeqRef};
use crate::train::metrics::Record;
use crate::train::session::{export_dtype, Session, SessionSpec};
use crate::train::{AdamWConfig, GradAccumulator, TrainableModel};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Checkpoint directory to start from. Required.
    pub model: PathBuf,
    /// Training rows (MedVLM-R1 JSON or JSON lines). Required.
    pub train_data: PathBuf,
    pub image_root: Option<PathBuf>,
    pub modalities: Vec<String>,
    pub output_dir: PathBuf,
    pub template: PromptTemplate,
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
    /// Items per optimizer step.
    pub batch_size: usize,
    /// Items per forward/backward pass (gradient accumulation splits the step).
    pub micro_batch: usize,
    pub learning_rate: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub epochs: f64,
    pub max_steps: u64,
    pub freeze_vision: bool,
    pub save_steps: u64,
    pub final_dtype: String,
    pub seed: u64,
    pub device: Option<String>,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            train_data: PathBuf::new(),
            image_root: None,
            modalities: vec![],
            output_dir: PathBuf::from("runs/sft"),
            template: PromptTemplate::Paper,
            min_pixels: None,
            max_pixels: Some(401_408),
            batch_size: 4,
            micro_batch: 4,
            learning_rate: 1e-6,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            epochs: 1.0,
            max_steps: 0,
            freeze_vision: false,
            save_steps: 50,
            final_dtype: "f32".into(),
            seed: 42,
            device: None,
        }
    }
}

/// The commented default config (`medvlm train sft --print-config`).
pub const EXAMPLE_CONFIG: &str = include_str!("sft.example.toml");

impl SftConfig {
    pub fn from_toml(text: &str, file: &str, overrides: Option<toml::Table>) -> Result<Self> {
        crate::rl::config::parse_toml(text, file, overrides)
    }

    pub fn from_file(path: &Path, overrides: Option<toml::Table>) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read config", path.display()))?;
        Self::from_toml(&text, &path.display().to_string(), overrides)
    }

    pub fn validate(&self) -> Result<()> {
        if self.model.as_os_str().is_empty() || !self.model.is_dir() {
            bail!(
                "config: model {:?}: no such checkpoint directory",
                self.model
            );
        }
        if self.train_data.as_os_str().is_empty() || !self.train_data.is_file() {
            bail!("config: train_data {:?}: no such file", self.train_data);
        }
        if self.batch_size == 0 || self.micro_batch == 0 {
            bail!("config: batch_size and micro_batch must be positive");
        }
        if self.epochs <= 0.0 && self.max_steps == 0 {
            bail!("config: set epochs > 0 or max_steps > 0");
        }
        export_dtype(&self.final_dtype)?;
        Ok(())
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    pub fn fingerprint(&self) -> Result<String> {
        let mut c = self.clone();
        c.output_dir = PathBuf::new();
        c.save_steps = 0;
        c.device = None;
        crate::rl::config::fingerprint_of(&toml::to_string(&c)?)
    }
}

/// The assistant text an item is supervised with.
pub fn target_text(item: &VqaItem) -> String {
    match &item.rationale {
        Some(r) if !r.trim().is_empty() => {
            format!(
                "<think>{}</think><answer>{}</answer>",
                r.trim(),
                item.solution
            )
        }
        _ => format!("<answer>{}</answer>", item.solution),
    }
}

/// Trains (or resumes) an SFT run; returns the exported model's directory (or, when
/// `stop_after` steps are reached first, which simulates an interruption, the last
/// checkpoint).
/// The gradient of one SFT step over `seqs` (prompts with their target tokens): the
/// token-mean negative log-likelihood over the whole step, in micro-batches of
/// `micro_batch`. Returns the accumulated gradients and the loss.
pub fn gradients(
    model: &TrainableModel,
    seqs: &[SeqRef],
    micro_batch: usize,
) -> Result<(GradAccumulator, f64)> {
    let total_tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let mut grads = GradAccumulator::new(model.params.len());
    let nll = logps::backward(model, seqs, micro_batch, 1.0, &mut grads, |mb| {
        Ok(((mb.logp * mb.mask)?.sum_all()?.neg()? / total_tokens as f64)?)
    })?;
    Ok((grads, nll))
}

pub fn train(config: SftConfig, resume: bool, stop_after: Option<u64>) -> Result<PathBuf> {
    config.validate()?;
    let device = crate::cli::parse_device(config.device.as_deref())?;
    let ckpt = Session::resume_point(&config.output_dir, resume)?;
    let processor = Processor::from_dir(
        &config.model,
        &ProcessorOptions {
            min_pixels: config.min_pixels,
            max_pixels: config.max_pixels,
            ..Default::default()
        },
    )?;
    let ds = data::load(&config.train_data, config.image_root.as_deref())?;
    for s in ds.skipped.iter().take(5) {
        eprintln!("warning: skipped {s}");
    }
    let items = data::filter_modalities(ds.items, &config.modalities);
    if items.is_empty() {
        bail!("{}: no usable training rows", config.train_data.display());
    }
    let im_end = processor
        .tokenizer
        .special
        .im_end
        .context("the tokenizer has no <|im_end|> token to end the supervised turn")?;
    let total_steps = if config.max_steps > 0 {
        config.max_steps
    } else {
        ((items.len() as f64 * config.epochs) / config.batch_size as f64).ceil() as u64
    }
    .max(1);
    let mut model = match &ckpt {
        Some(c) => TrainableModel::load(c, &device)?,
        None => TrainableModel::load(&config.model, &device)?,
    };
    model.source_dir = config.model.clone();
    if config.freeze_vision {
        model.freeze_vision();
    }
    let mut session = Session::open(
        SessionSpec {
            kind: "sft",
            dir: &config.output_dir,
            config_toml: config.to_toml()?,
            config_hash: config.fingerprint()?,
            adam: AdamWConfig {
                lr: config.learning_rate,
                beta1: config.adam_beta1,
                beta2: config.adam_beta2,
                eps: config.adam_epsilon,
                weight_decay: config.weight_decay,
            },
            max_grad_norm: config.max_grad_norm,
            total_steps,
            seed: config.seed,
            resume,
        },
        &device,
    )?;
    let order = DataOrder::new(items.len(), config.seed);
    let bs = config.batch_size as u64;
    let mut last_ckpt = None;
    while !session.done() {
        if stop_after.is_some_and(|s| session.step >= s) {
            session.abandon("stopped early");
            return last_ckpt.context("stopped before any checkpoint was written");
        }
        let t = Instant::now();
        let base = session.step * bs;
        let batch: Vec<&VqaItem> = (0..bs).map(|j| &items[order.at(base + j)]).collect();
        let mut prompts = Vec::with_capacity(batch.len());
        let mut targets = Vec::with_capacity(batch.len());
        for it in &batch {
            let images = it
                .images
                .iter()
                .map(|p| processor.load_image(p))
                .collect::<Result<Vec<_>>>()?;
            prompts.push(processor.prepare(&config.template.messages(it), images, true)?);
            let mut ids = processor.tokenizer.encode(&target_text(it))?;
            ids.push(im_end);
            targets.push(ids);
        }
        let total_tokens: usize = targets.iter().map(Vec::len).sum();
        let seqs: Vec<SeqRef> = prompts
            .iter()
            .zip(&targets)
            .enumerate()
            .map(|(i, (p, t))| SeqRef {
                prompt: p,
                prompt_index: i,
                tokens: t,
            })
            .collect();
        let (mut grads, nll_sum) = gradients(&model, &seqs, config.micro_batch)?;
        let (norm, lr) = session.apply(&model, &mut grads)?;
        let secs = t.elapsed().as_secs_f64();
        let mut rec = Record::new(session.step);
        rec.num("epoch", (base + bs) as f64 / items.len() as f64)
            .num("loss", nll_sum)
            .num("lr", lr)
            .num("grad_norm", norm)
            .num("step_time_s", secs)
            .num("tokens_per_s", total_tokens as f64 / secs.max(1e-9));
        session.log(rec, &format!("loss {nll_sum:.4}  {secs:.1}s/step"))?;
        if config.save_steps > 0 && session.step % config.save_steps == 0 && !session.done() {
            last_ckpt = Some(session.checkpoint(&model, session.step * bs)?);
        }
    }
    session.finish(
        &model,
        session.step * bs,
        export_dtype(&config.final_dtype)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_to_the_defaults() {
        let c = SftConfig::from_toml(EXAMPLE_CONFIG, "example", None).unwrap();
        let d = SftConfig {
            model: c.model.clone(),
            train_data: c.train_data.clone(),
            ..SftConfig::default()
        };
        assert_eq!(c, d);
    }
}
