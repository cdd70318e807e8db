//! `medvlm serve` end to end: the real binary on a free localhost port with tiny
//! checkpoints, called over HTTP with reqwest, as OpenAI clients would.
//!
//! The reasoning tests use a "parrot" checkpoint built here: tiny-a with its decoder layers'
//! output projections zeroed (each layer then adds nothing, so the residual stream is the
//! token's own embedding) and an untied lm_head that maps each token of a chosen answer to
//! the next. Its greedy output is therefore known by construction:
//! `<think>The liver is enlarged.</think>\n<answer>A</answer>` then `<|im_end|>`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use base64::Engine as _;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

const PARROT_TEXT: &str = "<think>The liver is enlarged.</think>\n<answer>A</answer>";

pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) base: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    pub(crate) fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_medvlm"))
            .args(["serve", "--model", s(model), "--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start medvlm serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(i) = line.find("http://") {
                        let url = line[i..].split_whitespace().next().unwrap_or("");
                        let _ = tx.send(url.trim_end_matches("/v1").to_string());
                    }
                    log.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        let base = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("the server did not start: {}", log.lock().unwrap()));
        Server { child, base, log }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn post_raw(&self, body: &Value, key: Option<&str>) -> reqwest::blocking::Response {
        let mut r = client().post(self.url("/v1/chat/completions")).json(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send().expect("POST")
    }

    /// (status, JSON body) of a chat completion.
    pub(crate) fn post(&self, body: &Value) -> (u16, Value) {
        let r = self.post_raw(body, None);
        let status = r.status().as_u16();
        (status, r.json().expect("a JSON body"))
    }

    /// A streamed completion's events (the JSON of each `data:` line) until `[DONE]`,
    /// checking the SSE framing on the way.
    pub(crate) fn stream(&self, body: &Value) -> Vec<Value> {
        let r = self.post_raw(body, None);
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let mut text = String::new();
        BufReader::new(r).read_to_string(&mut text).unwrap();
        parse_sse(&text)
    }

    pub(crate) fn metric(&self, name: &str) -> f64 {
        let t = client()
            .get(self.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        t.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{t}"))
    }

    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

/// Every event is `data: ...` followed by a blank line; the last is `[DONE]`.
pub(crate) fn parse_sse(text: &str) -> Vec<Value> {
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "no [DONE] at the end: {text}"
    );
    let mut out = Vec::new();
    for ev in text.split_terminator("\n\n") {
        let data = ev
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("an event that is not `data: `: {ev:?}"));
        assert!(!data.contains('\n'), "one line per event: {data:?}");
        if data != "[DONE]" {
            out.push(serde_json::from_str(data).unwrap());
        }
    }
    out
}

/// Per choice: (role announced, reasoning deltas joined, content deltas joined, finish).
pub(crate) fn join_stream(events: &[Value]) -> Vec<(bool, String, String, Option<String>)> {
    let mut out: Vec<(bool, String, String, Option<String>)> = Vec::new();
    let id = events[0]["id"].clone();
    for e in events {
        assert_eq!(e["id"], id, "one id for the whole stream");
        assert_eq!(e["object"], "chat.completion.chunk");
        for c in e["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if out.len() <= i {
                out.resize(i + 1, (false, String::new(), String::new(), None));
            }
            let d = &c["delta"];
            if d["role"] == "assistant" {
                assert!(out[i].1.is_empty() && out[i].2.is_empty(), "role first");
                out[i].0 = true;
            }
            // Both names carry the same text (vLLM renamed the field).
            assert_eq!(d["reasoning_content"], d["reasoning"], "{d}");
            if let Some(r) = d["reasoning_content"].as_str() {
                out[i].1 += r;
            }
            if let Some(t) = d["content"].as_str() {
                out[i].2 += t;
            }
            if let Some(f) = c["finish_reason"].as_str() {
                assert!(out[i].3.is_none(), "one finish per choice");
                out[i].3 = Some(f.to_string());
            }
        }
    }
    out
}

pub(crate) fn data_url(path: &Path, mime: &str) -> String {
    let b = std::fs::read(path).unwrap();
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b)
    )
}

pub(crate) fn ask(text: &str, image_url: Option<&str>) -> Value {
    let mut content = vec![];
    if let Some(u) = image_url {
        content.push(json!({"type": "image_url", "image_url": {"url": u}}));
    }
    content.push(json!({"type": "text", "text": text}));
    json!([{"role": "user", "content": content}])
}

