//! How the process allocates: freed buffers stay mapped for the next tensor.
//!
//! Every candle op allocates its output and drops its inputs, so one vision block frees and
//! re-allocates tens of megabytes. With glibc's defaults, buffers over 128 KB (until its
//! dynamic threshold catches up) are fresh `mmap`s and a heap top over 128 KB is handed back
//! with `brk`: each new tensor then page-faults its memory in again, zeroed by the kernel.
//! Profiled on the vision tower (1,024 patches, 2 threads) that was a fifth of all samples
//! (page faults 16%, unmapping 4%); keeping freed memory took the tower from ~245 to ~160 ms.
//! The price: the resident size stays at its peak instead of shrinking after a big step.

/// Environment variable that keeps glibc's defaults (freed memory returned to the system).
pub const RETURN_FREED_MEMORY: &str = "MEDVLM_RETURN_FREED_MEMORY";

/// Asks the allocator to serve buffers up to 32 MB (glibc's largest mmap threshold) from its
/// heaps and never to trim them, unless `MEDVLM_RETURN_FREED_MEMORY` is set. Returns whether
/// the settings were applied (false off glibc, or when the user opted out). Call it once at
/// start-up, before the big allocations.
pub fn keep_freed_memory() -> bool {
    if std::env::var_os(RETURN_FREED_MEMORY).is_some_and(|v| !v.is_empty() && v != "0") {
        return false;
    }
    apply()
}

/// Hands memory freed so far back to the system (glibc's `malloc_trim`), whatever
/// [`keep_freed_memory`] set: once, after a big one-off release such as the dense weights a
/// model was quantized from, so the resident size is the model's again.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's heaps to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // Both must be set: setting either one turns off glibc's dynamic mmap threshold, and
    // the trim threshold alone (everything over 128 KB mmapped again) measured slower than
    // the defaults.
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Minor page faults taken by this thread so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage writes the struct we pass.
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut u), 0);
            u.ru_minflt
        }
    }

    /// Allocates, touches and frees `bytes`, as a tensor op's output would be.
    fn touch(bytes: usize) {
        let v = std::hint::black_box(vec![1u8; bytes]);
        drop(v);
    }

    #[test]
    fn a_freed_buffer_is_reused_without_faulting_its_pages_in_again() {
        if std::env::var_os(super::RETURN_FREED_MEMORY).is_some() {
            return;
        }
        assert!(super::keep_freed_memory());
        let bytes = 8 << 20; // 2,048 pages of 4 KB
        touch(bytes); // the first time the pages must come in
        let before = minor_faults();
        for _ in 0..4 {
            touch(bytes);
        }
        let faults = minor_faults() - before;
        // With glibc's defaults the round trips faulted 2,048 pages in again (the heap top
        // trimmed and regrown); kept memory faults none of them.
        assert!(
            faults < 200,
            "{faults} page faults re-allocating a freed 8 MB buffer"
        );
    }
}
