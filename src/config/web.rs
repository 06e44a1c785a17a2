//! The web configuration file of the Prometheus exporters (exporter-toolkit's
//! `--web.config.file`), named by `metrics.web_config_file`: TLS for the HTTP endpoint
//! and the users basic auth lets in.
//!
//! The file is read and checked completely here — the YAML, every user's bcrypt hash,
//! the certificate, its key and the client CA, turned into a ready `rustls` server
//! configuration — so `echod check-config`, start-up and a reload refuse a bad file
//! the same way, before anything is served with it. Paths inside it are relative to
//! the file's own directory, as in exporter-toolkit.
//!
//! The format is exporter-toolkit's; what echod does not implement is refused by name
//! rather than ignored, so a file copied from a node_exporter never protects less than
//! its author thought.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;

pub use super::pem::MAX_FILE_SIZE;
use super::pem::{self, ReadError};

/// Why a web configuration file cannot be used; shown after the file's name.
#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    /// A file (the web config itself, or one it names) cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file: `the file`, `tls_server_config.cert_file`…
        what: &'static str,
        /// The path as resolved.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is larger than [`MAX_FILE_SIZE`].
    #[error("{what} {path} is larger than {MAX_FILE_SIZE} bytes")]
    TooLarge {
        /// Which file.
        what: &'static str,
        /// The path as resolved.
        path: PathBuf,
    },
    /// The file is not YAML.
    #[error("invalid YAML: {0}")]
    Yaml(String),
    /// The YAML does not fit the format (an unknown field, a wrong type).
    #[error("{0}")]
    Format(String),
    /// A well-formed value that cannot be used.
    #[error("{key}: {message}")]
    Invalid {
        /// The field, e.g. `basic_auth_users.alice`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Which client certificates the endpoint asks for (exporter-toolkit's
/// `client_auth_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// None (the default).
    NoClientCert,
    /// A client may present one; if it does, it must verify against `client_ca_file`.
    VerifyClientCertIfGiven,
    /// Every client must present one that verifies against `client_ca_file`.
    RequireAndVerifyClientCert,
}

impl ClientAuth {
    /// The name used in the file.
    pub fn name(self) -> &'static str {
        match self {
            Self::NoClientCert => "NoClientCert",
            Self::VerifyClientCertIfGiven => "VerifyClientCertIfGiven",
            Self::RequireAndVerifyClientCert => "RequireAndVerifyClientCert",
        }
    }
}

/// The TLS part, ready to serve.
#[derive(Clone)]
pub struct TlsSettings {
    /// The rustls configuration handshakes use.
    pub server_config: Arc<ServerConfig>,
    /// The certificate chain served (`cert_file`); `echod probe` trusts the local
    /// endpoint by this certificate.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// Which client certificates are asked for.
    pub client_auth: ClientAuth,
}

/// A loaded and checked web configuration file.
#[derive(Clone)]
pub struct WebConfig {
    /// The file it was read from.
    pub path: PathBuf,
    /// TLS, when `tls_server_config` is present.
    pub tls: Option<TlsSettings>,
    /// User name → bcrypt hash; empty, no basic auth.
    pub basic_auth_users: BTreeMap<String, String>,
    /// Every byte read to build this (the file and those it names), so two loads are
    /// equal exactly when their inputs are: a reload of an unchanged file changes nothing.
    inputs: Vec<u8>,
}

impl PartialEq for WebConfig {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.inputs == other.inputs
    }
}

