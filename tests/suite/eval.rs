//! The paper's test file, evaluation reports and `ask`, on the real MedVLM-R1 test set
//! beside the repository (../shared/data/medvlm-r1-testset: 900 questions, 8 of their
//! images).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use medvlm::data::{self, Modality};
use medvlm::sft::{SftConfig, SftMethod};
use medvlm::train::config::RunConfig;
use serde_json::Value;

fn testset() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/medvlm-r1-testset");
    assert!(
        d.join("MRI_CT_XRAY_300each_dataset.json").is_file(),
        "the MedVLM-R1 test set is expected at {}",
        d.display()
    );
    d
}

/// All 900 rows load as 300 MRI, 300 CT, 300 X-ray, and the `problem`/`solution` we build
/// from question, options and answer equal the ones the paper's file carries, every row.
#[test]
fn the_papers_test_file_loads_and_rebuilds_its_prompts() {
    let file = testset().join("MRI_CT_XRAY_300each_dataset.json");
    let ds = data::load_with(&file, None, false).unwrap();
    assert!(ds.skipped.is_empty(), "{:?}", ds.skipped.first());
    let mut counts: BTreeMap<Modality, usize> = BTreeMap::new();
    for it in &ds.items {
        *counts.entry(it.modality.clone()).or_default() += 1;
    }
    assert_eq!(counts.get(&Modality::Mri), Some(&300));
    assert_eq!(counts.get(&Modality::Ct), Some(&300));
    assert_eq!(counts.get(&Modality::XRay), Some(&300));
    let raw: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(raw.len(), 900);
    for (it, row) in ds.items.iter().zip(&raw) {
        assert_eq!(
            it.problem,
            row["problem"].as_str().unwrap(),
            "row {}",
            it.index
        );
        assert_eq!(
            it.letter().map(String::from).unwrap_or_default(),
            row["solution"].as_str().unwrap(),
            "row {}",
            it.index
        );
        assert_eq!(it.subset, row["subset"].as_str().unwrap());
    }
    // With images checked, only the rows whose images are present remain; the others are
    // reported with their row and reason.
    let ds = data::load(&file, None).unwrap();
    assert_eq!(ds.items.len(), 8);
    assert_eq!(ds.skipped.len(), 892);
    assert!(
        ds.skipped[0].reason.contains("not found"),
        "{}",
        ds.skipped[0]
    );
}

/// The reference reading of an answer for this test: the paper's own evaluation regex.
fn paper_letter(output: &str) -> Option<char> {
    let re = regex::Regex::new(r"<answer>\s*([A-Z])\s*</answer>").unwrap();
    re.captures(output).map(|c| c[1].chars().next().unwrap())
}

/// A tiny model fine-tuned on the 8 real images answers them; `medvlm eval` writes the
/// report files, and the report's per-modality accuracy equals what this test recomputes
/// from items.jsonl and the original file on its own.
#[test]
fn eval_writes_reports_whose_accuracy_the_items_confirm() {
    let tmp = tempfile::tempdir().unwrap();
    let file = testset().join("MRI_CT_XRAY_300each_dataset.json");
    let model = medvlm::sft::train(
        SftConfig {
            run: RunConfig {
                model: fixtures().join("tiny-a"),
                train_data: file.clone(),
                output_dir: tmp.path().join("sft"),
                micro_batch: 8,
                learning_rate: 3e-3,
                max_steps: 30,
                save_steps: 0,
                max_pixels: Some(28 * 28 * 12),
                device: Some("cpu".into()),
                ..SftConfig::default().run
            },
            method: SftMethod { batch_size: 8 },
        },
        false,
        None,
    )
    .unwrap();
    let out = tmp.path().join("eval");
    let (ok, stdout, err) = medvlm(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&file),
        "--max-new-tokens",
        "12",
        "--max-pixels",
        "9408",
        "--out",
        s(&out),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("892"), "skipped rows are reported: {err}");
    assert!(
        stdout.contains("| modality |") && stdout.contains("| all |"),
        "{stdout}"
    );
    for f in ["report.md", "report.json", "items.jsonl"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    let raw: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let items: Vec<Value> = std::fs::read_to_string(out.join("items.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(items.len(), 8);
    let mut tally: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for it in &items {
        let row = &raw[it["row"].as_u64().unwrap() as usize];
        let opts: Vec<&str> = row["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        let truth = (b'A'
            + opts
                .iter()
                .position(|o| *o == row["answer"].as_str().unwrap())
                .unwrap() as u8) as char;
        let got = paper_letter(it["output"].as_str().unwrap());
        let m = match row["subset"].as_str().unwrap() {
            s if s.starts_with("MR") => "MRI",
            s if s.starts_with("CT") => "CT",
            _ => "X-Ray",
        };
        for key in [m, "all"] {
            let e = tally.entry(key.to_string()).or_default();
            e.0 += 1;
            e.1 += (got == Some(truth)) as usize;
        }
        assert_eq!(it["correct"].as_bool().unwrap(), got == Some(truth));
    }
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for r in report["rows"].as_array().unwrap() {
        if r["n"] == 0 {
            // A modality whose rows were all skipped: listed, nothing evaluated.
            assert!(
                r["accuracy"].is_null() && r["skipped"].as_u64().unwrap() > 0,
                "{r}"
            );
            assert!(!tally.contains_key(r["modality"].as_str().unwrap()));
            continue;
        }
        let (n, k) = tally[r["modality"].as_str().unwrap()];
        assert_eq!(r["n"].as_u64().unwrap() as usize, n);
        assert!((r["accuracy"].as_f64().unwrap() - k as f64 / n as f64).abs() < 1e-12);
    }
    let (n, k) = tally["all"];
    println!("fine-tuned tiny model: {k}/{n} correct");
    assert!(
        k >= 6,
        "the fine-tuned model should answer most of its training images ({k}/{n})"
    );

    // The likelihood baseline scores every option without generating.
    let out2 = tmp.path().join("eval-lik");
    let (ok, _, err) = medvlm(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&file),
        "--likelihood",
        "--max-pixels",
        "9408",
        "--out",
        s(&out2),
    ]);
    assert!(ok, "{err}");
    let line = std::fs::read_to_string(out2.join("items.jsonl")).unwrap();
    let first: Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(
        first["option_logprobs"].as_array().unwrap().len(),
        first["options"].as_array().unwrap().len()
    );
}

