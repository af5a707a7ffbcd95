//! The kubelet's streaming endpoints, relayed to the device over its link: `/exec`, `/attach`
//! (remotecommand) and `/portForward`.
//!
//! The API server proxies `kubectl exec/attach` (which speak websockets to it) to a kubelet as
//! SPDY/3.1 (`streamtranslator.go`) and tunnels `kubectl port-forward`'s SPDY through its
//! websocket (`streamtunnel.go`), so the hub serves SPDY: the upgrade handshake negotiates a
//! protocol version from `X-Stream-Protocol-Version`, then the client opens one SPDY stream per
//! channel (`streamType` header). Each exec/attach session, and each port-forward connection,
//! is one stream on the device's link (`crate::link::StreamInput`/`StreamOutput`). Clients that
//! call the endpoint directly may use websockets instead (`websocket.rs`).

pub mod dictionary;
mod portforward;
mod remotecommand;
pub mod spdy;
pub mod websocket;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use super::{Body, Caller, KubeletApi, query_value, text};
use crate::link::LinkError;

/// remotecommand protocols the hub speaks, most preferred first (the kubelet's list).
pub const REMOTECOMMAND_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// The port-forward protocol.
pub const PORTFORWARD_PROTOCOLS: &[&str] = &["portforward.k8s.io"];

/// Which endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/exec`.
    Exec,
    /// `/attach`.
    Attach,
    /// `/portForward`.
    PortForward,
}

/// A streaming request's path, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPath {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID, when the path carries one.
    pub uid: Option<String>,
    /// Container (exec, attach).
    pub container: Option<String>,
}

/// Parses `/exec|attach/{ns}/{pod}[/{uid}]/{container}` and `/portForward/{ns}/{pod}[/{uid}]`.
pub fn parse_stream_path(path: &str) -> Option<StreamPath> {
    let path = path.trim_end_matches('/');
    let (endpoint, rest) = if let Some(r) = path.strip_prefix("/exec/") {
        (Endpoint::Exec, r)
    } else if let Some(r) = path.strip_prefix("/attach/") {
        (Endpoint::Attach, r)
    } else if let Some(r) = path.strip_prefix("/portForward/") {
        (Endpoint::PortForward, r)
    } else {
        return None;
    };
    let parts: Vec<String> = rest
        .split('/')
        .map(fleetlet_proto::percent::decode)
        .collect();
    if parts.iter().any(String::is_empty) {
        return None;
    }
    let p = |namespace: &String, pod: &String, uid: Option<&String>, container: Option<&String>| {
        Some(StreamPath {
            endpoint,
            namespace: namespace.clone(),
            pod: pod.clone(),
            uid: uid.cloned(),
            container: container.cloned(),
        })
    };
    match (endpoint, parts.as_slice()) {
        (Endpoint::PortForward, [ns, pod]) => p(ns, pod, None, None),
        (Endpoint::PortForward, [ns, pod, uid]) => p(ns, pod, Some(uid), None),
        (Endpoint::Exec | Endpoint::Attach, [ns, pod, container]) => {
            p(ns, pod, None, Some(container))
        }
        (Endpoint::Exec | Endpoint::Attach, [ns, pod, uid, container]) => {
            p(ns, pod, Some(uid), Some(container))
        }
        _ => None,
    }
}

/// The kubelet's remotecommand query: `command` (repeated), `input`, `output`, `error`, `tty`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteCommandQuery {
    /// The command and its arguments (exec).
    pub command: Vec<String>,
    /// stdin attached.
    pub stdin: bool,
    /// stdout attached.
    pub stdout: bool,
    /// stderr attached (never with a TTY).
    pub stderr: bool,
    /// A TTY.
    pub tty: bool,
}

/// Parses the remotecommand query as the kubelet does (`"1"` or `"true"` is on; stderr is
/// dropped with a TTY; at least one stream is required).
pub fn parse_remotecommand_query(query: Option<&str>) -> Result<RemoteCommandQuery, String> {
    let mut q = RemoteCommandQuery::default();
    let on = |v: &str| v == "1" || v.eq_ignore_ascii_case("true");
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = query_value(v);
        match k {
            "command" => q.command.push(v),
            "input" | "stdin" => q.stdin = on(&v),
            "output" | "stdout" => q.stdout = on(&v),
            "error" | "stderr" => q.stderr = on(&v),
            "tty" => q.tty = on(&v),
            _ => {}
        }
    }
    if q.tty {
        q.stderr = false;
    }
    if !q.stdin && !q.stdout && !q.stderr {
        return Err("you must specify at least 1 of stdin, stdout, stderr".into());
    }
    Ok(q)
}

