//! Prometheus metrics (text exposition format 0.0.4), written by hand: a few counters,
//! gauges and histograms need no client library.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds: request latency and time to first token.
const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Sequences per decoding step.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// The window of the tokens-per-second gauge.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(self.bounds) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug)]
struct Inner {
    /// (status code) -> requests answered.
    requests: BTreeMap<u16, u64>,
    latency: Histogram,
    first_token: Histogram,
    batch: Histogram,
    /// (when, tokens) of recent decoding steps.
    recent: VecDeque<(Instant, usize)>,
}

/// Shared by the HTTP handlers and the engine thread.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Requests accepted but not yet admitted to the batch.
    pub queued: AtomicUsize,
    /// Requests and sequences in the batch (decoding or in prefill).
    pub running_requests: AtomicUsize,
    pub running_sequences: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Requests dropped before they finished: client gone, timed out, or cut by shutdown.
    pub cancelled: AtomicU64,
    /// Bytes of the image-decode budget reserved now, and decodes waiting for room.
    pub decode_reserved_bytes: AtomicU64,
    pub decodes_waiting: AtomicUsize,
    /// Open HTTP connections.
    pub open_connections: AtomicUsize,
    /// Connections the server closed: no request for --idle-timeout, a request head
    /// unfinished after --header-timeout, or idle when a newcomer needed its place at
    /// --max-connections.
    pub closed_idle: AtomicU64,
    pub closed_header_timeout: AtomicU64,
    pub closed_evicted: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                latency: Histogram::new(LATENCY_BUCKETS),
                first_token: Histogram::new(LATENCY_BUCKETS),
                batch: Histogram::new(BATCH_BUCKETS),
                recent: VecDeque::new(),
            }),
            queued: AtomicUsize::new(0),
            running_requests: AtomicUsize::new(0),
            running_sequences: AtomicUsize::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            decode_reserved_bytes: AtomicU64::new(0),
            decodes_waiting: AtomicUsize::new(0),
            open_connections: AtomicUsize::new(0),
            closed_idle: AtomicU64::new(0),
            closed_header_timeout: AtomicU64::new(0),
            closed_evicted: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic elsewhere while holding the lock leaves plain numbers behind: keep going.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn request_done(&self, status: u16, latency: Duration) {
        self.with(|m| {
            *m.requests.entry(status).or_default() += 1;
            if status == 200 {
                m.latency.observe(latency.as_secs_f64());
            }
        });
    }

    pub fn first_token(&self, after: Duration) {
        self.with(|m| m.first_token.observe(after.as_secs_f64()));
    }

    /// One decoding step that produced `tokens` tokens.
    pub fn step(&self, tokens: usize) {
        let now = Instant::now();
        self.completion_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        self.with(|m| {
            m.batch.observe(tokens as f64);
            m.recent.push_back((now, tokens));
            while m
                .recent
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
            {
                m.recent.pop_front();
            }
        });
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        let ld = |a: &AtomicUsize| a.load(Ordering::Relaxed).to_string();
        let lq = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        gauge(
            &mut out,
            "medvlm_queue_depth",
            "Requests waiting to join the batch.",
            "gauge",
            ld(&self.queued),
        );
        gauge(
            &mut out,
            "medvlm_running_requests",
            "Requests in the batch.",
            "gauge",
            ld(&self.running_requests),
        );
        gauge(
            &mut out,
            "medvlm_running_sequences",
            "Sequences in the batch (n per request).",
            "gauge",
            ld(&self.running_sequences),
        );
        gauge(
            &mut out,
            "medvlm_prompt_tokens_total",
            "Prompt tokens prefilled (images included).",
            "counter",
            lq(&self.prompt_tokens),
        );
        gauge(
            &mut out,
            "medvlm_completion_tokens_total",
            "Tokens generated.",
            "counter",
            lq(&self.completion_tokens),
        );
        gauge(
            &mut out,
            "medvlm_cancelled_requests_total",
            "Requests dropped before finishing (client gone, timeout, shutdown).",
            "counter",
            lq(&self.cancelled),
        );
        gauge(
            &mut out,
            "medvlm_image_decode_reserved_bytes",
            "Bytes of the image-decode budget (--decode-budget-mb) held by decodes now.",
            "gauge",
            lq(&self.decode_reserved_bytes),
        );
        gauge(
            &mut out,
            "medvlm_image_decodes_waiting",
            "Image decodes waiting for room in the decode budget.",
            "gauge",
            ld(&self.decodes_waiting),
        );
        gauge(
            &mut out,
            "medvlm_open_connections",
            "Open HTTP connections (at most --max-connections).",
            "gauge",
            ld(&self.open_connections),
        );
        let _ = writeln!(
            out,
            "# HELP medvlm_connections_closed_total Connections the server closed, by reason.\n# TYPE medvlm_connections_closed_total counter"
        );
        for (reason, n) in [
            ("idle_timeout", &self.closed_idle),
            ("header_timeout", &self.closed_header_timeout),
            ("evicted", &self.closed_evicted),
        ] {
            let _ = writeln!(
                out,
                "medvlm_connections_closed_total{{reason=\"{reason}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        self.with(|m| {
            let _ = writeln!(
                out,
                "# HELP medvlm_requests_total Chat-completion requests answered, by HTTP status.\n# TYPE medvlm_requests_total counter"
            );
            for (s, n) in &m.requests {
                let _ = writeln!(out, "medvlm_requests_total{{status=\"{s}\"}} {n}");
            }
            let now = Instant::now();
            let tokens: usize = m
                .recent
                .iter()
                .filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW)
                .map(|(_, n)| n)
                .sum();
            gauge(
                &mut out,
                "medvlm_generation_tokens_per_second",
                "Tokens generated per second over the last 10 s.",
                "gauge",
                format!("{:.3}", tokens as f64 / RATE_WINDOW.as_secs_f64()),
            );
            m.latency.render(&mut out, "medvlm_request_duration_seconds", "Time from request to last token, successful requests.");
            m.first_token.render(&mut out, "medvlm_time_to_first_token_seconds", "Time from request to its first generated token.");
            m.batch.render(&mut out, "medvlm_batch_size", "Sequences decoded together per step.");
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_rates_count_recent_steps() {
        let m = Metrics::default();
        m.step(3);
        m.step(5);
        m.request_done(200, Duration::from_millis(30));
        m.request_done(429, Duration::from_millis(1));
        let t = m.render();
        assert!(t.contains("medvlm_batch_size_bucket{le=\"4\"} 1\n"), "{t}");
        assert!(t.contains("medvlm_batch_size_bucket{le=\"8\"} 2\n"));
        assert!(t.contains("medvlm_batch_size_bucket{le=\"+Inf\"} 2\n"));
        assert!(t.contains("medvlm_batch_size_sum 8\n"));
        assert!(t.contains("medvlm_completion_tokens_total 8\n"));
        assert!(t.contains("medvlm_generation_tokens_per_second 0.800\n"));
        assert!(t.contains("medvlm_requests_total{status=\"429\"} 1\n"));
        assert!(t.contains("medvlm_request_duration_seconds_bucket{le=\"0.025\"} 0\n"));
        assert!(t.contains("medvlm_request_duration_seconds_bucket{le=\"0.05\"} 1\n"));
    }
}
