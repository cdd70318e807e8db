//! Row-wise log-softmax over a vocabulary-wide row, picking one target per row: the heart of
//! every training step's log-probabilities (a 2-row x 256-token micro-batch is 78M logits
//! for Qwen2-VL's 151,936-token vocabulary). One pass finds the maximum, one computes
//! `exp(x - max)` (optionally kept, normalised, as the softmax for the backward pass) and its
//! sum, and, when asked, `Σ exp(x - max)·(x - max)` for the row's entropy in the same pass.
//! The exponential is a vectorised polynomial on AVX-512 (libm's scalar `expf` costs more than
//! the matmul that produced the row) and std's elsewhere.

use rayon::prelude::*;

/// For each row of `logits` (rows x vocab, row-major): multiplies by `inv_temp` (when not
/// 1), and returns `log_softmax(row)[target]`. When `keep_probs`, the row is overwritten with
/// `softmax(row)`.
pub fn pick_log_softmax(
    logits: &mut [f32],
    vocab: usize,
    targets: &[u32],
    inv_temp: f32,
    keep_probs: bool,
) -> Vec<f32> {
    pick::<false>(logits, vocab, targets, inv_temp, keep_probs)
        .into_iter()
        .map(|(lp, _)| lp)
        .collect()
}

/// [`pick_log_softmax`], and each row's entropy `-Σ p log p` of `softmax(row · inv_temp)` in
/// nats, from the same pass over the row: with `d = z - max`, `e = exp(d)` and `S = Σ e`,
/// `H = ln S - Σ e·d / S` (TRL's fused LM head computes `log Z - Σ e·z / S`, the same
/// quantity before the shift). Both sums run in f32 lanes flushed into f64.
pub fn pick_log_softmax_entropy(
    logits: &mut [f32],
    vocab: usize,
    targets: &[u32],
    inv_temp: f32,
    keep_probs: bool,
) -> (Vec<f32>, Vec<f32>) {
    pick::<true>(logits, vocab, targets, inv_temp, keep_probs)
        .into_iter()
        .unzip()
}

fn pick<const ENTROPY: bool>(
    logits: &mut [f32],
    vocab: usize,
    targets: &[u32],
    inv_temp: f32,
    keep_probs: bool,
) -> Vec<(f32, f32)> {
    assert_eq!(logits.len(), vocab * targets.len());
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            if inv_temp != 1.0 {
                row.iter_mut().for_each(|x| *x *= inv_temp);
            }
            let picked = row[t as usize];
            let max = row_max(row);
            let (sum, dot) = exp_shift_sum::<ENTROPY>(row, max, keep_probs);
            if keep_probs {
                let inv = (1.0 / sum) as f32;
                row.iter_mut().for_each(|x| *x *= inv);
            }
            // log_softmax as torch computes it: (x - max) - log(sum(exp(x - max))).
            let logp = (picked - max) - (sum.ln() as f32);
            let entropy = if ENTROPY {
                (sum.ln() - dot / sum) as f32
            } else {
                0.0
            };
            (logp, entropy)
        })
        .collect()
}

/// In place: `row[..n] = softmax(row[..n] * scale)` and `row[n..] = 0` (masked keys).
pub fn softmax_prefix(row: &mut [f32], n: usize, scale: f32) {
    let (live, masked) = row.split_at_mut(n.min(row.len()));
    masked.fill(0.0);
    if live.is_empty() {
        return;
    }
    if scale != 1.0 {
        live.iter_mut().for_each(|x| *x *= scale);
    }
    let max = row_max(live);
    let (sum, _) = exp_shift_sum::<false>(live, max, true);
    let inv = (1.0 / sum) as f32;
    live.iter_mut().for_each(|x| *x *= inv);
}

fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(x);
        }
    }
    let mut m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &x in chunks.remainder() {
        m = m.max(x);
    }
    m
}

/// Sums over the row of `exp(x - max)` and (with `DOT`, else 0) of `exp(x - max)·(x - max)`,
/// in f64; the row is overwritten with the exponentials when `store`.
fn exp_shift_sum<const DOT: bool>(row: &mut [f32], max: f32, store: bool) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512() {
        // SAFETY: AVX-512F is present (checked just above); the kernel stays inside `row`.
        return unsafe { avx512::exp_shift_sum::<DOT>(row, max, store) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: AVX2 and FMA are present (checked just above); the kernel stays inside
        // `row`.
        return unsafe { avx2::exp_shift_sum::<DOT>(row, max, store) };
    }
    portable::exp_shift_sum::<DOT>(row, max, store)
}

