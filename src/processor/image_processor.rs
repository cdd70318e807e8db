//! Qwen2-VL's image processor: RGB image to the flattened pixel patches the vision tower
//! reads, numerically identical to transformers 4.57's (slow, PIL-based)
//! `Qwen2VLImageProcessor`.
//!
//! The steps and their exact arithmetic, each matching what numpy does in transformers:
//! 1. [`smart_resize`] picks a size divisible by `patch_size * merge_size` with a pixel count
//!    inside `[min_pixels, max_pixels]`, keeping the aspect ratio (Python `f64` arithmetic).
//! 2. Resize with Pillow's resampler ([`super::resize`]), skipped when the size is unchanged.
//! 3. Rescale: `(u8 as f64 * rescale_factor) as f32` (numpy upcasts to float64, multiplies,
//!    then casts to float32).
//! 4. Normalize: `(x - mean) / std` in `f32`, with mean and std rounded to `f32` first.
//! 5. A single image is repeated `temporal_patch_size` times (the vision tower's patches
//!    are 3-D, built for video), then cut into patches in 2x2 merge-window order.
//!
//! A checkpoint whose preprocessor_config.json names a "fast" processor
//! (`"image_processor_type": "Qwen2VLImageProcessorFast"`, as Qwen3-VL's releases do) gets
//! transformers' torchvision backend instead, bit for bit: the resize is torch's uint8
//! antialiased convolution ([`super::resize::resize_torch`]) and steps 3-4 are one fused
//! `(x - mean / rescale_factor) / (std / rescale_factor)` in `f32` (transformers 5.24,
//! image_processing_backends.py, `TorchvisionBackend.rescale_and_normalize`). transformers
//! 5.24 takes that backend whenever torchvision is installed, whatever the type says; the
//! type is the one place a checkpoint records which backend it was made with (4.57 loaded the
//! "Fast" class only when told to), so it decides here.
//!
//! Frames of a video (the slices of a scan sent as one) follow transformers 5.24's
//! `Qwen2VLVideoProcessor` instead: the pixel bounds of video_preprocessor_config.json, the
//! frame count padded to a multiple of `temporal_patch_size` with the last frame, and its
//! torch arithmetic for step 3-4 (one fused `(x - mean * 255) / (std * 255)` in `f32`). Its
//! resize is torchvision's; ours stays Pillow's, so frames that need resizing differ from it
//! by the two filters' rounding (frames already at the target size are bit-identical).

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use image::RgbImage;
use serde_json::{Map, Value};

use super::resize::{resize, resize_torch, Filter};

/// transformers' `OPENAI_CLIP_MEAN`, as the Python floats (`f64`) it is written as.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// transformers' `OPENAI_CLIP_STD`, as Python floats.
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Rounds Python floats to `f32` the way numpy does (`np.array(mean, dtype=np.float32)`:
/// decimal to `f64`, then `f64` to `f32`), which is not always the same as parsing the
/// decimal straight to `f32`.
fn to_f32_triple(v: [f64; 3]) -> [f32; 3] {
    v.map(|x| x as f32)
}

use super::image::MAX_ASPECT_RATIO;

/// `max_pixels` of Qwen2-VL's released preprocessor_config.json (16384 x 28 x 28); its
/// `min_pixels` is transformers' default, [`ImageProcessorConfig::default`]'s.
pub const QWEN2_VL_MAX_PIXELS: usize = 12_845_056;

/// A Qwen2-VL / Qwen2.5-VL preprocessor_config.json (the PIL `Qwen2VLImageProcessor`, two
/// frames per patch), as the released checkpoints write it, with these settings.
pub fn qwen2_vl_preprocessor_json(
    mean: [f64; 3],
    std: [f64; 3],
    (min_pixels, max_pixels): (usize, usize),
    patch_size: usize,
    merge_size: usize,
) -> Value {
    serde_json::json!({
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": mean,
        "image_std": std,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": patch_size, "temporal_patch_size": 2, "merge_size": merge_size,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
    })
}

/// Most pixels an image may have after resizing, and so the largest `min_pixels` and
/// `max_pixels` accepted: 2^24 = 16384 x 32 x 32, the largest of any released Qwen-VL
/// processor (Qwen2-VL's preprocessor_config.json says 12845056 = 16384 x 28 x 28). What one
/// image costs grows with it: at 2^24 pixels its patches alone are 400 MB (`3 x
/// temporal_patch_size x 4` bytes per pixel) before the vision tower sees them.
pub const MAX_PIXELS: usize = 1 << 24;

/// Largest `patch_size` accepted: vision transformers use 14 (Qwen2-VL), 16 or 32.
pub const MAX_PATCH_SIZE: usize = 64;

/// Largest `merge_size` and `temporal_patch_size` accepted: Qwen-VL uses 2 for both; each
/// multiplies what an image costs (a merge window's patches, a patch's frames).
pub const MAX_MERGE_SIZE: usize = 4;
pub const MAX_TEMPORAL_PATCH_SIZE: usize = 4;

/// Settings of the image processor, as in preprocessor_config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    /// Images are always converted to RGB before they reach [`ImageProcessor::preprocess`]
    /// (it takes an [`RgbImage`]); the field is kept so that configs round-trip.
    pub do_convert_rgb: bool,
    pub resample: Filter,
    /// Whose arithmetic resizes and normalises images.
    pub backend: Backend,
}

