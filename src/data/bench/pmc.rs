//! PMC-VQA's CSV files. v1 (`train.csv`, `test.csv`, `test_clean.csv`, images in
//! `images/`): `Figure_path, Question, Answer, Choice A..D, Answer_label`, the letter in
//! `Answer_label`, `Answer` the text. v2 (`train_2.csv`, `test_2.csv`, images in `figures/`):
//! the ten columns MedEvalKit unpacks, `index, Figure_path, Caption, Question, Choice A..D,
//! Answer, split`, with the letter in `Answer`. Choices carry a letter prefix (`" B:Magnetic
//! resonance imaging "`), which is removed as evalscope does (`^{letter}\s*:`). Columns are
//! found by name; a ten-column file without those names is read by position, as MedEvalKit
//! reads `test_2.csv`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use super::{
    files_with_ext, letter_index, Answer, BenchItem, ImageRef, Language, Out, MALFORMED,
    MISSING_IMAGE, NOT_AMONG,
};
use crate::processor::input::{is_regular_file, read_bounded_string, MAX_DATA_FILE_BYTES};

/// Parses CSV (RFC 4180, as pandas and Python's csv module write it): fields separated by
/// commas, quoted fields with `""` for a quote and line breaks inside, `\n` or `\r\n`
/// between records.
fn parse_csv(text: &str) -> std::result::Result<Vec<Vec<String>>, String> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut at_start = true;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    quoted = false;
                }
            } else {
                field.push(c);
            }
            continue;
        }
        match c {
            '"' if at_start => {
                quoted = true;
                at_start = false;
            }
            ',' => {
                record.push(std::mem::take(&mut field));
                at_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
                at_start = true;
            }
            c => {
                field.push(c);
                at_start = false;
            }
        }
    }
    if quoted {
        return Err("a quoted field is not closed".into());
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

/// Where each field sits in a PMC-VQA row.
#[derive(Debug, PartialEq)]
struct Columns {
    figure: usize,
    question: usize,
    choices: [usize; 4],
    /// The letter (`Answer_label`), when the file has it.
    label: Option<usize>,
    /// `Answer`: the text in v1, the letter in v2.
    answer: Option<usize>,
    caption: Option<usize>,
    /// v2 (images in `figures/` first).
    v2: bool,
}

fn columns(header: &[String]) -> Option<Columns> {
    let find = |names: &[&str]| {
        header
            .iter()
            .position(|h| names.iter().any(|n| h.trim().eq_ignore_ascii_case(n)))
    };
    if let (Some(figure), Some(question), Some(a), Some(b), Some(c), Some(d)) = (
        find(&["Figure_path"]),
        find(&["Question"]),
        find(&["Choice A"]),
        find(&["Choice B"]),
        find(&["Choice C"]),
        find(&["Choice D"]),
    ) {
        let caption = find(&["Caption"]);
        return Some(Columns {
            figure,
            question,
            choices: [a, b, c, d],
            label: find(&["Answer_label"]),
            answer: find(&["Answer", "Anwser"]),
            caption,
            v2: caption.is_some(),
        });
    }
    // MedEvalKit: `index,figure_path,caption,question,choiceA..D,answer,split = row`.
    (header.len() == 10).then_some(Columns {
        figure: 1,
        question: 3,
        choices: [4, 5, 6, 7],
        label: None,
        answer: Some(8),
        caption: Some(2),
        v2: true,
    })
}

/// The first line of a file (at most 64 KiB of it), for a CSV header.
fn first_line(path: &Path) -> Result<String> {
    if !is_regular_file(path, "dataset")? {
        bail!("{}: no such dataset file", path.display());
    }
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut buf))
        .map_err(|e| anyhow!("{}: cannot read the dataset file: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&buf);
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// Whether a CSV file's header is PMC-VQA's (named columns; a ten-column header counts only
/// when `Figure_path` is among them, as detection must not claim any ten-column CSV).
pub(super) fn is_pmc_csv(path: &Path) -> Result<bool> {
    let line = first_line(path)?;
    let header = parse_csv(&line).ok().and_then(|r| r.into_iter().next());
    Ok(header.is_some_and(|h| {
        h.iter()
            .any(|c| c.trim().eq_ignore_ascii_case("Figure_path"))
    }))
}

/// The PMC-VQA CSV files of a folder (others, such as `oa_comm_use_file_list.csv`, are
/// left out).
pub(super) fn csv_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for f in files_with_ext(dir, "csv")? {
        if is_pmc_csv(&f)? {
            out.push(f);
        }
    }
    Ok(out)
}

/// `" B:Magnetic resonance imaging "` -> `"Magnetic resonance imaging"`.
fn strip_choice(raw: &str, letter: char) -> String {
    let t = raw.trim();
    let mut cs = t.chars();
    if cs.next().is_some_and(|c| c.eq_ignore_ascii_case(&letter)) {
        let rest = cs.as_str().trim_start();
        if let Some(r) = rest.strip_prefix(':') {
            return r.trim().to_string();
        }
    }
    t.to_string()
}

/// PMC-VQA: four-way multiple choice.
pub(super) fn load(path: &Path, out: &mut Out) -> Result<()> {
    let (root, files) = if path.is_dir() {
        (path.to_path_buf(), csv_files(path)?)
    } else {
        let root = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        (root, vec![path.to_path_buf()])
    };
    if !files.is_empty() && !root.join("images").is_dir() && !root.join("figures").is_dir() {
        bail!(
            "{}: no images/ or figures/ folder with the figures (unzip images.zip or \
             images_2.zip there)",
            root.display()
        );
    }
    for file in files {
        let split = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_string();
        if !out.wants(&split) {
            continue;
        }
        let text = read_bounded_string(&file, MAX_DATA_FILE_BYTES, "dataset")?;
        let records =
            parse_csv(&text).map_err(|e| anyhow!("{}: not valid CSV: {e}", file.display()))?;
        let Some((header, rows)) = records.split_first() else {
            bail!("{}: an empty CSV file", file.display());
        };
        let Some(cols) = columns(header) else {
            bail!(
                "{}: not a PMC-VQA CSV: no Figure_path, Question, Choice A..D columns (its \
                 columns: {})",
                file.display(),
                header.join(", ")
            );
        };
        let folders: [&str; 2] = if cols.v2 {
            ["figures", "images"]
        } else {
            ["images", "figures"]
        };
        for (r, row) in rows.iter().enumerate() {
            match pmc_row(row, &cols, &root, folders) {
                Ok((question, image, answer, caption)) => {
                    let mut extra = BTreeMap::new();
                    if let Some(c) = caption {
                        extra.insert("caption".to_string(), c);
                    }
                    out.items.push(BenchItem {
                        id: format!("{split}-{r}"),
                        benchmark: out.format,
                        split: split.clone(),
                        question,
                        images: vec![image],
                        answer,
                        modality: None,
                        modality_raw: None,
                        language: Language::En,
                        extra,
                        file: file.display().to_string(),
                        row: r,
                    });
                }
                Err((kind, why)) => out.skip(&file, r, kind, why, ""),
            }
        }
    }
    Ok(())
}

type PmcRow = (String, ImageRef, Answer, Option<String>);

fn pmc_row(
    row: &[String],
    cols: &Columns,
    root: &Path,
    folders: [&str; 2],
) -> std::result::Result<PmcRow, (&'static str, String)> {
    let get = |i: usize| {
        row.get(i).map(String::as_str).ok_or((
            MALFORMED,
            format!("{} fields, fewer than the header's", row.len()),
        ))
    };
    let figure = get(cols.figure)?.trim();
    let question = get(cols.question)?;
    let mut options = Vec::with_capacity(4);
    for (&i, l) in cols.choices.iter().zip(['A', 'B', 'C', 'D']) {
        options.push(strip_choice(get(i)?, l));
    }
    while options.last().is_some_and(String::is_empty) {
        options.pop();
    }
    if let Some(i) = options.iter().position(String::is_empty) {
        return Err((
            MALFORMED,
            format!("choice {} is empty", ['A', 'B', 'C', 'D'][i]),
        ));
    }
    let image = folders
        .iter()
        .map(|f| root.join(f).join(figure))
        .find(|p| is_regular_file(p, "image").unwrap_or(false))
        .map(ImageRef::Path)
        .ok_or_else(|| {
            (
                MISSING_IMAGE,
                format!(
                    "image {figure} not found in {}/ or {}/",
                    folders[0], folders[1]
                ),
            )
        })?;
    let answer = match (cols.label, cols.answer) {
        (Some(l), _) => {
            let l = get(l)?;
            letter_index(l, options.len()).ok_or_else(|| {
                (
                    NOT_AMONG,
                    format!("Answer_label {l:?} is not the letter of an option"),
                )
            })?
        }
        (None, Some(a)) => {
            let a = get(a)?;
            letter_index(a, options.len())
                .or_else(|| options.iter().position(|o| o == a.trim()))
                .ok_or_else(|| (NOT_AMONG, format!("answer {a:?} is not among the options")))?
        }
        (None, None) => return Err((NOT_AMONG, "no Answer or Answer_label column".into())),
    };
    let caption = cols.caption.and_then(|c| row.get(c)).cloned();
    Ok((
        question.to_string(),
        image,
        Answer::Choice { options, answer },
        caption,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_line_breaks() {
        let recs = parse_csv("a,b,c\r\n\"x, y\",\"say \"\"hi\"\"\",\"two\nlines\"\n1,,3").unwrap();
        assert_eq!(
            recs,
            vec![
                vec!["a", "b", "c"],
                vec!["x, y", "say \"hi\"", "two\nlines"],
                vec!["1", "", "3"]
            ]
        );
        assert!(parse_csv("a,\"b\n").is_err());
    }

    #[test]
    fn choice_prefixes() {
        assert_eq!(
            strip_choice(" B:Magnetic resonance imaging ", 'B'),
            "Magnetic resonance imaging"
        );
        assert_eq!(strip_choice("A : CT", 'A'), "CT");
        assert_eq!(strip_choice("Apex", 'A'), "Apex");
    }
}
