//! Writing files the way a user expects: permissions from their umask (other users of a
//! shared server can read a model), errors that say what went wrong, whole files or nothing
//! (atomic writes, staged directories), and output directories that never take in a user's
//! own files.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
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

// Output directories. Every command that fills a directory records which command it is in
// OUTPUT_MARKER, and writes into an existing directory only when it is empty or holds an
// earlier output of the same command: a user's files (a config, notes, an earlier
// evaluation, another command's output) are never overwritten or mixed in.

/// The file that names the medvlm command whose output a directory holds.
pub const OUTPUT_MARKER: &str = "medvlm-output.json";

/// The medvlm command `dir`'s [`OUTPUT_MARKER`] names, if it has one.
pub fn marked_command(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join(OUTPUT_MARKER)).ok()?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("command")?.as_str().map(String::from))
}

/// Records in `dir` that it holds `command`'s output.
pub fn mark_output(dir: &Path, command: &str) -> Result<()> {
    let v = serde_json::json!({
        "command": command,
        "written_by": format!("medvlm {}", env!("CARGO_PKG_VERSION")),
    });
    write_atomic(
        &dir.join(OUTPUT_MARKER),
        serde_json::to_string_pretty(&v)?.as_bytes(),
    )
}

/// A command whose output fills a directory.
#[derive(Debug, Clone, Copy)]
pub struct OutputSpec<'a> {
    /// The command as typed after `medvlm`: "train grpo", "data synth", "eval", "demo".
    pub command: &'a str,
    /// The flag (or config key) that named the directory, for messages: "--out".
    pub flag: &'a str,
    /// The names the command writes in it (`checkpoint-*` matches a prefix).
    pub entries: &'a [&'a str],
    /// Recognises outputs written before [`OUTPUT_MARKER`] existed (training runs, by their
    /// checkpoints); `None` trusts the marker alone.
    pub legacy: Option<fn(&Path) -> Option<String>>,
}

/// How a command treats an earlier output of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Earlier {
    /// Written over in place (a training run restarted, which replaces only its own files).
    Reuse,
    /// Replaced as a whole, only when the user passed `--force` (the bool).
    Replace { force: bool },
}

/// What an output directory holds before the command writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputState {
    /// Nothing: it is absent or empty.
    Fresh,
    /// An earlier output of the same command, which may be written over.
    Earlier,
}

/// The temporary names medvlm's own writers leave beside their output while they work.
fn is_medvlm_temporary(name: &str) -> bool {
    name.starts_with('.')
        && [".tmp", ".init", ".merge", ".synth", ".old"]
            .iter()
            .any(|s| name.ends_with(s))
}

fn matches_entry(name: &str, patterns: &[&str]) -> bool {
    name == OUTPUT_MARKER
        || is_medvlm_temporary(name)
        || patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == *p,
        })
}

/// Checks, before any work, that `dir` may receive `spec.command`'s output: it is absent,
/// empty, or holds an earlier output of the same command that `earlier` allows to be
/// written over. Creates nothing.
pub fn check_output_dir(dir: &Path, spec: &OutputSpec, earlier: Earlier) -> Result<OutputState> {
    let (flag, command, shown) = (spec.flag, spec.command, dir.display());
    if !dir.exists() {
        return Ok(OutputState::Fresh);
    }
    if !dir.is_dir() {
        bail!("{flag} {shown}: exists and is not a directory");
    }
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(|e| io_error(dir, "cannot list", e))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .collect();
    names.sort();
    if names.is_empty() {
        return Ok(OutputState::Fresh);
    }
    let some = |list: &[String]| {
        let mut s = list.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
        if list.len() > 4 {
            s.push_str(&format!(" and {} more", list.len() - 4));
        }
        s
    };
    let found = marked_command(dir).or_else(|| spec.legacy.and_then(|f| f(dir)));
    match found {
        Some(c) if c == command => match earlier {
            Earlier::Reuse => Ok(OutputState::Earlier),
            Earlier::Replace { force: false } => bail!(
                "{flag} {shown}: holds an earlier `medvlm {command}` output; pass --force to \
                 replace it, or choose a new directory"
            ),
            Earlier::Replace { force: true } => {
                let foreign: Vec<String> = names
                    .into_iter()
                    .filter(|n| !matches_entry(n, spec.entries))
                    .collect();
                if !foreign.is_empty() {
                    bail!(
                        "{flag} {shown}: also holds files `medvlm {command}` does not write ({}); \
                         --force replaces only medvlm's own output: move them out, or choose a \
                         new directory",
                        some(&foreign)
                    );
                }
                Ok(OutputState::Earlier)
            }
        },
        Some(other) => bail!(
            "{flag} {shown}: holds the output of `medvlm {other}`, which `medvlm {command}` \
             would overwrite or mix with its own; choose a new or empty directory"
        ),
        None => bail!(
            "{flag} {shown}: exists, is not empty ({}) and is no `medvlm {command}` output (it \
             has no {OUTPUT_MARKER}), so its files could be overwritten; choose a new or empty \
             directory",
            some(&names)
        ),
    }
}

