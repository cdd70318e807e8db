//! `medvlm eval --suite`: every model on every benchmark, one table, resumable.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::{fixtures, medvlm, s};

/// The benchmark fixtures and what tools/make_bench_fixtures.py counted in them.
fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("bench/expected.json")).unwrap())
        .unwrap()
}

/// A suite file: `models` as (name, path), `benchmarks` as fixture names, `extra` added at
/// the top.
fn write_suite(path: &Path, extra: &str, models: &[(&str, &Path)], benchmarks: &[&str]) {
    let mut t = format!("{extra}\nmax_new_tokens = 4\n");
    for (name, p) in models {
        t.push_str(&format!(
            "\n[[model]]\nname = \"{name}\"\npath = \"{}\"\n",
            p.display()
        ));
    }
    for b in benchmarks {
        t.push_str(&format!(
            "\n[[benchmark]]\nname = \"{b}\"\npath = \"{}\"\n",
            fixtures().join("bench").join(b).display()
        ));
    }
    std::fs::write(path, t).unwrap();
}

fn run_suite(suite: &Path, out: &Path, more: &[&str]) -> (bool, String, String) {
    let mut args = vec!["eval", "--suite", s(suite), "--out", s(out)];
    args.extend_from_slice(more);
    medvlm(&args)
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

/// The (id, row) of every line of a pair's items.jsonl.
fn keys(items: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(items)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_str().unwrap().to_string(),
                v["row"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The pair's entry of report.json.
fn pair<'a>(r: &'a serde_json::Value, model: &str, bench: &str) -> &'a serde_json::Value {
    r["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["model"] == model && p["benchmark"] == bench)
        .unwrap_or_else(|| panic!("no pair {model}/{bench}"))
}

/// Seven benchmarks, one model under two names: a table of two rows and seven columns,
/// each cell's n the item count the fixture script counted, each column naming the
/// protocols that decide it; every pair's items.jsonl holds each item once.
#[test]
fn suite_tables_every_benchmark_for_every_model() {
    let want = expected();
    let names: Vec<&str> = want
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(names.len(), 7);
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-a");
    let file = tmp.path().join("suite.toml");
    write_suite(&file, "", &[("a", &model), ("b", &model)], &names);
    let out = tmp.path().join("out");
    let (ok, stdout, err) = run_suite(&file, &out, &[]);
    assert!(ok, "{err}");
    // Each model is loaded once, not once per benchmark.
    assert_eq!(err.matches("model a: loading").count(), 1, "{err}");
    assert_eq!(err.matches("model b: loading").count(), 1, "{err}");
    let r = report(&out);
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["model"], "a");
    assert_eq!(rows[1]["model"], "b");
    let columns = r["columns"].as_array().unwrap();
    let column_names: Vec<&str> = columns
        .iter()
        .map(|c| c["benchmark"].as_str().unwrap())
        .collect();
    assert_eq!(column_names, names);
    for c in columns {
        let kinds = want[c["benchmark"].as_str().unwrap()]["kind"]
            .as_object()
            .unwrap();
        let mut protocols = Vec::new();
        for (k, p) in [
            ("choice", "mc-letter"),
            ("closed", "closed"),
            ("open", "open-exact"),
        ] {
            if kinds.contains_key(k) {
                protocols.push(p);
            }
        }
        assert_eq!(c["protocols"], serde_json::json!(protocols), "{c}");
        assert_eq!(c["medvlm_version"], env!("CARGO_PKG_VERSION"));
    }
    for row in rows {
        let cells = row["cells"].as_array().unwrap();
        assert_eq!(cells.len(), 7);
        for (cell, name) in cells.iter().zip(&names) {
            assert_eq!(cell["benchmark"], *name);
            assert_eq!(cell["n"], want[*name]["items"], "{name}");
            let items = out
                .join(row["model"].as_str().unwrap())
                .join(name)
                .join("items.jsonl");
            let mut k = keys(&items);
            assert_eq!(k.len() as u64, want[*name]["items"].as_u64().unwrap());
            k.sort();
            k.dedup();
            assert_eq!(k.len() as u64, want[*name]["items"].as_u64().unwrap());
        }
    }
    // The same model under two names scores the same.
    assert_eq!(rows[0]["cells"], rows[1]["cells"]);
    // The per-pair reports are eval's own, skipped rows counted as the fixture script did.
    for name in &names {
        let all = pair(&r, "a", name)["report"]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["modality"] == "all")
            .unwrap()
            .clone();
        let skipped: u64 = want[*name]["skipped"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(all["skipped"].as_u64().unwrap(), skipped, "{name}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let header = md.lines().find(|l| l.starts_with("| model |")).unwrap();
    assert!(
        header.contains(&format!(
            "vqa-rad (closed, open-exact; medvlm {})",
            env!("CARGO_PKG_VERSION")
        )),
        "{header}"
    );
    assert!(md.lines().any(|l| l.starts_with("| a | ")), "{md}");
    assert!(md.lines().any(|l| l.starts_with("| b | ")), "{md}");
    assert!(
        md.contains("## slake") && md.contains("| kind | n |"),
        "{md}"
    );
    assert!(stdout.contains("| model |"), "{stdout}");
}

/// An interrupted pair resumes: the items missing from its items.jsonl (a last line cut
/// short included) are scored, the others reused, and the report is the uninterrupted
/// one's. A complete suite rerun scores nothing. A changed setting is refused in one line;
/// --force scores the pairs again.
#[test]
fn suite_resumes_and_refuses_changed_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-a");
    let file = tmp.path().join("suite.toml");
    write_suite(
        &file,
        "batch_size = 2",
        &[("tiny", &model)],
        &["mmmu", "path-vqa"],
    );
    let out = tmp.path().join("out");
    let (ok, _, err) = run_suite(&file, &out, &[]);
    assert!(ok, "{err}");
    let whole = report(&out);
    assert_eq!(pair(&whole, "tiny", "mmmu")["scored"], 7);
    assert_eq!(pair(&whole, "tiny", "mmmu")["reused"], 0);
    let items = out.join("tiny/mmmu/items.jsonl");
    let text = std::fs::read_to_string(&items).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7);
    // Interrupted after 3 items and in the middle of writing the fourth.
    let cut = format!(
        "{}\n{}",
        lines[..3].join("\n"),
        &lines[3][..lines[3].len() / 2]
    );
    std::fs::write(&items, cut).unwrap();

    let (ok, stdout, err) = run_suite(&file, &out, &[]);
    assert!(ok, "{err}");
    assert!(
        err.contains("tiny/mmmu: 7 items: 3 already in items.jsonl, 4 to score"),
        "{err}"
    );
    assert!(
        err.contains("tiny/path-vqa: 5 items: 5 already in items.jsonl, 0 to score"),
        "{err}"
    );
    assert!(
        stdout.contains("4 items scored, 8 reused from an earlier run"),
        "{stdout}"
    );
    let resumed = report(&out);
    assert_eq!(pair(&resumed, "tiny", "mmmu")["reused"], 3);
    assert_eq!(pair(&resumed, "tiny", "mmmu")["scored"], 4);
    assert_eq!(pair(&resumed, "tiny", "path-vqa")["scored"], 0);
    for b in ["mmmu", "path-vqa"] {
        assert_eq!(
            pair(&resumed, "tiny", b)["report"],
            pair(&whole, "tiny", b)["report"],
            "{b}"
        );
    }
    assert_eq!(resumed["rows"], whole["rows"]);
    let mut k = keys(&items);
    assert_eq!(k.len(), 7);
    k.sort();
    k.dedup();
    assert_eq!(k.len(), 7, "every item once");
    // Each line the uninterrupted run wrote is there (outputs and scores alike).
    let again: BTreeMap<String, String> = std::fs::read_to_string(&items)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (format!("{}#{}", v["id"], v["row"]), l.to_string())
        })
        .collect();
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(
            again.get(&format!("{}#{}", v["id"], v["row"])),
            Some(&l.to_string())
        );
    }

    // Complete: nothing to score.
    let (ok, stdout, err) = run_suite(&file, &out, &[]);
    assert!(ok, "{err}");
    assert!(stdout.contains("0 items scored, 12 reused"), "{stdout}");
    assert!(
        err.contains("model tiny: every pair complete, not loaded"),
        "{err}"
    );

    // A changed setting is refused, naming the pair, the setting and --force.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace("max_new_tokens = 4", "max_new_tokens = 5"),
    )
    .unwrap();
    let (ok, _, err) = run_suite(&file, &out, &[]);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ")
            && err.contains("tiny/mmmu/settings.json")
            && err.contains("max_new_tokens was 4, now 5")
            && err.contains("--force"),
        "{err}"
    );
    let (ok, stdout, err) = run_suite(&file, &out, &["--force"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("12 items scored, 0 reused"), "{stdout}");
    assert_eq!(keys(&items).len(), 7);
}

