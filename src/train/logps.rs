//! Per-token log-probabilities of completions under a model (teacher forcing), and the
//! gradient of a loss on them: the forward and backward passes of GRPO (policy, reference
//! model, policy at sampling time) and of SFT.
//!
//! Work is shared wherever the maths allows:
//! - **The prompt once per step.** The completions of one prompt share it: its images go
//!   through the vision tower once and its tokens through the decoder once, keeping every
//!   layer's keys and values ([`Caching::Capture`]). Each completion then runs only its own
//!   tokens, attending to those keys ([`Caching::Packed`]). With gradients, the prompt's keys
//!   and values enter each micro-batch as leaves; their gradients are summed over the
//!   micro-batches, and one backward pass through the prompt (and the vision tower) follows
//!   the prompt's last completion. The gradient is the same as running every completion with
//!   its own copy of the prompt.
//! - **No padding.** A micro-batch's completions are packed back to back in one row.
//! - **The LM head outside autograd.** Log-probabilities and their gradient come from
//!   [`token_logps`], which never keeps more than the softmax of the micro-batch's tokens.
//! - **Embeddings outside autograd.** Token embeddings are looked up without a graph and
//!   their gradients added row by row into the embedding table's gradient, instead of
//!   autograd's table-sized zero tensor per backward pass.
//!
//! A completion's row is the prompt's last token followed by all but the completion's last
//! token; row position `j` predicts completion token `j`. The prompt pass covers the prompt
//! without its last token.

use std::collections::HashMap;
use std::ops::Range;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};

use super::optim::GradAccumulator;
use super::params::TrainableModel;
use super::token_logps;
use crate::model::{Caching, PackedSegment, Pos3, Qwen2Vl};
use crate::processor::Prompt;

/// One completion to score: which prompt it answers and its tokens.
#[derive(Debug, Clone, Copy)]
pub struct SeqRef<'a> {
    pub prompt: &'a Prompt,
    /// Index of the prompt among the distinct prompts of the batch: completions with the
    /// same index share one prompt pass.
    pub prompt_index: usize,
    pub tokens: &'a [u32],
}

/// A micro-batch's log-probabilities, as a loss sees them.
pub struct MicroBatch<'a> {
    /// Which micro-batch of the step (0-based).
    pub index: usize,
    /// Its completions' positions in the `seqs` given.
    pub range: Range<usize>,
    /// (n, c_max) per-token log-probs, 0 where `mask` is 0 (past a completion's end).
    pub logp: &'a Tensor,
    /// (n, c_max): 1 for real tokens.
    pub mask: &'a Tensor,
}

/// A prompt's pass: its keys and values per layer, and where its completions continue.
struct PromptPass {
    /// Per layer, (1, kv_heads, prompt_len - 1, head_dim): graph tensors when training.
    kv: Vec<(Tensor, Tensor)>,
    /// What the completions attend to: `kv` itself without training, else leaf copies of it
    /// (`leaves`), whose gradients are summed in `kv_grads`.
    attend: Vec<(Tensor, Tensor)>,
    leaves: Vec<(Var, Var)>,
    kv_grads: Vec<(Option<Tensor>, Option<Tensor>)>,
    /// The text-embedding leaf of the prompt pass and the ids it embeds.
    embed_leaf: Option<(Var, Vec<u32>)>,
    /// Position of the prompt's last token, and the rope offset of what follows.
    last_pos: Pos3,
    delta: i64,
    /// Completions of this prompt not yet through a micro-batch.
    remaining: usize,
}

/// One completion's row: input ids, their positions, the targets they predict.
struct Row {
    ids: Vec<u32>,
    positions: Vec<Pos3>,
}

