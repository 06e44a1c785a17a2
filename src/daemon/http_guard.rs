//! What guards the HTTP endpoint: its web configuration (`metrics.web_config_file`,
//! loaded and checked by [`crate::config::web`]) at work as the TLS acceptor and basic
//! auth.
//!
//! bcrypt is slow on purpose (tens of milliseconds at cost 10), and Prometheus sends
//! the same credentials with every scrape: a successful verification is remembered,
//! keyed by a SHA-256 of the user, the stored hash and the password, so the next
//! scrape costs a hash, not a bcrypt. The hash being part of the key means a reload
//! that changes a password can never be answered from the cache (and a reload that
//! changes anything starts a new cache anyway). Every bcrypt runs on a blocking
//! thread, one at a time for the whole process, so a client guessing passwords cannot
//! take CPU from the echo workers; and the work is bounded: a failed credential is
//! remembered (sent again, it is refused without a bcrypt), at most [`MAX_QUEUED`]
//! checks wait or run (more are answered 429 at once), and an address that failed
//! lately may only join a short queue, so a scraper with the right password is not
//! stuck behind a flood of guesses. An unknown user costs a bcrypt too, so timing does
//! not tell which users exist.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hyper::header::HeaderValue;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::limits::canonical_ip;
use super::logging::RateLimitedLog;
use crate::config::WebConfig;

static AUTH_FAILED_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));

/// One bcrypt at a time in the whole process.
static BCRYPT_SLOT: Semaphore = Semaphore::const_new(1);

/// Verified credentials remembered at most; a full cache starts over (only correct
/// passwords get in, so only the few real clients fill it).
const MAX_CACHED: usize = 256;
/// Failed credentials (and addresses that failed) remembered at most; a full cache
/// starts over.
const MAX_FAILURES_CACHED: usize = 4096;
/// Password checks waiting or running at most; a request beyond is answered 429 at
/// once, so a flood of guesses costs a bounded queue, never a wait of minutes.
const MAX_QUEUED: usize = 8;
/// Of those, the most an address that failed a check lately (or has one queued) may
/// find queued and still join: guessers hold at most two places once they are known,
/// and a scraper from a clean address finds places left.
const MAX_QUEUED_SUSPECT: usize = 2;
/// How long an address that failed a check counts as suspect.
const SUSPECT_FOR: Duration = Duration::from_secs(60);

/// What the endpoint enforces now; replaced whole on a reload that changes the file.
pub(crate) struct WebEndpoint {
    /// The file this was built from (`None`: plain, open HTTP).
    source: Option<Arc<WebConfig>>,
    tls: Option<TlsAcceptor>,
    auth: Option<BasicAuth>,
}

impl WebEndpoint {
    /// The endpoint `config` describes; logs what it turns on.
    pub(crate) fn new(config: Option<Arc<WebConfig>>) -> Self {
        let Some(web) = config else {
            return Self {
                source: None,
                tls: None,
                auth: None,
            };
        };
        info!(file = %web.path.display(), "metrics web config: {}", web.summary());
        if web.tls.is_none() && !web.basic_auth_users.is_empty() {
            warn!(
                file = %web.path.display(),
                "basic auth without tls_server_config: passwords cross the network in clear text"
            );
        }
        Self {
            tls: web
                .tls
                .as_ref()
                .map(|t| TlsAcceptor::from(Arc::clone(&t.server_config))),
            auth: (!web.basic_auth_users.is_empty())
                .then(|| BasicAuth::new(web.basic_auth_users.clone())),
            source: Some(web),
        }
    }

    /// True when `config` is what this endpoint was built from.
    pub(crate) fn is_built_from(&self, config: Option<&Arc<WebConfig>>) -> bool {
        self.source.as_ref() == config
    }

    /// The TLS acceptor, when TLS is on.
    pub(crate) fn tls(&self) -> Option<&TlsAcceptor> {
        self.tls.as_ref()
    }

    /// Whether a request from `peer` carrying `authorization` may see protected paths.
    pub(crate) async fn authorize(
        &self,
        authorization: Option<&HeaderValue>,
        peer: IpAddr,
    ) -> Verdict {
        match &self.auth {
            None => Verdict::Granted,
            Some(auth) => auth.check(authorization, peer).await,
        }
    }
}

/// The outcome of a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Granted,
    Denied,
    /// Not checked: the checks waiting are at their bound (try again later).
    Busy,
}