pub(crate) fn tiny() -> PathBuf {
    fixtures().join("tiny-a")
}

/// tiny-a turned into a model whose greedy output is `PARROT_TEXT` (see the module docs).
fn parrot(dir: &Path) -> PathBuf {
    parrot_of(&tiny(), &dir.join("parrot"), "\n", PARROT_TEXT)
}

/// `src` turned into a model that answers `text` after a prompt ending in `prompt_end` (the
/// last token of the chat template's generation prompt), each token of the chain once.
fn parrot_of(src: &Path, out: &Path, prompt_end: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(out).unwrap();
    for f in std::fs::read_dir(src).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        if name != "model.safetensors" && name != "config.json" {
            std::fs::copy(&f, out.join(&name)).unwrap();
        }
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = json!(false);
    cfg["text_config"]["tie_word_embeddings"] = json!(false);
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(src.join("tokenizer.json")).unwrap();
    let ids = |t: &str| tok.encode(t, false).unwrap().get_ids().to_vec();
    // The chain: the prompt's last token ("\n" after "assistant"), the answer's tokens,
    // then <|im_end|>.
    let mut chain = vec![*ids(prompt_end).last().unwrap()];
    chain.extend(ids(text));
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let mut seen = chain.clone();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), chain.len(), "each token of the chain once");
    let mut w: HashMap<String, Tensor> =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let embed = w["model.embed_tokens.weight"].to_vec2::<f32>().unwrap();
    let (vocab, hidden) = (embed.len(), embed[0].len());
    assert!(chain.len() <= hidden);
    let mut e = embed.clone();
    let mut head = vec![vec![0f32; hidden]; vocab];
    for (k, &t) in chain.iter().enumerate() {
        e[t as usize] = (0..hidden).map(|j| (j == k) as u8 as f32).collect();
        let next = chain.get(k + 1).copied().unwrap_or(im_end);
        head[next as usize][k] = 10.0;
    }
    let t2 =
        |v: Vec<Vec<f32>>| Tensor::from_vec(v.concat(), (vocab, hidden), &Device::Cpu).unwrap();
    w.insert("model.embed_tokens.weight".into(), t2(e));
    w.insert("lm_head.weight".into(), t2(head));
    let norm = w["model.norm.weight"].ones_like().unwrap();
    w.insert("model.norm.weight".into(), norm);
    for (k, v) in w.clone() {
        if k.starts_with("model.layers.")
            && (k.ends_with("o_proj.weight") || k.ends_with("down_proj.weight"))
        {
            w.insert(k, v.zeros_like().unwrap());
        }
    }
    candle_core::safetensors::save(&w, out.join("model.safetensors")).unwrap();
    out.to_path_buf()
}

