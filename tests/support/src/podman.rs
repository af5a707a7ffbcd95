//! A small client for Podman's REST API on its unix socket, for tests that check what Podman
//! really runs (one HTTP/1.1 connection per request).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// API version prefix of the libpod endpoints (Podman 4.x).
const LIBPOD: &str = "/v4.0.0/libpod";
/// Upper bound for one request (container wait included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors talking to the Podman service.
#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    #[error("cannot connect to the Podman socket {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("HTTP error talking to Podman at {socket} ({method} {path}): {source}")]
    Http {
        socket: PathBuf,
        method: Method,
        path: String,
        source: hyper::Error,
    },
    #[error("invalid request {method} {path}: {source}")]
    Request {
        method: Method,
        path: String,
        source: http::Error,
    },
    #[error("Podman at {socket} did not answer {method} {path} within {REQUEST_TIMEOUT:?}")]
    Timeout {
        socket: PathBuf,
        method: Method,
        path: String,
    },
    #[error("Podman answered {method} {path} with {status}: {body}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("Podman's answer to {method} {path} is not the expected JSON: {source}")]
    Json {
        method: Method,
        path: String,
        source: serde_json::Error,
    },
}

/// A Podman REST API client on a unix socket.
#[derive(Debug, Clone)]
pub struct PodmanClient {
    socket: PathBuf,
}

impl PodmanClient {
    pub fn new(socket: &Path) -> Self {
        PodmanClient {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends one request to `path` (relative to the libpod prefix when it starts with
    /// `/libpod/`, e.g. `/libpod/containers/json`) and returns status and body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, Bytes), PodmanError> {
        let full_path = match path.strip_prefix("/libpod") {
            Some(rest) => format!("{LIBPOD}{rest}"),
            None => path.to_string(),
        };
        tokio::time::timeout(REQUEST_TIMEOUT, self.send(&method, &full_path, body))
            .await
            .map_err(|_| PodmanError::Timeout {
                socket: self.socket.clone(),
                method: method.clone(),
                path: full_path.clone(),
            })?
    }

    async fn send(
        &self,
        method: &Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, Bytes), PodmanError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| PodmanError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let http_err = |source| PodmanError::Http {
            socket: self.socket.clone(),
            method: method.clone(),
            path: path.to_string(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_err)?;
        let driver = tokio::spawn(connection);
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, "podman");
        if body.is_some() {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(payload)))
            .map_err(|source| PodmanError::Request {
                method: method.clone(),
                path: path.to_string(),
                source,
            })?;
        let response = sender.send_request(request).await.map_err(http_err)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(http_err)?
            .to_bytes();
        driver.abort();
        Ok((status, bytes))
    }

    /// Like [`PodmanClient::request`], but a non-2xx status is an error and the body is JSON
    /// (`null` when empty).
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, PodmanError> {
        let (status, bytes) = self.request(method.clone(), path, body).await?;
        if !status.is_success() {
            return Err(PodmanError::Status {
                method,
                path: path.to_string(),
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        if bytes.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|source| PodmanError::Json {
            method,
            path: path.to_string(),
            source,
        })
    }

    /// `GET /_ping` answers `OK` when the service is up.
    pub async fn ping(&self) -> Result<bool, PodmanError> {
        let (status, body) = self.request(Method::GET, "/_ping", None).await?;
        Ok(status == StatusCode::OK && body.as_ref() == b"OK")
    }
}
