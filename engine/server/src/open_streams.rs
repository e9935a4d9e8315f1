//! The open streaming responses, in one registry: the drain deadline ends them all at once, and
//! one sweeper task tells the silent ones to send their keep-alive comment.
//!
//! Why not a timer and a cancellation future in every stream: those were three allocations
//! (~0.3 KiB) kept by every open stream, and both woke it the same way — by its waker. Here a
//! stream keeps one small [`Slot`] (its waker and when it last sent), and the registry keeps
//! a pointer to it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Waker;
use std::time::Duration;

use futures::task::AtomicWaker;
use slab::Slab;
use tokio::time::Instant;

/// The sweeper looks at the streams at most this many times per keep-alive interval, so with
/// many streams a keep-alive is late by at most `interval / SWEEPS_PER_INTERVAL` (1 s at the
/// default 15 s). With one stream, or streams that went silent together, it is on time.
const SWEEPS_PER_INTERVAL: u32 = 15;

/// Every open streaming response of one server. Cheap to clone.
#[derive(Clone)]
pub(crate) struct OpenStreams {
    inner: Arc<Registry>,
}

struct Registry {
    /// Set once the drain deadline passed: every stream, open or opened later, ends.
    ended: AtomicBool,
    /// What `Slot::last_sent_ms` counts from.
    epoch: Instant,
    keep_alive: Duration,
    sweep_gap: Duration,
    table: Mutex<Table>,
}

struct Table {
    slots: Slab<Arc<Slot>>,
    /// Whether a sweeper task is running (it stops when the last stream closes).
    sweeping: bool,
}

/// What the registry knows of one stream.
struct Slot {
    waker: AtomicWaker,
    /// When the stream last sent something, in milliseconds since the registry's epoch.
    last_sent_ms: AtomicU64,
    /// Set by the sweeper when the stream has been silent for the interval, taken by the stream.
    keep_alive_due: AtomicBool,
}

/// A stream's place in the registry; leaving it (drop) takes the stream out.
pub(crate) struct Registration {
    registry: Arc<Registry>,
    slot: Arc<Slot>,
    key: usize,
}

impl OpenStreams {
    /// A registry whose streams send a keep-alive after `keep_alive` of silence.
    pub(crate) fn new(keep_alive: Duration) -> OpenStreams {
        // A zero interval would make the sweeper spin; a millisecond is already far below any
        // proxy's idle timeout.
        let keep_alive = keep_alive.max(Duration::from_millis(1));
        OpenStreams {
            inner: Arc::new(Registry {
                ended: AtomicBool::new(false),
                epoch: Instant::now(),
                keep_alive,
                sweep_gap: keep_alive / SWEEPS_PER_INTERVAL,
                table: Mutex::new(Table {
                    slots: Slab::new(),
                    sweeping: false,
                }),
            }),
        }
    }

    /// Adds a stream that has just opened (and so has just "sent": its silence starts now).
    /// Starts the sweeper if none is running; must be called within a Tokio runtime.
    pub(crate) fn register(&self) -> Registration {
        let registry = &self.inner;
        let slot = Arc::new(Slot {
            waker: AtomicWaker::new(),
            last_sent_ms: AtomicU64::new(registry.now_ms(Instant::now())),
            keep_alive_due: AtomicBool::new(false),
        });
        let mut table = registry.lock();
        let key = table.slots.insert(Arc::clone(&slot));
        if !table.sweeping {
            table.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(registry)));
        }
        drop(table);
        Registration {
            registry: Arc::clone(registry),
            slot,
            key,
        }
    }

    /// The drain deadline passed: every open stream is woken to end with its shutdown event.
    pub(crate) fn end_all(&self) {
        self.inner.ended.store(true, Ordering::Release);
        for (_, slot) in self.inner.lock().slots.iter() {
            slot.waker.wake();
        }
    }
}

impl Registry {
    /// The table stays consistent whatever a panicking holder was doing (each step is a single
    /// insert, remove or flag), so a poisoned lock is taken over rather than spread.
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn keep_alive_ms(&self) -> u64 {
        u64::try_from(self.keep_alive.as_millis()).unwrap_or(u64::MAX)
    }
}

impl Registration {
    /// Remembers the waker to wake at the drain deadline or when a keep-alive is due.
    pub(crate) fn register_waker(&self, waker: &Waker) {
        self.slot.waker.register(waker);
    }

    /// Whether the drain deadline passed.
    pub(crate) fn ended(&self) -> bool {
        self.registry.ended.load(Ordering::Acquire)
    }

    /// The stream sent an event at `now`.
    pub(crate) fn sent(&self, now: Instant) {
        self.slot
            .last_sent_ms
            .store(self.registry.now_ms(now), Ordering::Relaxed);
    }

