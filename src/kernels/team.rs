//! A small pool for the many short parallel loops of batch-1 decoding, whose threads spin
//! between loops instead of sleeping.
//!
//! One decoded token of a 28-layer model is about 200 parallel loops (q/k/v, o, gate/up,
//! down, attention per layer, the LM head), most of them 30-900 microseconds of weight
//! streaming, separated by a few microseconds of sequential work (norms, rotary, the KV
//! cache). On rayon's pool the other workers go to sleep between loops (after a short
//! spin) and each loop wakes them again (a futex wake-up they start late by). Measured on
//! the 2B bf16 decode (AMD EPYC Zen 4, 2 threads, perf cpu-clock): the cores were idle ~9%
//! of each token; on this team, 2%. llama.cpp's threads spin at the
//! barriers between its graph's nodes; so do these, for a short while (`SPIN`) after each
//! loop, then they park until the next one.
//!
//! The caller takes part: `for_each(tasks, f)` runs `f(0..tasks)` on the caller and the
//! helpers, each task claimed from an atomic counter, and returns when all have run. A
//! call made while a loop is running (another thread's, or from inside one of the loop's
//! own tasks) goes to rayon instead: the team serves one decoding thread at a time and
//! never waits on itself. Decoding itself runs on a rayon worker (`generate`'s engine),
//! whose fellow workers then sleep: the team replaces them for these loops.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long a helper spins for the next loop before it parks: longer than the sequential
/// work between two loops of a token (sampling a 151,936-token vocabulary is ~0.5 ms), so
/// that decoding never waits for a wake-up, short enough that an idle server's helpers
/// sleep.
const SPIN: Duration = Duration::from_millis(2);

/// `state`: the loop's number in the high 32 bits, whether it is still open to helpers,
/// and how many helpers are inside it in the low bits.
const OPEN: u64 = 1 << 31;
const INSIDE: u64 = OPEN - 1;

struct Team {
    helpers: usize,
    /// Held by the caller of the running loop.
    busy: AtomicBool,
    state: AtomicU64,
    /// The running loop: `f` and its task count, written by the caller before it opens the
    /// loop, read by helpers after they joined it; a raw pointer because `f` lives on the
    /// caller's stack, which outlives every helper's use of it (the caller waits until no
    /// helper is inside).
    job: Mutex<Job>,
    next: AtomicUsize,
    panicked: AtomicBool,
    parked: AtomicUsize,
    wake: (Mutex<()>, Condvar),
}

#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    tasks: usize,
}
// SAFETY: `f` is Sync and only called while its caller waits for the loop to end.
unsafe impl Send for Job {}

static TEAM: OnceLock<&'static Team> = OnceLock::new();

fn team() -> &'static Team {
    TEAM.get_or_init(|| {
        // `MEDVLM_TEAM=0`: no helpers, every loop on rayon's pool (for comparisons).
        let off = std::env::var("MEDVLM_TEAM").is_ok_and(|v| v == "0");
        // The global pool's size (asked from a thread outside any pool: the first call may
        // come from inside a test's pool of another size), at most the cores there are.
        let pool = std::thread::spawn(rayon::current_num_threads)
            .join()
            .unwrap_or(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let helpers = if off {
            0
        } else {
            pool.min(cores).saturating_sub(1)
        };
        let noop: &'static (dyn Fn(usize) + Sync) = &|_| {};
        // Leaked: the helpers run for the life of the process.
        let team: &'static Team = Box::leak(Box::new(Team {
            helpers,
            busy: AtomicBool::new(false),
            state: AtomicU64::new(0),
            job: Mutex::new(Job { f: noop, tasks: 0 }),
            next: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            wake: (Mutex::new(()), Condvar::new()),
        }));
        for i in 0..helpers {
            // A helper that cannot start leaves the loops to the others (and the caller).
            let _ = std::thread::Builder::new()
                .name(format!("medvlm-team-{i}"))
                .spawn(move || helper(team));
        }
        team
    })
}

/// Runs `f(t)` for every t in 0..tasks, on the calling thread and the team's helpers (or
/// on rayon's pool: see the module notes), each task once, and returns when all have run.
/// A panic in a task is raised again here once no helper is inside the loop.
pub fn for_each(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    if tasks <= 1 {
        (0..tasks).for_each(f);
        return;
    }
    let team = team();
    if team.helpers == 0 || team.busy.swap(true, Acquire) {
        (0..tasks).into_par_iter().for_each(f);
        return;
    }
    on_team(team, tasks, f);
}

/// [`for_each`] over the `chunk`-long pieces of `buf` (the last may be shorter): task t
/// gets piece t, which no other task touches.
pub fn for_each_chunk(buf: &mut [f32], chunk: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let (len, chunk) = (buf.len(), chunk.max(1));
    let ptr = super::SendPtr(buf.as_mut_ptr());
    for_each(len.div_ceil(chunk), &|t| {
        let start = t * chunk;
        // SAFETY: pieces are disjoint and inside `buf`, which outlives the loop.
        let piece =
            unsafe { std::slice::from_raw_parts_mut(ptr.get().add(start), chunk.min(len - start)) };
        f(t, piece)
    });
}

