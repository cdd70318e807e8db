//! The rollout engine: many sequences decoded together.
//!
//! - Each prompt's images go through the vision tower once and the prompt is prefilled once;
//!   for G samples the prompt's KV cache is then forked into G rows.
//! - Decoding steps run every live sequence of every prompt in one batch for the dense
//!   layers; attention runs per prompt group against that group's cache, so sequences of
//!   different lengths never need padding.
//! - A sequence that stops leaves its group's cache at once: no compute is spent on it.

use anyhow::{bail, Result};
use candle_core::{DType, IndexOp, Tensor};

use super::sampling::{Sampler, SamplingParams};
use crate::model::{Caching, KvCache, Pos3, Qwen2Vl};
use crate::processor::Prompt;

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop token was produced (it is the completion's last token).
    Stop,
    /// `max_new_tokens` was reached: the completion is truncated.
    Length,
}

/// One prompt to complete `num_samples` times.
#[derive(Debug, Clone)]
pub struct Request<'p> {
    pub prompt: &'p Prompt,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub num_samples: usize,
}

/// A finished completion. It knows which request (prompt) and which member of that
/// prompt's group it is, so rewards and advantages can never be paired with the wrong one.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Index of the request in the batch.
    pub request: usize,
    /// Index within the request's group of samples.
    pub sample: usize,
    /// Length of the prompt in tokens (images expanded).
    pub prompt_len: usize,
    /// Generated ids; when `finish == Stop` the last one is the stop token.
    pub tokens: Vec<u32>,
    /// Log-probability of each token under the distribution it was drawn from.
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

impl Completion {
    /// The tokens without a trailing stop token: the text a person reads.
    pub fn content_tokens(&self) -> &[u32] {
        match self.finish {
            FinishReason::Stop => &self.tokens[..self.tokens.len().saturating_sub(1)],
            FinishReason::Length => &self.tokens,
        }
    }
}

/// One live sequence.
struct Seq {
    request: usize,
    sample: usize,
    sampler: Sampler,
    /// Prompt and completion so far (the repetition penalty looks at both).
    history: Vec<u32>,
    prompt_len: usize,
    logprobs: Vec<f32>,
    max_new: usize,
}

/// One prompt's live samples and their shared-length cache.
struct Group {
    cache: KvCache,
    /// `rope_delta` of the prompt: decoding positions are cache length + delta.
    delta: i64,
    seqs: Vec<Seq>,
    /// Next-token logits of each live sequence, one row each.
    logits: Tensor,
}

/// Decodes batches of requests with one model.
pub struct Engine<'m> {
    model: &'m Qwen2Vl,
    stop: Vec<u32>,
    banned: Vec<u32>,
}

impl<'m> Engine<'m> {
    /// `stop`: tokens that end a completion (`<|im_end|>`, `<|endoftext|>`, eos).
    /// `banned`: tokens never sampled (the vision placeholders).
    pub fn new(model: &'m Qwen2Vl, stop: Vec<u32>, banned: Vec<u32>) -> Self {
        Self {
            model,
            stop,
            banned,
        }
    }

    /// Generates every request's samples; returns them grouped by request, in sample order.
    /// `on_token(request, sample, token)` is called as each token is chosen.
    pub fn generate(
        &self,
        requests: &[Request],
        mut on_token: impl FnMut(usize, usize, u32),
    ) -> Result<Vec<Vec<Completion>>> {
        let mut out: Vec<Vec<Option<Completion>>> =
            requests.iter().map(|r| vec![None; r.num_samples]).collect();
        let mut groups = Vec::with_capacity(requests.len());
        for (ri, r) in requests.iter().enumerate() {
            if r.num_samples == 0 {
                continue;
            }
            r.sampling.validate()?;
            groups.push(self.prefill(ri, r)?);
        }
        loop {
            // Choose one token for every live sequence; retire the finished ones.
            for g in groups.iter_mut() {
                let logits: Vec<Vec<f32>> = g.logits.to_dtype(DType::F32)?.to_vec2()?;
                let before = g.seqs.len();
                let mut keep = Vec::with_capacity(g.seqs.len());
                let mut kept = Vec::with_capacity(g.seqs.len());
                for (row, (mut s, l)) in g.seqs.drain(..).zip(logits).enumerate() {
                    let d = s.sampler.draw(&l, &self.banned, &s.history)?;
                    s.history.push(d.token);
                    s.logprobs.push(d.logprob);
                    on_token(s.request, s.sample, d.token);
                    let n = s.history.len() - s.prompt_len;
                    let finish = if self.stop.contains(&d.token) {
                        Some(FinishReason::Stop)
                    } else if n >= s.max_new {
                        Some(FinishReason::Length)
                    } else {
                        None
                    };
                    match finish {
                        Some(finish) => {
                            out[s.request][s.sample] = Some(Completion {
                                request: s.request,
                                sample: s.sample,
                                prompt_len: s.prompt_len,
                                tokens: s.history.split_off(s.prompt_len),
                                logprobs: s.logprobs,
                                finish,
                            });
                        }
                        None => {
                            keep.push(row as u32);
                            kept.push(s);
                        }
                    }
                }
                if kept.len() < before && !kept.is_empty() {
                    g.cache = g.cache.select_rows(&keep)?;
                }
                g.seqs = kept;
            }
            groups.retain(|g| !g.seqs.is_empty());
            if groups.is_empty() {
                break;
            }
            self.step(&mut groups)?;
        }
        let mut result = Vec::with_capacity(out.len());
        for (ri, slots) in out.into_iter().enumerate() {
            let mut v = Vec::with_capacity(slots.len());
            for (si, c) in slots.into_iter().enumerate() {
                match c {
                    Some(c) => v.push(c),
                    None => bail!("internal error: request {ri} sample {si} never finished"),
                }
            }
            result.push(v);
        }
        Ok(result)
    }

