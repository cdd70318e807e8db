//! The small building blocks both towers share.
//!
//! The same code serves inference and training, so every op here must carry gradients:
//! candle's own fused `rms_norm`, `layer_norm` and rotary kernels cut the autograd graph
//! silently (see CANDLE-TRAINING-NOTES). For f32 and bf16 on the CPU, norms, rotary
//! embeddings and gated activations run as our fused ops with hand-written backward passes
//! ([`crate::kernels::elementwise`], bf16 widened to f32 inside them), and bf16 linear layers
//! on AVX-512 BF16 dot products ([`crate::kernels::bf16linear`]); elsewhere (CUDA, f16,
//! `MEDVLM_PLAIN_OPS`) they are composed from primitive tensor ops, upcasting as transformers
//! does. Softmax picks candle's fused kernel only when
//! no gradient is being tracked.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::Activation;
use super::lora::{cast, Lora};
use crate::kernels::elementwise;
use crate::kernels::quant::{QWeight, QuantKind};

/// The precision reductions and softmaxes run in: f32, or f64 for an f64 model (transformers
/// upcasts half precision to f32 for norms, rotary tables and attention probabilities).
pub fn upcast(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// How a forward pass runs: what candle's `forward_t(xs, train)` says with a bool, with the
/// two things training changes here spelt out. Every layer that has a linear layer in it
/// takes one, so what a `Linear` computes depends on its arguments only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Inference (and passes no gradient will follow): no dropout; a few rows without a
    /// gradient graph take the streaming kernels ([`crate::kernels::skinny`]).
    #[default]
    Infer,
    /// A pass whose gradient is taken. Every product runs on the same kernel whether its
    /// input is tracked or (under gradient checkpointing) not, so a layer run again in the
    /// backward pass reproduces its forward pass bit for bit. LoRA adapters drop their
    /// input with masks drawn from `dropout` (`None`: no dropout), a key that depends on the
    /// run's seed, step and pass only (see [`super::lora`]).
    Train { dropout: Option<u64> },
}

impl Mode {
    /// The dropout key in force, if any.
    pub fn dropout(self) -> Option<u64> {
        match self {
            Mode::Infer => None,
            Mode::Train { dropout } => dropout,
        }
    }
}

/// A linear layer loaded from `{prefix}.weight` (and `{prefix}.bias` when `bias`), named by
/// `prefix`.
pub fn linear(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(w, b).named(vb.prefix()))
}

