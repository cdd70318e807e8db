//! `x · W` for many rows against a bf16 weight stored input-major (k x n), on AVX-512 BF16
//! (`vdpbf16ps`: 16 lanes x a pair of bf16 products summed into f32 per instruction).
//!
//! Why: widening a bf16 weight to f32 and calling gemm runs at f32 speed at best; measured
//! on this project's Zen 5 machine, one core retires `vdpbf16ps` at 1.4x the multiply-adds
//! per second of f32 FMA. The activations are rounded to bf16 (round to nearest even), as
//! a bf16 matmul in PyTorch does; products and sums stay f32, and so does the output.
//!
//! Layout: the instruction multiplies pairs along k, so both operands are arranged in
//! pairs. A row of x rounded to bf16 in order already is (x[2q], x[2q+1]) per 32-bit lane.
//! The weight is repacked per call into panels of `NB` columns x `KC` pairs (lane j of pair
//! row q holds w[2q, j] and w[2q+1, j]), which stay in L2 while every row tile of x runs
//! over them; the repacking reads the weight once per call, small against m x n x k
//! products.

use rayon::prelude::*;

use super::SendPtr;

/// Columns per panel: four vectors of 16.
const NB: usize = 64;
/// Pairs of k per panel (512 values of k): a 64 KB panel.
const KC: usize = 256;
/// Rows of x per register tile (6 x 4 accumulators + 4 weight vectors + a broadcast).
const MR: usize = 6;

/// Whether this CPU has AVX-512 BF16 (checked once; cached by std).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out (m x n) = bf16(x) (m x k) · wt (k x n) (+ bias)`. Returns false (out untouched)
/// when the CPU lacks AVX-512 BF16.
pub fn linear(
    x: &[f32],
    wt: &[half::bf16],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) -> bool {
    assert!(x.len() >= m * k && wt.len() >= k * n && out.len() >= m * n);
    assert!(bias.is_none_or(|b| b.len() >= n));
    if !available() {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    // x rounded to bf16, rows padded to whole pairs with a zero.
    let kp = k.div_ceil(2);
    let mut xb = vec![0u32; m * kp];
    xb.par_chunks_mut(kp).enumerate().for_each(|(r, row)| {
        let src = &x[r * k..(r + 1) * k];
        // SAFETY: AVX-512 BF16 is present (checked above); the conversion reads src and
        // writes row, whose lengths it respects.
        let done = unsafe { avx512::round_pairs(src, row) };
        for (q, lane) in row.iter_mut().enumerate().skip(done) {
            let lo = half::bf16::from_f32(src[2 * q]).to_bits() as u32;
            let hi = src
                .get(2 * q + 1)
                .map_or(0, |&v| half::bf16::from_f32(v).to_bits() as u32);
            *lane = lo | (hi << 16);
        }
    });
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(NB)).into_par_iter().for_each_init(
        || vec![0u32; KC * NB],
        |panel, jb| {
            let j0 = jb * NB;
            let nc = NB.min(n - j0);
            let mut q0 = 0;
            while q0 < kp {
                let qc = KC.min(kp - q0);
                pack_panel(wt, (k, n), q0, qc, j0, nc, panel);
                let mut i = 0;
                while i < m {
                    let mr = MR.min(m - i);
                    // SAFETY: AVX-512 BF16 is present (checked above); the tile reads rows
                    // i..i+mr of xb (pairs q0..q0+qc) and the packed panel, and writes
                    // rows i..i+mr, columns j0..j0+nc of out, which only this task owns.
                    unsafe {
                        avx512::tile(
                            &xb[i * kp + q0..],
                            kp,
                            &panel[..qc * NB],
                            qc,
                            mr,
                            out_ptr.get().add(i * n + j0),
                            n,
                            nc,
                            if q0 == 0 {
                                Start::Bias(bias.map(|b| &b[j0..j0 + nc]))
                            } else {
                                Start::Accumulate
                            },
                        )
                    };
                    i += mr;
                }
                q0 += qc;
            }
        },
    );
    true
}

/// What a tile's accumulators start from.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// The first panel along k: zero, or the bias.
    Bias(Option<&'a [f32]>),
    /// A later panel: the partial sums already in `out`.
    Accumulate,
}

