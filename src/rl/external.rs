//! Rewards that live outside the binary: a long-lived child process in any language
//! ([`CommandReward`]), an HTTP endpoint ([`HttpReward`]), and an LLM judge behind any
//! OpenAI-compatible chat endpoint ([`JudgeReward`]).
//!
//! All three see a completion as the same JSON object ([`sample_json`]): the step, the
//! completion's index and group, the prompt and completion texts, and the row's fields
//! (question, options, answer, solution, kind, modality, id, dataset, and whatever extra
//! fields the data row carries). They answer a score per completion, optionally with named
//! metrics. Anything else (a process that exits, a malformed or missing line, a timeout, a
//! refused connection, an HTTP error) is an error naming the cause; the trainer adds the
//! reward's name and the step, and stops the run with the last checkpoint intact.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::reward::{BatchReward, RewardContext, Sample, Scores};
use crate::data::score::first_number;

/// How long a reward may take for one step (command, HTTP) or one completion (judge) unless
/// its config says otherwise.
pub const DEFAULT_TIMEOUT_S: f64 = 300.0;

/// The JSON object every external reward gets for one completion.
pub fn sample_json(step: u64, index: usize, s: &Sample) -> Value {
    let item = s.item;
    let ctx = RewardContext::of(item);
    let mut v = json!({
        "step": step,
        "index": index,
        "group": s.group,
        "prompt": s.prompt,
        "completion": s.completion,
        "question": item.question,
        "options": item.options(),
        "answer": item.answer.text(),
        "solution": ctx.solution(),
        "kind": item.answer.kind(),
        "modality": item.subset,
        "id": item.id,
        "dataset": item.dataset,
    });
    if !item.extra.is_empty() {
        v["fields"] = Value::Object(item.extra.clone());
    }
    v
}

/// One reply line: a bare number, or `{"score": number, "metrics": {name: number}}`.
fn parse_reply(line: &str) -> Result<(f32, Vec<(String, f64)>)> {
    let v: Value = serde_json::from_str(line.trim()).map_err(|_| {
        anyhow!(
            "reply {:?} is not JSON (a number or {{\"score\": ...}})",
            clip(line.trim(), 200)
        )
    })?;
    parse_score(&v)
}

/// One score as JSON (a reply line, or an entry of a server's `scores` list).
fn parse_score(v: &Value) -> Result<(f32, Vec<(String, f64)>)> {
    let shown = clip(&v.to_string(), 200);
    let (score, metrics) = match v {
        Value::Number(n) => (n.as_f64(), None),
        Value::Object(o) => (o.get("score").and_then(Value::as_f64), o.get("metrics")),
        _ => (None, None),
    };
    let Some(score) = score else {
        bail!("reply {shown:?} has no number \"score\"");
    };
    if !score.is_finite() {
        bail!("reply {shown:?}: the score is not a finite number");
    }
    let mut out = Vec::new();
    if let Some(m) = metrics {
        let Some(m) = m.as_object() else {
            bail!("reply {shown:?}: \"metrics\" must be an object of numbers");
        };
        for (k, v) in m {
            match v.as_f64() {
                Some(x) if x.is_finite() => out.push((k.clone(), x)),
                _ => bail!("reply {shown:?}: metric {k:?} is not a finite number"),
            }
        }
    }
    Ok((score as f32, out))
}

