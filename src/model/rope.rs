//! Rotary position embeddings: M-RoPE for the decoder, 2D RoPE for the vision tower.
//!
//! Both are computed on the host in f32 (as transformers does, with autocast off) and then
//! moved to the device: the tables are tiny next to the attention they feed.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// One token's position on the (temporal, height, width) axes.
pub type Pos3 = [i64; 3];

/// The prompt tokens that stand for vision features, and how a video's frames are spaced on
/// the temporal axis.
#[derive(Debug, Clone, Copy)]
pub struct VisionTokens {
    pub image: u32,
    pub video: u32,
    /// Temporal position step between a video's temporal patches: 1 in Qwen2-VL;
    /// `tokens_per_second x second_per_grid_t` in Qwen2.5-VL (positions `floor(t x step)`).
    pub video_time_interval: f64,
}

/// M-RoPE positions of one unpadded sequence, as transformers 4.57's `get_rope_index` (the
/// rule of the released models and of vLLM): text tokens share one counter on all three
/// axes; the `t*h*w/merge²` pad tokens of an image or video get (t, row, col) offsets from
/// the position after the preceding text (a video's t scaled by its time interval); text
/// after them resumes at the largest position used so far plus one.
///
/// (transformers 5.24 resumes at the start plus `max(h, w) / merge` instead, which differs
/// from the released rule after a video whose temporal extent is the larger one.)
///
/// Returns the positions and the rope delta: how far the next position (`max + 1`) is from the
/// sequence length, which is what decoding adds to the cache length for each new token.
pub fn mrope_positions(
    input_ids: &[u32],
    grids: &[[usize; 3]],
    vision: VisionTokens,
    spatial_merge_size: usize,
) -> Result<(Vec<Pos3>, i64)> {
    let mut out: Vec<Pos3> = Vec::with_capacity(input_ids.len());
    let mut next: i64 = 0; // max position so far + 1
    let mut grids = grids.iter();
    let mut i = 0;
    while i < input_ids.len() {
        let tok = input_ids[i];
        if tok != vision.image && tok != vision.video {
            out.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let Some(&[t, h, w]) = grids.next() else {
            bail!("the prompt has more image placeholder runs than images");
        };
        let (gh, gw) = (h / spatial_merge_size, w / spatial_merge_size);
        let n = t * gh * gw;
        if i + n > input_ids.len() || input_ids[i..i + n].iter().any(|&id| id != tok) {
            bail!(
                "image placeholder run at token {i} is shorter than the image's {n} tokens \
                 (grid {t}x{h}x{w})"
            );
        }
        let step = if tok == vision.video {
            vision.video_time_interval
        } else {
            1.0
        };
        let base = next;
        let mut max = base;
        for ti in 0..t {
            // torch's `(arange(t) * interval).long()`: truncation of the f32 product.
            let tp = base + (ti as f32 * step as f32) as i64;
            for hi in 0..gh {
                for wi in 0..gw {
                    let p = [tp, base + hi as i64, base + wi as i64];
                    max = max.max(p[0]).max(p[1]).max(p[2]);
                    out.push(p);
                }
            }
        }
        next = max + 1;
        i += n;
    }
    if grids.next().is_some() {
        bail!("more images than image placeholder runs in the prompt");
    }
    let delta = next - input_ids.len() as i64;
    Ok((out, delta))
}

/// Inverse frequencies `1 / theta^(2i/dim)` for i in 0..dim/2, in f32 like torch.
fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// Which position axis (0 temporal, 1 height, 2 width) drives each of the `n` rotary
/// frequencies.
///
/// Qwen2(.5)-VL: the first `section[0]` frequencies follow t, the next `section[1]` h, the
/// rest w. Qwen3-VL interleaves them (transformers 5.24, modeling_qwen3_vl.py,
/// `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`): starting from all-t, frequency `i`
/// takes h where `i % 3 == 1 and i < 3 x section[1]`, and w where `i % 3 == 2 and i < 3 x
/// section[2]` (for [24, 20, 20]: h at 1, 4, .., 58, w at 2, 5, .., 59, t at the rest).
pub fn axes_of_frequencies(n: usize, section: [usize; 3], interleaved: bool) -> Vec<usize> {
    if interleaved {
        return (0..n)
            .map(|i| match i % 3 {
                1 if i < 3 * section[1] => 1,
                2 if i < 3 * section[2] => 2,
                _ => 0,
            })
            .collect();
    }
    let mut axes = Vec::with_capacity(n);
    for (axis, &k) in section.iter().enumerate() {
        axes.extend(std::iter::repeat_n(axis, k));
    }
    debug_assert_eq!(axes.len(), n);
    axes
}

/// The decoder's multimodal rotary tables.
#[derive(Debug, Clone)]
pub struct MRope {
    head_dim: usize,
    inv_freq: Vec<f32>,
    /// For each of the head_dim/2 frequencies, which position axis (t, h, w) drives it.
    axis_of_freq: Vec<usize>,
}

impl MRope {
    /// `interleaved`: Qwen3-VL's layout, else Qwen2(.5)-VL's contiguous sections (see
    /// [`axes_of_frequencies`]).
    pub fn new(head_dim: usize, theta: f64, mrope_section: [usize; 3], interleaved: bool) -> Self {
        let axis_of_freq = axes_of_frequencies(head_dim / 2, mrope_section, interleaved);
        Self {
            head_dim,
            inv_freq: inv_freq(head_dim, theta),
            axis_of_freq,
        }
    }

    /// cos and sin tables of shape (batch, seq, head_dim) for `positions[b][l]`.
    pub fn tables(
        &self,
        positions: &[Vec<Pos3>],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let b = positions.len();
        let l = positions.first().map_or(0, Vec::len);
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(b * l * self.head_dim);
        let mut sin = Vec::with_capacity(b * l * self.head_dim);
        for seq in positions {
            if seq.len() != l {
                candle_core::bail!("rope tables need equal-length rows");
            }
            for p in seq {
                let start = cos.len();
                for (i, &f) in self.inv_freq.iter().enumerate() {
                    let angle = p[self.axis_of_freq[i]] as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
                // emb = cat(freqs, freqs)
                cos.extend_from_within(start..start + half);
                sin.extend_from_within(start..start + half);
            }
        }
        let shape = (b, l, self.head_dim);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Per-patch (row, col) of the vision tower's input, in the processor's 2x2-merge-window
/// order, for every image in turn (each repeated over its temporal frames).
pub fn vision_patch_rowcol(grids: &[[usize; 3]], merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for bh in 0..h / merge {
                for bw in 0..w / merge {
                    for dh in 0..merge {
                        for dw in 0..merge {
                            out.push((bh * merge + dh, bw * merge + dw));
                        }
                    }
                }
            }
        }
    }
    out
}

/// cos and sin of the vision tower's 2D rotary embedding, shape (num_patches, head_dim), f32.
/// The first quarter of each half rotates with the row, the second quarter with the column.
pub fn vision_tables(
    grids: &[[usize; 3]],
    merge: usize,
    head_dim: usize,
    theta: f64,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let rot_dim = head_dim / 2;
    let freqs = inv_freq(rot_dim, theta);
    let rc = vision_patch_rowcol(grids, merge);
    let mut cos = Vec::with_capacity(rc.len() * head_dim);
    let mut sin = Vec::with_capacity(rc.len() * head_dim);
    for &(r, c) in &rc {
        let start = cos.len();
        for coord in [r, c] {
            for &f in &freqs {
                let angle = coord as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        cos.extend_from_within(start..start + rot_dim);
        sin.extend_from_within(start..start + rot_dim);
    }
    let n = rc.len();
    Ok((
        Tensor::from_vec(cos, (n, head_dim), device)?,
        Tensor::from_vec(sin, (n, head_dim), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: u32 = 9;
    const VID: u32 = 10;
    const TOKENS: VisionTokens = VisionTokens {
        image: IMG,
        video: VID,
        video_time_interval: 1.0,
    };

    /// The worked example of transformers' get_rope_index docstring, shifted by a text prefix:
    /// 3 text tokens, a 1x4x6 grid (merge 2 -> 1x2x3 tokens), 2 text tokens.
    #[test]
    fn positions_follow_the_documented_layout() {
        let mut ids = vec![1, 2, 3];
        ids.extend([IMG; 6]);
        ids.extend([4, 5]);
        let (pos, delta) = mrope_positions(&ids, &[[1, 4, 6]], TOKENS, 2).unwrap();
        let expect: Vec<Pos3> = vec![
            [0, 0, 0],
            [1, 1, 1],
            [2, 2, 2],
            [3, 3, 3],
            [3, 3, 4],
            [3, 3, 5],
            [3, 4, 3],
            [3, 4, 4],
            [3, 4, 5],
            [6, 6, 6],
            [7, 7, 7],
        ];
        assert_eq!(pos, expect);
        // next position is 8, sequence length 11
        assert_eq!(delta, 8 - 11);
    }

    #[test]
    fn text_only_is_plain_counting() {
        let (pos, delta) = mrope_positions(&[5, 6, 7], &[], TOKENS, 2).unwrap();
        assert_eq!(pos, vec![[0; 3], [1; 3], [2; 3]]);
        assert_eq!(delta, 0);
    }

    #[test]
    fn mismatched_images_are_errors() {
        assert!(mrope_positions(&[1, IMG, IMG], &[[1, 4, 4]], TOKENS, 2).is_err());
        assert!(mrope_positions(&[1, 2], &[[1, 2, 2]], TOKENS, 2).is_err());
        assert!(mrope_positions(&[IMG, 1], &[], TOKENS, 2).is_err());
    }

    /// A video of 3 temporal patches of 2x2 merged tokens with time interval 2.5 (Qwen2.5-VL's
    /// tokens_per_second 2.5 at one second per temporal patch), one text token before and
    /// after, by hand from transformers 4.57's rule: t = floor(k x 2.5) = 0, 2, 5; the text
    /// after resumes at max + 1 = 1 + 5 + 1 = 7. An image run of the same grid would not be
    /// scaled, and a video run of image tokens' length must use the video token throughout.
    #[test]
    fn video_runs_space_their_frames() {
        let tokens = VisionTokens {
            video_time_interval: 2.5,
            ..TOKENS
        };
        let mut ids = vec![1];
        ids.extend([VID; 12]);
        ids.push(2);
        let (pos, delta) = mrope_positions(&ids, &[[3, 4, 4]], tokens, 2).unwrap();
        assert_eq!(pos[0], [0; 3]);
        let mut want = Vec::new();
        for t in [0, 2, 5] {
            for r in 0..2 {
                for c in 0..2 {
                    want.push([1 + t, 1 + r, 1 + c]);
                }
            }
        }
        assert_eq!(&pos[1..13], &want[..]);
        assert_eq!(pos[13], [7; 3]);
        assert_eq!(delta, 8 - 14);
        // The same run as an image: t positions 0, 1, 2, text after at 1 + 2 + 1 = 4.
        let img: Vec<u32> = ids
            .iter()
            .map(|&t| if t == VID { IMG } else { t })
            .collect();
        let (pos, _) = mrope_positions(&img, &[[3, 4, 4]], tokens, 2).unwrap();
        assert_eq!(pos[9], [1 + 2, 1, 1]);
        assert_eq!(pos[13], [4; 3]);
        let mut mixed = ids.clone();
        mixed[5] = IMG;
        assert!(mrope_positions(&mixed, &[[3, 4, 4]], tokens, 2).is_err());
    }

    #[test]
    fn mrope_axes_follow_sections() {
        // head_dim 8 -> 4 freqs, sections [1, 2, 1]: freq 0 <- t, 1..3 <- h, 3 <- w
        let r = MRope::new(8, 10_000.0, [1, 2, 1], false);
        let (cos, _) = r
            .tables(&[vec![[0, 5, 7]]], DType::F32, &Device::Cpu)
            .unwrap();
        let c: Vec<f32> = cos.flatten_all().unwrap().to_vec1().unwrap();
        let f = inv_freq(8, 10_000.0);
        let want = [
            1.0,
            (5.0 * f[1]).cos(),
            (5.0 * f[2]).cos(),
            (7.0 * f[3]).cos(),
        ];
        for j in 0..8 {
            assert!((c[j] - want[j % 4]).abs() < 1e-7, "dim {j}");
        }
    }

    /// Qwen3-VL's released split [24, 20, 20] of 64 frequencies, by transformers' rule: h at
    /// 1, 4, .., 58, w at 2, 5, .., 59, t at 0, 3, .., 57 and 60..63 (24, 20, 20 of them).
    #[test]
    fn interleaved_axes_follow_transformers() {
        let axes = axes_of_frequencies(64, [24, 20, 20], true);
        for (i, &a) in axes.iter().enumerate() {
            let want = if i >= 60 { 0 } else { i % 3 };
            assert_eq!(a, want, "frequency {i}");
        }
        let count = |k| axes.iter().filter(|&&a| a == k).count();
        assert_eq!((count(0), count(1), count(2)), (24, 20, 20));
        // Sections longer than the interleaving can hold stop at the last frequency.
        assert_eq!(
            axes_of_frequencies(8, [2, 3, 3], true),
            vec![0, 1, 2, 0, 1, 2, 0, 1]
        );
    }

    #[test]
    fn vision_rowcol_is_merge_window_order() {
        let rc = vision_patch_rowcol(&[[1, 2, 4]], 2);
        assert_eq!(
            rc,
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3)
            ]
        );
    }
}
