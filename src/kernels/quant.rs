//! Weight-only quantization for inference on the CPU: 8-bit (`q8_0`) and 4-bit (`q4_1`)
//! weights in groups of 32 along the input axis, each group with its own scale (and, for
//! 4-bit, its own minimum), and products that run on the CPU's integer dot products.
//!
//! The numbers are ggml's: a group quantizes exactly as `quantize_row_q8_0_ref` /
//! `quantize_row_q4_1_ref` in llama.cpp's ggml-quants.c (and gguf-py's numpy
//! `Q8_0`/`Q4_1`, which tests/fixtures/quant checks bit for bit), scales and minima stored
//! as f16. Only the arrangement differs: ggml stores each output row's groups one after the
//! other and sums a row's dot product across SIMD lanes at the end; here 16 output rows are
//! interleaved, so one 512-bit `vpdpbusd` multiplies 4 consecutive weights of 16 rows by the
//! same 4 activations (broadcast), and the 16 lanes of the accumulator are 16 outputs: no
//! horizontal sums, and the weights are read front to back once.
//!
//! Activations are quantized per call to 8 bits in groups of 32 (as ggml does for its
//! `q8_0` dot products), scale kept in f32. The integer sums are exact; the float steps
//! (per group: scale the integer sum, add the offset term, accumulate) happen in one fixed
//! order with fused multiply-adds, so the AVX-512 VNNI kernel, the AVX2 one (CPUs without
//! AVX-512 VNNI: most Intel desktops and laptops, AMD Zen 2/3) and the portable one give the
//! same bits. [`kernel`] is the one place that picks which runs.

use rayon::prelude::*;

use super::SendPtr;

/// Weights per group along the input axis (one scale each).
pub const GROUP: usize = 32;
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
}

impl QuantKind {
    pub const ALL: [QuantKind; 2] = [QuantKind::Q8_0, QuantKind::Q4_1];

    /// The name used on the command line and in saved checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q8_0 => "q8_0",
            QuantKind::Q4_1 => "q4_1",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Bytes of one record: 16 rows x 32 weights.
    pub fn record_bytes(self) -> usize {
        match self {
            // 16 f16 scales, then 512 bytes of weights.
            QuantKind::Q8_0 => 2 * LANES + LANES * GROUP,
            // 16 f16 scales, 16 f16 minima, then 256 bytes of nibbles.
            QuantKind::Q4_1 => 4 * LANES + LANES * GROUP / 2,
        }
    }

    /// Stored bits per weight, scales included.
    pub fn bits_per_weight(self) -> f64 {
        (self.record_bytes() * 8) as f64 / (LANES * GROUP) as f64
    }

    /// Where a record's weight bytes start.
    fn quants_at(self) -> usize {
        match self {
            QuantKind::Q8_0 => 2 * LANES,
            QuantKind::Q4_1 => 4 * LANES,
        }
    }
}

/// Whether a weight of `k` inputs can be quantized: whole groups only (every Qwen2/2.5/3-VL
/// linear layer but the vision patch embedding, whose 1,176 inputs stay dense).
pub fn quantizable(k: usize) -> bool {
    k > 0 && k.is_multiple_of(GROUP)
}

/// An (n x k) weight, quantized: `ceil(n / 16)` row groups, each `k / 32` records long.
#[derive(Clone)]
pub struct QWeight {
    kind: QuantKind,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QWeight({}, {} x {})", self.kind.name(), self.n, self.k)
    }
}

impl QWeight {
    /// Quantizes `w`, (n x k) row-major. Panics unless `quantizable(k)` and `w` holds n x k
    /// values (callers check both).
    pub fn quantize(kind: QuantKind, w: &[f32], n: usize, k: usize) -> Self {
        assert!(quantizable(k) && w.len() >= n * k);
        let blocks = k / GROUP;
        let rb = kind.record_bytes();
        let mut data = vec![0u8; n.div_ceil(LANES) * blocks * rb];
        data.par_chunks_mut(blocks * rb)
            .enumerate()
            .for_each(|(g, group)| {
                for lane in 0..LANES.min(n - g * LANES) {
                    let row = &w[(g * LANES + lane) * k..(g * LANES + lane + 1) * k];
                    for (b, rec) in group.chunks_exact_mut(rb).enumerate() {
                        let x: &[f32; GROUP] = row[b * GROUP..(b + 1) * GROUP].try_into().unwrap();
                        match kind {
                            QuantKind::Q8_0 => {
                                let (d, q) = quantize_q8_0(x);
                                put_f16(rec, lane, d);
                                for (i, &q) in q.iter().enumerate() {
                                    rec[q8_index(lane, i)] = (q as i16 + 128) as u8;
                                }
                            }
                            QuantKind::Q4_1 => {
                                let (d, m, q) = quantize_q4_1(x);
                                put_f16(rec, lane, d);
                                put_f16(rec, LANES + lane, m);
                                for (i, &q) in q.iter().enumerate() {
                                    let (at, shift) = q4_index(lane, i);
                                    rec[at] |= q << shift;
                                }
                            }
                        }
                    }
                }
            });
        Self { kind, n, k, data }
    }

