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
//! pages (0-2 s more to load a q4_k 2B). Weights candle allocates (bf16, f32) stay on
//! ordinary pages: moving them after loading (`MADV_COLLAPSE`) took 5-24 s for a bf16 2B.

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
