//! Image files to 8-bit RGB, the way `PIL.Image.open(path).convert("RGB")` does it.
//!
//! transformers' Qwen2-VL processor opens images with PIL and converts them with
//! `image.convert("RGB")`, so the pixels the released checkpoints were trained on are PIL's.
//! This module reproduces them:
//!
//! - RGB: as stored. Grayscale (L): the gray value in all three channels. Palette PNGs: the
//!   palette colour. LA and RGBA: the colour channels, with alpha **dropped**, not composited
//!   over a background (transformers 4.57's `convert_to_rgb` is a plain `convert("RGB")`).
//! - JPEG is decoded with libjpeg-turbo's decoder (through the `mozjpeg` crate, whose decoder
//!   is libjpeg-turbo's), the library inside Pillow, with the same default settings (accurate
//!   integer IDCT, fancy upsampling), so pixels match PIL exactly. The `image` crate's pure-Rust
//!   JPEG decoder differs from libjpeg-turbo by up to several levels per channel. CMYK JPEGs are
//!   inverted (Adobe polarity, as PIL assumes) and converted with PIL's CMYK-to-RGB formula.
//! - PNG, BMP, TIFF and WebP are decoded with the `image` crate.
//! - DICOM (`.dcm`, or "DICM" at byte 128) and NIfTI (`.nii`, `.nii.gz`) files are read by
//!   [`medical`]: one slice, windowed to 8 bits, grey replicated into RGB. [`load_rgb_with`]
//!   chooses the slice and the window; [`load_rgb`] uses the defaults (the middle slice, the
//!   file's own window or else the data's min..max).
//!
//! One deliberate deviation: **16-bit images**. PIL opens a 16-bit grayscale PNG as mode
//! `I;16` and `convert("RGB")` then clips every value above 255 to white, which wipes out
//! 16-bit medical images (CT, MRI, X-ray exports). Here every 16-bit sample `v` becomes
//! `round(v / 257)`, the 8-bit value nearest in proportion. (For 16-bit RGB, RGBA and LA PNGs
//! PIL keeps the high byte, `v >> 8`, which differs from this by at most one level.)

use std::io::{BufRead, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use image::{DynamicImage, ImageFormat, RgbImage};

#[path = "medical/mod.rs"]
pub mod medical;

pub use medical::{is_medical, load_medical, load_medical_values, MedicalOptions, MedicalValues};

/// Largest image accepted, in pixels: the size above which PIL refuses to open an image as a
/// likely decompression bomb (twice `Image.MAX_IMAGE_PIXELS`).
pub const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// Reads an image file and converts it to 8-bit RGB with PIL's `Image.open(path)
/// .convert("RGB")` semantics (see the module docs for the 16-bit deviation).
///
/// Errors are one line naming the file: missing, unreadable, not an image, an unsupported
/// format, corrupt or truncated data, or an empty image.
///
/// DICOM and NIfTI files are read with the default [`MedicalOptions`] (see [`load_rgb_with`]).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    load_rgb_with(path, &MedicalOptions::default())
}

/// [`load_rgb`] with the slice and window used for DICOM and NIfTI files (see [`medical`]);
/// other images ignore `opts`.
pub fn load_rgb_with(path: &Path, opts: &MedicalOptions) -> Result<RgbImage> {
    let bytes = read_file(path)?;
    let rgb = if medical::is_medical(path, &bytes) {
        medical::decode_medical(path, &bytes, opts).and_then(|rgb| {
            check_size(rgb.width(), rgb.height())?;
            Ok(rgb)
        })
    } else {
        decode_rgb(&bytes)
    };
    rgb.map_err(|e| anyhow!("{}: {}", path.display(), one_line(&e)))
}

/// Decodes an image held in memory (a file's bytes) to 8-bit RGB, like [`load_rgb`]. DICOM
/// and NIfTI data are recognised by their magic bytes (not by a name, which bytes lack).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    decode_rgb_with(bytes, &MedicalOptions::default())
}

/// [`decode_rgb`] with the slice and window used for DICOM and NIfTI data.
pub fn decode_rgb_with(bytes: &[u8], opts: &MedicalOptions) -> Result<RgbImage> {
    if bytes.is_empty() {
        bail!("the file is empty, not an image");
    }
    if medical::is_medical(Path::new(""), bytes) {
        let rgb = medical::decode_medical(Path::new(""), bytes, opts)?;
        check_size(rgb.width(), rgb.height())?;
        return Ok(rgb);
    }
    let format = image::guess_format(bytes).map_err(|_| {
        anyhow!("not an image, or in a format medvlm cannot read ({SUPPORTED} are supported)")
    })?;
    let rgb = match format {
        ImageFormat::Jpeg => decode_jpeg(bytes)?,
        _ => to_rgb(decode_other(bytes, format)?),
    };
    check_size(rgb.width(), rgb.height())?;
    Ok(rgb)
}