impl fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Users, never their hashes.
        f.debug_struct("WebConfig")
            .field("path", &self.path)
            .field(
                "tls",
                &self
                    .tls
                    .as_ref()
                    .map(|t| t.client_auth.name())
                    .unwrap_or("off"),
            )
            .field(
                "basic_auth_users",
                &self.basic_auth_users.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The file as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    tls_server_config: Option<TlsFormat>,
    basic_auth_users: Option<BTreeMap<String, String>>,
    /// exporter-toolkit's, not implemented: refused by name.
    http_server_config: Option<serde_norway::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFormat {
    cert_file: Option<String>,
    key_file: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
    // exporter-toolkit's, not implemented: refused by name (see `unsupported`).
    cert: Option<serde_norway::Value>,
    key: Option<serde_norway::Value>,
    client_ca: Option<serde_norway::Value>,
    client_allowed_sans: Option<serde_norway::Value>,
    cipher_suites: Option<serde_norway::Value>,
    curve_preferences: Option<serde_norway::Value>,
    prefer_server_cipher_suites: Option<serde_norway::Value>,
}

/// TLS versions rustls speaks (it has no TLS 1.0 or 1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TlsVersion {
    Tls12,
    Tls13,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> WebConfigError {
    WebConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

impl WebConfig {
    /// Reads and checks the file at `path` and every file it names.
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let mut inputs = Vec::new();
        let text = read_limited("the file", path, &mut inputs)?;
        let text = String::from_utf8(text)
            .map_err(|_| WebConfigError::Yaml("the file is not UTF-8 text".into()))?;
        let format = parse(&text)?;
        if format.http_server_config.is_some() {
            return Err(invalid(
                "http_server_config",
                "not supported: echod serves HTTP/1.1 and sets no extra headers",
            ));
        }
        let basic_auth_users = format.basic_auth_users.unwrap_or_default();
        for (user, hash) in &basic_auth_users {
            check_user(user, hash)?;
        }
        // Relative paths are relative to the file's directory, as in exporter-toolkit.
        let dir = path.parent().unwrap_or_else(|| Path::new(""));
        let tls = format
            .tls_server_config
            .map(|tls| tls.build(dir, &mut inputs))
            .transpose()?;
        Ok(Self {
            path: path.to_path_buf(),
            tls,
            basic_auth_users,
            inputs,
        })
    }

    /// One line for the logs: what the file turns on.
    pub fn summary(&self) -> String {
        let tls = match &self.tls {
            Some(t) => format!("TLS on, client certificates: {}", t.client_auth.name()),
            None => "TLS off".to_string(),
        };
        let users = self.basic_auth_users.len();
        let auth = match users {
            0 => "basic auth off".to_string(),
            1 => "basic auth: 1 user".to_string(),
            n => format!("basic auth: {n} users"),
        };
        format!("{tls}, {auth}")
    }
}

/// The YAML, where an empty file (or one with only comments) means "nothing on", as
/// in exporter-toolkit.
fn parse(text: &str) -> Result<FileFormat, WebConfigError> {
    let value: serde_norway::Value =
        serde_norway::from_str(text).map_err(|e| WebConfigError::Yaml(e.to_string()))?;
    if value.is_null() {
        return Ok(FileFormat::default());
    }
    // Parsed again from the text, so errors point at a line and column.
    serde_norway::from_str(text).map_err(|e| WebConfigError::Format(e.to_string()))
}

/// A user name basic auth can carry, and a hash that is bcrypt.
fn check_user(user: &str, hash: &str) -> Result<(), WebConfigError> {
    let key = format!("basic_auth_users.{user}");
    if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
        return Err(invalid(
            key,
            "a user name must be non-empty, without `:` or control characters (basic auth \
             cannot carry them)",
        ));
    }
    let parts = bcrypt::HashParts::from_str(hash).map_err(|e| {
        invalid(
            &key,
            format!(
                "not a bcrypt hash ({e}); write one with `htpasswd -nbBC 10 \"\" PASSWORD | \
                 tr -d ':\\n'` (it starts with $2y$ or $2b$)"
            ),
        )
    })?;
    let cost = parts.get_cost();
    if !(4..=31).contains(&cost) {
        return Err(invalid(
            key,
            format!("bcrypt cost {cost} is outside 4..=31"),
        ));
    }
    Ok(())
}

impl TlsFormat {
    /// Fields of exporter-toolkit's format that echod does not implement: a file that
    /// uses one is refused, never served with less than its author asked for.
    fn unsupported(&self) -> Result<(), WebConfigError> {
        // Each field with why it is refused; its name is the field's own.
        macro_rules! refused {
            ($($field:ident => $why:expr),* $(,)?) => {
                [$((stringify!($field), self.$field.is_some(), $why)),*]
            };
        }
        let fields = refused![
            cert => "inline PEM is not supported; use cert_file",
            key => "inline PEM is not supported; use key_file",
            client_ca => "inline PEM is not supported; use client_ca_file",
            client_allowed_sans =>
                "not supported: any certificate client_ca_file verifies is accepted",
            cipher_suites => "not supported: rustls's default suites are used",
            curve_preferences => "not supported: rustls's default key exchange groups are used",
            prefer_server_cipher_suites => "not supported",
        ];
        match fields.into_iter().find(|(_, set, _)| *set) {
            Some((field, _, why)) => Err(invalid(format!("tls_server_config.{field}"), why)),
            None => Ok(()),
        }
    }