    /// Whether a keep-alive is due now; if so it counts as sent. Reads the clock only when the
    /// sweeper found the stream silent (an event may have gone out since).
    pub(crate) fn take_keep_alive(&self) -> bool {
        if !self.slot.keep_alive_due.swap(false, Ordering::Acquire) {
            return false;
        }
        let now = self.registry.now_ms(Instant::now());
        let last = self.slot.last_sent_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < self.registry.keep_alive_ms() {
            return false;
        }
        self.slot.last_sent_ms.store(now, Ordering::Relaxed);
        true
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().slots.try_remove(self.key);
    }
}

impl Registry {
    /// Marks and wakes every stream silent for the interval; returns when the next one will
    /// be, or `None` when no stream is open (the sweeper then stops).
    fn sweep_once(&self, now: Instant) -> Option<Instant> {
        let now_ms = self.now_ms(now);
        let interval = self.keep_alive_ms();
        let table = &mut *self.lock();
        if table.slots.is_empty() {
            table.sweeping = false;
            // A slab keeps the room of its busiest moment (16 bytes a stream); with no key
            // left to honour, a burst's room is given back.
            table.slots = Slab::new();
            return None;
        }
        // A stream already marked is due again one interval after it sends the keep-alive,
        // so never before `now + interval`.
        let mut next_ms = now_ms.saturating_add(interval);
        for (_, slot) in table.slots.iter() {
            if slot.keep_alive_due.load(Ordering::Relaxed) {
                continue;
            }
            let due_ms = slot
                .last_sent_ms
                .load(Ordering::Relaxed)
                .saturating_add(interval);
            if due_ms <= now_ms {
                slot.keep_alive_due.store(true, Ordering::Release);
                slot.waker.wake();
            } else {
                next_ms = next_ms.min(due_ms);
            }
        }
        let next = self.epoch + Duration::from_millis(next_ms);
        Some(next.max(now + self.sweep_gap))
    }
}

/// The sweeper: runs while streams are open, and ends with the server's registry.
async fn sweep(registry: Weak<Registry>) {
    let mut next = match registry.upgrade() {
        Some(registry) => Instant::now() + registry.keep_alive,
        None => return,
    };
    loop {
        tokio::time::sleep_until(next).await;
        let Some(registry) = registry.upgrade() else {
            return;
        };
        match registry.sweep_once(Instant::now()) {
            Some(at) => next = at,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_stops_with_the_last_stream_and_starts_with_the_next() {
        let streams = OpenStreams::new(Duration::from_secs(15));
        let first = streams.register();
        assert!(streams.inner.lock().sweeping);
        drop(first);
        tokio::time::sleep(Duration::from_secs(16)).await;
        assert!(
            !streams.inner.lock().sweeping,
            "no stream open: the sweeper ended"
        );
        assert_eq!(
            streams.inner.lock().slots.capacity(),
            0,
            "and gave the room back"
        );

        let second = streams.register();
        assert!(
            streams.inner.lock().sweeping,
            "a new stream starts it again"
        );
        tokio::time::sleep(Duration::from_secs(15)).await;
        tokio::task::yield_now().await;
        assert!(
            second.take_keep_alive(),
            "the new stream's keep-alive is due"
        );
    }

    /// With a 15 s interval the sweeper looks at most once a second: a stream that fell silent
    /// half a second after another gets its keep-alive at most a second late, not on its own
    /// timer and not a whole interval late.
    #[tokio::test(start_paused = true)]
    async fn streams_silent_at_different_times_are_swept_at_most_a_gap_apart() {
        let streams = OpenStreams::new(Duration::from_secs(15));
        let first = streams.register();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second = streams.register();

        tokio::time::sleep(Duration::from_millis(14_600)).await; // t = 15.1 s
        assert!(first.take_keep_alive(), "the first is due at 15 s");
        tokio::time::sleep(Duration::from_millis(500)).await; // t = 15.6 s
        assert!(
            !second.take_keep_alive(),
            "due at 15.5 s, but not swept again within the gap"
        );

        tokio::time::sleep(Duration::from_millis(500)).await; // t = 16.1 s
        assert!(
            second.take_keep_alive(),
            "swept one gap after the last sweep"
        );
        assert!(
            !first.take_keep_alive(),
            "the first sent its keep-alive at 15.1 s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_sent_since_it_was_marked_sends_no_keep_alive() {
        let streams = OpenStreams::new(Duration::from_secs(15));
        let stream = streams.register();
        tokio::time::sleep(Duration::from_secs(15)).await;
        tokio::task::yield_now().await;
        assert!(
            stream.slot.keep_alive_due.load(Ordering::Acquire),
            "the sweeper marked the silent stream"
        );
        stream.sent(Instant::now());
        assert!(
            !stream.take_keep_alive(),
            "an event went out since the mark: no keep-alive"
        );
    }
}
