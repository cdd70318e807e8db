//! The JSON benchmarks: SLAKE (a JSON list per split), OmniMedVQA (a JSON list per source
//! dataset) and MedXpertQA (JSON lines per split).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

use super::{
    files_with_ext, image_file, require_folder, Answer, BenchItem, Format, Language, Out,
    MALFORMED, NOT_AMONG,
};
use crate::data::Modality;
use crate::processor::input::{read_bounded_string, MAX_DATA_FILE_BYTES};

/// The rows of a file holding a JSON list; each row a JSON value, checked by the caller.
fn read_list(path: &Path) -> Result<Vec<Value>> {
    let text = read_bounded_string(path, MAX_DATA_FILE_BYTES, "dataset")?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(rows)) => Ok(rows),
        Ok(other) => bail!(
            "{}: not a JSON list of rows (the file holds a JSON {})",
            path.display(),
            type_name(&other)
        ),
        Err(e) => bail!("{}: not valid JSON: {e}", path.display()),
    }
}

/// The rows of a JSON-lines file with their 0-based line numbers; a line that is not JSON is
/// `Err` with the reason.
fn read_lines(path: &Path) -> Result<Vec<(usize, std::result::Result<Value, String>)>> {
    let text = read_bounded_string(path, MAX_DATA_FILE_BYTES, "dataset")?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            (
                i,
                serde_json::from_str(l).map_err(|e| format!("not JSON: {e}")),
            )
        })
        .collect())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// Field access on a row object with reasons fit for a skip.
struct Row<'a>(&'a Map<String, Value>);

impl<'a> Row<'a> {
    fn of(v: &'a Value) -> std::result::Result<Self, String> {
        match v {
            Value::Object(m) => Ok(Row(m)),
            other => Err(format!(
                "the row is a JSON {}, not an object",
                type_name(other)
            )),
        }
    }

