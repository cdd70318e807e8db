//! Medical VQA benchmarks in the layout users download them: VQA-RAD and PathVQA (Hugging
//! Face parquet), SLAKE (`test.json` + `imgs/`), PMC-VQA (CSV + `images/` or `figures/`),
//! OmniMedVQA (`QA_information/Open-access/*.json` + `Images/`), MMMU Health & Medicine
//! (per-subject parquet) and MedXpertQA MM (`MM/test.jsonl` + `images/`).
//!
//! [`load`] takes the folder as downloaded (or one of its files), finds the [`Format`] from
//! what is there ([`detect`]) unless told, and gives [`BenchItem`]s: one row type for all of
//! them, with multiple choice, closed (yes/no or SLAKE's `CLOSED`) and open answers, any
//! number of images (none for text-only rows), as files or as bytes embedded in parquet.
//! Every row that cannot be used is a [`Skipped`] with file, row, reason and kind, never
//! silently dropped. Every file is read within bounds
//! ([`read_bounded`](crate::processor::input::read_bounded)).
//!
//! The layouts, field names and counts are those of the releases as downloaded (the
//! Hugging Face dataset cards and the harnesses that read them: MedEvalKit, lmms-eval,
//! evalscope, MedVLThinker); `tools/make_bench_fixtures.py` writes small copies of each.

mod hf;
mod json;
mod parquet;
mod pmc;
mod pylist;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

pub use hf::HEALTH_AND_MEDICINE;

pub use super::{Answer, ImageRef, Language};
use super::{Modality, Skipped};
use crate::processor::input::is_regular_file;

/// A benchmark's layout; [`detect`] finds it, a `--format` flag can name it
/// ([`Format::name`], parsed by `str::parse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// `flaviagiammarino/vqa-rad`: `data/{train,test}-*.parquet`, columns image, question,
    /// answer.
    VqaRad,
    /// `flaviagiammarino/path-vqa`: as VQA-RAD, with a validation split.
    PathVqa,
    /// `BoKelvin/SLAKE`: `{train,validation,test}.json` and `imgs/` (unzipped `imgs.zip`).
    Slake,
    /// `xmcmic/PMC-VQA`: `test_clean.csv` / `test.csv` with `images/`, or `test_2.csv` with
    /// `figures/`.
    PmcVqa,
    /// `OmniMedVQA/`: `QA_information/Open-access/*.json` and `Images/`.
    OmniMedVqa,
    /// `MMMU/MMMU`: `<Subject>/{dev,validation,test}-*.parquet`; from the root, the five
    /// Health & Medicine subjects.
    Mmmu,
    /// `TsinghuaC3I/MedXpertQA`: `MM/{dev,test}.jsonl` and `images/` (unzipped `images.zip`).
    MedXpertQa,
}

impl Format {
    pub const ALL: [Format; 7] = [
        Format::VqaRad,
        Format::PathVqa,
        Format::Slake,
        Format::PmcVqa,
        Format::OmniMedVqa,
        Format::Mmmu,
        Format::MedXpertQa,
    ];

    /// The command-line name: `vqa-rad`, `path-vqa`, `slake`, `pmc-vqa`, `omnimedvqa`,
    /// `mmmu`, `medxpertqa`.
    pub fn name(self) -> &'static str {
        match self {
            Format::VqaRad => "vqa-rad",
            Format::PathVqa => "path-vqa",
            Format::Slake => "slake",
            Format::PmcVqa => "pmc-vqa",
            Format::OmniMedVqa => "omnimedvqa",
            Format::Mmmu => "mmmu",
            Format::MedXpertQa => "medxpertqa",
        }
    }

    /// The benchmark's own spelling, for reports: `VQA-RAD`, `PathVQA`, ...
    pub fn title(self) -> &'static str {
        match self {
            Format::VqaRad => "VQA-RAD",
            Format::PathVqa => "PathVQA",
            Format::Slake => "SLAKE",
            Format::PmcVqa => "PMC-VQA",
            Format::OmniMedVqa => "OmniMedVQA",
            Format::Mmmu => "MMMU",
            Format::MedXpertQa => "MedXpertQA",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let key: String = s
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
            .to_ascii_lowercase();
        Format::ALL
            .into_iter()
            .find(|f| f.name().replace('-', "") == key)
            .ok_or_else(|| {
                let names: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
                anyhow!(
                    "unknown benchmark format {s:?}; known: {}",
                    names.join(", ")
                )
            })
    }
}

