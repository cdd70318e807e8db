//! The GRPO objective: group-relative advantages, per-token log-probabilities of
//! completions under a model, and the clipped-ratio loss with a k3 KL penalty, in the loss
//! variants of TRL (grpo, bnpo, dr_grpo, dapo).

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// How per-token losses are aggregated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over each completion's tokens, then over completions (the paper's, and the
    /// original GRPO's): short completions weigh as much as long ones.
    #[default]
    Grpo,
    /// Mean over all completion tokens of a micro-batch.
    Bnpo,
    /// Sum over tokens divided by (completions x max_completion_length): no length bias.
    DrGrpo,
    /// Mean over all completion tokens of the whole optimizer step.
    Dapo,
}

/// How rewards are scaled into advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// (r - group mean) / (group std + 1e-4), std with N-1: the paper's.
    #[default]
    Group,
    /// (r - group mean) / (std over the whole batch + 1e-4).
    Batch,
    /// r - group mean (Dr. GRPO).
    None,
}

/// The loss settings (a subset of the training config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub loss_type: LossType,
    /// Weight of the KL penalty against the reference model (0 = no reference model).
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub scale_rewards: ScaleRewards,
    /// Completions that hit the length limit contribute nothing to the loss.
    pub mask_truncated_completions: bool,
    /// Normaliser of dr_grpo.
    pub max_completion_length: usize,
    /// Sampling temperature: log-probabilities are those of logits / temperature.
    pub temperature: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            loss_type: LossType::Grpo,
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            scale_rewards: ScaleRewards::Group,
            mask_truncated_completions: false,
            max_completion_length: 512,
            temperature: 1.0,
        }
    }
}

fn mean(xs: &[f32]) -> f64 {
    xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len().max(1) as f64
}

/// Sample standard deviation (N-1), as torch's `.std()`.
fn std_unbiased(xs: &[f32]) -> f64 {
    if xs.len() < 2 {
        return f64::NAN;
    }
    let m = mean(xs);
    (xs.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
}

/// Group-relative advantages for rewards laid out group after group, `g` per group.
pub fn advantages(rewards: &[f32], g: usize, scale: ScaleRewards) -> Result<Vec<f32>> {
    if g < 2 {
        bail!("GRPO needs at least 2 completions per prompt to compare them, got {g}");
    }
    if !rewards.len().is_multiple_of(g) {
        bail!("{} rewards do not split into groups of {g}", rewards.len());
    }
    let batch_std = std_unbiased(rewards);
    let mut out = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(g) {
        let m = mean(group);
        let s = match scale {
            ScaleRewards::Group => Some(std_unbiased(group)),
            ScaleRewards::Batch => Some(batch_std),
            ScaleRewards::None => None,
        };
        for &r in group {
            let a = r as f64 - m;
            out.push(match s {
                Some(s) => (a / (s + 1e-4)) as f32,
                None => a as f32,
            });
        }
    }
    Ok(out)
}

pub use crate::train::logps::SeqRef;

/// What one micro-batch contributes, and how it is normalised within the whole step.
#[derive(Debug, Clone, Copy)]
pub struct StepShape {
    /// Completions in the whole optimizer step.
    pub completions: usize,
    /// Unmasked completion tokens in the whole optimizer step (dapo's normaliser).
    pub tokens: usize,
    /// Micro-batches in the step (bnpo and dr_grpo average over them, as TRL does).
    pub micro_batches: usize,
}

/// Statistics of a loss evaluation, for logging.
#[derive(Debug, Clone, Default)]
pub struct LossStats {
    /// Mean over completions of each completion's mean per-token KL.
    pub kl: f64,
    /// Fraction of tokens whose ratio was clipped where it mattered (low with A < 0, high
    /// with A > 0).
    pub clip_ratio: f64,
}

/// A micro-batch's inputs to the loss: `logp`/`mask` are `(n, c)` from
/// [`crate::train::logps`]; one advantage and one truncation flag per completion; `old` the
/// log-probs at sampling time (None with one iteration: the ratio is then 1 in value but
/// carries the policy gradient); `reference` the reference model's log-probs (needed when
/// beta > 0).
pub struct LossInputs<'a> {
    pub logp: &'a Tensor,
    pub mask: &'a Tensor,
    pub advantages: &'a [f32],
    pub old: Option<&'a Tensor>,
    pub reference: Option<&'a Tensor>,
    pub truncated: &'a [bool],
}

