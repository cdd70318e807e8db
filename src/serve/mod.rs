//! `medvlm serve`: an OpenAI-compatible chat-completions server with continuous batching.
//!
//! - HTTP (axum on tokio) turns requests into prompts: messages through the chat template,
//!   images from data URLs or the allowed media directory through the image processor
//!   (DICOM/NIfTI windowed per request).
//! - One engine thread ([`worker`]) decodes every running request together and streams
//!   tokens back; a request joins at the next decoding step and leaves when done.
//! - Reasoning models' `<think>` blocks go to `message.reasoning_content` (DeepSeek's and
//!   vLLM's convention until 0.10) and, the same text, to `message.reasoning` (vLLM's name
//!   since); clients read one or the other. The rest goes to `message.content`. Under a chat
//!   template that opens `<think>` in the prompt (Qwen3-VL Thinking), the generated text is
//!   reasoning until the model writes `</think>`, as vLLM's `deepseek_r1` parser reads it.
//! - Every error is OpenAI-shaped JSON ([`error::ApiError`]).

pub mod api;
pub mod budget;
pub mod conn;
pub mod detok;
pub mod error;
pub mod media;
pub mod metrics;
pub mod stop;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::generate::{settings, FinishReason, GenerationConfig};
use crate::infer::{Loaded, ModelSource, ReasoningStream};
use crate::processor::ProcessorOptions;
use budget::{DecodeBudget, Refused};
use error::ApiError;
use media::MediaPolicy;
use metrics::Metrics;
use worker::{Event, Job, Ticket, TokenLogprob};

/// How a reasoning model's output is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReasoningFormat {
    /// `<think>` block in `reasoning_content`, the rest in `content`.
    Parsed,
    /// The generated text, as the model wrote it, in `content` (under a Thinking template it
    /// starts inside the reasoning: the opening `<think>` was part of the prompt).
    Raw,
}

/// Everything `medvlm serve` is told.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub source: ModelSource,
    pub processor: ProcessorOptions,
    pub host: String,
    pub port: u16,
    pub max_batch: usize,
    pub max_queue: usize,
    pub served_model_name: Option<String>,
    pub api_key: Option<String>,
    pub allowed_local_media_path: Option<PathBuf>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub reasoning: ReasoningFormat,
    pub prefill_chunk: usize,
    /// Open connections at most; beyond them the longest-idle one is closed.
    pub max_connections: usize,
    /// From a request head's first byte to its last.
    pub header_timeout: Duration,
    /// A connection with no request in progress and no byte coming in.
    pub idle_timeout: Duration,
    /// From a request's head to the last byte of its body.
    pub body_timeout: Duration,
    /// Bytes of image decoding at once; `None`: a quarter of the memory available.
    pub decode_budget: Option<u64>,
}