/// `x · Wᵀ + b` over the last axis of `x`, multiplied as one 2-D matrix product whatever the
/// leading axes: candle's `Linear` broadcasts the weight over a 3-D batch, which in training
/// makes a weight-sized gradient per batch entry and sums them afterwards. Without a graph,
/// a handful of rows on an AVX-512 CPU (decoding) take [`crate::kernels::skinny`].
///
/// The weight may be stored in another dtype than the activations (a frozen bf16 base under
/// f32 compute, f32 master weights under bf16 compute): it is cast for each use. A LoRA
/// adapter, when attached, adds its low-rank update. For inference the weight may instead
/// be quantized ([`Self::quantize`]).
#[derive(Debug, Clone)]
pub struct Linear {
    /// (out, in). For a quantized layer only a placeholder of that shape (a single zero
    /// broadcast, no memory): the weight lives in `quant`.
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<Lora>,
    /// The weight quantized for inference (shared by clones: a model's copies for
    /// several servers' workers cost nothing).
    quant: Option<std::sync::Arc<QWeight>>,
    /// A bf16 weight kept as it is stored, (out, in), for the bf16 inference kernels
    /// ([`Self::pack_for_inference`]): f32 activations are rounded to bf16 inside the
    /// products, as `--dtype bf16` inference defines them.
    bf16_rows: bool,
    /// The module path it was loaded from, in the checkpoint's own layout (empty when built
    /// directly): the one place a layer's name is written.
    name: String,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
            quant: None,
            bf16_rows: false,
            name: String::new(),
        }
    }

    /// The same layer under the module path `name`.
    pub fn named(self, name: String) -> Self {
        Self { name, ..self }
    }

    /// The module path it was loaded from, in the checkpoint's layout
    /// (`model.layers.3.self_attn.q_proj`); [`crate::model::WeightLayout::module_path`]
    /// turns it into transformers' current name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// (out, in).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    pub fn set_lora(&mut self, lora: Option<Lora>) {
        self.lora = lora;
    }

    /// The quantized weight, when the layer is quantized.
    pub fn quantized(&self) -> Option<&QWeight> {
        self.quant.as_deref()
    }

    /// Quantizes the weight for inference and frees the dense copy; returns whether it was
    /// (in the format [`QuantKind::for_width`] gives its input width; without one it stays
    /// as it is). Merge adapters first.
    pub fn quantize(&mut self, kind: QuantKind) -> Result<bool> {
        if self.quant.is_some() {
            candle_core::bail!("linear {}: already quantized", self.name);
        }
        let (n, k) = self.weight.dims2()?;
        let Some(kind) = kind.for_width(k).filter(|_| self.weight.device().is_cpu()) else {
            return Ok(false);
        };
        let w = self
            .weight
            .to_dtype(DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        self.set_quantized(QWeight::quantize(kind, &w, n, k))?;
        Ok(true)
    }

    /// Installs an already quantized weight (a saved quantized checkpoint) of this layer's
    /// shape, dropping the dense one.
    pub fn set_quantized(&mut self, q: QWeight) -> Result<()> {
        let (n, k) = self.weight.dims2()?;
        if q.dims() != (n, k) {
            candle_core::bail!(
                "linear {}: quantized weight {:?} for a ({n}, {k}) layer",
                self.name,
                q.dims()
            );
        }
        self.weight = placeholder(n, k, self.weight.dtype())?;
        self.quant = Some(std::sync::Arc::new(q));
        Ok(())
    }

    /// Folds the adapter into the weight (`W + s B A`, in the weight's dtype) and drops it.
    pub fn merge_lora(&mut self) -> Result<()> {
        if self.quant.is_some() && self.lora.is_some() {
            candle_core::bail!(
                "linear {}: cannot merge an adapter into a quantized weight (merge, then quantize)",
                self.name
            );
        }
        if let Some(l) = self.lora.take() {
            let w = (self.weight.to_dtype(DType::F32)? + l.dense()?)?;
            // An f16 weight is only ever one an f32 model kept in its stored precision
            // (`Qwen2Vl::load_for_inference`): the merged weight is that model's, in f32, as
            // it would be had the layer been loaded in f32.
            let dtype = match self.weight.dtype() {
                DType::F16 => DType::F32,
                d => d,
            };
            self.weight = w.to_dtype(dtype)?;
        }
        Ok(())
    }

    /// Replaces the weight (same shape), e.g. by a copy in another dtype.
    pub fn map_weight(&mut self, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<()> {
        if self.quant.is_some() {
            candle_core::bail!("linear {}: the weight is quantized", self.name);
        }
        let w = f(&self.weight)?;
        if w.dims() != self.weight.dims() {
            candle_core::bail!(
                "linear: new weight {:?} for {:?}",
                w.dims(),
                self.weight.dims()
            );
        }
        self.weight = w;
        Ok(())
    }

    /// Readies the weight for inference on the CPU. An f32 weight is stored input-major,
    /// (in, out) row-major: every product then reads it as gemm's contiguous right-hand
    /// side (see [`crate::kernels::packed`]); `weight()` still has shape (out, in), as a
    /// transposed view. A bf16 weight on a CPU with AVX-512 BF16 stays (out, in), the
    /// layout whose rows [`crate::kernels::bf16dot::rows`] streams fastest when decoding,
    /// and is marked for the bf16 kernels (f32 activations rounded to bf16 inside the
    /// products); elsewhere it is stored input-major too and widened as it is read, as an
    /// f16 weight always is (kept in f16 by [`super::Qwen2Vl::load_for_inference`]). Only
    /// CPU weights outside any gradient graph are touched; returns whether this one was.
    /// Training must not call this: the optimizer updates the (out, in) variables in place.
    pub fn pack_for_inference(&mut self) -> Result<bool> {
        let w = &self.weight;
        let packable = self.quant.is_none()
            && crate::kernels::cpu_kernels()
            && w.device().is_cpu()
            && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16)
            && w.rank() == 2
            && w.is_contiguous()
            && !w.is_variable()
            && !w.track_op();
        if !packable {
            return Ok(false);
        }
        if w.dtype() == DType::BF16 && crate::kernels::bf16dot::available() {
            self.bf16_rows = true;
        } else {
            self.weight = input_major(w)?;
        }
        Ok(true)
    }

    /// Whether the weight is marked for the bf16 inference kernels and still as they read
    /// it: bf16, contiguous, on the CPU, outside any gradient graph.
    fn on_bf16_rows(&self) -> bool {
        let w = &self.weight;
        self.bf16_rows
            && w.dtype() == DType::BF16
            && w.device().is_cpu()
            && w.is_contiguous()
            && !w.track_op()
    }

    /// The product on the bf16 inference kernels, for a weight marked for them
    /// ([`Self::pack_for_inference`]) and f32 activations outside any gradient graph.
    fn bf16_rows(&self, x: &Tensor, m: usize, k: usize) -> Result<Option<Tensor>> {
        use crate::kernels::{bf16dot, is_cpu_f32_contiguous, with_bf16, with_f32};
        let w = &self.weight;
        if !self.on_bf16_rows() || x.track_op() || !is_cpu_f32_contiguous(x) {
            return Ok(None);
        }
        let n = w.dim(0)?;
        let bias = self.bias_f32()?;
        let mut out = vec![0f32; m * n];
        let done = with_f32(x, |xs| {
            with_bf16(w, |ws| {
                bf16dot::linear(xs, ws, bias.as_deref(), (m, k, n), &mut out)
            })
        })
        .flatten()
        .unwrap_or(false);
        if !done {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(out, (m, n), x.device())?))
    }

    /// The product against an input-major weight ([`Self::pack_for_inference`]), when the
    /// weight is stored so and no gradient is tracked.
    fn packed(&self, x: &Tensor, m: usize, k: usize) -> Result<Option<Tensor>> {
        use crate::kernels::{is_cpu_f32_contiguous, packed, with_bf16, with_f16, with_f32};
        let w = &self.weight;
        if !matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16)
            || !w.device().is_cpu()
            || w.is_contiguous()
            || x.track_op()
            || w.track_op()
            || !is_cpu_f32_contiguous(x)
        {
            return Ok(None);
        }
        let wt = w.t()?;
        if !wt.is_contiguous() {
            return Ok(None);
        }
        let n = w.dim(0)?;
        let bias = self.bias_f32()?;
        let mut out = vec![0f32; m * n];
        let done = with_f32(x, |xs| {
            let (b, o) = (bias.as_deref(), &mut out);
            match wt.dtype() {
                DType::F32 => with_f32(&wt, |ws| packed::linear(xs, ws, b, (m, k, n), o)),
                DType::BF16 => with_bf16(&wt, |ws| packed::linear(xs, ws, b, (m, k, n), o)),
                _ => with_f16(&wt, |ws| packed::linear(xs, ws, b, (m, k, n), o)),
            }
        })
        .flatten();
        if done.is_none() {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(out, (m, n), x.device())?))
    }

    /// The skinny kernel's product, when it applies (inference only: see [`Mode::Train`]).
    fn few_rows(&self, x: &Tensor, m: usize, k: usize, mode: Mode) -> Result<Option<Tensor>> {
        use crate::kernels::{is_cpu_f32_contiguous, skinny, with_bf16, with_f32};
        enum WeightSlice<'a> {
            F32(&'a [f32]),
            Bf16(&'a [half::bf16]),
        }
        let n = self.weight.dim(0)?;
        let w = &self.weight;
        let usable = m <= skinny::MAX_ROWS
            && mode == Mode::Infer
            && !x.track_op()
            && !w.track_op()
            && is_cpu_f32_contiguous(x)
            && w.device().is_cpu()
            && w.is_contiguous()
            && matches!(w.dtype(), DType::F32 | DType::BF16)
            && self
                .bias
                .as_ref()
                .is_none_or(|b| b.device().is_cpu() && b.is_contiguous());
        if !usable {
            return Ok(None);
        }
        // A bias in another dtype than f32 is small: cast it.
        let bias = match &self.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?),
            None => None,
        };
        let mut out = vec![0f32; m * n];
        let mut run = |ws: WeightSlice| {
            with_f32(x, |xs| {
                let bs = bias.as_ref().map(|b| with_f32(b, |bs| bs.to_vec()));
                let bs = match bs {
                    Some(Some(v)) => Some(v),
                    Some(None) => return false,
                    None => None,
                };
                match ws {
                    WeightSlice::F32(ws) => {
                        skinny::linear(xs, ws, bs.as_deref(), (m, k, n), &mut out)
                    }
                    WeightSlice::Bf16(ws) => {
                        skinny::linear(xs, ws, bs.as_deref(), (m, k, n), &mut out)
                    }
                }
            })
            .unwrap_or(false)
        };
        let done = if w.dtype() == DType::F32 {
            with_f32(w, |ws| run(WeightSlice::F32(ws))).unwrap_or(false)
        } else {
            with_bf16(w, |ws| run(WeightSlice::Bf16(ws))).unwrap_or(false)
        };
        if !done {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(out, (m, n), x.device())?))
    }
}

