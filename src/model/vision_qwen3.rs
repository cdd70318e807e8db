//! Qwen3-VL's vision tower, as transformers 5.24 defines it (models/qwen3_vl/
//! modeling_qwen3_vl.py and vision_utils.py): Qwen2-VL's LayerNorm blocks (MLP named
//! `linear_fc1` / `linear_fc2`, tanh GELU in the releases) and merger (`norm`, `linear_fc1`,
//! `linear_fc2`), plus three things of its own:
//!
//! - the patch embedding has a bias;
//! - a learned `side x side` table of absolute position embeddings, resampled to each image's
//!   patch grid ([`position_embeddings`]) and added to the patch embeddings;
//! - DeepStack: the outputs of the blocks in `deepstack_visual_indexes` go through mergers of
//!   their own, which group each 2x2 window before their LayerNorm ("postshuffle").

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::config::VisionConfig;
use super::layers::LayerNorm;
use super::rope::vision_patch_rowcol;
use super::vision::{PatchMerger, VisionTower};
use super::vision_qwen2::{Block, LN_EPS};

const MERGER_NAMES: [&str; 2] = ["linear_fc1", "linear_fc2"];

/// Loads the tower under `vb` (`model.visual`), the patch embedding already read.
pub fn load(vb: VarBuilder, cfg: &VisionConfig, patch_embed: Tensor) -> Result<VisionTower> {
    let d = cfg.embed_dim;
    let side = cfg.position_grid.ok_or_else(|| {
        candle_core::Error::Msg("Qwen3-VL vision config without a position grid".into())
    })?;
    let patch_bias = vb.get(d, "patch_embed.proj.bias")?;
    let pos_embed = vb.get((side * side, d), "pos_embed.weight")?;
    let blocks = (0..cfg.depth)
        .map(|i| {
            Block::load_named(
                vb.pp(format!("blocks.{i}")),
                cfg,
                ["mlp.linear_fc1", "mlp.linear_fc2"],
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let merger = PatchMerger::load_named(
        vb.pp("merger"),
        cfg,
        LayerNorm::load(&vb.pp("merger.norm"), d, LN_EPS)?,
        MERGER_NAMES,
        false,
    )?;
    let merged = d * cfg.spatial_merge_size * cfg.spatial_merge_size;
    let deepstack = cfg
        .deepstack
        .iter()
        .enumerate()
        .map(|(j, &block)| {
            let mvb = vb.pp(format!("deepstack_merger_list.{j}"));
            let norm = LayerNorm::load(&mvb.pp("norm"), merged, LN_EPS)?;
            Ok((
                block,
                PatchMerger::load_named(mvb, cfg, norm, MERGER_NAMES, true)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(VisionTower::qwen3(
        patch_embed,
        patch_bias,
        pos_embed,
        blocks,
        merger,
        deepstack,
        cfg,
    ))
}

/// The two taps along one axis of the `side`-long table for position `index` of an axis of
/// `size` patches, and their weights: bilinear with `align_corners=True`, in f32 and in the
/// order of transformers 5.24's `_interpolation_axis_taps_weights` (vision_utils.py), so the
/// weights are the same floats: `src = index x (side - 1) / max(size - 1, 1)`, taps
/// `floor(src)` and `floor(src) + 1` clamped to the table, weights `max(1 - |src - floor -
/// offset|, 0)`.
fn axis_taps(index: usize, size: usize, side: usize) -> [(usize, f32); 2] {
    let src = (index as f32 * (side - 1) as f32) / size.saturating_sub(1).max(1) as f32;
    let floor = src.floor();
    let frac = src - floor;
    [0usize, 1].map(|offset| {
        let tap = (floor as usize + offset).min(side - 1);
        let distance = (frac - offset as f32).abs();
        (tap, (1.0 - distance).max(0.0))
    })
}

/// Table rows and f32 weights of the four taps of every patch of `grids`, in the tower's
/// patch order (each image's patches in 2x2-window order, repeated over its frames): taps
/// `(h0, w0), (h0, w1), (h1, w0), (h1, w1)` with weights `wh x ww` (transformers 5.24,
/// `get_vision_interpolation_indices_and_weights`).
pub fn interpolation_taps(grids: &[[usize; 3]], merge: usize, side: usize) -> (Vec<u32>, Vec<f32>) {
    let mut rows = Vec::new();
    let mut weights = Vec::new();
    for &[t, h, w] in grids {
        for (r, c) in vision_patch_rowcol(&[[t, h, w]], merge) {
            for (th, wh) in axis_taps(r, h, side) {
                for (tw, ww) in axis_taps(c, w, side) {
                    rows.push((th * side + tw) as u32);
                    weights.push(wh * ww);
                }
            }
        }
    }
    (rows, weights)
}

/// The learned position embeddings of every patch of `grids`, (patches, embed_dim), in f32 (or
/// f64 for an f64 table): the four taps' rows times their f32 weights, summed, as transformers
/// computes `(pos_embed(indices) * weights[:, :, None]).sum(1)` (a bf16 table promoted to f32
/// by the f32 weights). Differentiable in `table`.
pub fn position_embeddings(
    table: &Tensor,
    side: usize,
    grids: &[[usize; 3]],
    merge: usize,
) -> Result<Tensor> {
    let (rows, weights) = interpolation_taps(grids, merge, side);
    let n = rows.len() / 4;
    let d = table.dim(1)?;
    let up = super::layers::upcast(table.dtype());
    let dev = table.device();
    let gathered = table
        .index_select(&Tensor::from_vec(rows, 4 * n, dev)?, 0)?
        .to_dtype(up)?
        .reshape((n, 4, d))?;
    let w = Tensor::from_vec(weights, (n, 4, 1), dev)?.to_dtype(up)?;
    // Summed tap by tap in order, as torch reduces the small middle axis.
    let prod = gathered.broadcast_mul(&w)?;
    let mut sum = prod.narrow(1, 0, 1)?;
    for k in 1..4 {
        sum = sum.add(&prod.narrow(1, k, 1)?)?;
    }
    sum.squeeze(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' weights by hand: a 4-patch axis on an 8-entry table maps patch 1 to
    /// 7/3 = 2.333.. (taps 2 and 3, weights 0.666.. and 0.333..), the ends to 0 and 7 exactly
    /// (the far tap clamped, weight 0), and a 1-patch axis to 0.
    #[test]
    fn taps_follow_align_corners() {
        let [(a, wa), (b, wb)] = axis_taps(1, 4, 8);
        let src = 7.0f32 / 3.0;
        assert_eq!((a, b), (2, 3));
        assert_eq!(wa, 1.0 - (src - 2.0));
        assert_eq!(wb, 1.0 - ((src - 2.0) - 1.0).abs());
        assert_eq!(axis_taps(3, 4, 8), [(7, 1.0), (7, 0.0)]);
        assert_eq!(axis_taps(0, 4, 8), [(0, 1.0), (1, 0.0)]);
        assert_eq!(axis_taps(0, 1, 8), [(0, 1.0), (1, 0.0)]);
        // Upsampling a 2-entry table to 3: the middle patch halves.
        assert_eq!(axis_taps(1, 3, 2), [(0, 0.5), (1, 0.5)]);
    }

    /// Patches come in 2x2-window order: the second patch of a 2x4 grid is row 0, column 1;
    /// the third is row 1, column 0.
    #[test]
    fn taps_follow_the_patch_order() {
        let (rows, w) = interpolation_taps(&[[1, 2, 4]], 2, 4);
        assert_eq!(rows.len(), 32);
        // Patch 2 = (row 1, col 0): row 1 of 2 maps to table row 3 (weight 1 on tap 3).
        assert_eq!(&rows[8..12], &[12, 13, 12, 13]);
        assert_eq!(&w[8..12], &[1.0, 0.0, 0.0, 0.0]);
    }
}
