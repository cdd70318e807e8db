//! A model whose weights are trainable variables, loaded from a checkpoint directory (or
//! drawn at random for a fresh tiny model), with its parameter list.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::LoraConfig;
use crate::model::lora::{self, AdapterConfig, AdapterFile, Lora};
use crate::model::random::random_backend;
use crate::model::{CheckpointWeights, Qwen2Vl, Qwen2VlConfig, WeightLayout};

fn r_path(p: Option<&Path>) -> String {
    p.map_or_else(String::new, |p| p.display().to_string())
}

/// One named trainable tensor.
#[derive(Debug, Clone)]
pub struct Param {
    /// The tensor's name in checkpoint files (`model.layers.0.mlp.up_proj.weight`, ...).
    pub name: String,
    pub var: Var,
    /// Whether the optimizer updates it (`--freeze-vision` turns the vision blocks off).
    pub trainable: bool,
}

/// Wraps another variable source: every tensor it hands out becomes a `Var`, recorded
/// under its name, so the model built from it is trainable and its parameters are known.
struct Collector {
    inner: Box<dyn SimpleBackend>,
    seen: Arc<Mutex<Vec<(String, Var)>>>,
}

impl SimpleBackend for Collector {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, v)) = seen.iter().find(|(n, _)| n == name) {
            return Ok(v.as_tensor().clone());
        }
        let t = self.inner.get(s, name, h, dtype, dev)?;
        let var = Var::from_tensor(&t.contiguous()?)?;
        seen.push((name.to_string(), var.clone()));
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Hands out tensors from a map (shared storage, no copy).
struct MapBackend {
    tensors: HashMap<String, Tensor>,
}

