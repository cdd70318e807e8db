//! CPU fast paths for the few operations where candle's generic CPU kernels cost us most:
//! matmuls with few rows (decoding), the fused LM-head log-softmax of training, and in-place
//! gradient accumulation and optimizer updates, and bf16 training's products and fused ops.
//! Each is used only for contiguous f32 (or, where it says so, bf16 or f16) tensors on the
//! CPU; callers keep a plain tensor-op path for every other case (CUDA, f16 activations), so
//! the numbers are the same function of the inputs either way. The streaming kernels have
//! 512-bit (AVX-512) and 256-bit (AVX2, FMA, F16C) paths; on other CPUs gemm takes them.

pub mod attention;
pub mod bf16dot;
pub mod bf16linear;
pub mod elementwise;
pub mod frozen;
pub mod gemm;
pub mod inplace;
pub mod packed;
pub mod pages;
pub mod quant;
pub mod skinny;
pub mod softmax;
pub mod team;
pub mod workspace;

use candle_core::{Storage, Tensor};

/// Runs `f` on the contiguous data of a CPU tensor of dtype `T`, in place; `None` for any
/// other tensor.
pub fn with_data<T: candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let data = cpu.as_slice::<T>().ok()?;
    let (start, end) = layout.contiguous_offsets()?;
    Some(f(&data[start..end]))
}

/// [`with_data`] over several tensors at once: `f` gets each one's data, in order; `None`
/// if any is not a contiguous CPU tensor of dtype `T`.
pub fn with_data_all<T: candle_core::WithDType, R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> R,
) -> Option<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            return None;
        };
        let (start, end) = layout.contiguous_offsets()?;
        slices.push(&cpu.as_slice::<T>().ok()?[start..end]);
    }
    Some(f(&slices))
}

/// [`with_data`] for f32 data.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    with_data(t, f)
}

/// [`with_data`] for bf16 data.
pub fn with_bf16<R>(t: &Tensor, f: impl FnOnce(&[half::bf16]) -> R) -> Option<R> {
    with_data(t, f)
}

/// [`with_data`] for f16 data.
pub fn with_f16<R>(t: &Tensor, f: impl FnOnce(&[half::f16]) -> R) -> Option<R> {
    with_data(t, f)
}

/// The f32 data a custom op receives, which must be contiguous; `what` names the op.
pub(crate) fn storage_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: input is not contiguous");
    };
    match s {
        candle_core::CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("{what}: input is not f32"),
    }
}

/// The same for the buffer an in-place op writes.
pub(crate) fn storage_f32_mut<'a>(
    s: &'a mut candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: destination is not contiguous");
    };
    match s {
        candle_core::CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("{what}: destination is not f32"),
    }
}

/// Whether `t` is an f32 tensor on the CPU laid out contiguously (and the CPU fast paths
/// are on: see [`cpu_kernels`]).
pub fn is_cpu_f32_contiguous(t: &Tensor) -> bool {
    cpu_kernels()
        && t.device().is_cpu()
        && t.dtype() == candle_core::DType::F32
        && t.is_contiguous()
}

/// Whether the CPU fast paths may run. `MEDVLM_PLAIN_OPS=1` turns every one of them off, so
/// that a CPU run takes the plain tensor-op paths a GPU takes: `medvlm selftest` checks
/// those against transformers on a machine without a GPU.
pub fn cpu_kernels() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MEDVLM_PLAIN_OPS").map_or(true, |v| v.is_empty() || v == "0"))
}

/// Whether the kernels may use AVX-512 (F, BW, BF16, VNNI) where the CPU has it: yes unless
/// `MEDVLM_CPU_ISA=avx2` holds the process to the AVX2 paths a CPU without AVX-512 runs
/// (for comparisons and tests of those paths on an AVX-512 machine; `native` or unset: all
/// the CPU has). Decided once; a value that is neither is reported on stderr and ignored.
pub fn avx512_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| {
        let (allowed, warning) = isa_setting(std::env::var("MEDVLM_CPU_ISA").ok().as_deref());
        if let Some(w) = warning {
            eprintln!("warning: {w}");
        }
        allowed
    })
}