/// Pairs q0..q0+qc of columns j0..j0+nc of the weight, as bf16 pairs, NB lanes per pair row
/// (columns past nc and the row past k zero).
fn pack_panel(
    wt: &[half::bf16],
    (k, n): (usize, usize),
    q0: usize,
    qc: usize,
    j0: usize,
    nc: usize,
    panel: &mut [u32],
) {
    for q in 0..qc {
        let p = 2 * (q0 + q);
        let even = &wt[p * n + j0..p * n + j0 + nc];
        let dst = &mut panel[q * NB..(q + 1) * NB];
        if p + 1 < k {
            let odd = &wt[(p + 1) * n + j0..(p + 1) * n + j0 + nc];
            for ((d, e), o) in dst.iter_mut().zip(even).zip(odd) {
                *d = e.to_bits() as u32 | ((o.to_bits() as u32) << 16);
            }
        } else {
            for (d, e) in dst.iter_mut().zip(even) {
                *d = e.to_bits() as u32;
            }
        }
        dst[nc..].fill(0);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Start, MR, NB};
    use std::arch::x86_64::*;

    /// Rounds `src` to bf16 pairs into `dst`, 32 values per instruction (round to nearest
    /// even, as `half` does); returns how many pairs it wrote (the rest, under 16, is the
    /// caller's).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn round_pairs(src: &[f32], dst: &mut [u32]) -> usize {
        let mut q = 0;
        while 2 * q + 32 <= src.len() && q + 16 <= dst.len() {
            let lo = _mm512_loadu_ps(src.as_ptr().add(2 * q));
            let hi = _mm512_loadu_ps(src.as_ptr().add(2 * q + 16));
            // Lane order: the 16 values of `lo` first, then `hi`: consecutive values, so
            // each 32-bit lane holds (x[2q], x[2q + 1]).
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().add(q) as *mut _, v);
            q += 16;
        }
        q
    }

    /// `mr` (<= MR) rows x `nc` (<= NB) columns of the product over one panel of `qc`
    /// pairs. `xb` starts at the tile's first row and first pair; rows are `kp` pairs apart.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        xb: &[u32],
        kp: usize,
        panel: &[u32],
        qc: usize,
        mr: usize,
        out: *mut f32,
        n: usize,
        nc: usize,
        start: Start,
    ) {
        let masks: [__mmask16; 4] = std::array::from_fn(|c| {
            let cols = nc.saturating_sub(c * 16).min(16);
            ((1u32 << cols) - 1) as u16
        });
        let mut acc = [[_mm512_setzero_ps(); 4]; MR];
        for (r, row) in acc.iter_mut().enumerate().take(mr) {
            for (c, a) in row.iter_mut().enumerate() {
                *a = match start {
                    Start::Bias(Some(b)) => _mm512_maskz_loadu_ps(masks[c], b.as_ptr().add(c * 16)),
                    Start::Bias(None) => _mm512_setzero_ps(),
                    Start::Accumulate => _mm512_maskz_loadu_ps(masks[c], out.add(r * n + c * 16)),
                };
            }
        }
        let xp = xb.as_ptr();
        let pp = panel.as_ptr();
        match mr {
            6 => run::<6>(xp, kp, pp, qc, &mut acc),
            5 => run::<5>(xp, kp, pp, qc, &mut acc),
            4 => run::<4>(xp, kp, pp, qc, &mut acc),
            3 => run::<3>(xp, kp, pp, qc, &mut acc),
            2 => run::<2>(xp, kp, pp, qc, &mut acc),
            _ => run::<1>(xp, kp, pp, qc, &mut acc),
        }
        for (r, row) in acc.iter().enumerate().take(mr) {
            for (c, a) in row.iter().enumerate() {
                if masks[c] != 0 {
                    _mm512_mask_storeu_ps(out.add(r * n + c * 16), masks[c], *a);
                }
            }
        }
    }

    /// The inner loop for R rows: per pair, four weight vectors and R broadcasts feed
    /// 4R dot-product instructions.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn run<const R: usize>(
        xp: *const u32,
        kp: usize,
        pp: *const u32,
        qc: usize,
        acc_out: &mut [[__m512; 4]; MR],
    ) {
        // A local array of exactly R rows, so the compiler keeps it in registers.
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        acc.copy_from_slice(&acc_out[..R]);
        for q in 0..qc {
            let w = pp.add(q * NB);
            let b: [__m512bh; 4] = std::array::from_fn(|c| {
                std::mem::transmute(_mm512_loadu_si512(w.add(c * 16) as *const _))
            });
            for (r, row) in acc.iter_mut().enumerate() {
                let a: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*xp.add(r * kp + q) as i32));
                for (c, v) in row.iter_mut().enumerate() {
                    *v = _mm512_dpbf16_ps(*v, a, b[c]);
                }
            }
        }
        acc_out[..R].copy_from_slice(&acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every edge (row tiles, column panels, odd k, several k panels, bias or none) gives
    /// the product of the bf16-rounded activations and the bf16 weights, summed in f32.
    #[test]
    fn matches_the_definition_for_every_edge_shape() {
        if !available() {
            return; // no AVX-512 BF16 here: callers widen to f32 and use gemm
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 3),
            (13, 37, 70),
            (6, 600, 64),
            (20, 1100, 130),
        ] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.31).sin()).collect();
            let wt: Vec<half::bf16> = (0..k * n)
                .map(|i| half::bf16::from_f32((i as f32 * 0.17).cos()))
                .collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            for bias in [None, Some(b.as_slice())] {
                let mut out = vec![f32::NAN; m * n];
                assert!(linear(&x, &wt, bias, (m, k, n), &mut out));
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|p| {
                                let xr = half::bf16::from_f32(x[i * k + p]).to_f32() as f64;
                                xr * wt[p * n + j].to_f32() as f64
                            })
                            .sum::<f64>()
                            + bias.map_or(0.0, |b| b[j] as f64);
                        let got = out[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-3,
                            "({m},{k},{n}) [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
