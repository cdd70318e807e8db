//! The rollout engine: many sequences decoded together.
//!
//! - Each prompt's images go through the vision tower once and the prompt is prefilled once;
//!   for G samples the prompt's KV cache is then forked into G rows.
//! - Decoding steps run every live sequence of every prompt in one batch for the dense
//!   layers; attention runs per prompt group against that group's cache, so sequences of
//!   different lengths never need padding.
//! - A sequence that stops leaves its group's cache at once: no compute is spent on it.
//! - Requests may join a [`Running`] batch between steps (continuous batching, as the server
//!   does): a new prompt is prefilled in chunks, one chunk between two decoding steps, so a
//!   long prompt delays the running sequences by one chunk's time per step, not by its whole
//!   prefill. [`Engine::generate`] is the batch form: everything admitted first, then decoded.

use anyhow::{bail, Result};
use candle_core::{DType, IndexOp, Tensor};

use super::sampling::{Sampler, SamplingParams};
use crate::model::{Caching, KvCache, Mode, Pos3, Qwen2Vl};
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

/// One token chosen by [`Engine::sample`].
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub request: usize,
    pub sample: usize,
    pub token: u32,
    /// Log-probability under the distribution it was drawn from (see [`super::Draw`]).
    pub logprob: f32,
    /// Only when the request asked for them ([`Engine::admit`]): the token's log-probability
    /// under the model's raw distribution (before any sampling filter), and the `k` most
    /// likely tokens with theirs, most likely first.
    pub raw: Option<RawLogprobs>,
    /// Set when this token ended the sequence.
    pub finished: Option<Completion>,
}

/// Log-probabilities under the model's raw next-token distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct RawLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
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
    options: SeqOptions,
}

/// Per-request options of [`Engine::admit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqOptions {
    /// `Some(k)`: every token carries [`RawLogprobs`] with the top `k`.
    pub top_logprobs: Option<usize>,
    /// Keep going past stop tokens until `max_new_tokens` (fixed-length benchmarks).
    pub ignore_stop: bool,
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

/// A prompt being prefilled, chunk by chunk.
struct Prefill {
    request: usize,
    /// Input embeddings, images merged in; until the vision tower has run, what it needs.
    embeds: Embeds,
    positions: Vec<Pos3>,
    delta: i64,
    /// Tokens already in the cache.
    done: usize,
    cache: KvCache,
    /// Qwen3-VL with images: the features the first decoder layers add at the image tokens,
    /// once the vision tower has run.
    deepstack: Option<crate::model::DeepStack>,
    seqs: Vec<Seq>,
}

enum Embeds {
    /// The images still to encode.
    Pixels {
        ids: Vec<u32>,
        pixels: Tensor,
        grids: Vec<[usize; 3]>,
    },
    /// The vision tower part way: the activations after `done` blocks, and the DeepStack
    /// features of those blocks.
    Vision {
        ids: Vec<u32>,
        input: Box<crate::model::vision::VisionInput>,
        x: Tensor,
        done: usize,
        deepstack: Vec<Tensor>,
    },
    Ready(Tensor),
    /// Momentarily, while a call works on it.
    Taken,
}

/// The sequences a model is decoding together; requests join ([`Engine::admit`]) and leave
/// (when they finish, or [`Running::cancel`]) between steps.
#[derive(Default)]
pub struct Running {
    groups: Vec<Group>,
    prefills: std::collections::VecDeque<Prefill>,
}

impl Running {
    /// Sequences being decoded (prompts still in prefill not counted).
    pub fn live_sequences(&self) -> usize {
        self.groups.iter().map(|g| g.seqs.len()).sum()
    }

    /// Sequences admitted, decoding or waiting for their prompt's prefill.
    pub fn admitted_sequences(&self) -> usize {
        self.live_sequences() + self.prefills.iter().map(|p| p.seqs.len()).sum::<usize>()
    }

    /// Whether a prompt is waiting for (the rest of) its prefill.
    pub fn prefilling(&self) -> bool {
        !self.prefills.is_empty()
    }

    /// The request whose prompt [`Engine::prefill_chunk`] works on next.
    pub fn prefilling_request(&self) -> Option<usize> {
        self.prefills.front().map(|p| p.request)
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.prefills.is_empty()
    }