#[test]
fn ask_prints_reasoning_and_answer_apart() {
    let img = testset().join("images/brain003631.png");
    let (ok, out, err) = medvlm(&[
        "ask",
        "--model",
        s(&fixtures().join("tiny-a")),
        "--image",
        s(&img),
        "--question",
        "What modality is this?",
        "--options",
        "MRI;CT;X-Ray",
        "--max-new-tokens",
        "8",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("Reasoning:") && out.contains("Answer:"),
        "{out}"
    );
    let (ok, out, err) = medvlm(&[
        "ask",
        "--model",
        s(&fixtures().join("tiny-a")),
        "--image",
        s(&img),
        "--question",
        "What modality is this?",
        "--options",
        "MRI;CT;X-Ray",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    assert!(ok, "{err}");
    let j: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(j.get("reasoning").is_some() && j.get("output").is_some());
}

/// Under a template that opens `<think>` in the prompt, `ask` and `eval` read the completion
/// with that opening in front: `ask --json`'s output starts with it and its reasoning is the
/// generated text up to `</think>` (all of it when the model never closes the block), split
/// here by the test's own rule; `eval` records the same text; `eval --likelihood` scores each
/// option as `</think>` and the letter.
#[test]
fn ask_and_eval_read_a_thinking_templates_completion_after_its_opening() {
    let tmp = tempfile::tempdir().unwrap();
    let model = thinking_copy("tiny-a", &tmp.path().join("thinking"));
    let img = testset().join("images/brain003631.png");
    let (ok, out, err) = medvlm(&[
        "ask",
        "--model",
        s(&model),
        "--image",
        s(&img),
        "--question",
        "What modality is this?",
        "--options",
        "MRI;CT;X-Ray",
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    assert!(ok, "{err}");
    let j: Value = serde_json::from_str(out.trim()).unwrap();
    let output = j["output"].as_str().unwrap();
    let generated = output
        .strip_prefix("<think>\n")
        .unwrap_or_else(|| panic!("{output:?}"));
    let reasoning = generated.split("</think>").next().unwrap().trim();
    assert_eq!(j["reasoning"], reasoning, "{j}");

    let data = tmp.path().join("q.json");
    std::fs::write(
        &data,
        serde_json::to_string(&serde_json::json!([{
            "image": [s(&img)], "question": "What modality is this?",
            "options": ["MRI", "CT", "X-Ray"], "answer": "MRI",
        }]))
        .unwrap(),
    )
    .unwrap();
    for likelihood in [false, true] {
        let out = tmp.path().join(format!("eval-{likelihood}"));
        let mut args = vec![
            "eval",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--max-new-tokens",
            "12",
            "--out",
            s(&out),
        ];
        if likelihood {
            args.push("--likelihood");
        }
        let (ok, _, err) = medvlm(&args);
        assert!(ok, "{err}");
        let line = std::fs::read_to_string(out.join("items.jsonl")).unwrap();
        let item: Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
        if likelihood {
            // The same prompt scored by `medvlm score` with the continuation `</think>A`.
            let rendered = item["prompt"].as_str().unwrap();
            let user = rendered
                .split("<|vision_end|>")
                .nth(1)
                .and_then(|t| t.split("<|im_end|>").next())
                .unwrap_or_else(|| panic!("{rendered:?}"));
            let score = |completion: &str| -> f64 {
                let (ok, out, err) = medvlm(&[
                    "score",
                    "--model",
                    s(&model),
                    "--image",
                    s(&img),
                    "--prompt",
                    user,
                    "--completion",
                    completion,
                    "--json",
                ]);
                assert!(ok, "{err}");
                let j: Value = serde_json::from_str(out.trim()).unwrap();
                j["logprob_sum"].as_f64().unwrap()
            };
            let a = item["option_logprobs"][0].as_f64().unwrap();
            let (closed, bare) = (score("</think>A"), score("A"));
            assert!((a - closed).abs() < 1e-3, "eval {a} vs score {closed}");
            assert!(
                (a - bare).abs() > 1e-2,
                "eval {a} vs the bare letter {bare}"
            );
        } else {
            // The eval prompt differs from ask's; its output opens the same way.
            let o = item["output"].as_str().unwrap();
            assert!(o.starts_with("<think>\n"), "{item}");
        }
    }
}

/// The paper's 900-row file with 8 of its images: every modality is reported with its
/// rows, how many were skipped and why, and what was evaluated; a modality with nothing
/// left says so instead of vanishing; the run's settings are recorded.
#[test]
fn eval_reports_skipped_rows_per_modality_and_its_settings() {
    let dir = testset();
    let file = dir.join("MRI_CT_XRAY_300each_dataset.json");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ev");
    let model = fixtures().join("tiny-a");
    let (ok, _, err) = medvlm(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&file),
        "--max-new-tokens",
        "2",
        "--out",
        s(&out),
    ]);
    assert!(ok, "{err}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let row = |m: &str| rows.iter().find(|r| r["modality"] == m).unwrap().clone();
    let images = std::fs::read_dir(dir.join("images")).unwrap().count() as u64;
    for m in ["MRI", "CT", "X-Ray"] {
        let r = row(m);
        assert_eq!(r["rows"], 300, "{m}");
        assert_eq!(
            r["skipped"].as_u64().unwrap() + r["n"].as_u64().unwrap(),
            300,
            "{m}"
        );
    }
    let all = row("all");
    assert_eq!(all["rows"], 900);
    assert_eq!(all["n"].as_u64().unwrap(), images);
    assert_eq!(
        all["skipped_by_reason"]["missing image"].as_u64().unwrap(),
        900 - images
    );
    // No X-Ray image is present: the line is there, with nothing evaluated.
    let x = row("X-Ray");
    assert_eq!(x["n"], 0);
    assert!(x["accuracy"].is_null());
    let st = &report["settings"];
    assert_eq!(st["max_new_tokens"], 2);
    assert_eq!(st["template"], "paper");
    assert!(st["medvlm_version"].is_string() && st["elapsed_s"].is_number());
    for line in std::fs::read_to_string(out.join("items.jsonl"))
        .unwrap()
        .lines()
    {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(v["images"][0].as_str().unwrap().ends_with(".png"), "{line}");
    }
    // Selecting the modality with nothing left names the rows and the reason.
    let (ok, _, err) = medvlm(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&file),
        "--modality",
        "X-Ray",
    ]);
    assert!(!ok);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.contains("all 300 rows of X-Ray were skipped") && last.contains("missing image"),
        "{err}"
    );
    let (ok, _, err) = medvlm(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&file),
        "--limit",
        "0",
    ]);
    assert!(!ok && err.contains("--limit must be at least 1"), "{err}");
}

