//! Multiple-choice medical VQA data in the MedVLM-R1 / HuatuoGPT-Vision format, and the
//! prompts built from it.
//!
//! A row is `{"image": ["rel/path.png"], "question": ..., "options": [...], "answer": <option
//! text>, "dataset": ..., "subset": <modality string>, "problem"?: ..., "solution"?: ...}`.
//! Files are a JSON list or JSON lines. Rows that cannot be used are reported with file, row
//! and reason, never silently dropped into a score.

pub mod answer;
pub mod bench;
pub mod prompt;
pub mod score;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use prompt::{PromptTemplate, RUN_INFO_FILE};

/// Option letters, as many as the paper's reward accepts.
pub const LETTERS: [char; 10] = ['A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J'];

/// One row as stored in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawRow {
    #[serde(default)]
    pub image: ImageField,
    pub question: String,
    pub options: Vec<String>,
    pub answer: String,
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub problem: Option<String>,
    #[serde(default)]
    pub solution: Option<String>,
    /// Reasoning for the answer, when the data has it (supervised targets use it).
    #[serde(default, alias = "reasoning", alias = "thinking")]
    pub rationale: Option<String>,
    /// Every other field of the row, kept for rewards outside the binary (which see them as
    /// the sample's `fields`).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// `image` is a list of paths in the paper's files; a single string is accepted too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(untagged)]
pub enum ImageField {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl ImageField {
    pub fn paths(&self) -> Vec<&str> {
        match self {
            ImageField::None => vec![],
            ImageField::One(s) => vec![s.as_str()],
            ImageField::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// The imaging modality, normalised from the many spellings in the wild; the raw string is
/// kept alongside in [`VqaItem::subset`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Modality {
    Mri,
    Ct,
    XRay,
    Oct,
    Ultrasound,
    Dermoscopy,
    Fundus,
    Microscopy,
    Other(String),
}

impl Modality {
    /// Normalises e.g. "MR (Mag-netic Resonance Imaging)" to MRI, "CT(Computed Tomography)"
    /// to CT, "OCT (Optical Coherence Tomography" to OCT.
    pub fn parse(raw: &str) -> Self {
        let l = raw.to_lowercase();
        let compact: String = l.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        let starts = |p: &str| compact.starts_with(p);
        if starts("oct") || l.contains("optical coherence") {
            Modality::Oct
        } else if starts("mri") || starts("mr") || l.contains("magnetic") || l.contains("mag-netic")
        {
            Modality::Mri
        } else if starts("ct") || l.contains("computed tomography") {
            Modality::Ct
        } else if starts("xray") || starts("cxr") || l.contains("radiograph") {
            Modality::XRay
        } else if l.contains("ultrasound") || starts("us") || l.contains("sonograph") {
            Modality::Ultrasound
        } else if l.contains("dermoscop") || l.contains("dermatoscop") {
            Modality::Dermoscopy
        } else if l.contains("fundus") {
            Modality::Fundus
        } else if l.contains("microscop") || l.contains("patholog") || l.contains("histolog") {
            Modality::Microscopy
        } else {
            Modality::Other(raw.trim().to_string())
        }
    }

    /// Short name used in reports and on the command line.
    pub fn name(&self) -> &str {
        match self {
            Modality::Mri => "MRI",
            Modality::Ct => "CT",
            Modality::XRay => "X-Ray",
            Modality::Oct => "OCT",
            Modality::Ultrasound => "Ultrasound",
            Modality::Dermoscopy => "Dermoscopy",
            Modality::Fundus => "Fundus",
            Modality::Microscopy => "Microscopy",
            Modality::Other(s) => s,
        }
    }
}

impl std::fmt::Display for Modality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The language of a question. SLAKE has English and Chinese rows (`q_lang`); the others
/// are English.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    #[default]
    En,
    Zh,
}

impl std::str::FromStr for Language {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "en" | "english" => Ok(Language::En),
            "zh" | "chinese" => Ok(Language::Zh),
            _ => bail!("unknown language {s:?}; en or zh"),
        }
    }
}

impl Language {
    /// `en` or `zh`.
    pub fn code(self) -> &'static str {
        match self {
            Language::En => "en",
            Language::Zh => "zh",
        }
    }
}

