//! DICOM files to one decoded frame: parsing with dicom-rs (`dicom-object`), pixel data
//! through `dicom-pixeldata` (RLE, JPEG Lossless), directly (native data, so that
//! YBR_FULL_422 and 1-bit frames are cut right) or through the JPEG decoders of this crate
//! (JPEG Baseline/Extended, so that pixels equal pydicom + Pillow's libjpeg-turbo for 8 bits
//! and GDCM's IJG libjpeg for 12 bits).
//!
//! pydicom's `pixel_array` (as_rgb=True, correct_unused_bits=True) is the reference for what a
//! frame's samples are; its `apply_modality_lut`/`apply_windowing` for what they mean.

use anyhow::{anyhow, bail, ensure, Result};
use dicom_core::Tag;
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::adapters::PixelDataObject;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, FileMetaTableBuilder, InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use image::RgbImage;

use super::jpeg;
use super::window::{VoiFunction, Window};
use super::{GreyPlane, MedicalOptions, Plane};
use crate::processor::image::EofWatch;

const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";

/// For error messages.
const DECODED: &str = "uncompressed, deflated, RLE Lossless, JPEG Baseline, JPEG Extended \
                       (12-bit grey) and JPEG Lossless DICOM";

/// "DICM" after the 128-byte preamble, or at the very start (a file written without one).
pub fn has_magic(bytes: &[u8]) -> bool {
    (bytes.len() >= 132 && &bytes[128..132] == b"DICM") || bytes.starts_with(b"DICM")
}

/// A bare data set (no preamble, no file meta) starts with an element of group 0008.
pub fn looks_like_dataset(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[0] == 0x08 && bytes[1] == 0x00
}

/// Decodes the wanted frame of a DICOM file held in memory.
pub fn read(bytes: &[u8], opts: &MedicalOptions) -> Result<Plane> {
    ensure!(!bytes.is_empty(), "the file is empty, not a DICOM file");
    let obj = open(bytes)?;
    let ts_uid = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_owned();
    let ts = TransferSyntaxRegistry
        .get(&ts_uid)
        .ok_or_else(|| anyhow!("unknown DICOM transfer syntax UID {ts_uid}"))?;
    let is_jpeg = ts_uid == JPEG_BASELINE || ts_uid == JPEG_EXTENDED;
    if !is_jpeg && !ts.can_decode_all() {
        bail!(
            "unsupported DICOM transfer syntax {} ({}); medvlm decodes {DECODED}",
            ts.uid(),
            ts.name()
        );
    }
    if obj.get(tags::PIXEL_DATA).is_none() {
        if obj.get(tags::FLOAT_PIXEL_DATA).is_some()
            || obj.get(tags::DOUBLE_FLOAT_PIXEL_DATA).is_some()
        {
            bail!("DICOM float pixel data is not supported");
        }
        bail!("this DICOM file holds no image (it has no Pixel Data)");
    }
    let a = Attrs::read(&obj)?;
    let frame = match opts.slice {
        Some(s) => {
            ensure!(
                s < a.frames,
                "slice {s} is out of range: the file has {} frame(s) (valid slices: 0..={})",
                a.frames,
                a.frames - 1
            );
            s
        }
        None => a.frames / 2,
    };
    crate::processor::image::check_size(a.cols, a.rows)?;

    let samples = if is_jpeg {
        jpeg_frame(&obj, &a, frame, ts_uid == JPEG_BASELINE)?
    } else if ts.is_encapsulated_pixel_data() {
        let decoded = obj
            .decode_pixel_data_frame(frame as u32)
            .map_err(|e| anyhow!("cannot decode the {} pixel data: {}", ts.name(), chain(&e)))?;
        unpack(decoded.data(), &a, 0, false)?
    } else {
        let data = obj.frame_pixel_data(frame as u32).ok_or_else(|| {
            anyhow!(
                "the pixel data is shorter than {} frame(s) of {}x{} pixels (truncated file?)",
                frame + 1,
                a.cols,
                a.rows
            )
        })?;
        unpack(&data, &a, frame, a.planar)?
    };

    match samples {
        Samples::Rgb(data) => RgbImage::from_raw(a.cols, a.rows, data)
            .map(Plane::Rgb)
            .ok_or_else(|| anyhow!("internal error: colour frame size")),
        Samples::Grey(mut values) => {
            if let Some((slope, intercept)) = rescale(&obj, frame) {
                for v in &mut values {
                    *v = *v * slope + intercept;
                }
            }
            Ok(Plane::Grey(GreyPlane {
                width: a.cols,
                height: a.rows,
                values,
                window: file_window(&obj, frame),
                invert: a.pi == "MONOCHROME1",
            }))
        }
    }
}