/// [`for_each`] on the team, whose `busy` the caller holds (released here).
fn on_team(team: &'static Team, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    // SAFETY (lifetime): the pointer is dropped by every helper before `Close` returns.
    let f_static: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
    *team.job.lock().unwrap_or_else(|e| e.into_inner()) = Job { f: f_static, tasks };
    team.next.store(0, Relaxed);
    team.panicked.store(false, Relaxed);
    let epoch = (team.state.load(Relaxed) >> 32).wrapping_add(1) & 0xffff_ffff;
    team.state.store(epoch << 32 | OPEN, SeqCst);
    if team.parked.load(SeqCst) > 0 {
        let _guard = team.wake.0.lock().unwrap_or_else(|e| e.into_inner());
        team.wake.1.notify_all();
    }
    // Closes the loop and waits for the helpers inside it, also when a task of the
    // caller's panics (f must outlive them).
    struct Close(&'static Team);
    impl Drop for Close {
        fn drop(&mut self) {
            let team = self.0;
            team.state.fetch_and(!OPEN, SeqCst);
            let mut spins = 0u32;
            while team.state.load(Acquire) & INSIDE != 0 {
                spins = spins.wrapping_add(1);
                // A helper that shares this core (more threads than cores) runs its last
                // task only when this thread lets it.
                if spins.is_multiple_of(64) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            team.busy.store(false, Release);
        }
    }
    let close = Close(team);
    run_tasks(team, f, tasks);
    drop(close);
    if team.panicked.load(Acquire) {
        panic!("a task of a parallel decoding loop panicked");
    }
}

/// Claims and runs tasks until none is left.
fn run_tasks(team: &Team, f: &(dyn Fn(usize) + Sync), tasks: usize) {
    loop {
        let t = team.next.fetch_add(1, Relaxed);
        if t >= tasks {
            return;
        }
        f(t);
    }
}

fn helper(team: &'static Team) {
    let mut seen = 0u64;
    loop {
        let state = wait_for_loop(team, seen);
        seen = state >> 32;
        if !join(team, seen) {
            continue;
        }
        let job = *team.job.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the caller waits in `Close` until this helper has left the loop.
        let f = unsafe { &*job.f };
        if catch_unwind(AssertUnwindSafe(|| run_tasks(team, f, job.tasks))).is_err() {
            team.panicked.store(true, Release);
        }
        team.state.fetch_sub(1, Release);
    }
}

/// Enters loop `epoch` unless it closed (or another began) meanwhile.
fn join(team: &Team, epoch: u64) -> bool {
    let mut s = team.state.load(Acquire);
    loop {
        if s >> 32 != epoch || s & OPEN == 0 {
            return false;
        }
        match team.state.compare_exchange_weak(s, s + 1, AcqRel, Acquire) {
            Ok(_) => return true,
            Err(now) => s = now,
        }
    }
}

/// Waits until a loop after `seen` is open; returns its state.
fn wait_for_loop(team: &Team, seen: u64) -> u64 {
    let fresh = |s: u64| s & OPEN != 0 && s >> 32 != seen;
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let s = team.state.load(Acquire);
        if fresh(s) {
            return s;
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) {
            // Another runnable thread on this core (a rayon worker, another process) gets
            // it at once; alone, this returns in well under a microsecond.
            std::thread::yield_now();
            if start.elapsed() > SPIN {
                break;
            }
        } else {
            std::hint::spin_loop();
        }
    }
    let (lock, cvar) = &team.wake;
    let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    team.parked.fetch_add(1, SeqCst);
    loop {
        let s = team.state.load(SeqCst);
        if fresh(s) {
            team.parked.fetch_sub(1, SeqCst);
            return s;
        }
        guard = cvar.wait(guard).unwrap_or_else(|e| e.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Every task runs exactly once, for many loops in a row (helpers spinning, and after
    /// a pause, parked), from several threads at once (one gets the team, the others
    /// rayon), and from inside rayon workers.
    #[test]
    fn runs_every_task_once() {
        let check = |tasks: usize| {
            let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
            for_each(tasks, &|t| {
                hits[t].fetch_add(1, Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "{tasks} tasks");
        };
        for tasks in [0, 1, 2, 3, 7, 64, 1000] {
            check(tasks);
        }
        for _ in 0..2000 {
            check(5);
        }
        std::thread::sleep(SPIN * 3);
        check(9);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..300).for_each(|i| check(1 + i % 17)));
            }
        });
        (0..8).into_par_iter().for_each(|_| check(11));
    }

    /// The helpers do take tasks (else the team is the caller alone): with a task that
    /// waits for another thread to run a task too, a loop of two finishes only if two
    /// threads run it at once.
    #[test]
    fn helpers_share_the_work() {
        if team().helpers == 0 {
            eprintln!("skipped: one thread in rayon's pool, the team has no helpers");
            return;
        }
        // Take the team itself (another test's loop may hold it), so this cannot fall back.
        let team = team();
        while team.busy.swap(true, Acquire) {
            std::thread::yield_now();
        }
        let started = AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_secs(20);
        on_team(team, 2, &|_| {
            started.fetch_add(1, SeqCst);
            while started.load(SeqCst) < 2 {
                assert!(Instant::now() < deadline, "no second thread took a task");
                std::hint::spin_loop();
            }
        });
    }

    /// A panicking task (on whichever thread) is raised in the caller, and the team still
    /// works afterwards.
    #[test]
    fn a_panicking_task_reaches_the_caller() {
        for victim in [0, 5] {
            let r = catch_unwind(|| {
                for_each(8, &|t| {
                    if t == victim {
                        panic!("planted");
                    }
                })
            });
            assert!(r.is_err());
        }
        let n = AtomicU32::new(0);
        for_each(6, &|_| {
            n.fetch_add(1, Relaxed);
        });
        assert_eq!(n.load(Relaxed), 6);
    }
}
