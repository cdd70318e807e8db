//! One reusable scratch buffer for the largest temporary of a training step: the
//! (tokens x vocabulary) logits of a micro-batch (311 MB for 512 tokens of Qwen2-VL). A fresh
//! allocation of that size is a fresh mapping from the kernel, and first-touch page faults
//! on it cost about a third of the matmul that fills it; reused, they cost nothing.

use std::sync::Mutex;

static SPARE: Mutex<Option<Vec<f32>>> = Mutex::new(None);

/// A buffer of exactly `len` floats with unspecified contents (the caller overwrites it).
pub fn take(len: usize) -> Vec<f32> {
    let spare = SPARE.lock().unwrap_or_else(|e| e.into_inner()).take();
    match spare {
        Some(mut v) if v.capacity() >= len => {
            // Contents are stale but initialised floats; shrink or grow within capacity.
            v.resize(len, 0.0);
            v.truncate(len);
            v
        }
        _ => vec![0f32; len],
    }
}

/// Hands a buffer back for the next [`take`] (the larger of it and the current spare is kept).
pub fn give(v: Vec<f32>) {
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    if spare.as_ref().is_none_or(|s| s.capacity() < v.capacity()) {
        *spare = Some(v);
    }
}

/// Drops the spare buffer (memory goes back to the system).
pub fn release() {
    *SPARE.lock().unwrap_or_else(|e| e.into_inner()) = None;
}
