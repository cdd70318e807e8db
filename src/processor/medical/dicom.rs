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

use super::window::{VoiFunction, Window};
use super::{jpeg, scan};
use super::{GreyPlane, MedicalOptions, Plane};
use crate::processor::image::EofWatch;

const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";
const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

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

/// What [`check`] found: the data set's encoding and structure.
pub struct Checked {
    layout: scan::Layout,
    walk: scan::Walk,
}

/// The checks before dicom-rs parses a file: a known and decodable transfer syntax, then
/// the structure walk of [`scan`] (nesting depth, every declared length against the bytes
/// present, bounded inflation).
pub fn check(bytes: &[u8]) -> Result<Checked> {
    ensure!(!bytes.is_empty(), "the file is empty, not a DICOM file");
    let layout = scan::layout(bytes)?;
    let ts = layout.transfer_syntax()?;
    if !is_ours(ts.uid()) && !ts.can_decode_all() {
        bail!(
            "unsupported DICOM transfer syntax {} ({}); medvlm decodes {DECODED}",
            ts.uid(),
            ts.name()
        );
    }
    let walk = scan::walk(bytes, &layout)?;
    Ok(Checked { layout, walk })
}

/// JPEG Baseline and Extended are decoded here, not by dicom-rs.
fn is_ours(ts_uid: &str) -> bool {
    ts_uid == JPEG_BASELINE || ts_uid == JPEG_EXTENDED
}

/// The memory decoding this file takes at most beyond its bytes, from the checks alone (see
/// [`super::decode_cost`]): dicom-rs' object, the pixel data's copies on the way to one
/// frame, the decoded frame and the codec's working memory, the f64 plane, the picture.
pub fn decode_cost(bytes: &[u8]) -> Result<u64> {
    let checked = check(bytes)?;
    let top = &checked.walk.top;
    let ts = checked.layout.transfer_syntax()?;
    let a = Attrs::new(
        top.rows,
        top.cols,
        top.bits_allocated,
        None,
        top.samples,
        top.frames,
        top.pi.clone(),
        false,
        false,
    )?;
    crate::processor::image::check_size(a.cols, a.rows)?;
    let pixel = checked
        .walk
        .pixel
        .clone()
        .ok_or_else(|| anyhow!("this DICOM file holds no image (it has no Pixel Data)"))?;
    check_pixel_data(&a, &pixel, ts.is_encapsulated_pixel_data())?;

    let n = u64::from(a.rows) * u64::from(a.cols);
    let samples = u64::from(a.samples);
    // One decoded frame, as a codec (or a native frame's copy) holds it.
    let frame = n * samples * u64::from(a.bits_allocated).div_ceil(8);
    let codec = match pixel {
        // OW data is copied whole into bytes, then the frame out of it.
        scan::PixelData::Native { len } => len + frame,
        // The fragments cloned and one frame's gathered (dicom-rs, or ours for JPEG); the
        // decoder's output, its planes or coefficients, and the adapter's frame buffer.
        scan::PixelData::Encapsulated { bytes, .. } => 3 * bytes + 3 * frame,
    };
    // The f64 plane and, for grey, its 8-bit levels and the RGB picture (up to twice its
    // size while it grows); colour pictures are the decoded RGB samples themselves.
    let plane = if a.samples == 1 { n * 8 + n * 7 } else { n * 3 };
    // Decoder state, inflate and read buffers, the file meta table.
    const FIXED: u64 = 1 << 20;
    Ok(checked.walk.model + codec + plane + FIXED)
}

/// Frames in the file, from its checked structure (no pixel decoded).
pub fn slice_count(bytes: &[u8]) -> Result<usize> {
    let checked = check(bytes)?;
    let frames = checked.walk.top.frames.unwrap_or(1).max(1);
    Ok(usize::try_from(frames).unwrap_or(usize::MAX))
}

