//! Random weights for a config: benchmarks and freshly initialised tiny models need a
//! Qwen2-VL without a checkpoint. Matrices are N(0, std), norm scales 1, biases 0, drawn
//! from a seeded generator (candle's CPU generator cannot be seeded), so the same seed and
//! config give the same weights.

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct RandomBackend {
    std: f32,
    rng: Mutex<StdRng>,
}

impl RandomBackend {
    fn normal(&self, n: usize) -> Vec<f32> {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            // Box-Muller: two uniforms, two normals.
            let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
            let u2: f32 = rng.random();
            let r = (-2.0 * u1.ln()).sqrt() * self.std;
            let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
            out.push(r * c);
            out.push(r * s);
        }
        out.truncate(n);
        out
    }
}

impl SimpleBackend for RandomBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = if name.ends_with("bias") {
            Tensor::zeros(s, DType::F32, dev)?
        } else if s.rank() == 1 {
            Tensor::ones(s, DType::F32, dev)?
        } else {
            let values = self.normal(s.elem_count());
            if dtype == DType::BF16 && dev.is_cpu() {
                // Rounded straight into a buffer on 2 MB pages, as a checkpoint's bf16
                // weights are read ([`crate::kernels::pages::vec_for_weights`]).
                let mut v = crate::kernels::pages::vec_for_weights(values.len());
                v.extend(values.iter().map(|&x| half::bf16::from_f32(x)));
                return Tensor::from_vec(v, s, dev);
            }
            Tensor::from_vec(values, s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A source of random tensors, drawn in the order they are asked for.
pub fn random_backend(std: f64, seed: u64) -> Box<dyn SimpleBackend> {
    Box::new(RandomBackend {
        std: std as f32,
        rng: Mutex::new(StdRng::seed_from_u64(seed)),
    })
}

/// A variable source that invents every tensor it is asked for.
pub fn random_var_builder(
    std: f64,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(random_backend(std, seed), dtype, device.clone())
}

/// Records the name and shape of every tensor a model asks for, handing out broadcast
/// zeros (which allocate nothing).
struct ShapeRecorder {
    seen: Mutex<Vec<(String, Vec<usize>)>>,
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.iter().any(|(n, _)| n == name) {
            seen.push((name.to_string(), s.dims().to_vec()));
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("a shape is needed for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Every tensor of a model of `config` in the released checkpoint layout, with its shape,
/// in the order the model asks for them (tied embeddings once). Costs no weight memory.
pub fn tensor_shapes(config: &crate::model::Qwen2VlConfig) -> anyhow::Result<TensorShapes> {
    Ok(shape_only(config)?.1)
}

/// Tensor names with their shapes, in the order a model asked for them.
pub type TensorShapes = Vec<(String, Vec<usize>)>;

/// A model of `config` whose every weight is a broadcast zero (no weight memory), in the
/// released checkpoint layout, and the tensors it asked for (name and shape, in order).
pub fn shape_only(
    config: &crate::model::Qwen2VlConfig,
) -> anyhow::Result<(crate::model::Qwen2Vl, TensorShapes)> {
    let rec = std::sync::Arc::new(ShapeRecorder {
        seen: Mutex::new(Vec::new()),
    });
    struct Shared(std::sync::Arc<ShapeRecorder>);
    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            name: &str,
            h: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> Result<Tensor> {
            self.0.get(s, name, h, dtype, dev)
        }
        fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
            self.0.get_unchecked(name, dtype, dev)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.0.contains_tensor(name)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(rec.clone())), DType::F32, Device::Cpu);
    let model = crate::model::Qwen2Vl::from_var_builder(
        vb,
        config.arch.released_layout(),
        config.clone(),
        DType::F32,
        &Device::Cpu,
    )?;
    let seen = std::mem::take(&mut *rec.seen.lock().unwrap_or_else(|e| e.into_inner()));
    Ok((model, seen))
}
