//! NIfTI-1 volumes (`.nii`, `.nii.gz`, and `.hdr` + `.img` pairs) to one grey slice.
//!
//! - The header is read with the `nifti` crate (byte order detected from `dim[0]`); only the
//!   bytes of the wanted slice are then read (through gzip for `.gz`), so a large 4D series
//!   costs one slice of memory.
//! - Slice: along the third voxel axis (k), the middle one (`nz / 2`) unless
//!   [`MedicalOptions::slice`](super::MedicalOptions) says otherwise; in 4D (and higher) data the
//!   first volume (t = 0, index 0 on every axis above the third), the volume FSL's and ITK-SNAP's
//!   viewers show first.
//! - Values: `raw * scl_slope + scl_inter` in f64 when `scl_slope` is finite and non-zero
//!   (nibabel's rule; a non-finite `scl_inter` then counts as 0), else the raw values.
//! - Orientation: the voxel axes as stored, without reorienting through the affine. The
//!   picture is `np.flipud(slice.T)`: column `c` is voxel `i = c`, row `r` is voxel
//!   `j = ny - 1 - r`. For axial data stored with j pointing anterior (RAS, LAS: nearly all
//!   scanner and FSL output) anterior is up; i then runs left to right on screen, which for LAS
//!   data (both test files) is the radiological convention (patient's right on the left) and
//!   for RAS data the neurological one.

use std::borrow::Cow;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use flate2::read::MultiGzDecoder;
use nifti::{Endianness, NiftiHeader};

use super::{GreyPlane, MedicalOptions, Plane};

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// NIfTI-1 magic at byte 344 (`n+1` single file, `ni1` header of a pair), or NIfTI-2's at
/// byte 4, in the bytes or, for gzip data, in the first decompressed bytes.
pub fn has_magic(bytes: &[u8]) -> bool {
    if bytes.starts_with(&GZIP_MAGIC) {
        let mut head = Vec::with_capacity(348);
        let ok = MultiGzDecoder::new(bytes)
            .take(348)
            .read_to_end(&mut head)
            .is_ok();
        return ok && magic_in(&head);
    }
    magic_in(bytes)
}

fn magic_in(head: &[u8]) -> bool {
    let nifti1 = head.len() >= 348 && matches!(&head[344..348], b"n+1\0" | b"ni1\0");
    let nifti2 = head.len() >= 8 && matches!(&head[4..8], b"n+2\0" | b"ni2\0");
    nifti1 || nifti2
}

/// How much of the stream past the voxels the header declares is still inflated, so that a
/// corrupt end (a bad gzip CRC, which comes after the data) is still an error; beyond it a
/// `.nii.gz` is not inflated further (a gzip bomb behind a small volume costs nothing).
const GZIP_SLACK: u64 = 64 << 10;

/// A checked NIfTI-1 header and the volume it locates.
struct Volume {
    header: NiftiHeader,
    nx: u64,
    ny: u64,
    nz: u64,
    kind: SampleType,
    /// Bytes per voxel.
    size: u64,
    /// Bytes of one slice (nx * ny voxels) and of the whole volume (every axis).
    plane_bytes: u64,
    volume_bytes: u64,
    /// Where the voxels start: in this file, or in the `.img` of a pair.
    start: u64,
    pair: bool,
    gz: bool,
}

/// Reads and checks the header; the stream is left after its 348 bytes.
fn open<'a>(bytes: &'a [u8]) -> Result<(Volume, Box<dyn Read + 'a>)> {
    ensure!(!bytes.is_empty(), "the file is empty, not a NIfTI file");
    let gz = bytes.starts_with(&GZIP_MAGIC);
    let mut stream: Box<dyn Read + 'a> = if gz {
        Box::new(MultiGzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    };
    let mut head = Vec::with_capacity(348);
    stream
        .by_ref()
        .take(348)
        .read_to_end(&mut head)
        .map_err(|e| anyhow!("corrupt gzip data: {e}"))?;
    if head.len() >= 8 && matches!(&head[4..8], b"n+2\0" | b"ni2\0") {
        bail!("NIfTI-2 files are not supported (only NIfTI-1)");
    }
    ensure!(
        head.len() == 348,
        "truncated NIfTI file: {} bytes, shorter than the 348-byte header",
        head.len()
    );
    let header =
        NiftiHeader::from_reader(&head[..]).map_err(|e| anyhow!("not a NIfTI-1 file: {e}"))?;
    let file_len = (!gz).then_some(bytes.len() as u64);
    Ok((Volume::new(header, gz, file_len)?, stream))
}