    fn build(self, dir: &Path, inputs: &mut Vec<u8>) -> Result<TlsSettings, WebConfigError> {
        self.unsupported()?;
        let required = |value: Option<String>, key: &str| {
            value.filter(|v| !v.is_empty()).ok_or_else(|| {
                invalid(
                    format!("tls_server_config.{key}"),
                    "missing (tls_server_config needs cert_file and key_file)",
                )
            })
        };
        let cert_path = dir.join(required(self.cert_file, "cert_file")?);
        let key_path = dir.join(required(self.key_file, "key_file")?);
        let cert_pem = read_limited("tls_server_config.cert_file", &cert_path, inputs)?;
        let cert_chain = pem::certificates(&cert_path, &cert_pem)
            .map_err(|e| invalid("tls_server_config.cert_file", e))?;
        let key_pem = read_limited("tls_server_config.key_file", &key_path, inputs)?;
        let key = pem::private_key(&key_path, &key_pem)
            .map_err(|e| invalid("tls_server_config.key_file", e))?;

        let client_auth = match self.client_auth_type.as_deref().unwrap_or("") {
            "" | "NoClientCert" => ClientAuth::NoClientCert,
            "VerifyClientCertIfGiven" => ClientAuth::VerifyClientCertIfGiven,
            "RequireAndVerifyClientCert" => ClientAuth::RequireAndVerifyClientCert,
            other @ ("RequestClientCert" | "RequireAnyClientCert" | "RequireClientCert") => {
                return Err(invalid(
                    "tls_server_config.client_auth_type",
                    format!(
                        "{other} is not supported: echod verifies every client certificate \
                         it asks for (use VerifyClientCertIfGiven or \
                         RequireAndVerifyClientCert with client_ca_file)"
                    ),
                ));
            }
            other => {
                return Err(invalid(
                    "tls_server_config.client_auth_type",
                    format!(
                        "unknown value {other:?}; expected NoClientCert, \
                         VerifyClientCertIfGiven or RequireAndVerifyClientCert"
                    ),
                ));
            }
        };
        let client_ca = self.client_ca_file.filter(|f| !f.is_empty());
        let roots = match (client_auth, client_ca) {
            (ClientAuth::NoClientCert, None) => None,
            (ClientAuth::NoClientCert, Some(_)) => {
                return Err(invalid(
                    "tls_server_config.client_ca_file",
                    "set without a client_auth_type that verifies client certificates \
                     (VerifyClientCertIfGiven or RequireAndVerifyClientCert)",
                ));
            }
            (_, None) => {
                return Err(invalid(
                    "tls_server_config.client_ca_file",
                    format!(
                        "missing: client_auth_type {} verifies client certificates against it",
                        client_auth.name()
                    ),
                ));
            }
            (_, Some(file)) => {
                let path = dir.join(file);
                let ca_pem = read_limited("tls_server_config.client_ca_file", &path, inputs)?;
                let roots = pem::client_roots(&path, &ca_pem)
                    .map_err(|e| invalid("tls_server_config.client_ca_file", e))?;
                Some(Arc::new(roots))
            }
        };

        let min = version("tls_server_config.min_version", self.min_version.as_deref())?
            .unwrap_or(TlsVersion::Tls12);
        let max = version("tls_server_config.max_version", self.max_version.as_deref())?
            .unwrap_or(TlsVersion::Tls13);
        if min > max {
            return Err(invalid(
                "tls_server_config.min_version",
                "is above max_version",
            ));
        }
        let versions: &[&rustls::SupportedProtocolVersion] = match (min, max) {
            (TlsVersion::Tls12, TlsVersion::Tls12) => &[&rustls::version::TLS12],
            (TlsVersion::Tls12, _) => &[&rustls::version::TLS13, &rustls::version::TLS12],
            (TlsVersion::Tls13, _) => &[&rustls::version::TLS13],
        };

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_error = |e: &dyn fmt::Display| invalid("tls_server_config", e.to_string());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)
            .map_err(|e| tls_error(&e))?;
        let builder = match roots {
            None => builder.with_no_client_auth(),
            Some(roots) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
                let verifier = match client_auth {
                    ClientAuth::VerifyClientCertIfGiven => verifier.allow_unauthenticated(),
                    _ => verifier,
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .map_err(|e| invalid("tls_server_config.client_ca_file", e.to_string()))?,
                )
            }
        };
        let mut server_config = builder
            .with_single_cert(cert_chain.clone(), key)
            .map_err(|e| {
                invalid(
                    "tls_server_config.key_file",
                    format!(
                        "{} cannot serve {}: {e}",
                        key_path.display(),
                        cert_path.display()
                    ),
                )
            })?;
        // The endpoint speaks HTTP/1.1 only.
        server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsSettings {
            server_config: Arc::new(server_config),
            cert_chain,
            client_auth,
        })
    }
}