/// An image of a row: a file that exists, or bytes embedded in a parquet file.
#[derive(Clone, PartialEq)]
pub enum ImageRef {
    Path(PathBuf),
    /// The `datasets` Image struct's `bytes`, with its `path` (a file name only, often null).
    Bytes {
        bytes: Arc<[u8]>,
        name: Option<String>,
    },
}

impl std::fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Path(p) => write!(f, "Path({})", p.display()),
            ImageRef::Bytes { bytes, name } => {
                write!(f, "Bytes({} bytes, name {name:?})", bytes.len())
            }
        }
    }
}

/// What kind of answer a question has, and the answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Answer {
    /// Multiple choice: the options' texts (prefixes such as PMC-VQA's `A:` removed) and the
    /// index of the correct one.
    Choice { options: Vec<String>, answer: usize },
    /// Closed-ended: VQA-RAD and PathVQA answers that are yes or no
    /// (`answer.lower().strip() in ["yes", "no"]`, as the harnesses decide), SLAKE rows with
    /// `answer_type` `CLOSED` (which include words such as `Lung` and Chinese answers).
    Closed { answer: String },
    /// Open-ended: the gold answer as the file has it.
    Open { answer: String },
}

impl Answer {
    /// The correct option's letter (multiple choice only).
    pub fn letter(&self) -> Option<char> {
        match self {
            Answer::Choice { answer, .. } => LETTERS.get(*answer).copied(),
            _ => None,
        }
    }

    /// The options of a multiple-choice question; none for the others.
    pub fn options(&self) -> &[String] {
        match self {
            Answer::Choice { options, .. } => options,
            _ => &[],
        }
    }

    /// The gold answer as text: the correct option's text, or the closed/open answer.
    pub fn text(&self) -> &str {
        match self {
            Answer::Choice { options, answer } => options.get(*answer).map_or("", String::as_str),
            Answer::Closed { answer } | Answer::Open { answer } => answer,
        }
    }

    /// `choice`, `closed` or `open`.
    pub fn kind(&self) -> &'static str {
        match self {
            Answer::Choice { .. } => "choice",
            Answer::Closed { .. } => "closed",
            Answer::Open { .. } => "open",
        }
    }
}

impl ImageRef {
    /// How reports name the image: its path, or the embedded image's name.
    pub fn label(&self) -> String {
        match self {
            ImageRef::Path(p) => p.display().to_string(),
            ImageRef::Bytes { name, bytes } => match name {
                Some(n) => format!("(embedded) {n}"),
                None => format!("(embedded, {} bytes)", bytes.len()),
            },
        }
    }
}

impl Serialize for ImageRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.label())
    }
}

/// A usable item: images resolved (files that exist, or bytes embedded in the data), the
/// kind of answer and the answer known. MedVLM-R1's rows are multiple choice; benchmarks
/// ([`bench`]) add closed and open questions, text-only rows and rows with several images.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VqaItem {
    /// Row index in the file (0-based).
    pub index: usize,
    /// The benchmark's id of the row, else its index.
    pub id: String,
    pub images: Vec<ImageRef>,
    pub question: String,
    pub answer: Answer,
    pub modality: Modality,
    /// The raw modality string of the file.
    pub subset: String,
    pub dataset: String,
    pub language: Language,
    /// Multiple choice: the question followed by `A) option` lines, what the prompt
    /// templates wrap; otherwise the question.
    pub problem: String,
    pub rationale: Option<String>,
    /// The row's fields beyond those above (JSON data files), for external rewards.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl VqaItem {
    /// The options of a multiple-choice item (none for closed and open questions).
    pub fn options(&self) -> &[String] {
        self.answer.options()
    }

    /// The correct letter of a multiple-choice item.
    pub fn letter(&self) -> Option<char> {
        self.answer.letter()
    }
}

/// A row that was not used, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skipped {
    pub file: String,
    pub row: usize,
    pub reason: String,
    /// The row's modality (normalised name), so reports count skipped rows per modality.
    pub modality: String,
    /// The reason's kind, for counting: "missing image", "answer not among the options",
    /// "no options", "too many options", "no image"; the benchmark loaders ([`bench`]) add
    /// "no answer", "malformed row" (wrong JSON types, short CSV rows), "bad options" (MMMU
    /// options that are no Python list of strings), "unknown answer type" and "unknown
    /// language" (SLAKE).
    pub kind: &'static str,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: row {}: {}", self.file, self.row, self.reason)
    }
}

