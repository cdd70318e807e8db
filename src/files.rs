//! Writing files the way a user expects: permissions from their umask (other users of a
//! shared server can read a model), and errors that say what went wrong.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Result};
use candle_core::Tensor;

/// The process's umask (Linux: /proc/self/status), else the common 022.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Umask:"))
                .and_then(|l| u32::from_str_radix(l.split_whitespace().nth(1)?, 8).ok())
        })
        .unwrap_or(0o022)
}

/// Gives `path` the mode a plain `File::create` would (0666 minus the umask).
///
/// Why: the safetensors writer creates its file with mode 0600, so another user could not
/// read a checkpoint (and would be told it is "not a valid safetensors file").
pub fn set_default_mode(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !umask()))
            .map_err(|e| io_error(path, "cannot set permissions of", e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// An I/O error as one clause that names the file and says "permission denied" or "disk
/// full" plainly.
pub fn io_error(path: &Path, what: &str, e: std::io::Error) -> anyhow::Error {
    let why = match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        std::io::ErrorKind::StorageFull => "no space left on the device".to_string(),
        std::io::ErrorKind::NotFound => "no such file or directory".to_string(),
        _ => e.to_string(),
    };
    anyhow!("{}: {what} it: {why}", path.display())
}

/// Writes tensors as a safetensors file with the usual permissions.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path).map_err(|e| match e {
        candle_core::Error::Io(io) => io_error(path, "cannot write", io),
        other => anyhow!("{}: cannot write weights: {other}", path.display()),
    })?;
    set_default_mode(path)
}

/// Makes `out` ready to be written by a command that fills a whole directory: refuses a
/// non-empty one (a previous run's results) unless `force`, which empties it first.
pub fn prepare_output_dir(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        anyhow::bail!("{}: exists and is not a directory", out.display());
    }
    let non_empty = out.is_dir()
        && std::fs::read_dir(out)
            .map_err(|e| io_error(out, "cannot list", e))?
            .next()
            .is_some();
    if non_empty {
        if !force {
            anyhow::bail!(
                "{}: exists and is not empty (an earlier run's files would be overwritten or \
                 mixed with the new ones); choose a new directory, or pass --force to replace it",
                out.display()
            );
        }
        std::fs::remove_dir_all(out).map_err(|e| io_error(out, "cannot empty", e))?;
    }
    std::fs::create_dir_all(out).map_err(|e| io_error(out, "cannot create", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn safetensors_files_get_the_umask_mode_like_any_file() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let plain = d.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let st = d.path().join("w.safetensors");
        let t = Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        save_safetensors(&HashMap::from([("t".to_string(), t)]), &st).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&st), mode(&plain));
    }
}
