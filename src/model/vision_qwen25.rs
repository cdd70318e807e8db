//! Qwen2.5-VL's vision blocks and merger, and its window attention.
//!
//! Blocks are RMSNorm, attention, RMSNorm, a gated MLP with biases (SiLU). Most blocks attend
//! within windows of `window_size` pixels; the tower reorders its tokens window by window
//! before the blocks (so a window is a contiguous run) and restores the order after the
//! merger. The blocks in `fullatt_block_indexes` attend over the whole image frame.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{Activation, VisionConfig};
use super::layers::{gated, linear, Linear, Mode, RmsNorm};
use super::vision::{attend, PatchMerger};

const NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
pub struct Block {
    norm1: RmsNorm,
    norm2: RmsNorm,
    qkv: Linear,
    proj: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    num_heads: usize,
    act: Activation,
}

impl Block {
    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let (d, i) = (cfg.embed_dim, cfg.mlp_hidden());
        Ok(Self {
            norm1: RmsNorm::load(&vb.pp("norm1"), d, NORM_EPS)?,
            norm2: RmsNorm::load(&vb.pp("norm2"), d, NORM_EPS)?,
            qkv: linear(&vb.pp("attn.qkv"), d, 3 * d, true)?,
            proj: linear(&vb.pp("attn.proj"), d, d, true)?,
            gate: linear(&vb.pp("mlp.gate_proj"), d, i, true)?,
            up: linear(&vb.pp("mlp.up_proj"), d, i, true)?,
            down: linear(&vb.pp("mlp.down_proj"), i, d, true)?,
            num_heads: cfg.num_heads,
            act: cfg.hidden_act,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![
            &mut self.qkv,
            &mut self.proj,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }

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
        let n = self.norm2.forward(&h)?;
        let m = self.down.forward(
            &gated(
                &self.gate.forward(&n, mode)?,
                &self.up.forward(&n, mode)?,
                self.act,
            )?,
            mode,
        )?;
        h.add(&m)
    }
}

/// The merger, with this family's norm.
pub fn merger(vb: VarBuilder, cfg: &VisionConfig) -> Result<PatchMerger<RmsNorm>> {
    let ln_q = RmsNorm::load(&vb.pp("ln_q"), cfg.embed_dim, NORM_EPS)?;
    PatchMerger::load(vb, cfg, ln_q)
}

/// The window order of each image's merged tokens: `order[k]` is the merged token (in the
/// processor's order, over all images) that goes to position k, and the token counts of the
/// windows in that order (patches, i.e. merged tokens x merge²), empty windows left out.
///
/// Each frame's grid of merged tokens (h/m x w/m) is cut into windows of
/// `window_size / merge / patch` tokens a side from the top left; the last row and column of
/// windows are smaller when the grid does not divide.
pub fn window_order(
    grids: &[[usize; 3]],
    merge: usize,
    patch: usize,
    window_size: usize,
) -> (Vec<u32>, Vec<usize>) {
    let side = (window_size / merge / patch).max(1);
    let unit = merge * merge;
    let mut order = Vec::new();
    let mut windows = Vec::new();
    let mut base = 0usize;
    for &[t, h, w] in grids {
        let (gh, gw) = (h / merge, w / merge);
        for frame in 0..t {
            let frame_base = base + frame * gh * gw;
            for wr in 0..gh.div_ceil(side) {
                for wc in 0..gw.div_ceil(side) {
                    let mut count = 0;
                    for r in wr * side..((wr + 1) * side).min(gh) {
                        for c in wc * side..((wc + 1) * side).min(gw) {
                            order.push((frame_base + r * gw + c) as u32);
                            count += 1;
                        }
                    }
                    if count > 0 {
                        windows.push(count * unit);
                    }
                }
            }
        }
        base += t * gh * gw;
    }
    (order, windows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' get_vision_window_index for a 1x8x12 grid (merged 4x6), windows of 2
    /// merged tokens a side (window_size 56, patch 14, merge 2), by hand: windows in raster
    /// order, tokens in raster order within each.
    #[test]
    fn windows_follow_transformers_order() {
        let (order, windows) = window_order(&[[1, 8, 12]], 2, 14, 56);
        assert_eq!(
            order,
            vec![
                0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11, 12, 13, 18, 19, 14, 15, 20, 21, 16, 17, 22,
                23
            ]
        );
        assert_eq!(windows, vec![16; 6]);
        // 3x3 merged tokens with windows of 2: uneven edges, nothing dropped.
        let (order, windows) = window_order(&[[1, 6, 6], [1, 2, 2]], 2, 14, 56);
        assert_eq!(order, vec![0, 1, 3, 4, 2, 5, 6, 7, 8, 9]);
        assert_eq!(windows, vec![16, 8, 8, 4, 4]);
    }
}
