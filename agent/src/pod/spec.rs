//! Parse a Pod (Kubernetes JSON) once into a typed `PodPlan`; errors name the offending field.
//!
//! Everything the agent cannot honour is rejected here, before anything is created, so a pod
//! is either run as specified or failed with a clear reason — never half-started.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub use super::hooks::HookAction;
pub use super::probe::{HttpGetAction, Scheme};
pub use super::security::{PodSecurity, SecurityPlan};
use super::security::{parse_container_security, parse_pod_security};

/// The field of a pod's OS, refused (as PodOSNotSupported) unless it is Linux.
pub const OS_FIELD: &str = "spec.os.name";

/// A pod the agent cannot run as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// JSON path of the field, e.g. `spec.volumes[0].persistentVolumeClaim`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl SpecError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            message: message.into(),
        }
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::new(field, message)
}

/// restartPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Always restart.
    Always,
    /// Restart on non-zero exit.
    OnFailure,
    /// Never restart.
    Never,
}

/// imagePullPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull on every container creation.
    Always,
    /// Pull only when missing.
    IfNotPresent,
    /// Never pull.
    Never,
}

/// The pod's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    /// metadata.uid.
    pub uid: String,
    /// metadata.namespace.
    pub namespace: String,
    /// metadata.name.
    pub name: String,
    /// metadata.generation (0 when absent); reported back as status.observedGeneration.
    pub generation: i64,
}

/// A pod as the agent runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodPlan {
    /// Identity.
    pub meta: PodMeta,
    /// spec.nodeName (may be empty when run from a local file).
    pub node_name: String,
    /// spec.hostNetwork.
    pub host_network: bool,
    /// spec.restartPolicy.
    pub restart_policy: RestartPolicy,
    /// spec.terminationGracePeriodSeconds (default 30).
    pub grace_secs: u64,
    /// spec.activeDeadlineSeconds.
    pub active_deadline_secs: Option<u64>,
    /// spec.initContainers, in order.
    pub init_containers: Vec<ContainerPlan>,
    /// spec.containers.
    pub containers: Vec<ContainerPlan>,
    /// spec.ephemeralContainers, in order: debugging containers added to the running pod
    /// (`kubectl debug`), each started once in its sandbox and never restarted.
    pub ephemeral_containers: Vec<EphemeralPlan>,
    /// spec.volumes.
    pub volumes: Vec<VolumePlan>,
    /// Effective requests for admission, the kubelet's way (sidecars and overhead included;
    /// computed by the rule the hub shares).
    pub requests: fleetlet_resources::admission::Requests,
    /// metadata.labels (downward API).
    pub labels: BTreeMap<String, String>,
    /// metadata.annotations (downward API).
    pub annotations: BTreeMap<String, String>,
    /// spec.serviceAccountName (downward API).
    pub service_account: String,
    /// Pod-level securityContext settings that are not per container.
    pub security: PodSecurity,
    /// spec.shareProcessNamespace.
    pub share_process_namespace: bool,
    /// spec.hostname (the pod's own hostname when it has its own network).
    pub hostname: Option<String>,
    /// spec.hostAliases: (ip, hostnames), in order.
    pub host_aliases: Vec<(String, Vec<String>)>,
    /// spec.dnsConfig.
    pub dns: DnsPlan,
}

/// DNS settings of the pod (`dnsConfig`; `dnsPolicy: None` requires nameservers).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsPlan {
    /// nameservers.
    pub servers: Vec<String>,
    /// searches.
    pub searches: Vec<String>,
    /// options as "name[:value]".
    pub options: Vec<String>,
}

impl PodPlan {
    /// Init containers, then app containers.
    pub fn all_containers(&self) -> impl Iterator<Item = &ContainerPlan> {
        self.init_containers.iter().chain(&self.containers)
    }

    /// The spec list and index of the `i`th container of [`PodPlan::all_containers`].
    pub fn container_field(&self, i: usize) -> (&'static str, usize) {
        if i < self.init_containers.len() {
            ("initContainers", i)
        } else {
            ("containers", i - self.init_containers.len())
        }
    }

    /// The container named `name`.
    pub fn container(&self, name: &str) -> Option<&ContainerPlan> {
        self.all_containers().find(|c| c.name == name)
    }

    /// The ephemeral container named `name`, when this device runs it.
    pub fn ephemeral(&self, name: &str) -> Option<&ContainerPlan> {
        self.ephemeral_containers
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.container.as_ref().ok())
    }
}

/// An ephemeral container (`spec.ephemeralContainers[i]`). One this device will not run (a
/// field it does not support, or its policy) is refused alone: the pod and its other
/// containers run on, as the kubelet lets a pod run when one ephemeral container cannot start.
#[derive(Debug, Clone, PartialEq)]
pub struct EphemeralPlan {
    /// Its name.
    pub name: String,
    /// Its image as specified.
    pub image: String,
    /// targetContainerName: the container whose process namespace it joins.
    pub target: Option<String>,
    /// The container to run, or why it is refused (status reason, message naming the field).
    pub container: Result<ContainerPlan, (String, String)>,
}

/// CPU in millicores and memory in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// Millicores.
    pub cpu_millis: u64,
    /// Bytes.
    pub memory_bytes: u64,
}

/// A container as the agent runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerPlan {
    /// Container name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Pull policy.
    pub pull_policy: PullPolicy,
    /// `command` (overrides the image entrypoint).
    pub command: Option<Vec<String>>,
    /// `args` (overrides the image cmd).
    pub args: Option<Vec<String>>,
    /// `workingDir`.
    pub working_dir: Option<String>,
    /// `env`, in order.
    pub env: Vec<EnvVar>,
    /// `envFrom`, in order.
    pub env_from: Vec<EnvFrom>,
    /// `volumeMounts`.
    pub mounts: Vec<MountPlan>,
    /// Limits: CPU millicores and memory bytes.
    pub limits: Option<Resources>,
    /// Requests.
    pub requests: Resources,
    /// `resources` as stated (requests defaulted from limits): what is allocated, applied and
    /// reported for in-place resize.
    pub resources: super::resize::ContainerResources,
    /// `resizePolicy`: the resources whose change restarts the container.
    pub restart_on_resize: super::resize::RestartOnResize,
    /// `ports`.
    pub ports: Vec<PortPlan>,
    /// livenessProbe.
    pub liveness: Option<ProbePlan>,
    /// readinessProbe.
    pub readiness: Option<ProbePlan>,
    /// startupProbe.
    pub startup: Option<ProbePlan>,
    /// Effective securityContext (pod level merged in).
    pub security: SecurityPlan,
    /// An init container with `restartPolicy: Always`: started in order with the init
    /// containers, then kept running (and restarted) beside the app containers.
    pub sidecar: bool,
    /// lifecycle.postStart.
    pub post_start: Option<HookAction>,
    /// lifecycle.preStop.
    pub pre_stop: Option<HookAction>,
    /// lifecycle.stopSignal (number; default SIGTERM).
    pub stop_signal: u32,
    /// terminationMessagePath (None when empty: no termination log is mounted).
    pub termination_message_path: Option<String>,
    /// terminationMessagePolicy: FallbackToLogsOnError.
    pub termination_message_from_logs: bool,
    /// stdin: keep the container's standard input open for `kubectl attach` (ephemeral
    /// containers only; refused on others).
    pub stdin: bool,
    /// tty: give the container a terminal (ephemeral containers only; refused on others).
    pub tty: bool,
}

/// One environment variable source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvVar {
    /// Literal value.
    Value(String, String),
    /// Key of a ConfigMap.
    ConfigMapKey {
        /// Variable name.
        name: String,
        /// ConfigMap.
        map: String,
        /// Key.
        key: String,
        /// optional: true.
        optional: bool,
    },
    /// Key of a Secret.
    SecretKey {
        /// Variable name.
        name: String,
        /// Secret.
        secret: String,
        /// Key.
        key: String,
        /// optional: true.
        optional: bool,
    },
    /// Downward API field.
    Field(String, FieldRef),
    /// Downward API resource of a container.
    Resource(String, ResourceRef),
}

/// A `resourceFieldRef`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRef {
    /// Container whose resources are read.
    pub container: String,
    /// limits.cpu, limits.memory, requests.cpu, requests.memory.
    pub resource: String,
    /// divisor: millicores for CPU, bytes for memory (1 when unset).
    pub divisor: u64,
}

/// Supported `fieldRef.fieldPath`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldRef {
    /// metadata.labels (volumes only): every label as `key="value"` lines.
    Labels,
    /// metadata.annotations (volumes only).
    Annotations,
    /// metadata.labels['key'].
    Label(String),
    /// metadata.annotations['key'].
    Annotation(String),
    /// spec.serviceAccountName.
    ServiceAccountName,
    /// status.podIPs.
    PodIps,
    /// status.hostIPs.
    HostIps,
    /// metadata.name
    PodName,
    /// metadata.namespace
    Namespace,
    /// metadata.uid
    Uid,
    /// spec.nodeName
    NodeName,
    /// status.podIP
    PodIp,
    /// status.hostIP
    HostIp,
}

