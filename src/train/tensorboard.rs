//! A run's metrics as TensorBoard event files, so a run opens in the viewer researchers
//! already use (`tensorboard --logdir runs/`), beside `medvlm plot`.
//!
//! Our own writer rather than a crate: tensorboard-rs has been inactive since 2022, and
//! scalars need only a few protobuf fields, written here by hand, in TFRecord framing:
//!
//! ```text
//! Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//! Summary { repeated Value value = 1; }
//! Value   { string tag = 1; oneof value { float simple_value = 2; ... } }
//! record  = u64 LE length, masked CRC-32C(length bytes), data, masked CRC-32C(data)
//! ```
//!
//! The bytes equal what TensorBoard's own Python writer (protobuf serialization, its
//! RecordWriter) writes for the same events: `tests/fixtures/tensorboard/`, made by
//! `tools/check_tensorboard.py --make-fixture`, is compared byte for byte below.
//!
//! The files live in `RUN/tensorboard/`, one per session (a resumed run adds a file: the
//! viewer reads every event file of a folder as one run). A resumed run first trims the
//! steps beyond its checkpoint from the earlier files, as metrics.jsonl is trimmed, so no
//! step shows twice.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use serde_json::Value;

/// The folder of a run directory that holds its event files.
pub const DIR: &str = "tensorboard";

/// The first record of every event file, which readers check.
const FILE_VERSION: &str = "brain.Event:2";

/// Writes one event file: a record per step, written through to the file as it is logged.
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

/// Numbers the event files this process opens, as TensorBoard's writer does (its
/// `_global_uid`): two files opened in one second by one process get different names.
static OPENED: AtomicU64 = AtomicU64::new(0);

impl EventWriter {
    /// A new event file in `dir` (created when missing), named as TensorBoard names them.
    pub fn create(dir: &Path) -> Result<Self> {
        Self::create_at(dir, wall_time_now())
    }

    /// [`Self::create`] with the file-version record stamped `wall_time` (tests compare
    /// bytes with a reference written at a fixed time).
    pub fn create_at(dir: &Path, wall_time: f64) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let secs = wall_time.max(0.0) as u64;
        let (host, pid) = (hostname(), std::process::id());
        // `create_new`: never write into another writer's file, whatever the clock says.
        let (path, file) = loop {
            let n = OPENED.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(file_name(secs, &host, pid, n));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("{}: cannot create", path.display()))
                }
            }
        };
        let mut w = Self { path, file };
        w.write_event(&Event {
            wall_time,
            step: 0,
            body: Body::FileVersion(FILE_VERSION),
        })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One step's scalars as one event, stamped now.
    pub fn scalars(&mut self, step: u64, values: &[(String, f32)]) -> Result<()> {
        self.scalars_at(step, wall_time_now(), values)
    }

    /// [`Self::scalars`] stamped `wall_time`.
    pub fn scalars_at(
        &mut self,
        step: u64,
        wall_time: f64,
        values: &[(String, f32)],
    ) -> Result<()> {
        self.write_event(&Event {
            wall_time,
            step,
            body: Body::Scalars(values),
        })
    }

    /// Swaps the file for a read-only handle on it, so writes fail (tests of the failure path).
    #[cfg(test)]
    pub(crate) fn make_unwritable(&mut self) {
        self.file = File::open(&self.path).unwrap();
    }

    /// Writes the record straight to the file in one call (a `File` keeps no buffer; the
    /// flush says so), so a live run shows in the viewer step by step and a crash leaves at
    /// most one partial record, where readers, and our trim on resume, stop.
    fn write_event(&mut self, e: &Event) -> Result<()> {
        self.file
            .write_all(&record(&e.encode()))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

/// TensorBoard's event-file name (its `EventFileWriter`:
/// `"events.out.tfevents.%010d.%s.%s.%s" % (time.time(), socket.gethostname(), os.getpid(), uid)`).
pub fn file_name(unix_secs: u64, host: &str, pid: u32, n: u64) -> String {
    format!("events.out.tfevents.{unix_secs:010}.{host}.{pid}.{n}")
}

/// The machine's name as `gethostname` gives it (Linux shows it in /proc), else the
/// environment's, with anything that cannot be part of a file name replaced.
fn hostname() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into());
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn wall_time_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The scalars of a metrics record: every finite number, tagged with its key, nested objects
/// flattened with `/` (`{"rewards": {"format": 1}}` is `rewards/format`). The record's own
/// `step` is where the scalars go, not one of them; strings, booleans, arrays and numbers
/// beyond f32 (TensorBoard's `simple_value`) are left out.
pub fn scalars_of(record: &Value) -> Vec<(String, f32)> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, f32)>) {
        match v {
            Value::Number(n) => {
                if let Some(x) = n.as_f64().map(|x| x as f32).filter(|x| x.is_finite()) {
                    out.push((prefix.to_string(), x));
                }
            }
            Value::Object(m) => {
                for (k, v) in m {
                    let tag = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}/{k}")
                    };
                    walk(&tag, v, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Value::Object(m) = record {
        for (k, v) in m.iter().filter(|(k, _)| *k != "step") {
            walk(k, v, &mut out);
        }
    }
    out
}

/// Prepares `dir` for a session that continues after step `keep_through_step`: events of
/// later steps (logged after the checkpoint a run resumes from) are removed from the
/// earlier files, each rewritten atomically, and a file left without scalars is deleted.
/// A damaged tail (a record cut short by a crash, or failing its checksum) is dropped, as
/// TensorBoard stops reading a file there.
pub fn trim(dir: &Path, keep_through_step: u64) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(()); // no earlier event files
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("{}: cannot list", dir.display()))?
            .path();
        // TensorBoard's own test for an event file (io_wrapper.IsSummaryEventsFile).
        let is_events = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("tfevents"));
        if !is_events || !path.is_file() {
            continue;
        }
        let bytes = fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let records = read_records(&bytes);
        let kept: Vec<&[u8]> = records
            .iter()
            .copied()
            .filter(|data| step_of(data).is_none_or(|s| s <= keep_through_step))
            .collect();
        let consumed: usize = records.iter().map(|d| d.len() + 16).sum();
        if kept.len() == records.len() && consumed == bytes.len() {
            continue; // nothing beyond the checkpoint, nothing damaged
        }
        if !kept.iter().any(|d| has_summary(d)) {
            fs::remove_file(&path).with_context(|| format!("{}: cannot remove", path.display()))?;
            continue;
        }
        let text: Vec<u8> = kept.iter().flat_map(|d| record(d)).collect();
        crate::files::write_atomic(&path, &text)?;
    }
    Ok(())
}

