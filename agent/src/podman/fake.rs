//! An in-memory `ContainerRuntime` for unit tests of the reconciler and the pod worker: it
//! keeps pods and containers as Podman would, records every container spec it is given, and
//! lets a test make a container exit. Real-Podman behaviour is covered by agent/tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::sync::Mutex;

use super::{
    ContainerCreate, ContainerInspect, ContainerRuntime, ContainerStats, ContainerSummary, Event,
    ImageInspect, LogOptions, PodCreate, PodSummary, PodmanError, RtResult,
};

/// One container in the fake.
#[derive(Debug, Clone)]
pub struct FakeContainer {
    /// Id.
    pub id: String,
    /// Pod name.
    pub pod: String,
    /// What it was created with (infra containers: a default spec).
    pub spec: ContainerCreate,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// "created", "running", "exited".
    pub state: String,
    /// Exit code of the last run.
    pub exit_code: i32,
    /// Start of the last run (Unix seconds, 0 = never).
    pub started: i64,
    /// Pod infra container.
    pub infra: bool,
}

/// Everything the fake holds.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Pods by name.
    pub pods: BTreeMap<String, PodCreate>,
    /// Containers by id.
    pub containers: BTreeMap<String, FakeContainer>,
    /// Images present, by reference; the image's USER.
    pub images: BTreeMap<String, String>,
    /// Pulls done.
    pub pulls: Vec<String>,
    /// CPU and memory counters by container id, as `container_stats` reports them (running
    /// containers without an entry read zero).
    pub stats: BTreeMap<String, ContainerStats>,
    /// Exit codes of exec sessions, by exec id (the container id here).
    pub exec_codes: BTreeMap<String, i32>,
    /// In-place updates of running containers' cgroup limits, in order (container id, limits).
    pub updates: Vec<(String, super::ResourceLimits)>,
    next: u64,
    clock: i64,
}

/// The fake runtime; clones share state.
#[derive(Debug, Clone, Default)]
pub struct FakeRuntime {
    /// Shared state, for tests to inspect and change.
    pub state: Arc<Mutex<FakeState>>,
}

fn not_found(what: &str) -> PodmanError {
    PodmanError::Api {
        endpoint: what.to_owned(),
        status: 404,
        message: "no such object".into(),
    }
}

fn matches(labels: &BTreeMap<String, String>, filter: &[String]) -> bool {
    filter.iter().all(|f| match f.split_once('=') {
        Some((k, v)) => labels.get(k).is_some_and(|l| l == v),
        None => labels.contains_key(f),
    })
}

fn time(unix: i64) -> String {
    if unix == 0 {
        "0001-01-01T00:00:00Z".into()
    } else {
        jiff::Timestamp::from_second(unix)
            .map(|t| t.to_string())
            .unwrap_or_default()
    }
}

impl FakeRuntime {
    /// A fake with `image` present, running as `user`.
    pub async fn with_image(image: &str, user: &str) -> Self {
        let rt = Self::default();
        rt.state
            .lock()
            .await
            .images
            .insert(image.to_owned(), user.to_owned());
        rt
    }

    /// Make container `name` (its Kubernetes name) of any pod exit with `code`.
    pub async fn exit(&self, name: &str, code: i32) {
        let mut s = self.state.lock().await;
        for c in s.containers.values_mut() {
            if c.labels.get(super::labels::CONTAINER).map(String::as_str) == Some(name) {
                c.state = "exited".into();
                c.exit_code = code;
            }
        }
    }

    /// The spec the app container named `name` was last created with.
    pub async fn spec_of(&self, name: &str) -> Option<ContainerCreate> {
        let s = self.state.lock().await;
        s.containers
            .values()
            .filter(|c| c.labels.get(super::labels::CONTAINER).map(String::as_str) == Some(name))
            .map(|c| c.spec.clone())
            .next_back()
    }
}

impl ContainerRuntime for FakeRuntime {
    async fn version(&self) -> RtResult<String> {
        Ok("fake".into())
    }

    async fn list_containers(&self, labels: &[String]) -> RtResult<Vec<ContainerSummary>> {
        let s = self.state.lock().await;
        Ok(s.containers
            .values()
            .filter(|c| matches(&c.labels, labels))
            .map(|c| ContainerSummary {
                id: c.id.clone(),
                names: vec![c.spec.name.clone()],
                labels: c.labels.clone(),
                state: c.state.clone(),
                is_infra: c.infra,
                started_at: c.started,
                pid: 0,
                image: c.spec.image.clone(),
            })
            .collect())
    }