/// One `envFrom` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvFrom {
    /// Prefix for every key.
    pub prefix: String,
    /// ConfigMap (true) or Secret (false).
    pub config_map: bool,
    /// Object name.
    pub name: String,
    /// optional: true.
    pub optional: bool,
}

/// A volume mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPlan {
    /// Volume name (validated to exist).
    pub volume: String,
    /// Path in the container.
    pub path: String,
    /// Read only.
    pub read_only: bool,
    /// subPath inside the volume.
    pub sub_path: Option<String>,
    /// subPathExpr: a subPath with `$(VAR)` references to the container's environment.
    pub sub_path_expr: Option<String>,
}

/// A container port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    /// containerPort.
    pub container_port: u16,
    /// hostPort (0 = none).
    pub host_port: u16,
    /// "tcp" / "udp".
    pub protocol: String,
    /// hostIP to bind the hostPort on ("" = every address).
    pub host_ip: String,
}

/// A volume.
#[derive(Debug, Clone, PartialEq)]
pub enum VolumePlan {
    /// emptyDir.
    EmptyDir {
        /// Volume name.
        name: String,
        /// medium: Memory.
        memory: bool,
        /// sizeLimit in bytes.
        size_limit: Option<u64>,
    },
    /// hostPath.
    HostPath {
        /// Volume name.
        name: String,
        /// Host path.
        path: String,
        /// hostPath.type: what must be there (or be created).
        kind: HostPathType,
    },
    /// configMap, secret, downwardAPI or projected: files the agent writes (atomically) and
    /// the containers only read.
    Projected {
        /// Volume name.
        name: String,
        /// Which kind of volume the spec named (for messages).
        kind: &'static str,
        /// Where the files come from, in order (later sources win on equal paths).
        sources: Vec<Projection>,
        /// defaultMode.
        default_mode: u32,
    },
    /// image (KEP-4639): an image's filesystem, pulled like a container image and mounted
    /// read-only into the containers that mount the volume.
    Image {
        /// Volume name.
        name: String,
        /// image.reference.
        reference: String,
        /// image.pullPolicy (defaulted as a container's imagePullPolicy).
        pull_policy: PullPolicy,
    },
}

/// hostPath.type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPathType {
    /// "": no check.
    Unchecked,
    /// Created (0755) when missing.
    DirectoryOrCreate,
    /// Must be a directory.
    Directory,
    /// Created (empty, 0644) when missing.
    FileOrCreate,
    /// Must be a file.
    File,
    /// Must be a UNIX socket.
    Socket,
    /// Must be a character device.
    CharDevice,
    /// Must be a block device.
    BlockDevice,
}

/// One source of a projected volume.
#[derive(Debug, Clone, PartialEq)]
pub enum Projection {
    /// Keys of a ConfigMap (`secret == false`) or a Secret.
    Object {
        /// Secret (true) or ConfigMap (false).
        secret: bool,
        /// Object name.
        source: String,
        /// items (empty = all keys).
        items: Vec<KeyToPath>,
        /// optional: true.
        optional: bool,
    },
    /// Downward API files.
    Downward(Vec<DownwardFile>),
}

/// One downward API file.
#[derive(Debug, Clone, PartialEq)]
pub struct DownwardFile {
    /// Relative path.
    pub path: String,
    /// What it holds.
    pub value: DownwardValue,
    /// File mode (overrides defaultMode).
    pub mode: Option<u32>,
}

/// What a downward API file holds.
#[derive(Debug, Clone, PartialEq)]
pub enum DownwardValue {
    /// A pod field.
    Field(FieldRef),
    /// A container resource.
    Resource(ResourceRef),
}

impl VolumePlan {
    /// Whether the agent writes this volume's files (and containers may only read them).
    pub fn is_projected(&self) -> bool {
        matches!(self, VolumePlan::Projected { .. })
    }

    /// Whether the volume holds Secret data or other data kept off the disk (kubelet: secret,
    /// downwardAPI and projected volumes are memory-backed).
    pub fn memory_backed(&self) -> bool {
        match self {
            VolumePlan::EmptyDir { memory, .. } => *memory,
            VolumePlan::Projected { kind, .. } => *kind != "configMap",
            VolumePlan::HostPath { .. } | VolumePlan::Image { .. } => false,
        }
    }
}

impl VolumePlan {
    /// The volume name.
    pub fn name(&self) -> &str {
        match self {
            VolumePlan::EmptyDir { name, .. }
            | VolumePlan::HostPath { name, .. }
            | VolumePlan::Projected { name, .. }
            | VolumePlan::Image { name, .. } => name,
        }
    }
}

/// One `items` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyToPath {
    /// Key in the object.
    pub key: String,
    /// Relative file path.
    pub path: String,
    /// File mode (overrides defaultMode).
    pub mode: Option<u32>,
}

/// A probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbePlan {
    /// What to check.
    pub action: ProbeAction,
    /// initialDelaySeconds.
    pub initial_delay: Duration,
    /// periodSeconds (default 10).
    pub period: Duration,
    /// timeoutSeconds (default 1).
    pub timeout: Duration,
    /// successThreshold (default 1).
    pub success_threshold: u32,
    /// failureThreshold (default 3).
    pub failure_threshold: u32,
    /// terminationGracePeriodSeconds of a stop this probe triggers (default: the pod's).
    pub termination_grace: Option<u64>,
}

/// A probe's check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    /// Run a command in the container; exit 0 = success.
    Exec(Vec<String>),
    /// HTTP GET; 200-399 = success.
    HttpGet(HttpGetAction),
    /// TCP connect.
    TcpSocket {
        /// Host (default: pod IP).
        host: Option<String>,
        /// Port.
        port: u16,
    },
    /// `grpc.health.v1.Health/Check` to the pod's address; SERVING = success.
    Grpc {
        /// Port.
        port: u16,
        /// The service name asked about (empty: the server as a whole).
        service: String,
    },
}

