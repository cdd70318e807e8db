//! Reading a user's file whole, with bounds: only regular files, never more than the size the
//! file reports, and never more than a maximum for what the file is.
//!
//! Why: `std::fs::read` on `/dev/zero` or `/dev/urandom` never ends, on a FIFO it waits for a
//! writer forever, and `/proc` files report size 0 yet stream content. A huge (sparse) file would
//! be read into memory before anything looks at it. Every file medvlm reads whole from a path a
//! user gives (images, checkpoint side files, datasets) goes through [`read_bounded`].

use std::fs::{File, Metadata};
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Result};

/// Largest image file read (DICOM and NIfTI included), in bytes: 1 GiB. The largest raster
/// image accepted ([`super::image::MAX_IMAGE_PIXELS`], 179 megapixels) fits in far less when
/// compressed, and a 16-bit CT or MR volume of 512 x 512 x 2000 slices is 1 GiB; larger files
/// (4D series) are better cut to the slice first.
pub const MAX_IMAGE_FILE_BYTES: u64 = 1 << 30;

/// Largest checkpoint side file read (tokenizer.json, the JSON configs, the chat template):
/// 256 MiB. Qwen2-VL's tokenizer.json is 7 MB, the largest tokenizers in use about 35 MB.
pub const MAX_SIDE_FILE_BYTES: u64 = 256 << 20;

/// Largest dataset file read (a JSON list or JSON lines): 4 GiB, far above the VQA sets in use
/// (PubMedVision's largest file is under 1 GB), and a bound on what a sparse file can make us
/// allocate.
pub const MAX_DATA_FILE_BYTES: u64 = 4 << 30;

/// What kind of thing `meta` describes, for an error that says why it is not read.
fn kind_of(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

/// Whether `path` names a regular file: `Ok(false)` when nothing is there, an error naming the
/// file when something other than a regular file is (a directory, a device, a FIFO), so that a
/// caller looking for an optional file does not report "not found" for it.
pub fn is_regular_file(path: &Path, what: &str) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(true),
        Ok(meta) => Err(not_regular(path, &meta, what)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error(path, what, e)),
    }
}

fn not_regular(path: &Path, meta: &Metadata, what: &str) -> anyhow::Error {
    anyhow!(
        "{}: is {}, not a regular {what} file",
        path.display(),
        kind_of(meta)
    )
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!("{}: no such {what} file", path.display()),
        std::io::ErrorKind::PermissionDenied => {
            anyhow!(
                "{}: cannot read the {what} file: permission denied",
                path.display()
            )
        }
        _ => anyhow!("{}: cannot read the {what} file: {e}", path.display()),
    }
}

/// Opens without blocking: opening a FIFO for reading waits for a writer, and the file could
/// have been replaced by one after [`std::fs::metadata`] looked at it. Regular files ignore
/// the flag.
fn open(path: &Path) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    options.open(path)
}

/// Reads the regular file `path` whole, refusing anything else with one line that names the
/// file: a directory, device, FIFO or socket; a file larger than `max` bytes; a file that holds
/// more than the size it reports (as `/proc` files do, which report 0). `what` names the file's
/// role in errors ("image", "dataset", ...).
pub fn read_bounded(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    // Look before opening: opening a FIFO blocks, opening a device may have side effects.
    if !is_regular_file(path, what)? {
        bail!("{}: no such {what} file", path.display());
    }
    let file = open(path).map_err(|e| io_error(path, what, e))?;
    // The opened file's own metadata, in case the path changed since it was looked at.
    let meta = file.metadata().map_err(|e| io_error(path, what, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta, what));
    }
    let size = meta.len();
    if size > max {
        bail!(
            "{}: the {what} file is {size} bytes, more than the {max} medvlm reads",
            path.display()
        );
    }
    // One byte more than reported shows a file that streams more than its size says.
    let mut bytes = Vec::new();
    usize::try_from(size)
        .ok()
        .and_then(|n| n.checked_add(1))
        .and_then(|n| bytes.try_reserve_exact(n).ok())
        .ok_or_else(|| anyhow!("{}: not enough memory to read {size} bytes", path.display()))?;
    file.take(size + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, what, e))?;
    if bytes.len() as u64 > size {
        bail!(
            "{}: the {what} file holds more than the {size} bytes its size says (a special file, \
             such as one under /proc, or a file still being written), so it is not read",
            path.display()
        );
    }
    Ok(bytes)
}

/// [`read_bounded`] for a text file: the bytes must be UTF-8.
pub fn read_bounded_string(path: &Path, max: u64, what: &str) -> Result<String> {
    let bytes = read_bounded(path, max, what)?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{}: the {what} file is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.txt");
        std::fs::write(&p, b"hello").expect("write");
        assert_eq!(read_bounded(&p, 5, "test").expect("read"), b"hello");
        assert_eq!(read_bounded_string(&p, 100, "test").expect("read"), "hello");
        let err = read_bounded(&p, 4, "test").expect_err("over max");
        assert!(
            err.to_string().contains("5 bytes, more than the 4"),
            "{err}"
        );
    }

    #[test]
    fn missing_files_and_directories_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = read_bounded(&dir.path().join("nope"), 10, "image").expect_err("missing");
        assert!(err.to_string().contains("no such image file"), "{err}");
        let err = read_bounded(dir.path(), 10, "image").expect_err("directory");
        assert!(err.to_string().contains("is a directory"), "{err}");
        assert!(!is_regular_file(&dir.path().join("nope"), "x").expect("absent"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn devices_and_proc_files_are_refused() {
        let err = read_bounded(Path::new("/dev/zero"), 1 << 20, "image").expect_err("dev");
        assert!(err.to_string().contains("is a character device"), "{err}");
        // Reports size 0, holds the environment.
        let err =
            read_bounded(Path::new("/proc/self/environ"), 1 << 20, "image").expect_err("proc");
        assert!(
            err.to_string().contains("holds more than the 0 bytes"),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn invalid_utf8_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("b.json");
        std::fs::write(&p, b"{\"a\": \"\xff\"}").expect("write");
        let err = read_bounded_string(&p, 100, "config").expect_err("utf8");
        assert!(err.to_string().contains("offset 7"), "{err}");
    }
}
