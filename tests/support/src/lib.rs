//! Test support for fleetlet's integration tests: access to the real local stack
//! (Kubernetes control plane, Podman, journald) brought up by `make env-up`.
//!
//! `make test` runs `make env-up` first, which writes `target/dev/env`; [`Stack::shared`] reads
//! it, so one stack serves the whole run. Tests that need the stack fail (they do not skip) when
//! it is not up: run `make env-up`.
#![forbid(unsafe_code)]

pub mod disk;
pub mod harness;
mod logs;
pub mod netns;
pub mod orphans;
mod podman;
pub mod registry;
mod wait;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub use logs::LogsOnFailure;
pub use podman::{PodmanClient, PodmanError};
pub use wait::{Condition, WaitError, wait_for};

/// Errors reaching the local stack.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("no stack environment file found (looked at {looked:?}); run `make env-up` first")]
    NoEnvFile { looked: Vec<PathBuf> },
    #[error("cannot read the stack environment file {path}: {source}")]
    ReadEnv {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} does not set {name}; rerun `make env-up`")]
    MissingVar { path: PathBuf, name: &'static str },
    #[error("cannot load kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build a Kubernetes client from {path}: {source}")]
    Client { path: PathBuf, source: kube::Error },
    #[error("{what}: {source}")]
    Kube {
        what: String,
        source: Box<kube::Error>,
    },
    #[error("the API server returned no token for ServiceAccount {namespace}/{name}")]
    NoToken { namespace: String, name: String },
}

/// The running local stack, as described by the `env` file `make env-up` wrote.
#[derive(Debug, Clone)]
pub struct Stack {
    env_file: PathBuf,
    vars: BTreeMap<String, String>,
    kubeconfig: PathBuf,
    podman_socket: PathBuf,
    log_dir: PathBuf,
}

static SHARED: OnceLock<Stack> = OnceLock::new();

