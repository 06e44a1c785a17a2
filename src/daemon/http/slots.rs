//! The HTTP connection table: the counts come from the same per-address
//! [`ConnectionLimiter`] the echo listeners use (64 in all — fewer under a low open-files
//! limit, see [`super::admission::Budget`] — 8 per address); this table
//! adds what the endpoint needs on top — when a newcomer finds its address at its
//! share, or the table full, it takes the place of a connection that is not being
//! served (no request in progress: a slowloris head, a stalled TLS handshake, an idle
//! keep-alive, a request waiting for a password check): of the address holding the
//! most places (its own, when it is at its share), the one that has made no progress
//! for the longest. Progress is a read that brought bytes, or a request answered.
//!
//! Staleness alone does not save a probe from an attacker on its own address that
//! reconnects the moment it is evicted: thousands of stalled ClientHellos a second
//! each read their few bytes *after* the probe's last read, so the probe, waiting a
//! few milliseconds for its client's next flight, became the stalest in the share and
//! was evicted (38–64 % of TLS probes answered). So a connection that got an answer
//! from echod — a TLS server flight (its ClientHello was complete), a response — and
//! has made progress within the last [`GRACE`] is *protected*: it is evicted only when
//! no unprotected candidate is left. A stalled handshake or a slowloris head never
//! gets an answer, so it is never protected; a probe is protected from its server
//! flight until it is served. Before that flight, a client that has sent nothing yet
//! and is younger than [`GRACE`] is *fresh* (curl sends its ClientHello ~2 ms after
//! connecting): it goes after every connection that sent bytes and stopped, and before
//! the protected ones. So the order of eviction is: stalled (bytes then nothing, or
//! older than the grace), fresh, protected; within each, from the address holding the
//! most, the stalest. Since admission waits for a connection's first bytes
//! ([`super::admission`]), "fresh" lasts only from its admission to its first read.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::daemon::limits::{ConnectionLimiter, Permit};
use crate::daemon::reasons::RejectReason;

/// How long a connection that echod has answered stays protected from eviction after
/// its last progress: a handshake or a request on loopback, or across a LAN, moves
/// within milliseconds; a client that stops for longer is a candidate again.
pub(super) const GRACE: Duration = Duration::from_millis(200);

/// The label a connection closed to make room for a newcomer is counted under in
/// `echod_http_connections_rejected_total`.
pub(super) const EVICTED: &str = "evicted";

/// Why a connection was closed right after accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// Its source address holds its share, every one of them serving a request.
    PerIp,
    /// The table is full and every connection in it is serving a request.
    Full,
}

impl Refused {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::PerIp => "per_ip_limit",
            Self::Full => "global_limit",
        }
    }
}

/// The connections that could be evicted, with what eviction needs to know.
pub(super) struct Slots {
    limiter: Arc<ConnectionLimiter>,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    /// A logical clock: each mark of progress takes the next tick (only the order
    /// matters to eviction).
    clock: u64,
    /// Every open connection not evicted yet.
    entries: HashMap<u64, Entry>,
}

struct Entry {
    ip: IpAddr,
    /// The tick of its last read that brought bytes (or its accept, or its last
    /// answer).
    progressed: u64,
    /// When that was.
    progressed_at: Instant,
    /// echod has written to it (a TLS server flight, a response): it is getting
    /// somewhere, so it is protected while its last progress is within [`GRACE`].
    answered: bool,
    /// A read has brought bytes.
    sent: bool,
    /// Serving a request now: never evicted.
    busy: bool,
    evicted: CancellationToken,
}

/// One admitted connection; dropping it frees its place.
pub(super) struct Slot {
    /// Its admission evicted another connection.
    pub(super) evicted_one: bool,
    handle: SlotHandle,
    _permit: Permit,
    /// Cancelled when a newcomer takes its place.
    pub(super) evicted: CancellationToken,
}

/// What the connection's socket and request handler tell the table.
#[derive(Clone)]
pub(super) struct SlotHandle {
    slots: Arc<Slots>,
    id: u64,
}