/// Gathers per-sample metrics into one series per name (samples without one are skipped).
fn collect_metrics(per_sample: Vec<Vec<(String, f64)>>) -> Vec<(String, Vec<f64>)> {
    let mut out: Vec<(String, Vec<f64>)> = Vec::new();
    for ms in per_sample {
        for (k, v) in ms {
            match out.iter_mut().find(|(n, _)| *n == k) {
                Some((_, vals)) => vals.push(v),
                None => out.push((k, vec![v])),
            }
        }
    }
    out
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

// ---------------------------------------------------------------------------------------------
// A command
// ---------------------------------------------------------------------------------------------

/// A child process started once and reused every step. Each step it reads one JSON line per
/// completion on stdin ([`sample_json`]) and writes one reply line per completion, in order,
/// on stdout. Its stderr goes to a file in the run directory (appended, so a resumed run
/// keeps what the first one said), whose last lines an error quotes.
pub struct CommandReward {
    name: String,
    argv: Vec<String>,
    timeout: Duration,
    stderr_path: PathBuf,
    child: Option<Running>,
}

struct Running {
    child: Child,
    /// Batches of request bytes, written by a thread so that a child answering while we
    /// still write cannot deadlock on full pipes.
    writer: Option<mpsc::Sender<Vec<u8>>>,
    lines: Receiver<std::io::Result<String>>,
    /// The stdin handle lives in the writer thread; this joins it on drop.
    writer_thread: Option<std::thread::JoinHandle<()>>,
}

impl CommandReward {
    pub fn new(name: &str, argv: Vec<String>, timeout_s: f64, stderr_path: PathBuf) -> Self {
        Self {
            name: name.to_string(),
            argv,
            timeout: Duration::from_secs_f64(timeout_s),
            stderr_path,
            child: None,
        }
    }

    fn command_line(&self) -> String {
        self.argv.join(" ")
    }

    fn start(&mut self) -> Result<&mut Running> {
        if self.child.is_none() {
            if let Some(dir) = self.stderr_path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("{}: cannot create", dir.display()))?;
            }
            let stderr = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.stderr_path)
                .with_context(|| format!("{}: cannot open", self.stderr_path.display()))?;
            let mut child = Command::new(&self.argv[0])
                .args(&self.argv[1..])
                .env("MEDVLM_REWARD_NAME", &self.name)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(stderr)
                .spawn()
                .map_err(|e| anyhow!("cannot start `{}`: {e}", self.command_line()))?;
            let stdin: ChildStdin = child.stdin.take().context("no stdin")?;
            let stdout = child.stdout.take().context("no stdout")?;
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let end = line.is_err();
                    if tx.send(line).is_err() || end {
                        break;
                    }
                }
            });
            let (wtx, wrx) = mpsc::channel::<Vec<u8>>();
            let writer_thread = std::thread::spawn(move || {
                let mut stdin = stdin;
                for chunk in wrx {
                    // A child that exits shows up on the reading side.
                    if stdin.write_all(&chunk).and_then(|_| stdin.flush()).is_err() {
                        break;
                    }
                }
            });
            self.child = Some(Running {
                child,
                writer: Some(wtx),
                lines: rx,
                writer_thread: Some(writer_thread),
            });
        }
        Ok(self.child.as_mut().expect("started above"))
    }

    /// Why the child stopped answering: its exit status, if it has one by now.
    fn exit_cause(&mut self, answered: usize, asked: usize) -> String {
        let status = self.child.as_mut().and_then(|r| {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match r.child.try_wait() {
                    Ok(Some(s)) => return Some(s),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => return None,
                }
            }
        });
        match status {
            Some(s) => format!(
                "`{}` exited ({s}) after answering {answered} of {asked} completions",
                self.command_line()
            ),
            None => format!(
                "`{}` closed its output after answering {answered} of {asked} completions",
                self.command_line()
            ),
        }
    }

    /// The error `cause`, with the last lines the child wrote to stderr.
    fn failure(&mut self, cause: String) -> anyhow::Error {
        // The child is of no use after a failure; a resumed run starts a fresh one.
        self.child = None;
        let tail = last_lines(&self.stderr_path, 5);
        if tail.is_empty() {
            anyhow!(
                "{cause} (nothing on its stderr, {})",
                self.stderr_path.display()
            )
        } else {
            anyhow!(
                "{cause}; its stderr ({}) ends: {}",
                self.stderr_path.display(),
                tail.join(" | ")
            )
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Closing stdin ends a well-behaved child's loop; anything still running is killed.
        self.writer.take();
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.writer_thread.take() {
            let _ = t.join();
        }
    }
}