/// Parse a Pod JSON into a plan.
pub fn parse_pod(pod_json: &[u8]) -> Result<PodPlan, SpecError> {
    let pod: k8s::Pod = serde_json::from_slice(pod_json)
        .map_err(|e| err("pod", format!("invalid Pod JSON: {e}")))?;
    let meta = PodMeta {
        uid: pod
            .metadata
            .uid
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| err("metadata.uid", "required"))?,
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: pod
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| err("metadata.name", "required"))?,
        generation: pod.metadata.generation.unwrap_or(0).max(0),
    };
    let requests = fleetlet_resources::admission::pod_requests(&pod);
    let spec = pod.spec.ok_or_else(|| err("spec", "required"))?;
    let restart_policy = match spec.restart_policy.as_deref() {
        None | Some("Always") => RestartPolicy::Always,
        Some("OnFailure") => RestartPolicy::OnFailure,
        Some("Never") => RestartPolicy::Never,
        Some(other) => {
            return Err(err(
                "spec.restartPolicy",
                format!("unknown value {other:?}"),
            ));
        }
    };
    refuse_pod_fields(&spec)?;
    let host_network = spec.host_network.unwrap_or(false);
    let security = parse_pod_security(spec.security_context.as_ref(), host_network)?;
    let mut volumes = Vec::new();
    for (i, v) in spec
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        volumes.push(parse_volume(&format!("spec.volumes[{i}]"), v, &spec)?);
    }
    let mut init_containers = Vec::new();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    for (i, c) in spec
        .init_containers
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let field = format!("spec.initContainers[{i}]");
        let sidecar = match c.restart_policy.as_deref() {
            None => false,
            Some("Always") => true,
            Some(other) => {
                return Err(err(
                    format!("{field}.restartPolicy"),
                    format!("{other:?}: only Always (a sidecar) is allowed on an init container"),
                ));
            }
        };
        let mut plan = parse_container(&field, &spec, c, &volumes, !sidecar)?;
        plan.security = parse_container_security(&field, &spec, Some(&annotations), c)?;
        plan.sidecar = sidecar;
        init_containers.push(plan);
    }
    let mut containers = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let field = format!("spec.containers[{i}]");
        if c.restart_policy.is_some() {
            return Err(err(
                format!("{field}.restartPolicy"),
                "a per-container restart policy is not supported on fleetlet devices",
            ));
        }
        let mut plan = parse_container(&field, &spec, c, &volumes, false)?;
        plan.security = parse_container_security(&field, &spec, Some(&annotations), c)?;
        containers.push(plan);
    }
    if containers.is_empty() {
        return Err(err("spec.containers", "at least one container is required"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for c in init_containers.iter().chain(&containers) {
        if !seen.insert(c.name.clone()) {
            return Err(err(
                "spec.containers",
                format!("duplicate container name {:?}", c.name),
            ));
        }
    }
    let mut ephemeral_containers = Vec::new();
    for (i, e) in spec
        .ephemeral_containers
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let field = format!("spec.ephemeralContainers[{i}]");
        let target = e.target_container_name.clone().filter(|t| !t.is_empty());
        let container = parse_ephemeral(&field, &spec, &annotations, e, &volumes)
            .map_err(|x| ("UnsupportedPodSpec".to_owned(), x.to_string()))
            .and_then(|c| match &target {
                Some(t)
                    if !containers
                        .iter()
                        .chain(&init_containers)
                        .any(|o| &o.name == t) =>
                {
                    Err((
                        "UnsupportedPodSpec".to_owned(),
                        format!("{field}.targetContainerName: no container named {t:?} in the pod"),
                    ))
                }
                _ => Ok(c),
            });
        if !seen.insert(e.name.clone()) {
            return Err(err(
                "spec.ephemeralContainers",
                format!("duplicate container name {:?}", e.name),
            ));
        }
        ephemeral_containers.push(EphemeralPlan {
            name: e.name.clone(),
            image: e.image.clone().unwrap_or_default(),
            target,
            container,
        });
    }
    if spec.host_pid == Some(true) {
        return Err(err("spec.hostPID", "not supported"));
    }
    if spec.host_ipc == Some(true) {
        return Err(err("spec.hostIPC", "not supported"));
    }
    Ok(PodPlan {
        meta,
        node_name: spec.node_name.clone().unwrap_or_default(),
        host_network,
        restart_policy,
        grace_secs: spec
            .termination_grace_period_seconds
            .map(|g| g.max(0) as u64)
            .unwrap_or(30),
        active_deadline_secs: spec.active_deadline_seconds.map(|d| d.max(1) as u64),
        init_containers,
        containers,
        ephemeral_containers,
        volumes,
        requests,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        annotations,
        service_account: spec.service_account_name.clone().unwrap_or_default(),
        security,
        share_process_namespace: spec.share_process_namespace.unwrap_or(false),
        hostname: spec
            .hostname_override
            .clone()
            .or_else(|| spec.hostname.clone())
            .filter(|h| !h.is_empty()),
        host_aliases: host_aliases(&spec)?,
        dns: dns(&spec)?,
    })
}

fn host_aliases(spec: &k8s::PodSpec) -> Result<Vec<(String, Vec<String>)>, SpecError> {
    let mut out = Vec::new();
    for (i, a) in spec
        .host_aliases
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if a.ip.parse::<std::net::IpAddr>().is_err() {
            return Err(err(
                format!("spec.hostAliases[{i}].ip"),
                format!("{:?} is not an IP address", a.ip),
            ));
        }
        let hostnames = a.hostnames.clone().unwrap_or_default();
        for h in &hostnames {
            if h.is_empty() || h.contains([':', ' ', '\n', '\t', '\r', '#']) {
                return Err(err(
                    format!("spec.hostAliases[{i}].hostnames"),
                    format!("{h:?} is not a host name"),
                ));
            }
        }
        out.push((a.ip.clone(), hostnames));
    }
    Ok(out)
}

/// dnsPolicy and dnsConfig. The device has no cluster DNS, so ClusterFirst (the default) and
/// ClusterFirstWithHostNet resolve as Default does (the device's resolv.conf); dnsConfig is
/// applied on top as the kubelet does, and `None` takes only dnsConfig.
fn dns(spec: &k8s::PodSpec) -> Result<DnsPlan, SpecError> {
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    if !matches!(
        policy,
        "ClusterFirst" | "ClusterFirstWithHostNet" | "Default" | "None"
    ) {
        return Err(err("spec.dnsPolicy", format!("unknown value {policy:?}")));
    }
    let Some(c) = &spec.dns_config else {
        if policy == "None" {
            return Err(err("spec.dnsConfig", "required with dnsPolicy None"));
        }
        return Ok(DnsPlan::default());
    };
    let servers = c.nameservers.clone().unwrap_or_default();
    for (i, s) in servers.iter().enumerate() {
        if s.parse::<std::net::IpAddr>().is_err() {
            return Err(err(
                format!("spec.dnsConfig.nameservers[{i}]"),
                format!("{s:?} is not an IP address"),
            ));
        }
    }
    // Each entry becomes a line or word of the pod's resolv.conf: nothing that could start
    // another line or word.
    let plain = |v: &str| !v.is_empty() && !v.chars().any(|c| c.is_whitespace() || c.is_control());
    for (i, d) in c.searches.iter().flatten().enumerate() {
        if !plain(d) {
            return Err(err(
                format!("spec.dnsConfig.searches[{i}]"),
                format!("{d:?} is not a domain name"),
            ));
        }
    }
    for (i, o) in c.options.iter().flatten().enumerate() {
        let ok = o.name.as_deref().is_some_and(plain)
            && o.value.as_deref().is_none_or(|v| v.is_empty() || plain(v));
        if !ok {
            return Err(err(
                format!("spec.dnsConfig.options[{i}]"),
                "option names and values may not be empty or contain spaces or control characters",
            ));
        }
    }
    if policy == "None" && servers.is_empty() {
        return Err(err(
            "spec.dnsConfig.nameservers",
            "at least one is required with dnsPolicy None",
        ));
    }
    Ok(DnsPlan {
        servers,
        searches: c.searches.clone().unwrap_or_default(),
        options: c
            .options
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter_map(|o| {
                let name = o.name.clone()?;
                Some(match &o.value {
                    Some(v) => format!("{name}:{v}"),
                    None => name,
                })
            })
            .collect(),
    })
}

/// PodSpec fields the agent cannot honour at all; each refused with its own reason.
fn refuse_pod_fields(spec: &k8s::PodSpec) -> Result<(), SpecError> {
    if spec.host_users == Some(false) {
        return Err(err(
            "spec.hostUsers",
            "user namespaces are not supported on fleetlet devices",
        ));
    }
    if let Some(rc) = spec.runtime_class_name.as_deref().filter(|r| !r.is_empty()) {
        return Err(err(
            "spec.runtimeClassName",
            format!("runtime class {rc:?}: fleetlet devices have one runtime (Podman)"),
        ));
    }
    if spec.resource_claims.as_ref().is_some_and(|r| !r.is_empty()) {
        return Err(err(
            "spec.resourceClaims",
            "dynamic resource allocation is not supported on fleetlet devices",
        ));
    }
    if spec.resources.is_some() {
        return Err(err(
            "spec.resources",
            "pod-level resources are not supported on fleetlet devices (set them per container)",
        ));
    }
    if spec.os.as_ref().is_some_and(|o| o.name != "linux") {
        return Err(err(OS_FIELD, "fleetlet devices run Linux"));
    }
    Ok(())
}

