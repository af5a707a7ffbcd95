//! TLS material on disk, shared by both ends of the link: PEM certificates and keys, expiry
//! warnings, and a cheap stamp to notice when the files were replaced (rotation without restart).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

/// A PEM file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PemError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

impl PemError {
    /// An error about `path`.
    pub fn new(path: &Path, message: impl std::fmt::Display) -> Self {
        Self {
            path: path.to_owned(),
            message: message.to_string(),
        }
    }
}

/// Every certificate in a PEM file; an empty file is an error (it would trust or present nothing).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| PemError::new(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::new(path, e))?;
    if certs.is_empty() {
        return Err(PemError::new(path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| PemError::new(path, e))
}

/// Seconds since the Unix epoch at which `der` stops being valid.
pub fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, cert)| cert.validity().not_after.timestamp())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Log a warning for every certificate in `certs` that expires within `warn_before` (an error
/// when it already has). Returns how many were reported.
pub fn warn_expiry(path: &Path, certs: &[CertificateDer<'_>], warn_before: Duration) -> usize {
    let now = unix_now();
    let horizon = i64::try_from(warn_before.as_secs()).unwrap_or(i64::MAX);
    let mut reported = 0;
    for (index, cert) in certs.iter().enumerate() {
        let Some(not_after) = not_after(cert) else {
            continue;
        };
        let left = not_after - now;
        if left <= 0 {
            tracing::error!(file = %path.display(), index, not_after, "certificate has expired");
            reported += 1;
        } else if left < horizon {
            tracing::warn!(
                file = %path.display(),
                index,
                not_after,
                days_left = left / 86_400,
                "certificate expires soon"
            );
            reported += 1;
        }
    }
    reported
}

/// Modification time and length of each watched file, to notice replacements cheaply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp(Vec<Option<(SystemTime, u64)>>);

impl FileStamp {
    /// The stamp of `paths` now (a missing file stamps as absent).
    pub fn of(paths: &[&Path]) -> Self {
        Self(
            paths
                .iter()
                .map(|p| {
                    std::fs::metadata(p)
                        .ok()
                        .and_then(|m| Some((m.modified().ok()?, m.len())))
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_missing_files_name_the_file() {
        let dir = std::env::temp_dir().join(format!("fleetlet-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = load_certs(&empty).unwrap_err().to_string();
        assert!(
            err.contains("empty.pem") && err.contains("no PEM certificate"),
            "{err}"
        );
        let err = load_key(&dir.join("absent.key")).unwrap_err().to_string();
        assert!(err.contains("absent.key"), "{err}");
        let before = FileStamp::of(&[&empty]);
        std::fs::write(&empty, "changed").unwrap();
        assert_ne!(before, FileStamp::of(&[&empty]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
