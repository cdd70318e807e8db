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

/// Whether this CPU has AVX-512 BF16 (and BW, which every CPU with BF16 has; checked once,
/// cached by std).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
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
    product(
        Operand::rows(Elems::F32(x)),
        Operand::rows(Elems::Bf16(wt)),
        bias,
        (m, k, n),
        out,
    );
    true
}

/// The elements of a row-major matrix, in f32 or bf16.
#[derive(Clone, Copy)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl Elems<'_> {
    fn len(&self) -> usize {
        match self {
            Elems::F32(v) => v.len(),
            Elems::Bf16(v) => v.len(),
        }
    }
}

/// An element as bf16 bits: f32 rounded to nearest even (as `half` and PyTorch round), bf16
/// as it is.
trait Bits: Copy + Send + Sync {
    fn bits(self) -> u32;
}

impl Bits for f32 {
    #[inline]
    fn bits(self) -> u32 {
        half::bf16::from_f32(self).to_bits() as u32
    }
}

impl Bits for half::bf16 {
    #[inline]
    fn bits(self) -> u32 {
        self.to_bits() as u32
    }
}

/// A factor of [`matmul`]: a row-major matrix read as it is stored or as its transpose,
/// so the backward passes of a linear layer (`dy · W`, `dyᵀ · x`) need no transposed copy.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub elems: Elems<'a>,
    pub transposed: bool,
}

impl<'a> Operand<'a> {
    /// The matrix as it is stored.
    pub fn rows(elems: Elems<'a>) -> Self {
        Self {
            elems,
            transposed: false,
        }
    }

    /// The transpose of the stored matrix.
    pub fn t(self) -> Self {
        Self {
            transposed: !self.transposed,
            ..self
        }
    }
}

/// The (rows x cols) matrix an [`Operand`] stands for, over elements of one type.
#[derive(Clone, Copy)]
struct View<'a, E> {
    data: &'a [E],
    transposed: bool,
    rows: usize,
    cols: usize,
}

impl<E: Bits> View<'_, E> {
    /// Element (i, j) as bf16 bits.
    #[inline]
    fn at(&self, i: usize, j: usize) -> u32 {
        if self.transposed {
            self.data[j * self.rows + i].bits()
        } else {
            self.data[i * self.cols + j].bits()
        }
    }

    /// Pair q of row i: elements (i, 2q) and (i, 2q + 1), the second zero past the last
    /// column.
    #[inline]
    fn pair(&self, i: usize, q: usize) -> u32 {
        let lo = self.at(i, 2 * q);
        let hi = if 2 * q + 1 < self.cols {
            self.at(i, 2 * q + 1)
        } else {
            0
        };
        lo | (hi << 16)
    }
}

/// Runs `f` on an operand's view as a (rows x cols) matrix, monomorphised per element type.
macro_rules! with_view {
    ($op:expr, ($rows:expr, $cols:expr), |$v:ident| $body:expr) => {
        match $op.elems {
            Elems::F32(data) => {
                let $v = View {
                    data,
                    transposed: $op.transposed,
                    rows: $rows,
                    cols: $cols,
                };
                $body
            }
            Elems::Bf16(data) => {
                let $v = View {
                    data,
                    transposed: $op.transposed,
                    rows: $rows,
                    cols: $cols,
                };
                $body
            }
        }
    };
}

/// `out (m x n) = bf16(a) (m x k) · bf16(b) (k x n)`, each factor in f32 (rounded to bf16 to
/// nearest even, as PyTorch's bf16 matmul sees its inputs) or bf16, as stored or
/// transposed; products and sums in f32, as PyTorch's CPU bf16 matmul accumulates. The
/// training passes of bf16 linear layers and the LM head run on it. Returns false (out
/// untouched) when the CPU lacks AVX-512 BF16.
pub fn matmul(a: Operand, b: Operand, (m, k, n): (usize, usize, usize), out: &mut [f32]) -> bool {
    assert!(a.elems.len() >= m * k && b.elems.len() >= k * n && out.len() >= m * n);
    if !available() {
        return false;
    }
    product(a, b, None, (m, k, n), out);
    true
}

