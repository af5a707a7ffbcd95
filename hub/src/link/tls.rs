//! The hub's TLS material: loading, reloading from disk without a restart, expiry warnings, and
//! the device identity taken from a verified client certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleetlet_proto::pem::{self, FileStamp, warn_expiry};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::{IdentitySource, LinkError, LinkServerConfig};

fn tls_error(path: &Path, message: impl std::fmt::Display) -> LinkError {
    LinkError::Tls {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Every certificate in a PEM file; an empty file is an error (it would trust or serve nothing).
pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, LinkError> {
    pem::load_certs(path).map_err(pem_error)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, LinkError> {
    pem::load_key(path).map_err(pem_error)
}

fn pem_error(e: pem::PemError) -> LinkError {
    LinkError::Tls {
        path: e.path,
        message: e.message,
    }
}

/// OID of Flightctl's device-fingerprint certificate extension (`OIDDeviceFingerprint` in
/// flightctl's internal/crypto/signer): its device signers put the device's fingerprint, which
/// is the device's name in Flightctl, there as an ASN.1 string.
const FLIGHTCTL_FINGERPRINT_OID: &str = "1.3.6.1.4.1.99999.1.3";

/// The Flightctl device fingerprint a certificate carries, if it carries one.
pub fn flightctl_fingerprint(parsed: &X509Certificate<'_>) -> Result<Option<String>, String> {
    let Some(ext) = parsed
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == FLIGHTCTL_FINGERPRINT_OID)
    else {
        return Ok(None);
    };
    let (_, value) = x509_parser::der_parser::parse_der(ext.value).map_err(|e| {
        format!("client certificate's Flightctl device fingerprint extension is not DER: {e}")
    })?;
    let text = value.as_str().map_err(|e| {
        format!("client certificate's Flightctl device fingerprint extension is not a string: {e}")
    })?;
    Ok(Some(text.to_owned()))
}

/// The device name from a verified client certificate, or why there is none. A certificate
/// carrying Flightctl's device-fingerprint extension must name the same device in its identity
/// (CN or URI) and in the extension; with `require_fingerprint` the extension must be there.
pub fn device_identity_checked(
    cert: &CertificateDer<'_>,
    source: IdentitySource,
    prefix: &str,
    require_fingerprint: bool,
) -> Result<String, String> {
    let name = device_identity(cert, source, prefix)?;
    let (_, parsed) = X509Certificate::from_der(cert)
        .map_err(|e| format!("client certificate is not valid X.509: {e}"))?;
    match flightctl_fingerprint(&parsed)? {
        Some(fingerprint) if fingerprint == name => Ok(name),
        Some(fingerprint) => Err(format!(
            "client certificate names device {name:?} but its Flightctl device fingerprint is {fingerprint:?}"
        )),
        None if require_fingerprint => Err(format!(
            "client certificate for device {name:?} carries no Flightctl device fingerprint ({FLIGHTCTL_FINGERPRINT_OID}), which this hub requires"
        )),
        None => Ok(name),
    }
}

/// The device name from a verified client certificate's identity field, or why there is none.
pub fn device_identity(
    cert: &CertificateDer<'_>,
    source: IdentitySource,
    prefix: &str,
) -> Result<String, String> {
    let (_, parsed) = X509Certificate::from_der(cert)
        .map_err(|e| format!("client certificate is not valid X.509: {e}"))?;
    let raw = match source {
        IdentitySource::CommonName => parsed
            .subject()
            .iter_common_name()
            .next()
            .ok_or("client certificate has no subject common name")?
            .as_str()
            .map_err(|e| format!("client certificate common name is not a string: {e}"))?
            .to_owned(),
        IdentitySource::UriSan => parsed
            .subject_alternative_name()
            .map_err(|e| format!("client certificate subjectAltName is invalid: {e}"))?
            .and_then(|san| {
                san.value.general_names.iter().find_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
            })
            .ok_or("client certificate has no URI subject alternative name")?,
    };
    let name = raw.strip_prefix(prefix).ok_or_else(|| {
        format!("client certificate identity {raw:?} does not start with the configured prefix {prefix:?}")
    })?;
    if name.is_empty() {
        return Err(format!(
            "client certificate identity {raw:?} names no device"
        ));
    }
    Ok(name.to_owned())
}

/// The serving configuration currently in force; new connections pick up reloads.
pub(crate) struct ServerTls {
    files: [PathBuf; 3],
    warn_before: Duration,
    current: RwLock<(Arc<rustls::ServerConfig>, FileStamp)>,
}

impl ServerTls {
    /// Load the CA bundle, serving certificate and key named in `config`.
    pub(crate) fn load(config: &LinkServerConfig) -> Result<Self, LinkError> {
        let files = [
            config.client_ca_file.clone(),
            config.cert_file.clone(),
            config.key_file.clone(),
        ];
        let warn_before = Duration::from_secs(config.expiry_warning_days.saturating_mul(86_400));
        let stamp = FileStamp::of(&[&files[0], &files[1], &files[2]]);
        let server_config = build_server_config(&files, warn_before)?;
        Ok(Self {
            files,
            warn_before,
            current: RwLock::new((server_config, stamp)),
        })
    }

    /// The configuration for the next handshake.
    pub(crate) fn current(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0,
        )
    }

    /// Reload if any file changed. A broken replacement is logged and the old material kept,
    /// so a half-written rotation never takes the link down. Returns whether it reloaded.
    pub(crate) fn reload_if_changed(&self) -> bool {
        let stamp = FileStamp::of(&[&self.files[0], &self.files[1], &self.files[2]]);
        let unchanged = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            == stamp;
        if unchanged {
            return false;
        }
        match build_server_config(&self.files, self.warn_before) {
            Ok(config) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = (config, stamp);
                tracing::info!(cert = %self.files[1].display(), "link TLS material reloaded");
                true
            }
            Err(error) => {
                tracing::error!(%error, "link TLS material changed but does not load; keeping the old");
                false
            }
        }
    }

    /// Re-check expiry of the material in force (called periodically).
    pub(crate) fn check_expiry(&self) {
        for path in &self.files[..2] {
            if let Ok(certs) = load_certs(path) {
                warn_expiry(path, &certs, self.warn_before);
            }
        }
    }
}

