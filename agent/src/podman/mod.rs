//! The container runtime boundary: the `ContainerRuntime` trait and its Podman implementation.

mod client;
#[cfg(test)]
pub mod fake;
pub mod stream;
pub mod types;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

pub use client::PodmanClient;

use crate::registry_auth::RegistryAuth;
pub use types::{ContainerInspect, ContainerStats, ContainerSummary, Event, ImageInspect};

/// Label keys on every Podman object the agent creates.
pub mod labels {
    /// Device (agent) name that owns the object.
    pub const DEVICE: &str = "io.fleetlet.device";
    /// Kubernetes pod UID.
    pub const POD_UID: &str = "io.fleetlet.pod-uid";
    /// Pod namespace (for humans and logs).
    pub const POD_NAMESPACE: &str = "io.fleetlet.pod-namespace";
    /// Pod name (for humans and logs).
    pub const POD_NAME: &str = "io.fleetlet.pod-name";
    /// Container name within the pod.
    pub const CONTAINER: &str = "io.fleetlet.container";
    /// Hash of the container's desired configuration; a change means "recreate".
    pub const SPEC_HASH: &str = "io.fleetlet.spec-hash";
    /// "init" or "app".
    pub const KIND: &str = "io.fleetlet.kind";
    /// The resources (requests and limits, JSON) the container was created with: what its
    /// cgroup holds after every start (Podman 4.3 keeps an update's values only until then).
    pub const RESOURCES: &str = "io.fleetlet.resources";
}

/// Errors talking to Podman.
#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    /// The API socket could not be reached (Podman down?). Retryable.
    #[error("cannot connect to podman at {socket}: {source}")]
    Connect {
        /// Socket path.
        socket: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// HTTP-level failure. Retryable.
    #[error("podman {endpoint}: {message}")]
    Http {
        /// Method and path.
        endpoint: String,
        /// Cause.
        message: String,
    },
    /// Podman answered with an error status. Retryable unless the message says otherwise.
    #[error("podman {endpoint} returned {status}: {message}")]
    Api {
        /// Method and path.
        endpoint: String,
        /// HTTP status.
        status: u16,
        /// Podman's message.
        message: String,
    },
    /// The response did not parse. Not retryable without a fix.
    #[error("podman {endpoint}: unexpected response: {message}")]
    Parse {
        /// Method and path.
        endpoint: String,
        /// Parser message.
        message: String,
    },
    /// No answer in time. Retryable.
    #[error("podman {endpoint}: timed out")]
    Timeout {
        /// Method and path.
        endpoint: String,
    },
    /// An image pull failed (registry unreachable, image unknown). Retried with backoff.
    #[error("pulling {image}: {message}")]
    Pull {
        /// Image reference.
        image: String,
        /// What the registry/Podman said.
        message: String,
    },
}

impl PodmanError {
    /// True when Podman said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, PodmanError::Api { status: 404, .. })
    }
}

/// What `POST /libpod/pods/create` takes (a subset of Podman's PodSpecGenerator).
#[derive(Debug, Clone, Serialize, Default)]
pub struct PodCreate {
    /// Unique pod name.
    pub name: String,
    /// Labels (see [`labels`]).
    pub labels: BTreeMap<String, String>,
    /// Hostname inside the pod (not with host network).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Network namespace mode.
    pub netns: Namespace,
    /// UTS namespace mode: "host" for host-network pods, which see the device's hostname as a
    /// kubelet's do (without it Podman names the pod's hostname after the Podman pod, and runc
    /// refuses names over 64 bytes, which long device names produce).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utsns: Option<Namespace>,
    /// Published ports (bridge network only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub portmappings: Vec<PortMapping>,
    /// Namespaces the pod's containers share; unset = Podman's default (ipc, net, uts).
    /// shareProcessNamespace adds pid.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shared_namespaces: Vec<String>,
    /// Name servers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_server: Vec<String>,
    /// Search domains.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_search: Vec<String>,
    /// resolv.conf options.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_option: Vec<String>,
}

/// A Podman namespace choice, e.g. `{"nsmode": "host"}`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Namespace {
    /// "host", "bridge", "private", "path", ...
    pub nsmode: String,
    /// The namespace for modes that name one ("path": its /proc/N/ns/… file).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub value: String,
}