/// The Instance Number (0020,0013) of a checked file, which orders a series' files.
pub fn instance_number(bytes: &[u8]) -> Result<Option<i64>> {
    check(bytes)?;
    let obj = open(bytes)?;
    Ok(obj
        .get(tags::INSTANCE_NUMBER)
        .and_then(|e| e.to_str().ok())
        .and_then(|s| s.trim().parse::<i64>().ok()))
}

/// Declared sizes that the pixel data must back: native data at least as long as all the
/// frames the header declares (as pydicom requires), encapsulated data a fragment per
/// frame at least.
fn check_pixel_data(a: &Attrs, pixel: &scan::PixelData, encapsulated: bool) -> Result<()> {
    match *pixel {
        scan::PixelData::Native { len } => {
            ensure!(
                !encapsulated,
                "corrupt DICOM file: native pixel data in a file whose transfer syntax says \
                 it is encapsulated"
            );
            let n = u128::from(a.rows) * u128::from(a.cols);
            let frames = a.frames as u128;
            let need = if a.bits_allocated == 1 {
                (n * frames).div_ceil(8)
            } else {
                let samples = if a.samples == 3 && a.pi == "YBR_FULL_422" {
                    2
                } else {
                    u128::from(a.samples)
                };
                n * samples * u128::from(a.bits_allocated / 8) * frames
            };
            ensure!(
                u128::from(len) >= need,
                "the pixel data holds {len} bytes, but {} frame(s) of {}x{} pixels need {need} \
                 (truncated or corrupt file?)",
                a.frames,
                a.cols,
                a.rows
            );
        }
        scan::PixelData::Encapsulated { fragments, .. } => {
            ensure!(
                encapsulated,
                "corrupt DICOM file: encapsulated pixel data in a file whose transfer syntax \
                 says it is native"
            );
            ensure!(
                fragments >= a.frames as u64,
                "the pixel data holds {fragments} fragment(s) for {} frame(s) (truncated or \
                 corrupt file?)",
                a.frames
            );
        }
    }
    Ok(())
}