impl BatchReward for CommandReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score_batch(&mut self, step: u64, samples: &[Sample]) -> Result<Scores> {
        let mut request = Vec::new();
        for (k, s) in samples.iter().enumerate() {
            serde_json::to_writer(&mut request, &sample_json(step, k, s))?;
            request.push(b'\n');
        }
        let timeout = self.timeout;
        let running = match self.start() {
            Ok(r) => r,
            Err(e) => return Err(self.failure(format!("{e:#}"))),
        };
        // Lines left over from the step before mean the child answers more than it is asked.
        if let Ok(Ok(extra)) = running.lines.try_recv() {
            let cause = format!(
                "`{}` wrote more reply lines than completions at the step before (extra line {:?})",
                self.command_line(),
                clip(&extra, 100)
            );
            return Err(self.failure(cause));
        }
        if running
            .writer
            .as_ref()
            .is_none_or(|w| w.send(request).is_err())
        {
            let cause = self.exit_cause(0, samples.len());
            return Err(self.failure(cause));
        }
        let deadline = Instant::now() + timeout;
        let mut scores = Vec::with_capacity(samples.len());
        let mut metrics = Vec::with_capacity(samples.len());
        for k in 0..samples.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self
                .child
                .as_ref()
                .expect("running")
                .lines
                .recv_timeout(left)
            {
                Ok(Ok(line)) => line,
                Ok(Err(e)) => {
                    let cause = format!("cannot read `{}`'s output: {e}", self.command_line());
                    return Err(self.failure(cause));
                }
                Err(RecvTimeoutError::Timeout) => {
                    let cause = format!(
                        "`{}` answered {k} of {} completions within the {} s timeout",
                        self.command_line(),
                        samples.len(),
                        timeout.as_secs_f64()
                    );
                    return Err(self.failure(cause));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let cause = self.exit_cause(k, samples.len());
                    return Err(self.failure(cause));
                }
            };
            match parse_reply(&line) {
                Ok((s, m)) => {
                    scores.push(s);
                    metrics.push(m);
                }
                Err(e) => {
                    let cause = format!(
                        "line {} of `{}`'s answer: {e:#}",
                        k + 1,
                        self.command_line()
                    );
                    return Err(self.failure(cause));
                }
            }
        }
        Ok(Scores {
            scores,
            metrics: collect_metrics(metrics),
        })
    }
}

/// The last `n` non-empty lines of a text file (at most its last 64 KiB), for errors.
fn last_lines(path: &Path, n: usize) -> Vec<String> {
    let Ok(mut f) = File::open(path) else {
        return vec![];
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(64 << 10);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return vec![];
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return vec![];
    }
    let text = String::from_utf8_lossy(&buf);
    let mut tail: VecDeque<String> = VecDeque::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        tail.push_back(clip(l.trim_end(), 300));
        if tail.len() > n {
            tail.pop_front();
        }
    }
    tail.into()
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// A reward server: each step one POST of `{"step": s, "samples": [...]}` ([`sample_json`]
/// each), answered by `{"scores": [...]}` (each a number or `{"score", "metrics"}`), or by the
/// list itself.
pub struct HttpReward {
    name: String,
    url: String,
    client: reqwest::blocking::Client,
}

fn http_client(timeout_s: f64) -> Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs_f64(timeout_s))
        .build()
        .context("cannot create an HTTP client")
}

/// Refuses a URL this build cannot call, before a run starts.
pub fn check_url(url: &str) -> std::result::Result<(), String> {
    if url.starts_with("https://") {
        return Err(format!(
            "{url}: https is not supported (medvlm is built without TLS); run the reward \
             server on http:// (a local port or an SSH tunnel)"
        ));
    }
    if !url.starts_with("http://") {
        return Err(format!("{url}: not an http:// URL"));
    }
    Ok(())
}