/// A contiguous CPU (out, in) weight stored input-major, (in, out) row-major, returned as
/// its (out, in) transposed view: the copy on 2 MB pages where the OS allows
/// ([`crate::kernels::pages::transposed_for_weights`]), as decoding streams it.
pub(crate) fn input_major(w: &Tensor) -> Result<Tensor> {
    fn go<T: candle_core::WithDType>(w: &Tensor) -> Result<Option<Tensor>> {
        let (n, k) = w.dims2()?;
        crate::kernels::with_data(w, |src: &[T]| {
            let v = crate::kernels::pages::transposed_for_weights(src, n, k);
            Tensor::from_vec(v, (k, n), w.device())?.t()
        })
        .transpose()
    }
    let t = match w.dtype() {
        DType::F32 => go::<f32>(w)?,
        DType::BF16 => go::<half::bf16>(w)?,
        DType::F16 => go::<half::f16>(w)?,
        _ => None,
    };
    match t {
        Some(t) => Ok(t),
        None => w.t()?.contiguous()?.t(),
    }
}

impl Linear {
    /// `x · Wᵀ + b` (plus the adapter's update) in `mode`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("linear: a scalar input");
        };
        let m: usize = lead.iter().product();
        let x2 = x.reshape((m, k))?;
        if let Some(q) = &self.quant {
            return self.quantized_forward(q, &x2, lead, mode);
        }
        let fast = match self.bf16_rows(&x2, m, k)? {
            Some(y) => Some(y),
            None => match self.packed(&x2, m, k)? {
                Some(y) => Some(y),
                None => self.few_rows(&x2, m, k, mode)?,
            },
        };
        let y = match fast {
            Some(y) => y,
            None => {
                let y = if crate::kernels::bf16linear::applies(&x2, &self.weight) {
                    crate::kernels::bf16linear::linear(&x2, &self.weight)?
                } else if crate::kernels::frozen::applies(&x2, &self.weight) {
                    crate::kernels::frozen::linear(&x2, &self.weight)?
                } else {
                    x2.matmul(&cast(&self.weight, x.dtype())?.t()?)?
                };
                match &self.bias {
                    Some(b) => y.broadcast_add(&cast(b, x.dtype())?)?,
                    None => y,
                }
            }
        };
        let y = match &self.lora {
            Some(l) => (y + l.delta(&x2, mode.dropout())?)?,
            None => y,
        };
        let mut out = lead.to_vec();
        out.push(self.weight.dim(0)?);
        y.reshape(out)
    }
}