/// The two image backends of transformers' Qwen2-VL image processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `Qwen2VLImageProcessor` of transformers 4.x (`Qwen2VLImageProcessorPil` in 5.x): Pillow's
    /// resize, numpy's rescale and normalise.
    Pil,
    /// `Qwen2VLImageProcessorFast` (transformers 5's default): torch's resize and one fused
    /// normalisation in `f32`.
    Torchvision,
}

impl Backend {
    /// How images lose their transparency before this backend sees them: dropped, as
    /// transformers 4.57 did (whose PIL processor [`Backend::Pil`] mirrors), or composited
    /// over white, as transformers 5.24 does (whose torchvision backend
    /// [`Backend::Torchvision`] mirrors).
    pub fn alpha(self) -> super::image::Alpha {
        match self {
            Backend::Pil => super::image::Alpha::Drop,
            Backend::Torchvision => super::image::Alpha::OverWhite,
        }
    }

    /// The backend an `image_processor_type` was saved with: a "Fast" class is the torchvision
    /// one; anything else (or nothing) the PIL one.
    fn of_type(image_processor_type: Option<&str>) -> Self {
        match image_processor_type {
            Some(t) if t.ends_with("Fast") => Backend::Torchvision,
            _ => Backend::Pil,
        }
    }
}

impl Default for ImageProcessorConfig {
    /// transformers' defaults for `Qwen2VLImageProcessor`.
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: to_f32_triple(CLIP_MEAN),
            image_std: to_f32_triple(CLIP_STD),
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
            do_convert_rgb: true,
            resample: Filter::Bicubic,
            backend: Backend::Pil,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads preprocessor_config.json. Missing keys take transformers' defaults; the pixel
    /// limits come from `min_pixels`/`max_pixels`, else from `size.shortest_edge`/
    /// `size.longest_edge`. Errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = super::input::read_bounded_string(
            path,
            super::input::MAX_SIDE_FILE_BYTES,
            "image processor config",
        )?;
        Self::from_json(&text).map_err(|e| anyhow!("{}: {e:#}", path.display()))
    }

    /// Parses the contents of preprocessor_config.json (see [`Self::from_file`]).
    pub fn from_json(text: &str) -> Result<Self> {
        Self::parse(text, &Self::default())
    }

    /// What videos use when a checkpoint has no video_preprocessor_config.json: this
    /// (image) config with the per-frame pixel bounds of transformers' video processor.
    pub fn video_defaults(&self) -> Self {
        Self {
            min_pixels: VIDEO_MIN_PIXELS,
            max_pixels: VIDEO_MAX_PIXELS,
            ..self.clone()
        }
    }

    /// Reads video_preprocessor_config.json; missing keys take [`Self::video_defaults`] of
    /// the image config `image`.
    pub fn video_from_file(path: &Path, image: &Self) -> Result<Self> {
        let text = super::input::read_bounded_string(
            path,
            super::input::MAX_SIDE_FILE_BYTES,
            "video processor config",
        )?;
        Self::parse(&text, &image.video_defaults())
            .map_err(|e| anyhow!("{}: {e:#}", path.display()))
    }

    /// Parses a processor config, missing keys taken from `d`.
    fn parse(text: &str, d: &Self) -> Result<Self> {
        let value: Value = serde_json::from_str(text).context("not valid JSON")?;
        let obj = value
            .as_object()
            .ok_or_else(|| anyhow!("expected a JSON object"))?;
        let (size_min, size_max) = size_limits(obj)?;
        let min_pixels = get_usize(obj, "min_pixels")?;
        let max_pixels = get_usize(obj, "max_pixels")?;
        // Errors name the field the value came from.
        let names = Names {
            min: if min_pixels.is_none() && size_min.is_some() {
                "field size.shortest_edge"
            } else {
                "field min_pixels"
            },
            max: if max_pixels.is_none() && size_max.is_some() {
                "field size.longest_edge"
            } else {
                "field max_pixels"
            },
        };
        let config = Self {
            min_pixels: min_pixels.or(size_min).unwrap_or(d.min_pixels),
            max_pixels: max_pixels.or(size_max).unwrap_or(d.max_pixels),
            patch_size: get_positive(obj, "patch_size")?.unwrap_or(d.patch_size),
            temporal_patch_size: get_positive(obj, "temporal_patch_size")?
                .unwrap_or(d.temporal_patch_size),
            merge_size: get_positive(obj, "merge_size")?.unwrap_or(d.merge_size),
            image_mean: get_triple(obj, "image_mean")?.unwrap_or(d.image_mean),
            image_std: get_triple(obj, "image_std")?.unwrap_or(d.image_std),
            rescale_factor: get_f64(obj, "rescale_factor")?.unwrap_or(d.rescale_factor),
            do_resize: get_bool(obj, "do_resize")?.unwrap_or(d.do_resize),
            do_rescale: get_bool(obj, "do_rescale")?.unwrap_or(d.do_rescale),
            do_normalize: get_bool(obj, "do_normalize")?.unwrap_or(d.do_normalize),
            do_convert_rgb: get_bool(obj, "do_convert_rgb")?.unwrap_or(d.do_convert_rgb),
            resample: match get_i64(obj, "resample")? {
                Some(v) => Filter::from_pil(v).context("field resample")?,
                None => d.resample,
            },
            backend: match field(obj, "image_processor_type") {
                Some(v) => Backend::of_type(Some(v.as_str().ok_or_else(|| {
                    anyhow!("field image_processor_type: expected a string, got {v}")
                })?)),
                None => d.backend,
            },
        };
        config.validate(&names)?;
        Ok(config)
    }

    /// Applies user overrides of the pixel budget (e.g. MedVLM-R1 trains with
    /// `max_pixels = 401408`), checked as the file's values are; errors name an override by
    /// its command-line flag.
    pub fn with_pixel_limits(mut self, min: Option<usize>, max: Option<usize>) -> Result<Self> {
        if let Some(min) = min {
            self.min_pixels = min;
        }
        if let Some(max) = max {
            self.max_pixels = max;
        }
        self.validate(&Names {
            min: if min.is_some() {
                "--min-pixels"
            } else {
                "min_pixels"
            },
            max: if max.is_some() {
                "--max-pixels"
            } else {
                "max_pixels"
            },
        })?;
        Ok(self)
    }

    /// Side of the square every resized dimension is a multiple of.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Checks every value against what the pipeline can do with it: pixel limits ordered and
    /// within [`MAX_PIXELS`] (so a config cannot make one image cost gigabytes), patch sizes
    /// positive and within their maxima, and mean, std and rescale factor such that every
    /// normalised pixel value is a finite `f32`.
    fn validate(&self, names: &Names) -> Result<()> {
        let (min, max) = (names.min, names.max);
        ensure!(
            self.backend == Backend::Pil
                || matches!(self.resample, Filter::Bilinear | Filter::Bicubic),
            "field resample: {} ({:?}) is not supported by the torchvision backend this \
             processor type uses (2 bilinear or 3 bicubic)",
            self.resample.to_pil(),
            self.resample
        );
        ensure!(self.max_pixels > 0, "{max}: must be at least 1, got 0");
        for (name, value) in [(min, self.min_pixels), (max, self.max_pixels)] {
            ensure!(
                value <= MAX_PIXELS,
                "{name}: {value} is more than the {MAX_PIXELS} pixels an image may have after \
                 resizing"
            );
        }
        ensure!(
            self.min_pixels <= self.max_pixels,
            "{min} ({}) is larger than {max} ({})",
            self.min_pixels,
            self.max_pixels
        );
        for (name, value, most) in [
            ("patch_size", self.patch_size, MAX_PATCH_SIZE),
            ("merge_size", self.merge_size, MAX_MERGE_SIZE),
            (
                "temporal_patch_size",
                self.temporal_patch_size,
                MAX_TEMPORAL_PATCH_SIZE,
            ),
        ] {
            ensure!(
                (1..=most).contains(&value),
                "field {name}: must be between 1 and {most}, got {value}"
            );
        }
        ensure!(
            self.rescale_factor.is_finite() && self.rescale_factor > 0.0,
            "field rescale_factor: must be a positive finite number, got {:?}",
            self.rescale_factor
        );
        if let Some(i) = self.image_mean.iter().position(|m| !m.is_finite()) {
            bail!(
                "field image_mean: entry {i} is {:?}, but it must be a finite number",
                self.image_mean[i]
            );
        }
        if let Some(i) = self
            .image_std
            .iter()
            .position(|&s| s == 0.0 || !s.is_finite())
        {
            bail!(
                "field image_std: entry {i} is {:?}, but it divides the pixels and must be a \
                 non-zero finite number",
                self.image_std[i]
            );
        }
        // The extremes of what `normalized_planes` computes, in its arithmetic.
        let top = if self.do_rescale {
            (255.0 * self.rescale_factor) as f32
        } else {
            255.0
        };
        ensure!(
            top.is_finite(),
            "field rescale_factor: {:?} makes a pixel of 255 {top}, which is not a finite \
             32-bit float",
            self.rescale_factor
        );
        if self.do_normalize {
            for ch in 0..3 {
                let (mean, std) = (self.image_mean[ch], self.image_std[ch]);
                for v in [0.0, top] {
                    let x = (v - mean) / std;
                    ensure!(
                        x.is_finite(),
                        "field image_std: with image_mean {mean:?} and image_std {std:?}, a \
                         pixel of channel {ch} becomes {x}, which is not a finite 32-bit float"
                    );
                }
            }
        }
        Ok(())
    }

    /// The size (width, height) `preprocess` makes a `width` x `height` image, or the error it
    /// would give: without resizing, both sides must be multiples of [`Self::factor`] and the
    /// image within [`MAX_PIXELS`]. Cheap, so that an image can be refused from its header.
    pub fn output_size(&self, width: u32, height: u32) -> Result<(u32, u32)> {
        let (w, h) = (width as usize, height as usize);
        let factor = self.factor();
        if self.do_resize {
            let (h, w) = smart_resize(h, w, factor, self.min_pixels, self.max_pixels)?;
            return Ok((to_u32(w)?, to_u32(h)?));
        }
        ensure!(
            h % factor == 0 && w % factor == 0 && h > 0 && w > 0,
            "the image is {width}x{height}, but with do_resize false both sides must be \
             positive multiples of {factor} (patch_size x merge_size)"
        );
        ensure!(
            w * h <= MAX_PIXELS,
            "the image is {width}x{height} = {} pixels; with do_resize false images keep their \
             size, and at most {MAX_PIXELS} pixels are accepted",
            w * h
        );
        Ok((width, height))
    }
}

