//! Hugging Face parquet files (VQA-RAD, PathVQA, MMMU) read through the `parquet` crate's
//! record reader, into rows of the few cell kinds those files hold: text, the `datasets`
//! Image struct `{bytes: binary, path: string}`, and nulls.
//!
//! Why the record reader and not Arrow's: these files are a few columns of text and image
//! bytes, read once; the Arrow reader would add the Arrow crates, about 7 CPU-minutes to
//! every clean build (and CI), for columnar speed nothing here needs.
//!
//! The file is read whole within the dataset bound ([`read_bounded`]); the reader runs
//! under the decoders' panic guard, so a corrupt file is an error, never a crash. Only
//! snappy-compressed and uncompressed column chunks are read (what pyarrow and `datasets`
//! write by default); other codecs are refused by name before any page is decoded.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use parquet::basic::Compression;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::Type;

use crate::processor::input::{is_regular_file, read_bounded, MAX_DATA_FILE_BYTES};

/// One value of a row.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Cell {
    /// A null, or a column the file does not have.
    Null,
    Text(String),
    /// The `datasets` Image feature: embedded bytes, or a path, or both.
    Image {
        bytes: Option<Arc<[u8]>>,
        path: Option<String>,
    },
}

/// The wanted columns of a file, row by row, in the order they were asked for.
pub(super) struct Table {
    pub rows: Vec<Vec<Cell>>,
}

/// One line for a parquet error: the crate's messages can span lines.
fn one_line(e: impl std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The top-level column names of a parquet file, from its footer alone (format detection
/// reads no data page).
pub(super) fn column_names(path: &Path) -> Result<Vec<String>> {
    if !is_regular_file(path, "parquet")? {
        bail!("{}: no such parquet file", path.display());
    }
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow!("{}: cannot read the parquet file: {e}", path.display()))?;
    let meta = guarded(path, || {
        ParquetMetaDataReader::new()
            .parse_and_finish(&file)
            .map_err(|e| not_parquet(path, e))
    })?;
    Ok(roots(&meta))
}

fn roots(meta: &ParquetMetaData) -> Vec<String> {
    meta.file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect()
}

fn not_parquet(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "{}: not a readable parquet file ({})",
        path.display(),
        one_line(e)
    )
}

/// Runs the parquet reader with panics turned into an error naming the file.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    crate::processor::image::medical::guarded("parquet", f)
        .map_err(|e| anyhow!("{}: {}", path.display(), one_line(e)))
}

/// Reads the columns `wanted` of every row. A wanted column the file lacks reads as nulls
/// (MMMU files need not carry all of `image_1..image_7`); `required` columns must be there.
pub(super) fn read(path: &Path, wanted: &[&str], required: &[&str]) -> Result<Table> {
    let bytes = bytes::Bytes::from(read_bounded(path, MAX_DATA_FILE_BYTES, "parquet")?);
    guarded(path, || read_bytes(path, bytes, wanted, required))
}

fn read_bytes(
    path: &Path,
    bytes: bytes::Bytes,
    wanted: &[&str],
    required: &[&str],
) -> Result<Table> {
    let reader = SerializedFileReader::new(bytes).map_err(|e| not_parquet(path, e))?;
    let meta = reader.metadata();
    let names = roots(meta);
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|r| !names.iter().any(|n| n == r))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}: the parquet file has no column {} (its columns: {})",
            path.display(),
            missing.join(", "),
            names.join(", ")
        );
    }
    for rg in meta.row_groups() {
        for col in rg.columns() {
            let c = col.compression();
            if !matches!(c, Compression::UNCOMPRESSED | Compression::SNAPPY) {
                bail!(
                    "{}: column {} is compressed with {c}; medvlm reads snappy-compressed or \
                     uncompressed parquet (what pyarrow and Hugging Face datasets write)",
                    path.display(),
                    col.column_path()
                );
            }
        }
    }
    // Only the wanted root columns are decoded (image bytes of other columns are skipped).
    let schema = meta.file_metadata().schema_descr().root_schema();
    let fields: Vec<_> = schema
        .get_fields()
        .iter()
        .filter(|f| wanted.contains(&f.name()))
        .cloned()
        .collect();
    let projection = Type::group_type_builder(schema.name())
        .with_fields(fields)
        .build()
        .map_err(|e| not_parquet(path, e))?;
    let mut rows = Vec::with_capacity(meta.file_metadata().num_rows().max(0) as usize);
    for row in reader
        .get_row_iter(Some(projection))
        .map_err(|e| not_parquet(path, e))?
    {
        let row = row.map_err(|e| not_parquet(path, e))?;
        let mut cells = Vec::with_capacity(wanted.len());
        for w in wanted {
            cells.push(match column(&row, w) {
                None => Cell::Null,
                Some(f) => cell(f).map_err(|t| anyhow!("{}: column {w} is {t}", path.display()))?,
            });
        }
        rows.push(cells);
    }
    Ok(Table { rows })
}

fn column<'a>(row: &'a Row, name: &str) -> Option<&'a Field> {
    row.get_column_iter()
        .find(|(n, _)| n.as_str() == name)
        .map(|(_, f)| f)
}

/// What kind of value `f` is, for an error naming an unexpected one.
fn kind(f: &Field) -> String {
    let debug = format!("{f:?}");
    let name = debug.split(['(', ' ', '{']).next().unwrap_or("a value");
    format!("a {name} value")
}

fn text(f: &Field) -> std::result::Result<Option<String>, String> {
    match f {
        Field::Null => Ok(None),
        Field::Str(s) => Ok(Some(s.clone())),
        other => Err(format!("{}, not text", kind(other))),
    }
}

fn binary(f: &Field) -> std::result::Result<Option<Arc<[u8]>>, String> {
    match f {
        Field::Null => Ok(None),
        Field::Bytes(b) => Ok(Some(Arc::from(b.data()))),
        // A binary column with a UTF-8 annotation reads as text; its bytes are the same.
        Field::Str(s) => Ok(Some(Arc::from(s.as_bytes()))),
        other => Err(format!("{}, not bytes", kind(other))),
    }
}

fn cell(f: &Field) -> std::result::Result<Cell, String> {
    match f {
        Field::Null => Ok(Cell::Null),
        Field::Group(g) => {
            let Some(b) = column(g, "bytes") else {
                return Err("a struct without `bytes`, not an image".into());
            };
            let bytes = binary(b).map_err(|t| format!("an image whose bytes are {t}"))?;
            let path = match column(g, "path") {
                Some(p) => text(p).map_err(|t| format!("an image whose path is {t}"))?,
                None => None,
            };
            Ok(Cell::Image { bytes, path })
        }
        other => Ok(text(other)?.map_or(Cell::Null, Cell::Text)),
    }
}