/// Basic auth against bcrypt hashes, with a cache of verified credentials and one of
/// failed ones.
struct BasicAuth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<[u8; 32]>>,
    failures: Mutex<Failures>,
}

/// Recent failures: the credentials (a wrong password sent again is refused without a
/// bcrypt) and the addresses they came from (which get a smaller share of the queue).
#[derive(Default)]
struct Failures {
    keys: HashSet<[u8; 32]>,
    addresses: HashMap<IpAddr, Instant>,
    /// Checks queued per address now: an address with one queued is a suspect too.
    queued: HashMap<IpAddr, usize>,
}

/// Password checks waiting or running in the whole process (one runs at a time).
static QUEUED: AtomicUsize = AtomicUsize::new(0);

/// One place in a password-check queue; dropping it gives the place back.
struct Ticket(&'static AtomicUsize);

impl Ticket {
    /// A place in `queue` when fewer than `bound` checks are in it.
    fn take(queue: &'static AtomicUsize, bound: usize) -> Option<Self> {
        queue
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < bound).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(queue))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a check cost, for tests.
#[cfg(test)]
static BCRYPT_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> Self {
        Self {
            users,
            verified: Mutex::new(HashSet::new()),
            failures: Mutex::new(Failures::default()),
        }
    }

    async fn check(&self, authorization: Option<&HeaderValue>, peer: IpAddr) -> Verdict {
        let Some((user, password)) = authorization.and_then(credentials) else {
            return Verdict::Denied;
        };
        let known = self.users.get(&user);
        // An unknown user is checked against some hash all the same (timing).
        let Some(hash) = known.or_else(|| self.users.values().next()) else {
            return Verdict::Denied;
        };
        let key = cache_key(&user, hash, &password);
        if known.is_some() && lock(&self.verified).contains(&key) {
            return Verdict::Granted;
        }
        let peer = canonical_ip(peer);
        let ticket = {
            let mut failures = lock(&self.failures);
            if failures.keys.contains(&key) {
                return Verdict::Denied;
            }
            let suspect = failures.queued.contains_key(&peer)
                || failures
                    .addresses
                    .get(&peer)
                    .is_some_and(|at| at.elapsed() < SUSPECT_FOR);
            let bound = if suspect {
                MAX_QUEUED_SUSPECT
            } else {
                MAX_QUEUED
            };
            let Some(ticket) = Ticket::take(&QUEUED, bound) else {
                return Verdict::Busy;
            };
            *failures.queued.entry(peer).or_insert(0) += 1;
            ticket
        };
        let in_queue = InQueue { auth: self, peer };
        let checked = verify(password, hash.clone(), ticket).await;
        drop(in_queue);
        let ok = checked && known.is_some();
        if ok {
            let mut verified = lock(&self.verified);
            if verified.len() >= MAX_CACHED {
                verified.clear();
            }
            verified.insert(key);
            return Verdict::Granted;
        }
        let mut failures = lock(&self.failures);
        if failures.keys.len() >= MAX_FAILURES_CACHED {
            failures.keys.clear();
        }
        failures.keys.insert(key);
        if failures.addresses.len() >= MAX_FAILURES_CACHED {
            failures.addresses.clear();
        }
        failures.addresses.insert(peer, Instant::now());
        drop(failures);
        if let Some(suppressed) = AUTH_FAILED_LOG.allow() {
            warn!(user = ?user, %peer, suppressed, "HTTP basic auth failed");
        }
        Verdict::Denied
    }
}

/// An address's check in the queue, counted until it is done or given up.
struct InQueue<'a> {
    auth: &'a BasicAuth,
    peer: IpAddr,
}

