//! Every command the README shows and every example in a `--help` text runs as written.
//!
//! The commands run with bash in a scratch directory laid out like a user's: `medvlm` on the
//! PATH (this build), `../shared` beside it, and stand-ins for what the README assumes the
//! reader has: `./Qwen2-VL-2B-Instruct` is the tiny random Qwen2-VL of the fixtures (same
//! layout, same tokenizer kind and chat template, 0.2M parameters), `ct.dcm` / `scan.dcm` a
//! real CT DICOM, `scan.png` a real MRI slice, `mri_train.json` / `test.json` a few synthetic
//! rows, `runs/demo` a miniature `medvlm demo`, `tests/fixtures` the repository's. Each
//! ```sh block of the README runs on its own in a fresh copy of that directory (a reader may
//! start at any section); a block that cannot run offline here (a GPU, a 4.4 GB checkpoint,
//! the test suite itself) is preceded by `<!-- readme-test: skip: REASON -->`, and the
//! reason must be given. The help texts' examples run one after another in one copy, the
//! `train` commands' first (the others read the runs they write).

use std::path::{Path, PathBuf};
use std::process::Command;

const SKIP: &str = "<!-- readme-test: skip:";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shared() -> PathBuf {
    repo().join("../shared")
}

/// A ```sh block of the README: its first line number and text, or why it is not run.
struct Block {
    line: usize,
    text: String,
    skip: Option<String>,
}

fn sh_blocks(readme: &str) -> Vec<Block> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        if fence == "```sh" || fence == "```bash" || fence == "```shell" {
            let indent = lines[i].len() - fence.len();
            let prev = lines[..i].iter().rev().find(|l| !l.trim().is_empty());
            let skip = prev.and_then(|p| p.trim().strip_prefix(SKIP)).map(|r| {
                let r = r.trim_end_matches("-->").trim();
                assert!(
                    !r.is_empty(),
                    "README line {}: a skip needs a reason",
                    i + 1
                );
                r.to_string()
            });
            let start = i + 1;
            let mut text = String::new();
            i += 1;
            while i < lines.len() && lines[i].trim() != "```" {
                text.push_str(lines[i].get(indent..).unwrap_or(lines[i].trim_start()));
                text.push('\n');
                i += 1;
            }
            assert!(i < lines.len(), "README line {start}: unclosed code block");
            blocks.push(Block {
                line: start,
                text,
                skip,
            });
        }
        i += 1;
    }
    blocks
}

