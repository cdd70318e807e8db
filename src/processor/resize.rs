//! Pillow's `Image.resize` for 8-bit RGB images, reimplemented so that every output byte is
//! the one Pillow produces.
//!
//! Qwen2-VL checkpoints were trained on pixels resized by Pillow (transformers' slow image
//! processor goes through `PIL.Image.resize`), so a "close enough" resampler would feed the
//! vision tower slightly different inputs than it was trained on and break parity tests. The
//! algorithm is Pillow's separable convolution (`libImaging/Resample.c`, Pillow 13):
//!
//! - per output pixel, a window of input pixels and its weights, computed in `f64` from the
//!   filter stretched by the downscale factor and normalised to sum to one;
//! - the weights converted to fixed point with [`PRECISION_BITS`] fractional bits;
//! - a horizontal pass over only the input rows the vertical pass reads, rounded and clipped
//!   to 8 bits, then a vertical pass over that intermediate image, rounded and clipped again;
//!   except that Pillow 13 runs the vertical pass first when the height shrinks by more than
//!   twice as many pixels as the width (python-pillow/Pillow#9549);
//! - nearest neighbour as Pillow's affine scaling, not a convolution.
//!
//! The intermediate 8-bit rounding is part of Pillow's output, so it is reproduced rather than
//! "improved" by a single float pass. Checked against Pillow 13.0.0 on over 4,000 random
//! sizes and all six filters: every output byte equal.
//!
//! [`resize_torch`] is the same convolution as PyTorch runs it on a uint8 image
//! (`F.interpolate(..., antialias=True)`, which torchvision's `resize` calls and transformers'
//! torchvision image backend uses): ATen's port of Pillow-SIMD
//! (aten/src/ATen/native/cpu/UpSampleKernel.cpp, `_compute_indices_int16_weights_aa` and
//! `basic_loop_aa_horizontal<uint8_t>`; the AVX2 kernels compute the same integers). It
//! differs from Pillow in three places: the fixed-point weights are int16, with as many
//! fractional bits as keep the largest weight below 2^15 (at most 22), per axis; the cubic
//! kernel's far lobe is written `((a x - 5a) x + 8a) x - 4a`; and the horizontal pass always
//! runs first.

use std::ops::Range;

use anyhow::{bail, ensure, Result};
use image::RgbImage;

/// Fractional bits of Pillow's fixed-point weights (`32 - 8 - 2`), leaving room for 8-bit
/// samples times weights slightly above one without overflowing an `i32`.
pub const PRECISION_BITS: u32 = 22;

/// RGB: three interleaved 8-bit channels.
const CHANNELS: usize = 3;

/// A resampling filter, numbered as PIL's `Image.Resampling` enum (the `resample` field of
/// preprocessor_config.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Filter {
    /// Maps PIL's enum value (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming).
    pub fn from_pil(value: i64) -> Result<Self> {
        Ok(match value {
            0 => Filter::Nearest,
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            _ => bail!(
                "resample {value} is not a PIL filter (0 nearest, 1 lanczos, 2 bilinear, \
                 3 bicubic, 4 box, 5 hamming)"
            ),
        })
    }

    /// PIL's enum value, the inverse of [`Filter::from_pil`].
    pub fn to_pil(self) -> i64 {
        match self {
            Filter::Nearest => 0,
            Filter::Lanczos => 1,
            Filter::Bilinear => 2,
            Filter::Bicubic => 3,
            Filter::Box => 4,
            Filter::Hamming => 5,
        }
    }

    /// Half-width of the kernel at scale 1, in input pixels.
    fn support(self) -> f64 {
        match self {
            Filter::Nearest => 0.0,
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    /// The kernel. The arithmetic is written in the same order as Pillow's so that the `f64`
    /// weights, and hence the rounded fixed-point ones, agree to the last bit.
    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Nearest => 0.0,
            Filter::Box => box_kernel(x),
            Filter::Bilinear => bilinear_kernel(x),
            Filter::Hamming => hamming_kernel(x),
            Filter::Bicubic => bicubic_kernel(x),
            Filter::Lanczos => lanczos_kernel(x),
        }
    }
}

