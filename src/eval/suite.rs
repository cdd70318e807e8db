//! Evaluation suites (`medvlm eval --suite FILE`): every model of a TOML file on every
//! benchmark of it, one directory per pair holding its scored items (appended batch by
//! batch, so an interrupted suite resumes where it stopped) and the settings they were
//! scored with, and one table of models by benchmarks over the per-pair
//! [`Report`](super::Report)s.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{ItemResult, Report, Scoring};
use crate::data::score::Protocol;
use crate::data::{self, DataFormat, Language, PromptTemplate, Skipped, VqaItem};

/// A suite file as written (see `medvlm eval --help`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSuite {
    template: Option<String>,
    max_new_tokens: Option<usize>,
    batch_size: Option<usize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    #[serde(default)]
    model: Vec<RawModel>,
    #[serde(default)]
    benchmark: Vec<RawBenchmark>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Option<String>,
    path: PathBuf,
    adapter: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBenchmark {
    name: Option<String>,
    path: PathBuf,
    format: Option<String>,
    #[serde(default, alias = "split")]
    splits: Vec<String>,
    language: Option<String>,
    limit: Option<usize>,
    closed_protocol: Option<String>,
    open_protocol: Option<Vec<String>>,
}

/// A model of a suite.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SuiteModel {
    /// Its row in the table and its directory under `--out`.
    pub name: String,
    pub path: PathBuf,
    pub adapter: Option<PathBuf>,
}

/// A benchmark of a suite, with what to read of it and how to score it.
#[derive(Debug, Clone, PartialEq)]
pub struct SuiteBenchmark {
    /// Its column in the table and its directory under each model's.
    pub name: String,
    pub path: PathBuf,
    pub format: Option<DataFormat>,
    pub splits: Vec<String>,
    pub language: Option<Language>,
    pub limit: Option<usize>,
    pub scoring: Scoring,
}

/// A suite file, checked: names usable as directory names and unique, paths that exist
/// (relative ones taken from the file's folder), protocols that fit their kind.
#[derive(Debug, Clone)]
pub struct Suite {
    pub file: PathBuf,
    pub models: Vec<SuiteModel>,
    pub benchmarks: Vec<SuiteBenchmark>,
    /// Default: each model's own (its medvlm.json), else paper.
    pub template: Option<PromptTemplate>,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
}

/// The names a suite writes at the top of its output directory, which no model may take.
pub const SUITE_FILES: [&str; 3] = ["report.md", "report.json", "suite.toml"];

/// A name usable as one directory name on every system.
fn check_name(file: &str, what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
    if !ok {
        bail!(
            "{file}: {what}: name {name:?} is not usable as a directory name (letters, digits, \
             '-', '_', '.', '+'; not starting with '.')"
        );
    }
    if SUITE_FILES.contains(&name) || name == crate::files::OUTPUT_MARKER {
        bail!("{file}: {what}: name {name:?} is a file the suite writes; choose another");
    }
    Ok(())
}

/// `p` made absolute, symbolic links resolved (as it is when that fails).
fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn file_name_of(p: &Path) -> Option<String> {
    p.file_name().map(|n| n.to_string_lossy().to_string())
}

impl Suite {
    /// Reads and checks a suite file; every error is one line naming the file and the key.
    pub fn load(path: &Path) -> Result<Self> {
        use crate::processor::input::{read_bounded_string, MAX_SIDE_FILE_BYTES};
        // Bounded, regular files only: `--suite /dev/zero` is refused, not read forever.
        let text = read_bounded_string(path, MAX_SIDE_FILE_BYTES, "suite")?;
        Self::parse(&text, path)
    }