/// A row whose file is not an image (or is damaged) is skipped with its reason and counted
/// like the other skipped rows, as the README says; the evaluation goes on.
#[test]
fn rows_whose_file_is_not_an_image_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let (ok, _, err) = medvlm(&["data", "synth", "--out", s(&data_dir), "--n", "3"]);
    assert!(ok, "{err}");
    let file = data_dir.join("data.json");
    let rows: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let first = rows[0]["image"][0].as_str().unwrap();
    std::fs::write(data_dir.join(first), "this is not an image").unwrap();
    let model = fixtures().join("tiny-a");
    for (name, extra) in [
        ("greedy", vec!["--max-new-tokens", "2"]),
        ("likelihood", vec!["--likelihood"]),
    ] {
        let out = tmp.path().join(name);
        let mut args = vec![
            "eval",
            "--model",
            s(&model),
            "--data",
            s(&file),
            "--out",
            s(&out),
        ];
        args.extend(extra);
        let (ok, _, err) = medvlm(&args);
        assert!(ok, "{name}: {err}");
        assert!(err.contains("skipped") && err.contains("row 0"), "{err}");
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        let all = report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["modality"] == "all")
            .unwrap()
            .clone();
        assert_eq!(all["rows"], 3, "{name}");
        assert_eq!(all["n"], 2, "{name}");
        assert_eq!(all["skipped"], 1, "{name}");
        assert_eq!(all["skipped_by_reason"]["unreadable image"], 1, "{name}");
        assert_eq!(report["skipped_rows"], 1);
        let items = std::fs::read_to_string(out.join("items.jsonl")).unwrap();
        assert_eq!(items.lines().count(), 2);
        assert!(!items.contains(first), "{items}");
        let md = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(md.contains("1 unreadable image"), "{md}");
    }
}
