//! What wakes an idle connection besides its socket: its deadline (`tcp.idle_timeout`,
//! `tcp.max_connection_duration`) and an interrupt (a cut or a handover), kept for all
//! connections in one sharded table that a clock task sweeps on a coarse tick.
//!
//! Why not a tokio `Sleep` and a cancellation future in each connection: the two were
//! 200 of the ~600 bytes every idle connection keeps in its task, enough to push
//! tokio's task allocation (rounded to 128 bytes) up a size. Here a connection keeps
//! an [`Alarm`] of 24 bytes and the table an entry of 32. Deadlines are late by at most
//! one tick (a tenth of the shortest timeout, between 10 ms and 1 s), which an idle
//! timeout of minutes does not notice; the exact deadline is still checked by the
//! connection when it wakes. Shards keep connections on different worker threads off
//! each other's lock, and each connection takes its lock only to register, to move its
//! deadline (once per timeout period, not per message) and to leave.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use slab::Slab;
use tokio::time::Instant;

/// Enough shards that two worker threads seldom meet on one lock.
const SHARDS: usize = 64;
/// The tick never gets finer than this, however short a timeout is.
const FINEST_TICK: Duration = Duration::from_millis(10);
/// Nor coarser than this.
const COARSEST_TICK: Duration = Duration::from_secs(1);
/// An entry whose deadline has rung (or that has none yet) waits for this one.
const NEVER: u64 = u64::MAX;

/// The table of every connection's deadline and waker.
#[derive(Debug)]
pub(crate) struct Alarms {
    shards: Box<[Mutex<Slab<Entry>>]>,
    /// Where the table's millisecond clock starts.
    epoch: Instant,
    /// Milliseconds since `epoch` at the last sweep: what [`Alarm::poll`] compares
    /// deadlines with, so that polling costs no clock read.
    now_ms: AtomicU64,
    /// The sweep interval in milliseconds: a tenth of the shortest span set so far.
    tick_ms: AtomicU64,
    /// Set (for good) by [`Alarms::interrupt`].
    interrupted: AtomicBool,
    /// Spreads new alarms over the shards.
    next_shard: AtomicUsize,
}

#[derive(Debug)]
struct Entry {
    waker: Option<Waker>,
    due_ms: u64,
}

/// A connection's place in the table, removed when dropped.
#[derive(Debug)]
pub(crate) struct Alarm<'a> {
    alarms: &'a Alarms,
    key: u32,
    shard: u16,
    /// The task's waker is in the table.
    registered: bool,
    /// The deadline as the connection last set it, in the table's milliseconds.
    due_ms: u64,
}

impl Default for Alarms {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Slab::new())).collect(),
            epoch: Instant::now(),
            now_ms: AtomicU64::new(0),
            tick_ms: AtomicU64::new(millis(COARSEST_TICK)),
            interrupted: AtomicBool::new(false),
            next_shard: AtomicUsize::new(0),
        }
    }
}

impl Alarms {
    /// A connection's alarm, ringing at `deadline` (`span` from now: it sets how fine
    /// the tick must be).
    pub(crate) fn set(&self, deadline: Instant, span: Duration) -> Alarm<'_> {
        let tick = millis((span / 10).clamp(FINEST_TICK, COARSEST_TICK));
        self.tick_ms.fetch_min(tick, Ordering::Relaxed);
        let shard = self.next_shard.fetch_add(1, Ordering::Relaxed) % SHARDS;
        let due_ms = self.due(deadline);
        let key = self.shard(shard).insert(Entry {
            waker: None,
            due_ms,
        });
        Alarm {
            alarms: self,
            key: u32::try_from(key).unwrap_or(u32::MAX),
            shard: shard as u16,
            registered: false,
            due_ms,
        }
    }

    /// Wakes every connection (a cut or a handover); they find out which by asking the
    /// shutdown broadcast.
    pub(crate) fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
        for shard in 0..SHARDS {
            for (_, entry) in self.shard(shard).iter() {
                if let Some(waker) = &entry.waker {
                    waker.wake_by_ref();
                }
            }
        }
    }

    /// Wakes the connections whose deadline has passed; returns how long to wait
    /// before the next sweep.
    pub(crate) fn sweep(&self) -> Duration {
        let now_ms = millis(self.epoch.elapsed());
        self.now_ms.store(now_ms, Ordering::Release);
        for shard in 0..SHARDS {
            for (_, entry) in self.shard(shard).iter_mut() {
                if entry.due_ms <= now_ms {
                    entry.due_ms = NEVER;
                    if let Some(waker) = &entry.waker {
                        waker.wake_by_ref();
                    }
                }
            }
        }
        Duration::from_millis(self.tick_ms.load(Ordering::Relaxed))
    }

    fn shard(&self, shard: usize) -> MutexGuard<'_, Slab<Entry>> {
        self.shards[shard].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `deadline` in the table's milliseconds, rounded up, so that a deadline counts
    /// as passed only once it has.
    fn due(&self, deadline: Instant) -> u64 {
        let since = deadline.saturating_duration_since(self.epoch);
        millis(since) + u64::from(!since.subsec_nanos().is_multiple_of(1_000_000))
    }
}

