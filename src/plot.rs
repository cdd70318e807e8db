//! `medvlm plot RUN_DIR`: a training run's curves, drawn from its `metrics.jsonl` to a PNG.
//!
//! A run writes one flat JSON object per optimizer step. We read it forgivingly, because the file
//! is most often looked at while the run is alive or after it was killed: a line cut off mid-write
//! or otherwise unparsable is skipped with a warning, keys may come and go between lines (eval
//! metrics appear only on eval steps), and keys we do not plot are kept but ignored.
//!
//! Text is rendered with a font compiled into the binary (a Latin subset of DejaVu Sans, see
//! `assets/DejaVuSans-subset.LICENSE`) through plotters' `ab_glyph` backend, so the command works
//! on a bare CI machine or container with no system fonts; plotters' default `ttf` feature would
//! look fonts up through fontconfig and fail there.

use std::collections::BTreeMap;
use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};
use serde_json::{Map, Value};

/// The embedded font: 20 kB instead of DejaVu Sans' 760 kB, covering ASCII and Latin-1, which is
/// all our labels use (a run directory name outside it shows boxes for the missing letters).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");

/// Registered under plotters' default family name, so any text style that falls back to the
/// default still finds a font instead of failing with `FontUnavailable`.
const FONT_FAMILY: &str = "sans-serif";

/// Colours of the curves in a panel, in order (the "tab10" palette, chosen to stay
/// distinguishable for the common forms of colour blindness). Public so tests can look for them.
pub const SERIES_COLOURS: [[u8; 3]; 8] = [
    [31, 119, 180],  // blue
    [255, 127, 14],  // orange
    [44, 160, 44],   // green
    [214, 39, 40],   // red
    [148, 103, 189], // purple
    [140, 86, 75],   // brown
    [227, 119, 194], // pink
    [23, 190, 207],  // cyan
];

/// Smallest and largest image we draw: below the minimum the panels have no room for their axis
/// labels, above the maximum the RGB buffer alone would take hundreds of megabytes.
const MIN_SIZE: (u32, u32) = (480, 300);
const MAX_SIDE: u32 = 8192;

/// Where and how large to draw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlotOptions {
    /// Output PNG; `None` means `RUN_DIR/curves.png`.
    pub out: Option<PathBuf>,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
}

impl Default for PlotOptions {
    fn default() -> Self {
        Self {
            out: None,
            width: 1600,
            height: 1000,
        }
    }
}

/// The contents of a `metrics.jsonl`, as one series per numeric key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Every key that held a finite number on at least one line (except `step`, which is the x
    /// coordinate), mapped to its `(step, value)` points sorted by step with one point per step:
    /// where a resumed run wrote a step again, the later line wins, so curves do not zigzag back.
    pub series: BTreeMap<String, Vec<(f64, f64)>>,
    /// Lines that held a JSON object.
    pub records: usize,
    /// 1-based numbers of the non-blank lines that were not a JSON object (typically the last
    /// line, cut off when a run was killed mid-write).
    pub skipped_lines: Vec<usize>,
}

impl Metrics {
    /// The `(step, value)` points of `key`, if it ever held a number.
    pub fn get(&self, key: &str) -> Option<&[(f64, f64)]> {
        self.series.get(key).map(Vec::as_slice)
    }

    /// How many non-blank lines could not be parsed.
    pub fn skipped(&self) -> usize {
        self.skipped_lines.len()
    }
}

/// Parses `metrics.jsonl` text into per-key series, skipping (and counting) unparsable lines.
///
/// The x coordinate of a line is its `step`; a line without one is placed one step after the
/// previous line (at 0 if it is the first), so a file without steps still plots in order.
/// Values that are not finite numbers (strings, booleans, `null`, Python's bare `NaN` and
/// `Infinity`) are left out: there is nothing to draw for them.
pub fn read_metrics(text: &str) -> Metrics {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut records = 0;
    let mut skipped_lines = Vec::new();
    let mut last_step: Option<f64> = None;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some(record) = parse_record(line) else {
            skipped_lines.push(index + 1);
            continue;
        };
        records += 1;
        let step = record
            .get("step")
            .and_then(finite)
            .unwrap_or_else(|| last_step.map_or(0.0, |s| s + 1.0));
        last_step = Some(step);
        for (key, value) in &record {
            if key == "step" {
                continue;
            }
            if let Some(v) = finite(value) {
                series.entry(key.clone()).or_default().push((step, v));
            }
        }
    }
    for points in series.values_mut() {
        *points = sort_last_wins(std::mem::take(points));
    }
    Metrics {
        series,
        records,
        skipped_lines,
    }
}