impl Slots {
    pub(super) fn new(max: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            limiter: ConnectionLimiter::with_limits(max, max_per_ip),
            table: Mutex::new(Table::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `ip`, evicting the stalest connection not being served
    /// (of the same address when that address holds its share) if there is no room.
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let ip = crate::daemon::limits::canonical_ip(ip);
        let mut table = self.lock();
        let mut evicted_one = false;
        let permit = match self.limiter.try_acquire(ip) {
            Ok(permit) => permit,
            Err(reason) => {
                let own = reason == RejectReason::PerIpLimit || self.limiter.is_at_share(ip);
                let mut held: HashMap<IpAddr, usize> = HashMap::new();
                for e in table.entries.values() {
                    *held.entry(e.ip).or_insert(0) += 1;
                }
                // Unprotected ones first; of those, from the address holding the
                // most (an attacker needs as many addresses as there are places to
                // reach a lone probe), the stalest.
                let now = Instant::now();
                let victim = table
                    .entries
                    .iter()
                    .filter(|(_, e)| !e.busy && (!own || e.ip == ip))
                    .min_by_key(|(id, e)| {
                        (
                            e.rank(now),
                            std::cmp::Reverse(held.get(&e.ip).copied()),
                            e.progressed,
                            **id,
                        )
                    })
                    .map(|(id, _)| *id)
                    .ok_or(if own { Refused::PerIp } else { Refused::Full })?;
                if let Some(entry) = table.entries.remove(&victim) {
                    // It closes at its next poll and gives its place back then.
                    entry.evicted.cancel();
                    evicted_one = true;
                }
                self.limiter.adopt(ip)
            }
        };
        let id = table.next_id;
        table.next_id += 1;
        let progressed = table.tick();
        let evicted = CancellationToken::new();
        table.entries.insert(
            id,
            Entry {
                ip,
                progressed,
                progressed_at: Instant::now(),
                answered: false,
                sent: false,
                busy: false,
                evicted: evicted.clone(),
            },
        );
        Ok(Slot {
            evicted_one,
            handle: SlotHandle {
                slots: Arc::clone(self),
                id,
            },
            _permit: permit,
            evicted,
        })
    }
}

impl Table {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

impl Entry {
    /// Who goes first: 0 stalled, 1 fresh (nothing sent yet, younger than the grace),
    /// 2 protected (answered, progressed within the grace).
    fn rank(&self, now: Instant) -> u8 {
        let recent = now.saturating_duration_since(self.progressed_at) < GRACE;
        match (recent, self.answered, self.sent) {
            (true, true, _) => 2,
            (true, false, false) => 1,
            _ => 0,
        }
    }

    fn progress(&mut self, tick: u64) {
        self.progressed = tick;
        self.progressed_at = Instant::now();
    }
}

impl Slot {
    pub(super) fn handle(&self) -> SlotHandle {
        self.handle.clone()
    }
}

impl SlotHandle {
    fn update(&self, f: impl FnOnce(&mut Entry, u64)) {
        let mut table = self.slots.lock();
        let now = table.tick();
        if let Some(entry) = table.entries.get_mut(&self.id) {
            f(entry, now);
        }
    }

    /// A read brought bytes.
    pub(super) fn progressed(&self) {
        self.update(|e, now| {
            e.sent = true;
            e.progress(now);
        });
    }

    /// echod wrote to it (a TLS server flight, a response): what it sent was complete.
    pub(super) fn wrote(&self) {
        self.update(|e, now| {
            e.answered = true;
            e.progress(now);
        });
    }

    /// A request is being served (after its password check, if it needs one): the
    /// connection is doing real work and is not evicted until it is answered.
    pub(super) fn serving(&self) {
        self.update(|e, _| e.busy = true);
    }

    /// The request was answered: progress, and evictable again until the next one.
    pub(super) fn answered(&self) {
        self.update(|e, now| {
            e.busy = false;
            e.answered = true;
            e.progress(now);
        });
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.handle.slots.lock().entries.remove(&self.handle.id);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;
    use std::time::Instant;

    use super::{GRACE, Refused, Slot, Slots};

    const MAX: usize = 64;
    const PER_IP: usize = 8;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x7f00_0000 + n))
    }

    /// 200 connections from `from` that each read some bytes and stall, each replaced at
    /// once when evicted: the ones still held.
    fn stalled_newcomers(slots: &Arc<Slots>, from: IpAddr) -> Vec<Slot> {
        let mut stalled = Vec::new();
        for _ in 0..200 {
            let slot = slots.admit(from).expect("room made in its own share");
            slot.handle().progressed();
            stalled.retain(|s: &Slot| !s.evicted.is_cancelled());
            stalled.push(slot);
        }
        stalled
    }

    /// With every connection held being served, a newcomer from `from` is refused for
    /// `why`; once all are dropped the table is empty.
    fn refused_while_all_serve(
        slots: &Arc<Slots>,
        held: Vec<Slot>,
        newcomer: Slot,
        from: IpAddr,
        why: Refused,
    ) {
        for slot in held.iter().chain([&newcomer]) {
            slot.handle().serving();
        }
        assert_eq!(slots.admit(from).err(), Some(why));
        drop(held);
        drop(newcomer);
        assert!(slots.lock().entries.is_empty());
    }

