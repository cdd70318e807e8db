//! The Qwen2-VL vision tower: a ViT over 14x14x2 patches with 2D rotary embeddings, full
//! attention within each image, and a merger that turns each 2x2 window of patches into one
//! token of the text model's width.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Activation, VisionConfig};
use super::layers::{
    activate, linear, rotary_heads_first, softmax_upcast, upcast, LayerNorm, Linear,
};
use super::rope::vision_tables;
use crate::kernels::attention;

const LN_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
struct VisionBlock {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
    num_heads: usize,
    act: Activation,
}

impl VisionBlock {
    fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.embed_dim;
        Ok(Self {
            norm1: LayerNorm::load(&vb.pp("norm1"), d, LN_EPS)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), d, LN_EPS)?,
            qkv: linear(&vb.pp("attn.qkv"), d, 3 * d, true)?,
            proj: linear(&vb.pp("attn.proj"), d, d, true)?,
            fc1: linear(&vb.pp("mlp.fc1"), d, cfg.mlp_hidden(), true)?,
            fc2: linear(&vb.pp("mlp.fc2"), cfg.mlp_hidden(), d, true)?,
            num_heads: cfg.num_heads,
            act: cfg.hidden_act,
        })
    }

    /// `x`: (patches, dim). `segments`: patch counts of each image frame, attended separately.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[usize],
    ) -> Result<Tensor> {
        let h = x.add(&self.attention(&self.norm1.forward(x)?, cos, sin, segments)?)?;
        let m = self.fc2.forward(&activate(
            &self.fc1.forward(&self.norm2.forward(&h)?)?,
            self.act,
        )?)?;
        h.add(&m)
    }

    fn attention(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[usize],
    ) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let hd = d / self.num_heads;
        let dtype = x.dtype();
        // (n, 3, heads, hd) -> three (heads, n, hd)
        let qkv = self.qkv.forward(x)?.reshape((n, 3, self.num_heads, hd))?;
        let rot = |t: Tensor| -> Result<Tensor> {
            // transformers rotates vision q/k in f32 and casts back; (n, heads, hd) in,
            // (heads, n, hd) out.
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
        let o = o.transpose(0, 1)?.reshape((n, d))?;
        self.proj.forward(&o)
    }
}

#[derive(Debug, Clone)]
struct PatchMerger {
    ln_q: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    merged_dim: usize,
}

impl PatchMerger {
    fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let merged_dim = cfg.embed_dim * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Self {
            ln_q: LayerNorm::load(&vb.pp("ln_q"), cfg.embed_dim, LN_EPS)?,
            fc1: linear(&vb.pp("mlp.0"), merged_dim, merged_dim, true)?,
            fc2: linear(&vb.pp("mlp.2"), merged_dim, cfg.hidden_size, true)?,
            merged_dim,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Consecutive patches are already grouped by 2x2 window (the processor's order), so
        // the merge is a reshape.
        let x = self.ln_q.forward(x)?.reshape(((), self.merged_dim))?;
        self.fc2.forward(&self.fc1.forward(&x)?.gelu_erf()?)
    }
}

/// The tower's input: patch embeddings and the tables every block uses.
#[derive(Debug, Clone)]
pub struct VisionInput {
    /// (patches, embed_dim)
    pub x: Tensor,
    pub cos: Tensor,
    pub sin: Tensor,
    /// Patches per frame, attended separately.
    pub segments: Vec<usize>,
}

/// The whole vision tower.
#[derive(Debug, Clone)]
pub struct VisionTower {
    patch_embed: Tensor,
    blocks: Vec<VisionBlock>,
    merger: PatchMerger,
    cfg: VisionConfig,
    /// The dtype activations run in (the weights' dtype unless set otherwise: a bf16 base
    /// under f32 compute).
    compute: candle_core::DType,
}

impl VisionTower {
    /// Every linear layer of the tower and merger with its module path as transformers
    /// >= 4.52 names it (`model.visual.blocks.0.attn.qkv`, `model.visual.merger.mlp.0`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            for (name, lin) in [
                ("attn.qkv", &mut b.qkv),
                ("attn.proj", &mut b.proj),
                ("mlp.fc1", &mut b.fc1),
                ("mlp.fc2", &mut b.fc2),
            ] {
                out.push((format!("model.visual.blocks.{i}.{name}"), lin));
            }
        }
        out.push(("model.visual.merger.mlp.0".into(), &mut self.merger.fc1));
        out.push(("model.visual.merger.mlp.2".into(), &mut self.merger.fc2));
        out
    }

    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        // The Conv3d's kernel equals its stride, so it is a matmul over flattened patches.
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
        let blocks = (0..cfg.depth)
            .map(|i| VisionBlock::load(vb.pp(format!("blocks.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            compute: patch_embed.dtype(),
            patch_embed,
            blocks,
            merger: PatchMerger::load(vb.pp("merger"), cfg)?,
            cfg: cfg.clone(),
        })
    }

    /// Runs the tower in `dtype` whatever its weights are stored in.
    pub fn set_compute_dtype(&mut self, dtype: candle_core::DType) {
        self.compute = dtype;
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Number of text-model tokens an image of this grid becomes.
    pub fn tokens_for(&self, grid: [usize; 3]) -> usize {
        let m = self.cfg.spatial_merge_size;
        grid[0] * grid[1] * grid[2] / (m * m)
    }

    /// `pixels`: (total_patches, patch_dim) for all images in order; returns
    /// (total_tokens, text_hidden) image embeddings in the same order.
    pub fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let input = self.embed(pixels, grids)?;
        let mut x = input.x.clone();
        for i in 0..self.blocks.len() {
            x = self.block(i, &x, &input)?;
        }
        self.merge(&x)
    }

    /// The patch embeddings and what every block needs (rotary tables, per-frame
    /// segments): the tower's input, for running it block by block.
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
        let x = pixels
            .to_dtype(dtype)?
            .matmul(&super::lora::cast(&self.patch_embed, dtype)?.t()?)?;
        let (cos, sin) = vision_tables(
            grids,
            self.cfg.spatial_merge_size,
            self.cfg.head_dim(),
            pixels.device(),
        )?;
        // Attention runs within each frame of each image (transformers' cu_seqlens).
        let segments: Vec<usize> = grids
            .iter()
            .flat_map(|g| std::iter::repeat_n(g[1] * g[2], g[0]))
            .collect();
        Ok(VisionInput {
            x,
            cos,
            sin,
            segments,
        })
    }

    /// Vision block `i` alone on `x`.
    pub fn block(&self, i: usize, x: &Tensor, input: &VisionInput) -> Result<Tensor> {
        let block = self
            .blocks
            .get(i)
            .ok_or_else(|| candle_core::Error::Msg(format!("no vision block {i}")))?;
        block.forward(x, &input.cos, &input.sin, &input.segments)
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The patch merger: the blocks' output to text-model tokens.
    pub fn merge(&self, x: &Tensor) -> Result<Tensor> {
        self.merger.forward(x)
    }
}
