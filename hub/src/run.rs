//! `fleetlet-hub run`: builds every part of the hub from the configuration and runs it until
//! shutdown, with one cancellation token for all tasks and a drain deadline.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::start_controllers_with_ports;
use crate::config::HubConfig;
use crate::inventory::flightctl::{FlightctlInventory, FlightctlInventoryError};
use crate::inventory::{Inventory, StaticInventory, StaticInventoryError};
use crate::kubelet_api::{KubeletApi, KubeletApiError, tls_config};
use crate::leader::LeaderElector;
use crate::link::{DeviceSessions, LinkServer, SessionLimits};
use crate::metrics::{Metrics, OpsError, Readiness, bind_ops, serve_ops};
use crate::sessions::Sessions;

/// Why the hub stopped with an error. None is retried in the process: the hub exits (64 for
/// configuration, 1 otherwise) and its supervisor starts a fresh one.
#[derive(Debug, Error)]
pub enum RunError {
    /// The operations endpoint could not start (configuration).
    #[error(transparent)]
    Ops(#[from] OpsError),
    /// The kubelet endpoint could not start (configuration).
    #[error(transparent)]
    KubeletApi(#[from] KubeletApiError),
    /// The inventory could not be loaded (configuration).
    #[error(transparent)]
    Inventory(#[from] StaticInventoryError),
    /// The Flightctl inventory settings are unusable (configuration).
    #[error(transparent)]
    Flightctl(#[from] FlightctlInventoryError),
    /// No usable Kubernetes client configuration.
    #[error("kubernetes client configuration: {0}")]
    KubeConfig(String),
    /// The hub lost its leader lease; it exits so a fresh process can stand by again.
    #[error("lost leadership")]
    LostLeadership,
    /// The device link server failed.
    #[error("device link: {0}")]
    Link(#[from] crate::link::LinkError),
    /// Agentless mode's settings are unusable (configuration).
    #[error(transparent)]
    Agentless(#[from] crate::agentless::AgentlessError),
}

impl RunError {
    /// True for errors an operator fixes in the configuration (exit code 64).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::Ops(_)
                | Self::KubeletApi(_)
                | Self::Inventory(_)
                | Self::Flightctl(_)
                | Self::Agentless(_)
                | Self::KubeConfig(_)
        )
    }
}

/// Builds a kube client from the configured kubeconfig, or in-cluster / `$KUBECONFIG`.
pub async fn kube_client(cfg: &HubConfig) -> Result<kube::Client, RunError> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| RunError::KubeConfig(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| RunError::KubeConfig(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| RunError::KubeConfig(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| RunError::KubeConfig(e.to_string()))
}

/// This replica's identity: configured, or hostname and pid.
pub fn identity(cfg: &HubConfig) -> String {
    cfg.leader_election.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "fleetlet-hub".into());
        format!("{host}-{}", std::process::id())
    })
}

/// Runs the hub until `shutdown` (or until leadership is lost).
pub async fn run(cfg: HubConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let sessions = DeviceSessions::new(SessionLimits {
        max_streams_per_device: cfg.kubelet.max_streams_per_device.max(1),
        ..SessionLimits::default()
    });
    let agentless_metrics = crate::agentless::AgentlessMetrics::default();
    let metrics = {
        let mut m = Metrics::new();
        m.register_link(&sessions.stats());
        if cfg
            .inventory
            .flightctl
            .as_ref()
            .is_some_and(|fc| !fc.agentless.selector.is_empty())
        {
            m.register_agentless(&agentless_metrics);
        }
        Arc::new(m)
    };
    let ready = Readiness::default();
    let mut tasks = JoinSet::new();
    let ops = bind_ops(cfg.ops.listen).await?;
    tracing::info!(addr = %cfg.ops.listen, "operations endpoint listening");
    tasks.spawn(serve_ops(
        ops,
        metrics.clone(),
        ready.clone(),
        shutdown.clone(),
    ));

    // Flightctl's device set is empty until its first sync; acting on it earlier would delete
    // every Node, so the controllers start only once it is synced.
    let mut flightctl_health = None;
    let inventory: Arc<dyn Inventory> = match (&cfg.inventory.static_file, &cfg.inventory.flightctl)
    {
        (Some(path), _) => Arc::new(StaticInventory::load(path)?),
        (None, Some(fc)) => {
            if fc
                .token_file
                .as_ref()
                .is_some_and(|t| t.starts_with("/var/run/secrets/kubernetes.io/serviceaccount"))
            {
                tracing::warn!(
                    token_file = ?fc.token_file,
                    "the Flightctl inventory sends the hub's own Kubernetes ServiceAccount token to Flightctl, which can then read every Secret the hub can; give it a token of a ServiceAccount without Kubernetes rights (packaging/kubernetes: fleetlet-hub-flightctl)"
                );
            }
            let (inv, task) = FlightctlInventory::spawn(fc, shutdown.clone())?;
            flightctl_health = Some(inv.health());
            tasks.spawn(async move {
                let _ = task.await;
            });
            tracing::info!(api = %fc.api_url, "waiting for the first Flightctl sync");
            if !inv.synced(&shutdown).await {
                return drain(tasks).await;
            }
            Arc::new(inv)
        }
        (None, None) => return Err(RunError::KubeConfig("no inventory configured".into())),
    };
    let kubelet_tls = match cfg.kubelet.listen {
        Some(_) => Some(tls_config(&cfg.kubelet)?),
        None => None,
    };
    let client = kube_client(&cfg).await?;
    let identity = identity(&cfg);

    // The device link listens from the start, gated on leadership: a standby answers every
    // device with UNAVAILABLE "not leader" (agents then try their next hub endpoint) and is not
    // ready, so a Service in front of the replicas sends devices only to the leader.
    let (leading_tx, leading_rx) = tokio::sync::watch::channel(false);
    let events = sessions.subscribe();
    let link_result = Arc::new(tokio::sync::Mutex::new(None));
    if let Some(link_cfg) = cfg.link.clone() {
        let server = LinkServer::bind(link_cfg).await?.gated(leading_rx);
        let inventory = inventory.clone();
        let sessions = sessions.clone();
        let shutdown = shutdown.clone();
        let slot = link_result.clone();
        tasks.spawn(async move {
            if let Err(e) = server.serve(sessions, inventory, shutdown.clone()).await {
                tracing::error!(error = %e, "device link server failed");
                *slot.lock().await = Some(e);
                shutdown.cancel();
            }
        });
    }

    // Only the leader touches the API and accepts devices; a standby just waits.
    let mut elector = cfg.leader_election.enabled.then(|| {
        LeaderElector::new(
            client.clone(),
            &cfg.leader_election.namespace,
            &cfg.leader_election.name,
            &identity,
            Duration::from_secs(u64::from(cfg.leader_election.lease_duration_secs)),
            Duration::from_secs(cfg.leader_election.retry_secs),
        )
    });
    if let Some(e) = elector.as_mut() {
        tracing::info!(%identity, "waiting for leadership (standby: devices are turned away)");
        if !e.acquire(&shutdown).await {
            return drain(tasks).await;
        }
    }
    metrics.leader.set(1);
    leading_tx.send_replace(true);

    let mut dyn_sessions: Arc<dyn Sessions> = Arc::new(sessions.clone());
    let mut events = events;
    if let Some(fc) = cfg
        .inventory
        .flightctl
        .as_ref()
        .filter(|fc| cfg.inventory.static_file.is_none() && !fc.agentless.selector.is_empty())
    {
        let (agentless, merged) = crate::agentless::start(
            &mut tasks,
            fc,
            dyn_sessions,
            inventory.devices(),
            events,
            agentless_metrics,
            shutdown.clone(),
        )?;
        dyn_sessions = agentless;
        events = merged;
    }
    let node_ports = cfg
        .kubelet
        .node_ports
        .filter(|_| kubelet_tls.is_some())
        .map(|range| Arc::new(crate::kubelet_api::ports::NodePorts::new(range)));
    let synced = start_controllers_with_ports(
        &mut tasks,
        client.clone(),
        &cfg,
        &identity,
        dyn_sessions.clone(),
        events,
        inventory.devices(),
        flightctl_health,
        metrics.clone(),
        node_ports.clone(),
        shutdown.clone(),
    );
    if let (Some(addr), Some(tls)) = (cfg.kubelet.listen, kubelet_tls) {
        let listener = KubeletApi::bind(addr).await?;
        tracing::info!(%addr, "kubelet API listening");
        let api = Arc::new(
            KubeletApi::new(
                client.clone(),
                dyn_sessions,
                inventory.devices(),
                metrics.clone(),
            )
            .with_figures(sessions.resource_stats()),
        );
        if let Some(ports) = &node_ports {
            let range = ports.range();
            tracing::info!(
                first = range.first,
                last = range.last,
                "kubelet ports of nodes"
            );
            tasks.spawn(api.clone().serve_node_ports(
                addr.ip(),
                ports.subscribe(),
                tls.clone(),
                shutdown.clone(),
            ));
        }
        tasks.spawn(api.serve(listener, tls, shutdown.clone()));
    }
    {
        let ready = ready.clone();
        let mut synced = synced;
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                r = synced.wait_for(Option::is_some) => if r.is_ok() {
                    tracing::info!("caches synced; ready");
                    ready.set(true);
                },
            }
        });
    }

    let lost = match elector.as_mut() {
        Some(e) => {
            e.keep(&shutdown).await;
            !shutdown.is_cancelled()
        }
        None => {
            shutdown.cancelled().await;
            false
        }
    };
    ready.set(false);
    leading_tx.send_replace(false);
    metrics.leader.set(0);
    shutdown.cancel();
    drain(tasks).await?;
    if let Some(e) = link_result.lock().await.take() {
        return Err(RunError::Link(e));
    }
    if lost {
        return Err(RunError::LostLeadership);
    }
    Ok(())
}

/// Waits for every task, at most 10 s, then abandons the rest.
async fn drain(mut tasks: JoinSet<()>) -> Result<(), RunError> {
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { return Ok(()) },
            () = &mut deadline => {
                tracing::warn!(left = tasks.len(), "drain deadline passed; aborting remaining tasks");
                tasks.abort_all();
                return Ok(());
            }
        }
    }
}
