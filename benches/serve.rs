//! `cargo bench --bench serve`: throughput and latency of `medvlm serve` under 1, 4 and 16
//! concurrent clients on the 119.7M-parameter bench model (`medvlm init --preset
//! qwen2-vl-bench`), each request one real scan from the MedVLM-R1 test set (224x224, 64
//! image tokens, a 140-token prompt) and a question, 64 greedy tokens (`ignore_eos`, so every
//! request costs the same). 1 client is sequential requests.
//!
//! Reported per level: completion tokens/s over the wall time, request latency and time to
//! first token (p50/p95), and the longest pause between two streamed chunks of a request
//! (p95 over requests): how long new requests' prefills stall running streams. With
//! `--compare-unchunked` the levels above 1 run again with prefill chunking off
//! (`--prefill-chunk 1000000`).
//!
//! Options (after `--`): --model DIR (default: a bench model written to
//! target/bench-model), --clients 1,4,16, --requests N (per level, default 32),
//! --max-tokens N (64), --max-pixels N (default 200704; the test-set images are 224x224, 64
//! image tokens, so it does not bind), --pixels N (every image resized to about N pixels:
//! long prompts), --compare-unchunked.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

struct Opts {
    model: Option<PathBuf>,
    clients: Vec<usize>,
    requests: usize,
    max_tokens: usize,
    compare_unchunked: bool,
    max_pixels: usize,
    min_pixels: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        model: None,
        clients: vec![1, 4, 16],
        requests: 32,
        max_tokens: 64,
        compare_unchunked: false,
        max_pixels: 200704,
        min_pixels: 3136,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--model" => o.model = Some(PathBuf::from(val())),
            "--clients" => o.clients = val().split(',').map(|x| x.parse().unwrap()).collect(),
            "--requests" => o.requests = val().parse().unwrap(),
            "--max-tokens" => o.max_tokens = val().parse().unwrap(),
            "--compare-unchunked" => o.compare_unchunked = true,
            "--max-pixels" => o.max_pixels = val().parse().unwrap(),
            // Both limits: every image resized to about this area (long prompts).
            "--pixels" => {
                let v: usize = val().parse().unwrap();
                (o.min_pixels, o.max_pixels) = (v, v);
            }
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    o
}

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(model: &Path, (min_pixels, max_pixels): (usize, usize), extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_medvlm"))
        .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
        .args(["--max-batch", "16", "--max-pixels", &max_pixels.to_string()])
        .args(["--min-pixels", &min_pixels.to_string()])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start medvlm serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("the server exited").unwrap();
        if let Some(i) = line.find("http://") {
            let url = line[i..].split_whitespace().next().unwrap();
            break url.trim_end_matches("/v1").to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Server { child, base }
}

struct Sample {
    latency: f64,
    ttft: f64,
    max_gap: f64,
    tokens: usize,
}

/// One streamed request: latency, time to first content, longest pause between chunks.
fn one(base: &str, body: &Value) -> Sample {
    let t0 = Instant::now();
    let r = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(1800))
        .build()
        .unwrap()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut ttft = None;
    let mut last = None::<Instant>;
    let mut max_gap = 0f64;
    let mut tokens = 0;
    for line in BufReader::new(r).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(u) = v.get("usage") {
            tokens = u["completion_tokens"].as_u64().unwrap() as usize;
        }
        let d = &v["choices"][0]["delta"];
        if d.get("content").is_some_and(|c| c != "") || d.get("reasoning_content").is_some() {
            let now = Instant::now();
            ttft.get_or_insert(now.duration_since(t0).as_secs_f64());
            if let Some(l) = last {
                max_gap = max_gap.max(now.duration_since(l).as_secs_f64());
            }
            last = Some(now);
        }
    }
    Sample {
        latency: t0.elapsed().as_secs_f64(),
        ttft: ttft.unwrap_or(f64::NAN),
        max_gap,
        tokens,
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn level(base: &str, bodies: &Arc<Vec<Value>>, clients: usize, requests: usize) -> String {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (base, bodies, next) = (base.to_string(), bodies.clone(), next.clone());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= requests {
                        return out;
                    }
                    out.push(one(&base, &bodies[i % bodies.len()]));
                }
            })
        })
        .collect();
    let samples: Vec<Sample> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let wall = t0.elapsed().as_secs_f64();
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let mut lat: Vec<f64> = samples.iter().map(|s| s.latency).collect();
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    let mut gap: Vec<f64> = samples.iter().map(|s| s.max_gap).collect();
    format!(
        "| {clients} | {requests} | {wall:.1} s | {:.1} | {:.2} / {:.2} s | {:.2} / {:.2} s | {:.2} s |",
        tokens as f64 / wall,
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.95),
        pct(&mut ttft, 0.5),
        pct(&mut ttft, 0.95),
        pct(&mut gap, 0.95),
    )
}

fn main() {
    let o = opts();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = o.model.clone().unwrap_or_else(|| {
        let dir = root.join("target/bench-model");
        if !dir.join("config.json").is_file() {
            let st = Command::new(env!("CARGO_BIN_EXE_medvlm"))
                .args([
                    "init",
                    "--preset",
                    "qwen2-vl-bench",
                    "--out",
                    dir.to_str().unwrap(),
                ])
                .status()
                .unwrap();
            assert!(st.success());
        }
        dir
    });
    let images = root.join("../shared/data/medvlm-r1-testset/images");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&images)
        .unwrap_or_else(|e| panic!("{}: {e}", images.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let bodies: Vec<Value> = files
        .iter()
        .map(|f| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(f).unwrap());
            json!({
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}")}},
                    {"type": "text", "text": "What can be observed in this image? A) a fracture B) normal anatomy C) a mass D) an effusion. Output the thinking process in <think> </think> and the final answer in <answer> </answer> tags."},
                ]}],
                "max_tokens": o.max_tokens,
                "temperature": 0,
                "ignore_eos": true,
                "stream": true,
                "stream_options": {"include_usage": true},
            })
        })
        .collect();
    let bodies = Arc::new(bodies);
    println!(
        "model {}, {} real test-set images ({}..{} pixels), {} tokens per request\n",
        model.display(),
        bodies.len(),
        o.min_pixels,
        o.max_pixels,
        o.max_tokens
    );
    let header = "| clients | requests | wall | completion tokens/s | latency p50 / p95 | first token p50 / p95 | longest pause p95 |\n| --- | --- | --- | --- | --- | --- | --- |";
    let mut runs = vec![("prefill chunk 256 (default)", vec![])];
    if o.compare_unchunked {
        runs.push(("prefill not chunked", vec!["--prefill-chunk", "1000000"]));
    }
    for (name, extra) in runs {
        let srv = start(&model, (o.min_pixels, o.max_pixels), &extra);
        // Warm-up: the first request pays for page faults of the weights.
        one(&srv.base, &bodies[0]);
        println!("{name}:\n{header}");
        for &c in &o.clients {
            if !extra.is_empty() && c == 1 {
                continue;
            }
            println!("{}", level(&srv.base, &bodies, c, o.requests));
        }
        println!();
    }
}
