//! Limits that protect the daemon and others from abusive peers.
//!
//! [`ConnectionLimiter`] bounds open connections globally and per source address
//! (xinetd's `instances` and `per_source`) — the echo listeners' and, with its own
//! limits, the HTTP endpoint's, so both count the same way; [`RateLimiter`] bounds UDP replies per
//! source with token buckets in a table of bounded size, so a spoofed flood from
//! millions of addresses costs bounded memory and constant time per datagram — and, in
//! the connection limiter, new TCP connections per client address (`tcp.connection_rate`,
//! xinetd's `cps` per address). Both take new limits live on reload.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::reasons::RejectReason;
use crate::config::{RateLimitConfig, TcpConfig};

/// Canonical form of a peer address: a v4-mapped IPv6 address counts as its IPv4 self,
/// so a dual-stack listener cannot double a client's allowance.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What a [`RateLimiter`] keeps a bucket for: a source address, or a source address
/// and port.
pub(crate) trait RateKey: Copy + Eq + Hash + std::fmt::Debug {
    /// The key in canonical form (a v4-mapped address as its IPv4 self).
    fn canonical(self) -> Self;
}

impl RateKey for IpAddr {
    fn canonical(self) -> Self {
        canonical_ip(self)
    }
}

impl RateKey for SocketAddr {
    fn canonical(self) -> Self {
        SocketAddr::new(canonical_ip(self.ip()), self.port())
    }
}

/// Counts open connections over every listener of one kind (TCP echo, or HTTP).
#[derive(Debug)]
pub(crate) struct ConnectionLimiter {
    max: AtomicUsize,
    max_per_ip: AtomicUsize,
    active: AtomicUsize,
    /// Open connections per source address, in shards by address: accepts and closes
    /// on different worker threads take different locks, not one for the process.
    per_ip: Box<[Mutex<HashMap<IpAddr, usize>>]>,
    /// New connections per client address (`tcp.connection_rate`); off for the HTTP
    /// endpoint.
    rate: Arc<RateLimiter>,
}

/// Shards of the per-address table; a power of two.
const PER_IP_SHARDS: usize = 64;

/// One admitted connection; dropping it frees its slots.
#[derive(Debug)]
pub(crate) struct Permit {
    limiter: Arc<ConnectionLimiter>,
    ip: IpAddr,
}

impl ConnectionLimiter {
    /// A limiter with the configured limits.
    pub(crate) fn new(config: &TcpConfig) -> Arc<Self> {
        let limiter = Self::with_limits(config.max_connections, config.per_ip_limit());
        limiter.rate.update(&config.connection_rate.as_rate_limit());
        limiter
    }

    /// A limiter with fixed limits (the HTTP endpoint's).
    pub(crate) fn with_limits(max: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max: AtomicUsize::new(max),
            max_per_ip: AtomicUsize::new(max_per_ip),
            active: AtomicUsize::new(0),
            per_ip: (0..PER_IP_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            rate: RateLimiter::new(&RateLimitConfig {
                packets_per_second: 0,
                burst: 1,
                max_sources: 1,
            }),
        })
    }

    /// The shard of the per-address table that holds `ip`.
    fn per_ip(&self, ip: IpAddr) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        let mut hasher = std::hash::DefaultHasher::new();
        ip.hash(&mut hasher);
        let shard = hasher.finish() as usize & (PER_IP_SHARDS - 1);
        self.per_ip[shard].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies reloaded limits; open connections above a lowered limit are left alone.
    pub(crate) fn update(&self, config: &TcpConfig) {
        self.max.store(config.max_connections, Ordering::Relaxed);
        self.max_per_ip
            .store(config.per_ip_limit(), Ordering::Relaxed);
        self.rate.update(&config.connection_rate.as_rate_limit());
    }

    /// Whether a new connection from the client at `ip` may be considered at all: its
    /// address is admitted by `tcp.allow`/`tcp.deny`, and it takes a token of its
    /// address's `tcp.connection_rate` bucket (a refused connection takes none).
    pub(crate) fn screen(&self, config: &TcpConfig, ip: IpAddr) -> Result<(), RejectReason> {
        if !config.admits(ip) {
            return Err(RejectReason::Denied);
        }
        if !self.rate.allows(ip) {
            return Err(RejectReason::ConnectionRate);
        }
        Ok(())
    }

    /// Open connections right now.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// True when `ip` holds its whole share of connections.
    pub(crate) fn is_at_share(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        let held = self.per_ip(ip).get(&ip).copied().unwrap_or(0);
        held >= self.max_per_ip.load(Ordering::Relaxed)
    }

    /// Admits a connection from `ip`, or says which limit refused it.
    pub(crate) fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, RejectReason> {
        let ip = canonical_ip(ip);
        let max = self.max.load(Ordering::Relaxed);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| RejectReason::GlobalLimit)?;
        let max_per_ip = self.max_per_ip.load(Ordering::Relaxed);
        let mut per_ip = self.per_ip(ip);
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= max_per_ip {
            if *count == 0 {
                per_ip.remove(&ip);
            }
            drop(per_ip);
            self.active.fetch_sub(1, Ordering::AcqRel);
            return Err(RejectReason::PerIpLimit);
        }
        *count += 1;
        Ok(Permit {
            limiter: Arc::clone(self),
            ip,
        })
    }
}