fn parse_volume(
    field: &str,
    v: &k8s::Volume,
    spec: &k8s::PodSpec,
) -> Result<VolumePlan, SpecError> {
    let name = v.name.clone();
    if let Some(e) = &v.empty_dir {
        let medium = e.medium.as_deref().unwrap_or("");
        let memory = match medium {
            "" => false,
            "Memory" => true,
            other => {
                return Err(err(
                    format!("{field}.emptyDir.medium"),
                    format!("{other:?} is not supported (\"\" or Memory)"),
                ));
            }
        };
        let size_limit = e
            .size_limit
            .as_ref()
            .map(|q| {
                parse_bytes(&q.0).ok_or_else(|| {
                    err(
                        format!("{field}.emptyDir.sizeLimit"),
                        format!("invalid quantity {:?}", q.0),
                    )
                })
            })
            .transpose()?;
        return Ok(VolumePlan::EmptyDir {
            name,
            memory,
            size_limit,
        });
    }
    if let Some(h) = &v.host_path {
        let kind = match h.type_.as_deref() {
            None | Some("") => HostPathType::Unchecked,
            Some("DirectoryOrCreate") => HostPathType::DirectoryOrCreate,
            Some("Directory") => HostPathType::Directory,
            Some("FileOrCreate") => HostPathType::FileOrCreate,
            Some("File") => HostPathType::File,
            Some("Socket") => HostPathType::Socket,
            Some("CharDevice") => HostPathType::CharDevice,
            Some("BlockDevice") => HostPathType::BlockDevice,
            Some(other) => {
                return Err(err(
                    format!("{field}.hostPath.type"),
                    format!("unknown hostPath type {other:?}"),
                ));
            }
        };
        if !h.path.starts_with('/') {
            return Err(err(format!("{field}.hostPath.path"), "must be absolute"));
        }
        return Ok(VolumePlan::HostPath {
            name,
            path: h.path.clone(),
            kind,
        });
    }
    if let Some(i) = &v.image {
        let reference = i
            .reference
            .clone()
            .filter(|r| !r.is_empty())
            .ok_or_else(|| err(format!("{field}.image.reference"), "required"))?;
        let pull_policy = pull_policy(
            &format!("{field}.image.pullPolicy"),
            i.pull_policy.as_deref(),
            &reference,
        )?;
        return Ok(VolumePlan::Image {
            name,
            reference,
            pull_policy,
        });
    }
    let default_mode = |f: &str, m: Option<i32>| mode(f, m).map(|m| m.unwrap_or(0o644));
    if let Some(c) = &v.config_map {
        return Ok(VolumePlan::Projected {
            name,
            kind: "configMap",
            sources: vec![Projection::Object {
                secret: false,
                source: c.name.clone(),
                items: parse_items(&format!("{field}.configMap.items"), c.items.as_deref())?,
                optional: c.optional.unwrap_or(false),
            }],
            default_mode: default_mode(&format!("{field}.configMap.defaultMode"), c.default_mode)?,
        });
    }
    if let Some(s) = &v.secret {
        let source = s
            .secret_name
            .clone()
            .ok_or_else(|| err(format!("{field}.secret.secretName"), "required"))?;
        return Ok(VolumePlan::Projected {
            name,
            kind: "secret",
            sources: vec![Projection::Object {
                secret: true,
                source,
                items: parse_items(&format!("{field}.secret.items"), s.items.as_deref())?,
                optional: s.optional.unwrap_or(false),
            }],
            default_mode: default_mode(&format!("{field}.secret.defaultMode"), s.default_mode)?,
        });
    }
    if let Some(d) = &v.downward_api {
        return Ok(VolumePlan::Projected {
            name,
            kind: "downwardAPI",
            sources: vec![Projection::Downward(parse_downward_items(
                &format!("{field}.downwardAPI.items"),
                d.items.as_deref(),
                spec,
            )?)],
            default_mode: default_mode(
                &format!("{field}.downwardAPI.defaultMode"),
                d.default_mode,
            )?,
        });
    }
    if let Some(p) = &v.projected {
        let mut sources = Vec::new();
        for (i, src) in p.sources.as_deref().unwrap_or_default().iter().enumerate() {
            let f = format!("{field}.projected.sources[{i}]");
            if let Some(c) = &src.config_map {
                sources.push(Projection::Object {
                    secret: false,
                    source: c.name.clone(),
                    items: parse_items(&format!("{f}.configMap.items"), c.items.as_deref())?,
                    optional: c.optional.unwrap_or(false),
                });
            } else if let Some(s) = &src.secret {
                sources.push(Projection::Object {
                    secret: true,
                    source: s.name.clone(),
                    items: parse_items(&format!("{f}.secret.items"), s.items.as_deref())?,
                    optional: s.optional.unwrap_or(false),
                });
            } else if let Some(d) = &src.downward_api {
                sources.push(Projection::Downward(parse_downward_items(
                    &format!("{f}.downwardAPI.items"),
                    d.items.as_deref(),
                    spec,
                )?));
            } else if src.service_account_token.is_some() {
                return Err(err(
                    format!("{f}.serviceAccountToken"),
                    "ServiceAccount tokens are not issued to fleetlet devices (the device never talks to the Kubernetes API)",
                ));
            } else {
                let kind = first_key(src).unwrap_or_else(|| "unknown".into());
                return Err(err(
                    format!("{f}.{kind}"),
                    format!("{kind} projections are not supported on fleetlet devices"),
                ));
            }
        }
        return Ok(VolumePlan::Projected {
            name,
            kind: "projected",
            sources,
            default_mode: default_mode(&format!("{field}.projected.defaultMode"), p.default_mode)?,
        });
    }
    let kind = first_key(v)
        .filter(|k| k != "name")
        .unwrap_or_else(|| "unknown".into());
    Err(err(
        format!("{field}.{kind}"),
        format!(
            "volume {:?}: {kind} volumes are not supported on fleetlet devices",
            v.name
        ),
    ))
}

/// The first set field of a serialised object other than `name` (to name an unsupported kind).
fn first_key(v: &impl serde::Serialize) -> Option<String> {
    serde_json::to_value(v).ok().and_then(|j| {
        j.as_object()
            .and_then(|o| o.keys().find(|k| k.as_str() != "name").cloned())
    })
}

fn parse_downward_items(
    field: &str,
    items: Option<&[k8s::DownwardAPIVolumeFile]>,
    spec: &k8s::PodSpec,
) -> Result<Vec<DownwardFile>, SpecError> {
    let mut out = Vec::new();
    for (i, it) in items.unwrap_or_default().iter().enumerate() {
        let f = format!("{field}[{i}]");
        check_relative(&format!("{f}.path"), &it.path)?;
        let value = match (&it.field_ref, &it.resource_field_ref) {
            (Some(r), None) => {
                let fr = parse_field_path(&format!("{f}.fieldRef.fieldPath"), &r.field_path)?;
                // Volumes may only name metadata (status and spec fields are env-only).
                if !matches!(
                    fr,
                    FieldRef::PodName
                        | FieldRef::Namespace
                        | FieldRef::Uid
                        | FieldRef::Labels
                        | FieldRef::Annotations
                        | FieldRef::Label(_)
                        | FieldRef::Annotation(_)
                ) {
                    return Err(err(
                        format!("{f}.fieldRef.fieldPath"),
                        format!("{:?} is not supported in a volume", r.field_path),
                    ));
                }
                DownwardValue::Field(fr)
            }
            (None, Some(r)) => {
                let container = r.container_name.clone().unwrap_or_default();
                if container.is_empty() {
                    return Err(err(
                        format!("{f}.resourceFieldRef.containerName"),
                        "required in a volume",
                    ));
                }
                DownwardValue::Resource(parse_resource_ref(
                    &format!("{f}.resourceFieldRef"),
                    r,
                    container,
                    spec,
                )?)
            }
            _ => {
                return Err(err(f, "needs exactly one of fieldRef and resourceFieldRef"));
            }
        };
        out.push(DownwardFile {
            path: it.path.clone(),
            value,
            mode: mode(&format!("{f}.mode"), it.mode)?,
        });
    }
    Ok(out)
}

/// Parse a downward API field path (env and volumes share the syntax).
fn parse_field_path(field: &str, path: &str) -> Result<FieldRef, SpecError> {
    let subscript = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['"))
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_owned)
    };
    Ok(match path {
        "metadata.name" => FieldRef::PodName,
        "metadata.namespace" => FieldRef::Namespace,
        "metadata.uid" => FieldRef::Uid,
        "metadata.labels" => FieldRef::Labels,
        "metadata.annotations" => FieldRef::Annotations,
        "spec.nodeName" => FieldRef::NodeName,
        "spec.serviceAccountName" => FieldRef::ServiceAccountName,
        "status.podIP" => FieldRef::PodIp,
        "status.podIPs" => FieldRef::PodIps,
        "status.hostIP" => FieldRef::HostIp,
        "status.hostIPs" => FieldRef::HostIps,
        other => {
            if let Some(k) = subscript("metadata.labels") {
                FieldRef::Label(k)
            } else if let Some(k) = subscript("metadata.annotations") {
                FieldRef::Annotation(k)
            } else {
                return Err(err(field, format!("{other:?} is not supported")));
            }
        }
    })
}

fn parse_resource_ref(
    field: &str,
    r: &k8s::ResourceFieldSelector,
    container: String,
    spec: &k8s::PodSpec,
) -> Result<ResourceRef, SpecError> {
    let cpu = match r.resource.as_str() {
        "limits.cpu" | "requests.cpu" => true,
        "limits.memory" | "requests.memory" => false,
        other => {
            return Err(err(
                format!("{field}.resource"),
                format!("{other:?} is not supported (cpu and memory limits and requests are)"),
            ));
        }
    };
    let known = spec
        .containers
        .iter()
        .chain(spec.init_containers.as_deref().unwrap_or_default())
        .any(|c| c.name == container);
    if !known {
        return Err(err(
            format!("{field}.containerName"),
            format!("no container named {container:?}"),
        ));
    }
    // Unset and zero mean 1 (one core, one byte), as the kubelet's ExtractContainerResourceValue
    // has it: clients that serialize an empty Quantity send "0".
    let unit = if cpu { 1000 } else { 1 };
    let divisor = match &r.divisor {
        None => unit,
        Some(q) => {
            let v = if cpu {
                parse_cpu(&q.0)
            } else {
                parse_bytes(&q.0)
            };
            match v {
                Some(0) => unit,
                Some(v) => v,
                None => {
                    return Err(err(
                        format!("{field}.divisor"),
                        format!("invalid divisor {:?}", q.0),
                    ));
                }
            }
        }
    };
    Ok(ResourceRef {
        container,
        resource: r.resource.clone(),
        divisor,
    })
}

fn check_relative(field: &str, path: &str) -> Result<(), SpecError> {
    if path.is_empty()
        || path.starts_with('/')
        || path.starts_with("..")
        || path.split('/').any(|p| p == "..")
    {
        return Err(err(field, "must be relative and must not contain '..'"));
    }
    Ok(())
}