/// Decodes the wanted frame of a DICOM file held in memory.
pub fn read(bytes: &[u8], opts: &MedicalOptions) -> Result<Plane> {
    let checked = check(bytes)?;
    let obj = open(bytes)?;
    let ts_uid = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_owned();
    let ts = TransferSyntaxRegistry
        .get(&ts_uid)
        .ok_or_else(|| anyhow!("unknown DICOM transfer syntax UID {ts_uid}"))?;
    let is_jpeg = is_ours(&ts_uid);
    ensure!(
        ts_uid == checked.layout.ts_uid,
        "internal error: transfer syntax {ts_uid} read, {} checked",
        checked.layout.ts_uid
    );
    if obj.get(tags::PIXEL_DATA).is_none() {
        if obj.get(tags::FLOAT_PIXEL_DATA).is_some()
            || obj.get(tags::DOUBLE_FLOAT_PIXEL_DATA).is_some()
        {
            bail!("DICOM float pixel data is not supported");
        }
        bail!("this DICOM file holds no image (it has no Pixel Data)");
    }
    let a = Attrs::read(&obj)?;
    // decode_cost sized this decode by the walk's reading of these attributes.
    let top = &checked.walk.top;
    ensure!(
        top.rows == Some(u64::from(a.rows))
            && top.cols == Some(u64::from(a.cols))
            && top.bits_allocated == Some(u64::from(a.bits_allocated))
            && top.samples.unwrap_or(1) == u64::from(a.samples),
        "the DICOM image attributes (Rows, Columns, Bits Allocated, Samples per Pixel) are \
         encoded in a way medvlm cannot read consistently"
    );
    let pixel =
        checked.walk.pixel.as_ref().ok_or_else(|| {
            anyhow!("the Pixel Data is not at the top level of the DICOM data set")
        })?;
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
    check_pixel_data(&a, pixel, ts.is_encapsulated_pixel_data())?;

    let samples = if is_jpeg {
        jpeg_frame(&obj, &a, frame, ts_uid == JPEG_BASELINE)?
    } else if ts.is_encapsulated_pixel_data() {
        if ts_uid != RLE_LOSSLESS {
            check_jpeg_frame_header(&obj, &a, frame)?;
        }
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
        let int = |tag: Tag| uint(obj, tag).map(u64::from);
        Self::new(
            int(tags::ROWS),
            int(tags::COLUMNS),
            int(tags::BITS_ALLOCATED),
            int(tags::BITS_STORED),
            int(tags::SAMPLES_PER_PIXEL),
            int(tags::NUMBER_OF_FRAMES),
            text(obj, tags::PHOTOMETRIC_INTERPRETATION),
            uint(obj, tags::PIXEL_REPRESENTATION) == Some(1),
            uint(obj, tags::PLANAR_CONFIGURATION) == Some(1),
        )
    }

    /// The attributes' checks, shared by the decode (values from dicom-rs) and
    /// `decode_cost` (values from the structure walk).
    #[allow(clippy::too_many_arguments)]
    fn new(
        rows: Option<u64>,
        cols: Option<u64>,
        bits_allocated: Option<u64>,
        bits_stored: Option<u64>,
        samples: Option<u64>,
        frames: Option<u64>,
        pi: Option<String>,
        signed: bool,
        planar: bool,
    ) -> Result<Self> {
        let need = |v: Option<u64>, name: &str| {
            v.and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| anyhow!("the DICOM file has no valid {name}"))
        };
        let rows = need(rows, "Rows")?;
        let cols = need(cols, "Columns")?;
        let bits_allocated = need(bits_allocated, "Bits Allocated")?;
        let samples = samples.unwrap_or(1);
        let pi = pi
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
        let bits_allocated = bits_allocated as u16;
        // Frames are only counted (one is decoded); beyond the pixel data they are refused
        // by `check_pixel_data`.
        let frames = usize::try_from(frames.unwrap_or(1).max(1))
            .map_err(|_| anyhow!("the DICOM file has an invalid Number of Frames"))?;
        let bits_stored = bits_stored.map_or(bits_allocated, |b| b.min(64) as u16);
        Ok(Self {
            rows,
            cols,
            frames,
            samples: samples as u16,
            bits_allocated,
            bits_stored: bits_stored.clamp(1, bits_allocated),
            signed,
            planar,
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

/// dicom-rs decodes JPEG Lossless with jpeg-decoder, which allocates for the size that the
/// JPEG stream's own frame header states, whatever the DICOM header says (up to 65535 x
/// 65535 samples of 16 bits per component, from a few bytes). So that frame header, in the
/// bytes dicom-rs' adapter will hand the decoder (its own choice of fragments, repeated
/// here), must match the DICOM image before the decoder runs.
fn check_jpeg_frame_header(obj: &DefaultDicomObject, a: &Attrs, frame: usize) -> Result<()> {
    let Some(fragments) = obj.number_of_fragments() else {
        return Ok(());
    };
    let frames = obj.number_of_frames().unwrap_or(1) as usize;
    let data = if fragments == 1 || fragments as usize == frames {
        obj.fragment(frame)
    } else {
        let table = obj.offset_table().unwrap_or_default();
        let base = match table.get(frame) {
            Some(&b) => b as usize,
            None if frame == 0 => 0,
            // dicom-rs fails without an offset for this frame, before decoding.
            None => return Ok(()),
        };
        let next = table.get(frame + 1).map(|&n| n as usize);
        let mut out = Vec::new();
        let mut offset = 0usize;
        for i in 0..fragments as usize {
            let Some(f) = obj.fragment(i) else { break };
            if offset >= base {
                out.extend_from_slice(&f);
            }
            offset += f.len() + 8;
            if next.is_some_and(|n| offset >= n) {
                break;
            }
        }
        Some(std::borrow::Cow::Owned(out))
    };
    // dicom-rs reports missing fragments itself, before decoding.
    let Some(data) = data else { return Ok(()) };
    let info = jpeg::info(&data)?;
    ensure!(
        u32::from(info.width) == a.cols && u32::from(info.height) == a.rows,
        "the JPEG image is {}x{} but the DICOM header says {}x{}",
        info.width,
        info.height,
        a.cols,
        a.rows
    );
    ensure!(
        info.component_ids.len() == usize::from(a.samples),
        "the JPEG image has {} component(s) but the DICOM header says {} sample(s) per pixel",
        info.component_ids.len(),
        a.samples
    );
    ensure!(
        u16::from(info.precision).div_ceil(8) <= a.bits_allocated.div_ceil(8),
        "the JPEG image has {}-bit samples but the DICOM header allocates {} bits",
        info.precision,
        a.bits_allocated
    );
    Ok(())
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

    /// Deepest sequence nesting in a dicom-rs object, counted with an explicit stack.
    fn object_depth(obj: &InMemDicomObject) -> usize {
        let mut deepest = 0;
        let mut todo = vec![(obj, 0usize)];
        while let Some((o, depth)) = todo.pop() {
            deepest = deepest.max(depth);
            for e in o.iter() {
                for item in e.items().unwrap_or_default() {
                    todo.push((item, depth + 1));
                }
            }
        }
        deepest
    }

    fn dicom_files() -> Vec<std::path::PathBuf> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        for dir in [
            "tests/fixtures/medical",
            "tests/fixtures/medical/synthetic",
            "../shared/data/medical-files",
        ] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for e in entries {
                let p = e.expect("entry").path();
                if p.extension().is_some_and(|x| x == "dcm") {
                    files.push(p);
                }
            }
        }
        files.sort();
        files
    }

    /// The structure walk reads every real file as dicom-rs does: the same nesting, the
    /// same image attributes, the same pixel data.
    #[test]
    fn walk_agrees_with_dicom_rs_on_real_files() {
        let files = dicom_files();
        assert!(files.len() >= 20, "{} files", files.len());
        let mut nested = 0;
        for path in files {
            let name = path.display();
            let bytes = std::fs::read(&path).expect("read");
            let checked = match check(&bytes) {
                Ok(c) => c,
                // The one fixture refused by transfer syntax, before any walk.
                Err(e) => {
                    assert!(e.to_string().contains("JPEG 2000"), "{name}: {e}");
                    continue;
                }
            };
            let obj = open(&bytes).expect("dicom-rs reads it");
            let walk = &checked.walk;
            assert_eq!(walk.depth, object_depth(&obj), "{name}");
            nested += usize::from(walk.depth > 0);
            let a = Attrs::read(&obj).expect("attributes");
            let t = &walk.top;
            assert_eq!(t.rows, Some(u64::from(a.rows)), "{name}");
            assert_eq!(t.cols, Some(u64::from(a.cols)), "{name}");
            assert_eq!(
                t.bits_allocated,
                Some(u64::from(a.bits_allocated)),
                "{name}"
            );
            assert_eq!(t.samples.unwrap_or(1), u64::from(a.samples), "{name}");
            assert_eq!(t.frames.unwrap_or(1).max(1), a.frames as u64, "{name}");
            match walk.pixel.clone().expect("pixel data") {
                scan::PixelData::Native { len } => {
                    let px = obj.get(tags::PIXEL_DATA).expect("pixel data");
                    assert_eq!(len as usize, px.to_bytes().expect("bytes").len(), "{name}");
                }
                scan::PixelData::Encapsulated { fragments, .. } => {
                    assert_eq!(Some(fragments as u32), obj.number_of_fragments(), "{name}");
                }
            }
            assert!(decode_cost(&bytes).is_ok(), "{name}");
        }
        assert!(nested >= 3, "only {nested} files with sequences");
    }

    /// Edge cases of dicom-rs' reader that the walk must follow rather than refuse (or the
    /// reverse): each data set is read by both, and both must agree.
    #[test]
    fn walk_follows_dicom_rs_edge_cases() {
        let le = |g: u16, e: u16, len: u32| {
            let mut v = g.to_le_bytes().to_vec();
            v.extend_from_slice(&e.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v
        };
        let ui = |e: u16| [le(0x0008, e, 4), b"1.2\0".to_vec()].concat();
        let mut cases: Vec<(&str, Vec<u8>, bool)> = vec![
            // An item delimiter outside any sequence is skipped.
            (
                "stray delimiter",
                [ui(0x16), le(0xFFFE, 0xE00D, 0), ui(0x18)].concat(),
                true,
            ),
            // A defined-length item ended early by a delimiter.
            (
                "delimited defined item",
                [
                    ui(0x16),
                    le(0x0008, 0x1115, 0xFFFF_FFFF),
                    le(0xFFFE, 0xE000, 20),
                    ui(0x1150),
                    le(0xFFFE, 0xE00D, 0),
                    le(0xFFFE, 0xE0DD, 0),
                ]
                .concat(),
                true,
            ),
            // Encapsulated pixel data cut off after a fragment: accepted in explicit VR
            // (below), not in implicit VR, whose item header reader fails differently.
            (
                "open pixel sequence",
                [
                    ui(0x16),
                    le(0x7FE0, 0x0010, 0xFFFF_FFFF),
                    le(0xFFFE, 0xE000, 0),
                ]
                .concat(),
                false,
            ),
            // A sequence left open at the end: refused.
            (
                "open sequence",
                [
                    ui(0x16),
                    le(0x0008, 0x1115, 0xFFFF_FFFF),
                    le(0xFFFE, 0xE000, 0),
                ]
                .concat(),
                false,
            ),
            // A tag cut short ends the data set; a header cut short does not.
            ("short tag", [ui(0x16), vec![0x08, 0x00]].concat(), true),
            (
                "short header",
                [ui(0x16), vec![0x08, 0x00, 0x18, 0x00, 4]].concat(),
                false,
            ),
            // An item delimiter where an item should start.
            (
                "delimiter for item",
                [
                    ui(0x16),
                    le(0x0008, 0x1115, 0xFFFF_FFFF),
                    le(0xFFFE, 0xE00D, 0),
                ]
                .concat(),
                false,
            ),
        ];
        let explicit = [
            vec![0x08, 0x00, 0x16, 0x00],
            b"UI\x04\x001.2\0".to_vec(),
            vec![0xE0, 0x7F, 0x10, 0x00],
            b"OB\0\0".to_vec(),
            0xFFFF_FFFFu32.to_le_bytes().to_vec(),
            le(0xFFFE, 0xE000, 0),
            le(0xFFFE, 0xE000, 2),
            vec![1, 2],
        ]
        .concat();
        cases.push(("open pixel sequence, explicit", explicit, true));
        for (name, data, ok) in cases {
            let uid = if name.ends_with("explicit") {
                uids::EXPLICIT_VR_LITTLE_ENDIAN
            } else {
                uids::IMPLICIT_VR_LITTLE_ENDIAN
            };
            let ts = TransferSyntaxRegistry.get(uid).expect("ts");
            let theirs = InMemDicomObject::read_dataset_with_ts(&data[..], ts).is_ok();
            let layout = scan::layout(&data).expect("bare data set");
            let ours = scan::walk(&data, &layout);
            assert_eq!(theirs, ok, "{name}: dicom-rs");
            assert_eq!(ours.is_ok(), ok, "{name}: walk {ours:?}");
        }
    }

    #[test]
    fn not_dicom() {
        assert!(read(b"", &MedicalOptions::default()).is_err());
        assert!(read(b"hello there, not dicom", &MedicalOptions::default()).is_err());
    }
}