impl ConnectionLimiter {
    /// Counts a connection an earlier image of this process accepted and handed over,
    /// or one admitted in place of a connection being evicted: no limit refuses it
    /// (like a reload lowering a limit), the count is over only until the victim closes.
    pub(crate) fn adopt(self: &Arc<Self>, ip: IpAddr) -> Permit {
        let ip = canonical_ip(ip);
        self.active.fetch_add(1, Ordering::AcqRel);
        *self.per_ip(ip).entry(ip).or_insert(0) += 1;
        Permit {
            limiter: Arc::clone(self),
            ip,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut per_ip = self.limiter.per_ip(self.ip);
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
        drop(per_ip);
        self.limiter.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// Full again by `now`: the source behaves exactly like a new one, so forgetting it
    /// loses nothing.
    fn refilled(&self, now: Instant, rate: f64, burst: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * rate >= burst
    }
}

/// Tracked sources looked at, at most, when a new source finds the table full: the cost
/// of a datagram stays constant however large the table is.
const EVICTION_PROBES: usize = 4;

/// The buckets, and every tracked source once in `order`, which a clock hand walks round:
/// a new source that finds the table full examines the next [`EVICTION_PROBES`] sources,
/// forgets those that have refilled and sends the others to the back. The periodic
/// [`RateLimiter::sweep`] forgets every refilled source once a second.
#[derive(Debug)]
struct RateTable<K> {
    config: RateLimitConfig,
    buckets: HashMap<K, Bucket>,
    order: VecDeque<K>,
}

/// Per-source token buckets for UDP replies, shared by every UDP socket.
#[derive(Debug)]
pub(crate) struct RateLimiter<K = IpAddr> {
    table: Mutex<RateTable<K>>,
    /// `packets_per_second = 0`, read without the lock: a limiter that is off costs a
    /// datagram neither the lock nor a clock read.
    off: AtomicBool,
}

impl<K: RateKey> RateLimiter<K> {
    /// A limiter with the configured rate.
    pub(crate) fn new(config: &RateLimitConfig) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(RateTable {
                config: config.clone(),
                buckets: HashMap::new(),
                order: VecDeque::new(),
            }),
            off: AtomicBool::new(config.packets_per_second == 0),
        })
    }

    /// Applies a reloaded rate; existing buckets keep their tokens (capped to the new burst).
    pub(crate) fn update(&self, config: &RateLimitConfig) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.config = config.clone();
        self.off
            .store(config.packets_per_second == 0, Ordering::Relaxed);
        let burst = f64::from(config.burst);
        for b in t.buckets.values_mut() {
            b.tokens = b.tokens.min(burst);
        }
    }

    /// Takes one token for `key` now, unless the limiter is off; false means "do not
    /// reply".
    pub(crate) fn allows(&self, key: K) -> bool {
        self.off.load(Ordering::Relaxed) || self.allow(key, Instant::now())
    }

    /// Takes one token for `ip`; false means "do not reply". Constant time: a full
    /// table costs at most [`EVICTION_PROBES`] look-ups more, never a scan.
    pub(crate) fn allow(&self, key: K, now: Instant) -> bool {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let rate = f64::from(t.config.packets_per_second);
        if rate == 0.0 {
            return true;
        }
        let burst = f64::from(t.config.burst);
        let ip = key.canonical();
        let is_new = !t.buckets.contains_key(&ip);
        if is_new {
            if t.buckets.len() >= t.config.max_sources {
                t.evict_some(now);
                if t.buckets.len() >= t.config.max_sources {
                    return false;
                }
            }
            t.order.push_back(ip);
        }
        let b = t.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets sources whose buckets have refilled: they behave exactly like new ones,
    /// so dropping them loses nothing. Called periodically (a scan of the table, once a
    /// second); returns the sources still tracked (for the table-size gauge).
    pub(crate) fn sweep(&self, now: Instant) -> usize {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.evict_all(now);
        t.buckets.len()
    }
}