/// [`avx512_allowed`]'s reading of `MEDVLM_CPU_ISA`: whether AVX-512 may run and, for a
/// value it does not know, the warning.
fn isa_setting(value: Option<&str>) -> (bool, Option<String>) {
    match value.map(str::trim) {
        None | Some("" | "native") => (true, None),
        Some("avx2") => (false, None),
        Some(other) => (
            true,
            Some(format!(
                "MEDVLM_CPU_ISA={other} is not avx2 or native; using everything this CPU has"
            )),
        ),
    }
}

/// Whether this CPU runs our AVX-512 kernels (checked once; the answer is cached by std), and
/// [`avx512_allowed`].
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && avx512_allowed()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX2 with FMA and F16C (x86-64 since Haswell / Zen 1): the
/// streaming kernels' 256-bit paths on CPUs without AVX-512, most of the x86 CPUs users
/// have. Cached by std after the first call.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx2") && has!("fma") && has!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Splits `0..len` (rows of a weight, in streaming order) into one contiguous slab per pool
/// thread and runs `f(slab, acc)` for each on its own zeroed accumulator of `acc_len`
/// floats; returns the accumulators, one after the other, for the caller to add up.
/// `packed`'s streaming kernel reads an input-major weight this way: each thread streams
/// its slab front to back once, the pattern prefetchers like best.
pub(crate) fn slab_partials(
    len: usize,
    acc_len: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let tasks = rayon::current_num_threads().clamp(1, len.max(1));
    let slab = len.div_ceil(tasks);
    let mut partial = vec![0f32; tasks * acc_len];
    team::for_each_chunk(&mut partial, acc_len, &|t, acc| {
        f((t * slab).min(len)..((t + 1) * slab).min(len), acc)
    });
    partial
}

/// A raw pointer that may cross into rayon tasks that write disjoint parts of its buffer.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: only used for writes to disjoint index ranges, joined before the buffer is read.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// For a unit test whose SIMD kernel this CPU cannot run (the test then checks the fallback
/// callers take instead): says so in one line on stderr, `what` naming what was skipped and
/// why, so that a pass here is not mistaken for a check of the kernel. With
/// `MEDVLM_REQUIRE_SIMD=1` it panics instead: a CI machine that should have the features
/// cannot skip silently.
#[cfg(test)]
pub(crate) fn skip_or_require(what: &str) {
    if std::env::var("MEDVLM_REQUIRE_SIMD").is_ok_and(|v| v == "1") {
        panic!("MEDVLM_REQUIRE_SIMD=1, but this test would have skipped: {what}");
    }
    // Through the handle, not `eprintln!`: the test harness swallows the macro's output
    // of a passing test, and this line is for exactly those runs.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {what}");
}

/// `x (m x k) · w (n x k)ᵀ (+ bias)` as `Linear::forward` computes it when no kernel takes
/// the product: the weight widened to f32 (exactly), then candle's matmul.
#[cfg(test)]
pub(crate) fn plain_linear<W: skinny::WeightElem>(
    x: &[f32],
    w: &[W],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
) -> Vec<f32> {
    let dev = candle_core::Device::Cpu;
    let x = Tensor::from_slice(&x[..m * k], (m, k), &dev).unwrap();
    let w: Vec<f32> = w[..n * k].iter().map(|v| v.to_f32()).collect();
    let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
    let mut y = x.matmul(&w.t().unwrap()).unwrap();
    if let Some(b) = bias {
        y = y
            .broadcast_add(&Tensor::from_slice(&b[..n], n, &dev).unwrap())
            .unwrap();
    }
    y.flatten_all().unwrap().to_vec1().unwrap()
}

#[cfg(test)]
mod tests {
    use super::isa_setting;

    /// `MEDVLM_CPU_ISA`: avx2 holds back AVX-512, native or nothing allows it, anything
    /// else allows it with a warning naming the value.
    #[test]
    fn the_isa_setting_reads_as_documented() {
        assert_eq!(isa_setting(None), (true, None));
        assert_eq!(isa_setting(Some("")), (true, None));
        assert_eq!(isa_setting(Some("native")), (true, None));
        assert_eq!(isa_setting(Some(" avx2 ")), (false, None));
        let (allowed, warning) = isa_setting(Some("avx512"));
        assert!(allowed);
        assert!(warning
            .unwrap()
            .contains("MEDVLM_CPU_ISA=avx512 is not avx2 or native"));
    }
}