/// One event, as our files hold them.
struct Event<'a> {
    wall_time: f64,
    step: u64,
    body: Body<'a>,
}

enum Body<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(String, f32)]),
}

impl Event<'_> {
    /// The protobuf bytes, fields in number order as protobuf writes them; proto3 leaves
    /// out a zero `wall_time` or `step`, but writes a zero `simple_value` (it is in a oneof).
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.wall_time != 0.0 {
            key(&mut out, 1, 1);
            out.extend_from_slice(&self.wall_time.to_le_bytes());
        }
        if self.step != 0 {
            key(&mut out, 2, 0);
            varint(&mut out, self.step);
        }
        match self.body {
            Body::FileVersion(v) => bytes_field(&mut out, 3, v.as_bytes()),
            Body::Scalars(values) => {
                let mut summary = Vec::new();
                for (tag, x) in values {
                    let mut value = Vec::new();
                    bytes_field(&mut value, 1, tag.as_bytes());
                    key(&mut value, 2, 5);
                    value.extend_from_slice(&x.to_le_bytes());
                    bytes_field(&mut summary, 1, &value);
                }
                bytes_field(&mut out, 5, &summary);
            }
        }
        out
    }
}

fn key(out: &mut Vec<u8>, field: u64, wire_type: u64) {
    varint(out, (field << 3) | wire_type);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The TFRecord framing of one record.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// The data of each intact record of a file, up to the first damaged one.
fn read_records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 16 {
        let (len, crc) = (
            &rest[..8],
            u32::from_le_bytes(rest[8..12].try_into().unwrap()),
        );
        let n = u64::from_le_bytes(len.try_into().unwrap());
        // The data must fit before the data CRC.
        if crc != masked_crc32c(len) || n > (rest.len() - 16) as u64 {
            break;
        }
        let n = n as usize;
        let data = &rest[12..12 + n];
        let crc = u32::from_le_bytes(rest[12 + n..16 + n].try_into().unwrap());
        if crc != masked_crc32c(data) {
            break;
        }
        out.push(data);
        rest = &rest[16 + n..];
    }
    out
}

/// The top-level fields of an event: (field number, wire type, value of a varint field, else
/// 0); `None` where it is not protobuf we can walk.
fn fields(data: &[u8]) -> Option<Vec<(u64, u64, u64)>> {
    fn read_varint(d: &[u8], i: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *d.get(*i)?;
            *i += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let k = read_varint(data, &mut i)?;
        let (field, wire) = (k >> 3, k & 7);
        let value = match wire {
            0 => read_varint(data, &mut i)?,
            1 | 5 => {
                i += if wire == 1 { 8 } else { 4 };
                0
            }
            2 => {
                let n = read_varint(data, &mut i)? as usize;
                i = i.checked_add(n)?;
                0
            }
            _ => return None,
        };
        if i > data.len() {
            return None;
        }
        out.push((field, wire, value));
    }
    Some(out)
}

/// An event's step (0 when absent, as proto3 leaves a zero out); `None` if unreadable.
fn step_of(data: &[u8]) -> Option<u64> {
    let f = fields(data)?;
    Some(
        f.iter()
            .find(|(n, w, _)| *n == 2 && *w == 0)
            .map_or(0, |x| x.2),
    )
}