    /// [`Suite::load`] of a file's text.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let raw: RawSuite = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| format!("line {}: ", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_default();
            anyhow::anyhow!("{shown}: {line}{}", e.message().trim().replace('\n', " "))
        })?;
        let root = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let at = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                root.join(p)
            }
        };
        if raw.model.is_empty() {
            bail!("{shown}: no [[model]] (each with a path)");
        }
        if raw.benchmark.is_empty() {
            bail!("{shown}: no [[benchmark]] (each with a path)");
        }
        let template = match &raw.template {
            None => None,
            Some(t) => Some(PromptTemplate::parse(t).with_context(|| {
                format!("{shown}: template {t:?}: expected \"paper\" or \"simple\"")
            })?),
        };
        let positive = |key: &str, v: Option<usize>, default: usize| -> Result<usize> {
            match v {
                Some(0) => bail!("{shown}: {key} must be at least 1"),
                Some(n) => Ok(n),
                None => Ok(default),
            }
        };
        let max_new_tokens = positive("max_new_tokens", raw.max_new_tokens, 512)?;
        let batch_size = positive("batch_size", raw.batch_size, 16)?;
        for (key, v) in [
            ("min_pixels", raw.min_pixels),
            ("max_pixels", raw.max_pixels),
        ] {
            if v == Some(0) {
                bail!("{shown}: {key} must be at least 1 pixel (leave it out for the model's own)");
            }
        }
        if let (Some(lo), Some(hi)) = (raw.min_pixels, raw.max_pixels) {
            if lo > hi {
                bail!("{shown}: min_pixels ({lo}) is larger than max_pixels ({hi})");
            }
        }
        let mut models = Vec::new();
        for (i, m) in raw.model.iter().enumerate() {
            let what = format!("model[{i}]");
            let path = at(&m.path);
            if !path.is_dir() {
                bail!(
                    "{shown}: {what}: path {}: no such checkpoint directory",
                    path.display()
                );
            }
            let adapter = m.adapter.as_ref().map(|a| at(a));
            if let Some(a) = &adapter {
                if !a.is_dir() {
                    bail!(
                        "{shown}: {what}: adapter {}: no such adapter directory",
                        a.display()
                    );
                }
            }
            // Absolute, so that a rerun from another folder is the same pair.
            let (path, adapter) = (canonical(&path), adapter.map(|a| canonical(&a)));
            let name = match &m.name {
                Some(n) => n.clone(),
                None => file_name_of(&path).unwrap_or_else(|| "model".into()),
            };
            check_name(&shown, &what, &name)?;
            if models.iter().any(|o: &SuiteModel| o.name == name) {
                bail!(
                    "{shown}: {what}: name {name:?} is taken by another model; give each its \
                     own name"
                );
            }
            models.push(SuiteModel {
                name,
                path,
                adapter,
            });
        }
        let mut benchmarks = Vec::new();
        for (i, b) in raw.benchmark.iter().enumerate() {
            let what = format!("benchmark[{i}]");
            let path = at(&b.path);
            if !path.exists() {
                bail!(
                    "{shown}: {what}: path {}: no such file or directory",
                    path.display()
                );
            }
            let path = canonical(&path);
            let format = match &b.format {
                None => None,
                Some(f) => Some(
                    f.parse::<DataFormat>()
                        .map_err(|e| anyhow::anyhow!("{shown}: {what}: format: {e:#}"))?,
                ),
            };
            let language = match &b.language {
                None => None,
                Some(l) => Some(
                    l.parse::<Language>()
                        .map_err(|e| anyhow::anyhow!("{shown}: {what}: language: {e:#}"))?,
                ),
            };
            if b.limit == Some(0) {
                bail!("{shown}: {what}: limit must be at least 1");
            }
            let protocol = |key: &str, s: &str| -> Result<Protocol> {
                s.parse::<Protocol>()
                    .map_err(|e| anyhow::anyhow!("{shown}: {what}: {key}: {e:#}"))
            };
            let mut scoring = Scoring::default();
            if let Some(c) = &b.closed_protocol {
                scoring.closed = protocol("closed_protocol", c)?;
            }
            if let Some(o) = &b.open_protocol {
                if o.is_empty() {
                    bail!("{shown}: {what}: open_protocol needs at least one protocol");
                }
                scoring.open = o
                    .iter()
                    .map(|p| protocol("open_protocol", p))
                    .collect::<Result<_>>()?;
            }
            scoring.check().map_err(|e| {
                anyhow::anyhow!(
                    "{shown}: {what}: {}",
                    format!("{e:#}")
                        .replace("--closed-protocol", "closed_protocol")
                        .replace("--open-protocol", "open_protocol")
                )
            })?;
            let name = match &b.name {
                Some(n) => n.clone(),
                None => match format {
                    Some(DataFormat::Bench(f)) => f.name().to_string(),
                    _ => file_name_of(&path).unwrap_or_else(|| "benchmark".into()),
                },
            };
            check_name(&shown, &what, &name)?;
            if benchmarks.iter().any(|o: &SuiteBenchmark| o.name == name) {
                bail!(
                    "{shown}: {what}: name {name:?} is taken by another benchmark; give each \
                     its own name"
                );
            }
            benchmarks.push(SuiteBenchmark {
                name,
                path,
                format,
                splits: b.splits.clone(),
                language,
                limit: b.limit,
                scoring,
            });
        }
        Ok(Self {
            file: path.to_path_buf(),
            models,
            benchmarks,
            template,
            max_new_tokens,
            batch_size,
            min_pixels: raw.min_pixels,
            max_pixels: raw.max_pixels,
        })
    }
}

