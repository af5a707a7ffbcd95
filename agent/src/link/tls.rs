//! The device's TLS material for the link: loaded per connection attempt, reloaded when the files
//! change (so a rotated certificate is used by the next connection), with expiry warnings.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::LinkClientError;

/// Warn this long before a certificate expires.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);
/// Re-check expiry of unchanged material this often.
const EXPIRY_RECHECK: Duration = Duration::from_secs(3_600);

fn tls_error(path: &Path, message: impl std::fmt::Display) -> LinkClientError {
    LinkClientError::Tls {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, LinkClientError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(path, e))?;
    if certs.is_empty() {
        return Err(tls_error(path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// Seconds until `cert` expires (negative once it has).
pub(crate) fn seconds_left(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())?;
    Some(parsed.validity().not_after.timestamp() - now)
}

fn warn_expiry(path: &Path, certs: &[CertificateDer<'_>]) {
    let horizon = i64::try_from(EXPIRY_WARNING.as_secs()).unwrap_or(i64::MAX);
    for (index, cert) in certs.iter().enumerate() {
        match seconds_left(cert) {
            Some(left) if left <= 0 => {
                tracing::error!(file = %path.display(), index, "link certificate has expired");
            }
            Some(left) if left < horizon => tracing::warn!(
                file = %path.display(),
                index,
                days_left = left / 86_400,
                "link certificate expires soon"
            ),
            _ => {}
        }
    }
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(paths: &[&Path]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// The client configuration for the next connection, reloaded when the files change.
pub(crate) struct ClientTls {
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    loaded: Option<(Arc<rustls::ClientConfig>, Stamp)>,
    last_expiry_check: Option<tokio::time::Instant>,
}

impl ClientTls {
    pub(crate) fn new(ca_file: PathBuf, cert_file: PathBuf, key_file: PathBuf) -> Self {
        Self {
            ca_file,
            cert_file,
            key_file,
            loaded: None,
            last_expiry_check: None,
        }
    }

    /// The configuration to use now. Reloads changed files; if the new files are broken and an
    /// older configuration exists, logs and keeps using it (a half-written rotation must not
    /// take the device offline).
    pub(crate) fn current(&mut self) -> Result<Arc<rustls::ClientConfig>, LinkClientError> {
        let now_stamp = stamp(&[&self.ca_file, &self.cert_file, &self.key_file]);
        let fresh = self.loaded.as_ref().is_some_and(|(_, s)| *s == now_stamp);
        if !fresh {
            match self.build() {
                Ok(config) => {
                    if self.loaded.is_some() {
                        tracing::info!(cert = %self.cert_file.display(), "link TLS material reloaded");
                    }
                    self.loaded = Some((config, now_stamp));
                    self.last_expiry_check = Some(tokio::time::Instant::now());
                }
                Err(error) => match &self.loaded {
                    Some(_) => {
                        tracing::error!(%error, "link TLS material changed but does not load; keeping the old");
                    }
                    None => return Err(error),
                },
            }
        } else if self
            .last_expiry_check
            .is_none_or(|at| at.elapsed() >= EXPIRY_RECHECK)
        {
            self.last_expiry_check = Some(tokio::time::Instant::now());
            if let Ok(certs) = load_certs(&self.cert_file) {
                warn_expiry(&self.cert_file, &certs);
            }
        }
        self.loaded
            .as_ref()
            .map(|(config, _)| Arc::clone(config))
            .ok_or_else(|| tls_error(&self.cert_file, "no TLS material loaded"))
    }

    fn build(&self) -> Result<Arc<rustls::ClientConfig>, LinkClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        let ca = load_certs(&self.ca_file)?;
        warn_expiry(&self.ca_file, &ca);
        for cert in ca {
            roots.add(cert).map_err(|e| tls_error(&self.ca_file, e))?;
        }
        let chain = load_certs(&self.cert_file)?;
        warn_expiry(&self.cert_file, &chain);
        let key = PrivateKeyDer::from_pem_file(&self.key_file)
            .map_err(|e| tls_error(&self.key_file, e))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_error(&self.cert_file, e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_error(&self.key_file, e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}
