//! `x · wᵀ` for a handful of rows of `x`: the shape of every linear layer while decoding
//! (one row per live sequence). gemm's packed kernels spend more time packing than
//! multiplying there, and its AVX-512 path is slower than its AVX2 one below ~64 rows; this
//! kernel streams each weight row once and keeps a 4x4 block of dot products in registers.

use super::SendPtr;

/// Rows at or below which [`linear`] is used for inference matmuls.
pub const MAX_ROWS: usize = 32;

/// Element types the weight may be stored in: f32, or bf16 or f16 widened to f32 as it is
/// read (a frozen bf16 base under LoRA, a bf16 model's inference, an f16 vision tower;
/// decoding is bound by reading the weights, so reading half the bytes is faster than first
/// casting the whole matrix). Both widen exactly.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// 16 consecutive values from `p`, as f32.
    ///
    /// # Safety
    /// `p..p+16` must be readable and AVX-512F present (only called from kernels that
    /// require it).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// 8 consecutive values from `p`, as f32.
    ///
    /// # Safety
    /// `p..p+8` must be readable and AVX2, FMA and F16C present (only called from kernels
    /// that require them: [`super::has_avx2`]).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// `dst = src` as f32 (same lengths): a block of weight rows widened ahead of gemm.
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

impl WeightElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl WeightElem for half::bf16 {
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // bf16 is the top half of an f32: widen to 32 bits and shift into place.
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

impl WeightElem for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // AVX-512F's own half-to-single conversion: exact, one instruction.
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        // half's slice conversion uses F16C where the CPU has it (8 values an instruction);
        // `to_f32` one value at a time would check for it on every value.
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(&mut dst[..src.len()]);
    }
}

/// `w` as bf16, when it is.
pub(crate) fn as_bf16<W: WeightElem>(w: &[W]) -> Option<&[half::bf16]> {
    (std::any::TypeId::of::<W>() == std::any::TypeId::of::<half::bf16>()).then(|| {
        // SAFETY: W is bf16 (checked just above), so the slice is reinterpreted as itself.
        unsafe { std::slice::from_raw_parts(w.as_ptr() as *const half::bf16, w.len()) }
    })
}

/// `out (m x n) = x (m x k) · w (n x k)ᵀ (+ bias)`, all row-major. Returns false (and
/// leaves `out` alone) when the CPU has neither AVX-512 nor AVX2 (with FMA and F16C), so
/// the caller falls back to gemm.
pub fn linear<W: WeightElem>(
    x: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) -> bool {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    assert!(bias.is_none_or(|b| b.len() >= n));
    // bf16 weights on a CPU with AVX-512 BF16: dot products of pairs, no widening.
    if let Some(wb) = as_bf16(w) {
        if super::bf16dot::rows(x, wb, bias, (m, k, n), out) {
            return true;
        }
    }
    widening(x, w, bias, (m, k, n), out)
}

/// [`linear`] with every weight type read as f32 (bf16 widened exactly).
fn widening<W: WeightElem>(
    x: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512() {
        // Chunks of weight rows per task: enough work to amortise the task, and enough
        // tasks to balance the cores.
        let chunk = (n / (8 * rayon::current_num_threads().max(1))).clamp(16, 1024) / 4 * 4;
        let out_ptr = SendPtr(out.as_mut_ptr());
        super::team::for_each(n.div_ceil(chunk), &|c| {
            let j0 = c * chunk;
            let j1 = (j0 + chunk).min(n);
            // SAFETY: AVX-512F is present (checked above); x, w and out hold m x k, n x k
            // and m x n values (asserted by `linear`), j1 <= n, and each task writes only
            // columns j0..j1 of `out`, which no other task touches.
            unsafe { avx512::columns(x, w, bias, m, k, n, j0, j1, out_ptr.get()) };
        });
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        let chunk = (n / (8 * rayon::current_num_threads().max(1))).clamp(16, 1024) / 4 * 4;
        let out_ptr = SendPtr(out.as_mut_ptr());
        super::team::for_each(n.div_ceil(chunk), &|c| {
            let j0 = c * chunk;
            let j1 = (j0 + chunk).min(n);
            // SAFETY: as above, with AVX2, FMA and F16C present (checked just above).
            unsafe { avx2::columns(x, w, bias, m, k, n, j0, j1, out_ptr.get()) };
        });
        return true;
    }
    let _ = (x, w, bias, m, k, n, out);
    false
}