/// One benchmark question.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchItem {
    /// The benchmark's own id where it has one (SLAKE `qid`, MMMU `id`, MedXpertQA `id`,
    /// OmniMedVQA `question_id`), else `<split>-<n>` (n counts rows over the split's files).
    pub id: String,
    pub benchmark: Format,
    /// From the file name: `test`, `validation`, `test_clean`, `test_2`, ...; OmniMedVQA,
    /// which has no splits, is `test`.
    pub split: String,
    /// The question as the file has it. MMMU keeps its `<image N>` placeholders (image N is
    /// `images[N-1]`); MedXpertQA's trailing `Answer Choices: (A) ...` block is cut off, the
    /// options being in [`Answer::Choice`].
    pub question: String,
    /// In the file's order; empty for a text-only row.
    pub images: Vec<ImageRef>,
    pub answer: Answer,
    /// Normalised from [`BenchItem::modality_raw`] where the benchmark names one (SLAKE,
    /// OmniMedVQA).
    pub modality: Option<Modality>,
    pub modality_raw: Option<String>,
    pub language: Language,
    /// Other fields worth reporting by: SLAKE `content_type`, `location`, `base_type`;
    /// OmniMedVQA `question_type`, `dataset`; MMMU `subject`, `question_type`, `subfield`,
    /// `topic_difficulty`, `img_type`; MedXpertQA `medical_task`, `body_system`,
    /// `question_type`; PMC-VQA `caption`.
    pub extra: BTreeMap<String, String>,
    /// The file the row came from and its 0-based row (data row for CSV, line for JSON lines).
    pub file: String,
    pub row: usize,
}

impl BenchItem {
    /// The item evaluation, training and `ask` take: the same question, images and answer;
    /// the modality (`unspecified` where the benchmark names none), the benchmark as the
    /// dataset, and for multiple choice the lettered problem the templates wrap.
    pub fn into_item(self) -> super::VqaItem {
        let problem = match &self.answer {
            Answer::Choice { options, .. } => super::build_problem(&self.question, options),
            _ => self.question.clone(),
        };
        super::VqaItem {
            index: self.row,
            id: self.id,
            images: self.images,
            modality: self
                .modality
                .unwrap_or_else(|| Modality::Other(UNSPECIFIED.into())),
            subset: self.modality_raw.unwrap_or_default(),
            dataset: self.benchmark.title().to_string(),
            question: self.question,
            answer: self.answer,
            language: self.language,
            problem,
            rationale: None,
            extra: Default::default(),
        }
    }
}

/// The modality of items whose benchmark names none.
pub const UNSPECIFIED: &str = "unspecified";

/// A loaded benchmark: the usable questions and the rows that were skipped.
#[derive(Debug, Clone)]
pub struct BenchSet {
    pub format: Format,
    pub items: Vec<BenchItem>,
    pub skipped: Vec<Skipped>,
}

impl BenchSet {
    /// Keeps the items in `language` (SLAKE's `q_lang` filter); returns how many were removed.
    pub fn retain_language(&mut self, language: Language) -> usize {
        let before = self.items.len();
        self.items.retain(|it| it.language == language);
        before - self.items.len()
    }

    /// The splits of the items, sorted.
    pub fn splits(&self) -> Vec<&str> {
        let mut s: Vec<&str> = self.items.iter().map(|i| i.split.as_str()).collect();
        s.sort_unstable();
        s.dedup();
        s
    }
}

/// What to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The layout; found by [`detect`] when `None`.
    pub format: Option<Format>,
    /// Splits to read (file names decide a row's split); empty reads all there are. Files of
    /// other splits are not opened.
    pub splits: Vec<String>,
}

/// Loads the benchmark at `path`: its folder as downloaded, or one of its files.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<BenchSet> {
    let format = match opts.format {
        Some(f) => f,
        None => detect(path)?,
    };
    let mut out = Out::new(format, &opts.splits);
    match format {
        Format::VqaRad | Format::PathVqa => hf::load_yes_no(path, &mut out)?,
        Format::Mmmu => hf::load_mmmu(path, &mut out)?,
        Format::Slake => json::load_slake(path, &mut out)?,
        Format::OmniMedVqa => json::load_omni(path, &mut out)?,
        Format::MedXpertQa => json::load_medxpert(path, &mut out)?,
        Format::PmcVqa => pmc::load(path, &mut out)?,
    }
    out.finish(path)
}

/// What each format is found by, for the error when none is.
const LOOKED_FOR: &str = "looked for VQA-RAD / PathVQA / MMMU parquet files (data/*.parquet, \
    <Subject>/*.parquet), SLAKE's test.json, PMC-VQA's CSV with a Figure_path column, \
    OmniMedVQA's QA_information/Open-access/*.json, MedXpertQA's MM/test.jsonl";

/// Finds the benchmark format of a folder or file from what is there: file names, a JSON
/// row's keys, a CSV header, a parquet file's columns (its footer only). VQA-RAD and PathVQA
/// share one schema: the path tells them apart (`vqa-rad`, `path-vqa` and spellings without
/// the dash), else a `validation` split, which only PathVQA has; failing both, the error
/// asks for the format.
pub fn detect(path: &Path) -> Result<Format> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!("{}: no such file or folder", path.display()),
        _ => anyhow!("{}: cannot read: {e}", path.display()),
    })?;
    let found = if meta.is_dir() {
        detect_dir(path)?
    } else if meta.is_file() {
        detect_file(path)?
    } else {
        bail!("{}: not a file or folder", path.display());
    };
    found.ok_or_else(|| {
        anyhow!(
            "{}: not a medical VQA benchmark medvlm knows: {LOOKED_FOR}",
            path.display()
        )
    })
}