/// A bad suite file is one line naming the file and the key; the suite takes the place of
/// --model and --data.
#[test]
fn suite_file_errors_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-a");
    let file = tmp.path().join("bad.toml");
    let out = tmp.path().join("out");
    let bench = fixtures().join("bench/slake");
    let m = format!("[[model]]\npath = \"{}\"\n", model.display());
    let b = format!("[[benchmark]]\npath = \"{}\"\n", bench.display());
    for (text, says) in [
        (
            format!("{m}{b}colour = \"red\"\n"),
            "unknown field `colour`",
        ),
        (
            format!("[[model]]\nname = \"x\"\n{b}"),
            "missing field `path`",
        ),
        (
            format!("[[model]]\npath = \"no/such/model\"\n{b}"),
            "model[0]: path",
        ),
        (
            format!("{m}[[benchmark]]\npath = \"/no/such/bench\"\n"),
            "benchmark[0]: path /no/such/bench",
        ),
        (
            format!("{m}{b}open_protocol = [\"bleu\"]\n"),
            "benchmark[0]: open_protocol",
        ),
        (
            format!("{m}{b}language = \"fr\"\n"),
            "benchmark[0]: language",
        ),
        (format!("max_new_tokens = 0\n{m}{b}"), "max_new_tokens"),
        (m.clone(), "no [[benchmark]]"),
        (
            format!("{m}{m}{b}"),
            "model[1]: name \"tiny-a\" is taken by another model",
        ),
    ] {
        std::fs::write(&file, &text).unwrap();
        let (ok, _, err) = run_suite(&file, &out, &[]);
        assert!(!ok, "{text}");
        assert_eq!(err.trim().lines().count(), 1, "{text}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(s(&file)) && err.contains(says),
            "{text}: {err}"
        );
    }
    assert!(!out.exists(), "nothing written for a bad suite");
    std::fs::write(&file, format!("{m}{b}")).unwrap();
    let (ok, _, err) = medvlm(&[
        "eval",
        "--suite",
        s(&file),
        "--data",
        s(&bench),
        "--out",
        s(&out),
    ]);
    assert!(!ok);
    assert!(err.contains("cannot be used with"), "{err}");
}