/// The GRPO loss of a micro-batch, scaled so that summing over the micro-batches of a step
/// gives the step's loss.
pub fn loss(cfg: &LossConfig, inp: &LossInputs, shape: StepShape) -> Result<(Tensor, LossStats)> {
    let (logp, mask, adv, old, reference, truncated) = (
        inp.logp,
        inp.mask,
        inp.advantages,
        inp.old,
        inp.reference,
        inp.truncated,
    );
    let dev = logp.device();
    let (n, _c) = logp.dims2()?;
    if adv.len() != n || truncated.len() != n {
        bail!(
            "{} completions but {} advantages and {} truncation flags",
            n,
            adv.len(),
            truncated.len()
        );
    }
    let mask = if cfg.mask_truncated_completions {
        let keep: Vec<f32> = truncated
            .iter()
            .map(|&t| if t { 0.0 } else { 1.0 })
            .collect();
        mask.broadcast_mul(&Tensor::from_vec(keep, (n, 1), dev)?)?
    } else {
        mask.clone()
    };
    let a = Tensor::from_vec(adv.to_vec(), (n, 1), dev)?;
    let old = match old {
        Some(o) => o.clone(),
        None => logp.detach(),
    };
    let ratio = (logp - &old)?.exp()?;
    let clipped = ratio.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)?;
    let l1 = ratio.broadcast_mul(&a)?;
    let l2 = clipped.broadcast_mul(&a)?;
    let mut per_token = l1.minimum(&l2)?.neg()?;
    let mut stats = LossStats::default();
    if cfg.beta != 0.0 {
        let Some(r) = reference else {
            bail!(
                "beta = {} needs the reference model's log-probabilities",
                cfg.beta
            );
        };
        let d = (r - logp)?;
        let kl = ((d.exp()? - &d)? - 1.0)?;
        per_token = (per_token + (&kl * cfg.beta)?)?;
        let per_seq = (kl.detach() * &mask)?
            .sum(1)?
            .broadcast_div(&mask.sum(1)?.clamp(1.0, f64::MAX)?)?;
        stats.kl = per_seq.mean_all()?.to_scalar::<f32>()? as f64;
    }
    // Clipping statistics (host side, no gradient).
    {
        let r: Vec<Vec<f32>> = ratio.detach().to_vec2()?;
        let m: Vec<Vec<f32>> = mask.to_vec2()?;
        let (mut clipped_n, mut total) = (0usize, 0usize);
        for i in 0..n {
            for (j, &rv) in r[i].iter().enumerate() {
                if m[i][j] > 0.0 {
                    total += 1;
                    let low = (rv as f64) < 1.0 - cfg.epsilon_low && adv[i] < 0.0;
                    let high = (rv as f64) > 1.0 + cfg.epsilon_high && adv[i] > 0.0;
                    if low || high {
                        clipped_n += 1;
                    }
                }
            }
        }
        stats.clip_ratio = clipped_n as f64 / total.max(1) as f64;
    }
    let masked = (per_token * &mask)?;
    let loss = match cfg.loss_type {
        LossType::Grpo => {
            let per_seq = masked
                .sum(1)?
                .broadcast_div(&mask.sum(1)?.clamp(1.0, f64::MAX)?)?;
            (per_seq.sum_all()? / shape.completions.max(1) as f64)?
        }
        LossType::Bnpo => {
            let denom = mask.sum_all()?.clamp(1.0, f64::MAX)?;
            (masked.sum_all()?.broadcast_div(&denom)? / shape.micro_batches.max(1) as f64)?
        }
        LossType::DrGrpo => {
            let denom = (n * cfg.max_completion_length * shape.micro_batches.max(1)) as f64;
            (masked.sum_all()? / denom)?
        }
        LossType::Dapo => (masked.sum_all()? / shape.tokens.max(1) as f64)?,
    };
    Ok((loss, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_by_hand() {
        // group [1, 2, 3]: mean 2, std 1 -> (-1, 0, 1) / 1.0001
        let a = advantages(&[1.0, 2.0, 3.0, 5.0, 5.0, 5.0], 3, ScaleRewards::Group).unwrap();
        assert!((a[0] + 1.0 / 1.0001).abs() < 1e-6);
        assert_eq!(a[1], 0.0);
        assert_eq!(&a[3..], &[0.0, 0.0, 0.0], "a zero-std group has no signal");
        let a = advantages(&[1.0, 3.0], 2, ScaleRewards::None).unwrap();
        assert_eq!(a, vec![-1.0, 1.0]);
        assert!(advantages(&[1.0], 1, ScaleRewards::Group).is_err());
    }
}
