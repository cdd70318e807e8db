//! Weight buffers on 2 MB pages.
//!
//! Batch-1 decoding streams every weight once per token, front to back. On 4 KB pages that
//! stream needs a new TLB entry every 4 KB, and the CPU's hardware prefetchers stop at each
//! page boundary; on 2 MB pages neither happens. Linux gives anonymous memory 2 MB pages
//! only where asked (`madvise(MADV_HUGEPAGE)`) when transparent huge pages are in their
//! common `madvise` mode, as on this project's machine, while llama.cpp's weights, mmapped
//! from a GGUF file, sat in the page cache's own large pages there (`FileHugePages` in
//! /proc/meminfo). [`PageBuf`] asks before the first touch. Where the OS says no, or off
//! Linux, it is ordinary memory: only speed depends on it, never a value.
//!
//! Measured (AMD EPYC Zen 4, 2 threads, a throwaway benchmark alternating the two, best of
//! 8 each, three rounds): q4_k and q6_k products over weights larger than the caches
//! streamed 5-29% faster from these buffers than from ordinary ones in 16 of 18 pairs. The
//! cost is at load: where free memory is fragmented the kernel compacts it to find 2 MB
//! pages (0-2 s more to load a q4_k 2B). Moving weights after loading (`MADV_COLLAPSE`)
//! took 5-24 s for a bf16 2B, so the weights candle keeps (bf16, f16 and f32 tensors, which
//! own a `Vec`) are given buffers advised before their first write instead
//! ([`vec_for_weights`]): read from a checkpoint straight into one, or transposed into one
//! when inference stores them input-major ([`transposed_for_weights`]). 2B bf16 batch-1
//! decoding, the binaries before and after alternating (AMD EPYC Zen 4, 2 threads, five
//! pairs): 9.2 -> 9.7 tok/s median, ahead in three pairs of five; the bf16 products over
//! the 2B's layer shapes streamed 0-5% faster (`cargo bench --bench stream`, four pairs).

use std::ops::{Deref, DerefMut};

const HUGE: usize = 2 << 20;

/// A zero-initialised byte buffer whose whole 2 MB stretches are backed by 2 MB pages where
/// the OS allows: large ones are mapped on their own, 2 MB aligned, and their tail past the
/// last whole 2 MB stays on 4 KB pages (a 2 MB page there would hold up to 2 MB of nothing:
/// 150 MB over a 2B model's layers); buffers under 2 MB are an ordinary `Vec`.
pub struct PageBuf(Inner);

enum Inner {
    Plain(Vec<u8>),
    #[cfg(target_os = "linux")]
    Mapped {
        /// The mapping (2 MB more than `len`, for the alignment) and its length.
        map: *mut libc::c_void,
        map_len: usize,
        /// The 2 MB-aligned start of the data within it.
        data: *mut u8,
        len: usize,
    },
}

// SAFETY: the mapping is owned by the buffer alone, as a Vec's heap block is.
unsafe impl Send for PageBuf {}
// SAFETY: shared access is read-only (`Deref`); writing needs `&mut`.
unsafe impl Sync for PageBuf {}

impl PageBuf {
    pub fn zeroed(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if len >= HUGE {
            if let Some(b) = Self::mapped(len) {
                return b;
            }
        }
        Self(Inner::Plain(vec![0; len]))
    }

    /// A buffer holding `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut b = Self::zeroed(bytes.len());
        b.copy_from_slice(bytes);
        b
    }

    /// An anonymous mapping (zeroed, untouched), 2 MB aligned, its whole 2 MB stretches
    /// advised to take 2 MB pages before anything touches them. `None` if the mapping fails
    /// (then a `Vec` is used).
    #[cfg(target_os = "linux")]
    fn mapped(len: usize) -> Option<Self> {
        let whole = len / HUGE * HUGE;
        let map_len = len.checked_add(HUGE)?;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return None;
        }
        let data = (map as usize).next_multiple_of(HUGE) as *mut u8;
        // SAFETY: [data, data + whole) lies within the mapping. A refusal (THP off) only
        // leaves 4 KB pages, so the result is not checked.
        unsafe { libc::madvise(data as *mut libc::c_void, whole, libc::MADV_HUGEPAGE) };
        Some(Self(Inner::Mapped {
            map,
            map_len,
            data,
            len,
        }))
    }
}