/// Parses the file: with preamble and "DICM", "DICM" without preamble, or a bare data set
/// (implicit or explicit VR little endian, guessed from the first element).
fn open(bytes: &[u8]) -> Result<DefaultDicomObject> {
    if has_magic(bytes) {
        return OpenFileOptions::new()
            .from_reader(bytes)
            .map_err(|e| anyhow!("corrupt or truncated DICOM file: {}", chain(&e)));
    }
    ensure!(
        looks_like_dataset(bytes),
        "not a DICOM file (no \"DICM\" marker at byte 128, and not a bare DICOM data set)"
    );
    let explicit = bytes[4].is_ascii_uppercase() && bytes[5].is_ascii_uppercase();
    let uid = if explicit {
        uids::EXPLICIT_VR_LITTLE_ENDIAN
    } else {
        uids::IMPLICIT_VR_LITTLE_ENDIAN
    };
    let ts = TransferSyntaxRegistry
        .get(uid)
        .ok_or_else(|| anyhow!("internal error: transfer syntax {uid} missing"))?;
    let obj = InMemDicomObject::read_dataset_with_ts(bytes, ts).map_err(|e| {
        anyhow!(
            "not a DICOM file, or a corrupt bare DICOM data set: {}",
            chain(&e)
        )
    })?;
    obj.with_meta(
        FileMetaTableBuilder::new()
            .transfer_syntax(uid)
            .media_storage_sop_class_uid(uids::SECONDARY_CAPTURE_IMAGE_STORAGE)
            .media_storage_sop_instance_uid("2.25.0"),
    )
    .map_err(|e| anyhow!("corrupt bare DICOM data set: {}", chain(&e)))
}

/// An error and its sources on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let msg = src.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = src.source();
    }
    s
}

/// The image pixel module attributes that decide how samples are read.
#[derive(Debug, Clone)]
struct Attrs {
    rows: u32,
    cols: u32,
    frames: usize,
    samples: u16,
    bits_allocated: u16,
    bits_stored: u16,
    signed: bool,
    /// Planar configuration 1 (colour by plane).
    planar: bool,
    /// Photometric interpretation, upper case, trimmed.
    pi: String,
}

impl Attrs {
    fn read(obj: &InMemDicomObject) -> Result<Self> {
        let need = |tag: Tag, name: &str| {
            uint(obj, tag).ok_or_else(|| anyhow!("the DICOM file has no valid {name}"))
        };
        let rows = need(tags::ROWS, "Rows")?;
        let cols = need(tags::COLUMNS, "Columns")?;
        let bits_allocated = need(tags::BITS_ALLOCATED, "Bits Allocated")? as u16;
        let bits_stored = uint(obj, tags::BITS_STORED).map_or(bits_allocated, |b| b as u16);
        let samples = uint(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1) as u16;
        let frames = uint(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1) as usize;
        let pi = text(obj, tags::PHOTOMETRIC_INTERPRETATION)
            .unwrap_or_else(|| if samples == 3 { "RGB" } else { "MONOCHROME2" }.to_owned())
            .to_ascii_uppercase();
        ensure!(
            pi != "PALETTE COLOR",
            "PALETTE COLOR DICOM images are not supported"
        );
        ensure!(
            samples == 1 || samples == 3,
            "DICOM images with {samples} samples per pixel ({pi}) are not supported"
        );
        ensure!(
            matches!(bits_allocated, 1 | 8 | 16 | 32),
            "DICOM images with {bits_allocated} bits allocated are not supported"
        );
        Ok(Self {
            rows,
            cols,
            frames,
            samples,
            bits_allocated,
            bits_stored: bits_stored.clamp(1, bits_allocated),
            signed: uint(obj, tags::PIXEL_REPRESENTATION) == Some(1),
            planar: uint(obj, tags::PLANAR_CONFIGURATION) == Some(1),
            pi,
        })
    }
}

fn uint(obj: &InMemDicomObject, tag: Tag) -> Option<u32> {
    obj.get(tag)?.to_int::<u32>().ok()
}

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let s = obj.get(tag)?.to_str().ok()?;
    let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!s.is_empty()).then(|| s.to_owned())
}

fn first_f64(elem: &InMemElement) -> Option<f64> {
    elem.to_multi_float64().ok()?.first().copied()
}