/// How errors name the pixel limits: by the config field they came from, or the flag.
struct Names {
    min: &'static str,
    max: &'static str,
}

/// Reads `size.shortest_edge` / `size.longest_edge`. transformers requires both when `size`
/// is present.
fn size_limits(obj: &Map<String, Value>) -> Result<(Option<usize>, Option<usize>)> {
    let Some(size) = obj.get("size").filter(|v| !v.is_null()) else {
        return Ok((None, None));
    };
    let size = size
        .as_object()
        .ok_or_else(|| anyhow!("field size: expected an object, got {size}"))?;
    let min = get_usize(size, "shortest_edge").context("field size")?;
    let max = get_usize(size, "longest_edge").context("field size")?;
    match (min, max) {
        (Some(min), Some(max)) => Ok((Some(min), Some(max))),
        _ => bail!("field size: must contain both shortest_edge and longest_edge"),
    }
}

/// A present, non-null field.
fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn get_i64(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>> {
    field(obj, key)
        .map(|v| {
            v.as_i64()
                .ok_or_else(|| anyhow!("field {key}: expected an integer, got {v}"))
        })
        .transpose()
}

fn get_usize(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    field(obj, key)
        .map(|v| {
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| anyhow!("field {key}: expected a non-negative integer, got {v}"))
        })
        .transpose()
}

