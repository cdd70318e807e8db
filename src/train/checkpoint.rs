//! Checkpoints: the model in Hugging Face layout (so transformers and `medvlm` load it as
//! is) plus the trainer's state (optimizer moments, step, data cursor), written atomically:
//! into a temporary directory that is renamed into place only when complete, so an
//! interrupted save never leaves a half-written checkpoint behind.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::params::TrainableModel;

/// Where a run stands: enough to continue it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// "grpo" or "sft".
    pub kind: String,
    /// Optimizer updates done.
    pub step: u64,
    /// Total updates the run is planned for (the learning-rate schedule depends on it).
    pub total_steps: u64,
    /// The run's seed; every random draw of step s derives from (seed, s).
    pub seed: u64,
    /// Items of the training set consumed so far (the data cursor).
    pub items_seen: u64,
    /// Hash of the resolved config, to refuse resuming with different settings.
    pub config_hash: String,
    /// The settings behind the hash (`TrainConfig::fingerprint_text`), to name what changed.
    #[serde(default)]
    pub settings: Option<String>,
}

pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step:06}")
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Writes a file and flushes it to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// Saves the model (in `save_dtype`) and, when given, the optimizer and trainer state as
/// `dir/name`, atomically. Returns the checkpoint's path.
pub fn save(
    dir: &Path,
    name: &str,
    model: &TrainableModel,
    save_dtype: DType,
    trainer: Option<(&AdamW, &TrainerState)>,
) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let final_path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot clear", tmp.display()))?;
    }
    fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    if let Some(t) = model.template {
        let info = serde_json::json!({
            "template": t.name(),
            "written_by": format!("medvlm {}", env!("CARGO_PKG_VERSION")),
        });
        write_synced(
            &tmp.join(crate::data::RUN_INFO_FILE),
            serde_json::to_string_pretty(&info)?.as_bytes(),
        )?;
    }

    match &model.adapter {
        None => write_full_model(&tmp, model, save_dtype)?,
        Some(adapter) => write_adapter(&tmp, model, adapter, save_dtype)?,
    }

    if let Some((opt, state)) = trainer {
        let moments: HashMap<String, Tensor> = opt
            .state_tensors()
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let p = tmp.join("optimizer.safetensors");
        crate::files::save_safetensors(&moments, &p)?;
        fs::File::open(&p)?.sync_all()?;
        write_synced(
            &tmp.join("trainer_state.json"),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )?;
    }

    // Swap into place: an older checkpoint of the same name is replaced only now.
    if final_path.exists() {
        let old = dir.join(format!(".{name}.old"));
        if old.exists() {
            fs::remove_dir_all(&old)?;
        }
        fs::rename(&final_path, &old)?;
        fs::rename(&tmp, &final_path)?;
        fs::remove_dir_all(&old)?;
    } else {
        fs::rename(&tmp, &final_path).with_context(|| {
            format!(
                "{}: cannot move checkpoint into place",
                final_path.display()
            )
        })?;
    }
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(final_path)
}

/// config.json (with the dtype it is now saved in), model.safetensors and the tokenizer and
/// processor files: a complete Hugging Face checkpoint.
fn write_full_model(tmp: &Path, model: &TrainableModel, save_dtype: DType) -> Result<()> {
    let cfg_src = model.source_dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&cfg_src)
            .with_context(|| format!("{}: cannot read", cfg_src.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", cfg_src.display()))?;
    if let Some(o) = cfg.as_object_mut() {
        // The key the file's layout uses (released: torch_dtype; transformers 5: dtype), so
        // the checkpoint stays in the layout it was read in.
        let name = dtype_name(save_dtype);
        let nested = o.contains_key("text_config");
        let mut set = false;
        for key in ["torch_dtype", "dtype"] {
            if o.contains_key(key) {
                o.insert(key.into(), name.into());
                set = true;
            }
        }
        if !set {
            o.insert(
                if nested { "dtype" } else { "torch_dtype" }.into(),
                name.into(),
            );
        }
        if let Some(t) = o.get_mut("text_config").and_then(|t| t.as_object_mut()) {
            for key in ["torch_dtype", "dtype"] {
                if t.contains_key(key) {
                    t.insert(key.into(), name.into());
                }
            }
        }
    }
    write_synced(
        &tmp.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    write_tensors(&tmp.join("model.safetensors"), model, save_dtype)?;
    crate::processor::copy_side_files(&model.source_dir, tmp)
}

/// adapter_config.json and adapter_model.safetensors, as PEFT's `save_pretrained` writes
/// them: `PeftModel.from_pretrained(base, dir)` loads the directory.
fn write_adapter(
    tmp: &Path,
    model: &TrainableModel,
    adapter: &crate::model::lora::AdapterConfig,
    save_dtype: DType,
) -> Result<()> {
    let mut cfg = adapter.clone();
    cfg.base_model_name_or_path = Some(model.source_dir.display().to_string());
    write_synced(
        &tmp.join("adapter_config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    write_tensors(&tmp.join("adapter_model.safetensors"), model, save_dtype)
}

/// The model's parameters by checkpoint name, in `dtype`, synced to disk.
fn write_tensors(path: &Path, model: &TrainableModel, dtype: DType) -> Result<()> {
    let tensors: HashMap<String, Tensor> = model
        .named_tensors()
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    crate::files::save_safetensors(&tensors, path)?;
    fs::File::open(path)?.sync_all()?;
    Ok(())
}

/// Checks a checkpoint without loading it: its trainer state parses and every safetensors
/// file's header and byte ranges fit the file (a truncated or garbled file fails here).
pub fn verify(ckpt: &Path) -> Result<()> {
    let p = ckpt.join("trainer_state.json");
    let text = fs::read_to_string(&p).map_err(|e| crate::files::io_error(&p, "cannot read", e))?;
    serde_json::from_str::<TrainerState>(&text)
        .with_context(|| format!("{}: not a trainer state", p.display()))?;
    let mut files = Vec::new();
    for e in fs::read_dir(ckpt).map_err(|e| crate::files::io_error(ckpt, "cannot list", e))? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            files.push(path);
        }
    }
    if !files.iter().any(|f| f.ends_with("optimizer.safetensors")) {
        bail!("{}: optimizer.safetensors is missing", ckpt.display());
    }
    for f in &files {
        crate::model::weights::TensorReader::open(std::slice::from_ref(f))?;
    }
    Ok(())
}

/// Every complete checkpoint of a run directory (with a trainer state), oldest first.
pub fn all(run_dir: &Path) -> Result<Vec<PathBuf>> {
    if !run_dir.is_dir() {
        bail!("{}: no such run directory", run_dir.display());
    }
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for e in fs::read_dir(run_dir).with_context(|| format!("{}: cannot list", run_dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join("trainer_state.json").is_file() {
                found.push((n, e.path()));
            }
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// The newest complete checkpoint of a run directory, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(all(run_dir)?.pop())
}

/// Reads a checkpoint's trainer state and optimizer moments.
pub fn load_trainer_state(ckpt: &Path) -> Result<(TrainerState, HashMap<String, Tensor>)> {
    let p = ckpt.join("trainer_state.json");
    let state: TrainerState = serde_json::from_str(
        &fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?,
    )
    .with_context(|| format!("{}: not a trainer state", p.display()))?;
    let o = ckpt.join("optimizer.safetensors");
    let moments = candle_core::safetensors::load(&o, &Device::Cpu)
        .with_context(|| format!("{}: cannot read optimizer state", o.display()))?;
    Ok((state, moments))
}