/// Greedy completions equal `medvlm generate`'s for the same prompt and image; streaming
/// sends the same text in SSE chunks; n > 1; usage counts; /v1/models, /health, /metrics.
#[test]
fn completions_equal_generate_and_stream_the_same_text() {
    let srv = Server::start(&tiny(), &["--reasoning-format", "raw"]);
    let img = fixture_image("square.png");
    let prompt = "Which organ is shown?";
    let (ok, out, err) = medvlm(&[
        "generate",
        "--model",
        s(&tiny()),
        "--image",
        s(&img),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "20",
        "--json",
    ]);
    assert!(ok, "{err}");
    let want: Value = serde_json::from_str(&out).unwrap();
    let body = json!({
        "model": "tiny-a",
        "messages": ask(prompt, Some(&data_url(&img, "image/png"))),
        "max_tokens": 20,
        "temperature": 0,
    });
    let (status, got) = srv.post(&body);
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["object"], "chat.completion");
    let c = &got["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    assert_eq!(c["message"]["content"], want["text"], "server vs generate");
    assert_eq!(c["finish_reason"], want["finish_reason"]);
    let prompt_len = want["prompt_token_ids"].as_array().unwrap().len();
    let gen_len = want["completion_token_ids"].as_array().unwrap().len();
    assert_eq!(got["usage"]["prompt_tokens"], prompt_len);
    assert_eq!(got["usage"]["completion_tokens"], gen_len);
    assert_eq!(got["usage"]["total_tokens"], prompt_len + gen_len);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let events = srv.stream(&sbody);
    let joined = join_stream(&events);
    assert_eq!(joined.len(), 1);
    assert!(joined[0].0, "the first delta announces the assistant role");
    assert_eq!(Value::from(joined[0].2.clone()), want["text"]);
    assert_eq!(Value::from(joined[0].3.clone()), want["finish_reason"]);
    assert!(
        events.len() >= 3,
        "text arrives in pieces: {}",
        events.len()
    );
    let last = events.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], got["usage"]);

    // n = 3: greedy choices agree; sampled ones are reproducible by seed.
    let mut nbody = body.clone();
    nbody["n"] = json!(3);
    let (status, g) = srv.post(&nbody);
    assert_eq!(status, 200);
    let ch = g["choices"].as_array().unwrap();
    assert_eq!(ch.len(), 3);
    for (i, c) in ch.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["content"], want["text"]);
    }
    assert_eq!(g["usage"]["completion_tokens"], 3 * gen_len);
    // The checkpoint's generation_config.json (Qwen2-VL's: top_k 1, top_p 0.001) applies
    // unless the request says otherwise, as in `medvlm generate`.
    nbody["temperature"] = json!(1.5);
    nbody["top_k"] = json!(-1);
    nbody["top_p"] = json!(1.0);
    nbody["seed"] = json!(7);
    let (_, a) = srv.post(&nbody);
    let (_, b) = srv.post(&nbody);
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts(&a), texts(&b), "same seed, same samples");
    let distinct: std::collections::HashSet<_> = texts(&a).into_iter().collect();
    assert!(distinct.len() > 1, "samples differ from each other");
    // Streaming with n > 1 keeps choices apart.
    nbody["stream"] = json!(true);
    let j = join_stream(&srv.stream(&nbody));
    assert_eq!(j.iter().map(|c| c.2.clone()).collect::<Vec<_>>(), texts(&a));

    let models: Value = client()
        .get(srv.url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-a");
    let h = client().get(srv.url("/health")).send().unwrap();
    assert_eq!(h.status(), 200);
    assert!(srv.metric("medvlm_completion_tokens_total") >= (gen_len * 5) as f64);
    assert!(srv.metric("medvlm_requests_total{status=\"200\"}") >= 6.0);
}

/// `<think>` goes to reasoning_content, in whole responses and in streamed deltas; stop
/// strings end the text before them; logprobs come with each token.
#[test]
fn reasoning_is_split_and_stop_strings_and_logprobs_work() {
    let tmp = tempfile::tempdir().unwrap();
    let model = parrot(tmp.path());
    let srv = Server::start(&model, &[]);
    let body = json!({"messages": ask("Is the liver normal?", None), "max_tokens": 40});
    let (status, r) = srv.post(&body);
    assert_eq!(status, 200, "{r}");
    let m = &r["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "The liver is enlarged.");
    assert_eq!(m["reasoning"], "The liver is enlarged.");
    assert_eq!(m["content"], "<answer>A</answer>");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let j = join_stream(&srv.stream(&sb));
    assert_eq!(j[0].1, "The liver is enlarged.");
    assert_eq!(j[0].2, "<answer>A</answer>");
    assert_eq!(j[0].3.as_deref(), Some("stop"));

    // A stop string: the text ends before it, finish_reason stop, even mid-stream.
    let mut stop = body.clone();
    stop["stop"] = json!(["</answer>"]);
    let (_, r) = srv.post(&stop);
    assert_eq!(r["choices"][0]["message"]["content"], "<answer>A");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    stop["stream"] = json!(true);
    let j = join_stream(&srv.stream(&stop));
    assert_eq!(j[0].2, "<answer>A");
    stop["stop"] = json!("liver");
    stop["stream"] = json!(false);
    let (_, r) = srv.post(&stop);
    assert_eq!(r["choices"][0]["message"]["reasoning_content"], "The");
    assert_eq!(r["choices"][0]["message"]["content"], "");

    // Length: cut reasoning with no answer yet.
    let mut short = body.clone();
    short["max_tokens"] = json!(4);
    let (_, r) = srv.post(&short);
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["choices"][0]["message"]["content"], "");
    assert_eq!(r["usage"]["completion_tokens"], 4);

    // Log-probabilities: the parrot is sure of every token.
    let mut lp = body.clone();
    lp["logprobs"] = json!(true);
    lp["top_logprobs"] = json!(2);
    let (_, r) = srv.post(&lp);
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let toks: String = content
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert!(toks.starts_with(PARROT_TEXT), "{toks}");
    for t in content {
        assert!(t["logprob"].as_f64().unwrap() > -1e-3, "{t}");
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(t["top_logprobs"][0]["token"], t["token"]);
        let bytes: Vec<u8> = t["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            t["token"].as_str().unwrap()
        );
    }

    // The raw format keeps the text whole.
    drop(srv);
    let raw = Server::start(&model, &["--reasoning-format", "raw"]);
    let (_, r) = raw.post(&body);
    assert_eq!(r["choices"][0]["message"]["content"], PARROT_TEXT);
}

