//! DICOM and NIfTI files to 8-bit RGB pictures, so that scans can be shown to the model
//! anywhere an image is accepted ([`load_rgb`](super::load_rgb) dispatches here).
//!
//! A medical file holds measured values (CT Hounsfield units, MR intensities, 12- or 16-bit
//! samples, floats), often in several frames or slices; a picture is one 8-bit slice. How it
//! becomes one, in order:
//!
//! 1. **Which slice.** [`MedicalOptions::slice`], else the middle one: the middle frame
//!    (`frames / 2`) of a multi-frame DICOM file; for NIfTI the middle index along the third
//!    voxel axis (`nz / 2`) of the first volume (t = 0) of 4D data.
//! 2. **Values.** DICOM: the stored samples (unused high bits masked, or sign-extended for
//!    signed data, as pydicom does), then the modality LUT `x * RescaleSlope + RescaleIntercept`
//!    (when both are present, at top level or in the enhanced multi-frame functional groups).
//!    NIfTI: `x * scl_slope + scl_inter` when `scl_slope` is finite and non-zero.
//! 3. **Window** (grey only): [`MedicalOptions::window`] (centre, width) with the `LINEAR`
//!    function; else the DICOM file's first Window Center/Width with its VOI LUT Function
//!    (`LINEAR`, `LINEAR_EXACT`, `SIGMOID`); else the slice's own min..max. NIfTI files have no
//!    window of their own (`cal_min`/`cal_max` are ignored), so min..max is their default.
//!    The exact formulas and the rounding (half up) are in [`window`].
//! 4. **Picture.** `MONOCHROME1` is inverted after windowing; grey is replicated into R, G and
//!    B. Colour DICOM (RGB, YBR_FULL, YBR_FULL_422, either planar configuration) becomes RGB
//!    as pydicom's `pixel_array` gives it, windows do not apply to it.
//!
//! DICOM transfer syntaxes decoded: implicit and explicit VR little endian, explicit VR big
//! endian, deflated explicit VR little endian, RLE Lossless (dicom-rs), JPEG Baseline (8-bit,
//! libjpeg-turbo, so equal to pydicom with Pillow), JPEG Extended 12-bit (grey, our own decoder
//! in `jpeg.rs`, equal to IJG libjpeg / GDCM), and JPEG Lossless through dicom-rs'
//! jpeg-decoder (no fixture covers it). Everything else (JPEG 2000, JPEG-LS, JPEG XL, HTJ2K,
//! video) is an error naming the transfer syntax UID and its name. Not supported either:
//! `PALETTE COLOR`, float pixel data, Modality LUT and VOI LUT *sequences* (tables; the
//! rescale and window attributes are used, a table is ignored), NIfTI-2, NIfTI RGB/complex.
//!
//! Every error is one line naming the file; decoders that might panic on hostile input
//! (dicom-rs' RLE decoder does on some corrupt data) run under `catch_unwind`, and the panic's
//! message becomes part of the error.
//!
//! **Hostile files** are refused before anything is allocated by what they declare, and
//! before any recursive parse (a stack overflow cannot be caught: it aborts the process):
//!
//! - DICOM: an iterative walk over the element structure (`scan.rs`) runs before dicom-rs
//!   parses the file. It refuses sequences nested more than 128 deep (`scan::MAX_DEPTH`),
//!   any element, sequence, item or fragment length beyond the bytes present (or beyond its
//!   enclosing sequence or item), a deflated data set inflating past 512 MiB
//!   (`scan::MAX_INFLATED`). Then the header: Rows x Columns within `MAX_IMAGE_PIXELS`,
//!   Bits Allocated 1/8/16/32, 1 or 3 samples, native pixel data at least as long as all
//!   the frames declared (as pydicom requires), a fragment per frame at least, and for JPEG
//!   Lossless (decoded by dicom-rs) a JPEG frame header of the DICOM image's size.
//! - NIfTI: every header field used is checked first: dim[] (1..32767, their product in 64
//!   bits), datatype and bitpix agreeing, vox_offset finite, non-negative and, with the
//!   volume after it, within the file (a `.hdr`'s `.img` by its size). A `.nii.gz` is
//!   inflated only as far as the header's volume and 64 KiB beyond, never into memory
//!   beyond the one slice.
//!
//! [`decode_cost`] runs the same checks and bounds the memory of a decode from them.
//!
//! The reference for all of this is `tools/make_medical_fixtures.py` (pydicom, nibabel), and
//! `tests/suite/medical.rs` compares against its pictures.

