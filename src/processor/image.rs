//! Image files to 8-bit RGB, the way `PIL.Image.open(path).convert("RGB")` does it.
//!
//! transformers' Qwen2-VL processor opens images with PIL and converts them with
//! `image.convert("RGB")`, so the pixels the released checkpoints were trained on are PIL's.
//! This module reproduces them:
//!
//! - RGB: as stored. Grayscale (L): the gray value in all three channels. Palette PNGs: the
//!   palette colour. LA and RGBA: the colour channels, with alpha **dropped**, not composited
//!   over a background (transformers 4.57's `convert_to_rgb` is a plain `convert("RGB")`).
//!   With [`Alpha::OverWhite`] (what transformers 5.24's `convert_to_rgb` does, used for
//!   checkpoints whose processor is transformers 5's torchvision backend) an image with an
//!   alpha channel, or a transparent colour, is composited over opaque white instead, with
//!   PIL's `alpha_composite` arithmetic.
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

use std::io::{BufRead, Cursor, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use image::{ColorType, DynamicImage, ImageDecoder, ImageFormat, Limits, RgbImage};

use super::input::{read_bounded, MAX_IMAGE_FILE_BYTES};

#[path = "medical/mod.rs"]
pub mod medical;

pub use medical::{is_medical, load_medical, load_medical_values, MedicalOptions, MedicalValues};

/// Largest image accepted, in pixels: the size above which PIL refuses to open an image as a
/// likely decompression bomb (twice `Image.MAX_IMAGE_PIXELS`).
pub const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// The aspect ratio (long side over short side) above which Qwen2-VL's image processor
/// refuses an image (transformers' `smart_resize`). Every image medvlm reads goes to that
/// processor, so images beyond it are refused from their header, before decoding.
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// Most scans a JPEG may have. libjpeg decodes every scan of a progressive JPEG over the whole
/// image, so a small file of many empty scans costs minutes; encoders write about 10 (and
/// libjpeg-turbo suggests a limit of 500 for untrusted files).
pub const MAX_JPEG_SCANS: usize = 1000;

/// Memory the image crate may use while reading a header (PNG's ancillary chunks such as ICC
/// profiles and text, and the row of output the png crate reserves; TIFF's tags), before any
/// pixel is decoded. Once the size is checked a row is at most 189,187 pixels (the widest image
/// within both [`MAX_IMAGE_PIXELS`] and [`MAX_ASPECT_RATIO`]) of 8 bytes, 1.5 MB.
const HEADER_ALLOC: u64 = 16 << 20;

/// A fixed allowance for a decoder's tables, Huffman and zlib state, and small buffers.
const DECODER_OVERHEAD: u64 = 1 << 20;

/// A check a caller makes of an image's size (width, height) before it is decoded: the image
/// processor's resized size and the prompt's token limit (see `Processor::check_image_size`).
pub type SizeCheck<'a> = &'a dyn Fn(u32, u32) -> Result<()>;

/// What a raster image file's header says, read without decoding a pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    /// The memory decoding the image and converting it to RGB takes at most, in bytes.
    pub cost: u64,
    /// The part of `cost` the decoder itself may allocate (the image crate's `max_alloc`).
    decoder_alloc: u64,
}

/// What becomes of an image's transparency on the way to RGB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Alpha {
    /// `convert("RGB")`: the colour channels as they are (transformers 4.57).
    #[default]
    Drop,
    /// Composited over opaque white (transformers 5.24's `convert_to_rgb`:
    /// `PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")`).
    OverWhite,
}

/// Reads an image file and converts it to 8-bit RGB with PIL's `Image.open(path)
/// .convert("RGB")` semantics (see the module docs for the 16-bit deviation).
///
/// Errors are one line naming the file: missing, not a regular file, too large, not an image,
/// an unsupported format, corrupt or truncated data, an empty image, or one whose header
/// declares more pixels or a more extreme aspect ratio than is accepted (checked before any
/// pixel is decoded).
///
/// DICOM and NIfTI files are read with the default [`MedicalOptions`] (see [`load_rgb_with`]).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    load_rgb_with(path, &MedicalOptions::default())
}

