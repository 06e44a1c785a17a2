//! The one place the tools build a TLS client: what to trust (a CA file, the one
//! certificate a local endpoint serves, or — only when asked — anything), which client
//! certificate to present, and the name to verify. `echod client`, `probe` and `bench`
//! share the flags ([`TlsArgs`]) and the `tls://HOST:PORT` target form.
//!
//! There are no system roots: reading them needs another crate and echo servers under
//! test mostly carry private certificates, so a `tls://` target needs `--ca` or
//! `--insecure`, and says so.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// The scheme that marks a TLS echo target.
pub(crate) const SCHEME: &str = "tls://";

/// TLS flags shared by the tools.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct TlsArgs {
    /// CA certificate(s), PEM, that tls:// targets (and the probe's https:// URLs) are
    /// verified against.
    #[arg(long = "ca", visible_alias = "ca-file", value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) identity: ClientIdentity,
    /// Do not verify the server's certificate (its handshake signature still is). Only
    /// for trying a server whose CA you do not have.
    #[arg(long, conflicts_with = "ca")]
    pub(crate) insecure: bool,
    /// The name to send (SNI) and verify the certificate for, when it is not the host
    /// of the target (e.g. probing 127.0.0.1 that serves echo.example.com).
    #[arg(long, value_name = "NAME")]
    pub(crate) server_name: Option<String>,
}

/// The certificate the client presents to a server that requires one (mutual TLS):
/// `--cert` and `--key` go together, which the group's `requires_all` says once for both.
#[derive(Debug, Args, Clone, Default)]
#[group(requires_all = ["cert", "key"])]
pub(crate) struct ClientIdentity {
    /// Client certificate (PEM, chain allowed) to present, for a server that requires
    /// one (mutual TLS); with --key.
    #[arg(long = "cert", visible_alias = "client-cert", value_name = "FILE")]
    pub(crate) cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long = "key", visible_alias = "client-key", value_name = "FILE")]
    pub(crate) key: Option<PathBuf>,
}

/// Why a TLS client cannot be set up; names the flag and the file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsSetupError {
    /// A tls:// target with nothing to verify the server by.
    #[error(
        "{0} needs --ca FILE (the CA that signed the server's certificate; --ca-file in the \
         probe) or --insecure; system roots are not used"
    )]
    NoTrust(&'static str),
    /// A file that cannot be used, or a pair rustls refuses.
    #[error("{0}")]
    File(String),
    /// A --server-name (or target host) that is not a DNS name or an IP address.
    #[error("{0}")]
    Name(String),
}

/// What the client trusts.
pub(crate) enum Trust<'a> {
    /// The certificates of a PEM file (`--ca`).
    Roots(&'a Path),
    /// Exactly this certificate, whatever the name: a local endpoint's own.
    Pinned(CertificateDer<'static>),
    /// Anything (`--insecure`).
    Anything,
}

impl TlsArgs {
    /// The trust these flags give, or `None` without `--ca` and `--insecure`.
    pub(crate) fn trust(&self) -> Option<Trust<'_>> {
        match (&self.ca, self.insecure) {
            (Some(ca), _) => Some(Trust::Roots(ca)),
            (None, true) => Some(Trust::Anything),
            (None, false) => None,
        }
    }

    /// The client certificate and key to present, if given.
    pub(crate) fn identity(&self) -> Option<(&Path, &Path)> {
        let ClientIdentity { cert, key } = &self.identity;
        cert.as_deref().zip(key.as_deref())
    }

    /// The client config for `what` (a tls:// target, named in the error): the
    /// flags' trust, required.
    pub(crate) fn client_config(
        &self,
        what: &'static str,
    ) -> Result<Arc<ClientConfig>, TlsSetupError> {
        let trust = self.trust().ok_or(TlsSetupError::NoTrust(what))?;
        client_config(trust, self.identity())
    }

    /// The name to verify for a target `host:port`.
    pub(crate) fn server_name(
        &self,
        authority: &str,
    ) -> Result<ServerName<'static>, TlsSetupError> {
        match &self.server_name {
            Some(name) => ServerName::try_from(name.clone())
                .map_err(|e| TlsSetupError::Name(format!("--server-name {name:?}: {e}"))),
            None => server_name(authority),
        }
    }
}