/// A loaded dataset: usable items plus the rows that were skipped.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub items: Vec<VqaItem>,
    pub skipped: Vec<Skipped>,
}

/// `question` + "\n" + "A) first option" lines joined by newlines: how the paper builds
/// `problem` from a row.
pub fn build_problem(question: &str, options: &[String]) -> String {
    let mut s = question.to_string();
    for (l, o) in LETTERS.iter().zip(options) {
        s.push_str(&format!("\n{l}) {o}"));
    }
    s
}

/// Reads the rows of a JSON list or JSON-lines file.
/// The file must be a regular file of at most
/// [`MAX_DATA_FILE_BYTES`](crate::processor::input::MAX_DATA_FILE_BYTES).
pub fn read_rows(path: &Path) -> Result<Vec<RawRow>> {
    use crate::processor::input::{read_bounded_string, MAX_DATA_FILE_BYTES};
    let text = read_bounded_string(path, MAX_DATA_FILE_BYTES, "dataset")?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let values: Vec<serde_json::Value> = serde_json::from_str(trimmed)
            .with_context(|| format!("{}: not a valid JSON list", path.display()))?;
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                serde_json::from_value(v)
                    .with_context(|| format!("{}: row {i}: not a VQA row", path.display()))
            })
            .collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("{}: line {}: not a VQA row", path.display(), i + 1))
            })
            .collect()
    }
}

/// Loads a dataset, resolving image paths against `image_root` (default: the file's
/// directory). Rows with a missing image or an answer that is not among the options are
/// skipped and reported.
pub fn load(path: &Path, image_root: Option<&Path>) -> Result<Dataset> {
    load_with(path, image_root, true)
}

/// Like [`load`], optionally without checking that image files exist (to inspect a file's
/// questions when its images are elsewhere).
pub fn load_with(path: &Path, image_root: Option<&Path>, check_images: bool) -> Result<Dataset> {
    let rows = read_rows(path)?;
    let root = match image_root {
        Some(r) => r.to_path_buf(),
        None => path.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let file = path.display().to_string();
    let mut items = Vec::with_capacity(rows.len());
    let mut skipped = Vec::new();
    for (i, row) in rows.into_iter().enumerate() {
        let modality = Modality::parse(row.subset.as_deref().unwrap_or_default())
            .name()
            .to_string();
        match resolve(i, row, &root, check_images) {
            Ok(item) => items.push(item),
            Err(reason) => skipped.push(Skipped {
                file: file.clone(),
                row: i,
                kind: skip_kind(&reason),
                reason,
                modality,
            }),
        }
    }
    Ok(Dataset { items, skipped })
}

/// The category of a reason `resolve` gives.
fn skip_kind(reason: &str) -> &'static str {
    if reason.starts_with("image ") && reason.ends_with("not found") {
        "missing image"
    } else if reason.starts_with("answer ") {
        "answer not among the options"
    } else if reason == "no options" {
        "no options"
    } else if reason == "no image" {
        "no image"
    } else {
        "too many options"
    }
}

fn resolve(
    index: usize,
    row: RawRow,
    root: &Path,
    check_images: bool,
) -> std::result::Result<VqaItem, String> {
    if row.options.is_empty() {
        return Err("no options".into());
    }
    if row.options.len() > LETTERS.len() {
        return Err(format!(
            "{} options; at most {} are supported",
            row.options.len(),
            LETTERS.len()
        ));
    }
    let Some(pos) = row
        .options
        .iter()
        .position(|o| o.trim() == row.answer.trim())
    else {
        return Err(format!("answer {:?} is not among the options", row.answer));
    };
    let paths = row.image.paths();
    if paths.is_empty() {
        return Err("no image".into());
    }
    let mut images = Vec::with_capacity(paths.len());
    for p in paths {
        let full = if Path::new(p).is_absolute() {
            PathBuf::from(p)
        } else {
            root.join(p)
        };
        if check_images && !full.is_file() {
            return Err(format!("image {} not found", full.display()));
        }
        images.push(full);
    }
    let problem = build_problem(&row.question, &row.options);
    let subset = row.subset.unwrap_or_default();
    Ok(VqaItem {
        index,
        id: index.to_string(),
        images: images.into_iter().map(ImageRef::Path).collect(),
        modality: Modality::parse(&subset),
        subset,
        dataset: row.dataset.unwrap_or_default(),
        question: row.question,
        answer: Answer::Choice {
            options: row.options,
            answer: pos,
        },
        language: Language::En,
        problem,
        rationale: row.rationale,
        extra: row.extra,
    })
}

