//! A lean HTTP/1.1 client for Podman's libpod REST API over its unix socket.
//!
//! Why not the `podman-api` crate from the design card: evaluated against this machine's Podman
//! 4.3.1 (see `docs/agent.md`, "Podman client"): its generated inspect models type
//! `Config.StopSignal` as an integer, so Podman 5.x inspect responses (a string) fail to parse, and
//! it pulls a second HTTP stack (hyper 0.14) into a binary whose RSS budget is 10 MiB. This client
//! is a few hundred lines on the hyper 1 stack the workspace already uses, and its response types
//! (`types.rs`) accept both 4.x and 5.x shapes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, BodyStream, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use super::types::{
    ContainerInspect, ContainerStats, ContainerSummary, ErrorBody, Event, ExecInspect, IdResponse,
    ImageInspect, PullReport, VersionResponse,
};
use super::{ContainerCreate, LogOptions, PodCreate, PodSummary, PodmanError};
use crate::registry_auth::RegistryAuth;

/// API prefix; Podman 4.0 and later serve it, 5.x included.
const API: &str = "/v4.0.0/libpod";
/// Deadline for calls that should answer quickly.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Client for one Podman API socket.
#[derive(Debug, Clone)]
pub struct PodmanClient {
    socket: PathBuf,
}