/// One published port.
#[derive(Debug, Clone, Serialize)]
pub struct PortMapping {
    /// Port inside the pod.
    pub container_port: u16,
    /// Port on the host.
    pub host_port: u16,
    /// "tcp" or "udp".
    pub protocol: String,
    /// Host address to bind.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// A pod from `GET /libpod/pods/json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PodSummary {
    /// Pod id.
    pub id: String,
    /// Pod name.
    pub name: String,
    /// Pod labels.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Its infra container ("" when Podman lost it, as after a failed removal).
    #[serde(default)]
    pub infra_id: String,
}

/// What `POST /libpod/containers/create` takes (a subset of Podman's SpecGenerator).
#[derive(Debug, Clone, Serialize, Default)]
pub struct ContainerCreate {
    /// Unique container name.
    pub name: String,
    /// Pod to join.
    pub pod: String,
    /// Image reference.
    pub image: String,
    /// Entrypoint override (Kubernetes `command`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Command override (Kubernetes `args`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Bind mounts.
    pub mounts: Vec<Mount>,
    /// cgroup limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_limits: Option<ResourceLimits>,
    /// Signal for stop (15 = SIGTERM).
    pub stop_signal: u32,
    /// Seconds between the stop signal and SIGKILL.
    pub stop_timeout: u64,
    /// Podman's own restart policy; always "no": the agent restarts containers itself.
    pub restart_policy: String,
    /// "uid[:gid]" (or a user name of the image) to run as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Supplementary groups (numeric).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Capabilities added (`CAP_*`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Capabilities dropped (`CAP_*` or `ALL`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// All capabilities and devices, no confinement.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
    /// Set no_new_privs on the process.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub no_new_privileges: bool,
    /// Read-only root filesystem.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub read_only_filesystem: bool,
    /// With a read-only root: no writable tmpfs on /tmp, /var/tmp and /run (Kubernetes gives none).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub read_write_tmpfs: bool,
    /// seccomp profile file, or "unconfined"; empty for Podman's default profile.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub seccomp_profile_path: String,
    /// AppArmor profile name; empty for the default.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub apparmor_profile: String,
    /// SELinux label options.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub selinux_opts: Vec<String>,
    /// Paths of /proc and /sys to leave unmasked (`ALL` for procMount: Unmasked).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unmask: Vec<String>,
    /// Namespaced sysctls.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctl: BTreeMap<String, String>,
    /// Allocate a terminal (an ephemeral container's `tty`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub terminal: bool,
    /// Keep stdin open for a later attach (an ephemeral container's `stdin`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// PID namespace; unset: the pod's choice. An ephemeral container with a
    /// targetContainerName joins its target's (`{"nsmode": "path", "value": "/proc/N/ns/pid"}`,
    /// as a CRI runtime joins the target's namespace: no Podman dependency on the target, so
    /// the target stays free to be stopped and replaced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pidns: Option<Namespace>,
    /// The OOM killer's preference for the container's processes (the kubelet's by QoS class).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
    /// Images mounted as volumes (the pod's image volumes this container mounts).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub image_volumes: Vec<ImageVolume>,
}

/// An image mounted into the container (Podman's `specgen.ImageVolume`, whose JSON keys are
/// its Go field names): Podman mounts the image's filesystem and overlays it read-only at
/// `destination` (Podman 4.3 has no subPath for it).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImageVolume {
    /// The image, by name or ID.
    #[serde(rename = "Source")]
    pub source: String,
    /// Absolute path in the container.
    #[serde(rename = "Destination")]
    pub destination: String,
    /// Writable (an overlay whose changes are discarded); the agent always mounts read-only.
    #[serde(rename = "ReadWrite")]
    pub read_write: bool,
}

/// A bind mount.
#[derive(Debug, Clone, Serialize)]
pub struct Mount {
    /// Path in the container.
    pub destination: String,
    /// Path on the host.
    pub source: String,
    /// Always "bind".
    #[serde(rename = "type")]
    pub kind: String,
    /// Mount options, e.g. "rbind", "ro".
    pub options: Vec<String>,
}

/// cgroup limits (OCI LinuxResources subset): what a container is created with and what
/// `POST /libpod/containers/{id}/update` takes.
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct ResourceLimits {
    /// Memory limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryLimit>,
    /// CPU quota.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuLimit>,
}

/// Memory limit in bytes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MemoryLimit {
    /// Bytes; -1: unlimited.
    pub limit: i64,
}