impl<K: RateKey> RateTable<K> {
    /// Moves the clock hand over at most [`EVICTION_PROBES`] sources, forgetting the
    /// refilled ones; returns how many it examined.
    fn evict_some(&mut self, now: Instant) -> usize {
        let rate = f64::from(self.config.packets_per_second);
        let burst = f64::from(self.config.burst);
        let probes = EVICTION_PROBES.min(self.order.len());
        for _ in 0..probes {
            let Some(ip) = self.order.pop_front() else {
                break;
            };
            match self.buckets.get(&ip) {
                Some(b) if !b.refilled(now, rate, burst) => self.order.push_back(ip),
                _ => {
                    self.buckets.remove(&ip);
                }
            }
        }
        probes
    }

    fn evict_all(&mut self, now: Instant) {
        let rate = f64::from(self.config.packets_per_second);
        let burst = f64::from(self.config.burst);
        if rate == 0.0 {
            self.buckets.clear();
            self.order.clear();
            return;
        }
        self.buckets.retain(|_, b| !b.refilled(now, rate, burst));
        let buckets = &self.buckets;
        self.order.retain(|ip| buckets.contains_key(ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tcp(max: usize, per_ip: usize) -> TcpConfig {
        TcpConfig {
            max_connections: max,
            max_connections_per_ip: Some(per_ip),
            ..TcpConfig::default()
        }
    }

    #[test]
    fn per_ip_and_global_limits_free_slots_on_drop() {
        let limiter = ConnectionLimiter::new(&tcp(3, 2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let p1 = limiter.try_acquire(a).unwrap();
        let _p2 = limiter.try_acquire(a).unwrap();
        assert_eq!(
            limiter.try_acquire(a).unwrap_err(),
            RejectReason::PerIpLimit
        );
        let _p3 = limiter.try_acquire(b).unwrap();
        assert_eq!(
            limiter
                .try_acquire("10.0.0.2".parse().unwrap())
                .unwrap_err(),
            RejectReason::GlobalLimit
        );
        drop(p1);
        assert_eq!(limiter.active(), 2);
        assert!(limiter.try_acquire(a).is_ok());
    }

    #[test]
    fn screening_denies_then_rate_limits_per_address_and_reloads() {
        let mut config = TcpConfig {
            deny: vec!["10.0.0.3".parse().unwrap()],
            ..TcpConfig::default()
        };
        config.connection_rate.per_second = 1;
        config.connection_rate.burst = 2;
        let limiter = ConnectionLimiter::new(&config);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            limiter.screen(&config, "10.0.0.3".parse().unwrap()),
            Err(RejectReason::Denied)
        );
        assert_eq!(limiter.screen(&config, a), Ok(()));
        assert_eq!(limiter.screen(&config, a), Ok(()));
        assert_eq!(
            limiter.screen(&config, a),
            Err(RejectReason::ConnectionRate)
        );
        assert_eq!(
            limiter.screen(&config, "10.0.0.2".parse().unwrap()),
            Ok(()),
            "a bucket per address"
        );
        config.connection_rate.per_second = 0;
        limiter.update(&config);
        assert_eq!(limiter.screen(&config, a), Ok(()), "off after a reload");
        let http = ConnectionLimiter::with_limits(64, 8);
        assert!((0..100).all(|_| http.screen(&TcpConfig::default(), a).is_ok()));
    }

    #[test]
    fn token_bucket_caps_and_refills_and_table_is_bounded() {
        let limiter = RateLimiter::new(&RateLimitConfig {
            packets_per_second: 10,
            burst: 5,
            max_sources: 2,
        });
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let allowed = (0..20).filter(|_| limiter.allow(a, t0)).count();
        assert_eq!(allowed, 5);
        assert!(limiter.allow(a, t0 + Duration::from_millis(150)));
        assert!(limiter.allow("10.0.0.2".parse().unwrap(), t0));
        assert!(
            !limiter.allow("10.0.0.3".parse().unwrap(), t0),
            "table full of active sources refuses new ones"
        );
        let later = t0 + Duration::from_secs(5);
        assert_eq!(limiter.sweep(later), 0);
        assert!(limiter.allow("10.0.0.3".parse().unwrap(), later));
    }

    #[test]
    fn a_full_table_finds_a_refilled_source_a_few_probes_at_a_time() {
        const TABLE: u32 = 1_000;
        let limiter = RateLimiter::new(&RateLimitConfig {
            packets_per_second: 1,
            burst: 2,
            max_sources: TABLE as usize,
        });
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let t0 = Instant::now();
        for i in 0..TABLE {
            assert!(limiter.allow(ip(i), t0));
        }
        // A second later every source but the newest (last in the clock's order) has
        // spent another token: only that one has refilled.
        let t1 = t0 + Duration::from_secs(1);
        for i in 0..TABLE - 1 {
            assert!(limiter.allow(ip(i), t1));
        }
        assert!(
            !limiter.allow(ip(TABLE), t1),
            "table full of active sources"
        );
        let mut table = limiter.table.lock().unwrap();
        let mut calls = 1;
        while table.buckets.len() == TABLE as usize {
            let examined = table.evict_some(t1);
            assert!(examined <= EVICTION_PROBES, "examined {examined}");
            calls += 1;
            assert!(calls <= TABLE as usize, "never found the refilled source");
        }
        assert!(!table.buckets.contains_key(&ip(TABLE - 1)));
        assert_eq!(table.order.len(), table.buckets.len());
        drop(table);
        // One call per EVICTION_PROBES sources: the hand went round once.
        assert!(
            calls <= TABLE as usize / EVICTION_PROBES + 1,
            "{calls} calls"
        );
        assert!(limiter.allow(ip(TABLE), t1), "room for a new source again");
    }

    /// Times `calls` calls of `allow` for sources never seen before; the best of three
    /// runs, so a preempted run on a busy machine does not decide the result. Gives up
    /// when one run takes longer than `limit`, with the calls done by then.
    fn time_new_sources(
        limiter: impl Fn() -> Arc<RateLimiter>,
        calls: u32,
        expect: bool,
        limit: Duration,
    ) -> Result<Duration, u32> {
        let now = Instant::now();
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let limiter = limiter();
            let started = Instant::now();
            for i in 0..calls {
                let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i));
                assert_eq!(limiter.allow(ip, now), expect);
                if i % 1024 == 0 && started.elapsed() > limit {
                    return Err(i);
                }
            }
            best = best.min(started.elapsed());
        }
        Ok(best)
    }

    #[test]
    fn a_full_table_costs_no_more_per_new_source_than_an_empty_one() {
        const TABLE: u32 = 16_384;
        const CALLS: u32 = 100_000;
        let config = |max_sources| RateLimitConfig {
            packets_per_second: 1,
            burst: 10,
            max_sources,
        };
        // Baseline: every call admits a new source into a table with room for all.
        let empty = time_new_sources(
            || RateLimiter::new(&config((CALLS + TABLE) as usize)),
            CALLS,
            true,
            Duration::from_secs(60),
        )
        .expect("baseline finished");
        // A table full of active sources (each has just spent a token): every new
        // source is refused, and that must not cost a scan of the table.
        let full_table = || {
            let limiter = RateLimiter::new(&config(TABLE as usize));
            let now = Instant::now();
            for i in 0..TABLE {
                assert!(
                    limiter.allow(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)), now)
                );
            }
            limiter
        };
        let limit = empty * 20;
        let full = match time_new_sources(full_table, CALLS, false, limit) {
            Ok(full) => full,
            Err(done) => panic!(
                "full table: only {done} of {CALLS} new sources in {limit:?} (20x the \
                 empty-table time, {empty:?}): {:?} per call",
                limit / done.max(1)
            ),
        };
        let ratio = full.as_secs_f64() / empty.as_secs_f64();
        eprintln!(
            "{CALLS} new sources: empty table {empty:?}, full table {full:?}, ratio {ratio:.2}"
        );
        assert!(ratio < 3.0, "full table costs {ratio:.2}x an empty one");
    }
}
