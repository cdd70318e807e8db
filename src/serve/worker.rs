//! The engine thread: one thread owns the decoding batch and runs the model; HTTP handlers
//! hand it jobs and read their tokens back through channels.
//!
//! Each turn of its loop: take new jobs; drop the requests whose client went away; admit
//! waiting requests while the batch has room, one prompt in prefill at a time; prefill one
//! chunk of that prompt (so running streams wait at most one chunk per step); choose a token
//! for every running sequence and send it out; run one decoding step. A request therefore
//! joins at the next step and leaves as soon as it is done or cancelled.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use tokio::sync::mpsc::UnboundedSender;

use super::detok::Detok;
use super::error::ApiError;
use super::metrics::Metrics;
use super::stop::{StopMatcher, StopSet};
use crate::generate::{
    Engine, FinishReason, RawLogprobs, Request, Running, SamplingParams, SeqOptions, Token,
};
use crate::infer::Loaded;
use crate::processor::{Prompt, QwenTokenizer};

/// A request ready for the engine.
pub struct Job {
    pub id: usize,
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub n: usize,
    pub stop: StopSet,
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
    pub events: UnboundedSender<Event>,
    pub received: Instant,
    /// Its place in the queue (`Metrics::queued`).
    pub ticket: Arc<Ticket>,
}

/// A queued request's place, claimed once: by the engine when it admits (or fails) the
/// request, or by the handler when its client goes away first. Whoever claims it gives the
/// place back, so a client that leaves frees its place at once, not at the engine's next
/// step (a ghost holding a place turns real clients away with 429).
#[derive(Debug, Default)]
pub struct Ticket(AtomicU8);

impl Ticket {
    /// True for the first caller only.
    pub fn claim(&self) -> bool {
        self.0
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// What the engine tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// New text of one sample, and the log-probabilities of its new tokens when asked for.
    /// Text can lag tokens: a partial UTF-8 character or a possible stop string is held.
    Delta {
        sample: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// The sample is complete after `tokens` generated tokens.
    Finished {
        sample: usize,
        finish: FinishReason,
        tokens: usize,
    },
    Failed(ApiError),
}

/// One generated token as OpenAI reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

pub struct WorkerConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Prompt tokens prefilled between two decoding steps while others are decoding.
    pub prefill_chunk: usize,
    pub stop_tokens: Vec<u32>,
}

/// Starts the engine thread. It ends when every sender of `jobs` is gone and its work is
/// done, or at once (failing what is left) when `abort` is set.
pub fn spawn(
    loaded: Arc<Loaded>,
    cfg: WorkerConfig,
    metrics: Arc<Metrics>,
    jobs: Receiver<Job>,
    abort: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("medvlm-engine".into())
        .spawn(move || Worker::new(&loaded, cfg, metrics, abort).run(jobs))
}

struct Sample<'t> {
    stream: Detok<'t>,
    stops: StopMatcher,
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    tokens: usize,
    done: bool,
}

struct Active<'t> {
    events: UnboundedSender<Event>,
    logprobs: Option<usize>,
    samples: Vec<Sample<'t>>,
    received: Instant,
    first_token: bool,
}

struct Worker<'m> {
    loaded: &'m Loaded,
    engine: Engine<'m>,
    cfg: WorkerConfig,
    metrics: Arc<Metrics>,
    abort: Arc<AtomicBool>,
    run: Running,
    waiting: VecDeque<Job>,
    active: HashMap<usize, Active<'m>>,
}

/// Runs `f`, turning a panic into an error, so one bad request cannot take the engine down.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = crate::panic_message(p.as_ref()).unwrap_or("unknown panic");
            Err(anyhow!("internal error in the engine: {msg}"))
        }
    }
}

impl<'m> Worker<'m> {
    fn new(
        loaded: &'m Loaded,
        cfg: WorkerConfig,
        metrics: Arc<Metrics>,
        abort: Arc<AtomicBool>,
    ) -> Self {
        let engine = Engine::new(
            &loaded.model,
            cfg.stop_tokens.clone(),
            loaded.processor.tokenizer.special.vision_ids().to_vec(),
        );
        Self {
            loaded,
            engine,
            cfg,
            metrics,
            abort,
            run: Running::default(),
            waiting: VecDeque::new(),
            active: HashMap::new(),
        }
    }

