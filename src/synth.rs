//! `medvlm data synth`: procedurally drawn "scans" with multiple-choice questions whose
//! answers are in the pixels, written in the MedVLM-R1 dataset format so every command takes
//! them. Three modality styles (MRI-like head slices, CT-like slices with a bright bone ring,
//! X-ray-like chests with dark lung fields) carry lesions of different sizes, positions and
//! contrasts. Question kinds:
//!
//! - `presence`: "Is there a lesion in this image?" (yes / no)
//! - `side`: "On which side of the image is the lesion?" (left / right)
//! - `count`: "How many lesions are visible?" (1 / 2 / 3)
//! - `modality`: "What imaging modality is this?" (MRI / CT / X-Ray)
//!
//! Everything derives from the seed: the same seed writes the same files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::GrayImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Side length of the drawn images: 112 px is 16 image tokens for Qwen2-VL (4x4 merged
/// 28-pixel cells), small enough for a tiny model to train on a CPU.
pub const SIDE: u32 = 112;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Mri,
    Ct,
    XRay,
}

impl Style {
    pub const ALL: [Style; 3] = [Style::Mri, Style::Ct, Style::XRay];

    /// The `subset` string, spelled as in OmniMedVQA so modality parsing is exercised.
    pub fn subset(self) -> &'static str {
        match self {
            Style::Mri => "MR (Mag-netic Resonance Imaging)",
            Style::Ct => "CT(Computed Tomography)",
            Style::XRay => "X-Ray",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Style::Mri => "MRI",
            Style::Ct => "CT",
            Style::XRay => "X-Ray",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "mri" | "mr" => Some(Style::Mri),
            "ct" => Some(Style::Ct),
            "x-ray" | "xray" => Some(Style::XRay),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Presence,
    Side,
    Count,
    Modality,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Presence, Kind::Side, Kind::Count, Kind::Modality];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "presence" => Some(Kind::Presence),
            "side" => Some(Kind::Side),
            "count" => Some(Kind::Count),
            "modality" => Some(Kind::Modality),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Presence => "presence",
            Kind::Side => "side",
            Kind::Count => "count",
            Kind::Modality => "modality",
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub n: usize,
    pub seed: u64,
    pub styles: Vec<Style>,
    pub kinds: Vec<Kind>,
}