mod dicom;
mod jpeg;
mod nifti;
mod scan;
pub mod window;

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, bail, Result};
use image::RgbImage;

use self::window::Window;

/// How a medical volume becomes an 8-bit picture.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MedicalOptions {
    /// VOI window (centre, width) overriding the file's, applied with DICOM's `LINEAR`
    /// function (width at least 1); `None` = the file's own window, else the full range of the
    /// (rescaled) data (min..max). Grey images only.
    pub window: Option<(f64, f64)>,
    /// Slice index for 3D/4D volumes (NIfTI: along the third voxel axis, in the first volume;
    /// multi-frame DICOM: the frame); `None` = the middle slice (`n / 2`).
    pub slice: Option<usize>,
}

/// The grey values of one slice after the modality LUT (DICOM Rescale Slope/Intercept, NIfTI
/// scl_slope/scl_inter) and before any window: CT in Hounsfield units, for instance. Row-major,
/// in the orientation of the picture.
#[derive(Debug, Clone, PartialEq)]
pub struct MedicalValues {
    pub width: u32,
    pub height: u32,
    pub values: Vec<f64>,
}

/// Whether `load_rgb` reads this file as DICOM or NIfTI: "DICM" at byte 128 (or at byte 0,
/// a file without preamble), the NIfTI magic (`n+1`/`ni1` at byte 344, also inside gzip
/// data; NIfTI-2's `n+2`, which is then refused with a clear error), a `.nii`/`.nii.gz` name,
/// or a `.dcm`/`.dicom` name on bytes that are not an ordinary image format (a bare DICOM data
/// set without preamble and file meta is read as such; anything else fails as DICOM, with a
/// DICOM error rather than "not an image").
pub fn is_medical(path: &Path, bytes: &[u8]) -> bool {
    kind(path, bytes).is_some()
}

/// The memory decoding `bytes` (a DICOM or NIfTI file) takes at most, in bytes, beyond the
/// bytes themselves, from its header alone (no pixel is decoded): the decoder's own copies
/// and buffers, the pixels as decoded, the f64 plane and the RGB picture. An error when the
/// header is refused, as the decode would refuse it (the checks are the decode's own).
/// Callers admit decodes by it (the server runs several at once).
///
/// "Header" is the whole element structure for DICOM: the structure walk that guards the
/// decoder (`scan.rs`) runs here too, which for a deflated data set means inflating it (to
/// nothing: no memory, but the time). NIfTI reads only its 348-byte header (for `.nii.gz`
/// through gzip) and, for a `.hdr`, the size of the `.img` beside it. Errors do not name
/// the file (the caller does, as for `decode_medical`).
pub fn decode_cost(path: &Path, bytes: &[u8]) -> Result<u64> {
    match kind(path, bytes) {
        Some(Kind::Dicom) => guarded("DICOM", || dicom::decode_cost(bytes)),
        Some(Kind::Nifti) => guarded("NIfTI", || nifti::decode_cost(path, bytes)),
        None => bail!("not a DICOM or NIfTI file"),
    }
}

/// Reads a DICOM or NIfTI file as an 8-bit RGB picture (see the module docs).
pub fn load_medical(path: &Path, opts: &MedicalOptions) -> Result<RgbImage> {
    let bytes = super::read_file(path)?;
    decode_medical(path, &bytes, opts).map_err(|e| name_file(path, &e))
}

/// The grey values of the slice `load_medical` would show, after the modality LUT and before
/// windowing. An error for colour images.
pub fn load_medical_values(path: &Path, opts: &MedicalOptions) -> Result<MedicalValues> {
    let bytes = super::read_file(path)?;
    let plane = read_plane(path, &bytes, opts).map_err(|e| name_file(path, &e))?;
    match plane {
        Plane::Grey(g) => Ok(MedicalValues {
            width: g.width,
            height: g.height,
            values: g.values,
        }),
        Plane::Rgb(_) => bail!(
            "{}: a colour image has no grey values before windowing",
            path.display()
        ),
    }
}

