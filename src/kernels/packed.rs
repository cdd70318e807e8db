//! `x · W` against a weight stored input-major, (in, out) row-major: the layout inference
//! keeps its linear layers in (see `Qwen2Vl::prepare_for_inference`).
//!
//! Why: checkpoints store W as (out, in), so `x · Wᵀ` hands gemm a right-hand side whose
//! rows are strided by `in`. gemm repacks that operand on every call, and on this layout its
//! packing is a gather: measured on a 2-core AVX-512 machine, a (358 x 3072) · (3072 x 768)
//! product took 12.5-14.9 ms from the (out, in) layout and 5.2 ms from (in, out), and the
//! vision tower's MLP down-projection 12.6 vs 6.6 ms. Transposing once at load costs no
//! memory (the (out, in) copy is dropped) and turns every product into gemm's fast case.
//!
//! One row (decoding a single sequence) takes a streaming kernel instead: gemm packs the
//! whole weight for a single output row, while the product only needs to read it once.

//!
//! Weights stored in bf16 (`--dtype bf16` on the CPU: half the memory, activations in f32)
//! are stored so only on CPUs without AVX-512 BF16 (those with it keep them (out, in) for
//! `bf16dot`'s kernels, see `Linear::pack_for_inference`); here they are widened as they
//! are read: row by row inside the streaming kernel, and a block of rows at a time into a
//! reused f32 buffer ahead of gemm. f16 weights (an imported GGUF's f16 vision tower, an
//! f16 checkpoint's linear layers) are kept and widened the same way: no CPU here has an
//! f16 dot product, and widening keeps every value exact.

use rayon::prelude::*;

use super::gemm::{matmul, Mat};
use super::skinny::WeightElem;

/// Rows at or below which [`linear`] streams an f32 weight instead of calling gemm.
pub const STREAM_ROWS: usize = 2;

/// The same for a bf16 weight: widening it for gemm costs a full extra pass over the
/// weight, which only pays off once enough rows share it.
pub const STREAM_ROWS_WIDENED: usize = 8;

/// Weight rows widened to f32 per gemm call when the weight is not f32: large enough for
/// gemm's own blocking over k, small enough for the buffer to stay in cache.
const WIDEN_ROWS: usize = 256;