/// The layout of a data file or folder: MedVLM-R1's JSON, or a benchmark as downloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    MedVlm,
    Bench(bench::Format),
}

impl std::str::FromStr for DataFormat {
    type Err = anyhow::Error;

    /// `medvlm` (MedVLM-R1 / HuatuoGPT-Vision JSON) or a benchmark's name (`slake`, ...).
    fn from_str(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("medvlm") || s.eq_ignore_ascii_case("medvlm-r1") {
            return Ok(DataFormat::MedVlm);
        }
        s.parse::<bench::Format>()
            .map(DataFormat::Bench)
            .map_err(|e| anyhow::anyhow!("{e}, or medvlm (the MedVLM-R1 JSON)"))
    }
}

/// What [`load_data`] reads.
#[derive(Debug, Clone, Default)]
pub struct DataOptions {
    /// Found from what is there when `None`: a folder is a benchmark, a file a benchmark's
    /// when its content says so, else MedVLM-R1's JSON.
    pub format: Option<DataFormat>,
    /// MedVLM-R1's JSON: the folder image paths are relative to (default: the file's).
    pub image_root: Option<PathBuf>,
    /// Benchmarks: the splits to read (all when empty).
    pub splits: Vec<String>,
    /// Benchmarks: the questions of this language only (SLAKE's `q_lang`).
    pub language: Option<Language>,
}

/// The format [`load_data`] reads `path` in when none is given: a folder is a benchmark, a
/// file a benchmark's when its content says so, else MedVLM-R1's JSON.
pub fn detect_format(path: &Path) -> Result<DataFormat> {
    if path.is_dir() {
        return Ok(DataFormat::Bench(bench::detect(path)?));
    }
    Ok(bench::detect(path)
        .map(DataFormat::Bench)
        .unwrap_or(DataFormat::MedVlm))
}

/// Loads any data medvlm reads, MedVLM-R1's JSON or a benchmark, as items and skipped rows.
/// Returns the format read.
pub fn load_data(path: &Path, opts: &DataOptions) -> Result<(Dataset, DataFormat)> {
    let format = match opts.format {
        Some(f) => f,
        None => detect_format(path)?,
    };
    let medvlm_only = |what: &str, set: bool| -> Result<()> {
        if set {
            bail!(
                "{what} applies to benchmarks; {} is MedVLM-R1 data",
                path.display()
            );
        }
        Ok(())
    };
    match format {
        DataFormat::MedVlm => {
            medvlm_only("--split", !opts.splits.is_empty())?;
            medvlm_only("--language", opts.language.is_some())?;
            Ok((load(path, opts.image_root.as_deref())?, format))
        }
        DataFormat::Bench(f) => {
            if opts.image_root.is_some() {
                bail!(
                    "--image-root applies to MedVLM-R1 data; a benchmark's images are found \
                     in its own folder"
                );
            }
            let mut set = bench::load(
                path,
                &bench::LoadOptions {
                    format: Some(f),
                    splits: opts.splits.clone(),
                },
            )?;
            if let Some(lang) = opts.language {
                set.retain_language(lang);
            }
            let items = set
                .items
                .into_iter()
                .map(bench::BenchItem::into_item)
                .collect();
            // Skipped rows are counted by modality as the items are.
            let skipped = set
                .skipped
                .into_iter()
                .map(|mut s| {
                    if s.modality.is_empty() {
                        s.modality = bench::UNSPECIFIED.into();
                    }
                    s
                })
                .collect();
            Ok((Dataset { items, skipped }, format))
        }
    }
}

/// Keeps items whose modality is in `keep` (by short name, case-insensitive).
pub fn filter_modalities(items: Vec<VqaItem>, keep: &[String]) -> Vec<VqaItem> {
    if keep.is_empty() {
        return items;
    }
    items
        .into_iter()
        .filter(|it| {
            keep.iter()
                .any(|k| k.eq_ignore_ascii_case(it.modality.name()))
        })
        .collect()
}