/// What `load_medical` shows of a file, in words: the format, the slice's size, which
/// slice and which window (the user's, the file's, or the data's min..max) — for `ask` to
/// say what the model saw. `None` for ordinary images.
pub fn describe(path: &Path, opts: &MedicalOptions) -> Result<Option<String>> {
    let bytes = super::read_file(path)?;
    let Some(k) = kind(path, &bytes) else {
        return Ok(None);
    };
    let plane = read_plane(path, &bytes, opts).map_err(|e| name_file(path, &e))?;
    let format = match k {
        Kind::Dicom => "DICOM",
        Kind::Nifti => "NIfTI",
    };
    let slice = match opts.slice {
        Some(n) => format!("slice {n} (--slice)"),
        None => "the middle slice (or the only one)".to_string(),
    };
    Ok(Some(match plane {
        Plane::Rgb(rgb) => format!(
            "{format}, colour, {}x{}, {slice}",
            rgb.width(),
            rgb.height()
        ),
        Plane::Grey(g) => {
            let window = match (opts.window, g.window) {
                (Some((c, w)), _) => format!("window centre {c} / width {w} (--window)"),
                (None, Some(w)) => format!(
                    "window centre {} / width {} ({:?}, from the file)",
                    w.center, w.width, w.function
                ),
                (None, None) => {
                    let (lo, hi) = g
                        .values
                        .iter()
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                            (a.min(v), b.max(v))
                        });
                    format!("no window in the file: the data's range {lo}..{hi}")
                }
            };
            let inverted = if g.invert {
                ", MONOCHROME1 inverted"
            } else {
                ""
            };
            format!(
                "{format}, grey, {}x{}, {slice}, {window}{inverted}",
                g.width, g.height
            )
        }
    }))
}

/// Several slices of a volume shown to the model as several images: a 3-D scan as input.
/// Qwen2-VL takes them as separate images (each its own vision tokens), in slice order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slices {
    /// `N` slices evenly spaced through the volume: the middle slice of each of `N` equal
    /// parts (slice `floor((2k + 1) * count / 2N)` for k = 0..N), so `N = 1` is the middle
    /// slice, the single-image default.
    Evenly(usize),
    /// These slice indices, in this order.
    List(Vec<usize>),
}

/// Most slices one volume may become: each is a whole image to the model (at least 4
/// vision tokens, usually hundreds), and the prompt's token limit applies to them all.
pub const MAX_SLICES: usize = 64;

/// Most files a DICOM series directory may hold (CT series reach a few thousand slices).
pub const MAX_SERIES_FILES: usize = 8192;

impl Slices {
    /// `N` (evenly spaced) or a comma-separated list of indices (`10,20,30`).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        let spec = if s.contains(',') {
            let list = s
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse::<usize>()
                        .map_err(|_| anyhow!("{x:?} is not a slice index (a whole number from 0)"))
                })
                .collect::<Result<Vec<_>>>()?;
            Slices::List(list)
        } else {
            let n = s.parse::<usize>().map_err(|_| {
                anyhow!("{s:?} is neither a number of slices nor a list of indices (10,20,30)")
            })?;
            Slices::Evenly(n)
        };
        let n = match &spec {
            Slices::Evenly(n) => *n,
            Slices::List(l) => l.len(),
        };
        if n == 0 || n > MAX_SLICES {
            bail!("from 1 to {MAX_SLICES} slices may be shown, got {n}");
        }
        Ok(spec)
    }

    /// The slice indices for a volume of `count` slices.
    pub fn indices(&self, count: usize) -> Result<Vec<usize>> {
        match self {
            Slices::Evenly(n) => {
                if *n > count {
                    bail!("{n} slices asked for, but the volume has {count}");
                }
                Ok((0..*n)
                    .map(|k| ((2 * k + 1) as u128 * count as u128 / (2 * *n) as u128) as usize)
                    .collect())
            }
            Slices::List(l) => {
                if let Some(bad) = l.iter().find(|&&i| i >= count) {
                    bail!(
                        "slice {bad} is out of range: the volume has {count} slice(s) (valid \
                         slices: 0..={})",
                        count.saturating_sub(1)
                    );
                }
                Ok(l.clone())
            }
        }
    }
}