/// One line for an HTTP failure: the URL and what went wrong (refused, timed out, status).
fn http_error(url: &str, e: reqwest::Error) -> anyhow::Error {
    let what = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        // The innermost cause says "Connection refused" and the like.
        let mut inner: &dyn std::error::Error = &e;
        while let Some(s) = inner.source() {
            inner = s;
        }
        format!("cannot connect: {inner}")
    } else {
        format!("{e}")
    };
    anyhow!("POST {url}: {what}")
}

impl HttpReward {
    pub fn new(name: &str, url: &str, timeout_s: f64) -> Result<Self> {
        check_url(url).map_err(|e| anyhow!(e))?;
        Ok(Self {
            name: name.to_string(),
            url: url.to_string(),
            client: http_client(timeout_s)?,
        })
    }
}

impl BatchReward for HttpReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score_batch(&mut self, step: u64, samples: &[Sample]) -> Result<Scores> {
        let body = json!({
            "step": step,
            "samples": samples
                .iter()
                .enumerate()
                .map(|(k, s)| sample_json(step, k, s))
                .collect::<Vec<_>>(),
        });
        let resp = self
            .client
            .post(&self.url)
            .json(&body)
            .send()
            .map_err(|e| http_error(&self.url, e))?;
        let status = resp.status();
        let text = resp.text().map_err(|e| http_error(&self.url, e))?;
        if !status.is_success() {
            bail!(
                "POST {}: HTTP {status}: {}",
                self.url,
                clip(text.trim(), 300)
            );
        }
        let v: Value = serde_json::from_str(&text).map_err(|_| {
            anyhow!(
                "POST {}: the answer is not JSON: {}",
                self.url,
                clip(text.trim(), 200)
            )
        })?;
        let list = match &v {
            Value::Array(a) => a,
            Value::Object(o) => match o.get("scores") {
                Some(Value::Array(a)) => a,
                _ => bail!("POST {}: the answer has no \"scores\" list", self.url),
            },
            _ => bail!(
                "POST {}: the answer is neither a list nor {{\"scores\": [...]}}",
                self.url
            ),
        };
        if list.len() != samples.len() {
            bail!(
                "POST {}: {} scores for {} completions",
                self.url,
                list.len(),
                samples.len()
            );
        }
        let mut scores = Vec::with_capacity(list.len());
        let mut metrics = Vec::with_capacity(list.len());
        for (k, item) in list.iter().enumerate() {
            let (s, m) =
                parse_score(item).with_context(|| format!("POST {}: score {}", self.url, k + 1))?;
            scores.push(s);
            metrics.push(m);
        }
        Ok(Scores {
            scores,
            metrics: collect_metrics(metrics),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// An LLM judge
// ---------------------------------------------------------------------------------------------

/// How a judge's reply becomes a score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JudgeRule {
    /// The first number in the reply, times `scale`.
    Number,
    /// 1 when the reply (trimmed, lowercased) starts with "yes", 0 when with "no".
    YesNo,
}

/// An LLM judge's settings (`judge = {...}` in a reward entry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeSpec {
    /// The OpenAI-compatible API base, e.g. `http://127.0.0.1:8000/v1` (`/chat/completions`
    /// is appended).
    pub url: String,
    /// The `model` field of the request; by default the first model the endpoint lists
    /// (`GET /models`), which is the one a single-model server (vLLM, `medvlm serve`) has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The user message: `{question}`, `{options}`, `{answer}`, `{solution}`, `{kind}`,
    /// `{modality}`, `{completion}` and `{response}` (the completion's answer block, else the
    /// completion) are replaced by the row's and the completion's values.
    pub prompt: String,
    #[serde(default = "default_rule")]
    pub rule: JudgeRule,
    /// Multiplies a `number` reply (e.g. 0.1 for a 0-10 scale).
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default = "default_judge_tokens")]
    pub max_tokens: usize,
    /// Requests in flight at once.
    #[serde(default = "default_parallel")]
    pub parallel: usize,
}