/// One line as a JSON object. Python's `json.dumps` writes non-finite floats as bare `NaN` /
/// `Infinity`, which is not JSON; rather than lose a whole step to one diverged value we retry
/// with those tokens read as `null`.
fn parse_record(line: &str) -> Option<Map<String, Value>> {
    if let Ok(record) = serde_json::from_str(line) {
        return Some(record);
    }
    if line.contains("NaN") || line.contains("Infinity") {
        return serde_json::from_str(&non_finite_to_null(line)).ok();
    }
    None
}

/// Replaces the bare tokens `NaN`, `Infinity` and `-Infinity` outside JSON strings with `null`.
fn non_finite_to_null(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if c == '\\' {
                let escaped: String = rest.chars().take(2).collect();
                out.push_str(&escaped);
                rest = &rest[escaped.len()..];
                continue;
            }
            in_string = c != '"';
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn finite(value: &Value) -> Option<f64> {
    value.as_f64().filter(|v| v.is_finite())
}

/// Sorts points by step (stably, so equal steps stay in file order) and keeps the last point of
/// each step.
fn sort_last_wins(mut points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(points.len());
    for p in points {
        match out.last_mut() {
            Some(last) if last.0 == p.0 => *last = p,
            _ => out.push(p),
        }
    }
    out
}

/// Reads `RUN_DIR/metrics.jsonl` and writes the PNG; returns the path written.
///
/// Unparsable lines are reported on stderr as a warning and skipped. Errors (no such directory,
/// no or empty `metrics.jsonl`, nothing numeric to plot, an unwritable output) are one line
/// naming the file.
pub fn plot_run(run_dir: &Path, opts: &PlotOptions) -> Result<PathBuf> {
    let (width, height) = (opts.width, opts.height);
    if width < MIN_SIZE.0 || height < MIN_SIZE.1 || width > MAX_SIDE || height > MAX_SIDE {
        bail!(
            "--width {width} --height {height}: the plot must be from {}x{} to \
             {MAX_SIDE}x{MAX_SIDE} pixels",
            MIN_SIZE.0,
            MIN_SIZE.1
        );
    }
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| run_dir.join("curves.png"));
    check_png_out(&out, if opts.out.is_some() { "--out " } else { "" })?;
    if !run_dir.is_dir() {
        if run_dir.exists() {
            bail!(
                "{}: not a directory (expected a training run directory holding metrics.jsonl)",
                run_dir.display()
            );
        }
        bail!("{}: no such run directory", run_dir.display());
    }
    let path = run_dir.join("metrics.jsonl");
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{}: not found (is {} a training run directory?)",
            path.display(),
            run_dir.display()
        ),
        Err(e) => bail!("{}: {e}", path.display()),
    };
    // Lossy, so that one line garbled into invalid UTF-8 (a crash mid-write) costs at most that
    // line, which then parses with replacement characters or is skipped, not the whole file.
    let text = String::from_utf8_lossy(&bytes);
    if text.trim().is_empty() {
        bail!("{}: empty file, no metrics to plot", path.display());
    }
    let metrics = read_metrics(&text);
    if metrics.skipped() > 0 {
        eprintln!(
            "warning: {}: skipped {}",
            path.display(),
            describe_skipped(&metrics.skipped_lines, &text)
        );
    }
    if metrics.series.is_empty() {
        bail!(
            "{}: no numeric metrics in {} line(s)",
            path.display(),
            metrics.records + metrics.skipped()
        );
    }
    let panels = panels(&metrics);
    if panels.is_empty() {
        let keys: Vec<&str> = metrics.series.keys().map(String::as_str).collect();
        bail!(
            "{}: none of the plotted metrics (reward_mean, reward_*_mean, kl, completion_length_*, \
             eval_accuracy, loss, grad_norm, lr) is present; keys found: {}",
            path.display(),
            keys.join(", ")
        );
    }

    let title = format!("{}: training curves", run_name(run_dir));
    let mut buffer = vec![255u8; width as usize * height as usize * 3];
    draw(&mut buffer, (width, height), &title, &metrics, &panels)
        .with_context(|| format!("{}: drawing the plot failed", out.display()))?;
    let image = image::RgbImage::from_raw(width, height, buffer)
        .ok_or_else(|| anyhow!("{}: plot buffer has the wrong size", out.display()))?;
    write_png_atomic(&out, &image)?;
    Ok(out)
}