/// The panel loop behind [`linear`] and [`matmul`]; AVX-512 BF16 must be present.
fn product(
    a: Operand,
    b: Operand,
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) {
    if m == 0 || n == 0 {
        return;
    }
    let kp = k.div_ceil(2);
    let xb = match (a.elems, a.transposed) {
        (Elems::F32(x), false) if kp > 0 => round_rows(x, m, k),
        _ => pair_rows(a, m, k),
    };
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(NB)).into_par_iter().for_each_init(
        || vec![0u32; KC * NB],
        |panel, jb| {
            let j0 = jb * NB;
            let nc = NB.min(n - j0);
            let mut q0 = 0;
            // k = 0: no panel runs; the first tile would have written the bias or zero.
            if kp == 0 {
                for i in 0..m {
                    for j in 0..nc {
                        // SAFETY: row i < m, column j0 + j < n of out (m x n), which only
                        // this task writes.
                        unsafe {
                            *out_ptr.get().add(i * n + j0 + j) = bias.map_or(0.0, |b| b[j0 + j])
                        };
                    }
                }
            }
            while q0 < kp {
                let qc = KC.min(kp - q0);
                pack_panel(b, (k, n), q0, qc, j0, nc, panel);
                let mut i = 0;
                while i < m {
                    let mr = MR.min(m - i);
                    // SAFETY: AVX-512 BF16 is present (callers checked); 1 <= mr <= MR and
                    // nc <= NB; the tile reads rows i..i+mr of xb (pairs q0..q0+qc) and the
                    // packed panel of qc x NB, and reads and writes rows i..i+mr, columns
                    // j0..j0+nc of out, which only this task owns.
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
}

/// The rows of `a` (m x k) as bf16 pairs, each row padded to whole pairs with a zero: the
/// general case of [`round_rows`] (bf16 elements, or a transposed view).
fn pair_rows(a: Operand, m: usize, k: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut xb = vec![0u32; m * kp];
    if kp == 0 {
        return xb;
    }
    with_view!(a, (m, k), |v| {
        let fill = |(i, row): (usize, &mut [u32])| {
            for (q, lane) in row.iter_mut().enumerate() {
                *lane = v.pair(i, q);
            }
        };
        if m * k >= 1 << 14 {
            xb.par_chunks_mut(kp).enumerate().for_each(fill);
        } else {
            xb.chunks_mut(kp).enumerate().for_each(fill);
        }
    });
    xb
}

/// The rows of x (m x k) rounded to bf16 pairs, each row padded to whole pairs with a zero.
/// Only called once AVX-512 BF16 is known to be present.
fn round_rows(x: &[f32], m: usize, k: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut xb = vec![0u32; m * kp];
    let round = |(r, row): (usize, &mut [u32])| {
        let src = &x[r * k..(r + 1) * k];
        // SAFETY: callers checked AVX-512 BF16; the conversion reads src and writes row,
        // whose lengths it respects.
        let done = unsafe { avx512::round_pairs(src, row) };
        for (q, lane) in row.iter_mut().enumerate().skip(done) {
            let lo = half::bf16::from_f32(src[2 * q]).to_bits() as u32;
            let hi = src
                .get(2 * q + 1)
                .map_or(0, |&v| half::bf16::from_f32(v).to_bits() as u32);
            *lane = lo | (hi << 16);
        }
    };
    if m > 1 {
        xb.par_chunks_mut(kp).enumerate().for_each(round);
    } else {
        xb.chunks_mut(kp).enumerate().for_each(round);
    }
    xb
}

/// Rows at or below which [`stream`] applies.
pub const STREAM_ROWS: usize = 8;

/// `out (m x n) = bf16(x) (m x k) · wt (k x n) (+ bias)` for a few rows (decoding): the
/// weight is read once, straight from its input-major layout, each task streaming one
/// contiguous slab of it (rows of k). Pairs of weight rows are interleaved in registers
/// (`vpunpck{l,h}wd`) into the pair layout `vdpbf16ps` multiplies, so one instruction does
/// 32 multiply-adds where widening to f32 took three instructions for 16: decoding against
/// bf16 weights was bound by that widening, not by memory. Returns false (out untouched)
/// for more than [`STREAM_ROWS`] rows or a CPU without AVX-512 BF16.
pub fn stream(
    x: &[f32],
    wt: &[half::bf16],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) -> bool {
    assert!(x.len() >= m * k && wt.len() >= k * n && out.len() >= m * n);
    assert!(bias.is_none_or(|b| b.len() >= n));
    if m > STREAM_ROWS || !available() {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    let kp = k.div_ceil(2);
    let xb = round_rows(x, m, k);
    // Accumulators in chunks of 32 columns, each kept in the unpacked lane order (see
    // `avx512::chunk`) until the reduction puts them back in column order.
    let np = n.div_ceil(32) * 32;
    let partial = super::slab_partials(kp, m * np, |pairs, acc| {
        // SAFETY: AVX-512 BF16 and BW are present (`available`); 1 <= m <= STREAM_ROWS
        // (8, checked above); xb holds m rows of kp pairs, wt k x n values (asserted above),
        // and acc m x np floats, np being n rounded up to whole 32-column chunks.
        unsafe { avx512::stream_slab(&xb, wt, (m, k, n), np, pairs.start, pairs.end, acc) };
    });
    let tasks = partial.len() / (m * np);
    // SAFETY: as above; partial holds `tasks` (>= 1) blocks of m x np, bias (asserted
    // above) n floats, out m x n.
    unsafe { avx512::reduce(&partial, tasks, (m, n), np, bias, out) };
    true
}

/// `out (m x n) = bf16(x) (m x k) · w (n x k)ᵀ (+ bias)` for a few rows against a weight
/// stored output-major, as checkpoints store it: the tied LM head, which shares the
/// embedding table's layout. A weight row is already in pairs along k, so 4 rows of w
/// against up to 4 rows of x are 16 dot products of `vdpbf16ps` vectors, summed across
/// lanes at the end. Returns false (out untouched) for more than [`STREAM_ROWS`] rows or a
/// CPU without AVX-512 BF16.
pub fn rows(
    x: &[f32],
    w: &[half::bf16],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) -> bool {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    assert!(bias.is_none_or(|b| b.len() >= n));
    if m > STREAM_ROWS || !available() {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    let xb = round_rows(x, m, k);
    // Enough weight rows per task to amortise it, enough tasks to balance the cores.
    let chunk = (n / (8 * rayon::current_num_threads().max(1))).clamp(16, 1024) / 4 * 4;
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let j0 = c * chunk;
        let j1 = (j0 + chunk).min(n);
        // SAFETY: AVX-512 BF16 and BW are present (`available`); the task reads rows j0..j1
        // (j1 <= n) of w, n x k (asserted above), and xb's m rows of kp pairs, and writes
        // only columns j0..j1 of out (m x n), which no other task touches.
        unsafe { avx512::rows_range(&xb, w, bias, (m, k, n), (j0, j1), out_ptr.get()) };
    });
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

/// Pairs q0..q0+qc of columns j0..j0+nc of `b` (k x n), as bf16 pairs, NB lanes per pair
/// row (columns past nc and the row past k zero).
fn pack_panel(
    b: Operand,
    (k, n): (usize, usize),
    q0: usize,
    qc: usize,
    j0: usize,
    nc: usize,
    panel: &mut [u32],
) {
    if let (Elems::Bf16(wt), false) = (b.elems, b.transposed) {
        // An input-major bf16 weight (inference): pair rows straight from two weight rows.
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
        return;
    }
    if let (Elems::F32(w), true) = (b.elems, b.transposed) {
        // f32 stored (n x k), as an f32 master weight is for `x · Wᵀ` and the LM head:
        // column j's pairs are consecutive, rounded 32 values per instruction.
        let mut lanes = [0u32; KC];
        for j in 0..nc {
            let row = &w[(j0 + j) * k..(j0 + j + 1) * k];
            let src = &row[2 * q0..(2 * (q0 + qc)).min(k)];
            // SAFETY: callers checked AVX-512 BF16; the conversion stays inside src and
            // lanes (qc <= KC pairs).
            let done = unsafe { avx512::round_pairs(src, &mut lanes[..qc]) };
            for (q, lane) in lanes.iter_mut().enumerate().take(qc).skip(done) {
                let lo = half::bf16::from_f32(src[2 * q]).to_bits() as u32;
                let hi = src
                    .get(2 * q + 1)
                    .map_or(0, |&v| half::bf16::from_f32(v).to_bits() as u32);
                *lane = lo | (hi << 16);
            }
            for (q, &lane) in lanes.iter().enumerate().take(qc) {
                panel[q * NB + j] = lane;
            }
        }
        for q in 0..qc {
            panel[q * NB + nc..(q + 1) * NB].fill(0);
        }
        return;
    }
    if let (Elems::F32(w), false) = (b.elems, b.transposed) {
        // f32 stored (k x n), as `dy · W` reads a master weight: two rows make a pair row,
        // rounded and interleaved 16 columns per step.
        for q in 0..qc {
            let p = 2 * (q0 + q);
            let even = &w[p * n + j0..p * n + j0 + nc];
            let odd = (p + 1 < k).then(|| &w[(p + 1) * n + j0..(p + 1) * n + j0 + nc]);
            let dst = &mut panel[q * NB..(q + 1) * NB];
            // SAFETY: callers checked AVX-512 BF16; the kernel reads nc values of each row
            // and writes nc lanes of dst (nc <= NB).
            let done = unsafe { avx512::interleave_rows(even, odd, &mut dst[..nc]) };
            for (j, d) in dst.iter_mut().enumerate().take(nc).skip(done) {
                let lo = half::bf16::from_f32(even[j]).to_bits() as u32;
                let hi = odd.map_or(0, |o| half::bf16::from_f32(o[j]).to_bits() as u32);
                *d = lo | (hi << 16);
            }
            dst[nc..].fill(0);
        }
        return;
    }
    // Pairs run along k, which is b's column index in its transpose (n x k).
    with_view!(b.t(), (n, k), |bt| {
        if b.transposed {
            // Stored (n x k), output-major (a weight as checkpoints hold it): column j's
            // pairs are consecutive in memory, so read along them.
            for j in 0..nc {
                for q in 0..qc {
                    panel[q * NB + j] = bt.pair(j0 + j, q0 + q);
                }
            }
        } else {
            for q in 0..qc {
                for j in 0..nc {
                    panel[q * NB + j] = bt.pair(j0 + j, q0 + q);
                }
            }
        }
    });
    for q in 0..qc {
        panel[q * NB + nc..(q + 1) * NB].fill(0);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Start, MR, NB};
    use std::arch::x86_64::*;

    /// Rounds `src` to bf16 pairs into `dst`, 32 values per instruction (round to nearest
    /// even, as `half` does); returns how many pairs it wrote (the rest, under 16, is the
    /// caller's).
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 must be present. Nothing else: the loop stops before
    /// either slice would be overrun.
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

    /// `dst[j] = (bf16(even[j]), bf16(odd[j]))` (odd zero when absent), 16 columns per
    /// step; returns how many it wrote (the rest, under 16, is the caller's).
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 must be present. Nothing else: the loop stops before any
    /// slice would be overrun.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn interleave_rows(even: &[f32], odd: Option<&[f32]>, dst: &mut [u32]) -> usize {
        let len = dst
            .len()
            .min(even.len())
            .min(odd.map_or(usize::MAX, <[f32]>::len));
        let mut j = 0;
        while j + 16 <= len {
            let e: __m256i =
                std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(even.as_ptr().add(j))));
            let lo = _mm512_cvtepu16_epi32(e);
            let v = match odd {
                Some(o) => {
                    let h: __m256i =
                        std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(o.as_ptr().add(j))));
                    _mm512_or_si512(lo, _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                }
                None => lo,
            };
            _mm512_storeu_si512(dst.as_mut_ptr().add(j) as *mut _, v);
            j += 16;
        }
        j
    }

    /// `mr` (<= MR) rows x `nc` (<= NB) columns of the product over one panel of `qc`
    /// pairs. `xb` starts at the tile's first row and first pair; rows are `kp` pairs apart.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 must be present. Nothing is bounds-checked: `1 <= mr <=
    /// MR` and `nc <= NB`; `xb` must hold `(mr - 1) * kp + qc` pairs, `panel` `qc * NB`, a
    /// `Start::Bias` slice nc floats; `out` must be valid for reads (`Start::Accumulate`)
    /// and writes of columns 0..nc of mr rows n floats apart, which no other thread
    /// touches meanwhile.
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
                    // wrapping_add: a chunk past nc lies outside the buffers (mask 0, no load).
                    Start::Bias(Some(b)) => {
                        _mm512_maskz_loadu_ps(masks[c], b.as_ptr().wrapping_add(c * 16))
                    }
                    Start::Bias(None) => _mm512_setzero_ps(),
                    Start::Accumulate => {
                        _mm512_maskz_loadu_ps(masks[c], out.wrapping_add(r * n + c * 16))
                    }
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

    /// Pairs q0..q1 of the weight's rows (row 2q and 2q + 1, the second zero past k) times
    /// the same pairs of xb's m rows, added into acc (m x np, chunk lane order).
    ///
    /// # Safety
    /// AVX-512F, BW and BF16 must be present. Nothing is bounds-checked: `1 <= m <= 8`
    /// (any other m runs as 8 rows); `xb` must hold m rows of `k.div_ceil(2)` pairs, `wt`
    /// `k * n` values, and `acc` m rows of `np` floats, with `np >= n.div_ceil(32) * 32`
    /// (whole 32-column chunks). Any q0..q1 is safe: pairs past k are never read.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn stream_slab(
        xb: &[u32],
        wt: &[half::bf16],
        (m, k, n): (usize, usize, usize),
        np: usize,
        q0: usize,
        q1: usize,
        acc: &mut [f32],
    ) {
        let kp = k.div_ceil(2);
        // Pairs whose second row exists; an odd k leaves a last half pair.
        let whole = (k / 2).min(q1);
        // Blocks of columns whose m rows of accumulators stay in L1 (32 KB) while the
        // slab's pairs stream past them.
        let block = (8192 / m.max(1)).max(32) / 32 * 32;
        macro_rules! run {
            ($m:literal, $g:literal) => {{
                let mut j0 = 0;
                while j0 < n {
                    let j1 = (j0 + block).min(n);
                    let mut q = q0;
                    while q + $g <= whole {
                        pairs::<$m, $g>(xb, kp, wt, n, np, q, (j0, j1), acc);
                        q += $g;
                    }
                    while q < whole {
                        pairs::<$m, 1>(xb, kp, wt, n, np, q, (j0, j1), acc);
                        q += 1;
                    }
                    j0 = j1;
                }
                // The half pair belongs to the slab that holds it (a slab may be empty).
                if k % 2 == 1 && (q0..q1).contains(&(k / 2)) {
                    half_pair::<$m>(xb, kp, wt, n, np, k / 2, acc);
                }
            }};
        }
        match m {
            1 => run!(1, 4),
            2 => run!(2, 4),
            3 => run!(3, 4),
            4 => run!(4, 4),
            5 => run!(5, 4),
            6 => run!(6, 4),
            7 => run!(7, 4),
            _ => run!(8, 4),
        }
    }

    /// Interleaves 32 columns of two weight rows into bf16 pairs: (lo, hi), where lane t of
    /// lo holds columns 8(t / 4) + t % 4 and lane t of hi the four after those (the unpack
    /// instructions work within 128-bit lanes). `mask`: the columns present.
    ///
    /// # Safety
    /// AVX-512F, BW and BF16 must be present, and for every bit t set in `mask` the bf16
    /// at `even + t` (and at `odd + t`, when given) must be readable; lanes masked off are
    /// not read.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    #[inline]
    unsafe fn chunk(
        even: *const half::bf16,
        odd: Option<*const half::bf16>,
        mask: __mmask32,
    ) -> (__m512bh, __m512bh) {
        let a = _mm512_maskz_loadu_epi16(mask, even as *const i16);
        let b = match odd {
            Some(o) => _mm512_maskz_loadu_epi16(mask, o as *const i16),
            None => _mm512_setzero_si512(),
        };
        (
            std::mem::transmute::<__m512i, __m512bh>(_mm512_unpacklo_epi16(a, b)),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_unpackhi_epi16(a, b)),
        )
    }

    /// G whole pairs from pair q, for M rows, columns j0..j1: 32 columns at a time, the
    /// accumulators are loaded, the G x 2 weight rows' pieces interleaved and multiplied,
    /// the accumulators stored. Meanwhile the same columns of the next G pairs are
    /// prefetched: the rows of a pair group are only a few KB apart, too many short
    /// streams for the hardware prefetcher, which left decoding at ~20 GB/s where f32
    /// weights streamed at ~40.
    ///
    /// # Safety
    /// AVX-512F, BW and BF16 must be present. Nothing is bounds-checked: `xb` must hold M
    /// rows of `kp` pairs, with `q + G <= kp`; weight rows 2q..2(q + G) must all exist (`wt`
    /// at least `2 * (q + G) * n` values) and `j1 <= n`; `acc` must hold M rows of `np`
    /// floats with `j0 + (j1 - j0).div_ceil(32) * 32 <= np` (it loads and stores whole
    /// 32-column chunks from j0).
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pairs<const M: usize, const G: usize>(
        xb: &[u32],
        kp: usize,
        wt: &[half::bf16],
        n: usize,
        np: usize,
        q: usize,
        (j0, j1): (usize, usize),
        acc: &mut [f32],
    ) {
        let xp = xb.as_ptr().add(q);
        let w = wt.as_ptr();
        let a = acc.as_mut_ptr();
        let mut j = j0;
        while j < j1 {
            let mask: __mmask32 = if j1 - j >= 32 {
                !0
            } else {
                (1u32 << (j1 - j)) - 1
            };
            let mut lo = [_mm512_setzero_ps(); M];
            let mut hi = [_mm512_setzero_ps(); M];
            for r in 0..M {
                lo[r] = _mm512_loadu_ps(a.add(r * np + j));
                hi[r] = _mm512_loadu_ps(a.add(r * np + j + 16));
            }
            for g in 0..G {
                let p = 2 * (q + g);
                // Prefetches past the weight's end are dropped by the CPU, never faulted.
                let next = w.wrapping_add((p + 2 * G) * n + j);
                _mm_prefetch(next as *const i8, _MM_HINT_T0);
                _mm_prefetch(next.wrapping_add(n) as *const i8, _MM_HINT_T0);
                let (wl, wh) = chunk(w.add(p * n + j), Some(w.add((p + 1) * n + j)), mask);
                for r in 0..M {
                    // A broadcast from memory (an operand of the instruction), not a
                    // register per row and pair: 2M accumulators leave too few.
                    let xv = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        *xp.add(r * kp + g) as i32,
                    ));
                    lo[r] = _mm512_dpbf16_ps(lo[r], wl, xv);
                    hi[r] = _mm512_dpbf16_ps(hi[r], wh, xv);
                }
            }
            for r in 0..M {
                _mm512_storeu_ps(a.add(r * np + j), lo[r]);
                _mm512_storeu_ps(a.add(r * np + j + 16), hi[r]);
            }
            j += 32;
        }
    }

    /// The last pair of an odd k: one weight row, its partner zero.
    ///
    /// # Safety
    /// AVX-512F, BW and BF16 must be present. Nothing is bounds-checked: `xb` must hold M
    /// rows of `kp` pairs with `q < kp`, `wt` row 2q (`(2q + 1) * n` values at least), and
    /// `acc` M rows of `np` floats with `np >= n.div_ceil(32) * 32`.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn half_pair<const M: usize>(
        xb: &[u32],
        kp: usize,
        wt: &[half::bf16],
        n: usize,
        np: usize,
        q: usize,
        acc: &mut [f32],
    ) {
        let w = wt.as_ptr().add(2 * q * n);
        let a = acc.as_mut_ptr();
        let mut j = 0;
        while j < n {
            let mask: __mmask32 = if n - j >= 32 {
                !0
            } else {
                (1u32 << (n - j)) - 1
            };
            let (wl, wh) = chunk(w.add(j), None, mask);
            for r in 0..M {
                let x = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *xb.get_unchecked(r * kp + q) as i32,
                ));
                let l = _mm512_dpbf16_ps(_mm512_loadu_ps(a.add(r * np + j)), wl, x);
                let h = _mm512_dpbf16_ps(_mm512_loadu_ps(a.add(r * np + j + 16)), wh, x);
                _mm512_storeu_ps(a.add(r * np + j), l);
                _mm512_storeu_ps(a.add(r * np + j + 16), h);
            }
            j += 32;
        }
    }

    /// out = bias + the sum of the tasks' partial products, back in column order.
    ///
    /// # Safety
    /// AVX-512F must be present. Nothing is bounds-checked: `tasks >= 1` (the first block
    /// is always read) and `np >= n.div_ceil(32) * 32`; `partial` must hold `tasks * m * np`
    /// floats, `bias` (when given) n, `out` `m * n` (the column tails are masked).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn reduce(
        partial: &[f32],
        tasks: usize,
        (m, n): (usize, usize),
        np: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        // Columns 0-15 of a chunk: lo lanes 0-3, hi 0-3, lo 4-7, hi 4-7; 16-31 the rest
        // (index 16 + i picks lane i of hi).
        let first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
        let second =
            _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
        let p = partial.as_ptr();
        for r in 0..m {
            let mut j = 0;
            while j < n {
                let mut lo = _mm512_loadu_ps(p.add(r * np + j));
                let mut hi = _mm512_loadu_ps(p.add(r * np + j + 16));
                for t in 1..tasks {
                    let base = t * m * np + r * np + j;
                    lo = _mm512_add_ps(lo, _mm512_loadu_ps(p.add(base)));
                    hi = _mm512_add_ps(hi, _mm512_loadu_ps(p.add(base + 16)));
                }
                let cols = (n - j).min(32);
                let m0: __mmask16 = ((1u32 << cols.min(16)) - 1) as u16;
                let m1: __mmask16 = ((1u32 << cols.saturating_sub(16)) - 1) as u16;
                let mut o0 = _mm512_permutex2var_ps(lo, first, hi);
                let mut o1 = _mm512_permutex2var_ps(lo, second, hi);
                if let Some(b) = bias {
                    o0 = _mm512_add_ps(o0, _mm512_maskz_loadu_ps(m0, b.as_ptr().add(j)));
                    o1 = _mm512_add_ps(
                        o1,
                        _mm512_maskz_loadu_ps(m1, b.as_ptr().wrapping_add(j + 16)),
                    );
                }
                let o = out.as_mut_ptr().add(r * n + j);
                _mm512_mask_storeu_ps(o, m0, o0);
                // Masked: nothing is touched past n (the pointer may point past the row).
                _mm512_mask_storeu_ps(o.wrapping_add(16), m1, o1);
                j += 32;
            }
        }
    }

    /// Columns j0..j1 of `rows`' product, for every row of x.
    ///
    /// # Safety
    /// AVX-512F, BW and BF16 must be present. Only `bias` is indexed with checks: `xb` must
    /// hold m rows of `k.div_ceil(2)` pairs, `w` at least `j1 * k` values (rows j0..j1),
    /// `j1 <= n`, and `out` must be valid for writes of m rows n floats apart, whose columns
    /// j0..j1 (all this writes) no other thread reads or writes meanwhile.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub unsafe fn rows_range(
        xb: &[u32],
        w: &[half::bf16],
        bias: Option<&[f32]>,
        (m, k, n): (usize, usize, usize),
        (j0, j1): (usize, usize),
        out: *mut f32,
    ) {
        let mut j = j0;
        while j < j1 {
            let nc = (j1 - j).min(4);
            let mut i = 0;
            while i < m {
                let nr = (m - i).min(4);
                let sums = match nr {
                    4 => rows_block::<4>(xb, w, k, i, j, nc),
                    3 => rows_block::<3>(xb, w, k, i, j, nc),
                    2 => rows_block::<2>(xb, w, k, i, j, nc),
                    _ => rows_block::<1>(xb, w, k, i, j, nc),
                };
                for (r, s) in sums.iter().enumerate().take(nr) {
                    for (c, &v) in s.iter().enumerate().take(nc) {
                        *out.add((i + r) * n + j + c) = v + bias.map_or(0.0, |b| b[j + c]);
                    }
                }
                i += nr;
            }
            j += nc;
        }
    }

    /// R rows of x (from i) against `nc` (<= 4) rows of w (from j): R x nc dot products of
    /// length k, 32 values per instruction; the next 4 rows of w are prefetched meanwhile.
    ///
    /// # Safety
    /// AVX-512F, BW and BF16 must be present. The reads are unchecked: `xb` must hold rows
    /// i..i + R of `k.div_ceil(2)` pairs, `w` rows j..j + nc.min(4) of k values; the tail of
    /// k is masked (prefetches past w's end are harmless).
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    #[inline]
    unsafe fn rows_block<const R: usize>(
        xb: &[u32],
        w: &[half::bf16],
        k: usize,
        i: usize,
        j: usize,
        nc: usize,
    ) -> [[f32; 4]; 4] {
        let kp = k.div_ceil(2);
        let xp = xb.as_ptr().add(i * kp);
        let wp = w.as_ptr().add(j * k);
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let mut p = 0;
        while p < k {
            let (wmask, xmask): (__mmask32, __mmask16) = if k - p >= 32 {
                (!0, !0)
            } else {
                (
                    (1u32 << (k - p)) - 1,
                    ((1u32 << (k - p).div_ceil(2)) - 1) as u16,
                )
            };
            let wv: [__m512bh; 4] = std::array::from_fn(|c| {
                if c < nc {
                    _mm_prefetch(wp.wrapping_add((c + 4) * k + p) as *const i8, _MM_HINT_T0);
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(
                        wmask,
                        wp.add(c * k + p) as *const i16,
                    ))
                } else {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512())
                }
            });
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi32(
                    xmask,
                    xp.add(r * kp + p / 2) as *const i32,
                ));
                for (c, a) in row.iter_mut().enumerate() {
                    *a = _mm512_dpbf16_ps(*a, wv[c], xv);
                }
            }
            p += 32;
        }
        let mut sums = [[0f32; 4]; 4];
        for (r, row) in acc.iter().enumerate() {
            _mm_storeu_ps(sums[r].as_mut_ptr(), hsum4(row));
        }
        sums
    }

    /// The lane sums of four vectors, as one vector of four.
    ///
    /// # Safety
    /// AVX-512F must be present; no memory is touched.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn hsum4(v: &[__m512; 4]) -> __m128 {
        let half = |v: __m512| {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            _mm256_add_ps(_mm512_castps512_ps256(v), hi)
        };
        // hadd pairs neighbours: after three rounds lane r of each 128-bit half holds part
        // of vector r's sum; the two halves together hold all of it.
        let h01 = _mm256_hadd_ps(half(v[0]), half(v[1]));
        let h23 = _mm256_hadd_ps(half(v[2]), half(v[3]));
        let h = _mm256_hadd_ps(h01, h23);
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
    }

    /// The inner loop for R rows: per pair, four weight vectors and R broadcasts feed
    /// 4R dot-product instructions.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 must be present, `R <= MR` (or the copies panic), `xp`
    /// readable at `r * kp + q` for every r < R and q < qc, and `pp` for `qc * NB` u32s.
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

    /// The general product: every combination of f32 or bf16 factors, stored as they are
    /// read or transposed, gives the f64 sum of the bf16-rounded factors' products, over
    /// shapes with row tiles, column panels, several k panels, odd k and k = 0.
    #[test]
    fn matmul_matches_the_definition_for_every_layout() {
        if !available() {
            crate::kernels::skip_or_require("bf16dot::matmul (this CPU lacks AVX-512 BF16)");
            let mut out = vec![f32::NAN; 1];
            let a = [1f32];
            let e = Elems::F32(&a);
            assert!(!matmul(
                Operand::rows(e),
                Operand::rows(e),
                (1, 1, 1),
                &mut out
            ));
            return;
        }
        let round = |v: f32| half::bf16::from_f32(v);
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 3),
            (13, 37, 70),
            (20, 1100, 130),
            (3, 0, 5),
        ] {
            // Values that are not bf16 already, so that rounding an f32 factor matters.
            let a: Vec<f32> = (0..m * k)
                .map(|i| (i as f32 * 0.31).sin() * 1.001)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| (i as f32 * 0.17).cos() * 1.003)
                .collect();
            let want = |i: usize, j: usize| -> f64 {
                (0..k)
                    .map(|p| {
                        round(a[i * k + p]).to_f32() as f64 * round(b[p * n + j]).to_f32() as f64
                    })
                    .sum()
            };
            // Stored forms: as read (a: m x k, b: k x n) and transposed (a: k x m, b: n x k).
            let a_t: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let b_t: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let bf = |v: &[f32]| -> Vec<half::bf16> { v.iter().map(|&x| round(x)).collect() };
            let (a16, a_t16, b16, b_t16) = (bf(&a), bf(&a_t), bf(&b), bf(&b_t));
            for a_op in [
                Operand::rows(Elems::F32(&a)),
                Operand::rows(Elems::Bf16(&a16)),
                Operand::rows(Elems::F32(&a_t)).t(),
                Operand::rows(Elems::Bf16(&a_t16)).t(),
            ] {
                for b_op in [
                    Operand::rows(Elems::F32(&b)),
                    Operand::rows(Elems::Bf16(&b16)),
                    Operand::rows(Elems::F32(&b_t)).t(),
                    Operand::rows(Elems::Bf16(&b_t16)).t(),
                ] {
                    let mut out = vec![f32::NAN; m * n];
                    assert!(matmul(a_op, b_op, (m, k, n), &mut out));
                    for i in 0..m {
                        for j in 0..n {
                            let (got, want) = (out[i * n + j] as f64, want(i, j));
                            assert!(
                                (got - want).abs() < 1e-3,
                                "({m},{k},{n}) [{i},{j}] a^T {} b^T {}: {got} vs {want}",
                                a_op.transposed,
                                b_op.transposed
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every edge (row tiles, column panels, odd k, several k panels, bias or none) gives
    /// the product of the bf16-rounded activations and the bf16 weights, summed in f32.
    /// Without AVX-512 BF16 the kernels must decline (out untouched), and the paths their
    /// callers take instead must give the product of the activations as they are.
    #[test]
    fn matches_the_definition_for_every_edge_shape() {
        let dot = available();
        if !dot {
            crate::kernels::skip_or_require(
                "bf16dot kernels (this CPU lacks AVX-512 BF16); checked the widening fallback \
                 its callers (packed::linear, skinny::linear) take instead",
            );
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 3),
            (13, 37, 70),
            (6, 600, 64),
            (20, 1100, 130),
            // The few-rows kernel: every row count, odd and even k (several tasks' slabs),
            // column tails on either side of a 16-lane half of a 32-column chunk.
            (1, 2, 31),
            (1, 301, 100),
            (2, 64, 33),
            (3, 77, 48),
            (4, 18, 65),
            (5, 9, 17),
            (1, 15, 40),
            (6, 130, 1),
            (7, 41, 96),
            (8, 1001, 40),
        ] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.31).sin()).collect();
            let wt: Vec<half::bf16> = (0..k * n)
                .map(|i| half::bf16::from_f32((i as f32 * 0.17).cos()))
                .collect();
            // The same weight stored output-major (n x k), as the tied LM head is.
            let w_rows: Vec<half::bf16> = (0..n * k).map(|i| wt[(i % k) * n + i / k]).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            for bias in [None, Some(b.as_slice())] {
                // The definition, with the activations rounded to bf16 (the kernels) or not
                // (the widening fallback).
                let want = |i: usize, j: usize, round: bool| -> f64 {
                    (0..k)
                        .map(|p| {
                            let v = x[i * k + p];
                            let xr = if round {
                                half::bf16::from_f32(v).to_f32()
                            } else {
                                v
                            };
                            xr as f64 * wt[p * n + j].to_f32() as f64
                        })
                        .sum::<f64>()
                        + bias.map_or(0.0, |b| b[j] as f64)
                };
                if !dot {
                    let mut out = vec![f32::NAN; m * n];
                    assert!(!linear(&x, &wt, bias, (m, k, n), &mut out));
                    assert!(!stream(&x, &wt, bias, (m, k, n), &mut out));
                    assert!(!rows(&x, &w_rows, bias, (m, k, n), &mut out));
                    assert!(out.iter().all(|v| v.is_nan()), "a declining kernel wrote");
                    let mut packed = vec![f32::NAN; m * n];
                    crate::kernels::packed::linear(&x, &wt, bias, (m, k, n), &mut packed);
                    let mut by_rows = vec![f32::NAN; m * n];
                    if !crate::kernels::skinny::linear(&x, &w_rows, bias, (m, k, n), &mut by_rows) {
                        // No AVX-512 at all: `Linear::forward`'s plain ops.
                        by_rows = crate::kernels::plain_linear(&x, &w_rows, bias, (m, k, n));
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let want = want(i, j, false);
                            for (got, path) in [
                                (packed[i * n + j], "input-major"),
                                (by_rows[i * n + j], "output-major"),
                            ] {
                                let got = got as f64;
                                assert!(
                                    (got - want).abs() < 1e-3,
                                    "widened {path} ({m},{k},{n}) [{i},{j}]: {got} vs {want}"
                                );
                            }
                        }
                    }
                    continue;
                }
                let mut out = vec![f32::NAN; m * n];
                assert!(linear(&x, &wt, bias, (m, k, n), &mut out));
                let mut streamed = vec![f32::NAN; m * n];
                assert_eq!(
                    stream(&x, &wt, bias, (m, k, n), &mut streamed),
                    m <= STREAM_ROWS
                );
                // More threads than this machine has: slabs of one pair, or none at all.
                let mut streamed_wide = vec![f32::NAN; m * n];
                rayon::ThreadPoolBuilder::new()
                    .num_threads(7)
                    .build()
                    .unwrap()
                    .install(|| stream(&x, &wt, bias, (m, k, n), &mut streamed_wide));
                let mut by_rows = vec![f32::NAN; m * n];
                assert_eq!(
                    rows(&x, &w_rows, bias, (m, k, n), &mut by_rows),
                    m <= STREAM_ROWS
                );
                for i in 0..m {
                    for j in 0..n {
                        let want = want(i, j, true);
                        let got = out[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-3,
                            "({m},{k},{n}) [{i},{j}]: {got} vs {want}"
                        );
                        if m <= STREAM_ROWS {
                            for (got, threads) in [
                                (streamed[i * n + j], "pool"),
                                (streamed_wide[i * n + j], "7"),
                            ] {
                                let got = got as f64;
                                assert!(
                                    (got - want).abs() < 1e-3,
                                    "streamed on {threads} threads ({m},{k},{n}) [{i},{j}]: {got} vs {want}"
                                );
                            }
                            let got = by_rows[i * n + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-3,
                                "output-major ({m},{k},{n}) [{i},{j}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
