//! `medvlm merge`: a base checkpoint plus a PEFT LoRA adapter become one full checkpoint,
//! each adapted weight replaced by `W + s B A` (computed in f32, stored in W's dtype). It
//! works on the files by tensor name, so the base keeps its layout, dtype and every tensor
//! the adapter does not touch, bit for bit.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::model::lora::AdapterConfig;
use crate::model::{CheckpointWeights, Qwen2VlConfig, WeightLayout};

/// The module path an adapter tensor name refers to, in transformers >= 4.52 naming, and
/// whether it is A or B: `base_model.model.<path>.lora_A[.default].weight`.
fn parse_key(key: &str) -> Option<(String, bool)> {
    let rest = key.strip_prefix("base_model.model.")?;
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (path, is_a) = if let Some(p) = rest.strip_suffix(".lora_A") {
        (p, true)
    } else {
        (rest.strip_suffix(".lora_B")?, false)
    };
    Some((WeightLayout::current_name(path), is_a))
}

/// A module's weight tensor name in a checkpoint of `layout`.
fn weight_name(layout: WeightLayout, module: &str) -> String {
    format!("{}.weight", layout.local_name(module))
}

/// Writes `out` (which must not exist): `base` with `adapter` merged in. Returns how many
/// weights changed.
pub fn merge(base: &Path, adapter: &Path, out: &Path) -> Result<usize> {
    if out.exists() {
        bail!(
            "--out {}: already exists; choose a new directory",
            out.display()
        );
    }
    let config = Qwen2VlConfig::from_file(&base.join("config.json"))?;
    let weights = CheckpointWeights::open(base)?;
    let layout = weights.layout(&config)?;
    // Every tensor of the base is held while the merged file is written, and the file takes
    // as much disk: check both before reading any.
    let bytes: u128 = weights
        .files()
        .iter()
        .map(|f| fs::metadata(f).map(|m| m.len() as u128).unwrap_or(0))
        .sum();
    let (what, available) = crate::device::available_memory(&Device::Cpu);
    if let Some(a) = available {
        if bytes > a as u128 {
            bail!(
                "--model {}: its weights ({}) do not fit in memory ({what}: {})",
                base.display(),
                crate::train::checkpoint::human_bytes(bytes),
                crate::train::checkpoint::human_bytes(a as u128)
            );
        }
    }
    if let Some(free) = crate::train::checkpoint::free_disk_bytes(out) {
        if bytes > free {
            bail!(
                "--out {}: the merged weights take {} but the disk has {} free",
                out.display(),
                crate::train::checkpoint::human_bytes(bytes),
                crate::train::checkpoint::human_bytes(free)
            );
        }
    }
    let acfg = AdapterConfig::read(adapter)?;
    let scaling = acfg.scaling();
    let apath = adapter.join("adapter_model.safetensors");
    let atensors = candle_core::safetensors::load(&apath, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", apath.display()))?;
    let mut pairs: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (k, t) in atensors {
        let (module, is_a) = parse_key(&k).with_context(|| {
            format!(
                "{}: {k} is not a LoRA tensor name medvlm reads",
                apath.display()
            )
        })?;
        let e = pairs.entry(module).or_default();
        if is_a {
            e.0 = Some(t);
        } else {
            e.1 = Some(t);
        }
    }

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in weights.files() {
        for (k, t) in candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: cannot read ({e})", f.display()))?
        {
            tensors.insert(k, t);
        }
    }
    let mut changed = 0;
    let mut modules: Vec<_> = pairs.into_iter().collect();
    modules.sort_by(|a, b| a.0.cmp(&b.0));
    for (module, (a, b)) in modules {
        let (Some(a), Some(b)) = (a, b) else {
            bail!(
                "{}: {module} has only one of lora_A and lora_B",
                apath.display()
            );
        };
        let name = weight_name(layout, &module);
        let w = tensors.get(&name).with_context(|| {
            format!(
                "{}: the adapter's {module} has no weight {name} in {}",
                apath.display(),
                base.display()
            )
        })?;
        let (o, i) = w.dims2()?;
        if a.dims() != [acfg.r, i] || b.dims() != [o, acfg.r] {
            bail!(
                "{}: {module}: lora_A {:?} and lora_B {:?} do not fit the ({o}, {i}) weight with \
                 rank {}",
                apath.display(),
                a.dims(),
                b.dims(),
                acfg.r
            );
        }
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scaling)?;
        let merged = (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?;
        tensors.insert(name, merged);
        changed += 1;
    }

    // Staged beside `out` and renamed into place when complete; removed on any failure.
    let staging = crate::files::Staging::beside(out, "merge")?;
    let tmp = staging.path();
    // The base's config.json and side files as they are.
    fs::copy(base.join("config.json"), tmp.join("config.json"))
        .with_context(|| format!("{}: cannot copy", base.join("config.json").display()))?;
    crate::processor::copy_side_files(base, tmp)?;
    let wpath = tmp.join("model.safetensors");
    crate::files::save_safetensors(&tensors, &wpath)?;
    fs::File::open(&wpath)?.sync_all()?;
    staging.commit(out)?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names_map_to_checkpoint_names_in_both_layouts() {
        let (m, a) = parse_key(
            "base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight",
        )
        .unwrap();
        assert_eq!(m, "model.language_model.layers.3.self_attn.q_proj");
        assert!(a);
        let (old, b) =
            parse_key("base_model.model.model.layers.3.self_attn.q_proj.lora_B.default.weight")
                .unwrap();
        assert_eq!(old, m);
        assert!(!b);
        let (v, _) = parse_key("base_model.model.visual.blocks.0.attn.qkv.lora_A.weight").unwrap();
        assert_eq!(v, "model.visual.blocks.0.attn.qkv");
        assert_eq!(
            weight_name(WeightLayout::Legacy, &m),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            weight_name(WeightLayout::Nested, &m),
            "model.language_model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            weight_name(WeightLayout::Legacy, &v),
            "visual.blocks.0.attn.qkv.weight"
        );
        assert!(parse_key("base_model.model.x.lora_magnitude_vector").is_none());
    }
}
