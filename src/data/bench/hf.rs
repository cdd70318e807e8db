//! The Hugging Face parquet benchmarks: VQA-RAD and PathVQA (`image`, `question`, `answer`)
//! and MMMU (`id`, `question`, `options`, `answer`, `image_1..image_7`, ...).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::parquet::{self, Cell};
use super::pylist::parse_str_list;
use super::{
    files_with_ext, image_file, letter_index, Answer, BenchItem, Format, ImageRef, Language, Out,
    MALFORMED, NOT_AMONG, NO_ANSWER, NO_IMAGE,
};

/// MMMU's Health & Medicine subjects (MMMU `eval/data_utils.py::DOMAIN_CAT2SUB_CAT`).
pub const HEALTH_AND_MEDICINE: [&str; 5] = [
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
];

/// A parquet file's split from its name: `test-00000-of-00003-e9ad....parquet` and
/// `test-00000-of-00001.parquet` are `test`; the converted layout's `test/0000.parquet` takes
/// its folder's name; any other name is its own split.
fn split_of(path: &Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let parts: Vec<&str> = stem.split('-').collect();
    if let Some(i) = parts.iter().position(|p| *p == "of") {
        if i >= 2 && parts[i - 1].bytes().all(|b| b.is_ascii_digit()) {
            return parts[..i - 1].join("-");
        }
    }
    if !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit()) {
        if let Some(dir) = path
            .parent()
            .and_then(|d| d.file_name())
            .and_then(|d| d.to_str())
        {
            return dir.to_string();
        }
    }
    stem.to_string()
}

/// The parquet files of a downloaded folder with their splits: `*.parquet`, `data/*.parquet`,
/// or one folder down (`<split>/0000.parquet`, `<Subject>/*.parquet`).
pub(super) fn parquet_files(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut files = files_with_ext(dir, "parquet")?;
    if files.is_empty() {
        files = files_with_ext(&dir.join("data"), "parquet")?;
    }
    if files.is_empty() {
        let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        subdirs.retain(|p| p.is_dir());
        subdirs.sort();
        for d in subdirs {
            files.extend(files_with_ext(&d, "parquet")?);
        }
    }
    Ok(files
        .into_iter()
        .map(|f| {
            let s = split_of(&f);
            (f, s)
        })
        .collect())
}

/// Which parquet benchmark `first` (one of `files`) belongs to, from its columns.
pub(super) fn parquet_format(first: &Path, files: &[PathBuf]) -> Result<Format> {
    let cols = parquet::column_names(first)?;
    let has = |c: &str| cols.iter().any(|n| n == c);
    if has("options") && has("image_1") {
        return Ok(Format::Mmmu);
    }
    if has("image") && has("question") && has("answer") {
        let full = std::fs::canonicalize(first).unwrap_or_else(|_| first.to_path_buf());
        let name: String = full
            .to_string_lossy()
            .to_ascii_lowercase()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        let path_vqa = name.contains("pathvqa");
        let vqa_rad = name.contains("vqarad");
        if path_vqa != vqa_rad {
            return Ok(if path_vqa {
                Format::PathVqa
            } else {
                Format::VqaRad
            });
        }
        if files.iter().any(|f| split_of(f) == "validation") {
            return Ok(Format::PathVqa);
        }
        bail!(
            "{}: image/question/answer parquet is VQA-RAD or PathVQA, and neither the path nor \
             the splits tell which; name it (--format vqa-rad or --format path-vqa)",
            first.display()
        );
    }
    bail!(
        "{}: a parquet file with columns {}, which is none of VQA-RAD / PathVQA (image, \
         question, answer) or MMMU (id, question, options, answer, image_1..image_7)",
        first.display(),
        cols.join(", ")
    )
}

/// The files to read for `path` (a file or a folder), with their splits.
fn files_of(path: &Path) -> Result<Vec<(PathBuf, String)>> {
    if path.is_dir() {
        parquet_files(path)
    } else {
        Ok(vec![(path.to_path_buf(), split_of(path))])
    }
}