impl Linear {
    /// Several layers of the same input (q/k/v, gate/up) applied to `x`: one call into the
    /// quantized kernels when they are all quantized alike (the activations quantized once,
    /// one parallel loop; see [`QWeight::matmul_shared`]), else each layer's `forward`.
    /// The results are the same either way.
    pub fn forward_shared(layers: &[&Linear], x: &Tensor, mode: Mode) -> Result<Vec<Tensor>> {
        if let Some(ys) = Self::bf16_rows_shared(layers, x)? {
            return Ok(ys);
        }
        let quants: Option<Vec<&QWeight>> = layers
            .iter()
            .map(|l| l.quant.as_deref().filter(|_| l.lora.is_none()))
            .collect();
        let shared = quants.filter(|q| {
            q.len() > 1
                && q.iter()
                    .all(|w| w.kind() == q[0].kind() && w.dims().1 == q[0].dims().1)
        });
        let Some(quants) = shared else {
            return layers.iter().map(|l| l.forward(x, mode)).collect();
        };
        if x.track_op() || matches!(mode, Mode::Train { .. }) {
            candle_core::bail!(
                "linear {}: a quantized layer cannot be trained",
                layers[0].name
            );
        }
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("linear: a scalar input");
        };
        let m: usize = lead.iter().product();
        let xs = x
            .reshape((m, k))?
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .contiguous()?;
        let biases = layers
            .iter()
            .map(|l| l.bias_f32())
            .collect::<Result<Vec<_>>>()?;
        let bias_refs: Vec<Option<&[f32]>> = biases.iter().map(|b| b.as_deref()).collect();
        let mut outs: Vec<Vec<f32>> = quants.iter().map(|w| vec![0f32; m * w.dims().0]).collect();
        let mut out_refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        crate::kernels::with_f32(&xs, |xs| {
            QWeight::matmul_shared(&quants, xs, m, &bias_refs, &mut out_refs)
        })
        .ok_or_else(|| candle_core::Error::Msg("quantized linear: bad input".into()))?;
        outs.into_iter()
            .zip(&quants)
            .map(|(o, w)| {
                let mut shape = lead.to_vec();
                shape.push(w.dims().0);
                Tensor::from_vec(o, (m, w.dims().0), x.device())?
                    .to_dtype(x.dtype())?
                    .reshape(shape)
            })
            .collect()
    }

    /// [`Self::forward_shared`] on the bf16 inference kernels: layers all marked for them
    /// ([`Self::pack_for_inference`]), without adapters, and a few rows of f32 activations
    /// outside any gradient graph (decoding); one call, x rounded once, one parallel loop
    /// ([`crate::kernels::bf16dot::rows_shared`]). None where that does not apply.
    fn bf16_rows_shared(layers: &[&Linear], x: &Tensor) -> Result<Option<Vec<Tensor>>> {
        use crate::kernels::{bf16dot, is_cpu_f32_contiguous, with_data_all, with_f32};
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            return Ok(None);
        };
        let m: usize = lead.iter().product();
        let applies = layers.len() > 1
            && m <= bf16dot::STREAM_ROWS
            && !x.track_op()
            && is_cpu_f32_contiguous(x)
            && layers.iter().all(|l| {
                l.on_bf16_rows()
                    && l.lora.is_none()
                    && l.quant.is_none()
                    && l.weight.dims().get(1) == Some(&k)
            });
        if !applies {
            return Ok(None);
        }
        let biases = layers
            .iter()
            .map(|l| l.bias_f32())
            .collect::<Result<Vec<_>>>()?;
        let ns = layers
            .iter()
            .map(|l| l.weight.dim(0))
            .collect::<Result<Vec<_>>>()?;
        let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| vec![0f32; m * n]).collect();
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let done = with_f32(x, |xs| {
            with_data_all(&weights, |ws: &[&[half::bf16]]| {
                let ws: Vec<bf16dot::RowsWeight> = ws
                    .iter()
                    .zip(&biases)
                    .zip(&ns)
                    .map(|((&w, b), &n)| bf16dot::RowsWeight {
                        w,
                        bias: b.as_deref(),
                        n,
                    })
                    .collect();
                let mut out_refs: Vec<&mut [f32]> =
                    outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                bf16dot::rows_shared(xs, &ws, (m, k), &mut out_refs)
            })
        })
        .flatten()
        .unwrap_or(false);
        if !done {
            return Ok(None);
        }
        outs.into_iter()
            .zip(ns)
            .map(|(o, n)| {
                let mut shape = lead.to_vec();
                shape.push(n);
                Tensor::from_vec(o, (m, n), x.device())?.reshape(shape)
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The bias in f32 on the CPU, for the quantized kernels.
    fn bias_f32(&self) -> Result<Option<Vec<f32>>> {
        self.bias
            .as_ref()
            .map(|b| {
                b.to_dtype(DType::F32)?
                    .to_device(&candle_core::Device::Cpu)?
                    .to_vec1::<f32>()
            })
            .transpose()
    }

    /// The product against the quantized weight (inference only: a quantized layer has no
    /// gradient), in f32 whatever the activations' dtype, returned in it.
    fn quantized_forward(
        &self,
        q: &QWeight,
        x2: &Tensor,
        lead: &[usize],
        mode: Mode,
    ) -> Result<Tensor> {
        if x2.track_op() || matches!(mode, Mode::Train { .. }) {
            candle_core::bail!("linear {}: a quantized layer cannot be trained", self.name);
        }
        let (m, _) = x2.dims2()?;
        let (n, _) = q.dims();
        let xs = x2
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .contiguous()?;
        let bias = self.bias_f32()?;
        let mut out = vec![0f32; m * n];
        crate::kernels::with_f32(&xs, |xs| q.matmul(xs, m, bias.as_deref(), &mut out))
            .ok_or_else(|| candle_core::Error::Msg("quantized linear: bad input".into()))?;
        let y = Tensor::from_vec(out, (m, n), x2.device())?.to_dtype(x2.dtype())?;
        let y = match &self.lora {
            Some(l) => (y + l.delta(x2, None)?)?,
            None => y,
        };
        let mut shape = lead.to_vec();
        shape.push(n);
        y.reshape(shape)
    }
}

/// A tensor of shape (n, k) that holds no memory: one zero broadcast. It stands in for a
/// weight that lives elsewhere (quantized), so that shapes still read as they did.
pub fn placeholder(n: usize, k: usize, dtype: DType) -> Result<Tensor> {
    Tensor::zeros((), dtype, &candle_core::Device::Cpu)?.broadcast_as((n, k))
}

/// Qwen2's RMSNorm: statistics in f32 whatever the compute dtype, as transformers does.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = cast(&self.weight, x.dtype())?;
        if elementwise::applies(&[x, &weight]) {
            return elementwise::rms_norm(x, &weight, self.eps);
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(upcast(dtype))?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        // transformers: weight * hidden.to(input_dtype)
        normed.to_dtype(dtype)?.broadcast_mul(&weight)
    }
}