/// An attribute at top level, else in the Shared, else in this frame's Per-frame Functional
/// Groups item, inside the functional group sequence `group` (enhanced multi-frame objects).
fn attribute(obj: &InMemDicomObject, frame: usize, group: Tag, tag: Tag) -> Option<&InMemElement> {
    if let Some(e) = obj.get(tag) {
        return Some(e);
    }
    let item = |seq: Tag, index: usize| {
        obj.get(seq)?
            .items()?
            .get(index)?
            .get(group)?
            .items()?
            .first()?
            .get(tag)
    };
    item(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, 0)
        .or_else(|| item(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, frame))
}

/// Rescale Slope and Intercept, when both are there (pydicom's rule).
fn rescale(obj: &InMemDicomObject, frame: usize) -> Option<(f64, f64)> {
    let group = tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE;
    let slope = first_f64(attribute(obj, frame, group, tags::RESCALE_SLOPE)?)?;
    let intercept = first_f64(attribute(obj, frame, group, tags::RESCALE_INTERCEPT)?)?;
    (slope.is_finite() && intercept.is_finite()).then_some((slope, intercept))
}

/// The first Window Center/Width pair and the VOI LUT Function, when valid.
fn file_window(obj: &InMemDicomObject, frame: usize) -> Option<Window> {
    let group = tags::FRAME_VOILUT_SEQUENCE;
    let center = first_f64(attribute(obj, frame, group, tags::WINDOW_CENTER)?)?;
    let width = first_f64(attribute(obj, frame, group, tags::WINDOW_WIDTH)?)?;
    let function = attribute(obj, frame, group, tags::VOILUT_FUNCTION)
        .and_then(|e| e.to_str().ok().map(|s| s.into_owned()))
        .and_then(|s| VoiFunction::from_dicom(&s))
        .unwrap_or(VoiFunction::Linear);
    Window::from_file(center, width, function)
}

/// One decoded frame: grey values as stored (before the modality LUT), or 8-bit RGB.
enum Samples {
    Grey(Vec<f64>),
    Rgb(Vec<u8>),
}

/// A stored sample with pydicom's unused-bits correction: the bits above Bits Stored are
/// cleared (unsigned) or copies of the sign bit (signed).
fn stored(raw: u64, bits_stored: u16, signed: bool) -> f64 {
    let bs = u32::from(bits_stored.clamp(1, 63));
    let v = raw & ((1u64 << bs) - 1);
    if signed && (v >> (bs - 1)) & 1 == 1 {
        (v as i64 - (1i64 << bs)) as f64
    } else {
        v as f64
    }
}

/// Native (or natively decoded) frame bytes to samples. `frame` only matters for 1-bit data,
/// whose frames need not start on a byte boundary.
fn unpack(data: &[u8], a: &Attrs, frame: usize, planar: bool) -> Result<Samples> {
    let n = a.rows as usize * a.cols as usize;
    let short = || anyhow!("the pixel data is shorter than the image (truncated file?)");
    if a.samples == 1 {
        let values: Vec<f64> = match a.bits_allocated {
            1 => {
                let first = (frame * n) % 8;
                ensure!(data.len() * 8 >= first + n, short());
                (first..first + n)
                    .map(|b| f64::from((data[b / 8] >> (b % 8)) & 1))
                    .collect()
            }
            8 | 16 | 32 => {
                let size = usize::from(a.bits_allocated / 8);
                ensure!(data.len() >= n * size, short());
                data[..n * size]
                    .chunks_exact(size)
                    .map(|c| {
                        let raw = c
                            .iter()
                            .rev()
                            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
                        stored(raw, a.bits_stored, a.signed)
                    })
                    .collect()
            }
            other => bail!("DICOM images with {other} bits allocated are not supported"),
        };
        return Ok(Samples::Grey(values));
    }

    // Three samples per pixel.
    let ybr422 = a.pi == "YBR_FULL_422" && !planar && a.bits_allocated == 8;
    let mut rgb = vec![0u8; n * 3];
    match a.bits_allocated {
        8 if ybr422 && data.len() < n * 3 => {
            // Y1 Y2 Cb Cr for each pair of pixels (PS3.3 C.7.6.3.1.2), over the whole frame.
            ensure!(data.len() >= n.div_ceil(2) * 4, short());
            for (i, px) in rgb.chunks_exact_mut(3).enumerate() {
                let group = &data[(i / 2) * 4..(i / 2) * 4 + 4];
                px.copy_from_slice(&[group[i % 2], group[2], group[3]]);
            }
        }
        8 => {
            ensure!(data.len() >= n * 3, short());
            for (i, px) in rgb.chunks_exact_mut(3).enumerate() {
                for (s, v) in px.iter_mut().enumerate() {
                    *v = if planar {
                        data[s * n + i]
                    } else {
                        data[i * 3 + s]
                    };
                }
            }
        }
        16 => {
            ensure!(data.len() >= n * 6, short());
            ensure!(
                !a.pi.starts_with("YBR"),
                "16-bit {} colour DICOM images are not supported",
                a.pi
            );
            let max = ((1u64 << a.bits_stored.min(16)) - 1) as f64;
            for (i, px) in rgb.chunks_exact_mut(3).enumerate() {
                for (s, v) in px.iter_mut().enumerate() {
                    let at = if planar { s * n + i } else { i * 3 + s } * 2;
                    let raw = u64::from(u16::from_le_bytes([data[at], data[at + 1]]));
                    let x = stored(raw, a.bits_stored, false);
                    *v = super::window::level(x / max);
                }
            }
            return Ok(Samples::Rgb(rgb));
        }
        other => bail!("{other}-bit colour DICOM images are not supported"),
    }
    if a.pi == "YBR_FULL" || a.pi == "YBR_FULL_422" {
        ybr_full_to_rgb(&mut rgb);
    }
    Ok(Samples::Rgb(rgb))
}