impl SimpleBackend for MapBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        crate::model::weights::expect_shape(self.get_unchecked(name, dtype, dev)?, &s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.tensors.get(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("cannot find tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// A Qwen2-VL being trained: either every weight is an f32 `Var` (full fine-tuning), or the
/// base is frozen (plain tensors, possibly bf16) and the parameters are LoRA adapters.
pub struct TrainableModel {
    pub model: Qwen2Vl,
    pub params: Vec<Param>,
    pub layout: WeightLayout,
    /// The checkpoint directory it came from: tokenizer and processor files are copied
    /// from there into every saved checkpoint.
    pub source_dir: PathBuf,
    /// Set when the parameters are LoRA adapters (named as PEFT names them).
    pub adapter: Option<AdapterConfig>,
    /// The prompt template the model is trained with, recorded in its checkpoints.
    pub template: Option<crate::data::PromptTemplate>,
}

impl TrainableModel {
    /// Loads a checkpoint directory for training (f32 on `device`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = Qwen2VlConfig::from_file(&dir.join("config.json"))?;
        let weights = CheckpointWeights::open(dir)?;
        let layout = weights.layout(&config)?;
        Self::build(Box::new(weights.reader()?), config, layout, dir, device)
            .map_err(|e| weights.explain(e))
    }

    /// A model with random weights (N(0, std), norms 1, biases 0) from a seed: a fresh tiny
    /// model to train from scratch. `source_dir` provides the tokenizer and processor files.
    pub fn random(
        config: Qwen2VlConfig,
        std: f64,
        seed: u64,
        source_dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        let layout = config.arch.released_layout();
        Self::build(
            random_backend(std, seed),
            config,
            layout,
            source_dir,
            device,
        )
    }

    fn build(
        inner: Box<dyn SimpleBackend>,
        config: Qwen2VlConfig,
        layout: WeightLayout,
        dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let collector = Collector {
            inner,
            seen: seen.clone(),
        };
        let vb = VarBuilder::from_backend(Box::new(collector), DType::F32, device.clone());
        let model = Qwen2Vl::from_var_builder(vb, layout, config, DType::F32, device)?;
        let vars = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
        let params = vars
            .into_iter()
            .map(|(name, var)| Param {
                name,
                var,
                trainable: true,
            })
            .collect();
        Ok(Self {
            model,
            params,
            layout,
            source_dir: dir.to_path_buf(),
            adapter: None,
            template: None,
        })
    }

    /// The base model in `dir`, frozen (its linear weights in `lora.base_dtype`, the rest
    /// in `compute`), with LoRA adapters on the layers `lora.target_modules` names: read
    /// from the adapter directory `resume` (a checkpoint) when given, else fresh (PEFT's
    /// initialisation: A Kaiming-uniform from `seed`, B zero, so training starts at the
    /// base model).
    pub fn load_lora(
        dir: &Path,
        lora: &LoraConfig,
        compute: DType,
        resume: Option<&Path>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        for t in &lora.target_modules {
            if matches!(t.as_str(), "lm_head" | "embed_tokens") {
                bail!(
                    "config: lora.target_modules: {t} cannot take an adapter here (only the \
                     linear layers of the decoder, vision tower and merger)"
                );
            }
        }
        let config = Qwen2VlConfig::from_file(&dir.join("config.json"))?;
        let weights = CheckpointWeights::open(dir)?;
        let layout = weights.layout(&config)?;
        let mut model = Qwen2Vl::load(dir, lora.base_dtype()?, device)?;
        model.cast_embeddings(compute)?;
        model.set_compute_dtype(compute);
        let mut file = match resume {
            Some(r) => Some(AdapterFile::read(r)?),
            None => None,
        };
        let mut adapter = match &file {
            Some(f) => {
                if f.config.r != lora.r || f.config.scaling() != lora.scaling() {
                    bail!(
                        "{}: adapter of rank {} and scaling {} but the run asks for rank {} and \
                         scaling {}",
                        r_path(resume),
                        f.config.r,
                        f.config.scaling(),
                        lora.r,
                        lora.scaling()
                    );
                }
                f.config.clone()
            }
            None => AdapterConfig::new(lora.r, lora.alpha, lora.dropout, &lora.target_modules),
        };
        let mut rng = StdRng::seed_from_u64(crate::seed::mix(seed, 0x10_7A));
        let mut params = Vec::new();
        let mut adapted = BTreeSet::new();
        for (path, lin) in model.linears_mut() {
            if !lora::targets(&path, &lora.target_modules) {
                continue;
            }
            let (out, inp) = lin.weight().dims2()?;
            let (a, b) = match file.as_mut() {
                Some(f) => match f.take(&path)? {
                    Some((a, b)) => {
                        crate::model::check_adapter_shapes(&path, lin, &a, &b, lora.r)?;
                        (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?)
                    }
                    None => bail!("{}: no adapter for {path}", r_path(resume)),
                },
                None => {
                    // kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
                    let bound = 1.0 / (inp as f32).sqrt();
                    let a: Vec<f32> = (0..lora.r * inp)
                        .map(|_| rng.random_range(-bound..bound))
                        .collect();
                    (
                        Tensor::from_vec(a, (lora.r, inp), &Device::Cpu)?,
                        Tensor::zeros((out, lora.r), DType::F32, &Device::Cpu)?,
                    )
                }
            };
            let a = Var::from_tensor(&a.to_device(device)?)?;
            let b = Var::from_tensor(&b.to_device(device)?)?;
            lin.set_lora(Some(Lora {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scaling: lora.scaling(),
                dropout: lora.dropout as f32,
                stream: lora::stream_of(&path),
            }));
            let (ka, kb) = lora::peft_keys(&path);
            adapted.insert(path);
            params.push(Param {
                name: ka,
                var: a,
                trainable: true,
            });
            params.push(Param {
                name: kb,
                var: b,
                trainable: true,
            });
        }
        if let Some(f) = &file {
            f.finish()?;
        } else {
            // What the names target beyond the adapted layers (the patch embedding under
            // `proj`) is excluded in adapter_config.json, so that PEFT builds exactly these
            // adapters.
            let excluded =
                lora::unadapted_matches(weights.tensor_names(), &adapted, &lora.target_modules);
            if !excluded.is_empty() {
                adapter.exclude_modules = Some(serde_json::json!(excluded));
            }
        }
        if params.is_empty() {
            bail!(
                "config: lora.target_modules {:?} match no layer of {}",
                lora.target_modules,
                dir.display()
            );
        }
        Ok(Self {
            model,
            params,
            layout,
            source_dir: dir.to_path_buf(),
            adapter: Some(adapter),
            template: None,
        })
    }

    /// The same model over the same storage, outside the autograd graph: sampling and
    /// reference log-probs use it so they build no graph. Optimizer updates write the
    /// variables in place, so this view always sees the current weights.
    pub fn detached(&self) -> Result<Qwen2Vl> {
        if self.adapter.is_some() {
            // The base is plain tensors already; only the adapters are variables.
            let mut m = self.model.clone();
            for (_, lin) in m.linears_mut() {
                if let Some(l) = lin.lora() {
                    let mut l = l.clone();
                    l.a = l.a.detach();
                    l.b = l.b.detach();
                    lin.set_lora(Some(l));
                }
            }
            return Ok(m);
        }
        let mut m = self.weights_as(DType::F32)?;
        m.set_compute_dtype(self.model.dtype);
        Ok(m)
    }

    /// A model over the full fine-tuning parameters' current values, detached, stored in
    /// `dtype` (the same storage when that is f32, a copy otherwise).
    fn weights_as(&self, dtype: DType) -> Result<Qwen2Vl> {
        let tensors: HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_backend(
            Box::new(MapBackend { tensors }),
            dtype,
            self.model.device.clone(),
        );
        Qwen2Vl::from_var_builder(
            vb,
            self.layout,
            self.model.config.clone(),
            dtype,
            &self.model.device,
        )
    }

    /// The model rollouts and held-out evaluation decode with, when it differs from the
    /// policy's own view ([`Self::detached`]): a bf16 run on the CPU decodes through the
    /// kernels bf16 inference uses (bf16 weights, input-major, `vdpbf16ps` dot products, f32
    /// activations) instead of candle's generic bf16 ops over f32 master weights cast at
    /// every product, which made a bf16 rollout several times slower than an f32 one
    /// (issue #29). A fresh copy of the current weights (2 bytes a parameter, cast and
    /// packed in about a second at 2B), built per rollout and dropped after it. `None` for
    /// f32, GPUs and LoRA runs (their frozen base is used as it is).
    pub fn rollout_model(&self) -> Result<Option<Qwen2Vl>> {
        let cpu_bf16 = self.model.dtype == DType::BF16
            && self.model.device.is_cpu()
            && crate::kernels::cpu_kernels();
        if !cpu_bf16 || self.adapter.is_some() {
            return Ok(None);
        }
        let mut m = self.weights_as(DType::BF16)?;
        m.prepare_for_inference()?;
        Ok(Some(m))
    }

    /// Freezes the vision tower's patch embedding and blocks (or their adapters); the
    /// merger (which maps image features into the language model) stays trainable, as in
    /// MedVLM-R1's ablations.
    pub fn freeze_vision(&mut self) {
        for p in &mut self.params {
            // `visual.…`, `model.visual.…` and PEFT's `base_model.model.model.visual.…`.
            let vision = p.name.starts_with("visual.") || p.name.contains(".visual.");
            if vision && !p.name.contains("visual.merger.") {
                p.trainable = false;
            }
        }
    }

    pub fn num_trainable(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.var.as_tensor().elem_count())
            .sum()
    }

    /// Every weight by checkpoint name (tied embeddings once, as transformers saves them).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect()
    }

    /// Overwrites weights from a name -> tensor map (every parameter must be present).
    pub fn assign(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for p in &self.params {
            let t = tensors
                .get(&p.name)
                .with_context(|| format!("tensor {} missing", p.name))?;
            if t.dims() != p.var.as_tensor().dims() {
                bail!(
                    "tensor {} has shape {:?}, expected {:?}",
                    p.name,
                    t.dims(),
                    p.var.as_tensor().dims()
                );
            }
            p.var
                .set(&t.to_dtype(DType::F32)?.to_device(p.var.device())?)?;
        }
        Ok(())
    }
}