    /// Vision tower and prompt prefill once, then the cache forked to the group.
    fn prefill(&self, ri: usize, r: &Request) -> Result<Group> {
        let m = self.model;
        let prompt = r.prompt;
        let ids = &prompt.input_ids;
        if ids.is_empty() {
            bail!("request {ri}: the prompt is empty");
        }
        if r.max_new_tokens == 0 {
            bail!("request {ri}: max_new_tokens must be at least 1");
        }
        check_context(m, ids.len(), r.max_new_tokens, r.num_samples)?;
        let grids = prompt.grids();
        let img = match prompt.pixel_values(&m.device)? {
            Some(p) => Some(m.encode_images(&p, &grids)?),
            None => None,
        };
        let embeds = m.input_embeds(std::slice::from_ref(ids), img.as_ref())?;
        let (pos, delta) = m.positions(ids, &grids)?;
        let mut cache = m.text.new_cache(ids.len() + r.max_new_tokens);
        let hidden = m.text.forward_cached(&embeds, &[pos], &mut cache)?;
        let last = hidden.i((.., ids.len() - 1, ..))?; // (1, hidden)
        let logits = m.text.logits(&last)?;
        let g = r.num_samples;
        let (cache, logits) = if g > 1 {
            let rows = vec![0u32; g];
            let idx = Tensor::new(rows.as_slice(), logits.device())?;
            (cache.select_rows(&rows)?, logits.index_select(&idx, 0)?)
        } else {
            (cache, logits)
        };
        let seqs = (0..g)
            .map(|si| {
                Ok(Seq {
                    request: ri,
                    sample: si,
                    sampler: Sampler::new(r.sampling.clone(), si as u64)?,
                    history: ids.clone(),
                    prompt_len: ids.len(),
                    logprobs: Vec::new(),
                    max_new: r.max_new_tokens,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Group {
            cache,
            delta,
            seqs,
            logits,
        })
    }

    /// One decoding step for every live sequence of every group.
    fn step(&self, groups: &mut [Group]) -> Result<()> {
        let m = self.model;
        let mut ids = Vec::new();
        let mut positions: Vec<Vec<Pos3>> = Vec::new();
        let mut rows = Vec::with_capacity(groups.len());
        for g in groups.iter() {
            let at = g.cache.seq_len() as i64 + g.delta;
            for s in &g.seqs {
                ids.push(vec![*s.history.last().unwrap_or(&0)]);
                positions.push(vec![[at; 3]]);
            }
            rows.push(g.seqs.len());
        }
        let embeds = m.input_embeds(&ids, None)?;
        let mut caches: Vec<&mut KvCache> = groups.iter_mut().map(|g| &mut g.cache).collect();
        let hidden = m.text.forward(
            &embeds,
            &positions,
            Caching::Groups {
                rows: &rows,
                caches: &mut caches,
            },
        )?;
        let logits = m.text.logits(&hidden.squeeze(1)?)?; // (rows, vocab)
        let mut start = 0;
        for (g, &n) in groups.iter_mut().zip(&rows) {
            g.logits = logits.narrow(0, start, n)?;
            start += n;
        }
        Ok(())
    }
}

/// Refuses, before anything is allocated, a request the model cannot hold: a prompt or
/// prompt + new tokens beyond the model's context (`max_position_embeddings`), or a KV cache
/// larger than the memory available.
pub(crate) fn check_context(
    m: &crate::model::Qwen2Vl,
    prompt: usize,
    max_new: usize,
    samples: usize,
) -> Result<()> {
    let t = &m.config.text;
    let limit = t.max_position_embeddings;
    if prompt >= limit {
        bail!(
            "the prompt has {prompt} tokens but the model's context is {limit} tokens \
             (max_position_embeddings in config.json); shorten the prompt or use smaller images"
        );
    }
    if prompt.saturating_add(max_new) > limit {
        bail!(
            "max_new_tokens {max_new} with a {prompt}-token prompt exceeds the model's context \
             of {limit} tokens (max_position_embeddings); use at most {}",
            limit - prompt
        );
    }
    // Keys and values of every layer for every sample, in the compute dtype.
    let per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim();
    let bytes = (prompt + max_new) as u128
        * samples.max(1) as u128
        * per_token as u128
        * m.dtype.size_in_bytes() as u128;
    let (device, available) = crate::train::plan::available_memory(&m.device);
    if let Some(a) = available {
        if bytes > a as u128 {
            bail!(
                "{samples} sample(s) of {prompt} + {max_new} tokens need a {:.1} GiB KV cache but \
                 {device} is {:.1} GiB; lower max_new_tokens or the number of samples",
                bytes as f64 / (1u64 << 30) as f64,
                a as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}
