//! Harness for the agent's integration tests: runs the real `fleetlet-agent` binary against the
//! real Podman of the local stack (`make env-up`), each test with its own device name, state
//! directory and loopback ports, and cleans up its pods on drop (also when the test fails).

#![allow(dead_code)]
// Test harness code: a failed setup step should fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleetlet_agent::podman::{PodmanClient, labels};
use fleetlet_agent::statusfile::{self, StatusFile};

/// The stack's Podman socket: `FLEETLET_PODMAN_SOCKET`, else the stack's env file.
pub fn podman_socket() -> PathBuf {
    if let Ok(s) = std::env::var("FLEETLET_PODMAN_SOCKET") {
        return s.into();
    }
    let dir = std::env::var("FLEETLET_DEV_DIR").unwrap_or_else(|_| "/var/tmp/fleetlet-dev".into());
    let env = std::fs::read_to_string(Path::new(&dir).join("env"))
        .expect("local stack not up: run `make env-up`");
    env.lines()
        .find_map(|l| l.strip_prefix("export FLEETLET_PODMAN_SOCKET="))
        .map(PathBuf::from)
        .expect("FLEETLET_PODMAN_SOCKET missing from the stack env file")
}

/// The stack's test image.
pub const IMAGE: &str = "localhost/fleetlet-test/busybox:1";

/// A Podman client on the stack's socket.
pub fn podman() -> PodmanClient {
    PodmanClient::new(podman_socket())
}

/// A running agent process.
pub struct Agent {
    /// Device name.
    pub device: String,
    /// State directory.
    pub state: tempfile::TempDir,
    /// Desired file.
    pub desired: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    extra_env: Vec<(String, String)>,
    socket: Option<PathBuf>,
}

impl Agent {
    /// A new agent for `device` (not started).
    pub fn new(device: &str) -> Self {
        let state = tempfile::tempdir().unwrap();
        let desired = state.path().join("desired.json");
        let log = state.path().join("agent.log");
        Self {
            device: device.into(),
            state,
            desired,
            child: None,
            log,
            extra_env: Vec::new(),
            socket: None,
        }
    }

    /// Talk to the Podman service at `socket` instead of the stack's (one sharing its storage,
    /// since cleanup goes through the stack's service).
    pub fn podman_socket(mut self, socket: &Path) -> Self {
        self.socket = Some(socket.to_owned());
        self
    }

    /// Extra environment for the process.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.extra_env.push((k.into(), v.into()));
        self
    }

    /// Write the desired file: `generation` and pod bundles (JSON values in the file format).
    pub fn set_desired(&self, generation: u64, pods: Vec<serde_json::Value>) {
        let v = serde_json::json!({"generation": generation, "pods": pods});
        std::fs::write(&self.desired, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }

    /// Start (or restart) the agent process.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetlet-agent"));
        cmd.arg("run")
            .arg("--device-name")
            .arg(&self.device)
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--podman-socket")
            .arg(self.socket.clone().unwrap_or_else(podman_socket))
            .arg("--resync-secs")
            .arg("5")
            .env("FLEETLET_AGENT_CONFIG", self.config())
            .env_remove("NOTIFY_SOCKET")
            // Logs go to the test's own file so a failure can print them.
            .env("FLEETLET_AGENT_LOG", "stderr")
            .env("RUST_LOG", "fleetlet_agent=debug")
            .stdout(Stdio::null())
            .stderr(log);
        if self.desired.exists() {
            cmd.arg("--desired-file").arg(&self.desired);
        }
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    /// SIGHUP: the agent re-reads its desired file.
    pub fn reload(&self) {
        let child = self.child.as_ref().expect("agent not running");
        let st = Command::new("kill")
            .arg("-HUP")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// SIGTERM and wait for exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent not running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        for _ in 0..300 {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        panic!("agent did not exit within 15 s of SIGTERM\n{}", self.logs());
    }

    /// An (empty) config file: everything comes from flags.
    pub fn config(&self) -> PathBuf {
        let p = self.state.path().join("agent.toml");
        if !p.exists() {
            std::fs::write(&p, "# all settings from flags\n").unwrap();
        }
        p
    }

    /// The agent's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Read the status file.
    pub fn status(&self) -> Option<StatusFile> {
        statusfile::read(self.state.path()).ok()
    }

    /// Wait (bounded by `timeout`) until `pred` holds on the status file; panics with the
    /// agent's log otherwise.
    pub async fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&StatusFile) -> bool,
    ) -> StatusFile {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.status()
                && pred(&s)
            {
                return s;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out waiting for {what}\nstatus: {:#?}\nagent log:\n{}",
                    self.status(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Filter for this device's containers.
    pub fn filter(&self) -> Vec<String> {
        vec![format!("{}={}", labels::DEVICE, self.device)]
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- agent {} log ---\n{}", self.device, self.logs());
        }
        // Remove whatever this device left in Podman.
        let device = self.device.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let p = podman();
                let f = vec![format!("{}={device}", labels::DEVICE)];
                // Twice: a create the killed agent had in flight still completes in the Podman
                // service after the first pass listed the device's pods.
                for pass in 0..2 {
                    if pass > 0 {
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                    if let Ok(pods) = p.list_pods(&f).await {
                        for pod in pods {
                            let _ = p.remove_pod(&pod.name).await;
                        }
                    }
                    if let Ok(cs) = p.list_containers(&f).await {
                        for c in cs {
                            let _ = p.remove_container(&c.id).await;
                        }
                    }
                }
            });
        })
        .join();
    }
}

/// A pod bundle in the desired-file format.
pub fn bundle(uid: &str, name: &str, spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "pod": {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "test", "uid": uid},
            "spec": spec
        }
    })
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The pod line for `uid`.
pub fn pod<'a>(s: &'a StatusFile, uid: &str) -> Option<&'a statusfile::PodLine> {
    s.pods.iter().find(|p| p.uid == uid)
}

/// Container ids of a device's pod, by container name.
pub async fn container_ids(device: &str, uid: &str) -> std::collections::BTreeMap<String, String> {
    let f = vec![
        format!("{}={device}", labels::DEVICE),
        format!("{}={uid}", labels::POD_UID),
    ];
    podman()
        .list_containers(&f)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| c.labels.get(labels::CONTAINER).cloned().map(|n| (n, c.id)))
        .collect()
}