    /// Rebuilds a weight from its stored bytes (a saved checkpoint); `None` when their
    /// length is not what (kind, n, k) takes.
    pub fn from_bytes(kind: QuantKind, n: usize, k: usize, data: Vec<u8>) -> Option<Self> {
        (quantizable(k) && data.len() == Self::stored_len(kind, n, k)).then_some(Self {
            kind,
            n,
            k,
            data,
        })
    }

    /// Bytes an (n x k) weight takes in `kind`.
    pub fn stored_len(kind: QuantKind, n: usize, k: usize) -> usize {
        n.div_ceil(LANES) * (k / GROUP) * kind.record_bytes()
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
    /// (no fused multiply-add) for 4-bit.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        assert!(j < self.n && out.len() >= self.k);
        let rb = self.kind.record_bytes();
        let (g, lane) = (j / LANES, j % LANES);
        let blocks = self.k / GROUP;
        for b in 0..blocks {
            let rec = &self.data[(g * blocks + b) * rb..(g * blocks + b + 1) * rb];
            let d = get_f16(rec, lane);
            let dst = &mut out[b * GROUP..(b + 1) * GROUP];
            match self.kind {
                QuantKind::Q8_0 => {
                    for (i, v) in dst.iter_mut().enumerate() {
                        *v = d * (rec[q8_index(lane, i)] as i32 - 128) as f32;
                    }
                }
                QuantKind::Q4_1 => {
                    let m = get_f16(rec, LANES + lane);
                    for (i, v) in dst.iter_mut().enumerate() {
                        let (at, shift) = q4_index(lane, i);
                        *v = d * ((rec[at] >> shift) & 15) as f32 + m;
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
        tasks.into_par_iter().for_each(|(i, g0, g1)| {
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

    /// Whether this CPU can run it (checked once, cached by std).
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Kernel::Avx512Vnni => {
                    has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("f16c")
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

/// Where weight `i` of lane `lane` sits in a 4-bit record: step `i / 8` covers 8 weights,
/// the first 4 in the low nibbles of the lane's 4 bytes, the next 4 in the high ones (one
/// mask and one shift give two vectors of `vpdpbusd` operands). Returns (byte, shift).
fn q4_index(lane: usize, i: usize) -> (usize, u32) {
    let (step, r) = (i / 8, i % 8);
    (
        QuantKind::Q4_1.quants_at() + step * 64 + lane * 4 + r % 4,
        if r < 4 { 0 } else { 4 },
    )
}

fn put_f16(rec: &mut [u8], slot: usize, v: half::f16) {
    rec[2 * slot..2 * slot + 2].copy_from_slice(&v.to_le_bytes());
}

fn get_f16(rec: &[u8], slot: usize) -> f32 {
    half::f16::from_le_bytes([rec[2 * slot], rec[2 * slot + 1]]).to_f32()
}

/// The activations of one product, quantized to 8 bits per group of 32, with per-group
/// floats the kernels need: `scale[r][b]` (the group's f32 scale) and `offset[r][b]` (for
/// 8-bit weights stored as `q + 128`: `-128 · Σq_x · scale`; for 4-bit: `Σq_x · scale`,
/// which the weight's minimum multiplies), and `sum[r][b]` (`Σq_x` itself: the AVX2 kernel
/// multiplies signed 8-bit weights and adds the `+128` back in integers).
struct Activations {
    /// m x k, rows padded to whole groups (k is).
    q: Vec<i8>,
    scale: Vec<f32>,
    offset: Vec<f32>,
    sum: Vec<i32>,
    blocks: usize,
}

/// One activation row's buffers as the zipped iterators hand them out: its index, its
/// quantized values, and its groups' scales, offsets and sums.
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
        let mut q = vec![0i8; m * k];
        let mut scale = vec![0f32; m * blocks];
        let mut offset = vec![0f32; m * blocks];
        let mut sums = vec![0i32; m * blocks];
        let row = |(r, (((qr, sr), or), nr)): ActivationRow| {
            for b in 0..blocks {
                let src: &[f32; GROUP] = x[r * k + b * GROUP..r * k + (b + 1) * GROUP]
                    .try_into()
                    .unwrap();
                let dst: &mut [i8; GROUP] =
                    (&mut qr[b * GROUP..(b + 1) * GROUP]).try_into().unwrap();
                let (d, sum) = match kernel {
                    // SAFETY (both): the caller checked `kernel.available()`, which implies
                    // AVX-512F/BW, resp. AVX2.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512Vnni => unsafe { avx512::quantize_group(src, dst) },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => unsafe { avx2::quantize_group(src, dst) },
                    _ => quantize_group(src, dst),
                };
                sr[b] = d;
                nr[b] = sum;
                or[b] = match kind {
                    QuantKind::Q8_0 => -128.0 * sum as f32 * d,
                    QuantKind::Q4_1 => sum as f32 * d,
                };
            }
        };
        // A few rows (decoding) are a few microseconds of work: a parallel loop would cost
        // more than it saves.
        if m <= MR {
            q.chunks_mut(k)
                .zip(scale.chunks_mut(blocks))
                .zip(offset.chunks_mut(blocks))
                .zip(sums.chunks_mut(blocks))
                .enumerate()
                .for_each(row);
        } else {
            q.par_chunks_mut(k)
                .zip(scale.par_chunks_mut(blocks))
                .zip(offset.par_chunks_mut(blocks))
                .zip(sums.par_chunks_mut(blocks))
                .enumerate()
                .for_each(row);
        }
        Self {
            q,
            scale,
            offset,
            sum: sums,
            blocks,
        }
    }
}

/// One group of activations to 8 bits: `d = max|x| / 127`, `q = x · (1 / d)` rounded half
/// to even (what the SIMD conversion does); returns (d, Σq).
fn quantize_group(src: &[f32; GROUP], dst: &mut [i8; GROUP]) -> (f32, i32) {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    // Adding and removing 1.5 * 2^23 rounds half to even for |y| < 2^22 (here |y| <= 127):
    // the same rounding as the vector conversion, without a libm call per value.
    const MAGIC: f32 = 12_582_912.0;
    let mut sum = 0;
    for (q, &v) in dst.iter_mut().zip(src) {
        let y = ((v * id + MAGIC) - MAGIC).clamp(-127.0, 127.0);
        *q = y as i8;
        sum += *q as i32;
    }
    (d, sum)
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
                    QuantKind::Q4_1 => {
                        let isum: i32 = (0..GROUP)
                            .map(|i| {
                                let (at, shift) = q4_index(lane, i);
                                ((rec[at] >> shift) & 15) as i32 * xq[i] as i32
                            })
                            .sum();
                        let t = isum as f32 * dx;
                        *a = d.mul_add(t, *a);
                        *a = get_f16(rec, LANES + lane).mul_add(off, *a);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Activations, QWeight, QuantKind, GROUP, LANES, MR};
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
        match (w.kind, mr) {
            (QuantKind::Q8_0, 1) => run::<1, false>(w, act, g, r0, acc),
            (QuantKind::Q8_0, 2) => run::<2, false>(w, act, g, r0, acc),
            (QuantKind::Q8_0, 3) => run::<3, false>(w, act, g, r0, acc),
            (QuantKind::Q8_0, _) => run::<4, false>(w, act, g, r0, acc),
            (QuantKind::Q4_1, 1) => run::<1, true>(w, act, g, r0, acc),
            (QuantKind::Q4_1, 2) => run::<2, true>(w, act, g, r0, acc),
            (QuantKind::Q4_1, 3) => run::<3, true>(w, act, g, r0, acc),
            (QuantKind::Q4_1, _) => run::<4, true>(w, act, g, r0, acc),
        }
    }

    /// [`super::quantize_group`] on 16 lanes: the same numbers.
    ///
    /// # Safety
    /// AVX-512F and BW must be present.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_group(src: &[f32; GROUP], dst: &mut [i8; GROUP]) -> (f32, i32) {
        let a = _mm512_loadu_ps(src.as_ptr());
        let b = _mm512_loadu_ps(src.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
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
        (d, _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)))
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
        for b in 0..blocks {
            let rec = base.add(b * rb);
            // Prefetch a few records ahead: the weight is read once, front to back.
            _mm_prefetch::<_MM_HINT_T0>(rec.add(8 * rb) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(rec.add(8 * rb + 64) as *const i8);
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
    use super::{Activations, QWeight, QuantKind, GROUP, LANES, MR};
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
        match (w.kind, mr) {
            (QuantKind::Q8_0, 1) => run::<1, false>(w, act, g, r0, acc),
            (QuantKind::Q8_0, 2) => run::<2, false>(w, act, g, r0, acc),
            (QuantKind::Q8_0, 3) => run::<3, false>(w, act, g, r0, acc),
            (QuantKind::Q8_0, _) => run::<4, false>(w, act, g, r0, acc),
            (QuantKind::Q4_1, 1) => run::<1, true>(w, act, g, r0, acc),
            (QuantKind::Q4_1, 2) => run::<2, true>(w, act, g, r0, acc),
            (QuantKind::Q4_1, 3) => run::<3, true>(w, act, g, r0, acc),
            (QuantKind::Q4_1, _) => run::<4, true>(w, act, g, r0, acc),
        }
    }

    /// [`super::quantize_group`] on 8 lanes, operation for operation the AVX-512 one: the
    /// same numbers.
    ///
    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_group(src: &[f32; GROUP], dst: &mut [i8; GROUP]) -> (f32, i32) {
        let p = src.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        // |x|: the sign bit cleared.
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
        let a = v.map(|v| _mm256_and_ps(v, abs));
        let m8 = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps::<1>(m8));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
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
        (d, _mm_cvtsi128_si32(s1))
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
        for b in 0..blocks {
            let rec = base.add(b * rb);
            // Prefetch a few records ahead, as the AVX-512 kernel does.
            _mm_prefetch::<_MM_HINT_T0>(rec.add(8 * rb) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(rec.add(8 * rb + 64) as *const i8);
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
                    let xv =
                        act.q[r * k + i] as f64 * act.scale[r * (k / GROUP) + i / GROUP] as f64;
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
    /// definition: both formats; 1 to 7 activation rows (every register-tile height, and
    /// rows left over after whole tiles); outputs that do not fill a record's 16 rows, odd
    /// numbers of 16-row records; one to five groups along the input; with and without bias.
    #[test]
    fn every_kernel_gives_the_same_bits_and_matches_the_definition() {
        let simd = simd_kernels();
        for kind in QuantKind::ALL {
            for &(m, n, k) in &[
                (1, 16, 32),
                (1, 37, 96),
                (2, 48, 64),
                (3, 50, 64),
                (4, 80, 160),
                (5, 33, 128),
                (6, 33, 128),
                (7, 112, 96),
                (9, 16, 32),
            ] {
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
            let k = 96;
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
    /// quantizer never writes but a checkpoint's bytes may hold, and all-ones nibbles)
    /// against activations at ±127 of one sign over whole groups. Scales are kept from a real
    /// quantization, so the sums stay finite.
    #[test]
    fn every_kernel_gives_the_same_bits_at_the_integer_extremes() {
        let simd = simd_kernels();
        let (n, k) = (48, 128);
        let m = 5;
        for kind in QuantKind::ALL {
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
                for rec in bytes.chunks_exact_mut(rb) {
                    for (i, b) in rec[kind.quants_at()..].iter_mut().enumerate() {
                        *b = fill(i);
                    }
                }
                let w = QWeight::from_bytes(kind, n, k, bytes).unwrap();
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
                    x[3 * k + i] = (i as f32 - 60.0) * 0.25;
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

    #[test]
    fn quantization_error_is_within_half_a_step() {
        let (n, k) = (20, 64);
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
        for kind in QuantKind::ALL {
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

    #[test]
    fn stored_bytes_round_trip() {
        let (n, k) = (18, 64);
        let w = weights(n, k, 4);
        for kind in QuantKind::ALL {
            let q = QWeight::quantize(kind, &w, n, k);
            assert_eq!(q.bytes().len(), QWeight::stored_len(kind, n, k));
            let back = QWeight::from_bytes(kind, n, k, q.bytes().to_vec()).unwrap();
            assert_eq!(back.dequantize(), q.dequantize());
            assert!(QWeight::from_bytes(kind, n, k, q.bytes()[1..].to_vec()).is_none());
        }
    }
}
