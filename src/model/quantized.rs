//! Weight-only quantization of a whole model for inference (`--quantize`, `medvlm
//! quantize`), and quantized checkpoints that load again without quantizing.
//!
//! What is quantized: every linear layer of the decoder and the vision tower whose input
//! width is a whole number of groups of 32 (all of them but the vision patch embedding), in
//! the chosen format where its blocks fit the width ([`QuantKind::for_width`]: q4_k's and
//! q6_k's are 256 wide), and the LM head at 6 bits or more whatever the format
//! ([`head_format`]: q8_0, or q6_k beside the k-quants): the head decides every token and
//! is one matrix (llama.cpp's 4-bit mixes keep it at 6 bits for the same reason; a q4_k
//! head raised q4_k's KL on the tiny-k fixture from 0.22 to 0.30, and q8_0's 35-fold).
//! With tied embeddings the lookups read the quantized head, as llama.cpp does. Norms,
//! biases and the patch embedding stay as they are. Each tensor's format is in the manifest.
//!
//! A quantized checkpoint is the source directory's config and side files, one
//! `model.safetensors` holding every tensor under its usual name (quantized ones as the
//! bytes of [`QWeight`], dtype u8), and [`MANIFEST`] naming the quantized tensors and their
//! formats. transformers cannot read it; medvlm reads it with `--model` as any checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::weights::{expect_shape, TensorReader};
use super::{CheckpointWeights, Qwen2Vl, Qwen2VlConfig};
use crate::kernels::quant::{QWeight, QuantKind};

/// The file that marks a quantized checkpoint and names its quantized tensors.
pub const MANIFEST: &str = "medvlm-quantization.json";

