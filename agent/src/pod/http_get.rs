//! The HTTP GET of probes and lifecycle handlers, as the kubelet makes it (`pkg/probe/http`,
//! `pkg/kubelet/lifecycle`): plain HTTP or HTTPS without certificate verification
//! ([`super::insecure_tls`]), the spec's headers (a `Host` header sets the request's host),
//! redirects followed while they stay on the same host name (at most 10, either scheme), at
//! most 10 KiB of the response body read, the whole exchange bounded by one timeout.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// `HTTPGetAction.scheme`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP (the default).
    Http,
    /// HTTPS; the server's certificate is not verified, as by the kubelet.
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// The HTTP GET of a probe or a lifecycle hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpGetAction {
    /// HTTP or HTTPS.
    pub scheme: Scheme,
    /// Host (default: the pod's address).
    pub host: Option<String>,
    /// Port.
    pub port: u16,
    /// Path.
    pub path: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
}

/// Redirects followed, as Go's HTTP client (and so the kubelet) does.
const MAX_REDIRECTS: usize = 10;

/// The most of a response body read (the kubelet's `maxRespBodyLength`).
pub const MAX_BODY: usize = 10 << 10;

/// Go's words for a TLS handshake answered by a plain HTTP server.
const HTTP_TO_HTTPS: &str = "http: server gave HTTP response to HTTPS client";

/// The user agent of probes and hooks, unless the spec sets one.
const USER_AGENT: &str = "fleetlet-probe/1";

/// How one GET ended, short of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GetError {
    /// An HTTPS request answered in plain HTTP (the lifecycle handler retries in HTTP).
    HttpResponseToHttps,
    /// Anything else, in words.
    Other(String),
}

impl std::fmt::Display for GetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GetError::HttpResponseToHttps => f.write_str(HTTP_TO_HTTPS),
            GetError::Other(s) => f.write_str(s),
        }
    }
}

/// What a lifecycle handler's GET got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookResponse {
    /// The final response's status.
    pub status: u16,
    /// Set when an HTTPS request got a plain HTTP answer and the retry in HTTP succeeded: the
    /// message of the kubelet's `LifecycleHTTPFallback` Warning.
    pub http_fallback: Option<String>,
}

impl HttpGetAction {
    /// The request's URL as Go prints it in errors (`https://10.88.0.5:8443/healthz`).
    pub fn url(&self, default_host: &str) -> String {
        let host = self.host.as_deref().unwrap_or(default_host);
        format!(
            "{}://{}{}",
            self.scheme.as_str(),
            join_host_port(host, self.port),
            self.path
        )
    }

    /// A probe's GET bounded by `timeout`: the final response's status, or the error in Go's
    /// words (`Get "http://…": …`).
    #[cfg(test)]
    pub(crate) async fn status(
        &self,
        default_host: &str,
        timeout: Duration,
    ) -> Result<u16, String> {
        self.answer(default_host, timeout)
            .await
            .map(|(status, _)| status)
    }

    /// A probe's GET bounded by `timeout`: the final response's status and (at most 10 KiB of)
    /// its body, or the error in Go's words.
    pub async fn answer(
        &self,
        default_host: &str,
        timeout: Duration,
    ) -> Result<(u16, Bytes), String> {
        let host = self.host.as_deref().unwrap_or(default_host);
        self.follow(self.scheme, host, &self.headers, timeout)
            .await
            .map_err(|e| format!("Get \"{}\": {e}", self.url(default_host)))
    }

    /// A lifecycle handler's GET bounded by `timeout`. As the kubelet: an HTTPS request a
    /// plain HTTP server answers is made again in HTTP, without an `Authorization` header.
    pub async fn hook_status(
        &self,
        default_host: &str,
        timeout: Duration,
    ) -> Result<HookResponse, String> {
        let host = self.host.as_deref().unwrap_or(default_host);
        let started = tokio::time::Instant::now();
        let first = self.follow(self.scheme, host, &self.headers, timeout).await;
        let error = match first {
            Ok((status, _)) => {
                return Ok(HookResponse {
                    status,
                    http_fallback: None,
                });
            }
            Err(e) => e,
        };
        if error != GetError::HttpResponseToHttps || self.scheme != Scheme::Https {
            return Err(format!("Get \"{}\": {error}", self.url(default_host)));
        }
        let headers: Vec<(String, String)> = self
            .headers
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("authorization"))
            .cloned()
            .collect();
        let left = timeout.saturating_sub(started.elapsed());
        let plain = HttpGetAction {
            scheme: Scheme::Http,
            ..self.clone()
        };
        match self.follow(Scheme::Http, host, &headers, left).await {
            Ok((status, _)) => Ok(HookResponse {
                status,
                http_fallback: Some(format!(
                    "request to HTTPS lifecycle hook {} got HTTP response, retry with HTTP succeeded",
                    join_host_port(host, self.port)
                )),
            }),
            Err(e) => Err(format!("Get \"{}\": {e}", plain.url(default_host))),
        }
    }

    /// GETs from `scheme://host:port/path`, following same-host redirects, all within
    /// `timeout`.
    async fn follow(
        &self,
        scheme: Scheme,
        host: &str,
        headers: &[(String, String)],
        timeout: Duration,
    ) -> Result<(u16, Bytes), GetError> {
        let follow = async {
            let (mut scheme, mut port, mut path) = (scheme, self.port, self.path.clone());
            for _ in 0..=MAX_REDIRECTS {
                let (code, location, body) = get_once(scheme, host, port, &path, headers).await?;
                let next = location
                    .filter(|_| (300..400).contains(&code))
                    .and_then(|l| same_host_redirect(scheme, host, port, &l));
                match next {
                    Some(target) => (scheme, port, path) = target,
                    None => return Ok((code, body)),
                }
            }
            Err(GetError::Other(format!(
                "stopped after {MAX_REDIRECTS} redirects"
            )))
        };
        tokio::time::timeout(timeout, follow)
            .await
            .unwrap_or_else(|_| {
                Err(GetError::Other(
                    "context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
                        .into(),
                ))
            })
    }
}