    async fn container_stats(&self, ids: &[String]) -> RtResult<Vec<ContainerStats>> {
        let s = self.state.lock().await;
        Ok(ids
            .iter()
            .filter(|id| s.containers.get(*id).is_some_and(|c| c.state == "running"))
            .map(|id| {
                s.stats.get(id).cloned().unwrap_or(ContainerStats {
                    id: id.clone(),
                    ..Default::default()
                })
            })
            .collect())
    }

    async fn inspect_container(&self, id: &str) -> RtResult<Option<ContainerInspect>> {
        let s = self.state.lock().await;
        let Some(c) = s.containers.get(id) else {
            return Ok(None);
        };
        // A running container's pid: distinct per container, stable across inspects.
        let pid = match s.containers.keys().position(|k| k == id) {
            Some(i) if c.state == "running" => 4000 + i as i64,
            _ => 0,
        };
        let v = serde_json::json!({
            "Id": c.id, "Name": c.spec.name, "Image": format!("sha256:{}", c.spec.image),
            "ImageName": c.spec.image,
            "State": {"Status": c.state, "Running": c.state == "running", "ExitCode": c.exit_code,
                "Pid": pid, "StartedAt": time(c.started), "FinishedAt": time(if c.state == "exited" { c.started + 1 } else { 0 })},
            "Config": {"Labels": c.labels, "StopTimeout": c.spec.stop_timeout},
            "NetworkSettings": {"IPAddress": if c.infra { "10.88.0.2" } else { "" }}
        });
        serde_json::from_value(v)
            .map(Some)
            .map_err(|e| PodmanError::Parse {
                endpoint: "fake inspect".into(),
                message: e.to_string(),
            })
    }

    async fn inspect_image(&self, reference: &str) -> RtResult<Option<ImageInspect>> {
        let s = self.state.lock().await;
        Ok(s.images.get(reference).map(|user| ImageInspect {
            id: format!("id-{reference}"),
            digest: String::new(),
            config: Some(super::types::ImageConfig { user: user.clone() }),
            size: 0,
        }))
    }

    async fn pull_image(
        &self,
        reference: &str,
        _auth: Option<&crate::registry_auth::RegistryAuth>,
    ) -> RtResult<()> {
        let mut s = self.state.lock().await;
        s.pulls.push(reference.to_owned());
        if s.images.contains_key(reference) {
            Ok(())
        } else {
            Err(PodmanError::Pull {
                image: reference.to_owned(),
                message: "manifest unknown".into(),
            })
        }
    }

    async fn create_pod(&self, spec: &PodCreate) -> RtResult<String> {
        let mut s = self.state.lock().await;
        s.next += 1;
        let id = format!("infra{}", s.next);
        s.pods.insert(spec.name.clone(), spec.clone());
        s.containers.insert(
            id.clone(),
            FakeContainer {
                id: id.clone(),
                pod: spec.name.clone(),
                spec: ContainerCreate {
                    name: format!("{}-infra", spec.name),
                    ..Default::default()
                },
                labels: spec.labels.clone(),
                state: "created".into(),
                exit_code: 0,
                started: 0,
                infra: true,
            },
        );
        Ok(id)
    }

    async fn list_pods(&self, labels: &[String]) -> RtResult<Vec<PodSummary>> {
        let s = self.state.lock().await;
        Ok(s.pods
            .values()
            .filter(|p| matches(&p.labels, labels))
            .map(|p| PodSummary {
                id: p.name.clone(),
                name: p.name.clone(),
                labels: Some(p.labels.clone()),
                infra_id: s
                    .containers
                    .values()
                    .find(|c| c.infra && c.pod == p.name)
                    .map(|c| c.id.clone())
                    .unwrap_or_default(),
            })
            .collect())
    }

    async fn remove_pod(&self, name: &str) -> RtResult<()> {
        let mut s = self.state.lock().await;
        s.pods.remove(name);
        s.containers.retain(|_, c| c.pod != name);
        Ok(())
    }

    async fn start_pod(&self, name: &str) -> RtResult<()> {
        let mut s = self.state.lock().await;
        s.clock += 1;
        let now = 1_700_000_000 + s.clock;
        for c in s
            .containers
            .values_mut()
            .filter(|c| c.pod == name && c.infra)
        {
            c.state = "running".into();
            c.started = now;
        }
        Ok(())
    }

    async fn create_container(&self, spec: &ContainerCreate) -> RtResult<String> {
        let mut s = self.state.lock().await;
        if !s.pods.contains_key(&spec.pod) {
            return Err(not_found("create container: pod"));
        }
        s.next += 1;
        let id = format!("c{}", s.next);
        s.containers.insert(
            id.clone(),
            FakeContainer {
                id: id.clone(),
                pod: spec.pod.clone(),
                spec: spec.clone(),
                labels: spec.labels.clone(),
                state: "created".into(),
                exit_code: 0,
                started: 0,
                infra: false,
            },
        );
        Ok(id)
    }