/// The same with std's exp, for CPUs without AVX-512 or AVX2.
mod portable {
    pub fn exp_shift_sum<const DOT: bool>(row: &mut [f32], max: f32, store: bool) -> (f64, f64) {
        let (mut sum, mut dot) = (0f64, 0f64);
        for x in row.iter_mut() {
            let d = *x - max;
            let e = d.exp();
            sum += e as f64;
            if DOT {
                // exp(d) is 0 in f32 below -104: a -inf logit adds 0, not 0·(-inf).
                dot += (e * d.max(-104.0)) as f64;
            }
            if store {
                *x = e;
            }
        }
        (sum, dot)
    }

    pub fn exp_in_place(xs: &mut [f32]) {
        xs.iter_mut().for_each(|x| *x = x.exp());
    }
}

/// Cephes' `expf`, which both vector exponentials evaluate: ln 2 split in two, so that
/// `n·ln2` is exact to f32 precision, and the degree-6 polynomial for `exp(r)`, |r| <= ln2/2,
/// highest coefficient first.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `xs[i] = exp(xs[i])` in place (vectorised on AVX-512 and AVX2; ~2 ulps).
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512() {
        // SAFETY: AVX-512F is present (checked just above); the kernel stays inside `xs`.
        unsafe { avx512::exp_in_place(xs) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: AVX2 and FMA are present (checked just above); the kernel stays inside
        // `xs`.
        unsafe { avx2::exp_in_place(xs) };
        return;
    }
    portable::exp_in_place(xs);
}

