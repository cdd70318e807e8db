//! GRPO rewards outside the binary: a command (Python here), an HTTP endpoint, an LLM judge
//! served by `medvlm serve`; each failure kind stops the run with one line that names the
//! reward, the step and the cause, the last checkpoint intact, and `--resume` continues once
//! the reward is fixed. Also DAPO's dynamic sampling.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::grpo_train::{fresh_model, make_task};
use medvlm::rl::config::{GrpoConfig, GrpoMethod, RewardEntry};
use medvlm::train::config::RunConfig;
use serde_json::Value;

fn python() -> &'static str {
    "python3"
}

/// A table reward entry from TOML text, as a config file would give it.
fn entry(toml_table: &str) -> RewardEntry {
    let t: toml::Table = toml::from_str(&format!("r = {toml_table}")).unwrap();
    t["r"].clone().try_into().unwrap()
}

/// A short run: 2 prompts x 2 completions of up to 6 tokens a step, a checkpoint every
/// step, every completion logged.
fn config(dir: &Path, model: &Path, data: &Path, rewards: Vec<RewardEntry>) -> GrpoConfig {
    GrpoConfig {
        run: RunConfig {
            model: model.to_path_buf(),
            train_data: data.to_path_buf(),
            output_dir: dir.join("run"),
            micro_batch: 4,
            learning_rate: 1e-3,
            max_steps: 3,
            save_steps: 1,
            max_pixels: Some(3136),
            device: Some("cpu".into()),
            ..GrpoConfig::default().run
        },
        method: GrpoMethod {
            num_generations: 2,
            batch_prompts: 2,
            max_completion_length: 6,
            beta: 0.0,
            log_completions: 4,
            rewards,
            ..GrpoMethod::default()
        },
    }
}

fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn command(name: &str, script: &Path, extra: &str) -> RewardEntry {
    entry(&format!(
        r#"{{ name = "{name}", command = ["{}", "{}"]{extra} }}"#,
        python(),
        script.display()
    ))
}

