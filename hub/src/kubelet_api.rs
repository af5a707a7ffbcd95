//! The hub's kubelet API: an HTTPS endpoint the API server calls for `kubectl logs` on fleetlet
//! nodes. Callers are authenticated like a kubelet does it — a client certificate signed by the
//! cluster CA, or a bearer token checked with a TokenReview — and authorized with a
//! SubjectAccessReview on `nodes/proxy`. The log itself comes from the device over its stream.
//!
//! Hardened like the kubelet's own endpoint: every request is authenticated and authorized
//! before anything is looked up (an unauthorized caller learns nothing about which pods exist),
//! the reviews are cached with the kubelet's TTLs, and TLS handshakes, request headers and the
//! number of connections are bounded. `/healthz` is served on the operations port only.

pub mod auth_cache;
pub mod ports;
pub mod stats;
pub mod streaming;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use fleetlet_proto::v1::LogRequest;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::KubeletConfig;
use crate::inventory::DeviceMap;
use crate::metrics::Metrics;
use crate::sessions::{LinkError, Sessions};

/// How long a log request waits for the device's first chunk before answering: a refusal
/// comes at once and becomes an error status; a followed log with nothing yet starts streaming.
const FIRST_LOG_CHUNK_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Requests one HTTP/2 connection to the kubelet endpoint carries at once (the API server
/// multiplexes its log, stats and proxy requests for a Node on one connection).
const MAX_H2_STREAMS: u32 = 64;

/// Errors setting up the kubelet endpoint (configuration; not retryable).
#[derive(Debug, Error)]
pub enum KubeletApiError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("reading {what} from {path}: {reason}")]
    Pem {
        /// certificate, key or CA bundle.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the material.
    #[error("building the kubelet endpoint's TLS configuration: {0}")]
    Tls(String),
    /// The listen address could not be bound.
    #[error("binding the kubelet endpoint {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, KubeletApiError> {
    let pem = |reason: String| KubeletApiError::Pem {
        what,
        path: path.to_path_buf(),
        reason,
    };
    fleetlet_proto::pem::load_certs(path).map_err(|e| pem(e.message))
}

/// The TLS configuration: serving certificate, and client certificates from the cluster CA
/// accepted but not required (bearer tokens are the other way in).
pub fn tls_config(cfg: &KubeletConfig) -> Result<Arc<rustls::ServerConfig>, KubeletApiError> {
    let (Some(cert_file), Some(key_file)) = (&cfg.cert_file, &cfg.key_file) else {
        return Err(KubeletApiError::Tls(
            "cert_file and key_file are required".into(),
        ));
    };
    let certs = read_certs(cert_file, "certificate")?;
    let key = fleetlet_proto::pem::load_key(key_file).map_err(|e| KubeletApiError::Pem {
        what: "private key",
        path: key_file.clone(),
        reason: e.message,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| KubeletApiError::Tls(e.to_string()))?;
    let builder = match &cfg.client_ca_file {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca, "client CA bundle")? {
                roots
                    .add(c)
                    .map_err(|e| KubeletApiError::Tls(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| KubeletApiError::Tls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| KubeletApiError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A caller as authentication established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// User name.
    pub user: String,
    /// User uid (tokens only).
    pub uid: Option<String>,
    /// Groups.
    pub groups: Vec<String>,
    /// Extra attributes (tokens only).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// User and groups from a verified client certificate: CN and O, as Kubernetes maps them.
pub fn caller_from_cert(der: &[u8]) -> Option<Caller> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let user = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Some(Caller {
        user,
        uid: None,
        groups,
        extra: BTreeMap::new(),
    })
}

/// A `/containerLogs` request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsPath {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
}

/// Parses `/containerLogs/{ns}/{pod}/{container}`.
pub fn parse_logs_path(path: &str) -> Option<LogsPath> {
    let rest = path.strip_prefix("/containerLogs/")?;
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    match parts.as_slice() {
        [ns, pod, container] if !ns.is_empty() && !pod.is_empty() && !container.is_empty() => {
            Some(LogsPath {
                namespace: fleetlet_proto::percent::decode(ns),
                pod: fleetlet_proto::percent::decode(pod),
                container: fleetlet_proto::percent::decode(container),
            })
        }
        _ => None,
    }
}

/// A query value: `+` is a space (form encoding), then `%XX` escapes.
fn query_value(s: &str) -> String {
    fleetlet_proto::percent::decode(&s.replace('+', " "))
}

/// A query that cannot be served.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid query parameter {name}={value:?}")]
pub struct QueryError {
    /// Parameter.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// Parses the kubelet's log query parameters into a [`LogRequest`] (without pod and container).
pub fn parse_log_query(query: Option<&str>) -> Result<LogRequest, QueryError> {
    let mut req = LogRequest::default();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = query_value(v);
        let bad = || QueryError {
            name: k.to_string(),
            value: v.clone(),
        };
        let boolean = |v: &str| match v {
            "" | "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(bad()),
        };
        let number = |v: &str| v.parse::<i64>().map_err(|_| bad());
        match k {
            "follow" => req.follow = boolean(&v)?,
            "timestamps" => req.timestamps = boolean(&v)?,
            "previous" => req.previous = boolean(&v)?,
            "tailLines" => req.tail_lines = Some(number(&v)?).filter(|n| *n >= 0),
            "sinceSeconds" => req.since_seconds = Some(number(&v)?).filter(|n| *n > 0),
            "limitBytes" => req.limit_bytes = Some(number(&v)?).filter(|n| *n > 0),
            "sinceTime" => {
                let t: k8s_openapi::jiff::Timestamp = v.parse().map_err(|_| bad())?;
                req.since_unix = Some(t.as_second());
            }
            _ => {}
        }
    }
    Ok(req)
}

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg.into()))
            .map_err(|e: Infallible| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn empty_body() -> Body {
    Full::new(Bytes::new())
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

/// Bounds on the endpoint's connections, so idle, slow or numerous clients cannot pin the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// How long a client may take to complete its TLS handshake.
    pub handshake_timeout: std::time::Duration,
    /// How long a client may take to send a request's headers (also how long an idle
    /// keep-alive HTTP/1.1 connection stays open, and the ping interval and timeout of an
    /// HTTP/2 one).
    pub header_timeout: std::time::Duration,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: std::time::Duration::from_secs(10),
            header_timeout: std::time::Duration::from_secs(10),
            max_connections: 512,
        }
    }
}

