//! Images in requests: `data:` URLs (PNG, JPEG, ... and DICOM/NIfTI bytes), and local files
//! only under the directory the operator allowed (`--allowed-local-media-path`). Nothing is
//! fetched from the network, and no other file of the server can be read through a request.

use std::path::{Component, Path, PathBuf};

use base64::Engine as _;

use super::api::ImageRef;
use super::error::ApiError;

/// Where local images may come from.
#[derive(Debug, Clone, Default)]
pub struct MediaPolicy {
    /// Canonical directory; `None` refuses every local path.
    pub allowed: Option<PathBuf>,
    /// Largest image accepted, in bytes.
    pub max_bytes: usize,
}

impl MediaPolicy {
    /// `dir` must exist; it is canonicalised so symbolic links cannot lead out of it.
    pub fn new(dir: Option<&Path>, max_bytes: usize) -> anyhow::Result<Self> {
        let allowed =
            match dir {
                Some(d) => Some(std::fs::canonicalize(d).map_err(|e| {
                    anyhow::anyhow!("--allowed-local-media-path {}: {e}", d.display())
                })?),
                None => None,
            };
        if let Some(a) = &allowed {
            if !a.is_dir() {
                anyhow::bail!(
                    "--allowed-local-media-path {}: not a directory",
                    a.display()
                );
            }
        }
        Ok(Self { allowed, max_bytes })
    }

    /// The bytes of an image reference.
    pub fn read(&self, r: &ImageRef) -> Result<Vec<u8>, ApiError> {
        let url = r.url.trim();
        let err = |m: String| ApiError::param(&r.param, format!("{}: {m}", r.param));
        if let Some(rest) = url.strip_prefix("data:") {
            let (meta, data) = rest
                .split_once(',')
                .ok_or_else(|| err("a data URL needs a comma before its data".into()))?;
            if !meta.ends_with(";base64") {
                return Err(err(
                    "only base64 data URLs are supported (data:image/png;base64,...)".into(),
                ));
            }
            // Base64 grows data by 4/3: refuse before decoding what would be too large.
            if data.len() / 4 * 3 > self.max_bytes + 3 {
                return Err(err(format!(
                    "the image is larger than the limit of {} bytes",
                    self.max_bytes
                )));
            }
            let data: String = data.split_ascii_whitespace().collect();
            return base64::engine::general_purpose::STANDARD
                .decode(data.as_bytes())
                .map_err(|e| err(format!("the data URL is not valid base64: {e}")));
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return Err(err(
                "this server does not fetch images from the network; send the image as a \
                 base64 data URL (data:image/png;base64,...)"
                    .into(),
            ));
        }
        let path = match url.strip_prefix("file://") {
            Some(p) => PathBuf::from(percent_decode(p).map_err(err)?),
            None if url.contains("://") => {
                return Err(err(
                    "unsupported URL scheme; use a data: URL or a local path".into(),
                ))
            }
            None => PathBuf::from(url),
        };
        let Some(root) = &self.allowed else {
            return Err(err(
                "local image paths are refused: the server was started without \
                 --allowed-local-media-path; send the image as a base64 data URL"
                    .into(),
            ));
        };
        let outside = || {
            err(format!(
                "{} is outside the allowed media directory {}",
                path.display(),
                root.display()
            ))
        };
        // First the path as written (no `..` out of the root), then the file it really is
        // (symbolic links resolved), so neither can escape the root.
        let joined = normalize(&root.join(&path)).ok_or_else(outside)?;
        if !joined.starts_with(root) {
            return Err(outside());
        }
        let real =
            std::fs::canonicalize(&joined).map_err(|e| err(format!("{}: {e}", path.display())))?;
        if !real.starts_with(root) {
            return Err(outside());
        }
        let meta = std::fs::metadata(&real).map_err(|e| err(format!("{}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(err(format!("{}: not a file", path.display())));
        }
        if meta.len() > self.max_bytes as u64 {
            return Err(err(format!(
                "{}: the image is larger than the limit of {} bytes",
                path.display(),
                self.max_bytes
            )));
        }
        std::fs::read(&real).map_err(|e| err(format!("{}: {e}", path.display())))
    }
}

/// `a/./b/../c` to `a/c` without touching the file system; `None` when `..` climbs above
/// the start.
fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

/// `%20` and friends in a `file://` URL.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 after decoding"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(url: &str) -> ImageRef {
        ImageRef {
            param: "messages[0].content[0].image_url".into(),
            url: url.into(),
        }
    }

    #[test]
    fn local_paths_stay_inside_the_allowed_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("media");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a b.png"), b"png").unwrap();
        std::fs::write(tmp.path().join("secret.txt"), b"secret").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(tmp.path().join("secret.txt"), root.join("link")).unwrap();
        let p = MediaPolicy::new(Some(&root), 1000).unwrap();
        let real = std::fs::canonicalize(&root).unwrap();
        assert_eq!(p.read(&r("sub/a b.png")).unwrap(), b"png");
        let url = format!("file://{}/sub/a%20b.png", real.display());
        assert_eq!(p.read(&r(&url)).unwrap(), b"png");
        for bad in [
            "../secret.txt".to_string(),
            "sub/../../secret.txt".into(),
            tmp.path().join("secret.txt").display().to_string(),
            format!("file://{}/../secret.txt", real.display()),
            "/etc/passwd".into(),
            "link".into(),
        ] {
            let e = p.read(&r(&bad)).unwrap_err();
            assert!(e.message.contains("outside"), "{bad}: {}", e.message);
        }
        let none = MediaPolicy::new(None, 1000).unwrap();
        assert!(none
            .read(&r("sub/a b.png"))
            .unwrap_err()
            .message
            .contains("refused"));
        assert!(none
            .read(&r("https://x/y.png"))
            .unwrap_err()
            .message
            .contains("network"));
    }

    #[test]
    fn data_urls_decode_and_are_size_checked() {
        let p = MediaPolicy::new(None, 10).unwrap();
        assert_eq!(
            p.read(&r("data:image/png;base64,aGVsbG8=")).unwrap(),
            b"hello"
        );
        assert!(p.read(&r("data:image/png,hello")).is_err());
        assert!(p.read(&r("data:image/png;base64,@@@")).is_err());
        let big = format!("data:application/dicom;base64,{}", "A".repeat(40));
        assert!(p.read(&r(&big)).unwrap_err().message.contains("larger"));
    }
}