/// An empty `Vec` with room for `n` values whose whole 2 MB stretches are advised to take 2
/// MB pages before anything touches them: for weights that stay in candle tensors (which
/// own a `Vec`), so that the values written into it next land on 2 MB pages where the OS
/// allows. A fresh allocation (the allocator's new heap or mapping, as when loading a model)
/// is untouched, so the advice takes at the first write; memory the allocator reuses may
/// already have 4 KB pages, which then stay. Advice only: never a value, only speed,
/// depends on it.
pub fn vec_for_weights<T>(n: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        let start = v.as_ptr() as usize;
        let end = start + n * std::mem::size_of::<T>();
        let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if b > a {
            // SAFETY: [a, b) lies within the Vec's allocation (page-aligned, as madvise
            // needs); MADV_HUGEPAGE changes no contents. A refusal only leaves 4 KB pages.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

/// `w` (n x k, row-major) transposed to k x n in a buffer from [`vec_for_weights`]: how
/// inference stores a weight input-major ([`crate::kernels::packed`]) on 2 MB pages. Tiles
/// of 64 x 64, row blocks of the output in parallel.
pub fn transposed_for_weights<T: Copy + Send + Sync>(w: &[T], n: usize, k: usize) -> Vec<T> {
    use rayon::prelude::*;
    const TILE: usize = 64;
    assert!(w.len() >= n * k);
    let mut v = vec_for_weights::<T>(n * k);
    if n * k == 0 {
        return v;
    }
    v.spare_capacity_mut()[..n * k]
        .par_chunks_mut(TILE * n)
        .enumerate()
        .for_each(|(b, rows)| {
            let i0 = b * TILE;
            let ni = rows.len() / n;
            for j0 in (0..n).step_by(TILE) {
                for j in j0..(j0 + TILE).min(n) {
                    let src = &w[j * k + i0..j * k + i0 + ni];
                    for (i, &x) in src.iter().enumerate() {
                        rows[i * n + j].write(x);
                    }
                }
            }
        });
    // SAFETY: the chunks cover the first n * k slots, and every (i, j) of each was written.
    unsafe { v.set_len(n * k) };
    v
}

impl Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Inner::Plain(v) => v,
            // SAFETY: `len` bytes from `data` lie within the live mapping, zeroed at first.
            #[cfg(target_os = "linux")]
            Inner::Mapped { data, len, .. } => unsafe { std::slice::from_raw_parts(*data, *len) },
        }
    }
}

impl DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Inner::Plain(v) => v,
            // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
            #[cfg(target_os = "linux")]
            Inner::Mapped { data, len, .. } => unsafe {
                std::slice::from_raw_parts_mut(*data, *len)
            },
        }
    }
}

impl Clone for PageBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Inner::Mapped { map, map_len, .. } = self.0 {
            // SAFETY: the mapping this buffer made, unmapped once.
            unsafe { libc::munmap(map, map_len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transposition is the definition at every edge (tiles of 64 cut anywhere, a single
    /// row or column, empty), and the buffer has exactly the values.
    #[test]
    fn transposes_at_every_shape() {
        for (n, k) in [
            (0, 5),
            (1, 1),
            (1, 130),
            (129, 1),
            (64, 64),
            (65, 127),
            (300, 70),
        ] {
            let w: Vec<u32> = (0..n * k).map(|i| i as u32 * 7 + 1).collect();
            let t = transposed_for_weights(&w, n, k);
            assert_eq!(t.len(), n * k);
            for i in 0..k {
                for j in 0..n {
                    assert_eq!(t[i * n + j], w[j * k + i], "({n},{k}) [{i},{j}]");
                }
            }
        }
    }

    /// A weight-sized buffer from [`vec_for_weights`], once written, sits on 2 MB pages where
    /// the OS gives them to advised memory (Linux with transparent huge pages in `madvise`
    /// or `always` mode, compacting memory for advised faults): /proc/self/smaps counts
    /// AnonHugePages in its mapping. Elsewhere this says so and checks only the values.
    #[test]
    fn weight_buffers_land_on_2mb_pages() {
        let n = 24 << 20;
        let mut v = vec_for_weights::<u8>(n);
        assert!(v.is_empty() && v.capacity() >= n);
        v.resize(n, 3);
        assert!(v.iter().all(|&x| x == 3));
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        // Without direct compaction for advised memory, a fault takes a 2 MB page only if
        // one is free at that moment: no promise to test.
        let defrag = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/defrag")
            .unwrap_or_default();
        let compacts = ["[always]", "[madvise]", "[defer+madvise]"]
            .iter()
            .any(|m| defrag.contains(m));
        if !(thp.contains("[madvise]") || thp.contains("[always]")) || !compacts {
            eprintln!(
                "skipped the 2 MB page check: transparent huge pages off or without direct \
                 compaction here (enabled {thp:?}, defrag {defrag:?})"
            );
            return;
        }
        let at = v.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut huge_kb = 0;
        for line in smaps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'));
            if let Some((a, b)) = range {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    // Mappings the buffer overlaps (madvise may have split its own off).
                    inside = a < at + n && at < b;
                    continue;
                }
            }
            if inside && line.starts_with("AnonHugePages:") {
                huge_kb += line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|x| x.parse::<usize>().ok())
                    .unwrap_or(0);
            }
        }
        assert!(
            huge_kb >= 2048,
            "a 24 MB advised buffer has {huge_kb} kB on 2 MB pages (THP mode {thp:?})"
        );
    }

    /// Small and large buffers start zeroed, keep what is written, clone and drop; a large
    /// one's data is 2 MB aligned (the condition for its pages to be 2 MB ones).
    #[test]
    fn buffers_hold_their_bytes_at_every_size() {
        for len in [0, 1, 4095, HUGE - 1, HUGE, 3 * HUGE + 17] {
            let mut b = PageBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0), "{len}");
            for (i, v) in b.iter_mut().enumerate() {
                *v = (i % 251) as u8;
            }
            let c = b.clone();
            drop(b);
            assert!(c.iter().enumerate().all(|(i, &v)| v == (i % 251) as u8));
            if cfg!(target_os = "linux") && len >= HUGE {
                assert_eq!(c.as_ptr() as usize % HUGE, 0, "{len}");
            }
        }
    }
}