/// Writes a file atomically: into a temporary file beside it, flushed, then renamed into
/// place, so a reader (or a crash) never sees it half-written.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_error(path, "cannot write", e));
    }
    Ok(())
}

/// A directory a command fills beside its output (`.NAME.TAG`) and then moves into place:
/// the output never exists half-written, and a failure on any path removes it (on drop).
pub struct Staging {
    dir: PathBuf,
    committed: bool,
}

impl Staging {
    /// An empty `.NAME.TAG` beside `out` (the parent created when missing; a leftover of a
    /// killed earlier attempt cleared).
    pub fn beside(out: &Path, tag: &str) -> Result<Self> {
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = out
            .file_name()
            .with_context(|| format!("{}: the output needs a directory name", out.display()))?
            .to_string_lossy();
        fs::create_dir_all(parent).map_err(|e| io_error(parent, "cannot create", e))?;
        let dir = parent.join(format!(".{name}.{tag}"));
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| io_error(&dir, "cannot clear", e))?;
        }
        fs::create_dir(&dir).map_err(|e| io_error(&dir, "cannot create", e))?;
        Ok(Self {
            dir,
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves the staged directory to `out`, replacing what is there (an earlier output the
    /// caller has checked may go: it is removed only once the new one is in place).
    pub fn commit(mut self, out: &Path) -> Result<PathBuf> {
        if out.exists() {
            let old = self.dir.with_extension("old");
            if old.exists() {
                fs::remove_dir_all(&old).map_err(|e| io_error(&old, "cannot clear", e))?;
            }
            fs::rename(out, &old).map_err(|e| io_error(out, "cannot replace", e))?;
            if let Err(e) = fs::rename(&self.dir, out) {
                let _ = fs::rename(&old, out);
                return Err(io_error(out, "cannot move into place", e));
            }
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(&self.dir, out).map_err(|e| io_error(out, "cannot move into place", e))?;
        }
        self.committed = true;
        Ok(out.to_path_buf())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYNTH: OutputSpec = OutputSpec {
        command: "data synth",
        flag: "--out",
        entries: &["data.json", "images"],
        legacy: None,
    };

    #[test]
    fn output_dirs_take_only_their_own_earlier_output() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("out");
        let check = |e| check_output_dir(&d, &SYNTH, e);
        assert_eq!(check(Earlier::Reuse).unwrap(), OutputState::Fresh);
        fs::create_dir(&d).unwrap();
        assert_eq!(check(Earlier::Reuse).unwrap(), OutputState::Fresh);
        // A user's file, no marker: refused even with --force, naming the file.
        fs::write(d.join("notes.txt"), "mine").unwrap();
        let e = check(Earlier::Replace { force: true })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--out") && e.contains("notes.txt") && e.contains("not empty"),
            "{e}"
        );
        // Another command's output.
        mark_output(&d, "eval").unwrap();
        let e = check(Earlier::Replace { force: true })
            .unwrap_err()
            .to_string();
        assert!(e.contains("`medvlm eval`"), "{e}");
        // Its own output: --force needed, and only medvlm's names may be in it.
        mark_output(&d, "data synth").unwrap();
        let e = check(Earlier::Replace { force: false })
            .unwrap_err()
            .to_string();
        assert!(e.contains("--force"), "{e}");
        let e = check(Earlier::Replace { force: true })
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not write (notes.txt)"), "{e}");
        fs::remove_file(d.join("notes.txt")).unwrap();
        fs::create_dir(d.join("images")).unwrap();
        fs::write(d.join(".images.123.tmp"), "").unwrap();
        assert_eq!(
            check(Earlier::Replace { force: true }).unwrap(),
            OutputState::Earlier
        );
        assert_eq!(check(Earlier::Reuse).unwrap(), OutputState::Earlier);
        // A file where the directory should be.
        let f = t.path().join("file");
        fs::write(&f, "x").unwrap();
        let e = check_output_dir(&f, &SYNTH, Earlier::Reuse)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a directory"), "{e}");
    }

    #[test]
    fn staging_is_removed_unless_committed_and_replaces_on_commit() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("sub/out");
        {
            let s = Staging::beside(&out, "synth").unwrap();
            fs::write(s.path().join("a"), "1").unwrap();
            assert!(t.path().join("sub/.out.synth/a").is_file());
        }
        assert!(
            !t.path().join("sub/.out.synth").exists(),
            "dropped uncommitted"
        );
        let s = Staging::beside(&out, "synth").unwrap();
        fs::write(s.path().join("a"), "1").unwrap();
        s.commit(&out).unwrap();
        let s = Staging::beside(&out, "synth").unwrap();
        fs::write(s.path().join("b"), "2").unwrap();
        s.commit(&out).unwrap();
        assert!(out.join("b").is_file() && !out.join("a").exists());
        let left: Vec<_> = fs::read_dir(t.path().join("sub")).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary left beside the output");
    }

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
