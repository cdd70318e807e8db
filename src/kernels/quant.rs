//! Weight-only quantization for inference on the CPU: 8-bit (`q8_0`) and 4-bit (`q4_1`)
//! weights in groups of 32 along the input axis, each group with its own scale (and, for
//! 4-bit, its own minimum), ggml's k-quants `q4_k` (4.5 bits: super-blocks of 256 with an
//! f16 scale and minimum, 6-bit scales and minima per 32) and `q6_k` (6.5625 bits: an f16
//! scale per 256, an 8-bit one per 16), and products that run on the CPU's integer dot
//! products.
//!
//! The numbers are ggml's: a group quantizes exactly as `quantize_row_q8_0_ref` /
//! `quantize_row_q4_1_ref` / `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref` in
//! llama.cpp's ggml-quants.c (tests/fixtures/quant checks gguf-py's numpy Q8_0/Q4_1 and
//! ggml's own C k-quant quantizers bit for bit), scales stored as ggml stores them, and
//! ggml's blocks (a GGUF tensor) convert to ours and back without a value changing
//! ([`QWeight::from_ggml`]). Only the arrangement differs: ggml stores each output row's
//! blocks one after the other and sums a row's dot product across SIMD lanes at the end;
//! here 16 output rows are interleaved, so one 512-bit `vpdpbusd` multiplies 4 consecutive
//! weights of 16 rows by the same 4 activations (broadcast), and the 16 lanes of the
//! accumulator are 16 outputs: no horizontal sums, and the weights are read front to back
//! once.
//!
//! Activations are quantized per call to 8 bits, one f32 scale per 32 values for q8_0 and
//! q4_1 (as ggml does for its `q8_0` dot products) and per 256 for the k-quants (ggml's
//! `q8_K`), so a k-quant super-block's sub-block sums, times their small integer scales,
//! stay integers until one conversion per super-block. The integer sums are exact; the
//! float steps happen in one fixed order with fused multiply-adds, so the AVX-512 VNNI
//! kernel, the AVX2 one (CPUs without AVX-512 VNNI: most Intel desktops and laptops, AMD
//! Zen 2/3) and the portable one give the same bits. [`kernel`] is the one place that
//! picks which runs.

use rayon::prelude::*;

use super::pages::PageBuf;
use super::SendPtr;

/// Weights per group along the input axis (one scale each; a q4_k sub-block).
pub const GROUP: usize = 32;
/// Weights per q4_k super-block along the input axis (one f16 scale and minimum, and 8
/// sub-blocks of [`GROUP`] with 6-bit scales and minima): ggml's `QK_K`.
pub const SUPER: usize = 256;
/// Output rows interleaved in one record: the lanes of a 512-bit vector of f32 sums.
pub const LANES: usize = 16;
/// Rows of activations that share one pass over a record (register tile).
const MR: usize = 4;

/// A weight-only quantization format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantKind {
    /// 8-bit signed weights, one f16 scale per 32 (ggml's Q8_0): 8.5 bits per weight.
    Q8_0,
    /// 4-bit unsigned weights with an f16 scale and an f16 minimum per 32 (ggml's Q4_1):
    /// 5 bits per weight.
    Q4_1,
    /// 4-bit unsigned weights in super-blocks of 256: an f16 scale and an f16 minimum per
    /// super-block, a 6-bit scale and a 6-bit minimum per 32 (ggml's Q4_K, the bulk of
    /// llama.cpp's Q4_K_M): 4.5 bits per weight. Needs input widths in whole super-blocks;
    /// a narrower layer takes q4_1 ([`QuantKind::for_width`]).
    Q4K,
    /// 6-bit weights in super-blocks of 256: an f16 scale per super-block and an 8-bit
    /// signed scale per 16 (ggml's Q6_K, the LM head of llama.cpp's Q4_K_M and q4_k's
    /// here): 6.5625 bits per weight. A narrower layer takes q8_0.
    Q6K,
}

impl QuantKind {
    pub const ALL: [QuantKind; 4] = [
        QuantKind::Q8_0,
        QuantKind::Q4_1,
        QuantKind::Q4K,
        QuantKind::Q6K,
    ];

    /// The name used on the command line and in saved checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q8_0 => "q8_0",
            QuantKind::Q4_1 => "q4_1",
            QuantKind::Q4K => "q4_k",
            QuantKind::Q6K => "q6_k",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Weights of one row a record covers (and the activations' scale block).
    pub fn block(self) -> usize {
        match self {
            QuantKind::Q8_0 | QuantKind::Q4_1 => GROUP,
            QuantKind::Q4K | QuantKind::Q6K => SUPER,
        }
    }

    /// Whether a weight of `k` inputs can take this format: whole blocks only.
    pub fn fits(self, k: usize) -> bool {
        k > 0 && k.is_multiple_of(self.block())
    }

    /// The format a layer of `k` inputs takes when a model is quantized to `self`: `self`
    /// where it fits; where a k-quant's super-blocks do not, the 32-value format of about
    /// its size (q4_k: q4_1; q6_k: q8_0), as llama.cpp's k-quant mixes fall back for such
    /// tensors; `None` (stays dense) where no format fits (every Qwen2/2.5/3-VL linear
    /// layer fits q8_0 and q4_1 but the vision patch embedding, whose 1,176 inputs stay
    /// dense).
    pub fn for_width(self, k: usize) -> Option<QuantKind> {
        let fallback = match self {
            QuantKind::Q4K => QuantKind::Q4_1,
            QuantKind::Q6K => QuantKind::Q8_0,
            _ => self,
        };
        [self, fallback].into_iter().find(|q| q.fits(k))
    }

    /// Bytes of one record: 16 rows x [`Self::block`] weights.
    pub fn record_bytes(self) -> usize {
        match self {
            // 16 f16 scales, then 512 bytes of weights.
            QuantKind::Q8_0 => 2 * LANES + LANES * GROUP,
            // 16 f16 scales, 16 f16 minima, then 256 bytes of nibbles.
            QuantKind::Q4_1 => 4 * LANES + LANES * GROUP / 2,
            // 16 f16 scales, 16 f16 minima, the 6-bit sub-block scales and minima (low 4
            // bits: 8 x 16 bytes; high 2 bits: 16 u32), then 2,048 bytes of nibbles.
            QuantKind::Q4K => 4 * LANES + 8 * LANES + 4 * LANES + LANES * SUPER / 2,
            // 16 f16 scales, 16 x 16 i8 sub-block scales, 2,048 bytes of low nibbles, then
            // 1,024 of the top 2 bits.
            QuantKind::Q6K => 2 * LANES + 16 * LANES + LANES * SUPER / 2 + LANES * SUPER / 4,
        }
    }

    /// Stored bits per weight, scales included.
    pub fn bits_per_weight(self) -> f64 {
        (self.record_bytes() * 8) as f64 / (LANES * self.block()) as f64
    }

    /// Where a record's weight bytes start.
    fn quants_at(self) -> usize {
        match self {
            QuantKind::Q8_0 => 2 * LANES,
            QuantKind::Q4_1 => 4 * LANES,
            QuantKind::Q4K => K_QUANTS_AT,
            QuantKind::Q6K => S_LOW_AT,
        }
    }
}

/// q4_k record layout (16 lanes = 16 output rows, one super-block of 256 inputs each):
/// f16 scales at 0, f16 minima at 32, then per sub-block `j` 16 bytes at [`K_LOW_AT`]` +
/// 16 j` (lane `l`: the low 4 bits of its 6-bit scale, then of its minimum, in the high
/// nibble), 16 u32 at [`K_HIGH_AT`] (lane `l`: bits `2j..2j+2` the top 2 bits of sub-block
/// `j`'s scale, bits `16+2j..` of its minimum), then the nibbles: sub-block `j` at
/// [`K_QUANTS_AT`]` + 256 j`, laid out as a q4_1 record's.
const K_LOW_AT: usize = 4 * LANES;
const K_HIGH_AT: usize = K_LOW_AT + 8 * LANES;
const K_QUANTS_AT: usize = K_HIGH_AT + 4 * LANES;

/// q6_k record layout (16 lanes, one super-block of 256 inputs each): f16 scales at 0,
/// then per sub-block `j` of 16 values the 16 lanes' i8 scales at [`S_SCALES_AT`]` + 16 j`,
/// its low nibbles at [`S_LOW_AT`]` + 128 j` (two 64-byte steps laid out as a q4_1
/// record's), and its top 2 bits at [`S_HIGH_AT`]` + 64 j`: lane `l`'s u32 at `4 l`,
/// whose byte `b` holds in bits `2g..2g+2` those of value `4g + b` (so the shift that
/// picks group `g` of 4 values lines them up with group `g`'s nibbles).
const S_SCALES_AT: usize = 2 * LANES;
const S_LOW_AT: usize = S_SCALES_AT + 16 * LANES;
const S_HIGH_AT: usize = S_LOW_AT + LANES * SUPER / 2;

/// An (n x k) weight, quantized: `ceil(n / 16)` row groups, each `k / kind.block()`
/// records long.
#[derive(Clone)]
pub struct QWeight {
    kind: QuantKind,
    n: usize,
    k: usize,
    /// On 2 MB pages where the OS allows: decoding streams it whole every token.
    data: PageBuf,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QWeight({}, {} x {})", self.kind.name(), self.n, self.k)
    }
}

impl QWeight {
    /// Quantizes `w`, (n x k) row-major. Panics unless `kind.fits(k)` and `w` holds n x k
    /// values (callers check both).
    pub fn quantize(kind: QuantKind, w: &[f32], n: usize, k: usize) -> Self {
        assert!(kind.fits(k) && w.len() >= n * k);
        let bs = kind.block();
        let blocks = k / bs;
        let rb = kind.record_bytes();
        let mut data = PageBuf::zeroed(n.div_ceil(LANES) * blocks * rb);
        data.par_chunks_mut(blocks * rb)
            .enumerate()
            .for_each(|(g, group)| {
                for lane in 0..LANES.min(n - g * LANES) {
                    let row = &w[(g * LANES + lane) * k..(g * LANES + lane + 1) * k];
                    for (b, rec) in group.chunks_exact_mut(rb).enumerate() {
                        let x = &row[b * bs..(b + 1) * bs];
                        match kind {
                            QuantKind::Q8_0 => {
                                let (d, q) = quantize_q8_0(x.try_into().unwrap());
                                put_q8_0(rec, lane, d, &q);
                            }
                            QuantKind::Q4_1 => {
                                let (d, m, q) = quantize_q4_1(x.try_into().unwrap());
                                put_q4_1(rec, lane, d, m, &q);
                            }
                            QuantKind::Q4K => {
                                let (d, dmin, sc, m, q) = quantize_q4_k(x.try_into().unwrap());
                                put_q4_k(rec, lane, d, dmin, &sc, &m, &q);
                            }
                            QuantKind::Q6K => {
                                let (d, sc, q) = quantize_q6_k(x.try_into().unwrap());
                                put_q6_k(rec, lane, d, &sc, &q);
                            }
                        }
                    }
                }
            });
        Self { kind, n, k, data }
    }