/// An image cell: embedded bytes, else a file named by `path` (relative to the parquet
/// file's folder). `Ok(None)` for a null.
fn image(cell: &Cell, dir: &Path) -> std::result::Result<Option<ImageRef>, (&'static str, String)> {
    match cell {
        Cell::Image {
            bytes: Some(b),
            path,
        } if !b.is_empty() => Ok(Some(ImageRef::Bytes {
            bytes: b.clone(),
            name: path.clone(),
        })),
        Cell::Image { path: Some(p), .. } if !p.is_empty() => image_file(dir, p).map(Some),
        Cell::Image { .. } => Err((NO_IMAGE, "the image has neither bytes nor a path".into())),
        Cell::Null => Ok(None),
        Cell::Text(_) => Err((MALFORMED, "the image is text, not an image".into())),
    }
}

fn text(cell: &Cell) -> Option<&str> {
    match cell {
        Cell::Text(s) => Some(s),
        _ => None,
    }
}

/// VQA-RAD and PathVQA: closed when the answer is yes or no.
pub(super) fn load_yes_no(path: &Path, out: &mut Out) -> Result<()> {
    let cols = ["image", "question", "answer"];
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (file, split) in files_of(path)? {
        if !out.wants(&split) {
            continue;
        }
        let table = parquet::read(&file, &cols, &cols)?;
        let dir = file.parent().unwrap_or(Path::new("."));
        for (r, row) in table.rows.iter().enumerate() {
            let n = counts.entry(split.clone()).or_default();
            let id = format!("{split}-{n}");
            *n += 1;
            let img = match image(&row[0], dir) {
                Ok(Some(i)) => i,
                Ok(None) => {
                    out.skip(&file, r, NO_IMAGE, "no image".into(), "");
                    continue;
                }
                Err((kind, why)) => {
                    out.skip(&file, r, kind, why, "");
                    continue;
                }
            };
            let Some(question) = text(&row[1]) else {
                out.skip(&file, r, MALFORMED, "no question".into(), "");
                continue;
            };
            let answer = text(&row[2]).unwrap_or("");
            if answer.trim().is_empty() {
                out.skip(&file, r, NO_ANSWER, "no answer".into(), "");
                continue;
            }
            let yes_no = matches!(answer.trim().to_lowercase().as_str(), "yes" | "no");
            let answer = answer.to_string();
            out.items.push(BenchItem {
                id,
                benchmark: out.format,
                split: split.clone(),
                question: question.to_string(),
                images: vec![img],
                answer: if yes_no {
                    Answer::Closed { answer }
                } else {
                    Answer::Open { answer }
                },
                modality: None,
                modality_raw: None,
                language: Language::En,
                extra: BTreeMap::new(),
                file: file.display().to_string(),
                row: r,
            });
        }
    }
    Ok(())
}

/// MMMU's files for `path`: a file, a subject folder, or the root (whose Health & Medicine
/// subject folders are read, the others left out).
fn mmmu_files(path: &Path) -> Result<Vec<(PathBuf, String)>> {
    if !path.is_dir() {
        return files_of(path);
    }
    let own = files_with_ext(path, "parquet")?;
    if !own.is_empty() {
        return Ok(own
            .into_iter()
            .map(|f| {
                let s = split_of(&f);
                (f, s)
            })
            .collect());
    }
    let mut files = Vec::new();
    for subject in HEALTH_AND_MEDICINE {
        for f in files_with_ext(&path.join(subject), "parquet")? {
            let s = split_of(&f);
            files.push((f, s));
        }
    }
    if files.is_empty() {
        bail!(
            "{}: no MMMU Health & Medicine subject folder with parquet files ({})",
            path.display(),
            HEALTH_AND_MEDICINE.join(", ")
        );
    }
    Ok(files)
}

const MMMU_COLUMNS: [&str; 15] = [
    "id",
    "question",
    "options",
    "answer",
    "question_type",
    "subfield",
    "topic_difficulty",
    "img_type",
    "image_1",
    "image_2",
    "image_3",
    "image_4",
    "image_5",
    "image_6",
    "image_7",
];