fn default_rule() -> JudgeRule {
    JudgeRule::Number
}
fn one() -> f64 {
    1.0
}
fn default_judge_tokens() -> usize {
    64
}
fn default_parallel() -> usize {
    4
}

impl JudgeSpec {
    pub fn validate(&self) -> std::result::Result<(), String> {
        check_url(&self.url)?;
        if self.prompt.trim().is_empty() {
            return Err("judge.prompt is empty".into());
        }
        if !self.prompt.contains("{completion}") && !self.prompt.contains("{response}") {
            return Err(
                "judge.prompt never shows the completion ({completion} or {response})".into(),
            );
        }
        if !(self.scale.is_finite()) {
            return Err("judge.scale must be a finite number".into());
        }
        if self.max_tokens == 0 || self.parallel == 0 {
            return Err("judge.max_tokens and judge.parallel must be at least 1".into());
        }
        Ok(())
    }

    /// The judge's message for one completion.
    pub fn render(&self, s: &Sample) -> String {
        let item = s.item;
        let options: Vec<String> = item
            .options()
            .iter()
            .zip(crate::data::LETTERS)
            .map(|(o, l)| format!("{l}) {o}"))
            .collect();
        let response =
            crate::data::score::answer_block(s.completion).unwrap_or_else(|| s.completion.trim());
        let mut out = self.prompt.clone();
        for (key, value) in [
            ("{question}", item.question.as_str()),
            ("{options}", &options.join("\n")),
            ("{answer}", item.answer.text()),
            ("{solution}", RewardContext::of(item).solution()),
            ("{kind}", item.answer.kind()),
            ("{modality}", &item.subset),
            ("{response}", response),
            ("{completion}", s.completion),
        ] {
            out = out.replace(key, value);
        }
        out
    }

    /// The score a reply gives, `None` when the rule cannot read it.
    pub fn read(&self, reply: &str) -> Option<f32> {
        match self.rule {
            JudgeRule::Number => first_number(reply).map(|x| (x * self.scale) as f32),
            JudgeRule::YesNo => {
                let r = reply.trim().to_lowercase();
                if r.starts_with("yes") {
                    Some(1.0)
                } else if r.starts_with("no") {
                    Some(0.0)
                } else {
                    None
                }
            }
        }
    }
}

/// A judge model asked about every completion through `/chat/completions` (temperature 0).
/// A reply its rule cannot read scores 0 and is counted in the `unreadable` metric: one
/// stray reply should not stop a run; an unreachable or failing endpoint does.
pub struct JudgeReward {
    name: String,
    spec: JudgeSpec,
    endpoint: String,
    /// The model asked: the spec's, else found at the first step.
    model: Option<String>,
    client: reqwest::blocking::Client,
}

impl JudgeReward {
    pub fn new(name: &str, spec: JudgeSpec, timeout_s: f64) -> Result<Self> {
        spec.validate().map_err(|e| anyhow!(e))?;
        let endpoint = format!("{}/chat/completions", spec.url.trim_end_matches('/'));
        Ok(Self {
            name: name.to_string(),
            model: spec.model.clone(),
            spec,
            endpoint,
            client: http_client(timeout_s)?,
        })
    }

