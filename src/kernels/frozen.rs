//! `x · Wᵀ` against a frozen weight stored in another dtype than the computation (a LoRA
//! base kept in bf16 under f32 compute), without keeping the cast copy for the backward pass.
//!
//! Written as plain candle ops, `x.matmul(W.to_dtype(f32).t())` records the f32 copy of W as
//! an input of the matmul, so every layer whose input needs a gradient keeps its weights a
//! second time, in f32, until the backward pass: for a 2B base that is 8.8 GB, more than the
//! bf16 base itself. This op holds only the stored weight (shared, no copy) and casts it
//! again in the backward pass, where `dx = dy · W` is the only gradient (W is frozen).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

struct FrozenLinear {
    /// (out, in), as stored.
    weight: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = xl.contiguous_offsets() else {
            candle_core::bail!("frozen-linear: input is not contiguous");
        };
        let dev = candle_core::Device::Cpu;
        let x = match xs {
            CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], xl.shape(), &dev)?,
            CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], xl.shape(), &dev)?,
            CpuStorage::F16(v) => Tensor::from_slice(&v[start..end], xl.shape(), &dev)?,
            _ => candle_core::bail!("frozen-linear: input must be a float tensor"),
        };
        // The same product the plain ops compute (cast, then candle's matmul): results stay
        // bit for bit what they were, and a checkpointed layer replays exactly.
        let y = x.matmul(&self.weight.to_dtype(x.dtype())?.t()?)?;
        let shape = y.shape().clone();
        let y = y.flatten_all()?;
        let out = match y.dtype() {
            DType::F32 => CpuStorage::F32(y.to_vec1()?),
            DType::BF16 => CpuStorage::BF16(y.to_vec1()?),
            DType::F16 => CpuStorage::F16(y.to_vec1()?),
            d => candle_core::bail!("frozen-linear: unexpected dtype {d:?}"),
        };
        Ok((out, shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight.to_dtype(grad.dtype())?)?))
    }
}

/// Whether [`linear`] should replace the plain ops: a frozen CPU weight in another dtype than
/// a 2-D input that is part of a gradient graph.
pub fn applies(x: &Tensor, weight: &Tensor) -> bool {
    super::cpu_kernels()
        && x.track_op()
        && !weight.is_variable()
        && !weight.track_op()
        && weight.dtype() != x.dtype()
        && x.device().is_cpu()
        && weight.device().is_cpu()
        && x.rank() == 2
}

/// `x (m x k) · weightᵀ` with `weight` (n x k) frozen.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1_arc(std::sync::Arc::new(Box::new(FrozenLinear {
            weight: weight.clone(),
        })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Value and input gradient equal the plain ops' (cast, matmul) bit for bit.
    #[test]
    fn matches_the_plain_ops_and_their_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (7, 5), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap()).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
        assert!(applies(x.as_tensor(), &w));
        let y = linear(x.as_tensor(), &w).unwrap();
        let plain = x
            .as_tensor()
            .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
            .unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), plain.to_vec2::<f32>().unwrap());
        let g1 = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (plain * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(
            g1.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
            g2.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
        );
    }
}