/// [`avx512`]'s exponential in 256-bit registers, for CPUs with AVX2 but not AVX-512
/// (without it, every softmax of the vision tower's attention and every gated activation
/// ran std's scalar `expf`). The same polynomial and the same operations, so the same bits;
/// only 2^n is built differently (AVX2 has no `scalef`).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `exp(x)` for `x` in [-104, 89] or NaN (the callers clamp): [`super::avx512`]'s
    /// `exp16_floored` on 8 lanes. 2^n for n in [-150, 129] is two powers of two, each a
    /// normal f32 built from its exponent bits: `y · 2^a` is exact, and `· 2^b` rounds once
    /// into a subnormal or to infinity as `scalef` does.
    ///
    /// # Safety
    /// AVX2 and FMA must be present; no memory is touched.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8_clamped(x: __m256) -> __m256 {
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_LO), r);
        let mut p = _mm256_set1_ps(super::EXP_POLY[0]);
        for c in &super::EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        // n = a + b with a = n >> 1 (floor) and b = n - a, both in [-75, 65].
        let ni = _mm256_cvtps_epi32(n);
        let a = _mm256_srai_epi32::<1>(ni);
        let b = _mm256_sub_epi32(ni, a);
        let bias = _mm256_set1_epi32(127);
        let pa = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(a, bias)));
        let pb = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(b, bias)));
        _mm256_mul_ps(_mm256_mul_ps(y, pa), pb)
    }

    /// `x` clamped to [-104, 89]: below -104 exp is 0 in f32, above 89 infinite (and n's
    /// exponent bits stay in range). NaN stays NaN (max and min return their second
    /// operand for a NaN).
    ///
    /// # Safety
    /// AVX2 must be present; no memory is touched.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn clamp(x: __m256) -> __m256 {
        _mm256_min_ps(
            _mm256_set1_ps(89.0),
            _mm256_max_ps(_mm256_set1_ps(-104.0), x),
        )
    }

    /// The sum of the 8 lanes, in f64.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum8(v: __m256) -> f64 {
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), v);
        l.iter().map(|&x| x as f64).sum()
    }

    /// [`super::exp_in_place`]: 8 lanes at a time, the tail through a small buffer.
    ///
    /// # Safety
    /// AVX2 and FMA must be present. Every load and store stays inside `xs`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_in_place(xs: &mut [f32]) {
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            let e = exp8_clamped(clamp(_mm256_loadu_ps(c.as_ptr())));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut t = [0f32; 8];
            t[..rest.len()].copy_from_slice(rest);
            _mm256_storeu_ps(
                t.as_mut_ptr(),
                exp8_clamped(clamp(_mm256_loadu_ps(t.as_ptr()))),
            );
            rest.copy_from_slice(&t[..rest.len()]);
        }
    }

    /// [`super::exp_shift_sum`]: 8 lanes at a time (f32 sums over runs of 1,024 values,
    /// flushed into f64, as the AVX-512 kernel does), the tail through a small buffer.
    ///
    /// # Safety
    /// AVX2 and FMA must be present. Every load and store stays inside `row`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shift_sum<const DOT: bool>(
        row: &mut [f32],
        max: f32,
        store: bool,
    ) -> (f64, f64) {
        let m = _mm256_set1_ps(max);
        let (mut total, mut total_dot) = (0f64, 0f64);
        let n = row.len();
        let full = n / 8 * 8;
        let ptr = row.as_mut_ptr();
        let mut i = 0;
        while i < full {
            let end = (i + 1024).min(full);
            let mut acc = _mm256_setzero_ps();
            let mut acc_dot = _mm256_setzero_ps();
            while i < end {
                // Floored once for both sums: a -inf logit adds 0 to the second, not
                // 0·(-inf). (x - max <= 0, so the ceiling never applies.)
                let d = _mm256_max_ps(
                    _mm256_set1_ps(-104.0),
                    _mm256_sub_ps(_mm256_loadu_ps(ptr.add(i)), m),
                );
                let e = exp8_clamped(_mm256_min_ps(_mm256_set1_ps(89.0), d));
                if store {
                    _mm256_storeu_ps(ptr.add(i), e);
                }
                acc = _mm256_add_ps(acc, e);
                if DOT {
                    acc_dot = _mm256_fmadd_ps(e, d, acc_dot);
                }
                i += 8;
            }
            total += sum8(acc);
            if DOT {
                total_dot += sum8(acc_dot);
            }
        }
        for x in row[full..].iter_mut() {
            // The tail one lane at a time, through the same function.
            let d = (*x - max).max(-104.0);
            let mut t = [0f32; 8];
            t[0] = d.min(89.0);
            let e = {
                let v = exp8_clamped(_mm256_loadu_ps(t.as_ptr()));
                _mm256_storeu_ps(t.as_mut_ptr(), v);
                t[0]
            };
            if store {
                *x = e;
            }
            total += e as f64;
            if DOT {
                total_dot += (e * d) as f64;
            }
        }
        (total, total_dot)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `exp(x)` (overflowing to +inf above ~88.7), Cephes' expf: x = n ln2 + r with |r| <= ln2/2,
    /// a degree-6 polynomial for exp(r), then scaled by 2^n. Relative error ~1e-7 (two ulps).
    ///
    /// # Safety
    /// AVX-512F must be present; no memory is touched.
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        exp16_floored(floor104(x))
    }

    /// `max(-104, x)`: below -104, exp underflows to zero in f32. (max returns its second
    /// operand for a NaN, so NaNs propagate.)
    ///
    /// # Safety
    /// AVX-512F must be present; no memory is touched.
    #[target_feature(enable = "avx512f")]
    unsafe fn floor104(x: __m512) -> __m512 {
        _mm512_max_ps(_mm512_set1_ps(-104.0), x)
    }

    /// [`exp16`] of an `x` already at or above -104 ([`floor104`]): scalef turns 2^n with n
    /// down to -150 into the right subnormal or zero.
    ///
    /// # Safety
    /// AVX-512F must be present; no memory is touched.
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16_floored(x: __m512) -> __m512 {
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_LO), r);
        let mut p = _mm512_set1_ps(super::EXP_POLY[0]);
        for c in &super::EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(y, n)
    }

    /// [`super::exp_in_place`]: 16 lanes at a time, the tail masked.
    ///
    /// # Safety
    /// AVX-512F must be present. Nothing else: every load and store stays inside `xs` (the
    /// tail's are masked).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_in_place(xs: &mut [f32]) {
        let n = xs.len();
        let p = xs.as_mut_ptr();
        let mut i = 0;
        while i + 16 <= n {
            _mm512_storeu_ps(p.add(i), exp16(_mm512_loadu_ps(p.add(i))));
            i += 16;
        }
        if i < n {
            let mask: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let e = exp16(_mm512_maskz_loadu_ps(mask, p.add(i)));
            _mm512_mask_storeu_ps(p.add(i), mask, e);
        }
    }

    /// [`super::exp_shift_sum`]: 16 lanes at a time, the tail masked.
    ///
    /// # Safety
    /// AVX-512F must be present. Nothing else: every load and store stays inside `row` (the
    /// tail's are masked).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shift_sum<const DOT: bool>(
        row: &mut [f32],
        max: f32,
        store: bool,
    ) -> (f64, f64) {
        let m = _mm512_set1_ps(max);
        // Four f32 accumulators per lane group over short runs, flushed into f64, so the sum
        // of 151,936 terms keeps f64-like accuracy without f64 arithmetic in the hot loop.
        let (mut total, mut total_dot) = (0f64, 0f64);
        let n = row.len();
        let ptr = row.as_mut_ptr();
        let mut i = 0;
        while i + 16 <= n {
            let end = (i + 1024).min(n / 16 * 16);
            let mut acc = _mm512_setzero_ps();
            let mut acc_dot = _mm512_setzero_ps();
            while i < end {
                // Floored once for both sums: a -inf logit adds 0 to the second, not
                // 0·(-inf).
                let d = floor104(_mm512_sub_ps(_mm512_loadu_ps(ptr.add(i)), m));
                let e = exp16_floored(d);
                if store {
                    _mm512_storeu_ps(ptr.add(i), e);
                }
                acc = _mm512_add_ps(acc, e);
                if DOT {
                    acc_dot = _mm512_fmadd_ps(e, d, acc_dot);
                }
                i += 16;
            }
            total += _mm512_reduce_add_ps(acc) as f64;
            if DOT {
                total_dot += _mm512_reduce_add_ps(acc_dot) as f64;
            }
        }
        if i < n {
            let mask: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let x = _mm512_maskz_loadu_ps(mask, ptr.add(i));
            let d = floor104(_mm512_maskz_sub_ps(mask, x, m));
            let e = _mm512_maskz_mov_ps(mask, exp16_floored(d));
            if store {
                _mm512_mask_storeu_ps(ptr.add(i), mask, e);
            }
            total += _mm512_reduce_add_ps(e) as f64;
            if DOT {
                total_dot += _mm512_reduce_add_ps(_mm512_mul_ps(e, d)) as f64;
            }
        }
        (total, total_dot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised exponential against std's (the path of CPUs without AVX-512), and
    /// std's against f64's, over the whole range a shifted logit or an activation can take,
    /// NaN and infinities included. (Without AVX-512 `exp_in_place` is std's: only the
    /// comparison with f64 checks anything there.)
    #[test]
    fn vector_exp_agrees_with_std() {
        if !super::super::has_avx512() && !super::super::has_avx2() {
            super::super::skip_or_require(
                "the vector exponentials (this CPU lacks AVX-512F and AVX2); checked std's, \
                 the fallback, against f64 instead",
            );
        }
        let xs: Vec<f32> = (0..4001)
            .map(|i| -120.0 + i as f32 * 0.052)
            .chain([
                0.0,
                -0.0,
                88.7,
                89.0,
                -103.9,
                -104.5,
                f32::NEG_INFINITY,
                f32::NAN,
            ])
            .collect();
        let mut fast = xs.clone();
        exp_in_place(&mut fast);
        let mut slow = xs.clone();
        portable::exp_in_place(&mut slow);
        let exact: Vec<f32> = xs.iter().map(|&x| (x as f64).exp() as f32).collect();
        let agree = |what: &str, x: f32, a: f32, b: f32| {
            if b.is_nan() {
                assert!(a.is_nan(), "{what} exp({x}) = {a}");
            } else if b == 0.0 || b.is_infinite() || b < f32::MIN_POSITIVE {
                // Subnormal results: absolute agreement is all f32 offers.
                assert!(
                    (a - b).abs() <= f32::MIN_POSITIVE || a == b,
                    "{what} exp({x}): {a} vs {b}"
                );
            } else {
                assert!(((a - b) / b).abs() < 4e-7, "{what} exp({x}): {a} vs {b}");
            }
        };
        for (((&x, &a), &b), &e) in xs.iter().zip(&fast).zip(&slow).zip(&exact) {
            agree("vector vs std:", x, a, b);
            agree("std vs f64:", x, b, e);
        }
        let mut row: Vec<f32> = xs
            .iter()
            .map(|x| if x.is_nan() { 0.0 } else { x.min(0.0) })
            .collect();
        let exact: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        let exact_dot: f64 = row
            .iter()
            .filter(|x| x.is_finite())
            .map(|&x| (x as f64).exp() * x as f64)
            .sum();
        let mut row2 = row.clone();
        let mut row3 = row.clone();
        let (a, a_dot) = exp_shift_sum::<true>(&mut row, 0.0, true);
        let (b, b_dot) = portable::exp_shift_sum::<true>(&mut row2, 0.0, true);
        let (a_plain, no_dot) = exp_shift_sum::<false>(&mut row3, 0.0, true);
        assert_eq!((a_plain, no_dot), (a, 0.0));
        assert_eq!(row, row3);
        assert!(((a - b) / b).abs() < 1e-6, "{a} vs {b}");
        assert!(
            ((b - exact) / exact).abs() < 1e-6,
            "std's: {b} vs f64's {exact}"
        );
        assert!(((a_dot - b_dot) / b_dot).abs() < 1e-6, "{a_dot} vs {b_dot}");
        assert!(
            ((b_dot - exact_dot) / exact_dot).abs() < 1e-6,
            "std's: {b_dot} vs f64's {exact_dot}"
        );
    }

    /// f64 log-softmax of the f32 shifted logits `x * inv_temp - max` (the shift is rounded
    /// to f32 as torch's kernel rounds it; everything after is exact).
    fn reference(row: &[f32], t: usize, inv_temp: f32) -> (f64, Vec<f64>) {
        let xs: Vec<f32> = row.iter().map(|&x| x * inv_temp).collect();
        let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d: Vec<f64> = xs.iter().map(|&x| (x - m) as f64).collect();
        let s: f64 = d.iter().map(|x| x.exp()).sum();
        (d[t] - s.ln(), d.iter().map(|x| x.exp() / s).collect())
    }

    /// `-Σ p ln p` in f64 (0 ln 0 = 0).
    fn reference_entropy(probs: &[f64]) -> f64 {
        -probs
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| p * p.ln())
            .sum::<f64>()
    }

    #[test]
    fn log_softmax_and_probabilities_match_f64() {
        let vocab = 1000 + 7; // a ragged tail for the vector loop
        let rows = 3;
        let mut data: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i as f32 * 0.618).sin() * 12.0) - if i % 97 == 0 { 80.0 } else { 0.0 })
            .collect();
        let orig = data.clone();
        let targets = [5u32, 1006, 400];
        for keep in [false, true] {
            for inv_temp in [1.0f32, 1.0 / 0.7] {
                let mut d = orig.clone();
                let lp = pick_log_softmax(&mut d, vocab, &targets, inv_temp, keep);
                // The entropy variant: the same log-probs and rows, and each row's entropy.
                let mut d2 = orig.clone();
                let (lp2, ent) = pick_log_softmax_entropy(&mut d2, vocab, &targets, inv_temp, keep);
                assert_eq!(lp, lp2);
                assert_eq!(d, d2);
                for r in 0..rows {
                    let (want, probs) = reference(
                        &orig[r * vocab..(r + 1) * vocab],
                        targets[r] as usize,
                        inv_temp,
                    );
                    let want_h = reference_entropy(&probs);
                    assert!(
                        (ent[r] as f64 - want_h).abs() < 2e-6 * want_h.max(1.0),
                        "row {r} entropy: {} vs {want_h}",
                        ent[r]
                    );
                    assert!(
                        (lp[r] as f64 - want).abs() < 2e-6,
                        "row {r}: {} vs {want}",
                        lp[r]
                    );
                    if keep {
                        for (v, p) in probs.iter().enumerate() {
                            let got = d[r * vocab + v] as f64;
                            assert!(
                                (got - p).abs() <= 5e-7 * p + 1e-38,
                                "p[{r},{v}] {got} vs {p}"
                            );
                        }
                    }
                }
            }
        }
        data.clear();
    }
}