impl Stack {
    /// The stack of this checkout: `$FLEETLET_ENV_FILE` if set, else `target/dev/env` of the
    /// workspace, else `$FLEETLET_DEV_DIR/env` (default `/var/tmp/fleetlet-dev/env`).
    pub fn shared() -> Result<&'static Stack, StackError> {
        if let Some(stack) = SHARED.get() {
            return Ok(stack);
        }
        let stack = Stack::load(&Self::find_env_file()?)?;
        Ok(SHARED.get_or_init(|| stack))
    }

    fn find_env_file() -> Result<PathBuf, StackError> {
        let mut candidates = Vec::new();
        if let Some(file) = std::env::var_os("FLEETLET_ENV_FILE") {
            candidates.push(PathBuf::from(file));
        }
        // tests/support → workspace root.
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        candidates.push(workspace.join("target/dev/env"));
        let dev_dir = std::env::var_os("FLEETLET_DEV_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/fleetlet-dev"));
        candidates.push(dev_dir.join("env"));
        match candidates.iter().find(|p| p.is_file()) {
            Some(found) => Ok(found.clone()),
            None => Err(StackError::NoEnvFile { looked: candidates }),
        }
    }

    /// Reads an env file of `export NAME=VALUE` lines.
    pub fn load(env_file: &Path) -> Result<Stack, StackError> {
        let text = std::fs::read_to_string(env_file).map_err(|source| StackError::ReadEnv {
            path: env_file.to_path_buf(),
            source,
        })?;
        let vars = parse_env(&text);
        let get = |name: &'static str| {
            vars.get(name)
                .map(PathBuf::from)
                .ok_or_else(|| StackError::MissingVar {
                    path: env_file.to_path_buf(),
                    name,
                })
        };
        Ok(Stack {
            kubeconfig: get("KUBECONFIG")?,
            podman_socket: get("FLEETLET_PODMAN_SOCKET")?,
            log_dir: get("FLEETLET_LOG_DIR")?,
            env_file: env_file.to_path_buf(),
            vars,
        })
    }

    /// The env file this stack was read from.
    pub fn env_file(&self) -> &Path {
        &self.env_file
    }

    /// A variable of the env file (e.g. `FLEETLET_KUBECTL`, `FLEETLET_CLUSTER_CA_CERT`).
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// All variables of the env file, e.g. to pass to a child process.
    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.vars
    }

    /// The admin kubeconfig (user in `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The unix socket of the Podman REST service.
    pub fn podman_socket(&self) -> &Path {
        &self.podman_socket
    }

    /// A client for the Podman REST API on [`Stack::podman_socket`].
    pub fn podman(&self) -> PodmanClient {
        PodmanClient::new(&self.podman_socket)
    }

    /// The local test image (busybox-static).
    pub fn test_image(&self) -> &str {
        self.var("FLEETLET_TEST_IMAGE")
            .unwrap_or("localhost/fleetlet-test/busybox:1")
    }

    /// The `kubectl` built with the control plane.
    pub fn kubectl(&self) -> Option<&Path> {
        self.var("FLEETLET_KUBECTL").map(Path::new)
    }

    /// Where the stack's components write their logs (`<component>.log`).
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// The admin client's configuration.
    pub async fn admin_config(&self) -> Result<Config, StackError> {
        let kubeconfig =
            Kubeconfig::read_from(&self.kubeconfig).map_err(|source| StackError::Kubeconfig {
                path: self.kubeconfig.clone(),
                source,
            })?;
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|source| StackError::Kubeconfig {
                path: self.kubeconfig.clone(),
                source,
            })
    }

    /// A Kubernetes client with cluster-admin rights. A client belongs to the tokio runtime it
    /// was made on: make one per test.
    pub async fn admin_client(&self) -> Result<Client, StackError> {
        let config = self.admin_config().await?;
        Client::try_from(config).map_err(|source| StackError::Client {
            path: self.kubeconfig.clone(),
            source,
        })
    }

    /// A Kubernetes client authenticated as ServiceAccount `namespace/name` with a token from the
    /// TokenRequest API (valid one hour). Creates the ServiceAccount if it does not exist; its
    /// rights are whatever RBAC grants it.
    pub async fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Client, StackError> {
        let token = self.service_account_token(namespace, name, 3600).await?;
        let mut config = self.admin_config().await?;
        config.auth_info = AuthInfo {
            token: Some(secrecy::SecretString::from(token)),
            ..AuthInfo::default()
        };
        config.default_namespace = namespace.to_string();
        Client::try_from(config).map_err(|source| StackError::Client {
            path: self.kubeconfig.clone(),
            source,
        })
    }

    /// A bound token of ServiceAccount `namespace/name` (created if missing).
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        expiration_seconds: i64,
    ) -> Result<String, StackError> {
        let admin = self.admin_client().await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(admin, namespace);
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.to_string()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        match accounts.create(&PostParams::default(), &account).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(source) => {
                return Err(StackError::Kube {
                    what: format!("creating ServiceAccount {namespace}/{name}"),
                    source: Box::new(source),
                });
            }
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(expiration_seconds),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let issued = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .map_err(|source| StackError::Kube {
                what: format!("requesting a token for ServiceAccount {namespace}/{name}"),
                source: Box::new(source),
            })?;
        issued
            .status
            .and_then(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| StackError::NoToken {
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
    }

    /// Prints the last `lines` lines of every component log to stderr.
    pub fn dump_logs(&self, lines: usize) {
        logs::dump_dir(&self.log_dir, lines);
    }

    /// A guard that prints the component logs (and any files added to it) if the test panics
    /// while it is alive: `let _logs = stack.logs_on_failure();`.
    pub fn logs_on_failure(&self) -> LogsOnFailure {
        LogsOnFailure::new(self.log_dir.clone())
    }
}

/// Parses `export NAME=VALUE` / `NAME=VALUE` lines; `#` comments and blank lines are skipped,
/// one level of matching single or double quotes around VALUE is removed.
fn parse_env(text: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let unquoted = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
            .unwrap_or(value);
        vars.insert(name.trim().to_string(), unquoted.to_string());
    }
    vars
}

/// Shorthand for the usual timeouts of the stack's tests.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_env_lines() {
        let vars = parse_env(
            "# comment\n\nexport KUBECONFIG=/a/kubeconfig\nFOO='b c'\nexport BAR=\"d\"\nnot a var\n",
        );
        assert_eq!(
            vars.get("KUBECONFIG").map(String::as_str),
            Some("/a/kubeconfig")
        );
        assert_eq!(vars.get("FOO").map(String::as_str), Some("b c"));
        assert_eq!(vars.get("BAR").map(String::as_str), Some("d"));
        assert_eq!(vars.len(), 3);
    }

    #[test]
    fn load_reports_missing_variables() {
        let dir = std::env::temp_dir().join(format!("fleetlet-support-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("env");
        std::fs::write(&file, "export KUBECONFIG=/x\n").expect("write env");
        let err = Stack::load(&file).expect_err("incomplete env must not load");
        assert!(
            matches!(
                err,
                StackError::MissingVar {
                    name: "FLEETLET_PODMAN_SOCKET",
                    ..
                }
            ),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