/// MMMU: multiple choice (`answer` a letter) and open questions; the test split's answers are
/// withheld (`?` or empty), so its rows are skipped as having no answer.
pub(super) fn load_mmmu(path: &Path, out: &mut Out) -> Result<()> {
    for (file, split) in mmmu_files(path)? {
        if !out.wants(&split) {
            continue;
        }
        let table = parquet::read(&file, &MMMU_COLUMNS, &MMMU_COLUMNS[..4])?;
        let dir = file.parent().unwrap_or(Path::new("."));
        let folder = dir
            .file_name()
            .and_then(|d| d.to_str())
            .unwrap_or("")
            .to_string();
        'rows: for (r, row) in table.rows.iter().enumerate() {
            let (Some(id), Some(question), Some(options)) =
                (text(&row[0]), text(&row[1]), text(&row[2]))
            else {
                out.skip(
                    &file,
                    r,
                    MALFORMED,
                    "id, question or options is not text".into(),
                    "",
                );
                continue;
            };
            let options = match parse_str_list(options) {
                Ok(o) => o,
                Err(why) => {
                    out.skip(
                        &file,
                        r,
                        "bad options",
                        format!("options are not a Python list of strings: {why}"),
                        "",
                    );
                    continue;
                }
            };
            let answer = text(&row[3]).unwrap_or("").trim();
            if answer.is_empty() || answer == "?" {
                out.skip(
                    &file,
                    r,
                    NO_ANSWER,
                    "no answer (MMMU withholds the test split's)".into(),
                    "",
                );
                continue;
            }
            let qtype = text(&row[4]).unwrap_or("multiple-choice");
            let answer = if qtype == "open" {
                Answer::Open {
                    answer: answer.to_string(),
                }
            } else if options.is_empty() {
                out.skip(&file, r, "no options", "no options".into(), "");
                continue;
            } else {
                match letter_index(answer, options.len()) {
                    Some(i) => Answer::Choice { options, answer: i },
                    None => {
                        out.skip(
                            &file,
                            r,
                            NOT_AMONG,
                            format!(
                                "answer {answer:?} is not the letter of one of {} options",
                                options.len()
                            ),
                            "",
                        );
                        continue;
                    }
                }
            };
            let mut images = Vec::new();
            let mut gap = None;
            for (k, cell) in row[8..].iter().enumerate() {
                match image(cell, dir) {
                    Ok(Some(img)) => {
                        if let Some(g) = gap {
                            out.skip(
                                &file,
                                r,
                                super::MISSING_IMAGE,
                                format!("image_{g} is empty but image_{} is not", k + 1),
                                "",
                            );
                            continue 'rows;
                        }
                        images.push(img);
                    }
                    Ok(None) => gap = gap.or(Some(k + 1)),
                    Err((kind, why)) => {
                        out.skip(&file, r, kind, format!("image_{}: {why}", k + 1), "");
                        continue 'rows;
                    }
                }
            }
            // `{split}_{Subject}_{n}`, else the folder's name.
            let subject = id
                .strip_prefix(&format!("{split}_"))
                .and_then(|s| s.rsplit_once('_'))
                .map(|(s, _)| s.to_string())
                .unwrap_or(folder.clone());
            let mut extra = BTreeMap::from([("subject".to_string(), subject)]);
            for (i, key) in [
                (4, "question_type"),
                (5, "subfield"),
                (6, "topic_difficulty"),
                (7, "img_type"),
            ] {
                if let Some(v) = text(&row[i]) {
                    extra.insert(key.to_string(), v.to_string());
                }
            }
            out.items.push(BenchItem {
                id: id.to_string(),
                benchmark: out.format,
                split: split.clone(),
                question: question.to_string(),
                images,
                answer,
                modality: None,
                modality_raw: None,
                language: Language::En,
                extra,
                file: file.display().to_string(),
                row: r,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split_of;
    use std::path::Path;

    #[test]
    fn splits_from_file_names() {
        for (p, s) in [
            ("data/test-00000-of-00003-e9adadb4799f44d3.parquet", "test"),
            ("Pharmacy/validation-00000-of-00001.parquet", "validation"),
            ("flaviagiammarino--vqa-rad/train/0000.parquet", "train"),
            ("x/my_split.parquet", "my_split"),
        ] {
            assert_eq!(split_of(Path::new(p)), s, "{p}");
        }
    }
}
