//! Every command, and GRPO's rollouts, stop at the same tokens for the same checkpoint: the
//! one set `QwenTokenizer::stop_tokens` builds (`<|im_end|>`, `<|endoftext|>`, the
//! tokenizer's eos and generation_config.json's `eos_token_id`).
//!
//! The probe: a copy of tiny-a whose generation_config.json names *every* token id as an
//! end. A command that builds its stops from that file ends every completion at its first
//! token, which decodes to nothing; one that ignores it decodes tiny-a's usual text (the
//! control below shows that text is there).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use medvlm::data::PromptTemplate;
use medvlm::rl::config::{GrpoConfig, GrpoMethod};
use medvlm::train::config::RunConfig;
use serde_json::Value;

/// tiny-a with generation_config.json's `eos_token_id` listing every token of the vocabulary.
fn stop_everywhere(dir: &Path) -> PathBuf {
    let src = fixtures().join("tiny-a");
    let out = dir.join("stop-everywhere");
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let vocab = config["vocab_size"].as_u64().unwrap();
    let path = out.join("generation_config.json");
    let mut gen: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    gen["eos_token_id"] = Value::from((0..vocab).collect::<Vec<u64>>());
    std::fs::write(&path, gen.to_string()).unwrap();
    out
}

/// A two-row data file over fixture images.
fn data_file(dir: &Path) -> PathBuf {
    let rows: Vec<Value> = ["gray.png", "square.png"]
        .iter()
        .map(|img| {
            serde_json::json!({
                "image": [fixture_image(img).to_str().unwrap()],
                "question": "Is there a lesion?", "options": ["yes", "no"], "answer": "yes",
                "dataset": "test", "subset": "MR (Mag-netic Resonance Imaging)",
            })
        })
        .collect();
    let path = dir.join("data.json");
    std::fs::write(&path, serde_json::to_string(&rows).unwrap()).unwrap();
    path
}

fn generate_json(model: &Path) -> Value {
    let (ok, out, err) = medvlm(&[
        "generate",
        "--model",
        s(model),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    assert!(ok, "{err}");
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn every_command_and_the_trainer_stop_at_the_same_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let model = stop_everywhere(tmp.path());
    let data = data_file(tmp.path());

    // The control: tiny-a itself writes text, so an empty completion below means a stop.
    let control = generate_json(&fixtures().join("tiny-a"));
    assert!(
        control["completion_token_ids"].as_array().unwrap().len() > 1,
        "{control}"
    );

    // The tokenizer's set holds the generation config's ids: all of them.
    let tok = medvlm::processor::QwenTokenizer::from_dir(&model).unwrap();
    let config = medvlm::model::Qwen2VlConfig::from_file(&model.join("config.json")).unwrap();
    assert_eq!(tok.stop_tokens().len(), config.text.vocab_size);

    // generate
    let g = generate_json(&model);
    assert_eq!(
        g["completion_token_ids"].as_array().unwrap().len(),
        1,
        "{g}"
    );
    assert_eq!(g["finish_reason"], "stop", "{g}");
    assert_eq!(g["text"], "", "{g}");
    let (ok, streamed, err) = medvlm(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "8",
        "--stream",
    ]);
    assert!(ok, "{err}");
    assert_eq!(streamed.trim(), "", "generate --stream");

    // ask
    let (ok, out, err) = medvlm(&[
        "ask",
        "--model",
        s(&model),
        "--image",
        s(&fixture_image("gray.png")),
        "--question",
        "Is there a lesion?",
        "--options",
        "yes;no",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    assert!(ok, "{err}");
    let a: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(a["finish_reason"], "stop", "{a}");
    assert_eq!(a["output"], "", "{a}");

    // eval
    let eval_out = tmp.path().join("eval");
    let (ok, _, err) = medvlm(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--max-new-tokens",
        "8",
        "--out",
        s(&eval_out),
    ]);
    assert!(ok, "{err}");
    let items = std::fs::read_to_string(eval_out.join("items.jsonl")).unwrap();
    assert_eq!(items.lines().count(), 2);
    for line in items.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["output"], "", "{v}");
    }

    // serve
    let reply = serve_one_completion(&model);
    let choice = &reply["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "{reply}");
    assert_eq!(choice["message"]["content"], "", "{reply}");
    assert_eq!(reply["usage"]["completion_tokens"], 1, "{reply}");

    // GRPO's rollouts (sampled, temperature 1): every completion is its first token.
    let run_dir = tmp.path().join("grpo");
    medvlm::rl::trainer::train(
        GrpoConfig {
            run: RunConfig {
                model: model.clone(),
                train_data: data.clone(),
                output_dir: run_dir.clone(),
                template: PromptTemplate::Simple,
                max_steps: 1,
                save_steps: 0,
                max_pixels: Some(28 * 28 * 12),
                device: Some("cpu".into()),
                ..GrpoConfig::default().run
            },
            method: GrpoMethod {
                num_generations: 4,
                batch_prompts: 2,
                max_completion_length: 8,
                temperature: 1.0,
                log_completions: 8,
                ..GrpoMethod::default()
            },
        },
        false,
        None,
    )
    .unwrap();
    let samples = std::fs::read_to_string(run_dir.join("completions.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 8);
    for line in samples.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["completion"], "", "{v}");
    }
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let m: Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(m["completion_length_mean"], 1.0, "{m}");
}

/// Starts `medvlm serve`, sends one greedy chat completion, stops the server.
fn serve_one_completion(model: &Path) -> Value {
    let mut child = Command::new(env!("CARGO_BIN_EXE_medvlm"))
        .args(["serve", "--model", s(model), "--port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut log = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap_or(0) > 0 {
        if let Some(i) = line.find("http://") {
            let url = line[i + 7..].split_whitespace().next().unwrap_or("");
            addr = Some(url.split('/').next().unwrap().to_string());
            break;
        }
        log.push_str(&line);
        line.clear();
    }
    let addr = addr.unwrap_or_else(|| panic!("the server did not start: {log}"));
    let reply = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "stop-everywhere",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "temperature": 0,
        }))
        .send()
        .and_then(|r| r.json::<Value>());
    let _ = child.kill();
    let _ = child.wait();
    reply.unwrap()
}
