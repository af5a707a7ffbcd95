//! A small HTTPS client for Flightctl's REST API: TLS verified against a configured CA (rustls),
//! a bearer token read from a file (a projected ServiceAccount token is rotated in place, so the
//! file is re-read whenever it changes), paged list calls.

use fleetlet_proto::error_chain;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;

use super::model::{Page, PageError, parse_page};

/// Largest response body accepted (a page of 1000 devices with full status stays well below).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Why a Flightctl request failed. Every variant except `Config` is retryable.
#[derive(Debug, thiserror::Error)]
pub enum FlightctlError {
    /// The client configuration is unusable (bad URL, unreadable or empty CA file). Not retryable.
    #[error("flightctl client configuration: {0}")]
    Config(String),
    /// The token file could not be read. Retryable (it may be written later).
    #[error("reading flightctl token file {path}: {source}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// No connection or TLS failure. Retryable.
    #[error("flightctl {endpoint} unreachable: {reason}")]
    Unreachable {
        /// The URL requested.
        endpoint: String,
        /// The transport's error chain.
        reason: String,
    },
    /// No answer within the request timeout. Retryable.
    #[error("flightctl {endpoint}: no answer within {timeout:?}")]
    Timeout {
        /// The URL requested.
        endpoint: String,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// 401: the token was not accepted. Retryable (the token may be rotated).
    #[error("flightctl {endpoint}: 401 Unauthorized (token from {token_file} rejected): {body}")]
    Unauthorized {
        /// The URL requested.
        endpoint: String,
        /// Where the token came from.
        token_file: PathBuf,
        /// Start of the response body.
        body: String,
    },
    /// 403: the identity lacks permission. Retryable (RBAC may be fixed).
    #[error(
        "flightctl {endpoint}: 403 Forbidden (grant the hub's identity list on this resource): {body}"
    )]
    Forbidden {
        /// The URL requested.
        endpoint: String,
        /// Start of the response body.
        body: String,
    },
    /// Any other non-success status, e.g. a 5xx. Retryable.
    #[error("flightctl {endpoint}: HTTP {status}: {body}")]
    Status {
        /// The URL requested.
        endpoint: String,
        /// The status returned.
        status: StatusCode,
        /// Start of the response body.
        body: String,
    },
    /// A success status with a body that is not the expected JSON. Retryable.
    #[error("flightctl {endpoint}: malformed response: {reason}")]
    Malformed {
        /// The URL requested.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl FlightctlError {
    /// Whether the same request may succeed later: everything but a configuration the hub
    /// cannot use.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Config(_))
    }

    /// Short machine-readable reason, for metrics and log fields.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Token { .. } => "token",
            Self::Unreachable { .. } => "unreachable",
            Self::Timeout { .. } => "timeout",
            Self::Unauthorized { .. } => "unauthorized",
            Self::Forbidden { .. } => "forbidden",
            Self::Status { status, .. } if status.is_server_error() => "server_error",
            Self::Status { .. } => "status",
            Self::Malformed { .. } => "malformed",
        }
    }
}

/// The bearer token, cached until the file's modification time or length changes.
#[derive(Debug, Default)]
struct CachedToken {
    stamp: Option<(SystemTime, u64)>,
    value: String,
}

/// A Flightctl REST client.
#[derive(Clone)]
pub struct FlightctlClient {
    base: String,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    token_file: Option<PathBuf>,
    token: Arc<Mutex<CachedToken>>,
    timeout: Duration,
}

impl std::fmt::Debug for FlightctlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightctlClient")
            .field("base", &self.base)
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

