//! `x · Wᵀ` against a bf16 weight as checkpoints store it, (n x k), and the general bf16
//! product of training's passes, on AVX-512 BF16 (`vdpbf16ps`: 16 lanes x a pair of bf16
//! products summed into f32 per instruction). A few rows (decoding) stream the weight once
//! ([`rows`]); more go through packed panels ([`matmul`], [`linear`]).
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
/// cached by std) and may use it ([`super::avx512_allowed`]).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::avx512_allowed()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out (m x n) = bf16(x) (m x k) · w (n x k)ᵀ (+ bias)` against a bf16 weight as
/// checkpoints store it: [`rows`] for a few rows (decoding), the panel product otherwise.
/// Returns false (out untouched) when the CPU lacks AVX-512 BF16.
pub fn linear(
    x: &[f32],
    w: &[half::bf16],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) -> bool {
    assert!(x.len() >= m * k && w.len() >= k * n && out.len() >= m * n);
    assert!(bias.is_none_or(|b| b.len() >= n));
    if !available() {
        return false;
    }
    if m <= STREAM_ROWS {
        return rows(x, w, bias, (m, k, n), out);
    }
    product(
        Operand::rows(Elems::F32(x)),
        Operand::rows(Elems::Bf16(w)).t(),
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

/// Rows at or below which [`linear`] takes [`rows`].
pub const STREAM_ROWS: usize = 8;

/// `out (m x n) = bf16(x) (m x k) · w (n x k)ᵀ (+ bias)` for a few rows against a weight
/// stored output-major, as checkpoints store it (decoding). Returns false (out untouched)
/// for more than [`STREAM_ROWS`] rows or a CPU without AVX-512 BF16. [`rows_shared`] with
/// one weight.
pub fn rows(
    x: &[f32],
    w: &[half::bf16],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
) -> bool {
    rows_shared(x, &[RowsWeight { w, bias, n }], (m, k), &mut [out])
}

/// One weight of a [`rows_shared`] product: `n` rows of k values, output-major, and its bias.
#[derive(Clone, Copy)]
pub struct RowsWeight<'a> {
    pub w: &'a [half::bf16],
    pub bias: Option<&'a [f32]>,
    pub n: usize,
}

/// `outs[i] (m x n_i) = bf16(x) (m x k) · ws[i].w (n_i x k)ᵀ (+ bias)` for a few rows of x
/// against several weights of the same input (q/k/v, gate/up): x is rounded once and the
/// weights' rows, one after the other, share one parallel loop, so a layer's small
/// products (a 256 x 1,536 key projection streams 0.75 MB, tens of microseconds) cost no
/// pool wake-up and no rounding of their own. Each output is what [`rows`] gives it alone
/// (bit for bit up to [`LONG_ROW`] values per row; longer rows are summed four at a time
/// where a task's range allows, so their last bits depend on the split, as with [`rows`]'s
/// thread count).
/// Returns false (outs untouched) for more than [`STREAM_ROWS`] rows or a CPU without
/// AVX-512 BF16.
///
/// How the weights are walked decides the speed, the work being one read of them: each
/// task takes a contiguous range of weight rows and reads it front to back, one row (or,
/// for long rows, four) at a time against the x rows held in L1. One long stream per core
/// is what the hardware prefetcher follows best: measured on a 1536 x 8960 bf16 weight
/// (AMD EPYC Zen 4, 2 threads, one row of x, alternating runs) this streamed 41 GB/s
/// against a plain read's 44, where blocks of four rows read side by side (several short
/// streams) gave 26 and the input-major slabs this replaced 37. Rows longer than 4,096
/// values (the MLP's down projection) do better four at a time, sharing each load of x,
/// which then no longer sits in L1 beside the stream; several rows of x do better in 4 x 4
/// blocks of dot products (fewer loads of x per weight byte) except for short rows.
pub fn rows_shared(
    x: &[f32],
    ws: &[RowsWeight],
    (m, k): (usize, usize),
    outs: &mut [&mut [f32]],
) -> bool {
    assert!(x.len() >= m * k && ws.len() == outs.len());
    for (w, out) in ws.iter().zip(outs.iter()) {
        assert!(w.w.len() >= w.n * k && out.len() >= m * w.n);
        assert!(w.bias.is_none_or(|b| b.len() >= w.n));
    }
    if m > STREAM_ROWS || !available() {
        return false;
    }
    let total: usize = ws.iter().map(|w| w.n).sum();
    if m == 0 || total == 0 {
        return true;
    }
    let xb = round_rows(x, m, k);
    let out_ptrs: Vec<SendPtr> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
    // Runs `f(weight, j0, j1)` on the pieces of the rows lo..hi of all weights, one after
    // the other, that lie in each weight.
    let pieces = |lo: usize, hi: usize, f: &dyn Fn(usize, usize, usize)| {
        let mut first = 0;
        for (i, w) in ws.iter().enumerate() {
            let (j0, j1) = (lo.max(first), hi.min(first + w.n));
            if j0 < j1 {
                f(i, j0 - first, j1 - first);
            }
            first += w.n;
        }
    };
    let threads = rayon::current_num_threads().max(1);
    let sequential = m == 1 || (m <= 4 && k <= LONG_ROW);
    // Sequential: a few ranges per core, for balance when a core is slowed by other work;
    // blocks: enough weight rows per task to amortise it, enough tasks to balance the
    // cores, whole blocks of four rows.
    let per = if sequential {
        total.div_ceil(4 * threads).max(1)
    } else {
        (total / (8 * threads)).clamp(16, 1024) / 4 * 4
    };
    super::team::for_each(total.div_ceil(per), &|c| {
        pieces(c * per, ((c + 1) * per).min(total), &|i, j0, j1| {
            let RowsWeight { w, bias, n } = ws[i];
            let out = out_ptrs[i].get();
            // SAFETY (both): AVX-512 BF16 and BW are present (`available`); 1 <= m <=
            // STREAM_ROWS (4 for `rows_in_order`); the call reads rows j0..j1 (j1 <= n) of
            // w, n x k (asserted above), and xb's m rows of k.div_ceil(2) pairs, and writes
            // only columns j0..j1 of out i (m x n), which no other task touches.
            unsafe {
                if sequential {
                    avx512::rows_in_order(&xb, w, bias, (m, k, n), (j0, j1), out)
                } else {
                    avx512::rows_range(&xb, w, bias, (m, k, n), (j0, j1), out)
                }
            }
        })
    });
    true
}

/// Values per weight row above which [`rows`] reads four rows side by side.
const LONG_ROW: usize = 4096;

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
    if let (Elems::Bf16(w), true, true) = (b.elems, b.transposed, k % 2 == 0) {
        // A bf16 weight as checkpoints store it, (n x k) (inference, and the LM head): with
        // k even, column j's pairs are consecutive 32-bit words of its row, so the panel is
        // the transposition of a block of 32-bit words. Whole 16 x 16 blocks go through
        // the vector transposition (a word at a time, this was 5% of a bf16 2B `bench
        // generate`'s samples), the edges word by word.
        let word = |j: usize, q: usize| {
            let at = (j0 + j) * k + 2 * (q0 + q);
            w[at].to_bits() as u32 | ((w[at + 1].to_bits() as u32) << 16)
        };
        let (rows16, pairs16) = if word_by_word() {
            (0, 0)
        } else {
            (nc / 16 * 16, qc / 16 * 16)
        };
        if rows16 > 0 && pairs16 > 0 {
            assert!(w.len() >= (j0 + nc) * k && q0 + qc <= k / 2 && panel.len() >= qc * NB);
            // SAFETY: callers checked AVX-512 BF16 (F with it); the blocks read rows j0..j0
            // + rows16 of w at pairs q0..q0 + pairs16 (inside w: asserted) and write lanes
            // 0..rows16 of panel rows 0..pairs16 (inside panel: asserted).
            unsafe {
                avx512::transpose_words(
                    w.as_ptr().add(j0 * k + 2 * q0) as *const u32,
                    k / 2,
                    (rows16, pairs16),
                    panel.as_mut_ptr(),
                    NB,
                )
            };
        }
        for j in 0..nc {
            // Rows past the blocks: every pair; rows in them: the pairs past them.
            let from = if j < rows16 { pairs16 } else { 0 };
            for q in from..qc {
                panel[q * NB + j] = word(j, q);
            }
        }
        for q in 0..qc {
            panel[q * NB + nc..(q + 1) * NB].fill(0);
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

/// The four lane sums of four vectors (decoding attention's scores reduce with it too).
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::hsum4;

/// Whether [`pack_panel`] transposes a stored bf16 weight word by word, not 16 x 16 words
/// at a time: only where a test asks, to compare the two.
fn word_by_word() -> bool {
    #[cfg(test)]
    {
        tests::WORD_BY_WORD.with(|w| w.get())
    }
    #[cfg(not(test))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Start, MR, NB};
    use std::arch::x86_64::*;

    /// `dst[q * ld + j] = src[j * stride + q]` for `j < rows`, `q < cols`, both multiples of
    /// 16: a transposition of 32-bit words, 16 x 16 at a time (16 rows loaded, then 32-bit,
    /// 64-bit and two 128-bit interleaves: 64 shuffles per 256 words, where word by word
    /// takes a load and a strided store each).
    ///
    /// # Safety
    /// AVX-512F must be present; `src` valid for reads of words `j * stride + q` and `dst`
    /// for writes of `q * ld + j` (`j < rows`, `q < cols`); `rows` and `cols` multiples of 16.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose_words(
        src: *const u32,
        stride: usize,
        (rows, cols): (usize, usize),
        dst: *mut u32,
        ld: usize,
    ) {
        for jb in (0..rows).step_by(16) {
            for qb in (0..cols).step_by(16) {
                let r: [__m512i; 16] = std::array::from_fn(|i| {
                    _mm512_loadu_si512(src.add((jb + i) * stride + qb) as *const _)
                });
                // a[2i], a[2i+1]: rows 2i and 2i+1 interleaved word by word, per 128-bit
                // lane L the columns 4L, 4L+1 (a[2i]) and 4L+2, 4L+3 (a[2i+1]).
                let a: [__m512i; 16] = std::array::from_fn(|t| {
                    let (x, y) = (r[t / 2 * 2], r[t / 2 * 2 + 1]);
                    if t % 2 == 0 {
                        _mm512_unpacklo_epi32(x, y)
                    } else {
                        _mm512_unpackhi_epi32(x, y)
                    }
                });
                // b[4g + c]: lane L holds column 4L + c of rows 4g..4g+4.
                let b: [__m512i; 16] = std::array::from_fn(|t| {
                    let (g, c) = (t / 4, t % 4);
                    let (x, y) = (a[4 * g + c / 2], a[4 * g + 2 + c / 2]);
                    if c % 2 == 0 {
                        _mm512_unpacklo_epi64(x, y)
                    } else {
                        _mm512_unpackhi_epi64(x, y)
                    }
                });
                for c in 0..4 {
                    // Lanes 0, 1 of row groups 0 and 1 (lo) or lanes 2, 3 (hi); the same
                    // of groups 2 and 3.
                    let lo01 = _mm512_shuffle_i32x4::<0x44>(b[c], b[4 + c]);
                    let hi01 = _mm512_shuffle_i32x4::<0xEE>(b[c], b[4 + c]);
                    let lo23 = _mm512_shuffle_i32x4::<0x44>(b[8 + c], b[12 + c]);
                    let hi23 = _mm512_shuffle_i32x4::<0xEE>(b[8 + c], b[12 + c]);
                    // Column 4L + c: lane L of each row group, groups in order.
                    let cols4 = [
                        _mm512_shuffle_i32x4::<0x88>(lo01, lo23),
                        _mm512_shuffle_i32x4::<0xDD>(lo01, lo23),
                        _mm512_shuffle_i32x4::<0x88>(hi01, hi23),
                        _mm512_shuffle_i32x4::<0xDD>(hi01, hi23),
                    ];
                    for (l, v) in cols4.iter().enumerate() {
                        let q = qb + 4 * l + c;
                        _mm512_storeu_si512(dst.add(q * ld + jb) as *mut _, *v);
                    }
                }
            }
        }
    }

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

    /// Columns j0..j1 of `rows`' product for m <= 4 rows of x, weight rows read in order:
    /// one at a time, or four side by side when m is 1 and they are long (see `rows`).
    ///
    /// # Safety
    /// AVX-512F, BW and BF16 must be present and 1 <= m <= 4 (more runs as 4). Only `bias`
    /// is indexed with checks: `xb` must hold m rows of `k.div_ceil(2)` pairs, `w` at least
    /// `j1 * k` values, `j1 <= n`, and `out` must be valid for writes of m rows n floats
    /// apart, whose columns j0..j1 (all this writes) no other thread reads or writes
    /// meanwhile.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub unsafe fn rows_in_order(
        xb: &[u32],
        w: &[half::bf16],
        bias: Option<&[f32]>,
        (m, k, n): (usize, usize, usize),
        (j0, j1): (usize, usize),
        out: *mut f32,
    ) {
        macro_rules! run {
            ($m:literal, $r:literal) => {{
                let mut j = j0;
                while j1 - j >= $r {
                    let sums = in_order::<$m, $r>(xb, w, k, j);
                    for (r, row) in sums.iter().enumerate() {
                        for (c, &v) in row.iter().enumerate() {
                            *out.add(r * n + j + c) = v + bias.map_or(0.0, |b| b[j + c]);
                        }
                    }
                    j += $r;
                }
                while j < j1 {
                    let sums = in_order::<$m, 1>(xb, w, k, j);
                    for (r, row) in sums.iter().enumerate() {
                        *out.add(r * n + j) = row[0] + bias.map_or(0.0, |b| b[j]);
                    }
                    j += 1;
                }
            }};
        }
        match m {
            1 if k > super::LONG_ROW => run!(1, 4),
            1 => run!(1, 1),
            2 => run!(2, 1),
            3 => run!(3, 1),
            _ => run!(4, 1),
        }
    }

    /// M rows of x against weight rows j..j + R: M x R dot products of length k, 32 values
    /// per instruction. With fewer than three chains of sums, two steps run per iteration
    /// on two sets of accumulators: `vdpbf16ps`'s latency would otherwise bound the loop.
    ///
    /// # Safety
    /// AVX-512F, BW and BF16 must be present. The reads are unchecked: `xb` must hold M rows
    /// of `k.div_ceil(2)` pairs, `w` rows j..j + R of k values; the tail of k is masked.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    #[inline]
    unsafe fn in_order<const M: usize, const R: usize>(
        xb: &[u32],
        w: &[half::bf16],
        k: usize,
        j: usize,
    ) -> [[f32; R]; M] {
        let kp = k.div_ceil(2);
        let xp = xb.as_ptr();
        let wp = w.as_ptr().add(j * k);
        let load = |p: *const half::bf16| -> __m512bh {
            std::mem::transmute(_mm512_loadu_si512(p as *const __m512i))
        };
        let mut a0 = [[_mm512_setzero_ps(); R]; M];
        let mut a1 = [[_mm512_setzero_ps(); R]; M];
        let mut p = 0;
        if M * R <= 2 {
            while p + 64 <= k {
                let w0: [__m512bh; R] = std::array::from_fn(|c| load(wp.add(c * k + p)));
                let w1: [__m512bh; R] = std::array::from_fn(|c| load(wp.add(c * k + p + 32)));
                for r in 0..M {
                    let x = xp.add(r * kp + p / 2);
                    let x0: __m512bh = std::mem::transmute(_mm512_loadu_si512(x as *const _));
                    let x1: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(x.add(16) as *const _));
                    for c in 0..R {
                        a0[r][c] = _mm512_dpbf16_ps(a0[r][c], w0[c], x0);
                        a1[r][c] = _mm512_dpbf16_ps(a1[r][c], w1[c], x1);
                    }
                }
                p += 64;
            }
        }
        while p < k {
            let (wmask, xmask): (__mmask32, __mmask16) = if k - p >= 32 {
                (!0, !0)
            } else {
                (
                    (1u32 << (k - p)) - 1,
                    ((1u32 << (k - p).div_ceil(2)) - 1) as u16,
                )
            };
            let w0: [__m512bh; R] = std::array::from_fn(|c| {
                std::mem::transmute(_mm512_maskz_loadu_epi16(
                    wmask,
                    wp.add(c * k + p) as *const i16,
                ))
            });
            for (r, row) in a0.iter_mut().enumerate() {
                let x0: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi32(
                    xmask,
                    xp.add(r * kp + p / 2) as *const i32,
                ));
                for (a, &wv) in row.iter_mut().zip(&w0) {
                    *a = _mm512_dpbf16_ps(*a, wv, x0);
                }
            }
            p += 32;
        }
        let mut sums = [[0f32; R]; M];
        for r in 0..M {
            for c in 0..R {
                sums[r][c] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r][c], a1[r][c]));
            }
        }
        sums
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
    pub(crate) unsafe fn hsum4(v: &[__m512; 4]) -> __m128 {
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

    thread_local! {
        /// Set: [`pack_panel`] transposes a stored bf16 weight word by word.
        pub(super) static WORD_BY_WORD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A bf16 weight stored (n x k) packs into the same panel through the vector
    /// transposition as word by word (the definition of the layout: lane j of pair row q
    /// holds w[j0 + j, 2(q0 + q)] and w[j0 + j, 2(q0 + q) + 1]), for whole 16 x 16 blocks,
    /// ragged edges of rows and pairs, and panels that start inside the weight.
    #[test]
    fn stored_bf16_weights_pack_as_word_by_word() {
        if !available() {
            crate::kernels::skip_or_require("bf16dot panels (this CPU lacks AVX-512 BF16)");
            return;
        }
        for &(n, k, j0, nc, q0, qc) in &[
            (64, 32, 0, 64, 0, 16),
            (200, 1100, 64, 64, 256, 256),
            (200, 1100, 192, 8, 512, 38),
            (100, 70, 64, 36, 0, 35),
            (37, 64, 16, 21, 3, 29),
            (16, 2, 0, 16, 0, 1),
        ] {
            let w: Vec<half::bf16> = (0..n * k)
                .map(|i| half::bf16::from_f32((i as f32 * 0.37).sin() * (1 + i % 7) as f32))
                .collect();
            let b = Operand {
                elems: Elems::Bf16(&w),
                transposed: true,
            };
            let pack = |word_by_word: bool| {
                WORD_BY_WORD.with(|c| c.set(word_by_word));
                let mut panel = vec![u32::MAX; KC * NB];
                pack_panel(b, (k, n), q0, qc, j0, nc, &mut panel);
                WORD_BY_WORD.with(|c| c.set(false));
                panel
            };
            let (fast, slow) = (pack(false), pack(true));
            for q in 0..qc {
                for j in 0..NB {
                    let want = if j < nc {
                        let at = (j0 + j) * k + 2 * (q0 + q);
                        w[at].to_bits() as u32 | ((w[at + 1].to_bits() as u32) << 16)
                    } else {
                        0
                    };
                    assert_eq!(slow[q * NB + j], want, "word by word, {n}x{k} q {q} j {j}");
                    assert_eq!(fast[q * NB + j], want, "transposed, {n}x{k} q {q} j {j}");
                }
            }
        }
    }

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

    /// Several weights in one call give each weight's product as [`rows`] gives it alone, bit
    /// for bit, and the definition: ranges of rows that cross from one weight into the next
    /// (on 1, 2 and 7 threads), weights of a single row or none, every path (rows in order,
    /// blocks of four for 5-8 rows of x), bias on some weights only.
    #[test]
    fn shared_rows_give_each_weight_its_own_product() {
        if !available() {
            crate::kernels::skip_or_require(
                "bf16dot::rows_shared (this CPU lacks AVX-512 BF16): it must decline",
            );
            let mut out = vec![f32::NAN; 3];
            let w = vec![half::bf16::ONE; 6];
            let ws = [RowsWeight {
                w: &w,
                bias: None,
                n: 3,
            }];
            assert!(!rows_shared(&[1.0, 2.0], &ws, (1, 2), &mut [&mut out]));
            assert!(out.iter().all(|v| v.is_nan()), "a declining kernel wrote");
            return;
        }
        for &(m, k) in &[(1, 1536), (1, 77), (2, 300), (4, 64), (5, 129), (8, 40)] {
            let ns = [61, 1, 0, 37, 256];
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let ws: Vec<Vec<half::bf16>> = ns
                .iter()
                .enumerate()
                .map(|(s, &n)| {
                    (0..n * k)
                        .map(|i| half::bf16::from_f32(((i + 7 * s) as f32 * 0.13).cos()))
                        .collect()
                })
                .collect();
            let biases: Vec<Option<Vec<f32>>> = ns
                .iter()
                .enumerate()
                .map(|(s, &n)| (s % 2 == 0).then(|| (0..n).map(|j| j as f32 * 0.1).collect()))
                .collect();
            let shared: Vec<RowsWeight> = ws
                .iter()
                .zip(&biases)
                .zip(&ns)
                .map(|((w, b), &n)| RowsWeight {
                    w,
                    bias: b.as_deref(),
                    n,
                })
                .collect();
            for threads in [1, 2, 7] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| vec![f32::NAN; m * n]).collect();
                let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                pool.install(|| assert!(rows_shared(&x, &shared, (m, k), &mut refs)));
                for (s, w) in shared.iter().enumerate() {
                    let mut alone = vec![f32::NAN; m * w.n];
                    pool.install(|| assert!(rows(&x, w.w, w.bias, (m, k, w.n), &mut alone)));
                    for i in 0..m {
                        for j in 0..w.n {
                            let got = outs[s][i * w.n + j];
                            assert_eq!(
                                got.to_bits(),
                                alone[i * w.n + j].to_bits(),
                                "weight {s} ({m},{k}) [{i},{j}] on {threads} threads"
                            );
                            let want: f64 = (0..k)
                                .map(|p| {
                                    half::bf16::from_f32(x[i * k + p]).to_f32() as f64
                                        * w.w[j * k + p].to_f32() as f64
                                })
                                .sum::<f64>()
                                + w.bias.map_or(0.0, |b| b[j] as f64);
                            assert!(
                                (got as f64 - want).abs() < 1e-3,
                                "weight {s} ({m},{k}) [{i},{j}]: {got} vs {want}"
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
            // Rows read in order: one row of x against rows of 32-value steps with and
            // without a whole 64-value iteration, odd k; long rows four at a time (with a
            // remainder of rows); two to four rows of x, short and long.
            (1, 63, 5),
            (1, 64, 3),
            (1, 95, 2),
            (1, 4097, 9),
            (1, 4160, 8),
            (1, 4100, 37),
            (2, 33, 3),
            (3, 4500, 6),
            (4, 70, 13),
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
                    assert!(!linear(&x, &w_rows, bias, (m, k, n), &mut out));
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
                assert!(linear(&x, &w_rows, bias, (m, k, n), &mut out));
                // One thread (long ranges of weight rows, so the blocks of four rows run) and
                // more threads than this machine has (ranges of a single row, or none).
                let on = |threads: usize| {
                    let mut out = vec![f32::NAN; m * n];
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap()
                        .install(|| assert!(linear(&x, &w_rows, bias, (m, k, n), &mut out)));
                    out
                };
                let (one, wide) = (on(1), on(7));
                let mut by_rows = vec![f32::NAN; m * n];
                assert_eq!(
                    rows(&x, &w_rows, bias, (m, k, n), &mut by_rows),
                    m <= STREAM_ROWS
                );
                for i in 0..m {
                    for j in 0..n {
                        let want = want(i, j, true);
                        let mut got = vec![
                            (out[i * n + j], "pool"),
                            (one[i * n + j], "1 thread"),
                            (wide[i * n + j], "7 threads"),
                        ];
                        if m <= STREAM_ROWS {
                            got.push((by_rows[i * n + j], "rows"));
                        }
                        for (got, path) in got {
                            let got = got as f64;
                            assert!(
                                (got - want).abs() < 1e-3,
                                "{path} ({m},{k},{n}) [{i},{j}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