/// `torch.nn.LayerNorm` with affine weight and bias, statistics in f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Weights stored in bf16 under f32 activations (`--dtype bf16` on the CPU) are cast
        // up (a vector each) so the fused kernel still applies, and bf16 activations run
        // widened: torch too runs the affine part in f32.
        if matches!(x.dtype(), DType::F32 | DType::BF16) {
            let up = upcast(x.dtype());
            let (w, b) = (cast(&self.weight, up)?, cast(&self.bias, up)?);
            if elementwise::applies(&[x, &w, &b]) {
                return elementwise::layer_norm(x, &w, &b, self.eps);
            }
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(upcast(dtype))?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let centered = xf.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        // torch applies the affine part in f32 too before rounding to the input dtype.
        normed
            .broadcast_mul(&self.weight.to_dtype(upcast(dtype))?)?
            .broadcast_add(&self.bias.to_dtype(upcast(dtype))?)?
            .to_dtype(dtype)
    }
}

pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    if elementwise::applies(&[x]) {
        match act {
            Activation::QuickGelu => return elementwise::quick_gelu(x),
            Activation::GeluTanh => return elementwise::gelu_tanh_op(x),
            Activation::Silu | Activation::Gelu => {}
        }
    }
    match act {
        Activation::Silu => x.silu(),
        // x * sigmoid(1.702 x), CLIP's approximation used by the Qwen2-VL vision MLP.
        Activation::QuickGelu => x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
    }
}

