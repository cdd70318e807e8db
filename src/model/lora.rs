//! LoRA adapters on the model's linear layers, in PEFT's formulation and file format.
//!
//! An adapted layer computes `x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ` with A (r x in), B (out x r)
//! and s = alpha / r (alpha / √r with rsLoRA). Layers are named by their module path in
//! transformers >= 4.52 (`model.language_model.layers.3.self_attn.q_proj`,
//! `model.visual.blocks.0.attn.qkv`, `model.visual.merger.mlp.0`) whatever the checkpoint's
//! own layout, because that is how PEFT names adapter tensors today:
//! `base_model.model.<module>.lora_A.weight`. Adapters written against the older module
//! names (`model.layers.…`, `visual.…`) load too.
//!
//! Dropout masks must not depend on anything but the run: a resumed run and a recomputed
//! (checkpointed) layer must draw the same mask. Masks are a hash of the key the trainer
//! passes with each training forward pass ([`super::layers::Mode::Train`]), the layer, and
//! the element.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// One layer's adapter.
#[derive(Debug, Clone)]
pub struct Lora {
    /// (r, in)
    pub a: Tensor,
    /// (out, r)
    pub b: Tensor,
    pub scaling: f64,
    /// Dropout probability on the adapter's input in passes that carry a dropout key.
    pub dropout: f32,
    /// Identifies the layer in dropout streams (a hash of its module path).
    pub stream: u64,
}

/// A layer's dropout stream: a hash of its module path.
pub fn stream_of(path: &str) -> u64 {
    crate::seed::of_name(path)
}

/// The dropout mask (0 or 1/(1-p)) for `n` elements of stream `stream` under `key`.
fn dropout_mask(key: u64, stream: u64, n: usize, p: f32) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p);
    use crate::seed::{scramble, GOLDEN};
    let base = scramble(key ^ scramble(stream));
    (0..n as u64)
        .map(|i| {
            let u = (scramble(base.wrapping_add(i.wrapping_mul(GOLDEN))) >> 40) as f32
                / (1u64 << 24) as f32;
            if u < p {
                0.0
            } else {
                keep
            }
        })
        .collect()
}

impl Lora {
    /// `s · dropout(x) Aᵀ Bᵀ` for x (.., in), as a 2-D product like the base layer; masks
    /// drawn from `dropout_key` (a function of the run's seed, step, micro-batch and pass),
    /// none without one.
    pub fn delta(&self, x2: &Tensor, dropout_key: Option<u64>) -> candle_core::Result<Tensor> {
        let a = cast(&self.a, x2.dtype())?;
        let b = cast(&self.b, x2.dtype())?;
        let x = match dropout_key {
            Some(key) if self.dropout > 0.0 => {
                let mask = dropout_mask(key, self.stream, x2.elem_count(), self.dropout);
                let mask = Tensor::from_vec(mask, x2.shape(), x2.device())?.to_dtype(x2.dtype())?;
                (x2 * mask)?
            }
            _ => x2.clone(),
        };
        x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scaling
    }

    /// The dense update `s · B A` (out, in), in f32.
    pub fn dense(&self) -> candle_core::Result<Tensor> {
        self.b
            .to_dtype(DType::F32)?
            .matmul(&self.a.to_dtype(DType::F32)?)?
            * self.scaling
    }
}

/// `t` in `dtype` (no copy when it already is).
pub fn cast(t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        t.to_dtype(dtype)
    }
}

/// Whether a module path is targeted by PEFT-style `target_modules` names: the path is the
/// name, or ends with `.name`.
pub fn targets(path: &str, names: &[String]) -> bool {
    names
        .iter()
        .any(|n| path == n || path.ends_with(&format!(".{n}")))
}