/// pydicom's `convert_color_space(arr, "YBR_FULL", "RGB")`: float32, the ITU-T T.871 matrix
/// with the constants written as pydicom writes them, `floor(x + 0.5)`, clipped.
fn ybr_full_to_rgb(px: &mut [u8]) {
    let g_cb = (-0.114f64 * 1.772 / 0.587) as f32;
    let g_cr = (-0.299f64 * 1.402 / 0.587) as f32;
    let (r_cr, b_cb) = (1.402f32, 1.772f32);
    let round = |v: f32| (v + 0.5).floor().clamp(0.0, 255.0) as u8;
    for p in px.chunks_exact_mut(3) {
        let y = f32::from(p[0]);
        let cb = f32::from(p[1]) - 128.0;
        let cr = f32::from(p[2]) - 128.0;
        let r = y + cb * 0.0 + cr * r_cr;
        let g = y + cb * g_cb + cr * g_cr;
        let b = y + cb * b_cb + cr * 0.0;
        p.copy_from_slice(&[round(r), round(g), round(b)]);
    }
}

/// JPEG Baseline / Extended frames: 8-bit through libjpeg-turbo (Pillow's decoder, with
/// pydicom's colour handling), 12-bit grey through [`jpeg::decode_grey`].
fn jpeg_frame(
    obj: &DefaultDicomObject,
    a: &Attrs,
    frame: usize,
    baseline: bool,
) -> Result<Samples> {
    let data = jpeg_frame_data(obj, frame, a.frames)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| {
            anyhow!("the pixel data holds no JPEG data for frame {frame} (truncated file?)")
        })?;
    let info = jpeg::info(&data)?;
    ensure!(
        u32::from(info.width) == a.cols && u32::from(info.height) == a.rows,
        "the JPEG image is {}x{} but the DICOM header says {}x{}",
        info.width,
        info.height,
        a.cols,
        a.rows
    );
    let comps = info.component_ids.len();
    ensure!(
        comps == usize::from(a.samples),
        "the JPEG image has {comps} component(s) but the DICOM header says {} sample(s) per pixel",
        a.samples
    );
    if info.precision != 8 {
        let (_, _, samples) = jpeg::decode_grey(&data)?;
        let values = samples
            .into_iter()
            .map(|v| stored(u64::from(v), a.bits_stored.max(1), a.signed))
            .collect();
        return Ok(Samples::Grey(values));
    }
    if comps == 1 {
        let px = libjpeg(&data, Out::Grey)?;
        let values = px
            .into_iter()
            .map(|v| stored(u64::from(v), a.bits_stored.min(8), a.signed))
            .collect();
        return Ok(Samples::Grey(values));
    }
    // pydicom's _conform_jpg_colorspace: component ids "RGB"/"rgb" mean RGB; a JFIF marker
    // means YCbCr unless the header already says YBR.
    let mut pi = a.pi.clone();
    if matches!(info.component_ids[..], [82, 71, 66] | [114, 103, 98]) {
        pi = "RGB".to_owned();
    } else if info.jfif && !pi.contains("YBR") {
        pi = if baseline { "YBR_FULL_422" } else { "YBR_FULL" }.to_owned();
    }
    // Pillow converts to RGB itself only for Adobe-marked streams; pydicom asks it for the
    // raw components otherwise (`draft("YCbCr")`).
    let mut px = if info.adobe_transform.is_some() {
        libjpeg(&data, Out::Rgb)?
    } else {
        libjpeg(&data, Out::Raw)?
    };
    ensure!(
        px.len() == a.rows as usize * a.cols as usize * 3,
        "corrupt JPEG: short image"
    );
    if pi == "YBR_FULL" || pi == "YBR_FULL_422" {
        ybr_full_to_rgb(&mut px);
    }
    Ok(Samples::Rgb(px))
}

