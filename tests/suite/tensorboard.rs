//! Training runs write their metrics as TensorBoard event files too: read back here with a
//! reader of this test's own (both CRC-32Cs checked bitwise, the protobuf decoded by hand),
//! every scalar equals metrics.jsonl's number at its step, and a resumed run adds a file
//! without repeating a step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use medvlm::data::PromptTemplate;
use medvlm::rl::config::{GrpoConfig, GrpoMethod};
use medvlm::sft::{SftConfig, SftMethod};
use medvlm::train::config::RunConfig;
use serde_json::Value;

/// CRC-32C bit by bit (reflected polynomial 0x82F63B78), and TFRecord's mask as its spec
/// writes it (the writer rotates; this spells it out, independently).
#[allow(clippy::manual_rotate)]
fn masked_crc(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    let crc = !crc;
    ((crc >> 15) | (crc << 17)).wrapping_add(0xA282_EAD8)
}

#[derive(Debug, Default)]
struct Event {
    wall_time: f64,
    step: u64,
    file_version: Option<String>,
    /// (tag, simple_value) of the summary's values.
    values: Vec<(String, f32)>,
}

fn varint(d: &[u8], i: &mut usize) -> u64 {
    let mut v = 0;
    let mut shift = 0;
    loop {
        let b = d[*i];
        *i += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// Protobuf fields as (number, wire type, bytes: the varint's value, the fixed or
/// length-delimited payload).
fn fields(d: &[u8]) -> Vec<(u64, u64, u64, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < d.len() {
        let key = varint(d, &mut i);
        let (n, wire) = (key >> 3, key & 7);
        let (v, bytes): (u64, &[u8]) = match wire {
            0 => (varint(d, &mut i), &[]),
            1 => (0, &d[i..i + 8]),
            5 => (0, &d[i..i + 4]),
            2 => {
                let len = varint(d, &mut i) as usize;
                (0, &d[i..i + len])
            }
            w => panic!("unexpected wire type {w}"),
        };
        i += bytes.len();
        out.push((n, wire, v, bytes));
    }
    out
}

fn decode(data: &[u8]) -> Event {
    let mut e = Event::default();
    for (n, wire, v, bytes) in fields(data) {
        match (n, wire) {
            (1, 1) => e.wall_time = f64::from_le_bytes(bytes.try_into().unwrap()),
            (2, 0) => e.step = v,
            (3, 2) => e.file_version = Some(String::from_utf8(bytes.to_vec()).unwrap()),
            (5, 2) => {
                for (n, wire, _, value) in fields(bytes) {
                    assert_eq!((n, wire), (1, 2), "Summary.value");
                    let (mut tag, mut x) = (None, None);
                    for (n, wire, _, b) in fields(value) {
                        match (n, wire) {
                            (1, 2) => tag = Some(String::from_utf8(b.to_vec()).unwrap()),
                            (2, 5) => x = Some(f32::from_le_bytes(b.try_into().unwrap())),
                            other => panic!("unexpected Summary.Value field {other:?}"),
                        }
                    }
                    e.values.push((tag.unwrap(), x.unwrap()));
                }
            }
            other => panic!("unexpected Event field {other:?}"),
        }
    }
    e
}

/// The events of one file, every record's framing and both checksums checked.
fn read_events(path: &Path) -> Vec<Event> {
    let bytes = std::fs::read(path).unwrap();
    let mut rest = &bytes[..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let len = &rest[..8];
        let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(rest[8..12].try_into().unwrap());
        assert_eq!(crc, masked_crc(len), "{}: length CRC", path.display());
        let data = &rest[12..12 + n];
        let crc = u32::from_le_bytes(rest[12 + n..16 + n].try_into().unwrap());
        assert_eq!(crc, masked_crc(data), "{}: data CRC", path.display());
        out.push(decode(data));
        rest = &rest[16 + n..];
    }
    out
}

/// The run's event files in name order (TensorBoard's reading order), each checked to be
/// named as TensorBoard names them and to open with the file-version record.
fn event_files(run: &Path) -> Vec<(PathBuf, Vec<Event>)> {
    let name =
        regex::Regex::new(r"^events\.out\.tfevents\.\d{10}\.[^.]+(\.[^.]+)*\.\d+\.\d+$").unwrap();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(run.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let file = p.file_name().unwrap().to_string_lossy().to_string();
            assert!(name.is_match(&file), "{file}: not TensorBoard's naming");
            assert!(
                file.contains(&format!(".{}.", std::process::id())),
                "{file}"
            );
            let events = read_events(&p);
            assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
            assert!(events[0].values.is_empty() && events[0].wall_time > 1.6e9);
            assert!(events[1..].iter().all(|e| e.file_version.is_none()));
            (p, events)
        })
        .collect()
}

/// Every scalar of the event files at its step: (tag, step) -> value, each written once.
fn scalars(files: &[(PathBuf, Vec<Event>)]) -> BTreeMap<(String, u64), f32> {
    let mut out = BTreeMap::new();
    for (p, events) in files {
        for e in &events[1..] {
            assert!(!e.values.is_empty());
            for (tag, x) in &e.values {
                let before = out.insert((tag.clone(), e.step), *x);
                assert!(
                    before.is_none(),
                    "{}: {tag} at step {} twice",
                    p.display(),
                    e.step
                );
            }
        }
    }
    out
}

/// metrics.jsonl's numbers: (key, step) -> value as TensorBoard's f32.
fn metrics(run: &Path) -> BTreeMap<(String, u64), f32> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let step = v["step"].as_u64().unwrap();
        for (k, x) in v.as_object().unwrap() {
            if k != "step" {
                let x = x
                    .as_f64()
                    .unwrap_or_else(|| panic!("{k}: {x} is not a number"));
                out.insert((k.clone(), step), x as f32);
            }
        }
    }
    out
}

