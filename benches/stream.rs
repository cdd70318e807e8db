//! `cargo bench --bench stream`: how fast batch-1 decoding's products read their weights.
//!
//! One token of batch-1 decoding is one pass over every weight, each product `x (1 x in) ·
//! W` a few hundred microseconds: memory-bound, so the figure that says whether a kernel is
//! done is the bandwidth it reaches against what the machine gives. This times the products
//! of Qwen2-VL-2B's decoder layers (gate/up 8,960 x 1,536, down 1,536 x 8,960, q/o 1,536 x
//! 1,536, k/v 256 x 1,536; out x in) in every weight format inference keeps (f32, bf16 and
//! f16 read input-major by `kernels::packed`, the quantized formats by `kernels::quant`),
//! one row of activations, on the pool's threads (`RAYON_NUM_THREADS`), and prints the
//! median time and the weight bytes read per second. Enough copies of each weight are
//! cycled (about 400 MB) that none is read from cache. Every weight sits where inference
//! keeps it: dense ones in buffers advised onto 2 MB pages
//! (`kernels::pages::vec_for_weights`), quantized ones in `kernels::pages`' own mappings. The first line is a plain parallel
//! read of 1 GiB, the machine's streaming bandwidth on the same threads.
//!
//! bf16 runs the kernel inference runs on this CPU: with AVX-512 BF16 `kernels::bf16dot`
//! against the weight as checkpoints store it (out x in, `vdpbf16ps`), elsewhere the
//! widening input-major kernel; `bf16w` forces the latter (what a CPU without AVX-512 BF16
//! runs), for comparison.
//!
//! Options (after `--`): format names to run (f32 bf16 bf16w f16 q8_0 q4_1 q4_k q6_k;
//! default all), `--shape OUTxIN` (repeatable) for other shapes.

use std::time::Instant;

use medvlm::kernels::quant::{QWeight, QuantKind};
use medvlm::kernels::{bf16dot, packed, pages};
use rayon::prelude::*;

/// Bytes of weights cycled per shape and format: several times any last-level cache.
const CYCLED_BYTES: usize = 400 << 20;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Deterministic weights in [-0.5, 0.5): their values do not matter to the speed.
fn weights(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i.wrapping_mul(2654435761) + seed) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

/// Median seconds of `run(copy)` over `reps` calls cycling through `copies`.
fn time(copies: usize, reps: usize, mut run: impl FnMut(usize)) -> f64 {
    run(0);
    let mut ts = Vec::with_capacity(reps);
    for rep in 0..reps {
        let t = Instant::now();
        run(rep % copies);
        ts.push(t.elapsed().as_secs_f64());
    }
    median(ts)
}

fn report(format: &str, (n, k): (usize, usize), bytes: usize, secs: f64) {
    println!(
        "{format:5} {n:>6} x {k:<6} {:9.1} us {:6.1} GB/s",
        secs * 1e6,
        bytes as f64 / secs / 1e9
    );
}

/// `x · W` for an input-major weight in `W`'s element type, as `Linear` keeps it.
fn dense<W: medvlm::kernels::skinny::WeightElem + Send + Sync>(
    format: &str,
    (n, k): (usize, usize),
    convert: impl Fn(f32) -> W,
) {
    let bytes = n * k * std::mem::size_of::<W>();
    let copies = (CYCLED_BYTES / bytes).max(2);
    let ws: Vec<Vec<W>> = (0..copies)
        .map(|c| {
            let mut v = pages::vec_for_weights(n * k);
            v.extend(weights(n * k, c).into_iter().map(&convert));
            v
        })
        .collect();
    let x = weights(k, 7);
    let mut out = vec![0f32; n];
    let secs = time(copies, copies * 6, |c| {
        packed::linear(&x, &ws[c], None, (1, k, n), &mut out)
    });
    report(format, (n, k), bytes, secs);
}

/// `x · Wᵀ` on the AVX-512 BF16 kernels against a bf16 weight stored out x in, as `Linear`
/// keeps it where they run.
fn bf16_dot((n, k): (usize, usize)) {
    let bytes = n * k * 2;
    let copies = (CYCLED_BYTES / bytes).max(2);
    let ws: Vec<Vec<half::bf16>> = (0..copies)
        .map(|c| {
            let mut v = pages::vec_for_weights(n * k);
            v.extend(weights(n * k, c).into_iter().map(half::bf16::from_f32));
            v
        })
        .collect();
    let x = weights(k, 7);
    let mut out = vec![0f32; n];
    let secs = time(copies, copies * 6, |c| {
        assert!(bf16dot::linear(&x, &ws[c], None, (1, k, n), &mut out));
    });
    report("bf16", (n, k), bytes, secs);
}

fn quantized(kind: QuantKind, (n, k): (usize, usize)) {
    if !kind.fits(k) {
        return;
    }
    let first = QWeight::quantize(kind, &weights(n * k, 0), n, k);
    let bytes = first.bytes().len();
    let copies = (CYCLED_BYTES / bytes).max(2);
    let mut ws = vec![first];
    ws.extend((1..copies).map(|c| QWeight::quantize(kind, &weights(n * k, c), n, k)));
    let x = weights(k, 7);
    let mut out = vec![0f32; n];
    let secs = time(copies, copies * 6, |c| ws[c].matmul(&x, 1, None, &mut out));
    report(kind.name(), (n, k), bytes, secs);
}

fn main() {
    let mut formats = Vec::new();
    let mut shapes = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--shape" => {
                let s = args.next().unwrap_or_default();
                let parsed = s
                    .split_once('x')
                    .and_then(|(n, k)| Some((n.parse().ok()?, k.parse().ok()?)));
                match parsed {
                    Some(shape) => shapes.push(shape),
                    None => {
                        eprintln!("--shape {s}: expected OUTxIN, e.g. 1536x8960");
                        std::process::exit(2);
                    }
                }
            }
            f if ["f32", "bf16", "bf16w", "f16"].contains(&f)
                || QuantKind::from_name(f).is_some() =>
            {
                formats.push(f.to_string())
            }
            other => {
                eprintln!(
                    "{other}: not a format (f32 bf16 bf16w f16 q8_0 q4_1 q4_k q6_k) or --shape"
                );
                std::process::exit(2);
            }
        }
    }
    if formats.is_empty() {
        formats = ["f32", "bf16", "f16"].map(String::from).to_vec();
        formats.extend(QuantKind::ALL.iter().map(|k| k.name().to_string()));
    }
    if shapes.is_empty() {
        shapes = vec![(8960, 1536), (1536, 8960), (1536, 1536), (256, 1536)];
    }

    let big = vec![1u64; 1 << 27];
    let secs = time(1, 5, |_| {
        let s: u64 = big
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .sum();
        std::hint::black_box(s);
    });
    println!(
        "{} threads; a plain parallel read of 1 GiB: {:.1} GB/s",
        rayon::current_num_threads(),
        (big.len() * 8) as f64 / secs / 1e9
    );
    for format in &formats {
        for &shape in &shapes {
            match format.as_str() {
                "f32" => dense(format, shape, |v| v),
                "bf16" if bf16dot::available() => bf16_dot(shape),
                "bf16" | "bf16w" => dense(format, shape, half::bf16::from_f32),
                "f16" => dense(format, shape, half::f16::from_f32),
                name => quantized(QuantKind::from_name(name).expect("checked above"), shape),
            }
        }
    }
}