/// `host:port`, with an IPv6 address in brackets (Go's `net.JoinHostPort`).
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Where a redirect `location` from `scheme://host:port` leads when it stays on `host` (the
/// kubelet compares host names only, so HTTP to HTTPS and back is followed): the scheme, port
/// and the path with its query. `None` for another host or a scheme that is not HTTP(S).
fn same_host_redirect(
    scheme: Scheme,
    host: &str,
    port: u16,
    location: &str,
) -> Option<(Scheme, u16, String)> {
    if location.starts_with('/') && !location.starts_with("//") {
        return Some((scheme, port, location.to_owned()));
    }
    let absolute = if location.starts_with("//") {
        format!("{}:{location}", scheme.as_str())
    } else {
        location.to_owned()
    };
    let uri: http::Uri = absolute.parse().ok()?;
    let next = match uri.scheme_str()? {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return None,
    };
    if uri.host()?.trim_matches(['[', ']']) != host.trim_matches(['[', ']']) {
        return None;
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Some((next, uri.port_u16().unwrap_or(next.default_port()), path))
}

/// One GET: the response status and its Location header. At most [`MAX_BODY`] of the body is
/// read (and dropped), as the kubelet reads it.
async fn get_once(
    scheme: Scheme,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<(u16, Option<String>, Bytes), GetError> {
    let bare = host.trim_matches(['[', ']']);
    let tcp = TcpStream::connect((bare, port))
        .await
        .map_err(|e| GetError::Other(dial_error(host, port, &e)))?;
    let request = build_request(host, port, path, headers)?;
    match scheme {
        Scheme::Http => exchange(tcp, request).await,
        Scheme::Https => {
            let name = ServerName::try_from(bare.to_owned())
                .map_err(|e| GetError::Other(format!("tls: server name {bare:?}: {e}")))?;
            let connector = tokio_rustls::TlsConnector::from(super::insecure_tls::client_config());
            let head = HeadRecorder::new(tcp);
            match connector.connect(name, head).into_fallible().await {
                Ok(tls) => exchange(tls, request).await,
                Err((_, head)) if head.head.starts_with(b"HTTP/") => {
                    Err(GetError::HttpResponseToHttps)
                }
                Err((e, _)) => Err(GetError::Other(tls_error(&e))),
            }
        }
    }
}

/// A TLS handshake error in words close to Go's (`remote error: tls: …`).
fn tls_error(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(alert)) => format!("remote error: tls: {alert:?}"),
        Some(other) => format!("tls: {other}"),
        None => e.to_string(),
    }
}

/// The request: the spec's headers, `Host` from them or `host:port`, a user agent and
/// `Accept: */*` unless they set one (an empty `Accept` drops it), as the kubelet builds it.
fn build_request(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<http::Request<Empty<Bytes>>, GetError> {
    let named = |n: &http::HeaderName| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n.as_str()))
    };
    let host_header = named(&http::header::HOST)
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| join_host_port(host, port));
    let mut req = http::Request::get(path).header(http::header::HOST, host_header);
    if named(&http::header::USER_AGENT).is_none() {
        req = req.header(http::header::USER_AGENT, USER_AGENT);
    }
    if named(&http::header::ACCEPT).is_none() {
        req = req.header(http::header::ACCEPT, "*/*");
    }
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("host") || (k.eq_ignore_ascii_case("accept") && v.is_empty()) {
            continue;
        }
        req = req.header(k.as_str(), v.as_str());
    }
    req.body(Empty::<Bytes>::new())
        .map_err(|e| GetError::Other(format!("invalid request: {e}")))
}

