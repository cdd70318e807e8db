//! Qwen2-VL's vision blocks and merger: LayerNorm, a fc1/fc2 MLP (quick-GELU), full
//! attention within each image frame; the merger LayerNorms, groups 2x2 patches, and
//! projects with a GELU MLP.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Activation, VisionConfig};
use super::layers::{activate, linear, LayerNorm, Linear, Mode};
use super::vision::{attend, PatchMerger};

pub(crate) const LN_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
    num_heads: usize,
    act: Activation,
}

impl Block {
    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        Self::load_named(vb, cfg, ["mlp.fc1", "mlp.fc2"])
    }

    /// The same block with its MLP's two layers under other names (Qwen3-VL's blocks are
    /// Qwen2-VL's with `mlp.linear_fc1` / `mlp.linear_fc2` and a tanh GELU).
    pub fn load_named(vb: VarBuilder, cfg: &VisionConfig, mlp: [&str; 2]) -> Result<Self> {
        let d = cfg.embed_dim;
        Ok(Self {
            norm1: LayerNorm::load(&vb.pp("norm1"), d, LN_EPS)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), d, LN_EPS)?,
            qkv: linear(&vb.pp("attn.qkv"), d, 3 * d, true)?,
            proj: linear(&vb.pp("attn.proj"), d, d, true)?,
            fc1: linear(&vb.pp(mlp[0]), d, cfg.mlp_hidden(), true)?,
            fc2: linear(&vb.pp(mlp[1]), cfg.mlp_hidden(), d, true)?,
            num_heads: cfg.num_heads,
            act: cfg.hidden_act,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![&mut self.qkv, &mut self.proj, &mut self.fc1, &mut self.fc2]
    }

    /// `x`: (patches, dim); `segments`: patch counts attended separately.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[usize],
        mode: Mode,
    ) -> Result<Tensor> {
        let qkv = self.qkv.forward(&self.norm1.forward(x)?, mode)?;
        let h = x.add(
            &self
                .proj
                .forward(&attend(&qkv, self.num_heads, cos, sin, segments)?, mode)?,
        )?;
        let m = self.fc2.forward(
            &activate(&self.fc1.forward(&self.norm2.forward(&h)?, mode)?, self.act)?,
            mode,
        )?;
        h.add(&m)
    }
}

/// The merger, with this family's norm.
pub fn merger(vb: VarBuilder, cfg: &VisionConfig) -> Result<PatchMerger<LayerNorm>> {
    let ln_q = LayerNorm::load(&vb.pp("ln_q"), cfg.embed_dim, LN_EPS)?;
    PatchMerger::load(vb, cfg, ln_q)
}
