//! The device's TLS material for the link: loaded per connection attempt, reloaded when the files
//! change (so a rotated certificate is used by the next connection), with expiry warnings.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleetlet_proto::pem::{self, FileStamp};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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
    pem::load_certs(path).map_err(|e| tls_error(&e.path, e.message))
}

/// The client configuration for the next connection, reloaded when the files change.
pub(crate) struct ClientTls {
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    loaded: Option<(Arc<rustls::ClientConfig>, FileStamp)>,
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
        let now_stamp = FileStamp::of(&[&self.ca_file, &self.cert_file, &self.key_file]);
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
                pem::warn_expiry(&self.cert_file, &certs, EXPIRY_WARNING);
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
        pem::warn_expiry(&self.ca_file, &ca, EXPIRY_WARNING);
        for cert in ca {
            roots.add(cert).map_err(|e| tls_error(&self.ca_file, e))?;
        }
        let chain = load_certs(&self.cert_file)?;
        pem::warn_expiry(&self.cert_file, &chain, EXPIRY_WARNING);
        let key: PrivateKeyDer<'static> =
            pem::load_key(&self.key_file).map_err(|e| tls_error(&e.path, e.message))?;
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