/// The files of a DICOM series directory in slice order: by Instance Number, then by name
/// (files without one after those with one). Every regular file in it must be DICOM.
pub fn series_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| anyhow!("{}: cannot list: {e}", dir.display()))? {
        let e = e.map_err(|e| anyhow!("{}: cannot list: {e}", dir.display()))?;
        let path = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        // Hidden files and the DICOMDIR index are not slices.
        if name.starts_with('.') || name.eq_ignore_ascii_case("DICOMDIR") || !path.is_file() {
            continue;
        }
        files.push(path);
        if files.len() > MAX_SERIES_FILES {
            bail!(
                "{}: more than {MAX_SERIES_FILES} files; a DICOM series directory holds one \
                 series",
                dir.display()
            );
        }
    }
    if files.is_empty() {
        bail!("{}: an empty directory, not a DICOM series", dir.display());
    }
    let mut keyed = Vec::with_capacity(files.len());
    for f in files {
        // A directory where an image was expected: say how it was read.
        let bytes = super::read_file(&f).map_err(|e| {
            anyhow!(
                "{} (read as a DICOM series directory): {}",
                dir.display(),
                super::one_line(&e)
            )
        })?;
        if kind(&f, &bytes) != Some(Kind::Dicom) {
            bail!(
                "{}: not a DICOM file; a series directory holds only the series' DICOM files",
                f.display()
            );
        }
        let number =
            guarded("DICOM", || dicom::instance_number(&bytes)).map_err(|e| name_file(&f, &e))?;
        keyed.push((number.is_none(), number, f));
    }
    keyed.sort();
    Ok(keyed.into_iter().map(|(_, _, f)| f).collect())
}

/// One slice of a DICOM series directory: `opts.slice`, else the middle file.
pub fn load_series_slice(dir: &Path, opts: &MedicalOptions) -> Result<RgbImage> {
    let files = series_files(dir)?;
    let k = opts.slice.unwrap_or(files.len() / 2);
    let Some(file) = files.get(k) else {
        bail!(
            "{}: slice {k} is out of range: the series has {} file(s) (valid slices: 0..={})",
            dir.display(),
            files.len(),
            files.len() - 1
        );
    };
    load_medical(
        file,
        &MedicalOptions {
            slice: None,
            ..opts.clone()
        },
    )
}

/// Slices in a volume: along the third axis of a NIfTI file (its first volume), the frames
/// of a DICOM file, the files of a DICOM series directory. From headers alone.
pub fn slice_count(path: &Path) -> Result<usize> {
    if path.is_dir() {
        return Ok(series_files(path)?.len());
    }
    let bytes = super::read_file(path)?;
    match kind(path, &bytes) {
        Some(Kind::Dicom) => guarded("DICOM", || dicom::slice_count(&bytes)),
        Some(Kind::Nifti) => guarded("NIfTI", || nifti::slice_count(&bytes)),
        None => bail!("not a DICOM or NIfTI file, so it has no slices"),
    }
    .map_err(|e| name_file(path, &e))
}

/// The slices `spec` names of a volume (a NIfTI file, a multi-frame DICOM file or a DICOM
/// series directory) as pictures, each with its index, windowed as `opts` says
/// (`opts.slice` is ignored). Each slice is decoded on its own, as [`load_medical`] would
/// show it with `--slice`.
pub fn load_slices(
    path: &Path,
    opts: &MedicalOptions,
    spec: &Slices,
) -> Result<Vec<(usize, RgbImage)>> {
    let series = if path.is_dir() {
        Some(series_files(path)?)
    } else {
        None
    };
    let count = match &series {
        Some(files) => files.len(),
        None => slice_count(path)?,
    };
    let indices = spec
        .indices(count)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let bytes = match &series {
        Some(_) => Vec::new(),
        None => super::read_file(path)?,
    };
    indices
        .into_iter()
        .map(|k| {
            let picture = match &series {
                Some(files) => load_medical(
                    &files[k],
                    &MedicalOptions {
                        slice: None,
                        ..opts.clone()
                    },
                )?,
                None => decode_medical(
                    path,
                    &bytes,
                    &MedicalOptions {
                        slice: Some(k),
                        ..opts.clone()
                    },
                )
                .map_err(|e| name_file(path, &e))?,
            };
            Ok((k, picture))
        })
        .collect()
}

/// [`load_medical`] on bytes already read; errors do not name the file (the caller does).
/// `path` decides by its name when the bytes do not (see [`is_medical`]) and locates the
/// `.img` of a NIfTI `.hdr`.
pub(super) fn decode_medical(path: &Path, bytes: &[u8], opts: &MedicalOptions) -> Result<RgbImage> {
    let plane = read_plane(path, bytes, opts)?;
    render(plane, opts)
}

fn name_file(path: &Path, e: &anyhow::Error) -> anyhow::Error {
    anyhow!("{}: {}", path.display(), super::one_line(e))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dicom,
    Nifti,
}