struct AppState {
    loaded: Arc<Loaded>,
    name: String,
    created: u64,
    opts: ServeOptions,
    gen_cfg: GenerationConfig,
    media: MediaPolicy,
    decode: DecodeBudget,
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    next_id: AtomicUsize,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// File descriptors kept for everything but connections (model files, stdio, the
/// listener, the runtime's own).
const RESERVED_FDS: u64 = 64;

/// Loads the model, listens, and serves until SIGTERM or Ctrl-C.
pub fn run(mut opts: ServeOptions) -> Result<()> {
    if opts.max_batch == 0 {
        anyhow::bail!("--max-batch must be at least 1");
    }
    if opts.prefill_chunk == 0 {
        anyhow::bail!("--prefill-chunk must be at least 1");
    }
    if opts.max_queue == 0 {
        // Every request waits in the queue for the engine's next step, however short.
        anyhow::bail!("--max-queue must be at least 1");
    }
    if opts.max_connections == 0 {
        anyhow::bail!("--max-connections must be at least 1");
    }
    if opts.decode_budget == Some(0) {
        anyhow::bail!("--decode-budget-mb must be at least 1");
    }
    // Connections are open files: a cap above the file limit would fail in accept() instead
    // of closing idle connections.
    if let Some(files) = conn::raise_open_file_limit() {
        let most = files.saturating_sub(RESERVED_FDS).max(1) as usize;
        if opts.max_connections > most {
            eprintln!(
                "warning: --max-connections {} lowered to {most}: this process may open {files} \
                 files (ulimit -n)",
                opts.max_connections
            );
            opts.max_connections = most;
        }
    }
    let media = MediaPolicy::new(
        opts.allowed_local_media_path.as_deref(),
        opts.max_body_bytes,
    )?;
    let gen_cfg = GenerationConfig::from_dir(&opts.source.model)?;
    eprintln!("loading {}", opts.source.model.display());
    let loaded = Arc::new(crate::infer::load(&opts.source, &opts.processor)?);
    let stop = loaded.processor.tokenizer.stop_tokens().to_vec();
    let name = opts.served_model_name.clone().unwrap_or_else(|| {
        opts.source
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "medvlm".into())
    });
    let metrics = Arc::new(Metrics::default());
    // Measured after the model is loaded, so its weights are not counted as free.
    let decode = DecodeBudget::new(
        opts.decode_budget.unwrap_or_else(budget::default_budget),
        std::thread::available_parallelism().map_or(2, |n| n.get()),
        metrics.clone(),
    );
    let abort = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let engine = worker::spawn(
        loaded.clone(),
        worker::WorkerConfig {
            max_batch: opts.max_batch,
            prefill_chunk: opts.prefill_chunk,
            stop_tokens: stop,
        },
        metrics.clone(),
        rx,
        abort.clone(),
    )
    .context("cannot start the engine thread")?;
    let state = Arc::new(AppState {
        loaded,
        name,
        created: unix_now(),
        gen_cfg,
        media,
        decode,
        jobs: Mutex::new(Some(tx)),
        next_id: AtomicUsize::new(0),
        metrics,
        draining: AtomicBool::new(false),
        opts,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let served = rt.block_on(serve(state.clone(), abort.clone()));
    // A decode still running for a client that left is not waited for.
    rt.shutdown_timeout(Duration::from_secs(1));
    served?;
    // Dropping the last sender lets the engine thread finish and end.
    state.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
    abort.store(true, Ordering::Relaxed);
    let _ = engine.join();
    eprintln!("stopped");
    Ok(())
}

async fn serve(state: Arc<AppState>, abort: Arc<AtomicBool>) -> Result<()> {
    let o = &state.opts;
    let listener = tokio::net::TcpListener::bind((o.host.as_str(), o.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", o.host, o.port))?;
    let addr: SocketAddr = listener.local_addr()?;
    if o.api_key.is_none() && !addr.ip().is_loopback() {
        eprintln!(
            "warning: listening on {} without --api-key: anyone who can reach this port can \
             use the model",
            addr.ip()
        );
    }
    eprintln!(
        "serving {} as \"{}\" on http://{addr}/v1 (max batch {}, max queue {}, max connections \
         {}, decode budget {} MiB{})",
        o.source.model.display(),
        state.name,
        o.max_batch,
        o.max_queue,
        o.max_connections,
        state.decode.total() >> 20,
        if o.api_key.is_some() {
            ", API key required"
        } else {
            ""
        }
    );
    let conns = conn::Connections::new(
        conn::Limits {
            max_connections: o.max_connections,
            header_timeout: o.header_timeout,
            idle_timeout: o.idle_timeout,
        },
        state.metrics.clone(),
    );
    let app = router(state.clone());
    let drain = {
        let state = state.clone();
        let conns = conns.clone();
        async move {
            shutdown_signal().await;
            state.draining.store(true, Ordering::Relaxed);
            conns.start_draining();
            let t = state.opts.shutdown_timeout;
            eprintln!(
                "shutting down: finishing the requests in flight (at most {} s more)",
                t.as_secs_f64()
            );
            tokio::spawn(async move {
                tokio::time::sleep(t).await;
                abort.store(true, Ordering::Relaxed);
            });
            // Meanwhile the listener stays open and /health answers 503. Requests still
            // running at the timeout are failed by the engine and end soon after.
            let _ = tokio::time::timeout(t + Duration::from_secs(5), conns.requests_done()).await;
        }
    };
    conn::serve(listener, app, conns, drain, Duration::from_secs(2)).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(state)
}

/// `Authorization: Bearer KEY` when the server has a key.
async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.opts.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Compares a given key with the server's in time that does not depend on where they first
/// differ, so response times do not leak the key byte by byte.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.draining.load(Ordering::Relaxed) {
        return ApiError::shutting_down().into_response();
    }
    axum::Json(json!({"status": "ok", "model": st.name})).into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": st.name,
            "object": "model",
            "created": st.created,
            "owned_by": "medvlm",
            "max_model_len": st.loaded.model.config.text.max_position_embeddings,
        }],
    }))
    .into_response()
}