    async fn start_container(&self, id: &str) -> RtResult<()> {
        let mut s = self.state.lock().await;
        s.clock += 1;
        let now = 1_700_000_000 + s.clock;
        let c = s.containers.get_mut(id).ok_or_else(|| not_found("start"))?;
        c.state = "running".into();
        c.started = now;
        Ok(())
    }

    async fn stop_container(&self, id: &str, _grace_secs: u64) -> RtResult<()> {
        let mut s = self.state.lock().await;
        if let Some(c) = s.containers.get_mut(id)
            && c.state == "running"
        {
            c.state = "exited".into();
            c.exit_code = 137;
        }
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> RtResult<()> {
        self.state.lock().await.containers.remove(id);
        Ok(())
    }

    async fn exec(&self, _id: &str, _cmd: &[String], _timeout: Duration) -> RtResult<i32> {
        Ok(0)
    }

    async fn events(&self, _labels: &[String]) -> RtResult<BoxStream<'static, RtResult<Event>>> {
        Ok(Box::pin(futures::stream::pending()))
    }

    async fn logs(
        &self,
        _id: &str,
        _opts: &LogOptions,
    ) -> RtResult<BoxStream<'static, RtResult<Bytes>>> {
        Ok(Box::pin(futures::stream::empty()))
    }

    /// Echoes stdin to stdout (like `cat`) and exits with 0, or prints the command and exits
    /// with the number after `exit` when it is `exit N`.
    async fn exec_session(
        &self,
        id: &str,
        spec: &super::stream::ExecSpec,
    ) -> RtResult<super::stream::Session> {
        let running = self
            .state
            .lock()
            .await
            .containers
            .get(id)
            .is_some_and(|c| c.state == "running");
        if !running {
            return Err(PodmanError::Api {
                endpoint: format!("POST /containers/{id}/exec"),
                status: 409,
                message: format!("container {id} is not running"),
            });
        }
        let code = match spec.cmd.as_slice() {
            [exit, n] if exit == "exit" => n.parse().unwrap_or(1),
            _ => 0,
        };
        self.state
            .lock()
            .await
            .exec_codes
            .insert(id.to_string(), code);
        let (near, far) = tokio::io::duplex(64 * 1024);
        let (far_read, mut far_write) = tokio::io::split(far);
        let (near_read, near_write) = tokio::io::split(near);
        let banner = Bytes::from(format!("{}\n", spec.cmd.join(" ")));
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut framed = vec![1u8, 0, 0, 0];
            framed.extend_from_slice(&(banner.len() as u32).to_be_bytes());
            framed.extend_from_slice(&banner);
            let _ = far_write.write_all(&framed).await;
            let mut far_read = far_read;
            let mut buf = vec![0u8; 4096];
            loop {
                match tokio::io::AsyncReadExt::read(&mut far_read, &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut frame = vec![1u8, 0, 0, 0];
                        frame.extend_from_slice(&(n as u32).to_be_bytes());
                        frame.extend_from_slice(&buf[..n]);
                        if far_write.write_all(&frame).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = far_write.shutdown().await;
        });
        Ok(super::stream::Session {
            exec_id: id.to_string(),
            output: super::stream::output(near_read, Bytes::new(), false),
            input: Some(Box::pin(near_write)),
        })
    }

    async fn exec_resize(&self, _exec_id: &str, _width: u32, _height: u32) -> RtResult<()> {
        Ok(())
    }

    async fn exec_exit_code(&self, exec_id: &str) -> RtResult<Option<i32>> {
        Ok(self.state.lock().await.exec_codes.get(exec_id).copied())
    }

    async fn attach_session(
        &self,
        id: &str,
        _spec: super::stream::AttachSpec,
    ) -> RtResult<super::stream::Session> {
        Err(PodmanError::Api {
            endpoint: format!("POST /containers/{id}/attach"),
            status: 501,
            message: "the fake runtime does not attach".into(),
        })
    }

    async fn container_resize(&self, _id: &str, _width: u32, _height: u32) -> RtResult<()> {
        Ok(())
    }

    async fn update_container(&self, id: &str, resources: &super::ResourceLimits) -> RtResult<()> {
        let mut s = self.state.lock().await;
        let c = s.containers.get(id).ok_or_else(|| not_found("update"))?;
        if c.state != "running" {
            return Err(PodmanError::Api {
                endpoint: "update".into(),
                status: 500,
                message: "container is not running".into(),
            });
        }
        s.updates.push((id.to_owned(), resources.clone()));
        Ok(())
    }
}