/// Serves the kubelet API.
pub struct KubeletApi {
    client: kube::Client,
    sessions: Arc<dyn Sessions>,
    inventory: watch::Receiver<DeviceMap>,
    metrics: Arc<Metrics>,
    /// TokenReview answers by salted token hash: the caller, or `None` when rejected.
    tokens: auth_cache::TtlCache<[u8; 32], Option<Caller>>,
    token_salt: [u8; 16],
    /// SubjectAccessReview answers by caller and attributes.
    decisions: auth_cache::TtlCache<String, bool>,
    limits: ConnectionLimits,
    /// The devices' resource figures (`/stats/summary`, `/metrics/resource`, `/runningpods/`).
    figures: Arc<crate::node_stats::StatsStore>,
}

impl KubeletApi {
    /// An endpoint resolving pods through `client` and logs through `sessions`.
    pub fn new(
        client: kube::Client,
        sessions: Arc<dyn Sessions>,
        inventory: watch::Receiver<DeviceMap>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            sessions,
            inventory,
            metrics,
            tokens: auth_cache::TtlCache::new(auth_cache::MAX_ENTRIES),
            token_salt: rand::random(),
            decisions: auth_cache::TtlCache::new(auth_cache::MAX_ENTRIES),
            limits: ConnectionLimits::default(),
            figures: Arc::default(),
        }
    }

    /// The same endpoint serving the devices' resource figures from `figures` (the link's
    /// [`crate::link::DeviceSessions::resource_stats`]).
    #[must_use]
    pub fn with_figures(mut self, figures: Arc<crate::node_stats::StatsStore>) -> Self {
        self.figures = figures;
        self
    }

    /// The same endpoint with other connection bounds.
    #[must_use]
    pub fn with_limits(mut self, limits: ConnectionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Binds the listen address.
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, KubeletApiError> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| KubeletApiError::Bind { addr, source })
    }

    /// Accepts connections on the shared port until `shutdown`: requests that name their pod
    /// (`/containerLogs`) only.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: CancellationToken,
    ) {
        self.serve_for(listener, tls, None, shutdown).await;
    }

    /// Listens on every Node's own port (see [`ports`]) until `shutdown`: a listener is opened
    /// when a port is published and closed when it is withdrawn (the device left the
    /// inventory). A port that cannot be bound is logged and tried again every 10 s. The figures
    /// of devices that left the inventory are dropped here too.
    pub async fn serve_node_ports(
        self: Arc<Self>,
        ip: std::net::IpAddr,
        mut ports: watch::Receiver<ports::PortMap>,
        tls: Arc<rustls::ServerConfig>,
        shutdown: CancellationToken,
    ) {
        let mut open: BTreeMap<String, (u16, CancellationToken)> = BTreeMap::new();
        let mut inventory = self.inventory.clone();
        let mut retry = tokio::time::interval(std::time::Duration::from_secs(10));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wanted = ports.borrow_and_update().clone();
            open.retain(|node, (port, stop)| {
                let keep = wanted.get(node) == Some(port);
                if !keep {
                    tracing::info!(%node, port = *port, "kubelet port of node closed");
                    stop.cancel();
                }
                keep
            });
            for (node, port) in wanted.iter() {
                if open.contains_key(node) {
                    continue;
                }
                let addr = SocketAddr::new(ip, *port);
                match Self::bind(addr).await {
                    Ok(listener) => {
                        tracing::info!(%node, %addr, "kubelet port of node listening");
                        let stop = shutdown.child_token();
                        open.insert(node.clone(), (*port, stop.clone()));
                        tokio::spawn(self.clone().serve_for(
                            listener,
                            tls.clone(),
                            Some(Arc::from(node.as_str())),
                            stop,
                        ));
                    }
                    Err(error) => {
                        tracing::error!(%node, %error, "kubelet port of node not served; retrying in 10 s");
                    }
                }
            }
            {
                let inv = inventory.borrow_and_update();
                self.figures
                    .retain(|d| inv.get(d).is_some_and(|r| r.enabled));
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = ports.changed() => if r.is_err() { return },
                r = inventory.changed() => if r.is_err() { return },
                _ = retry.tick(), if open.len() < wanted.len() => {}
            }
        }
    }

    /// Accepts connections until `shutdown`; `node` is the Node the port belongs to.
    async fn serve_for(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        node: Option<Arc<str>>,
        shutdown: CancellationToken,
    ) {
        let acceptor = TlsAcceptor::from(tls);
        let limits = self.limits;
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let mut acceptor_tcp = fleetlet_os::net::Acceptor::new(listener, "kubelet endpoint");
        loop {
            // A connection slot first: at the limit, new connections wait in the backlog.
            let permit = tokio::select! {
                () = shutdown.cancelled() => return,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let Some((tcp, peer)) = acceptor_tcp.accept(&shutdown).await else {
                return;
            };
            let acceptor = acceptor.clone();
            let this = self.clone();
            let shutdown = shutdown.clone();
            let node = node.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "kubelet endpoint TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "kubelet endpoint TLS handshake timed out; connection closed");
                        return;
                    }
                };
                let cert_caller = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| caller_from_cert(c.as_ref()));
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let this = this.clone();
                    let cert_caller = cert_caller.clone();
                    let node = node.clone();
                    async move {
                        Ok::<_, Infallible>(this.handle(req, cert_caller, node.as_deref()).await)
                    }
                });
                // HTTP/2 when the client offers it, as a kubelet serves: the API server then
                // reads a log's last bytes and its end as separate events (over HTTP/1.1 a read
                // can return both, and its websocket relay of logs drops the bytes of a read that
                // ends the stream). Upgrades (exec, attach, port-forward) come over HTTP/1.1.
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                let io = TokioIo::new(tls);
                let r = if h2 {
                    let conn = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .timer(hyper_util::rt::TokioTimer::new())
                    // A peer that stops answering pings is dropped (HTTP/2's stand-in for the
                    // header timeout), and one connection carries a bounded number of requests.
                    .keep_alive_interval(Some(limits.header_timeout))
                    .keep_alive_timeout(limits.header_timeout)
                    .max_concurrent_streams(MAX_H2_STREAMS)
                    .serve_connection(io, service);
                    tokio::select! {
                        r = conn => r,
                        () = shutdown.cancelled() => Ok(()),
                    }
                } else {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(limits.header_timeout)
                        .serve_connection(io, service)
                        // exec, attach and port-forward switch the connection to SPDY.
                        .with_upgrades();
                    tokio::select! {
                        r = conn => r,
                        () = shutdown.cancelled() => Ok(()),
                    }
                };
                if let Err(error) = r {
                    tracing::debug!(%peer, %error, "kubelet endpoint connection ended");
                }
            });
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        cert_caller: Option<Caller>,
        node: Option<&str>,
    ) -> Response<Body> {
        // Who, then whether they may, and only then what: every path, known or not, answers
        // 401/403 to a caller without the right, as the kubelet does.
        let caller = match cert_caller {
            Some(c) => c,
            None => match bearer(&req) {
                Some(token) => match self.authenticate(token).await {
                    Ok(Some(c)) => c,
                    Ok(None) => return text(StatusCode::UNAUTHORIZED, "Unauthorized"),
                    Err(error) => {
                        tracing::warn!(%error, "TokenReview failed");
                        return text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "authentication unavailable",
                        );
                    }
                },
                None => return text(StatusCode::UNAUTHORIZED, "Unauthorized"),
            },
        };
        // On a Node's own port the request is for that Node and is authorized as the kubelet
        // does it: the subresource its path maps to, on that Node. The shared port serves
        // every Node, so a request there does not say which Node it is for until its pod is
        // looked up; the caller must then be allowed `nodes/proxy` on all nodes (as the API
        // server's kubelet client is) before any lookup.
        let attrs = request_attributes(req.method(), req.uri().path(), node);
        match self.authorize(&caller, &attrs).await {
            Ok(true) => {}
            Ok(false) => {
                return text(
                    StatusCode::FORBIDDEN,
                    format!(
                        "Forbidden (user={}, verb={}, resource=nodes, subresource(s)=[{}])",
                        caller.user,
                        attrs.verb,
                        attrs.subresources.join(" ")
                    ),
                );
            }
            Err(error) => {
                tracing::warn!(%error, "SubjectAccessReview failed");
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "authorization unavailable",
                );
            }
        }
        if let Some(path) = streaming::parse_stream_path(req.uri().path()) {
            return self.handle_stream(req, path, &caller).await;
        }
        if let Some(route) = NodeRoute::of(req.uri().path()) {
            let Some(node) = node else {
                return text(
                    StatusCode::NOT_FOUND,
                    format!(
                        "{} names no node; fleetlet-hub serves it on each Node's own kubelet port (its status.daemonEndpoints; [kubelet] node_ports), not on the shared port",
                        req.uri().path()
                    ),
                );
            };
            if req.method() != Method::GET {
                return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported");
            }
            return self.node_request(node, route, req.uri().query()).await;
        }
        let Some(path) = parse_logs_path(req.uri().path()) else {
            return text(
                StatusCode::NOT_FOUND,
                format!("{} is not served by fleetlet-hub", req.uri().path()),
            );
        };
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported");
        }
        let mut log_req = match parse_log_query(req.uri().query()) {
            Ok(r) => r,
            Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &path.namespace);
        let pod = pods.get_opt(&path.pod).await;
        self.metrics.api("get_pod", &pod);
        let pod = match pod {
            Ok(Some(p)) => p,
            Ok(None) => {
                return text(
                    StatusCode::NOT_FOUND,
                    format!("pod {}/{} not found", path.namespace, path.pod),
                );
            }
            Err(error) => {
                tracing::warn!(%error, "reading pod for logs");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the pod");
            }
        };
        let on_port = node;
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if on_port.is_some_and(|n| n != node)
            || !self
                .inventory
                .borrow()
                .get(&node)
                .is_some_and(|d| d.enabled)
        {
            return text(
                StatusCode::NOT_FOUND,
                format!(
                    "pod {}/{} is not on a fleetlet device",
                    path.namespace, path.pod
                ),
            );
        }
        let spec = pod.spec.as_ref();
        let known = spec.is_some_and(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| c.name == path.container)
                || s.ephemeral_containers
                    .iter()
                    .flatten()
                    .any(|c| c.name == path.container)
        });
        if !known {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "container {} is not valid for pod {}",
                    path.container, path.pod
                ),
            );
        }
        log_req.pod_uid = pod.metadata.uid.clone().unwrap_or_default();
        log_req.container = path.container.clone();
        tracing::debug!(pod = %path.pod, namespace = %path.namespace, container = %path.container, device = %node, user = %caller.user, follow = log_req.follow, "log request");
        let opened = match self.sessions.open_logs(&node, log_req).await {
            // The device's answer decides the status, as the kubelet's does: a refusal (no such
            // container, no previous instance) that comes as the first chunk is an error
            // response, not an empty 200 the API server would pass on as an empty log. A log
            // that has nothing to say yet (follow) starts streaming after a short wait.
            Ok(mut stream) => {
                match tokio::time::timeout(FIRST_LOG_CHUNK_WAIT, stream.next()).await {
                    Ok(Some(Err(e))) => Err(e),
                    Ok(Some(Ok(first))) => Ok(futures::stream::once(async move { Ok(first) })
                        .chain(stream)
                        .boxed()),
                    Ok(None) => Ok(futures::stream::empty().boxed()),
                    Err(_) => Ok(stream),
                }
            }
            Err(e) => Err(e),
        };
        match opened {
            Ok(stream) => {
                let body = StreamBody::new(
                    stream.map(|chunk| chunk.map(Frame::data).map_err(std::io::Error::other)),
                );
                let mut r = Response::new(BodyExt::boxed_unsync(body));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                r
            }
            Err(e) => self.log_refused(&node, e),
        }
    }

    /// The answer to a log request the device's link could not serve.
    fn log_refused(&self, node: &str, e: LinkError) -> Response<Body> {
        match e {
            // 400 like the kubelet's "container is waiting to start": the API server passes a
            // 400's text to kubectl verbatim, while a 503 becomes a generic message.
            e @ LinkError::NotConnected { .. } => text(
                StatusCode::BAD_REQUEST,
                format!(
                    "device {node} is offline (not connected to fleetlet-hub); logs are unavailable until it reconnects: {e}"
                ),
            ),
            // What the device said about the request (no such container, no previous
            // instance): a 400 with its words, as the kubelet answers.
            LinkError::Device { message, .. } => text(StatusCode::BAD_REQUEST, message),
            e => text(
                StatusCode::BAD_GATEWAY,
                format!("device {node} could not stream the log: {e}"),
            ),
        }
    }

    /// A TokenReview, answered from the cache when the same token was reviewed within
    /// [`auth_cache::TOKEN_TTL`]. Errors are not cached.
    async fn authenticate(&self, token: String) -> Result<Option<Caller>, kube::Error> {
        let key = auth_cache::token_key(&self.token_salt, &token);
        if let Some(cached) = self.tokens.get(&key) {
            return Ok(cached);
        }
        let caller = self.token_review(token).await?;
        self.tokens
            .insert(key, caller.clone(), auth_cache::TOKEN_TTL);
        Ok(caller)
    }

    async fn token_review(&self, token: String) -> Result<Option<Caller>, kube::Error> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token,
                audiences: None,
            },
            ..Default::default()
        };
        let r = api.create(&PostParams::default(), &review).await;
        self.metrics.api("create_tokenreview", &r);
        let status = r?.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Ok(None);
        }
        let user = status.user.unwrap_or_default();
        Ok(Some(Caller {
            user: user.username.unwrap_or_default(),
            uid: user.uid,
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default().into_iter().collect(),
        }))
    }

    /// Whether `caller` may do what `attrs` describe: a SubjectAccessReview per subresource
    /// until one allows (as the kubelet tries `pods` then `proxy`), each answered from the cache
    /// within [`auth_cache::ALLOWED_TTL`] / [`auth_cache::DENIED_TTL`]. Errors are not cached.
    async fn authorize(&self, caller: &Caller, attrs: &Attributes) -> Result<bool, kube::Error> {
        for sub in &attrs.subresources {
            let key = format!(
                "{:?}\0{:?}\0{:?}\0{:?}\0{} nodes/{sub} {:?}",
                caller.user, caller.uid, caller.groups, caller.extra, attrs.verb, attrs.node
            );
            let allowed = match self.decisions.get(&key) {
                Some(allowed) => allowed,
                None => {
                    let allowed = self
                        .subject_access_review(caller, attrs.verb, sub, attrs.node.as_deref())
                        .await?;
                    let ttl = if allowed {
                        auth_cache::ALLOWED_TTL
                    } else {
                        auth_cache::DENIED_TTL
                    };
                    self.decisions.insert(key, allowed, ttl);
                    allowed
                }
            };
            if allowed {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn subject_access_review(
        &self,
        caller: &Caller,
        verb: &str,
        subresource: &str,
        node: Option<&str>,
    ) -> Result<bool, kube::Error> {
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(caller.user.clone()),
                uid: caller.uid.clone(),
                groups: Some(caller.groups.clone()),
                extra: (!caller.extra.is_empty())
                    .then(|| caller.extra.clone().into_iter().collect()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.into()),
                    version: Some("v1".into()),
                    resource: Some("nodes".into()),
                    subresource: Some(subresource.into()),
                    name: node.map(str::to_string),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = api.create(&PostParams::default(), &review).await;
        self.metrics.api("create_subjectaccessreview", &r);
        Ok(r?.status.is_some_and(|s| s.allowed))
    }

    /// A device sends figures only while someone reads them: ask it (again, before the last
    /// request runs out) and, when what it sent last is not current, wait up to
    /// [`FIGURES_WAIT`] for a fresh reading.
    async fn await_figures(&self, node: &str, connected: bool) {
        self.sessions.request_stats(node);
        if !connected {
            return;
        }
        let deadline = tokio::time::Instant::now() + FIGURES_WAIT;
        loop {
            let now = tokio::time::Instant::now();
            let fresh = self
                .figures
                .get(node)
                .is_some_and(|f| crate::node_stats::StatsStore::fresh(&f, true, now));
            if fresh || now >= deadline {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Serves a request that concerns the whole Node (`node` is the port's Node).
    async fn node_request(
        &self,
        node: &str,
        route: NodeRoute,
        query: Option<&str>,
    ) -> Response<Body> {
        if !self.inventory.borrow().get(node).is_some_and(|d| d.enabled) {
            return text(
                StatusCode::NOT_FOUND,
                format!("node {node} is not a fleetlet device in the inventory"),
            );
        }
        // The API's pods on this Node: `/pods` itself, and the only pods whose figures are
        // served (a device names its pods itself; see DeviceFigures::bound_to).
        let listed = {
            let pods: Api<Pod> = Api::all(self.client.clone());
            let lp = kube::api::ListParams::default().fields(&format!("spec.nodeName={node}"));
            let r = pods.list(&lp).await;
            self.metrics.api("list_node_pods", &r);
            match r {
                Ok(list) => list.items,
                Err(error) => {
                    tracing::warn!(%error, %node, "listing the node's pods");
                    return text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "cannot list the node's pods",
                    );
                }
            }
        };
        let bound: std::collections::HashMap<String, (String, String)> = listed
            .iter()
            .filter_map(|p| {
                Some((
                    p.metadata.uid.clone()?,
                    (p.metadata.namespace.clone()?, p.metadata.name.clone()?),
                ))
            })
            .collect();
        let connected = self.sessions.is_connected(node);
        if !matches!(route, NodeRoute::Pods) {
            self.await_figures(node, connected).await;
        }
        let figures = self.figures.get(node).map(|f| f.bound_to(&bound));
        let now = tokio::time::Instant::now();
        let fresh = figures
            .as_ref()
            .filter(|f| crate::node_stats::StatsStore::fresh(f, connected, now));
        let unavailable = || {
            let why = match (&figures, connected) {
                (_, false) => "is offline (not connected to fleetlet-hub)",
                (None, true) => "has not reported resource figures yet",
                (Some(_), true) => "has not reported resource figures recently",
            };
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("device {node} {why}; its figures are not served as current"),
            )
        };
        match route {
            NodeRoute::StatsSummary => {
                let only = match query_flag(query, "only_cpu_and_memory") {
                    Ok(v) => v,
                    Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
                };
                match fresh {
                    Some(f) => json_response(&stats::summary(node, f, only)),
                    None => unavailable(),
                }
            }
            NodeRoute::MetricsResource => {
                let mut r = text(StatusCode::OK, stats::resource_metrics(fresh));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            NodeRoute::RunningPods => match fresh {
                Some(f) => json_response(&stats::running_pods(f)),
                None => unavailable(),
            },
            NodeRoute::Pods => {
                let items = listed
                    .into_iter()
                    .filter_map(|mut p| {
                        p.metadata.managed_fields = None;
                        let mut v = serde_json::to_value(p).ok()?;
                        if let Some(o) = v.as_object_mut() {
                            o.remove("kind");
                            o.remove("apiVersion");
                        }
                        Some(v)
                    })
                    .collect();
                json_response(&stats::pod_list(items))
            }
        }
    }
}

/// How long a stats read waits for a device's fresh reading (metrics-server's default
/// kubelet request timeout is 10 s).
const FIGURES_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The paths that concern a whole Node, served on the Node's own port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRoute {
    /// `/stats/summary`.
    StatsSummary,
    /// `/metrics/resource`.
    MetricsResource,
    /// `/pods`.
    Pods,
    /// `/runningpods/`.
    RunningPods,
}

impl NodeRoute {
    /// The route of `path`, if it is one of them.
    pub fn of(path: &str) -> Option<Self> {
        match path.trim_end_matches('/') {
            "/stats/summary" => Some(Self::StatsSummary),
            "/metrics/resource" => Some(Self::MetricsResource),
            "/pods" => Some(Self::Pods),
            "/runningpods" => Some(Self::RunningPods),
            _ => None,
        }
    }
}

/// What a request asks, for authorization: the kubelet's mapping of paths to `nodes`
/// subresources (pkg/kubelet/server/auth.go, with fine-grained authorization).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// API verb from the HTTP method.
    pub verb: &'static str,
    /// Subresources tried in turn; any one allowing is enough.
    pub subresources: Vec<&'static str>,
    /// The Node (none on the shared port: all nodes).
    pub node: Option<String>,
}

/// The authorization attributes of a request on `node`'s port (or the shared port).
pub fn request_attributes(method: &Method, path: &str, node: Option<&str>) -> Attributes {
    let verb = match *method {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "get",
    };
    // The shared port: every Node's, so `nodes/proxy` on all of them, with the method's verb
    // (exec, attach and port-forward are POSTs: `create`, as the kubelet maps them).
    let Some(node) = node else {
        return Attributes {
            verb,
            subresources: vec!["proxy"],
            node: None,
        };
    };
    let sub = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
    let subresources = if sub("/pods") || sub("/runningpods") {
        vec!["pods", "proxy"]
    } else if sub("/stats") {
        vec!["stats"]
    } else if sub("/metrics") {
        vec!["metrics"]
    } else if sub("/logs") {
        vec!["log"]
    } else {
        vec!["proxy"]
    };
    Attributes {
        verb,
        subresources,
        node: Some(node.to_string()),
    }
}

/// A boolean query parameter (`true`, `1`, empty: true); absent is false.
fn query_flag(query: Option<&str>, name: &str) -> Result<bool, QueryError> {
    for pair in query.unwrap_or_default().split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            return match query_value(v).as_str() {
                "" | "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                other => Err(QueryError {
                    name: name.to_string(),
                    value: other.to_string(),
                }),
            };
        }
    }
    Ok(false)
}

