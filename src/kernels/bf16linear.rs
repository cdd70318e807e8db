//! `x · Wᵀ` for bf16 activations on the CPU, forward and backward, on AVX-512 BF16 dot
//! products ([`super::bf16dot::matmul`]).
//!
//! Why: candle's CPU matmul has no bf16 kernel; it widens both operands to f32, runs the f32
//! gemm and rounds the result, and a bf16 run over f32 master weights adds a cast of every
//! weight per use and its gradient's cast back. This op takes the weight as it is stored
//! (f32 masters, rounded to bf16 while packed; a bf16 base as it is) and rounds exactly where
//! PyTorch's bf16 matmul (and autocast) does: the inputs to bf16, sums in f32, the output to
//! bf16; in the backward pass `dx = dy · W` and `dW = dyᵀ · x` likewise, `dW` rounded to bf16
//! before it reaches an f32 master (autocast's bf16 weight copy receives it in bf16). The
//! values are those of the plain ops up to the order of the f32 sums. The cast copy of the
//! weight is not kept for the backward pass: it is rounded again from the master there.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use super::bf16dot::{self, Elems, Operand};

struct Bf16Linear {
    /// Whether the weight's gradient is wanted (a trained weight, not a frozen base).
    weight_grad: bool,
}

/// The contiguous elements of a CPU tensor's storage, f32 or bf16.
fn elems<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Elems<'a>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("bf16-linear: {what} is not contiguous");
    };
    Ok(match s {
        CpuStorage::F32(v) => Elems::F32(&v[start..end]),
        CpuStorage::BF16(v) => Elems::Bf16(&v[start..end]),
        _ => candle_core::bail!("bf16-linear: {what} must be f32 or bf16"),
    })
}

/// `a · b` rounded to bf16 (the CPU has AVX-512 BF16: [`applies`] checked it).
fn product(a: Operand, b: Operand, dims: (usize, usize, usize)) -> Result<Vec<bf16>> {
    let (m, _, n) = dims;
    let mut out = vec![0f32; m * n];
    if !bf16dot::matmul(a, b, dims, &mut out) {
        candle_core::bail!("bf16-linear: this CPU lacks AVX-512 BF16");
    }
    Ok(out.iter().map(|&v| bf16::from_f32(v)).collect())
}

/// Runs `f` on the contiguous elements of a CPU tensor.
fn with_elems<R>(t: &Tensor, what: &str, f: impl FnOnce(Elems) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else {
        candle_core::bail!("bf16-linear: {what} is not on the CPU");
    };
    f(elems(s, l, what)?)
}