/// The fragments of one frame: one fragment per frame, or as the Basic Offset Table says,
/// or, without one, split where a fragment starts with a JPEG SOI marker (as pydicom does).
fn jpeg_frame_data(obj: &DefaultDicomObject, frame: usize, frames: usize) -> Option<Vec<u8>> {
    let fragments = obj.number_of_fragments()? as usize;
    let no_offsets = obj.offset_table().is_none_or(|t| t.is_empty());
    if frames > 1 && fragments != frames && no_offsets {
        let mut current: Option<usize> = None;
        let mut out = Vec::new();
        for i in 0..fragments {
            let f = obj.fragment(i)?;
            if f.starts_with(&[0xFF, 0xD8]) {
                current = Some(current.map_or(0, |c| c + 1));
            }
            if current == Some(frame) {
                out.extend_from_slice(&f);
            }
        }
        return Some(out);
    }
    obj.frame_pixel_data(frame as u32).map(|d| d.into_owned())
}

#[derive(Debug, Clone, Copy)]
enum Out {
    Grey,
    Rgb,
    /// The stream's own colour space (no conversion, upsampled).
    Raw,
}

/// 8-bit JPEG through libjpeg-turbo with libjpeg's defaults (islow IDCT, fancy upsampling),
/// as Pillow decodes it. libjpeg errors unwind; the caller runs under `catch_unwind`.
fn libjpeg(data: &[u8], out: Out) -> Result<Vec<u8>> {
    let err = |e: std::io::Error| anyhow!("corrupt JPEG: {e}");
    let decoder = mozjpeg::Decompress::new_reader(EofWatch::new(data)).map_err(err)?;
    let mut started = match out {
        Out::Grey => decoder.grayscale(),
        Out::Rgb => decoder.rgb(),
        Out::Raw => {
            let space = decoder.color_space();
            decoder.to_colorspace(space)
        }
    }
    .map_err(err)?;
    let px: Vec<u8> = started.read_scanlines().map_err(err)?;
    let reader = started.finish_into_inner().map_err(err)?;
    ensure!(
        !reader.hit_eof,
        "truncated JPEG: the data ends before the image does"
    );
    Ok(px)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_bits_are_corrected_like_pydicom() {
        // 12 of 16 bits, junk 0101 above.
        assert_eq!(stored(0x5FFF, 12, true), -1.0);
        assert_eq!(stored(0x57FF, 12, true), 2047.0);
        assert_eq!(stored(0x5800, 12, true), -2048.0);
        assert_eq!(stored(0x5800, 12, false), 2048.0);
        assert_eq!(stored(0xFFFF, 16, true), -1.0);
        assert_eq!(stored(0xFFFF, 16, false), 65535.0);
    }

    #[test]
    fn ybr_conversion_matches_pydicom_on_primaries() {
        // pydicom: convert_color_space([[[76, 85, 255]]], "YBR_FULL", "RGB") -> [254, 0, 0]
        let mut px = [76u8, 85, 255, 128, 128, 128, 0, 128, 128];
        ybr_full_to_rgb(&mut px);
        assert_eq!(&px[3..], &[128, 128, 128, 0, 0, 0]);
        assert!(px[0] >= 253 && px[1] <= 1 && px[2] <= 1, "{px:?}");
    }

    /// Our sequential decoder, run on an 8-bit stream, equals libjpeg-turbo exactly (both
    /// are IJG's islow IDCT); the 12-bit path is checked against GDCM in tests/suite/medical.rs.
    #[test]
    fn own_jpeg_decoder_equals_libjpeg_on_8_bit() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/medical/synthetic/jpeg8_grey.dcm");
        let bytes = std::fs::read(path).expect("fixture");
        let obj = open(&bytes).expect("dicom");
        let data = obj.frame_pixel_data(0).expect("frame");
        let (w, h, ours) = jpeg::decode_grey(&data).expect("decode");
        let theirs = libjpeg(&data, Out::Grey).expect("libjpeg");
        assert_eq!((w, h), (56, 40));
        let ours: Vec<u8> = ours.into_iter().map(|v| v as u8).collect();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn not_dicom() {
        assert!(read(b"", &MedicalOptions::default()).is_err());
        assert!(read(b"hello there, not dicom", &MedicalOptions::default()).is_err());
    }
}
