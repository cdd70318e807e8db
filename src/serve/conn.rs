//! Serving connections: our own accept loop over hyper's HTTP/1 server, because
//! `axum::serve` has neither timeouts nor a connection cap (connections sending their headers
//! a byte at a time were held forever, and ~20,000 idle sockets took the server off the
//! network).
//!
//! - At most `max_connections` are open. A newcomer beyond that closes the connection that
//!   has gone longest without a request in progress (an idle keep-alive connection, or one
//!   still trickling in a request head); only when every connection is busy with a request
//!   does the newcomer wait, in the kernel's listen backlog, until one ends. So sockets that
//!   send nothing cannot lock out clients that send requests.
//! - A connection with no request in progress is closed `idle_timeout` after its last
//!   request (or its opening) if no byte arrived, and `header_timeout` after the first byte
//!   of a request head that is still incomplete. One timer in hyper covers both cases with
//!   one duration, which is why the connection task keeps these clocks itself.
//! - Request bodies have their own deadline (read in the handler) and requests their own
//!   timeout, so a connection with a request in progress is not timed out here.
//! - Draining (SIGTERM): the listener keeps answering, so /health can say 503 while the
//!   requests in flight finish, and every response says `Connection: close`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{header, HeaderValue, Request};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use super::metrics::Metrics;

/// Largest request head (request line and headers). Beyond it hyper answers 431. 32 KiB is
/// four times nginx's default header buffer.
const MAX_HEAD_BYTES: usize = 32 << 10;
/// hyper's read and write buffers per connection (its default is ~400 KB, which 1,000
/// trickling connections would turn into 400 MB).
const MAX_BUF_BYTES: usize = 64 << 10;

/// The connection limits (`--max-connections`, `--header-timeout`, `--idle-timeout`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

const OPEN: u8 = 0;
const EVICT: u8 = 1;
const SHUTDOWN: u8 = 2;

/// One open connection, as its task and the accept loop see it.
struct Conn {
    /// Requests whose head has arrived and whose response body has not ended.
    in_flight: AtomicUsize,
    /// Milliseconds (see [`Connections::now_ms`]) since which no request is in flight.
    idle_since: AtomicU64,
    /// When the first byte of a request head arrived, while no request was in flight;
    /// 0: none since.
    head_since: AtomicU64,
    /// OPEN, or asked to close (EVICT, SHUTDOWN).
    close: AtomicU8,
    /// Something the task's clocks depend on changed.
    wake: Notify,
    epoch: Instant,
}

impl Conn {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn at(&self, ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.epoch + Duration::from_millis(ms))
    }

    /// Bytes came in: if no request is in flight, a request head has begun.
    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            self.head_since.store(self.now_ms(), Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    /// When the task should look at the clocks again; `None`: only when woken.
    fn deadline(&self, limits: &Limits) -> Option<tokio::time::Instant> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let head = self.head_since.load(Ordering::Relaxed);
        Some(if head != 0 {
            self.at(head + limits.header_timeout.as_millis() as u64)
        } else {
            self.at(self.idle_since.load(Ordering::Relaxed) + limits.idle_timeout.as_millis() as u64)
        })
    }

    fn verdict(&self, limits: &Limits) -> Verdict {
        let close = self.close.load(Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            // A request in progress finishes; the connection closes after it.
            return if close != OPEN {
                Verdict::Finish
            } else {
                Verdict::Keep
            };
        }
        match close {
            EVICT => return Verdict::Close(Reason::Evicted),
            SHUTDOWN => return Verdict::Close(Reason::Shutdown),
            _ => {}
        }
        let now = self.now_ms();
        let head = self.head_since.load(Ordering::Relaxed);
        if head != 0 {
            if now >= head + limits.header_timeout.as_millis() as u64 {
                return Verdict::Close(Reason::HeaderTimeout);
            }
        } else if now
            >= self.idle_since.load(Ordering::Relaxed) + limits.idle_timeout.as_millis() as u64
        {
            return Verdict::Close(Reason::Idle);
        }
        Verdict::Keep
    }
}

enum Reason {
    Idle,
    HeaderTimeout,
    Evicted,
    /// The server is stopping (the requests in flight are done).
    Shutdown,
}

enum Verdict {
    Keep,
    /// Let the request in progress (if any) finish, then close.
    Finish,
    /// Close now: nothing is in progress.
    Close(Reason),
}