impl Volume {
    /// Every header field used, checked before anything is allocated or read by it.
    /// `file_len`: the bytes of an uncompressed single file, which must hold the volume.
    fn new(header: NiftiHeader, gz: bool, file_len: Option<u64>) -> Result<Self> {
        let rank = usize::from(header.dim[0]);
        ensure!(
            (1..=7).contains(&rank),
            "corrupt NIfTI header: dim[0] = {} (must be 1..7)",
            header.dim[0]
        );
        let dims: Vec<u64> = header.dim[1..=rank].iter().map(|&d| u64::from(d)).collect();
        ensure!(
            dims.iter().all(|&d| d > 0 && d < 32768),
            "corrupt NIfTI header: dimensions {:?}",
            &header.dim[1..=rank]
        );
        let (kind, size) = sample_type(header.datatype)?;
        ensure!(
            i64::from(header.bitpix) == size as i64 * 8,
            "corrupt NIfTI header: bitpix {} does not match datatype {} ({} bits per voxel)",
            header.bitpix,
            header.datatype,
            size * 8
        );
        let volume_bytes = dims
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                anyhow!(
                    "corrupt NIfTI header: dimensions {:?} describe more than 2^64 bytes",
                    &header.dim[1..=rank]
                )
            })?;
        let nx = dims[0];
        let ny = dims.get(1).copied().unwrap_or(1);
        let nz = dims.get(2).copied().unwrap_or(1);
        crate::processor::image::check_size(nx as u32, ny as u32)?;

        let offset = header.vox_offset;
        ensure!(
            offset.is_finite() && offset >= 0.0,
            "corrupt NIfTI header: vox_offset {offset} (must be a finite, non-negative byte \
             offset)"
        );
        let pair = &header.magic == b"ni1\0";
        // The voxels of a pair start at vox_offset in the .img (usually 0); nibabel reads a
        // single file whose vox_offset is below 352 from byte 352. A float too large for
        // u64 saturates, and fails the checks below.
        let start = if pair {
            offset as u64
        } else {
            (offset as u64).max(352)
        };
        let end = start.checked_add(volume_bytes).ok_or_else(|| {
            anyhow!("corrupt NIfTI header: vox_offset {offset} is past any file's end")
        })?;
        if let Some(len) = file_len.filter(|_| !pair) {
            ensure!(
                start <= len,
                "corrupt NIfTI header: vox_offset {offset} is past the end of the file ({len} \
                 bytes)"
            );
            ensure!(
                end <= len,
                "truncated NIfTI file: {len} bytes, but the header describes {volume_bytes} \
                 bytes of voxels from byte {start}"
            );
        }
        Ok(Self {
            header,
            nx,
            ny,
            nz,
            kind,
            size,
            plane_bytes: nx * ny * size,
            volume_bytes,
            start,
            pair,
            gz,
        })
    }
}

/// The memory `read` takes at most beyond the file's bytes (see `super::decode_cost`): the
/// slice's raw bytes (twice, while a read grows them), the f64 plane, the 8-bit levels and
/// the RGB picture (up to twice its size while it grows), gzip and read buffers.
pub fn decode_cost(path: &Path, bytes: &[u8]) -> Result<u64> {
    let (volume, _) = open(bytes)?;
    if volume.pair {
        let img = pair_image(path)?;
        check_pair_image(&img, &volume)?;
    }
    let n = volume.nx * volume.ny;
    Ok(2 * volume.plane_bytes + n * (8 + 7) + (1 << 20))
}

/// Slices along the third voxel axis (of the first volume), from the header alone.
pub fn slice_count(bytes: &[u8]) -> Result<usize> {
    let (volume, _) = open(bytes)?;
    Ok(usize::try_from(volume.nz).unwrap_or(usize::MAX))
}