/// `TLS12`/`TLS13` (exporter-toolkit's names); rustls has no older versions.
fn version(key: &str, value: Option<&str>) -> Result<Option<TlsVersion>, WebConfigError> {
    match value.unwrap_or("") {
        "" => Ok(None),
        "TLS12" => Ok(Some(TlsVersion::Tls12)),
        "TLS13" => Ok(Some(TlsVersion::Tls13)),
        "TLS10" | "TLS11" => Err(invalid(
            key,
            "TLS 1.0 and 1.1 are not supported (use TLS12 or TLS13)",
        )),
        other => Err(invalid(
            key,
            format!("unknown version {other:?}; expected TLS12 or TLS13"),
        )),
    }
}

/// [`pem::read_limited`], its error naming `what`.
fn read_limited(
    what: &'static str,
    path: &Path,
    inputs: &mut Vec<u8>,
) -> Result<Vec<u8>, WebConfigError> {
    pem::read_limited(path, inputs).map_err(|e| match e {
        ReadError::Io(source) => WebConfigError::Read {
            what,
            path: path.to_path_buf(),
            source,
        },
        ReadError::TooLarge => WebConfigError::TooLarge {
            what,
            path: path.to_path_buf(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with a self-signed certificate and key for localhost.
    fn dir_with_cert() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_new_cert(dir.path());
        dir
    }

    /// Writes a new self-signed certificate and key for localhost as `server.pem` and
    /// `server-key.pem` in `dir`.
    fn write_new_cert(dir: &Path) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.join("server.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("server-key.pem"), cert.signing_key.serialize_pem()).unwrap();
    }

    fn load(dir: &tempfile::TempDir, yaml: &str) -> Result<WebConfig, WebConfigError> {
        let path = dir.path().join("web.yml");
        std::fs::write(&path, yaml).unwrap();
        WebConfig::load(&path)
    }

    const TLS: &str = "tls_server_config:\n  cert_file: server.pem\n  key_file: server-key.pem\n";

    #[test]
    fn an_empty_file_turns_nothing_on() {
        let dir = tempfile::tempdir().unwrap();
        for yaml in ["", "# only a comment\n", "---\n"] {
            let web = load(&dir, yaml).unwrap();
            assert!(
                web.tls.is_none() && web.basic_auth_users.is_empty(),
                "{yaml:?}"
            );
        }
    }

    #[test]
    fn paths_are_relative_to_the_file_and_defaults_apply() {
        let dir = dir_with_cert();
        let web = load(&dir, TLS).unwrap();
        let tls = web.tls.expect("TLS on");
        assert_eq!(tls.client_auth, ClientAuth::NoClientCert);
        assert_eq!(tls.cert_chain.len(), 1);
        assert_eq!(tls.server_config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn fields_echod_does_not_implement_are_refused_by_name() {
        let dir = dir_with_cert();
        for (extra, key) in [
            (
                "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
                "tls_server_config.cipher_suites",
            ),
            (
                "  client_allowed_sans: [a]\n",
                "tls_server_config.client_allowed_sans",
            ),
            ("  cert: inline\n", "tls_server_config.cert"),
            ("  max_version: TLS11\n", "tls_server_config.max_version"),
            (
                "  min_version: TLS13\n  max_version: TLS12\n",
                "tls_server_config.min_version",
            ),
        ] {
            let err = load(&dir, &format!("{TLS}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(key), "{extra:?}: {err}");
        }
        let err = load(&dir, "http_server_config:\n  http2: false\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("http_server_config: not supported"),
            "{err}"
        );
    }

    #[test]
    fn loads_are_equal_exactly_when_their_inputs_are() {
        let dir = dir_with_cert();
        let first = load(&dir, TLS).unwrap();
        assert_eq!(first, load(&dir, TLS).unwrap());
        // A renewed certificate (same file names) is a change.
        write_new_cert(dir.path());
        assert_ne!(first, load(&dir, TLS).unwrap());
    }

    #[test]
    fn hashes_must_be_bcrypt_and_users_expressible() {
        let dir = tempfile::tempdir().unwrap();
        let hash = bcrypt::hash("pw", 4).unwrap();
        let web = load(&dir, &format!("basic_auth_users:\n  alice: '{hash}'\n")).unwrap();
        assert_eq!(web.basic_auth_users.len(), 1);
        for (user, hash) in [
            ("alice", "pw"),
            ("alice", "$1$saltsalt$qjXMvbEw8oaL.CzflDugX/"),
            ("'a:b'", hash.as_str()),
        ] {
            let err = load(&dir, &format!("basic_auth_users:\n  {user}: '{hash}'\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("basic_auth_users."), "{user} {hash}: {err}");
        }
    }

    #[test]
    fn a_huge_file_is_refused_without_reading_it_all() {
        let err = WebConfig::load(Path::new("/dev/zero")).unwrap_err();
        assert!(matches!(err, WebConfigError::TooLarge { .. }), "{err}");
    }
}
