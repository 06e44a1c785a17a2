//! TLS kit for the tests of `metrics.web_config_file`: the test PKI (`pki.rs`), web
//! config files written with it, bcrypt hashes, and a small blocking HTTPS client on
//! rustls.
//!
//! Included (by `#[path]`) by the test modules that use it, in the `daemon` and
//! `deployment` crates.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

#[path = "pki.rs"]
mod pki;
pub use pki::Pki;

use crate::support::{Daemon, HttpResponse, Options, request_head, wait_for};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

impl Pki {
    /// Writes `name` in the PKI's directory (the CA file's) and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.ca.with_file_name(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A web config file serving `cert`/`key` with `extra_tls` lines in
    /// `tls_server_config` and `users` (name, password) as bcrypt hashes.
    pub fn web_config(&self, name: &str, extra_tls: &str, users: &[(&str, &str)]) -> PathBuf {
        let mut yaml = format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            self.cert.display(),
            self.key.display()
        );
        for line in extra_tls.lines().filter(|l| !l.trim().is_empty()) {
            yaml.push_str(&format!("  {}\n", line.trim()));
        }
        yaml.push_str(&users_yaml(users));
        self.write(name, &yaml)
    }
}

/// `basic_auth_users:` with a bcrypt hash (cost 4: tests need speed, not strength) per
/// (user, password).
pub fn users_yaml(users: &[(&str, &str)]) -> String {
    if users.is_empty() {
        return String::new();
    }
    let mut yaml = "basic_auth_users:\n".to_string();
    for (user, password) in users {
        yaml.push_str(&format!("  {user}: '{}'\n", bcrypt_hash(password)));
    }
    yaml
}

/// A bcrypt hash of `password` at the lowest cost.
pub fn bcrypt_hash(password: &str) -> String {
    bcrypt::hash(password, 4).unwrap()
}

/// A blocking HTTPS client that trusts one CA, with or without a client certificate.
pub struct HttpsClient {
    config: Arc<rustls::ClientConfig>,
}

impl HttpsClient {
    /// Trusts the certificates in `ca` (PEM); presents no client certificate.
    pub fn new(ca: &Path) -> Self {
        Self::build(ca, None)
    }

    /// Trusts `ca` and presents `cert` with `key`.
    pub fn with_client_cert(ca: &Path, cert: &Path, key: &Path) -> Self {
        Self::build(ca, Some((cert, key)))
    }

    fn build(ca: &Path, identity: Option<(&Path, &Path)>) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(cert)
                        .unwrap()
                        .map(Result::unwrap)
                        .collect(),
                    PrivateKeyDer::from_pem_file(key).unwrap(),
                )
                .unwrap(),
        };
        Self {
            config: Arc::new(config),
        }
    }

    /// GET `path` over TLS (the server name is the IP address), with basic auth when
    /// `auth` is given; the status and body, or the error (a refused handshake among
    /// them).
    pub fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        auth: Option<(&str, &str)>,
    ) -> std::io::Result<(u16, String)> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
        let name = ServerName::IpAddress(addr.ip().into());
        let conn = rustls::ClientConnection::new(Arc::clone(&self.config), name)
            .map_err(std::io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let headers: Vec<String> = auth
            .map(|(user, password)| {
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                format!("Authorization: Basic {token}")
            })
            .into_iter()
            .collect();
        tls.write_all(request_head("GET", path, addr, &headers).as_bytes())?;
        let mut resp = Vec::new();
        tls.read_to_end(&mut resp)?;
        let response = HttpResponse::parse(&String::from_utf8_lossy(&resp))?;
        Ok((response.status, response.body))
    }

    /// Waits (10 s at most) until `GET /readyz` answers 200.
    pub fn wait_ready(&self, addr: SocketAddr) {
        let last = std::cell::RefCell::new(None);
        wait_for(
            Duration::from_secs(10),
            || format!("{addr}: /readyz over TLS never answered 200: {last:?}"),
            || match self.get(addr, "/readyz", None) {
                Ok((200, _)) => Some(()),
                other => {
                    last.replace(Some(other));
                    None
                }
            },
        );
    }
}

/// The `[metrics]` table that serves the endpoint with the web config `web`.
pub fn web_config_toml(web: &Path) -> String {
    format!(
        "[metrics]\nweb_config_file = {:?}\n",
        web.display().to_string()
    )
}

/// echod serving its endpoint with the web config `web`, ready: `client` got 200 from
/// `/readyz`.
pub fn daemon_with_web_config(web: &Path, client: &HttpsClient) -> Daemon {
    let mut daemon = Daemon::start_with(Options {
        toml: &web_config_toml(web),
        no_wait: true,
        ..Options::default()
    });
    daemon.wait_listening();
    client.wait_ready(daemon.http);
    daemon
}