/// [`load_rgb`] with the slice and window used for DICOM and NIfTI files (see [`medical`]);
/// other images ignore `opts`.
pub fn load_rgb_with(path: &Path, opts: &MedicalOptions) -> Result<RgbImage> {
    load_rgb_checked(path, opts, Alpha::Drop, &|_, _| Ok(()))
}

/// [`load_rgb_with`] with the transparency rule `alpha`, refusing also the sizes `check`
/// refuses, from the header of a raster image (after decoding for DICOM and NIfTI, whose own
/// header checks come first).
pub fn load_rgb_checked(
    path: &Path,
    opts: &MedicalOptions,
    alpha: Alpha,
    check: SizeCheck,
) -> Result<RgbImage> {
    // A directory where an image is expected is a DICOM series: one of its slices.
    if path.is_dir() {
        return medical::load_series_slice(path, opts);
    }
    let bytes = read_file(path)?;
    decode_named(path, &bytes, opts, alpha, check)
        .map_err(|e| anyhow!("{}: {}", path.display(), one_line(&e)))
}

/// Decodes an image held in memory (a file's bytes) to 8-bit RGB, like [`load_rgb`]. DICOM
/// and NIfTI data are recognised by their magic bytes (not by a name, which bytes lack).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    decode_rgb_with(bytes, &MedicalOptions::default())
}

/// [`decode_rgb`] with the slice and window used for DICOM and NIfTI data.
pub fn decode_rgb_with(bytes: &[u8], opts: &MedicalOptions) -> Result<RgbImage> {
    decode_rgb_checked(bytes, opts, Alpha::Drop, &|_, _| Ok(()))
}

/// [`decode_rgb_with`] with the transparency rule `alpha`, refusing also the sizes `check`
/// refuses (see [`load_rgb_checked`]).
pub fn decode_rgb_checked(
    bytes: &[u8],
    opts: &MedicalOptions,
    alpha: Alpha,
    check: SizeCheck,
) -> Result<RgbImage> {
    decode_named(Path::new(""), bytes, opts, alpha, check)
}

/// The memory decoding `bytes` takes at most, in bytes (the decoded pixels, the RGB copy,
/// the decoder's buffers), from the file's header alone; an error when the header already
/// refuses the image. Callers admit decodes by it (the server runs several at once).
pub fn decode_cost(bytes: &[u8]) -> Result<u64> {
    if medical::is_medical(Path::new(""), bytes) {
        return medical::decode_cost(Path::new(""), bytes);
    }
    Ok(read_header(bytes)?.cost)
}

/// Reads the header of a raster image (PNG, JPEG, BMP, TIFF, WebP) without decoding a pixel:
/// its format, size and decoding cost. An error for data that is not such an image, a header
/// that is damaged or truncated, and an image that is refused by its size (empty, more than
/// [`MAX_IMAGE_PIXELS`], an aspect ratio over [`MAX_ASPECT_RATIO`]) or, for JPEG, by its number
/// of scans (over [`MAX_JPEG_SCANS`]).
pub fn read_header(bytes: &[u8]) -> Result<Header> {
    if bytes.is_empty() {
        bail!("the file is empty, not an image");
    }
    let format = image::guess_format(bytes).map_err(|_| {
        anyhow!("not an image, or in a format medvlm cannot read ({SUPPORTED} are supported)")
    })?;
    if format == ImageFormat::Jpeg {
        let info = jpeg_info(bytes)?;
        if info.scans > MAX_JPEG_SCANS {
            bail!(
                "the JPEG has {} scans, more than the {MAX_JPEG_SCANS} accepted (each scan is \
                 decoded over the whole image)",
                info.scans
            );
        }
        return Ok(jpeg_cost(&info));
    }
    if let Some((width, height)) = declared_size(format, bytes) {
        check_size(width, height)?;
    }
    let name = format_name(format);
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_alloc = Some(HEADER_ALLOC);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| describe(&name, e))?;
    let (width, height) = decoder.dimensions();
    check_size(width, height)?;
    let color = decoder.color_type();
    let source_bits = u64::from(decoder.original_color_type().bits_per_pixel());
    Ok(raster_cost(
        format,
        width,
        height,
        color,
        source_bits,
        bytes,
    ))
}

