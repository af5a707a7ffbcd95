//! A private image registry on loopback for pull-secret tests (the agent's and the hub's): Debian's `docker-registry`
//! (distribution 2.8) with htpasswd auth on its own port and storage, plus a Podman API service
//! of the test's own that trusts it over plain HTTP through a `registries.conf` passed in
//! `CONTAINERS_REGISTRIES_CONF` (the machine's /etc/containers is never touched). That service
//! shares the stack Podman's storage, so the stack's test image can be pushed from it and the
//! pods it starts are visible to the stack's service too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;

use crate::harness::{free_port, podman_socket};

/// A running registry and the Podman service that may pull from it.
pub struct PrivateRegistry {
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// The user the registry accepts.
    pub username: String,
    /// That user's password.
    pub password: String,
    /// The test's Podman API socket (trusts the registry over HTTP).
    pub podman_socket: PathBuf,
    dir: tempfile::TempDir,
    registry: Option<Child>,
    podman: Option<Child>,
    pushed: Vec<String>,
}

/// The Podman configuration of the stack: the copy next to its socket, else the repository's.
fn stack_containers_conf() -> PathBuf {
    let next_to_socket = podman_socket().parent().map(|d| d.join("containers.conf"));
    match next_to_socket {
        Some(p) if p.exists() => p,
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../env/containers.conf"),
    }
}

fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is missing: apt-get install {package} (tests/env/install-deps.sh installs it)"
    );
}

impl PrivateRegistry {
    /// Starts the registry (htpasswd user with a random password) and the Podman service.
    pub fn start() -> Self {
        require("docker-registry", "docker-registry");
        require("htpasswd", "apache2-utils");
        let dir = tempfile::tempdir().expect("private registry setup");
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let username = "fleetlet".to_owned();
        let password = format!("pw-{:016x}", rand_u64());
        // bcrypt: the only hash distribution's htpasswd backend accepts.
        let out = Command::new("htpasswd")
            .args(["-Bbn", &username, &password])
            .output()
            .expect("private registry setup");
        assert!(out.status.success(), "htpasswd failed: {out:?}");
        std::fs::write(dir.path().join("htpasswd"), &out.stdout).expect("private registry setup");
        std::fs::create_dir(dir.path().join("storage")).expect("private registry setup");
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {storage}\n\
             http:\n  addr: {host}\n  secret: {secret:016x}\n\
             auth:\n  htpasswd:\n    realm: fleetlet-test\n    path: {htpasswd}\n",
            storage = dir.path().join("storage").display(),
            secret = rand_u64(),
            htpasswd = dir.path().join("htpasswd").display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("private registry setup");
        let registry = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.path().join("registry.log"))
                    .expect("private registry setup"),
            )
            .spawn()
            .expect("private registry setup");
        let registries_conf = dir.path().join("registries.conf");
        std::fs::write(
            &registries_conf,
            format!(
                "unqualified-search-registries = []\n\n[[registry]]\nlocation = \"{host}\"\ninsecure = true\n"
            ),
        )
        .expect("private registry setup");
        let podman_socket = dir.path().join("podman.sock");
        let podman = Command::new("podman")
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", podman_socket.display()))
            .env("CONTAINERS_CONF", stack_containers_conf())
            .env("CONTAINERS_REGISTRIES_CONF", &registries_conf)
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.path().join("podman.log"))
                    .expect("private registry setup"),
            )
            .spawn()
            .expect("private registry setup");
        let mut me = Self {
            host,
            username,
            password,
            podman_socket,
            dir,
            registry: Some(registry),
            podman: Some(podman),
            pushed: Vec::new(),
        };
        me.wait_ready();
        me
    }

    fn wait_ready(&mut self) {
        for _ in 0..200 {
            let registry_up = Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "1",
                ])
                .arg(format!("http://{}/v2/", self.host))
                .output()
                .is_ok_and(|o| o.stdout == b"401");
            if registry_up && self.podman_socket.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "registry or Podman service did not come up\n{}",
            self.logs()
        );
    }

    /// Pushes a local image to `<host>/<repository>` with the registry's credentials; the
    /// pushed name is untagged again on drop.
    pub fn push(&mut self, local: &str, repository: &str) -> String {
        let target = format!("{}/{repository}", self.host);
        let out = Command::new("podman")
            .arg("push")
            .arg("--tls-verify=false")
            .arg("--creds")
            .arg(format!("{}:{}", self.username, self.password))
            .arg(local)
            .arg(format!("docker://{target}"))
            .env("CONTAINERS_CONF", stack_containers_conf())
            .output()
            .expect("private registry setup");
        assert!(
            out.status.success(),
            "podman push {local} {target} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        self.pushed.push(target.clone());
        target
    }

    /// The `.dockerconfigjson` of a pull secret holding `username:password` for this registry.
    pub fn docker_config_json(&self, username: &str, password: &str) -> String {
        let auth =
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        serde_json::json!({"auths": {&self.host: {"auth": auth}}}).to_string()
    }

    /// What the registry and the Podman service logged.
    pub fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!(
            "--- registry log ---\n{}\n--- test podman service log ---\n{}",
            read("registry.log"),
            read("podman.log")
        )
    }
}

impl Drop for PrivateRegistry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for image in &self.pushed {
            // The registry name is one more tag of a local image: removing it only untags.
            let _ = Command::new("podman")
                .args(["rmi", "--ignore", image])
                .env("CONTAINERS_CONF", stack_containers_conf())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for child in [self.podman.take(), self.registry.take()]
            .into_iter()
            .flatten()
        {
            stop(child);
        }
    }
}

/// SIGTERM, then SIGKILL after 10 s.
fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    for _ in 0..100 {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A random number from the standard library's randomly keyed hasher (no rand dependency).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}