impl PodmanClient {
    /// A client for the API socket at `socket` (nothing is connected until the first call).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&'static str, String)],
    ) -> Result<http::Response<Incoming>, PodmanError> {
        let endpoint = format!("{method} {path}");
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| PodmanError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| PodmanError::Http {
                endpoint: endpoint.clone(),
                message: e.to_string(),
            })?;
        // The connection task ends when the response body is dropped or fully read.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        // Origin-form target (`/v4.0.0/libpod/...`), never absolute-form
        // (`http://podman/v4.0.0/...`): Podman tells its libpod API from the Docker-compatible
        // one by the second path element of the request URL as received, and with an absolute
        // URL that element is the host. Podman 4.3 then serves a shared handler such as
        // `containers/{id}/stop` as the Docker one, which ignores `timeout` (Docker's is `t`) and
        // stops with the container's own StopTimeout, so `kubectl delete --grace-period=3` of a
        // pod with a 300 s grace waited 300 s.
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{API}{path}"))
            .header(http::header::HOST, "podman");
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| PodmanError::Http {
                endpoint: endpoint.clone(),
                message: e.to_string(),
            })?;
        sender
            .send_request(req)
            .await
            .map_err(|e| PodmanError::Http {
                endpoint,
                message: e.to_string(),
            })
    }

    /// One request/response exchange with the whole body read; non-2xx becomes `PodmanError::Api`.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), PodmanError> {
        self.call_with_headers(method, path, body, &[], timeout)
            .await
    }

    /// `call` with extra request headers (e.g. `X-Registry-Auth`, whose value is never logged).
    async fn call_with_headers(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&'static str, String)],
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), PodmanError> {
        let endpoint = format!("{method} {path}");
        let fut = async {
            let resp = self.send(method, path, body, headers).await?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| PodmanError::Http {
                    endpoint: endpoint.clone(),
                    message: e.to_string(),
                })?
                .to_bytes();
            Ok::<_, PodmanError>((status, bytes))
        };
        let (status, bytes) =
            tokio::time::timeout(timeout, fut)
                .await
                .map_err(|_| PodmanError::Timeout {
                    endpoint: endpoint.clone(),
                })??;
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            Ok((status, bytes))
        } else {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            Err(PodmanError::Api {
                endpoint,
                status: status.as_u16(),
                message,
            })
        }
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, PodmanError> {
        let (_, bytes) = self.call(Method::GET, path, None, CALL_TIMEOUT).await?;
        parse(path, &bytes)
    }

    async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, PodmanError> {
        let body = serde_json::to_vec(body).map_err(|e| PodmanError::Parse {
            endpoint: path.to_owned(),
            message: e.to_string(),
        })?;
        let (_, bytes) = self
            .call(Method::POST, path, Some(body), CALL_TIMEOUT)
            .await?;
        parse(path, &bytes)
    }

    /// The subnets (CIDR) of Podman network `name`, e.g. `["10.88.0.0/16"]` for "podman".
    pub async fn network_subnets(&self, name: &str) -> Result<Vec<String>, PodmanError> {
        #[derive(serde::Deserialize)]
        struct Subnet {
            subnet: String,
        }
        #[derive(serde::Deserialize)]
        struct Network {
            #[serde(default)]
            subnets: Vec<Subnet>,
        }
        let n: Network = self
            .get_json(&format!("/networks/{}/json", enc(name)))
            .await?;
        Ok(n.subnets.into_iter().map(|s| s.subnet).collect())
    }

    /// Podman's version ("4.3.1").
    pub async fn version(&self) -> Result<String, PodmanError> {
        Ok(self.get_json::<VersionResponse>("/version").await?.version)
    }

    /// All containers (running or not) carrying every label in `labels` ("key=value").
    pub async fn list_containers(
        &self,
        labels: &[String],
    ) -> Result<Vec<ContainerSummary>, PodmanError> {
        let filters = label_filters(labels);
        self.get_json(&format!("/containers/json?all=true&filters={filters}"))
            .await
    }

    /// Inspect a container; `None` when it does not exist.
    /// `GET /libpod/containers/stats?stream=false` for `ids`: one reading, no streaming.
    pub async fn container_stats(
        &self,
        ids: &[String],
    ) -> Result<Vec<ContainerStats>, PodmanError> {
        #[derive(serde::Deserialize)]
        struct Report {
            #[serde(rename = "Stats", default)]
            stats: Option<Vec<ContainerStats>>,
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let query: String = ids
            .iter()
            .map(|id| format!("&containers={}", enc(id)))
            .collect();
        let r: Report = self
            .get_json(&format!("/containers/stats?stream=false{query}"))
            .await?;
        Ok(r.stats.unwrap_or_default())
    }

    pub async fn inspect_container(
        &self,
        id: &str,
    ) -> Result<Option<ContainerInspect>, PodmanError> {
        not_found_as_none(
            self.get_json(&format!("/containers/{}/json", enc(id)))
                .await,
        )
    }

    /// Inspect an image; `None` when it is not in local storage.
    pub async fn inspect_image(
        &self,
        reference: &str,
    ) -> Result<Option<ImageInspect>, PodmanError> {
        not_found_as_none(
            self.get_json(&format!("/images/{}/json", enc(reference)))
                .await,
        )
    }

    /// Pull an image (always from the registry), with `auth` as the registry credential when
    /// given (anonymously otherwise). The error carries what the registry said.
    pub async fn pull_image(
        &self,
        reference: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<(), PodmanError> {
        let path = format!("/images/pull?reference={}&policy=always", enc(reference));
        // One credential in `X-Registry-Auth`: Podman 4.3 keeps it in memory (a multi-registry
        // map there, or `X-Registry-Config`, would be written to a temporary auth file).
        let headers: Vec<(&'static str, String)> = auth
            .map(|a| ("X-Registry-Auth", a.header_value()))
            .into_iter()
            .collect();
        let (_, bytes) = self
            .call_with_headers(
                Method::POST,
                &path,
                None,
                &headers,
                Duration::from_secs(600),
            )
            .await?;
        // The body is a stream of JSON objects; an `error` in any of them means the pull failed.
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(report) = serde_json::from_slice::<PullReport>(line)
                && let Some(message) = report.error
            {
                return Err(PodmanError::Pull {
                    image: reference.to_owned(),
                    message,
                });
            }
        }
        Ok(())
    }

    /// Create a pod (with its infra container); returns its id.
    pub async fn create_pod(&self, spec: &PodCreate) -> Result<String, PodmanError> {
        Ok(self
            .post_json::<_, IdResponse>("/pods/create", spec)
            .await?
            .id)
    }

    /// Pods carrying every label in `labels`.
    pub async fn list_pods(&self, labels: &[String]) -> Result<Vec<PodSummary>, PodmanError> {
        let filters = label_filters(labels);
        self.get_json(&format!("/pods/json?filters={filters}"))
            .await
    }

    /// Remove a pod and all its containers (force); a missing pod is not an error.
    pub async fn remove_pod(&self, name: &str) -> Result<(), PodmanError> {
        let path = format!("/pods/{}?force=true", enc(name));
        ignore_not_found(self.call(Method::DELETE, &path, None, CALL_TIMEOUT).await)
    }

    /// Start a pod's infra container (and any containers it has); already running is fine.
    pub async fn start_pod(&self, name: &str) -> Result<(), PodmanError> {
        let path = format!("/pods/{}/start", enc(name));
        self.call(Method::POST, &path, None, CALL_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// Create a container; returns its id.
    pub async fn create_container(&self, spec: &ContainerCreate) -> Result<String, PodmanError> {
        Ok(self
            .post_json::<_, IdResponse>("/containers/create", spec)
            .await?
            .id)
    }

    /// Start a container (and its pod's infra container); already running is fine.
    pub async fn start_container(&self, id: &str) -> Result<(), PodmanError> {
        let path = format!("/containers/{}/start", enc(id));
        self.call(Method::POST, &path, None, CALL_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// Stop a container: its stop signal, then SIGKILL after `grace_secs`.
    pub async fn stop_container(&self, id: &str, grace_secs: u64) -> Result<(), PodmanError> {
        let path = format!("/containers/{}/stop?timeout={grace_secs}", enc(id));
        let deadline = CALL_TIMEOUT + Duration::from_secs(grace_secs);
        ignore_not_found(self.call(Method::POST, &path, None, deadline).await)
    }

    /// Change a running container's cgroup limits (`POST /libpod/containers/{id}/update`, whose
    /// body is an OCI LinuxResources). Podman 4.3 applies them to the cgroup only: its inspect
    /// keeps the creation values, and a later start of the container brings those back.
    pub async fn update_container(
        &self,
        id: &str,
        resources: &super::ResourceLimits,
    ) -> Result<(), PodmanError> {
        let path = format!("/containers/{}/update", enc(id));
        let body = serde_json::to_vec(resources).map_err(|e| PodmanError::Parse {
            endpoint: path.clone(),
            message: e.to_string(),
        })?;
        self.call(Method::POST, &path, Some(body), CALL_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// Remove a container (force, with its anonymous volumes); missing is fine.
    pub async fn remove_container(&self, id: &str) -> Result<(), PodmanError> {
        let path = format!("/containers/{}?force=true&v=true", enc(id));
        ignore_not_found(self.call(Method::DELETE, &path, None, CALL_TIMEOUT).await)
    }

    /// Run `cmd` in a running container and return its exit code, or `Timeout` after `timeout`.
    pub async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<i32, PodmanError> {
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct ExecCreate<'a> {
            cmd: &'a [String],
            attach_stdout: bool,
            attach_stderr: bool,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct ExecStart {
            detach: bool,
        }
        let created: IdResponse = self
            .post_json(
                &format!("/containers/{}/exec", enc(id)),
                &ExecCreate {
                    cmd,
                    attach_stdout: true,
                    attach_stderr: true,
                },
            )
            .await?;
        // Attached start: Podman streams the output and closes the response when the command
        // exits. (A detached exec in Podman 4.3 keeps reporting Running=true after it exited.)
        let start_path = format!("/exec/{}/start", enc(&created.id));
        let body = serde_json::to_vec(&ExecStart { detach: false }).unwrap_or_default();
        self.call(Method::POST, &start_path, Some(body), timeout)
            .await?;
        let state: ExecInspect = self
            .get_json(&format!("/exec/{}/json", enc(&created.id)))
            .await?;
        if state.running {
            return Err(PodmanError::Timeout {
                endpoint: format!("exec in {id}"),
            });
        }
        Ok(state.exit_code)
    }

    /// Creates an exec session in container `id` and starts it attached: Podman hands over the
    /// connection as the session's byte stream.
    pub async fn exec_session(
        &self,
        id: &str,
        spec: &super::stream::ExecSpec,
    ) -> Result<super::stream::Session, PodmanError> {
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct ExecStart {
            detach: bool,
            tty: bool,
            #[serde(rename = "h", skip_serializing_if = "Option::is_none")]
            height: Option<u32>,
            #[serde(rename = "w", skip_serializing_if = "Option::is_none")]
            width: Option<u32>,
        }
        let created: IdResponse = self
            .post_json(&format!("/containers/{}/exec", enc(id)), spec)
            .await?;
        let sized = spec.tty && spec.width > 0 && spec.height > 0;
        let body = serde_json::to_vec(&ExecStart {
            detach: false,
            tty: spec.tty,
            height: sized.then_some(spec.height),
            width: sized.then_some(spec.width),
        })
        .unwrap_or_default();
        let path = format!("{API}/exec/{}/start", enc(&created.id));
        let (stream, buffered) = super::stream::hijack(&self.socket, &path, &body).await?;
        Ok(super::stream::session(
            created.id,
            stream,
            buffered,
            spec.tty,
            spec.attach_stdin,
        ))
    }

    /// Resizes exec session `exec_id`'s TTY.
    pub async fn exec_resize(
        &self,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), PodmanError> {
        let path = format!("/exec/{}/resize?h={height}&w={width}", enc(exec_id));
        self.call(Method::POST, &path, None, CALL_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// Exec session `exec_id`'s exit code, `None` while it runs.
    pub async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i32>, PodmanError> {
        let state: ExecInspect = self
            .get_json(&format!("/exec/{}/json", enc(exec_id)))
            .await?;
        Ok((!state.running).then_some(state.exit_code))
    }

    /// Attaches to container `id`'s main process.
    pub async fn attach_session(
        &self,
        id: &str,
        spec: super::stream::AttachSpec,
    ) -> Result<super::stream::Session, PodmanError> {
        let path = format!(
            "{API}/containers/{}/attach?stream=true&logs=false&stdin={}&stdout={}&stderr={}",
            enc(id),
            spec.stdin,
            spec.stdout,
            spec.stderr
        );
        let (stream, buffered) = super::stream::hijack(&self.socket, &path, b"").await?;
        Ok(super::stream::session(
            String::new(),
            stream,
            buffered,
            spec.tty,
            spec.stdin,
        ))
    }

    /// Resizes container `id`'s TTY.
    pub async fn container_resize(
        &self,
        id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), PodmanError> {
        let path = format!("/containers/{}/resize?h={height}&w={width}", enc(id));
        self.call(Method::POST, &path, None, CALL_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// Container events for containers carrying every label in `labels`, as they happen.
    pub async fn events(
        &self,
        labels: &[String],
    ) -> Result<BoxStream<'static, Result<Event, PodmanError>>, PodmanError> {
        let mut filters = serde_json::Map::new();
        filters.insert("type".into(), serde_json::json!(["container"]));
        filters.insert("label".into(), serde_json::json!(labels));
        let path = format!(
            "/events?stream=true&filters={}",
            enc(&serde_json::Value::Object(filters).to_string())
        );
        let resp = self.send(Method::GET, &path, None, &[]).await?;
        if !resp.status().is_success() {
            return Err(PodmanError::Api {
                endpoint: path,
                status: resp.status().as_u16(),
                message: "events stream refused".into(),
            });
        }
        let lines = json_lines(resp.into_body());
        Ok(lines
            .map(move |line| {
                line.and_then(|l| {
                    serde_json::from_slice::<Event>(&l).map_err(|e| PodmanError::Parse {
                        endpoint: "GET /events".into(),
                        message: e.to_string(),
                    })
                })
            })
            .boxed())
    }

    /// A container's log (stdout and stderr interleaved), demultiplexed from Podman's framing.
    pub async fn logs(
        &self,
        id: &str,
        opts: &LogOptions,
    ) -> Result<BoxStream<'static, Result<Bytes, PodmanError>>, PodmanError> {
        let mut path = format!(
            "/containers/{}/logs?stdout=true&stderr=true&follow={}&timestamps={}",
            enc(id),
            opts.follow,
            opts.timestamps
        );
        if let Some(t) = opts.tail {
            path.push_str(&format!("&tail={t}"));
        }
        if let Some(s) = opts.since_unix {
            path.push_str(&format!("&since={s}"));
        }
        if let Some(u) = opts.until_unix {
            path.push_str(&format!("&until={u}"));
        }
        let resp = self.send(Method::GET, &path, None, &[]).await?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
            let message = body
                .ok()
                .and_then(|b| serde_json::from_slice::<ErrorBody>(&b).ok())
                .map(|b| b.message)
                .unwrap_or_default();
            return Err(PodmanError::Api {
                endpoint: path,
                status,
                message,
            });
        }
        Ok(demux_log_frames(resp.into_body()))
    }
}

fn parse<T: DeserializeOwned>(endpoint: &str, bytes: &[u8]) -> Result<T, PodmanError> {
    serde_json::from_slice(bytes).map_err(|e| PodmanError::Parse {
        endpoint: endpoint.to_owned(),
        message: e.to_string(),
    })
}

fn not_found_as_none<T>(r: Result<T, PodmanError>) -> Result<Option<T>, PodmanError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

fn ignore_not_found<T>(r: Result<T, PodmanError>) -> Result<(), PodmanError> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

fn label_filters(labels: &[String]) -> String {
    enc(&serde_json::json!({ "label": labels }).to_string())
}

/// Percent-encode everything but RFC 3986 unreserved characters.
fn enc(s: &str) -> String {
    fleetlet_proto::percent::encode_component(s)
}

/// Split a streamed body into newline-terminated lines.
fn json_lines(body: Incoming) -> BoxStream<'static, Result<Bytes, PodmanError>> {
    let frames = BodyStream::new(body);
    futures::stream::unfold(
        (frames, BytesMut::new(), false),
        |(mut frames, mut buf, done)| async move {
            loop {
                if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line = buf.split_to(pos + 1).freeze();
                    let line = line.slice(..pos);
                    if line.is_empty() {
                        continue;
                    }
                    return Some((Ok(line), (frames, buf, done)));
                }
                if done {
                    return None;
                }
                match frames.next().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            buf.extend_from_slice(&data);
                        }
                    }
                    Some(Err(e)) => {
                        let err = PodmanError::Http {
                            endpoint: "stream".into(),
                            message: e.to_string(),
                        };
                        return Some((Err(err), (frames, buf, true)));
                    }
                    None => return None,
                }
            }
        },
    )
    .boxed()
}

/// Podman frames non-tty logs like Docker: 8-byte header (stream, 3 zero bytes, big-endian
/// length) and the payload.
fn demux_log_frames(body: Incoming) -> BoxStream<'static, Result<Bytes, PodmanError>> {
    let frames = BodyStream::new(body);
    futures::stream::unfold(
        (frames, BytesMut::new()),
        |(mut frames, mut buf)| async move {
            loop {
                if buf.len() >= 8 {
                    let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
                    if buf.len() >= 8 + len {
                        buf.advance(8);
                        let payload = buf.split_to(len).freeze();
                        return Some((Ok(payload), (frames, buf)));
                    }
                }
                match frames.next().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            buf.extend_from_slice(&data);
                        }
                    }
                    Some(Err(e)) => {
                        let err = PodmanError::Http {
                            endpoint: "logs".into(),
                            message: e.to_string(),
                        };
                        return Some((Err(err), (frames, BytesMut::new())));
                    }
                    None => return None,
                }
            }
        },
    )
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_query_values() {
        assert_eq!(enc("a=b c/d"), "a%3Db%20c%2Fd");
        assert_eq!(enc("io.fleetlet-x_1~"), "io.fleetlet-x_1~");
    }
}
