//! Qwen2-VL's vision blocks and merger: LayerNorm, a fc1/fc2 MLP (quick-GELU), full
//! attention within each image frame; the merger LayerNorms, groups 2x2 patches, and
//! projects with a GELU MLP.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Activation, VisionConfig};
use super::layers::{activate, linear, LayerNorm, Linear};
use super::vision::attend;

const LN_EPS: f64 = 1e-6;

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

    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![
            ("attn.qkv", &mut self.qkv),
            ("attn.proj", &mut self.proj),
            ("mlp.fc1", &mut self.fc1),
            ("mlp.fc2", &mut self.fc2),
        ]
    }

    /// `x`: (patches, dim); `segments`: patch counts attended separately.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[usize],
    ) -> Result<Tensor> {
        let qkv = self.qkv.forward(&self.norm1.forward(x)?)?;
        let h = x.add(
            &self
                .proj
                .forward(&attend(&qkv, self.num_heads, cos, sin, segments)?)?,
        )?;
        let m = self.fc2.forward(&activate(
            &self.fc1.forward(&self.norm2.forward(&h)?)?,
            self.act,
        )?)?;
        h.add(&m)
    }
}

#[derive(Debug, Clone)]
pub struct Merger {
    ln_q: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    merged_dim: usize,
}

impl Merger {
    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let merged_dim = cfg.embed_dim * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Self {
            ln_q: LayerNorm::load(&vb.pp("ln_q"), cfg.embed_dim, LN_EPS)?,
            fc1: linear(&vb.pp("mlp.0"), merged_dim, merged_dim, true)?,
            fc2: linear(&vb.pp("mlp.2"), merged_dim, cfg.hidden_size, true)?,
            merged_dim,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![("mlp.0", &mut self.fc1), ("mlp.2", &mut self.fc2)]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Consecutive patches are already grouped by 2x2 window (the processor's order), so
        // the merge is a reshape.
        let x = self.ln_q.forward(x)?.reshape(((), self.merged_dim))?;
        self.fc2.forward(&self.fc1.forward(&x)?.gelu_erf()?)
    }
}