fn mode(field: &str, m: Option<i32>) -> Result<Option<u32>, SpecError> {
    match m {
        None => Ok(None),
        Some(m) if (0..=0o777).contains(&m) => Ok(Some(m as u32)),
        Some(m) => Err(err(field, format!("{m} is not a file mode (0-0777)"))),
    }
}

fn parse_items(field: &str, items: Option<&[k8s::KeyToPath]>) -> Result<Vec<KeyToPath>, SpecError> {
    let mut out = Vec::new();
    for (i, it) in items.unwrap_or_default().iter().enumerate() {
        let f = format!("{field}[{i}]");
        check_relative(&format!("{f}.path"), &it.path)?;
        out.push(KeyToPath {
            key: it.key.clone(),
            path: it.path.clone(),
            mode: mode(&format!("{f}.mode"), it.mode)?,
        });
    }
    Ok(out)
}

/// A pull policy as written, or Kubernetes' default for `image`: Always for `:latest` or
/// untagged images, else IfNotPresent (for a container's imagePullPolicy and an image volume's
/// pullPolicy alike).
fn pull_policy(field: &str, policy: Option<&str>, image: &str) -> Result<PullPolicy, SpecError> {
    match policy {
        Some("Always") => Ok(PullPolicy::Always),
        Some("IfNotPresent") => Ok(PullPolicy::IfNotPresent),
        Some("Never") => Ok(PullPolicy::Never),
        None | Some("") => {
            let last = image.rsplit('/').next().unwrap_or(image);
            if image.contains('@') || (last.contains(':') && !last.ends_with(":latest")) {
                Ok(PullPolicy::IfNotPresent)
            } else {
                Ok(PullPolicy::Always)
            }
        }
        Some(other) => Err(err(field, format!("unknown value {other:?}"))),
    }
}

fn parse_container(
    field: &str,
    spec: &k8s::PodSpec,
    c: &k8s::Container,
    volumes: &[VolumePlan],
    init: bool,
) -> Result<ContainerPlan, SpecError> {
    let image = c
        .image
        .clone()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| err(format!("{field}.image"), "required"))?;
    let pull_policy = pull_policy(
        &format!("{field}.imagePullPolicy"),
        c.image_pull_policy.as_deref(),
        &image,
    )?;
    for (what, list) in [("command", &c.command), ("args", &c.args)] {
        for (i, a) in list.as_deref().unwrap_or_default().iter().enumerate() {
            if a.len() >= MAX_EXEC_STRING {
                return Err(err(
                    format!("{field}.{what}[{i}]"),
                    format!(
                        "{} bytes; Linux cannot pass an argument of {MAX_EXEC_STRING} bytes or more to a process",
                        a.len()
                    ),
                ));
            }
        }
    }
    let mut env = Vec::new();
    for (i, e) in c.env.as_deref().unwrap_or_default().iter().enumerate() {
        env.push(parse_env(&format!("{field}.env[{i}]"), e, &c.name, spec)?);
    }
    let mut env_from = Vec::new();
    for (i, e) in c.env_from.as_deref().unwrap_or_default().iter().enumerate() {
        let f = format!("{field}.envFrom[{i}]");
        let prefix = e.prefix.clone().unwrap_or_default();
        if let Some(cm) = &e.config_map_ref {
            env_from.push(EnvFrom {
                prefix,
                config_map: true,
                name: cm.name.clone(),
                optional: cm.optional.unwrap_or(false),
            });
        } else if let Some(s) = &e.secret_ref {
            env_from.push(EnvFrom {
                prefix,
                config_map: false,
                name: s.name.clone(),
                optional: s.optional.unwrap_or(false),
            });
        } else {
            return Err(err(f, "needs configMapRef or secretRef"));
        }
    }
    let mut mounts = Vec::new();
    for (i, m) in c
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let f = format!("{field}.volumeMounts[{i}]");
        let Some(volume) = volumes.iter().find(|v| v.name() == m.name) else {
            return Err(err(
                format!("{f}.name"),
                format!("no volume named {:?}", m.name),
            ));
        };
        if !m.mount_path.starts_with('/') {
            return Err(err(format!("{f}.mountPath"), "must be absolute"));
        }
        let sub_path = m.sub_path.clone().filter(|s| !s.is_empty());
        let sub_path_expr = m.sub_path_expr.clone().filter(|s| !s.is_empty());
        if sub_path.is_some() && sub_path_expr.is_some() {
            return Err(err(
                format!("{f}.subPathExpr"),
                "subPath and subPathExpr are mutually exclusive",
            ));
        }
        for (what, s) in [("subPath", &sub_path), ("subPathExpr", &sub_path_expr)] {
            if let Some(s) = s
                && (s.starts_with('/') || s.split('/').any(|p| p == ".."))
            {
                return Err(err(format!("{f}.{what}"), "must be relative without '..'"));
            }
        }
        if matches!(volume, VolumePlan::Image { .. }) {
            for (what, s) in [("subPath", &sub_path), ("subPathExpr", &sub_path_expr)] {
                if s.is_some() {
                    return Err(err(
                        format!("{f}.{what}"),
                        format!(
                            "a {what} of image volume {:?} is not supported: Podman 4's image volumes mount the whole image",
                            m.name
                        ),
                    ));
                }
            }
        }
        match m.mount_propagation.as_deref() {
            None | Some("None") => {}
            Some(other) => {
                return Err(err(
                    format!("{f}.mountPropagation"),
                    format!("{other} propagation is not supported on fleetlet devices"),
                ));
            }
        }
        if m.recursive_read_only
            .as_deref()
            .is_some_and(|r| r == "Enabled")
        {
            return Err(err(
                format!("{f}.recursiveReadOnly"),
                "recursive read-only mounts are not supported by Podman 4",
            ));
        }
        mounts.push(MountPlan {
            volume: m.name.clone(),
            path: m.mount_path.clone(),
            // The kubelet mounts the volumes it writes read-only, whatever the spec says: a
            // writable one would let the container plant links for the agent's next refresh.
            // Image volumes are read-only too (KEP-4639).
            read_only: m.read_only.unwrap_or(false)
                || volume.is_projected()
                || matches!(volume, VolumePlan::Image { .. }),
            sub_path,
            sub_path_expr,
        });
    }
    let (requests, limits) = match &c.resources {
        Some(r) => {
            let get = |map: &Option<
                BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
            >,
                       what: &str|
             -> Result<Option<Resources>, SpecError> {
                let Some(map) = map else { return Ok(None) };
                let cpu = map
                    .get("cpu")
                    .map(|q| {
                        parse_cpu(&q.0).ok_or_else(|| {
                            err(
                                format!("{field}.resources.{what}.cpu"),
                                format!("invalid quantity {:?}", q.0),
                            )
                        })
                    })
                    .transpose()?;
                let mem = map
                    .get("memory")
                    .map(|q| {
                        parse_bytes(&q.0).ok_or_else(|| {
                            err(
                                format!("{field}.resources.{what}.memory"),
                                format!("invalid quantity {:?}", q.0),
                            )
                        })
                    })
                    .transpose()?;
                Ok(Some(Resources {
                    cpu_millis: cpu.unwrap_or(0),
                    memory_bytes: mem.unwrap_or(0),
                }))
            };
            let limits = get(&r.limits, "limits")?;
            // As in Kubernetes, a limit without a request makes the request equal to the limit.
            let requests = get(&r.requests, "requests")?.unwrap_or_default();
            let requests = Resources {
                cpu_millis: if requests.cpu_millis == 0 {
                    limits.map(|l| l.cpu_millis).unwrap_or(0)
                } else {
                    requests.cpu_millis
                },
                memory_bytes: if requests.memory_bytes == 0 {
                    limits.map(|l| l.memory_bytes).unwrap_or(0)
                } else {
                    requests.memory_bytes
                },
            };
            (requests, limits)
        }
        None => (Resources::default(), None),
    };
    let mut ports = Vec::new();
    for (i, p) in c.ports.as_deref().unwrap_or_default().iter().enumerate() {
        let f = format!("{field}.ports[{i}]");
        let port = |v: i32, what: &str| {
            u16::try_from(v).map_err(|_| err(format!("{f}.{what}"), format!("{v} is not a port")))
        };
        let protocol = match p.protocol.as_deref() {
            None | Some("TCP") => "tcp",
            Some("UDP") => "udp",
            Some(other) => {
                return Err(err(
                    format!("{f}.protocol"),
                    format!("{other} is not supported"),
                ));
            }
        };
        ports.push(PortPlan {
            container_port: port(p.container_port, "containerPort")?,
            host_port: port(p.host_port.unwrap_or(0), "hostPort")?,
            protocol: protocol.into(),
            host_ip: match p.host_ip.as_deref().filter(|h| !h.is_empty()) {
                None => String::new(),
                Some(ip) if ip.parse::<std::net::IpAddr>().is_ok() => ip.to_owned(),
                Some(ip) => {
                    return Err(err(
                        format!("{f}.hostIP"),
                        format!("{ip:?} is not an IP address"),
                    ));
                }
            },
        });
    }
    let probe = |p: &Option<k8s::Probe>, what: &str| -> Result<Option<ProbePlan>, SpecError> {
        let Some(p) = p else { return Ok(None) };
        if init {
            return Err(err(
                format!("{field}.{what}"),
                "init containers cannot have probes (only sidecars, restartPolicy Always)",
            ));
        }
        parse_probe(&format!("{field}.{what}"), p, c).map(Some)
    };
    if c.volume_devices.as_ref().is_some_and(|d| !d.is_empty()) {
        return Err(err(
            format!("{field}.volumeDevices"),
            "raw block devices are not supported on fleetlet devices",
        ));
    }
    if let Some(r) = &c.resources {
        if r.claims.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(err(
                format!("{field}.resources.claims"),
                "dynamic resource allocation is not supported on fleetlet devices",
            ));
        }
        for (what, map) in [("limits", &r.limits), ("requests", &r.requests)] {
            for name in map.iter().flat_map(|m| m.keys()) {
                if !matches!(name.as_str(), "cpu" | "memory" | "ephemeral-storage") {
                    return Err(err(
                        format!("{field}.resources.{what}.{name}"),
                        format!("{name} is not a resource fleetlet devices offer"),
                    ));
                }
            }
        }
    }
    let (post_start, pre_stop, stop_signal) = parse_lifecycle(field, c)?;
    if c.restart_policy_rules
        .as_ref()
        .is_some_and(|r| !r.is_empty())
    {
        return Err(err(
            format!("{field}.restartPolicyRules"),
            "container restart rules are not supported on fleetlet devices",
        ));
    }
    if c.stdin == Some(true) || c.tty == Some(true) {
        return Err(err(
            format!("{field}.stdin"),
            "interactive containers are not supported",
        ));
    }
    Ok(ContainerPlan {
        name: c.name.clone(),
        image,
        pull_policy,
        command: c.command.clone(),
        args: c.args.clone(),
        working_dir: c.working_dir.clone().filter(|w| !w.is_empty()),
        env,
        env_from,
        mounts,
        limits,
        requests,
        resources: super::resize::ContainerResources::from_spec(c.resources.as_ref()),
        restart_on_resize: restart_on_resize(field, c)?,
        ports,
        liveness: probe(&c.liveness_probe, "livenessProbe")?,
        readiness: probe(&c.readiness_probe, "readinessProbe")?,
        startup: probe(&c.startup_probe, "startupProbe")?,
        security: SecurityPlan::default(),
        sidecar: false,
        post_start,
        pre_stop,
        stop_signal,
        termination_message_path: termination_message_path(field, c)?,
        termination_message_from_logs: match c.termination_message_policy.as_deref() {
            None | Some("File") => false,
            Some("FallbackToLogsOnError") => true,
            Some(other) => {
                return Err(err(
                    format!("{field}.terminationMessagePolicy"),
                    format!("unknown value {other:?}"),
                ));
            }
        },
        stdin: false,
        tty: false,
    })
}