/// The plot may be written to `out`: a `.png` path that is absent or holds an image (an
/// earlier plot, redrawn while a run trains). Anything else there (a config, a log, a
/// directory) is a user's file that a PNG must not replace. `flag` prefixes messages.
fn check_png_out(out: &Path, flag: &str) -> Result<()> {
    let is_png_name = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png_name {
        bail!(
            "{flag}{}: the plot is a PNG image: give a file name ending in .png",
            out.display()
        );
    }
    if out.is_dir() {
        bail!("{flag}{}: is a directory; give a file name", out.display());
    }
    if out.exists() {
        let mut magic = [0u8; 8];
        let is_png = fs::File::open(out)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && magic == *b"\x89PNG\r\n\x1a\n";
        if !is_png {
            bail!(
                "{flag}{}: exists and is not a PNG image; plot replaces only an earlier plot: \
                 choose another file",
                out.display()
            );
        }
    }
    Ok(())
}

/// "line 12" / "3 unparsable lines (4, 9, 12)", noting when the only bad line is the last one,
/// which is what a run killed mid-write leaves behind.
fn describe_skipped(lines: &[usize], text: &str) -> String {
    let last_nonblank = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, _)| i + 1)
        .last();
    match lines {
        [only] if Some(*only) == last_nonblank => {
            format!("unparsable last line {only} (probably cut off when the run was stopped)")
        }
        [only] => format!("unparsable line {only}"),
        _ => {
            let shown: Vec<String> = lines.iter().take(8).map(ToString::to_string).collect();
            let more = if lines.len() > 8 { ", ..." } else { "" };
            format!(
                "{} unparsable lines ({}{more})",
                lines.len(),
                shown.join(", ")
            )
        }
    }
}

/// The run directory's own name for the title, also for `.` or `..`.
fn run_name(run_dir: &Path) -> String {
    run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .or_else(|| {
            run_dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| run_dir.display().to_string())
}

/// One curve of a panel.
struct Curve<'a> {
    label: String,
    points: &'a [(f64, f64)],
    /// `(step, low, high)` drawn as a translucent band behind the curve.
    band: Option<Vec<(f64, f64, f64)>>,
    /// Draw a dot at every point: for sparse series such as eval results, where a line alone
    /// hides how few measurements there are.
    markers: bool,
}

/// One chart of the grid.
struct Panel<'a> {
    title: &'static str,
    y_label: &'static str,
    curves: Vec<Curve<'a>>,
    /// The metric is a fraction: show it on a fixed 0..1 axis when it fits, so runs compare.
    unit_interval: bool,
}

/// The panels that have data, in reading order: rewards, KL, completion length, eval accuracy
/// (else loss), gradient norm, learning rate. An SFT run gets only the last ones.
fn panels(m: &Metrics) -> Vec<Panel<'_>> {
    let curve = |key: &str, label: &str| {
        m.get(key).map(|points| Curve {
            label: label.to_string(),
            points,
            band: None,
            markers: points.len() == 1,
        })
    };
    let single = |title, y_label, key: &str| Panel {
        title,
        y_label,
        curves: curve(key, key).into_iter().collect(),
        unit_interval: false,
    };

    let mut rewards: Vec<Curve> = Vec::new();
    if let Some(mut total) = curve("reward_mean", "total") {
        // The spread of rewards is what GRPO learns from, so show it around the mean.
        if let Some(std) = m.get("reward_std") {
            let band: Vec<(f64, f64, f64)> = total
                .points
                .iter()
                .filter_map(|&(s, mean)| {
                    let i = std.binary_search_by(|p| p.0.total_cmp(&s)).ok()?;
                    Some((s, mean - std[i].1, mean + std[i].1))
                })
                .collect();
            if !band.is_empty() {
                total.label = "total (band: ±1 std)".to_string();
                total.band = Some(band);
            }
        }
        rewards.push(total);
    }
    for key in m.series.keys() {
        let name = key
            .strip_prefix("reward_")
            .and_then(|k| k.strip_suffix("_mean"))
            .filter(|name| !name.is_empty());
        if let Some(name) = name {
            rewards.extend(curve(key, name));
        }
    }

    let mut lengths: Vec<Curve> = Vec::new();
    for (key, label) in [
        ("completion_length_mean", "mean"),
        ("completion_length_max", "max"),
        ("completion_length_min", "min"),
    ] {
        lengths.extend(curve(key, label));
    }

    let mut panels = vec![
        Panel {
            title: "Reward (mean over completions)",
            y_label: "reward",
            curves: rewards,
            unit_interval: false,
        },
        single("KL to the reference model", "KL", "kl"),
        Panel {
            title: "Completion length",
            y_label: "tokens",
            curves: lengths,
            unit_interval: false,
        },
    ];
    if let Some(mut eval) = curve("eval_accuracy", "eval_accuracy") {
        eval.markers = true;
        panels.push(Panel {
            title: "Eval accuracy",
            y_label: "accuracy",
            curves: vec![eval],
            unit_interval: true,
        });
    } else {
        panels.push(single("Training loss", "loss", "loss"));
    }
    panels.push(single("Gradient norm", "norm", "grad_norm"));
    panels.push(single("Learning rate", "lr", "lr"));
    panels.retain(|p| !p.curves.is_empty());
    panels
}

