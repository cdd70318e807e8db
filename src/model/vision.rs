//! The vision tower: patch embedding (a Conv3d whose kernel equals its stride, so a matmul
//! over flattened patches), 2D rotary tables, attention within segments of the patch
//! sequence, blocks, and a merger that turns each 2x2 group of patches into one token of the
//! text model's width. What the families share lives here; their blocks and mergers in
//! `vision_qwen2` (Qwen2-VL), `vision_qwen25` (Qwen2.5-VL, with window attention) and
//! `vision_qwen3` (Qwen3-VL: Qwen2-VL's blocks plus a patch bias, learned position
//! embeddings and DeepStack mergers).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Arch, VisionConfig};
use super::layers::{rotary_heads_first, softmax_upcast, upcast, Linear, Mode};
use super::rope::vision_tables;
use super::{vision_qwen2 as qwen2, vision_qwen25 as qwen25, vision_qwen3 as qwen3};
use crate::kernels::attention;

/// Multi-head attention of the tokens within each segment of the sequence, from the
/// output of a block's fused qkv projection (n, 3 x dim): q and k rotated (in f32, as
/// transformers does), the heads concatenated again, (n, dim). The output projection is
/// the block's.
pub fn attend(
    qkv: &Tensor,
    num_heads: usize,
    cos: &Tensor,
    sin: &Tensor,
    segments: &[usize],
) -> Result<Tensor> {
    let (n, d3) = qkv.dims2()?;
    let d = d3 / 3;
    let hd = d / num_heads;
    let dtype = qkv.dtype();
    // (n, 3, heads, hd) -> three (heads, n, hd)
    let qkv = qkv.reshape((n, 3, num_heads, hd))?;
    let rot = |t: Tensor| -> Result<Tensor> {
        let t = t.to_dtype(upcast(dtype))?.unsqueeze(0)?;
        let (c, s) = (
            cos.to_dtype(t.dtype())?.unsqueeze(0)?,
            sin.to_dtype(t.dtype())?.unsqueeze(0)?,
        );
        rotary_heads_first(&t, &c, &s)?.squeeze(0)?.to_dtype(dtype)
    };
    let q = rot(qkv.narrow(1, 0, 1)?.squeeze(1)?)?;
    let k = rot(qkv.narrow(1, 1, 1)?.squeeze(1)?)?;
    let v = qkv
        .narrow(1, 2, 1)?
        .squeeze(1)?
        .transpose(0, 1)?
        .contiguous()?;
    let scale = (hd as f64).powf(-0.5);
    let mut outs = Vec::with_capacity(segments.len());
    let mut start = 0;
    for &len in segments {
        let qs = q.narrow(1, start, len)?;
        let ks = k.narrow(1, start, len)?;
        let vs = v.narrow(1, start, len)?;
        if attention::applies(&qs, &ks, &vs) {
            let op = attention::Attention {
                scale: scale as f32,
                queries: len,
                visibility: attention::Visibility::All,
            };
            outs.push(attention::attention(&qs, &ks, &vs, op)?);
        } else {
            let scores = (qs.matmul(&ks.t()?)? * scale)?;
            let probs = softmax_upcast(&scores)?.to_dtype(dtype)?;
            outs.push(probs.matmul(&vs)?);
        }
        start += len;
    }
    let o = Tensor::cat(&outs, 1)?; // (heads, n, hd)
    o.transpose(0, 1)?.reshape((n, d))
}

/// The patch merger of every family: norm each patch, group each 2x2 window of patches
/// (consecutive in the processor's order, so a reshape), then an (erf) GELU MLP to the text
/// width. Qwen2-VL norms with LayerNorm, Qwen2.5-VL with RMSNorm; Qwen3-VL's DeepStack mergers
/// group first and norm the grouped vector ("postshuffle").
#[derive(Debug, Clone)]
pub struct PatchMerger<N> {
    ln_q: N,
    fc1: Linear,
    fc2: Linear,
    merged_dim: usize,
    postshuffle: bool,
}

impl<N: candle_core::Module> PatchMerger<N> {
    /// `ln_q` loaded by the caller (its kind is the family's).
    pub fn load(vb: VarBuilder, cfg: &VisionConfig, ln_q: N) -> Result<Self> {
        Self::load_named(vb, cfg, ln_q, ["mlp.0", "mlp.2"], false)
    }