/// Qwen3-VL served: the same greedy text as `medvlm generate` (whose greedy tokens equal
/// transformers' on this checkpoint, `qwen3_parity.rs`), whole and streamed, for tiny-3a
/// (released layout) and tiny-3b (transformers-5 layout, bf16 weights).
#[test]
fn qwen3_vl_is_served_as_generate_answers() {
    let img = fixture_image("wide.png");
    let prompt = "Which organ is shown?";
    for name in ["tiny-3a", "tiny-3b"] {
        let model = fixtures().join(name);
        let (ok, out, err) = medvlm(&[
            "generate",
            "--model",
            s(&model),
            "--image",
            s(&img),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "16",
            "--json",
        ]);
        assert!(ok, "{err}");
        let want: Value = serde_json::from_str(&out).unwrap();
        let srv = Server::start(&model, &["--reasoning-format", "raw"]);
        let body = json!({
            "messages": ask(prompt, Some(&data_url(&img, "image/png"))),
            "max_tokens": 16,
            "temperature": 0,
        });
        let (status, got) = srv.post(&body);
        assert_eq!(status, 200, "{got}");
        assert_eq!(
            got["choices"][0]["message"]["content"], want["text"],
            "{name}"
        );
        assert_eq!(
            got["usage"]["prompt_tokens"],
            want["prompt_token_ids"].as_array().unwrap().len()
        );
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let j = join_stream(&srv.stream(&sb));
        assert_eq!(Value::from(j[0].2.clone()), want["text"], "{name} streamed");
    }
}