/// How a chat request ended, for /metrics: recorded once, when it is known, or as 499
/// when the handler is dropped because its client went away (hyper drops the handler of a
/// connection the client closed).
struct Outcome {
    st: Arc<AppState>,
    t0: Instant,
    recorded: bool,
    /// Handed to the engine: a 503 after that is a request cut by the shutdown.
    accepted: bool,
}

impl Outcome {
    fn new(st: &Arc<AppState>, t0: Instant) -> Self {
        Self {
            st: st.clone(),
            t0,
            recorded: false,
            accepted: false,
        }
    }

    fn record(&mut self, status: u16) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        self.st.metrics.request_done(status, self.t0.elapsed());
        // Dropped before finishing: client gone, timed out, or cut by the shutdown.
        if status == 499 || status == 504 || (status == 503 && self.accepted) {
            self.st.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.record(499);
    }
}

async fn chat(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let t0 = Instant::now();
    let mut outcome = Outcome::new(&st, t0);
    match start(&st, req, t0, &mut outcome).await {
        Ok(Started::Stream(p)) => p.stream(outcome),
        Ok(Started::Wait(w)) => match w.collect().await {
            Ok(v) => {
                outcome.record(200);
                axum::Json(v).into_response()
            }
            Err(e) => {
                outcome.record(e.status.as_u16());
                e.into_response()
            }
        },
        Err(e) => {
            outcome.record(e.status.as_u16());
            e.into_response()
        }
    }
}

enum Started {
    Stream(Pending),
    Wait(Pending),
}

/// A request's place in the queue, given back if its handler ends (client gone, timeout)
/// before the engine takes the request.
struct QueuePlace {
    ticket: Arc<Ticket>,
    metrics: Arc<Metrics>,
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        if self.ticket.claim() {
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A request handed to the engine, with what the response needs.
struct Pending {
    st: Arc<AppState>,
    id: String,
    n: usize,
    prompt_tokens: usize,
    logprobs: bool,
    include_usage: bool,
    events: UnboundedReceiver<Event>,
    deadline: tokio::time::Instant,
    _place: QueuePlace,
}

/// Runs CPU work (JSON, base64, image decoding, tokenizing) on the blocking pool: on the
/// two async threads it would stall every connection, /health included.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))?
}

/// The request body, within --max-body-mb and --body-timeout.
///
/// A body over the limit is still read and thrown away, up to [`DRAIN_BYTES`] and
/// [`DRAIN_TIME`]: a server that answers 413 and closes while the client is still sending
/// resets the connection, and the client sees "broken pipe" instead of the 413 that says
/// what to change. Discarded bytes cost bandwidth, not memory.
async fn read_body(st: &AppState, headers: &HeaderMap, mut body: Body) -> Result<Bytes, ApiError> {
    let limit = st.opts.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        drain(body).await;
        return Err(ApiError::too_large(limit));
    }
    let read = async {
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Ok(None);
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Some(buf))
    };
    match tokio::time::timeout(st.opts.body_timeout, read).await {
        Err(_) => Err(ApiError::body_timeout(st.opts.body_timeout.as_secs_f64())),
        Ok(Err(e)) => Err(e),
        Ok(Ok(None)) => {
            drain(body).await;
            Err(ApiError::too_large(limit))
        }
        Ok(Ok(Some(buf))) => Ok(Bytes::from(buf)),
    }
}

/// How much of a refused body is read and discarded so that its client sees the answer.
const DRAIN_BYTES: usize = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(5);

