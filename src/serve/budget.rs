//! Admission of image decodes by memory.
//!
//! A small compressed file can declare a huge picture (a 470 KB PNG that decodes to 800 MB),
//! so counting decodes bounds nothing: eight at once took 6.2 GB. Each decode first reserves
//! its cost, an upper bound read from the file's header
//! ([`crate::processor::image::decode_cost`]), from a budget in bytes, and holds it until
//! the decoded picture has been turned into patches. An image that alone exceeds the budget
//! is refused; others wait (first come, first served) until there is room, at most until
//! their request's deadline. A second, plain count keeps decodes to the CPUs there are:
//! decoding is CPU work that runs on the blocking pool, never on the async threads.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::metrics::Metrics;

/// Permits are KiB: a semaphore counts in u32 per acquisition, and bytes would cap one
/// reservation at 4 GiB.
const UNIT: u64 = 1024;

/// Why a reservation was not granted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The image alone needs more than the whole budget.
    TooLarge,
    /// No room before the deadline.
    Timeout,
}

pub struct DecodeBudget {
    total: u64,
    memory: Arc<Semaphore>,
    threads: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// Memory and a thread reserved for one decode; released when dropped.
pub struct Reservation {
    _memory: OwnedSemaphorePermit,
    _thread: OwnedSemaphorePermit,
    bytes: u64,
    metrics: Arc<Metrics>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.metrics
            .decode_reserved_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Counts a waiting reservation in the metrics for as long as it waits.
struct Waiting<'a>(&'a Metrics);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.decodes_waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl DecodeBudget {
    /// `total` bytes at once, `threads` decodes at once (both at least 1).
    pub fn new(total: u64, threads: usize, metrics: Arc<Metrics>) -> Self {
        let units = (total / UNIT).clamp(1, u64::from(u32::MAX));
        Self {
            total: units * UNIT,
            memory: Arc::new(Semaphore::new(units as usize)),
            threads: Arc::new(Semaphore::new(threads.max(1))),
            metrics,
        }
    }

    /// The budget in bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Reserves `cost` bytes and a decoding thread, waiting until `deadline` at most.
    pub async fn reserve(
        &self,
        cost: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Reservation, Refused> {
        let units = cost.div_ceil(UNIT).max(1);
        if units * UNIT > self.total {
            return Err(Refused::TooLarge);
        }
        self.metrics.decodes_waiting.fetch_add(1, Ordering::Relaxed);
        let waiting = Waiting(&self.metrics);
        // Memory first, then a thread: a holder of a thread holds its memory too and is
        // decoding, so it always finishes and nobody waits on a circle.
        let acquire = async {
            let memory = self
                .memory
                .clone()
                .acquire_many_owned(units as u32)
                .await
                .map_err(|_| Refused::Timeout)?;
            let thread = self
                .threads
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Refused::Timeout)?;
            Ok::<_, Refused>((memory, thread))
        };
        let (memory, thread) = tokio::time::timeout_at(deadline, acquire)
            .await
            .map_err(|_| Refused::Timeout)??;
        drop(waiting);
        let bytes = units * UNIT;
        self.metrics
            .decode_reserved_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(Reservation {
            _memory: memory,
            _thread: thread,
            bytes,
            metrics: self.metrics.clone(),
        })
    }
}

/// The default budget: a quarter of the memory available now (after the model is loaded),
/// at least 256 MiB; 2 GiB when the system does not say.
pub fn default_budget() -> u64 {
    match crate::device::available_memory(&candle_core::Device::Cpu).1 {
        Some(avail) => (avail / 4).max(256 << 20),
        None => 2 << 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn decodes_wait_for_room_and_oversized_ones_are_refused() {
        let m = Arc::new(Metrics::default());
        let b = DecodeBudget::new(10 << 20, 8, m.clone());
        let soon = || tokio::time::Instant::now() + Duration::from_millis(200);
        assert_eq!(b.total(), 10 << 20);
        assert!(matches!(
            b.reserve(11 << 20, soon()).await,
            Err(Refused::TooLarge)
        ));
        let a = b.reserve(6 << 20, soon()).await.unwrap();
        assert_eq!(m.decode_reserved_bytes.load(Ordering::Relaxed), 6 << 20);
        // 6 + 6 > 10: the second waits, and gives up at its deadline.
        assert!(matches!(
            b.reserve(6 << 20, soon()).await,
            Err(Refused::Timeout)
        ));
        assert_eq!(m.decodes_waiting.load(Ordering::Relaxed), 0);
        // It gets in once the first is released.
        let b2 = &b;
        let waiter = async move { b2.reserve(6 << 20, soon()).await };
        let release = async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(a);
        };
        let (r, ()) = tokio::join!(waiter, release);
        assert!(r.is_ok());
        drop(r);
        assert_eq!(m.decode_reserved_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn decodes_are_bounded_by_count_too() {
        let m = Arc::new(Metrics::default());
        let b = DecodeBudget::new(1 << 30, 2, m);
        let soon = || tokio::time::Instant::now() + Duration::from_millis(200);
        let x = b.reserve(1, soon()).await.unwrap();
        let _y = b.reserve(1, soon()).await.unwrap();
        assert_eq!(b.reserve(1, soon()).await.err(), Some(Refused::Timeout));
        drop(x);
        assert!(b.reserve(1, soon()).await.is_ok());
    }
}