fn completions(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("completions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    model: PathBuf,
    data: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let data = make_task(&dir, "d", 8, 5, false);
    let model = fresh_model(&dir.join("init-run"));
    Setup {
        _tmp: tmp,
        dir,
        model,
        data,
    }
}

/// A Python reward sees every field and its scores (and metrics) reach the logs: the
/// script scores the completion's length in characters, which the test recomputes from
/// completions.jsonl.
#[test]
fn a_command_reward_scores_every_completion_with_the_rows_fields() {
    let s = setup();
    let script = write_script(
        &s.dir,
        "length.py",
        r#"
import json, sys
need = {"step", "index", "group", "prompt", "completion", "question", "options", "answer",
        "solution", "kind", "modality", "id", "dataset"}
for line in sys.stdin:
    x = json.loads(line)
    missing = need - set(x)
    if missing:
        sys.exit("missing fields: %s" % sorted(missing))
    assert x["kind"] == "choice" and x["options"] == ["bright", "dark"], x
    assert "<|im_start|>" in x["prompt"], x["prompt"]
    print(json.dumps({"score": len(x["completion"]) / 10, "metrics": {"chars": len(x["completion"])}}), flush=True)
"#,
    );
    let cfg = config(
        &s.dir,
        &s.model,
        &s.data,
        vec![
            command("length", &script, ""),
            RewardEntry::Builtin("format".into()),
        ],
    );
    medvlm::rl::trainer::train(cfg, false, None).unwrap();
    let run = s.dir.join("run");
    let logged = completions(&run);
    assert_eq!(logged.len(), 3 * 4);
    for c in &logged {
        let text = c["completion"].as_str().unwrap();
        let want = text.chars().count() as f64 / 10.0;
        let got = c["rewards"]["length"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-6, "{got} vs {want} for {text:?}");
        // weights 1 + 1: the total is the sum
        let total = c["reward"].as_f64().unwrap();
        assert!((total - got - c["rewards"]["format"].as_f64().unwrap()).abs() < 1e-5);
    }
    let m = metrics(&run);
    assert!(m[0].get("reward_length_mean").is_some(), "{}", m[0]);
    assert!(m[0].get("length/chars_mean").is_some(), "{}", m[0]);
    assert!(run.join("rewards/length.stderr.log").is_file());
}

/// Each way a command can fail stops the run with one line naming the reward, the step and
/// the cause; the child's last stderr lines are quoted.
#[test]
fn command_failures_are_one_line_naming_reward_step_and_cause() {
    let s = setup();
    let cases = [
        (
            "exits",
            "import sys\nsys.stderr.write('reward setup failed: no rubric.txt\\n')\nsys.exit(3)\n",
            "",
            vec!["exited", "exit status: 3", "no rubric.txt", "answering 0 of 4"],
        ),
        (
            "malformed",
            "import sys\nfor l in sys.stdin:\n    print('good answer', flush=True)\n",
            "",
            vec!["line 1", "\"good answer\"", "not JSON"],
        ),
        (
            "short",
            "import sys\nsys.stdin.readline()\nprint(1.0, flush=True)\nsys.stdout.close()\nimport time; time.sleep(5)\n",
            "",
            vec!["answering 1 of 4"],
        ),
        (
            "slow",
            "import sys, time\nfor l in sys.stdin:\n    time.sleep(30)\n",
            ", timeout_s = 0.5",
            vec!["answered 0 of 4", "0.5 s timeout"],
        ),
        (
            "missing",
            "",
            "",
            vec!["cannot start"],
        ),
    ];
    for (name, body, extra, want) in cases {
        let script = if body.is_empty() {
            s.dir.join("no-such-dir").join("nothing.py")
        } else {
            write_script(&s.dir, &format!("{name}.py"), body)
        };
        let mut cfg = config(
            &s.dir,
            &s.model,
            &s.data,
            vec![command(name, &script, extra)],
        );
        if name == "missing" {
            // Not even a program: the command itself cannot start.
            cfg.method.rewards = vec![entry(&format!(
                r#"{{ name = "missing", command = "{}" }}"#,
                script.display()
            ))];
        }
        cfg.run.output_dir = s.dir.join(format!("run-{name}"));
        let e = medvlm::rl::trainer::train(cfg, false, None).unwrap_err();
        let line = format!("{e:#}");
        assert!(!line.contains('\n'), "{name}: more than one line: {line}");
        assert!(
            line.contains(&format!("reward \"{name}\" failed at step 1")),
            "{name}: {line}"
        );
        for w in want {
            assert!(line.contains(w), "{name}: {w:?} missing in: {line}");
        }
    }
}

/// A reward that breaks at step 3 stops the run there; checkpoints 1 and 2 are intact and
/// `--resume` finishes the run once the script is fixed, ending where an unbroken run ends.
#[test]
fn a_failed_reward_loses_nothing_and_resume_continues_once_fixed() {
    let s = setup();
    let fixed = s.dir.join("fixed");
    let script = write_script(
        &s.dir,
        "flaky.py",
        &format!(
            r#"
import json, os, sys
for line in sys.stdin:
    x = json.loads(line)
    if x["step"] >= 3 and not os.path.exists({fixed:?}):
        sys.stderr.write("KeyError: 'rubric'\n")
        sys.exit(1)
    print(1.0 if "<answer>" in x["completion"] else float(len(x["completion"]) % 3), flush=True)
"#,
            fixed = fixed.display().to_string()
        ),
    );
    let cfg = config(
        &s.dir,
        &s.model,
        &s.data,
        vec![command("flaky", &script, "")],
    );
    let e = medvlm::rl::trainer::train(cfg.clone(), false, None).unwrap_err();
    let line = format!("{e:#}");
    assert!(
        line.contains("reward \"flaky\" failed at step 3") && line.contains("KeyError: 'rubric'"),
        "{line}"
    );
    let run = s.dir.join("run");
    assert!(
        run.join("checkpoint-000002").is_dir(),
        "the last checkpoint stays"
    );
    assert_eq!(metrics(&run).len(), 2, "steps 1 and 2 were logged");
    std::fs::write(&fixed, "").unwrap();
    let out = medvlm::rl::trainer::train(cfg.clone(), true, None).unwrap();
    assert_eq!(metrics(&run).len(), 3);
    // The same run without the failure ends with the same weights.
    let mut again = cfg;
    again.run.output_dir = s.dir.join("unbroken");
    let out2 = medvlm::rl::trainer::train(again, false, None).unwrap();
    let a = std::fs::read(out.join("model.safetensors")).unwrap();
    let b = std::fs::read(out2.join("model.safetensors")).unwrap();
    assert!(a == b, "a resumed run ends with the unbroken run's weights");
}

/// A tiny HTTP reward server on a thread: scores each completion 1.0 when its group is even,
/// remembers what it was sent.
fn reward_server() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/score", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut l = String::new();
                reader.read_line(&mut l).unwrap();
                if l == "\r\n" || l.is_empty() {
                    break;
                }
                if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let req: Value = serde_json::from_slice(&body).unwrap();
            let scores: Vec<Value> = req["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| {
                    serde_json::json!({"score": if x["group"].as_u64().unwrap() % 2 == 0 { 1.0 } else { 0.0 }})
                })
                .collect();
            log.lock().unwrap().push(req);
            let out = serde_json::json!({ "scores": scores }).to_string();
            write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{out}",
                out.len()
            )
            .unwrap();
        }
    });
    (url, seen)
}