/// A benchmark as loaded for a suite: the items to score (after its limit), the rows
/// skipped while reading it, and rows per modality, as `medvlm eval` counts them.
#[derive(Debug, Clone)]
pub struct LoadedBenchmark {
    pub format: DataFormat,
    pub items: Vec<VqaItem>,
    pub skipped: Vec<Skipped>,
    pub file_rows: BTreeMap<String, usize>,
}

impl LoadedBenchmark {
    pub fn load(b: &SuiteBenchmark) -> Result<Self> {
        let (ds, format) = data::load_data(
            &b.path,
            &data::DataOptions {
                format: b.format,
                image_root: None,
                splits: b.splits.clone(),
                language: b.language,
            },
        )
        .with_context(|| format!("benchmark {}", b.name))?;
        let mut file_rows: BTreeMap<String, usize> = BTreeMap::new();
        for m in ds
            .items
            .iter()
            .map(|it| it.modality.name().to_string())
            .chain(ds.skipped.iter().map(|s| s.modality.clone()))
        {
            *file_rows.entry(m).or_default() += 1;
        }
        let mut items = ds.items;
        if let Some(n) = b.limit {
            items.truncate(n);
        }
        Ok(Self {
            format,
            items,
            skipped: ds.skipped,
            file_rows,
        })
    }

