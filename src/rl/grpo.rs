//! The GRPO objective: group-relative advantages, per-token log-probabilities of
//! completions under a model, and the clipped-ratio loss with a k3 KL penalty, in the loss
//! variants of TRL (grpo, bnpo, dr_grpo, dapo), with TRL's token- or sequence-level (GSPO)
//! importance ratio and its high-entropy token mask (`top_entropy_quantile`).

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

/// Where the importance ratio `π/π_old` is taken (TRL's `importance_sampling_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingLevel {
    /// One ratio per token, `exp(logp - logp_old)` (GRPO's).
    #[default]
    Token,
    /// One ratio per completion, the exponential of the mean over its tokens of `logp -
    /// logp_old`, clipped once per completion (GSPO's); the gradient flows through the mean.
    Sequence,
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
    /// Token- or sequence-level (GSPO) importance ratio.
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// ρ of "Beyond the 80/20 rule": only the tokens whose entropy is at or above the
    /// (1 - ρ) quantile of the micro-batch's completion tokens keep their policy-gradient term
    /// (1.0 = every token).
    pub top_entropy_quantile: f64,
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
            importance_sampling_level: ImportanceSamplingLevel::Token,
            top_entropy_quantile: 1.0,
        }
    }
}

impl LossConfig {
    /// TRL's warning for a sequence-level ratio under a loss that sums per-token terms.
    pub fn sequence_level_warning(&self) -> Option<String> {
        let name = match self.loss_type {
            LossType::Grpo => return None,
            LossType::Bnpo => "bnpo",
            LossType::DrGrpo => "dr_grpo",
            LossType::Dapo => "dapo",
        };
        (self.importance_sampling_level == ImportanceSamplingLevel::Sequence).then(|| {
            format!(
                "importance_sampling_level = \"sequence\" with loss_type = \"{name}\" sums \
                 per-token terms, which weights each completion by its length instead of \
                 optimizing the per-completion objective; GSPO's setup is loss_type = \"grpo\""
            )
        })
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
    /// Fraction of tokens (of completions, with the sequence-level ratio) whose ratio was
    /// clipped where it mattered (low with A < 0, high with A > 0).
    pub clip_ratio: f64,
    /// Mean entropy over the micro-batch's completion tokens (TRL's `entropy`: every token
    /// the loss mask keeps, 0 when it keeps none), when entropies were given.
    pub entropy: Option<f64>,
}

/// A micro-batch's inputs to the loss: `logp`/`mask` are `(n, c)` from
/// [`crate::train::logps`]; one advantage and one truncation flag per completion; `old` the
/// log-probs at sampling time (None with one iteration: the ratio is then 1 in value but
/// carries the policy gradient); `reference` the reference model's log-probs (needed when
/// beta > 0); `entropy` the per-token entropies (needed when `top_entropy_quantile` < 1).
pub struct LossInputs<'a> {
    pub logp: &'a Tensor,
    pub mask: &'a Tensor,
    pub advantages: &'a [f32],
    pub old: Option<&'a Tensor>,
    pub reference: Option<&'a Tensor>,
    pub truncated: &'a [bool],
    pub entropy: Option<&'a Tensor>,
}

/// `torch.quantile(x, q)` (linear interpolation) of f32 values as torch 2.15 computes it: q
/// rounded to f32, rank `q·(n-1)` in f64, the weight `rank - floor(rank)` rounded to f32 and
/// `torch.lerp` (fused multiply-adds) between the sorted neighbours (torch 2.8 rounds the
/// rank to f32 first, which can move the result by an ulp). NaN if any value is NaN (torch's
/// `quantile`, not `nanquantile`); None for no values.
pub fn quantile_linear(values: &[f32], q: f64) -> Option<f32> {
    if values.is_empty() {
        return None;
    }
    if values.iter().any(|v| v.is_nan()) {
        return Some(f32::NAN);
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f32::total_cmp);
    let rank = (q as f32) as f64 * (sorted.len() - 1) as f64;
    let below = (rank.floor() as usize).min(sorted.len() - 1);
    let above = (rank.ceil() as usize).min(sorted.len() - 1);
    let w = (rank - below as f64) as f32;
    let (a, b) = (sorted[below], sorted[above]);
    // ATen's lerp: a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w), each one fused op.
    Some(if w.abs() < 0.5 {
        w.mul_add(b - a, a)
    } else {
        (-(b - a)).mul_add(1.0 - w, b)
    })
}