/// [`avx512`]'s kernel in 256-bit registers, for CPUs with AVX2 but not AVX-512 (the same
/// blocking; kept apart so that neither path's code changes the other's, which a machine
/// without AVX-512 could not check).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::WeightElem;
    use std::arch::x86_64::*;

    /// Columns j0..j1 of the product, for every row.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be present; otherwise as [`super::avx512::columns`].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn columns<W: WeightElem>(
        x: &[f32],
        w: &[W],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
        j0: usize,
        j1: usize,
        out: *mut f32,
    ) {
        let mut j = j0;
        while j < j1 {
            let nc = (j1 - j).min(4);
            let mut i = 0;
            while i < m {
                let nr = (m - i).min(4);
                let mut acc = [[0f32; 4]; 4];
                match (nr, nc) {
                    (4, 4) => block::<W, 4, 4>(x, w, k, i, j, &mut acc),
                    (4, c) => tail_cols::<W, 4>(x, w, k, i, j, c, &mut acc),
                    (3, c) => tail_cols::<W, 3>(x, w, k, i, j, c, &mut acc),
                    (2, c) => tail_cols::<W, 2>(x, w, k, i, j, c, &mut acc),
                    (_, c) => tail_cols::<W, 1>(x, w, k, i, j, c, &mut acc),
                }
                for (r, row) in acc.iter().enumerate().take(nr) {
                    for (c, &v) in row.iter().enumerate().take(nc) {
                        let b = bias.map_or(0.0, |b| b[j + c]);
                        *out.add((i + r) * n + j + c) = v + b;
                    }
                }
                i += nr;
            }
            j += nc;
        }
    }

    /// [`block`] with C chosen at run time.
    ///
    /// # Safety
    /// That of [`block`] with C = `nc` (an `nc` outside 2..=4 runs as C = 1).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tail_cols<W: WeightElem, const R: usize>(
        x: &[f32],
        w: &[W],
        k: usize,
        i: usize,
        j: usize,
        nc: usize,
        acc: &mut [[f32; 4]; 4],
    ) {
        match nc {
            4 => block::<W, R, 4>(x, w, k, i, j, acc),
            3 => block::<W, R, 3>(x, w, k, i, j, acc),
            2 => block::<W, R, 2>(x, w, k, i, j, acc),
            _ => block::<W, R, 1>(x, w, k, i, j, acc),
        }
    }

    /// The sum of the 8 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// R rows of x (from i) against C rows of w (from j): R x C dot products of length k,
    /// 8 lanes at a time, the last `k % 8` terms one by one.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be present. Unchecked reads: `x` must hold `(i + R) * k`
    /// floats at least, `w` `(j + C) * k` values at least.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block<W: WeightElem, const R: usize, const C: usize>(
        x: &[f32],
        w: &[W],
        k: usize,
        i: usize,
        j: usize,
        acc_out: &mut [[f32; 4]; 4],
    ) {
        let xp = x.as_ptr().add(i * k);
        let wp = w.as_ptr().add(j * k);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let full = k / 8 * 8;
        let mut p = 0;
        while p < full {
            let mut wv = [_mm256_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = W::load8(wp.add(c * k + p));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(r * k + p));
                for c in 0..C {
                    row[c] = _mm256_fmadd_ps(xv, wv[c], row[c]);
                }
            }
            p += 8;
        }
        for r in 0..R {
            for c in 0..C {
                let mut v = sum8(acc[r][c]);
                for q in full..k {
                    v += *xp.add(r * k + q) * (*wp.add(c * k + q)).to_f32();
                }
                acc_out[r][c] = v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::WeightElem;
    use std::arch::x86_64::*;

    /// Columns j0..j1 of the product, for every row.
    ///
    /// # Safety
    /// AVX-512F must be present. Only `bias` is indexed with checks (it panics short of j1):
    /// `x` must hold `m * k` floats, `w` at least `j1 * k` values (rows j0..j1 are read),
    /// `j1 <= n`, and `out` must be valid for writes of m rows n floats apart, whose columns
    /// j0..j1 (all this writes) no other thread reads or writes meanwhile.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn columns<W: WeightElem>(
        x: &[f32],
        w: &[W],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
        j0: usize,
        j1: usize,
        out: *mut f32,
    ) {
        let mut j = j0;
        while j < j1 {
            let nc = (j1 - j).min(4);
            let mut i = 0;
            while i < m {
                let nr = (m - i).min(4);
                let mut acc = [[0f32; 4]; 4];
                match (nr, nc) {
                    (4, 4) => block::<W, 4, 4>(x, w, k, i, j, &mut acc),
                    (4, c) => tail_cols::<W, 4>(x, w, k, i, j, c, &mut acc),
                    (3, c) => tail_cols::<W, 3>(x, w, k, i, j, c, &mut acc),
                    (2, c) => tail_cols::<W, 2>(x, w, k, i, j, c, &mut acc),
                    (_, c) => tail_cols::<W, 1>(x, w, k, i, j, c, &mut acc),
                }
                for (r, row) in acc.iter().enumerate().take(nr) {
                    for (c, &v) in row.iter().enumerate().take(nc) {
                        let b = bias.map_or(0.0, |b| b[j + c]);
                        *out.add((i + r) * n + j + c) = v + b;
                    }
                }
                i += nr;
            }
            j += nc;
        }
    }

    /// [`block`] with C chosen at run time: `nc` columns (a band's tail, or fewer rows).
    ///
    /// # Safety
    /// That of [`block`] with C = `nc` (an `nc` outside 2..=4 runs as C = 1).
    #[target_feature(enable = "avx512f")]
    unsafe fn tail_cols<W: WeightElem, const R: usize>(
        x: &[f32],
        w: &[W],
        k: usize,
        i: usize,
        j: usize,
        nc: usize,
        acc: &mut [[f32; 4]; 4],
    ) {
        match nc {
            4 => block::<W, R, 4>(x, w, k, i, j, acc),
            3 => block::<W, R, 3>(x, w, k, i, j, acc),
            2 => block::<W, R, 2>(x, w, k, i, j, acc),
            _ => block::<W, R, 1>(x, w, k, i, j, acc),
        }
    }

    /// R rows of x (from i) against C rows of w (from j): R x C dot products of length k.
    ///
    /// # Safety
    /// AVX-512F must be present. The reads are unchecked: `x` must hold rows i..i + R of k
    /// floats (`(i + R) * k` at least), `w` rows j..j + C of k values (`(j + C) * k` at
    /// least); the tail of k is masked or copied, never read past.
    #[target_feature(enable = "avx512f")]
    unsafe fn block<W: WeightElem, const R: usize, const C: usize>(
        x: &[f32],
        w: &[W],
        k: usize,
        i: usize,
        j: usize,
        acc_out: &mut [[f32; 4]; 4],
    ) {
        let xp = x.as_ptr().add(i * k);
        let wp = w.as_ptr().add(j * k);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let full = k / 16 * 16;
        let mut p = 0;
        while p < full {
            let mut wv = [_mm512_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = W::load16(wp.add(c * k + p));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(xp.add(r * k + p));
                for c in 0..C {
                    row[c] = _mm512_fmadd_ps(xv, wv[c], row[c]);
                }
            }
            p += 16;
        }
        if p < k {
            let mask: __mmask16 = (1u32 << (k - p)) as u16 - 1;
            let mut wv = [_mm512_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                // The tail widened through a small buffer: W has no masked load.
                let mut tail = [0f32; 16];
                for (q, t) in tail.iter_mut().enumerate().take(k - p) {
                    *t = (*wp.add(c * k + p + q)).to_f32();
                }
                *v = _mm512_loadu_ps(tail.as_ptr());
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(r * k + p));
                for c in 0..C {
                    row[c] = _mm512_fmadd_ps(xv, wv[c], row[c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                acc_out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{has_avx512, plain_linear, skip_or_require};

    /// The kernel's product by its definition; without AVX-512 it must decline (out
    /// untouched), and the plain ops its callers run instead must give the same.
    #[test]
    fn matches_the_definition_for_every_edge_shape() {
        let simd = has_avx512() || crate::kernels::has_avx2();
        if !simd {
            skip_or_require(
                "skinny kernel (this CPU lacks AVX-512F and AVX2); checked the plain matmul its \
                 callers take instead",
            );
        }
        for &(m, k, n) in &[
            (1, 5, 3),
            (3, 16, 4),
            (4, 37, 9),
            (7, 64, 33),
            (9, 100, 130),
        ] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.31).sin()).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.17).cos()).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let mut out = vec![f32::NAN; m * n];
            assert_eq!(linear(&x, &w, Some(&b), (m, k, n), &mut out), simd);
            if !simd {
                assert!(out.iter().all(|v| v.is_nan()), "a declining kernel wrote");
                out = plain_linear(&x, &w, Some(&b), (m, k, n));
            }
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum::<f32>() + b[j];
                    let got = out[i * n + j];
                    assert!(
                        (got - want).abs() < 1e-4,
                        "({m},{k},{n}) [{i},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// bf16 weights give the f32 product of their exact f32 values (bf16 widens losslessly)
    /// without bf16 dot products; with them, of the activations rounded to bf16 too. Without
    /// AVX-512, the plain ops the callers run instead give the widened product.
    #[test]
    fn bf16_weights_widen_exactly() {
        let dot = crate::kernels::bf16dot::available();
        let simd = has_avx512() || crate::kernels::has_avx2();
        if !simd {
            skip_or_require(
                "skinny kernels on bf16 weights (this CPU lacks AVX-512F and AVX2); checked the plain \
                 matmul on the widened weight, which their callers take, instead",
            );
        } else if !dot {
            skip_or_require(
                "bf16dot's output-major kernel (this CPU lacks AVX-512 BF16); checked the \
                 widening kernel, which skinny::linear falls back to, instead",
            );
        }
        let xr = |v: f32| {
            if dot {
                half::bf16::from_f32(v).to_f32()
            } else {
                v
            }
        };
        for &(m, k, n) in &[(1, 5, 3), (2, 16, 4), (4, 37, 9), (5, 100, 130)] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.31).sin()).collect();
            let w: Vec<half::bf16> = (0..n * k)
                .map(|i| half::bf16::from_f32((i as f32 * 0.17).cos()))
                .collect();
            let mut out = vec![f32::NAN; m * n];
            let mut widened = vec![f32::NAN; m * n];
            // bf16 dot products need AVX-512F too, so either path runs exactly when it does.
            assert_eq!(linear(&x, &w, None, (m, k, n), &mut out), simd);
            assert_eq!(widening(&x, &w, None, (m, k, n), &mut widened), simd);
            if !simd {
                assert!(
                    out.iter().chain(&widened).all(|v| v.is_nan()),
                    "a declining kernel wrote"
                );
                out = plain_linear(&x, &w, None, (m, k, n));
                widened.clone_from(&out);
            }
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k)
                        .map(|p| xr(x[i * k + p]) * w[j * k + p].to_f32())
                        .sum();
                    let got = out[i * n + j];
                    assert!(
                        (got - want).abs() < 1e-4,
                        "({m},{k},{n}) [{i},{j}]: {got} vs {want}"
                    );
                    let want: f32 = (0..k).map(|p| x[i * k + p] * w[j * k + p].to_f32()).sum();
                    let got = widened[i * n + j];
                    assert!(
                        (got - want).abs() < 1e-4,
                        "widened ({m},{k},{n}) [{i},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