/// The memory decoding `bytes` takes at most, in bytes (the decoded pixels, the RGB copy,
/// the decoder's buffers), from the file's header alone; an error when the header already
/// refuses the image. Callers admit decodes by it (the server runs several at once).
pub fn decode_cost(bytes: &[u8]) -> Result<u64> {
    if medical::is_medical(Path::new(""), bytes) {
        return medical::decode_cost(Path::new(""), bytes);
    }
    // Placeholder until the header checks land (issue 25).
    Ok(bytes.len() as u64 * 16)
}

/// Converts a decoded image to 8-bit RGB with PIL's `convert("RGB")` semantics: gray is
/// replicated, alpha is dropped, 16-bit samples become `round(v / 257)`. Float images
/// (0.0..=1.0) are clamped and scaled to 0..=255.
pub fn to_rgb(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(rgb) => return rgb,
        DynamicImage::ImageRgba8(im) => im.pixels().flat_map(|p| rgb_of(p.0)).collect(),
        DynamicImage::ImageLuma8(im) => im.pixels().flat_map(|p| [p.0[0]; 3]).collect(),
        DynamicImage::ImageLumaA8(im) => im.pixels().flat_map(|p| [p.0[0]; 3]).collect(),
        DynamicImage::ImageLuma16(im) => im.pixels().flat_map(|p| [narrow(p.0[0]); 3]).collect(),
        DynamicImage::ImageLumaA16(im) => im.pixels().flat_map(|p| [narrow(p.0[0]); 3]).collect(),
        DynamicImage::ImageRgb16(im) => im.pixels().flat_map(|p| rgb_of(p.0).map(narrow)).collect(),
        DynamicImage::ImageRgba16(im) => {
            im.pixels().flat_map(|p| rgb_of(p.0).map(narrow)).collect()
        }
        other => return other.to_rgb8(),
    };
    // The buffer was built from a w x h image, so its length always matches.
    RgbImage::from_raw(w, h, data).unwrap_or_else(|| RgbImage::new(w, h))
}

/// The formats this build decodes, for error messages.
const SUPPORTED: &str = "PNG, JPEG, BMP, TIFF, WebP, DICOM and NIfTI";

/// The first three channels of a pixel.
fn rgb_of<T: Copy, const N: usize>(p: [T; N]) -> [T; 3] {
    [p[0], p[1], p[2]]
}

/// 16-bit sample to 8 bits, rounding to nearest: `round(v / 257)`. No ties are possible
/// (`v / 257` is never an odd multiple of one half), so this is exact.
fn narrow(v: u16) -> u8 {
    ((u32::from(v) + 128) / 257) as u8
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    if path.is_dir() {
        bail!("{}: is a directory, not an image file", path.display());
    }
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!("{}: no such image file", path.display()),
        _ => anyhow!("{}: cannot read the image file: {e}", path.display()),
    })
}

/// Refuses empty images (nothing to see, and the processor would divide by zero) and
/// decompression bombs.
fn check_size(width: u32, height: u32) -> Result<()> {
    if width == 0 || height == 0 {
        bail!("the image is empty ({width}x{height} pixels)");
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > MAX_IMAGE_PIXELS {
        bail!(
            "the image is {width}x{height} = {pixels} pixels, more than the {MAX_IMAGE_PIXELS} \
             accepted (PIL refuses such images as possible decompression bombs)"
        );
    }
    Ok(())
}

/// Joins a multi-line error chain into one line.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn decode_other(bytes: &[u8], format: ImageFormat) -> Result<DynamicImage> {
    let name = format!("{format:?}").to_uppercase();
    let reader = || image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let (w, h) = reader().into_dimensions().map_err(|e| describe(&name, e))?;
    check_size(w, h)?;
    reader().decode().map_err(|e| describe(&name, e))
}

/// Words an `image` crate error for a user: which format, and whether the data is damaged or
/// the format variant is unsupported.
fn describe(format: &str, e: image::ImageError) -> anyhow::Error {
    match e {
        image::ImageError::Unsupported(u) => match u.kind() {
            image::error::UnsupportedErrorKind::Format(_) => {
                anyhow!("{format} images are not supported ({SUPPORTED} are)")
            }
            _ => anyhow!("unsupported {format} variant: {u}"),
        },
        image::ImageError::Limits(l) => anyhow!("the {format} image is too large to decode: {l}"),
        image::ImageError::IoError(io) => {
            anyhow!("the {format} image is truncated or unreadable: {io}")
        }
        other => anyhow!("corrupt or truncated {format} image: {other}"),
    }
}

/// Decodes a JPEG with libjpeg-turbo's decoder. libjpeg reports fatal errors by unwinding
/// (the `mozjpeg` crate's error handler calls `resume_unwind`, which prints nothing), so the
/// decode runs under `catch_unwind` and an unwind becomes an error.
fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage> {
    match catch_unwind(AssertUnwindSafe(|| jpeg_pixels(bytes))) {
        Ok(result) => result,
        Err(payload) => {
            let msg = crate::panic_message(payload.as_ref()).unwrap_or("unknown libjpeg error");
            bail!(
                "corrupt JPEG: {}",
                msg.trim_start_matches("libjpeg fatal error: ")
            )
        }
    }
}