    /// FNV-1a over the items' ids, rows, questions and answers: the same settings on
    /// changed data are a changed pair.
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |s: &str| {
            for b in s.bytes().chain([0xff]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for it in &self.items {
            eat(&it.id);
            eat(&it.index.to_string());
            eat(&it.question);
            eat(it.answer.kind());
            eat(it.answer.text());
            for o in it.options() {
                eat(o);
            }
        }
        format!("{h:016x}")
    }
}

/// The settings a pair's items were scored with: what `settings.json` beside its
/// items.jsonl holds, compared on a rerun. Batch size and device are left out (they change
/// the speed, not what is measured).
#[allow(clippy::too_many_arguments)]
pub fn pair_settings(
    suite: &Suite,
    model: &SuiteModel,
    bench: &SuiteBenchmark,
    loaded: &LoadedBenchmark,
    template: PromptTemplate,
    dtype: Option<&str>,
    medical: &crate::processor::image::MedicalOptions,
) -> serde_json::Value {
    serde_json::json!({
        "model": model.path.display().to_string(),
        "adapter": model.adapter.as_ref().map(|p| p.display().to_string()),
        "dtype": dtype,
        "data": bench.path.display().to_string(),
        "format": match loaded.format {
            DataFormat::MedVlm => "medvlm",
            DataFormat::Bench(f) => f.name(),
        },
        "splits": bench.splits,
        "language": bench.language.map(|l| l.code()),
        "limit": bench.limit,
        "items": loaded.items.len(),
        "items_fnv1a": loaded.fingerprint(),
        "scoring": bench.scoring,
        "template": template.name(),
        "mode": "greedy",
        "max_new_tokens": suite.max_new_tokens,
        "min_pixels": suite.min_pixels,
        "max_pixels": suite.max_pixels,
        "window": medical.window,
        "slice": medical.slice,
        "medvlm_version": env!("CARGO_PKG_VERSION"),
    })
}

/// The first setting that differs between two settings objects, as `key: was X, now Y`.
fn first_difference(old: &serde_json::Value, new: &serde_json::Value) -> Option<String> {
    let empty = serde_json::Map::new();
    let o = old.as_object().unwrap_or(&empty);
    let n = new.as_object().unwrap_or(&empty);
    let keys: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
    let null = serde_json::Value::Null;
    let found = keys.into_iter().find_map(|k| {
        let (a, b) = (o.get(k).unwrap_or(&null), n.get(k).unwrap_or(&null));
        (a != b).then(|| format!("{k} was {a}, now {b}"))
    });
    found
}

/// Where a pair's files go: `<out>/<model>/<benchmark>/`.
pub fn pair_dir(out: &Path, model: &SuiteModel, bench: &SuiteBenchmark) -> PathBuf {
    out.join(&model.name).join(&bench.name)
}

pub const ITEMS_FILE: &str = "items.jsonl";
pub const SETTINGS_FILE: &str = "settings.json";

/// Checks a pair's earlier output against `settings`: the same, or none, or (with `force`)
/// removed to start the pair again. Returns the items already scored.
pub fn prepare_pair(
    dir: &Path,
    label: &str,
    settings: &serde_json::Value,
    force: bool,
) -> Result<Vec<ItemResult>> {
    let items = dir.join(ITEMS_FILE);
    let path = dir.join(SETTINGS_FILE);
    let earlier = if path.exists() {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| crate::files::io_error(&path, "cannot read", e))?;
        Some(serde_json::from_str::<serde_json::Value>(&text).unwrap_or(serde_json::Value::Null))
    } else {
        None
    };
    let changed = match &earlier {
        Some(old) => first_difference(old, settings),
        None if items.exists() => Some(format!("{SETTINGS_FILE} is missing")),
        None => return Ok(Vec::new()),
    };
    if let Some(why) = changed {
        if !force {
            bail!(
                "{}: pair {label} was scored with other settings ({why}); pass --force to \
                 score it again from the start, or use another --out",
                path.display()
            );
        }
        eprintln!("{label}: settings changed ({why}); scoring it again from the start (--force)");
        for p in [&items, &path] {
            if p.exists() {
                std::fs::remove_file(p)
                    .map_err(|e| crate::files::io_error(p, "cannot remove", e))?;
            }
        }
        return Ok(Vec::new());
    }
    read_items(&items)
}

/// Interns the few distinct strings items.jsonl holds where [`ItemResult`] keeps
/// `&'static str` (kinds, extraction names).
fn intern(s: &str) -> &'static str {
    static SEEN: std::sync::Mutex<BTreeSet<&'static str>> = std::sync::Mutex::new(BTreeSet::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = seen.get(s) {
        return k;
    }
    let k: &'static str = Box::leak(s.to_string().into_boxed_str());
    seen.insert(k);
    k
}

/// An item's line of items.jsonl, as written.
#[derive(Debug, Deserialize)]
struct StoredItem {
    row: usize,
    id: String,
    modality: String,
    kind: String,
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    output: String,
    letter: Option<char>,
    solution: Option<char>,
    #[serde(default)]
    answer: String,
    correct: bool,
    scores: BTreeMap<String, f64>,
    answered: bool,
    format_ok: bool,
    #[serde(default)]
    extraction: String,
    #[serde(default)]
    option_logprobs: Option<Vec<f32>>,
}

impl StoredItem {
    fn into_result(self) -> Result<ItemResult> {
        let kind = match self.kind.as_str() {
            "choice" => "choice",
            "closed" => "closed",
            "open" => "open",
            k => bail!("unknown kind {k:?}"),
        };
        let scores = self
            .scores
            .into_iter()
            .map(|(p, v)| {
                let p = p.parse::<Protocol>().map_err(anyhow::Error::msg)?;
                Ok((p.name(), v))
            })
            .collect::<Result<_>>()?;
        Ok(ItemResult {
            row: self.row,
            id: self.id,
            modality: self.modality,
            kind,
            images: self.images,
            prompt: self.prompt,
            output: self.output,
            letter: self.letter,
            solution: self.solution,
            answer: self.answer,
            correct: self.correct,
            scores,
            answered: self.answered,
            format_ok: self.format_ok,
            extraction: intern(&self.extraction),
            option_logprobs: self.option_logprobs,
        })
    }
}