/// Splits `tls://HOST:PORT` into `(true, "HOST:PORT")`; anything else is plain.
pub(crate) fn split_target(target: &str) -> (bool, &str) {
    match target.strip_prefix(SCHEME) {
        Some(rest) => (true, rest.trim_end_matches('/')),
        None => (false, target),
    }
}

/// A rustls client config: TLS 1.2 and 1.3, `trust` for the server, `identity`
/// (certificate chain and key files) presented when given.
pub(crate) fn client_config(
    trust: Trust<'_>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::File(e.to_string()))?;
    let accept = match trust {
        Trust::Roots(ca) => {
            let listed = read_pem_certs(ca, "--ca")?;
            let ca_error = |e: &dyn std::fmt::Display| {
                TlsSetupError::File(format!("--ca {}: {e}", ca.display()))
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in &listed {
                roots.add(cert.clone()).map_err(|e| ca_error(&e))?;
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .map_err(|e| ca_error(&e))?;
            Accept::Roots { webpki, listed }
        }
        Trust::Pinned(der) => Accept::Pinned(der),
        Trust::Anything => Accept::Anything,
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier {
            accept,
            algorithms: provider.signature_verification_algorithms,
        }));
    let config = match identity {
        Some((cert, key)) => {
            let chain = read_pem_certs(cert, "--cert")?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| TlsSetupError::File(format!("--key {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| TlsSetupError::File(format!("--cert/--key: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Every certificate in a PEM file; at least one.
/// The largest certificate file read (thousands of certificates fit).
const MAX_PEM_FILE: u64 = 64 * 1024 * 1024;

pub(crate) fn read_pem_certs(
    path: &Path,
    flag: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    // A CA bundle is a small regular file: `/dev/zero` or a pipe would be read forever.
    let meta = std::fs::metadata(path)
        .map_err(|e| TlsSetupError::File(format!("{flag} {}: {e}", path.display())))?;
    if !meta.is_file() || meta.len() > MAX_PEM_FILE {
        return Err(TlsSetupError::File(format!(
            "{flag} {}: not a regular file of at most {MAX_PEM_FILE} bytes",
            path.display()
        )));
    }
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsSetupError::File(format!("{flag} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsSetupError::File(format!(
            "{flag} {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// Completes a client handshake on `stream` by `deadline`: each socket call may wait only
/// for the time left, so a server that trickles its handshake a byte at a time cannot
/// hold a tool past its `--timeout` (a timeout per call would restart on every byte).
pub(crate) fn handshake_by(
    conn: &mut rustls::ClientConnection,
    stream: &mut std::net::TcpStream,
    deadline: std::time::Instant,
) -> io::Result<()> {
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the TLS handshake did not finish in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        stream.set_write_timeout(Some(left))?;
        // One socket call at a time (rustls's complete_io would loop on its own).
        if conn.wants_write() {
            conn.write_tls(stream)?;
            continue;
        }
        if conn.read_tls(stream)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection during the TLS handshake",
            ));
        }
        if let Err(e) = conn.process_new_packets() {
            // The alert that says why goes out before the error does.
            let _ = conn.write_tls(stream);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
    while conn.wants_write() {
        conn.write_tls(stream)?;
    }
    Ok(())
}

/// The host of `host:port` as TLS names it (brackets off an IPv6 address).
pub(crate) fn server_name(authority: &str) -> Result<ServerName<'static>, TlsSetupError> {
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| TlsSetupError::Name(format!("{authority}: {e}")))
}

/// A rustls error carried inside an I/O error (how rustls's blocking stream and
/// tokio-rustls report a failed handshake), as its own text; `None` for other errors.
pub(crate) fn tls_failure(e: &io::Error) -> Option<String> {
    e.get_ref()
        .filter(|inner| inner.is::<rustls::Error>())
        .map(|inner| inner.to_string())
}

/// What a [`Verifier`] accepts as the server's certificate.
#[derive(Debug)]
enum Accept {
    /// `--ca`: the usual chain and name verification against the file's certificates,
    /// and also a server certificate that is itself in the file — a self-signed
    /// certificate given as its own CA, which `openssl req -x509` marks as a CA and chain
    /// verification would refuse as an end entity (`openssl s_client -CAfile` accepts
    /// it too).
    Roots {
        webpki: Arc<WebPkiServerVerifier>,
        listed: Vec<CertificateDer<'static>>,
    },
    /// Exactly this certificate, whatever the chain and name.
    Pinned(CertificateDer<'static>),
    /// Any certificate (`--insecure`).
    Anything,
}

/// The tools' certificate verifier: whichever certificate [`Accept`] lets through, the
/// handshake signature is always checked, so only the holder of its key passes.
#[derive(Debug)]
struct Verifier {
    accept: Accept,
    algorithms: WebPkiSupportedAlgorithms,
}

/// A `verify_tls1N_signature` method that checks the signature with the provider's
/// algorithms (what `WebPkiServerVerifier` does too), for TLS 1.2 and 1.3 alike.
macro_rules! verify_signature {
    ($name:ident) => {
        fn $name(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::$name(message, cert, dss, &self.algorithms)
        }
    };
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.accept {
            Accept::Roots { listed, .. }
                if listed.iter().any(|c| c.as_ref() == end_entity.as_ref()) =>
            {
                Ok(ServerCertVerified::assertion())
            }
            Accept::Roots { webpki, .. } => webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            Accept::Pinned(der) if end_entity.as_ref() != der.as_ref() => {
                Err(rustls::Error::General(
                    "the endpoint's certificate is not the one it is configured to serve"
                        .to_string(),
                ))
            }
            Accept::Pinned(_) | Accept::Anything => Ok(ServerCertVerified::assertion()),
        }
    }

    verify_signature!(verify_tls12_signature);
    verify_signature!(verify_tls13_signature);

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn targets_and_names() {
        assert_eq!(split_target("tls://[::1]:7443"), (true, "[::1]:7443"));
        assert_eq!(split_target("127.0.0.1:7007"), (false, "127.0.0.1:7007"));
        assert_eq!(
            server_name("[::1]:9107").unwrap(),
            ServerName::IpAddress("::1".parse::<IpAddr>().unwrap().into())
        );
        assert_eq!(
            server_name("localhost:443").unwrap(),
            ServerName::try_from("localhost").unwrap()
        );
        let args = TlsArgs {
            server_name: Some("echo.example".into()),
            ..TlsArgs::default()
        };
        assert_eq!(
            args.server_name("127.0.0.1:7443").unwrap(),
            ServerName::try_from("echo.example").unwrap()
        );
        let err = TlsArgs::default().client_config("tls://x:1").unwrap_err();
        assert!(err.to_string().contains("--ca FILE"), "{err}");
    }

    /// `--cert` and `--key` (or their `--client-` names) are given both or neither; the
    /// one missing is named.
    #[test]
    fn a_client_certificate_comes_with_its_key() {
        use clap::Parser;
        #[derive(Parser)]
        struct Tool {
            #[command(flatten)]
            tls: TlsArgs,
        }
        for (given, missing) in [("--cert", "--key"), ("--key", "--cert")] {
            let err = Tool::try_parse_from(["tool", given, "x.pem"])
                .err()
                .unwrap_or_else(|| panic!("{given} alone was taken"));
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{err}"
            );
            assert!(err.to_string().contains(missing), "{err}");
        }
        let tool =
            Tool::try_parse_from(["tool", "--client-cert", "c.pem", "--client-key", "k.pem"])
                .unwrap();
        assert_eq!(
            tool.tls.identity(),
            Some((Path::new("c.pem"), Path::new("k.pem")))
        );
        assert_eq!(Tool::try_parse_from(["tool"]).unwrap().tls.identity(), None);
    }
}