/// Sends `request` over `io` in HTTP/1.1: the status, the Location header.
async fn exchange<S>(
    io: S,
    request: http::Request<Empty<Bytes>>,
) -> Result<(u16, Option<String>, Bytes), GetError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let other = |e: hyper::Error| GetError::Other(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(request).await.map_err(other)?;
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = resp.into_body();
    let mut read = Vec::new();
    while read.len() < MAX_BODY {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    read.extend_from_slice(&data[..data.len().min(MAX_BODY - read.len())]);
                }
            }
            Some(Err(e)) => return Err(other(e)),
            None => break,
        }
    }
    Ok((status, location, Bytes::from(read)))
}

/// A failed connect in Go's words (`dial tcp 127.0.0.1:80: connect: connection refused`).
pub fn dial_error(host: &str, port: u16, e: &std::io::Error) -> String {
    let what = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect: connection refused".to_owned(),
        std::io::ErrorKind::TimedOut => "i/o timeout".to_owned(),
        _ => e.to_string(),
    };
    format!("dial tcp {}: {what}", join_host_port(host, port))
}

/// A stream that keeps the first five bytes the server sent: a TLS handshake that fails on
/// them tells a plain HTTP answer (`HTTP/`) from other failures, as Go's client does.
struct HeadRecorder {
    inner: TcpStream,
    head: Vec<u8>,
}

impl HeadRecorder {
    fn new(inner: TcpStream) -> Self {
        Self {
            inner,
            head: Vec::with_capacity(5),
        }
    }
}

impl AsyncRead for HeadRecorder {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let want = 5usize.saturating_sub(self.head.len());
            let got = &buf.filled()[before..];
            let take = want.min(got.len());
            let first = got[..take].to_vec();
            self.head.extend_from_slice(&first);
        }
        polled
    }
}

impl AsyncWrite for HeadRecorder {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_redirects_to_the_same_host_are_followed_in_either_scheme() {
        let h = Scheme::Http;
        assert_eq!(
            same_host_redirect(h, "10.88.0.5", 8080, "/healthz?x=1"),
            Some((h, 8080, "/healthz?x=1".into()))
        );
        assert_eq!(
            same_host_redirect(h, "10.88.0.5", 8080, "http://10.88.0.5:9090/a"),
            Some((h, 9090, "/a".into()))
        );
        assert_eq!(
            same_host_redirect(h, "10.88.0.5", 8080, "http://10.88.0.5"),
            Some((h, 80, "/".into()))
        );
        assert_eq!(
            same_host_redirect(h, "10.88.0.5", 8080, "https://10.88.0.5/"),
            Some((Scheme::Https, 443, "/".into()))
        );
        assert_eq!(
            same_host_redirect(Scheme::Https, "10.88.0.5", 8443, "//10.88.0.5:9443/b"),
            Some((Scheme::Https, 9443, "/b".into()))
        );
        assert_eq!(
            same_host_redirect(h, "10.88.0.5", 8080, "http://example.com/"),
            None
        );
        assert_eq!(
            same_host_redirect(h, "10.88.0.5", 8080, "//example.com/x"),
            None
        );
        assert_eq!(
            same_host_redirect(h, "10.88.0.5", 8080, "ftp://10.88.0.5/x"),
            None
        );
        assert_eq!(
            same_host_redirect(h, "fd00::5", 8080, "http://[fd00::5]:81/v6"),
            Some((h, 81, "/v6".into()))
        );
    }

    #[test]
    fn urls_and_requests_as_the_kubelet_builds_them() {
        let get = HttpGetAction {
            scheme: Scheme::Https,
            host: None,
            port: 8443,
            path: "/healthz".into(),
            headers: vec![
                ("Host".into(), "example.test".into()),
                ("X-Custom".into(), "1".into()),
            ],
        };
        assert_eq!(get.url("10.88.0.5"), "https://10.88.0.5:8443/healthz");
        assert_eq!(get.url("fd00::5"), "https://[fd00::5]:8443/healthz");
        let req = build_request("10.88.0.5", 8443, "/healthz", &get.headers).unwrap();
        let h = req.headers();
        assert_eq!(h.get_all("host").iter().count(), 1);
        assert_eq!(h["host"], "example.test");
        assert_eq!(h["accept"], "*/*");
        assert_eq!(h["user-agent"], USER_AGENT);
        assert_eq!(h["x-custom"], "1");
        let req = build_request(
            "10.88.0.5",
            80,
            "/",
            &[
                ("User-Agent".into(), "mine".into()),
                ("Accept".into(), String::new()),
            ],
        )
        .unwrap();
        let h = req.headers();
        assert_eq!(h["host"], "10.88.0.5:80");
        assert_eq!(h.get_all("user-agent").iter().collect::<Vec<_>>(), ["mine"]);
        assert!(h.get("accept").is_none(), "an empty Accept drops it");
    }

