//! The HTTP endpoint's web configuration at work (`metrics.web_config_file`, loaded and
//! checked by [`crate::config::web`]): the TLS acceptor, and basic auth.
//!
//! bcrypt is slow on purpose (tens of milliseconds at cost 10), and Prometheus sends
//! the same credentials with every scrape: a successful verification is remembered,
//! keyed by a SHA-256 of the user, the stored hash and the password, so the next
//! scrape costs a hash, not a bcrypt. The hash being part of the key means a reload
//! that changes a password can never be answered from the cache (and a reload that
//! changes anything starts a new cache anyway). Failed attempts are never cached, and
//! every bcrypt runs on a blocking thread, one at a time for the whole process: a
//! client guessing passwords gets slow answers but cannot take CPU from the echo
//! workers. An unknown user costs a bcrypt too, so timing does not tell which users
//! exist.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use hyper::header::HeaderValue;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::logging::RateLimitedLog;
use crate::config::WebConfig;

static AUTH_FAILED_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));

/// One bcrypt at a time in the whole process.
static BCRYPT_SLOT: Semaphore = Semaphore::const_new(1);

/// Verified credentials remembered at most; a full cache starts over (only correct
/// passwords get in, so only the few real clients fill it).
const MAX_CACHED: usize = 256;

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

    /// True when a request carrying `authorization` may see protected paths.
    pub(crate) async fn authorize(&self, authorization: Option<&HeaderValue>) -> bool {
        match &self.auth {
            None => true,
            Some(auth) => auth.check(authorization).await,
        }
    }
}

/// Basic auth against bcrypt hashes, with a cache of verified credentials.
struct BasicAuth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<[u8; 32]>>,
}

/// What a check cost, for tests.
#[cfg(test)]
static BCRYPT_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> Self {
        Self {
            users,
            verified: Mutex::new(HashSet::new()),
        }
    }

    async fn check(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some((user, password)) = authorization.and_then(credentials) else {
            return false;
        };
        let known = self.users.get(&user);
        // An unknown user is checked against some hash all the same (timing).
        let Some(hash) = known.or_else(|| self.users.values().next()) else {
            return false;
        };
        let key = cache_key(&user, hash, &password);
        if known.is_some() && self.lock().contains(&key) {
            return true;
        }
        let ok = verify(password, hash.clone()).await && known.is_some();
        if ok {
            let mut verified = self.lock();
            if verified.len() >= MAX_CACHED {
                verified.clear();
            }
            verified.insert(key);
        } else if let Some(suppressed) = AUTH_FAILED_LOG.allow() {
            warn!(user = ?user, suppressed, "HTTP basic auth failed");
        }
        ok
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs bcrypt on a blocking thread, one at a time.
async fn verify(password: Vec<u8>, hash: String) -> bool {
    let Ok(_slot) = BCRYPT_SLOT.acquire().await else {
        return false;
    };
    #[cfg(test)]
    BCRYPT_RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
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
            let runs = || BCRYPT_RUNS.load(Ordering::Relaxed);
            let before = runs();
            assert!(auth.check(Some(&basic("alice", "secret"))).await);
            assert_eq!(runs(), before + 1);
            for _ in 0..10 {
                assert!(auth.check(Some(&basic("alice", "secret"))).await);
            }
            assert_eq!(runs(), before + 1, "cached: no more bcrypt");
            for _ in 0..3 {
                assert!(!auth.check(Some(&basic("alice", "wrong"))).await);
            }
            assert_eq!(
                runs(),
                before + 4,
                "a wrong password costs a bcrypt each time"
            );
            // An unknown user with alice's password: a bcrypt, and refused.
            assert!(!auth.check(Some(&basic("mallory", "secret"))).await);
            assert_eq!(runs(), before + 5);
            assert!(!auth.check(None).await);
            assert_eq!(runs(), before + 5, "no credentials: nothing to verify");
        });
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