/// The modules of a checkpoint that `names` target but that get no adapter: PEFT matches
/// target names against every module that has weights, medvlm adapts linear layers only.
/// `proj`, meant for the vision blocks' `attn.proj`, also names the patch embedding
/// (`model.visual.patch_embed.proj`, a Conv3d in transformers) in every family; PEFT would
/// give it an adapter and, loading one medvlm wrote, report its keys missing. Modules in
/// current naming ([`super::WeightLayout::current_name`]), sorted, from the checkpoint's
/// tensor names (`<module>.weight`, `<module>.bias`).
pub fn unadapted_matches<'a>(
    tensor_names: impl IntoIterator<Item = &'a str>,
    adapted: &std::collections::BTreeSet<String>,
    names: &[String],
) -> Vec<String> {
    let modules: std::collections::BTreeSet<String> = tensor_names
        .into_iter()
        .filter_map(|t| t.rsplit_once('.').map(|(m, _)| m))
        .map(super::WeightLayout::current_name)
        .filter(|m| targets(m, names) && !adapted.contains(m))
        .collect();
    modules.into_iter().collect()
}

/// The tensor names PEFT gives a module's adapter.
pub fn peft_keys(path: &str) -> (String, String) {
    (
        format!("base_model.model.{path}.lora_A.weight"),
        format!("base_model.model.{path}.lora_B.weight"),
    )
}

/// Other names the same adapter has been saved under: transformers < 4.52 module paths,
/// and PEFT's in-memory names with the adapter name `default`.
fn alternative_keys(path: &str) -> Vec<(String, String)> {
    let legacy = super::WeightLayout::Legacy.local_name(path);
    let mut paths = vec![path.to_string()];
    if legacy != path {
        paths.push(legacy);
    }
    let mut out = Vec::new();
    for p in paths {
        out.push(peft_keys(&p));
        out.push((
            format!("base_model.model.{p}.lora_A.default.weight"),
            format!("base_model.model.{p}.lora_B.default.weight"),
        ));
    }
    out
}

/// adapter_config.json, the fields medvlm reads and writes (PEFT ignores none of them and
/// fills the rest with its defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    /// A list of names, or (PEFT allows it) one regular expression.
    #[serde(default)]
    pub target_modules: Option<serde_json::Value>,
    /// Modules PEFT must leave alone although `target_modules` names them (PEFT >= 0.14; a
    /// list matched as target_modules is). medvlm writes the modules its targets name that
    /// are not linear layers (see [`unadapted_matches`]); left out when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_modules: Option<serde_json::Value>,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
}

impl AdapterConfig {
    pub fn new(r: usize, alpha: f64, dropout: f64, target_modules: &[String]) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: Some(serde_json::json!(target_modules)),
            exclude_modules: None,
            bias: Some("none".into()),
            use_rslora: false,
            use_dora: false,
            fan_in_fan_out: false,
            modules_to_save: None,
            base_model_name_or_path: None,
            inference_mode: true,
        }
    }

    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Reads and checks `dir/adapter_config.json`: a LoRA adapter medvlm can apply.
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "{}: cannot read (an adapter directory holds adapter_config.json and \
                 adapter_model.safetensors)",
                p.display()
            )
        })?;
        let c: Self = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a PEFT adapter config", p.display()))?;
        if c.peft_type != "LORA" {
            bail!(
                "{}: peft_type {:?}: only LORA adapters are supported",
                p.display(),
                c.peft_type
            );
        }
        if c.use_dora {
            bail!("{}: DoRA adapters are not supported", p.display());
        }
        if c.fan_in_fan_out {
            bail!(
                "{}: fan_in_fan_out adapters (Conv1D layers) do not apply to Qwen2-VL",
                p.display()
            );
        }
        if c.bias.as_deref().is_some_and(|b| b != "none") {
            bail!(
                "{}: adapters that train biases (bias = {:?}) are not supported",
                p.display(),
                c.bias
            );
        }
        if c.modules_to_save.as_ref().is_some_and(|m| !m.is_null()) {
            bail!("{}: modules_to_save is not supported", p.display());
        }
        if c.r == 0 {
            bail!("{}: r is 0", p.display());
        }
        Ok(c)
    }
}