/// The LM head's format for linear layers in `kind` (see the module comment): q6_k beside
/// the k-quants (as llama.cpp's Q4_K_M keeps its output tensor), q8_0 beside the others.
pub fn head_format(kind: QuantKind) -> QuantKind {
    match kind {
        QuantKind::Q4K | QuantKind::Q6K => QuantKind::Q6K,
        QuantKind::Q8_0 | QuantKind::Q4_1 => QuantKind::Q8_0,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Manifest {
    /// The linear layers' format.
    pub format: String,
    /// Tensor name -> format, for every quantized tensor.
    pub tensors: BTreeMap<String, String>,
}

/// What quantizing a model did.
#[derive(Debug, Clone, Default)]
pub struct Quantized {
    /// Layers quantized (the head included).
    pub layers: usize,
    /// Module paths left dense (input width not a whole number of groups).
    pub kept: Vec<String>,
}

impl Qwen2Vl {
    /// The format of the linear layers, when the model is quantized.
    pub fn quantization(&self) -> Option<QuantKind> {
        self.text.quantization()
    }

    /// Quantizes the model for inference (CPU only; merge adapters first). Quantizing a
    /// model already quantized in the same format does nothing; in another format it is
    /// refused (the error would compound).
    pub fn quantize(&mut self, kind: QuantKind) -> Result<Quantized> {
        if let Some(have) = self.quantization() {
            // q4_k on a model whose widths all fall back to q4_1 is that q4_1 model.
            if have == kind || kind.for_width(self.config.text.hidden_size) == Some(have) {
                return Ok(Quantized::default());
            }
            bail!(
                "the model is already quantized ({}); quantize the original checkpoint to {} \
                 instead",
                have.name(),
                kind.name()
            );
        }
        if !self.device.is_cpu() {
            bail!("quantized models run on the CPU only (drop --quantize on a GPU)");
        }
        let mut done = Quantized::default();
        for (name, lin) in self.linears_mut() {
            if lin.quantize(kind)? {
                done.layers += 1;
            } else {
                done.kept.push(name);
            }
        }
        if self.text.quantize_head(head_format(kind))? {
            done.layers += 1;
        }
        Ok(done)
    }

    /// The model built over `weights`' file headers alone (no weight data read, zero-memory
    /// tensors): a checkpoint that does not fit its config, or its manifest, is refused
    /// here in one error naming its directory, in milliseconds whatever its size.
    pub fn over_headers(weights: &CheckpointWeights, config: &Qwen2VlConfig) -> Result<Self> {
        Self::from_var_builder(
            weights.shape_checker(),
            weights.layout(config)?,
            config.clone(),
            DType::F32,
            &Device::Cpu,
        )
        .map_err(|e| weights.explain(e))
    }

    /// Loads a quantized checkpoint (one with a [`MANIFEST`]): every layer the manifest
    /// names gets its stored weight, nothing is quantized again; the linear layers in
    /// `keep` ([`kept_f16`]) stay f16. A checkpoint without a manifest loads the same way,
    /// with nothing to install: an inference load keeping f16 layers.
    pub(super) fn load_quantized(
        dir: &Path,
        config: Qwen2VlConfig,
        weights: &CheckpointWeights,
        dtype: DType,
        keep: std::collections::HashSet<String>,
    ) -> Result<Self> {
        let kinds = weights.quantized();
        // The headers first (shapes, byte lengths; no data read), so a checkpoint that does
        // not fit its config or manifest gets the error `inspect` gives.
        Self::over_headers(weights, &config)?;
        let backend = Placeholders {
            reader: weights.reader()?,
            quantized: kinds.keys().cloned().collect(),
            keep,
        };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, Device::Cpu);
        let layout = weights.layout(&config)?;
        let mut model = Self::from_var_builder(vb, layout, config, dtype, &Device::Cpu)
            .map_err(|e| weights.explain(e))?;
        let reader = weights.reader()?;
        let install = |name: &str, lin: &mut super::layers::Linear| -> Result<bool> {
            let Some(&kind) = kinds.get(name) else {
                return Ok(false);
            };
            let (n, k) = lin.weight().dims2()?;
            let t = reader.read(name)?;
            // The bytes go straight from the read tensor onto the weight's own pages.
            let q = crate::kernels::with_data::<u8, _>(&t, |bytes| {
                QWeight::from_bytes(kind, n, k, bytes)
            })
            .filter(|_| t.rank() == 1)
            .ok_or_else(|| anyhow!("{}: tensor {name} is not a 1-D u8 tensor", dir.display()))?
            .ok_or_else(|| {
                anyhow!(
                    "{}: tensor {name} has the wrong length for a ({n}, {k}) {} weight",
                    dir.display(),
                    kind.name()
                )
            })?;
            lin.set_quantized(q)?;
            Ok(true)
        };
        let mut installed = 0;
        for (_, lin) in model.linears_mut() {
            let name = format!("{}.weight", lin.name());
            installed += usize::from(install(&name, lin)?);
        }
        let head_name = head_tensor(weights, &model.config)?;
        installed += usize::from(install(&head_name, model.text.lm_head_mut())?);
        model.text.tie_embeddings_to_quantized_head()?;
        if installed != kinds.len() {
            bail!(
                "{}: the manifest names {} quantized tensors but only {installed} belong to \
                 linear layers of this model",
                dir.join(MANIFEST).display(),
                kinds.len()
            );
        }
        Ok(model)
    }
}

/// Bytes the weights of a model of `config` take once [`Qwen2Vl::quantize`]d to `kind`,
/// with the weights it leaves dense stored in `dtype`: what the memory plan counts for a
/// quantized model (GRPO's `reference_quantize`). The same rules as `quantize`, from the
/// model's shape alone: every linear layer it visits takes [`QWeight::stored_len`] bytes
/// in the format [`QuantKind::for_width`] gives its input width (dense without one), the
/// LM head in [`head_format`]'s, and with tied embeddings
/// the dense table is gone (the lookups read the head); norms, biases, the patch embedding
/// and an untied embedding table stay in `dtype`.
pub fn quantized_size(config: &Qwen2VlConfig, kind: QuantKind, dtype: DType) -> Result<u64> {
    let mut dense = super::num_parameters(config)? as u64;
    let mut packed = 0u64;
    let mut quantize = |kind: QuantKind, n: usize, k: usize| {
        if let Some(kind) = kind.for_width(k) {
            dense -= (n * k) as u64;
            packed += QWeight::stored_len(kind, n, k) as u64;
        }
    };
    for (_, inputs, outputs) in super::linear_shapes(config)? {
        quantize(kind, outputs, inputs);
    }
    // The head is the embedding table itself when tied (counted once among the
    // parameters), its own `lm_head.weight` otherwise.
    quantize(
        head_format(kind),
        config.text.vocab_size,
        config.text.hidden_size,
    );
    Ok(dense * dtype.size_in_bytes() as u64 + packed)
}

/// The manifest of a quantized checkpoint directory, `None` for any other checkpoint.
pub(crate) fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| crate::files::io_error(&path, "cannot read", e))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{}: not a medvlm quantization manifest ({e})",
            path.display()
        )
    })?;
    Ok(Some(m))
}

