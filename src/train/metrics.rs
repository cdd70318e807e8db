//! Per-step metrics as JSON lines, flushed line by line so a crashed run keeps every step
//! it finished, and trimmed on resume so steps are never duplicated.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Map, Value};

/// Appends JSON objects to a `.jsonl` file.
pub struct JsonlWriter {
    path: PathBuf,
    file: File,
}

impl JsonlWriter {
    /// Opens `path` for appending. When `keep_through_step` is given, lines whose `"step"`
    /// is beyond it are dropped first (a resumed run rewrites them).
    pub fn open(path: &Path, keep_through_step: Option<u64>) -> Result<Self> {
        if let (Some(last), true) = (keep_through_step, path.is_file()) {
            let f = File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
            let kept: Vec<String> = BufReader::new(f)
                .lines()
                .map_while(|l| l.ok())
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s <= last)
                })
                .collect();
            let mut text = kept.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            // Atomically: a crash while trimming must not lose the steps being kept.
            crate::files::write_atomic(path, text.as_bytes())?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for writing", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, value: &Value) -> Result<()> {
        let mut line = serde_json::to_string(value)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

/// Builds a flat metrics object.
#[derive(Default)]
pub struct Record(Map<String, Value>);

impl Record {
    pub fn new(step: u64) -> Self {
        let mut m = Map::new();
        m.insert("step".into(), step.into());
        Self(m)
    }
    pub fn num(&mut self, key: &str, v: f64) -> &mut Self {
        if let Some(n) = serde_json::Number::from_f64(v) {
            self.0.insert(key.into(), Value::Number(n));
        }
        self
    }
    pub fn int(&mut self, key: &str, v: u64) -> &mut Self {
        self.0.insert(key.into(), v.into());
        self
    }
    pub fn get(&self, key: &str) -> Option<f64> {
        self.0.get(key).and_then(Value::as_f64)
    }
    pub fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}

/// Mean and (sample, N-1) standard deviation.
pub fn mean_std(xs: &[f32]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// A metric for a progress line: 4 significant digits, so a small non-zero value never
/// prints as zero (`kl 5.1e-5`, not `kl 0.0000`).
pub fn num(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let a = x.abs();
    if (1e-3..1e5).contains(&a) {
        let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
        format!("{x:.decimals$}")
    } else {
        format!("{x:.3e}")
    }
}

#[cfg(test)]
mod num_tests {
    use super::num;

    #[test]
    fn small_values_stay_visible() {
        assert_eq!(num(5e-5), "5.000e-5");
        assert_eq!(num(0.0), "0");
        assert_eq!(num(0.04213), "0.04213");
        assert_eq!(num(1.5), "1.500");
        assert_eq!(num(-123.456), "-123.5");
        assert_eq!(num(2.5e7), "2.500e7");
    }
}