    /// A weight from ggml's block bytes (a GGUF tensor's data: each row's blocks one after
    /// the other, ggml's `block_q8_0` / `block_q4_1` / `block_q4_K`), rearranged into
    /// records without touching a value: the weight stands for exactly the numbers ggml's
    /// does. `None` when the length is not what (kind, n, k) takes in ggml's layout.
    pub fn from_ggml(kind: QuantKind, n: usize, k: usize, blocks: &[u8]) -> Option<Self> {
        let bs = kind.block();
        // ggml's block sizes: the f16 scale (and minimum), then the quants.
        let gb = match kind {
            QuantKind::Q8_0 => 2 + GROUP,
            QuantKind::Q4_1 => 4 + GROUP / 2,
            QuantKind::Q4K => 4 + 12 + SUPER / 2,
            QuantKind::Q6K => SUPER / 2 + SUPER / 4 + 16 + 2,
        };
        if !kind.fits(k) || blocks.len() != n * (k / bs) * gb {
            return None;
        }
        let rb = kind.record_bytes();
        let nb = k / bs;
        let mut data = PageBuf::zeroed(n.div_ceil(LANES) * nb * rb);
        let f16_at = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]);
        for j in 0..n {
            let (g, lane) = (j / LANES, j % LANES);
            for b in 0..nb {
                let src = &blocks[(j * nb + b) * gb..(j * nb + b + 1) * gb];
                let rec = &mut data[(g * nb + b) * rb..(g * nb + b + 1) * rb];
                match kind {
                    QuantKind::Q8_0 => {
                        let q: [i8; GROUP] = std::array::from_fn(|i| src[2 + i] as i8);
                        put_q8_0(rec, lane, f16_at(src, 0), &q);
                    }
                    QuantKind::Q4_1 => {
                        // Byte i: weight i in the low nibble, weight i + 16 in the high one.
                        let q: [u8; GROUP] = std::array::from_fn(|i| {
                            (src[4 + i % 16] >> if i < 16 { 0 } else { 4 }) & 15
                        });
                        put_q4_1(rec, lane, f16_at(src, 0), f16_at(src, 2), &q);
                    }
                    QuantKind::Q4K => {
                        let scales: &[u8; 12] = src[4..16].try_into().unwrap();
                        let pairs: [(u8, u8); 8] = std::array::from_fn(|s| k4_scale_min(s, scales));
                        let sc = pairs.map(|p| p.0);
                        let m = pairs.map(|p| p.1);
                        // Each 64 weights: 32 bytes, weight i in the low nibble of byte i,
                        // weight 32 + i in the high one.
                        let q: [u8; SUPER] = std::array::from_fn(|i| {
                            let (c, r) = (i / 64, i % 64);
                            (src[16 + 32 * c + r % 32] >> if r < 32 { 0 } else { 4 }) & 15
                        });
                        put_q4_k(rec, lane, f16_at(src, 0), f16_at(src, 2), &sc, &m, &q);
                    }
                    QuantKind::Q6K => {
                        // ql[128], qh[64], scales[16], d. Per 128 values: ql byte l holds
                        // values l (low nibble) and l + 64 (high), byte l + 32 values l + 32
                        // and l + 96; qh byte l their top 2 bits, 2 bits each in that order.
                        let q: [u8; SUPER] = std::array::from_fn(|i| {
                            let (h, c, l) = (i / 128, i % 128 / 32, i % 32);
                            let low = src[64 * h + l + 32 * (c % 2)] >> (4 * (c / 2)) & 15;
                            let high = src[128 + 32 * h + l] >> (2 * c) & 3;
                            low | high << 4
                        });
                        let sc: [i8; 16] = std::array::from_fn(|j| src[192 + j] as i8);
                        put_q6_k(rec, lane, f16_at(src, 208), &sc, &q);
                    }
                }
            }
        }
        Some(Self { kind, n, k, data })
    }

    /// Rebuilds a weight from its stored bytes (a saved checkpoint; copied onto 2 MB pages);
    /// `None` when their length is not what (kind, n, k) takes.
    pub fn from_bytes(kind: QuantKind, n: usize, k: usize, data: &[u8]) -> Option<Self> {
        (kind.fits(k) && data.len() == Self::stored_len(kind, n, k)).then(|| Self {
            kind,
            n,
            k,
            data: PageBuf::from_slice(data),
        })
    }

    /// Bytes an (n x k) weight takes in `kind` (`kind.fits(k)`).
    pub fn stored_len(kind: QuantKind, n: usize, k: usize) -> usize {
        n.div_ceil(LANES) * (k / kind.block()) * kind.record_bytes()
    }

    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    /// (n, k): outputs, inputs.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The stored bytes (what a saved checkpoint holds).
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Row `j` as the f32 values the quantized weight stands for (an embedding lookup from a
    /// tied, quantized LM head), exactly as ggml dequantizes: `d * q` for 8-bit, `d * q + m`
    /// (no fused multiply-add) for q4_1, `(d * sc) * q - dmin * m` for q4_k.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        assert!(j < self.n && out.len() >= self.k);
        let rb = self.kind.record_bytes();
        let bs = self.kind.block();
        let (g, lane) = (j / LANES, j % LANES);
        let blocks = self.k / bs;
        for b in 0..blocks {
            let rec = &self.data[(g * blocks + b) * rb..(g * blocks + b + 1) * rb];
            let d = get_f16(rec, lane);
            let dst = &mut out[b * bs..(b + 1) * bs];
            match self.kind {
                QuantKind::Q8_0 => {
                    for (i, v) in dst.iter_mut().enumerate() {
                        *v = d * (rec[q8_index(lane, i)] as i32 - 128) as f32;
                    }
                }
                QuantKind::Q4_1 => {
                    let m = get_f16(rec, LANES + lane);
                    for (i, v) in dst.iter_mut().enumerate() {
                        let (at, shift) = q4_index(QuantKind::Q4_1.quants_at(), lane, i);
                        *v = d * ((rec[at] >> shift) & 15) as f32 + m;
                    }
                }
                QuantKind::Q6K => {
                    for (s, sub) in dst.chunks_exact_mut(16).enumerate() {
                        let d1 = d * rec[S_SCALES_AT + LANES * s + lane] as i8 as f32;
                        for (i, v) in sub.iter_mut().enumerate() {
                            *v = d1 * (q6_value(rec, lane, s, i) as i32 - 32) as f32;
                        }
                    }
                }
                QuantKind::Q4K => {
                    let dmin = get_f16(rec, LANES + lane);
                    for (s, sub) in dst.chunks_exact_mut(GROUP).enumerate() {
                        let (sc, m) = k_scale_min(rec, lane, s);
                        let (d1, m1) = (d * sc as f32, dmin * m as f32);
                        for (i, v) in sub.iter_mut().enumerate() {
                            let (at, shift) = q4_index(K_QUANTS_AT + 256 * s, lane, i);
                            *v = d1 * ((rec[at] >> shift) & 15) as f32 - m1;
                        }
                    }
                }
            }
        }
    }

    /// The whole weight dequantized, (n x k) row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        out.par_chunks_mut(self.k)
            .enumerate()
            .for_each(|(j, row)| self.dequantize_row(j, row));
        out
    }

    /// `out (m x n) = x (m x k) · Wᵀ (+ bias)` with the activations quantized to 8 bits per
    /// 32 (see the module comment), on the kernel [`kernel`] picks (all give the same bits).
    pub fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        self.matmul_with(x, m, bias, out, kernel());
    }

    /// [`Self::matmul`] of several weights with the same input width and format against the
    /// same activations (q/k/v, gate/up): the activations are quantized once and the
    /// weights' row groups share one parallel loop. Each output is bit for bit what
    /// [`Self::matmul`] gives. At batch 1 a product is a few hundred microseconds or less
    /// (a 256 x 1,536 key projection streams 0.25 MB), so a parallel loop per product and
    /// the activations quantized per product were a large share of it.
    pub fn matmul_shared(
        ws: &[&QWeight],
        x: &[f32],
        m: usize,
        biases: &[Option<&[f32]>],
        outs: &mut [&mut [f32]],
    ) {
        Self::matmul_shared_with(ws, x, m, biases, outs, kernel());
    }

    /// [`Self::matmul`] on a given kernel (tests run each). Panics if the CPU cannot run it.
    fn matmul_with(
        &self,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
        kernel: Kernel,
    ) {
        Self::matmul_shared_with(&[self], x, m, &[bias], &mut [out], kernel);
    }

    /// [`Self::matmul_shared`] on a given kernel. Panics if the CPU cannot run it, or if the
    /// weights differ in input width or format.
    fn matmul_shared_with(
        ws: &[&QWeight],
        x: &[f32],
        m: usize,
        biases: &[Option<&[f32]>],
        outs: &mut [&mut [f32]],
        kernel: Kernel,
    ) {
        let Some(first) = ws.first() else {
            return;
        };
        let (kind, k) = (first.kind, first.k);
        assert!(ws.len() == biases.len() && ws.len() == outs.len());
        assert!(x.len() >= m * k);
        for ((w, bias), out) in ws.iter().zip(biases).zip(outs.iter()) {
            assert!(
                w.kind == kind && w.k == k,
                "shared activations need one format and width"
            );
            assert!(out.len() >= m * w.n);
            assert!(bias.is_none_or(|b| b.len() >= w.n));
        }
        // What makes the `unsafe` calls below sound, whoever the caller (cached: cheap).
        assert!(
            kernel.available(),
            "the {} kernel on a CPU without it",
            kernel.name()
        );
        if m == 0 {
            return;
        }
        let act = Activations::quantize(kind, x, m, k, kernel);
        // Enough row groups per task to amortise it, enough tasks to balance the cores
        // (a 1,536-row weight makes 16 tasks of 96 rows); a task stays within one weight.
        let total: usize = ws.iter().map(|w| w.n.div_ceil(LANES)).sum();
        let per_task = (total / (8 * rayon::current_num_threads().max(1))).clamp(1, 64);
        let mut tasks = Vec::new();
        for (i, w) in ws.iter().enumerate() {
            let groups = w.n.div_ceil(LANES);
            tasks.extend(
                (0..groups)
                    .step_by(per_task)
                    .map(|g0| (i, g0, (g0 + per_task).min(groups))),
            );
        }
        let out_ptrs: Vec<SendPtr> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
        super::team::for_each(tasks.len(), &|t| {
            let (i, g0, g1) = tasks[t];
            let (w, bias, out_ptr, n) = (ws[i], biases[i], out_ptrs[i], ws[i].n);
            for g in g0..g1 {
                let mut r0 = 0;
                while r0 < m {
                    let mr = MR.min(m - r0);
                    let mut acc = [[0f32; LANES]; MR];
                    match kernel {
                        // SAFETY (both): the CPU has the kernel's features (asserted
                        // above); g < w's row groups, r0 + mr <= m, and act/w hold what
                        // those index.
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx512Vnni => unsafe {
                            avx512::group(w, &act, g, r0, mr, &mut acc)
                        },
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx2 => unsafe { avx2::group(w, &act, g, r0, mr, &mut acc) },
                        _ => portable_group(w, &act, g, r0, mr, &mut acc),
                    }
                    let j0 = g * LANES;
                    for (r, lanes) in acc.iter().enumerate().take(mr) {
                        for (l, &v) in lanes.iter().enumerate().take(n - j0) {
                            let v = v + bias.map_or(0.0, |b| b[j0 + l]);
                            // SAFETY: row r0 + r < m, column j0 + l < n of output i;
                            // this task owns the columns of its row group g.
                            unsafe { *out_ptr.get().add((r0 + r) * n + j0 + l) = v };
                        }
                    }
                    r0 += mr;
                }
            }
        });
    }
}

/// The kernels that run [`QWeight::matmul`]: the same integer sums and the same float steps
/// in the same order, so the same bits; they differ only in speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// 512-bit `vpdpbusd` (AVX-512F/BW/VNNI, F16C): Intel Xeons since Cascade Lake, Intel
    /// clients with AVX-512 (Ice Lake to Rocket Lake), AMD since Zen 4.
    Avx512Vnni,
    /// 256-bit `vpmaddubsw` + `vpmaddwd` (AVX2, FMA, F16C): x86-64 CPUs since Haswell / Zen 1
    /// that lack AVX-512 VNNI.
    Avx2,
    /// Plain Rust, any CPU.
    Portable,
}

impl Kernel {
    /// Fastest first: the order [`kernel`] tries them in.
    pub const ALL: [Kernel; 3] = [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Portable];

    /// The name `MEDVLM_QUANT_KERNEL` takes and `medvlm inspect` reports.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512Vnni => "avx512-vnni",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Whether this CPU can run it (checked once, cached by std), AVX-512 only where
    /// [`super::avx512_allowed`].
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Kernel::Avx512Vnni => {
                    super::avx512_allowed()
                        && has!("avx512f")
                        && has!("avx512bw")
                        && has!("avx512vnni")
                        && has!("f16c")
                }
                Kernel::Avx2 => has!("avx2") && has!("fma") && has!("f16c"),
                Kernel::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Kernel::Portable
        }
    }
}

/// The kernel quantized products run on in this process, decided once: the fastest this CPU
/// can run, unless `MEDVLM_QUANT_KERNEL` names another (`avx512-vnni`, `avx2`, `portable`;
/// `auto` or unset: the fastest). With `MEDVLM_PLAIN_OPS=1` (every CPU fast path off) the
/// fastest is the portable one. A name this CPU cannot run, or no kernel's name, is
/// reported on stderr once and the fastest runs instead: the override is for tests and
/// comparisons, and every kernel gives the same numbers.
pub fn kernel() -> Kernel {
    static CHOSEN: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let forced = std::env::var("MEDVLM_QUANT_KERNEL").ok();
        let (k, warning) = choose(forced.as_deref(), super::cpu_kernels());
        if let Some(w) = warning {
            eprintln!("warning: {w}");
        }
        k
    })
}

/// [`kernel`]'s decision, given `MEDVLM_QUANT_KERNEL` and whether the CPU fast paths are on:
/// the kernel and, when the variable was not followed, why.
fn choose(forced: Option<&str>, fast_paths: bool) -> (Kernel, Option<String>) {
    let best = if fast_paths {
        Kernel::ALL
            .into_iter()
            .find(|k| k.available())
            .unwrap_or(Kernel::Portable)
    } else {
        Kernel::Portable
    };
    match forced.map(str::trim) {
        None | Some("" | "auto") => (best, None),
        Some(name) => match Kernel::from_name(name) {
            Some(k) if k.available() => (k, None),
            Some(_) => (
                best,
                Some(format!(
                    "MEDVLM_QUANT_KERNEL={name}: this CPU cannot run that kernel; \
                     running the {} one",
                    best.name()
                )),
            ),
            None => (
                best,
                Some(format!(
                    "MEDVLM_QUANT_KERNEL={name} is not a kernel (avx512-vnni, avx2, portable \
                     or auto); running the {} one",
                    best.name()
                )),
            ),
        },
    }
}