/// Reads the wanted slice of a NIfTI-1 file held in `bytes` (`path` is used for the `.img`
/// of a header/image pair).
pub fn read(path: &Path, bytes: &[u8], opts: &MedicalOptions) -> Result<Plane> {
    let (v, mut stream) = open(bytes)?;
    let k = match opts.slice {
        Some(k) => {
            ensure!(
                (k as u64) < v.nz,
                "slice {k} is out of range: the volume has {} slice(s) along its third axis \
                 (valid slices: 0..={})",
                v.nz,
                v.nz - 1
            );
            k as u64
        }
        None => v.nz / 2,
    };
    let big = v.header.endianness == Endianness::Big;
    // Within the volume, so within the bytes checked present (or read below).
    let at = v.start + k * v.plane_bytes;

    let raw: Cow<[u8]> = if v.pair {
        let img = pair_image(path)?;
        check_pair_image(&img, &v)?;
        Cow::Owned(read_pair_image(&img, at, v.plane_bytes)?)
    } else if !v.gz {
        // `Volume::new` checked that the file holds the whole volume.
        Cow::Borrowed(&bytes[at as usize..(at + v.plane_bytes) as usize])
    } else {
        let skip = at - 348;
        let skipped = io::copy(&mut stream.by_ref().take(skip), &mut io::sink())
            .map_err(|e| anyhow!("corrupt gzip data: {e}"))?;
        // Grown as the data comes, so a header that overstates the data costs nothing.
        let mut raw = Vec::new();
        stream
            .by_ref()
            .take(v.plane_bytes)
            .read_to_end(&mut raw)
            .map_err(|e| anyhow!("corrupt gzip data: {e}"))?;
        // The rest of the volume is inflated too (and dropped), so that a truncated or corrupt
        // file is an error whichever slice is asked for, as it is for nibabel; past the
        // volume only a little, whatever follows.
        let after = v.volume_bytes - (at - v.start) - v.plane_bytes;
        let rest = io::copy(
            &mut stream.by_ref().take(after + GZIP_SLACK),
            &mut io::sink(),
        )
        .map_err(|e| anyhow!("truncated or corrupt gzip data: {e}"))?;
        let total = 348 + skipped + raw.len() as u64 + rest;
        ensure!(
            total >= v.start + v.volume_bytes,
            "truncated NIfTI file: {total} bytes uncompressed, but the header describes {} \
             bytes of voxels from byte {}",
            v.volume_bytes,
            v.start
        );
        Cow::Owned(raw)
    };
    ensure!(
        raw.len() as u64 == v.plane_bytes,
        "truncated NIfTI file: it ends inside slice {k}'s data"
    );

    let (slope, inter) = scaling(v.header.scl_slope, v.header.scl_inter);
    let size = v.size as usize;
    let sample = |i: usize| {
        let x = v.kind.read(&raw[i * size..(i + 1) * size], big);
        match slope {
            Some(s) => x * s + inter,
            None => x,
        }
    };
    let (w, h) = (v.nx as usize, v.ny as usize);
    let mut values = Vec::with_capacity(w * h);
    for r in 0..h {
        let j = h - 1 - r;
        values.extend((0..w).map(|i| sample(i + w * j)));
    }
    Ok(Plane::Grey(GreyPlane {
        width: v.nx as u32,
        height: v.ny as u32,
        values,
        window: None,
        invert: false,
    }))
}

/// nibabel's `get_slope_inter`: no scaling when the slope is 0 or not finite.
fn scaling(slope: f32, inter: f32) -> (Option<f64>, f64) {
    if slope == 0.0 || !slope.is_finite() {
        return (None, 0.0);
    }
    let inter = if inter.is_finite() {
        f64::from(inter)
    } else {
        0.0
    };
    (Some(f64::from(slope)), inter)
}

/// The `.img` (or `.img.gz`) beside a `.hdr`.
fn pair_image(path: &Path) -> Result<PathBuf> {
    let name = path.to_string_lossy();
    let stem = name
        .strip_suffix(".hdr.gz")
        .or_else(|| name.strip_suffix(".hdr"))
        .or_else(|| name.strip_suffix(".HDR"))
        .ok_or_else(|| {
            anyhow!("a NIfTI header without image data (ni1) must be a .hdr beside its .img")
        })?;
    let candidates = [
        PathBuf::from(format!("{stem}.img")),
        PathBuf::from(format!("{stem}.img.gz")),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| anyhow!("the image file {} is missing", candidates[0].display()))
}

fn is_gz(img: &Path) -> bool {
    img.extension().is_some_and(|e| e == "gz")
}