fn has_summary(data: &[u8]) -> bool {
    fields(data).is_some_and(|f| f.iter().any(|(n, w, _)| *n == 5 && *w == 2))
}

/// CRC-32C's mask in TFRecord ("it is problematic to compute the CRC of a string that
/// contains embedded CRCs").
fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one table: a few hundred bytes a
/// step need no hardware CRC, and a table of our own spares a dependency.
fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !bytes.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard")
    }

    #[test]
    fn crc32c_check_value() {
        // The CRC catalogue's check value for CRC-32C, and RFC 3720's 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    /// Our writer, given the fixture's events, writes the bytes TensorBoard's own writer
    /// wrote (tools/check_tensorboard.py --make-fixture).
    #[test]
    fn bytes_equal_tensorboards_own_writer() {
        let dir = fixture_dir();
        let spec: Value =
            serde_json::from_str(&fs::read_to_string(dir.join("scalars.json")).unwrap()).unwrap();
        let reference = fs::read(dir.join(spec["file"].as_str().unwrap())).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let mut w =
            EventWriter::create_at(tmp.path(), spec["file_version_wall_time"].as_f64().unwrap())
                .unwrap();
        let events = spec["events"].as_array().unwrap();
        assert!(events.len() >= 3);
        for e in events {
            let values: Vec<(String, f32)> = e["scalars"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| {
                    let pair = v.as_array().unwrap();
                    (
                        pair[0].as_str().unwrap().to_string(),
                        pair[1].as_f64().unwrap() as f32,
                    )
                })
                .collect();
            w.scalars_at(
                e["step"].as_u64().unwrap(),
                e["wall_time"].as_f64().unwrap(),
                &values,
            )
            .unwrap();
        }
        let ours = fs::read(w.path()).unwrap();
        assert_eq!(ours.len(), reference.len());
        assert!(ours == reference, "bytes differ from TensorBoard's writer");
    }

    #[test]
    fn names_files_as_tensorboard_does() {
        assert_eq!(
            file_name(1_700_000_000, "host", 42, 0),
            "events.out.tfevents.1700000000.host.42.0"
        );
        assert_eq!(
            file_name(999, "h", 1, 3),
            "events.out.tfevents.0000000999.h.1.3"
        );
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (
            EventWriter::create_at(tmp.path(), 5.0).unwrap(),
            EventWriter::create_at(tmp.path(), 5.0).unwrap(),
        );
        assert_ne!(a.path(), b.path(), "one second, one process, two files");
    }

    #[test]
    fn scalars_are_the_finite_numbers_flattened() {
        let rec = serde_json::json!({
            "step": 3, "loss": 0.5, "kl": 0, "name": "x", "ok": true, "list": [1, 2],
            "rewards": {"accuracy": {"mean": 0.25}, "format": 1}, "huge": 1e300,
        });
        let mut got = scalars_of(&rec);
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let want: Vec<(String, f32)> = [
            ("kl", 0.0),
            ("loss", 0.5),
            ("rewards/accuracy/mean", 0.25),
            ("rewards/format", 1.0),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn trim_drops_later_steps_and_damaged_tails() {
        let tmp = tempfile::tempdir().unwrap();
        let one = |x: f32| vec![("loss".to_string(), x)];
        let mut w = EventWriter::create_at(tmp.path(), 1.0).unwrap();
        for s in 1..=5 {
            w.scalars_at(s, 1.0 + s as f64, &one(s as f32)).unwrap();
        }
        let full = fs::read(w.path()).unwrap();
        // A second file cut short inside its third record, and one with steps only beyond.
        let mut cut = EventWriter::create_at(tmp.path(), 1.0).unwrap();
        for s in 1..=3 {
            cut.scalars_at(s, 1.0, &one(0.0)).unwrap();
        }
        let cut_bytes = fs::read(cut.path()).unwrap();
        fs::write(cut.path(), &cut_bytes[..cut_bytes.len() - 3]).unwrap();
        let mut later = EventWriter::create_at(tmp.path(), 1.0).unwrap();
        later.scalars_at(4, 1.0, &one(4.0)).unwrap();
        let (wp, cp, lp) = (
            w.path().to_path_buf(),
            cut.path().to_path_buf(),
            later.path().to_path_buf(),
        );
        drop((w, cut, later));

        trim(tmp.path(), 3).unwrap();
        let steps = |p: &Path| -> Vec<u64> {
            read_records(&fs::read(p).unwrap())
                .iter()
                .map(|d| step_of(d).unwrap())
                .collect()
        };
        assert_eq!(steps(&wp), [0, 1, 2, 3]);
        // The kept records are the written ones, byte for byte.
        let kept = fs::read(&wp).unwrap();
        assert_eq!(kept[..], full[..kept.len()]);
        assert_eq!(steps(&cp), [0, 1, 2]);
        assert!(!lp.exists(), "a file with no step to keep is removed");
        // Nothing beyond: left alone.
        trim(tmp.path(), 3).unwrap();
        assert_eq!(fs::read(&wp).unwrap(), kept);
    }
}
