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
    /// What the run started from (base model files, training data), to refuse resuming
    /// when they were replaced under the same paths. Absent in checkpoints written before
    /// medvlm recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<InputIdentity>,
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
    // A failed write (disk full, a bad tensor) leaves no half-written directory behind.
    if let Err(e) = write_checkpoint_files(&tmp, model, save_dtype, trainer) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
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

/// The files of a checkpoint, written into the (empty) directory `tmp`.
fn write_checkpoint_files(
    tmp: &Path,
    model: &TrainableModel,
    save_dtype: DType,
    trainer: Option<(&AdamW, &TrainerState)>,
) -> Result<()> {
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
        None => write_full_model(tmp, model, save_dtype)?,
        Some(adapter) => write_adapter(tmp, model, adapter, save_dtype)?,
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
    Ok(())
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

/// Hashes bytes: FNV-1a over little-endian 64-bit words (the tail zero-padded). Stable
/// across builds and platforms, unlike std's hasher, because checkpoints outlive the binary
/// that wrote them; a word at a time, so hashing a data file costs little next to a step.
struct WordHash(u64);

impl WordHash {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let v = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
            self.0 = (self.0 ^ v).wrapping_mul(0x0100_0000_01b3);
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.0 = (self.0 ^ u64::from_le_bytes(last)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The identity of the training data: a file's [`file_digest`] (hashed whole), or a
/// benchmark folder's: every file under it by relative path, its table files (`.json`,
/// `.jsonl`, `.csv`, `.tsv`, `.parquet`, `.txt`: the questions and answers) by
/// [`file_digest`], its other files (images) by size alone, so a resume does not read
/// gigabytes of images.
pub fn data_digest(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return file_digest(path, true);
    }
    fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
        if depth > 16 {
            return Ok(());
        }
        let listing =
            fs::read_dir(dir).map_err(|e| crate::files::io_error(dir, "cannot list", e))?;
        for e in listing {
            let p = e
                .map_err(|e| crate::files::io_error(dir, "cannot list", e))?
                .path();
            if p.is_dir() {
                walk(root, &p, depth + 1, out)?;
            } else if p.is_file() {
                out.push(p.strip_prefix(root).unwrap_or(&p).to_path_buf());
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(path, path, 0, &mut files)?;
    files.sort();
    let mut h = WordHash::new();
    for rel in &files {
        let p = path.join(rel);
        let table = rel.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            ["json", "jsonl", "csv", "tsv", "parquet", "txt"]
                .contains(&e.to_ascii_lowercase().as_str())
        });
        let id = if table {
            file_digest(&p, false)?
        } else {
            let meta =
                fs::metadata(&p).map_err(|e| crate::files::io_error(&p, "cannot read", e))?;
            format!("size {}", meta.len())
        };
        h.update(format!("{}\0{id}\n", rel.display()).as_bytes());
    }
    Ok(format!("{} files, hash {:016x}", files.len(), h.0))
}

/// Model files up to this size are hashed whole; larger ones (weight shards) by sample.
const HASH_WHOLE_UP_TO: u64 = 64 << 20;
/// A large file's sample: its first MiB (a safetensors header, which names every tensor with
/// its dtype, shape and byte range), and this many 64 KiB windows spread evenly over it.
const SAMPLE_WINDOWS: u64 = 32;
const SAMPLE_WINDOW: u64 = 64 << 10;

/// A file's size and content hash, as `size N, hash H` (the whole file) or `size N,
/// sampled hash H` (a file over 64 MiB unless `whole`). Why sample weights: hashing a 4.4 GB
/// checkpoint on every resume costs tens of seconds from a cold disk (minutes on network
/// storage); modification times are no substitute, since copying a model changes them. Any
/// other model (fine-tuned, re-initialised, another size) differs in the sampled bytes.
pub fn file_digest(path: &Path, whole: bool) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(path).map_err(|e| crate::files::io_error(path, "cannot read", e))?;
    let size = f
        .metadata()
        .map_err(|e| crate::files::io_error(path, "cannot read", e))?
        .len();
    let mut h = WordHash::new();
    let read_err = |e| crate::files::io_error(path, "cannot read", e);
    if whole || size <= HASH_WHOLE_UP_TO {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        return Ok(format!("size {size}, hash {:016x}", h.0));
    }
    let mut take = |at: u64, len: u64| -> Result<()> {
        let mut buf = vec![0u8; len as usize];
        f.seek(SeekFrom::Start(at)).map_err(read_err)?;
        f.read_exact(&mut buf).map_err(read_err)?;
        h.update(&buf);
        Ok(())
    };
    take(0, 1 << 20)?;
    for i in 0..SAMPLE_WINDOWS {
        take(
            (size - SAMPLE_WINDOW) * i / (SAMPLE_WINDOWS - 1),
            SAMPLE_WINDOW,
        )?;
    }
    Ok(format!("size {size}, sampled hash {:016x}", h.0))
}

/// What a run started from, recorded in every checkpoint: resuming with another base model
/// or other data under the same paths would silently continue a different run (KL against
/// an unrelated reference, a data cursor into other rows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputIdentity {
    /// Each file of the base model that decides the run (config.json, tokenizer and
    /// processor files, weights) by name, with [`file_digest`]: files over 64 MiB by sample.
    pub model: std::collections::BTreeMap<String, String>,
    /// The training data file, hashed whole.
    pub train_data: String,
}

