//! TLS for HTTPS probes and HTTPS lifecycle handlers: certificate verification off, as the
//! kubelet does it (`InsecureSkipVerify` in `pkg/probe/http` and in its lifecycle HTTP client).
//!
//! Why that is sound here: the agent sends nothing secret to the pod (no credentials, only the
//! probe's own path and headers from the pod's spec) and trusts nothing it gets back beyond the
//! status code; the server is the pod's own process at an address the pod's spec names. A pod's
//! certificate is typically self-signed or issued for a name that is not the pod IP, so
//! verifying it would only make probes of ordinary HTTPS servers fail. The handshake itself is
//! still checked: the server must prove it holds the key of the certificate it presents.

use std::sync::{Arc, OnceLock};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// Accepts any server certificate; checks the handshake signatures against it.
#[derive(Debug)]
struct AnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The client configuration of every HTTPS probe and hook (built once).
pub fn client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        let provider: CryptoProvider = rustls::crypto::ring::default_provider();
        let verifier = AnyServerCert {
            algorithms: provider.signature_verification_algorithms,
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            // The ring provider supports the default versions; this cannot fail.
            .unwrap_or_else(|e| unreachable!("ring supports TLS 1.2 and 1.3: {e}"))
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Arc::new(config)
    }))
}