thread_local! {
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out (m x n) = x (m x k) · wt (k x n) (+ bias)`, all row-major, on the pool's threads.
pub fn linear<W: WeightElem>(
    x: &[f32],
    wt: &[W],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) {
    assert!(x.len() >= m * k && wt.len() >= k * n && out.len() >= m * n);
    assert!(bias.is_none_or(|b| b.len() >= n));
    if m == 0 || n == 0 {
        return;
    }
    let wide = std::any::TypeId::of::<W>() != std::any::TypeId::of::<f32>();
    let stream_rows = if wide {
        STREAM_ROWS_WIDENED
    } else {
        STREAM_ROWS
    };
    if m <= stream_rows && stream(x, wt, bias, (m, k, n), out) {
        return;
    }
    gemm_product(x, wt, bias, (m, k, n), out);
}

/// The product through gemm: directly for f32 weights, through blocks of widened rows
/// otherwise.
fn gemm_product<W: WeightElem>(
    x: &[f32],
    wt: &[W],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) {
    // gemm accumulates onto the bias rows: one pass over the output instead of two.
    let mut accumulate = match bias {
        Some(b) => {
            for row in out[..m * n].chunks_exact_mut(n) {
                row.copy_from_slice(&b[..n]);
            }
            true
        }
        None => false,
    };
    let threads = rayon::current_num_threads();
    if let Some(wt) = as_f32(wt) {
        matmul(
            out,
            Mat::rows(x, m, k),
            Mat::rows(wt, k, n),
            1.0,
            accumulate,
            threads,
        );
        return;
    }
    WIDE.with(|buf| {
        let mut buf = buf.borrow_mut();
        let rows = WIDEN_ROWS.min(k);
        if buf.len() < rows * n {
            buf.resize(rows * n, 0.0);
        }
        let mut p0 = 0;
        while p0 < k {
            let kb = rows.min(k - p0);
            let dst = &mut buf[..kb * n];
            let src = &wt[p0 * n..(p0 + kb) * n];
            dst.par_chunks_mut(4096)
                .zip(src.par_chunks(4096))
                .for_each(|(d, s)| W::widen(s, d));
            // Columns p0..p0 + kb of x against the widened rows.
            let lhs = Mat {
                data: &x[p0..],
                rows: m,
                cols: kb,
                row_stride: k,
                col_stride: 1,
            };
            matmul(out, lhs, Mat::rows(dst, kb, n), 1.0, accumulate, threads);
            accumulate = true;
            p0 += kb;
        }
    });
}

/// `wt` as f32, when it is.
fn as_f32<W: WeightElem>(wt: &[W]) -> Option<&[f32]> {
    (std::any::TypeId::of::<W>() == std::any::TypeId::of::<f32>()).then(|| {
        // SAFETY: W is f32 (checked just above), so the slice is reinterpreted as itself.
        unsafe { std::slice::from_raw_parts(wt.as_ptr() as *const f32, wt.len()) }
    })
}

/// The few-rows case: the weight's rows are split into one contiguous slab per task, so each
/// task streams its slab from memory front to back once (the access pattern prefetchers
/// like best; bands of columns, one per task, read short strided pieces of every row and
/// ran at half the speed). Each task sums into its own m x n partial product, in cache;
/// the partials are added at the end. 512-bit on AVX-512, 256-bit on AVX2 (with FMA and
/// F16C); returns false on other CPUs (the caller uses gemm, which for one row and a
/// widened weight costs a second pass over it: bf16 decoding on an AVX2 Zen 3 ran at a
/// third of its bandwidth through gemm).
fn stream<W: WeightElem>(
    x: &[f32],
    wt: &[W],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512() || super::has_avx2() {
        let wide = super::has_avx512();
        let partial = super::slab_partials(k, m * n, |rows, acc| {
            // SAFETY: AVX-512F (`wide`) or AVX2, FMA and F16C are present (checked above);
            // the slab lies inside 0..k, x holds m x k floats and wt k x n (asserted by
            // `linear`, the only caller), and acc holds m x n floats.
            unsafe {
                if wide {
                    avx512::slab(x, wt, (m, k, n), rows.start, rows.end, acc)
                } else {
                    avx2::slab(x, wt, (m, k, n), rows.start, rows.end, acc)
                }
            };
        });
        let out = &mut out[..m * n];
        match bias {
            Some(b) => {
                for row in out.chunks_exact_mut(n) {
                    row.copy_from_slice(&b[..n]);
                }
            }
            None => out.fill(0.0),
        }
        for acc in partial.chunks_exact(m * n) {
            for (o, a) in out.iter_mut().zip(acc) {
                *o += a;
            }
        }
        return true;
    }
    let _ = (x, wt, bias, m, k, n, out);
    false
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::WeightElem;
    use std::arch::x86_64::*;

    /// The last `len` (< 16) weights of a row from `p`, widened, zeros after.
    ///
    /// # Safety
    /// AVX-512F must be present (the load; this has no `target_feature` of its own and is
    /// only inlined into [`slab`]), and `p` must point to `len.min(16)` readable `W`s,
    /// aligned for `W` as any pointer into a `&[W]` is (they are read one by one).
    #[inline(always)]
    unsafe fn load_tail<W: WeightElem>(p: *const W, len: usize) -> __m512 {
        let mut t = [0f32; 16];
        for (q, v) in t.iter_mut().enumerate().take(len) {
            *v = (*p.add(q)).to_f32();
        }
        _mm512_loadu_ps(t.as_ptr())
    }

    /// `acc (m x n) += x[:, p0..p1] · wt[p0..p1, :]`, four weight rows at a time.
    ///
    /// # Safety
    /// AVX-512F must be present. Nothing is bounds-checked: `p1 <= k`, and `x` must hold
    /// `m * k` floats (columns p0..p1 of each row are read), `wt` at least `p1 * n` values
    /// (rows p0..p1), `acc` `m * n` floats (the column tail is masked).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn slab<W: WeightElem>(
        x: &[f32],
        wt: &[W],
        (m, k, n): (usize, usize, usize),
        p0: usize,
        p1: usize,
        acc: &mut [f32],
    ) {
        let full = n / 16 * 16;
        let tail = n - full;
        let tmask: __mmask16 = ((1u32 << tail) - 1) as u16;
        let w = wt.as_ptr();
        let mut p = p0;
        while p + 4 <= p1 {
            let rows = [
                w.add(p * n),
                w.add((p + 1) * n),
                w.add((p + 2) * n),
                w.add((p + 3) * n),
            ];
            for r in 0..m {
                let xr = x.as_ptr().add(r * k + p);
                let xs = [
                    _mm512_set1_ps(*xr),
                    _mm512_set1_ps(*xr.add(1)),
                    _mm512_set1_ps(*xr.add(2)),
                    _mm512_set1_ps(*xr.add(3)),
                ];
                let a = acc.as_mut_ptr().add(r * n);
                let mut j = 0;
                while j < full {
                    let mut s = _mm512_loadu_ps(a.add(j));
                    for q in 0..4 {
                        s = _mm512_fmadd_ps(xs[q], W::load16(rows[q].add(j)), s);
                    }
                    _mm512_storeu_ps(a.add(j), s);
                    j += 16;
                }
                if tail > 0 {
                    let mut s = _mm512_maskz_loadu_ps(tmask, a.add(j));
                    for q in 0..4 {
                        s = _mm512_fmadd_ps(xs[q], load_tail(rows[q].add(j), tail), s);
                    }
                    _mm512_mask_storeu_ps(a.add(j), tmask, s);
                }
            }
            p += 4;
        }
        while p < p1 {
            let row = w.add(p * n);
            for r in 0..m {
                let xv = _mm512_set1_ps(*x.as_ptr().add(r * k + p));
                let a = acc.as_mut_ptr().add(r * n);
                let mut j = 0;
                while j < full {
                    let s = _mm512_fmadd_ps(xv, W::load16(row.add(j)), _mm512_loadu_ps(a.add(j)));
                    _mm512_storeu_ps(a.add(j), s);
                    j += 16;
                }
                if tail > 0 {
                    let s = _mm512_fmadd_ps(
                        xv,
                        load_tail(row.add(j), tail),
                        _mm512_maskz_loadu_ps(tmask, a.add(j)),
                    );
                    _mm512_mask_storeu_ps(a.add(j), tmask, s);
                }
            }
            p += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::WeightElem;
    use std::arch::x86_64::*;

    /// [`super::avx512::slab`] in 256-bit registers: `acc (m x n) += x[:, p0..p1] ·
    /// wt[p0..p1, :]`, four weight rows at a time; the last `n % 8` columns are summed one
    /// by one.
    ///
    /// The four rows are not neighbours but one from each quarter of the slab: four long
    /// front-to-back streams. Four neighbouring rows are four short streams (a 1,536-wide
    /// bf16 row is 3 KB) that restart every four rows, and the hardware prefetcher, which
    /// follows a stream only after a few lines of it, never got ahead of them: measured on
    /// an AVX2 Zen 3 (one thread), a 1,536 x 8,960 bf16 product streamed 12 GB/s that way
    /// and 21-22 GB/s this way, a 256-wide one 8-9 and 23.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be present. Nothing is bounds-checked: `p1 <= k`, and `x`
    /// must hold `m * k` floats, `wt` at least `p1 * n` values, `acc` `m * n` floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn slab<W: WeightElem>(
        x: &[f32],
        wt: &[W],
        (m, k, n): (usize, usize, usize),
        p0: usize,
        p1: usize,
        acc: &mut [f32],
    ) {
        let full = n / 8 * 8;
        let w = wt.as_ptr();
        let quarter = (p1 - p0) / 4;
        for i in 0..quarter {
            let p = [0, 1, 2, 3].map(|t| p0 + t * quarter + i);
            let rows = p.map(|p| w.add(p * n));
            for r in 0..m {
                let xr = x.as_ptr().add(r * k);
                let xs = p.map(|p| _mm256_set1_ps(*xr.add(p)));
                let a = acc.as_mut_ptr().add(r * n);
                let mut j = 0;
                while j < full {
                    let mut s = _mm256_loadu_ps(a.add(j));
                    for t in 0..4 {
                        s = _mm256_fmadd_ps(xs[t], W::load8(rows[t].add(j)), s);
                    }
                    _mm256_storeu_ps(a.add(j), s);
                    j += 8;
                }
                for j in full..n {
                    let mut v = *a.add(j);
                    for t in 0..4 {
                        v += *xr.add(p[t]) * (*rows[t].add(j)).to_f32();
                    }
                    *a.add(j) = v;
                }
            }
        }
        // The rows the quarters leave over (fewer than four), one at a time.
        for p in p0 + 4 * quarter..p1 {
            let row = w.add(p * n);
            for r in 0..m {
                let xv = _mm256_set1_ps(*x.as_ptr().add(r * k + p));
                let a = acc.as_mut_ptr().add(r * n);
                let mut j = 0;
                while j < full {
                    let s = _mm256_fmadd_ps(xv, W::load8(row.add(j)), _mm256_loadu_ps(a.add(j)));
                    _mm256_storeu_ps(a.add(j), s);
                    j += 8;
                }
                for j in full..n {
                    *a.add(j) += *x.as_ptr().add(r * k + p) * (*row.add(j)).to_f32();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row count (streamed and gemm), ragged column bands and bias or none give the
    /// product by its definition. Without AVX-512 the slab kernel declines and gemm, the
    /// fallback, gives every product; without AVX-512 BF16, bf16 weights are widened.
    #[test]
    fn matches_the_definition_for_every_edge_shape() {
        let simd = crate::kernels::has_avx512() || crate::kernels::has_avx2();
        if !simd {
            crate::kernels::skip_or_require(
                "packed's slab kernels (this CPU lacks AVX-512 and AVX2); checked gemm, \
                 on f32 and on widened bf16 weights, the fallback, instead",
            );
        }
        for &(m, k, n) in &[
            (1, 5, 3),
            (1, 37, 700),
            (2, 16, 17),
            (3, 64, 1030),
            (4, 33, 48),
            (5, 40, 9),
            (9, 70, 40),
            (40, 100, 130),
            (12, 600, 50),
        ] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.31).sin()).collect();
            let wt: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.17).cos()).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            for bias in [None, Some(b.as_slice())] {
                let mut out = vec![f32::NAN; m * n];
                linear(&x, &wt, bias, (m, k, n), &mut out);
                // The same weights in bf16 give the product of their exact widened values.
                let wb: Vec<half::bf16> = wt.iter().map(|&v| half::bf16::from_f32(v)).collect();
                let mut outb = vec![f32::NAN; m * n];
                linear(&x, &wb, bias, (m, k, n), &mut outb);
                let mut outw = vec![f32::NAN; m * n];
                gemm_product(&x, &wb, bias, (m, k, n), &mut outw);
                // And in f16 (no dot products for it anywhere: always widened), through
                // whichever path `linear` picks and through gemm's widened blocks.
                let wh: Vec<half::f16> = wt.iter().map(|&v| half::f16::from_f32(v)).collect();
                let mut outh = vec![f32::NAN; m * n];
                linear(&x, &wh, bias, (m, k, n), &mut outh);
                let mut outg = vec![f32::NAN; m * n];
                gemm_product(&x, &wh, bias, (m, k, n), &mut outg);
                // Few rows without bf16 dot products: the slab kernel widens as it reads.
                let streamed =
                    m <= STREAM_ROWS_WIDENED && stream(&x, &wb, bias, (m, k, n), &mut outw);
                assert_eq!(streamed, m <= STREAM_ROWS_WIDENED && simd);
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k).map(|p| x[i * k + p] * wt[p * n + j]).sum::<f32>()
                            + bias.map_or(0.0, |b| b[j]);
                        let got = out[i * n + j];
                        assert!(
                            (got - want).abs() < 1e-4,
                            "({m},{k},{n}) bias {} [{i},{j}]: {got} vs {want}",
                            bias.is_some()
                        );
                        let want: f32 = (0..k)
                            .map(|p| x[i * k + p] * wb[p * n + j].to_f32())
                            .sum::<f32>()
                            + bias.map_or(0.0, |b| b[j]);
                        let got = outb[i * n + j];
                        assert!(
                            (got - want).abs() < 1e-4,
                            "bf16 ({m},{k},{n}) bias {} [{i},{j}]: {got} vs {want}",
                            bias.is_some()
                        );
                        // The widening paths CPUs without bf16 dot products take (gemm on
                        // widened blocks, or the slab kernel when `streamed`).
                        let want: f32 = (0..k)
                            .map(|p| x[i * k + p] * wb[p * n + j].to_f32())
                            .sum::<f32>()
                            + bias.map_or(0.0, |b| b[j]);
                        let got = outw[i * n + j];
                        assert!(
                            (got - want).abs() < 1e-4,
                            "widened ({m},{k},{n}) streamed {streamed} bias {} [{i},{j}]: {got} vs {want}",
                            bias.is_some()
                        );
                        let want: f32 = (0..k)
                            .map(|p| x[i * k + p] * f32::from(wh[p * n + j]))
                            .sum::<f32>()
                            + bias.map_or(0.0, |b| b[j]);
                        for (path, got) in [("linear", outh[i * n + j]), ("gemm", outg[i * n + j])]
                        {
                            assert!(
                                (got - want).abs() < 1e-4,
                                "f16 {path} ({m},{k},{n}) bias {} [{i},{j}]: {got} vs {want}",
                                bias.is_some()
                            );
                        }
                    }
                }
            }
        }
    }
}
