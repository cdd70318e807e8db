//! Decoding: sampling settings, the sampler, single-sequence generation with a KV cache, and
//! teacher-forced scoring of a given completion.

use anyhow::{bail, Result};
use candle_core::{DType, IndexOp, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{attention_mask, log_softmax_f32, Qwen2Vl};
use crate::processor::Prompt;

/// How the next token is chosen. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = off).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top-p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Draws tokens from logits under [`SamplingParams`], reproducibly from the seed.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Token ids that are never produced (vision placeholders: a completion holding one
    /// desynchronises images and tokens in every later forward pass).
    banned: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, banned: Vec<u32>) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            banned,
        })
    }

    /// The next token for one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let mut logits = logits.to_vec();
        for &b in &self.banned {
            if let Some(l) = logits.get_mut(b as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        if self.params.is_greedy() {
            return argmax(&logits);
        }
        let probs = filtered_probs(&logits, &self.params)?;
        let u: f64 = self.rng.random();
        let mut acc = 0.0f64;
        let mut last = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                acc += p as f64;
                last = i;
                if u < acc {
                    return Ok(i as u32);
                }
            }
        }
        // Rounding left the cumulative sum just under u: the last possible token.
        Ok(last as u32)
    }
}

/// Index of the largest logit; the first one on ties, as torch.argmax.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            bail!("the model produced NaN logits");
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    match best {
        Some((i, l)) if l > f32::NEG_INFINITY => Ok(i as u32),
        _ => bail!("no token can be sampled: every logit is masked"),
    }
}

/// softmax(logits / T) restricted to top-k then top-p (transformers' warper order),
/// renormalised.
pub fn filtered_probs(logits: &[f32], p: &SamplingParams) -> Result<Vec<f32>> {
    let t = if p.temperature > 0.0 {
        p.temperature
    } else {
        1.0
    };
    let mut scaled: Vec<f32> = logits.iter().map(|&l| l / t).collect();
    if scaled.iter().any(|l| l.is_nan()) {
        bail!("the model produced NaN logits");
    }
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]).then(a.cmp(&b)));
    if p.top_k > 0 && p.top_k < scaled.len() {
        // keep every token tied with the k-th, as transformers' `logits < kth` filter does
        let kth = scaled[order[p.top_k - 1]];
        for l in scaled.iter_mut() {
            if *l < kth {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    let probs = softmax(&scaled);
    if p.top_p < 1.0 {
        // Remove the tail whose cumulative probability (ascending) stays <= 1 - top_p,
        // always keeping the most likely token.
        let mut keep = vec![true; probs.len()];
        let mut cum = 0.0f32;
        for &i in order.iter().rev() {
            cum += probs[i];
            if cum <= 1.0 - p.top_p {
                keep[i] = false;
            }
        }
        keep[order[0]] = true;
        for (i, l) in scaled.iter_mut().enumerate() {
            if !keep[i] {
                *l = f32::NEG_INFINITY;
            }
        }
        return Ok(softmax(&scaled));
    }
    Ok(probs)
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![0.0; x.len()];
    }
    let e: Vec<f32> = x.iter().map(|&v| (v - max).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop token was produced (it is not part of the returned tokens).
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// Generates one completion for `prompt`, calling `on_token` as each token is chosen.
pub fn generate(
    model: &Qwen2Vl,
    prompt: &Prompt,
    sampler: &mut Sampler,
    max_new_tokens: usize,
    stop: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let dev = &model.device;
    let grids = prompt.grids();
    let img = match prompt.pixel_values(dev)? {
        Some(p) => Some(model.encode_images(&p, &grids)?),
        None => None,
    };
    let ids = &prompt.input_ids;
    let embeds = model.input_embeds(std::slice::from_ref(ids), img.as_ref())?;
    let (pos, delta) = model.positions(ids, &grids)?;
    let mut cache = model.text.new_cache();
    let mask = attention_mask(ids.len(), 0, None, dev)?;
    let hidden = model
        .text
        .forward(&embeds, &[pos], mask.as_ref(), Some(&mut cache))?;
    let mut last = hidden.i((.., ids.len() - 1.., ..))?;
    let mut tokens = Vec::new();
    while tokens.len() < max_new_tokens {
        let logits: Vec<f32> = model
            .text
            .logits(&last)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let tok = sampler.sample(&logits)?;
        if stop.contains(&tok) {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Stop,
            });
        }
        tokens.push(tok);
        on_token(tok)?;
        if tokens.len() == max_new_tokens {
            break;
        }
        let at = cache.seq_len() as i64 + delta;
        let e = model.input_embeds(&[vec![tok]], None)?;
        last = model
            .text
            .forward(&e, &[vec![[at; 3]]], None, Some(&mut cache))?;
    }
    Ok(Generation {
        tokens,
        finish: FinishReason::Length,
    })
}

/// Log-probability of each completion token given the prompt and the tokens before it
/// (teacher forcing), in f32.
pub fn score(model: &Qwen2Vl, prompt: &Prompt, completion: &[u32]) -> Result<Vec<f32>> {
    if completion.is_empty() {
        bail!("the completion is empty: nothing to score");
    }
    let dev = &model.device;
    let grids = prompt.grids();
    let mut ids = prompt.input_ids.clone();
    ids.extend_from_slice(completion);
    let pixels = prompt.pixel_values(dev)?;
    let logits = model.forward_logits(&ids, pixels.as_ref(), &grids)?;
    let n = prompt.input_ids.len();
    // logits at position i predict token i + 1
    let lp = log_softmax_f32(&logits.narrow(0, n - 1, completion.len())?)?;
    let idx = Tensor::new(completion, dev)?.unsqueeze(1)?;
    Ok(lp.gather(&idx, 1)?.squeeze(1)?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max_and_skips_banned() {
        let mut s = Sampler::new(SamplingParams::default(), vec![1]).unwrap();
        assert_eq!(s.sample(&[0.0, 5.0, 2.0, 2.0]).unwrap(), 2);
    }

    #[test]
    fn top_k_and_top_p_filter_like_transformers() {
        let logits = [1.0f32, 2.0, 3.0, 4.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        let probs = filtered_probs(&logits, &p).unwrap();
        let e = (1.0f32).exp();
        assert!((probs[3] - e / (1.0 + e)).abs() < 1e-6);
        assert_eq!(probs[0], 0.0);
        assert_eq!(probs[1], 0.0);
        // softmax([1,2,3,4]) = [.032, .087, .237, .644]; top_p 0.7 keeps {4, 3}
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.7,
            ..Default::default()
        };
        let probs = filtered_probs(&logits, &p).unwrap();
        assert_eq!(probs[0], 0.0);
        assert_eq!(probs[1], 0.0);
        assert!(probs[2] > 0.0 && probs[3] > 0.0);
    }

    #[test]
    fn invalid_params_are_rejected() {
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(Sampler::new(p, vec![]).is_err());
        let p = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(Sampler::new(p, vec![]).is_err());
    }
}