fn ext(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

fn detect_file(path: &Path) -> Result<Option<Format>> {
    Ok(match ext(path).as_str() {
        "parquet" => Some(hf::parquet_format(path, &[path.to_path_buf()])?),
        "csv" => pmc::is_pmc_csv(path)?.then_some(Format::PmcVqa),
        "jsonl" => Some(Format::MedXpertQa),
        "json" => json::json_format(path)?,
        _ => None,
    })
}

fn detect_dir(dir: &Path) -> Result<Option<Format>> {
    if json::omni_root(dir).is_some() {
        return Ok(Some(Format::OmniMedVqa));
    }
    if json::medxpert_files(dir)?.is_some() {
        return Ok(Some(Format::MedXpertQa));
    }
    if !json::slake_files(dir)?.is_empty() {
        return Ok(Some(Format::Slake));
    }
    if !pmc::csv_files(dir)?.is_empty() {
        return Ok(Some(Format::PmcVqa));
    }
    let files = hf::parquet_files(dir)?;
    if let Some(first) = files.first() {
        let files: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
        return Ok(Some(hf::parquet_format(first.0.as_path(), &files)?));
    }
    Ok(None)
}

/// The files of a folder with extension `ext` (lowercase), sorted; none when it is no folder.
fn files_with_ext(dir: &Path, ext_want: &str) -> Result<Vec<PathBuf>> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(vec![]);
    };
    let mut out = Vec::new();
    for e in rd {
        let p = e
            .map_err(|e| anyhow!("{}: cannot list: {e}", dir.display()))?
            .path();
        if ext(&p) == ext_want && p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Loading state: the items and skips so far, the split filter.
struct Out {
    format: Format,
    splits: Vec<String>,
    /// Splits seen in file names, wanted or not (for the error when none is wanted).
    seen: Vec<String>,
    items: Vec<BenchItem>,
    skipped: Vec<Skipped>,
}

impl Out {
    fn new(format: Format, splits: &[String]) -> Self {
        Out {
            format,
            splits: splits.to_vec(),
            seen: Vec::new(),
            items: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// Whether files of `split` are to be read.
    fn wants(&mut self, split: &str) -> bool {
        if !self.seen.iter().any(|s| s == split) {
            self.seen.push(split.to_string());
        }
        self.splits.is_empty() || self.splits.iter().any(|s| s == split)
    }

    fn skip(
        &mut self,
        file: &Path,
        row: usize,
        kind: &'static str,
        reason: String,
        modality: &str,
    ) {
        self.skipped.push(Skipped {
            file: file.display().to_string(),
            row,
            reason,
            modality: modality.to_string(),
            kind,
        });
    }

    fn finish(self, path: &Path) -> Result<BenchSet> {
        if self.seen.is_empty() {
            bail!(
                "{}: no {} files found ({LOOKED_FOR})",
                path.display(),
                self.format.title()
            );
        }
        if !self.splits.is_empty() && !self.seen.iter().any(|s| self.splits.contains(s)) {
            bail!(
                "{}: no split {} (its splits: {})",
                path.display(),
                self.splits.join(", "),
                self.seen.join(", ")
            );
        }
        Ok(BenchSet {
            format: self.format,
            items: self.items,
            skipped: self.skipped,
        })
    }
}

/// Skip kinds beyond those of [`super::load`] (see [`Skipped::kind`]).
const MISSING_IMAGE: &str = "missing image";
const NO_IMAGE: &str = "no image";
const NOT_AMONG: &str = "answer not among the options";
const NO_ANSWER: &str = "no answer";
const MALFORMED: &str = "malformed row";

/// `root/rel` when it is a regular file; the skip reason otherwise.
fn image_file(root: &Path, rel: &str) -> std::result::Result<ImageRef, (&'static str, String)> {
    let full = root.join(rel);
    match is_regular_file(&full, "image") {
        Ok(true) => Ok(ImageRef::Path(full)),
        Ok(false) => Err((MISSING_IMAGE, format!("image {} not found", full.display()))),
        Err(e) => Err((MISSING_IMAGE, e.to_string())),
    }
}

/// The option index of a letter `A`, `B`, ... among `n` options.
fn letter_index(letter: &str, n: usize) -> Option<usize> {
    let l = letter.trim();
    let mut cs = l.chars();
    let (Some(c), None) = (cs.next(), cs.next()) else {
        return None;
    };
    let i = (c.to_ascii_uppercase() as usize).checked_sub('A' as usize)?;
    (i < n).then_some(i)
}

/// Where a folder's zip has not been unpacked yet, the error that says so.
fn require_folder(root: &Path, folder: &str, zip: &str) -> Result<()> {
    if root.join(folder).is_dir() {
        return Ok(());
    }
    if root.join(zip).is_file() {
        bail!(
            "{}: the images are still in {zip}; unzip it there (giving {folder}/)",
            root.display()
        );
    }
    bail!(
        "{}: no {folder}/ folder with the images (unzip {zip} there)",
        root.display()
    )
}