/// A quantized model is served as `generate` runs it: `serve --quantize` and a checkpoint
/// written by `medvlm quantize` give `generate --quantize`'s greedy text, whole and
/// streamed, and differ from the dense model's logprobs.
#[test]
fn a_quantized_model_is_served_as_generate_runs_it() {
    let img = fixture_image("wide.png");
    let prompt = "Which organ is shown?";
    let model = fixtures().join("tiny-a");
    let tmp = tempfile::tempdir().unwrap();
    let saved = tmp.path().join("tiny-a-q8_0");
    let (ok, _, err) = medvlm(&[
        "quantize",
        "--model",
        s(&model),
        "--to",
        "q8_0",
        "--out",
        s(&saved),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = medvlm(&[
        "generate",
        "--model",
        s(&model),
        "--quantize",
        "q8_0",
        "--image",
        s(&img),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "16",
        "--json",
    ]);
    assert!(ok, "{err}");
    let want: Value = serde_json::from_str(&out).unwrap();
    let body = json!({
        "messages": ask(prompt, Some(&data_url(&img, "image/png"))),
        "max_tokens": 16,
        "temperature": 0,
        "logprobs": true,
    });
    let dense = Server::start(&model, &["--reasoning-format", "raw"]);
    let (_, dense_answer) = dense.post(&body);
    drop(dense);
    for (dir, extra) in [(&model, &["--quantize", "q8_0"][..]), (&saved, &[][..])] {
        let mut args = vec!["--reasoning-format", "raw"];
        args.extend_from_slice(extra);
        let srv = Server::start(dir, &args);
        let (status, got) = srv.post(&body);
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["choices"][0]["message"]["content"], want["text"]);
        assert_ne!(
            got["choices"][0]["logprobs"], dense_answer["choices"][0]["logprobs"],
            "the served model is not the quantized one"
        );
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let j = join_stream(&srv.stream(&sb));
        assert_eq!(Value::from(j[0].2.clone()), want["text"], "streamed");
    }
}

/// Under a template that opens `<think>` in the prompt (Qwen3-VL Thinking), the model's
/// text is reasoning until it writes `</think>`: split so, whole and streamed; the raw format
/// returns the generated text as written. The parrot here answers
/// `The liver is enlarged.</think>A` after the prompt's `<think>\n`.
#[test]
fn a_thinking_template_starts_the_completion_inside_the_reasoning() {
    let tmp = tempfile::tempdir().unwrap();
    let thinking = thinking_copy("tiny-a", &tmp.path().join("thinking"));
    let text = "The liver is enlarged.</think>A";
    let model = parrot_of(&thinking, &tmp.path().join("parrot"), "<think>\n", text);
    let srv = Server::start(&model, &[]);
    let body = json!({"messages": ask("Is the liver normal?", None), "max_tokens": 40});
    let (status, r) = srv.post(&body);
    assert_eq!(status, 200, "{r}");
    let m = &r["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "The liver is enlarged.", "{r}");
    assert_eq!(m["reasoning"], "The liver is enlarged.");
    assert_eq!(m["content"], "A");
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let j = join_stream(&srv.stream(&sb));
    assert_eq!(
        (j[0].1.as_str(), j[0].2.as_str()),
        ("The liver is enlarged.", "A")
    );
    // Cut before `</think>`: all of it is reasoning, none is content.
    let mut short = body.clone();
    short["max_tokens"] = json!(3);
    let (_, r) = srv.post(&short);
    let m = &r["choices"][0]["message"];
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(m["content"], "");
    assert!(
        "The liver is enlarged.".starts_with(m["reasoning_content"].as_str().unwrap()),
        "{r}"
    );
    drop(srv);
    let raw = Server::start(&model, &["--reasoning-format", "raw"]);
    let (_, r) = raw.post(&body);
    assert_eq!(r["choices"][0]["message"]["content"], text);
}

/// Images by data URL (PNG, JPEG, DICOM with a window) and by path under the allowed
/// directory; anything outside it, or any path without one, is refused.
#[test]
fn images_come_from_data_urls_or_the_allowed_directory_only() {
    let tmp = tempfile::tempdir().unwrap();
    let media = tmp.path().join("media");
    std::fs::create_dir_all(&media).unwrap();
    std::fs::copy(fixture_image("square.png"), media.join("scan one.png")).unwrap();
    std::fs::write(
        tmp.path().join("secret.png"),
        std::fs::read(fixture_image("tiny.png")).unwrap(),
    )
    .unwrap();
    let srv = Server::start(
        &tiny(),
        &[
            "--allowed-local-media-path",
            s(&media),
            "--reasoning-format",
            "raw",
        ],
    );
    let q = |url: &str| json!({"messages": ask("What is it?", Some(url)), "max_tokens": 8});
    let (st, by_data) = srv.post(&q(&data_url(&fixture_image("square.png"), "image/png")));
    assert_eq!(st, 200, "{by_data}");
    let text = by_data["choices"][0]["message"]["content"].clone();
    let canon = std::fs::canonicalize(&media).unwrap();
    for url in [
        "scan one.png".to_string(),
        format!("{}/scan one.png", canon.display()),
        format!("file://{}/scan%20one.png", canon.display()),
    ] {
        let (st, r) = srv.post(&q(&url));
        assert_eq!(st, 200, "{url}: {r}");
        assert_eq!(r["choices"][0]["message"]["content"], text, "{url}");
    }
    for url in [
        "../secret.png".to_string(),
        tmp.path().join("secret.png").display().to_string(),
        format!("file://{}/../secret.png", canon.display()),
        "/etc/passwd".into(),
    ] {
        let (st, r) = srv.post(&q(&url));
        assert_eq!(st, 400, "{url}: {r}");
        assert_eq!(r["error"]["type"], "invalid_request_error");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("outside"),
            "{r}"
        );
        assert_eq!(r["error"]["param"], "messages[0].content[0].image_url");
    }
    let (st, r) = srv.post(&q("https://example.com/x.png"));
    assert_eq!(st, 400);
    assert!(r["error"]["message"].as_str().unwrap().contains("network"));
    // JPEG and DICOM data URLs; the DICOM window is a request extra.
    let (st, r) = srv.post(&q(&data_url(&fixture_image("photo.jpg"), "image/jpeg")));
    assert_eq!(st, 200, "{r}");
    let ct = fixtures().join("medical/CT_small.dcm");
    let mut d = q(&data_url(&ct, "application/dicom"));
    d["window"] = json!("lung");
    let (st, r) = srv.post(&d);
    assert_eq!(st, 200, "{r}");
    // The window reaches the picture: the prompt is the same size but the pixels differ,
    // which the (random) model's log-probabilities show.
    let mut lung = d.clone();
    lung["logprobs"] = json!(true);
    let mut bone = lung.clone();
    bone["window"] = json!([400, 1800]);
    let first = |v: &Value| {
        v["choices"][0]["logprobs"]["content"][0]["logprob"]
            .as_f64()
            .unwrap()
    };
    let (_, a) = srv.post(&lung);
    let (_, b) = srv.post(&bone);
    assert_eq!(a["usage"]["prompt_tokens"], b["usage"]["prompt_tokens"]);
    assert_ne!(first(&a), first(&b));
    let mut bad = d.clone();
    bad["window"] = json!("elbow");
    let (st, r) = srv.post(&bad);
    assert_eq!((st, r["error"]["param"].as_str()), (400, Some("window")));
    // Not an image.
    let (st, r) = srv.post(&q("data:image/png;base64,aGVsbG8gd29ybGQ="));
    assert_eq!(st, 400);
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot read the image"),
        "{r}"
    );
    drop(srv);
    // Without --allowed-local-media-path no path is read.
    let closed = Server::start(&tiny(), &[]);
    let (st, r) = closed.post(&q("scan one.png"));
    assert_eq!(st, 400);
    assert!(
        r["error"]["message"].as_str().unwrap().contains("refused"),
        "{r}"
    );
}

