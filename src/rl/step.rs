//! The compute of one GRPO optimizer step, apart from the run's bookkeeping (data order,
//! logging, checkpoints): the fixed log-probabilities of a rollout (reference model, and the
//! policy at sampling time when a rollout is reused), and the policy gradient accumulated
//! over micro-batches. The trainer and `medvlm bench train` both call these, so the
//! benchmark measures exactly what a run does.

use std::ops::Range;

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::grpo::{self, LossConfig, LossInputs, StepShape};
use crate::model::Qwen2Vl;
use crate::train::logps::{self, SeqRef};
use crate::train::{GradAccumulator, TrainableModel};

/// The completions of one step, with what the loss needs of each.
pub struct StepBatch<'a> {
    /// Every completion, usually group after group (any order gives the same step; a
    /// prompt's pass stays in memory until its last completion is through).
    pub seqs: Vec<SeqRef<'a>>,
    /// One per completion.
    pub advantages: &'a [f32],
    /// One per completion: whether it hit the length limit.
    pub truncated: &'a [bool],
}

/// Per-token log-probs of every completion under `model` (no gradient), one vector per
/// completion; `micro_batch` completions go through the model together.
pub fn fixed_logps(
    model: &Qwen2Vl,
    batch: &StepBatch,
    micro_batch: usize,
    temperature: f64,
) -> Result<Vec<Vec<f32>>> {
    logps::logps(model, &batch.seqs, micro_batch, temperature)
}

/// What the policy pass of a step reports besides its gradients.
#[derive(Debug, Clone, Default)]
pub struct PolicyStats {
    /// The step's loss (sum of the micro-batches' scaled losses).
    pub loss: f64,
    /// Mean over completions of the per-completion mean KL.
    pub kl: f64,
    /// Mean over completions of the clipped-token fraction.
    pub clip_ratio: f64,
    /// TRL's `entropy`: the mean over micro-batches of each micro-batch's mean entropy over
    /// its completion tokens (what TRL logs for a step), when entropies were computed.
    pub entropy: Option<f64>,
}

/// Forward and backward passes of the policy over the step's completions in micro-batches
/// of `micro_batch`, accumulating the gradient of the GRPO loss. `old` and `reference` are
/// per-completion fixed log-probs from [`fixed_logps`]; `options` sets LoRA dropout,
/// gradient checkpointing and whether the `entropy` metric is computed (see
/// [`logps::TrainOptions`]; the entropies are computed regardless when the loss's
/// high-entropy mask needs them).
pub fn policy_gradients(
    policy: &TrainableModel,
    batch: &StepBatch,
    loss_cfg: &LossConfig,
    micro_batch: usize,
    old: Option<&[Vec<f32>]>,
    reference: Option<&[Vec<f32>]>,
    options: logps::TrainOptions,
) -> Result<(GradAccumulator, PolicyStats)> {
    let n_all = batch.seqs.len();
    if batch.advantages.len() != n_all || batch.truncated.len() != n_all {
        bail!(
            "{n_all} completions but {} advantages and {} truncation flags",
            batch.advantages.len(),
            batch.truncated.len()
        );
    }
    for (what, v) in [("old", old), ("reference", reference)] {
        if let Some(v) = v {
            if v.len() != n_all {
                bail!("{} {what} log-prob rows for {n_all} completions", v.len());
            }
        }
    }
    let tokens: usize = batch
        .seqs
        .iter()
        .zip(batch.truncated)
        .filter(|(_, &t)| !(loss_cfg.mask_truncated_completions && t))
        .map(|(s, _)| s.tokens.len())
        .sum();
    let shape = StepShape {
        completions: n_all,
        tokens,
        micro_batches: n_all.div_ceil(micro_batch.max(1)),
    };
    let options = logps::TrainOptions {
        entropy: options.entropy || loss_cfg.top_entropy_quantile < 1.0,
        ..options
    };
    let mut grads = GradAccumulator::new(policy.params.len());
    let mut stats = PolicyStats::default();
    let mut entropies = Vec::new();
    let dev = policy.model.device.clone();
    let fixed = |v: Option<&[Vec<f32>]>, r: Range<usize>| -> Result<Option<Tensor>> {
        match v {
            Some(v) => {
                let rows: Vec<&[f32]> = v[r].iter().map(|x| x.as_slice()).collect();
                Ok(Some(logps::pad_rows(&rows, &dev)?.0))
            }
            None => Ok(None),
        }
    };
    stats.loss = logps::backward(
        policy,
        &batch.seqs,
        micro_batch,
        loss_cfg.temperature,
        options,
        &mut grads,
        |mb| {
            let r = mb.range.clone();
            let n = r.len();
            let old_t = fixed(old, r.clone())?;
            let ref_t = fixed(reference, r.clone())?;
            let inputs = LossInputs {
                logp: mb.logp,
                mask: mb.mask,
                advantages: &batch.advantages[r.clone()],
                old: old_t.as_ref(),
                reference: ref_t.as_ref(),
                truncated: &batch.truncated[r],
                entropy: mb.entropy,
            };
            let (loss, s) = grpo::loss(loss_cfg, &inputs, shape)?;
            stats.kl += s.kl * n as f64;
            stats.clip_ratio += s.clip_ratio * n as f64;
            entropies.extend(s.entropy);
            Ok(loss)
        },
    )?;
    let n = n_all.max(1) as f64;
    stats.kl /= n;
    stats.clip_ratio /= n;
    if !entropies.is_empty() {
        stats.entropy = Some(entropies.iter().sum::<f64>() / entropies.len() as f64);
    }
    Ok((grads, stats))
}
