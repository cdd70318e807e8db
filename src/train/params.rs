//! A model whose weights are trainable variables, loaded from a checkpoint directory (or
//! drawn at random for a fresh tiny model), with its parameter list.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::model::random::random_backend;
use crate::model::{CheckpointWeights, Qwen2Vl, Qwen2VlConfig, WeightLayout};

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

/// Reads named tensors from checkpoint files.
struct FileBackend {
    st: MmapedSafetensors,
}

impl SimpleBackend for FileBackend {
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
        self.st.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }
}

/// A Qwen2-VL whose weights are `Var`s, in f32.
pub struct TrainableModel {
    pub model: Qwen2Vl,
    pub params: Vec<Param>,
    pub layout: WeightLayout,
    /// The checkpoint directory it came from: tokenizer and processor files are copied
    /// from there into every saved checkpoint.
    pub source_dir: PathBuf,
}

impl TrainableModel {
    /// Loads a checkpoint directory for training (f32 on `device`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = Qwen2VlConfig::from_file(&dir.join("config.json"))?;
        let weights = CheckpointWeights::open(dir)?;
        let layout = weights.layout(&config)?;
        // SAFETY: the files are only read.
        let st = unsafe { MmapedSafetensors::multi(weights.files()) }
            .map_err(|e| anyhow!("{}: cannot map weights: {e}", dir.display()))?;
        Self::build(Box::new(FileBackend { st }), config, layout, dir, device)
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
        Self::build(
            random_backend(std, seed),
            config,
            WeightLayout::Legacy,
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
        })
    }

    /// The same model over the same storage, outside the autograd graph: sampling and
    /// reference log-probs use it so they build no graph. Optimizer updates write the
    /// variables in place, so this view always sees the current weights.
    pub fn detached(&self) -> Result<Qwen2Vl> {
        let tensors: HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_backend(
            Box::new(MapBackend { tensors }),
            DType::F32,
            self.model.device.clone(),
        );
        Qwen2Vl::from_var_builder(
            vb,
            self.layout,
            self.model.config.clone(),
            DType::F32,
            &self.model.device,
        )
    }

    /// Freezes the vision tower's patch embedding and blocks; the merger (which maps image
    /// features into the language model) stays trainable, as in MedVLM-R1's ablations.
    pub fn freeze_vision(&mut self) {
        let blocks = format!("{}.", self.layout.vision_prefix());
        let merger = format!("{}.merger.", self.layout.vision_prefix());
        for p in &mut self.params {
            if p.name.starts_with(&blocks) && !p.name.starts_with(&merger) {
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