/// Text sizes and strokes, scaled with the image so a small plot is not all labels.
struct Sizes {
    title: f64,
    caption: f64,
    label: f64,
    legend: f64,
    stroke: u32,
    marker: i32,
    pad: i32,
}

impl Sizes {
    fn for_image(width: u32, height: u32) -> Self {
        let s = (f64::from(width) / 1600.0).min(f64::from(height) / 1000.0);
        Self {
            title: (34.0 * s).max(16.0),
            caption: (24.0 * s).max(13.0),
            label: (17.0 * s).max(11.0),
            legend: (18.0 * s).max(11.0),
            stroke: (2.0 * s).round().max(1.0) as u32,
            marker: (4.0 * s).round().max(2.0) as i32,
            pad: (10.0 * s).round().max(4.0) as i32,
        }
    }
}

fn font(size: f64) -> TextStyle<'static> {
    (FONT_FAMILY, size).into_font().color(&BLACK)
}

fn colour(i: usize) -> RGBColor {
    let [r, g, b] = SERIES_COLOURS[i % SERIES_COLOURS.len()];
    RGBColor(r, g, b)
}

/// Registers the embedded font with plotters once per process (its font table is global).
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok =
        *REGISTERED.get_or_init(|| register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_ok());
    if !ok {
        bail!("the embedded font (assets/DejaVuSans-subset.ttf) is not a valid TrueType font");
    }
    Ok(())
}

/// Rows and columns for `n` panels on a landscape image.
fn grid(n: usize) -> (usize, usize) {
    match n {
        0 | 1 => (1, 1),
        2 => (1, 2),
        3 => (1, 3),
        4 => (2, 2),
        5 | 6 => (2, 3),
        _ => (3, 3),
    }
}