fn get_positive(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    let value = get_usize(obj, key)?;
    if value == Some(0) {
        bail!("field {key}: must be at least 1, got 0");
    }
    Ok(value)
}

fn get_f64(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    field(obj, key)
        .map(|v| {
            v.as_f64()
                .ok_or_else(|| anyhow!("field {key}: expected a number, got {v}"))
        })
        .transpose()
}

fn get_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    field(obj, key)
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| anyhow!("field {key}: expected true or false, got {v}"))
        })
        .transpose()
}

/// Three numbers, or one number used for all channels (transformers accepts both), rounded
/// to `f32` as numpy does when it builds the float32 mean/std arrays.
fn get_triple(obj: &Map<String, Value>, key: &str) -> Result<Option<[f32; 3]>> {
    let Some(v) = field(obj, key) else {
        return Ok(None);
    };
    let bad =
        || anyhow!("field {key}: expected a list of 3 numbers (one per RGB channel), got {v}");
    // A value beyond f32's range would become infinite (and one below its smallest
    // subnormal, zero) where numpy rounds it; said here, with the value as written.
    let narrow = |i: usize, x: &Value| -> Result<f32> {
        let f = x.as_f64().ok_or_else(bad)?;
        ensure!(
            f.abs() <= f64::from(f32::MAX),
            "field {key}: entry {i} is {x}, beyond the range of a 32-bit float"
        );
        Ok(f as f32)
    };
    if v.is_number() {
        return Ok(Some([narrow(0, v)?; 3]));
    }
    let list = v.as_array().ok_or_else(bad)?;
    if list.len() != 3 {
        return Err(bad());
    }
    let mut out = [0f32; 3];
    for (i, (o, x)) in out.iter_mut().zip(list).enumerate() {
        *o = narrow(i, x)?;
    }
    Ok(Some(out))
}

/// Python's `round()`: to nearest, ties to even.
fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// The size transformers resizes a `height` x `width` image to: both sides multiples of
/// `factor`, the pixel count within `[min_pixels, max_pixels]`, the aspect ratio kept as
/// closely as possible. A line-by-line port of transformers' `smart_resize`, in `f64` like
/// Python, including its round-half-to-even.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    ensure!(
        height > 0 && width > 0,
        "cannot resize an empty {width}x{height} image"
    );
    ensure!(factor > 0, "the resize factor must be positive");
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let aspect = h.max(w) / h.min(w);
    ensure!(
        aspect <= MAX_ASPECT_RATIO,
        "absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {aspect} \
         ({width}x{height})"
    );
    let mut h_bar = py_round(h / f) as usize * factor;
    let mut w_bar = py_round(w / f) as usize * factor;
    if h_bar * w_bar > max_pixels {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / f).floor() as usize * factor);
        w_bar = factor.max((w / beta / f).floor() as usize * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() as usize * factor;
        w_bar = (w * beta / f).ceil() as usize * factor;
    }
    Ok((h_bar, w_bar))
}