fn box_kernel(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_kernel(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn hamming_kernel(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        1.0
    } else if x >= 1.0 {
        0.0
    } else {
        let x = x * std::f64::consts::PI;
        // Pillow writes these constants as C floats (0.54f, 0.46f), so they are the f32
        // values widened to f64, not the f64 literals.
        x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
    }
}

/// Which library's resampler to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Pillow,
    Torch,
}

/// Keys' cubic convolution with a = -0.5 as ATen writes it (`cubic_convolution1/2` in
/// UpSample.h, `HelperInterpCubic::aa_filter`): the far lobe's products in another order than
/// Pillow's, so the `f64` weights may differ in the last bit.
fn bicubic_kernel_torch(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// Keys' cubic convolution with a = -0.5 (Pillow's choice; some libraries use -0.75).
fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos_kernel(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// The input window and fixed-point weights of every output pixel along one axis.
#[derive(Debug)]
struct Coefficients {
    /// Per output pixel: first input index and number of input pixels in its window.
    bounds: Vec<(usize, usize)>,
    /// `bounds.len() * ksize` weights; output pixel `i` uses `weights[i * ksize..][..count]`.
    weights: Vec<i32>,
    ksize: usize,
    /// Fractional bits of the weights.
    precision: u32,
}

impl Coefficients {
    fn window(&self, i: usize) -> (usize, &[i32]) {
        let (start, count) = self.bounds[i];
        (start, &self.weights[i * self.ksize..i * self.ksize + count])
    }

    /// First input index read by any output pixel, and one past the last.
    fn span(&self) -> (usize, usize) {
        let first = self.bounds.first().map_or(0, |b| b.0);
        let last = self.bounds.last().map_or(0, |b| b.0 + b.1);
        (first, last)
    }
}

/// Computes the windows and weights for resizing `in_size` pixels to `out_size` along one axis.
///
/// When shrinking, the kernel is stretched by the scale factor so that every input pixel
/// contributes (antialiasing); when enlarging it keeps its natural width.
///
/// Both libraries share the windows and the `f64` weights (torch with its own cubic kernel);
/// the fixed point has Pillow's 22 bits or torch's [`torch_precision`].
fn coefficients(in_size: usize, out_size: usize, filter: Filter, flavour: Flavour) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let ksize = support.ceil() as usize * 2 + 1;
    // Pillow multiplies by the reciprocal rather than dividing by the scale; the two differ
    // in the last bit for some scales.
    let inv_scale = 1.0 / filter_scale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut normalised = vec![0f64; out_size * ksize];
    for (i, out) in normalised.chunks_exact_mut(ksize).enumerate() {
        let center = (i as f64 + 0.5) * scale;
        // `as` truncates toward zero like C's (int) cast; negative starts are clamped to 0.
        let start = ((center - support + 0.5) as i64).max(0) as usize;
        let end = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
        let count = end.saturating_sub(start).min(ksize);
        let mut sum = 0.0;
        for (x, w) in out[..count].iter_mut().enumerate() {
            let at = (x as f64 + start as f64 - center + 0.5) * inv_scale;
            *w = match (flavour, filter) {
                (Flavour::Torch, Filter::Bicubic) => bicubic_kernel_torch(at),
                _ => filter.eval(at),
            };
            sum += *w;
        }
        if sum != 0.0 {
            for w in &mut out[..count] {
                *w /= sum;
            }
        }
        bounds.push((start, count));
    }
    let precision = match flavour {
        Flavour::Pillow => PRECISION_BITS,
        Flavour::Torch => torch_precision(&normalised),
    };
    Coefficients {
        bounds,
        weights: normalised.iter().map(|&w| to_fixed(w, precision)).collect(),
        ksize,
        precision,
    }
}

/// ATen's fractional bits for int16 weights: the most, up to 22, for which the largest weight
/// (or zero, the padding's) times `2^(bits + 1)`, rounded, stays below 2^15.
fn torch_precision(weights: &[f64]) -> u32 {
    let w_max = weights.iter().copied().fold(0f64, f64::max);
    let mut bits = 0;
    while bits < 22 {
        let next = (0.5 + w_max * f64::from(1u32 << (bits + 1))) as i64;
        if next >= 1 << 15 {
            break;
        }
        bits += 1;
    }
    bits
}

/// Converts a weight to fixed point with `bits` fractional bits, rounding half away from zero
/// as Pillow (and ATen) do.
fn to_fixed(w: f64, bits: u32) -> i32 {
    let scaled = w * f64::from(1u32 << bits);
    if w < 0.0 {
        (scaled - 0.5) as i32
    } else {
        (scaled + 0.5) as i32
    }
}

/// One output sample: the weighted sum of `count` samples `stride` bytes apart, from an
/// accumulator that starts at one half, rounded back to 8 bits and clamped to 0..=255.
///
/// Wrapping arithmetic mirrors C's `int` accumulator; with weights summing to one the sum
/// cannot overflow, and wrapping keeps a pathological kernel from panicking.
fn convolve(src: &[u8], first: usize, stride: usize, weights: &[i32], precision: u32) -> u8 {
    let mut acc: i32 = 1 << (precision.max(1) - 1);
    for (k, &w) in weights.iter().enumerate() {
        let sample = i32::from(src[first + k * stride]);
        acc = acc.wrapping_add(sample.wrapping_mul(w));
    }
    (acc >> precision).clamp(0, 255) as u8
}

/// Horizontal pass over input rows `rows`, producing `coeffs.bounds.len()` columns.
fn resample_horizontal(
    src: &[u8],
    src_width: usize,
    rows: Range<usize>,
    coeffs: &Coefficients,
) -> Vec<u8> {
    resample_horizontal_shifted(src, src_width, rows, coeffs, 0)
}

/// Horizontal pass over an image that holds only the input columns from `col_offset` on.
fn resample_horizontal_shifted(
    src: &[u8],
    src_width: usize,
    rows: Range<usize>,
    coeffs: &Coefficients,
    col_offset: usize,
) -> Vec<u8> {
    let out_width = coeffs.bounds.len();
    let stride = src_width * CHANNELS;
    let mut out = Vec::with_capacity(rows.len() * out_width * CHANNELS);
    for y in rows {
        let row = &src[y * stride..(y + 1) * stride];
        for x in 0..out_width {
            let (start, weights) = coeffs.window(x);
            let first = (start - col_offset) * CHANNELS;
            for c in 0..CHANNELS {
                out.push(convolve(
                    row,
                    first + c,
                    CHANNELS,
                    weights,
                    coeffs.precision,
                ));
            }
        }
    }
    out
}

/// Vertical pass over input columns `cols` of an image `src_width` pixels wide that holds
/// only the input rows from `row_offset` on.
fn resample_vertical(
    src: &[u8],
    src_width: usize,
    cols: Range<usize>,
    row_offset: usize,
    coeffs: &Coefficients,
) -> Vec<u8> {
    let stride = src_width * CHANNELS;
    let mut out = Vec::with_capacity(coeffs.bounds.len() * cols.len() * CHANNELS);
    for y in 0..coeffs.bounds.len() {
        let (start, weights) = coeffs.window(y);
        let first = (start - row_offset) * stride;
        for i in cols.start * CHANNELS..cols.end * CHANNELS {
            out.push(convolve(src, first + i, stride, weights, coeffs.precision));
        }
    }
    out
}

/// Nearest neighbour as Pillow does it: an affine scaling whose source coordinate starts at
/// half a step and is advanced by repeated `f64` addition (so the accumulated rounding, not
/// an exact `(i + 0.5) * scale`, decides the rare ties), then truncated.
fn nearest_indices(in_size: usize, out_size: usize) -> Vec<usize> {
    let step = in_size as f64 / out_size as f64;
    let mut pos = step * 0.5;
    let mut out = Vec::with_capacity(out_size);
    for _ in 0..out_size {
        out.push((pos.max(0.0) as usize).min(in_size - 1));
        pos += step;
    }
    out
}

fn resize_nearest(img: &RgbImage, width: usize, height: usize) -> Vec<u8> {
    let src_width = img.width() as usize;
    let src = img.as_raw();
    let cols = nearest_indices(src_width, width);
    let rows = nearest_indices(img.height() as usize, height);
    let mut out = Vec::with_capacity(width * height * CHANNELS);
    for &y in &rows {
        let row = &src[y * src_width * CHANNELS..(y + 1) * src_width * CHANNELS];
        for &x in &cols {
            out.extend_from_slice(&row[x * CHANNELS..(x + 1) * CHANNELS]);
        }
    }
    out
}

/// Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
/// pixels as the width does (python-pillow/Pillow#9549; found by comparing both orders
/// against Pillow 13.0.0 on thousands of random sizes: this rule matched every one). The order
/// matters because each pass rounds to 8 bits.
fn vertical_first(in_w: usize, in_h: usize, width: usize, height: usize) -> bool {
    height < in_h && (in_h - height) as i64 > 2 * (in_w as i64 - width as i64)
}

/// Two-pass convolution as Pillow (or ATen) does it: a pass whose axis keeps its size is
/// skipped, and the first pass covers only the rows (or columns) the second pass reads.
fn resize_convolution(
    img: &RgbImage,
    width: usize,
    height: usize,
    filter: Filter,
    flavour: Flavour,
) -> Vec<u8> {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let vertical = (height != in_h).then(|| coefficients(in_h, height, filter, flavour));
    let horizontal = (width != in_w).then(|| coefficients(in_w, width, filter, flavour));
    match (&horizontal, &vertical) {
        (None, None) => src.clone(),
        (Some(h), None) => resample_horizontal(src, in_w, 0..in_h, h),
        (None, Some(v)) => resample_vertical(src, in_w, 0..in_w, 0, v),
        (Some(h), Some(v))
            if flavour == Flavour::Pillow && vertical_first(in_w, in_h, width, height) =>
        {
            let (first, last) = h.span();
            let tmp = resample_vertical(src, in_w, first..last, 0, v);
            resample_horizontal_shifted(&tmp, last - first, 0..height, h, first)
        }
        (Some(h), Some(v)) => {
            let (first, last) = v.span();
            let tmp = resample_horizontal(src, in_w, first..last, h);
            resample_vertical(&tmp, width, 0..width, first, v)
        }
    }
}

/// Resizes `img` to `width` x `height` exactly as Pillow's `Image.resize((width, height),
/// resample=filter)` does for an RGB image (no `box`, no `reducing_gap`).
///
/// Resizing to the same size returns a copy, as Pillow does.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> Result<RgbImage> {
    ensure!(
        width > 0 && height > 0,
        "cannot resize to {width}x{height}: both sides must be at least 1 pixel"
    );
    ensure!(
        img.width() > 0 && img.height() > 0,
        "cannot resize an empty {}x{} image",
        img.width(),
        img.height()
    );
    if (width, height) == img.dimensions() {
        return Ok(img.clone());
    }
    let (w, h) = (width as usize, height as usize);
    let data = match filter {
        Filter::Nearest => resize_nearest(img, w, h),
        _ => resize_convolution(img, w, h, filter, Flavour::Pillow),
    };
    RgbImage::from_raw(width, height, data)
        .ok_or_else(|| anyhow::anyhow!("internal error: resized buffer has the wrong length"))
}