/// The size a PNG or WebP header declares, read from its fixed layout, for formats whose
/// decoders misreport a refused size: the png crate reserves a row of output while reading the
/// header (a 178,000,000 x 1 image fails with "memory limit exceeded" instead of its aspect
/// ratio), image-webp calls a 2^24-pixel canvas "corrupt" and reads a lossless side of 16384
/// as 0. `None` when the layout is not there (the decoder then says what is wrong).
fn declared_size(format: ImageFormat, b: &[u8]) -> Option<(u32, u32)> {
    let le = |r: std::ops::Range<usize>| {
        b.get(r)
            .map(|x| x.iter().rev().fold(0u32, |acc, &v| acc << 8 | u32::from(v)))
    };
    let be = |r: std::ops::Range<usize>| {
        b.get(r)
            .map(|x| x.iter().fold(0u32, |acc, &v| acc << 8 | u32::from(v)))
    };
    match format {
        ImageFormat::Png if b.get(12..16) == Some(b"IHDR") => Some((be(16..20)?, be(20..24)?)),
        ImageFormat::WebP => match b.get(12..16)? {
            // Lossy: a 3-byte frame tag, the start code, then 14-bit sides.
            b"VP8 " if b.get(23..26) == Some(&[0x9d, 0x01, 0x2a]) => {
                Some((le(26..28)? & 0x3FFF, le(28..30)? & 0x3FFF))
            }
            // Lossless: the signature 0x2f, then 14-bit sides minus one.
            b"VP8L" if b.get(20) == Some(&0x2f) => {
                let bits = le(21..25)?;
                Some(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
            }
            // Extended: flags, 3 reserved bytes, then 24-bit canvas sides minus one.
            b"VP8X" => Some((le(24..27)? + 1, le(27..30)? + 1)),
            _ => None,
        },
        _ => None,
    }
}

/// Decodes `bytes` (a file called `name`, or "" for data without a name) after checking its
/// header against the universal limits and `check`.
fn decode_named(
    name: &Path,
    bytes: &[u8],
    opts: &MedicalOptions,
    alpha: Alpha,
    check: SizeCheck,
) -> Result<RgbImage> {
    if bytes.is_empty() {
        bail!("the file is empty, not an image");
    }
    if medical::is_medical(name, bytes) {
        // The medical header checks (sizes, frames, voxels) refuse a file before its pixel
        // data is decoded; the slice's own size is known only after.
        medical::decode_cost(name, bytes)?;
        let rgb = medical::decode_medical(name, bytes, opts)?;
        check_size(rgb.width(), rgb.height())?;
        check(rgb.width(), rgb.height())?;
        return Ok(rgb);
    }
    let header = read_header(bytes)?;
    check(header.width, header.height)?;
    let rgb = match header.format {
        ImageFormat::Jpeg => decode_jpeg(bytes, &header)?,
        _ => match alpha {
            Alpha::Drop => to_rgb(decode_other(bytes, &header)?),
            Alpha::OverWhite => over_white(decode_other(bytes, &header)?),
        },
    };
    Ok(rgb)
}

/// transformers 5.24's `convert_to_rgb` for an image with transparency:
/// `PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")`, in PIL's integer
/// arithmetic (libImaging/AlphaComposite.c: 7 extra bits, rounded divisions by 255). Images
/// without an alpha channel (PNG transparency chunks are decoded into one) convert as
/// [`to_rgb`] does.
pub fn over_white(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let rgba: Vec<[u8; 4]> = match &img {
        DynamicImage::ImageRgba8(im) => im.pixels().map(|p| p.0).collect(),
        DynamicImage::ImageLumaA8(im) => im
            .pixels()
            .map(|p| [p.0[0], p.0[0], p.0[0], p.0[1]])
            .collect(),
        DynamicImage::ImageRgba16(im) => im.pixels().map(|p| p.0.map(narrow)).collect(),
        DynamicImage::ImageLumaA16(im) => im
            .pixels()
            .map(|p| {
                let (g, a) = (narrow(p.0[0]), narrow(p.0[1]));
                [g, g, g, a]
            })
            .collect(),
        _ => return to_rgb(img),
    };
    const PRECISION_BITS: u32 = 7;
    let div255 = |a: u32| ((a >> 8) + a) >> 8;
    let white = [255u32; 4];
    let mut data = Vec::with_capacity(w as usize * h as usize * 3);
    for p in rgba {
        let src = p.map(u32::from);
        if src[3] == 0 {
            data.extend([255u8; 3]);
            continue;
        }
        let blend = white[3] * (255 - src[3]);
        let outa255 = src[3] * 255 + blend;
        let coef1 = src[3] * 255 * 255 * (1 << PRECISION_BITS) / outa255;
        let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
        for c in 0..3 {
            let tmp = src[c] * coef1 + white[c] * coef2;
            data.push((div255(tmp + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8);
        }
    }
    RgbImage::from_raw(w, h, data).unwrap_or_else(|| RgbImage::new(w, h))
}

/// Converts a decoded image to 8-bit RGB with PIL's `convert("RGB")` semantics: gray is
/// replicated, alpha is dropped, 16-bit samples become `round(v / 257)`. Float images
/// (0.0..=1.0) are clamped and scaled to 0..=255.
pub fn to_rgb(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    // Filled into an exact allocation: collecting from `flat_map` grows the buffer by
    // doubling, up to twice the image (counted by `decode_cost`) and copies on the way.
    let mut data = Vec::with_capacity(w as usize * h as usize * 3);
    match img {
        DynamicImage::ImageRgb8(rgb) => return rgb,
        DynamicImage::ImageRgba8(im) => im.pixels().for_each(|p| data.extend(rgb_of(p.0))),
        DynamicImage::ImageLuma8(im) => im.pixels().for_each(|p| data.extend([p.0[0]; 3])),
        DynamicImage::ImageLumaA8(im) => im.pixels().for_each(|p| data.extend([p.0[0]; 3])),
        DynamicImage::ImageLuma16(im) => im.pixels().for_each(|p| data.extend([narrow(p.0[0]); 3])),
        DynamicImage::ImageLumaA16(im) => {
            im.pixels().for_each(|p| data.extend([narrow(p.0[0]); 3]))
        }
        DynamicImage::ImageRgb16(im) => im
            .pixels()
            .for_each(|p| data.extend(rgb_of(p.0).map(narrow))),
        DynamicImage::ImageRgba16(im) => im
            .pixels()
            .for_each(|p| data.extend(rgb_of(p.0).map(narrow))),
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

/// Reads an image file whole: regular files only, at most [`MAX_IMAGE_FILE_BYTES`].
fn read_file(path: &Path) -> Result<Vec<u8>> {
    read_bounded(path, MAX_IMAGE_FILE_BYTES, "image")
}

/// Refuses empty images (nothing to see, and the processor would divide by zero), decompression
/// bombs, and aspect ratios the image processor refuses anyway. Run on the header's size,
/// before decoding.
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
    // The same arithmetic as `smart_resize`, so that exactly the images it refuses are.
    let (long, short) = (width.max(height), width.min(height));
    let aspect = f64::from(long) / f64::from(short);
    if aspect > MAX_ASPECT_RATIO {
        bail!(
            "the image is {width}x{height}, an aspect ratio of {aspect}, more than the \
             {MAX_ASPECT_RATIO} Qwen2-VL's image processor accepts"
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

fn format_name(format: ImageFormat) -> String {
    format!("{format:?}").to_uppercase()
}

/// Decodes a PNG, BMP, TIFF or WebP whose header has been checked, with the image crate's
/// limits as a second guard: the size the header declared, and the memory [`Header::cost`]
/// allows the decoder.
fn decode_other(bytes: &[u8], header: &Header) -> Result<DynamicImage> {
    let name = format_name(header.format);
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), header.format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(header.width);
    limits.max_image_height = Some(header.height);
    limits.max_alloc = Some(header.decoder_alloc);
    reader.limits(limits);
    reader.decode().map_err(|e| describe(&name, e))
}

/// The cost of decoding a PNG, BMP, TIFF or WebP of `width` x `height` pixels that the image
/// crate decodes to `color`, from `source_bits` bits per pixel in the file.
///
/// Counted: the decoded image; the RGB copy [`to_rgb`] makes of any other colour type; and
/// per format what the decoder allocates besides (read from the decoders' sources):
/// - PNG: the unfiltering buffer, a few rows of raw data (png 0.18).
/// - BMP: a row of indices or run-length data.
/// - TIFF: the whole image in the file's colour type (CMYK is converted after), and a strip or
///   tile's compressed bytes (at most the file) and, for JPEG-compressed tiles, their pixels.
/// - WebP: lossy: the YUV planes (1.5 bytes per pixel, macroblock-padded); lossless: the
///   transforms' subsampled images (under 0.5), and the ARGB image when the output has no alpha
///   (4); an alpha plane and its lossless coding (5); an animation's canvas and frame (8).
fn raster_cost(
    format: ImageFormat,
    width: u32,
    height: u32,
    color: ColorType,
    source_bits: u64,
    bytes: &[u8],
) -> Header {
    let (w, h) = (u64::from(width), u64::from(height));
    let pixels = w * h;
    let out = pixels * u64::from(color.bytes_per_pixel());
    let rgb_copy = if color == ColorType::Rgb8 {
        0
    } else {
        pixels * 3
    };
    let row = w * u64::from(color.bytes_per_pixel()) + 1;
    let file = bytes.len() as u64;
    let extra = match format {
        ImageFormat::Png => 4 * row,
        ImageFormat::Bmp => 2 * row,
        ImageFormat::Tiff => {
            let source = (w * source_bits).div_ceil(8) * h;
            2 * source + file
        }
        ImageFormat::WebP => {
            // Half bytes per (padded) pixel, by the kind of WebP.
            let padded = (w + 16) * (h + 16);
            let halves = match webp_kind(bytes) {
                WebpKind::Lossy => 3,
                // Decoded in place when there is alpha; else into an ARGB buffer first.
                WebpKind::Lossless if color.has_alpha() => 1,
                WebpKind::Lossless => 9,
                WebpKind::Extended => 13,
                WebpKind::Animated => 31,
            };
            padded * halves / 2
        }
        _ => out,
    };
    let decoder_alloc = out + extra + DECODER_OVERHEAD;
    Header {
        format,
        width,
        height,
        cost: decoder_alloc + rgb_copy,
        decoder_alloc,
    }
}

/// The kinds of WebP, which decode with different buffers (see [`raster_cost`]).
enum WebpKind {
    Lossy,
    Lossless,
    /// VP8X without animation: lossy with an alpha plane, or lossless.
    Extended,
    Animated,
}

/// The WebP kind from the first chunk after the RIFF header ("VP8 ", "VP8L" or "VP8X", whose
/// flags byte has bit 1 set for an animation); unknown data counts as the costliest kind.
fn webp_kind(bytes: &[u8]) -> WebpKind {
    match bytes.get(12..16) {
        Some(b"VP8 ") => WebpKind::Lossy,
        Some(b"VP8L") => WebpKind::Lossless,
        Some(b"VP8X") if bytes.get(20).is_some_and(|f| f & 0x02 == 0) => WebpKind::Extended,
        _ => WebpKind::Animated,
    }
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
fn decode_jpeg(bytes: &[u8], header: &Header) -> Result<RgbImage> {
    match catch_unwind(AssertUnwindSafe(|| jpeg_pixels(bytes, header))) {
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

fn jpeg_pixels(bytes: &[u8], header: &Header) -> Result<RgbImage> {
    let jpeg_err = |e: std::io::Error| anyhow!("corrupt JPEG: {e}");
    let decoder = mozjpeg::Decompress::new_reader(EofWatch::new(bytes)).map_err(jpeg_err)?;
    let (w, h) = decoder.size();
    // libjpeg read the same frame header as `jpeg_info`; if it saw another size, the checks
    // and the cost were for the wrong image.
    if (w, h) != (header.width as usize, header.height as usize) {
        bail!(
            "corrupt JPEG: libjpeg reads a {w}x{h} frame where the header says {}x{}",
            header.width,
            header.height
        );
    }
    let (w, h) = (header.width, header.height);
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
        let mut rgb = Vec::with_capacity(px.len() * 3);
        for p in px {
            rgb.extend_from_slice(&adobe_cmyk_to_rgb(p));
        }
        (rgb, reader)
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

/// What the header of a JPEG says, from its markers up to the first scan.
#[derive(Debug, Clone, PartialEq, Eq)]
struct JpegInfo {
    width: u32,
    height: u32,
    /// Components of the frame (1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK).
    components: u32,
    /// Each component's sampling factors (horizontal, vertical), 1 to 4.
    sampling: Vec<(u64, u64)>,
    /// Whether libjpeg keeps the whole image's DCT coefficients in memory: a progressive
    /// frame, or several scans (a first scan without every component).
    buffered: bool,
    /// Start-of-scan markers in the file.
    scans: usize,
}

/// Parses a JPEG's markers up to the first start of scan, as libjpeg's `jpeg_read_header`
/// does (garbage between markers and fill bytes skipped), and counts the scans after it. No
/// pixel is decoded.
fn jpeg_info(b: &[u8]) -> Result<JpegInfo> {
    const TRUNCATED: &str = "truncated JPEG: the file ends inside its header";
    if !b.starts_with(&[0xFF, 0xD8]) {
        bail!("corrupt JPEG: no start-of-image marker");
    }
    let mut i = 2;
    let mut frame: Option<(u8, u32, u32, Vec<u8>)> = None;
    loop {
        while b.get(i).is_some_and(|&x| x != 0xFF) {
            i += 1;
        }
        while b.get(i) == Some(&0xFF) {
            i += 1;
        }
        let Some(&marker) = b.get(i) else {
            bail!(TRUNCATED);
        };
        i += 1;
        match marker {
            // Markers without a segment.
            0x01 | 0xD0..=0xD8 => continue,
            0xD9 => bail!("corrupt JPEG: the image ends before its first scan"),
            _ => {}
        }
        let Some(len) = b.get(i..i + 2) else {
            bail!(TRUNCATED);
        };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let Some(segment) = b.get(i + 2..i + len.max(2)) else {
            bail!(TRUNCATED);
        };
        if len < 2 {
            bail!("corrupt JPEG: a marker segment of length {len}");
        }
        match marker {
            // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                if frame.is_some() {
                    bail!("corrupt JPEG: two frame headers");
                }
                let (Some(dims), Some(&nf)) = (segment.get(1..5), segment.get(5)) else {
                    bail!("corrupt JPEG: a frame header of {} bytes", segment.len());
                };
                let height = u32::from(u16::from_be_bytes([dims[0], dims[1]]));
                let width = u32::from(u16::from_be_bytes([dims[2], dims[3]]));
                // Refused here, not only at the first scan, so that a frame header alone
                // is refused by its size rather than as a truncated file.
                check_size(width, height)?;
                let comps = segment.get(6..6 + 3 * usize::from(nf)).ok_or_else(|| {
                    anyhow!("corrupt JPEG: a frame header too short for its {nf} components")
                })?;
                frame = Some((marker, width, height, comps.to_vec()));
            }
            0xDA => {
                let Some((sof, width, height, comps)) = frame else {
                    bail!("corrupt JPEG: a scan before the frame header");
                };
                let in_scan = segment.first().copied().unwrap_or(0);
                let components = (comps.len() / 3) as u32;
                // libjpeg refuses factors outside 1..=4 before decoding; clamped here so the
                // cost stays an upper bound whatever the header says.
                let sampling = comps
                    .chunks_exact(3)
                    .map(|c| {
                        (
                            u64::from(c[1] >> 4).clamp(1, 4),
                            u64::from(c[1] & 15).clamp(1, 4),
                        )
                    })
                    .collect();
                // SOF2, SOF6, SOF10 and SOF14 are progressive.
                let progressive = matches!(sof, 0xC2 | 0xC6 | 0xCA | 0xCE);
                // Markers cannot hide in entropy-coded data (0xFF there is followed by 0x00 or
                // a restart marker), so this counts the scans exactly.
                let rest = &b[i + len..];
                let scans = 1 + rest.windows(2).filter(|w| w == &[0xFF, 0xDA]).count();
                return Ok(JpegInfo {
                    width,
                    height,
                    components,
                    sampling,
                    buffered: progressive || u32::from(in_scan) < components || scans > 1,
                    scans,
                });
            }
            _ => {}
        }
        i += len;
    }
}

/// The cost of decoding a JPEG with libjpeg-turbo and converting it to RGB:
/// - the output: RGB (3 bytes per pixel), or CMYK (4) and its RGB conversion (3);
/// - for buffered (progressive or multi-scan) images, every component's DCT coefficients,
///   64 of 2 bytes per 8x8 block of the component's (subsampled) samples, the blocks rounded up
///   to whole MCUs (libjpeg's `jdcoefct.c` virtual arrays);
/// - per component a few MCU rows for the IDCT, upsampling and colour conversion (rows of up
///   to 4 x 8 samples, double-buffered), and libjpeg's fixed tables.
fn jpeg_cost(info: &JpegInfo) -> Header {
    let (w, h) = (u64::from(info.width), u64::from(info.height));
    let comps = u64::from(info.components);
    let out = w * h * if comps == 4 { 4 + 3 } else { 3 };
    let h_max = info.sampling.iter().map(|s| s.0).max().unwrap_or(1);
    let v_max = info.sampling.iter().map(|s| s.1).max().unwrap_or(1);
    // libjpeg's `width_in_blocks` (ceil(w * h_i / (8 * h_max))) rounded up to h_i blocks, and
    // the same vertically.
    let blocks: u64 = info
        .sampling
        .iter()
        .map(|&(hi, vi)| {
            let across = (w * hi).div_ceil(8 * h_max).div_ceil(hi) * hi;
            let down = (h * vi).div_ceil(8 * v_max).div_ceil(vi) * vi;
            across * down
        })
        .sum();
    let coefficients = if info.buffered { blocks * 128 } else { 0 };
    let rows = comps * (w + 64) * 32 * 4 * 2;
    let cost = out + coefficients + rows + DECODER_OVERHEAD;
    Header {
        format: ImageFormat::Jpeg,
        width: info.width,
        height: info.height,
        cost,
        decoder_alloc: cost,
    }
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
        assert_eq!(
            to_rgb(DynamicImage::ImageRgba8(rgba.clone())).as_raw(),
            &[1, 2, 3]
        );
        // Over white: a half-transparent (128) dark pixel by PIL's arithmetic, coef1 =
        // 128 x 128 = 16384, coef2 = 255 x 128 - 16384 = 16256: (1 x 16384 + 255 x 16256 +
        // 16384) / 255 / 128 -> 128; a fully transparent one is white.
        assert_eq!(
            over_white(DynamicImage::ImageRgba8(rgba)).as_raw(),
            &[255; 3],
            "a transparent pixel is white"
        );
        let half = image::RgbaImage::from_pixel(1, 1, image::Rgba([1, 2, 3, 128]));
        assert_eq!(
            over_white(DynamicImage::ImageRgba8(half)).as_raw(),
            &[128, 128, 129]
        );
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