/// ggml's `quantize_row_q8_0_ref` for one group: `d = max|x| / 127`, `q = round(x / d)`
/// (half away from zero, through the f32 reciprocal), `d` stored as f16.
fn quantize_q8_0(x: &[f32; GROUP]) -> (half::f16, [i8; GROUP]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (
        half::f16::from_f32(d),
        std::array::from_fn(|i| (x[i] * id).round() as i8),
    )
}

/// ggml's `quantize_row_q4_1_ref` for one group: `d = (max - min) / 15`, `m = min`,
/// `q = min(15, trunc((x - min) / d + 0.5))`, `d` and `m` stored as f16.
fn quantize_q4_1(x: &[f32; GROUP]) -> (half::f16, half::f16, [u8; GROUP]) {
    let (min, max) = x
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (
        half::f16::from_f32(d),
        half::f16::from_f32(min),
        std::array::from_fn(|i| (((x[i] - min) * id + 0.5) as i8).min(15) as u8),
    )
}

/// Where weight `i` (0..32) of lane `lane` sits in an 8-bit record: step `i / 4` holds 4
/// consecutive weights of each of the 16 lanes (one 32-bit lane of `vpdpbusd` each).
fn q8_index(lane: usize, i: usize) -> usize {
    QuantKind::Q8_0.quants_at() + (i / 4) * 64 + lane * 4 + i % 4
}

/// Where weight `i` (0..32) of lane `lane` sits in 4-bit nibbles starting at byte `at`
/// (a q4_1 record's, or one q4_k sub-block's): step `i / 8` covers 8 weights, the first 4
/// in the low nibbles of the lane's 4 bytes, the next 4 in the high ones (one mask and one
/// shift give two vectors of `vpdpbusd` operands). Returns (byte, shift).
fn q4_index(at: usize, lane: usize, i: usize) -> (usize, u32) {
    let (step, r) = (i / 8, i % 8);
    (at + step * 64 + lane * 4 + r % 4, if r < 4 { 0 } else { 4 })
}

fn put_q8_0(rec: &mut [u8], lane: usize, d: half::f16, q: &[i8; GROUP]) {
    put_f16(rec, lane, d);
    for (i, &q) in q.iter().enumerate() {
        rec[q8_index(lane, i)] = (q as i16 + 128) as u8;
    }
}

fn put_q4_1(rec: &mut [u8], lane: usize, d: half::f16, m: half::f16, q: &[u8; GROUP]) {
    put_f16(rec, lane, d);
    put_f16(rec, LANES + lane, m);
    put_nibbles(rec, QuantKind::Q4_1.quants_at(), lane, q);
}

fn put_nibbles(rec: &mut [u8], at: usize, lane: usize, q: &[u8]) {
    for (i, &q) in q.iter().enumerate() {
        let (at, shift) = q4_index(at, lane, i);
        rec[at] = (rec[at] & !(15 << shift)) | (q & 15) << shift;
    }
}

/// One lane of a q4_k record (layout at [`K_LOW_AT`]): the super-block's f16 scale and
/// minimum, its 8 sub-blocks' 6-bit scales and minima (0..=63), 256 nibbles.
fn put_q4_k(
    rec: &mut [u8],
    lane: usize,
    d: half::f16,
    dmin: half::f16,
    sc: &[u8; 8],
    m: &[u8; 8],
    q: &[u8; SUPER],
) {
    put_f16(rec, lane, d);
    put_f16(rec, LANES + lane, dmin);
    let mut high = 0u32;
    for s in 0..8 {
        rec[K_LOW_AT + LANES * s + lane] = (sc[s] & 15) | (m[s] & 15) << 4;
        high |= ((sc[s] >> 4) as u32 & 3) << (2 * s) | ((m[s] >> 4) as u32 & 3) << (16 + 2 * s);
        put_nibbles(
            rec,
            K_QUANTS_AT + 256 * s,
            lane,
            &q[s * GROUP..(s + 1) * GROUP],
        );
    }
    rec[K_HIGH_AT + 4 * lane..K_HIGH_AT + 4 * lane + 4].copy_from_slice(&high.to_le_bytes());
}

/// One lane of a q6_k record (layout at [`S_SCALES_AT`]): the super-block's f16 scale, its
/// 16 sub-blocks' i8 scales, 256 values 0..=63.
fn put_q6_k(rec: &mut [u8], lane: usize, d: half::f16, sc: &[i8; 16], q: &[u8; SUPER]) {
    put_f16(rec, lane, d);
    for s in 0..16 {
        rec[S_SCALES_AT + LANES * s + lane] = sc[s] as u8;
        let vals = &q[16 * s..16 * (s + 1)];
        let low: [u8; 16] = std::array::from_fn(|i| vals[i] & 15);
        put_nibbles(rec, S_LOW_AT + 128 * s, lane, &low);
        let mut high = [0u8; 4];
        for (i, v) in vals.iter().enumerate() {
            high[i % 4] |= (v >> 4 & 3) << (2 * (i / 4));
        }
        let at = S_HIGH_AT + 64 * s + 4 * lane;
        rec[at..at + 4].copy_from_slice(&high);
    }
}

/// Value `i` (0..16, 0..=63) of sub-block `s` of lane `lane` in a q6_k record.
fn q6_value(rec: &[u8], lane: usize, s: usize, i: usize) -> u8 {
    let (at, shift) = q4_index(S_LOW_AT + 128 * s, lane, i);
    let high = rec[S_HIGH_AT + 64 * s + 4 * lane + i % 4] >> (2 * (i / 4)) & 3;
    (rec[at] >> shift) & 15 | high << 4
}

/// Sub-block `s`'s 6-bit (scale, minimum) of lane `lane` in a q4_k record.
fn k_scale_min(rec: &[u8], lane: usize, s: usize) -> (u8, u8) {
    let low = rec[K_LOW_AT + LANES * s + lane];
    let high = u32::from_le_bytes(
        rec[K_HIGH_AT + 4 * lane..K_HIGH_AT + 4 * lane + 4]
            .try_into()
            .unwrap(),
    );
    (
        low & 15 | ((high >> (2 * s)) as u8 & 3) << 4,
        low >> 4 | ((high >> (16 + 2 * s)) as u8 & 3) << 4,
    )
}

/// Sub-block `s`'s 6-bit (scale, minimum) in ggml's 12 packed bytes of a `block_q4_K`
/// (`get_scale_min_k4`): sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7
/// (minima); 4-7 in the nibbles of bytes 8-11 with their top 2 bits in the top bits of
/// bytes 0-7.
fn k4_scale_min(s: usize, q: &[u8; 12]) -> (u8, u8) {
    if s < 4 {
        (q[s] & 63, q[s + 4] & 63)
    } else {
        (
            (q[s + 4] & 15) | (q[s - 4] >> 6) << 4,
            (q[s + 4] >> 4) | (q[s] >> 6) << 4,
        )
    }
}

