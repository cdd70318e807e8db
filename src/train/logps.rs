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
use crate::model::{Caching, DeepStack, Mode, PackedSegment, Pos3, Qwen2Vl};
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
    /// (n, c_max) per-token entropies of the softmax at the sampling temperature, in nats, 0
    /// where `mask` is 0; only when [`TrainOptions::entropy`] asked for them. No gradient.
    pub entropy: Option<&'a Tensor>,
}

/// A leaf holding looked-up embeddings, with the ids it embeds: its gradient goes into the
/// embedding table's row by row.
type EmbedLeaf = (Var, Vec<u32>);

/// How a pass keeps what its backward pass will need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Nothing: no backward pass follows (reference model, sampling policy).
    Nothing,
    /// The whole autograd graph.
    Graph,
    /// Gradient checkpointing: each layer's input only; the backward pass runs every layer
    /// again on it, one at a time.
    Inputs,
}

/// A checkpointed prompt pass: what running its layers again needs.
struct PromptTape {
    /// Inputs of every decoder layer (detached).
    inputs: Vec<Tensor>,
    cos: Tensor,
    sin: Tensor,
    /// The text embeddings and the image features the first layer's input was merged from.
    tokens: Tensor,
    head: Vec<u32>,
    vision: Option<VisionTape>,
    /// Qwen3-VL: the DeepStack the first layers added, over leaves holding the tower's
    /// (detached) DeepStack features, whose gradients the layers' replays leave.
    deepstack: Option<(DeepStack, Vec<Var>)>,
    /// The pass's mode, for running its layers again.
    mode: Mode,
}

/// A checkpointed vision tower pass.
struct VisionTape {
    pixels: Tensor,
    grids: Vec<[usize; 3]>,
    input: crate::model::vision::VisionInput,
    /// Inputs of every block, then the merger's input (detached).
    inputs: Vec<Tensor>,
    /// The tower's output (detached).
    features: Tensor,
    /// Qwen3-VL: the blocks whose outputs went to DeepStack mergers, in block order (level
    /// `k` came from `taps[k]`), and those features (detached).
    taps: Vec<usize>,
    deepstack: Vec<Tensor>,
}

/// A prompt's pass: its keys and values per layer, and where its completions continue.
struct PromptPass {
    /// Per layer, (1, kv_heads, prompt_len - 1, head_dim): graph tensors when the whole
    /// graph is kept.
    kv: Vec<(Tensor, Tensor)>,
    /// What the completions attend to: `kv` itself without training, else leaf copies of it
    /// (`leaves`), whose gradients are summed in `kv_grads`.
    attend: Vec<(Tensor, Tensor)>,
    leaves: Vec<(Var, Var)>,
    kv_grads: Vec<(Option<Tensor>, Option<Tensor>)>,
    /// With the whole graph kept, the leaf holding the prompt's text embeddings and the ids
    /// it embeds.
    embed_leaf: Option<EmbedLeaf>,
    /// When checkpointed, the layer inputs.
    tape: Option<PromptTape>,
    /// Position of the prompt's last token, and the rope offset of what follows it.
    last_pos: Pos3,
    delta: i64,
    /// Completions of this prompt not yet through a micro-batch.
    remaining: usize,
}