/// The protocol both sides speak: the first of the client's offers (in order) that the server
/// speaks; `Some("")` when the client offered none (the kubelet then falls back to v1).
pub fn negotiate(client: &[String], server: &[&str]) -> Option<String> {
    if client.is_empty() {
        return Some(String::new());
    }
    client
        .iter()
        .find(|c| server.contains(&c.as_str()))
        .cloned()
}

/// The protocols the client offers, from every `name` header (`X-Stream-Protocol-Version` for
/// SPDY, `Sec-WebSocket-Protocol` for websockets; each may hold a comma-separated list).
fn header_list(req: &Request<Incoming>, name: &str) -> Vec<String> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

fn is_spdy_upgrade(req: &Request<Incoming>) -> bool {
    let has = |name: http::header::HeaderName, want: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(want)))
        })
    };
    has(http::header::CONNECTION, "upgrade") && has(http::header::UPGRADE, "SPDY/3.1")
}

fn is_websocket(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

impl KubeletApi {
    /// Serves `/exec`, `/attach` and `/portForward` for an authorized caller.
    pub(super) async fn handle_stream(
        &self,
        mut req: Request<Incoming>,
        path: StreamPath,
        caller: &Caller,
    ) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::POST {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and POST are supported",
            );
        }
        let query = match path.endpoint {
            Endpoint::PortForward => None,
            _ => match parse_remotecommand_query(req.uri().query()) {
                Ok(q) => Some(q),
                Err(e) => return text(StatusCode::BAD_REQUEST, e),
            },
        };
        if let Some(q) = &query
            && path.endpoint == Endpoint::Exec
            && q.command.is_empty()
        {
            return text(
                StatusCode::BAD_REQUEST,
                "a command is required (command=...)",
            );
        }
        let (pod, node) = match self.stream_pod(&path).await {
            Ok(found) => found,
            Err(response) => return response,
        };
        let websocket = is_websocket(&req);
        let ws_ports = if websocket && path.endpoint == Endpoint::PortForward {
            match websocket::parse_ports(req.uri().query()) {
                Ok(p) => Some(p),
                Err(e) => return text(StatusCode::BAD_REQUEST, e),
            }
        } else {
            None
        };
        let ws_key = req
            .headers()
            .get("sec-websocket-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if websocket && ws_key.is_none() {
            return text(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is required");
        }
        if !websocket && !is_spdy_upgrade(&req) {
            return text(
                StatusCode::BAD_REQUEST,
                "Upgrade request required (Connection: Upgrade, Upgrade: SPDY/3.1 or websocket)",
            );
        }
        let server = match path.endpoint {
            Endpoint::PortForward if websocket => websocket::PORTFORWARD_PROTOCOLS,
            _ if websocket => websocket::PROTOCOLS,
            Endpoint::PortForward => PORTFORWARD_PROTOCOLS,
            _ => REMOTECOMMAND_PROTOCOLS,
        };
        let offered = if websocket {
            header_list(&req, "sec-websocket-protocol")
        } else {
            header_list(&req, "x-stream-protocol-version")
        };
        let Some(protocol) = negotiate(&offered, server) else {
            let mut r = text(
                StatusCode::FORBIDDEN,
                format!(
                    "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server supports {server:?}"
                ),
            );
            if let Ok(v) = http::HeaderValue::from_str(&server.join(", ")) {
                r.headers_mut()
                    .insert("x-accepted-stream-protocol-versions", v);
            }
            return r;
        };
        let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
        // exec and attach open their device stream before switching protocols, so a refusal
        // (offline device, stream limit) is an HTTP error the user reads verbatim.
        let session = match (&query, path.endpoint) {
            (Some(q), Endpoint::Exec | Endpoint::Attach) => {
                let kind = if path.endpoint == Endpoint::Exec {
                    fleetlet_proto::v1::StreamKind::Exec
                } else {
                    fleetlet_proto::v1::StreamKind::Attach
                };
                let open = fleetlet_proto::v1::StreamOpen {
                    kind: kind as i32,
                    pod_uid: pod_uid.clone(),
                    container: path.container.clone().unwrap_or_default(),
                    command: q.command.clone(),
                    tty: q.tty,
                    stdin: q.stdin,
                    stdout: q.stdout,
                    stderr: q.stderr,
                    ..Default::default()
                };
                match self.sessions.open_stream(&node, open).await {
                    Ok(s) => Some(s),
                    Err(e) => return self.stream_refused(&node, &e),
                }
            }
            // Port-forward opens one device stream per forwarded connection, later; an offline
            // device is refused now all the same.
            _ if !self.sessions.is_connected(&node) => {
                return self.stream_refused(
                    &node,
                    &LinkError::NotConnected {
                        device: node.clone(),
                    },
                );
            }
            _ => None,
        };
        tracing::info!(
            endpoint = ?path.endpoint,
            namespace = %path.namespace,
            pod = %path.pod,
            container = path.container.as_deref().unwrap_or(""),
            device = %node,
            user = %caller.user,
            protocol = %protocol,
            "streaming session"
        );
        let on_upgrade = hyper::upgrade::on(&mut req);
        let sessions = self.sessions.clone();
        let endpoint = path.endpoint;
        let peer = format!("{}/{}", path.namespace, path.pod);
        let protocol_for_task = protocol.clone();
        let query_for_task = query.clone();
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(error) => {
                    tracing::debug!(%error, "streaming upgrade failed");
                    return;
                }
            };
            if let Some(ports) = ws_ports {
                websocket::serve_portforward(
                    TokioIo::new(upgraded),
                    ports,
                    sessions,
                    node,
                    pod_uid,
                )
                .await;
                return;
            }
            if websocket {
                if let (Some(session), Some(q)) = (session, query_for_task) {
                    websocket::serve(TokioIo::new(upgraded), &protocol_for_task, q, session).await;
                }
                return;
            }
            let conn = spdy::serve(TokioIo::new(upgraded), peer);
            match (endpoint, session, query_for_task) {
                (Endpoint::PortForward, _, _) => {
                    portforward::serve(conn, sessions, node, pod_uid).await;
                }
                (_, Some(session), Some(q)) => {
                    remotecommand::serve(conn, &protocol_for_task, q, session).await;
                }
                _ => {}
            }
        });
        let mut r = Response::new(super::empty_body());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("Upgrade"),
        );
        if let Some(key) = ws_key.filter(|_| websocket) {
            h.insert(
                http::header::UPGRADE,
                http::HeaderValue::from_static("websocket"),
            );
            if let Ok(v) = http::HeaderValue::from_str(&websocket::accept_key(&key)) {
                h.insert("sec-websocket-accept", v);
            }
            if let Ok(v) = http::HeaderValue::from_str(&protocol)
                && !protocol.is_empty()
            {
                h.insert("sec-websocket-protocol", v);
            }
            return r;
        }
        h.insert(
            http::header::UPGRADE,
            http::HeaderValue::from_static("SPDY/3.1"),
        );
        if let Ok(v) = http::HeaderValue::from_str(&protocol)
            && !protocol.is_empty()
        {
            h.insert("x-stream-protocol-version", v);
        }
        r
    }

    /// The pod of a streaming request and the device it runs on, or the response refusing it.
    async fn stream_pod(&self, path: &StreamPath) -> Result<(Pod, String), Response<Body>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &path.namespace);
        let pod = pods.get_opt(&path.pod).await;
        self.metrics.api("get_pod", &pod);
        let pod = match pod {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Err(text(
                    StatusCode::NOT_FOUND,
                    format!("pod {}/{} not found", path.namespace, path.pod),
                ));
            }
            Err(error) => {
                tracing::warn!(%error, "reading pod for a streaming request");
                return Err(text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot read the pod",
                ));
            }
        };
        if let Some(uid) = &path.uid
            && pod.metadata.uid.as_deref() != Some(uid.as_str())
        {
            return Err(text(
                StatusCode::NOT_FOUND,
                format!(
                    "pod {}/{} with uid {uid} not found",
                    path.namespace, path.pod
                ),
            ));
        }
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if !self
            .inventory
            .borrow()
            .get(&node)
            .is_some_and(|d| d.enabled)
        {
            return Err(text(
                StatusCode::NOT_FOUND,
                format!(
                    "pod {}/{} is not on a fleetlet device",
                    path.namespace, path.pod
                ),
            ));
        }
        if let Some(container) = &path.container {
            let spec = pod.spec.as_ref();
            let known = spec.is_some_and(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
                    .any(|c| &c.name == container)
                    || s.ephemeral_containers
                        .iter()
                        .flatten()
                        .any(|c| &c.name == container)
            });
            if !known {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    format!("container {container} is not valid for pod {}", path.pod),
                ));
            }
        }
        Ok((pod, node))
    }

    /// A device stream that could not be opened, as the user sees it (the API server passes a
    /// 400's text through to kubectl).
    /// The answer to a stream the device could not open: an offline device is told apart by
    /// the error itself, not by asking the sessions again (which would race a reconnect).
    fn stream_refused(&self, node: &str, error: &LinkError) -> Response<Body> {
        match error {
            LinkError::NotConnected { .. } => text(
                StatusCode::BAD_REQUEST,
                format!(
                    "device {node} is offline (not connected to fleetlet-hub); exec, attach and port-forward are unavailable until it reconnects"
                ),
            ),
            LinkError::Device { message, .. } => text(StatusCode::BAD_REQUEST, message.clone()),
            other => text(StatusCode::BAD_REQUEST, other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_paths_parse_like_the_kubelets() {
        let exec = parse_stream_path("/exec/ns/web-1/app").expect("exec");
        assert_eq!(
            (exec.endpoint, exec.namespace.as_str(), exec.pod.as_str()),
            (Endpoint::Exec, "ns", "web-1")
        );
        assert_eq!((exec.uid, exec.container.as_deref()), (None, Some("app")));
        let with_uid = parse_stream_path("/attach/ns/web-1/u-1/app").expect("attach");
        assert_eq!(with_uid.endpoint, Endpoint::Attach);
        assert_eq!(with_uid.uid.as_deref(), Some("u-1"));
        let pf = parse_stream_path("/portForward/ns/web-1").expect("pf");
        assert_eq!((pf.endpoint, pf.container), (Endpoint::PortForward, None));
        assert_eq!(
            parse_stream_path("/portForward/ns/web-1/u").and_then(|p| p.uid),
            Some("u".into())
        );
        assert_eq!(parse_stream_path("/exec/ns/web-1"), None);
        assert_eq!(parse_stream_path("/exec/ns//app"), None);
        assert_eq!(parse_stream_path("/portForward/ns/a/b/c"), None);
        assert_eq!(parse_stream_path("/containerLogs/ns/p/c"), None);
    }

    #[test]
    fn remotecommand_queries_parse_like_the_kubelets() {
        let q = parse_remotecommand_query(Some(
            "command=sh&command=-c&command=echo%20hi&input=1&output=1&error=1&tty=1",
        ))
        .expect("valid");
        assert_eq!(q.command, ["sh", "-c", "echo hi"]);
        assert!(q.stdin && q.stdout && q.tty);
        assert!(!q.stderr, "no stderr with a TTY");
        assert!(parse_remotecommand_query(Some("command=ls")).is_err());
        assert!(
            parse_remotecommand_query(Some("command=ls&output=true"))
                .expect("valid")
                .stdout
        );
    }

    #[test]
    fn protocols_are_negotiated() {
        let offered = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            negotiate(
                &offered(&["v4.channel.k8s.io", "v3.channel.k8s.io"]),
                REMOTECOMMAND_PROTOCOLS
            ),
            Some("v4.channel.k8s.io".into())
        );
        assert_eq!(
            negotiate(&offered(&["v5.channel.k8s.io"]), REMOTECOMMAND_PROTOCOLS),
            None
        );
        assert_eq!(negotiate(&[], REMOTECOMMAND_PROTOCOLS), Some(String::new()));
    }
}
