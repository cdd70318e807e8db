//! Hugging Face parquet files (VQA-RAD, PathVQA, MMMU) read through the Arrow reader, into
//! rows of the few cell kinds those files hold: text, the `datasets` Image struct
//! `{bytes: binary, path: string}`, and nulls.
//!
//! The file is read whole within the dataset bound ([`read_bounded`]); the reader runs
//! under the decoders' panic guard, so a corrupt file is an error, never a crash. Only
//! snappy-compressed and uncompressed column chunks are read (what pyarrow and `datasets`
//! write by default); other codecs are refused by name before any page is decoded.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use parquet::basic::Compression;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

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
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| not_parquet(path, e))?;
    let names = roots(builder.metadata());
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
    // Root columns to read, and where each wanted column sits among them.
    let picked: Vec<usize> = (0..names.len())
        .filter(|&i| wanted.contains(&names[i].as_str()))
        .collect();
    for rg in builder.metadata().row_groups() {
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
    let mask = ProjectionMask::roots(builder.parquet_schema(), picked.iter().copied());
    let reader = builder
        .with_projection(mask)
        .with_batch_size(256)
        .build()
        .map_err(|e| not_parquet(path, e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| not_parquet(path, e))?;
        let schema = batch.schema();
        let columns: Vec<Option<ArrayRef>> = wanted
            .iter()
            .map(|w| schema.index_of(w).ok().map(|i| Arc::clone(batch.column(i))))
            .collect();
        for r in 0..batch.num_rows() {
            let mut row = Vec::with_capacity(wanted.len());
            for (w, col) in wanted.iter().zip(&columns) {
                row.push(match col {
                    None => Cell::Null,
                    Some(a) => cell(a.as_ref(), r)
                        .map_err(|t| anyhow!("{}: column {w} is {t}", path.display()))?,
                });
            }
            rows.push(row);
        }
    }
    Ok(Table { rows })
}

/// Text of a string or binary column at `r`; `Err` names a type that is neither.
fn text(a: &dyn Array, r: usize) -> std::result::Result<Option<String>, String> {
    if a.is_null(r) {
        return Ok(None);
    }
    let s = match a.data_type() {
        DataType::Utf8 => a.as_string::<i32>().value(r).to_string(),
        DataType::LargeUtf8 => a.as_string::<i64>().value(r).to_string(),
        DataType::Utf8View => a.as_string_view().value(r).to_string(),
        DataType::Null => return Ok(None),
        t => return Err(format!("{t}, not text")),
    };
    Ok(Some(s))
}

fn binary(a: &dyn Array, r: usize) -> std::result::Result<Option<Arc<[u8]>>, String> {
    if a.is_null(r) {
        return Ok(None);
    }
    let b: &[u8] = match a.data_type() {
        DataType::Binary => a.as_binary::<i32>().value(r),
        DataType::LargeBinary => a.as_binary::<i64>().value(r),
        DataType::BinaryView => a.as_binary_view().value(r),
        DataType::Null => return Ok(None),
        t => return Err(format!("{t}, not bytes")),
    };
    Ok(Some(Arc::from(b)))
}

fn cell(a: &dyn Array, r: usize) -> std::result::Result<Cell, String> {
    if a.is_null(r) {
        return Ok(Cell::Null);
    }
    match a.data_type() {
        DataType::Struct(_) => {
            let s = a.as_struct();
            let Some(b) = s.column_by_name("bytes") else {
                return Err("a struct without `bytes`, not an image".into());
            };
            let bytes =
                binary(b.as_ref(), r).map_err(|t| format!("an image whose bytes are {t}"))?;
            let path = match s.column_by_name("path") {
                Some(p) => {
                    text(p.as_ref(), r).map_err(|t| format!("an image whose path is {t}"))?
                }
                None => None,
            };
            Ok(Cell::Image { bytes, path })
        }
        _ => Ok(text(a, r)?.map_or(Cell::Null, Cell::Text)),
    }
}