impl Drop for InQueue<'_> {
    fn drop(&mut self) {
        let mut failures = lock(&self.auth.failures);
        if let Some(n) = failures.queued.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                failures.queued.remove(&self.peer);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs bcrypt on a blocking thread, one at a time; the queue place is held until the
/// bcrypt has run, even when the request that asked for it is gone.
async fn verify(password: Vec<u8>, hash: String, ticket: Ticket) -> bool {
    let Ok(slot) = BCRYPT_SLOT.acquire().await else {
        return false;
    };
    #[cfg(test)]
    BCRYPT_RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tokio::task::spawn_blocking(move || {
        let _held = (slot, ticket);
        bcrypt::verify(password, &hash).unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// SHA-256 over the user, the stored hash and the password, each length-prefixed.
fn cache_key(user: &str, hash: &str, password: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [user.as_bytes(), hash.as_bytes(), password] {
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// `Basic base64(user:password)` → (user, password); `None` for anything else.
fn credentials(header: &HeaderValue) -> Option<(String, Vec<u8>)> {
    let value = header.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn basic(user: &str, password: &str) -> HeaderValue {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {token}")).unwrap()
    }

    #[test]
    fn credentials_parse_basic_only() {
        assert_eq!(
            credentials(&basic("alice", "pa:ss")),
            Some(("alice".into(), b"pa:ss".to_vec()))
        );
        assert_eq!(
            credentials(&HeaderValue::from_static("bAsIc YWxpY2U6eA==")),
            Some(("alice".into(), b"x".to_vec()))
        );
        assert_eq!(credentials(&HeaderValue::from_static("Bearer abc")), None);
        assert_eq!(credentials(&HeaderValue::from_static("Basic !!!")), None);
        // No colon: not user:password.
        assert_eq!(
            credentials(&HeaderValue::from_static("Basic YWxpY2U=")),
            None
        );
    }

    /// A scrape every second costs one bcrypt, then none; a wrong password is never
    /// cached, and the cache never answers for another user or hash.
    #[test]
    fn a_verified_password_is_cached_and_a_wrong_one_never() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let hash = bcrypt::hash("secret", 4).unwrap();
            let auth = BasicAuth::new(BTreeMap::from([("alice".to_string(), hash)]));
            let peer = IpAddr::from([127, 0, 0, 1]);
            let check = |user, password| {
                let header = basic(user, password);
                let auth = &auth;
                async move { auth.check(Some(&header), peer).await }
            };
            let runs = || BCRYPT_RUNS.load(Ordering::Relaxed);
            let before = runs();
            assert_eq!(check("alice", "secret").await, Verdict::Granted);
            assert_eq!(runs(), before + 1);
            for _ in 0..10 {
                assert_eq!(check("alice", "secret").await, Verdict::Granted);
            }
            assert_eq!(runs(), before + 1, "cached: no more bcrypt");
            for wrong in ["wrong1", "wrong2", "wrong3"] {
                assert_eq!(check("alice", wrong).await, Verdict::Denied);
            }
            assert_eq!(runs(), before + 4, "a new wrong password costs a bcrypt");
            assert_eq!(check("alice", "wrong1").await, Verdict::Denied);
            assert_eq!(runs(), before + 4, "a failed one sent again costs none");
            // An unknown user with alice's password: a bcrypt, and refused.
            assert_eq!(check("mallory", "secret").await, Verdict::Denied);
            assert_eq!(runs(), before + 5);
            assert_eq!(auth.check(None, peer).await, Verdict::Denied);
            assert_eq!(runs(), before + 5, "no credentials: nothing to verify");
        });
    }

    /// The queue bound: an address that failed lately finds it full sooner than a
    /// clean one, and a full queue answers Busy without running a bcrypt.
    #[test]
    fn a_full_queue_answers_busy_and_a_suspect_address_gets_a_short_queue() {
        static QUEUE: AtomicUsize = AtomicUsize::new(0);
        let held: Vec<Ticket> = (0..MAX_QUEUED_SUSPECT)
            .map(|_| Ticket::take(&QUEUE, MAX_QUEUED).expect("room"))
            .collect();
        assert!(
            Ticket::take(&QUEUE, MAX_QUEUED_SUSPECT).is_none(),
            "short queue full"
        );
        let more: Vec<Ticket> = (MAX_QUEUED_SUSPECT..MAX_QUEUED)
            .map(|_| Ticket::take(&QUEUE, MAX_QUEUED).expect("room for clean addresses"))
            .collect();
        assert!(Ticket::take(&QUEUE, MAX_QUEUED).is_none(), "queue full");
        drop(more);
        drop(held);
        assert!(
            Ticket::take(&QUEUE, MAX_QUEUED_SUSPECT).is_some(),
            "places given back"
        );
    }

    #[test]
    fn the_cache_key_binds_user_hash_and_password() {
        let k = cache_key("alice", "$2y$h", b"pw");
        assert_ne!(k, cache_key("alice", "$2y$other", b"pw"));
        assert_ne!(k, cache_key("alic", "e$2y$h", b"pw"));
        assert_ne!(k, cache_key("alice", "$2y$h", b"pw2"));
        assert_eq!(k, cache_key("alice", "$2y$h", b"pw"));
    }
}