/// ggml's `nearest_int`: round half to even through the f32 magic number, as bits (the
/// k-quant quantizers' rounding; exact for |x| < 2^22, which their arguments are).
fn nearest_int(x: f32) -> i32 {
    ((x + 12_582_912.0).to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// ggml's `quantize_row_q4_K_ref` for one super-block, float step for float step (no
/// fused multiply-adds, as the C without contraction): each sub-block's scale and minimum
/// by [`make_qkx2_quants`] (weighted least squares over 21 candidate scales), both
/// quantized to 6 bits against the super-block's largest, then the values again against
/// the 6-bit ones. Returns (d, dmin, scales, minima, 256 nibbles).
#[allow(clippy::type_complexity)]
fn quantize_q4_k(x: &[f32; SUPER]) -> (half::f16, half::f16, [u8; 8], [u8; 8], [u8; SUPER]) {
    let mut l = [0u8; SUPER];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let x: &[f32; GROUP] = x[GROUP * j..GROUP * (j + 1)].try_into().unwrap();
        let sum_x2 = x.iter().fold(0f32, |s, &v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; GROUP] = std::array::from_fn(|i| av_x + x[i].abs());
        let lj: &mut [u8; GROUP] = (&mut l[GROUP * j..GROUP * (j + 1)]).try_into().unwrap();
        (scales[j], mins[j]) = make_qkx2_quants(x, &weights, lj);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // `uint8_t ls = nearest_int(..)`: the C truncates to 8 bits, then caps at 63.
    let sc: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_scale * scales[j]) as u8).min(63));
    let m: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_min * mins[j]) as u8).min(63));
    let d = half::f16::from_f32(max_scale / 63.0);
    let dmin = half::f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let dj = d.to_f32() * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m[j] as f32;
        for i in GROUP * j..GROUP * (j + 1) {
            l[i] = nearest_int((x[i] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    (d, dmin, sc, m, l)
}

/// ggml's `quantize_row_q6_K_ref` for one super-block, float step for float step: each
/// sub-block of 16's scale by [`make_qx_quants`], the scales quantized to 8 bits against
/// the largest in magnitude (keeping its sign: `d = max / -128`), then the values again
/// against the 8-bit ones. Returns (d, scales, 256 values 0..=63).
fn quantize_q6_k(x: &[f32; SUPER]) -> (half::f16, [i8; 16], [u8; SUPER]) {
    // ggml's GROUP_MAX_EPS: a super-block whose scales are all below it is all zeros.
    const EPS: f32 = 1e-15;
    let mut l = [0u8; SUPER];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for j in 0..16 {
        let xj: &[f32; 16] = x[16 * j..16 * (j + 1)].try_into().unwrap();
        let lj: &mut [u8; 16] = (&mut l[16 * j..16 * (j + 1)]).try_into().unwrap();
        scales[j] = make_qx_quants(xj, lj);
        if scales[j].abs() > max_abs_scale {
            max_abs_scale = scales[j].abs();
            max_scale = scales[j];
        }
    }
    if max_abs_scale < EPS {
        return (half::f16::ZERO, [0; 16], [0; SUPER]);
    }
    let iscale = -128.0 / max_scale;
    let d = half::f16::from_f32(1.0 / iscale);
    let sc: [i8; 16] = std::array::from_fn(|j| nearest_int(iscale * scales[j]).min(127) as i8);
    for ((xj, lj), &s) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).zip(&sc) {
        let dj = d.to_f32() * s as f32;
        if dj == 0.0 {
            continue;
        }
        for (li, &v) in lj.iter_mut().zip(xj) {
            *li = (nearest_int(v / dj).clamp(-32, 31) + 32) as u8;
        }
    }
    (d, sc, l)
}

/// ggml's `make_qx_quants(16, 32, x, L, 1, NULL)`: the scale of one sub-block of 16 that
/// maximises the x²-weighted fit over the plain `-32 / max` one and 18 nudged ones; `L`
/// gets the values (0..=63, the quantized value plus 32).
fn make_qx_quants(x: &[f32; 16], l: &mut [u8; 16]) -> f32 {
    const NMAX: i32 = 32;
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let q = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-NMAX, NMAX - 1);
    let fit = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let (li, w) = (q(iscale, v) as f32, v * v);
            sumlx += w * v * li;
            suml2 += w * li * li;
        }
        (sumlx, suml2)
    };
    let iscale = -(NMAX as f32) / max;
    for (li, &v) in l.iter_mut().zip(x) {
        *li = (q(iscale, v) + NMAX) as u8;
    }
    let (sumlx, suml2) = fit(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(NMAX as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = fit(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (li, &v) in l.iter_mut().zip(x) {
                *li = (q(iscale, v) + NMAX) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_qkx2_quants(32, 15, x, weights, L, &min, Laux, -1, 0.1, 20, false)`: the
/// scale and (negated) minimum of one sub-block minimising the weighted squared error over
/// the plain min/max fit and 21 nudged ones, and the nibbles for it. Returns (scale, -min).
fn make_qkx2_quants(x: &[f32; GROUP], weights: &[f32; GROUP], l: &mut [u8; GROUP]) -> (f32, f32) {
    const NMAX: i32 = 15;
    let (rmin, rdelta, nstep) = (-1f32, 0.1f32, 20);
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..GROUP {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let iscale = NMAX as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..GROUP {
        l[i] = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX) as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; GROUP];
    for is in 0..=nstep {
        let iscale = (rmin + rdelta * is as f32 + NMAX as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..GROUP {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
            laux[i] = li as u8;
            let (w, lf) = (weights[i], li as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..GROUP {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                *l = laux;
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

fn put_f16(rec: &mut [u8], slot: usize, v: half::f16) {
    rec[2 * slot..2 * slot + 2].copy_from_slice(&v.to_le_bytes());
}

fn get_f16(rec: &[u8], slot: usize) -> f32 {
    half::f16::from_le_bytes([rec[2 * slot], rec[2 * slot + 1]]).to_f32()
}

/// How far ahead the q8_0/q4_1 kernels prefetch every cache line of a record, in bytes (whole
/// records). Prefetching two lines eight records ahead, as both kernels once did, leaves
/// most of a 544-byte q8_0 or 320-byte q4_1 record to the hardware prefetcher: batch-1
/// products then ran at 16-22 GB/s on an AVX2 Zen 3, where whole records about 1 KB ahead
/// gave 22-29 GB/s, and on the AVX-512 Zen 4 (family 25, model 17) whole records 1-2 KB
/// ahead made Qwen2-VL-2B's products 4-30% faster (q8_0 and q4_1, one row, 2 threads, the
/// settings alternated within one process; 1 KB and 2 KB alike).
const AHEAD_BYTES: usize = 1024;

/// [`AHEAD_BYTES`] rounded up to whole records of `rb` bytes.
fn records_ahead(rb: usize) -> usize {
    AHEAD_BYTES.div_ceil(rb) * rb
}

/// The activations of one product, quantized to 8 bits with one f32 scale per block of
/// the weight's format (32 values; 256 for q4_k, as ggml's `q8_K`), with what the kernels
/// need per group of 32: `sum[r][b]` (`Σq_x`: the AVX2 kernel multiplies signed 8-bit
/// weights and adds the `+128` back in integers; q4_k multiplies it by each sub-block's
/// minimum) and `offset[r][b]` (for 8-bit weights stored as `q + 128`: `-128 · Σq_x ·
/// scale`; for q4_1: `Σq_x · scale`, which the weight's minimum multiplies; unused by q4_k).
struct Activations {
    /// m x k, rows padded to whole groups (k is).
    q: Vec<i8>,
    /// m x `sblocks`.
    scale: Vec<f32>,
    /// m x `blocks`.
    offset: Vec<f32>,
    /// m x `blocks`.
    sum: Vec<i32>,
    /// `Σq_x` per 16 values, m x `k / 16` (q6_k only: its values are stored `+ 32`, so
    /// each sub-block's sum takes `32 · Σq_x` back off).
    sum16: Vec<i32>,
    /// Groups of 32 per row.
    blocks: usize,
    /// Scale blocks per row.
    sblocks: usize,
}

/// One activation row's buffers as the zipped iterators hand them out: its index, its
/// quantized values, and its scales, groups' offsets and sums.
type ActivationRow<'a> = (
    usize,
    (
        ((&'a mut [i8], &'a mut [f32]), &'a mut [f32]),
        &'a mut [i32],
    ),
);

impl Activations {
    /// On `kernel`'s instruction set (the caller checked the CPU has it); every one gives
    /// the same numbers.
    fn quantize(kind: QuantKind, x: &[f32], m: usize, k: usize, kernel: Kernel) -> Self {
        let blocks = k / GROUP;
        let per = kind.block() / GROUP;
        let sblocks = blocks / per;
        let mut q = vec![0i8; m * k];
        let mut scale = vec![0f32; m * sblocks];
        let mut offset = vec![0f32; m * blocks];
        let mut sums = vec![0i32; m * blocks];
        let group = |r: usize, b: usize| -> &[f32; GROUP] {
            x[r * k + b * GROUP..r * k + (b + 1) * GROUP]
                .try_into()
                .unwrap()
        };
        let row = |(r, (((qr, sr), or), nr)): ActivationRow| {
            for (sb, d_out) in sr.iter_mut().enumerate().take(sblocks) {
                // The block's largest magnitude: a maximum, exact in any order.
                let amax = (sb * per..(sb + 1) * per).fold(0f32, |a, b| {
                    a.max(match kernel {
                        // SAFETY (all below): the caller checked `kernel.available()`,
                        // which implies AVX-512F/BW, resp. AVX2.
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx512Vnni => unsafe { avx512::group_amax(group(r, b)) },
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx2 => unsafe { avx2::group_amax(group(r, b)) },
                        _ => group_amax(group(r, b)),
                    })
                });
                let (d, id) = activation_scale(amax);
                *d_out = d;
                for b in sb * per..(sb + 1) * per {
                    let dst: &mut [i8; GROUP] =
                        (&mut qr[b * GROUP..(b + 1) * GROUP]).try_into().unwrap();
                    let src = group(r, b);
                    let sum = match kernel {
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx512Vnni => unsafe { avx512::quantize_scaled(src, id, dst) },
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx2 => unsafe { avx2::quantize_scaled(src, id, dst) },
                        _ => quantize_scaled(src, id, dst),
                    };
                    nr[b] = sum;
                    or[b] = match kind {
                        QuantKind::Q8_0 => -128.0 * sum as f32 * d,
                        QuantKind::Q4_1 => sum as f32 * d,
                        QuantKind::Q4K | QuantKind::Q6K => 0.0,
                    };
                }
            }
        };
        // A few rows (decoding) are a few microseconds of work: a parallel loop would cost
        // more than it saves.
        if m <= MR {
            q.chunks_mut(k)
                .zip(scale.chunks_mut(sblocks))
                .zip(offset.chunks_mut(blocks))
                .zip(sums.chunks_mut(blocks))
                .enumerate()
                .for_each(row);
        } else {
            q.par_chunks_mut(k)
                .zip(scale.par_chunks_mut(sblocks))
                .zip(offset.par_chunks_mut(blocks))
                .zip(sums.par_chunks_mut(blocks))
                .enumerate()
                .for_each(row);
        }
        let sum16 = match kind {
            QuantKind::Q6K => q
                .chunks_exact(16)
                .map(|c| c.iter().map(|&v| v as i32).sum())
                .collect(),
            _ => Vec::new(),
        };
        Self {
            q,
            scale,
            offset,
            sum: sums,
            sum16,
            blocks,
            sblocks,
        }
    }
}

/// An activation block's scale from its largest magnitude: `d = amax / 127` and the
/// reciprocal the values are multiplied by (0 for an all-zero block).
fn activation_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

fn group_amax(src: &[f32; GROUP]) -> f32 {
    src.iter().fold(0f32, |a, v| a.max(v.abs()))
}

/// One group of activations to 8 bits on its own scale (the 32-value formats): `d = max|x|
/// / 127`, `q = x · (1 / d)` rounded half to even (what the SIMD conversion does); returns
/// (d, Σq).
#[cfg(test)]
fn quantize_group(src: &[f32; GROUP], dst: &mut [i8; GROUP]) -> (f32, i32) {
    let (d, id) = activation_scale(group_amax(src));
    (d, quantize_scaled(src, id, dst))
}

/// `q = x · id` rounded half to even, clamped to ±127; returns Σq.
fn quantize_scaled(src: &[f32; GROUP], id: f32, dst: &mut [i8; GROUP]) -> i32 {
    // Adding and removing 1.5 * 2^23 rounds half to even for |y| < 2^22 (here |y| <= 127):
    // the same rounding as the vector conversion, without a libm call per value.
    const MAGIC: f32 = 12_582_912.0;
    let mut sum = 0;
    for (q, &v) in dst.iter_mut().zip(src) {
        let y = ((v * id + MAGIC) - MAGIC).clamp(-127.0, 127.0);
        *q = y as i8;
        sum += *q as i32;
    }
    sum
}

/// The portable kernel: lane sums of row group `g` against activation rows r0..r0+mr, in
/// exactly the float steps the SIMD kernel takes.
fn portable_group(
    w: &QWeight,
    act: &Activations,
    g: usize,
    r0: usize,
    mr: usize,
    acc: &mut [[f32; LANES]; MR],
) {
    match w.kind {
        QuantKind::Q4K => return portable_group_k(w, act, g, r0, mr, acc),
        QuantKind::Q6K => return portable_group_s(w, act, g, r0, mr, acc),
        _ => {}
    }
    let rb = w.kind.record_bytes();
    let (k, blocks) = (w.k, act.blocks);
    for b in 0..blocks {
        let rec = &w.data[(g * blocks + b) * rb..(g * blocks + b + 1) * rb];
        for (r, lanes) in acc.iter_mut().enumerate().take(mr) {
            let row = r0 + r;
            let xq = &act.q[row * k + b * GROUP..row * k + (b + 1) * GROUP];
            let (dx, off) = (act.scale[row * blocks + b], act.offset[row * blocks + b]);
            for (lane, a) in lanes.iter_mut().enumerate() {
                let d = get_f16(rec, lane);
                match w.kind {
                    QuantKind::Q8_0 => {
                        let isum: i32 = (0..GROUP)
                            .map(|i| rec[q8_index(lane, i)] as i32 * xq[i] as i32)
                            .sum();
                        let t = (isum as f32).mul_add(dx, off);
                        *a = d.mul_add(t, *a);
                    }
                    _ => {
                        let isum = nibble_dot(rec, QuantKind::Q4_1.quants_at(), lane, xq);
                        let t = isum as f32 * dx;
                        *a = d.mul_add(t, *a);
                        *a = get_f16(rec, LANES + lane).mul_add(off, *a);
                    }
                }
            }
        }
    }
}

/// Σ nibble · x over one 32-weight group of `lane` whose nibbles start at byte `at`.
fn nibble_dot(rec: &[u8], at: usize, lane: usize, xq: &[i8]) -> i32 {
    (0..GROUP)
        .map(|i| {
            let (at, shift) = q4_index(at, lane, i);
            ((rec[at] >> shift) & 15) as i32 * xq[i] as i32
        })
        .sum()
}

/// [`portable_group`] for q6_k. Per super-block and lane one integer sum: `Σ_j sc_j ·
/// (Σ(q·x)_j - 32 · Σx_j)` over the 16 sub-blocks (exact: at most 16 · 128 · 16 · 32 · 127
/// < 2^31), converted to f32 once, times the activations' scale, then `acc + d · t` as one
/// fused multiply-add.
fn portable_group_s(
    w: &QWeight,
    act: &Activations,
    g: usize,
    r0: usize,
    mr: usize,
    acc: &mut [[f32; LANES]; MR],
) {
    let rb = w.kind.record_bytes();
    let (k, blocks) = (w.k, act.sblocks);
    for b in 0..blocks {
        let rec = &w.data[(g * blocks + b) * rb..(g * blocks + b + 1) * rb];
        for (r, lanes) in acc.iter_mut().enumerate().take(mr) {
            let row = r0 + r;
            let dx = act.scale[row * blocks + b];
            for (lane, a) in lanes.iter_mut().enumerate() {
                let mut tot = 0i32;
                for s in 0..16 {
                    let at = row * k + b * SUPER + 16 * s;
                    let isum: i32 = (0..16)
                        .map(|i| q6_value(rec, lane, s, i) as i32 * act.q[at + i] as i32)
                        .sum();
                    let xs = act.sum16[at / 16];
                    tot += rec[S_SCALES_AT + LANES * s + lane] as i8 as i32 * (isum - 32 * xs);
                }
                *a = get_f16(rec, lane).mul_add(tot as f32 * dx, *a);
            }
        }
    }
}

/// [`portable_group`] for q4_k. Per super-block and lane the sums stay integers: `Σ_j sc_j ·
/// Σ(q·x)_j` and `Σ_j m_j · Σx_j` (exact: at most 8 · 63 · 32 · 15 · 127 < 2^31), each
/// converted to f32 once, times the activations' scale, then `acc + d · t` and `acc -
/// dmin · u` as two fused multiply-adds.
fn portable_group_k(
    w: &QWeight,
    act: &Activations,
    g: usize,
    r0: usize,
    mr: usize,
    acc: &mut [[f32; LANES]; MR],
) {
    let rb = w.kind.record_bytes();
    let (k, blocks) = (w.k, act.sblocks);
    for b in 0..blocks {
        let rec = &w.data[(g * blocks + b) * rb..(g * blocks + b + 1) * rb];
        for (r, lanes) in acc.iter_mut().enumerate().take(mr) {
            let row = r0 + r;
            let dx = act.scale[row * blocks + b];
            for (lane, a) in lanes.iter_mut().enumerate() {
                let (mut tot, mut mtot) = (0i32, 0i32);
                for s in 0..8 {
                    let (sc, m) = k_scale_min(rec, lane, s);
                    let at = row * k + b * SUPER + s * GROUP;
                    let isum = nibble_dot(rec, K_QUANTS_AT + 256 * s, lane, &act.q[at..]);
                    tot += sc as i32 * isum;
                    mtot += m as i32 * act.sum[row * act.blocks + b * 8 + s];
                }
                let (d, dmin) = (get_f16(rec, lane), get_f16(rec, LANES + lane));
                *a = d.mul_add(tot as f32 * dx, *a);
                *a = (-dmin).mul_add(mtot as f32 * dx, *a);
            }
        }
    }
}

/// The match every SIMD module's `group` makes: the format and the number of activation
/// rows (a const generic) pick its `run` / `run_k` / `run_s`, named at the call site.
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch {
    ($w:expr, $act:expr, $g:expr, $r0:expr, $mr:expr, $acc:expr) => {
        match ($w.kind, $mr) {
            (QuantKind::Q8_0, 1) => run::<1, false>($w, $act, $g, $r0, $acc),
            (QuantKind::Q8_0, 2) => run::<2, false>($w, $act, $g, $r0, $acc),
            (QuantKind::Q8_0, 3) => run::<3, false>($w, $act, $g, $r0, $acc),
            (QuantKind::Q8_0, _) => run::<4, false>($w, $act, $g, $r0, $acc),
            (QuantKind::Q4_1, 1) => run::<1, true>($w, $act, $g, $r0, $acc),
            (QuantKind::Q4_1, 2) => run::<2, true>($w, $act, $g, $r0, $acc),
            (QuantKind::Q4_1, 3) => run::<3, true>($w, $act, $g, $r0, $acc),
            (QuantKind::Q4_1, _) => run::<4, true>($w, $act, $g, $r0, $acc),
            (QuantKind::Q4K, 1) => run_k::<1>($w, $act, $g, $r0, $acc),
            (QuantKind::Q4K, 2) => run_k::<2>($w, $act, $g, $r0, $acc),
            (QuantKind::Q4K, 3) => run_k::<3>($w, $act, $g, $r0, $acc),
            (QuantKind::Q4K, _) => run_k::<4>($w, $act, $g, $r0, $acc),
            (QuantKind::Q6K, 1) => run_s::<1>($w, $act, $g, $r0, $acc),
            (QuantKind::Q6K, 2) => run_s::<2>($w, $act, $g, $r0, $acc),
            (QuantKind::Q6K, 3) => run_s::<3>($w, $act, $g, $r0, $acc),
            (QuantKind::Q6K, _) => run_s::<4>($w, $act, $g, $r0, $acc),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{
        Activations, QWeight, QuantKind, GROUP, K_HIGH_AT, K_LOW_AT, K_QUANTS_AT, LANES, MR, SUPER,
        S_HIGH_AT, S_LOW_AT, S_SCALES_AT,
    };
    use std::arch::x86_64::*;

    /// [`super::portable_group`] on AVX-512 VNNI: the same sums in the same order.
    ///
    /// # Safety
    /// AVX-512F/BW/VNNI and F16C must be present; `g` a row group of `w`, `r0 + mr` at most
    /// the activations' rows, `1 <= mr <= MR`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    pub unsafe fn group(
        w: &QWeight,
        act: &Activations,
        g: usize,
        r0: usize,
        mr: usize,
        acc: &mut [[f32; LANES]; MR],
    ) {
        dispatch!(w, act, g, r0, mr, acc)
    }

    /// [`super::portable_group_s`] on AVX-512 VNNI: per sub-block of 16, two 64-byte steps
    /// of low nibbles and one of top bits make the four groups of 4 values (0..=63, as
    /// `vpdpbusd`'s unsigned operand); the sums, less `32 · Σx`, times the i8 scales in
    /// integers; the float steps once per super-block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    #[inline]
    unsafe fn run_s<const R: usize>(
        w: &QWeight,
        act: &Activations,
        g: usize,
        r0: usize,
        out: &mut [[f32; LANES]; MR],
    ) {
        let rb = QuantKind::Q6K.record_bytes();
        let (k, blocks) = (w.k, act.sblocks);
        let base = w.data.as_ptr().add(g * blocks * rb);
        let xq = act.q.as_ptr().add(r0 * k);
        let scale = act.scale.as_ptr().add(r0 * blocks);
        let sum16 = act.sum16.as_ptr().add(r0 * k / 16);
        let (nib, two) = (_mm512_set1_epi8(15), _mm512_set1_epi8(3));
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let rec = base.add(b * rb);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(rec as *const __m256i));
            let mut tot = [_mm512_setzero_si512(); R];
            for s in 0..16 {
                // Two records ahead, 3.3 lines per sub-block.
                let ahead = rec.wrapping_add(2 * rb + 210 * s);
                for line in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
                }
                let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                    rec.add(S_SCALES_AT + LANES * s) as *const __m128i
                ));
                let low = rec.add(S_LOW_AT + 128 * s);
                let v = [0, 1].map(|t| _mm512_loadu_si512(low.add(64 * t) as *const _));
                let h = _mm512_loadu_si512(rec.add(S_HIGH_AT + 64 * s) as *const _);
                let top = |shift: u32| {
                    let t =
                        _mm512_and_si512(_mm512_srl_epi16(h, _mm_cvtsi32_si128(shift as i32)), two);
                    _mm512_slli_epi16::<4>(t)
                };
                let q = [
                    _mm512_or_si512(_mm512_and_si512(v[0], nib), top(0)),
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(v[0]), nib), top(2)),
                    _mm512_or_si512(_mm512_and_si512(v[1], nib), top(4)),
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(v[1]), nib), top(6)),
                ];
                for (r, t) in tot.iter_mut().enumerate() {
                    let x = xq.add(r * k + b * SUPER + 16 * s);
                    let xg = |gi: usize| {
                        _mm512_set1_epi32((x.add(4 * gi) as *const i32).read_unaligned())
                    };
                    let a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[0], xg(0));
                    let a = _mm512_dpbusd_epi32(a, q[1], xg(1));
                    let c = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[2], xg(2));
                    let c = _mm512_dpbusd_epi32(c, q[3], xg(3));
                    let back = _mm512_set1_epi32(32 * *sum16.add((r * k + b * SUPER) / 16 + s));
                    let is = _mm512_sub_epi32(_mm512_add_epi32(a, c), back);
                    *t = _mm512_add_epi32(*t, _mm512_mullo_epi32(is, sc));
                }
            }
            for r in 0..R {
                let dx = _mm512_set1_ps(*scale.add(r * blocks + b));
                let t = _mm512_mul_ps(_mm512_cvtepi32_ps(tot[r]), dx);
                acc[r] = _mm512_fmadd_ps(d, t, acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }

    /// [`super::group_amax`] on 16 lanes.
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn group_amax(src: &[f32; GROUP]) -> f32 {
        let a = _mm512_loadu_ps(src.as_ptr());
        let b = _mm512_loadu_ps(src.as_ptr().add(16));
        _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)))
    }

    /// [`super::quantize_group`] on 16 lanes: the same numbers.
    ///
    /// # Safety
    /// AVX-512F and BW must be present.
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_group(src: &[f32; GROUP], dst: &mut [i8; GROUP]) -> (f32, i32) {
        let (d, id) = super::activation_scale(group_amax(src));
        (d, quantize_scaled(src, id, dst))
    }

    /// [`super::quantize_scaled`] on 16 lanes: the same numbers.
    ///
    /// # Safety
    /// AVX-512F and BW must be present.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_scaled(src: &[f32; GROUP], id: f32, dst: &mut [i8; GROUP]) -> i32 {
        let a = _mm512_loadu_ps(src.as_ptr());
        let b = _mm512_loadu_ps(src.as_ptr().add(16));
        let vid = _mm512_set1_ps(id);
        let lim = _mm512_set1_epi32(127);
        let neg = _mm512_set1_epi32(-127);
        // Round half to even (the default rounding mode of the conversion).
        let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, vid));
        let qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, vid));
        let qa = _mm512_max_epi32(_mm512_min_epi32(qa, lim), neg);
        let qb = _mm512_max_epi32(_mm512_min_epi32(qb, lim), neg);
        _mm_storeu_si128(dst.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128(
            dst.as_mut_ptr().add(16) as *mut __m128i,
            _mm512_cvtepi32_epi8(qb),
        );
        _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb))
    }

    /// One row group against R activation rows. Each row's integer sums are split over C
    /// independent accumulators (summed at the end, exactly: integers): `vpdpbusd`'s
    /// latency, not memory, bounded a single chain (one row decoding ran at a third of the
    /// bandwidth).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    #[inline]
    unsafe fn run<const R: usize, const Q4: bool>(
        w: &QWeight,
        act: &Activations,
        g: usize,
        r0: usize,
        out: &mut [[f32; LANES]; MR],
    ) {
        const C: usize = 4;
        let chains = (C / R).max(1);
        let kind = w.kind;
        let rb = kind.record_bytes();
        let (k, blocks) = (w.k, act.blocks);
        let base = w.data.as_ptr().add(g * blocks * rb);
        let xq = act.q.as_ptr().add(r0 * k);
        let scale = act.scale.as_ptr().add(r0 * blocks);
        let offset = act.offset.as_ptr().add(r0 * blocks);
        let nib = _mm512_set1_epi8(15);
        let mut acc = [_mm512_setzero_ps(); R];
        // Every line of a record a few records ahead: the weight is read once, front to
        // back.
        let ahead_by = super::records_ahead(rb);
        for b in 0..blocks {
            let rec = base.add(b * rb);
            let ahead = rec.wrapping_add(ahead_by);
            for line in 0..rb.div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(rec as *const __m256i));
            let mut isum = [[_mm512_setzero_si512(); C]; R];
            let q = rec.add(kind.quants_at());
            // Activation group b of row r, 4 bytes at a time as one i32, broadcast.
            macro_rules! x4 {
                ($r:expr, $i:expr) => {
                    _mm512_set1_epi32(
                        (xq.add($r * k + b * GROUP + 4 * $i) as *const i32).read_unaligned(),
                    )
                };
            }
            if Q4 {
                for s in 0..GROUP / 8 {
                    let v = _mm512_loadu_si512(q.add(64 * s) as *const _);
                    let lo = _mm512_and_si512(v, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
                    let (c0, c1) = ((2 * s) % chains, (2 * s + 1) % chains);
                    for (r, is) in isum.iter_mut().enumerate() {
                        is[c0] = _mm512_dpbusd_epi32(is[c0], lo, x4!(r, 2 * s));
                        is[c1] = _mm512_dpbusd_epi32(is[c1], hi, x4!(r, 2 * s + 1));
                    }
                }
            } else {
                for s in 0..GROUP / 4 {
                    let v = _mm512_loadu_si512(q.add(64 * s) as *const _);
                    let c = s % chains;
                    for (r, is) in isum.iter_mut().enumerate() {
                        is[c] = _mm512_dpbusd_epi32(is[c], v, x4!(r, s));
                    }
                }
            }
            let m = if Q4 {
                _mm512_cvtph_ps(_mm256_loadu_si256(rec.add(2 * LANES) as *const __m256i))
            } else {
                _mm512_setzero_ps()
            };
            for r in 0..R {
                let total = isum[r][1..chains]
                    .iter()
                    .fold(isum[r][0], |t, &v| _mm512_add_epi32(t, v));
                let dx = _mm512_set1_ps(*scale.add(r * blocks + b));
                let off = _mm512_set1_ps(*offset.add(r * blocks + b));
                let s = _mm512_cvtepi32_ps(total);
                if Q4 {
                    let t = _mm512_mul_ps(s, dx);
                    acc[r] = _mm512_fmadd_ps(d, t, acc[r]);
                    acc[r] = _mm512_fmadd_ps(m, off, acc[r]);
                } else {
                    let t = _mm512_fmadd_ps(s, dx, off);
                    acc[r] = _mm512_fmadd_ps(d, t, acc[r]);
                }
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }

    /// [`super::portable_group_k`] on AVX-512 VNNI: one row group's super-block `b` is one
    /// 2,304-byte record, its sub-blocks' 6-bit scales and minima widened to the 16 lanes'
    /// i32s, each sub-block's `vpdpbusd` sums multiplied by its scales in integers (exact),
    /// the float steps once per super-block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    #[inline]
    unsafe fn run_k<const R: usize>(
        w: &QWeight,
        act: &Activations,
        g: usize,
        r0: usize,
        out: &mut [[f32; LANES]; MR],
    ) {
        let rb = QuantKind::Q4K.record_bytes();
        let (k, blocks) = (w.k, act.sblocks);
        let base = w.data.as_ptr().add(g * blocks * rb);
        let xq = act.q.as_ptr().add(r0 * k);
        let scale = act.scale.as_ptr().add(r0 * blocks);
        let sum = act.sum.as_ptr().add(r0 * act.blocks);
        let nib = _mm512_set1_epi8(15);
        let (low4, low2) = (_mm512_set1_epi32(15), _mm512_set1_epi32(3));
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let rec = base.add(b * rb);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(rec as *const __m256i));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(rec.add(2 * LANES) as *const __m256i));
            let mut high = _mm512_loadu_si512(rec.add(K_HIGH_AT) as *const _);
            let mut tot = [_mm512_setzero_si512(); R];
            let mut mtot = [_mm512_setzero_si512(); R];
            for s in 0..8 {
                // Two records ahead, 4.5 lines per sub-block: the weight is read once,
                // front to back.
                let ahead = rec.wrapping_add(2 * rb + 288 * s);
                for line in 0..5 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
                }
                let low = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                    rec.add(K_LOW_AT + LANES * s) as *const __m128i
                ));
                let sc = _mm512_or_si512(
                    _mm512_and_si512(low, low4),
                    _mm512_slli_epi32::<4>(_mm512_and_si512(high, low2)),
                );
                let m = _mm512_or_si512(
                    _mm512_srli_epi32::<4>(low),
                    _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<16>(high), low2)),
                );
                high = _mm512_srli_epi32::<2>(high);
                let q = rec.add(K_QUANTS_AT + 256 * s);
                let mut isum = [[_mm512_setzero_si512(); 2]; R];
                for t in 0..4 {
                    let v = _mm512_loadu_si512(q.add(64 * t) as *const _);
                    let lo = _mm512_and_si512(v, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
                    for (r, is) in isum.iter_mut().enumerate() {
                        let x = xq.add(r * k + b * SUPER + s * GROUP + 8 * t);
                        let xl = _mm512_set1_epi32((x as *const i32).read_unaligned());
                        let xh = _mm512_set1_epi32((x.add(4) as *const i32).read_unaligned());
                        is[0] = _mm512_dpbusd_epi32(is[0], lo, xl);
                        is[1] = _mm512_dpbusd_epi32(is[1], hi, xh);
                    }
                }
                for r in 0..R {
                    let is = _mm512_add_epi32(isum[r][0], isum[r][1]);
                    tot[r] = _mm512_add_epi32(tot[r], _mm512_mullo_epi32(is, sc));
                    let xs = _mm512_set1_epi32(*sum.add(r * act.blocks + b * 8 + s));
                    mtot[r] = _mm512_add_epi32(mtot[r], _mm512_mullo_epi32(m, xs));
                }
            }
            for r in 0..R {
                let dx = _mm512_set1_ps(*scale.add(r * blocks + b));
                let t = _mm512_mul_ps(_mm512_cvtepi32_ps(tot[r]), dx);
                acc[r] = _mm512_fmadd_ps(d, t, acc[r]);
                let u = _mm512_mul_ps(_mm512_cvtepi32_ps(mtot[r]), dx);
                acc[r] = _mm512_fnmadd_ps(dmin, u, acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The kernel for CPUs with AVX2 but not AVX-512 VNNI. A 256-bit vector holds 8 of a
    //! record's 16 output lanes (one half of each 64-byte step), and AVX2 has no `vpdpbusd`:
    //! its u8 x i8 product is `vpmaddubsw`, which adds adjacent products into an i16 *with
    //! saturation*, then `vpmaddwd` against ones adds those pairs into the i32 lanes. The
    //! integer sums must still be exact (the other kernels' are), so each format keeps its
    //! i16 steps provably inside ±32767:
    //!
    //! - 4-bit: a nibble is 0..=15 and an activation -127..=127 (the quantizer clamps), so
    //!   one product is at most 15 · 127 = 1,905 in magnitude and an i16 of `vpmaddubsw`
    //!   (2 products) at most 3,810. A group of 32 weights gives each i16 position 8 such
    //!   results (4 steps x low and high nibbles): at most 16 products, 16 · 1,905 = 30,480
    //!   < 32,767, so the whole group is summed in i16 and widened once.
    //! - 8-bit: weights are stored as `w = q + 128` (0..=255), and 255 · 127 · 2 = 64,770
    //!   would saturate. So the kernel multiplies the signed `q = w - 128` (the byte with its
    //!   top bit flipped: -127..=127 as our quantizer writes it, -128 for a stored 0, which a
    //!   checkpoint's bytes may hold) with the sign trick of ggml's AVX2 dot products, the
    //!   absolute value on the weight's side: `|q|` (0..=128 read unsigned, so -128 too)
    //!   times `x · sign(q)` (`vpsignb`; |x| <= 127, so negating never wraps). The products
    //!   are `q · x`, at most 128 · 127 = 16,256 in magnitude, a pair at most 32,512 <
    //!   32,767. Each step is widened to i32 at once (two steps' pairs could overflow), and
    //!   at the end of the group `128 · Σx` (exact, from the quantizer) turns `Σ q·x` into
    //!   `Σ (q + 128)·x`: the very integer the other kernels sum.
    //!
    //! The float steps per group and lane are then the other kernels', in the same order
    //! and with the same fused multiply-adds.
    use super::{
        Activations, QWeight, QuantKind, GROUP, K_HIGH_AT, K_LOW_AT, K_QUANTS_AT, LANES, MR, SUPER,
        S_HIGH_AT, S_LOW_AT, S_SCALES_AT,
    };
    use std::arch::x86_64::*;

    /// [`super::portable_group`] on AVX2: the same sums in the same order.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be present; `g` a row group of `w`, `r0 + mr` at most the
    /// activations' rows, `1 <= mr <= MR`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group(
        w: &QWeight,
        act: &Activations,
        g: usize,
        r0: usize,
        mr: usize,
        acc: &mut [[f32; LANES]; MR],
    ) {
        dispatch!(w, act, g, r0, mr, acc)
    }

    /// [`super::portable_group_s`] on AVX2, both 8-lane halves in one pass. A value is
    /// 0..=63 here, so a `vpmaddubsw` pair reaches 2 · 63 · 127 = 16,002 and two groups'
    /// pairs could saturate an i16: each group is widened to i32 at once.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn run_s<const R: usize>(
        w: &QWeight,
        act: &Activations,
        g: usize,
        r0: usize,
        out: &mut [[f32; LANES]; MR],
    ) {
        let rb = QuantKind::Q6K.record_bytes();
        let (k, blocks) = (w.k, act.sblocks);
        let base = w.data.as_ptr().add(g * blocks * rb);
        let xq = act.q.as_ptr().add(r0 * k);
        let scale = act.scale.as_ptr().add(r0 * blocks);
        let sum16 = act.sum16.as_ptr().add(r0 * k / 16);
        let (nib, two) = (_mm256_set1_epi8(15), _mm256_set1_epi8(3));
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for b in 0..blocks {
            let rec = base.add(b * rb);
            let mut tot = [[_mm256_setzero_si256(); 2]; R];
            for s in 0..16 {
                let ahead = rec.wrapping_add(2 * rb + 210 * s);
                for line in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
                }
                let low = rec.add(S_LOW_AT + 128 * s);
                for hh in 0..2 {
                    let sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        rec.add(S_SCALES_AT + LANES * s + 8 * hh) as *const __m128i,
                    ));
                    let v = [0, 1]
                        .map(|t| _mm256_loadu_si256(low.add(64 * t + 32 * hh) as *const __m256i));
                    let h = _mm256_loadu_si256(rec.add(S_HIGH_AT + 64 * s + 32 * hh) as *const _);
                    let top = |shift: i32| {
                        let t =
                            _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(shift)), two);
                        _mm256_slli_epi16::<4>(t)
                    };
                    let q = [
                        _mm256_or_si256(_mm256_and_si256(v[0], nib), top(0)),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(v[0]), nib),
                            top(2),
                        ),
                        _mm256_or_si256(_mm256_and_si256(v[1], nib), top(4)),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(v[1]), nib),
                            top(6),
                        ),
                    ];
                    for (r, t) in tot.iter_mut().enumerate() {
                        let x = xq.add(r * k + b * SUPER + 16 * s);
                        let mut is = _mm256_setzero_si256();
                        for (gi, qg) in q.iter().enumerate() {
                            let xg =
                                _mm256_set1_epi32((x.add(4 * gi) as *const i32).read_unaligned());
                            let p = _mm256_maddubs_epi16(*qg, xg);
                            is = _mm256_add_epi32(is, _mm256_madd_epi16(p, ones));
                        }
                        let back = _mm256_set1_epi32(32 * *sum16.add((r * k + b * SUPER) / 16 + s));
                        let is = _mm256_sub_epi32(is, back);
                        t[hh] = _mm256_add_epi32(t[hh], _mm256_mullo_epi32(is, sc));
                    }
                }
            }
            for hh in 0..2 {
                let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16 * hh) as *const __m128i));
                for r in 0..R {
                    let dx = _mm256_set1_ps(*scale.add(r * blocks + b));
                    let t = _mm256_mul_ps(_mm256_cvtepi32_ps(tot[r][hh]), dx);
                    acc[r][hh] = _mm256_fmadd_ps(d, t, acc[r][hh]);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
        }
    }

    /// [`super::group_amax`] on 8 lanes.
    ///
    /// # Safety
    /// AVX must be present.
    #[target_feature(enable = "avx")]
    pub unsafe fn group_amax(src: &[f32; GROUP]) -> f32 {
        let p = src.as_ptr();
        // |x|: the sign bit cleared.
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
        let a = [0, 8, 16, 24].map(|o| _mm256_and_ps(_mm256_loadu_ps(p.add(o)), abs));
        let m8 = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps::<1>(m8));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)))
    }

    /// [`super::quantize_group`] on 8 lanes: the same numbers.
    ///
    /// # Safety
    /// AVX2 must be present.
    #[cfg(test)]
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_group(src: &[f32; GROUP], dst: &mut [i8; GROUP]) -> (f32, i32) {
        let (d, id) = super::activation_scale(group_amax(src));
        (d, quantize_scaled(src, id, dst))
    }

    /// [`super::quantize_scaled`] on 8 lanes, operation for operation the AVX-512 one: the
    /// same numbers.
    ///
    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_scaled(src: &[f32; GROUP], id: f32, dst: &mut [i8; GROUP]) -> i32 {
        let p = src.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let vid = _mm256_set1_ps(id);
        let (lim, neg) = (_mm256_set1_epi32(127), _mm256_set1_epi32(-127));
        // Round half to even (the default rounding mode of the conversion), then clamp.
        let q = v.map(|v| {
            let q = _mm256_cvtps_epi32(_mm256_mul_ps(v, vid));
            _mm256_max_epi32(_mm256_min_epi32(q, lim), neg)
        });
        // i32 -> i8 (no saturation: all within ±127). The packs work within 128-bit halves,
        // leaving the 4-byte runs in the order 0, 2, 4, 6, 1, 3, 5, 7; one permute restores
        // 0..8.
        let w = _mm256_packs_epi32(q[0], q[1]);
        let z = _mm256_packs_epi32(q[2], q[3]);
        let b = _mm256_packs_epi16(w, z);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, b);
        let s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s4 = _mm_add_epi32(
            _mm256_castsi256_si128(s8),
            _mm256_extracti128_si256::<1>(s8),
        );
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2));
        _mm_cvtsi128_si32(s1)
    }

    /// One row group against R activation rows, both 8-lane halves of each record in one
    /// pass (the weight is read once, front to back). No split accumulators as in the
    /// AVX-512 kernel: the chain that carries a sum from one step to the next is a 1-cycle
    /// integer add here, not a 5-cycle `vpdpbusd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn run<const R: usize, const Q4: bool>(
        w: &QWeight,
        act: &Activations,
        g: usize,
        r0: usize,
        out: &mut [[f32; LANES]; MR],
    ) {
        let kind = w.kind;
        let rb = kind.record_bytes();
        let (k, blocks) = (w.k, act.blocks);
        let base = w.data.as_ptr().add(g * blocks * rb);
        let xq = act.q.as_ptr().add(r0 * k);
        let scale = act.scale.as_ptr().add(r0 * blocks);
        let offset = act.offset.as_ptr().add(r0 * blocks);
        let sum = act.sum.as_ptr().add(r0 * blocks);
        let nib = _mm256_set1_epi8(15);
        let top = _mm256_set1_epi8(i8::MIN);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let ahead_by = super::records_ahead(rb);
        for b in 0..blocks {
            let rec = base.add(b * rb);
            let ahead = rec.wrapping_add(ahead_by);
            for line in 0..rb.div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
            }
            let q = rec.add(kind.quants_at());
            // Activation group b of row r, 4 bytes at a time as one i32, broadcast.
            macro_rules! x4 {
                ($r:expr, $i:expr) => {
                    _mm256_set1_epi32(
                        (xq.add($r * k + b * GROUP + 4 * $i) as *const i32).read_unaligned(),
                    )
                };
            }
            // Step s's half h: lanes 8h..8h+8, 4 bytes each.
            let load = |s: usize, h: usize| _mm256_loadu_si256(q.add(64 * s + 32 * h) as *const _);
            let mut isum = [[_mm256_setzero_si256(); 2]; R];
            if Q4 {
                // i16 sums over the whole group: within range (module comment).
                let mut s16 = [[_mm256_setzero_si256(); 2]; R];
                for s in 0..GROUP / 8 {
                    let v = [load(s, 0), load(s, 1)];
                    let lo = v.map(|v| _mm256_and_si256(v, nib));
                    let hi = v.map(|v| _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib));
                    for (r, acc16) in s16.iter_mut().enumerate() {
                        let (xl, xh) = (x4!(r, 2 * s), x4!(r, 2 * s + 1));
                        for h in 0..2 {
                            let p = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo[h], xl),
                                _mm256_maddubs_epi16(hi[h], xh),
                            );
                            acc16[h] = _mm256_add_epi16(acc16[h], p);
                        }
                    }
                }
                for r in 0..R {
                    for h in 0..2 {
                        isum[r][h] = _mm256_madd_epi16(s16[r][h], ones);
                    }
                }
            } else {
                for s in 0..GROUP / 4 {
                    // q = w - 128 as i8 (top bit flipped), |q| as u8 (-128 gives 128).
                    let sq = [load(s, 0), load(s, 1)].map(|v| _mm256_xor_si256(v, top));
                    let aq = sq.map(|v| _mm256_abs_epi8(v));
                    for (r, is) in isum.iter_mut().enumerate() {
                        let x = x4!(r, s);
                        for h in 0..2 {
                            // |q| · (x · sign q) = q · x, pairs within i16 (module comment).
                            let p = _mm256_maddubs_epi16(aq[h], _mm256_sign_epi8(x, sq[h]));
                            is[h] = _mm256_add_epi32(is[h], _mm256_madd_epi16(p, ones));
                        }
                    }
                }
                // Σ (q + 128)·x = Σ q·x + 128·Σx, in i32 (|Σ| <= 32 · 255 · 127 < 2^31).
                for (r, is) in isum.iter_mut().enumerate() {
                    let back = _mm256_set1_epi32(128 * *sum.add(r * blocks + b));
                    for v in is.iter_mut() {
                        *v = _mm256_add_epi32(*v, back);
                    }
                }
            }
            for h in 0..2 {
                let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16 * h) as *const __m128i));
                let m = if Q4 {
                    _mm256_cvtph_ps(_mm_loadu_si128(
                        rec.add(2 * LANES + 16 * h) as *const __m128i
                    ))
                } else {
                    _mm256_setzero_ps()
                };
                for r in 0..R {
                    let dx = _mm256_set1_ps(*scale.add(r * blocks + b));
                    let off = _mm256_set1_ps(*offset.add(r * blocks + b));
                    let s = _mm256_cvtepi32_ps(isum[r][h]);
                    if Q4 {
                        let t = _mm256_mul_ps(s, dx);
                        acc[r][h] = _mm256_fmadd_ps(d, t, acc[r][h]);
                        acc[r][h] = _mm256_fmadd_ps(m, off, acc[r][h]);
                    } else {
                        let t = _mm256_fmadd_ps(s, dx, off);
                        acc[r][h] = _mm256_fmadd_ps(d, t, acc[r][h]);
                    }
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
        }
    }

    /// [`super::portable_group_k`] on AVX2, both 8-lane halves of each record in one pass.
    /// A sub-block's products are summed in i16 before widening: the q4_1 bound of the
    /// module comment (16 products of at most 1,905 per i16 position), as a q4_k sub-block
    /// is 32 nibbles against activations within ±127 too.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn run_k<const R: usize>(
        w: &QWeight,
        act: &Activations,
        g: usize,
        r0: usize,
        out: &mut [[f32; LANES]; MR],
    ) {
        let rb = QuantKind::Q4K.record_bytes();
        let (k, blocks) = (w.k, act.sblocks);
        let base = w.data.as_ptr().add(g * blocks * rb);
        let xq = act.q.as_ptr().add(r0 * k);
        let scale = act.scale.as_ptr().add(r0 * blocks);
        let sum = act.sum.as_ptr().add(r0 * act.blocks);
        let nib = _mm256_set1_epi8(15);
        let (low4, low2) = (_mm256_set1_epi32(15), _mm256_set1_epi32(3));
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for b in 0..blocks {
            let rec = base.add(b * rb);
            let mut high =
                [0, 1].map(|h| _mm256_loadu_si256(rec.add(K_HIGH_AT + 32 * h) as *const __m256i));
            let mut tot = [[_mm256_setzero_si256(); 2]; R];
            let mut mtot = [[_mm256_setzero_si256(); 2]; R];
            for s in 0..8 {
                let ahead = rec.wrapping_add(2 * rb + 288 * s);
                for line in 0..5 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
                }
                let mut sc = [_mm256_setzero_si256(); 2];
                let mut m = [_mm256_setzero_si256(); 2];
                for h in 0..2 {
                    let low = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        rec.add(K_LOW_AT + LANES * s + 8 * h) as *const __m128i,
                    ));
                    sc[h] = _mm256_or_si256(
                        _mm256_and_si256(low, low4),
                        _mm256_slli_epi32::<4>(_mm256_and_si256(high[h], low2)),
                    );
                    m[h] = _mm256_or_si256(
                        _mm256_srli_epi32::<4>(low),
                        _mm256_slli_epi32::<4>(_mm256_and_si256(
                            _mm256_srli_epi32::<16>(high[h]),
                            low2,
                        )),
                    );
                    high[h] = _mm256_srli_epi32::<2>(high[h]);
                }
                let q = rec.add(K_QUANTS_AT + 256 * s);
                let mut s16 = [[_mm256_setzero_si256(); 2]; R];
                for t in 0..4 {
                    let v = [0, 1].map(|h| _mm256_loadu_si256(q.add(64 * t + 32 * h) as *const _));
                    let lo = v.map(|v| _mm256_and_si256(v, nib));
                    let hi = v.map(|v| _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib));
                    for (r, acc16) in s16.iter_mut().enumerate() {
                        let x = xq.add(r * k + b * SUPER + s * GROUP + 8 * t);
                        let xl = _mm256_set1_epi32((x as *const i32).read_unaligned());
                        let xh = _mm256_set1_epi32((x.add(4) as *const i32).read_unaligned());
                        for h in 0..2 {
                            let p = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo[h], xl),
                                _mm256_maddubs_epi16(hi[h], xh),
                            );
                            acc16[h] = _mm256_add_epi16(acc16[h], p);
                        }
                    }
                }
                for r in 0..R {
                    let xs = _mm256_set1_epi32(*sum.add(r * act.blocks + b * 8 + s));
                    for h in 0..2 {
                        let is = _mm256_madd_epi16(s16[r][h], ones);
                        tot[r][h] = _mm256_add_epi32(tot[r][h], _mm256_mullo_epi32(is, sc[h]));
                        mtot[r][h] = _mm256_add_epi32(mtot[r][h], _mm256_mullo_epi32(m[h], xs));
                    }
                }
            }
            for h in 0..2 {
                let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16 * h) as *const __m128i));
                let dmin = _mm256_cvtph_ps(_mm_loadu_si128(
                    rec.add(2 * LANES + 16 * h) as *const __m128i
                ));
                for r in 0..R {
                    let dx = _mm256_set1_ps(*scale.add(r * blocks + b));
                    let t = _mm256_mul_ps(_mm256_cvtepi32_ps(tot[r][h]), dx);
                    acc[r][h] = _mm256_fmadd_ps(d, t, acc[r][h]);
                    let u = _mm256_mul_ps(_mm256_cvtepi32_ps(mtot[r][h]), dx);
                    acc[r][h] = _mm256_fnmadd_ps(dmin, u, acc[r][h]);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(n: usize, k: usize, seed: u64) -> Vec<f32> {
        // A spread of magnitudes per row (and an all-zero group) so scales differ.
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let mut w: Vec<f32> = (0..n * k)
            .map(|i| next() * (1.0 + (i / k % 7) as f32))
            .collect();
        if n > 0 && k >= GROUP {
            w[..GROUP].fill(0.0);
        }
        w
    }

    /// The product by its definition: quantized activations times dequantized weights,
    /// summed in f64.
    fn definition(w: &QWeight, x: &[f32], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let (n, k) = w.dims();
        let act = Activations::quantize(w.kind, x, m, k, Kernel::Portable);
        let deq = w.dequantize();
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for i in 0..k {
                    let xv = act.q[r * k + i] as f64
                        * act.scale[r * act.sblocks + i / w.kind.block()] as f64;
                    s += xv * deq[j * k + i] as f64;
                }
                out[r * n + j] = (s + bias.map_or(0.0, |b| b[j] as f64)) as f32;
            }
        }
        out
    }

    /// The kernels this CPU can run besides the portable one; a skip line (or, with
    /// `MEDVLM_REQUIRE_SIMD=1`, a failure) for each it cannot.
    fn simd_kernels() -> Vec<Kernel> {
        let mut out = Vec::new();
        for k in [Kernel::Avx512Vnni, Kernel::Avx2] {
            if k.available() {
                out.push(k);
            } else {
                super::super::skip_or_require(&format!(
                    "the {} quantized kernel (CPU lacks it)",
                    k.name()
                ));
            }
        }
        out
    }

    /// `w.matmul_with` on `kernel`, as bits.
    fn product_bits(
        w: &QWeight,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        kernel: Kernel,
    ) -> Vec<u32> {
        let mut out = vec![f32::NAN; m * w.dims().0];
        w.matmul_with(x, m, bias, &mut out, kernel);
        out.iter().map(|v| v.to_bits()).collect()
    }

    /// Every kernel against the portable one, bit for bit, and the portable one against the
    /// definition: every format; 1 to 7 activation rows (every register-tile height, and
    /// rows left over after whole tiles); outputs that do not fill a record's 16 rows, odd
    /// numbers of 16-row records; one to five blocks along the input; with and without bias.
    #[test]
    fn every_kernel_gives_the_same_bits_and_matches_the_definition() {
        let simd = simd_kernels();
        for kind in QuantKind::ALL {
            for &(m, n, blocks) in &[
                (1, 16, 1),
                (1, 37, 3),
                (2, 48, 2),
                (3, 50, 2),
                (4, 80, 5),
                (5, 33, 4),
                (6, 33, 4),
                (7, 112, 3),
                (9, 16, 1),
            ] {
                let k = blocks * kind.block();
                let w = QWeight::quantize(kind, &weights(n, k, 1), n, k);
                let x = weights(m, k, 2);
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 0.2).collect();
                for bias in [None, Some(&bias[..])] {
                    let case = format!("{kind:?} {m}x{n}x{k} bias {}", bias.is_some());
                    let portable = product_bits(&w, &x, m, bias, Kernel::Portable);
                    let want = definition(&w, &x, m, bias);
                    for (i, (&got, &want)) in portable.iter().zip(&want).enumerate() {
                        let got = f32::from_bits(got);
                        let tol = 1e-5 * (1.0 + want.abs()) * (k as f32).sqrt();
                        assert!((got - want).abs() <= tol, "{case} [{i}]: {got} vs {want}");
                    }
                    for &kernel in &simd {
                        let got = product_bits(&w, &x, m, bias, kernel);
                        assert!(
                            got == portable,
                            "{case}: {} and portable differ",
                            kernel.name()
                        );
                    }
                }
            }
        }
    }

    /// Products sharing their activations (q/k/v, gate/up) give what each product gives
    /// alone, bit for bit, on every kernel: weights of different heights (one not a whole
    /// number of 16-row records, so tasks end mid-weight), with and without bias, 1-6 rows.
    #[test]
    fn shared_activations_give_each_product_bit_for_bit() {
        let mut kernels = simd_kernels();
        kernels.push(Kernel::Portable);
        for kind in QuantKind::ALL {
            let k = 3 * kind.block();
            let ns = [1536 / 8, 37, 16 * 9];
            let ws: Vec<QWeight> = ns
                .iter()
                .enumerate()
                .map(|(i, &n)| QWeight::quantize(kind, &weights(n, k, 10 + i as u64), n, k))
                .collect();
            let bias: Vec<f32> = (0..37).map(|j| j as f32 * 0.03 - 0.5).collect();
            let biases = [None, Some(&bias[..]), None];
            for m in 1..=6 {
                let x = weights(m, k, 20 + m as u64);
                for &kernel in &kernels {
                    let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| vec![0f32; m * n]).collect();
                    let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
                    let wr: Vec<&QWeight> = ws.iter().collect();
                    QWeight::matmul_shared_with(&wr, &x, m, &biases, &mut refs, kernel);
                    for (i, w) in ws.iter().enumerate() {
                        let mut alone = vec![0f32; m * ns[i]];
                        w.matmul_with(&x, m, biases[i], &mut alone, kernel);
                        let (a, b): (Vec<u32>, Vec<u32>) = (
                            alone.iter().map(|v| v.to_bits()).collect(),
                            outs[i].iter().map(|v| v.to_bits()).collect(),
                        );
                        assert!(a == b, "{kind:?} m={m} weight {i} on {}", kernel.name());
                    }
                }
            }
        }
    }

    /// The integer extremes, where a kernel's 16-bit intermediate steps would saturate if
    /// they could: every stored byte value (8-bit weights 0..=255, including 0, which the
    /// quantizer never writes but a checkpoint's bytes may hold, and all-ones nibbles; for
    /// q4_k the 6-bit sub-block scales and minima too, up to 63 each, for q6_k its i8
    /// scales, -128 included) against activations
    /// at ±127 of one sign over whole groups. The f16 scales are kept from a real
    /// quantization, so the sums stay finite.
    #[test]
    fn every_kernel_gives_the_same_bits_at_the_integer_extremes() {
        let simd = simd_kernels();
        let n = 48;
        let m = 5;
        for kind in QuantKind::ALL {
            let k = 4 * kind.block();
            let dense = QWeight::quantize(kind, &weights(n, k, 5), n, k);
            let rb = kind.record_bytes();
            let fills: [&dyn Fn(usize) -> u8; 4] =
                [&|_| 0xff, &|_| 0, &|i| (i * 37 % 256) as u8, &|i| {
                    if i % 3 == 0 {
                        0
                    } else {
                        0xff
                    }
                }];
            for (f, fill) in fills.iter().enumerate() {
                let mut bytes = dense.bytes().to_vec();
                // q4_k: the sub-block scales and minima too.
                let from = match kind {
                    QuantKind::Q4K => K_LOW_AT,
                    QuantKind::Q6K => S_SCALES_AT,
                    _ => kind.quants_at(),
                };
                for rec in bytes.chunks_exact_mut(rb) {
                    for (i, b) in rec[from..].iter_mut().enumerate() {
                        *b = fill(i);
                    }
                }
                let w = QWeight::from_bytes(kind, n, k, &bytes).unwrap();
                // Rows: all +1 (every activation 127), all -1 (-127), alternating groups,
                // the ramp of `weights`, a lone maximum.
                let mut x = vec![0f32; m * k];
                for i in 0..k {
                    x[i] = 1.0;
                    x[k + i] = -1.0;
                    x[2 * k + i] = if (i / GROUP).is_multiple_of(2) {
                        3.0
                    } else {
                        -3.0
                    };
                    x[3 * k + i] = (i as f32 - k as f32 / 2.0) * 0.25;
                }
                x[4 * k + 7] = -2.0;
                let portable = product_bits(&w, &x, m, None, Kernel::Portable);
                let want = definition(&w, &x, m, None);
                for (i, (&got, &want)) in portable.iter().zip(&want).enumerate() {
                    let got = f32::from_bits(got);
                    let tol = 1e-5 * (1.0 + want.abs()) * (k as f32).sqrt();
                    assert!(
                        (got - want).abs() <= tol,
                        "{kind:?} fill {f} [{i}]: {got} vs {want}"
                    );
                }
                for &kernel in &simd {
                    let got = product_bits(&w, &x, m, None, kernel);
                    assert!(
                        got == portable,
                        "{kind:?} fill {f}: {} and portable differ",
                        kernel.name()
                    );
                }
            }
        }
    }

    /// `MEDVLM_QUANT_KERNEL` picks any kernel the CPU has; unset, empty or `auto` gives the
    /// fastest; anything else gives the fastest with a warning; with the fast paths off the
    /// fastest is the portable one.
    #[test]
    fn the_kernel_switch_picks_what_it_names_and_falls_back_with_a_warning() {
        let best = Kernel::ALL.into_iter().find(|k| k.available()).unwrap();
        for forced in [None, Some(""), Some("auto"), Some(" auto ")] {
            assert_eq!(choose(forced, true), (best, None), "{forced:?}");
        }
        assert_eq!(choose(None, false), (Kernel::Portable, None));
        for k in Kernel::ALL {
            assert_eq!(Kernel::from_name(k.name()), Some(k));
            let (got, warning) = choose(Some(k.name()), true);
            if k.available() {
                assert_eq!((got, warning), (k, None));
                assert_eq!(choose(Some(k.name()), false), (k, None));
            } else {
                assert_eq!(got, best);
                assert!(warning.unwrap().contains("cannot run"));
            }
        }
        let (got, warning) = choose(Some("avx9"), true);
        assert_eq!(got, best);
        assert!(warning.unwrap().contains("avx9 is not a kernel"));
        assert!(Kernel::Portable.available());
    }

    /// Activations on exact half steps (ties) and random ones: the vector and the portable
    /// quantizers round the same way (half to even) and give the same scale and sum.
    #[test]
    fn activation_quantizers_agree() {
        let simd = simd_kernels();
        let mut groups: Vec<[f32; GROUP]> = vec![
            std::array::from_fn(|i| i as f32 - 15.5),
            std::array::from_fn(|i| {
                if i == 0 {
                    127.0
                } else {
                    (i as f32 - 16.0) + 0.5
                }
            }),
            [0.0; GROUP],
            // The maximum in each 8-lane quarter, and negative.
            std::array::from_fn(|i| if i == 29 { -3.0 } else { i as f32 * 0.01 }),
            std::array::from_fn(|i| if i == 11 { 9.0 } else { -(i as f32) * 0.1 }),
        ];
        let w = weights(8, GROUP, 9);
        groups.extend(
            w.chunks(GROUP)
                .map(|c| <[f32; GROUP]>::try_from(c).unwrap()),
        );
        for g in &groups {
            let mut a = [0i8; GROUP];
            let pa = quantize_group(g, &mut a);
            for &kernel in &simd {
                let mut b = [0i8; GROUP];
                // SAFETY: `simd_kernels` lists only kernels this CPU has.
                let pb = unsafe {
                    match kernel {
                        Kernel::Avx512Vnni => avx512::quantize_group(g, &mut b),
                        Kernel::Avx2 => avx2::quantize_group(g, &mut b),
                        Kernel::Portable => unreachable!(),
                    }
                };
                assert_eq!(
                    (pa.0.to_bits(), pa.1, a),
                    (pb.0.to_bits(), pb.1, b),
                    "{}: {g:?}",
                    kernel.name()
                );
            }
        }
        // With max |x| = 127 the scale is 1: halves round to even.
        let mut tie = [0f32; GROUP];
        tie[..7].copy_from_slice(&[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5]);
        let mut q = [0i8; GROUP];
        assert_eq!(quantize_group(&tie, &mut q), (1.0, 127));
        assert_eq!(&q[..7], &[127, 0, 2, 2, 0, -2, -2]);
    }

    /// Every value within half a step of its group's range (q8_0, q4_1), or within one step
    /// (q4_k, q6_k: their scales are least-squares fits, which may clip the extremes, then
    /// rounded to 6 or 8 bits against the super-block's largest).
    #[test]
    fn quantization_error_is_within_half_a_step() {
        let (n, k) = (20, 512);
        let w = weights(n, k, 3);
        for kind in QuantKind::ALL {
            let q = QWeight::quantize(kind, &w, n, k);
            let deq = q.dequantize();
            for j in 0..n {
                for b in 0..k / GROUP {
                    let g = &w[j * k + b * GROUP..j * k + (b + 1) * GROUP];
                    let (lo, hi) = g
                        .iter()
                        .fold((f32::MAX, f32::MIN), |(a, c), &v| (a.min(v), c.max(v)));
                    let amax = lo.abs().max(hi.abs());
                    // Half a step, plus the f16 rounding of the scale (and minimum).
                    let step = match kind {
                        QuantKind::Q8_0 => amax / 127.0,
                        QuantKind::Q4_1 => (hi - lo) / 15.0,
                        QuantKind::Q4K => 2.0 * (hi - lo.min(0.0)) / 15.0,
                        QuantKind::Q6K => amax / 16.0,
                    };
                    for i in 0..GROUP {
                        let e = (deq[j * k + b * GROUP + i] - g[i]).abs();
                        assert!(
                            e <= 0.5 * step + 2e-3 * amax + 1e-7,
                            "{kind:?} row {j}: error {e}, step {step}"
                        );
                    }
                }
            }
        }
    }

    /// gguf-py's numpy quantizers (bit-exact with ggml's reference ones) on a weight with
    /// the edge cases (tools/make_quant_fixture.py): our weights must stand for exactly the
    /// values ggml's stand for.
    #[test]
    fn quantizes_exactly_as_ggml() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/quant/gguf-py.safetensors"
        );
        let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
        let w = &t["weight"];
        let (n, k) = w.dims2().unwrap();
        let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        for kind in [QuantKind::Q8_0, QuantKind::Q4_1] {
            let blocks: Vec<u8> = t[&format!("{}.blocks", kind.name())].to_vec1().unwrap();
            let ours = QWeight::quantize(kind, &w, n, k);
            let theirs = QWeight::from_ggml(kind, n, k, &blocks).unwrap();
            assert!(
                ours.bytes() == theirs.bytes(),
                "{kind:?}: bytes differ from ggml's"
            );
            let want: Vec<f32> = t[&format!("{}.dequantized", kind.name())]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = QWeight::quantize(kind, &w, n, k).dequantize();
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    e.to_bits(),
                    "{kind:?} [{}, {}]: {g} vs gguf-py's {e}",
                    i / k,
                    i % k
                );
            }
        }
    }

    /// ggml's own C quantizers for Q4_K and Q6_K (tools/make_kquant_fixture.py; no numpy
    /// ones exist) on a weight with the edge cases: our quantizers write the same scales,
    /// minima and values (ggml's blocks rearranged into records give our bytes exactly),
    /// and our dequantization gives gguf-py's, bit for bit. Blocks of the wrong length are
    /// refused.
    #[test]
    fn k_quants_quantize_exactly_as_ggml() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/quant/ggml-kquants.safetensors"
        );
        let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
        let (n, k) = t["weight"].dims2().unwrap();
        let w: Vec<f32> = t["weight"].flatten_all().unwrap().to_vec1().unwrap();
        for kind in [QuantKind::Q4K, QuantKind::Q6K] {
            let blocks: Vec<u8> = t[&format!("{}.blocks", kind.name())].to_vec1().unwrap();
            let ours = QWeight::quantize(kind, &w, n, k);
            let theirs = QWeight::from_ggml(kind, n, k, &blocks).unwrap();
            for j in 0..n {
                let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
                ours.dequantize_row(j, &mut a);
                theirs.dequantize_row(j, &mut b);
                let first = (0..k).find(|&i| a[i].to_bits() != b[i].to_bits());
                assert!(
                    first.is_none(),
                    "{kind:?} row {j}: first difference at {first:?}"
                );
            }
            assert!(
                ours.bytes() == theirs.bytes(),
                "{kind:?}: bytes differ from ggml's"
            );
            let want: Vec<f32> = t[&format!("{}.dequantized", kind.name())]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (i, (g, e)) in ours.dequantize().iter().zip(&want).enumerate() {
                let (r, c) = (i / k, i % k);
                assert_eq!(g.to_bits(), e.to_bits(), "{kind:?} [{r}, {c}]: {g} vs {e}");
            }
            assert!(QWeight::from_ggml(kind, n, k, &blocks[1..]).is_none());
            assert!(QWeight::from_ggml(kind, n, k - 32, &blocks).is_none());
        }
    }

    /// Which format a layer takes: q4_k where its inputs are whole super-blocks, q4_1 where
    /// they are whole groups of 32, dense otherwise; the other formats their own or dense.
    #[test]
    fn each_width_takes_the_format_that_fits() {
        use QuantKind::*;
        for (kind, k, want) in [
            (Q4K, 1536, Some(Q4K)),
            (Q4K, 8960, Some(Q4K)),
            (Q4K, 96, Some(Q4_1)),
            (Q4K, 1184, Some(Q4_1)),
            (Q4K, 1176, None),
            (Q4_1, 256, Some(Q4_1)),
            (Q8_0, 96, Some(Q8_0)),
            (Q8_0, 1176, None),
            (Q4K, 0, None),
            (Q6K, 1536, Some(Q6K)),
            (Q6K, 96, Some(Q8_0)),
            (Q6K, 1176, None),
        ] {
            assert_eq!(kind.for_width(k), want, "{kind:?} {k}");
        }
        assert_eq!(Q4K.bits_per_weight(), 4.5);
        assert_eq!(Q6K.bits_per_weight(), 6.5625);
        assert_eq!(Q4_1.bits_per_weight(), 5.0);
        assert_eq!(Q8_0.bits_per_weight(), 8.5);
    }

    #[test]
    fn stored_bytes_round_trip() {
        let n = 18;
        for kind in QuantKind::ALL {
            let k = 2 * kind.block();
            let w = weights(n, k, 4);
            let q = QWeight::quantize(kind, &w, n, k);
            assert_eq!(q.bytes().len(), QWeight::stored_len(kind, n, k));
            let back = QWeight::from_bytes(kind, n, k, q.bytes()).unwrap();
            assert_eq!(back.dequantize(), q.dequantize());
            assert!(QWeight::from_bytes(kind, n, k, &q.bytes()[1..]).is_none());
        }
    }
}