/// TRL's `get_high_entropy_mask`: 1 for the tokens of `mask` whose entropy is at or above the
/// `q` quantile of the entropies of every token of `mask` (the micro-batch's population), 0
/// elsewhere; all 0 when `mask` keeps no token.
pub fn high_entropy_mask(entropy: &Tensor, mask: &Tensor, q: f64) -> Result<Tensor> {
    let h: Vec<Vec<f32>> = entropy.to_dtype(candle_core::DType::F32)?.to_vec2()?;
    let m: Vec<Vec<f32>> = mask.to_vec2()?;
    let active: Vec<f32> = h
        .iter()
        .zip(&m)
        .flat_map(|(hr, mr)| hr.iter().zip(mr).filter(|(_, &k)| k > 0.0).map(|(&x, _)| x))
        .collect();
    let threshold = quantile_linear(&active, q);
    let keep: Vec<f32> = h
        .iter()
        .zip(&m)
        .flat_map(|(hr, mr)| {
            hr.iter().zip(mr).map(move |(&x, &k)| match threshold {
                Some(t) if k > 0.0 && x >= t => 1.0,
                _ => 0.0,
            })
        })
        .collect();
    Ok(Tensor::from_vec(keep, mask.shape(), mask.device())?)
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
    let log_ratio = (logp - &old)?;
    // (n, c) per token, or (n, 1) per sequence: the masked mean log-ratio (denominator at
    // least 1), so the gradient flows through the mean.
    let log_weight = match cfg.importance_sampling_level {
        ImportanceSamplingLevel::Token => log_ratio,
        ImportanceSamplingLevel::Sequence => (log_ratio * &mask)?
            .sum_keepdim(1)?
            .broadcast_div(&mask.sum_keepdim(1)?.clamp(1.0, f64::MAX)?)?,
    };
    let ratio = log_weight.exp()?;
    let clipped = ratio.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)?;
    let l1 = ratio.broadcast_mul(&a)?;
    let l2 = clipped.broadcast_mul(&a)?;
    let mut per_token = l1.minimum(&l2)?.neg()?;
    let mut stats = LossStats::default();
    if let Some(h) = inp.entropy {
        // TRL's `entropy` metric: the token mean over the loss mask (count clamped at 1).
        let sum = (h * &mask)?.sum_all()?.to_scalar::<f32>()? as f64;
        let count = mask.sum_all()?.to_scalar::<f32>()? as f64;
        stats.entropy = Some(sum / count.max(1.0));
    }
    if cfg.top_entropy_quantile < 1.0 {
        let Some(h) = inp.entropy else {
            bail!(
                "top_entropy_quantile = {} needs the per-token entropies",
                cfg.top_entropy_quantile
            );
        };
        // The policy-gradient term of the low-entropy tokens only; the KL term stays.
        let keep = high_entropy_mask(h, &mask, 1.0 - cfg.top_entropy_quantile)?;
        per_token = per_token.broadcast_mul(&keep)?;
    }
    if cfg.beta != 0.0 {
        let Some(r) = reference else {
            bail!(
                "beta = {} needs the reference model's log-probabilities",
                cfg.beta
            );
        };
        let d = (r - logp)?;
        let kl = ((d.exp()? - &d)? - 1.0)?;
        per_token = per_token.broadcast_add(&(&kl * cfg.beta)?)?;
        let per_seq = (kl.detach() * &mask)?
            .sum(1)?
            .broadcast_div(&mask.sum(1)?.clamp(1.0, f64::MAX)?)?;
        stats.kl = per_seq.mean_all()?.to_scalar::<f32>()? as f64;
    }
    // Clipping statistics (host side, no gradient): over the tokens of the mask, or with the
    // sequence-level ratio over every completion (TRL counts fully masked ones too).
    {
        let r: Vec<Vec<f32>> = ratio.detach().to_vec2()?;
        let m: Vec<Vec<f32>> = mask.to_vec2()?;
        let per_sequence = cfg.importance_sampling_level == ImportanceSamplingLevel::Sequence;
        let (mut clipped_n, mut total) = (0usize, 0usize);
        for i in 0..n {
            for (j, &rv) in r[i].iter().enumerate() {
                if per_sequence || m[i][j] > 0.0 {
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
    let masked = per_token.broadcast_mul(&mask)?;
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

    /// torch.quantile's values (torch 2.15, f32 input), to the bit; the fixture of
    /// tests/suite/grpo_parity.rs checks a hundred random cases more.
    #[test]
    fn quantile_is_torchs() {
        let x = [0.1f32, 0.5, 0.3, 0.9, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0, 0.05];
        for (q, want) in [
            (1.0 - 0.2, 0.800000011920929f64),
            (0.33, 0.33000001311302185),
            (0.7, 0.699999988079071),
            (0.0, 0.05000000074505806),
            (1.0, 1.0),
        ] {
            assert_eq!(quantile_linear(&x, q), Some(want as f32), "q {q}");
        }
        assert_eq!(quantile_linear(&[3.25, 1.5, 2.0], 0.8), Some(2.75));
        assert_eq!(quantile_linear(&[3.25], 0.5), Some(3.25));
        assert_eq!(quantile_linear(&[], 0.5), None);
        assert!(quantile_linear(&[1.0, f32::NAN], 0.5).unwrap().is_nan());
    }

    /// TRL's mask: the population is every token of the mask, ties at the threshold are
    /// kept, padding never is, and an empty mask keeps nothing.
    #[test]
    fn high_entropy_mask_keeps_the_top_of_the_masks_tokens() {
        let dev = candle_core::Device::Cpu;
        let h = Tensor::new(&[[0.5f32, 2.0, 9.0], [1.0, 3.0, 0.0]], &dev).unwrap();
        let m = Tensor::new(&[[1f32, 1.0, 0.0], [1.0, 1.0, 1.0]], &dev).unwrap();
        // Active: 0.5 2.0 1.0 3.0 0.0 -> the 0.5 quantile is 1.0 (kept, a tie), the padded
        // 9.0 never.
        let keep: Vec<Vec<f32>> = high_entropy_mask(&h, &m, 0.5).unwrap().to_vec2().unwrap();
        assert_eq!(keep, vec![vec![0.0, 1.0, 0.0], vec![1.0, 1.0, 0.0]]);
        // q = 0.8: rank 3.2 between 2.0 and 3.0 -> 2.2: only 3.0.
        let keep: Vec<Vec<f32>> = high_entropy_mask(&h, &m, 0.8).unwrap().to_vec2().unwrap();
        assert_eq!(keep, vec![vec![0.0, 0.0, 0.0], vec![0.0, 1.0, 0.0]]);
        let none = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        let keep = high_entropy_mask(&h, &none, 0.5).unwrap();
        assert_eq!(keep.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    /// TRL warns for a sequence-level ratio under the token-summing losses only.
    #[test]
    fn sequence_level_warning_names_the_loss() {
        let mut cfg = LossConfig {
            importance_sampling_level: ImportanceSamplingLevel::Sequence,
            ..Default::default()
        };
        assert_eq!(cfg.sequence_level_warning(), None);
        cfg.loss_type = LossType::Dapo;
        let w = cfg.sequence_level_warning().unwrap();
        assert!(
            w.contains("loss_type = \"dapo\"") && w.contains("\"grpo\""),
            "{w}"
        );
        cfg.importance_sampling_level = ImportanceSamplingLevel::Token;
        assert_eq!(cfg.sequence_level_warning(), None);
    }

    /// GSPO by hand: one ratio per completion, exp of the mean log-ratio over its tokens,
    /// clipped once; the gradient is A·s/|y| on each token of an unclipped completion and 0 on
    /// a clipped one; a fully masked completion has ratio 1 and still counts in grpo's mean.
    #[test]
    fn sequence_level_ratio_by_hand() {
        let dev = candle_core::Device::Cpu;
        let logp = candle_core::Var::new(
            &[[-1.0f32, -2.0, -0.5], [-0.3, -0.7, 0.0], [-1.0, -1.0, -1.0]],
            &dev,
        )
        .unwrap();
        let mask =
            Tensor::new(&[[1f32, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], &dev).unwrap();
        // Log-ratios: row 0 mean (0.1 - 0.2 + 0.4) / 3 = 0.1; row 1 mean (0.5 + 0.3) / 2 =
        // 0.4 (ratio 1.49, above 1 + 0.2); row 2 masked.
        let old = Tensor::new(
            &[[-1.1f32, -1.8, -0.9], [-0.8, -1.0, 5.0], [0.0, 0.0, 0.0]],
            &dev,
        )
        .unwrap();
        let adv = [1.0f32, 2.0, -1.0];
        let cfg = LossConfig {
            beta: 0.0,
            importance_sampling_level: ImportanceSamplingLevel::Sequence,
            ..Default::default()
        };
        let inp = LossInputs {
            logp: logp.as_tensor(),
            mask: &mask,
            advantages: &adv,
            old: Some(&old),
            reference: None,
            truncated: &[false; 3],
            entropy: None,
        };
        let shape = StepShape {
            completions: 3,
            tokens: 5,
            micro_batches: 1,
        };
        let (loss, stats) = loss(&cfg, &inp, shape).unwrap();
        let s0 = 0.1f64.exp();
        let want = (-(s0 * 1.0) - 1.2 * 2.0 + 0.0) / 3.0;
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert!(
            (stats.clip_ratio - 1.0 / 3.0).abs() < 1e-12,
            "one completion of three"
        );
        let g: Vec<Vec<f32>> = loss
            .backward()
            .unwrap()
            .get(logp.as_tensor())
            .unwrap()
            .to_vec2()
            .unwrap();
        let g0 = -(s0 / 3.0 / 3.0) as f32;
        for (j, &x) in g[0].iter().enumerate() {
            assert!((x - g0).abs() < 1e-6, "row 0 token {j}: {x} vs {g0}");
        }
        assert!(g[1].iter().chain(&g[2]).all(|&x| x == 0.0), "{g:?}");
    }
}