/// An uncompressed `.img` must hold the volume from vox_offset, by its size on disk.
fn check_pair_image(img: &Path, v: &Volume) -> Result<()> {
    if is_gz(img) {
        return Ok(());
    }
    let len = std::fs::metadata(img)
        .with_context(|| format!("cannot read {}", img.display()))?
        .len();
    ensure!(
        v.start
            .checked_add(v.volume_bytes)
            .is_some_and(|end| end <= len),
        "truncated NIfTI image file {}: {len} bytes, but the header describes {} bytes of \
         voxels from byte {}",
        img.display(),
        v.volume_bytes,
        v.start
    );
    Ok(())
}

fn read_pair_image(img: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let file =
        std::fs::File::open(img).with_context(|| format!("cannot read {}", img.display()))?;
    let mut stream: Box<dyn Read> = if is_gz(img) {
        Box::new(MultiGzDecoder::new(io::BufReader::new(file)))
    } else {
        Box::new(io::BufReader::new(file))
    };
    io::copy(&mut stream.by_ref().take(offset), &mut io::sink())
        .with_context(|| format!("cannot read {}", img.display()))?;
    // Grown as the data comes (a .img.gz's length is not known in advance).
    let mut raw = Vec::new();
    stream
        .take(len)
        .read_to_end(&mut raw)
        .with_context(|| format!("cannot read {}", img.display()))?;
    ensure!(
        raw.len() as u64 == len,
        "truncated NIfTI image file {}",
        img.display()
    );
    Ok(raw)
}

#[derive(Debug, Clone, Copy)]
enum SampleType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

fn sample_type(datatype: i16) -> Result<(SampleType, u64)> {
    use SampleType::*;
    Ok(match datatype {
        2 => (U8, 1),
        256 => (I8, 1),
        4 => (I16, 2),
        512 => (U16, 2),
        8 => (I32, 4),
        768 => (U32, 4),
        16 => (F32, 4),
        1024 => (I64, 8),
        1280 => (U64, 8),
        64 => (F64, 8),
        other => {
            let name = match other {
                1 => "binary (1-bit)",
                32 => "complex64",
                128 => "RGB24",
                1536 => "float128",
                1792 => "complex128",
                2048 => "complex256",
                2304 => "RGBA32",
                _ => "unknown",
            };
            bail!("unsupported NIfTI datatype {other} ({name}); integer and float volumes are supported")
        }
    })
}

impl SampleType {
    fn read(self, b: &[u8], big: bool) -> f64 {
        macro_rules! num {
            ($t:ty) => {{
                let a = b.try_into().unwrap_or_default();
                (if big {
                    <$t>::from_be_bytes(a)
                } else {
                    <$t>::from_le_bytes(a)
                }) as f64
            }};
        }
        match self {
            SampleType::U8 => f64::from(b[0]),
            SampleType::I8 => f64::from(b[0] as i8),
            SampleType::U16 => num!(u16),
            SampleType::I16 => num!(i16),
            SampleType::U32 => num!(u32),
            SampleType::I32 => num!(i32),
            SampleType::U64 => num!(u64),
            SampleType::I64 => num!(i64),
            SampleType::F32 => num!(f32),
            SampleType::F64 => num!(f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_follows_nibabel() {
        assert_eq!(scaling(0.0, 5.0), (None, 0.0));
        assert_eq!(scaling(f32::NAN, 5.0), (None, 0.0));
        assert_eq!(scaling(2.0, f32::NAN), (Some(2.0), 0.0));
        assert_eq!(scaling(0.5, -3.0), (Some(0.5), -3.0));
    }

    #[test]
    fn samples_in_both_byte_orders() {
        assert_eq!(SampleType::I16.read(&[0xFF, 0xFE], true), -2.0);
        assert_eq!(SampleType::I16.read(&[0xFE, 0xFF], false), -2.0);
        assert_eq!(SampleType::F32.read(&1.5f32.to_le_bytes(), false), 1.5);
        assert_eq!(SampleType::U8.read(&[200], false), 200.0);
        assert_eq!(SampleType::I8.read(&[200], false), -56.0);
    }

    #[test]
    fn magic_detection() {
        assert!(!has_magic(b"hello"));
        let mut h = vec![0u8; 348];
        h[344..348].copy_from_slice(b"n+1\0");
        assert!(has_magic(&h));
    }
}
