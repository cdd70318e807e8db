//! Helpers shared by the integration tests: where the reference fixtures live and how to
//! read them. The fixtures come from tools/make_fixtures.py (PyTorch + transformers).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use medvlm::processor::{Content, Message};
use serde_json::Value;

/// For a test meant to cover a SIMD kernel this CPU cannot run (it then covers the fallback
/// the code takes instead): says so on stderr, so that a pass is not read as a check of the
/// kernel; with `MEDVLM_REQUIRE_SIMD=1` (a CI machine that should have the features) it fails.
pub fn note_without_simd(what: &str) {
    if std::env::var("MEDVLM_REQUIRE_SIMD").is_ok_and(|v| v == "1") {
        panic!("MEDVLM_REQUIRE_SIMD=1, but this CPU cannot run {what}");
    }
    use std::io::Write;
    // Through the handle: the harness swallows `eprintln!` of a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "skipped: {what}; checked the fallback instead"
    );
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Runs the `medvlm` binary; returns (success, stdout, stderr).
pub fn medvlm(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_medvlm"))
        .args(args)
        .output()
        .expect("run medvlm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn fixture_image(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

/// The reference cases of one tiny checkpoint: JSON metadata and tensors.
pub struct Cases {
    pub meta: Value,
    pub tensors: HashMap<String, Tensor>,
}

pub fn load_cases(model: &str) -> Cases {
    let dir = fixtures();
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("cases-{model}.json"))).unwrap(),
    )
    .unwrap();
    let tensors = candle_core::safetensors::load(
        dir.join(format!("cases-{model}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    Cases { meta, tensors }
}

impl Cases {
    pub fn list(&self) -> &Vec<Value> {
        self.meta["cases"].as_array().unwrap()
    }
    pub fn tensor(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture tensor {key} missing"))
    }
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// transformers' message JSON (content a string or a list of typed parts) as ours.
pub fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = m["role"].as_str().unwrap().to_string();
            let content = match &m["content"] {
                Value::String(s) => vec![Content::text(s.clone())],
                Value::Array(parts) => parts
                    .iter()
                    .map(|p| match p["type"].as_str().unwrap() {
                        "image" => Content::Image,
                        "text" => Content::text(p["text"].as_str().unwrap()),
                        other => panic!("unexpected part {other}"),
                    })
                    .collect(),
                other => panic!("unexpected content {other}"),
            };
            Message { role, content }
        })
        .collect()
}

/// Largest |a - b| over two same-shaped tensors, and the largest |b|.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let mut d = 0f32;
    let mut m = 0f32;
    for (x, y) in a.iter().zip(&b) {
        d = d.max((x - y).abs());
        m = m.max(y.abs());
    }
    (d, m)
}