impl Alarm<'_> {
    /// Ready once the deadline has passed (as of the last sweep) or the connections
    /// were interrupted. The first poll leaves the task's waker in the table: a tokio
    /// task's waker stays the same for the task's life, so it is not stored again.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let alarms = self.alarms;
        if !self.registered {
            if let Some(entry) = alarms.shard(self.shard.into()).get_mut(self.key as usize) {
                entry.waker = Some(cx.waker().clone());
            }
            self.registered = true;
        }
        if alarms.interrupted.load(Ordering::SeqCst)
            || alarms.now_ms.load(Ordering::Acquire) >= self.due_ms
        {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Moves the deadline (traffic moved it, or it has rung and the connection goes on).
    pub(crate) fn reset(&mut self, deadline: Instant) {
        let alarms = self.alarms;
        self.due_ms = alarms.due(deadline);
        if let Some(entry) = alarms.shard(self.shard.into()).get_mut(self.key as usize) {
            entry.due_ms = self.due_ms;
        }
    }
}

impl Drop for Alarm<'_> {
    fn drop(&mut self) {
        self.alarms
            .shard(self.shard.into())
            .try_remove(self.key as usize);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(NEVER)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    /// Counts its wake-ups.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Count {
        /// A fresh count and a waker that adds to it.
        fn waker() -> (Arc<Self>, Waker) {
            let count = Arc::new(Self(AtomicUsize::new(0)));
            let waker = Waker::from(Arc::clone(&count));
            (count, waker)
        }

        fn get(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn an_alarm_rings_at_the_first_sweep_after_its_deadline_and_not_before() {
        let alarms = Alarms::default();
        let (woken, waker) = Count::waker();
        let mut cx = Context::from_waker(&waker);
        let mut alarm = alarms.set(
            Instant::now() + Duration::from_millis(30),
            Duration::from_millis(30),
        );
        assert!(alarm.poll(&mut cx).is_pending());
        alarms.sweep();
        assert_eq!(woken.get(), 0);
        assert!(alarm.poll(&mut cx).is_pending());
        std::thread::sleep(Duration::from_millis(40));
        alarms.sweep();
        assert_eq!(woken.get(), 1);
        assert!(alarm.poll(&mut cx).is_ready());
        // Rung once: later sweeps leave it alone until it is reset.
        alarms.sweep();
        assert_eq!(woken.get(), 1);
        alarm.reset(Instant::now() + Duration::from_secs(60));
        assert!(alarm.poll(&mut cx).is_pending());
    }

    #[test]
    fn an_interrupt_wakes_every_alarm_and_dropped_ones_leave_the_table() {
        let alarms = Alarms::default();
        let (woken, waker) = Count::waker();
        let mut cx = Context::from_waker(&waker);
        let far = Instant::now() + Duration::from_secs(600);
        let mut kept: Vec<_> = (0..100)
            .map(|_| alarms.set(far, Duration::from_secs(600)))
            .collect();
        for alarm in &mut kept {
            assert!(alarm.poll(&mut cx).is_pending());
        }
        kept.truncate(40);
        alarms.interrupt();
        assert_eq!(woken.get(), 40);
        assert!(kept.iter_mut().all(|a| a.poll(&mut cx).is_ready()));
        drop(kept);
        let left: usize = (0..SHARDS).map(|s| alarms.shard(s).len()).sum();
        assert_eq!(left, 0);
    }

    #[test]
    fn the_tick_follows_the_shortest_span_within_its_bounds() {
        let alarms = Alarms::default();
        let far = Instant::now() + Duration::from_secs(600);
        let _a = alarms.set(far, Duration::from_secs(300));
        assert_eq!(alarms.sweep(), COARSEST_TICK);
        let _b = alarms.set(far, Duration::from_millis(500));
        assert_eq!(alarms.sweep(), Duration::from_millis(50));
        let _c = alarms.set(far, Duration::from_millis(1));
        assert_eq!(alarms.sweep(), FINEST_TICK);
    }
}