/// The items of a pair's items.jsonl. A last line cut short (the run was killed while
/// writing it) is dropped from the file, its item scored again.
pub fn read_items(path: &Path) -> Result<Vec<ItemResult>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(crate::files::io_error(path, "cannot read", e)),
    };
    let whole = match text.rfind('\n') {
        Some(i) => i + 1,
        None => 0,
    };
    if whole < text.len() {
        eprintln!(
            "{}: its last line was cut short (an interrupted run); scoring that item again",
            path.display()
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| crate::files::io_error(path, "cannot open", e))?;
        f.set_len(whole as u64)
            .map_err(|e| crate::files::io_error(path, "cannot truncate", e))?;
    }
    text[..whole]
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<StoredItem>(l)
                .map_err(anyhow::Error::from)
                .and_then(StoredItem::into_result)
                .with_context(|| {
                    format!(
                        "{}: line {}: not an item medvlm wrote; remove the line or the pair's \
                         folder to score it again",
                        path.display(),
                        i + 1
                    )
                })
        })
        .collect()
}

/// An item's key in items.jsonl: its benchmark id and row.
fn key(id: &str, row: usize) -> (String, usize) {
    (id.to_string(), row)
}

/// Splits `items` into the results already scored (`done`, by id and row; a key the data
/// holds twice is matched as often as items.jsonl holds it) and the indices still to
/// score. Returns the results in the items' order (`None` where still to score).
pub fn match_done(items: &[VqaItem], done: Vec<ItemResult>) -> Vec<Option<ItemResult>> {
    let mut by: BTreeMap<(String, usize), Vec<ItemResult>> = BTreeMap::new();
    for r in done.into_iter().rev() {
        by.entry(key(&r.id, r.row)).or_default().push(r);
    }
    items
        .iter()
        .map(|it| by.get_mut(&key(&it.id, it.index)).and_then(Vec::pop))
        .collect()
}

/// The line items.jsonl holds for an item's result (what `medvlm eval` writes).
pub fn item_line(r: &ItemResult, it: &VqaItem) -> Result<String> {
    let mut v = serde_json::to_value(r)?;
    v["question"] = serde_json::json!(it.question);
    v["options"] = serde_json::json!(it.options());
    v["subset"] = serde_json::json!(it.subset);
    let mut s = serde_json::to_string(&v)?;
    s.push('\n');
    Ok(s)
}

/// Appends lines to a pair's items.jsonl and makes them durable (one call per batch).
pub fn append_lines(path: &Path, lines: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| crate::files::io_error(path, "cannot open", e))?;
    f.write_all(lines.as_bytes())
        .and_then(|_| f.flush())
        .and_then(|_| f.sync_data())
        .map_err(|e| crate::files::io_error(path, "cannot write", e))
}

/// The protocol that decides "correct" for each kind of question a benchmark has.
pub fn primary_protocols(scoring: &Scoring, kinds: &BTreeSet<&str>) -> Vec<Protocol> {
    let mut out = Vec::new();
    for k in ["choice", "closed", "open"] {
        if kinds.contains(k) {
            out.push(match k {
                "choice" => Protocol::McLetter,
                "closed" => scoring.closed,
                _ => scoring.open.first().copied().unwrap_or(Protocol::OpenExact),
            });
        }
    }
    out
}

/// One benchmark's column of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    pub benchmark: String,
    pub data: String,
    pub format: String,
    /// The protocols deciding "correct", one per kind of question the benchmark has
    /// (multiple choice, closed, open, in this order).
    pub protocols: Vec<String>,
    /// Every protocol that scored closed and open questions.
    pub scoring: Scoring,
    pub medvlm_version: String,
}

/// One cell: a model's accuracy on a benchmark (its report's `all` row).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    pub benchmark: String,
    pub n: usize,
    pub correct: usize,
    pub accuracy: Option<f64>,
    pub ci95_low: Option<f64>,
    pub ci95_high: Option<f64>,
}

/// One model's row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct TableRow {
    pub model: String,
    pub path: String,
    pub adapter: Option<String>,
    pub cells: Vec<Cell>,
}