/// The quantized tensors a checkpoint directory's manifest names, with their formats
/// (empty without a manifest).
pub(super) fn read_formats(dir: &Path) -> Result<BTreeMap<String, QuantKind>> {
    let Some(manifest) = read_manifest(dir)? else {
        return Ok(BTreeMap::new());
    };
    manifest
        .tensors
        .iter()
        .map(|(name, f)| {
            let kind = QuantKind::from_name(f).ok_or_else(|| {
                anyhow!(
                    "{}: tensor {name} has an unknown format {f:?}",
                    dir.join(MANIFEST).display()
                )
            })?;
            Ok((name.clone(), kind))
        })
        .collect()
}

/// Whether `dir` holds a quantized checkpoint, and in which format.
pub fn checkpoint_format(dir: &Path) -> Result<Option<QuantKind>> {
    Ok(match read_manifest(dir)? {
        Some(m) => Some(QuantKind::from_name(&m.format).ok_or_else(|| {
            anyhow!(
                "{}: unknown format {:?}",
                dir.join(MANIFEST).display(),
                m.format
            )
        })?),
        None => None,
    })
}

/// The tensor the LM head reads: `lm_head.weight`, or the embedding table when tied.
pub fn head_tensor(weights: &CheckpointWeights, config: &Qwen2VlConfig) -> Result<String> {
    if !config.text.tie_word_embeddings {
        return Ok("lm_head.weight".into());
    }
    let layout = weights.layout(config)?;
    Ok(format!("{}.embed_tokens.weight", layout.text_prefix()))
}

/// The linear-layer weights of a checkpoint that an inference load in `dtype` on `device`
/// keeps in f16 as stored: all of them stored in f16 when the model computes in f32 on the
/// CPU with medvlm's kernels (which widen them exactly; candle's own ops would cast the
/// whole weight on every call). The names are the layers' own, from the model built over
/// the file headers (milliseconds); the LM head and embeddings are not linear layers here.
pub(super) fn kept_f16(
    weights: &CheckpointWeights,
    config: &Qwen2VlConfig,
    dtype: DType,
    device: &Device,
) -> Result<std::collections::HashSet<String>> {
    let mut keep = std::collections::HashSet::new();
    if dtype != DType::F32 || !device.is_cpu() || !crate::kernels::cpu_kernels() {
        return Ok(keep);
    }
    if !weights
        .tensor_names()
        .any(|n| weights.stored_dtype(n) == Some(DType::F16))
    {
        return Ok(keep);
    }
    let mut model = Qwen2Vl::over_headers(weights, config)?;
    for (_, lin) in model.linears_mut() {
        let name = format!("{}.weight", lin.name());
        if weights.stored_dtype(&name) == Some(DType::F16) {
            keep.insert(name);
        }
    }
    Ok(keep)
}

/// The checkpoint's tensors, with a zero-memory placeholder of the requested shape for
/// each quantized one (its bytes are installed after the model is built), and the f16
/// linear weights in `keep` as stored, whatever dtype the model asks for.
struct Placeholders {
    reader: TensorReader,
    quantized: std::collections::HashSet<String>,
    keep: std::collections::HashSet<String>,
}

impl SimpleBackend for Placeholders {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if self.quantized.contains(name) {
            let (n, k) = s.dims2()?;
            return super::layers::placeholder(n, k, dtype);
        }
        if self.keep.contains(name) {
            return expect_shape(self.reader.read(name)?, &s, name);
        }
        expect_shape(self.reader.get(s.clone(), name, h, dtype, dev)?, &s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.reader.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.reader.contains_tensor(name)
    }
}