/// `resizePolicy`: RestartContainer or NotRequired per resource (cpu, memory).
fn restart_on_resize(
    field: &str,
    c: &k8s::Container,
) -> Result<super::resize::RestartOnResize, SpecError> {
    let mut out = super::resize::RestartOnResize::default();
    for (i, p) in c.resize_policy.iter().flatten().enumerate() {
        let restart = match p.restart_policy.as_str() {
            "NotRequired" => false,
            "RestartContainer" => true,
            other => {
                return Err(err(
                    format!("{field}.resizePolicy[{i}].restartPolicy"),
                    format!("unknown value {other:?} (NotRequired or RestartContainer)"),
                ));
            }
        };
        match p.resource_name.as_str() {
            "cpu" => out.cpu = restart,
            "memory" => out.memory = restart,
            other => {
                return Err(err(
                    format!("{field}.resizePolicy[{i}].resourceName"),
                    format!("{other:?} is not resizable (cpu and memory are)"),
                ));
            }
        }
    }
    Ok(out)
}

/// Parses `spec.ephemeralContainers[i]`: the fields it shares with a container as a container's
/// (the API server has already refused the ones an ephemeral container may not set: ports,
/// probes, resources, lifecycle), plus stdin and tty, which `kubectl debug -it` sets. An
/// error refuses this ephemeral container alone.
fn parse_ephemeral(
    field: &str,
    spec: &k8s::PodSpec,
    annotations: &BTreeMap<String, String>,
    e: &k8s::EphemeralContainer,
    volumes: &[VolumePlan],
) -> Result<ContainerPlan, SpecError> {
    // EphemeralContainer has Container's fields plus targetContainerName; read it as one.
    let mut value = serde_json::to_value(e)
        .map_err(|x| err(field, format!("cannot be read as a container: {x}")))?;
    if let Some(obj) = value.as_object_mut() {
        obj.remove("targetContainerName");
    }
    let mut c: k8s::Container = serde_json::from_value(value)
        .map_err(|x| err(field, format!("cannot be read as a container: {x}")))?;
    let (stdin, tty) = (c.stdin == Some(true), c.tty == Some(true));
    c.stdin = None;
    c.tty = None;
    let mut plan = parse_container(field, spec, &c, volumes, false)?;
    plan.security = parse_container_security(field, spec, Some(annotations), &c)?;
    plan.stdin = stdin;
    plan.tty = tty;
    Ok(plan)
}

type Lifecycle = (Option<HookAction>, Option<HookAction>, u32);

fn parse_lifecycle(field: &str, c: &k8s::Container) -> Result<Lifecycle, SpecError> {
    let Some(l) = &c.lifecycle else {
        return Ok((None, None, 15));
    };
    let hook =
        |what: &str, h: &Option<k8s::LifecycleHandler>| -> Result<Option<HookAction>, SpecError> {
            let Some(h) = h else { return Ok(None) };
            let f = format!("{field}.lifecycle.{what}");
            if let Some(e) = &h.exec {
                let cmd = e.command.clone().unwrap_or_default();
                if cmd.is_empty() {
                    return Err(err(format!("{f}.exec.command"), "required"));
                }
                return Ok(Some(HookAction::Exec(cmd)));
            }
            if let Some(g) = &h.http_get {
                return Ok(Some(HookAction::HttpGet(parse_http_get(
                    &format!("{f}.httpGet"),
                    g,
                    c,
                )?)));
            }
            if let Some(s) = &h.sleep {
                return Ok(Some(HookAction::Sleep(Duration::from_secs(
                    s.seconds.max(0) as u64,
                ))));
            }
            if h.tcp_socket.is_some() {
                return Err(err(
                    format!("{f}.tcpSocket"),
                    "tcpSocket is not a lifecycle handler (the kubelet does not run it either)",
                ));
            }
            Err(err(f, "needs exec, httpGet or sleep"))
        };
    let stop_signal = match &l.stop_signal {
        None => 15,
        Some(name) => crate::podman::types::signal_number(name).ok_or_else(|| {
            err(
                format!("{field}.lifecycle.stopSignal"),
                format!("unknown signal {name:?}"),
            )
        })?,
    };
    Ok((
        hook("postStart", &l.post_start)?,
        hook("preStop", &l.pre_stop)?,
        stop_signal,
    ))
}

fn termination_message_path(field: &str, c: &k8s::Container) -> Result<Option<String>, SpecError> {
    let path = c
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    if path.is_empty() {
        return Ok(None);
    }
    if !path.starts_with('/') || path.split('/').any(|p| p == "..") {
        return Err(err(
            format!("{field}.terminationMessagePath"),
            "must be an absolute path without '..'",
        ));
    }
    Ok(Some(path))
}

/// Linux refuses to start a process with any one argument or `NAME=value` environment string of
/// this many bytes or more (MAX_ARG_STRLEN, 32 pages): the container would only ever fail with
/// E2BIG, so such a pod is rejected up front with the field named.
pub const MAX_EXEC_STRING: usize = 32 * 4096;