/// A deterministic split: items shuffled by `seed`, the first `test_fraction` of them the
/// test part. Stratified by modality, so each modality keeps the same proportion.
pub fn split(items: Vec<VqaItem>, test_fraction: f64, seed: u64) -> (Vec<VqaItem>, Vec<VqaItem>) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut by_mod: std::collections::BTreeMap<Modality, Vec<VqaItem>> = Default::default();
    for it in items {
        by_mod.entry(it.modality.clone()).or_default().push(it);
    }
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (m, mut group) in by_mod {
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            seed ^ m
                .name()
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)),
        );
        group.shuffle(&mut rng);
        let n_test = ((group.len() as f64) * test_fraction).round() as usize;
        let rest = group.split_off(n_test.min(group.len()));
        test.extend(group);
        train.extend(rest);
    }
    train.sort_by_key(|it| it.index);
    test.sort_by_key(|it| it.index);
    (train, test)
}

/// Fails with the first skipped rows when a dataset has no usable item at all.
pub fn require_items(ds: &Dataset, path: &Path) -> Result<()> {
    if ds.items.is_empty() {
        let why: Vec<String> = ds.skipped.iter().take(3).map(|s| s.to_string()).collect();
        bail!(
            "{}: no usable rows ({} skipped{}{})",
            path.display(),
            ds.skipped.len(),
            if why.is_empty() { "" } else { ": " },
            why.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_files_must_be_regular_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = read_rows(dir.path()).expect_err("a directory");
        assert!(
            err.to_string()
                .contains("is a directory, not a regular dataset file"),
            "{err}"
        );
        #[cfg(target_os = "linux")]
        for (path, why) in [
            ("/dev/zero", "is a character device"),
            ("/proc/self/environ", "holds more than the 0 bytes"),
        ] {
            let err = read_rows(Path::new(path)).expect_err(path);
            assert!(
                err.to_string().starts_with(path) && err.to_string().contains(why),
                "{err}"
            );
        }
        let rows = dir.path().join("rows.jsonl");
        std::fs::write(
            &rows,
            "{\"question\": \"q\", \"options\": [\"a\"], \"answer\": \"a\"}\n",
        )
        .expect("write");
        assert_eq!(read_rows(&rows).expect("rows").len(), 1);
    }

    #[test]
    fn modality_spellings() {
        assert_eq!(
            Modality::parse("MR (Mag-netic Resonance Imaging)"),
            Modality::Mri
        );
        assert_eq!(Modality::parse("CT(Computed Tomography)"), Modality::Ct);
        assert_eq!(Modality::parse("X-Ray"), Modality::XRay);
        assert_eq!(
            Modality::parse("OCT (Optical Coherence Tomography"),
            Modality::Oct
        );
        assert_eq!(Modality::parse("Ultrasound"), Modality::Ultrasound);
        assert_eq!(Modality::parse("Dermoscopy"), Modality::Dermoscopy);
        assert_eq!(Modality::parse("Fundus Photography"), Modality::Fundus);
        assert_eq!(Modality::parse("Microscopy Images"), Modality::Microscopy);
        assert_eq!(
            Modality::parse("Thermal"),
            Modality::Other("Thermal".into())
        );
    }

    #[test]
    fn split_is_deterministic_and_stratified() {
        let item = |i: usize, m: &str| VqaItem {
            index: i,
            id: i.to_string(),
            images: vec![],
            question: String::new(),
            answer: Answer::Choice {
                options: vec!["x".into()],
                answer: 0,
            },
            language: Language::En,
            modality: Modality::parse(m),
            subset: m.into(),
            dataset: String::new(),
            problem: String::new(),
            rationale: None,
            extra: Default::default(),
        };
        let items: Vec<VqaItem> = (0..40)
            .map(|i| item(i, if i % 4 == 0 { "CT" } else { "MRI" }))
            .collect();
        let (tr, te) = split(items.clone(), 0.2, 1);
        let (tr2, te2) = split(items, 0.2, 1);
        assert_eq!((tr.len(), te.len()), (32, 8));
        assert_eq!(te.iter().filter(|i| i.modality == Modality::Ct).count(), 2);
        assert_eq!(te, te2);
        assert_eq!(tr, tr2);
    }

    #[test]
    fn problem_is_question_then_lettered_options() {
        let p = build_problem("Q?", &["x".into(), "y".into()]);
        assert_eq!(p, "Q?\nA) x\nB) y");
    }
}