/// CPU weight and quota per period (microseconds).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CpuLimit {
    /// cgroup v1 cpu.shares (the runtime converts it to cpu.weight on cgroup v2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shares: Option<u64>,
    /// Quota per period; -1: unlimited; unset: the runtime's default (unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<i64>,
    /// Period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<u64>,
}

/// Options of a log read.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// Keep streaming.
    pub follow: bool,
    /// Last N lines only.
    pub tail: Option<i64>,
    /// Lines at or after this Unix time.
    pub since_unix: Option<i64>,
    /// Lines at or before this Unix time.
    pub until_unix: Option<i64>,
    /// Prefix timestamps.
    pub timestamps: bool,
}

/// Result type of runtime calls.
pub type RtResult<T> = Result<T, PodmanError>;

/// Everything the reconciler needs from a container runtime. `PodmanClient` is the real one.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Runtime version string.
    fn version(&self) -> impl Future<Output = RtResult<String>> + Send;
    /// Containers carrying all `labels` ("k=v").
    fn list_containers(
        &self,
        labels: &[String],
    ) -> impl Future<Output = RtResult<Vec<ContainerSummary>>> + Send;
    /// Inspect; `None` when missing.
    fn inspect_container(
        &self,
        id: &str,
    ) -> impl Future<Output = RtResult<Option<ContainerInspect>>> + Send;
    /// Inspect an image; `None` when not present locally.
    fn inspect_image(
        &self,
        reference: &str,
    ) -> impl Future<Output = RtResult<Option<ImageInspect>>> + Send;
    /// Pull an image, with `auth` as the registry credential (anonymously when `None`).
    fn pull_image(
        &self,
        reference: &str,
        auth: Option<&RegistryAuth>,
    ) -> impl Future<Output = RtResult<()>> + Send;
    /// Create a pod; returns its id.
    fn create_pod(&self, spec: &PodCreate) -> impl Future<Output = RtResult<String>> + Send;
    /// Pods carrying all `labels`.
    fn list_pods(
        &self,
        labels: &[String],
    ) -> impl Future<Output = RtResult<Vec<PodSummary>>> + Send;
    /// Remove a pod and its containers; missing is fine.
    fn remove_pod(&self, name: &str) -> impl Future<Output = RtResult<()>> + Send;
    /// Start a pod (its infra container).
    fn start_pod(&self, name: &str) -> impl Future<Output = RtResult<()>> + Send;
    /// Create a container; returns its id.
    fn create_container(
        &self,
        spec: &ContainerCreate,
    ) -> impl Future<Output = RtResult<String>> + Send;
    /// Start a container.
    fn start_container(&self, id: &str) -> impl Future<Output = RtResult<()>> + Send;
    /// Stop with the stop signal, SIGKILL after `grace_secs`.
    fn stop_container(
        &self,
        id: &str,
        grace_secs: u64,
    ) -> impl Future<Output = RtResult<()>> + Send;
    /// Remove a container; missing is fine.
    fn remove_container(&self, id: &str) -> impl Future<Output = RtResult<()>> + Send;
    /// Run a command in a container; its exit code.
    fn exec(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> impl Future<Output = RtResult<i32>> + Send;
    /// Container events filtered by labels.
    fn events(
        &self,
        labels: &[String],
    ) -> impl Future<Output = RtResult<BoxStream<'static, RtResult<Event>>>> + Send;
    /// A container's log.
    fn logs(
        &self,
        id: &str,
        opts: &LogOptions,
    ) -> impl Future<Output = RtResult<BoxStream<'static, RtResult<Bytes>>>> + Send;
    /// One reading of the CPU and memory counters of running containers `ids` (missing or
    /// stopped ones are left out).
    fn container_stats(
        &self,
        ids: &[String],
    ) -> impl Future<Output = RtResult<Vec<ContainerStats>>> + Send;
    /// Starts an interactive exec session in a running container (`kubectl exec`).
    fn exec_session(
        &self,
        id: &str,
        spec: &stream::ExecSpec,
    ) -> impl Future<Output = RtResult<stream::Session>> + Send;
    /// Resizes an exec session's TTY.
    fn exec_resize(
        &self,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> impl Future<Output = RtResult<()>> + Send;
    /// An exec session's exit code; `None` while it still runs.
    fn exec_exit_code(&self, exec_id: &str) -> impl Future<Output = RtResult<Option<i32>>> + Send;
    /// Attaches to a container's main process (`kubectl attach`).
    fn attach_session(
        &self,
        id: &str,
        spec: stream::AttachSpec,
    ) -> impl Future<Output = RtResult<stream::Session>> + Send;
    /// Resizes a container's TTY.
    fn container_resize(
        &self,
        id: &str,
        width: u32,
        height: u32,
    ) -> impl Future<Output = RtResult<()>> + Send;
    /// Changes a running container's cgroup limits in place (`podman update`): in-place pod
    /// resize.
    fn update_container(
        &self,
        id: &str,
        resources: &ResourceLimits,
    ) -> impl Future<Output = RtResult<()>> + Send;
}

impl ContainerRuntime for PodmanClient {
    async fn version(&self) -> RtResult<String> {
        PodmanClient::version(self).await
    }
    async fn container_stats(&self, ids: &[String]) -> RtResult<Vec<ContainerStats>> {
        PodmanClient::container_stats(self, ids).await
    }
    async fn list_containers(&self, labels: &[String]) -> RtResult<Vec<ContainerSummary>> {
        PodmanClient::list_containers(self, labels).await
    }
    async fn inspect_container(&self, id: &str) -> RtResult<Option<ContainerInspect>> {
        PodmanClient::inspect_container(self, id).await
    }
    async fn inspect_image(&self, reference: &str) -> RtResult<Option<ImageInspect>> {
        PodmanClient::inspect_image(self, reference).await
    }
    async fn pull_image(&self, reference: &str, auth: Option<&RegistryAuth>) -> RtResult<()> {
        PodmanClient::pull_image(self, reference, auth).await
    }
    async fn create_pod(&self, spec: &PodCreate) -> RtResult<String> {
        PodmanClient::create_pod(self, spec).await
    }
    async fn list_pods(&self, labels: &[String]) -> RtResult<Vec<PodSummary>> {
        PodmanClient::list_pods(self, labels).await
    }
    async fn remove_pod(&self, name: &str) -> RtResult<()> {
        PodmanClient::remove_pod(self, name).await
    }
    async fn start_pod(&self, name: &str) -> RtResult<()> {
        PodmanClient::start_pod(self, name).await
    }
    async fn create_container(&self, spec: &ContainerCreate) -> RtResult<String> {
        PodmanClient::create_container(self, spec).await
    }
    async fn start_container(&self, id: &str) -> RtResult<()> {
        PodmanClient::start_container(self, id).await
    }
    async fn stop_container(&self, id: &str, grace_secs: u64) -> RtResult<()> {
        PodmanClient::stop_container(self, id, grace_secs).await
    }
    async fn remove_container(&self, id: &str) -> RtResult<()> {
        PodmanClient::remove_container(self, id).await
    }
    async fn exec(&self, id: &str, cmd: &[String], timeout: Duration) -> RtResult<i32> {
        PodmanClient::exec(self, id, cmd, timeout).await
    }
    async fn events(&self, labels: &[String]) -> RtResult<BoxStream<'static, RtResult<Event>>> {
        PodmanClient::events(self, labels).await
    }
    async fn logs(
        &self,
        id: &str,
        opts: &LogOptions,
    ) -> RtResult<BoxStream<'static, RtResult<Bytes>>> {
        PodmanClient::logs(self, id, opts).await
    }
    async fn exec_session(&self, id: &str, spec: &stream::ExecSpec) -> RtResult<stream::Session> {
        PodmanClient::exec_session(self, id, spec).await
    }
    async fn exec_resize(&self, exec_id: &str, width: u32, height: u32) -> RtResult<()> {
        PodmanClient::exec_resize(self, exec_id, width, height).await
    }
    async fn exec_exit_code(&self, exec_id: &str) -> RtResult<Option<i32>> {
        PodmanClient::exec_exit_code(self, exec_id).await
    }
    async fn attach_session(
        &self,
        id: &str,
        spec: stream::AttachSpec,
    ) -> RtResult<stream::Session> {
        PodmanClient::attach_session(self, id, spec).await
    }
    async fn container_resize(&self, id: &str, width: u32, height: u32) -> RtResult<()> {
        PodmanClient::container_resize(self, id, width, height).await
    }
    async fn update_container(&self, id: &str, resources: &ResourceLimits) -> RtResult<()> {
        PodmanClient::update_container(self, id, resources).await
    }
}