/// Reads PEM certificates from `path` into a root store.
fn load_roots(path: &Path) -> Result<rustls::RootCertStore, FlightctlError> {
    let certs = fleetlet_proto::pem::load_certs(path)
        .map_err(|e| FlightctlError::Config(format!("CA file {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| {
            FlightctlError::Config(format!(
                "CA file {}: unusable certificate: {e}",
                path.display()
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(FlightctlError::Config(format!(
            "CA file {} holds no certificate",
            path.display()
        )));
    }
    Ok(roots)
}

impl FlightctlClient {
    /// A client for the API at `base_url` (e.g. `https://127.0.0.1:3443`), trusting the CAs in
    /// `ca_file` and sending the token in `token_file` (if any) as a bearer token.
    pub fn new(
        base_url: &str,
        ca_file: &Path,
        token_file: Option<PathBuf>,
        timeout: Duration,
    ) -> Result<Self, FlightctlError> {
        let base = base_url.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|e| FlightctlError::Config(format!("api_url {base_url:?}: {e}")))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(FlightctlError::Config(format!(
                "api_url {base_url:?} must be an https:// URL with a host"
            )));
        }
        let roots = load_roots(ca_file)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| FlightctlError::Config(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Ok(Self {
            base,
            http,
            token_file,
            token: Arc::new(Mutex::new(CachedToken::default())),
            timeout,
        })
    }

    /// The API base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn bearer(&self) -> Result<Option<String>, FlightctlError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let token_err = |source| FlightctlError::Token {
            path: path.clone(),
            source,
        };
        let meta = tokio::fs::metadata(path).await.map_err(token_err)?;
        let stamp = (meta.modified().map_err(token_err)?, meta.len());
        let mut cached = self.token.lock().await;
        if cached.stamp != Some(stamp) {
            let raw = tokio::fs::read_to_string(path).await.map_err(token_err)?;
            cached.value = raw.trim().to_owned();
            cached.stamp = Some(stamp);
            tracing::debug!(token_file = %path.display(), "read flightctl token");
        }
        Ok(Some(cached.value.clone()))
    }

    /// Sends one request to `path_and_query` and returns the body of a 2xx answer.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Bytes, FlightctlError> {
        let endpoint = format!("{}{path_and_query}", self.base);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(&endpoint)
            .header(header::ACCEPT, "application/json");
        if let Some(token) = self.bearer().await? {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let payload = match body {
            Some(value) => {
                req = req.header(
                    header::CONTENT_TYPE,
                    if method == Method::PATCH {
                        "application/json-patch+json"
                    } else {
                        "application/json"
                    },
                );
                Bytes::from(
                    serde_json::to_vec(value).map_err(|e| FlightctlError::Malformed {
                        endpoint: endpoint.clone(),
                        reason: format!("encoding request: {e}"),
                    })?,
                )
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| FlightctlError::Config(format!("building request {endpoint}: {e}")))?;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| FlightctlError::Unreachable {
                    endpoint: endpoint.clone(),
                    reason: error_chain(&e),
                })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| FlightctlError::Unreachable {
                    endpoint: endpoint.clone(),
                    reason: format!("reading body: {e}"),
                })?
                .to_bytes();
            Ok::<_, FlightctlError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| FlightctlError::Timeout {
                endpoint: endpoint.clone(),
                timeout: self.timeout,
            })??;
        if status.is_success() {
            return Ok(body);
        }
        let snippet = snippet(&body);
        Err(match status {
            StatusCode::UNAUTHORIZED => FlightctlError::Unauthorized {
                endpoint,
                token_file: self.token_file.clone().unwrap_or_default(),
                body: snippet,
            },
            StatusCode::FORBIDDEN => FlightctlError::Forbidden {
                endpoint,
                body: snippet,
            },
            status => FlightctlError::Status {
                endpoint,
                status,
                body: snippet,
            },
        })
    }

    /// GETs `path` (e.g. `/api/v1/devices`) page by page (`limit`, `continue`) and returns every
    /// item. Bounded: at most `max_pages` pages, and a repeated continue token is an error.
    pub async fn list_all(
        &self,
        path: &str,
        limit: u32,
        max_pages: usize,
    ) -> Result<ListResult, FlightctlError> {
        let mut items = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0usize;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let mut query = format!("{path}{sep}limit={limit}");
            if let Some(t) = &token {
                query.push_str("&continue=");
                query.push_str(&percent_encode(t));
            }
            let body = self.request(Method::GET, &query, None).await?;
            pages += 1;
            let Page {
                items: page_items,
                continue_token,
            } = parse_page(&body).map_err(|PageError(reason)| FlightctlError::Malformed {
                endpoint: format!("{}{query}", self.base),
                reason,
            })?;
            items.extend(page_items);
            match continue_token {
                None => break,
                Some(next) if token.as_deref() == Some(next.as_str()) => {
                    return Err(FlightctlError::Malformed {
                        endpoint: format!("{}{path}", self.base),
                        reason: "the continue token repeats".into(),
                    });
                }
                Some(_) if pages >= max_pages => {
                    return Err(FlightctlError::Malformed {
                        endpoint: format!("{}{path}", self.base),
                        reason: format!("more than {max_pages} pages"),
                    });
                }
                Some(next) => token = Some(next),
            }
        }
        Ok(ListResult { items, pages })
    }
}

/// Every item of a paged list, and how many requests it took.
#[derive(Debug)]
pub struct ListResult {
    /// The raw items.
    pub items: Vec<serde_json::Value>,
    /// Number of pages (requests).
    pub pages: usize,
}

/// Percent-encodes everything outside the URL-unreserved set (continue tokens are base64).
pub fn percent_encode(s: &str) -> String {
    fleetlet_proto::percent::encode_component(s)
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_are_percent_encoded() {
        assert_eq!(percent_encode("ab+/=c"), "ab%2B%2F%3Dc");
        assert_eq!(percent_encode("plain-._~"), "plain-._~");
    }

    #[test]
    fn snippets_are_bounded() {
        let long = "x".repeat(1000);
        assert_eq!(snippet(long.as_bytes()).chars().count(), 301);
        assert_eq!(snippet(b"  short \n"), "short");
    }

    #[test]
    fn bad_configuration_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "not a certificate").expect("write");
        let t = Duration::from_secs(1);
        assert!(matches!(
            FlightctlClient::new("http://127.0.0.1:1", &ca, None, t),
            Err(FlightctlError::Config(_))
        ));
        assert!(matches!(
            FlightctlClient::new("https://127.0.0.1:1", &ca, None, t),
            Err(FlightctlError::Config(_))
        ));
        assert!(matches!(
            FlightctlClient::new("https://127.0.0.1:1", &dir.path().join("missing"), None, t),
            Err(FlightctlError::Config(_))
        ));
    }
}