    fn tokenizer(&self) -> &'m QwenTokenizer {
        &self.loaded.processor.tokenizer
    }

    fn run(mut self, jobs: Receiver<Job>) {
        loop {
            if self.run.is_empty() && self.waiting.is_empty() {
                match jobs.recv() {
                    Ok(j) => self.waiting.push_back(j),
                    Err(_) => return,
                }
            }
            while let Ok(j) = jobs.try_recv() {
                self.waiting.push_back(j);
            }
            if self.abort.load(Ordering::Relaxed) {
                self.fail_all(ApiError::shutting_down());
                continue;
            }
            self.drop_abandoned();
            self.admit();
            self.prefill();
            self.sample();
            if let Err(e) = guarded(|| self.engine.decode(&mut self.run)) {
                self.fail_all(ApiError::internal(format!("{e:#}")));
            }
            self.metrics
                .running_requests
                .store(self.active.len(), Ordering::Relaxed);
            self.metrics
                .running_sequences
                .store(self.run.admitted_sequences(), Ordering::Relaxed);
        }
    }

    /// Requests whose handler is gone (client disconnected, timed out) stop using compute.
    /// The handler counts them in the metrics (it knows why they ended) and gives back
    /// their queue place.
    fn drop_abandoned(&mut self) {
        let metrics = &self.metrics;
        self.waiting.retain(|j| {
            if !j.events.is_closed() {
                return true;
            }
            if j.ticket.claim() {
                metrics.queued.fetch_sub(1, Ordering::Relaxed);
            }
            false
        });
        let gone: Vec<usize> = self
            .active
            .iter()
            .filter(|(_, a)| a.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.run.cancel(id);
            self.active.remove(&id);
        }
    }

    fn admit(&mut self) {
        while !self.run.prefilling() {
            let Some(j) = self.waiting.front() else {
                return;
            };
            let used = self.run.admitted_sequences();
            if used > 0 && used + j.n > self.cfg.max_batch {
                return;
            }
            let Some(j) = self.waiting.pop_front() else {
                return;
            };
            if !j.ticket.claim() {
                // Its client left while it waited; the handler gave its place back.
                continue;
            }
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            let request = Request {
                prompt: &j.prompt,
                sampling: j.sampling.clone(),
                max_new_tokens: j.max_new_tokens,
                num_samples: j.n,
            };
            let options = SeqOptions {
                top_logprobs: j.logprobs,
                ignore_stop: j.ignore_eos,
            };
            let (engine, run) = (&self.engine, &mut self.run);
            match guarded(|| engine.admit(run, j.id, &request, options)) {
                Ok(()) => {
                    self.metrics
                        .prompt_tokens
                        .fetch_add(j.prompt.input_ids.len() as u64, Ordering::Relaxed);
                    let tok = self.tokenizer();
                    self.active.insert(
                        j.id,
                        Active {
                            events: j.events,
                            logprobs: j.logprobs,
                            samples: (0..j.n)
                                .map(|_| Sample {
                                    stream: Detok::new(tok),
                                    stops: j.stop.matcher(),
                                    text: String::new(),
                                    sent: 0,
                                    tokens: 0,
                                    done: false,
                                })
                                .collect(),
                            received: j.received,
                            first_token: false,
                        },
                    );
                }
                Err(e) => {
                    let _ = j
                        .events
                        .send(Event::Failed(ApiError::bad_request(format!("{e:#}"))));
                }
            }
        }
    }

    fn prefill(&mut self) {
        let Some(id) = self.run.prefilling_request() else {
            return;
        };
        // Alone, a prompt is prefilled whole; beside running streams, a chunk at a time.
        let chunk = if self.run.live_sequences() == 0 {
            usize::MAX
        } else {
            self.cfg.prefill_chunk
        };
        let (engine, run) = (&self.engine, &mut self.run);
        if let Err(e) = guarded(|| engine.prefill_chunk(run, chunk)) {
            self.run.cancel(id);
            if let Some(a) = self.active.remove(&id) {
                let _ = a
                    .events
                    .send(Event::Failed(ApiError::internal(format!("{e:#}"))));
            }
        }
    }

    fn sample(&mut self) {
        let (engine, run) = (&self.engine, &mut self.run);
        let tokens = match guarded(|| engine.sample(run)) {
            Ok(t) => t,
            Err(e) => return self.fail_all(ApiError::internal(format!("{e:#}"))),
        };
        if !tokens.is_empty() {
            self.metrics.step(tokens.len());
        }
        for t in tokens {
            let id = t.request;
            if let Err(e) = self.on_token(t) {
                self.run.cancel(id);
                if let Some(a) = self.active.remove(&id) {
                    let _ = a
                        .events
                        .send(Event::Failed(ApiError::internal(format!("{e:#}"))));
                }
            }
        }
    }

    /// Detokenizes, applies stop strings, and sends what is certain.
    fn on_token(&mut self, t: Token) -> Result<()> {
        let tok = self.tokenizer();
        let Some(a) = self.active.get_mut(&t.request) else {
            return Ok(());
        };
        if !a.first_token {
            a.first_token = true;
            self.metrics.first_token(a.received.elapsed());
        }
        let logprobs = match (a.logprobs, &t.raw) {
            (Some(_), Some(raw)) => vec![token_logprob(tok, t.token, raw)?],
            _ => vec![],
        };
        let Some(s) = a.samples.get_mut(t.sample) else {
            return Ok(());
        };
        if s.done {
            return Ok(());
        }
        s.tokens += 1;
        let mut finish = t.finished.as_ref().map(|c| c.finish);
        let before = s.text.len();
        // A stop token ends the text without being part of it (`Completion::content_tokens`).
        if finish != Some(FinishReason::Stop) {
            if let Some(p) = s.stream.push(t.token)? {
                s.text.push_str(&p);
            }
        }
        if finish.is_some() {
            if let Some(p) = s.stream.finish()? {
                s.text.push_str(&p);
            }
        }
        // Only a stop string ending in the new bytes can be new (see `stop`).
        if let Some(at) = s.stops.feed(&s.text.as_bytes()[before..], before) {
            s.text.truncate(at);
            if finish.is_none() {
                self.run.cancel_sample(t.request, t.sample)?;
            }
            finish = Some(FinishReason::Stop);
        }
        let upto = if finish.is_some() {
            s.text.len()
        } else {
            s.text.len() - s.stops.held().min(s.text.len())
        }
        .max(s.sent);
        let text = s.text[s.sent..upto].to_string();
        s.sent = upto;
        let mut gone = false;
        if !text.is_empty() || !logprobs.is_empty() {
            gone |= a
                .events
                .send(Event::Delta {
                    sample: t.sample,
                    text,
                    logprobs,
                })
                .is_err();
        }
        if let Some(finish) = finish {
            s.done = true;
            gone |= a
                .events
                .send(Event::Finished {
                    sample: t.sample,
                    finish,
                    tokens: s.tokens,
                })
                .is_err();
        }
        // A handler that is gone counted its request already.
        if gone || a.samples.iter().all(|s| s.done) {
            self.run.cancel(t.request);
            self.active.remove(&t.request);
        }
        Ok(())
    }

    fn fail_all(&mut self, e: ApiError) {
        for (_, a) in self.active.drain() {
            let _ = a.events.send(Event::Failed(e.clone()));
        }
        for j in self.waiting.drain(..) {
            if j.ticket.claim() {
                self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                let _ = j.events.send(Event::Failed(e.clone()));
            }
        }
        self.run = Running::default();
    }
}

fn token_logprob(tok: &QwenTokenizer, id: u32, raw: &RawLogprobs) -> Result<TokenLogprob> {
    let text = |id: u32| -> Result<String> { tok.decode(&[id], false) };
    Ok(TokenLogprob {
        token: text(id)?,
        logprob: raw.logprob,
        bytes: text(id)?.into_bytes(),
        top_logprobs: raw
            .top
            .iter()
            .map(|&(i, lp)| {
                let t = text(i)?;
                Ok(TopLogprob {
                    bytes: t.clone().into_bytes(),
                    token: t,
                    logprob: lp,
                })
            })
            .collect::<Result<_>>()?,
    })
}