    /// The first model `GET {url}/models` lists.
    fn served_model(&self) -> Result<String> {
        let url = format!("{}/models", self.spec.url.trim_end_matches('/'));
        let resp = self
            .client
            .get(&url)
            .send()
            .map_err(|e| http_error(&url, e))?;
        let status = resp.status();
        let text = resp.text().map_err(|e| http_error(&url, e))?;
        if !status.is_success() {
            bail!("GET {url}: HTTP {status}: {}", clip(text.trim(), 300));
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|_| anyhow!("GET {url}: the answer is not JSON"))?;
        v["data"][0]["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("GET {url}: no model listed (data[0].id); set judge.model"))
    }

    fn ask(&self, message: &str) -> Result<String> {
        let body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": message}],
            "temperature": 0.0,
            "max_tokens": self.spec.max_tokens,
        });
        let resp = self
            .client
            .post(&self.endpoint)
            .json(&body)
            .send()
            .map_err(|e| http_error(&self.endpoint, e))?;
        let status = resp.status();
        let text = resp.text().map_err(|e| http_error(&self.endpoint, e))?;
        if !status.is_success() {
            bail!(
                "POST {}: HTTP {status}: {}",
                self.endpoint,
                clip(text.trim(), 300)
            );
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|_| anyhow!("POST {}: the answer is not JSON", self.endpoint))?;
        v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("POST {}: no choices[0].message.content", self.endpoint))
    }
}

impl BatchReward for JudgeReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score_batch(&mut self, _step: u64, samples: &[Sample]) -> Result<Scores> {
        if self.model.is_none() {
            self.model = Some(self.served_model()?);
        }
        let messages: Vec<String> = samples.iter().map(|s| self.spec.render(s)).collect();
        let mut replies: Vec<Option<Result<String>>> = (0..samples.len()).map(|_| None).collect();
        let this = &*self;
        for (chunk_msgs, chunk_out) in messages
            .chunks(self.spec.parallel)
            .zip(replies.chunks_mut(self.spec.parallel))
        {
            std::thread::scope(|scope| {
                for (m, out) in chunk_msgs.iter().zip(chunk_out.iter_mut()) {
                    scope.spawn(move || *out = Some(this.ask(m)));
                }
            });
        }
        let mut scores = Vec::with_capacity(samples.len());
        let mut unreadable = Vec::with_capacity(samples.len());
        for (k, r) in replies.into_iter().enumerate() {
            let reply = r
                .expect("every request ran")
                .with_context(|| format!("completion {}", k + 1))?;
            let s = self.spec.read(&reply);
            scores.push(s.unwrap_or(0.0));
            unreadable.push(if s.is_none() { 1.0 } else { 0.0 });
        }
        Ok(Scores {
            scores,
            metrics: vec![("unreadable".into(), unreadable)],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_numbers_or_score_objects() {
        assert_eq!(parse_reply("0.5").unwrap(), (0.5, vec![]));
        assert_eq!(
            parse_reply(r#" {"score": 1, "metrics": {"len": 12}} "#).unwrap(),
            (1.0, vec![("len".into(), 12.0)])
        );
        for bad in ["", "yes", "[1]", r#"{"s": 1}"#, r#"{"score": "1"}"#, "NaN"] {
            assert!(parse_reply(bad).is_err(), "{bad:?}");
        }
        let e = parse_reply(r#"{"score": 1, "metrics": {"a": "x"}}"#).unwrap_err();
        assert!(e.to_string().contains("metric \"a\""), "{e}");
    }

    #[test]
    fn judge_rules_read_replies() {
        let spec = |rule, scale| JudgeSpec {
            url: "http://x/v1".into(),
            model: None,
            prompt: "{completion}".into(),
            rule,
            scale,
            max_tokens: 8,
            parallel: 1,
        };
        let n = spec(JudgeRule::Number, 0.1);
        assert_eq!(n.read("Score: 7/10"), Some(0.7));
        assert_eq!(n.read("no idea"), None);
        let y = spec(JudgeRule::YesNo, 1.0);
        assert_eq!(y.read(" Yes, it is."), Some(1.0));
        assert_eq!(y.read("no"), Some(0.0));
        assert_eq!(y.read("maybe"), None);
    }

    #[test]
    fn https_and_other_schemes_are_refused() {
        assert!(check_url("https://example.org/score").is_err());
        assert!(check_url("ftp://x").is_err());
        assert!(check_url("http://127.0.0.1:9/score").is_ok());
    }
}