/// Bad input of every kind gets an OpenAI-shaped error with the right status, and the
/// server keeps serving.
#[test]
fn bad_requests_get_openai_errors() {
    let srv = Server::start(
        &tiny(),
        &[
            "--max-body-mb",
            "1",
            "--max-prompt-tokens",
            "48",
            "--api-key",
            "sesame",
            "--max-batch",
            "4",
        ],
    );
    let ok = json!({"messages": ask("hi", None), "max_tokens": 3});
    let send = |body: &str, key: Option<&str>| {
        let mut r = client()
            .post(srv.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let r = r.send().unwrap();
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let v: Value = r.json().expect("errors are JSON");
        (status, v, retry)
    };
    let check = |status: u16, v: &Value, want: u16, kind: &str| {
        assert_eq!(status, want, "{v}");
        let e = &v["error"];
        assert_eq!(e["type"], kind, "{v}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    };
    let (st, v, _) = send(&ok.to_string(), None);
    check(st, &v, 401, "authentication_error");
    let (st, v, _) = send(&ok.to_string(), Some("wrong"));
    check(st, &v, 401, "authentication_error");
    let (st, v, _) = send(&ok.to_string(), Some("sesame"));
    assert_eq!(st, 200, "{v}");
    let key = Some("sesame");
    let (st, v, _) = send("{\"messages\": [", key);
    check(st, &v, 400, "invalid_request_error");
    let (st, v, _) = send("[1, 2]", key);
    check(st, &v, 400, "invalid_request_error");
    let (st, v, _) = send(
        &json!({"model": "gpt-4o", "messages": ask("hi", None)}).to_string(),
        key,
    );
    check(st, &v, 404, "invalid_request_error");
    assert_eq!(v["error"]["code"], "model_not_found");
    let (st, v, _) = send(
        &json!({"messages": ask("hi", None), "temperature": -1}).to_string(),
        key,
    );
    check(st, &v, 400, "invalid_request_error");
    let (st, v, _) = send(
        &json!({"messages": ask("hi", None), "n": 5}).to_string(),
        key,
    );
    check(st, &v, 400, "invalid_request_error");
    assert_eq!(v["error"]["param"], "n");
    let (st, v, _) = send(
        &json!({"messages": ask("hi", None), "max_tokens": 100000}).to_string(),
        key,
    );
    check(st, &v, 400, "invalid_request_error");
    // An image whose tokens exceed --max-prompt-tokens.
    let big = data_url(&fixture_image("large.png"), "image/png");
    let (st, v, _) = send(&json!({"messages": ask("hi", Some(&big))}).to_string(), key);
    check(st, &v, 400, "invalid_request_error");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("tokens"),
        "{v}"
    );
    // A body over --max-body-mb.
    let huge = format!("data:image/png;base64,{}", "A".repeat(1_500_000));
    let (st, v, _) = send(
        &json!({"messages": ask("hi", Some(&huge))}).to_string(),
        key,
    );
    check(st, &v, 413, "invalid_request_error");
    // Numbers the sampler cannot use (temperature 1e-45 was a 500) name their field.
    for (field, v) in [
        ("temperature", json!(1e-45)),
        ("temperature", json!(3)),
        ("top_p", json!(0)),
        ("min_p", json!(1e-40)),
        ("repetition_penalty", json!(1e-45)),
        ("top_k", json!(-7)),
        ("max_tokens", json!(0)),
        ("seed", json!(0.5)),
    ] {
        let mut b = json!({"messages": ask("hi", None)});
        b[field] = v;
        let (st, v, _) = send(&b.to_string(), key);
        check(st, &v, 400, "invalid_request_error");
        assert_eq!(v["error"]["param"], field, "{v}");
    }
    // Bytes after the JSON value are refused; whitespace is not.
    let (st, v, _) = send(&format!("{ok} trailing"), key);
    check(st, &v, 400, "invalid_request_error");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("after"),
        "{v}"
    );
    let (st, v, _) = send(&format!("{ok}\r\n  "), key);
    assert_eq!(st, 200, "{v}");
    // Stop strings: at most 4, each at most 1024 bytes.
    let (st, v, _) = send(
        &json!({"messages": ask("hi", None), "stop": ["x".repeat(1025)]}).to_string(),
        key,
    );
    check(st, &v, 400, "invalid_request_error");
    assert_eq!(v["error"]["param"], "stop");
    // Unknown endpoint and wrong method.
    let r = client()
        .get(srv.url("/v1/nothing"))
        .bearer_auth("sesame")
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    let r = client()
        .get(srv.url("/v1/chat/completions"))
        .bearer_auth("sesame")
        .send()
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.json::<Value>().unwrap()["error"]["message"].is_string());
    // Health and metrics need no key; the server still answers.
    assert_eq!(
        client().get(srv.url("/health")).send().unwrap().status(),
        200
    );
    let (st, _, _) = send(&ok.to_string(), key);
    assert_eq!(st, 200);
    assert!(!srv.log().contains("panicked"), "{}", srv.log());
}

