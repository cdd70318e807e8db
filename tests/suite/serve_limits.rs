//! `medvlm serve` against clients that misbehave: connections that send nothing or send
//! slowly, an empty API key, clients that leave, long stop strings, image bombs, malformed
//! DICOM and huge prompts. Each test runs the real binary (see `serve`'s `Server`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::serve::{ask, client, join_stream, parse_sse, tiny, Server};
use base64::Engine as _;
use candle_core::Device;
use serde_json::{json, Value};

impl Server {
    /// host:port, for raw sockets.
    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }
}

/// Connections are files: lift this process's soft limit to the hard one.
fn raise_open_files() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: both calls only read and write the struct passed.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
                l.rlim_cur = l.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &l);
            }
        }
    }
}

/// Waits until the server closes `s` (a read returns 0 or an error); how long that took.
fn until_closed(s: &mut TcpStream, limit: Duration) -> Duration {
    let t = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return t.elapsed(),
            Ok(_) => {}
        }
        assert!(
            t.elapsed() < limit,
            "the server never closed the connection"
        );
    }
}

/// Whether the server has closed `s`, without waiting.
fn is_closed(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let closed = match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// A raw HTTP/1.1 POST of a chat completion (for clients reqwest cannot be).
fn raw_post(body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// tiny-a with its final norm zeroed: every logit is 0, so greedy decoding picks token 0,
/// "!", forever. A model whose output is known whatever the prompt.
fn bang(dir: &Path) -> PathBuf {
    let out = dir.join("bang");
    std::fs::create_dir_all(&out).unwrap();
    for f in std::fs::read_dir(tiny()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, out.join(f.file_name().unwrap())).unwrap();
    }
    let path = out.join("model.safetensors");
    let mut w = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let norm = w["model.norm.weight"].zeros_like().unwrap();
    w.insert("model.norm.weight".into(), norm);
    candle_core::safetensors::save(&w, &path).unwrap();
    out
}

/// Connections that send nothing, send their headers a byte at a time, stall their body,
/// or sit idle after a request are closed on time; beyond --max-connections the idlest
/// connection makes room, so the server keeps answering, and a request in progress is
/// never cut.
#[test]
fn connections_time_out_and_idle_ones_make_room() {
    raise_open_files();
    let srv = Server::start(
        &tiny(),
        &[
            "--max-connections",
            "16",
            "--header-timeout",
            "1",
            "--idle-timeout",
            "2",
            "--body-timeout",
            "1",
        ],
    );
    let addr = srv.addr();
    // Nothing sent: closed after --idle-timeout.
    let mut s = TcpStream::connect(&addr).unwrap();
    let idle = until_closed(&mut s, Duration::from_secs(20));
    assert!(
        idle > Duration::from_millis(1500) && idle < Duration::from_secs(8),
        "idle for {idle:?}"
    );
    // Headers a byte every 100 ms: closed --header-timeout after the first byte, although
    // bytes keep coming (and each would restart an idle timer).
    let header_timeouts = srv.metric("medvlm_connections_closed_total{reason=\"header_timeout\"}");
    let mut s = TcpStream::connect(&addr).unwrap();
    let head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_vec();
    let t = Instant::now();
    let mut sent = 0;
    let slow = loop {
        let b = head.get(sent).copied().unwrap_or(b'a');
        if s.write_all(&[b]).is_err() || is_closed(&mut s) {
            break t.elapsed();
        }
        sent += 1;
        assert!(t.elapsed() < Duration::from_secs(20), "slow headers held");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        slow > Duration::from_millis(800) && slow < Duration::from_secs(5),
        "slow headers closed after {slow:?} ({sent} bytes)"
    );
    assert_eq!(
        srv.metric("medvlm_connections_closed_total{reason=\"header_timeout\"}"),
        header_timeouts + 1.0
    );
    // Keep-alive: a connection idle after its request is closed after --idle-timeout.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let kept = until_closed(&mut s, Duration::from_secs(20));
    assert!(kept > Duration::from_millis(1500), "kept alive {kept:?}");
    // A request head over 32 KiB: 431, and the connection is closed.
    let mut s = TcpStream::connect(&addr).unwrap();
    let big = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 << 10)
    );
    let _ = s.write_all(big.as_bytes());
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    // A body that stalls: 408 after --body-timeout, OpenAI-shaped.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"mess",
    )
    .unwrap();
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"code\":\"body_timeout\""), "{reply}");

    // A long stream, read slowly, outlives the idle timeout and a flood of newcomers.
    let long = json!({
        "messages": ask("hi", None), "max_tokens": 1500, "ignore_eos": true, "stream": true,
    });
    let mut stream = BufReader::new(srv.post_raw(&long, None));
    let mut first = String::new();
    stream.read_line(&mut first).unwrap();
    // 200 sockets that send nothing, over a cap of 16.
    let flood: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let t = Instant::now();
    let h = client().get(srv.url("/health")).send().unwrap();
    assert_eq!(h.status(), 200);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let (st, r) = srv.post(&json!({"messages": ask("hi", None), "max_tokens": 3}));
    assert_eq!(st, 200, "{r}");
    assert!(srv.metric("medvlm_open_connections") <= 16.0);
    assert!(srv.metric("medvlm_connections_closed_total{reason=\"evicted\"}") >= 100.0);
    std::thread::sleep(Duration::from_millis(2500));
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    let j = join_stream(&parse_sse(&(first + &rest)));
    assert_eq!(j[0].3.as_deref(), Some("length"), "the stream was cut");
    drop(flood);
    assert!(srv.metric("medvlm_connections_closed_total{reason=\"idle_timeout\"}") >= 2.0);
    assert!(srv.metric("medvlm_connections_closed_total{reason=\"header_timeout\"}") >= 1.0);
    assert!(!srv.log().contains("panicked"), "{}", srv.log());
}