fn json_response(v: &serde_json::Value) -> Response<Body> {
    let mut r = text(StatusCode::OK, v.to_string());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn bearer(req: &Request<Incoming>) -> Option<String> {
    let v = req
        .headers()
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let token = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?
        .trim();
    (!token.is_empty()).then(|| token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_paths_parse() {
        assert_eq!(
            parse_logs_path("/containerLogs/ns/web-1/app"),
            Some(LogsPath {
                namespace: "ns".into(),
                pod: "web-1".into(),
                container: "app".into()
            })
        );
        assert_eq!(parse_logs_path("/containerLogs/ns/web-1"), None);
        assert_eq!(parse_logs_path("/containerLogs/ns//app"), None);
        assert_eq!(parse_logs_path("/exec/ns/p/c"), None);
    }

    #[test]
    fn log_queries_parse_like_the_kubelet() {
        let r = parse_log_query(Some(
            "follow=true&tailLines=10&sinceSeconds=60&timestamps=true&previous=false&limitBytes=500",
        ))
        .expect("valid");
        assert!(r.follow && r.timestamps && !r.previous);
        assert_eq!(
            (r.tail_lines, r.since_seconds, r.limit_bytes),
            (Some(10), Some(60), Some(500))
        );
        let r = parse_log_query(Some("sinceTime=2026-01-02T03%3A04%3A05Z")).expect("valid");
        assert_eq!(r.since_unix, Some(1_767_323_045));
        assert_eq!(parse_log_query(None).expect("empty"), LogRequest::default());
        let e = parse_log_query(Some("tailLines=ten")).expect_err("not a number");
        assert_eq!(e.name, "tailLines");
        assert!(parse_log_query(Some("follow=maybe")).is_err());
    }

    #[test]
    fn node_paths_map_to_the_kubelets_subresources() {
        let attrs = |m: &Method, p: &str, n: Option<&str>| request_attributes(m, p, n);
        let on = Some("dev-1");
        let a = attrs(&Method::GET, "/stats/summary", on);
        assert_eq!(
            (a.verb, a.subresources.clone(), a.node.as_deref()),
            ("get", vec!["stats"], Some("dev-1"))
        );
        assert_eq!(
            attrs(&Method::GET, "/metrics/resource", on).subresources,
            ["metrics"]
        );
        assert_eq!(
            attrs(&Method::GET, "/pods", on).subresources,
            ["pods", "proxy"]
        );
        assert_eq!(
            attrs(&Method::GET, "/runningpods/", on).subresources,
            ["pods", "proxy"]
        );
        assert_eq!(
            attrs(&Method::GET, "/containerLogs/a/b/c", on).subresources,
            ["proxy"]
        );
        assert_eq!(attrs(&Method::GET, "/statsx", on).subresources, ["proxy"]);
        assert_eq!(attrs(&Method::POST, "/exec/a/b/c", on).verb, "create");
        // The shared port: get nodes/proxy on all nodes, whatever the path.
        let shared = attrs(&Method::GET, "/stats/summary", None);
        assert_eq!((shared.subresources, shared.node), (vec!["proxy"], None));
        assert_eq!(
            NodeRoute::of("/stats/summary/"),
            Some(NodeRoute::StatsSummary)
        );
        assert_eq!(NodeRoute::of("/runningpods"), Some(NodeRoute::RunningPods));
        assert_eq!(NodeRoute::of("/stats"), None);
        assert_eq!(
            query_flag(Some("only_cpu_and_memory=true"), "only_cpu_and_memory"),
            Ok(true)
        );
        assert_eq!(query_flag(None, "only_cpu_and_memory"), Ok(false));
        assert!(query_flag(Some("only_cpu_and_memory=yes"), "only_cpu_and_memory").is_err());
    }

    #[test]
    fn query_values_are_form_decoded() {
        assert_eq!(query_value("a%3Ab+c"), "a:b c");
        assert_eq!(query_value("100%"), "100%");
    }

    /// A kube client that is never called (nothing here reaches authentication).
    fn idle_client() -> kube::Client {
        let config = kube::Config::new("https://127.0.0.1:9".parse().expect("uri"));
        kube::Client::try_from(config).expect("client")
    }

    struct NoSessions;
    impl Sessions for NoSessions {
        fn request_stats(&self, _device: &str) {}

        fn set_desired(
            &self,
            _device: &str,
            _pods: Vec<fleetlet_proto::v1::PodBundle>,
            _grace: std::collections::HashMap<String, u64>,
        ) -> u64 {
            0
        }
        fn is_connected(&self, _device: &str) -> bool {
            false
        }
        fn live(&self) -> watch::Receiver<crate::devices::LiveSet> {
            crate::devices::LiveRegistry::new().subscribe()
        }
        fn open_logs(
            &self,
            device: &str,
            _req: LogRequest,
        ) -> futures::future::BoxFuture<'static, Result<crate::sessions::LogStream, LinkError>>
        {
            let device = device.to_string();
            Box::pin(async { Err(LinkError::NotConnected { device }) })
        }
    }

    #[tokio::test]
    async fn idle_and_excess_connections_are_bounded() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        let dir = std::env::temp_dir().join(format!("fleetlet-kapi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("tls.crt"), cert.pem()).expect("cert file");
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("key file");
        let cfg = KubeletConfig {
            cert_file: Some(dir.join("tls.crt")),
            key_file: Some(dir.join("tls.key")),
            ..KubeletConfig::default()
        };
        let tls = tls_config(&cfg).expect("tls");
        let listener = KubeletApi::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_inv_tx, inv_rx) = watch::channel(Arc::new(Default::default()));
        let second = std::time::Duration::from_secs(1);
        let api = Arc::new(
            KubeletApi::new(
                idle_client(),
                Arc::new(NoSessions),
                inv_rx,
                Arc::new(Metrics::new()),
            )
            .with_limits(ConnectionLimits {
                handshake_timeout: second,
                header_timeout: second,
                max_connections: 2,
            }),
        );
        let shutdown = CancellationToken::new();
        tokio::spawn(api.serve(listener, tls, shutdown.clone()));

        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let client_cfg = Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let handshake = || {
            let client_cfg = client_cfg.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
                tokio_rustls::TlsConnector::from(client_cfg)
                    .connect(
                        rustls_pki_types::ServerName::try_from("localhost").expect("name"),
                        tcp,
                    )
                    .await
            }
        };
        // Two connections that never handshake take both slots.
        let idle = [
            tokio::net::TcpStream::connect(addr).await.expect("idle 1"),
            tokio::net::TcpStream::connect(addr).await.expect("idle 2"),
        ];
        let started = tokio::time::Instant::now();
        let mut tls_conn = tokio::time::timeout(std::time::Duration::from_secs(10), handshake())
            .await
            .expect("handshake within the bound")
            .expect("handshake");
        let waited = started.elapsed();
        assert!(
            waited >= std::time::Duration::from_millis(800),
            "a third connection waited for a slot: {waited:?}"
        );
        // The idle ones were closed by the handshake timeout.
        for mut c in idle {
            let mut buf = [0u8; 8];
            let n = tokio::io::AsyncReadExt::read(&mut c, &mut buf).await;
            assert!(matches!(n, Ok(0) | Err(_)), "closed: {n:?}");
        }
        // A TLS connection that sends no request is closed after the header timeout.
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(&mut tls_conn, &mut buf),
        )
        .await
        .expect("closed within the bound");
        assert!(matches!(n, Ok(0) | Err(_)), "closed: {n:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        shutdown.cancel();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn client_certificates_map_to_user_and_groups() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver-kubelet-client");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:masters");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let caller = caller_from_cert(cert.der()).expect("caller");
        assert_eq!(caller.user, "kube-apiserver-kubelet-client");
        assert_eq!(caller.groups, ["system:masters"]);
    }
}