/// A pair's report and how its items were come by.
#[derive(Debug, Clone, Serialize)]
pub struct PairReport {
    pub model: String,
    pub benchmark: String,
    /// Items found in items.jsonl from an earlier run.
    pub reused: usize,
    /// Items scored by this run.
    pub scored: usize,
    pub report: Report,
}

/// The suite's report: the table (rows models, columns benchmarks) and every pair's
/// [`Report`].
#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    pub suite: String,
    pub medvlm_version: String,
    pub mode: String,
    pub max_new_tokens: usize,
    pub columns: Vec<Column>,
    pub rows: Vec<TableRow>,
    pub pairs: Vec<PairReport>,
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

impl SuiteReport {
    /// The table from the pairs' reports (`pairs` model-major, in the suite's order).
    pub fn new(suite: &Suite, loaded: &[LoadedBenchmark], pairs: Vec<PairReport>) -> Self {
        let version = env!("CARGO_PKG_VERSION").to_string();
        let columns = suite
            .benchmarks
            .iter()
            .zip(loaded)
            .map(|(b, l)| {
                let kinds: BTreeSet<&str> = l.items.iter().map(|it| it.answer.kind()).collect();
                Column {
                    benchmark: b.name.clone(),
                    data: b.path.display().to_string(),
                    format: match l.format {
                        DataFormat::MedVlm => "medvlm".into(),
                        DataFormat::Bench(f) => f.name().into(),
                    },
                    protocols: primary_protocols(&b.scoring, &kinds)
                        .iter()
                        .map(|p| p.name().to_string())
                        .collect(),
                    scoring: b.scoring.clone(),
                    medvlm_version: version.clone(),
                }
            })
            .collect();
        let rows = suite
            .models
            .iter()
            .map(|m| TableRow {
                model: m.name.clone(),
                path: m.path.display().to_string(),
                adapter: m.adapter.as_ref().map(|a| a.display().to_string()),
                cells: pairs
                    .iter()
                    .filter(|p| p.model == m.name)
                    .map(|p| {
                        let all = p.report.rows.iter().find(|r| r.modality == "all");
                        Cell {
                            benchmark: p.benchmark.clone(),
                            n: all.map_or(0, |r| r.n),
                            correct: all.map_or(0, |r| r.correct),
                            accuracy: all.and_then(|r| r.accuracy),
                            ci95_low: all.and_then(|r| r.ci95_low),
                            ci95_high: all.and_then(|r| r.ci95_high),
                        }
                    })
                    .collect(),
            })
            .collect();
        Self {
            suite: suite.file.display().to_string(),
            medvlm_version: version,
            mode: "greedy".into(),
            max_new_tokens: suite.max_new_tokens,
            columns,
            rows,
            pairs,
        }
    }

    /// The table alone, as Markdown.
    pub fn table_markdown(&self) -> String {
        let mut s = String::from("| model |");
        for c in &self.columns {
            s.push_str(&format!(
                " {} ({}; medvlm {}) |",
                c.benchmark,
                c.protocols.join(", "),
                c.medvlm_version
            ));
        }
        s.push_str("\n| --- |");
        for _ in &self.columns {
            s.push_str(" --- |");
        }
        s.push('\n');
        for r in &self.rows {
            s.push_str(&format!("| {} |", r.model));
            for c in &r.cells {
                match (c.accuracy, c.ci95_low, c.ci95_high) {
                    (Some(a), Some(lo), Some(hi)) => s.push_str(&format!(
                        " {} ({}-{}), n={} |",
                        pct(a),
                        pct(lo),
                        pct(hi),
                        c.n
                    )),
                    _ => s.push_str(&format!(" -, n={} |", c.n)),
                }
            }
            s.push('\n');
        }
        s
    }

    /// The table, then per benchmark each model's report.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "# Suite `{}`\n\nmedvlm {}, {} decoding, at most {} new tokens. Each cell: accuracy \
             (95% Wilson interval), n items. A column's protocols decide \"correct\" for its \
             kinds of question: mc-letter for multiple choice, the closed protocol for closed \
             ones, the first open protocol for open ones.\n\n",
            self.suite, self.medvlm_version, self.mode, self.max_new_tokens
        );
        s.push_str(&self.table_markdown());
        for c in &self.columns {
            s.push_str(&format!("\n## {}\n", c.benchmark));
            for p in self.pairs.iter().filter(|p| p.benchmark == c.benchmark) {
                s.push_str(&format!("\n### {}\n\n", p.model));
                s.push_str(&p.report.markdown());
            }
        }
        s
    }
}

