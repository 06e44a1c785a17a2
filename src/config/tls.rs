//! The `[tls]` section's files — certificate chain, key and client CA — read and checked
//! into a ready rustls server configuration, so a bad or mismatched pair is refused at
//! start-up (exit 78, naming the key) and a reload that cannot read them keeps the old
//! pair: loading is part of [`ConfigSource::load`](super::ConfigSource), like the
//! metrics endpoint's web config.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;

use super::TlsConfig;
use super::pem::{self, MAX_FILE_SIZE, ReadError};

/// The loaded certificate, key and client CA as rustls uses them.
pub struct TlsMaterial {
    /// The rustls configuration handshakes use: TLS 1.3 and 1.2 only.
    pub server_config: Arc<ServerConfig>,
    /// The leaf certificate's notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
    /// True when clients must present a certificate signed by `client_ca_file`.
    pub client_auth: bool,
    /// Every byte read, so two loads compare equal exactly when their files did.
    inputs: Vec<u8>,
}

impl PartialEq for TlsMaterial {
    fn eq(&self, other: &Self) -> bool {
        self.inputs == other.inputs
    }
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("not_after", &self.not_after)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

type Invalid = (&'static str, String);

impl TlsMaterial {
    /// Reads and checks the files `tls` names; the error is the key at fault and why.
    pub fn load(tls: &TlsConfig) -> Result<Self, Invalid> {
        let mut inputs = Vec::new();
        let cert_path = required(tls.cert_file.as_deref(), "tls.cert_file")?;
        let key_path = required(tls.key_file.as_deref(), "tls.key_file")?;
        let cert_pem = read_limited("tls.cert_file", cert_path, &mut inputs)?;
        let chain = pem::certificates(cert_path, &cert_pem).map_err(|e| ("tls.cert_file", e))?;
        let not_after = parse_chain(&chain)
            .map_err(|e| ("tls.cert_file", format!("{}: {e}", cert_path.display())))?;
        let key_pem = read_limited("tls.key_file", key_path, &mut inputs)?;
        let key = pem::private_key(key_path, &key_pem).map_err(|e| ("tls.key_file", e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ("tls", e.to_string()))?;
        let builder = match tls.client_ca_file.as_deref() {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let ca_pem = read_limited("tls.client_ca_file", path, &mut inputs)?;
                let roots =
                    pem::client_roots(path, &ca_pem).map_err(|e| ("tls.client_ca_file", e))?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| ("tls.client_ca_file", e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        // rustls checks that the key is the certificate's (a mismatched pair fails here).
        let server_config = builder.with_single_cert(chain, key).map_err(|e| {
            (
                "tls.key_file",
                format!(
                    "{} cannot serve {}: {e}",
                    key_path.display(),
                    cert_path.display()
                ),
            )
        })?;
        Ok(Self {
            server_config: Arc::new(server_config),
            not_after,
            client_auth: tls.client_ca_file.is_some(),
            inputs,
        })
    }
}

fn required<'a>(path: Option<&'a Path>, key: &'static str) -> Result<&'a Path, Invalid> {
    path.filter(|p| !p.as_os_str().is_empty()).ok_or_else(|| {
        (
            key,
            "missing: tls.listen is set, so tls.cert_file and tls.key_file are needed".into(),
        )
    })
}

/// Parses every certificate of the chain as X.509 — a PEM block whose base64 decodes
/// to anything else would be sent to every client, and every handshake would fail —
/// and returns the leaf's notAfter as Unix seconds.
fn parse_chain(chain: &[CertificateDer<'_>]) -> Result<i64, String> {
    let mut not_after = None;
    for (i, der) in chain.iter().enumerate() {
        let which = if i == 0 {
            "the leaf (certificate 1)".to_string()
        } else {
            format!("certificate {} of the chain", i + 1)
        };
        let (rest, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("{which} is not an X.509 certificate ({e})"))?;
        if !rest.is_empty() {
            return Err(format!(
                "{which} has {} bytes after the certificate",
                rest.len()
            ));
        }
        not_after.get_or_insert(cert.validity().not_after.timestamp());
    }
    not_after.ok_or_else(|| "no PEM certificate in it".to_string())
}

/// [`pem::read_limited`], its error worded for `key`.
fn read_limited(key: &'static str, path: &Path, inputs: &mut Vec<u8>) -> Result<Vec<u8>, Invalid> {
    pem::read_limited(path, inputs).map_err(|e| match e {
        ReadError::Io(e) => (key, format!("cannot read {}: {e}", path.display())),
        ReadError::TooLarge => (
            key,
            format!("{}: larger than {MAX_FILE_SIZE} bytes", path.display()),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
        (c, k)
    }

    fn config(cert: &Path, key: &Path) -> TlsConfig {
        TlsConfig {
            cert_file: Some(cert.to_path_buf()),
            key_file: Some(key.to_path_buf()),
            ..TlsConfig::default()
        }
    }

    #[test]
    fn a_pair_loads_with_its_expiry_and_a_mismatched_pair_names_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = pair(dir.path(), "one");
        let (_, k2) = pair(dir.path(), "two");
        let loaded = TlsMaterial::load(&config(&c1, &k1)).unwrap();
        // rcgen's default validity ends in 4096.
        assert!(loaded.not_after > 4_000_000_000, "{}", loaded.not_after);
        let (key, message) = TlsMaterial::load(&config(&c1, &k2)).unwrap_err();
        assert_eq!(key, "tls.key_file");
        assert!(message.contains("cannot serve"), "{message}");
        let (key, message) = TlsMaterial::load(&config(&k1, &k1)).unwrap_err();
        assert_eq!(key, "tls.cert_file");
        assert!(message.contains("no PEM certificate"), "{message}");
        let (key, _) = TlsMaterial::load(&config(&dir.path().join("absent.pem"), &k1)).unwrap_err();
        assert_eq!(key, "tls.cert_file");
        let (key, _) = TlsMaterial::load(&TlsConfig::default()).unwrap_err();
        assert_eq!(key, "tls.cert_file");
    }

    #[test]
    fn every_block_of_the_chain_must_be_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = pair(dir.path(), "one");
        let leaf = std::fs::read_to_string(&c).unwrap();
        let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        for (text, which) in [
            (format!("{leaf}{junk}"), "certificate 2 of the chain"),
            (format!("{junk}{leaf}"), "the leaf"),
        ] {
            std::fs::write(&c, text).unwrap();
            let (key, message) = TlsMaterial::load(&config(&c, &k)).unwrap_err();
            assert_eq!(key, "tls.cert_file");
            assert!(message.contains(which), "{message}");
            assert!(message.contains("one.pem"), "{message}");
        }
    }
}