    /// With the MLP's layers under `names`; `postshuffle`: the norm (loaded over the merged
    /// width) comes after the grouping.
    pub fn load_named(
        vb: VarBuilder,
        cfg: &VisionConfig,
        ln_q: N,
        names: [&str; 2],
        postshuffle: bool,
    ) -> Result<Self> {
        let merged_dim = cfg.embed_dim * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Self {
            ln_q,
            fc1: super::layers::linear(&vb.pp(names[0]), merged_dim, merged_dim, true)?,
            fc2: super::layers::linear(&vb.pp(names[1]), merged_dim, cfg.hidden_size, true)?,
            merged_dim,
            postshuffle,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![&mut self.fc1, &mut self.fc2]
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let x = if self.postshuffle {
            self.ln_q.forward(&x.reshape(((), self.merged_dim))?)?
        } else {
            self.ln_q.forward(x)?.reshape(((), self.merged_dim))?
        };
        self.fc2
            .forward(&self.fc1.forward(&x, mode)?.gelu_erf()?, mode)
    }
}

/// What the tower gives the decoder.
#[derive(Debug, Clone)]
pub struct VisionFeatures {
    /// (tokens, text hidden): written over the image and video pad tokens, in order.
    pub tokens: Tensor,
    /// Qwen3-VL: one (tokens, text hidden) tensor per DeepStack level, in block order (see
    /// [`crate::model::text::DeepStack`]); empty for the other families.
    pub deepstack: Vec<Tensor>,
}

#[derive(Debug, Clone)]
enum Blocks {
    Qwen2(Vec<qwen2::Block>),
    Qwen25(Vec<qwen25::Block>),
}

#[derive(Debug, Clone)]
enum Merger {
    Qwen2(PatchMerger<super::layers::LayerNorm>),
    Qwen25(PatchMerger<super::layers::RmsNorm>),
}

/// The tower's input: patch embeddings and what every block uses.
#[derive(Debug, Clone)]
pub struct VisionInput {
    /// (patches, embed_dim), in the order the blocks see them (window order for Qwen2.5-VL).
    pub x: Tensor,
    pub cos: Tensor,
    pub sin: Tensor,
    /// Patches per frame, attended separately by full-attention blocks.
    pub segments: Vec<usize>,
    /// Qwen2.5-VL: patches per window, for the windowed blocks.
    pub windows: Option<Vec<usize>>,
    /// Qwen2.5-VL: for each merged token in the processor's order, its row after the merger
    /// (which sees tokens in window order): restores the order.
    pub restore: Option<Tensor>,
}

/// The whole vision tower.
#[derive(Debug, Clone)]
pub struct VisionTower {
    patch_embed: Tensor,
    /// Qwen3-VL: the patch embedding's bias.
    patch_bias: Option<Tensor>,
    /// Qwen3-VL: the learned position table, (side², embed_dim).
    pos_embed: Option<Tensor>,
    blocks: Blocks,
    merger: Merger,
    /// Qwen3-VL: `(block, merger)` per entry of `deepstack_visual_indexes`, in its order.
    deepstack: Vec<(usize, PatchMerger<super::layers::LayerNorm>)>,
    cfg: VisionConfig,
    /// The dtype activations run in (the weights' dtype unless set otherwise: a bf16 base
    /// under f32 compute).
    compute: DType,
}

impl VisionTower {
    /// Every linear layer of the tower and merger, in order; each knows its name
    /// ([`Linear::name`]).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out: Vec<&mut Linear> = match &mut self.blocks {
            Blocks::Qwen2(b) => b.iter_mut().flat_map(|b| b.linears_mut()).collect(),
            Blocks::Qwen25(b) => b.iter_mut().flat_map(|b| b.linears_mut()).collect(),
        };
        out.extend(match &mut self.merger {
            Merger::Qwen2(m) => m.linears_mut(),
            Merger::Qwen25(m) => m.linears_mut(),
        });
        for (_, m) in &mut self.deepstack {
            out.extend(m.linears_mut());
        }
        out
    }

    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let w = vb.get(
            (
                cfg.embed_dim,
                cfg.in_channels,
                cfg.temporal_patch_size,
                cfg.patch_size,
                cfg.patch_size,
            ),
            "patch_embed.proj.weight",
        )?;
        let patch_embed = w.reshape((cfg.embed_dim, cfg.patch_dim()))?;
        let bvb = |i: usize| vb.pp(format!("blocks.{i}"));
        let (blocks, merger) = match cfg.arch {
            Arch::Qwen2Vl => (
                Blocks::Qwen2(
                    (0..cfg.depth)
                        .map(|i| qwen2::Block::load(bvb(i), cfg))
                        .collect::<Result<_>>()?,
                ),
                Merger::Qwen2(qwen2::merger(vb.pp("merger"), cfg)?),
            ),
            Arch::Qwen25Vl => (
                Blocks::Qwen25(
                    (0..cfg.depth)
                        .map(|i| qwen25::Block::load(bvb(i), cfg))
                        .collect::<Result<_>>()?,
                ),
                Merger::Qwen25(qwen25::merger(vb.pp("merger"), cfg)?),
            ),
            Arch::Qwen3Vl => return qwen3::load(vb, cfg, patch_embed),
        };
        Ok(Self::assemble(
            patch_embed,
            None,
            None,
            blocks,
            merger,
            vec![],
            cfg,
        ))
    }

    /// A tower from its loaded parts.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        patch_embed: Tensor,
        patch_bias: Option<Tensor>,
        pos_embed: Option<Tensor>,
        blocks: Blocks,
        merger: Merger,
        deepstack: Vec<(usize, PatchMerger<super::layers::LayerNorm>)>,
        cfg: &VisionConfig,
    ) -> Self {
        Self {
            compute: patch_embed.dtype(),
            patch_embed,
            patch_bias,
            pos_embed,
            blocks,
            merger,
            deepstack,
            cfg: cfg.clone(),
        }
    }

    /// Qwen3-VL's tower: the LayerNorm blocks and merger of Qwen2-VL under Qwen3-VL's names,
    /// with the patch bias, the position table and the DeepStack mergers.
    pub(crate) fn qwen3(
        patch_embed: Tensor,
        patch_bias: Tensor,
        pos_embed: Tensor,
        blocks: Vec<qwen2::Block>,
        merger: PatchMerger<super::layers::LayerNorm>,
        deepstack: Vec<(usize, PatchMerger<super::layers::LayerNorm>)>,
        cfg: &VisionConfig,
    ) -> Self {
        Self::assemble(
            patch_embed,
            Some(patch_bias),
            Some(pos_embed),
            Blocks::Qwen2(blocks),
            Merger::Qwen2(merger),
            deepstack,
            cfg,
        )
    }

    /// Stores the patch embedding input-major, as `Qwen2Vl::prepare_for_inference` does for the
    /// linear layers (f32 CPU weights only; the shape seen through the view is unchanged).
    pub fn pack_patch_embed(&mut self) -> Result<()> {
        let w = &self.patch_embed;
        if crate::kernels::cpu_kernels()
            && w.device().is_cpu()
            && w.dtype() == DType::F32
            && w.is_contiguous()
            && !w.is_variable()
        {
            self.patch_embed = w.t()?.contiguous()?.t()?;
        }
        Ok(())
    }

    /// Runs the tower in `dtype` whatever its weights are stored in.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute = dtype;
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// `pixels`: (total_patches, patch_dim) for all images in order; returns their
    /// (total_tokens, text_hidden) embeddings in the same order, and Qwen3-VL's DeepStack
    /// features.
    pub fn forward(
        &self,
        pixels: &Tensor,
        grids: &[[usize; 3]],
        mode: Mode,
    ) -> Result<VisionFeatures> {
        let input = self.embed(pixels, grids)?;
        let mut x = input.x.clone();
        let mut deepstack = Vec::with_capacity(self.deepstack.len());
        for i in 0..self.num_blocks() {
            x = self.block(i, &x, &input, mode)?;
            if let Some(f) = self.deepstack_tap(i, &x, mode)? {
                deepstack.push(f);
            }
        }
        Ok(VisionFeatures {
            tokens: self.merge(&x, &input, mode)?,
            deepstack,
        })
    }

    /// Qwen3-VL: when block `i` is one of `deepstack_visual_indexes`, its output `x` through
    /// that entry's merger (transformers 5.24, `Qwen3VLVisionModel.forward`: the merger at
    /// `deepstack_visual_indexes.index(i)`); `None` for other blocks and families. The
    /// features of one pass are in block order.
    pub fn deepstack_tap(&self, i: usize, x: &Tensor, mode: Mode) -> Result<Option<Tensor>> {
        match self.deepstack.iter().find(|(b, _)| *b == i) {
            Some((_, m)) => Ok(Some(m.forward(x, mode)?)),
            None => Ok(None),
        }
    }

    /// The patch embeddings and what every block needs (rotary tables, segments, the window
    /// order): the tower's input, for running it block by block.
    pub fn embed(&self, pixels: &Tensor, grids: &[[usize; 3]]) -> Result<VisionInput> {
        let dtype = self.compute;
        let (n, pd) = pixels.dims2()?;
        let expected: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if n != expected || pd != self.cfg.patch_dim() {
            candle_core::bail!(
                "vision input has shape ({n}, {pd}) but the image grids need ({expected}, {})",
                self.cfg.patch_dim()
            );
        }
        let m = self.cfg.spatial_merge_size;
        if let Some(g) = grids.iter().find(|g| g[1] % m != 0 || g[2] % m != 0) {
            candle_core::bail!("image grid {g:?} is not divisible by the merge size {m}");
        }
        let mut x = pixels
            .to_dtype(dtype)?
            .matmul(&super::lora::cast(&self.patch_embed, dtype)?.t()?)?;
        if let Some(b) = &self.patch_bias {
            x = x.broadcast_add(&super::lora::cast(b, dtype)?)?;
        }
        if let (Some(table), Some(side)) = (&self.pos_embed, self.cfg.position_grid) {
            x = x.add(&qwen3::position_embeddings(table, side, grids, m)?.to_dtype(dtype)?)?;
        }
        let (cos, sin) = vision_tables(
            grids,
            m,
            self.cfg.head_dim(),
            self.cfg.rope_theta,
            pixels.device(),
        )?;
        // Full attention runs within each frame of each image (transformers' cu_seqlens).
        let segments: Vec<usize> = grids
            .iter()
            .flat_map(|g| std::iter::repeat_n(g[1] * g[2], g[0]))
            .collect();
        let Some(win) = &self.cfg.window else {
            return Ok(VisionInput {
                x,
                cos,
                sin,
                segments,
                windows: None,
                restore: None,
            });
        };
        // Window order: merged tokens reordered window by window, each carrying its m x m
        // patches (consecutive in the processor's order) along.
        let (order, windows) = qwen25::window_order(grids, m, self.cfg.patch_size, win.window_size);
        let unit = (m * m) as u32;
        let rows: Vec<u32> = order
            .iter()
            .flat_map(|&t| (0..unit).map(move |j| t * unit + j))
            .collect();
        let mut inverse = vec![0u32; order.len()];
        for (pos, &t) in order.iter().enumerate() {
            inverse[t as usize] = pos as u32;
        }
        let dev = pixels.device();
        let rows = Tensor::from_vec(rows, n, dev)?;
        Ok(VisionInput {
            x: x.index_select(&rows, 0)?,
            cos: cos.index_select(&rows, 0)?,
            sin: sin.index_select(&rows, 0)?,
            segments,
            windows: Some(windows),
            restore: Some(Tensor::from_vec(inverse, order.len(), dev)?),
        })
    }

    /// Vision block `i` alone on `x`.
    pub fn block(&self, i: usize, x: &Tensor, input: &VisionInput, mode: Mode) -> Result<Tensor> {
        let missing = || candle_core::Error::Msg(format!("no vision block {i}"));
        match &self.blocks {
            Blocks::Qwen2(b) => b.get(i).ok_or_else(missing)?.forward(
                x,
                &input.cos,
                &input.sin,
                &input.segments,
                mode,
            ),
            Blocks::Qwen25(b) => {
                let full = self
                    .cfg
                    .window
                    .as_ref()
                    .is_none_or(|w| w.full_attention_blocks.contains(&i));
                let segments = match (&input.windows, full) {
                    (Some(w), false) => w,
                    _ => &input.segments,
                };
                b.get(i)
                    .ok_or_else(missing)?
                    .forward(x, &input.cos, &input.sin, segments, mode)
            }
        }
    }

    pub fn num_blocks(&self) -> usize {
        match &self.blocks {
            Blocks::Qwen2(b) => b.len(),
            Blocks::Qwen25(b) => b.len(),
        }
    }

    /// The patch merger: the blocks' output to text-model tokens, in the processor's order.
    pub fn merge(&self, x: &Tensor, input: &VisionInput, mode: Mode) -> Result<Tensor> {
        let merged = match &self.merger {
            Merger::Qwen2(m) => m.forward(x, mode)?,
            Merger::Qwen25(m) => m.forward(x, mode)?,
        };
        match &input.restore {
            Some(r) => merged.index_select(r, 0),
            None => Ok(merged),
        }
    }
}