/// How a suite runs beyond its file: where, and the flags every model takes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: PathBuf,
    /// Score again from the start the pairs whose settings changed.
    pub force: bool,
    pub dtype: Option<candle_core::DType>,
    pub device: Option<String>,
    pub medical: crate::processor::image::MedicalOptions,
    /// `--quantize`: every model's weights quantized on load.
    pub quantize: Option<crate::kernels::quant::QuantKind>,
}

/// A pair before it runs: its folder, settings, and the items already scored.
struct Pending {
    dir: PathBuf,
    label: String,
    settings: serde_json::Value,
    done: Vec<Option<ItemResult>>,
}

/// Runs a suite into `opts.out` (checked and marked by the caller): every benchmark read
/// once, every model loaded once (not at all when all its pairs are complete), only the
/// items missing from each pair's items.jsonl scored, appended batch by batch. `pb` counts
/// the items of all pairs.
pub fn run(suite: &Suite, opts: &RunOptions, pb: &indicatif::ProgressBar) -> Result<SuiteReport> {
    let loaded: Vec<LoadedBenchmark> = suite
        .benchmarks
        .iter()
        .map(LoadedBenchmark::load)
        .collect::<Result<_>>()?;
    for (b, l) in suite.benchmarks.iter().zip(&loaded) {
        if l.items.is_empty() {
            eprintln!(
                "warning: benchmark {}: no usable items ({} rows skipped)",
                b.name,
                l.skipped.len()
            );
        }
    }
    // Everything that can be refused is, before any model is loaded.
    let mut templates = Vec::new();
    for m in &suite.models {
        let config = crate::model::Qwen2VlConfig::from_file(&m.path.join("config.json"))
            .with_context(|| format!("{}: model {}", suite.file.display(), m.name))?;
        let context = config.text.max_position_embeddings;
        if suite.max_new_tokens >= context {
            bail!(
                "{}: max_new_tokens {} leaves no room for the prompt in model {}'s context of \
                 {context} tokens (max_position_embeddings)",
                suite.file.display(),
                suite.max_new_tokens,
                m.name
            );
        }
        let template = match suite.template {
            Some(t) => t,
            None => {
                let mut dirs: Vec<&Path> = Vec::new();
                if let Some(a) = &m.adapter {
                    dirs.push(a);
                }
                dirs.push(&m.path);
                match PromptTemplate::of_checkpoint(&dirs)? {
                    Some((t, _)) => t,
                    None => PromptTemplate::Paper,
                }
            }
        };
        templates.push(template);
    }
    let dtype = opts.dtype.map(|d| format!("{d:?}").to_lowercase());
    let mut pending: Vec<Vec<Pending>> = Vec::new();
    for (m, &template) in suite.models.iter().zip(&templates) {
        let mut row = Vec::new();
        for (b, l) in suite.benchmarks.iter().zip(&loaded) {
            let dir = pair_dir(&opts.out, m, b);
            let label = format!("{}/{}", m.name, b.name);
            let mut settings =
                pair_settings(suite, m, b, l, template, dtype.as_deref(), &opts.medical);
            // Only when set, so that the settings of runs made before the flag still match.
            if let Some(q) = opts.quantize {
                settings["quantize"] = q.name().into();
            }
            let earlier = prepare_pair(&dir, &label, &settings, opts.force)?;
            let found = earlier.len();
            let done = match_done(&l.items, earlier);
            let reused = done.iter().filter(|d| d.is_some()).count();
            if found > reused {
                eprintln!(
                    "warning: {label}: {} lines of items.jsonl match no item of the benchmark \
                     (ignored)",
                    found - reused
                );
            }
            row.push(Pending {
                dir,
                label,
                settings,
                done,
            });
        }
        pending.push(row);
    }
    let total: usize = loaded.iter().map(|l| l.items.len()).sum::<usize>() * suite.models.len();
    let reused: usize = pending
        .iter()
        .flatten()
        .map(|p| p.done.iter().filter(|d| d.is_some()).count())
        .sum();
    pb.set_length(total as u64);
    pb.set_position(reused as u64);
    let mut pairs = Vec::new();
    for ((m, &template), row) in suite.models.iter().zip(&templates).zip(pending) {
        let needs_model = row
            .iter()
            .zip(&loaded)
            .any(|(p, l)| p.done.iter().any(Option::is_none) && !l.items.is_empty());
        pb.suspend(|| {
            if needs_model {
                eprintln!("model {}: loading {}", m.name, m.path.display());
            } else {
                eprintln!("model {}: every pair complete, not loaded", m.name);
            }
        });
        let model = if needs_model {
            Some(
                crate::infer::load(
                    &crate::infer::ModelSource {
                        model: m.path.clone(),
                        adapter: m.adapter.clone(),
                        dtype: opts.dtype,
                        device: opts.device.clone(),
                        quantize: opts.quantize,
                    },
                    &crate::processor::ProcessorOptions {
                        min_pixels: suite.min_pixels,
                        max_pixels: suite.max_pixels,
                        max_prompt_tokens: None,
                        medical: opts.medical.clone(),
                    },
                )
                .with_context(|| format!("model {}", m.name))?,
            )
        } else {
            None
        };
        for ((p, b), l) in row.into_iter().zip(&suite.benchmarks).zip(&loaded) {
            std::fs::create_dir_all(&p.dir)
                .map_err(|e| crate::files::io_error(&p.dir, "cannot create", e))?;
            crate::files::write_atomic(
                &p.dir.join(SETTINGS_FILE),
                serde_json::to_string_pretty(&p.settings)?.as_bytes(),
            )?;
            let items_path = p.dir.join(ITEMS_FILE);
            let todo: Vec<&VqaItem> = l
                .items
                .iter()
                .zip(&p.done)
                .filter(|(_, d)| d.is_none())
                .map(|(it, _)| it)
                .collect();
            let reused = l.items.len() - todo.len();
            pb.suspend(|| {
                eprintln!(
                    "{}: {} items: {reused} already in items.jsonl, {} to score",
                    p.label,
                    l.items.len(),
                    todo.len()
                )
            });
            let mut fresh: Vec<ItemResult> = Vec::new();
            let mut skipped = l.skipped.clone();
            if let Some(loaded_model) = &model {
                for chunk in todo.chunks(suite.batch_size) {
                    let batch: Vec<VqaItem> = chunk.iter().map(|it| (*it).clone()).collect();
                    let e = super::greedy(
                        &loaded_model.model,
                        &loaded_model.processor,
                        &batch,
                        template,
                        &b.scoring,
                        suite.max_new_tokens,
                        suite.batch_size,
                        |_, _| {},
                    )?;
                    // Results come in the batch's order, less the skipped items.
                    let mut lines = String::new();
                    let mut rest = batch.iter();
                    for r in &e.results {
                        let it = rest
                            .find(|it| it.index == r.row && it.id == r.id)
                            .context("a result matches no item of its batch")?;
                        lines.push_str(&item_line(r, it)?);
                    }
                    append_lines(&items_path, &lines)?;
                    for mut s in e.skipped {
                        s.file = b.path.display().to_string();
                        pb.suspend(|| eprintln!("skipped {s}"));
                        skipped.push(s);
                    }
                    fresh.extend(e.results);
                    pb.inc(chunk.len() as u64);
                }
            }
            // The report reads every result as items.jsonl holds it, in the items' order,
            // whichever run scored it: a resumed pair reports what an uninterrupted one does.
            let results: Vec<ItemResult> = match_done(&l.items, read_items(&items_path)?)
                .into_iter()
                .flatten()
                .collect();
            let report = Report::new(
                &results,
                &format!("{} ({})", m.name, m.path.display()),
                &b.path.display().to_string(),
                "greedy",
                template,
                &skipped,
                &l.file_rows,
                &b.scoring,
                p.settings.clone(),
            );
            pairs.push(PairReport {
                model: m.name.clone(),
                benchmark: b.name.clone(),
                reused,
                scored: fresh.len(),
                report,
            });
        }
    }
    Ok(SuiteReport::new(suite, &loaded, pairs))
}