impl CustomOp2 for Bf16Linear {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, wk) = wl.shape().dims2()?;
        if wk != k {
            candle_core::bail!("bf16-linear: input ({m}, {k}) for a weight ({n}, {wk})");
        }
        let x = elems(xs, xl, "input")?;
        let w = elems(ws, wl, "weight")?;
        // W is stored (n x k): its transpose is the right factor.
        let y = product(Operand::rows(x), Operand::rows(w).t(), (m, k, n))?;
        Ok((CpuStorage::BF16(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let n = w.dim(0)?;
        let dev = x.device();
        let g = g.to_dtype(DType::BF16)?;
        let (dx, dw) = with_elems(&g, "gradient", |gs| {
            let gs = Operand::rows(gs);
            // dx (m x k) = dy (m x n) · W (n x k).
            let dx = with_elems(w, "weight", |ws| product(gs, Operand::rows(ws), (m, n, k)))?;
            // dW (n x k) = dyᵀ (n x m) · x (m x k).
            let dw = if self.weight_grad {
                Some(with_elems(x, "input", |xs| {
                    product(gs.t(), Operand::rows(xs), (n, m, k))
                })?)
            } else {
                None
            };
            Ok((dx, dw))
        })?;
        let dx = Tensor::from_vec(dx, (m, k), dev)?.to_dtype(x.dtype())?;
        let dw = match dw {
            Some(dw) => Some(Tensor::from_vec(dw, (n, k), dev)?.to_dtype(w.dtype())?),
            None => None,
        };
        Ok((Some(dx), dw))
    }
}

/// Whether [`linear`] should replace the plain ops: bf16 activations (2-D) against an f32
/// or bf16 weight stored (out, in) on a CPU with AVX-512 BF16.
pub fn applies(x: &Tensor, weight: &Tensor) -> bool {
    super::cpu_kernels()
        && bf16dot::available()
        && x.dtype() == DType::BF16
        && matches!(weight.dtype(), DType::F32 | DType::BF16)
        && x.device().is_cpu()
        && weight.device().is_cpu()
        && x.rank() == 2
        && weight.rank() == 2
        && weight.is_contiguous()
}

/// `x (m x k) · weightᵀ`, `weight` (n x k), rounded to bf16 (see the module's comment).
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let op = Bf16Linear {
        weight_grad: weight.is_variable() || weight.track_op(),
    };
    x.contiguous()?.apply_op2(weight, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Output, input gradient and weight gradient equal their definitions: bf16 inputs,
    /// f64 sums of exact products, one rounding to bf16 (within a bf16 step, for the order of
    /// the kernel's f32 sums); a frozen weight gets no gradient.
    #[test]
    fn value_and_gradients_match_their_definitions() {
        if !bf16dot::available() || !crate::kernels::cpu_kernels() {
            crate::kernels::skip_or_require("bf16-linear (no AVX-512 BF16, or plain ops)");
            return;
        }
        let dev = Device::Cpu;
        let (m, k, n) = (19, 70, 37);
        let xv: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let wv: Vec<f32> = (0..n * k)
            .map(|i| (i as f32 * 0.23).cos() * 1.001)
            .collect();
        let cv: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.11).sin()).collect();
        let x = Var::from_tensor(
            &Tensor::from_vec(xv.clone(), (m, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        let w = Var::from_tensor(&Tensor::from_vec(wv.clone(), (n, k), &dev).unwrap()).unwrap();
        assert!(applies(x.as_tensor(), w.as_tensor()));
        let y = linear(x.as_tensor(), w.as_tensor()).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let c = Tensor::from_vec(cv.clone(), (m, n), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let grads = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let r = |v: f32| bf16::from_f32(v).to_f32() as f64;
        let close = |got: f32, want: f64, what: &str| {
            let want = bf16::from_f64(want).to_f64();
            assert!(
                (got as f64 - want).abs() <= want.abs() * 2f64.powi(-7) + 1e-6,
                "{what}: {got} vs {want}"
            );
        };
        let y: Vec<f32> = y
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..m {
            for j in 0..n {
                let want = (0..k).map(|p| r(xv[i * k + p]) * r(wv[j * k + p])).sum();
                close(y[i * n + j], want, &format!("y[{i},{j}]"));
            }
        }
        let dx: Vec<f32> = grads
            .get(x.as_tensor())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..m {
            for p in 0..k {
                let want = (0..n).map(|j| r(cv[i * n + j]) * r(wv[j * k + p])).sum();
                close(dx[i * k + p], want, &format!("dx[{i},{p}]"));
            }
        }
        let dw = grads.get(w.as_tensor()).unwrap();
        assert_eq!(dw.dtype(), DType::F32);
        let dw: Vec<f32> = dw.flatten_all().unwrap().to_vec1().unwrap();
        for j in 0..n {
            for p in 0..k {
                let want = (0..m).map(|i| r(cv[i * n + j]) * r(xv[i * k + p])).sum();
                close(dw[j * k + p], want, &format!("dW[{j},{p}]"));
            }
        }
        // A frozen (plain) weight: only the input's gradient.
        let frozen = w.as_tensor().detach();
        let y = linear(x.as_tensor(), &frozen).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&frozen).is_none());
    }
}