fn draw(
    buffer: &mut [u8],
    (width, height): (u32, u32),
    title: &str,
    metrics: &Metrics,
    panels: &[Panel],
) -> Result<()> {
    ensure_font()?;
    let sizes = Sizes::for_image(width, height);
    let root = BitMapBackend::with_buffer(buffer, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;

    // Every panel shares the step axis, so a change in one can be read off against the others.
    let (x_lo, x_hi) = panels
        .iter()
        .flat_map(|p| p.curves.iter())
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
    let x_range = if x_hi > x_lo {
        (x_lo, x_hi)
    } else {
        (x_lo - 1.0, x_hi + 1.0)
    };

    let title_h = (sizes.title * 1.6) as u32;
    let (head, body) = root.split_vertically(title_h);
    let mut subtitle = format!(
        "steps {} to {}, {} record{}",
        fmt_plain(x_lo),
        fmt_plain(x_hi),
        metrics.records,
        if metrics.records == 1 { "" } else { "s" }
    );
    if metrics.skipped() > 0 {
        subtitle.push_str(&format!(
            ", {} unparsable line(s) skipped",
            metrics.skipped()
        ));
    }
    let (_, head_h) = head.dim_in_pixel();
    let title_font = font(sizes.title);
    let subtitle_font = font(sizes.label).color(&RGBColor(110, 110, 110));
    head.draw_text(
        title,
        &title_font.pos(Pos::new(HPos::Center, VPos::Center)),
        (width as i32 / 2, head_h as i32 / 2),
    )?;
    // The subtitle goes right of the centred title, when there is room for it.
    let (title_w, _) = head.estimate_text_size(title, &title_font)?;
    let (subtitle_w, _) = head.estimate_text_size(&subtitle, &subtitle_font)?;
    if (width + title_w) / 2 + subtitle_w + 4 * sizes.pad as u32 <= width {
        head.draw_text(
            &subtitle,
            &subtitle_font.pos(Pos::new(HPos::Right, VPos::Center)),
            (width as i32 - 2 * sizes.pad, head_h as i32 / 2),
        )?;
    }

    let cells = body.split_evenly(grid(panels.len()));
    for (cell, panel) in cells.iter().zip(panels) {
        draw_panel(cell, panel, x_range, &sizes)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(
    cell: &DrawingArea<BitMapBackend, Shift>,
    panel: &Panel,
    (x_lo, x_hi): (f64, f64),
    sizes: &Sizes,
) -> Result<()> {
    let pad = sizes.pad;
    let (cell_w, _) = cell.dim_in_pixel();
    // A caption wider than its cell (small images, three columns) is set smaller, not clipped.
    let (caption_w, _) = cell.estimate_text_size(panel.title, &font(sizes.caption))?;
    let room = f64::from(cell_w) - f64::from(3 * pad);
    let caption_size = sizes.caption * (room / f64::from(caption_w.max(1))).min(1.0);
    let caption_font = font(caption_size);
    let legend_font = font(sizes.legend);
    let label_font = font(sizes.label);

    // The legend goes in its own strip between the caption and the chart, so it never covers a
    // curve: entries flow left to right and wrap.
    let swatch = (sizes.legend * 1.6) as i32;
    let row_h = (sizes.legend * 1.5) as i32;
    let caption_h = (sizes.caption * 1.5) as i32;
    let mut legend = Vec::new();
    if panel.curves.len() > 1 {
        let (mut x, mut row) = (2 * pad, 0);
        for (i, curve) in panel.curves.iter().enumerate() {
            let (text_w, _) = cell.estimate_text_size(&curve.label, &legend_font)?;
            let entry_w = swatch + pad / 2 + text_w as i32;
            if x > 2 * pad && x + entry_w > cell_w as i32 - pad {
                x = 2 * pad;
                row += 1;
            }
            legend.push((i, x, row));
            x += entry_w + 2 * pad;
        }
    }
    let legend_rows = legend.last().map_or(0, |&(_, _, row)| row + 1);
    let head_h = pad + caption_h + legend_rows * row_h;
    let (head, chart_area) = cell.split_vertically(head_h);
    head.draw_text(
        panel.title,
        &caption_font.pos(Pos::new(HPos::Left, VPos::Center)),
        (2 * pad, pad + caption_h / 2),
    )?;
    // The font backend puts a centred line of text's visual middle about a fifth of its size
    // above the anchor; raise the swatch to match.
    let swatch_raise = (sizes.legend * 0.2) as i32;
    for &(i, x, row) in &legend {
        let y = pad + caption_h + row * row_h + row_h / 2;
        head.draw(&PathElement::new(
            vec![(x, y - swatch_raise), (x + swatch, y - swatch_raise)],
            colour(i).stroke_width(sizes.stroke + 1),
        ))?;
        head.draw_text(
            &panel.curves[i].label,
            &legend_font.pos(Pos::new(HPos::Left, VPos::Center)),
            (x + swatch + pad / 2, y),
        )?;
    }

    let (y_lo, y_hi) = y_range(panel);
    let integral_steps = panel
        .curves
        .iter()
        .all(|c| c.points.iter().all(|p| p.0.fract() == 0.0));
    let x_fmt = axis_formatter(x_lo, x_hi, integral_steps);
    let y_fmt = axis_formatter(y_lo, y_hi, false);
    // Room for the widest tick label plus the rotated axis description.
    let tick_w = [y_lo, y_hi, (y_lo + y_hi) / 2.0]
        .iter()
        .map(|v| cell.estimate_text_size(&y_fmt(v), &label_font).map(|s| s.0))
        .try_fold(0, |w, s| s.map(|s| w.max(s)))?;
    let y_area = tick_w + (sizes.label * 1.4) as u32 + 3 * pad as u32;
    let x_area = (sizes.label * 3.0) as u32 + pad as u32;

    let mut chart = ChartBuilder::on(&chart_area)
        .margin_left(pad)
        .margin_right(3 * pad)
        .margin_top(pad)
        .margin_bottom(pad)
        .x_label_area_size(x_area)
        .y_label_area_size(y_area)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc(panel.y_label)
        .x_labels(6)
        .y_labels(6)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style(label_font.clone())
        .axis_desc_style(label_font.clone())
        .bold_line_style(RGBColor(220, 220, 220))
        .light_line_style(RGBColor(244, 244, 244))
        .axis_style(RGBColor(90, 90, 90))
        .draw()?;

    // Bands first, so every curve is drawn over all of them.
    for (i, curve) in panel.curves.iter().enumerate() {
        if let Some(band) = &curve.band {
            let outline: Vec<(f64, f64)> = band
                .iter()
                .map(|&(x, _, hi)| (x, hi))
                .chain(band.iter().rev().map(|&(x, lo, _)| (x, lo)))
                .collect();
            chart.draw_series(std::iter::once(Polygon::new(
                outline,
                colour(i).mix(0.15).filled(),
            )))?;
        }
    }
    for (i, curve) in panel.curves.iter().enumerate() {
        let style = colour(i).stroke_width(sizes.stroke);
        chart.draw_series(LineSeries::new(curve.points.iter().copied(), style))?;
        if curve.markers {
            chart.draw_series(
                curve
                    .points
                    .iter()
                    .map(|&p| Circle::new(p, sizes.marker, colour(i).filled())),
            )?;
        }
    }
    Ok(())
}

/// The y axis of a panel: the data (bands included) with 5% headroom, never dipping below zero
/// for a metric that never does (lengths, KL, norms), and 0..1 for fractions that fit it.
fn y_range(panel: &Panel) -> (f64, f64) {
    let (lo, hi) = panel
        .curves
        .iter()
        .flat_map(|c| {
            let band = c.band.iter().flatten().flat_map(|&(_, lo, hi)| [lo, hi]);
            c.points.iter().map(|p| p.1).chain(band)
        })
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
            (lo.min(y), hi.max(y))
        });
    if panel.unit_interval && lo >= 0.0 && hi <= 1.0 {
        return (-0.02, 1.02);
    }
    // A flat series still gets an axis of some height; spans near the bottom of f64's range
    // (subnormals) count as flat, since plotters cannot place ticks on them.
    let tiny = 1e-300;
    let pad = if hi - lo > tiny {
        (hi - lo) * 0.05
    } else if hi.abs() > tiny {
        hi.abs() * 0.1
    } else {
        1.0
    };
    let bottom = if lo >= 0.0 {
        (lo - pad).max(0.0)
    } else {
        lo - pad
    };
    (bottom, hi + pad)
}

/// Tick labels for an axis spanning `lo..hi` (about six ticks): as many decimals as the tick
/// spacing needs, and scientific notation for the whole axis when its values are very small or
/// large (learning rates are ~1e-6), so one axis never mixes "0.001" with "5.0e-4". On an
/// `integral` axis (optimizer steps) ticks between whole numbers stay unlabelled.
fn axis_formatter(lo: f64, hi: f64, integral: bool) -> impl Fn(&f64) -> String {
    let step = ((hi - lo) / 6.0).abs();
    let magnitude = lo.abs().max(hi.abs());
    let scientific = magnitude > 0.0 && !(1e-3..1e6).contains(&magnitude);
    move |&v| {
        if integral && v.fract() != 0.0 {
            return String::new();
        }
        if step == 0.0 || v.abs() <= step * 1e-6 {
            return if v == 0.0 || step > 0.0 {
                "0".to_string()
            } else {
                format!("{v}")
            };
        }
        if scientific {
            let decimals = (v.abs().log10().floor() - step.log10())
                .ceil()
                .clamp(0.0, 6.0) as usize;
            let text = format!("{v:.decimals$e}");
            match text.split_once('e') {
                Some((mantissa, exponent)) => format!("{}e{exponent}", trim_zeros(mantissa)),
                None => text,
            }
        } else {
            let decimals = (-step.log10()).ceil().clamp(0.0, 12.0) as usize;
            trim_zeros(&format!("{v:.decimals$}"))
        }
    }
}

/// "0.0040" reads worse than "0.004": the grid already shows the spacing.
fn trim_zeros(number: &str) -> String {
    if number.contains('.') {
        number
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        number.to_string()
    }
}

/// A step number as written in the file: integral steps without a fraction.
fn fmt_plain(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// Writes the PNG to a temporary file beside `path` and renames it into place, so a reader (an
/// image viewer refreshing while the run trains) never sees a half-written file.
fn write_png_atomic(path: &Path, image: &image::RgbImage) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| -> Result<()> {
        let mut writer = BufWriter::new(fs::File::create(&tmp)?);
        image.write_to(&mut writer, image::ImageFormat::Png)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = written {
        // Best effort: the temporary file may not even exist.
        let _ = fs::remove_file(&tmp);
        bail!("{}: cannot write: {e}", path.display());
    }
    Ok(())
}