/// One image's patches, ready for the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelPatches {
    /// `num_patches * patch_dim` values, row-major.
    pub data: Vec<f32>,
    /// `grid_t * grid_h * grid_w`.
    pub num_patches: usize,
    /// `3 * temporal_patch_size * patch_size * patch_size` (1176 for Qwen2-VL).
    pub patch_dim: usize,
    /// (temporal, height, width) in patches.
    pub grid_thw: [usize; 3],
    /// Patches per side the vision tower's merger joins into one token.
    pub merge_size: usize,
    /// A still image or the frames of a video.
    pub kind: Visual,
}

impl PixelPatches {
    /// How many `<|image_pad|>` (or `<|video_pad|>`) tokens the image becomes: one per merge x merge patches
    /// (what transformers' processor computes as `grid_thw.prod() // merge_size**2`).
    pub fn num_tokens(&self) -> usize {
        self.num_patches / (self.merge_size * self.merge_size)
    }
}

/// What a [`PixelPatches`] is to the model: the prompt token it fills (`<|image_pad|>` or
/// `<|video_pad|>`) and, for Qwen2.5-VL, how its temporal positions are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visual {
    Image,
    Video,
}

/// transformers' `Qwen2VLVideoProcessor` pixel bounds per frame (`size.shortest_edge` and
/// `size.longest_edge`), used when a checkpoint has no video_preprocessor_config.json.
pub const VIDEO_MIN_PIXELS: usize = 128 * 28 * 28;
pub const VIDEO_MAX_PIXELS: usize = 768 * 28 * 28;

/// Most frames one video may have: the `max_frames` of transformers' Qwen2-VL video
/// processor. A volume has at most a few hundred slices; each frame costs its patches.
pub const MAX_FRAMES: usize = 768;

/// The Qwen2-VL image processor (and, with [`Self::video`], its video processor).
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub config: ImageProcessorConfig,
}

impl ImageProcessor {
    pub fn new(config: ImageProcessorConfig) -> Self {
        Self { config }
    }

    /// Several frames (all the same size: the slices of one volume) as one video: each
    /// resized to the size [`ImageProcessorConfig::output_size`] gives the first, normalised
    /// with the torch arithmetic of transformers' video processor, the count padded to a
    /// multiple of `temporal_patch_size` by repeating the last frame, then cut into patches
    /// that each span `temporal_patch_size` consecutive frames.
    pub fn preprocess_video(&self, frames: &[RgbImage]) -> Result<PixelPatches> {
        let c = &self.config;
        let Some(first) = frames.first() else {
            bail!("a video needs at least one frame");
        };
        ensure!(
            frames.len() <= MAX_FRAMES,
            "a video may have at most {MAX_FRAMES} frames, got {}",
            frames.len()
        );
        if let Some((k, f)) = frames
            .iter()
            .enumerate()
            .find(|(_, f)| f.dimensions() != first.dimensions())
        {
            bail!(
                "frame {k} is {}x{} but frame 0 is {}x{}: the frames of a video must have one size",
                f.width(),
                f.height(),
                first.width(),
                first.height()
            );
        }
        let (w, h) = c.output_size(first.width(), first.height())?;
        let mut planes = Vec::with_capacity(frames.len().next_multiple_of(c.temporal_patch_size));
        for f in frames {
            let resized;
            let f = if (w, h) == f.dimensions() {
                f
            } else {
                resized = resize(f, w, h, c.resample)?;
                &resized
            };
            planes.push(self.planes_torch(f));
        }
        while planes.len() % c.temporal_patch_size != 0 {
            planes.push(planes[planes.len() - 1].clone());
        }
        let refs: Vec<&[Vec<f32>; 3]> = planes.iter().collect();
        let mut out = self.patchify(&refs, h as usize, w as usize);
        out.kind = Visual::Video;
        Ok(out)
    }

    /// The frame as (C, H, W) `f32` planes, as transformers' torch backend computes them:
    /// with rescale and normalize both on, mean and std become `f32` tensors scaled by
    /// `1 / rescale_factor` and the pixel is `(x - mean') / std'` in `f32`; rescaling alone is
    /// `x * rescale_factor` in `f32` (a uint8 tensor times a Python float).
    fn planes_torch(&self, img: &RgbImage) -> [Vec<f32>; 3] {
        let c = &self.config;
        if c.do_rescale && !c.do_normalize {
            let factor = c.rescale_factor as f32;
            return [0, 1, 2].map(|ch| img.pixels().map(|p| f32::from(p.0[ch]) * factor).collect());
        }
        if !(c.do_rescale && c.do_normalize) {
            return self.normalized_planes(img);
        }
        let scale = (1.0 / c.rescale_factor) as f32;
        let mean = c.image_mean.map(|m| m * scale);
        let std = c.image_std.map(|s| s * scale);
        let n = img.width() as usize * img.height() as usize;
        let mut planes = [
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        ];
        for px in img.pixels() {
            for (ch, plane) in planes.iter_mut().enumerate() {
                plane.push((f32::from(px.0[ch]) - mean[ch]) / std[ch]);
            }
        }
        planes
    }