fn check_seqs(model: &Qwen2Vl, seqs: &[SeqRef]) -> Result<()> {
    if seqs.is_empty() {
        bail!("no completions to score");
    }
    let img = model.config.image_token_id;
    for (i, s) in seqs.iter().enumerate() {
        if s.tokens.is_empty() {
            bail!("completion {i} is empty");
        }
        if s.tokens.contains(&img) {
            bail!("completion {i} contains the image placeholder token {img}");
        }
        match s.prompt.input_ids.last() {
            None => bail!("completion {i} has an empty prompt"),
            Some(&t) if t == img => bail!("the prompt of completion {i} ends inside an image"),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Runs the prompt's images and all but its last token through the model, keeping every
/// layer's keys and values. With `leaf_embeds`, the text embeddings are a leaf (their
/// gradient is scattered into the embedding table's by the caller).
fn prompt_pass(
    model: &Qwen2Vl,
    prompt: &Prompt,
    remaining: usize,
    training: bool,
) -> Result<PromptPass> {
    let ids = &prompt.input_ids;
    let grids = prompt.grids();
    let (positions, delta) = model.positions(ids, &grids)?;
    let p = ids.len() - 1;
    let last_pos = positions[p];
    let layers = model.config.text.num_hidden_layers;
    let mut kv = Vec::with_capacity(layers);
    let mut embed_leaf = None;
    if p > 0 {
        memlog("pp start");
        let img = match prompt.pixel_values(&model.device)? {
            Some(px) => Some(model.encode_images(&px, &grids)?),
            None => None,
        };
        memlog("pp vision");
        let head = vec![ids[..p].to_vec()];
        let tokens = if training {
            let t = embed_untracked(model, &head[0])?.unsqueeze(0)?;
            let leaf = Var::from_tensor(&t)?;
            embed_leaf = Some((leaf.clone(), head[0].clone()));
            leaf.as_tensor().clone()
        } else {
            model.token_embeds(&head)?
        };
        let embeds = model.merge_images(&tokens, &head, img.as_ref())?;
        memlog("pp embeds");
        model.text.forward(
            &embeds,
            &[positions[..p].to_vec()],
            Caching::Capture(&mut kv),
        )?;
    }
    let leaves = if training {
        kv.iter()
            .map(|(k, v)| {
                Ok((
                    Var::from_tensor(&k.detach())?,
                    Var::from_tensor(&v.detach())?,
                ))
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        vec![]
    };
    let kv_grads = vec![(None, None); leaves.len()];
    let attend = if training {
        leaves
            .iter()
            .map(|(k, v)| (k.as_tensor().clone(), v.as_tensor().clone()))
            .collect()
    } else {
        kv.clone()
    };
    Ok(PromptPass {
        kv,
        attend,
        leaves,
        kv_grads,
        embed_leaf,
        last_pos,
        delta,
        remaining,
    })
}

/// Token embeddings without a graph, (n, hidden).
fn embed_untracked(model: &Qwen2Vl, ids: &[u32]) -> Result<Tensor> {
    let idx = Tensor::from_vec(ids.to_vec(), ids.len(), &model.device)?;
    Ok(model.text.embed_weight().detach().index_select(&idx, 0)?)
}

fn row_of(seq: &SeqRef, pass: &PromptPass) -> Row {
    let p = seq.prompt.input_ids.len();
    let c = seq.tokens.len();
    let mut ids = Vec::with_capacity(c);
    ids.push(seq.prompt.input_ids[p - 1]);
    ids.extend_from_slice(&seq.tokens[..c - 1]);
    let mut positions = Vec::with_capacity(c);
    positions.push(pass.last_pos);
    for j in 0..c as i64 - 1 {
        let q = p as i64 + j + pass.delta;
        positions.push([q; 3]);
    }
    Row { ids, positions }
}

/// The decoder over a micro-batch's rows packed into one, each after its prompt's keys;
/// returns the final hidden states (tokens, hidden) and the embedding leaf when training.
fn rows_pass(
    model: &Qwen2Vl,
    seqs: &[SeqRef],
    passes: &HashMap<usize, PromptPass>,
    training: bool,
) -> Result<(Tensor, Option<(Var, Vec<u32>)>)> {
    let mut ids = Vec::new();
    let mut positions = Vec::new();
    for s in seqs {
        let row = row_of(s, &passes[&s.prompt_index]);
        ids.extend(row.ids);
        positions.extend(row.positions);
    }
    let segments: Vec<PackedSegment> = seqs
        .iter()
        .map(|s| {
            let attend = &passes[&s.prompt_index].attend;
            PackedSegment {
                len: s.tokens.len(),
                prefix: (!attend.is_empty()).then_some(attend.as_slice()),
            }
        })
        .collect();
    let (embeds, leaf) = if training {
        let t = embed_untracked(model, &ids)?;
        let leaf = Var::from_tensor(&t)?;
        (leaf.as_tensor().unsqueeze(0)?, Some((leaf, ids)))
    } else {
        (model.token_embeds(&[ids])?, None)
    };
    memlog("rows embeds");
    let hidden = model
        .text
        .forward(&embeds, &[positions], Caching::Packed(&segments))?;
    Ok((hidden.squeeze(0)?, leaf))
}

fn targets_of(seqs: &[SeqRef]) -> Vec<u32> {
    seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect()
}

/// Splits `seqs` into micro-batches of `size` in order.
fn micro_batches(n: usize, size: usize) -> Vec<Range<usize>> {
    let size = size.max(1);
    (0..n.div_ceil(size))
        .map(|k| k * size..((k + 1) * size).min(n))
        .collect()
}

fn count_by_prompt(seqs: &[SeqRef]) -> HashMap<usize, usize> {
    let mut m = HashMap::new();
    for s in seqs {
        *m.entry(s.prompt_index).or_insert(0) += 1;
    }
    m
}

/// Per-token log-probabilities of every completion under `model`, without gradients: the
/// reference model's and the sampling policy's. `micro_batch` completions go through the
/// decoder together (it bounds memory, not the result).
pub fn logps(
    model: &Qwen2Vl,
    seqs: &[SeqRef],
    micro_batch: usize,
    temperature: f64,
) -> Result<Vec<Vec<f32>>> {
    check_seqs(model, seqs)?;
    let mut counts = count_by_prompt(seqs);
    let mut passes: HashMap<usize, PromptPass> = HashMap::new();
    let mut out = Vec::with_capacity(seqs.len());
    for range in micro_batches(seqs.len(), micro_batch) {
        let mb = &seqs[range];
        for s in mb {
            if !passes.contains_key(&s.prompt_index) {
                let n = counts.remove(&s.prompt_index).unwrap_or(0);
                let tt = std::time::Instant::now();
                passes.insert(s.prompt_index, prompt_pass(model, s.prompt, n, false)?);
                if std::env::var_os("MEDVLM_MEMLOG").is_some() {
                    eprintln!("TIME prompt {:.3}", tt.elapsed().as_secs_f64());
                }
            }
        }
        let tt = std::time::Instant::now();
        let (hidden, _) = rows_pass(model, mb, &passes, false)?;
        let t_rows = tt.elapsed().as_secs_f64();
        let tt = std::time::Instant::now();
        let (lp, _) = token_logps::forward(
            &hidden,
            model.text.lm_head_weight(),
            &targets_of(mb),
            temperature,
            false,
        )?;
        if std::env::var_os("MEDVLM_MEMLOG").is_some() {
            eprintln!("TIME rows {t_rows:.3} lm {:.3}", tt.elapsed().as_secs_f64());
        }
        let mut k = 0;
        for s in mb {
            out.push(lp[k..k + s.tokens.len()].to_vec());
            k += s.tokens.len();
        }
        for s in mb {
            let pass = passes.get_mut(&s.prompt_index).context("prompt pass")?;
            pass.remaining -= 1;
            if pass.remaining == 0 {
                passes.remove(&s.prompt_index);
            }
        }
    }
    Ok(out)
}

/// Flat per-token values laid out as (n, c_max), zero-padded, with the mask of real tokens.
pub fn pad_rows(rows: &[&[f32]], device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
    let n = rows.len();
    let c_max = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut vals = Vec::with_capacity(n * c_max);
    let mut mask = Vec::with_capacity(n * c_max);
    for r in rows {
        vals.extend_from_slice(r);
        vals.extend(std::iter::repeat_n(0f32, c_max - r.len()));
        mask.extend(std::iter::repeat_n(1f32, r.len()));
        mask.extend(std::iter::repeat_n(0f32, c_max - r.len()));
    }
    Ok((
        Tensor::from_vec(vals, (n, c_max), device)?,
        Tensor::from_vec(mask, (n, c_max), device)?,
    ))
}

/// Forward and backward passes of `policy` over `seqs` in micro-batches of `micro_batch`,
/// adding the gradient of the loss to `grads`. `loss_of` turns a micro-batch's log-probs
/// (a leaf of the graph it builds) into its scalar share of the step's loss; its value is
/// returned summed over micro-batches.
pub fn backward(
    policy: &TrainableModel,
    seqs: &[SeqRef],
    micro_batch: usize,
    temperature: f64,
    grads: &mut GradAccumulator,
    mut loss_of: impl FnMut(&MicroBatch) -> Result<Tensor>,
) -> Result<f64> {
    let model = &policy.model;
    check_seqs(model, seqs)?;
    let dev = model.device.clone();
    let embed_w = model.text.embed_weight();
    let head_w = model.text.lm_head_weight();
    let index_of = |t: &Tensor| {
        policy
            .params
            .iter()
            .position(|p| p.var.as_tensor().id() == t.id())
    };
    let embed_i = index_of(embed_w).context("the embedding table is not a parameter")?;
    let head_i = index_of(head_w).context("the LM head is not a parameter")?;
    let trainable = |i: usize| policy.params[i].trainable;
    let embed_shape = embed_w.shape().clone();

    let mut counts = count_by_prompt(seqs);
    let mut passes: HashMap<usize, PromptPass> = HashMap::new();
    let mut loss_sum = 0f64;
    memlog("start");
    for (index, range) in micro_batches(seqs.len(), micro_batch)
        .into_iter()
        .enumerate()
    {
        let mb = &seqs[range.clone()];
        for s in mb {
            if !passes.contains_key(&s.prompt_index) {
                let n = counts.remove(&s.prompt_index).unwrap_or(0);
                passes.insert(s.prompt_index, prompt_pass(model, s.prompt, n, true)?);
            }
        }
        memlog("prompt pass");
        let (hidden, embed_leaf) = rows_pass(model, mb, &passes, true)?;
        memlog("rows fwd");

        // Log-probs outside the graph, then the loss's gradient with respect to them.
        let (lp, saved) =
            token_logps::forward(&hidden.detach(), head_w, &targets_of(mb), temperature, true)?;
        let saved = saved.context("token log-probs kept nothing for the backward pass")?;
        memlog("lm fwd");
        let mut rows = Vec::with_capacity(mb.len());
        let mut k = 0;
        for s in mb {
            rows.push(&lp[k..k + s.tokens.len()]);
            k += s.tokens.len();
        }
        let (logp, mask) = pad_rows(&rows, &dev)?;
        let logp = Var::from_tensor(&logp)?;
        let loss = loss_of(&MicroBatch {
            index,
            range: range.clone(),
            logp: logp.as_tensor(),
            mask: &mask,
        })?;
        loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let store = loss.backward()?;
        let g_pad: Vec<Vec<f32>> = match store.get(logp.as_tensor()) {
            Some(g) => g.to_dtype(DType::F32)?.to_vec2()?,
            None => vec![vec![0.0; logp.as_tensor().dim(1)?]; mb.len()],
        };
        let g: Vec<f32> = mb
            .iter()
            .zip(&g_pad)
            .flat_map(|(s, row)| row[..s.tokens.len()].iter().copied())
            .collect();
        drop(store);

        memlog("loss bwd");
        // ∂L/∂h by hand (∂L/∂W added to the LM head's gradient), then autograd from h down.
        let mut head_grad = grads.slot_mut(head_i).take();
        let dh = saved.backward(&g, head_w, &mut head_grad)?;
        memlog("lm bwd");
        if trainable(head_i) {
            *grads.slot_mut(head_i) = head_grad;
        }
        let store = (&hidden * dh.detach())?.sum_all()?.backward()?;
        memlog("rows bwd");
        grads.add(&policy.params, &store)?;
        memlog("grads add");
        if let Some((leaf, ids)) = &embed_leaf {
            if let (Some(g), true) = (store.get(leaf.as_tensor()), trainable(embed_i)) {
                grads.add_rows(embed_i, &embed_shape, ids, g)?;
            }
        }
        // Sum the prompts' key/value gradients; finish the prompts with no completions left.
        for (pi, n) in per_prompt(mb) {
            let pass = passes.get_mut(&pi).context("prompt pass")?;
            for ((k, v), (gk, gv)) in pass.leaves.iter().zip(pass.kv_grads.iter_mut()) {
                for (leaf, acc) in [(k, gk), (v, gv)] {
                    if let Some(g) = store.get(leaf.as_tensor()) {
                        *acc = Some(match acc.take() {
                            Some(a) => (a + g)?,
                            None => g.clone(),
                        });
                    }
                }
            }
            pass.remaining -= n;
        }
        drop(store);
        // In micro-batch order, not the map's: gradients must add up in the same order in
        // every process (resumed runs repeat uninterrupted ones bit for bit).
        let finished: Vec<usize> = per_prompt(mb)
            .into_iter()
            .map(|(i, _)| i)
            .filter(|i| passes.get(i).is_some_and(|p| p.remaining == 0))
            .collect();
        for pi in finished {
            let pass = passes.remove(&pi).context("prompt pass")?;
            prompt_backward(pass, policy, embed_i, &embed_shape, grads)?;
            memlog("prompt bwd");
        }
    }
    Ok(loss_sum)
}

/// The distinct prompts of a micro-batch with their completion counts, in order.
fn per_prompt(mb: &[SeqRef]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for s in mb {
        match out.iter_mut().find(|(i, _)| *i == s.prompt_index) {
            Some((_, n)) => *n += 1,
            None => out.push((s.prompt_index, 1)),
        }
    }
    out
}

/// The backward pass through a prompt (and its images), from the summed gradients of its
/// keys and values: autograd on `Σ k·∂L/∂k + v·∂L/∂v`, whose gradient with respect to
/// every weight is the chain rule's.
fn prompt_backward(
    pass: PromptPass,
    policy: &TrainableModel,
    embed_i: usize,
    embed_shape: &candle_core::Shape,
    grads: &mut GradAccumulator,
) -> Result<()> {
    let mut terms = Vec::new();
    for ((k, v), (gk, gv)) in pass.kv.iter().zip(&pass.kv_grads) {
        for (t, g) in [(k, gk), (v, gv)] {
            if let Some(g) = g {
                terms.push((t * g.detach())?.sum_all()?);
            }
        }
    }
    if terms.is_empty() {
        return Ok(());
    }
    let surrogate = Tensor::stack(&terms, 0)?.sum_all()?;
    let store = surrogate.backward()?;
    grads.add(&policy.params, &store)?;
    if let Some((leaf, ids)) = &pass.embed_leaf {
        if let (Some(g), true) = (
            store.get(leaf.as_tensor()),
            policy.params[embed_i].trainable,
        ) {
            grads.add_rows(embed_i, embed_shape, ids, &g.squeeze(0)?)?;
        }
    }
    Ok(())
}

#[doc(hidden)]
pub fn memlog(what: &str) {
    if std::env::var_os("MEDVLM_MEMLOG").is_none() {
        return;
    }
    thread_local!(static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) });
    let now = std::time::Instant::now();
    let dt = LAST
        .with(|l| l.replace(Some(now)))
        .map_or(0.0, |t| (now - t).as_secs_f64());
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    eprintln!(
        "MEM {what:30} rss {:7.0}  hwm {:7.0}  +{dt:.3}s",
        get("VmRSS:"),
        get("VmHWM:")
    );
}