impl Default for SynthSpec {
    fn default() -> Self {
        Self {
            n: 200,
            seed: 0,
            styles: Style::ALL.to_vec(),
            kinds: Kind::ALL.to_vec(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Lesion {
    x: f32,
    y: f32,
    r: f32,
}

/// Smooth value noise in [-1, 1]: texture so no two scans are alike.
fn texture(rng: &mut StdRng) -> impl Fn(f32, f32) -> f32 {
    let waves: Vec<(f32, f32, f32, f32)> = (0..5)
        .map(|_| {
            (
                rng.random_range(0.05..0.35),
                rng.random_range(0.05..0.35),
                rng.random_range(0.0..std::f32::consts::TAU),
                rng.random_range(0.2..1.0),
            )
        })
        .collect();
    move |x, y| {
        let s: f32 = waves
            .iter()
            .map(|&(fx, fy, p, a)| a * (fx * x + fy * y + p).sin())
            .sum();
        s / 3.0
    }
}

fn inside_ellipse(x: f32, y: f32, cx: f32, cy: f32, rx: f32, ry: f32) -> f32 {
    ((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2)
}

/// Draws a scan of `style` with `lesions`.
///
/// Tissue is kept darker than mid-grey and lesions brighter. Why: Qwen2-VL's patch embedding
/// has no bias and its blocks and merger LayerNorm each patch's features, so a flat patch's
/// brightness survives mostly as the *sign* of its normalised value (pixel below or above the
/// CLIP mean, about 120 of 255). A lesion at 245 on tissue at 135 is nearly invisible to a
/// freshly initialised tower; on tissue at 85 it is obvious.
fn draw(style: Style, lesions: &[Lesion], rng: &mut StdRng) -> GrayImage {
    let tex = texture(rng);
    let c = SIDE as f32 / 2.0;
    let noise_amp = 6.0;
    let mut img = GrayImage::new(SIDE, SIDE);
    let jitter: Vec<f32> = (0..(SIDE * SIDE))
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    for y in 0..SIDE {
        for x in 0..SIDE {
            let (xf, yf) = (x as f32, y as f32);
            let mut v = match style {
                Style::Mri => {
                    let e = inside_ellipse(xf, yf, c, c, 44.0, 50.0);
                    if e < 1.0 {
                        85.0 + 20.0 * tex(xf, yf)
                    } else {
                        12.0
                    }
                }
                Style::Ct => {
                    let e = inside_ellipse(xf, yf, c, c, 46.0, 42.0);
                    if e < 0.82 {
                        95.0 + 12.0 * tex(xf, yf)
                    } else if e < 1.0 {
                        230.0
                    } else {
                        5.0
                    }
                }
                Style::XRay => {
                    let body = inside_ellipse(xf, yf, c, c + 6.0, 50.0, 52.0);
                    let left_lung = inside_ellipse(xf, yf, c - 22.0, c, 16.0, 30.0);
                    let right_lung = inside_ellipse(xf, yf, c + 22.0, c, 16.0, 30.0);
                    if left_lung < 1.0 || right_lung < 1.0 {
                        45.0 + 10.0 * tex(xf, yf)
                    } else if body < 1.0 {
                        110.0 + 12.0 * tex(xf, yf)
                    } else {
                        70.0
                    }
                }
            };
            for l in lesions {
                let d = ((xf - l.x).powi(2) + (yf - l.y).powi(2)).sqrt();
                if d < l.r {
                    // Hyperintense MRI lesions, hyperdense CT lesions (a bleed), bright X-ray
                    // opacities: one polarity, so what is learnt on MRI and CT can carry over
                    // to X-ray, the modality held out of training.
                    let edge = (1.0 - d / l.r).min(0.3) / 0.3;
                    let target = match style {
                        Style::Mri => 245.0,
                        Style::Ct => 200.0,
                        Style::XRay => 235.0,
                    };
                    v += (target - v) * edge;
                }
            }
            v += noise_amp * jitter[(y * SIDE + x) as usize];
            img.put_pixel(x, y, image::Luma([v.clamp(0.0, 255.0) as u8]));
        }
    }
    img
}

/// A lesion in the given half (0 left, 1 right), inside the body, not overlapping `others`.
/// Lesion radii: large single lesions for presence and side questions (visible at the
/// 28-pixel resolution of one image token), smaller ones when several must fit.
fn radius_range(kind: Kind) -> std::ops::Range<f32> {
    match kind {
        Kind::Count => 7.0..11.0,
        Kind::Side => 12.0..18.0,
        // Presence: large lesions, a sizeable share of the image tokens.
        _ => 28.0..36.0,
    }
}

fn place(
    rng: &mut StdRng,
    half: Option<u32>,
    others: &[Lesion],
    radii: std::ops::Range<f32>,
) -> Lesion {
    let c = SIDE as f32 / 2.0;
    loop {
        let r = rng.random_range(radii.clone());
        let h = half.unwrap_or_else(|| rng.random_range(0..2));
        // Inside the body, away from its edge by about the radius.
        let reach = (40.0 - r).max(14.0);
        let x = if h == 0 {
            rng.random_range(c - reach..c - 10.0)
        } else {
            rng.random_range(c + 10.0..c + reach)
        };
        let y = rng.random_range(c - reach..c + reach);
        let ok = others
            .iter()
            .all(|o| ((o.x - x).powi(2) + (o.y - y).powi(2)).sqrt() > o.r + r + 3.0);
        if ok {
            return Lesion { x, y, r };
        }
    }
}

/// One generated row: its image, question, options and the index of the answer.
struct Generated {
    image: GrayImage,
    style: Style,
    kind: Kind,
    question: &'static str,
    options: Vec<&'static str>,
    answer: usize,
    rationale: String,
}

fn generate_one(rng: &mut StdRng, style: Style, kind: Kind) -> Generated {
    let mut lesions = Vec::new();
    let (question, options, answer): (&'static str, Vec<&'static str>, usize) = match kind {
        Kind::Presence => {
            let yes = rng.random::<bool>();
            if yes {
                lesions.push(place(rng, None, &[], radius_range(kind)));
            }
            (
                "Is there a lesion in this image?",
                vec!["yes", "no"],
                if yes { 0 } else { 1 },
            )
        }
        Kind::Side => {
            let side = rng.random_range(0..2u32);
            lesions.push(place(rng, Some(side), &[], radius_range(kind)));
            (
                "On which side of the image is the lesion?",
                vec!["left", "right"],
                side as usize,
            )
        }
        Kind::Count => {
            let n = rng.random_range(1..=3usize);
            for _ in 0..n {
                let next = place(rng, None, &lesions, radius_range(kind));
                lesions.push(next);
            }
            ("How many lesions are visible?", vec!["1", "2", "3"], n - 1)
        }
        Kind::Modality => {
            if rng.random::<bool>() {
                lesions.push(place(rng, None, &[], radius_range(kind)));
            }
            let answer = match style {
                Style::Mri => 0,
                Style::Ct => 1,
                Style::XRay => 2,
            };
            (
                "What imaging modality is used to take this image?",
                vec!["MRI", "CT", "X-Ray"],
                answer,
            )
        }
    };
    let image = draw(style, &lesions, rng);
    // The same reasoning for every row of a kind: it says how to look, never what is seen,
    // so a warm start on it teaches the format without the answer. Short, because GRPO
    // gives every token of a completion the same advantage and only the answer letter
    // carries the signal: a long fixed preamble dilutes it (and gets garbled by the noise).
    let rationale = match kind {
        Kind::Presence => "I look for a bright lesion.",
        Kind::Side => "I find the lesion and its side.",
        Kind::Count => "I count the bright lesions.",
        Kind::Modality => "I look at the whole image.",
    }
    .to_string();
    Generated {
        image,
        style,
        kind,
        question,
        options,
        answer,
        rationale,
    }
}

/// Disk space a row takes: its 112x112 grey PNG (8.1-8.3 KB, three 4 KiB blocks) and its
/// JSON row (about 420 bytes).
pub const ROW_BYTES: u64 = 13 << 10;

/// The names `data synth` writes in its output directory.
pub const ENTRIES: &[&str] = &["data.json", "images"];

/// Refuses, before anything is drawn, `n` rows (`flag` names the setting) that would not fit
/// on the disk holding `out`.
pub fn check_size(out: &Path, n: usize, flag: &str) -> Result<()> {
    let need = n as u128 * ROW_BYTES as u128;
    if let Some(free) = crate::train::checkpoint::free_disk_bytes(out) {
        if need > free {
            bail!(
                "{flag} {n}: the scans would take about {} on disk (about 13 KiB a row: a \
                 112x112 PNG and its JSON) but the disk holding {} has {} free",
                crate::train::checkpoint::human_bytes(need),
                out.display(),
                crate::train::checkpoint::human_bytes(free)
            );
        }
    }
    Ok(())
}

/// Writes `n` rows with their images under `out`: `out/images/*.png` and `out/data.json`
/// (the paper's format). Returns the JSON path. The rows are streamed to the file (memory
/// does not grow with `n`), into a directory beside `out` that replaces it only when
/// complete: a failure leaves `out` as it was and nothing else behind.
pub fn write(out: &Path, spec: &SynthSpec) -> Result<PathBuf> {
    use std::io::Write;
    if spec.n == 0 {
        bail!("--n must be at least 1");
    }
    if spec.styles.is_empty() || spec.kinds.is_empty() {
        bail!("at least one modality and one question kind are needed");
    }
    check_size(out, spec.n, "--n")?;
    let staging = crate::files::Staging::beside(out, "synth")?;
    let img_dir = staging.path().join("images");
    std::fs::create_dir_all(&img_dir)
        .with_context(|| format!("{}: cannot create", img_dir.display()))?;
    let json_path = staging.path().join("data.json");
    let write_err = |e| crate::files::io_error(&out.join("data.json"), "cannot write", e);
    let file = std::fs::File::create(&json_path).map_err(write_err)?;
    let mut json = std::io::BufWriter::new(file);
    json.write_all(b"[\n").map_err(write_err)?;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    for i in 0..spec.n {
        // Round-robin over (style, kind) so every combination is balanced.
        let style = spec.styles[i % spec.styles.len()];
        let kind = spec.kinds[(i / spec.styles.len()) % spec.kinds.len()];
        let g = generate_one(&mut rng, style, kind);
        let name = format!(
            "{}-{:05}.png",
            style.short().to_lowercase().replace('-', ""),
            i
        );
        let path = img_dir.join(&name);
        g.image.save(&path).with_context(|| {
            format!(
                "{}: cannot write image",
                out.join("images").join(&name).display()
            )
        })?;
        let problem = crate::data::build_problem(
            g.question,
            &g.options.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        );
        let row = json!({
            "image": [format!("images/{name}")],
            "question": g.question,
            "options": g.options,
            "answer": g.options[g.answer],
            "problem": problem,
            "solution": crate::data::LETTERS[g.answer].to_string(),
            "dataset": "medvlm-synth",
            "subset": g.style.subset(),
            "task": g.kind.name(),
            "rationale": g.rationale,
        });
        // The layout serde_json's pretty printer gives the whole list: each row indented
        // by two spaces, rows separated by ",\n".
        let text = serde_json::to_string_pretty(&row)?;
        let mut chunk = String::with_capacity(text.len() + 64);
        if i > 0 {
            chunk.push_str(",\n");
        }
        for (j, line) in text.lines().enumerate() {
            if j > 0 {
                chunk.push('\n');
            }
            chunk.push_str("  ");
            chunk.push_str(line);
        }
        json.write_all(chunk.as_bytes()).map_err(write_err)?;
    }
    json.write_all(b"\n]").map_err(write_err)?;
    json.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .map_err(write_err)?;
    crate::files::mark_output(staging.path(), "data synth")?;
    staging.commit(out)?;
    Ok(out.join("data.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_in_the_pixels() {
        let mut rng = StdRng::seed_from_u64(3);
        for style in Style::ALL {
            // A lesion changes the pixels where it is drawn, and only there.
            let l = Lesion {
                x: 36.0,
                y: 56.0,
                r: 10.0,
            };
            let seed_state = rng.random::<u64>();
            let a = draw(style, &[], &mut StdRng::seed_from_u64(seed_state));
            let b = draw(style, &[l], &mut StdRng::seed_from_u64(seed_state));
            let at = |img: &GrayImage, x, y| img.get_pixel(x, y).0[0] as i32;
            assert!((at(&a, 36, 56) - at(&b, 36, 56)).abs() > 40, "{style:?}");
            assert_eq!(at(&a, 90, 56), at(&b, 90, 56), "{style:?}");
        }
        // A "side" lesion lies in the half its answer names.
        for _ in 0..50 {
            let g = generate_one(&mut rng, Style::Mri, Kind::Side);
            assert_eq!(g.options[g.answer] == "left", g.answer == 0);
        }
    }

    #[test]
    fn same_seed_same_data() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            n: 12,
            seed: 9,
            ..Default::default()
        };
        let a = std::fs::read_to_string(write(d1.path(), &spec).unwrap()).unwrap();
        let b = std::fs::read_to_string(write(d2.path(), &spec).unwrap()).unwrap();
        assert_eq!(a, b);
        let img = |d: &Path| std::fs::read(d.join("images/mri-00000.png")).unwrap();
        assert_eq!(img(d1.path()), img(d2.path()));
        // Streamed, the file is what serde_json writes for the whole list at once.
        let rows: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert_eq!(rows.as_array().unwrap().len(), 12);
        assert_eq!(serde_json::to_string_pretty(&rows).unwrap(), a);
        // Nothing but the output: no staging directory beside it.
        let beside: Vec<_> = std::fs::read_dir(d1.path().parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.contains(&d1.path().file_name().unwrap().to_string_lossy().to_string())
                    && n.ends_with(".synth")
            })
            .collect();
        assert!(beside.is_empty());
    }

    #[test]
    fn impossible_sizes_are_refused_before_drawing() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("big");
        let e = write(
            &out,
            &SynthSpec {
                n: 1_000_000_000_000,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        if crate::train::checkpoint::free_disk_bytes(d.path()).is_some() {
            assert!(e.contains("--n 1000000000000") && e.contains("free"), "{e}");
        }
        assert!(!out.exists());
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "nothing left behind"
        );
    }
}