/// `--api-key ""` (a deploy script's unset $KEY) is refused instead of serving without a
/// key, and so is a key no client could send, or a limit out of range, each in one line
/// naming the flag; a server reachable beyond loopback without a key says so.
#[test]
fn empty_api_keys_are_refused_and_open_servers_warn() {
    let model = tiny();
    for (args, env) in [
        (vec!["--api-key", ""], None),
        (vec!["--api-key", "   "], None),
        (vec!["--api-key", " key"], None),
        (vec!["--api-key", "kéy"], None),
        (vec![], Some("")),
        // Durations that would overflow a deadline, and nonsense, are refused the same way.
        (vec!["--header-timeout", "1e30"], None),
        (vec!["--idle-timeout", "0"], None),
        (vec!["--body-timeout", "nan"], None),
        (vec!["--request-timeout", "1e300"], None),
        (vec!["--max-connections", "0"], None),
        (vec!["--decode-budget-mb", "0"], None),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_medvlm"));
        cmd.args(["serve", "--model", s(&model), "--port", "0"])
            .args(&args)
            .env_remove("MEDVLM_API_KEY");
        if let Some(v) = env {
            cmd.env("MEDVLM_API_KEY", v);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?} started: {err}");
        let flag = args.first().copied().unwrap_or("--api-key");
        assert!(err.contains(flag), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(!err.contains("serving"), "{err}");
    }
    let open = Server::start(&model, &["--host", "0.0.0.0"]);
    assert!(
        open.log()
            .contains("warning: listening on 0.0.0.0 without --api-key"),
        "{}",
        open.log()
    );
    let (st, _) = open.post(&json!({"messages": ask("hi", None), "max_tokens": 2}));
    assert_eq!(st, 200);
    let keyed = Server::start(&model, &["--host", "0.0.0.0", "--api-key", "sesame"]);
    let local = Server::start(&model, &[]);
    for srv in [keyed, local] {
        assert!(!srv.log().contains("warning"), "{}", srv.log());
    }
}

/// One client cannot slow or block the others: four streams with four 1024-byte stop
/// strings each leave a neighbouring stream about as fast as four streams without them;
/// streams whose clients left while queued give their queue places back at once, not at
/// their turn; a stream with no visible text yet notices its client leaving.
#[test]
fn clients_that_leave_or_send_long_stop_strings_do_not_hold_up_others() {
    let tmp = tempfile::tempdir().unwrap();
    let model = bang(tmp.path());
    let srv = Server::start(&model, &["--max-batch", "8"]);
    let base = srv.base.clone();
    let neighbour = || {
        let t = Instant::now();
        let events = srv.stream(&json!({
            "messages": ask("hi", None), "max_tokens": 300, "ignore_eos": true,
            "temperature": 0, "stream": true,
        }));
        let j = join_stream(&events);
        assert_eq!(j[0].2, "!".repeat(300));
        t.elapsed()
    };
    // Stop strings that can never match but always hold back their longest prefix: the
    // most a matcher can be asked to track.
    let never = format!("{}?", "!".repeat(1023));
    let with_busy_neighbours = |stop: Option<Value>| {
        let running = srv.metric("medvlm_running_requests");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let base = base.clone();
                let mut body = json!({
                    "messages": ask("hi", None), "max_tokens": 2500, "ignore_eos": true,
                    "temperature": 0,
                });
                if let Some(s) = &stop {
                    body["stop"] = s.clone();
                }
                std::thread::spawn(move || {
                    let r: Value = client()
                        .post(format!("{base}/v1/chat/completions"))
                        .json(&body)
                        .send()
                        .unwrap()
                        .json()
                        .unwrap();
                    r["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
            })
            .collect();
        let t = Instant::now();
        while srv.metric("medvlm_running_requests") < running + 4.0 {
            assert!(t.elapsed() < Duration::from_secs(30), "they never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        let took = neighbour();
        for th in threads {
            // Held back while it might be a stop string, all sent in the end.
            assert_eq!(th.join().unwrap(), "!".repeat(2500));
        }
        took
    };
    let alone = neighbour().min(neighbour());
    let plain = with_busy_neighbours(None);
    let stops = with_busy_neighbours(Some(json!([never, never, never, never])));
    let _ = writeln!(
        std::io::stderr(),
        "300-token stream: alone {alone:?}, beside 4 streams {plain:?}, beside 4 streams \
         with 4 x 1024-byte stop strings {stops:?}"
    );
    assert!(
        stops < plain * 2 + Duration::from_secs(1),
        "stop strings slowed the neighbour: {stops:?} vs {plain:?}"
    );
    drop(srv);

    // Ghosts: one slot, two queue places.
    let srv = Server::start(&model, &["--max-batch", "1", "--max-queue", "2"]);
    let long = json!({
        "messages": ask("hi", None), "max_tokens": 4000, "ignore_eos": true,
        "temperature": 0, "stream": true,
    });
    let mut a = BufReader::new(srv.post_raw(&long, None));
    let mut first = String::new();
    a.read_line(&mut first).unwrap();
    let queued_stream = || {
        let mut s = TcpStream::connect(srv.addr()).unwrap();
        let mut b = long.clone();
        b["max_tokens"] = json!(5);
        s.write_all(raw_post(&b.to_string()).as_bytes()).unwrap();
        s
    };
    let ghosts = [queued_stream(), queued_stream()];
    let t = Instant::now();
    while srv.metric("medvlm_queue_depth") < 2.0 {
        assert!(t.elapsed() < Duration::from_secs(30), "never queued");
        std::thread::sleep(Duration::from_millis(5));
    }
    let cancelled = srv.metric("medvlm_cancelled_requests_total");
    drop(ghosts);
    let t = Instant::now();
    while srv.metric("medvlm_queue_depth") > 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "clients that left kept their queue places"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Freed while the long stream still ran, so before their turn came.
    assert_eq!(srv.metric("medvlm_running_requests"), 1.0);
    assert!(srv.metric("medvlm_completion_tokens_total") < 4000.0);
    assert!(srv.metric("medvlm_cancelled_requests_total") >= cancelled + 2.0);
    // A real client gets their place (a stream answers once queued), not 429.
    let mut b = long.clone();
    b["max_tokens"] = json!(5);
    let r = srv.post_raw(&b, None);
    assert_eq!(r.status(), 200);
    drop(r);
    drop(a);
    drop(srv);

    // A stream whose text is all held back (every "!" may begin the stop string) sends
    // nothing for its first 1023 tokens; its client leaving must still stop it.
    let srv = Server::start(&model, &[]);
    let invisible = json!({
        "messages": ask("hi", None), "max_tokens": 4000, "ignore_eos": true,
        "temperature": 0, "stream": true, "stop": [never],
    });
    let before = srv.metric("medvlm_completion_tokens_total");
    let r = srv.post_raw(&invisible, None);
    assert_eq!(r.status(), 200);
    // Leave once it is generating (not while it is still queued).
    let t = Instant::now();
    while srv.metric("medvlm_completion_tokens_total") == before {
        assert!(t.elapsed() < Duration::from_secs(30), "it never ran");
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(r);
    // Until the count of generated tokens stops moving.
    let mut last = -1.0;
    let t = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = srv.metric("medvlm_completion_tokens_total");
        if now == last && srv.metric("medvlm_running_requests") == 0.0 {
            break;
        }
        last = now;
        assert!(t.elapsed() < Duration::from_secs(30), "it never stopped");
    }
    let generated = last - before;
    assert!(
        generated < 1000.0,
        "stopped only after {generated} tokens, when text became visible"
    );
}

/// An image that alone needs more than --decode-budget-mb is refused with a 400 naming
/// it; images within the budget are decoded as before.
#[test]
fn images_beyond_the_decode_budget_are_refused() {
    let srv = Server::start(
        &tiny(),
        &["--decode-budget-mb", "4", "--reasoning-format", "raw"],
    );
    let bomb = png_bomb(12_000, 12_000, 8, 2);
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bomb)
    );
    let (st, r) = srv.post(&json!({"messages": ask("What is it?", Some(&url)), "max_tokens": 2}));
    assert_eq!(st, 400, "{r}");
    assert_eq!(r["error"]["param"], "messages[0].content[0].image_url");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--decode-budget-mb"),
        "{r}"
    );
    let small = crate::serve::data_url(&fixture_image("square.png"), "image/png");
    let (st, r) = srv.post(&json!({"messages": ask("What is it?", Some(&small)), "max_tokens": 2}));
    assert_eq!(st, 200, "{r}");
    assert_eq!(srv.metric("medvlm_image_decode_reserved_bytes"), 0.0);
}

/// A PNG of `w` x `h` zero pixels (`depth` bits, colour type `color`: 0 grey, 2 RGB): a few
/// hundred KB that decode to hundreds of MB.
fn png_bomb(w: u32, h: u32, depth: u8, color: u8) -> Vec<u8> {
    let channels = if color == 2 { 3 } else { 1 };
    let row = vec![0u8; 1 + (w as usize) * channels * depth as usize / 8];
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    for _ in 0..h {
        z.write_all(&row).unwrap();
    }
    let idat = z.finish().unwrap();
    let chunk = |out: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let mut c = flate2::Crc::new();
        c.update(kind);
        c.update(data);
        out.extend(kind);
        out.extend(data);
        out.extend(c.sum().to_be_bytes());
    };
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([depth, color, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// One explicit-VR little-endian DICOM element.
fn element(group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(group.to_le_bytes());
    out.extend(elem.to_le_bytes());
    out.extend(vr);
    if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
        out.extend([0, 0]);
        out.extend((value.len() as u32).to_le_bytes());
    } else {
        out.extend((value.len() as u16).to_le_bytes());
    }
    out.extend(value);
    out
}

/// The preamble, "DICM" and a file meta group (explicit VR little endian).
fn dicom_head() -> Vec<u8> {
    let uid = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        if b.len() % 2 == 1 {
            b.push(0);
        }
        b
    };
    let mut meta = element(2, 1, b"OB", &[0, 1]);
    meta.extend(element(2, 2, b"UI", &uid("1.2.840.10008.5.1.4.1.1.7")));
    meta.extend(element(2, 3, b"UI", &uid("1.2.3.4")));
    meta.extend(element(2, 0x10, b"UI", &uid("1.2.840.10008.1.2.1")));
    meta.extend(element(2, 0x12, b"UI", &uid("1.2.3.4.5")));
    let mut out = vec![0u8; 128];
    out.extend(b"DICM");
    out.extend(element(2, 0, b"UL", &(meta.len() as u32).to_le_bytes()));
    out.extend(meta);
    out
}

/// `depth` sequences nested in one another (undefined lengths), then their delimiters.
fn deep_dicom(depth: usize) -> Vec<u8> {
    let mut out = dicom_head();
    out.extend(element(0x28, 0x10, b"US", &4u16.to_le_bytes()));
    out.extend(element(0x28, 0x11, b"US", &4u16.to_le_bytes()));
    let tag = |out: &mut Vec<u8>, g: u16, e: u16| {
        out.extend(g.to_le_bytes());
        out.extend(e.to_le_bytes());
    };
    for _ in 0..depth {
        tag(&mut out, 0x0008, 0x1115);
        out.extend(b"SQ\0\0");
        out.extend(u32::MAX.to_le_bytes());
        tag(&mut out, 0xFFFE, 0xE000);
        out.extend(u32::MAX.to_le_bytes());
    }
    for _ in 0..depth {
        tag(&mut out, 0xFFFE, 0xE00D);
        out.extend(0u32.to_le_bytes());
        tag(&mut out, 0xFFFE, 0xE0DD);
        out.extend(0u32.to_le_bytes());
    }
    out
}

/// 484 bytes whose pixel data claims a length of 4 GB.
fn lying_dicom() -> Vec<u8> {
    let mut out = dicom_head();
    for (e, vr, v) in [
        (0x0002u16, b"US", 1u16.to_le_bytes().to_vec()),
        (0x0004, b"CS", b"MONOCHROME2 ".to_vec()),
        (0x0010, b"US", 64u16.to_le_bytes().to_vec()),
        (0x0011, b"US", 64u16.to_le_bytes().to_vec()),
        (0x0100, b"US", 16u16.to_le_bytes().to_vec()),
        (0x0101, b"US", 16u16.to_le_bytes().to_vec()),
        (0x0102, b"US", 15u16.to_le_bytes().to_vec()),
        (0x0103, b"US", 0u16.to_le_bytes().to_vec()),
    ] {
        out.extend(element(0x28, e, vr, &v));
    }
    out.extend(0x7FE0u16.to_le_bytes());
    out.extend(0x0010u16.to_le_bytes());
    out.extend(b"OW\0\0");
    out.extend(0xFFFF_FFF0u32.to_le_bytes());
    out.resize(484, 0);
    out
}

/// A 416-byte NIfTI-1 file whose header declares a 32,767 x 32,767 x 1,000 volume of f64
/// (8.6 TB).
fn lying_nifti() -> Vec<u8> {
    let mut h = vec![0u8; 352];
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    for (i, d) in [3i16, 32767, 32767, 1000, 1, 1, 1, 1].iter().enumerate() {
        h[40 + 2 * i..42 + 2 * i].copy_from_slice(&d.to_le_bytes());
    }
    h[70..72].copy_from_slice(&64i16.to_le_bytes()); // datatype: float64
    h[72..74].copy_from_slice(&64i16.to_le_bytes()); // bitpix
    for i in 0..8 {
        h[76 + 4 * i..80 + 4 * i].copy_from_slice(&1f32.to_le_bytes()); // pixdim
    }
    h[108..112].copy_from_slice(&352f32.to_le_bytes()); // vox_offset
    h[112..116].copy_from_slice(&1f32.to_le_bytes()); // scl_slope
    h[344..348].copy_from_slice(b"n+1\0");
    h.resize(416, 0);
    h
}

/// kB of VmRSS and VmHWM in /proc/PID/status.
fn memory_kb(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        s.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The hostile trial in one test: to one live server, while 100 connections send their
/// headers a byte at a time, 20 send their bodies so, and 1,000 more sit idle, it sends
/// eight concurrent PNG bombs (~470 KB each, 476 MB or 288 MB of pixels), a DICOM whose
/// pixel data claims 4 GB in 484 bytes, a NIfTI header declaring 8.6 TB, a 30 MB prompt,
/// and a DICOM of 2,400 nested sequences. Throughout and after, /health and a normal completion must succeed, every
/// hostile request must get a 200 or an OpenAI-shaped 400 (or 408 for the slow bodies),
/// and the server's resident memory must stay under its baseline plus the decode budget
/// plus 256 MiB (request bodies, a prompt's copies, connection buffers).
///
/// Each phase is checked on its own and every failure is reported at the end, so a run
/// says which kinds of input the server does not withstand yet.
#[test]
fn hostile_inputs_leave_the_server_answering_within_its_memory() {
    raise_open_files();
    const BUDGET_MB: u64 = 512;
    const SLACK_MB: u64 = 256;
    let srv = Server::start(
        &tiny(),
        &[
            "--decode-budget-mb",
            &BUDGET_MB.to_string(),
            "--max-connections",
            "256",
            "--header-timeout",
            "5",
            "--idle-timeout",
            "30",
            "--body-timeout",
            "10",
            "--reasoning-format",
            "raw",
        ],
    );
    let pid = srv.child.id();
    let normal = json!({"messages": ask("hi", None), "max_tokens": 4});
    assert_eq!(srv.post(&normal).0, 200);
    let (baseline_kb, _) = memory_kb(pid).unwrap();
    let bound_kb = baseline_kb + (BUDGET_MB + SLACK_MB) * 1024;

    // Per phase: the highest RSS seen, and the probes that failed.
    let phase = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let peaks = Arc::new(Mutex::new(vec![0u64; 8]));
    let probe_failures = Arc::new(Mutex::new(Vec::<(usize, String)>::new()));
    // Per phase: the most decode budget the server said it had reserved (what its decode
    // cost estimates admitted), to tell an estimate that is too low from a budget ignored.
    let reserved = Arc::new(Mutex::new(vec![0f64; 8]));
    let probes = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (phase, done, peaks) = (phase.clone(), done.clone(), peaks.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some((rss, _)) = memory_kb(pid) {
                    let p = phase.load(Ordering::Relaxed);
                    let mut peaks = peaks.lock().unwrap();
                    peaks[p] = peaks[p].max(rss);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let prober = {
        let (phase, done, failures, probes, reserved) = (
            phase.clone(),
            done.clone(),
            probe_failures.clone(),
            probes.clone(),
            reserved.clone(),
        );
        let base = srv.base.clone();
        let normal = normal.clone();
        std::thread::spawn(move || {
            // A new connection per probe, as a load balancer's health check makes, rather
            // than a kept-alive one the flood may close as the idlest.
            let c = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            while !done.load(Ordering::Relaxed) {
                let p = phase.load(Ordering::Relaxed);
                let t = Instant::now();
                let health = c.get(format!("{base}/health")).send();
                let chat = c
                    .post(format!("{base}/v1/chat/completions"))
                    .json(&normal)
                    .send();
                let ok = |r: &reqwest::Result<reqwest::blocking::Response>| {
                    r.as_ref().is_ok_and(|r| r.status() == 200)
                };
                if !ok(&health) || !ok(&chat) {
                    let say = |r: reqwest::Result<reqwest::blocking::Response>| match r {
                        Ok(r) => r.status().to_string(),
                        Err(e) => e.to_string(),
                    };
                    failures.lock().unwrap().push((
                        p,
                        format!(
                            "/health {}, chat {} after {:?}",
                            say(health),
                            say(chat),
                            t.elapsed()
                        ),
                    ));
                }
                probes.fetch_add(1, Ordering::Relaxed);
                let metrics = c
                    .get(format!("{base}/metrics"))
                    .send()
                    .and_then(|r| r.text());
                if let Some(v) = metrics.ok().and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("medvlm_image_decode_reserved_bytes "))
                        .and_then(|v| v.parse::<f64>().ok())
                }) {
                    let mut r = reserved.lock().unwrap();
                    r[p] = r[p].max(v);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // The connection attackers, until the end: slow headers (reconnecting when closed),
    // slow bodies, idle sockets.
    let addr = srv.addr();
    let slow_closed = Arc::new(AtomicUsize::new(0));
    let slow_bodies_408 = Arc::new(AtomicUsize::new(0));
    let attack_start = Instant::now();
    let attackers = {
        let (done, addr, slow_closed, slow_bodies_408) = (
            done.clone(),
            addr.clone(),
            slow_closed.clone(),
            slow_bodies_408.clone(),
        );
        std::thread::spawn(move || {
            let head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Pad: ";
            let body_head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\
                              Content-Length: 1000000\r\n\r\n{";
            let mut slow: Vec<(TcpStream, usize)> = (0..100)
                .filter_map(|_| TcpStream::connect(&addr).ok().map(|s| (s, 0)))
                .collect();
            let mut bodies: Vec<TcpStream> = (0..20)
                .filter_map(|_| {
                    let mut s = TcpStream::connect(&addr).ok()?;
                    s.write_all(body_head).ok()?;
                    Some(s)
                })
                .collect();
            let _idle: Vec<TcpStream> = (0..1000)
                .filter_map(|_| TcpStream::connect(&addr).ok())
                .collect();
            while !done.load(Ordering::Relaxed) {
                for (s, sent) in slow.iter_mut() {
                    let b = head.get(*sent).copied().unwrap_or(b'a');
                    if s.write_all(&[b]).is_err() || is_closed(s) {
                        slow_closed.fetch_add(1, Ordering::Relaxed);
                        if let Ok(n) = TcpStream::connect(&addr) {
                            *s = n;
                        }
                        *sent = 0;
                    } else {
                        *sent += 1;
                    }
                }
                bodies.retain_mut(|s| {
                    s.set_nonblocking(true).unwrap();
                    let mut buf = [0u8; 64];
                    let answered = matches!(s.read(&mut buf), Ok(n) if n > 0);
                    s.set_nonblocking(false).unwrap();
                    if answered {
                        if buf.starts_with(b"HTTP/1.1 408") {
                            slow_bodies_408.fetch_add(1, Ordering::Relaxed);
                        }
                        return false;
                    }
                    s.write_all(b" ").is_ok()
                });
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    let mut failures: Vec<String> = Vec::new();
    let mut summary: Vec<String> = Vec::new();
    let post = |body: &Value| -> (u16, Value, Duration) {
        let t = Instant::now();
        match client()
            .post(srv.url("/v1/chat/completions"))
            .json(body)
            .send()
        {
            Ok(r) => {
                let st = r.status().as_u16();
                (st, r.json().unwrap_or(Value::Null), t.elapsed())
            }
            Err(e) => (0, json!(e.to_string()), t.elapsed()),
        }
    };
    let with_image = |bytes: &[u8], mime: &str| {
        let url = format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        );
        json!({"messages": ask("What is it?", Some(&url)), "max_tokens": 2})
    };
    // A 200, or a 400 naming the field; anything else fails the phase.
    let mut expect = |name: &str, (st, v, took): (u16, Value, Duration), param: &str| {
        summary.push(format!("{name}: {st} in {took:.1?}"));
        let ok = st == 200 || (st == 400 && v["error"]["param"] == param);
        if !ok {
            failures.push(format!("{name}: got {st} {v}"));
        }
    };
    let image = "messages[0].content[0].image_url";

    // 1. Eight PNG bombs at once: 8-bit RGB 12,600 x 12,600 (476 MB decoded) and 16-bit
    //    grey 12,000 x 12,000 (288 MB, and 432 MB as RGB).
    phase.store(1, Ordering::Relaxed);
    let rgb = with_image(&png_bomb(12_600, 12_600, 8, 2), "image/png");
    let grey = with_image(&png_bomb(12_000, 12_000, 16, 0), "image/png");
    let results: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let b = if i % 2 == 0 { &rgb } else { &grey };
                sc.spawn(|| post(b))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in results.into_iter().enumerate() {
        expect(&format!("PNG bomb {i}"), r, image);
    }
    // 2. A DICOM whose pixel data claims 4 GB in 484 bytes.
    phase.store(2, Ordering::Relaxed);
    let r = post(&with_image(&lying_dicom(), "application/dicom"));
    expect("lying-length DICOM", r, image);
    // ... and a NIfTI header that declares 8.6 TB of voxels.
    let r = post(&with_image(&lying_nifti(), "application/octet-stream"));
    expect("lying-size NIfTI", r, image);
    // 3. A 30 MB prompt (under the 32 MB body limit).
    phase.store(3, Ordering::Relaxed);
    let r = post(&json!({"messages": ask(&"word ".repeat(6_000_000), None), "max_tokens": 2}));
    expect("30 MB prompt", r, "messages");
    // 4. 2,400 nested sequences.
    phase.store(4, Ordering::Relaxed);
    let r = post(&with_image(&deep_dicom(2400), "application/dicom"));
    expect("deep-sequence DICOM", r, image);
    std::thread::sleep(Duration::from_millis(500));
    // The slow bodies' --body-timeout (10 s) runs from when they connected, and the slow
    // heads' --header-timeout (5 s) from their first byte; the first slow heads may instead
    // be evicted by the flood of idle sockets (the oldest go first), so it is the ones that
    // reconnect after it that time out. The phases above may end sooner than all that on a
    // fast machine: give the clocks their time (with a margin) before counting.
    let header_timeouts =
        || srv.metric("medvlm_connections_closed_total{reason=\"header_timeout\"}");
    while (slow_bodies_408.load(Ordering::Relaxed) < 20 || header_timeouts() < 50.0)
        && attack_start.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(500));
    }

    // After: the attackers are still there; the server still answers.
    phase.store(5, Ordering::Relaxed);
    let alive = srv.child.id() == pid && memory_kb(pid).is_some();
    let h = client().get(srv.url("/health")).send();
    if !h.as_ref().is_ok_and(|h| h.status() == 200) {
        failures.push(format!("after: /health {h:?}"));
    }
    let (st, v, took) = post(&normal);
    summary.push(format!("after: a normal completion {st} in {took:.1?}"));
    if st != 200 {
        failures.push(format!("after: a normal completion got {st} {v}"));
    }
    if alive && st == 200 {
        let open = srv.metric("medvlm_open_connections");
        summary.push(format!(
            "connections: {open} open, {} slow heads closed, {} slow bodies got 408",
            slow_closed.load(Ordering::Relaxed),
            slow_bodies_408.load(Ordering::Relaxed)
        ));
        if open > 256.0 {
            failures.push(format!(
                "{open} connections open, over --max-connections 256"
            ));
        }
        let header_timeouts = header_timeouts();
        if header_timeouts < 50.0 {
            failures.push(format!(
                "slow headers were not closed after --header-timeout ({header_timeouts} \
                 closed so; {} closed as the client saw it)",
                slow_closed.load(Ordering::Relaxed)
            ));
        }
    }
    done.store(true, Ordering::Relaxed);
    let _ = (watcher.join(), prober.join(), attackers.join());
    if slow_bodies_408.load(Ordering::Relaxed) < 10 {
        failures.push(format!(
            "only {} of 20 slow bodies got 408",
            slow_bodies_408.load(Ordering::Relaxed)
        ));
    }
    let names = [
        "start",
        "PNG bombs",
        "lying-length DICOM and NIfTI",
        "30 MB prompt",
        "deep-sequence DICOM",
        "after",
    ];
    let peaks = peaks.lock().unwrap().clone();
    let reserved = reserved.lock().unwrap().clone();
    for (i, name) in names.iter().enumerate().skip(1) {
        summary.push(format!(
            "{name}: peak RSS {} MiB, at most {:.0} MiB of decode budget reserved",
            peaks[i] / 1024,
            reserved[i] / f64::from(1 << 20)
        ));
        if peaks[i] > bound_kb {
            failures.push(format!(
                "{name}: peak RSS {} MiB, over the bound of {} MiB (baseline {} + decode \
                 budget {BUDGET_MB} + {SLACK_MB})",
                peaks[i] / 1024,
                bound_kb / 1024,
                baseline_kb / 1024
            ));
        }
    }
    for (p, f) in probe_failures.lock().unwrap().iter() {
        failures.push(format!("during {}: {f}", names[*p]));
    }
    summary.push(format!(
        "{} probes (/health + a completion) during the run",
        probes.load(Ordering::Relaxed)
    ));
    if let Some((_, hwm)) = memory_kb(pid) {
        summary.push(format!("VmHWM {} MiB", hwm / 1024));
    }
    let _ = writeln!(std::io::stderr(), "{}", summary.join("\n"));
    assert!(
        failures.is_empty(),
        "{}\n\nsummary:\n{}\n\nserver log:\n{}",
        failures.join("\n"),
        summary.join("\n"),
        srv.log()
    );
}
