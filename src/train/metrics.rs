//! Per-step metrics as JSON lines, flushed line by line so a crashed run keeps every step
//! it finished, and trimmed on resume so steps are never duplicated; the same numbers as
//! TensorBoard scalars ([`MetricsWriter`]).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Map, Value};

use super::tensorboard::{self, EventWriter};

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

/// A run's metrics: each record a line of `metrics.jsonl` and, its numbers as scalars at its
/// step, an event of a TensorBoard event file in `tensorboard/` (one writer for both, so the
/// two never disagree). metrics.jsonl is the record: it is written first, and an event file
/// that cannot be written costs only the TensorBoard view (one warning line naming it).
pub struct MetricsWriter {
    jsonl: JsonlWriter,
    events: Option<EventWriter>,
}

impl MetricsWriter {
    /// Opens `dir/metrics.jsonl` and a new event file in `dir/tensorboard/`, both trimmed to
    /// the steps through `keep_through_step` (a resumed run rewrites the later ones).
    pub fn open(dir: &Path, keep_through_step: u64) -> Result<Self> {
        let jsonl = JsonlWriter::open(&dir.join("metrics.jsonl"), Some(keep_through_step))?;
        let tb = dir.join(tensorboard::DIR);
        let events = match tensorboard::trim(&tb, keep_through_step)
            .and_then(|_| EventWriter::create(&tb))
        {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!(
                    "warning: {e:#}; no TensorBoard event file for this session (metrics.jsonl \
                     has every step)"
                );
                None
            }
        };
        Ok(Self { jsonl, events })
    }

    /// Writes `record` (an object with a `"step"`). Returns a warning to show when the event
    /// file failed this time; the run then writes metrics.jsonl only.
    pub fn write(&mut self, record: &Value) -> Result<Option<String>> {
        self.jsonl.write(record)?;
        let (Some(w), Some(step)) = (&mut self.events, record.get("step").and_then(Value::as_u64))
        else {
            return Ok(None);
        };
        match w.scalars(step, &tensorboard::scalars_of(record)) {
            Ok(()) => Ok(None),
            Err(e) => {
                self.events = None;
                Ok(Some(format!(
                    "warning: {e:#}; TensorBoard's scalars stop before step {step} (metrics.jsonl \
                     has every step)"
                )))
            }
        }
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
mod writer_tests {
    use super::*;

    fn lines(dir: &Path) -> Vec<Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn record(step: u64) -> Value {
        let mut r = Record::new(step);
        r.num("loss", 0.5 / step as f64);
        r.into_value()
    }

    /// The event file is a second view: when it cannot be opened or written, metrics.jsonl
    /// still gets every record, and the warning names the file.
    #[test]
    fn event_file_failures_cost_only_the_event_file() {
        let tmp = tempfile::tempdir().unwrap();
        // `tensorboard` taken by a file: no event file, every record in metrics.jsonl.
        let blocked = tmp.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join(tensorboard::DIR), "not a folder").unwrap();
        let mut w = MetricsWriter::open(&blocked, 0).unwrap();
        assert!(w.events.is_none());
        for step in 1..=2 {
            assert_eq!(w.write(&record(step)).unwrap(), None);
        }
        assert_eq!(lines(&blocked), [record(1), record(2)]);

        // A write that fails mid-run: one warning naming the file, then metrics.jsonl only.
        let run = tmp.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let mut w = MetricsWriter::open(&run, 0).unwrap();
        assert_eq!(w.write(&record(1)).unwrap(), None);
        let path = w.events.as_ref().unwrap().path().to_path_buf();
        w.events.as_mut().unwrap().make_unwritable();
        let warning = w.write(&record(2)).unwrap().expect("a warning");
        assert!(
            warning.contains(&path.display().to_string()) && !warning.contains('\n'),
            "{warning}"
        );
        assert_eq!(w.write(&record(3)).unwrap(), None);
        assert_eq!(lines(&run), [record(1), record(2), record(3)]);
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