fn parse_env(
    field: &str,
    e: &k8s::EnvVar,
    container: &str,
    spec: &k8s::PodSpec,
) -> Result<EnvVar, SpecError> {
    let Some(from) = &e.value_from else {
        let len = e.name.len() + 1 + e.value.as_deref().map_or(0, str::len);
        if len >= MAX_EXEC_STRING {
            return Err(err(
                format!("{field}.value"),
                format!(
                    "{len} bytes; Linux cannot pass an environment variable of {MAX_EXEC_STRING} bytes or more to a process"
                ),
            ));
        }
        return Ok(EnvVar::Value(
            e.name.clone(),
            e.value.clone().unwrap_or_default(),
        ));
    };
    if let Some(k) = &from.config_map_key_ref {
        return Ok(EnvVar::ConfigMapKey {
            name: e.name.clone(),
            map: k.name.clone(),
            key: k.key.clone(),
            optional: k.optional.unwrap_or(false),
        });
    }
    if let Some(k) = &from.secret_key_ref {
        return Ok(EnvVar::SecretKey {
            name: e.name.clone(),
            secret: k.name.clone(),
            key: k.key.clone(),
            optional: k.optional.unwrap_or(false),
        });
    }
    if let Some(f) = &from.field_ref {
        let r = parse_field_path(
            &format!("{field}.valueFrom.fieldRef.fieldPath"),
            &f.field_path,
        )?;
        if matches!(r, FieldRef::Labels | FieldRef::Annotations) {
            return Err(err(
                format!("{field}.valueFrom.fieldRef.fieldPath"),
                format!("{:?} is only supported in volumes", f.field_path),
            ));
        }
        return Ok(EnvVar::Field(e.name.clone(), r));
    }
    if let Some(r) = &from.resource_field_ref {
        let container = r
            .container_name
            .clone()
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| container.to_owned());
        return Ok(EnvVar::Resource(
            e.name.clone(),
            parse_resource_ref(
                &format!("{field}.valueFrom.resourceFieldRef"),
                r,
                container,
                spec,
            )?,
        ));
    }
    Err(err(
        format!("{field}.valueFrom"),
        "only configMapKeyRef, secretKeyRef, fieldRef and resourceFieldRef are supported",
    ))
}

/// The HTTP GET of a probe or hook.
fn parse_http_get(
    field: &str,
    g: &k8s::HTTPGetAction,
    c: &k8s::Container,
) -> Result<HttpGetAction, SpecError> {
    let scheme = match g.scheme.as_deref() {
        None | Some("" | "HTTP") => Scheme::Http,
        Some("HTTPS") => Scheme::Https,
        Some(other) => {
            return Err(err(
                format!("{field}.scheme"),
                format!("{other:?} is not HTTP or HTTPS"),
            ));
        }
    };
    Ok(HttpGetAction {
        scheme,
        host: g.host.clone().filter(|h| !h.is_empty()),
        port: resolve_port(&format!("{field}.port"), &g.port, c)?,
        path: g.path.clone().unwrap_or_else(|| "/".into()),
        headers: g
            .http_headers
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
    })
}

/// A probe's or hook's port: a number, or the name of one of the container's ports.
fn resolve_port(field: &str, port: &IntOrString, c: &k8s::Container) -> Result<u16, SpecError> {
    match port {
        IntOrString::Int(n) => {
            u16::try_from(*n).map_err(|_| err(field, format!("{n} is not a port")))
        }
        IntOrString::String(name) => c
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| err(field, format!("no container port named {name:?}"))),
    }
}

fn parse_probe(field: &str, p: &k8s::Probe, c: &k8s::Container) -> Result<ProbePlan, SpecError> {
    let secs = |v: Option<i32>, default: u64| {
        Duration::from_secs(v.map(|v| v.max(0) as u64).unwrap_or(default))
    };
    let resolve_port = |f: &str, port: &IntOrString| resolve_port(f, port, c);
    let action = if let Some(e) = &p.exec {
        let cmd = e.command.clone().unwrap_or_default();
        if cmd.is_empty() {
            return Err(err(format!("{field}.exec.command"), "required"));
        }
        ProbeAction::Exec(cmd)
    } else if let Some(h) = &p.http_get {
        ProbeAction::HttpGet(parse_http_get(&format!("{field}.httpGet"), h, c)?)
    } else if let Some(t) = &p.tcp_socket {
        ProbeAction::TcpSocket {
            host: t.host.clone().filter(|h| !h.is_empty()),
            port: resolve_port(&format!("{field}.tcpSocket.port"), &t.port)?,
        }
    } else if let Some(g) = &p.grpc {
        ProbeAction::Grpc {
            port: u16::try_from(g.port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    err(
                        format!("{field}.grpc.port"),
                        format!("{} is not a port", g.port),
                    )
                })?,
            service: g.service.clone().unwrap_or_default(),
        }
    } else {
        return Err(err(field, "needs exec, httpGet, tcpSocket or grpc"));
    };
    Ok(ProbePlan {
        action,
        initial_delay: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        termination_grace: p.termination_grace_period_seconds.map(|g| g.max(1) as u64),
    })
}

/// Parse a CPU quantity ("500m", "1", "0.25") into millicores, exactly (the parser the hub
/// uses; fractions of a millicore round up).
pub fn parse_cpu(q: &str) -> Option<u64> {
    fleetlet_resources::quantity::cpu_millis(q)
        .ok()
        .and_then(|v| u64::try_from(v).ok())
}