    /// A loopback server answering `n` requests: with TLS (a self-signed certificate for a
    /// name that is not the address probed) or plain. It answers `/redirect` with a 302 to
    /// `https://127.0.0.1:<tls_port>/ok` and any path holding "ok" with 200, else 500; the
    /// request heads it saw come back on the channel.
    async fn server(
        tls: bool,
        n: usize,
        tls_port: u16,
    ) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tls.then(|| {
            let key = rcgen::generate_simple_self_signed(vec!["pod.invalid".to_owned()]).unwrap();
            let cert = key.cert.der().clone();
            let der = rustls::pki_types::PrivateKeyDer::try_from(key.signing_key.serialize_der())
                .unwrap();
            let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], der)
            .unwrap();
            tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
        });
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for _ in 0..n {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let mut stream: Box<dyn Io> = match &acceptor {
                    Some(a) => match a.accept(tcp).await {
                        Ok(s) => Box::new(s),
                        Err(_) => continue,
                    },
                    None => Box::new(tcp),
                };
                let mut buf = vec![0u8; 4096];
                let len = stream.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..len]).to_string();
                let line = head.lines().next().unwrap_or_default().to_owned();
                let reply = if line.contains("/redirect") {
                    format!(
                        "HTTP/1.1 302 Found\r\nlocation: https://127.0.0.1:{tls_port}/ok\r\ncontent-length: 0\r\n\r\n"
                    )
                } else if line.contains("ok") {
                    "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_owned()
                } else {
                    "HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n".to_owned()
                };
                let _ = tx.send(head);
                let _ = stream.write_all(reply.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        });
        (port, rx)
    }

    trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
    impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

    fn get(scheme: Scheme, port: u16, path: &str) -> HttpGetAction {
        HttpGetAction {
            scheme,
            host: None,
            port,
            path: path.into(),
            headers: vec![("Authorization".into(), "Bearer x".into())],
        }
    }

    #[tokio::test]
    async fn https_accepts_any_certificate_and_follows_redirects_across_schemes() {
        let t = Duration::from_secs(5);
        let (tls_port, mut tls_seen) = server(true, 3, 0).await;
        assert_eq!(
            get(Scheme::Https, tls_port, "/ok")
                .status("127.0.0.1", t)
                .await,
            Ok(200),
            "a self-signed certificate for another name is accepted"
        );
        assert_eq!(
            get(Scheme::Https, tls_port, "/bad")
                .status("127.0.0.1", t)
                .await,
            Ok(500)
        );
        assert!(
            tls_seen
                .recv()
                .await
                .unwrap()
                .starts_with("GET /ok HTTP/1.1")
        );
        tls_seen.recv().await.unwrap();
        // Plain HTTP redirected to HTTPS on the same host: followed.
        let (plain_port, _) = server(false, 1, tls_port).await;
        assert_eq!(
            get(Scheme::Http, plain_port, "/redirect")
                .status("127.0.0.1", t)
                .await,
            Ok(200)
        );
        let head = tls_seen.recv().await.unwrap();
        assert!(head.starts_with("GET /ok HTTP/1.1"), "{head}");
    }

    #[tokio::test]
    async fn https_to_a_plain_server_fails_a_probe_and_falls_back_for_a_hook() {
        let t = Duration::from_secs(5);
        let (port, mut seen) = server(false, 3, 0).await;
        let err = get(Scheme::Https, port, "/ok")
            .status("127.0.0.1", t)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            format!(
                "Get \"https://127.0.0.1:{port}/ok\": http: server gave HTTP response to HTTPS client"
            )
        );
        let r = get(Scheme::Https, port, "/ok")
            .hook_status("127.0.0.1", t)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.http_fallback.as_deref(),
            Some(format!(
                "request to HTTPS lifecycle hook 127.0.0.1:{port} got HTTP response, retry with HTTP succeeded"
            ).as_str())
        );
        // Two TLS ClientHellos the server answered in HTTP, then the HTTP retry, which drops
        // the Authorization header.
        for _ in 0..2 {
            assert!(!seen.recv().await.unwrap().starts_with("GET"));
        }
        let retried = seen.recv().await.unwrap();
        assert!(retried.starts_with("GET /ok HTTP/1.1"), "{retried}");
        assert!(
            !retried.to_ascii_lowercase().contains("authorization"),
            "{retried}"
        );
        // A closed port: Go's dial error, in the URL's scheme.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        assert_eq!(
            get(Scheme::Https, closed_port, "/")
                .hook_status("127.0.0.1", t)
                .await,
            Err(format!(
                "Get \"https://127.0.0.1:{closed_port}/\": dial tcp 127.0.0.1:{closed_port}: connect: connection refused"
            ))
        );
    }
}