impl InputIdentity {
    pub fn of(model_dir: &Path, train_data: &Path) -> Result<Self> {
        let mut names: Vec<String> = vec!["config.json".into()];
        // generation_config.json only sets sampling defaults for inference: editing it does
        // not change what a run trains.
        names.extend(
            crate::processor::SIDE_FILES
                .iter()
                .filter(|f| **f != "generation_config.json")
                .map(|f| f.to_string()),
        );
        let listing = fs::read_dir(model_dir)
            .map_err(|e| crate::files::io_error(model_dir, "cannot list", e))?;
        let mut weights = Vec::new();
        for e in listing {
            let name = e?.file_name().to_string_lossy().to_string();
            if name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
                weights.push(name);
            }
        }
        weights.sort();
        names.extend(weights);
        let mut model = std::collections::BTreeMap::new();
        for n in names {
            let p = model_dir.join(&n);
            if p.is_file() {
                model.insert(n, file_digest(&p, false)?);
            }
        }
        Ok(Self {
            model,
            train_data: data_digest(train_data)?,
        })
    }

    /// What differs between the checkpoint's record (`self`) and `now`, one clause each:
    /// `the base model's model.safetensors (size .. in the checkpoint, size .. now)`.
    pub fn differences(&self, now: &Self) -> Vec<String> {
        let mut out = Vec::new();
        let mut names: Vec<&String> = self.model.keys().chain(now.model.keys()).collect();
        names.sort();
        names.dedup();
        for n in names {
            let (a, b) = (self.model.get(n), now.model.get(n));
            if a != b {
                let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "absent".into());
                out.push(format!(
                    "the base model's {n} ({} in the checkpoint, {} now)",
                    show(a),
                    show(b)
                ));
            }
        }
        if self.train_data != now.train_data {
            out.push(format!(
                "the training data ({} in the checkpoint, {} now)",
                self.train_data, now.train_data
            ));
        }
        out
    }
}

/// Deletes the oldest complete checkpoints of `run_dir` so that at most `keep` remain (0
/// keeps all), as TRL's `save_total_limit`. The newest, which a resume continues from, is
/// never deleted, and nothing is deleted unless the newest verifies: a damaged newest
/// checkpoint leaves the older ones to resume from. Returns what was deleted.
pub fn rotate(run_dir: &Path, keep: u64) -> Result<Vec<PathBuf>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let all = all(run_dir)?;
    let Some(newest) = all.last() else {
        return Ok(Vec::new());
    };
    if verify(newest).is_err() {
        return Ok(Vec::new());
    }
    let excess = all
        .len()
        .saturating_sub(usize::try_from(keep).unwrap_or(usize::MAX));
    let mut removed = Vec::new();
    for old in &all[..excess] {
        // Renamed out of the checkpoint-N namespace first, so that an interrupted deletion
        // never leaves a partial directory that looks like a checkpoint.
        let name = old.file_name().unwrap_or_default().to_string_lossy();
        let doomed = run_dir.join(format!(".{name}.old"));
        if doomed.exists() {
            fs::remove_dir_all(&doomed)
                .map_err(|e| crate::files::io_error(&doomed, "cannot remove", e))?;
        }
        fs::rename(old, &doomed).map_err(|e| crate::files::io_error(old, "cannot remove", e))?;
        fs::remove_dir_all(&doomed)
            .map_err(|e| crate::files::io_error(&doomed, "cannot remove", e))?;
        removed.push(old.clone());
    }
    Ok(removed)
}