fn jpeg_pixels(bytes: &[u8]) -> Result<RgbImage> {
    let jpeg_err = |e: std::io::Error| anyhow!("corrupt JPEG: {e}");
    let decoder = mozjpeg::Decompress::new_reader(EofWatch::new(bytes)).map_err(jpeg_err)?;
    let (w, h) = decoder.size();
    let (w, h) = (
        u32::try_from(w).map_err(|_| anyhow!("JPEG too wide"))?,
        u32::try_from(h).map_err(|_| anyhow!("JPEG too tall"))?,
    );
    check_size(w, h)?;
    let cmyk = matches!(
        decoder.color_space(),
        mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK
    );
    let (data, reader) = if cmyk {
        let mut started = decoder
            .to_colorspace(mozjpeg::ColorSpace::JCS_CMYK)
            .map_err(jpeg_err)?;
        let px: Vec<[u8; 4]> = started.read_scanlines().map_err(jpeg_err)?;
        let reader = started.finish_into_inner().map_err(jpeg_err)?;
        (px.into_iter().flat_map(adobe_cmyk_to_rgb).collect(), reader)
    } else {
        let mut started = decoder.rgb().map_err(jpeg_err)?;
        let px: Vec<u8> = started.read_scanlines().map_err(jpeg_err)?;
        let reader = started.finish_into_inner().map_err(jpeg_err)?;
        (px, reader)
    };
    if reader.hit_eof {
        // libjpeg pads a truncated image with gray and only warns; PIL refuses it
        // ("image file is truncated"), and so do we.
        bail!("truncated JPEG: the file ends before the image data does");
    }
    RgbImage::from_raw(w, h, data).ok_or_else(|| anyhow!("JPEG decoder returned a short image"))
}

/// PIL reads CMYK JPEGs as Adobe-inverted ("CMYK;I") and converts CMYK to RGB as
/// `R = (255 - K) - C * (255 - K) / 255` (rounded with PIL's divide-by-255 trick), per channel.
fn adobe_cmyk_to_rgb(px: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = px.map(|v| 255 - i32::from(v));
    let nk = 255 - k;
    let channel = |v: i32| {
        let t = v * nk + 128;
        (nk - (((t >> 8) + t) >> 8)).clamp(0, 255) as u8
    };
    [channel(c), channel(m), channel(y)]
}

/// A byte-slice reader that records whether the JPEG decoder asked for data past the end,
/// which for a complete file never happens (decoding stops at the end-of-image marker).
struct EofWatch<'a> {
    rest: &'a [u8],
    hit_eof: bool,
}

impl<'a> EofWatch<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            rest: bytes,
            hit_eof: false,
        }
    }
}

impl Read for EofWatch<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.fill_buf()?.len().min(buf.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for EofWatch<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.rest.is_empty() {
            self.hit_eof = true;
        }
        Ok(self.rest)
    }

    fn consume(&mut self, amt: usize) {
        self.rest = &self.rest[amt.min(self.rest.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_rounds_to_nearest() {
        assert_eq!(narrow(0), 0);
        assert_eq!(narrow(128), 0); // 0.498
        assert_eq!(narrow(129), 1); // 0.502
        assert_eq!(narrow(257 * 100), 100);
        assert_eq!(narrow(65535), 255);
    }

    #[test]
    fn gray_and_alpha_conversions_follow_pil() {
        let la = image::GrayAlphaImage::from_raw(2, 1, vec![10, 0, 200, 255]).expect("buffer");
        let rgb = to_rgb(DynamicImage::ImageLumaA8(la));
        assert_eq!(rgb.as_raw(), &[10, 10, 10, 200, 200, 200]);
        let rgba = image::RgbaImage::from_raw(1, 1, vec![1, 2, 3, 0]).expect("buffer");
        assert_eq!(to_rgb(DynamicImage::ImageRgba8(rgba)).as_raw(), &[1, 2, 3]);
        let l16 = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(1, 1, vec![1000u16])
            .expect("buffer");
        assert_eq!(to_rgb(DynamicImage::ImageLuma16(l16)).as_raw(), &[4, 4, 4]);
    }

    #[test]
    fn cmyk_white_and_black() {
        // Adobe-inverted: stored 255 means no ink.
        assert_eq!(adobe_cmyk_to_rgb([255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(adobe_cmyk_to_rgb([255, 255, 255, 0]), [0, 0, 0]);
        assert_eq!(adobe_cmyk_to_rgb([0, 255, 255, 255]), [0, 255, 255]);
    }

    #[test]
    fn garbage_and_empty_bytes_are_errors() {
        assert!(decode_rgb(b"").is_err());
        assert!(decode_rgb(b"hello, not an image").is_err());
        let err = decode_rgb(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10]).expect_err("broken jpeg");
        assert!(err.to_string().contains("JPEG"), "{err}");
    }
}