async fn drain(mut body: Body) {
    let discard = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len();
                if seen > DRAIN_BYTES {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
}

async fn start(
    st: &Arc<AppState>,
    req: Request,
    t0: Instant,
    outcome: &mut Outcome,
) -> Result<Started, ApiError> {
    if st.draining.load(Ordering::Relaxed) {
        return Err(ApiError::shutting_down());
    }
    let deadline = tokio::time::Instant::from_std(t0 + st.opts.request_timeout);
    let (parts, body) = req.into_parts();
    let body = read_body(st, &parts.headers, body).await?;
    let req = Arc::new(blocking(move || api::parse(&body)).await?);
    if let Some(m) = &req.model {
        if m != &st.name {
            return Err(ApiError::model_not_found(m, &st.name));
        }
    }
    if req.n > st.opts.max_batch {
        return Err(ApiError::param(
            "n",
            format!(
                "n is {} but this server decodes at most {} sequences together (--max-batch)",
                req.n, st.opts.max_batch
            ),
        ));
    }
    let prompt = build_prompt(st, req.clone(), deadline).await?;
    let prompt_tokens = prompt.input_ids.len();
    let model = &st.loaded.model;
    let ctx = model.config.text.max_position_embeddings;
    let eff = settings::resolve(&req.sampling, &st.gen_cfg)
        .and_then(|e| e.params.validate().map(|_| e))
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    let max_new_tokens = if req.sampling.max_new_tokens.is_some() {
        eff.max_new_tokens
    } else {
        // Unsaid, the default shrinks to what the context leaves.
        eff.max_new_tokens
            .min(ctx.saturating_sub(prompt_tokens))
            .max(1)
    };
    crate::generate::engine::check_context(model, prompt_tokens, max_new_tokens, req.n)
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    // The queue: requests accepted but not yet in the batch.
    let q = st.metrics.queued.fetch_add(1, Ordering::Relaxed);
    let place = QueuePlace {
        ticket: Arc::new(Ticket::default()),
        metrics: st.metrics.clone(),
    };
    if q >= st.opts.max_queue {
        drop(place);
        return Err(ApiError::queue_full(q, 1));
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let id = st.next_id.fetch_add(1, Ordering::Relaxed);
    let job = Job {
        id,
        prompt,
        sampling: eff.params,
        max_new_tokens,
        n: req.n,
        stop: stop::StopSet::new(&req.stop),
        logprobs: req.logprobs,
        ignore_eos: req.ignore_eos,
        events: tx,
        received: t0,
        ticket: place.ticket.clone(),
    };
    let sent = st
        .jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|s| s.send(job).is_ok())
        .unwrap_or(false);
    if !sent {
        return Err(ApiError::shutting_down());
    }
    outcome.accepted = true;
    let p = Pending {
        st: st.clone(),
        id: format!("chatcmpl-{}-{id}", st.created),
        n: req.n,
        prompt_tokens,
        logprobs: req.logprobs.is_some(),
        include_usage: req.include_usage,
        events: rx,
        deadline,
        _place: place,
    };
    Ok(if req.stream {
        Started::Stream(p)
    } else {
        Started::Wait(p)
    })
}

/// Reads the images and renders the conversation into token ids. Each image's decode is
/// admitted by the decode budget first, with the cost its header declares.
async fn build_prompt(
    st: &Arc<AppState>,
    req: Arc<api::ChatRequest>,
    deadline: tokio::time::Instant,
) -> Result<crate::processor::Prompt, ApiError> {
    let mut images = Vec::with_capacity(req.images.len());
    for i in 0..req.images.len() {
        let (s, r) = (st.clone(), req.clone());
        let (bytes, cost) = blocking(move || {
            let image = &r.images[i];
            let bytes = s.media.read(image)?;
            let cost = crate::processor::image::decode_cost(&bytes)
                .map_err(|e| unreadable(&image.param, &e))?;
            Ok((bytes, cost))
        })
        .await?;
        let param = &req.images[i].param;
        let reservation = st
            .decode
            .reserve(cost, deadline)
            .await
            .map_err(|e| match e {
                Refused::TooLarge => ApiError::param(
                    param,
                    format!(
                        "{param}: decoding this image takes up to {} MiB, more than this \
                         server decodes at once ({} MiB, --decode-budget-mb); send a smaller \
                         image",
                        cost.div_ceil(1 << 20),
                        st.decode.total() >> 20
                    ),
                ),
                Refused::Timeout => ApiError::timeout(st.opts.request_timeout.as_secs_f64()),
            })?;
        let (s, r) = (st.clone(), req.clone());
        let patches = blocking(move || {
            let _reservation = reservation;
            let image = &r.images[i];
            let rgb = crate::processor::image::decode_rgb_with(&bytes, &r.medical)
                .map_err(|e| unreadable(&image.param, &e))?;
            drop(bytes);
            s.loaded.processor.images.preprocess(&rgb).map_err(|e| {
                ApiError::param(
                    &image.param,
                    format!("{}: cannot preprocess the image: {e:#}", image.param),
                )
            })
        })
        .await?;
        images.push(patches);
    }
    let s = st.clone();
    blocking(move || {
        s.loaded
            .processor
            .prepare(&req.messages, images, true)
            .map_err(|e| ApiError::param("messages", format!("{e:#}")))
    })
    .await
}

fn unreadable(param: &str, e: &anyhow::Error) -> ApiError {
    ApiError::param(param, format!("{param}: cannot read the image: {e:#}"))
}

/// One choice being assembled.
#[derive(Default)]
struct Choice {
    split: ReasoningStream,
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
    tokens: usize,
    /// Streaming: the role was announced.
    started: bool,
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

impl Pending {
    fn raw(&self) -> bool {
        self.st.opts.reasoning == ReasoningFormat::Raw
    }

    /// Empty choices, each split as a completion after the template's generation prompt
    /// (under a Thinking template, generated text is reasoning until `</think>`).
    fn choices(&self) -> Vec<Choice> {
        let opening = self.st.loaded.processor.template.reasoning_opening();
        (0..self.n)
            .map(|_| Choice {
                split: ReasoningStream::opened(opening),
                ..Choice::default()
            })
            .collect()
    }

    async fn next(&mut self) -> Result<Option<Event>, ApiError> {
        match tokio::time::timeout_at(self.deadline, self.events.recv()).await {
            Ok(e) => Ok(e),
            // Dropping `self.events` then tells the engine, which drops the sequences.
            Err(_) => Err(ApiError::timeout(
                self.st.opts.request_timeout.as_secs_f64(),
            )),
        }
    }

    /// Waits for every choice and builds the `chat.completion` object.
    async fn collect(mut self) -> Result<Value, ApiError> {
        let mut choices = self.choices();
        while choices.iter().any(|c| c.finish.is_none()) {
            match self.next().await? {
                Some(Event::Delta {
                    sample,
                    text,
                    logprobs,
                }) => {
                    let c = &mut choices[sample];
                    c.text.push_str(&text);
                    c.logprobs.extend(logprobs);
                }
                Some(Event::Finished {
                    sample,
                    finish,
                    tokens,
                }) => {
                    choices[sample].finish = Some(finish);
                    choices[sample].tokens = tokens;
                }
                Some(Event::Failed(e)) => return Err(e),
                None => return Err(ApiError::shutting_down()),
            }
        }
        let completion: usize = choices.iter().map(|c| c.tokens).sum();
        let raw = self.raw();
        let out: Vec<Value> = choices
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                let message = if raw {
                    json!({"role": "assistant", "content": c.text})
                } else {
                    c.split.push(&c.text);
                    let (reasoning, content) = c.split.parts();
                    json!({"role": "assistant", "content": content, "reasoning_content": reasoning, "reasoning": reasoning})
                };
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": if self.logprobs { json!({"content": c.logprobs}) } else { Value::Null },
                    "finish_reason": c.finish.map(finish_str),
                })
            })
            .collect();
        Ok(json!({
            "id": self.id,
            "object": "chat.completion",
            "created": unix_now(),
            "model": self.st.name,
            "choices": out,
            "usage": usage(self.prompt_tokens, completion),
        }))
    }

    /// Server-sent events: one `chat.completion.chunk` per piece of text, then `[DONE]`.
    fn stream(self, outcome: Outcome) -> Response {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        tokio::spawn(self.pump(tx, outcome));
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
        });
        (
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(body),
        )
            .into_response()
    }

    fn chunk(&self, choices: Vec<Value>, usage: Option<Value>) -> Bytes {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": unix_now(),
            "model": self.st.name,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Bytes::from(format!("data: {v}\n\n"))
    }

    /// Sends a frame unless the client is gone (or stopped reading past the deadline).
    async fn send(&self, tx: &tokio::sync::mpsc::Sender<Bytes>, b: Bytes) -> bool {
        matches!(
            tokio::time::timeout_at(self.deadline, tx.send(b)).await,
            Ok(Ok(()))
        )
    }

    /// Moves events to the client until every choice is done; stops (and so cancels the
    /// request in the engine, or frees its queue place) as soon as the client is gone:
    /// whether or not there is text to send, since a queued request has none and tokens
    /// can decode to nothing for a while. Returning early drops `outcome`, which counts a
    /// 499.
    async fn pump(mut self, tx: tokio::sync::mpsc::Sender<Bytes>, mut outcome: Outcome) {
        let mut choices = self.choices();
        let raw = self.raw();
        while choices.iter().any(|c| c.finish.is_none()) {
            let next = tokio::select! {
                // hyper drops the body, and with it the receiver, when the peer closes.
                () = tx.closed() => return,
                e = self.next() => e,
            };
            let ev = match next {
                Ok(Some(e)) => e,
                Ok(None) => Event::Failed(ApiError::shutting_down()),
                Err(e) => Event::Failed(e),
            };
            let mut frames = Vec::new();
            match ev {
                Event::Delta {
                    sample,
                    text,
                    logprobs,
                } => {
                    let c = &mut choices[sample];
                    if !c.started {
                        c.started = true;
                        frames.push(json!({"index": sample, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}));
                    }
                    let lp = if self.logprobs {
                        json!({"content": logprobs})
                    } else {
                        Value::Null
                    };
                    let mut deltas = Vec::new();
                    if raw {
                        deltas.push(json!({"content": text}));
                    } else {
                        let p = c.split.push(&text);
                        if !p.reasoning.is_empty() {
                            deltas.push(
                                json!({"reasoning_content": p.reasoning, "reasoning": p.reasoning}),
                            );
                        }
                        if !p.content.is_empty() {
                            deltas.push(json!({"content": p.content}));
                        }
                        if deltas.is_empty() && self.logprobs {
                            deltas.push(json!({}));
                        }
                    }
                    for (k, d) in deltas.into_iter().enumerate() {
                        let lp = if k == 0 { lp.clone() } else { Value::Null };
                        frames.push(json!({"index": sample, "delta": d, "logprobs": lp, "finish_reason": null}));
                    }
                }
                Event::Finished {
                    sample,
                    finish,
                    tokens,
                } => {
                    let c = &mut choices[sample];
                    c.finish = Some(finish);
                    c.tokens = tokens;
                    if !raw {
                        let p = c.split.finish();
                        if !p.reasoning.is_empty() {
                            frames.push(json!({"index": sample, "delta": {"reasoning_content": p.reasoning, "reasoning": p.reasoning}, "logprobs": null, "finish_reason": null}));
                        }
                        if !p.content.is_empty() {
                            frames.push(json!({"index": sample, "delta": {"content": p.content}, "logprobs": null, "finish_reason": null}));
                        }
                    }
                    frames.push(json!({"index": sample, "delta": {}, "logprobs": null, "finish_reason": finish_str(finish)}));
                }
                Event::Failed(e) => {
                    outcome.record(e.status.as_u16());
                    let _ = self
                        .send(&tx, Bytes::from(format!("data: {}\n\n", e.body())))
                        .await
                        && self
                            .send(&tx, Bytes::from_static(b"data: [DONE]\n\n"))
                            .await;
                    return;
                }
            }
            for f in frames {
                let b = self.chunk(vec![f], None);
                if !self.send(&tx, b).await {
                    // The client is gone: dropping `self.events` frees its sequences.
                    return;
                }
            }
        }
        outcome.record(200);
        if self.include_usage {
            let completion = choices.iter().map(|c| c.tokens).sum();
            let b = self.chunk(vec![], Some(usage(self.prompt_tokens, completion)));
            let _ = self.send(&tx, b).await;
        }
        let _ = self
            .send(&tx, Bytes::from_static(b"data: [DONE]\n\n"))
            .await;
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}