/// Resizes `img` to `width` x `height` exactly as torchvision's `resize(..., antialias=True)`
/// does for a uint8 RGB tensor on the CPU (see the module notes): what transformers' default
/// (torchvision) image backend computes. Bilinear and bicubic only (the filters its antialiased
/// uint8 path has).
pub fn resize_torch(img: &RgbImage, width: u32, height: u32, filter: Filter) -> Result<RgbImage> {
    ensure!(
        matches!(filter, Filter::Bilinear | Filter::Bicubic),
        "resample {} ({filter:?}) is not supported with the torchvision image backend (bilinear \
         or bicubic)",
        filter.to_pil()
    );
    ensure!(
        width > 0 && height > 0,
        "cannot resize to {width}x{height}: both sides must be at least 1 pixel"
    );
    ensure!(
        img.width() > 0 && img.height() > 0,
        "cannot resize an empty {}x{} image",
        img.width(),
        img.height()
    );
    if (width, height) == img.dimensions() {
        return Ok(img.clone());
    }
    let data = resize_convolution(img, width as usize, height as usize, filter, Flavour::Torch);
    RgbImage::from_raw(width, height, data)
        .ok_or_else(|| anyhow::anyhow!("internal error: resized buffer has the wrong length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Filter; 6] = [
        Filter::Nearest,
        Filter::Lanczos,
        Filter::Bilinear,
        Filter::Bicubic,
        Filter::Box,
        Filter::Hamming,
    ];

    fn row(values: &[u8]) -> RgbImage {
        let data = values.iter().flat_map(|&v| [v, v, v]).collect();
        RgbImage::from_raw(values.len() as u32, 1, data).expect("buffer length")
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7 + y * 3) as u8, (x * y) as u8, (255 - x - y) as u8])
        })
    }

    #[test]
    fn constant_image_stays_constant_under_every_filter() {
        let img = RgbImage::from_pixel(13, 9, image::Rgb([200, 37, 0]));
        for filter in ALL {
            for (w, h) in [(5, 4), (28, 17), (13, 30), (1, 1), (40, 3)] {
                let out = resize(&img, w, h, filter).expect("resize");
                assert_eq!(out.dimensions(), (w, h));
                assert!(
                    out.pixels().all(|p| p.0 == [200, 37, 0]),
                    "{filter:?} to {w}x{h} changed a constant image"
                );
            }
        }
    }

    #[test]
    fn same_size_is_an_identity_copy() {
        let img = gradient(17, 11);
        for filter in ALL {
            assert_eq!(resize(&img, 17, 11, filter).expect("resize"), img);
        }
    }

    #[test]
    fn one_axis_unchanged_keeps_that_axis_exact() {
        // Only the vertical pass runs; columns must not mix.
        let img = gradient(6, 20);
        let out = resize(&img, 6, 7, Filter::Bicubic).expect("resize");
        let col_only = resize(
            &RgbImage::from_fn(1, 20, |_, y| *img.get_pixel(2, y)),
            1,
            7,
            Filter::Bicubic,
        )
        .expect("resize");
        for y in 0..7 {
            assert_eq!(out.get_pixel(2, y), col_only.get_pixel(0, y));
        }
    }

    #[test]
    fn bilinear_halving_rounds_half_up() {
        // 2 -> 1 pixel: scale 2, support 2, both weights filter(+-0.25) = 0.75, normalised to
        // 1/2 = 2^21 in fixed point. (10 + 21) / 2 = 15.5, and the 2^21 starting bias rounds
        // it up to 16.
        let out = resize(&row(&[10, 21]), 1, 1, Filter::Bilinear).expect("resize");
        assert_eq!(out.get_pixel(0, 0).0, [16, 16, 16]);
    }

    #[test]
    fn bicubic_halving_by_hand() {
        // 4 -> 2 pixels, output 0: scale 2, support 4, center 1.0, window x = 0..4 at kernel
        // positions (x - 0.5) / 2 = -0.25, 0.25, 0.75, 1.25 with weights 0.8671875,
        // 0.8671875, 0.2265625, -0.0703125 (sum 1.890625). The first weight normalised is
        // 0.45867768..., so 255 * 0.45867768 = 116.96 rounds to 117; the negative lobe alone
        // clips to 0.
        let coeffs = coefficients(4, 2, Filter::Bicubic, Flavour::Pillow);
        assert_eq!(coeffs.bounds[0], (0, 4));
        let w0 = 0.8671875 / 1.890625;
        assert_eq!(coeffs.window(0).1[0], (w0 * 4194304.0 + 0.5) as i32);
        assert_eq!(
            coeffs.window(0).1[3],
            (-0.0703125 / 1.890625 * 4194304.0 - 0.5) as i32
        );
        let out = resize(&row(&[255, 0, 0, 0]), 2, 1, Filter::Bicubic).expect("resize");
        assert_eq!(out.get_pixel(0, 0).0, [117; 3]);
        let out = resize(&row(&[0, 0, 0, 255]), 2, 1, Filter::Bicubic).expect("resize");
        assert_eq!(out.get_pixel(0, 0).0, [0; 3]);
    }

    /// torch's int16 weights for the same 4 -> 2 halving: the largest weight 0.45867768..
    /// times 2^17 would reach 60121 >= 2^15, so 16 fractional bits; the rounding is Pillow's.
    #[test]
    fn torch_weights_are_int16_with_the_most_bits_that_fit() {
        let c = coefficients(4, 2, Filter::Bicubic, Flavour::Torch);
        assert_eq!(c.precision, 16);
        let w0 = 0.8671875 / 1.890625;
        assert_eq!(c.window(0).1[0], (w0 * 65536.0 + 0.5) as i32);
        assert_eq!(
            c.window(0).1[3],
            (-0.0703125 / 1.890625 * 65536.0 - 0.5) as i32
        );
        // Enlarging: weights up to 1 leave 14 bits (1 x 2^15 would not fit).
        assert_eq!(torch_precision(&[1.0, 0.0]), 14);
        assert_eq!(torch_precision(&[0.0]), 22);
        // Torch runs the horizontal pass first, where Pillow 13 would not (see below).
        let gray = [[195, 103], [9, 211], [21, 242]];
        let img = RgbImage::from_fn(2, 3, |x, y| image::Rgb([gray[y as usize][x as usize]; 3]));
        assert!(vertical_first(2, 3, 4, 2));
        let ours = resize_torch(&img, 4, 2, Filter::Bicubic).expect("resize");
        let horizontal_first = resize_convolution(&img, 4, 2, Filter::Bicubic, Flavour::Torch);
        assert_eq!(ours.as_raw(), &horizontal_first);
        assert!(resize_torch(&img, 4, 2, Filter::Lanczos).is_err());
    }

    #[test]
    fn pass_order_follows_pillow_13() {
        // Height shrinks by more than twice what the width does: vertical pass first.
        assert!(!vertical_first(50, 60, 40, 40)); // 20 == 2 * 10
        assert!(vertical_first(50, 61, 40, 40)); // 21 > 2 * 10
        assert!(vertical_first(30, 300, 300, 299)); // width grows, height shrinks
        assert!(!vertical_first(30, 300, 60, 301)); // height grows
                                                    // 2x3 -> 4x2 bicubic; Pillow 13.0.0 gives these rows. Horizontal-first (Pillow <= 12)
                                                    // would give [132, 132, 137, 141] and [0, 56, 188, 251].
        let gray = [[195, 103], [9, 211], [21, 242]];
        let img = RgbImage::from_fn(2, 3, |x, y| image::Rgb([gray[y as usize][x as usize]; 3]));
        let out = resize(&img, 4, 2, Filter::Bicubic).expect("resize");
        let rows: Vec<Vec<u8>> = (0..2)
            .map(|y| (0..4).map(|x| out.get_pixel(x, y).0[0]).collect())
            .collect();
        assert_eq!(rows, [[128, 131, 138, 141], [0, 56, 188, 255]]);
    }

    #[test]
    fn upscaling_windows_stay_inside_the_image() {
        for filter in ALL {
            let out = resize(&gradient(3, 2), 50, 41, filter).expect("resize");
            assert_eq!(out.dimensions(), (50, 41));
        }
        let c = coefficients(3, 50, Filter::Lanczos, Flavour::Pillow);
        assert!(c.bounds.iter().all(|&(s, n)| s + n <= 3 && n > 0));
    }

    #[test]
    fn nearest_picks_centres() {
        let out = resize(&row(&[0, 10, 20, 30, 40, 50]), 3, 1, Filter::Nearest).expect("resize");
        let firsts: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(firsts, [10, 30, 50]);
    }

    #[test]
    fn zero_target_is_an_error() {
        assert!(resize(&gradient(4, 4), 0, 3, Filter::Bicubic).is_err());
    }

    #[test]
    fn pil_enum_round_trips() {
        for v in 0..6 {
            assert_eq!(Filter::from_pil(v).expect("valid").to_pil(), v);
        }
        assert!(Filter::from_pil(6).is_err());
    }
}