    #[test]
    fn an_address_at_its_share_evicts_its_own_stalest_connection() {
        let slots = Slots::new(MAX, PER_IP);
        let held: Vec<_> = (0..PER_IP)
            .map(|_| slots.admit(ip(1)).expect("within the share"))
            .collect();
        // Each sent a partial head (so none is fresh), in order.
        for slot in &held {
            slot.handle().progressed();
        }
        // The oldest is being served, the second made progress just now: the third goes.
        held[0].handle().serving();
        held[1].handle().progressed();
        let newcomer = slots.admit(ip(1)).expect("room made in its own share");
        assert!(held[2].evicted.is_cancelled());
        assert_eq!(held.iter().filter(|s| s.evicted.is_cancelled()).count(), 1);
        assert!(slots.admit(ip(2)).is_ok(), "another address is unaffected");
        // All of the address's connections being served: a newcomer is refused.
        refused_while_all_serve(&slots, held, newcomer, ip(1), Refused::PerIp);
    }

    #[test]
    fn a_full_table_evicts_the_connection_stalled_longest_not_the_oldest() {
        let slots = Slots::new(MAX, PER_IP);
        let held: Vec<_> = (0..MAX)
            .map(|i| slots.admit(ip(1 + i as u32)).expect("room"))
            .collect();
        // Each sent its first bytes (so none is fresh); then everyone but #5 makes
        // progress again (a probe's handshake; stalled ones do not).
        for slot in &held {
            slot.handle().progressed();
        }
        for (i, slot) in held.iter().enumerate() {
            if i != 5 {
                slot.handle().progressed();
            }
        }
        let newcomer = slots.admit(ip(1000)).expect("room made by eviction");
        assert!(held[5].evicted.is_cancelled());
        // An address holding two places loses one first, though others are staler.
        let second = slots.admit(ip(7)).expect("room made by eviction");
        let third = slots.admit(ip(2000)).expect("room made by eviction");
        assert!(held[6].evicted.is_cancelled(), "ip 7 held two");
        assert!(!second.evicted.is_cancelled() && !third.evicted.is_cancelled());
        drop((second, third));
        assert_eq!(held.iter().filter(|s| s.evicted.is_cancelled()).count(), 3);
        // Every connection serving: a newcomer is refused at once.
        refused_while_all_serve(&slots, held, newcomer, ip(1001), Refused::Full);
    }

    #[test]
    fn a_connection_echod_answered_outlives_stalled_newcomers_of_its_address_within_the_grace() {
        let slots = Slots::new(MAX, PER_IP);
        let probe = slots.admit(ip(1)).expect("room");
        // Its ClientHello was read and the server flight written: protected.
        probe.handle().progressed();
        probe.handle().wrote();
        // Stalled hellos from the same address, each replaced at once when evicted:
        // every one of them read its bytes after the probe's last progress.
        let stalled = stalled_newcomers(&slots, ip(1));
        assert!(!probe.evicted.is_cancelled(), "the probe was evicted");
        assert_eq!(stalled.len(), PER_IP - 1);
        // Once the grace has passed without progress, the probe is a candidate again
        // (the stalest one).
        {
            let mut table = slots.lock();
            let id = probe.handle().id;
            let entry = table.entries.get_mut(&id).expect("still in the table");
            entry.progressed_at = Instant::now().checked_sub(GRACE).expect("clock");
        }
        let _last = slots.admit(ip(1)).expect("room");
        assert!(probe.evicted.is_cancelled(), "the grace never ends");
    }

    #[test]
    fn a_client_that_sent_nothing_yet_outlives_stalled_newcomers_within_the_grace() {
        let slots = Slots::new(MAX, PER_IP);
        // curl: connected, its ClientHello not sent yet.
        let probe = slots.admit(ip(1)).expect("room");
        let _stalled = stalled_newcomers(&slots, ip(1));
        assert!(
            !probe.evicted.is_cancelled(),
            "the fresh connection was evicted"
        );
        // Fresh ones go before protected ones.
        let answered = slots.admit(ip(2)).expect("room");
        answered.handle().wrote();
        let fresh = slots.admit(ip(2)).expect("room");
        let others: Vec<_> = (2..PER_IP)
            .map(|_| slots.admit(ip(2)).expect("room"))
            .collect();
        for slot in &others {
            slot.handle().wrote();
        }
        let _newcomer = slots.admit(ip(2)).expect("room");
        assert!(fresh.evicted.is_cancelled() && !answered.evicted.is_cancelled());
    }
}
