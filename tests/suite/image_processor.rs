//! The image pipeline against transformers' own output.
//!
//! tests/fixtures/pixels/ holds, per fixture image, the `pixel_values` and `image_grid_thw`
//! that transformers 4.57.6's `Qwen2VLImageProcessor` (PIL 13) produced
//! (tools/make_fixtures.py). Every image must come out with the same grid and the same
//! values: PNGs and JPEGs are decoded and resized exactly as PIL does, so the expected
//! difference is 0.

use std::path::{Path, PathBuf};

use medvlm::processor::image::{decode_rgb, load_rgb};
use medvlm::processor::{ImageProcessor, ImageProcessorConfig};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

/// Largest accepted |difference| between our pixel values and transformers'.
const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(Debug, Deserialize)]
struct Entry {
    image: String,
    file: String,
    mode: String,
    size: [usize; 2],
    min_pixels: usize,
    max_pixels: usize,
    grid_thw: [usize; 3],
}

fn manifest() -> Vec<Entry> {
    let path = fixtures().join("pixels/manifest.json");
    let text = std::fs::read_to_string(&path).expect("read manifest.json");
    serde_json::from_str(&text).expect("parse manifest.json")
}

/// `pixel_values` ([N, 1176], f32) and `image_grid_thw` ([1, 3], i64) of one fixture.
fn reference(file: &str) -> (Vec<f32>, Vec<usize>, [usize; 3]) {
    let bytes = std::fs::read(fixtures().join("pixels").join(file)).expect("read fixture");
    let st = SafeTensors::deserialize(&bytes).expect("parse safetensors");
    let pv = st.tensor("pixel_values").expect("pixel_values");
    assert_eq!(pv.dtype(), Dtype::F32);
    let values = pv
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let thw = st.tensor("image_grid_thw").expect("image_grid_thw");
    assert_eq!(thw.dtype(), Dtype::I64);
    let grid: Vec<i64> = thw
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    let grid = [grid[0], grid[1], grid[2]].map(|g| usize::try_from(g).expect("grid >= 0"));
    (values, pv.shape().to_vec(), grid)
}

fn processor_for(entry: &Entry) -> ImageProcessor {
    let config =
        ImageProcessorConfig::from_file(&fixtures().join("tiny-a/preprocessor_config.json"))
            .expect("preprocessor_config.json")
            .with_pixel_limits(Some(entry.min_pixels), Some(entry.max_pixels))
            .expect("pixel limits");
    ImageProcessor { config }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn pixel_values_match_transformers() {
    let entries = manifest();
    assert!(entries.len() >= 10, "manifest lists too few images");
    let mut failures = Vec::new();
    println!(
        "{:<36} {:>5} {:>9} {:>12} {:>12}",
        "fixture", "mode", "h x w", "grid", "max |diff|"
    );
    for entry in &entries {
        let img = load_rgb(&fixtures().join("images").join(&entry.image)).expect("load image");
        assert_eq!(
            [img.height() as usize, img.width() as usize],
            entry.size,
            "{}: decoded size",
            entry.image
        );
        let out = processor_for(entry).preprocess(&img).expect("preprocess");
        let (want, shape, grid) = reference(&entry.file);
        assert_eq!(
            grid, entry.grid_thw,
            "{}: manifest vs safetensors",
            entry.file
        );
        assert_eq!(out.grid_thw, grid, "{}: grid_thw", entry.file);
        assert_eq!(
            shape,
            [out.num_patches, out.patch_dim],
            "{}: shape",
            entry.file
        );
        assert_eq!(out.data.len(), want.len(), "{}: length", entry.file);
        let diff = max_abs_diff(&out.data, &want);
        println!(
            "{:<36} {:>5} {:>9} {:>12} {:>12.3e}",
            entry.file,
            entry.mode,
            format!("{}x{}", entry.size[0], entry.size[1]),
            format!("{:?}", out.grid_thw),
            diff
        );
        if diff > TOLERANCE {
            failures.push(format!("{}: max |diff| {diff:e}", entry.file));
        }
    }
    assert!(failures.is_empty(), "pixel values differ: {failures:?}");
}

/// A directory of its own under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("medvlm-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_err_names_file(path: &Path, needle: &str) {
    let err = load_rgb(path).expect_err("must fail");
    let msg = err.to_string();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("file name");
    assert!(msg.contains(name), "error does not name the file: {msg}");
    assert!(!msg.contains('\n'), "error is not one line: {msg}");
    assert!(
        msg.to_lowercase().contains(needle),
        "error does not say '{needle}': {msg}"
    );
}

#[test]
fn truncated_png_is_an_error_naming_the_file() {
    let tmp = TempDir::new("truncated-png");
    let bytes = std::fs::read(fixtures().join("images/square.png")).expect("fixture");
    let path = tmp.0.join("cut.png");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
    assert_err_names_file(&path, "png");
}

#[test]
fn truncated_jpeg_is_an_error_naming_the_file() {
    let tmp = TempDir::new("truncated-jpg");
    let bytes = std::fs::read(fixtures().join("images/photo.jpg")).expect("fixture");
    let path = tmp.0.join("cut.jpg");
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).expect("write");
    assert_err_names_file(&path, "truncated");
}

#[test]
fn missing_file_is_an_error_naming_the_file() {
    let tmp = TempDir::new("missing");
    assert_err_names_file(&tmp.0.join("nowhere.png"), "no such");
}

#[test]
fn non_image_file_is_an_error_naming_the_file() {
    let tmp = TempDir::new("not-image");
    let path = tmp.0.join("notes.png");
    std::fs::write(&path, "these are notes, not pixels\n").expect("write");
    assert_err_names_file(&path, "not an image");
    let empty = tmp.0.join("empty.jpg");
    std::fs::write(&empty, b"").expect("write");
    assert_err_names_file(&empty, "empty");
}

#[test]
fn directory_is_an_error_naming_it() {
    let tmp = TempDir::new("dir");
    let dir = tmp.0.join("scans.png");
    std::fs::create_dir_all(&dir).expect("mkdir");
    assert_err_names_file(&dir, "directory");
}

#[test]
fn zero_sized_png_is_an_error() {
    // A hand-built PNG whose header says 0 x 1 pixels (valid CRCs, so only the size is wrong).
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let chunk = |png: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    chunk(&mut png, b"IHDR", &[0, 0, 0, 0, 0, 0, 0, 1, 8, 2, 0, 0, 0]);
    chunk(&mut png, b"IEND", &[]);
    assert!(decode_rgb(&png).is_err());
}

/// CRC-32 (IEEE), for building PNG chunks.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn grayscale_and_palette_fixtures_decode_like_pil() {
    // gray.png is mode L: every pixel has R == G == B. palette.png has 37 colours.
    let gray = load_rgb(&fixtures().join("images/gray.png")).expect("gray");
    assert!(gray.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
    let pal = load_rgb(&fixtures().join("images/palette.png")).expect("palette");
    let mut colours: Vec<[u8; 3]> = pal.pixels().map(|p| p.0).collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(colours.len() <= 37, "{} colours", colours.len());
}
