//! Supervised fine-tuning, the baseline MedVLM-R1 compares GRPO against: cross-entropy on
//! the assistant's tokens only, with the same optimizer, checkpoints, resume, progress and
//! metrics as GRPO (the shared [`crate::train::session`]).
//!
//! The target is `<think>rationale</think><answer>X</answer>` when a row has a rationale,
//! else `<answer>X</answer>`, followed by `<|im_end|>` so the model learns to stop.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::VqaItem;
use crate::processor::{Processor, Prompt};
use crate::train::config::{Method, RunConfig, SettingError, TrainConfig};
use crate::train::logps::{self, SeqRef};
use crate::train::metrics::Record;
use crate::train::run::{self, DataOrder, RunInputs};
use crate::train::session::export_dtype;
use crate::train::{GradAccumulator, TrainableModel};

/// An SFT run's whole configuration: the shared run settings and SFT's own.
pub type SftConfig = TrainConfig<SftMethod>;

/// SFT's own settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftMethod {
    /// Items per optimizer step.
    pub batch_size: usize,
}

impl Default for SftMethod {
    fn default() -> Self {
        Self { batch_size: 4 }
    }
}

impl Method for SftMethod {
    const NAME: &'static str = "sft";
    const HEADER: &'static str =
        "# medvlm SFT run configuration: the supervised baseline of MedVLM-R1. Every key\n\
        # can also be given as a flag (`--learning-rate 1e-5`), which wins over this file.";
    const EXAMPLE: &'static str = include_str!("sft.example.toml");

    fn validate_settings(&self, _run: &RunConfig) -> std::result::Result<(), SettingError> {
        crate::train::config::batch_count("batch_size", self.batch_size as u64)
    }

    fn objective(&self) -> crate::train::plan::Objective {
        crate::train::plan::Objective::Sft {
            items: self.batch_size,
        }
    }

    /// The longest supervised target (with `<|im_end|>`) among the items.
    fn completion_tokens(
        &self,
        processor: &crate::processor::Processor,
        items: &[VqaItem],
    ) -> Result<usize> {
        let mut longest = 1;
        for it in items {
            longest = longest.max(
                processor
                    .tokenizer
                    .encode(&target_text(processor, it))?
                    .len()
                    + 1,
            );
        }
        Ok(longest)
    }
}

/// What an item's `<answer>` block holds: the letter of a multiple-choice item (as the
/// paper's template asks), the answer text of a closed or open one.
fn answer_of(item: &VqaItem) -> String {
    item.letter()
        .map(String::from)
        .unwrap_or_else(|| item.answer.text().to_string())
}

/// The assistant text an item is supervised with: `<think>rationale</think><answer>X</answer>`
/// when it has a rationale, else `<answer>X</answer>`, less what the chat template's
/// generation prompt already wrote of the think block (a Thinking template opens it, so the
/// target starts with the rationale and closes the block: [`Processor::target_after_prompt`]).
pub fn target_text(processor: &Processor, item: &VqaItem) -> String {
    let rationale = item
        .rationale
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty());
    let answer = format!("<answer>{}</answer>", answer_of(item));
    processor.target_after_prompt(rationale, &answer)
}

/// The gradient of one SFT step over `seqs` (prompts with their target tokens): the
/// token-mean negative log-likelihood over the whole step, in micro-batches of
/// `micro_batch`, with `options`' dropout and checkpointing. Returns the accumulated
/// gradients and the loss.
pub fn gradients(
    model: &TrainableModel,
    seqs: &[SeqRef],
    micro_batch: usize,
    options: logps::TrainOptions,
) -> Result<(GradAccumulator, f64)> {
    let total_tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let mut grads = GradAccumulator::new(model.params.len());
    let nll = logps::backward(model, seqs, micro_batch, 1.0, options, &mut grads, |mb| {
        Ok(((mb.logp * mb.mask)?.sum_all()?.neg()? / total_tokens as f64)?)
    })?;
    Ok((grads, nll))
}