/// With one slot and one queue place: a long stream holds the slot, a second request
/// waits, a third gets 429 with Retry-After; a client that disconnects mid-stream (or gives
/// up on a non-streamed request) frees its slot at once; SIGTERM lets the stream in flight
/// finish and the server exit 0.
#[test]
fn queue_full_disconnect_and_sigterm() {
    let mut srv = Server::start(&tiny(), &["--max-batch", "1", "--max-queue", "1"]);
    let long = json!({
        "messages": ask("hi", None), "max_tokens": 4000, "ignore_eos": true, "stream": true,
    });
    let mut a = BufReader::new(srv.post_raw(&long, None));
    let mut first = String::new();
    a.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let base = srv.base.clone();
    let b = std::thread::spawn(move || {
        let t = Instant::now();
        let r = client()
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({"messages": ask("hello", None), "max_tokens": 5}))
            .send()
            .unwrap();
        (r.status().as_u16(), t.elapsed())
    });
    let t = Instant::now();
    while srv.metric("medvlm_queue_depth") < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the second request never queued"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = srv.post_raw(
        &json!({"messages": ask("third", None), "max_tokens": 5}),
        None,
    );
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    // Disconnect the long stream: the waiting request runs at once.
    drop(a);
    let (status, waited) = b.join().unwrap();
    assert_eq!(status, 200);
    assert!(srv.metric("medvlm_cancelled_requests_total") >= 1.0);
    let generated = srv.metric("medvlm_completion_tokens_total");
    assert!(
        generated < 4000.0,
        "the abandoned stream was stopped ({generated} tokens)"
    );
    eprintln!("the queued request waited {waited:?}");
    // A client that gives up on a non-streamed request frees its slot too.
    let cancelled = srv.metric("medvlm_cancelled_requests_total");
    let quick = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    let gave_up = quick
        .post(srv.url("/v1/chat/completions"))
        .json(&json!({"messages": ask("hi", None), "max_tokens": 4000, "ignore_eos": true}))
        .send();
    assert!(gave_up.is_err(), "4000 tokens took under 150 ms");
    let t = Instant::now();
    while srv.metric("medvlm_cancelled_requests_total") < cancelled + 1.0
        || srv.metric("medvlm_running_sequences") > 0.0
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the abandoned request kept running"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Both clients that left are counted as such, streamed or not.
    assert!(srv.metric("medvlm_requests_total{status=\"499\"}") >= 2.0);

    // SIGTERM during a stream: the stream completes, then the server exits 0. Until then
    // the server still answers, /health with 503 (so a load balancer moves on) and new
    // requests with 503. The stream is not read meanwhile, and is too long for the socket
    // buffers, so it cannot finish early.
    let mut c = BufReader::new(srv.post_raw(
        &json!({"messages": ask("hi", None), "max_tokens": 4000, "ignore_eos": true, "stream": true}),
        None,
    ));
    let mut line = String::new();
    c.read_line(&mut line).unwrap();
    let pid = srv.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    loop {
        let h = client().get(srv.url("/health")).send().unwrap();
        if h.status() == 503 {
            assert_eq!(h.headers()["connection"], "close");
            let v: Value = h.json().unwrap();
            assert_eq!(v["error"]["code"], "shutting_down", "{v}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no 503 from /health");
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = srv.post_raw(&json!({"messages": ask("hi", None), "max_tokens": 3}), None);
    assert_eq!(r.status(), 503);
    let mut rest = String::new();
    c.read_to_string(&mut rest).unwrap();
    let events = parse_sse(&(line + &rest));
    let j = join_stream(&events);
    assert_eq!(
        j[0].3.as_deref(),
        Some("length"),
        "the stream in flight finished"
    );
    let t = Instant::now();
    let code = loop {
        if let Some(s) = srv.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "exit status {code:?}\n{}", srv.log());
    assert!(srv.log().contains("shutting down"));
}

/// A bounded load test: 4 clients send 24 requests at once (6 prompts, each 4 times, in
/// different orders); every request is answered, none lost, each with the text the same
/// prompt gets alone, and the engine did decode several sequences per step.
#[test]
fn concurrent_clients_get_the_sequential_answers() {
    let srv = Server::start(&tiny(), &["--max-batch", "4", "--reasoning-format", "raw"]);
    let imgs = ["square.png", "wide.png", "tall.png"];
    let bodies: Vec<Value> = (0..6)
        .map(|i| {
            let url = data_url(&fixture_image(imgs[i % 3]), "image/png");
            json!({
                "messages": ask(&format!("Question number {i}?"), if i < 3 { Some(url.as_str()) } else { None }),
                "max_tokens": 24,
            })
        })
        .collect();
    let alone: Vec<Value> = bodies
        .iter()
        .map(|b| {
            let (st, r) = srv.post(b);
            assert_eq!(st, 200, "{r}");
            r["choices"][0]["message"]["content"].clone()
        })
        .collect();
    let bodies = Arc::new(bodies);
    let base = srv.base.clone();
    let threads: Vec<_> = (0..4)
        .map(|c| {
            let bodies = bodies.clone();
            let base = base.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for k in 0..6 {
                    let i = (k * (c + 1) + c) % 6;
                    let mut b = bodies[i].clone();
                    b["stream"] = json!(c % 2 == 1);
                    let r = client()
                        .post(format!("{base}/v1/chat/completions"))
                        .json(&b)
                        .send()
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    let text = if c % 2 == 1 {
                        let body = r.text().unwrap();
                        Value::from(join_stream(&parse_sse(&body))[0].2.clone())
                    } else {
                        r.json::<Value>().unwrap()["choices"][0]["message"]["content"].clone()
                    };
                    got.push((i, text));
                }
                got
            })
        })
        .collect();
    let mut answered = 0;
    for t in threads {
        for (i, text) in t.join().unwrap() {
            assert_eq!(text, alone[i], "prompt {i}");
            answered += 1;
        }
    }
    assert_eq!(answered, 24);
    let steps = srv.metric("medvlm_batch_size_count");
    let single = srv.metric("medvlm_batch_size_bucket{le=\"1\"}");
    assert!(
        single < steps,
        "some steps decoded several sequences together"
    );
    assert_eq!(srv.metric("medvlm_queue_depth"), 0.0);
    assert_eq!(srv.metric("medvlm_running_sequences"), 0.0);
}

/// A request over --request-timeout gets 504 (or an error event when streaming) and its
/// sequences stop.
#[test]
fn timed_out_requests_get_504_and_stop() {
    let srv = Server::start(&tiny(), &["--request-timeout", "0.2"]);
    let long = json!({"messages": ask("hi", None), "max_tokens": 4000, "ignore_eos": true});
    let (st, v) = srv.post(&long);
    assert_eq!(st, 504, "{v}");
    assert_eq!(v["error"]["type"], "timeout_error");
    let mut s = long.clone();
    s["stream"] = json!(true);
    let events = srv.stream(&s);
    let last = events.last().unwrap();
    assert_eq!(last["error"]["type"], "timeout_error", "{last}");
    let t = Instant::now();
    while srv.metric("medvlm_running_sequences") > 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed-out sequences kept running"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(srv.metric("medvlm_cancelled_requests_total") >= 2.0);
    assert!(srv.metric("medvlm_completion_tokens_total") < 8000.0);
    // The server goes on serving.
    let (st, _) = srv.post(&json!({"messages": ask("hi", None), "max_tokens": 3}));
    assert_eq!(st, 200);
}