#[test]
fn an_http_reward_gets_one_post_per_step_and_refusals_are_named() {
    let s = setup();
    let (url, seen) = reward_server();
    let cfg = config(
        &s.dir,
        &s.model,
        &s.data,
        vec![entry(&format!(r#"{{ name = "remote", url = "{url}" }}"#))],
    );
    medvlm::rl::trainer::train(cfg, false, None).unwrap();
    let posts = seen.lock().unwrap().clone();
    assert_eq!(posts.len(), 3, "one POST per step");
    assert_eq!(posts[0]["samples"].as_array().unwrap().len(), 4);
    for c in completions(&s.dir.join("run")) {
        let idx = c["item"].as_u64().unwrap();
        // The server's rule by group; the logged reward must be what it answered for that
        // completion (find it among the posts by its text and step).
        let step = c["step"].as_u64().unwrap() as usize;
        let sample = posts[step - 1]["samples"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| {
                x["completion"] == c["completion"] && x["id"].as_str() == Some(&idx.to_string())
            })
            .expect("the completion was posted");
        let want = if sample["group"].as_u64().unwrap() % 2 == 0 {
            1.0
        } else {
            0.0
        };
        assert_eq!(c["rewards"]["remote"].as_f64().unwrap(), want);
    }
    // Nobody listens on a port just closed.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config(
        &s.dir,
        &s.model,
        &s.data,
        vec![entry(&format!(
            r#"{{ name = "gone", url = "http://127.0.0.1:{port}/score" }}"#
        ))],
    );
    cfg.run.output_dir = s.dir.join("run-gone");
    let line = format!(
        "{:#}",
        medvlm::rl::trainer::train(cfg, false, None).unwrap_err()
    );
    assert!(
        line.contains("reward \"gone\" failed at step 1") && line.contains("cannot connect"),
        "{line}"
    );
    assert!(!line.contains('\n'), "{line}");
}

/// A judge served by `medvlm serve`: every logged score is what the served model answers
/// to the rendered prompt (asked again here, at temperature 0) read by the rule.
#[test]
fn a_judge_served_by_medvlm_serve_scores_completions() {
    let s = setup();
    // tiny-a as the judge: its greedy replies are varied text (the fresh policy model
    // answers nothing at all).
    let server = crate::serve::Server::start(&crate::serve::tiny(), &[]);
    let prompt = "Question: {question}\nResponse: {completion}\nScore from 0 to 9:";
    let cfg = config(
        &s.dir,
        &s.model,
        &s.data,
        vec![entry(&format!(
            r#"{{ name = "judge", judge = {{ url = "{}/v1", prompt = "{}", scale = 0.5, max_tokens = 24 }} }}"#,
            server.base,
            prompt.replace('\n', "\\n")
        ))],
    );
    let mut cfg = cfg;
    cfg.run.max_steps = 1;
    medvlm::rl::trainer::train(cfg, false, None).unwrap();
    let client = reqwest::blocking::Client::new();
    let models: Value = client
        .get(server.url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let model = models["data"][0]["id"].as_str().unwrap().to_string();
    let number =
        regex::Regex::new(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?").unwrap();
    let logged = completions(&s.dir.join("run"));
    assert_eq!(logged.len(), 4);
    let mut unreadable = 0;
    for c in &logged {
        let message = prompt
            .replace("{question}", c["question"].as_str().unwrap())
            .replace("{completion}", c["completion"].as_str().unwrap());
        let reply: Value = client
            .post(server.url("/v1/chat/completions"))
            .json(&serde_json::json!({
                "model": model, "temperature": 0.0, "max_tokens": 24,
                "messages": [{"role": "user", "content": message}],
            }))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let text = reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_else(|| panic!("{reply}"));
        let first = number
            .find_iter(text)
            .map(|m| m.as_str())
            .filter(|t| t.bytes().any(|b| b.is_ascii_digit()))
            .find_map(|t| t.replace(',', "").parse::<f64>().ok());
        let want = first.map_or(0.0, |x| x * 0.5);
        unreadable += usize::from(first.is_none());
        let got = c["rewards"]["judge"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "judge reply {text:?}: logged {got}, expected {want}"
        );
    }
    assert!(
        unreadable < logged.len(),
        "no reply had a number: the test shows nothing"
    );
    let m = &metrics(&s.dir.join("run"))[0];
    assert_eq!(
        m["judge/unreadable_mean"].as_f64().unwrap(),
        unreadable as f64 / logged.len() as f64
    );
}

/// Dynamic sampling keeps only groups whose rewards differ: with a reward that is 1 for
/// even rows and 0 for odd ones whatever the completion, every group has zero spread and
/// the run stops after max_generation_batches; with one that varies within groups it runs,
/// and every logged group has two different rewards.
#[test]
fn dynamic_sampling_drops_groups_without_signal() {
    let s = setup();
    let constant = write_script(
        &s.dir,
        "by_row.py",
        "import json, sys\nfor l in sys.stdin:\n    x = json.loads(l)\n    print(float(int(x['id']) % 2), flush=True)\n",
    );
    let mut cfg = config(
        &s.dir,
        &s.model,
        &s.data,
        vec![command("by_row", &constant, "")],
    );
    cfg.method.dynamic_sampling = true;
    cfg.method.max_generation_batches = 3;
    let line = format!(
        "{:#}",
        medvlm::rl::trainer::train(cfg, false, None).unwrap_err()
    );
    assert!(
        line.contains("3 generation batches gave 0 of the 2 groups"),
        "{line}"
    );
    // Half the completions score by parity of their length: most groups differ.
    let varied = write_script(
        &s.dir,
        "by_len.py",
        "import json, sys\nfor l in sys.stdin:\n    x = json.loads(l)\n    print(float(len(x['completion']) % 2), flush=True)\n",
    );
    let mut cfg = config(
        &s.dir,
        &s.model,
        &s.data,
        vec![command("by_len", &varied, "")],
    );
    cfg.run.output_dir = s.dir.join("run-varied");
    cfg.method.dynamic_sampling = true;
    cfg.method.max_generation_batches = 50;
    cfg.method.num_generations = 4;
    cfg.method.log_completions = 8;
    cfg.run.micro_batch = 8;
    medvlm::rl::trainer::train(cfg, false, None).unwrap();
    let run = s.dir.join("run-varied");
    for m in metrics(&run) {
        assert_eq!(m["frac_reward_zero_std"].as_f64().unwrap(), 0.0, "{m}");
        assert!(m["generation_batches"].as_f64().unwrap() >= 1.0);
    }
    let logged = completions(&run);
    for group in logged.chunks(4) {
        let r: Vec<f64> = group
            .iter()
            .map(|c| c["reward"].as_f64().unwrap())
            .collect();
        // recomputed by hand from the texts
        for c in group {
            let want = (c["completion"].as_str().unwrap().chars().count() % 2) as f64;
            assert_eq!(c["reward"].as_f64().unwrap(), want);
        }
        assert!(
            r.iter().any(|&x| x != r[0]),
            "a kept group has different rewards: {r:?}"
        );
    }
}

/// The README's Python reward is the file the learning test runs.
#[test]
fn the_readme_shows_the_example_reward_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let file = std::fs::read_to_string(root.join("examples/rewards/answer_letter.py")).unwrap();
    assert!(
        readme.contains(&format!("cat > answer_letter.py <<'EOF'\n{file}EOF\n")),
        "README and examples/rewards/answer_letter.py differ"
    );
}