/// Trains (or resumes) an SFT run; returns the exported model's directory (or, when
/// `stop_after` steps are reached first, which simulates an interruption, the last
/// checkpoint).
pub fn train(config: SftConfig, resume: bool, stop_after: Option<u64>) -> Result<PathBuf> {
    let inputs = RunInputs::prepare(&config, resume)?;
    run::check_memory(&config, &inputs)?;
    let RunInputs {
        device,
        resume_from,
        processor,
        train: items,
    } = inputs;
    let im_end = processor
        .tokenizer
        .special
        .im_end
        .context("the tokenizer has no <|im_end|> token to end the supervised turn")?;
    let total_steps = if config.run.max_steps > 0 {
        config.run.max_steps
    } else {
        ((items.len() as f64 * config.run.epochs) / config.method.batch_size as f64).ceil() as u64
    }
    .max(1);
    let model = run::load_policy(&config.run, resume_from.as_deref(), &device)?;
    let mut session = run::open_session(&config, total_steps, resume, &device)?;
    let order = DataOrder::new(items.len(), config.run.seed);
    let bs = config.method.batch_size as u64;
    let mut last_ckpt = None;
    while !session.done() {
        if stop_after.is_some_and(|s| session.step >= s) {
            session.abandon("stopped early");
            return last_ckpt.context("stopped before any checkpoint was written");
        }
        let t = Instant::now();

        // Batch: the next `batch_size` items in the run's order, as prompts and targets.
        let first = session.step * bs;
        let batch: Vec<&VqaItem> = (0..bs).map(|j| &items[order.at(first + j)]).collect();
        let (prompts, targets) = supervised(&processor, &batch, config.run.template, im_end)?;
        let seqs = seq_refs(&prompts, &targets);

        // Optimize: the token-mean negative log-likelihood's gradient, one AdamW step.
        let options = logps::TrainOptions {
            dropout_seed: Some(crate::seed::mix(config.run.seed, session.step)),
            checkpointing: config.run.gradient_checkpointing,
            entropy: false,
        };
        let (mut grads, nll) = gradients(&model, &seqs, config.run.micro_batch, options)?;
        let (grad_norm, lr) = session.apply(&model, &mut grads)?;

        // Log: the step's metrics.
        let secs = t.elapsed().as_secs_f64();
        let tokens: usize = targets.iter().map(Vec::len).sum();
        let mut rec = Record::new(session.step);
        rec.num("epoch", (first + bs) as f64 / items.len() as f64)
            .num("loss", nll)
            .num("lr", lr)
            .num("grad_norm", grad_norm)
            .num("step_time_s", secs)
            .num("tokens_per_s", tokens as f64 / secs.max(1e-9));
        let summary = format!("loss {}  {secs:.1}s/step", crate::train::metrics::num(nll));
        session.log(rec, &summary)?;

        // Checkpoint.
        let save_every = config.run.save_steps;
        if save_every > 0 && session.step.is_multiple_of(save_every) && !session.done() {
            last_ckpt = Some(session.checkpoint(&model, session.step * bs)?);
        }
    }
    session.finish(
        &model,
        session.step * bs,
        export_dtype(&config.run.final_dtype)?,
    )
}

/// The prompts of `batch` (images loaded, chat template applied) and their supervised
/// targets ([`target_text`] then `<|im_end|>`).
fn supervised(
    processor: &Processor,
    batch: &[&VqaItem],
    template: crate::data::PromptTemplate,
    im_end: u32,
) -> Result<(Vec<Prompt>, Vec<Vec<u32>>)> {
    let mut prompts = Vec::with_capacity(batch.len());
    let mut targets = Vec::with_capacity(batch.len());
    for it in batch {
        prompts.push(template.prompt(processor, it)?);
        let mut ids = processor.tokenizer.encode(&target_text(processor, it))?;
        ids.push(im_end);
        targets.push(ids);
    }
    Ok((prompts, targets))
}

/// Each prompt with its target, as the training passes take them.
fn seq_refs<'a>(prompts: &'a [Prompt], targets: &'a [Vec<u32>]) -> Vec<SeqRef<'a>> {
    prompts
        .iter()
        .zip(targets)
        .enumerate()
        .map(|(i, (p, t))| SeqRef {
            prompt: p,
            prompt_index: i,
            tokens: t,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_to_the_defaults() {
        let c = SftConfig::from_toml(SftConfig::example(), "example", None).unwrap();
        let mut d = SftConfig::default();
        d.run.model = c.run.model.clone();
        d.run.train_data = c.run.train_data.clone();
        assert_eq!(c, d);
        assert_eq!(d.run.output_dir, PathBuf::from("runs/sft"));
    }
}