/// Grey PNGs and questions a tiny model can be trained on.
fn data(dir: &Path) -> PathBuf {
    let mut rows = Vec::new();
    for i in 0..4 {
        let img = image::GrayImage::from_fn(56, 56, |x, y| {
            image::Luma([((x * 7 + y * 3 + i * 50) % 256) as u8])
        });
        let file = format!("img-{i}.png");
        img.save(dir.join(&file)).unwrap();
        rows.push(serde_json::json!({
            "image": [file], "question": "Is this image bright or dark?",
            "options": ["bright", "dark"], "answer": if i % 2 == 0 { "bright" } else { "dark" },
            "rationale": "I look at the image.",
        }));
    }
    let path = dir.join("data.json");
    std::fs::write(&path, serde_json::to_string(&rows).unwrap()).unwrap();
    path
}

fn run_config(model: PathBuf, data: &Path, out: PathBuf) -> RunConfig {
    RunConfig {
        model,
        train_data: data.to_path_buf(),
        output_dir: out,
        template: PromptTemplate::Simple,
        micro_batch: 8,
        learning_rate: 1e-3,
        max_steps: 4,
        save_steps: 2,
        max_pixels: Some(56 * 56),
        device: Some("cpu".into()),
        ..RunConfig::default()
    }
}

#[test]
fn grpo_and_sft_runs_write_metrics_as_tensorboard_scalars() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = data(dir);
    let model = fixtures().join("tiny-a");

    // GRPO, interrupted after step 3 (its newest checkpoint is step 2) and resumed: the
    // resumed session rewrites step 3 and adds an event file.
    let run = dir.join("grpo");
    let cfg = || GrpoConfig {
        run: run_config(model.clone(), &data, run.clone()),
        method: GrpoMethod {
            num_generations: 4,
            batch_prompts: 2,
            max_completion_length: 8,
            eval_data: Some(data.clone()),
            eval_steps: 2,
            log_completions: 1,
            ..GrpoMethod::default()
        },
    };
    let t = std::time::Instant::now();
    medvlm::rl::trainer::train(cfg(), false, Some(3)).unwrap();
    let first = event_files(&run);
    assert_eq!(first.len(), 1);
    let steps: Vec<u64> = first[0].1[1..].iter().map(|e| e.step).collect();
    assert_eq!(steps, [1, 2, 3]);
    // Flushed step by step: what was written is what metrics.jsonl holds.
    assert_eq!(scalars(&first), metrics(&run));

    medvlm::rl::trainer::train(cfg(), true, None).unwrap();
    println!("grpo: {:.1}s", t.elapsed().as_secs_f64());
    let files = event_files(&run);
    assert_eq!(files.len(), 2, "a resumed run starts a file of its own");
    let steps = |f: &(PathBuf, Vec<Event>)| f.1[1..].iter().map(|e| e.step).collect::<Vec<_>>();
    assert_eq!(
        steps(&files[0]),
        [1, 2],
        "step 3 of the first session is trimmed"
    );
    assert_eq!(steps(&files[1]), [3, 4]);
    let (tb, jsonl) = (scalars(&files), metrics(&run));
    assert_eq!(
        tb, jsonl,
        "the event files hold metrics.jsonl's numbers, and only them"
    );
    let keys: Vec<&str> = jsonl.keys().map(|(k, _)| k.as_str()).collect();
    for want in [
        "loss",
        "kl",
        "lr",
        "reward_mean",
        "reward_format_mean",
        "reward_accuracy_mean",
        "reward_accuracy_std",
        "eval_accuracy",
    ] {
        assert!(keys.contains(&want), "{want} missing from {keys:?}");
    }
    for step in 1..=4 {
        assert!(tb.contains_key(&("loss".into(), step)));
        for k in keys.iter().filter(|k| k.starts_with("reward_")) {
            assert!(
                tb.contains_key(&(k.to_string(), step)),
                "{k} at step {step}"
            );
        }
    }
    // Wall times are the seconds they were written at, in order.
    let times: Vec<f64> = files
        .iter()
        .flat_map(|f| f.1.iter().map(|e| e.wall_time))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

    // SFT: the same writer.
    let run = dir.join("sft");
    let t = std::time::Instant::now();
    medvlm::sft::train(
        SftConfig {
            run: run_config(model.clone(), &data, run.clone()),
            method: SftMethod { batch_size: 2 },
        },
        false,
        None,
    )
    .unwrap();
    println!("sft: {:.1}s", t.elapsed().as_secs_f64());
    let files = event_files(&run);
    assert_eq!(files.len(), 1);
    let (tb, jsonl) = (scalars(&files), metrics(&run));
    assert_eq!(tb, jsonl);
    assert_eq!(
        tb.keys().filter(|(k, _)| k == "loss").count(),
        4,
        "a loss at every step"
    );
}