impl PromptPass {
    /// Runs the prompt's images and all but its last token through the model, keeping every
    /// layer's keys and values; when training, the text embeddings and the keys and values
    /// handed to the completions are leaves whose gradients are collected.
    fn run(
        model: &Qwen2Vl,
        prompt: &Prompt,
        remaining: usize,
        keep: Keep,
        mode: Mode,
    ) -> Result<Self> {
        let ids = &prompt.input_ids;
        let grids = prompt.grids();
        let (positions, delta) = model.positions(ids, &grids)?;
        let p = ids.len() - 1;
        let mut kv = Vec::with_capacity(model.config.text.num_hidden_layers);
        let mut embed_leaf = None;
        let mut tape = None;
        if p > 0 {
            let head = vec![ids[..p].to_vec()];
            let px = prompt.pixel_values(&model.device)?;
            match keep {
                Keep::Nothing | Keep::Graph => {
                    let img = match &px {
                        Some(px) => Some(model.encode_images(px, &grids, mode)?),
                        None => None,
                    };
                    let tokens = if keep == Keep::Graph {
                        let leaf = Var::from_tensor(
                            &embed_untracked(model, &head[0])?
                                .to_dtype(model.dtype)?
                                .unsqueeze(0)?,
                        )?;
                        let t = leaf.as_tensor().clone();
                        embed_leaf = Some((leaf, head[0].clone()));
                        t
                    } else {
                        model.token_embeds(&head)?
                    };
                    let embeds =
                        model.merge_images(&tokens, &head, img.as_ref().map(|f| &f.tokens))?;
                    let deepstack = match &img {
                        Some(f) => model.deepstack(&head, &f.deepstack)?,
                        None => None,
                    };
                    model.text.forward(
                        &embeds,
                        &[positions[..p].to_vec()],
                        Caching::Capture(&mut kv),
                        deepstack.as_ref(),
                        mode,
                    )?;
                }
                Keep::Inputs => {
                    let vision = match px {
                        Some(px) => Some(vision_forward_kept(model, px, &grids, mode)?),
                        None => None,
                    };
                    let tokens = embed_untracked(model, &head[0])?
                        .to_dtype(model.dtype)?
                        .unsqueeze(0)?;
                    let x0 =
                        model.merge_images(&tokens, &head, vision.as_ref().map(|v| &v.features))?;
                    let deepstack = match &vision {
                        Some(v) if !v.deepstack.is_empty() => {
                            let leaves = v
                                .deepstack
                                .iter()
                                .map(Var::from_tensor)
                                .collect::<candle_core::Result<Vec<_>>>()?;
                            let levels: Vec<Tensor> =
                                leaves.iter().map(|l| l.as_tensor().clone()).collect();
                            model.deepstack(&head, &levels)?.map(|d| (d, leaves))
                        }
                        _ => None,
                    };
                    let (cos, sin) = model.text.rope_tables(
                        &[positions[..p].to_vec()],
                        x0.dtype(),
                        x0.device(),
                    )?;
                    let mut inputs = Vec::with_capacity(model.text.num_layers());
                    let mut x = x0;
                    for i in 0..model.text.num_layers() {
                        inputs.push(x.clone());
                        let mut layer_kv = Vec::with_capacity(1);
                        let y = model.text.layer(
                            i,
                            &x,
                            &cos,
                            &sin,
                            &mut Caching::Capture(&mut layer_kv),
                            mode,
                        )?;
                        let (k, v) = layer_kv.pop().context("the layer kept no keys")?;
                        kv.push((k.detach(), v.detach()));
                        let y = match &deepstack {
                            Some((d, _)) => d.add_after(i, &y)?,
                            None => y,
                        };
                        x = y.detach();
                    }
                    tape = Some(PromptTape {
                        inputs,
                        cos,
                        sin,
                        tokens,
                        head: head[0].clone(),
                        vision,
                        deepstack,
                        mode,
                    });
                }
            }
        }
        let leaves = if keep == Keep::Nothing {
            vec![]
        } else {
            kv.iter()
                .map(|(k, v)| {
                    Ok((
                        Var::from_tensor(&k.detach())?,
                        Var::from_tensor(&v.detach())?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?
        };
        let attend = if keep == Keep::Nothing {
            kv.clone()
        } else {
            leaves
                .iter()
                .map(|(k, v)| (k.as_tensor().clone(), v.as_tensor().clone()))
                .collect()
        };
        Ok(Self {
            kv_grads: vec![(None, None); leaves.len()],
            kv: if keep == Keep::Graph { kv } else { vec![] },
            attend,
            leaves,
            embed_leaf,
            tape,
            last_pos: positions[p],
            delta,
            remaining,
        })
    }

    /// Adds the gradients a backward pass left on this prompt's key/value leaves.
    fn collect(&mut self, store: &candle_core::backprop::GradStore) -> Result<()> {
        for ((k, v), (gk, gv)) in self.leaves.iter().zip(self.kv_grads.iter_mut()) {
            for (leaf, acc) in [(k, gk), (v, gv)] {
                if let Some(g) = store.get(leaf.as_tensor()) {
                    *acc = Some(match acc.take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The backward pass through the prompt (and its images), from the summed gradients of
    /// its keys and values: autograd on `Σ k·∂L/∂k + v·∂L/∂v`, whose gradient with respect
    /// to every weight is the chain rule's (layer by layer when checkpointed).
    fn backward(
        self,
        policy: &TrainableModel,
        params: &HeadParams,
        grads: &mut GradAccumulator,
    ) -> Result<()> {
        if let Some(tape) = self.tape {
            return prompt_backward_kept(tape, &self.kv_grads, policy, params, grads);
        }
        let mut terms = Vec::new();
        for ((k, v), (gk, gv)) in self.kv.iter().zip(&self.kv_grads) {
            for (t, g) in [(k, gk), (v, gv)] {
                if let Some(g) = g {
                    terms.push((t * g.detach())?.sum_all()?);
                }
            }
        }
        if terms.is_empty() {
            return Ok(());
        }
        let store = Tensor::stack(&terms, 0)?.sum_all()?.backward()?;
        grads.add(&policy.params, &store)?;
        if let Some((leaf, ids)) = &self.embed_leaf {
            if let Some(g) = store.get(leaf.as_tensor()) {
                params.add_embedding_rows(grads, ids, &g.squeeze(0)?.to_dtype(DType::F32)?)?;
            }
        }
        Ok(())
    }
}

/// The vision tower block by block, keeping each block's input (and Qwen3-VL's DeepStack
/// features).
fn vision_forward_kept(
    model: &Qwen2Vl,
    pixels: Tensor,
    grids: &[[usize; 3]],
    mode: Mode,
) -> Result<VisionTape> {
    let v = &model.vision;
    let input = v.embed(&pixels, grids)?;
    let input = crate::model::vision::VisionInput {
        x: input.x.detach(),
        ..input
    };
    let mut inputs = Vec::with_capacity(v.num_blocks() + 1);
    let (mut taps, mut deepstack) = (Vec::new(), Vec::new());
    let mut x = input.x.clone();
    for b in 0..v.num_blocks() {
        inputs.push(x.clone());
        x = v.block(b, &x, &input, mode)?.detach();
        if let Some(f) = v.deepstack_tap(b, &x, mode)? {
            taps.push(b);
            deepstack.push(f.detach());
        }
    }
    inputs.push(x.clone());
    let features = v.merge(&x, &input, mode)?.detach();
    Ok(VisionTape {
        pixels,
        grids: grids.to_vec(),
        input,
        inputs,
        features,
        taps,
        deepstack,
    })
}

/// One checkpointed step back: runs `f` on a leaf copy of `input`, backpropagates
/// `Σ f(x)·g` (plus `extra` terms of the same graph), adds the weight gradients and returns
/// the store (for the input's and other leaves' gradients).
fn replay(
    input: &Tensor,
    policy: &TrainableModel,
    grads: &mut GradAccumulator,
    f: impl FnOnce(&Tensor) -> Result<Vec<(Tensor, Tensor)>>,
) -> Result<(Var, candle_core::backprop::GradStore)> {
    let leaf = Var::from_tensor(input)?;
    let pairs = f(leaf.as_tensor())?;
    let mut terms = Vec::with_capacity(pairs.len());
    for (y, g) in &pairs {
        terms.push((y * g.detach())?.sum_all()?);
    }
    let store = Tensor::stack(&terms, 0)?.sum_all()?.backward()?;
    grads.add(&policy.params, &store)?;
    Ok((leaf, store))
}

/// The checkpointed prompt's backward pass: decoder layers from the top (each run again
/// on its saved input, its keys and values getting the completions' gradients and its output
/// the layer above's), then the embeddings, then the vision tower block by block.
fn prompt_backward_kept(
    tape: PromptTape,
    kv_grads: &[(Option<Tensor>, Option<Tensor>)],
    policy: &TrainableModel,
    params: &HeadParams,
    grads: &mut GradAccumulator,
) -> Result<()> {
    let model = &policy.model;
    let mut g_above: Option<Tensor> = None;
    // DeepStack level `i`'s gradient, from layer `i`'s replay.
    let mut g_deepstack: Vec<Option<Tensor>> =
        vec![None; tape.deepstack.as_ref().map_or(0, |(_, l)| l.len())];
    for i in (0..tape.inputs.len()).rev() {
        let (gk, gv) = &kv_grads[i];
        let (leaf, store) = replay(&tape.inputs[i], policy, grads, |x| {
            let mut kv = Vec::with_capacity(1);
            let y = model.text.layer(
                i,
                x,
                &tape.cos,
                &tape.sin,
                &mut Caching::Capture(&mut kv),
                tape.mode,
            )?;
            let y = match &tape.deepstack {
                Some((d, _)) => d.add_after(i, &y)?,
                None => y,
            };
            let (k, v) = kv.pop().context("the layer kept no keys")?;
            let mut pairs = Vec::new();
            for (t, g) in [(k, gk), (v, gv)] {
                if let Some(g) = g {
                    pairs.push((t, g.clone()));
                }
            }
            if let Some(g) = &g_above {
                pairs.push((y, g.clone()));
            }
            Ok(pairs)
        })?;
        g_above = store.get(leaf.as_tensor()).cloned();
        if let Some((_, leaves)) = &tape.deepstack {
            if let (Some(l), Some(slot)) = (leaves.get(i), g_deepstack.get_mut(i)) {
                *slot = store.get(l.as_tensor()).cloned();
            }
        }
    }
    let Some(g0) = g_above else { return Ok(()) };
    // The first layer's input came from the text embeddings and the image features.
    let img_leaf = match &tape.vision {
        Some(v) => Some(Var::from_tensor(&v.features)?),
        None => None,
    };
    let (tok_leaf, store) = replay(&tape.tokens, policy, grads, |t| {
        let x0 = model.merge_images(
            t,
            std::slice::from_ref(&tape.head),
            img_leaf.as_ref().map(|l| l.as_tensor()),
        )?;
        Ok(vec![(x0, g0.clone())])
    })?;
    if let Some(g) = store.get(tok_leaf.as_tensor()) {
        params.add_embedding_rows(grads, &tape.head, &g.squeeze(0)?.to_dtype(DType::F32)?)?;
    }
    let (Some(vt), Some(img_leaf)) = (tape.vision, img_leaf) else {
        return Ok(());
    };
    let Some(mut g) = store.get(img_leaf.as_tensor()).cloned() else {
        return Ok(());
    };
    drop(store);
    let v = &model.vision;
    let n = v.num_blocks();
    // Merger, then the blocks from the top, then the patch embedding.
    let (leaf, store) = replay(&vt.inputs[n], policy, grads, |x| {
        Ok(vec![(v.merge(x, &vt.input, tape.mode)?, g.clone())])
    })?;
    g = store
        .get(leaf.as_tensor())
        .cloned()
        .context("merger input gradient")?;
    for b in (0..n).rev() {
        // A DeepStack block's output went to its merger too: that gradient joins here.
        let tap = vt
            .taps
            .iter()
            .position(|&t| t == b)
            .and_then(|k| g_deepstack.get(k).cloned().flatten());
        let (leaf, store) = replay(&vt.inputs[b], policy, grads, |x| {
            let y = v.block(b, x, &vt.input, tape.mode)?;
            let mut pairs = Vec::with_capacity(2);
            if let Some(gd) = &tap {
                let f = v
                    .deepstack_tap(b, &y, tape.mode)?
                    .context("a DeepStack block without its merger")?;
                pairs.push((f, gd.clone()));
            }
            pairs.push((y, g.clone()));
            Ok(pairs)
        })?;
        g = store
            .get(leaf.as_tensor())
            .cloned()
            .context("block input gradient")?;
    }
    let x0 = v.embed(&vt.pixels, &vt.grids)?.x;
    let store = (x0 * g.detach())?.sum_all()?.backward()?;
    grads.add(&policy.params, &store)?;
    Ok(())
}

/// The prompt passes of one call: a prompt's pass is run when its first completion comes
/// up and dropped (after its backward pass, when training) once its last one is through.
struct PromptPasses {
    keep: Keep,
    /// Completions per prompt, for the passes not yet run.
    counts: HashMap<usize, usize>,
    open: HashMap<usize, PromptPass>,
}

impl PromptPasses {
    fn new(seqs: &[SeqRef], keep: Keep) -> Self {
        let mut counts = HashMap::new();
        for s in seqs {
            *counts.entry(s.prompt_index).or_insert(0) += 1;
        }
        Self {
            keep,
            counts,
            open: HashMap::new(),
        }
    }

    /// Runs the passes the micro-batch needs that are not open yet; `mode(i)` is the mode
    /// of prompt `i`'s pass.
    fn open_for(
        &mut self,
        model: &Qwen2Vl,
        mb: &[SeqRef],
        mode: impl Fn(usize) -> Mode,
    ) -> Result<()> {
        for s in mb {
            if let std::collections::hash_map::Entry::Vacant(e) = self.open.entry(s.prompt_index) {
                let n = self.counts.remove(&s.prompt_index).unwrap_or(0);
                e.insert(PromptPass::run(
                    model,
                    s.prompt,
                    n,
                    self.keep,
                    mode(s.prompt_index),
                )?);
            }
        }
        Ok(())
    }

    fn get(&self, prompt_index: usize) -> &PromptPass {
        &self.open[&prompt_index]
    }

    /// Adds the gradients a backward pass left on the micro-batch's prompts' leaves.
    fn collect(&mut self, mb: &[SeqRef], store: &candle_core::backprop::GradStore) -> Result<()> {
        for (pi, _) in per_prompt(mb) {
            self.open
                .get_mut(&pi)
                .context("prompt pass")?
                .collect(store)?;
        }
        Ok(())
    }

    /// Counts the micro-batch's completions as done and returns the prompts with none left,
    /// closed, in micro-batch order: gradients must add up in the same order in every
    /// process (a resumed run repeats the uninterrupted one bit for bit), which a map's
    /// order is not.
    fn finish(&mut self, mb: &[SeqRef]) -> Result<Vec<PromptPass>> {
        let mut done = Vec::new();
        for (pi, n) in per_prompt(mb) {
            let pass = self.open.get_mut(&pi).context("prompt pass")?;
            pass.remaining -= n;
            if pass.remaining == 0 {
                done.extend(self.open.remove(&pi));
            }
        }
        Ok(done)
    }
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

fn check_seqs(model: &Qwen2Vl, seqs: &[SeqRef]) -> Result<()> {
    if seqs.is_empty() {
        bail!("no completions to score");
    }
    let img = model.config.image_token_id;
    // Completions with the same prompt index share one prompt pass: their prompts must be
    // the same, or some would be scored after the wrong prompt.
    let mut first: HashMap<usize, &Prompt> = HashMap::new();
    for (i, s) in seqs.iter().enumerate() {
        let p = *first.entry(s.prompt_index).or_insert(s.prompt);
        if !std::ptr::eq(p, s.prompt)
            && (p.input_ids != s.prompt.input_ids || p.grids() != s.prompt.grids())
        {
            bail!(
                "completion {i} has prompt index {} but not that prompt (internal error)",
                s.prompt_index
            );
        }
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

/// Token embeddings without a graph, (n, hidden).
fn embed_untracked(model: &Qwen2Vl, ids: &[u32]) -> Result<Tensor> {
    let idx = Tensor::from_vec(ids.to_vec(), ids.len(), &model.device)?;
    Ok(model.text.embed_weight().detach().index_select(&idx, 0)?)
}

/// A micro-batch's completions packed into one row, each after its prompt's keys: the
/// prompt's last token then all but the completion's last token, at the positions that
/// continue the prompt.
struct Rows<'p> {
    ids: Vec<u32>,
    positions: Vec<Pos3>,
    segments: Vec<PackedSegment<'p>>,
}

impl<'p> Rows<'p> {
    fn of(mb: &[SeqRef], passes: &'p PromptPasses) -> Self {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut segments = Vec::with_capacity(mb.len());
        for s in mb {
            let pass = passes.get(s.prompt_index);
            let p = s.prompt.input_ids.len();
            let c = s.tokens.len();
            ids.push(s.prompt.input_ids[p - 1]);
            ids.extend_from_slice(&s.tokens[..c - 1]);
            positions.push(pass.last_pos);
            positions.extend((0..c as i64 - 1).map(|j| [p as i64 + j + pass.delta; 3]));
            segments.push(PackedSegment {
                len: c,
                prefix: (!pass.attend.is_empty()).then_some(pass.attend.as_slice()),
            });
        }
        Self {
            ids,
            positions,
            segments,
        }
    }
}

/// What the rows' backward pass needs.
enum RowsKept {
    Nothing,
    /// The whole graph from the embedding leaf.
    Graph(EmbedLeaf),
    /// Checkpointed: every layer's input, then the final norm's.
    Inputs {
        ids: Vec<u32>,
        inputs: Vec<Tensor>,
        cos: Tensor,
        sin: Tensor,
    },
}

/// The decoder over a micro-batch's rows. Returns the final hidden states (tokens, hidden)
/// and what the backward pass needs.
fn rows_pass(
    model: &Qwen2Vl,
    mb: &[SeqRef],
    passes: &PromptPasses,
    keep: Keep,
    mode: Mode,
) -> Result<(Tensor, RowsKept)> {
    let rows = Rows::of(mb, passes);
    match keep {
        Keep::Nothing => {
            let embeds = model.token_embeds(&[rows.ids])?;
            let hidden = model.text.forward(
                &embeds,
                &[rows.positions],
                Caching::Packed(&rows.segments),
                None,
                mode,
            )?;
            Ok((hidden.squeeze(0)?, RowsKept::Nothing))
        }
        Keep::Graph => {
            let leaf =
                Var::from_tensor(&embed_untracked(model, &rows.ids)?.to_dtype(model.dtype)?)?;
            let hidden = model.text.forward(
                &leaf.as_tensor().unsqueeze(0)?,
                &[rows.positions],
                Caching::Packed(&rows.segments),
                None,
                mode,
            )?;
            Ok((hidden.squeeze(0)?, RowsKept::Graph((leaf, rows.ids))))
        }
        Keep::Inputs => {
            let x0 = embed_untracked(model, &rows.ids)?
                .to_dtype(model.dtype)?
                .unsqueeze(0)?;
            let (cos, sin) = model
                .text
                .rope_tables(&[rows.positions], x0.dtype(), x0.device())?;
            let mut inputs = Vec::with_capacity(model.text.num_layers() + 1);
            let mut x = x0;
            for i in 0..model.text.num_layers() {
                inputs.push(x.clone());
                x = model
                    .text
                    .layer(
                        i,
                        &x,
                        &cos,
                        &sin,
                        &mut Caching::Packed(&rows.segments),
                        mode,
                    )?
                    .detach();
            }
            inputs.push(x.clone());
            let hidden = model.text.final_norm(&x)?.detach();
            Ok((
                hidden.squeeze(0)?,
                RowsKept::Inputs {
                    ids: rows.ids,
                    inputs,
                    cos,
                    sin,
                },
            ))
        }
    }
}

/// The rows' backward pass from `dh = ∂L/∂hidden`: autograd through the kept graph, or layer
/// by layer on the kept inputs; weight gradients into `grads`, the prompts' key/value
/// gradients into their passes, the embeddings' into the table's.
#[allow(clippy::too_many_arguments)]
fn rows_backward(
    kept: RowsKept,
    hidden: &Tensor,
    dh: &Tensor,
    mb: &[SeqRef],
    passes: &mut PromptPasses,
    policy: &TrainableModel,
    params: &HeadParams,
    grads: &mut GradAccumulator,
    mode: Mode,
) -> Result<()> {
    match kept {
        RowsKept::Nothing => bail!("internal error: no graph kept for a backward pass"),
        RowsKept::Graph((leaf, ids)) => {
            let store = (hidden * dh.detach())?.sum_all()?.backward()?;
            grads.add(&policy.params, &store)?;
            if let Some(g) = store.get(leaf.as_tensor()) {
                params.add_embedding_rows(grads, &ids, &g.to_dtype(DType::F32)?)?;
            }
            passes.collect(mb, &store)
        }
        RowsKept::Inputs {
            ids,
            inputs,
            cos,
            sin,
        } => {
            let model = &policy.model;
            let n = model.text.num_layers();
            let (leaf, store) = replay(&inputs[n], policy, grads, |x| {
                Ok(vec![(
                    model.text.final_norm(x)?.squeeze(0)?,
                    dh.to_dtype(x.dtype())?,
                )])
            })?;
            let mut g = store
                .get(leaf.as_tensor())
                .cloned()
                .context("norm input gradient")?;
            for i in (0..n).rev() {
                let (leaf, store) = {
                    let rows = Rows::of(mb, passes);
                    replay(&inputs[i], policy, grads, |x| {
                        let y = model.text.layer(
                            i,
                            x,
                            &cos,
                            &sin,
                            &mut Caching::Packed(&rows.segments),
                            mode,
                        )?;
                        Ok(vec![(y, g.clone())])
                    })?
                };
                passes.collect(mb, &store)?;
                g = store
                    .get(leaf.as_tensor())
                    .cloned()
                    .context("layer input gradient")?;
            }
            params.add_embedding_rows(grads, &ids, &g.squeeze(0)?.to_dtype(DType::F32)?)
        }
    }
}

fn targets_of(seqs: &[SeqRef]) -> Vec<u32> {
    seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect()
}

/// Splits `n` completions into micro-batches of `size`, in order.
fn micro_batches(n: usize, size: usize) -> Vec<Range<usize>> {
    let size = size.max(1);
    (0..n.div_ceil(size))
        .map(|k| k * size..((k + 1) * size).min(n))
        .collect()
}

/// Splits flat per-token values into one slice per completion.
fn per_seq<'v>(flat: &'v [f32], mb: &[SeqRef]) -> Vec<&'v [f32]> {
    let mut out = Vec::with_capacity(mb.len());
    let mut k = 0;
    for s in mb {
        out.push(&flat[k..k + s.tokens.len()]);
        k += s.tokens.len();
    }
    out
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
    let mut passes = PromptPasses::new(seqs, Keep::Nothing);
    let mut out = Vec::with_capacity(seqs.len());
    for range in micro_batches(seqs.len(), micro_batch) {
        let mb = &seqs[range];
        passes.open_for(model, mb, |_| Mode::Infer)?;
        let (hidden, _) = rows_pass(model, mb, &passes, Keep::Nothing, Mode::Infer)?;
        let targets = targets_of(mb);
        let lp = match model.text.lm_head_quantized() {
            Some(q) => token_logps::forward_quantized(&hidden, q, &targets, temperature)?,
            None => {
                token_logps::forward(
                    &hidden,
                    model.text.lm_head_weight(),
                    &targets,
                    temperature,
                    false,
                    false,
                )?
                .logp
            }
        };
        out.extend(per_seq(&lp, mb).into_iter().map(<[f32]>::to_vec));
        passes.finish(mb)?;
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

/// Where the embedding table and the LM head sit among the policy's trained parameters
/// (nowhere under LoRA, or when frozen): their gradients are added here by hand.
struct HeadParams {
    embed: Option<usize>,
    head: Option<usize>,
    embed_shape: candle_core::Shape,
}

impl HeadParams {
    fn of(policy: &TrainableModel) -> Self {
        let text = &policy.model.text;
        let index_of = |t: &Tensor| {
            policy
                .params
                .iter()
                .position(|p| p.trainable && p.var.as_tensor().id() == t.id())
        };
        Self {
            embed: index_of(text.embed_weight()),
            head: index_of(text.lm_head_weight()),
            embed_shape: text.embed_weight().shape().clone(),
        }
    }

    /// Adds the gradient of looked-up embeddings (one row per id) to the table's.
    fn add_embedding_rows(
        &self,
        grads: &mut GradAccumulator,
        ids: &[u32],
        rows: &Tensor,
    ) -> Result<()> {
        if let Some(i) = self.embed {
            grads.add_rows(i, &self.embed_shape, ids, rows)?;
        }
        Ok(())
    }
}

/// How the policy's training passes run.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainOptions {
    /// Seed of this step's LoRA dropout masks (`None`: no dropout). Masks derive from it,
    /// the pass and the layer only, so a resumed run (and a recomputed layer) draws the
    /// same ones.
    pub dropout_seed: Option<u64>,
    /// Gradient checkpointing: keep each layer's input only and run the layers again in the
    /// backward pass.
    pub checkpointing: bool,
    /// Also compute each completion token's entropy ([`MicroBatch::entropy`]), from the same
    /// pass over the logits as the log-probs.
    pub entropy: bool,
}

impl TrainOptions {
    /// The mode of one training pass: its dropout key (`what` tells passes apart).
    fn mode(&self, what: u64) -> Mode {
        Mode::Train {
            dropout: self.dropout_seed.map(|seed| crate::seed::mix(seed, what)),
        }
    }

    fn keep(&self) -> Keep {
        if self.checkpointing {
            Keep::Inputs
        } else {
            Keep::Graph
        }
    }
}

/// Forward and backward passes of `policy` over `seqs` in micro-batches of `micro_batch`,
/// adding the gradient of the loss to `grads`; log-probabilities are those of logits /
/// `temperature`. `loss_of` turns a micro-batch's log-probs
/// (a leaf of the graph it builds) into its scalar share of the step's loss; the losses'
/// sum is returned.
pub fn backward(
    policy: &TrainableModel,
    seqs: &[SeqRef],
    micro_batch: usize,
    temperature: f64,
    pass: TrainOptions,
    grads: &mut GradAccumulator,
    mut loss_of: impl FnMut(&MicroBatch) -> Result<Tensor>,
) -> Result<f64> {
    let model = &policy.model;
    check_seqs(model, seqs)?;
    let head_w = model.text.lm_head_weight();
    let params = HeadParams::of(policy);
    let keep = pass.keep();
    let mut passes = PromptPasses::new(seqs, keep);
    let mut loss_sum = 0f64;
    for (index, range) in micro_batches(seqs.len(), micro_batch)
        .into_iter()
        .enumerate()
    {
        let mb = &seqs[range.clone()];
        // Dropout streams: prompt passes by prompt, completion rows by micro-batch.
        passes.open_for(model, mb, |i| pass.mode((1 << 40) | i as u64))?;
        let mode = pass.mode(index as u64);
        let (hidden, kept) = rows_pass(model, mb, &passes, keep, mode)?;

        // Log-probs outside the graph, then the loss's gradient with respect to them.
        let token_logps::Forward {
            logp: lp,
            entropy,
            saved,
        } = token_logps::forward(
            &hidden.detach(),
            head_w,
            &targets_of(mb),
            temperature,
            true,
            pass.entropy,
        )?;
        let saved = saved.context("token log-probs kept nothing for the backward pass")?;
        let (logp, mask) = pad_rows(&per_seq(&lp, mb), &model.device)?;
        let entropy = match entropy {
            Some(h) => Some(pad_rows(&per_seq(&h, mb), &model.device)?.0),
            None => None,
        };
        let logp = Var::from_tensor(&logp)?;
        let loss = loss_of(&MicroBatch {
            index,
            range: range.clone(),
            logp: logp.as_tensor(),
            mask: &mask,
            entropy: entropy.as_ref(),
        })?;
        loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let g: Vec<f32> = match loss.backward()?.get(logp.as_tensor()) {
            Some(g) => {
                let rows: Vec<Vec<f32>> = g.to_dtype(DType::F32)?.to_vec2()?;
                mb.iter()
                    .zip(&rows)
                    .flat_map(|(s, r)| r[..s.tokens.len()].iter().copied())
                    .collect()
            }
            None => vec![0.0; lp.len()],
        };

        // ∂L/∂h by hand (∂L/∂W added to the LM head's gradient), then the layers below.
        let dh = saved.backward(&g, head_w, params.head.map(|i| grads.slot_mut(i)))?;
        let dh = dh.to_dtype(hidden.dtype())?;
        rows_backward(
            kept,
            &hidden,
            &dh,
            mb,
            &mut passes,
            policy,
            &params,
            grads,
            mode,
        )?;
        for done in passes.finish(mb)? {
            done.backward(policy, &params, grads)?;
        }
    }
    // The logits scratch buffer is not needed until the next step's first forward pass;
    // hold no memory for it through the optimizer update and generation.
    crate::kernels::workspace::release();
    Ok(loss_sum)
}