fn build_server_config(
    files: &[PathBuf; 3],
    warn_before: Duration,
) -> Result<Arc<rustls::ServerConfig>, LinkError> {
    let [ca_file, cert_file, key_file] = files;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca_certs = load_certs(ca_file)?;
    warn_expiry(ca_file, &ca_certs, warn_before);
    let mut roots = RootCertStore::empty();
    for cert in ca_certs {
        roots.add(cert).map_err(|e| tls_error(ca_file, e))?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| tls_error(ca_file, e))?;
    let chain = load_certs(cert_file)?;
    warn_expiry(cert_file, &chain, warn_before);
    let key = load_key(key_file)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error(cert_file, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls_error(key_file, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    fn device_cert(
        dir: &Path,
        name: &str,
        validity: pki::Validity,
    ) -> Vec<CertificateDer<'static>> {
        pki::issue_device(dir, name, "", validity).unwrap();
        load_certs(&dir.join(format!("devices/{name}.pem"))).unwrap()
    }

    #[test]
    fn expiry_is_reported_ahead_of_time() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), false).unwrap();
        let soon = device_cert(dir.path(), "soon", pki::time_span(5));
        let later = device_cert(dir.path(), "later", pki::time_span(60));
        let two_weeks = Duration::from_secs(14 * 86_400);
        assert_eq!(warn_expiry(Path::new("soon.pem"), &soon, two_weeks), 1);
        assert_eq!(warn_expiry(Path::new("later.pem"), &later, two_weeks), 0);
    }

    /// A self-signed certificate with CN `cn` and, if given, Flightctl's fingerprint extension.
    fn flightctl_cert(cn: &str, fingerprint: Option<&str>) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        if let Some(f) = fingerprint {
            // ASN.1 PrintableString, as Go's asn1.Marshal writes a printable string.
            let mut value = vec![0x13, u8::try_from(f.len()).unwrap()];
            value.extend_from_slice(f.as_bytes());
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 4, 1, 99999, 1, 3],
                    value,
                ));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn flightctl_fingerprint_must_name_the_device() {
        let cn = IdentitySource::CommonName;
        let good = flightctl_cert("fleetlet-abcdef0123456789", Some("abcdef0123456789"));
        assert_eq!(
            device_identity_checked(&good, cn, "fleetlet-", true).unwrap(),
            "abcdef0123456789"
        );
        let forged = flightctl_cert("fleetlet-victim000000000000", Some("abcdef0123456789"));
        let err = device_identity_checked(&forged, cn, "fleetlet-", false).unwrap_err();
        assert!(err.contains("fingerprint is \"abcdef0123456789\""), "{err}");
        let bare = flightctl_cert("fleetlet-abcdef0123456789", None);
        assert!(device_identity_checked(&bare, cn, "fleetlet-", false).is_ok());
        let err = device_identity_checked(&bare, cn, "fleetlet-", true).unwrap_err();
        assert!(err.contains("no Flightctl device fingerprint"), "{err}");
    }

    #[test]
    fn identity_from_common_name_or_uri_san_with_prefix() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), false).unwrap();
        pki::issue_device(dir.path(), "dev-9", "device:", pki::time_span(5)).unwrap();
        let cert = load_certs(&dir.path().join("devices/dev-9.pem")).unwrap();
        assert_eq!(
            device_identity(&cert[0], IdentitySource::CommonName, "device:").unwrap(),
            "dev-9"
        );
        let err = device_identity(&cert[0], IdentitySource::CommonName, "other:").unwrap_err();
        assert!(err.contains("prefix"), "{err}");
        let err = device_identity(&cert[0], IdentitySource::UriSan, "").unwrap_err();
        assert!(err.contains("URI"), "{err}");
    }
}