fn kind(path: &Path, bytes: &[u8]) -> Option<Kind> {
    if dicom::has_magic(bytes) {
        return Some(Kind::Dicom);
    }
    if nifti::has_magic(bytes) {
        return Some(Kind::Nifti);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        return Some(Kind::Nifti);
    }
    let dicom_name = name.ends_with(".dcm") || name.ends_with(".dicom");
    if dicom::looks_like_dataset(bytes) || (dicom_name && image::guess_format(bytes).is_err()) {
        // A bare data set is only taken for DICOM under a DICOM name.
        return dicom_name.then_some(Kind::Dicom);
    }
    None
}

/// One decoded slice, before it becomes 8-bit.
#[derive(Debug, Clone)]
enum Plane {
    Grey(GreyPlane),
    Rgb(RgbImage),
}

#[derive(Debug, Clone)]
struct GreyPlane {
    width: u32,
    height: u32,
    /// After the modality LUT, row-major.
    values: Vec<f64>,
    /// The file's own window, if valid.
    window: Option<Window>,
    /// MONOCHROME1.
    invert: bool,
}

fn read_plane(path: &Path, bytes: &[u8], opts: &MedicalOptions) -> Result<Plane> {
    match kind(path, bytes) {
        Some(Kind::Dicom) => guarded("DICOM", || dicom::read(bytes, opts)),
        Some(Kind::Nifti) => guarded("NIfTI", || nifti::read(path, bytes, opts)),
        None => bail!("not a DICOM or NIfTI file"),
    }
}

thread_local! {
    /// Set while a decoder runs under [`guarded`] on this thread.
    static DECODING: Cell<bool> = const { Cell::new(false) };
}

/// Runs a decoder, turning a panic (dicom-rs on some corrupt data, libjpeg through
/// `mozjpeg`) into an error. The panic's message goes into the error; the panic hook (which
/// would print it, and a backtrace, to stderr) is skipped for panics inside decoders: the
/// first call wraps the hook in place then, other panics still reach it.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    static QUIET_HOOK: Once = Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !DECODING.with(Cell::get) {
                previous(info);
            }
        }));
    });
    DECODING.with(|d| d.set(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    DECODING.with(|d| d.set(false));
    match result {
        Ok(result) => result,
        Err(payload) => {
            let msg = crate::panic_message(payload.as_ref()).unwrap_or("unknown error");
            bail!(
                "corrupt or truncated {what} file: the decoder failed ({})",
                msg.trim_start_matches("libjpeg fatal error: ")
            )
        }
    }
}

fn render(plane: Plane, opts: &MedicalOptions) -> Result<RgbImage> {
    match plane {
        Plane::Rgb(rgb) => Ok(rgb),
        Plane::Grey(g) => {
            let window = match opts.window {
                Some((c, w)) => Some(Window::user(c, w)?),
                None => g.window,
            };
            let levels = window::to_levels(&g.values, window.as_ref(), g.invert);
            let data = levels.into_iter().flat_map(|v| [v; 3]).collect();
            RgbImage::from_raw(g.width, g.height, data)
                .ok_or_else(|| anyhow!("internal error: slice size does not match its values"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_by_magic_and_name() {
        let mut dcm = vec![0u8; 200];
        dcm[128..132].copy_from_slice(b"DICM");
        assert_eq!(kind(Path::new("x.bin"), &dcm), Some(Kind::Dicom));
        assert_eq!(
            kind(Path::new("x.dcm"), b"\x08\x00\x05\x00CS"),
            Some(Kind::Dicom)
        );
        assert_eq!(kind(Path::new("x.bin"), b"\x08\x00\x05\x00CS"), None);
        assert_eq!(kind(Path::new("x.DCM"), b"garbage"), Some(Kind::Dicom));
        assert_eq!(kind(Path::new("x.png"), b"garbage"), None);
        assert_eq!(kind(Path::new("brain.nii.gz"), b""), Some(Kind::Nifti));
        // A PNG saved as .dcm stays a PNG.
        assert_eq!(kind(Path::new("x.dcm"), b"\x89PNG\r\n\x1a\n...."), None);
    }

    #[test]
    fn user_window_is_validated() {
        let plane = Plane::Grey(GreyPlane {
            width: 1,
            height: 1,
            values: vec![1.0],
            window: None,
            invert: false,
        });
        let opts = MedicalOptions {
            window: Some((0.0, 0.0)),
            slice: None,
        };
        assert!(render(plane, &opts).is_err());
    }
}