/// An adapter read from a directory: its config and tensors by PEFT name.
pub struct AdapterFile {
    pub config: AdapterConfig,
    pub tensors: BTreeMap<String, Tensor>,
    pub path: std::path::PathBuf,
}

impl AdapterFile {
    pub fn read(dir: &Path) -> Result<Self> {
        let config = AdapterConfig::read(dir)?;
        let p = dir.join("adapter_model.safetensors");
        if !p.is_file() {
            bail!("{}: missing (adapter weights)", p.display());
        }
        let tensors = candle_core::safetensors::load(&p, &candle_core::Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", p.display()))?
            .into_iter()
            .collect();
        Ok(Self {
            config,
            tensors,
            path: p,
        })
    }

    /// Takes the adapter of module `path` out of the file, if it has one.
    pub fn take(&mut self, path: &str) -> Result<Option<(Tensor, Tensor)>> {
        for (ka, kb) in alternative_keys(path) {
            if self.tensors.contains_key(&ka) || self.tensors.contains_key(&kb) {
                let a = self.tensors.remove(&ka);
                let b = self.tensors.remove(&kb);
                return match (a, b) {
                    (Some(a), Some(b)) => Ok(Some((a, b))),
                    _ => bail!(
                        "{}: {path} has only one of lora_A and lora_B",
                        self.path.display()
                    ),
                };
            }
        }
        Ok(None)
    }

    /// Fails naming the tensors no layer took (a different architecture, or a format medvlm
    /// does not read).
    pub fn finish(&self) -> Result<()> {
        if let Some(k) = self.tensors.keys().next() {
            bail!(
                "{}: {} adapter tensors match no layer of this model, e.g. {k}",
                self.path.display(),
                self.tensors.len()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_target_names_match_whole_path_components() {
        let t = vec![
            "q_proj".to_string(),
            "proj".to_string(),
            "mlp.0".to_string(),
        ];
        assert!(targets(
            "model.language_model.layers.0.self_attn.q_proj",
            &t
        ));
        assert!(targets("model.visual.blocks.3.attn.proj", &t));
        assert!(targets("model.visual.merger.mlp.0", &t));
        assert!(!targets(
            "model.language_model.layers.0.self_attn.k_proj",
            &t
        ));
        assert!(!targets("model.language_model.layers.0.mlp.gate_proj", &t));
    }

    /// `proj` targets the vision attention's output projection; the patch embedding's
    /// `proj` (weight and bias, legacy names too) is reported once, the adapted layers and
    /// modules no name targets are not.
    #[test]
    fn unadapted_matches_names_the_patch_embedding() {
        let names = vec!["proj".to_string(), "q_proj".to_string()];
        let adapted: std::collections::BTreeSet<String> = [
            "model.visual.blocks.0.attn.proj",
            "model.language_model.layers.0.self_attn.q_proj",
        ]
        .map(String::from)
        .into();
        let tensors = [
            "visual.patch_embed.proj.weight",
            "visual.patch_embed.proj.bias",
            "visual.blocks.0.attn.proj.weight",
            "visual.blocks.0.attn.proj.bias",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "lm_head.weight",
        ];
        assert_eq!(
            unadapted_matches(tensors, &adapted, &names),
            vec!["model.visual.patch_embed.proj".to_string()]
        );
        assert!(unadapted_matches(tensors, &adapted, &names[1..]).is_empty());
    }

    #[test]
    fn dropout_masks_are_a_function_of_key_stream_and_index() {
        let a = dropout_mask(7, 3, 10_000, 0.25);
        assert_eq!(a, dropout_mask(7, 3, 10_000, 0.25));
        assert_ne!(a, dropout_mask(8, 3, 10_000, 0.25));
        assert_ne!(a, dropout_mask(7, 4, 10_000, 0.25));
        let dropped = a.iter().filter(|&&x| x == 0.0).count() as f64 / 1e4;
        assert!((dropped - 0.25).abs() < 0.02, "{dropped}");
        assert!(a.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
    }
}
