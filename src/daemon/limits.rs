//! Limits that protect the daemon and others from abusive peers.
//!
//! [`ConnectionLimiter`] bounds open TCP connections globally and per source address
//! (xinetd's `instances` and `per_source`); [`RateLimiter`] bounds UDP replies per
//! source with token buckets in a table of bounded size, so a spoofed flood from
//! millions of addresses costs bounded memory. Both take new limits live on reload.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

/// Counts open TCP connections over every listener.
#[derive(Debug)]
pub(crate) struct ConnectionLimiter {
    max: AtomicUsize,
    max_per_ip: AtomicUsize,
    active: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; dropping it frees its slots.
#[derive(Debug)]
pub(crate) struct Permit {
    limiter: Arc<ConnectionLimiter>,
    ip: IpAddr,
}

impl ConnectionLimiter {
    /// A limiter with the configured limits.
    pub(crate) fn new(config: &TcpConfig) -> Arc<Self> {
        Arc::new(Self {
            max: AtomicUsize::new(config.max_connections),
            max_per_ip: AtomicUsize::new(config.per_ip_limit()),
            active: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Applies reloaded limits; open connections above a lowered limit are left alone.
    pub(crate) fn update(&self, config: &TcpConfig) {
        self.max.store(config.max_connections, Ordering::Relaxed);
        self.max_per_ip
            .store(config.per_ip_limit(), Ordering::Relaxed);
    }

    /// Open connections right now.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
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
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
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

impl Drop for Permit {
    fn drop(&mut self) {
        let mut per_ip = self
            .limiter
            .per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner());
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

#[derive(Debug)]
struct RateTable {
    config: RateLimitConfig,
    buckets: HashMap<IpAddr, Bucket>,
}

/// Per-source token buckets for UDP replies, shared by every UDP socket.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    table: Mutex<RateTable>,
}

impl RateLimiter {
    /// A limiter with the configured rate.
    pub(crate) fn new(config: &RateLimitConfig) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(RateTable {
                config: config.clone(),
                buckets: HashMap::new(),
            }),
        })
    }

    /// Applies a reloaded rate; existing buckets keep their tokens (capped to the new burst).
    pub(crate) fn update(&self, config: &RateLimitConfig) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.config = config.clone();
        let burst = f64::from(config.burst);
        for b in t.buckets.values_mut() {
            b.tokens = b.tokens.min(burst);
        }
    }

    /// Takes one token for `ip`; false means "do not reply".
    pub(crate) fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let rate = f64::from(t.config.packets_per_second);
        if rate == 0.0 {
            return true;
        }
        let burst = f64::from(t.config.burst);
        let ip = canonical_ip(ip);
        if !t.buckets.contains_key(&ip) && t.buckets.len() >= t.config.max_sources {
            t.evict_full(now);
            if t.buckets.len() >= t.config.max_sources {
                return false;
            }
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
    /// so dropping them loses nothing. Called periodically; returns the sources still
    /// tracked (for the table-size gauge).
    pub(crate) fn sweep(&self, now: Instant) -> usize {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.evict_full(now);
        t.buckets.len()
    }
}

impl RateTable {
    fn evict_full(&mut self, now: Instant) {
        let rate = f64::from(self.config.packets_per_second);
        let burst = f64::from(self.config.burst);
        if rate == 0.0 {
            self.buckets.clear();
            return;
        }
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens + elapsed * rate < burst
        });
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
}