    /// A required string field.
    fn str(&self, key: &str) -> std::result::Result<&'a str, String> {
        match self.0.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(format!(
                "{key} is a JSON {}, not a string",
                type_name(other)
            )),
            None => Err(format!("no {key}")),
        }
    }

    /// An optional field as text: strings as they are, numbers written out.
    fn text(&self, key: &str) -> Option<String> {
        match self.0.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// Which JSON benchmark a `.json` file holds, from its first object row's keys.
pub(super) fn json_format(path: &Path) -> Result<Option<Format>> {
    let rows = read_list(path)?;
    let Some(first) = rows.iter().find_map(Value::as_object) else {
        return Ok(None);
    };
    Ok(
        if first.contains_key("q_lang") || first.contains_key("img_name") {
            Some(Format::Slake)
        } else if first.contains_key("gt_answer") || first.contains_key("image_path") {
            Some(Format::OmniMedVqa)
        } else {
            None
        },
    )
}

/// SLAKE's split files in `dir`: `train.json`, `validation.json` (once `validate.json`),
/// `test.json`.
pub(super) fn slake_files(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    for (name, split) in [
        ("train", "train"),
        ("validation", "validation"),
        ("validate", "validation"),
        ("test", "test"),
    ] {
        let p = dir.join(format!("{name}.json"));
        if p.is_file() && json_format(&p)? == Some(Format::Slake) {
            out.push((p, split.to_string()));
        }
    }
    Ok(out)
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("")
        .to_string()
}

/// SLAKE: `answer_type` decides closed or open, `q_lang` the language, images under `imgs/`.
pub(super) fn load_slake(path: &Path, out: &mut Out) -> Result<()> {
    let (root, files) = if path.is_dir() {
        (path.to_path_buf(), slake_files(path)?)
    } else {
        let split = match stem(path).as_str() {
            "validate" => "validation".to_string(),
            s => s.to_string(),
        };
        let root = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        (root, vec![(path.to_path_buf(), split)])
    };
    if !files.is_empty() {
        require_folder(&root, "imgs", "imgs.zip")?;
    }
    let imgs = root.join("imgs");
    for (file, split) in files {
        if !out.wants(&split) {
            continue;
        }
        for (r, v) in read_list(&file)?.iter().enumerate() {
            match slake_row(v, &imgs, &split, &file, r, out.format) {
                Ok(item) => out.items.push(item),
                Err((kind, why, modality)) => out.skip(&file, r, kind, why, &modality),
            }
        }
    }
    Ok(())
}

type RowResult = std::result::Result<BenchItem, (&'static str, String, String)>;

fn slake_row(
    v: &Value,
    imgs: &Path,
    split: &str,
    file: &Path,
    r: usize,
    format: Format,
) -> RowResult {
    let malformed = |why: String| (MALFORMED, why, String::new());
    let row = Row::of(v).map_err(malformed)?;
    let (img, question, answer, atype, lang) = (|| {
        Ok::<_, String>((
            row.str("img_name")?,
            row.str("question")?,
            row.str("answer")?,
            row.str("answer_type")?,
            row.str("q_lang")?,
        ))
    })()
    .map_err(malformed)?;
    let modality_raw = row.text("modality");
    let modality = modality_raw.as_deref().map(Modality::parse);
    let mname = modality
        .as_ref()
        .map(|m| m.name().to_string())
        .unwrap_or_default();
    let image = image_file(imgs, img).map_err(|(k, why)| (k, why, mname.clone()))?;
    let answer = answer.to_string();
    let answer = match atype {
        "CLOSED" => Answer::Closed { answer },
        "OPEN" => Answer::Open { answer },
        other => {
            return Err((
                "unknown answer type",
                format!("answer_type {other:?} is neither OPEN nor CLOSED"),
                mname,
            ))
        }
    };
    let language = match lang {
        "en" => Language::En,
        "zh" => Language::Zh,
        other => {
            return Err((
                "unknown language",
                format!("q_lang {other:?} is neither en nor zh"),
                mname,
            ))
        }
    };
    let mut extra = BTreeMap::new();
    for key in ["content_type", "location", "base_type"] {
        if let Some(v) = row.text(key) {
            extra.insert(key.to_string(), v);
        }
    }
    Ok(BenchItem {
        id: row.text("qid").unwrap_or_else(|| format!("{split}-{r}")),
        benchmark: format,
        split: split.to_string(),
        question: question.to_string(),
        images: vec![image],
        answer,
        modality,
        modality_raw,
        language,
        extra,
        file: file.display().to_string(),
        row: r,
    })
}

/// The `OmniMedVQA/` folder of `dir`: `dir` itself or its `OmniMedVQA/` child, whichever
/// holds `QA_information/`.
pub(super) fn omni_root(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("OmniMedVQA")]
        .into_iter()
        .find(|d| d.join("QA_information").is_dir())
}

/// OmniMedVQA: multiple choice over `option_A..option_D` (the present ones), `gt_answer` the
/// correct option's text. Only `Open-access` is read, as MedEvalKit does: the
/// `Restricted-access` images are not in the archive.
pub(super) fn load_omni(path: &Path, out: &mut Out) -> Result<()> {
    let (root, files) = if path.is_dir() {
        let root = omni_root(path)
            .ok_or_else(|| anyhow!("{}: no QA_information/ folder (OmniMedVQA)", path.display()))?;
        let files = files_with_ext(&root.join("QA_information").join("Open-access"), "json")?;
        (root, files)
    } else {
        // <root>/QA_information/<access>/<name>.json
        let root = path
            .ancestors()
            .nth(3)
            .unwrap_or(Path::new("."))
            .to_path_buf();
        (root, vec![path.to_path_buf()])
    };
    if files.is_empty() || !out.wants("test") {
        return Ok(());
    }
    require_folder(&root, "Images", "OmniMedVQA.zip")?;
    for file in files {
        let source = stem(&file);
        for (r, v) in read_list(&file)?.iter().enumerate() {
            match omni_row(v, &root, &source, &file, r, out.format) {
                Ok(item) => out.items.push(item),
                Err((kind, why, modality)) => out.skip(&file, r, kind, why, &modality),
            }
        }
    }
    Ok(())
}

fn omni_row(
    v: &Value,
    root: &Path,
    source: &str,
    file: &Path,
    r: usize,
    format: Format,
) -> RowResult {
    let malformed = |why: String| (MALFORMED, why, String::new());
    let row = Row::of(v).map_err(malformed)?;
    let (question, gt, image) = (|| {
        Ok::<_, String>((
            row.str("question")?,
            row.str("gt_answer")?,
            row.str("image_path")?,
        ))
    })()
    .map_err(malformed)?;
    let mut options = Vec::new();
    for l in ["A", "B", "C", "D"] {
        let key = format!("option_{l}");
        if row.0.contains_key(&key) {
            options.push(row.str(&key).map_err(malformed)?.to_string());
        }
    }
    // One record of `Chest CT Scan.json` spells the key `modality`.
    let modality_raw = row.text("modality_type").or_else(|| row.text("modality"));
    let modality = modality_raw.as_deref().map(Modality::parse);
    let mname = modality
        .as_ref()
        .map(|m| m.name().to_string())
        .unwrap_or_default();
    let image = image_file(root, image).map_err(|(k, why)| (k, why, mname.clone()))?;
    let Some(answer) = options
        .iter()
        .position(|o| o == gt)
        .or_else(|| options.iter().position(|o| o.trim() == gt.trim()))
    else {
        return Err((
            NOT_AMONG,
            format!("answer {gt:?} is not among the options"),
            mname,
        ));
    };
    let mut extra = BTreeMap::from([("dataset".to_string(), source.to_string())]);
    for key in ["question_type", "dataset"] {
        if let Some(v) = row.text(key) {
            extra.insert(key.to_string(), v);
        }
    }
    Ok(BenchItem {
        id: row
            .text("question_id")
            .unwrap_or_else(|| format!("{source}-{r}")),
        benchmark: format,
        split: "test".into(),
        question: question.to_string(),
        images: vec![image],
        answer: Answer::Choice { options, answer },
        modality,
        modality_raw,
        language: Language::En,
        extra,
        file: file.display().to_string(),
        row: r,
    })
}

/// MedXpertQA's root (the folder holding `MM/` and `images/`) and its `MM/*.jsonl` files, for
/// the root or its `MM/` folder.
pub(super) fn medxpert_files(dir: &Path) -> Result<Option<(PathBuf, Vec<PathBuf>)>> {
    let (root, mm) = if dir.file_name().is_some_and(|n| n == "MM") {
        (
            dir.parent().unwrap_or(Path::new(".")).to_path_buf(),
            dir.to_path_buf(),
        )
    } else {
        (dir.to_path_buf(), dir.join("MM"))
    };
    let files = files_with_ext(&mm, "jsonl")?;
    Ok((!files.is_empty()).then_some((root, files)))
}

/// MedXpertQA MM: five options A-E as an object, `label` the letter, several images under
/// `images/`.
pub(super) fn load_medxpert(path: &Path, out: &mut Out) -> Result<()> {
    let (root, files) = if path.is_dir() {
        match medxpert_files(path)? {
            Some(found) => found,
            None => return Ok(()),
        }
    } else {
        let parent = path.parent().unwrap_or(Path::new("."));
        let root = if parent.file_name().is_some_and(|n| n == "MM") {
            parent.parent().unwrap_or(Path::new("."))
        } else {
            parent
        };
        (root.to_path_buf(), vec![path.to_path_buf()])
    };
    require_folder(&root, "images", "images.zip")?;
    let images = root.join("images");
    for file in files {
        let split = stem(&file);
        if !out.wants(&split) {
            continue;
        }
        for (r, v) in read_lines(&file)? {
            let item = v
                .map_err(|why| (MALFORMED, why, String::new()))
                .and_then(|v| medxpert_row(&v, &images, &split, &file, r, out.format));
            match item {
                Ok(item) => out.items.push(item),
                Err((kind, why, modality)) => out.skip(&file, r, kind, why, &modality),
            }
        }
    }
    Ok(())
}

fn medxpert_row(
    v: &Value,
    images: &Path,
    split: &str,
    file: &Path,
    r: usize,
    format: Format,
) -> RowResult {
    let malformed = |why: String| (MALFORMED, why, String::new());
    let row = Row::of(v).map_err(malformed)?;
    let (id, question, label) =
        (|| Ok::<_, String>((row.str("id")?, row.str("question")?, row.str("label")?)))()
            .map_err(malformed)?;
    let Some(Value::Object(opts)) = row.0.get("options") else {
        return Err(malformed("options is not an object of letter: text".into()));
    };
    let mut opts: Vec<(&String, &Value)> = opts.iter().collect();
    opts.sort_by(|a, b| a.0.cmp(b.0));
    let mut options = Vec::with_capacity(opts.len());
    for (_, o) in &opts {
        match o {
            Value::String(s) => options.push(s.clone()),
            other => {
                return Err(malformed(format!(
                    "an option is a JSON {}",
                    type_name(other)
                )))
            }
        }
    }
    let names = match row.0.get("images") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|n| {
                n.as_str()
                    .ok_or_else(|| "images holds a non-string".to_string())
            })
            .collect::<std::result::Result<Vec<&str>, String>>()
            .map_err(malformed)?,
        None => vec![],
        Some(other) => return Err(malformed(format!("images is a JSON {}", type_name(other)))),
    };
    let mut imgs = Vec::with_capacity(names.len());
    for n in names {
        imgs.push(image_file(images, n).map_err(|(k, why)| (k, why, String::new()))?);
    }
    let Some(answer) = opts.iter().position(|(k, _)| k.as_str() == label.trim()) else {
        return Err((
            NOT_AMONG,
            format!("label {label:?} is not among the options' letters"),
            String::new(),
        ));
    };
    // The question repeats the options after "\nAnswer Choices:"; they are in `answer`.
    let question = match question.rfind("\nAnswer Choices:") {
        Some(i) => question[..i].trim_end(),
        None => question,
    };
    let mut extra = BTreeMap::new();
    for key in ["medical_task", "body_system", "question_type"] {
        if let Some(v) = row.text(key) {
            extra.insert(key.to_string(), v);
        }
    }
    Ok(BenchItem {
        id: id.to_string(),
        benchmark: format,
        split: split.to_string(),
        question: question.to_string(),
        images: imgs,
        answer: Answer::Choice { options, answer },
        modality: None,
        modality_raw: None,
        language: Language::En,
        extra,
        file: file.display().to_string(),
        row: r,
    })
}
