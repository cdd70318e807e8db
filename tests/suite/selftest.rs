//! `medvlm selftest`, the command a GPU user runs first, runs here on the CPU: through the
//! CPU fast paths, and with `MEDVLM_PLAIN_OPS=1` through the plain tensor-op paths a GPU
//! takes. It must also fail when the numbers are wrong, and say so in one line.

use std::process::Command;

use crate::common::*;

fn selftest(args: &[&str], plain_ops: bool) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medvlm"));
    cmd.arg("selftest").args(args);
    if plain_ops {
        cmd.env("MEDVLM_PLAIN_OPS", "1");
    }
    let out = cmd.output().expect("run medvlm selftest");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_all_pass(stdout: &str, stderr: &str, ok: bool) {
    println!("{stdout}");
    assert!(ok, "selftest failed:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    // Every check of the fixtures ran: 3 per checkpoint (2), bf16, GRPO loss and norm.
    let rows = stdout.lines().filter(|l| l.ends_with("| ok |")).count();
    assert!(rows >= 9, "only {rows} checks passed:\n{stdout}");
}

#[test]
fn selftest_passes_on_the_cpu_with_timings() {
    if !medvlm::kernels::has_avx512() {
        note_without_simd("the CPU fast paths' AVX-512 kernels");
    }
    let fx = fixtures();
    let (ok, out, err) = selftest(&["--device", "cpu", "--fixtures", s(&fx)], false);
    assert_all_pass(&out, &err, ok);
    assert!(
        out.contains("rollouts") && out.contains("GRPO training step"),
        "{out}"
    );
}

#[test]
fn selftest_passes_through_the_plain_ops_a_gpu_runs() {
    let fx = fixtures();
    let (ok, out, err) = selftest(
        &["--device", "cpu", "--no-bench", "--fixtures", s(&fx)],
        true,
    );
    assert_all_pass(&out, &err, ok);
}

#[test]
fn selftest_fails_when_a_reference_disagrees() {
    // The same fixtures with one recorded greedy token changed.
    let tmp = tempfile::tempdir().unwrap();
    let fx = tmp.path().join("fixtures");
    let status = Command::new("cp")
        .arg("-r")
        .arg(fixtures())
        .arg(&fx)
        .status()
        .unwrap();
    assert!(status.success());
    let path = fx.join("cases-tiny-a.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let tok = &mut meta["cases"][0]["greedy_new_tokens"][3];
    *tok = serde_json::json!(tok.as_u64().unwrap() + 1);
    std::fs::write(&path, meta.to_string()).unwrap();
    let (ok, out, err) = selftest(
        &["--device", "cpu", "--no-bench", "--fixtures", s(&fx)],
        false,
    );
    assert!(!ok, "selftest passed with a wrong reference:\n{out}");
    assert!(
        out.contains("| tiny-a: greedy, 24 tokens | 4 of 5 identical"),
        "{out}"
    );
    assert!(out.contains("FAIL"), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("1 of") && err.contains("greedy"), "{err}");
}

#[test]
fn selftest_without_fixtures_or_gpu_says_so_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = selftest(&["--device", "cpu", "--fixtures", s(tmp.path())], false);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("fixtures"), "{err}");
    if !cfg!(feature = "cuda") {
        let (ok, _, err) = selftest(&["--device", "cuda:0"], false);
        assert!(!ok);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("CUDA"), "{err}");
    }
}