/// Every open connection, the cap on them, and the requests in flight.
pub struct Connections {
    limits: Limits,
    epoch: Instant,
    slots: Arc<Semaphore>,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Requests in flight on all connections.
    requests: AtomicUsize,
    /// A request ended or a connection closed.
    changed: Notify,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Connections {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(
                limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
            )),
            limits,
            epoch: Instant::now(),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            requests: AtomicUsize::new(0),
            changed: Notify::new(),
            draining: AtomicBool::new(false),
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on every response closes its connection after it.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Waits until no request is in flight on any connection.
    pub async fn requests_done(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.requests.load(Ordering::Relaxed) == 0 {
                return;
            }
            changed.await;
        }
    }

    async fn all_closed(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.lock().is_empty() {
                return;
            }
            changed.await;
        }
    }

    /// A place for a new connection: a free one, else the place of the connection idle the
    /// longest (closed for it), else the first to end.
    async fn slot(&self) -> OwnedSemaphorePermit {
        loop {
            if let Ok(p) = self.slots.clone().try_acquire_owned() {
                return p;
            }
            // An evicted connection gives its place back as soon as its task sees the
            // request; otherwise check again soon, as busy connections become idle.
            let wait = if self.evict_idlest() {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(50)
            };
            if let Ok(Ok(p)) = tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await
            {
                return p;
            }
        }
    }

    /// Asks the connection idle the longest (no request in flight) to close.
    fn evict_idlest(&self) -> bool {
        let open = self.lock();
        let idlest = open
            .values()
            .filter(|c| {
                c.in_flight.load(Ordering::Relaxed) == 0 && c.close.load(Ordering::Relaxed) == OPEN
            })
            .min_by_key(|c| c.idle_since.load(Ordering::Relaxed));
        match idlest {
            Some(c) => {
                c.close.store(EVICT, Ordering::Relaxed);
                c.wake.notify_one();
                true
            }
            None => false,
        }
    }

    fn add(&self) -> (u64, Arc<Conn>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            close: AtomicU8::new(OPEN),
            wake: Notify::new(),
            epoch: self.epoch,
        });
        conn.idle_since.store(conn.now_ms(), Ordering::Relaxed);
        self.lock().insert(id, conn.clone());
        self.metrics
            .open_connections
            .fetch_add(1, Ordering::Relaxed);
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
        self.metrics
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    fn close_all(&self) {
        for c in self.lock().values() {
            c.close.store(SHUTDOWN, Ordering::Relaxed);
            c.wake.notify_one();
        }
    }
}

/// Accepts and serves connections until `stop` resolves; then closes the listener, lets
/// the responses being written finish (at most `grace`), and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    conns: Arc<Connections>,
    stop: impl Future<Output = ()>,
    grace: Duration,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        // Our own clocks (see the module docs) replace hyper's header timer.
        .header_read_timeout(None)
        .keep_alive(true)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_BUF_BYTES);
    let http = Arc::new(http);
    tokio::pin!(stop);
    let mut last_error: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut stop => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors, say: keep serving the open connections, and try
                // again shortly rather than spinning.
                if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    eprintln!(
                        "warning: cannot accept a connection: {e} (see --max-connections and \
                         `ulimit -n`)"
                    );
                    last_error = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Token-sized writes of a stream go out at once, not after the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        let permit = tokio::select! {
            p = conns.slot() => p,
            () = &mut stop => break,
        };
        tokio::spawn(connection(
            stream,
            router.clone(),
            conns.clone(),
            http.clone(),
            permit,
        ));
    }
    drop(listener);
    conns.close_all();
    let _ = tokio::time::timeout(grace, conns.all_closed()).await;
}

async fn connection(
    stream: TcpStream,
    router: Router,
    conns: Arc<Connections>,
    http: Arc<hyper::server::conn::http1::Builder>,
    _permit: OwnedSemaphorePermit,
) {
    let (id, conn) = conns.add();
    let io = TokioIo::new(Watched {
        io: stream,
        conn: conn.clone(),
    });
    let service = {
        let conn = conn.clone();
        let conns = conns.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let guard = InFlight::new(conn.clone(), conns.clone());
            let mut router = router.clone();
            let draining = conns.draining.load(Ordering::Relaxed);
            async move {
                let Ok(mut resp) = router.call(req).await;
                if draining {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp.map(|body| Guarded {
                    body,
                    _guard: guard,
                }))
            }
        })
    };
    // The block owns the connection: leaving it closes the socket, before the place is
    // given back.
    {
        let served = http.serve_connection(io, service);
        tokio::pin!(served);
        let mut finishing = false;
        loop {
            let deadline = conn.deadline(&conns.limits);
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Closed by the peer, an error, or after a graceful shutdown: done either way.
                _ = served.as_mut() => break,
                () = conn.wake.notified() => {}
                () = sleep => {}
            }
            match conn.verdict(&conns.limits) {
                Verdict::Keep => {}
                Verdict::Finish => {
                    if !finishing {
                        finishing = true;
                        served.as_mut().graceful_shutdown();
                    }
                }
                Verdict::Close(reason) => {
                    let counter = match reason {
                        Reason::Idle => Some(&conns.metrics.closed_idle),
                        Reason::HeaderTimeout => Some(&conns.metrics.closed_header_timeout),
                        Reason::Evicted => Some(&conns.metrics.closed_evicted),
                        Reason::Shutdown => None,
                    };
                    if let Some(c) = counter {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    // Dropping the connection closes the socket.
                    break;
                }
            }
        }
    }
    conns.remove(id);
}

/// A request in flight on a connection: from its head to the end of its response body.
struct InFlight {
    conn: Arc<Conn>,
    conns: Arc<Connections>,
}

impl InFlight {
    fn new(conn: Arc<Conn>, conns: Arc<Connections>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        conn.head_since.store(0, Ordering::Relaxed);
        conns.requests.fetch_add(1, Ordering::Relaxed);
        Self { conn, conns }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.conn.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.conn
                .idle_since
                .store(self.conn.now_ms(), Ordering::Relaxed);
        }
        self.conn.wake.notify_one();
        self.conns.requests.fetch_sub(1, Ordering::Relaxed);
        self.conns.changed.notify_waiters();
    }
}

/// A response body that ends its request's [`InFlight`] when it is done or dropped.
struct Guarded {
    body: Body,
    _guard: InFlight,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The socket, noting when the bytes of a new request head begin to arrive.
struct Watched {
    io: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.conn.bytes_arrived();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Raises this process's open-file limit to its hard limit (connections are files) and
/// returns the soft limit then in force, where the system has one.
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write the struct passed.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
                return None;
            }
            if l.rlim_cur < l.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: l.rlim_max,
                    rlim_max: l.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    l = raised;
                }
            }
        }
        Some(l.rlim_cur)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}