/// `act(gate) * up`: SwiGLU (one fused op on CPU f32) and its relatives.
pub fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    if act == Activation::Silu && elementwise::applies(&[gate, up]) {
        return elementwise::swiglu(gate, up);
    }
    activate(gate, act)?.mul(up)
}

/// Softmax over the last dimension in the upcast precision, returned in it.
pub fn softmax_upcast(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(upcast(x.dtype()))?;
    if x.track_op() {
        candle_nn::ops::softmax(&x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

/// `rotate_half` from the rotary-embedding papers: (x1, x2) -> (-x2, x1) over the last dim.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotary embedding of x (b, l, heads, d) with cos, sin (b, l, d) shared by the heads,
/// returned as (b, heads, l, d), contiguous: the layout attention takes.
pub fn rotary_heads_first(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if elementwise::applies(&[x, cos, sin]) {
        return elementwise::rotary(x, cos, sin);
    }
    apply_rotary(&x.transpose(1, 2)?, &cos.unsqueeze(1)?, &sin.unsqueeze(1)?)?.contiguous()
}

/// `x * cos + rotate_half(x) * sin` with cos/sin broadcast over the head axis.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)?
        .add(&rotate_half(x)?.broadcast_mul(sin)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// q/k/v- and gate/up-like layers readied for inference give through
    /// [`Linear::forward_shared`] (one bf16 kernel call when decoding) what each gives alone,
    /// bit for bit, for one and a few rows, with and without bias; an adapter-free bf16 layer
    /// beside an f32 one (not shareable) falls back to the layers' own products.
    #[test]
    fn shared_bf16_layers_give_what_each_gives_alone() {
        let dev = Device::Cpu;
        let k = 96;
        let layer = |n: usize, seed: f32, bias: bool| {
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * seed).sin()).collect();
            let w = Tensor::from_vec(w, (n, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let b = bias.then(|| {
                Tensor::from_vec((0..n).map(|j| j as f32 * 0.01).collect(), n, &dev)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
            });
            let mut l = Linear::new(w, b);
            l.pack_for_inference().unwrap();
            l
        };
        let (q, kk, v) = (
            layer(64, 0.11, true),
            layer(16, 0.23, true),
            layer(16, 0.37, false),
        );
        for rows in [1, 3] {
            let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.07).cos()).collect();
            let x = Tensor::from_vec(x, (1, rows, k), &dev).unwrap();
            let shared = Linear::forward_shared(&[&q, &kk, &v], &x, Mode::Infer).unwrap();
            for (l, got) in [&q, &kk, &v].iter().zip(&shared) {
                let alone = l.forward(&x, Mode::Infer).unwrap();
                assert_eq!(got.dims(), alone.dims());
                let (a, b): (Vec<f32>, Vec<f32>) = (
                    got.flatten_all().unwrap().to_vec1().unwrap(),
                    alone.flatten_all().unwrap().to_vec1().unwrap(),
                );
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{rows} rows: shared {a:?} vs alone {b:?}"
                );
            }
        }
        // One f32 layer among them: each layer's own path.
        let f32_layer = Linear::new(
            Tensor::from_vec(
                (0..16 * k).map(|i| i as f32 * 1e-3).collect(),
                (16, k),
                &dev,
            )
            .unwrap(),
            None,
        );
        let x = Tensor::ones((1, 1, k), DType::F32, &dev).unwrap();
        let ys = Linear::forward_shared(&[&q, &f32_layer], &x, Mode::Infer).unwrap();
        let want: f32 = (0..k).map(|i| i as f32 * 1e-3).sum();
        let got: Vec<f32> = ys[1].flatten_all().unwrap().to_vec1().unwrap();
        assert!((got[0] - want).abs() < 1e-3, "{} vs {want}", got[0]);
    }
}