    /// Resizes, rescales, normalises and patchifies one image, exactly as transformers'
    /// `Qwen2VLImageProcessor` does for a single image with the config's backend.
    pub fn preprocess(&self, img: &RgbImage) -> Result<PixelPatches> {
        let c = &self.config;
        let (w, h) = c.output_size(img.width(), img.height())?;
        let resized;
        let img = if (w, h) == img.dimensions() {
            img
        } else {
            resized = match c.backend {
                Backend::Pil => resize(img, w, h, c.resample)?,
                Backend::Torchvision => resize_torch(img, w, h, c.resample)?,
            };
            &resized
        };
        let planes = match c.backend {
            Backend::Pil => self.normalized_planes(img),
            Backend::Torchvision => self.planes_torch(img),
        };
        // A still image is every frame of its one temporal patch.
        let frames = vec![&planes; self.config.temporal_patch_size];
        Ok(self.patchify(&frames, img.height() as usize, img.width() as usize))
    }

    /// The image as three `f32` channel planes (C, H, W), rescaled and normalised as numpy
    /// does it in transformers.
    fn normalized_planes(&self, img: &RgbImage) -> [Vec<f32>; 3] {
        let c = &self.config;
        let n = img.width() as usize * img.height() as usize;
        let mut planes = [
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        ];
        for px in img.pixels() {
            for (ch, plane) in planes.iter_mut().enumerate() {
                let mut v = if c.do_rescale {
                    (f64::from(px.0[ch]) * c.rescale_factor) as f32
                } else {
                    f32::from(px.0[ch])
                };
                if c.do_normalize {
                    v = (v - c.image_mean[ch]) / c.image_std[ch];
                }
                plane.push(v);
            }
        }
        planes
    }

