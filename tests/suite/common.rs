//! Helpers shared by the integration tests: where the reference fixtures live and how to
//! read them. The fixtures come from tools/make_fixtures.py (PyTorch + transformers).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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

/// Runs `medvlm` with RUST_BACKTRACE as given (`None`: unset, whatever the test's own
/// environment says); returns (success, stdout, stderr).
pub fn medvlm_with_backtrace(args: &[&str], bt: Option<&str>) -> (bool, String, String) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_medvlm"));
    c.args(args);
    match bt {
        Some(v) => c.env("RUST_BACKTRACE", v),
        None => c.env_remove("RUST_BACKTRACE"),
    };
    let o = c.output().expect("run medvlm");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The fixture images a reference case (or GRPO group) lists under `images`, loaded by
/// `proc` in order.
pub fn case_images(
    proc: &medvlm::processor::Processor,
    case: &Value,
) -> Vec<medvlm::processor::PixelPatches> {
    case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            proc.load_image(&fixture_image(n.as_str().unwrap()))
                .unwrap()
        })
        .collect()
}

/// A reference case's prompt (its `messages` and `images`) as `proc` prepares it.
pub fn case_prompt(proc: &medvlm::processor::Processor, case: &Value) -> medvlm::processor::Prompt {
    proc.prepare(&messages(&case["messages"]), case_images(proc, case), true)
        .unwrap()
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
                        "video" => Content::Video,
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

// ---------------------------------------------------------------------------------------------
// A child's peak memory.

/// Runs `cmd` to its end (killed after `timeout`) and measures its peak resident memory: the
/// kernel's `VmHWM` of its own address space, read while it is stopped at exit under ptrace.
/// `None` where ptrace is not allowed (a sandbox): callers report the check as skipped.
///
/// Why not `wait4`'s `ru_maxrss`: a child's maxrss starts from the resident memory of the
/// address space it was forked from (exec keeps the larger), so every child of this large,
/// busy test process would seem to use at least as much as the test process itself.
/// How a measured child ended.
pub struct Measured {
    /// Exited with status 0.
    pub ok: bool,
    /// Its exit status, or the signal that ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Peak resident memory, in bytes (0 when it died before its exit could be observed).
    pub peak: u64,
    pub secs: f64,
    /// Killed by the timeout.
    pub killed: bool,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn measure(mut cmd: Command, timeout: Duration) -> Option<Measured> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: ptrace(PTRACE_TRACEME) is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            let null = std::ptr::null_mut::<libc::c_void>();
            if libc::ptrace(libc::PTRACE_TRACEME, 0, null, null) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = std::time::Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        // No ptrace here (a sandbox): the caller reports the test as skipped.
        Err(_) => return None,
    };
    let pid = child.id() as libc::pid_t;
    let read = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = read(child.stdout.take().map(|r| Box::new(r) as Box<_>));
    let err = read(child.stderr.take().map(|r| Box::new(r) as Box<_>));
    let done = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (done, killed) = (done.clone(), killed.clone());
        std::thread::spawn(move || {
            while start.elapsed() < timeout {
                if done.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            killed.store(true, Ordering::SeqCst);
            // SAFETY: the pid is our child's, not yet reaped (`done` is unset).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        })
    };
    let (mut status, mut peak, mut first) = (0, 0u64, true);
    loop {
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r == -1 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            panic!("waitpid: {}", std::io::Error::last_os_error());
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            break;
        }
        if libc::WIFSTOPPED(status) {
            let sig = libc::WSTOPSIG(status);
            let event = (status >> 16) & 0xff;
            let null = std::ptr::null_mut::<libc::c_void>();
            let mut inject = 0;
            if first && sig == libc::SIGTRAP {
                // Stopped after exec: ask for a stop at exit, while the memory is still there.
                first = false;
                let opts = (libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_EXITKILL) as usize;
                // SAFETY: ptrace on our stopped tracee.
                unsafe {
                    libc::ptrace(
                        libc::PTRACE_SETOPTIONS,
                        pid,
                        null,
                        opts as *mut libc::c_void,
                    )
                };
            } else if sig == libc::SIGTRAP && event == libc::PTRACE_EVENT_EXIT {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                peak = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .map_or(0, |kib| kib * 1024);
            } else {
                inject = sig;
            }
            // SAFETY: resumes our stopped tracee, passing on any signal it was stopped by.
            unsafe {
                libc::ptrace(
                    libc::PTRACE_CONT,
                    pid,
                    null,
                    inject as usize as *mut libc::c_void,
                )
            };
        }
    }
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    Some(Measured {
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        peak,
        secs: start.elapsed().as_secs_f64(),
        killed: killed.load(Ordering::SeqCst),
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn measure(_cmd: Command, _timeout: Duration) -> Option<Measured> {
    None
}

/// A prompt's M-RoPE positions and rope delta, exactly, and its logits at every position
/// within 1e-4 of transformers' relative to the logit scale (f32): the checks every parity
/// test makes of a prepared prompt. `label` names the case in failures.
pub fn check_positions_and_logits(
    model: &medvlm::model::Qwen2Vl,
    prompt: &medvlm::processor::Prompt,
    want_positions: &Tensor,
    want_delta: i64,
    want_logits: &Tensor,
    label: &str,
) {
    let grids = prompt.grids();
    let (pos, delta) = model.positions(&prompt.input_ids, &grids).unwrap();
    let want: Vec<Vec<i64>> = want_positions.to_vec2().unwrap();
    assert_eq!(pos.len(), want[0].len(), "{label}: position count");
    for (i, p) in pos.iter().enumerate() {
        for axis in 0..3 {
            assert_eq!(p[axis], want[axis][i], "{label}: position {i} axis {axis}");
        }
    }
    assert_eq!(delta, want_delta, "{label}: rope delta");
    let pixels = prompt.pixel_values(&Device::Cpu).unwrap();
    let logits = model
        .forward_logits(&prompt.input_ids, pixels.as_ref(), &grids)
        .unwrap();
    let (diff, scale) = max_abs_diff(&logits, want_logits);
    println!("{label}: max |logit diff| {diff:.3e} (max |logit| {scale:.2})");
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "{label}: logits differ by {diff}"
    );
}

/// A copy of a fixture checkpoint whose chat template opens the reasoning block for the model,
/// as Qwen3-VL Thinking's does: its generation prompt `<|im_start|>assistant\n` becomes
/// `<|im_start|>assistant\n<think>\n` (the rest of the template unchanged), in
/// chat_template.json (Qwen3-VL's Jinja statements) or tokenizer_config.json (Qwen2-VL's).
pub fn thinking_copy(fixture: &str, to: &Path) -> PathBuf {
    let from = fixtures().join(fixture);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(&from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    let rewrites = [
        (
            "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}",
            "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n<think>\\n' }}",
        ),
        (
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}",
        ),
    ];
    for file in ["chat_template.json", "tokenizer_config.json"] {
        let path = to.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mut json: Value = serde_json::from_str(&text).unwrap();
        let Some(t) = json["chat_template"].as_str() else {
            continue;
        };
        let (from, into) = rewrites
            .iter()
            .find(|(f, _)| t.contains(f))
            .unwrap_or_else(|| panic!("{fixture}: generation prompt not found"));
        json["chat_template"] = t.replace(from, into).into();
        std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
        return to.to_path_buf();
    }
    panic!("{fixture}: no chat template")
}

/// The last prompt position's logits of `model` on `prompt`, and transformers' f32 logits
/// there (`one_image.logits` of `cases`): what the bf16 checks compare.
pub fn last_logits_and_reference(
    model: &medvlm::model::Qwen2Vl,
    prompt: &medvlm::processor::Prompt,
    cases: &Cases,
) -> (Tensor, Tensor) {
    let pixels = prompt.pixel_values(&Device::Cpu).unwrap();
    let logits = model
        .forward_logits(&prompt.input_ids, pixels.as_ref(), &prompt.grids())
        .unwrap();
    let n = prompt.input_ids.len();
    let last = logits.narrow(0, n - 1, 1).unwrap().squeeze(0).unwrap();
    let f32_ref = cases
        .tensor("one_image.logits")
        .narrow(0, n - 1, 1)
        .unwrap()
        .squeeze(0)
        .unwrap();
    (last, f32_ref)
}