    /// Request ids present (decoding or in prefill).
    pub fn requests(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .groups
            .iter()
            .filter_map(|g| g.seqs.first().map(|s| s.request))
            .chain(self.prefills.iter().map(|p| p.request))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Drops every sequence of `request` (a client that went away): its cache is freed and
    /// no more compute is spent on it. Returns whether anything was dropped.
    pub fn cancel(&mut self, request: usize) -> bool {
        let before = self.admitted_sequences();
        self.prefills.retain(|p| p.request != request);
        self.groups
            .retain(|g| g.seqs.first().is_none_or(|s| s.request != request));
        self.admitted_sequences() < before
    }

    /// Ends one sample early (a stop string was found in its text) and frees its cache row.
    pub fn cancel_sample(&mut self, request: usize, sample: usize) -> Result<()> {
        for p in self.prefills.iter_mut() {
            if p.request == request {
                p.seqs.retain(|s| s.sample != sample);
            }
        }
        self.prefills.retain(|p| !p.seqs.is_empty());
        for g in self.groups.iter_mut() {
            if g.seqs.first().is_some_and(|s| s.request == request) {
                let keep: Vec<u32> = (0..g.seqs.len() as u32)
                    .filter(|&i| g.seqs[i as usize].sample != sample)
                    .collect();
                if keep.len() < g.seqs.len() && !keep.is_empty() {
                    g.cache = g.cache.select_rows(&keep)?;
                    let idx = Tensor::new(keep.as_slice(), g.logits.device())?;
                    g.logits = g.logits.index_select(&idx, 0)?;
                }
                g.seqs.retain(|s| s.sample != sample);
            }
        }
        self.groups.retain(|g| !g.seqs.is_empty());
        Ok(())
    }
}

/// Runs `f` on a thread of rayon's pool (inline when the caller is one). Decoding's
/// few-row products and attention run on `kernels::team`, but the prompt pass and the
/// remaining tensor ops split their work over rayon's pool; called from outside the pool,
/// every such op hands its work to the pool and puts the calling thread to sleep until it
/// is done, a futex wake-up and wait per op. From a pool thread the caller takes its own
/// share and the other threads steal the rest. (Measured before the team, for products.) On 2 threads of an AMD
/// EPYC Zen 4 a layer's q/k/v products at the 2B widths (q4_1, in cache) took 75-102 us
/// called from outside the pool and 36-41 us from a pool thread (29-32 us with the shared
/// activations of `QWeight::matmul_shared`); whole batch-1 decode runs vary by more than
/// that (+-12% run to run on this machine), so no end-to-end figure is claimed.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
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
        let mut run = Running::default();
        for (ri, r) in requests.iter().enumerate() {
            if r.num_samples == 0 {
                continue;
            }
            self.admit(&mut run, ri, r, SeqOptions::default())?;
            while run.prefilling() {
                self.prefill_chunk(&mut run, usize::MAX)?;
            }
        }
        loop {
            for t in self.sample(&mut run)? {
                on_token(t.request, t.sample, t.token);
                if let Some(c) = t.finished {
                    let (r, s) = (c.request, c.sample);
                    out[r][s] = Some(c);
                }
            }
            if run.is_empty() {
                break;
            }
            self.decode(&mut run)?;
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

    /// Adds a request to `run` under the id `request` (unique among those running): checks
    /// it and queues its prompt for prefill ([`Engine::prefill_chunk`]).
    pub fn admit(
        &self,
        run: &mut Running,
        request: usize,
        r: &Request,
        options: SeqOptions,
    ) -> Result<()> {
        let m = self.model;
        let prompt = r.prompt;
        let ids = &prompt.input_ids;
        if ids.is_empty() {
            bail!("request {request}: the prompt is empty");
        }
        if r.max_new_tokens == 0 {
            bail!("request {request}: max_new_tokens must be at least 1");
        }
        if r.num_samples == 0 {
            bail!("request {request}: the number of samples must be at least 1");
        }
        r.sampling.validate()?;
        check_context(m, ids.len(), r.max_new_tokens, r.num_samples)?;
        let grids = prompt.grids();
        let (positions, delta) = m.positions(ids, &grids)?;
        // The vision tower runs in the first prefill call, not here, so that with other
        // sequences decoding it is a step of its own rather than added to a prompt chunk.
        let embeds = match prompt.pixel_values(&m.device)? {
            Some(pixels) => Embeds::Pixels {
                ids: ids.clone(),
                pixels,
                grids,
            },
            None => Embeds::Ready(m.input_embeds(std::slice::from_ref(ids), None)?),
        };
        let seqs = (0..r.num_samples)
            .map(|si| {
                Ok(Seq {
                    request,
                    sample: si,
                    sampler: Sampler::new(r.sampling.clone(), si as u64)?,
                    history: ids.clone(),
                    prompt_len: ids.len(),
                    logprobs: Vec::new(),
                    max_new: r.max_new_tokens,
                    options,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        run.prefills.push_back(Prefill {
            request,
            embeds,
            positions,
            delta,
            done: 0,
            cache: m.text.new_cache(ids.len() + r.max_new_tokens),
            deepstack: None,
            seqs,
        });
        Ok(())
    }

    /// Prefills up to `max_tokens` more tokens of the oldest prompt waiting for it; when its
    /// prompt is complete, its samples join the decoding batch (the cache forked to each).
    /// A prompt with images first goes through the vision tower; with a limited
    /// `max_tokens`, a call does a share of the tower's blocks or of the prompt, not both.
    pub fn prefill_chunk(&self, run: &mut Running, max_tokens: usize) -> Result<()> {
        on_pool(|| self.prefill_chunk_here(run, max_tokens))
    }

    fn prefill_chunk_here(&self, run: &mut Running, max_tokens: usize) -> Result<()> {
        let Some(p) = run.prefills.front_mut() else {
            return Ok(());
        };
        let m = self.model;
        let limited = max_tokens != usize::MAX;
        // The vision tower, block by block: a call runs blocks over about `max_tokens` x
        // merge² patch rows (at least one block), so a large image delays running streams a
        // few blocks at a time rather than for the whole tower.
        loop {
            match std::mem::replace(&mut p.embeds, Embeds::Taken) {
                Embeds::Pixels { ids, pixels, grids } => {
                    let input = m.vision.embed(&pixels, &grids)?;
                    p.embeds = Embeds::Vision {
                        ids,
                        x: input.x.clone(),
                        input: Box::new(input),
                        done: 0,
                        deepstack: Vec::new(),
                    };
                }
                Embeds::Vision {
                    ids,
                    input,
                    mut x,
                    mut done,
                    mut deepstack,
                } => {
                    let rows = x.dim(0)?.max(1);
                    let unit = m.vision.config().spatial_merge_size.pow(2);
                    let per_call = if limited {
                        (max_tokens.saturating_mul(unit) / rows).max(1)
                    } else {
                        usize::MAX
                    };
                    let blocks = m.vision.num_blocks();
                    let end = done.saturating_add(per_call).min(blocks);
                    while done < end {
                        x = m.vision.block(done, &x, &input, Mode::Infer)?;
                        deepstack.extend(m.vision.deepstack_tap(done, &x, Mode::Infer)?);
                        done += 1;
                    }
                    if done < blocks {
                        p.embeds = Embeds::Vision {
                            ids,
                            input,
                            x,
                            done,
                            deepstack,
                        };
                        return Ok(());
                    }
                    let img = m.vision.merge(&x, &input, Mode::Infer)?;
                    let rows = std::slice::from_ref(&ids);
                    p.deepstack = m.deepstack(rows, &deepstack)?;
                    p.embeds = Embeds::Ready(m.input_embeds(rows, Some(&img))?);
                    if limited {
                        return Ok(());
                    }
                }
                ready @ Embeds::Ready(_) => {
                    p.embeds = ready;
                    break;
                }
                Embeds::Taken => bail!("internal error: a prompt's embeddings were lost"),
            }
        }
        let Embeds::Ready(all) = &p.embeds else {
            return Ok(());
        };
        let len = p.positions.len();
        let n = max_tokens.max(1).min(len - p.done);
        let embeds = if p.done == 0 && n == len {
            all.clone()
        } else {
            all.narrow(1, p.done, n)?
        };
        let pos = p.positions[p.done..p.done + n].to_vec();
        let deepstack = match &p.deepstack {
            Some(d) => d.window(p.done, n)?,
            None => None,
        };
        let hidden = m
            .text
            .forward_cached(&embeds, &[pos], &mut p.cache, deepstack.as_ref())?;
        p.done += n;
        if p.done < len {
            return Ok(());
        }
        let Some(p) = run.prefills.pop_front() else {
            return Ok(());
        };
        let last = hidden.i((.., n - 1, ..))?; // (1, hidden)
        let logits = m.text.logits(&last)?;
        let g = p.seqs.len();
        let (cache, logits) = if g > 1 {
            let rows = vec![0u32; g];
            let idx = Tensor::new(rows.as_slice(), logits.device())?;
            (p.cache.select_rows(&rows)?, logits.index_select(&idx, 0)?)
        } else {
            (p.cache, logits)
        };
        run.groups.push(Group {
            cache,
            delta: p.delta,
            seqs: p.seqs,
            logits,
        });
        Ok(())
    }

    /// Chooses one token for every decoding sequence and retires the finished ones.
    pub fn sample(&self, run: &mut Running) -> Result<Vec<Token>> {
        let mut tokens = Vec::with_capacity(run.live_sequences());
        for g in run.groups.iter_mut() {
            let logits: Vec<Vec<f32>> = g.logits.to_dtype(DType::F32)?.to_vec2()?;
            let before = g.seqs.len();
            let mut keep = Vec::with_capacity(g.seqs.len());
            let mut kept = Vec::with_capacity(g.seqs.len());
            for (row, (mut s, l)) in g.seqs.drain(..).zip(logits).enumerate() {
                let d = s.sampler.draw(&l, &self.banned, &s.history)?;
                let raw = s.options.top_logprobs.map(|k| raw_logprobs(&l, d.token, k));
                s.history.push(d.token);
                s.logprobs.push(d.logprob);
                let n = s.history.len() - s.prompt_len;
                let finish = if !s.options.ignore_stop && self.stop.contains(&d.token) {
                    Some(FinishReason::Stop)
                } else if n >= s.max_new {
                    Some(FinishReason::Length)
                } else {
                    None
                };
                let mut t = Token {
                    request: s.request,
                    sample: s.sample,
                    token: d.token,
                    logprob: d.logprob,
                    raw,
                    finished: None,
                };
                match finish {
                    Some(finish) => {
                        t.finished = Some(Completion {
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
                tokens.push(t);
            }
            if kept.len() < before && !kept.is_empty() {
                g.cache = g.cache.select_rows(&keep)?;
            }
            g.seqs = kept;
        }
        run.groups.retain(|g| !g.seqs.is_empty());
        Ok(tokens)
    }

    /// One decoding step for every live sequence of every group: each gets the logits of
    /// its next token. Call [`Engine::sample`] before the next one.
    pub fn decode(&self, run: &mut Running) -> Result<()> {
        on_pool(|| self.decode_here(run))
    }

    fn decode_here(&self, run: &mut Running) -> Result<()> {
        let groups = &mut run.groups;
        if groups.is_empty() {
            return Ok(());
        }
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
        // Generated tokens are text to the model, even a vision pad token a random model
        // may emit (transformers embeds it as a token too: no pixels come with it).
        let embeds = m.token_embeds(&ids)?;
        let mut caches: Vec<&mut KvCache> = groups.iter_mut().map(|g| &mut g.cache).collect();
        let hidden = m.text.forward(
            &embeds,
            &positions,
            Caching::Groups {
                rows: &rows,
                caches: &mut caches,
            },
            None,
            Mode::Infer,
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

/// The raw log-probability of `token` and the `k` most likely tokens (ties: lower id first).
fn raw_logprobs(logits: &[f32], token: u32, k: usize) -> RawLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k);
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let k = k.min(idx.len());
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by);
            idx.truncate(k);
        }
        idx.sort_by(by);
        top = idx
            .into_iter()
            .map(|i| (i, logits[i as usize] - lse))
            .collect();
    }
    RawLogprobs {
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |l| l - lse),
        top,
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
    let per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim;
    let bytes = (prompt + max_new) as u128
        * samples.max(1) as u128
        * per_token as u128
        * m.dtype.size_in_bytes() as u128;
    let (device, available) = crate::device::available_memory(&m.device);
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