    /// Cuts (C, H, W) frames, a multiple of `temporal_patch_size` of them, into patches.
    /// transformers reshapes the (F, C, H, W) frames to
    /// `(grid_t, T, C, gh/m, m, P, gw/m, m, P)` and transposes to
    /// `(grid_t, gh/m, gw/m, m, m, C, T, P, P)`: patches in merge-window order (each 2x2
    /// window's four patches consecutive), each patch channel-major, then frame, row, column.
    fn patchify(&self, frames: &[&[Vec<f32>; 3]], height: usize, width: usize) -> PixelPatches {
        let c = &self.config;
        let (p, m, t) = (c.patch_size, c.merge_size, c.temporal_patch_size);
        let (gh, gw) = (height / p, width / p);
        let grid_t = frames.len() / t;
        debug_assert_eq!(grid_t * t, frames.len());
        let patch_dim = 3 * t * p * p;
        let num_patches = grid_t * gh * gw;
        let mut data = Vec::with_capacity(num_patches * patch_dim);
        for group in frames.chunks_exact(t) {
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                            for ch in 0..3 {
                                for frame in group {
                                    let plane = &frame[ch];
                                    for y in y0..y0 + p {
                                        data.extend_from_slice(&plane[y * width + x0..][..p]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        PixelPatches {
            data,
            num_patches,
            patch_dim,
            grid_thw: [grid_t, gh, gw],
            merge_size: self.config.merge_size,
            kind: Visual::Image,
        }
    }
}

fn to_u32(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| anyhow!("resized side {n} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: usize = 28;

    #[test]
    fn smart_resize_table() {
        let (min, max) = (56 * 56, 28 * 28 * 1280);
        let cases = [
            // Plain rounding to multiples of 28.
            ((224, 224), (224, 224)),
            ((300, 400), (308, 392)), // 10.71 -> 11, 14.29 -> 14
            // Ties go to even: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2, 98/28 = 3.5 -> 4.
            ((42, 1000), (56, 1008)), // 1000/28 = 35.71 -> 36
            ((70, 1000), (56, 1008)),
            ((98, 1000), (112, 1008)),
            // Too few pixels: 12x20 -> beta = sqrt(3136 / 240) = 3.6148, ceil(12*3.6148/28) =
            // ceil(1.549) = 2 -> 56, ceil(20*3.6148/28) = ceil(2.582) = 3 -> 84.
            ((12, 20), (56, 84)),
        ];
        for ((h, w), want) in cases {
            assert_eq!(
                smart_resize(h, w, F, min, max).expect("valid"),
                want,
                "{h}x{w}"
            );
        }
    }

    #[test]
    fn smart_resize_shrinks_to_the_budget() {
        // 300x400 with max 9408: 308 * 392 > 9408, so beta = sqrt(120000 / 9408) = 3.5714,
        // 300 / beta / 28 = 3.0 -> 84 and 400 / beta / 28 = 4.0 -> 112 (the fixture's grid).
        assert_eq!(
            smart_resize(300, 400, F, 3136, 9408).expect("valid"),
            (84, 112)
        );
        // Never below one factor per side: 28x5000 with max 784 has beta = 13.36, so the
        // height floors to 0 and is raised to 28; 5000 / 13.36 / 28 = 13.4 -> 364.
        assert_eq!(smart_resize(28, 5000, F, 0, 784).expect("valid"), (28, 364));
    }

    #[test]
    fn smart_resize_refuses_extreme_aspect() {
        assert!(smart_resize(1, 201, F, 3136, 1_000_000).is_err());
        assert!(smart_resize(1, 200, F, 3136, 1_000_000).is_ok());
        assert!(smart_resize(0, 10, F, 3136, 1_000_000).is_err());
    }

    #[test]
    fn config_parsing_and_errors() {
        let c = ImageProcessorConfig::from_json("{}").expect("empty config");
        assert_eq!(c, ImageProcessorConfig::default());
        let c = ImageProcessorConfig::from_json(
            r#"{"size": {"shortest_edge": 100, "longest_edge": 2000}, "max_pixels": 5000}"#,
        )
        .expect("valid");
        assert_eq!((c.min_pixels, c.max_pixels), (100, 5000));
        let c = ImageProcessorConfig::from_json(r#"{"image_mean": 0.5, "resample": 2}"#)
            .expect("valid");
        assert_eq!(c.image_mean, [0.5; 3]);
        assert_eq!(c.resample, Filter::Bilinear);
        for (json, needle) in [
            (r#"{"patch_size": 0}"#, "patch_size"),
            (r#"{"patch_size": "14"}"#, "patch_size"),
            (r#"{"image_mean": [0.1, 0.2]}"#, "image_mean"),
            (r#"{"image_std": [0.1, 0, 0.2]}"#, "image_std"),
            (r#"{"min_pixels": -1}"#, "min_pixels"),
            (r#"{"min_pixels": 10, "max_pixels": 5}"#, "min_pixels"),
            (r#"{"size": {"shortest_edge": 10}}"#, "size"),
            (r#"{"resample": 7}"#, "resample"),
            (r#"{"do_resize": 1}"#, "do_resize"),
            ("[1, 2]", "object"),
            ("{", "JSON"),
            // The family of impossible values (issue 25): each names its field.
            (
                r#"{"min_pixels": 100000000000}"#,
                "field min_pixels: 100000000000 is more",
            ),
            (
                r#"{"max_pixels": 16777217}"#,
                "field max_pixels: 16777217 is more",
            ),
            (
                r#"{"max_pixels": 1e300}"#,
                "field max_pixels: expected a non-negative integer",
            ),
            (
                r#"{"max_pixels": "big"}"#,
                "field max_pixels: expected a non-negative integer",
            ),
            (
                r#"{"max_pixels": 0, "min_pixels": 0}"#,
                "field max_pixels: must be at least 1",
            ),
            (
                r#"{"size": {"shortest_edge": 20000000, "longest_edge": 30000000}}"#,
                "field size.shortest_edge: 20000000",
            ),
            (
                r#"{"patch_size": 65}"#,
                "field patch_size: must be between 1 and 64",
            ),
            (
                r#"{"patch_size": -14}"#,
                "field patch_size: expected a non-negative",
            ),
            (
                r#"{"merge_size": 5}"#,
                "field merge_size: must be between 1 and 4",
            ),
            (
                r#"{"temporal_patch_size": 0}"#,
                "field temporal_patch_size: must be at least 1",
            ),
            (
                r#"{"image_mean": [0.5, 1e39, 0.5]}"#,
                "field image_mean: entry 1 is 1e+39",
            ),
            (
                r#"{"image_mean": ["a", 0, 0]}"#,
                "field image_mean: expected a list",
            ),
            (
                r#"{"image_std": -1e39}"#,
                "field image_std: entry 0 is -1e+39",
            ),
            (
                r#"{"image_std": [1, 1e-46, 1]}"#,
                "field image_std: entry 1 is 0.0",
            ),
            (
                r#"{"image_std": 1e-40}"#,
                "field image_std: with image_mean",
            ),
            (
                r#"{"rescale_factor": 0}"#,
                "field rescale_factor: must be a positive",
            ),
            (
                r#"{"rescale_factor": 1e39}"#,
                "field rescale_factor: 1e39 makes a pixel",
            ),
            (r#"{"rescale_factor": NaN}"#, "JSON"),
        ] {
            let err = ImageProcessorConfig::from_json(json).expect_err(json);
            assert!(format!("{err:#}").contains(needle), "{json}: {err:#}");
        }
    }

    /// A "fast" processor type selects transformers' torchvision backend, which resizes with
    /// bilinear or bicubic only; everything else keeps the PIL one.
    #[test]
    fn processor_type_picks_the_backend() {
        for (json, backend) in [
            ("{}", Backend::Pil),
            (
                r#"{"image_processor_type": "Qwen2VLImageProcessor"}"#,
                Backend::Pil,
            ),
            (
                r#"{"image_processor_type": "Qwen2VLImageProcessorPil"}"#,
                Backend::Pil,
            ),
            (
                r#"{"image_processor_type": "Qwen2VLImageProcessorFast"}"#,
                Backend::Torchvision,
            ),
        ] {
            let c = ImageProcessorConfig::from_json(json).expect(json);
            assert_eq!(c.backend, backend, "{json}");
        }
        let err = ImageProcessorConfig::from_json(
            r#"{"image_processor_type": "Qwen2VLImageProcessorFast", "resample": 1}"#,
        )
        .expect_err("lanczos");
        assert!(format!("{err:#}").contains("field resample: 1"), "{err:#}");
        let err = ImageProcessorConfig::from_json(r#"{"image_processor_type": 3}"#)
            .expect_err("a number");
        assert!(
            format!("{err:#}").contains("image_processor_type"),
            "{err:#}"
        );
    }

    #[test]
    fn pixel_limit_overrides() {
        let c = ImageProcessorConfig::default()
            .with_pixel_limits(None, Some(401_408))
            .expect("valid");
        assert_eq!((c.min_pixels, c.max_pixels), (3136, 401_408));
        // The largest accepted, and the errors naming the flags.
        assert!(ImageProcessorConfig::default()
            .with_pixel_limits(Some(MAX_PIXELS), Some(MAX_PIXELS))
            .is_ok());
        for (min, max, want) in [
            (
                Some(10_000),
                Some(9_999),
                "--min-pixels (10000) is larger than --max-pixels (9999)",
            ),
            (
                None,
                Some(100),
                "min_pixels (3136) is larger than --max-pixels (100)",
            ),
            (None, Some(0), "--max-pixels: must be at least 1, got 0"),
            (
                Some(MAX_PIXELS + 1),
                None,
                "--min-pixels: 16777217 is more than the 16777216",
            ),
            (
                None,
                Some(usize::MAX),
                "--max-pixels: 18446744073709551615 is more",
            ),
        ] {
            let err = ImageProcessorConfig::default()
                .with_pixel_limits(min, max)
                .expect_err(want);
            assert!(format!("{err:#}").contains(want), "{err:#}");
        }
    }

    #[test]
    fn output_size_is_what_preprocess_makes() {
        let c = ImageProcessorConfig {
            min_pixels: 3136,
            max_pixels: 9408,
            ..Default::default()
        };
        // 300x400 (width x height) becomes 84x112, as in `smart_resize_shrinks_to_the_budget`.
        assert_eq!(c.output_size(300, 400).expect("valid"), (84, 112));
        let out = ImageProcessor::new(c.clone())
            .preprocess(&RgbImage::new(300, 400))
            .expect("preprocess");
        assert_eq!(out.grid_thw, [1, 112 / 14, 84 / 14]);
        assert!(c.output_size(1, 201).is_err());
        let fixed = ImageProcessorConfig {
            do_resize: false,
            ..Default::default()
        };
        assert_eq!(
            fixed.output_size(56, 28).expect("multiples of 28"),
            (56, 28)
        );
        let err = fixed.output_size(57, 28).expect_err("not a multiple");
        assert!(err.to_string().contains("multiples of 28"), "{err}");
        let err = fixed.output_size(4116, 4116).expect_err("over MAX_PIXELS");
        assert!(err.to_string().contains("at most 16777216 pixels"), "{err}");
    }

    #[test]
    fn patch_layout_follows_the_merge_windows() {
        // A 56x56 image whose every pixel encodes its position: with rescale and normalize
        // off, values are raw bytes, so the layout can be read back.
        let config = ImageProcessorConfig {
            do_rescale: false,
            do_normalize: false,
            ..Default::default()
        };
        let img = RgbImage::from_fn(56, 56, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let out = ImageProcessor::new(config)
            .preprocess(&img)
            .expect("preprocess");
        assert_eq!(out.grid_thw, [1, 4, 4]);
        assert_eq!((out.num_patches, out.patch_dim), (16, 1176));
        let patch = |i: usize| &out.data[i * 1176..(i + 1) * 1176];
        // Patch 1 is the top-right patch of the first 2x2 window: x 14..28, y 0..14.
        // Channel R, frame 0, row 0: x = 14..28.
        assert_eq!(patch(1)[0], 14.0);
        assert_eq!(patch(1)[13], 27.0);
        // Frame 1 repeats frame 0: channel R, frame 1 starts at 196.
        assert_eq!(patch(1)[196], 14.0);
        // Channel G (offset 2 * 196) row 3 is y = 3.
        assert_eq!(patch(1)[392 + 3 * 14], 3.0);
        // Channel B is constant.
        assert_eq!(patch(1)[784], 7.0);
        // Patch 2 is the bottom-left of the first window: y 14..28, x 0..14.
        assert_eq!(patch(2)[392], 14.0);
        assert_eq!(patch(2)[0], 0.0);
        // Patch 4 starts the second window (x 28..56 of rows 0..28).
        assert_eq!(patch(4)[0], 28.0);
    }

    #[test]
    fn normalisation_matches_numpy_order() {
        let img = RgbImage::from_pixel(56, 56, image::Rgb([255, 0, 128]));
        let out = ImageProcessor::new(ImageProcessorConfig::default())
            .preprocess(&img)
            .expect("preprocess");
        let rescale = |v: u8| (f64::from(v) * (1.0 / 255.0)) as f32;
        let (mean, std) = (to_f32_triple(CLIP_MEAN), to_f32_triple(CLIP_STD));
        assert_eq!(out.data[0], (rescale(255) - mean[0]) / std[0]);
        assert_eq!(out.data[392], (rescale(0) - mean[1]) / std[1]);
        assert_eq!(out.data[784], (rescale(128) - mean[2]) / std[2]);
    }
}
