//! Training on benchmarks as downloaded (issue #26): closed and open rows through `train
//! grpo` and `train sft`, the data settings (`--format`, `--split`, `--language`) and the
//! accuracy reward's protocols (`--closed-reward-protocol`, `--open-reward-protocol`).

use std::path::Path;

use crate::common::*;
use medvlm::data::score::{score_completion, Protocol};
use medvlm::data::{self, Answer, DataOptions, PromptTemplate};

fn bench(name: &str) -> std::path::PathBuf {
    fixtures().join("bench").join(name)
}

/// One GRPO step of tiny-a on `data` (every row in the step); returns completions.jsonl's
/// records.
fn grpo_step(data: &Path, out: &Path, rows: usize, extra: &[&str]) -> Vec<serde_json::Value> {
    let completions = (2 * rows).to_string();
    let rows = rows.to_string();
    let model = fixtures().join("tiny-a");
    let mut args = vec![
        "train",
        "grpo",
        "--model",
        s(&model),
        "--train-data",
        s(data),
        "--output-dir",
        s(out),
        "--max-steps",
        "1",
        "--num-generations",
        "2",
        "--batch-prompts",
        &rows,
        "--max-completion-length",
        "8",
        "--log-completions",
        &completions,
        "--max-pixels",
        "3136",
        "--micro-batch",
        "4",
    ];
    args.extend_from_slice(extra);
    let (ok, _, err) = medvlm(&args);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(out.join("completions.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every completion of both kinds is logged with its accuracy reward: the protocol's score of
/// the logged completion against the logged gold answer.
fn assert_rewards_of_both_kinds(records: &[serde_json::Value], rows: usize, open: Protocol) {
    assert_eq!(records.len(), 2 * rows, "{records:?}");
    for kind in ["closed", "open"] {
        let of_kind: Vec<&serde_json::Value> =
            records.iter().filter(|r| r["kind"] == kind).collect();
        assert!(!of_kind.is_empty(), "no {kind} row in {records:?}");
        for r in of_kind {
            let acc = r["rewards"]["accuracy"].as_f64().unwrap();
            let protocol = if kind == "closed" {
                Protocol::Closed
            } else {
                open
            };
            let want = score_completion(
                protocol,
                r["completion"].as_str().unwrap(),
                r["solution"].as_str().unwrap(),
            );
            assert!((acc - want).abs() < 1e-6, "{r}: want {want}");
            assert!(r["rewards"]["format"].as_f64().is_some(), "{r}");
            assert!(r["solution"].as_str().is_some_and(|s| !s.is_empty()), "{r}");
        }
    }
}

#[test]
fn grpo_steps_on_slake_and_vqa_rad_reward_closed_and_open_rows() {
    let tmp = tempfile::tempdir().unwrap();
    // SLAKE's train split: one closed English row, one open Chinese row.
    let records = grpo_step(
        &bench("slake"),
        &tmp.path().join("slake"),
        2,
        &["--format", "slake", "--split", "train"],
    );
    assert_rewards_of_both_kinds(&records, 2, Protocol::OpenF1);
    let config = std::fs::read_to_string(tmp.path().join("slake/config.toml")).unwrap();
    for line in [
        "format = \"slake\"",
        "split = [\"train\"]",
        "closed_reward_protocol = \"closed\"",
        "open_reward_protocol = \"open-f1\"",
    ] {
        assert!(config.contains(line), "{line} not in {config}");
    }
    // VQA-RAD's parquet (images embedded), every split, format found from the folder, open
    // questions by exact match.
    let records = grpo_step(
        &bench("vqa-rad"),
        &tmp.path().join("vqa-rad"),
        5,
        &["--open-reward-protocol", "open-exact"],
    );
    assert_rewards_of_both_kinds(&records, 5, Protocol::OpenExact);
    for r in records.iter().filter(|r| r["kind"] == "open") {
        let acc = r["rewards"]["accuracy"].as_f64().unwrap();
        assert!(acc == 0.0 || acc == 1.0, "exact match is 0 or 1: {r}");
    }
}

#[test]
fn sft_step_on_slake_supervises_the_answer_text() {
    // The prompt asks for a word or phrase in <answer> tags; the target is the answer text in
    // them, so what SFT teaches is what the reward and eval read.
    let (ds, _) = data::load_data(
        &bench("slake"),
        &DataOptions {
            splits: vec!["train".into()],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.items.len(), 2);
    let processor =
        medvlm::processor::Processor::from_dir(&fixtures().join("tiny-a"), &Default::default())
            .unwrap();
    for item in &ds.items {
        let gold = match &item.answer {
            Answer::Closed { answer } | Answer::Open { answer } => answer.clone(),
            Answer::Choice { .. } => panic!("SLAKE has no multiple choice"),
        };
        assert_eq!(
            medvlm::sft::target_text(&processor, item),
            format!("<answer>{gold}</answer>")
        );
        let prompt = PromptTemplate::Paper.text(item);
        assert!(prompt.contains(&item.question), "{prompt}");
        assert!(
            prompt.contains("a single word or a short phrase, inside <answer>...</answer>"),
            "{prompt}"
        );
        assert!(!prompt.contains("single-letter"), "{prompt}");
    }

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sft");
    let (ok, _, err) = medvlm(&[
        "train",
        "sft",
        "--model",
        s(&fixtures().join("tiny-a")),
        "--train-data",
        s(&bench("slake")),
        "--split",
        "train",
        "--output-dir",
        s(&out),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--max-pixels",
        "3136",
    ]);
    assert!(ok, "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(
        first["loss"].as_f64().is_some_and(f64::is_finite),
        "{first}"
    );
    assert!(out.join("final").is_dir());
}

/// The memory plan reads rows without options, with several images (MedXpertQA) and with
/// none (MMMU's text-only rows have their images in placeholders; PMC-VQA one each).
#[test]
fn memory_plan_reads_benchmark_rows() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["medxpertqa", "mmmu", "slake"] {
        let (ok, stdout, err) = medvlm(&[
            "train",
            "grpo",
            "--model",
            s(&fixtures().join("tiny-a")),
            "--train-data",
            s(&bench(name)),
            "--output-dir",
            s(&tmp.path().join(name)),
            "--max-pixels",
            "3136",
            "--plan",
        ]);
        assert!(ok, "{name}: {err}");
        assert!(stdout.contains("memory plan"), "{name}: {stdout}");
    }
}

#[test]
fn bad_data_and_protocol_settings_are_one_line_errors_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let medvlm_json = dir.join("rows.json");
    std::fs::write(&medvlm_json, "[]").unwrap();
    let slake = bench("slake");
    let model = fixtures().join("tiny-a");
    let out = dir.join("out");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--closed-reward-protocol", "nope"],
            "--closed-reward-protocol: unknown scoring protocol \"nope\"",
        ),
        (
            &["--open-reward-protocol", "closed"],
            "--open-reward-protocol closed is not an open-question protocol",
        ),
        (
            &["--closed-reward-protocol", "open-f1"],
            "--closed-reward-protocol open-f1 is not a closed-question protocol",
        ),
        (
            &["--open-reward-protocol", "mc-letter"],
            "--open-reward-protocol mc-letter is not an open-question protocol",
        ),
        (&["--format", "slakk"], "--format must be medvlm"),
        (
            &["--language", "fr"],
            "--language must be en or zh, got \"fr\"",
        ),
        (
            &["--image-root", "/tmp"],
            "--image-root applies to MedVLM-R1 data",
        ),
        (&["--split", "train"], "--split applies to benchmarks"),
        (
            &["--eval-split", "test"],
            "--eval-split is set but eval_data is not",
        ),
        // The loader's error names the split and lists the benchmark's (SLAKE's train split
        // for training: no skipped-row warnings before it).
        (
            &[
                "--split",
                "train",
                "--eval-data",
                s(&slake),
                "--eval-split",
                "nosuchsplit",
            ],
            "no split nosuchsplit (its splits: train, validation, test)",
        ),
    ];
    for (extra, needle) in cases {
        // --split is refused for MedVLM-R1 data, everything else is tried on SLAKE.
        let data = if *extra == ["--split", "train"] {
            &medvlm_json
        } else {
            &slake
        };
        let mut args = vec![
            "train",
            "grpo",
            "--model",
            s(&model),
            "--train-data",
            s(data),
            "--output-dir",
            s(&out),
        ];
        args.extend_from_slice(extra);
        let (ok, _, err) = medvlm(&args);
        assert!(!ok, "{extra:?} should fail");
        assert!(
            err.starts_with("error: ") && err.trim().lines().count() == 1,
            "{extra:?}: {err}"
        );
        assert!(err.contains(needle), "{needle:?} not in {err}");
        assert!(!out.exists(), "no run directory may be created");
    }
}
