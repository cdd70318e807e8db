//! `medvlm demo --quick` end to end, as a new user runs it (default seed): every stage leaves its files, and
//! GRPO's held-out accuracy beats the warm start's by the margin the GRPO learning test
//! established (25 points). The accuracies are recomputed here from the per-item outputs and
//! the data files, with this file's own answer reading, not taken from the demo's table.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The letter in `<answer>X</answer>` when the output has exactly that shape after a think
/// block; anything else counts as wrong.
fn answer_letter(output: &str) -> Option<char> {
    let re =
        regex::Regex::new(r"(?s)^<think>.*?</think>\s*<answer>\s*([A-Z])\s*</answer>\s*$").unwrap();
    re.captures(output.trim()).and_then(|c| c[1].chars().next())
}

/// Accuracy of one model's outputs on one data file, from scratch.
fn accuracy(items: &Path, data: &Path) -> (f64, usize) {
    let rows = read_json(data);
    let rows = rows.as_array().unwrap();
    let items = read_jsonl(items);
    assert_eq!(
        items.len(),
        rows.len(),
        "{}: one output per row",
        data.display()
    );
    let mut correct = 0;
    for it in &items {
        let row = &rows[it["row"].as_u64().unwrap() as usize];
        let opts: Vec<&str> = row["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        let k = opts
            .iter()
            .position(|o| *o == row["answer"].as_str().unwrap())
            .unwrap();
        let truth = (b'A' + k as u8) as char;
        if answer_letter(it["output"].as_str().unwrap()) == Some(truth) {
            correct += 1;
        }
    }
    (correct as f64 / items.len() as f64, items.len())
}

#[test]
fn quick_demo_runs_every_stage_and_grpo_beats_the_warm_start() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let run = Command::new(env!("CARGO_BIN_EXE_medvlm"))
        // The README's invocation, default seed included.
        .args(["demo", "--quick", "--out", out.to_str().unwrap()])
        .output()
        .expect("run medvlm demo");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "demo failed:\n{stdout}\n{stderr}");
    println!("{stdout}");

    // Every stage's files.
    for f in [
        "data-train/data.json",
        "data-test/data.json",
        "data-ood/data.json",
        "data-warm/warm.json",
        "model-init/config.json",
        "model-init/tokenizer.json",
        "model-init/tokenizer_config.json",
        "model-init/preprocessor_config.json",
        "model-init/model.safetensors",
        "warm-start/final/model.safetensors",
        "warm-start/metrics.jsonl",
        "grpo/final/model.safetensors",
        "grpo/final/config.json",
        "grpo/metrics.jsonl",
        "grpo/completions.jsonl",
        "grpo/config.toml",
        "grpo/curves.png",
        "sft/final/model.safetensors",
        "sft/metrics.jsonl",
        "demo.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The images the data files name exist (the first few of each set).
    for set in ["data-train", "data-test", "data-ood"] {
        let rows = read_json(&out.join(set).join("data.json"));
        for r in rows.as_array().unwrap().iter().take(5) {
            let img = r["image"][0].as_str().unwrap();
            assert!(out.join(set).join(img).is_file(), "{set}/{img} missing");
        }
    }
    // The curves are a real PNG.
    let png = image::open(out.join("grpo/curves.png")).expect("curves.png decodes");
    assert!(png.width() > 100 && png.height() > 100);
    // GRPO and the SFT baseline ran the same number of steps.
    let steps = |f: &str| {
        std::fs::read_to_string(out.join(f))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(steps("grpo/metrics.jsonl"), steps("sft/metrics.jsonl"));
    assert!(steps("grpo/metrics.jsonl") >= 10);

    // Accuracies recomputed from every item's output.
    let test = out.join("data-test/data.json");
    let ood = out.join("data-ood/data.json");
    let mut acc = BTreeMap::new();
    for model in ["warm-start", "sft", "grpo"] {
        let (a, n) = accuracy(&out.join(format!("eval/{model}-in-domain.jsonl")), &test);
        let (b, m) = accuracy(&out.join(format!("eval/{model}-out-of-domain.jsonl")), &ood);
        println!("{model}: in domain {a:.3} (n={n}), out of domain {b:.3} (n={m})");
        acc.insert(model, (a, b));
    }
    // The table the demo printed and saved agrees with the recomputation.
    let report = read_json(&out.join("demo.json"));
    for (model, name) in [
        ("warm-start", "warm start"),
        ("sft", "SFT"),
        ("grpo", "GRPO"),
    ] {
        let (mut k, mut n) = (0.0, 0.0);
        for c in report["cells"].as_array().unwrap() {
            if c["model"] == name && c["in_domain"] == true {
                k += c["accuracy"].as_f64().unwrap() * c["n"].as_f64().unwrap();
                n += c["n"].as_f64().unwrap();
            }
        }
        assert!(
            (k / n - acc[model].0).abs() < 1e-9,
            "{model}: demo.json says {}, items say {}",
            k / n,
            acc[model].0
        );
    }
    let (warm, grpo) = (acc["warm-start"].0, acc["grpo"].0);
    assert!(
        grpo >= warm + 0.25,
        "GRPO {grpo:.3} is not 25 points above the warm start {warm:.3}"
    );
}