/// Parse a memory quantity ("64Mi", "1G", "128974848", "129e6") into bytes, exactly.
pub fn parse_bytes(q: &str) -> Option<u64> {
    fleetlet_resources::quantity::units(q)
        .ok()
        .and_then(|v| u64::try_from(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_arguments_linux_cannot_exec_are_rejected_with_the_field() {
        let big = "x".repeat(MAX_EXEC_STRING);
        let e = parse_pod(&pod(
            serde_json::json!({"containers": [{"name": "c", "image": "i",
            "env": [{"name": "OK", "value": "1"}, {"name": "HUGE", "value": big}]}]}),
        ))
        .unwrap_err();
        assert_eq!(e.field, "spec.containers[0].env[1].value");
        let e = parse_pod(&pod(
            serde_json::json!({"containers": [{"name": "c", "image": "i",
            "args": ["-c", big]}]}),
        ))
        .unwrap_err();
        assert_eq!(e.field, "spec.containers[0].args[1]");
        let fits = "x".repeat(MAX_EXEC_STRING - 10);
        assert!(
            parse_pod(&pod(
                serde_json::json!({"containers": [{"name": "c", "image": "i",
            "env": [{"name": "A", "value": fits}]}]})
            ))
            .is_ok()
        );
    }

    #[test]
    fn ephemeral_containers_are_parsed_each_alone_with_stdin_tty_and_target() {
        let p = parse_pod(&pod(serde_json::json!({
            "volumes": [{"name": "v", "emptyDir": {}}],
            "containers": [{"name": "c", "image": "i"}],
            "ephemeralContainers": [
                {"name": "debugger", "image": "busybox", "stdin": true, "tty": true,
                    "targetContainerName": "c", "command": ["sh"],
                    "volumeMounts": [{"name": "v", "mountPath": "/v"}]},
                {"name": "bad", "image": "busybox",
                    "volumeMounts": [{"name": "missing", "mountPath": "/m"}]}]
        })))
        .expect("the pod parses; a bad ephemeral container is refused alone");
        assert_eq!(p.containers.len(), 1);
        let d = &p.ephemeral_containers[0];
        assert_eq!(d.target.as_deref(), Some("c"));
        let c = d.container.as_ref().expect("debugger runs");
        assert!(c.stdin && c.tty);
        assert_eq!(c.command.as_deref(), Some(&["sh".to_owned()][..]));
        assert_eq!(c.mounts[0].path, "/v");
        assert!(p.container("debugger").is_none(), "not an app container");
        assert!(p.ephemeral("debugger").is_some());
        let (reason, message) = p.ephemeral_containers[1].container.as_ref().unwrap_err();
        assert_eq!(reason, "UnsupportedPodSpec");
        assert_eq!(
            message,
            "spec.ephemeralContainers[1].volumeMounts[0].name: no volume named \"missing\""
        );
        // stdin and tty stay refused on the pod's own containers.
        let e = parse_pod(&pod(serde_json::json!({
            "containers": [{"name": "c", "image": "i", "tty": true}]
        })))
        .unwrap_err();
        assert_eq!(e.field, "spec.containers[0].stdin");
        // A name shared with a container is refused, as the API would.
        let e = parse_pod(&pod(serde_json::json!({
            "containers": [{"name": "c", "image": "i"}],
            "ephemeralContainers": [{"name": "c", "image": "i"}]
        })))
        .unwrap_err();
        assert_eq!(e.field, "spec.ephemeralContainers");
    }

    #[test]
    fn a_zero_or_absent_divisor_means_one_unit_and_a_bad_one_is_refused() {
        let env = |divisor: serde_json::Value| {
            let mut r = serde_json::json!({"resource": "limits.cpu"});
            if !divisor.is_null() {
                r["divisor"] = divisor;
            }
            parse_pod(&pod(
                serde_json::json!({"containers": [{"name": "c", "image": "i",
                "env": [{"name": "CPU", "valueFrom": {"resourceFieldRef": r}}]}]}),
            ))
        };
        // The e2e suite's pods carry `divisor: "0"` (a zero Quantity serialized).
        assert!(env(serde_json::json!("0")).is_ok());
        assert!(env(serde_json::Value::Null).is_ok());
        assert!(env(serde_json::json!("1m")).is_ok());
        let e = env(serde_json::json!("-1")).unwrap_err();
        assert_eq!(
            e.field,
            "spec.containers[0].env[0].valueFrom.resourceFieldRef.divisor"
        );
    }

    fn pod(spec: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn parses_common_fields() {
        let plan = parse_pod(&pod(serde_json::json!({
            "restartPolicy": "OnFailure",
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 3,
            "initContainers": [{"name": "init", "image": "img:1", "resources": {"requests": {"cpu": "2"}}}],
            "containers": [{
                "name": "app", "image": "img:1", "command": ["sh"], "args": ["-c", "true"],
                "workingDir": "/tmp",
                "env": [{"name": "A", "value": "1"},
                        {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}],
                "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}},
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"port": "http", "path": "/ok"}, "periodSeconds": 2}
            }]
        })))
        .unwrap();
        assert_eq!(plan.restart_policy, RestartPolicy::OnFailure);
        assert_eq!(plan.grace_secs, 3);
        assert!(plan.host_network);
        let app = &plan.containers[0];
        assert_eq!(app.pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(
            app.limits,
            Some(Resources {
                cpu_millis: 500,
                memory_bytes: 64 << 20
            })
        );
        assert_eq!(app.requests.cpu_millis, 500, "request defaults to limit");
        assert_eq!(plan.requests.cpu_milli, 2000, "largest init request wins");
        assert_eq!(app.env[1], EnvVar::Field("B".into(), FieldRef::Uid));
        match &app.readiness.as_ref().unwrap().action {
            ProbeAction::HttpGet(get) => {
                assert_eq!((get.port, get.path.as_str()), (8080, "/ok"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn grpc_probes_and_https_handlers_are_parsed() {
        let plan = parse_pod(&pod(serde_json::json!({
            "initContainers": [{"name": "side", "image": "i", "restartPolicy": "Always",
                "startupProbe": {"grpc": {"port": 5000, "service": "svc"}}}],
            "containers": [{
                "name": "app", "image": "i",
                "livenessProbe": {"grpc": {"port": 5000}, "timeoutSeconds": 5},
                "readinessProbe": {"httpGet": {"port": 8443, "scheme": "HTTPS"}},
                "lifecycle": {"postStart": {"httpGet": {"port": 8443, "path": "/p", "scheme": "HTTPS"}}}
            }]
        })))
        .unwrap();
        let app = &plan.containers[0];
        assert_eq!(
            app.liveness.as_ref().unwrap().action,
            ProbeAction::Grpc {
                port: 5000,
                service: String::new()
            }
        );
        assert_eq!(
            app.liveness.as_ref().unwrap().timeout,
            Duration::from_secs(5)
        );
        assert_eq!(
            plan.init_containers[0].startup.as_ref().unwrap().action,
            ProbeAction::Grpc {
                port: 5000,
                service: "svc".into()
            }
        );
        match &app.readiness.as_ref().unwrap().action {
            ProbeAction::HttpGet(g) => assert_eq!((g.scheme, g.port), (Scheme::Https, 8443)),
            other => panic!("{other:?}"),
        }
        match &app.post_start {
            Some(HookAction::HttpGet(g)) => assert_eq!(g.scheme, Scheme::Https),
            other => panic!("{other:?}"),
        }
        for (probe, field) in [
            (
                serde_json::json!({"grpc": {"port": 0}}),
                "spec.containers[0].livenessProbe.grpc.port",
            ),
            (
                serde_json::json!({"grpc": {"port": 70000}}),
                "spec.containers[0].livenessProbe.grpc.port",
            ),
            (
                serde_json::json!({"httpGet": {"port": 80, "scheme": "FTP"}}),
                "spec.containers[0].livenessProbe.httpGet.scheme",
            ),
        ] {
            let e = parse_pod(&pod(serde_json::json!({
                "containers": [{"name": "app", "image": "i", "livenessProbe": probe}]
            })))
            .unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn unsupported_volume_names_the_field() {
        let e = parse_pod(&pod(serde_json::json!({
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "c"}}],
            "containers": [{"name": "app", "image": "img:1"}]
        })))
        .unwrap_err();
        assert_eq!(e.field, "spec.volumes[0].persistentVolumeClaim");
        assert!(e.message.contains("not supported"), "{e}");
    }

    #[test]
    fn bad_quantity_and_unknown_mount_are_rejected() {
        let e = parse_pod(&pod(serde_json::json!({
            "containers": [{"name": "app", "image": "img:1", "resources": {"limits": {"memory": "lots"}}}]
        })))
        .unwrap_err();
        assert_eq!(e.field, "spec.containers[0].resources.limits.memory");
        let e = parse_pod(&pod(serde_json::json!({
            "containers": [{"name": "app", "image": "img:1", "volumeMounts": [{"name": "x", "mountPath": "/x"}]}]
        })))
        .unwrap_err();
        assert_eq!(e.field, "spec.containers[0].volumeMounts[0].name");
    }

    #[test]
    fn image_volumes_default_their_pull_policy_mount_read_only_and_refuse_sub_paths() {
        let plan = parse_pod(&pod(serde_json::json!({
            "volumes": [
                {"name": "tagged", "image": {"reference": "reg.example/data:1"}},
                {"name": "latest", "image": {"reference": "reg.example/data"}},
                {"name": "never", "image": {"reference": "data:1", "pullPolicy": "Never"}}],
            "containers": [{"name": "a", "image": "img:1", "volumeMounts": [
                {"name": "tagged", "mountPath": "/t"},
                {"name": "never", "mountPath": "/n", "readOnly": false}]}]
        })))
        .unwrap();
        let policies: Vec<_> = plan
            .volumes
            .iter()
            .map(|v| match v {
                VolumePlan::Image {
                    reference,
                    pull_policy,
                    ..
                } => (reference.as_str(), *pull_policy),
                other => panic!("not an image volume: {other:?}"),
            })
            .collect();
        assert_eq!(
            policies,
            [
                ("reg.example/data:1", PullPolicy::IfNotPresent),
                ("reg.example/data", PullPolicy::Always),
                ("data:1", PullPolicy::Never)
            ]
        );
        assert!(plan.containers[0].mounts.iter().all(|m| m.read_only));
        let refused = |volume: serde_json::Value, mount: serde_json::Value| {
            parse_pod(&pod(serde_json::json!({
                "volumes": [volume],
                "containers": [{"name": "a", "image": "img:1", "volumeMounts": [mount]}]
            })))
            .unwrap_err()
        };
        let e = refused(
            serde_json::json!({"name": "v", "image": {"reference": "data:1"}}),
            serde_json::json!({"name": "v", "mountPath": "/v", "subPath": "etc"}),
        );
        assert_eq!(e.field, "spec.containers[0].volumeMounts[0].subPath");
        assert!(e.message.contains("not supported"), "{e}");
        let e = refused(
            serde_json::json!({"name": "v", "image": {"reference": ""}}),
            serde_json::json!({"name": "v", "mountPath": "/v"}),
        );
        assert_eq!(e.field, "spec.volumes[0].image.reference");
        let e = refused(
            serde_json::json!({"name": "v", "image": {"reference": "data:1", "pullPolicy": "Sometimes"}}),
            serde_json::json!({"name": "v", "mountPath": "/v"}),
        );
        assert_eq!(e.field, "spec.volumes[0].image.pullPolicy");
    }

    #[test]
    fn latest_defaults_to_always_pull() {
        let plan = parse_pod(&pod(serde_json::json!({
            "containers": [{"name": "a", "image": "localhost:5000/img"}, {"name": "b", "image": "img:latest"}]
        })))
        .unwrap();
        assert_eq!(plan.containers[0].pull_policy, PullPolicy::Always);
        assert_eq!(plan.containers[1].pull_policy, PullPolicy::Always);
    }

    #[test]
    fn dns_entries_cannot_inject_resolv_conf_lines() {
        let e = parse_pod(&pod(serde_json::json!({
            "dnsConfig": {"searches": ["ok.example", "evil\nnameserver 6.6.6.6"]},
            "containers": [{"name": "a", "image": "i:1"}]
        })))
        .unwrap_err();
        assert_eq!(e.field, "spec.dnsConfig.searches[1]");
        let e = parse_pod(&pod(serde_json::json!({
            "dnsConfig": {"options": [{"name": "ndots", "value": "2 rotate"}]},
            "containers": [{"name": "a", "image": "i:1"}]
        })))
        .unwrap_err();
        assert_eq!(e.field, "spec.dnsConfig.options[0]");
        let plan = parse_pod(&pod(serde_json::json!({
            "dnsConfig": {"nameservers": ["192.0.2.53"], "searches": ["a.example"],
                "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]},
            "containers": [{"name": "a", "image": "i:1"}]
        })))
        .unwrap();
        assert_eq!(plan.dns.options, vec!["ndots:2", "edns0"]);
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_cpu("250m"), Some(250));
        assert_eq!(parse_cpu("1.5"), Some(1500));
        assert_eq!(parse_bytes("1Gi"), Some(1 << 30));
        assert_eq!(parse_bytes("129e6"), Some(129_000_000));
        assert_eq!(parse_bytes("1k"), Some(1000));
        assert_eq!(parse_bytes("x"), None);
    }
}