/// The medvlm command whose output `dir` holds: its [`files::OUTPUT_MARKER`], else (run
/// directories written before the marker existed) the kind of its newest checkpoint, as
/// `train grpo`.
pub fn output_command(dir: &Path) -> Option<String> {
    files::marked_command(dir).or_else(|| {
        let newest = latest(dir).ok().flatten()?;
        let text = fs::read_to_string(newest.join("trainer_state.json")).ok()?;
        let state: TrainerState = serde_json::from_str(&text).ok()?;
        Some(format!("train {}", state.kind))
    })
}

use crate::files;

/// Free space on the file system that would hold `path` (its nearest existing ancestor).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn free_disk_bytes(path: &Path) -> Option<u128> {
    use std::os::unix::ffi::OsStrExt;
    let mut dir = path;
    while !dir.exists() {
        dir = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call; `st` is writable and
    // statvfs writes only within it.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u128 * st.f_frsize as u128)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn free_disk_bytes(_path: &Path) -> Option<u128> {
    None
}

/// Bytes in words: "3.2 GB".
pub fn human_bytes(b: u128) -> String {
    let b = b as f64;
    if b >= 1e12 {
        format!("{:.1} TB", b / 1e12)
    } else if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else {
        format!("{:.1} MB", b / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_see_content_not_just_size() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        fs::write(&p, vec![1u8; 100]).unwrap();
        let a = file_digest(&p, true).unwrap();
        fs::write(&p, [vec![1u8; 99], vec![2u8]].concat()).unwrap();
        let b = file_digest(&p, true).unwrap();
        assert!(a.starts_with("size 100, hash ") && a != b, "{a} {b}");
        // Large files by sample: a change inside a sampled window is seen.
        let big = (HASH_WHOLE_UP_TO + 4096) as usize;
        let mut bytes = vec![0u8; big];
        fs::write(&p, &bytes).unwrap();
        let a = file_digest(&p, false).unwrap();
        bytes[big - 10] = 7;
        fs::write(&p, &bytes).unwrap();
        let b = file_digest(&p, false).unwrap();
        assert!(a.contains("sampled hash") && a != b, "{a} {b}");
    }

    #[test]
    fn rotation_keeps_the_newest_and_only_complete_checkpoints_count() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        // Minimal complete checkpoints: a trainer state, an optimizer file that verifies.
        for step in 1..=4u64 {
            let c = d.join(checkpoint_name(step));
            fs::create_dir(&c).unwrap();
            let state = TrainerState {
                kind: "sft".into(),
                step,
                total_steps: 4,
                seed: 0,
                items_seen: step,
                config_hash: String::new(),
                settings: None,
                inputs: None,
            };
            fs::write(
                c.join("trainer_state.json"),
                serde_json::to_string(&state).unwrap(),
            )
            .unwrap();
            let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
            crate::files::save_safetensors(
                &HashMap::from([("m".to_string(), t)]),
                &c.join("optimizer.safetensors"),
            )
            .unwrap();
        }
        assert!(rotate(d, 0).unwrap().is_empty(), "0 keeps all");
        let removed = rotate(d, 2).unwrap();
        assert_eq!(removed.len(), 2);
        let left: Vec<u64> = all(d)
            .unwrap()
            .iter()
            .map(|p| {
                p.file_name().unwrap().to_string_lossy()[11..]
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(left, vec![3, 4]);
        // A damaged newest checkpoint: nothing older is deleted.
        fs::write(
            d.join(checkpoint_name(4)).join("optimizer.safetensors"),
            "x",
        )
        .unwrap();
        assert!(rotate(d, 1).unwrap().is_empty());
        assert_eq!(all(d).unwrap().len(), 2);
    }
}
