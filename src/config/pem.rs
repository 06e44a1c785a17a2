//! Reading the PEM files the configuration names — `[tls]`'s and the metrics web
//! config's certificate, key and client CA — written once, so both sections bound a
//! read the same way and word a bad file the same way. Each caller puts the key or
//! field at fault in front of these messages.

use std::io::Read;
use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The largest file read (a web config, a certificate, a key, a CA bundle): these are
/// a few KiB; a larger one is a mistake (or `/dev/zero`), not a certificate.
pub const MAX_FILE_SIZE: u64 = 1024 * 1024;

/// Why [`read_limited`] read nothing usable.
pub(super) enum ReadError {
    /// The file cannot be opened or read.
    Io(std::io::Error),
    /// It is larger than [`MAX_FILE_SIZE`].
    TooLarge,
}

/// Reads at most [`MAX_FILE_SIZE`] bytes of `path` and appends them (after their
/// length) to `inputs`, so two loads compare equal exactly when their files did.
pub(super) fn read_limited(path: &Path, inputs: &mut Vec<u8>) -> Result<Vec<u8>, ReadError> {
    let file = std::fs::File::open(path).map_err(ReadError::Io)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(ReadError::TooLarge);
    }
    inputs.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    inputs.extend_from_slice(&bytes);
    Ok(bytes)
}

/// Every certificate in `pem` (read from `path`); at least one.
pub(super) fn certificates(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The first private key in `pem` (read from `path`).
pub(super) fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("{}: no PEM private key ({e})", path.display()))
}

/// The client CA certificates in `pem` (read from `path`) as trust roots.
pub(super) fn client_roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, pem)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: unusable CA certificate ({e})", path.display()))?;
    }
    Ok(roots)
}