/// Runs one bash script in `dir` with this build's `medvlm` first on the PATH.
fn bash(dir: &Path, script: &str, what: &str) {
    let path = format!(
        "{}:{}",
        dir.join(".bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{script}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn medvlm(dir: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_medvlm"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run medvlm");
    assert!(
        out.status.success(),
        "medvlm {args:?} (setting up the stand-ins) failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Synthetic rows of `modality`, written as `file` in `dir` with image paths relative to it.
fn stand_in_data(dir: &Path, file: &str, modality: &str, n: usize, seed: u64) {
    let src = dir.join(".stand-in").join(file);
    medvlm(
        dir,
        &[
            "data",
            "synth",
            "--out",
            src.to_str().unwrap(),
            "--n",
            &n.to_string(),
            "--seed",
            &seed.to_string(),
            "--modality",
            modality,
            "--task",
            "presence",
        ],
    );
    let text = std::fs::read_to_string(src.join("data.json")).unwrap();
    let mut rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    for r in &mut rows {
        for img in r["image"].as_array_mut().unwrap() {
            let rel = format!(".stand-in/{file}/{}", img.as_str().unwrap());
            *img = serde_json::Value::String(rel);
        }
    }
    std::fs::write(dir.join(file), serde_json::to_string(&rows).unwrap()).unwrap();
}

/// The scratch directory: `<tmp>/template` with `<tmp>/shared` beside it, and the stand-ins.
/// [`fresh`] copies it for each run.
fn sandbox() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("template");
    std::fs::create_dir_all(work.join(".bin")).unwrap();
    let shared = shared()
        .canonicalize()
        .expect("../shared beside the repository (real test data)");
    std::os::unix::fs::symlink(&shared, tmp.path().join("shared")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_medvlm"), work.join(".bin/medvlm")).unwrap();

    copy_dir(
        &repo().join("tests/fixtures/tiny-a"),
        &work.join("Qwen2-VL-2B-Instruct"),
    );
    // A llama.cpp user's GGUF pair (`import-gguf --help`): the tiny Q4_K_M fixture.
    for (fixture, name) in [
        ("tiny-k-q4_k_m.gguf", "Qwen2-VL-2B-Instruct-Q4_K_M.gguf"),
        (
            "mmproj-tiny-k-f16.gguf",
            "mmproj-Qwen2-VL-2B-Instruct-f16.gguf",
        ),
    ] {
        std::fs::copy(
            repo().join("tests/fixtures/gguf").join(fixture),
            work.join(name),
        )
        .unwrap();
    }
    let ct = shared.join("data/medical-files/CT_small.dcm");
    std::fs::copy(&ct, work.join("ct.dcm")).unwrap();
    std::fs::copy(&ct, work.join("scan.dcm")).unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/images/mri-brain.png"),
        work.join("scan.png"),
    )
    .unwrap();
    // Benchmarks as downloaded: the fixtures in each real layout.
    for (fixture, name) in [
        ("slake", "SLAKE"),
        ("vqa-rad", "vqa-rad"),
        ("pmc-vqa", "PMC-VQA"),
    ] {
        copy_dir(
            &repo().join("tests/fixtures/bench").join(fixture),
            &work.join(name),
        );
    }
    // The suite `eval --help` shows, over two of them.
    std::fs::write(
        work.join("suite.toml"),
        "max_new_tokens = 4\n\n[[model]]\npath = \"Qwen2-VL-2B-Instruct\"\n\n\
         [[benchmark]]\npath = \"vqa-rad\"\n\n[[benchmark]]\npath = \"SLAKE\"\n",
    )
    .unwrap();
    stand_in_data(&work, "mri_train.json", "MRI", 2, 1);
    stand_in_data(&work, "test.json", "CT", 2, 2);
    // The paper's file where `--image-root data/` finds its 8 images.
    let testset = shared.join("data/medvlm-r1-testset");
    std::fs::copy(
        testset.join("MRI_CT_XRAY_300each_dataset.json"),
        work.join("MRI_CT_XRAY_300each_dataset.json"),
    )
    .unwrap();
    std::os::unix::fs::symlink(&testset, work.join("data")).unwrap();
    // `selftest` reads the repository's fixtures from tests/fixtures.
    std::fs::create_dir_all(work.join("tests")).unwrap();
    std::os::unix::fs::symlink(repo().join("tests/fixtures"), work.join("tests/fixtures")).unwrap();
    // A miniature demo run in runs/demo (the quick tour asks its GRPO checkpoint).
    medvlm(
        &work,
        &[
            "demo",
            "--quick",
            "--train-items",
            "4",
            "--test-items",
            "4",
            "--warm-steps",
            "2",
            "--rl-steps",
            "2",
            "--group",
            "2",
            "--rl-batch",
            "2",
        ],
    );
    (tmp, work)
}

/// A fresh copy of the template beside it (so `../shared` still resolves).
fn fresh(template: &Path, name: &str) -> PathBuf {
    let dir = template.with_file_name(name);
    let out = Command::new("cp")
        .args(["-a"])
        .arg(template)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cp -a: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

#[test]
fn every_readme_command_block_runs() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let blocks = sh_blocks(&readme);
    assert!(blocks.len() >= 5, "README has {} sh blocks", blocks.len());
    let (_tmp, template) = sandbox();
    let mut ran = 0;
    for b in &blocks {
        match &b.skip {
            Some(reason) => println!("README line {}: skipped ({reason})", b.line),
            None => {
                println!("README line {}: running", b.line);
                let work = fresh(&template, &format!("block-{}", b.line));
                bash(&work, &b.text, &format!("README block at line {}", b.line));
                ran += 1;
            }
        }
    }
    assert!(
        ran >= blocks.len() / 2,
        "only {ran} of {} blocks ran",
        blocks.len()
    );
}

/// `medvlm <path> --help`.
fn help(path: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_medvlm"))
        .args(path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "medvlm {path:?} --help");
    String::from_utf8(out.stdout).unwrap()
}

/// Every subcommand path (`["train", "grpo"]`, ...), from the help texts' command lists.
fn subcommands(prefix: Vec<String>, all: &mut Vec<Vec<String>>) {
    let text = help(&prefix);
    all.push(prefix.clone());
    let mut in_list = false;
    for line in text.lines() {
        if line.starts_with("Commands:") {
            in_list = true;
            continue;
        }
        if in_list {
            if !line.starts_with("  ") {
                break;
            }
            if line.starts_with("   ") {
                continue; // a description's continuation line
            }
            let name = line.split_whitespace().next().unwrap();
            if name != "help" {
                let mut p = prefix.clone();
                p.push(name.to_string());
                subcommands(p, all);
            }
        }
    }
}

/// The commands after "Example:" / "Examples:" in a help text: lines starting with
/// `medvlm `, joined with the lines a trailing `\` continues onto. Any other line there is a
/// failure (an example the help formatter wrapped cannot be pasted as it is printed).
fn examples(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut in_examples = false;
    let mut continues = false;
    for line in text.lines() {
        if line.starts_with("Example") {
            in_examples = true;
            continue;
        }
        if !in_examples || line.trim().is_empty() {
            continue;
        }
        if continues {
            let last = out.last_mut().unwrap();
            last.push('\n');
            last.push_str(line);
        } else {
            assert!(
                line.starts_with("  medvlm "),
                "help example line is not a command (wrapped?): {line:?}\n{text}"
            );
            out.push(line.trim().to_string());
        }
        continues = line.trim_end().ends_with('\\');
    }
    out
}

#[test]
fn every_help_example_runs() {
    let mut paths = Vec::new();
    subcommands(Vec::new(), &mut paths);
    // Training first: the other examples read what it writes (runs/grpo, runs/sft, ...).
    paths.sort_by_key(|p| p.first().map(|c| c != "train").unwrap_or(true));
    let (_tmp, template) = sandbox();
    let work = fresh(&template, "help");
    let mut ran = 0;
    for p in &paths {
        for ex in examples(&help(p)) {
            println!("medvlm {}: {ex}", p.join(" "));
            // A server runs until stopped: start it, wait for /health, stop it with
            // SIGTERM, and require a clean exit.
            let script = if p == &["serve"] {
                format!(
                    "{ex} &\nfor i in $(seq 1 600); do curl -sf http://127.0.0.1:8000/health \
                     > /dev/null && break; sleep 0.1; done\ncurl -sf \
                     http://127.0.0.1:8000/health\nkill -TERM $!\nwait $!\n"
                )
            } else {
                ex.clone()
            };
            bash(
                &work,
                &script,
                &format!("`medvlm {} --help` example", p.join(" ")),
            );
            ran += 1;
        }
    }
    assert!(ran >= 8, "only {ran} help examples found");
}
