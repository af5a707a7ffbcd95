//! `fleetlet-agent run`: wires the store, reconciler, status file, link and systemd
//! notifications together and runs until shutdown. Shutdown never stops the pods.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::AgentConfig;
use crate::device_state::AgentDeviceState;
use crate::link_status::{LinkStatus, LinkTracker, now_rfc3339};
use crate::pod::worker::{PodContext, StatusMap};
use crate::podman::PodmanClient;
use crate::reconciler::Reconciler;
use crate::store::{DesiredStore, StoreError};
use crate::{desired_file, link, node, notify, statusfile};

/// Errors that stop `run` before it starts.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The state directory cannot be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The desired file is invalid.
    #[error(transparent)]
    DesiredFile(#[from] desired_file::DesiredFileError),
}

/// Options of `run` besides the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Feed the store from this file.
    pub desired_file: Option<PathBuf>,
}

/// Run the agent until `shutdown` is cancelled.
pub async fn run(
    cfg: AgentConfig,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let (store, report) = DesiredStore::open(&cfg.state_dir)?;
    for p in &report.problems {
        error!(error = %p, "desired state problem");
    }
    let store = Arc::new(store);
    if let Some(path) = &opts.desired_file {
        let snap = desired_file::load(path)?;
        let generation = snap.generation;
        match store.apply(snap).await? {
            true => info!(generation, file = %path.display(), "desired state loaded from file"),
            false => info!(
                generation,
                held = store.held_generation(),
                "desired file is not newer than the held state"
            ),
        }
    }
    info!(device = %cfg.device_name, generation = store.held_generation(), "fleetlet-agent starting");

    let rt = Arc::new(PodmanClient::new(&cfg.podman_socket));
    let runtime_version = match rt.version().await {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "podman not reachable yet; will keep trying");
            "unknown".into()
        }
    };
    let mut info = node::node_info(&runtime_version);
    // What the hub lets this device's pods claim as addresses.
    info.addresses = vec![node::node_ip(&cfg)];
    info.pod_networks = match rt.network_subnets("podman").await {
        Ok(subnets) => subnets,
        Err(e) => {
            warn!(error = %e, "reading the pod network's subnets; not announced to the hub");
            Vec::new()
        }
    };
    let resources = node::resources(&cfg, info.clone());
    let capacity = watch::Sender::new(resources.capacity.clone());
    let (status_tx, status_rx) = watch::channel::<StatusMap>(Arc::new(BTreeMap::new()));
    let (not_served_tx, not_served_rx) = watch::channel::<Option<String>>(None);

    let reconcile_stats = Arc::new(crate::reconcile_stats::ReconcileStats::default());
    let events = crate::events::EventRecorder::new().with_buffer(cfg.events_buffer);
    // The kubelet's first Event about its Node; sent once the link is up.
    events.record(
        "",
        "",
        crate::events::EventType::Normal,
        "Starting",
        "Starting fleetlet-agent.",
    );
    let ctx = Arc::new(PodContext {
        rt: rt.clone(),
        device: cfg.device_name.clone(),
        state_dir: cfg.state_dir.clone(),
        host_ip: node::node_ip(&cfg),
        statuses: status_tx,
        restored_restarts: statusfile::restored_restarts(&cfg.state_dir),
        restored_resources: statusfile::restored_resources(&cfg.state_dir),
        restored_start_times: statusfile::restored_start_times(&cfg.state_dir),
        policy: cfg.policy.clone(),
        allocatable: resources.allocatable,
        memory_capacity: crate::node::memory_capacity(),
        oom_score_floor: crate::pod::resize::oom_score_floor(),
        seccomp_root: cfg.seccomp_root(),
        pulled_images: crate::pod::pulled_images::PulledImages::load(&cfg.state_dir),
        reconcile_stats: reconcile_stats.clone(),
        events: events.clone(),
    });
    let reconciler = Reconciler::new(
        ctx,
        resources.allocatable,
        cfg.max_pods as usize,
        Duration::from_secs(cfg.resync_secs),
    );
    let link_tracker = LinkTracker::new(match &cfg.hub {
        None => LinkStatus::NotConfigured,
        Some(hub) => LinkStatus::Connecting {
            endpoint: hub.endpoint.clone(),
            since: now_rfc3339(),
        },
    });
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(
        reconciler.run(store.subscribe(), shutdown.clone()),
    ));
    tasks.push(tokio::spawn(statusfile::keep_written(
        cfg.state_dir.clone(),
        cfg.device_name.clone(),
        statusfile::StatusSources {
            held: store.subscribe(),
            statuses: status_rx.clone(),
            link: link_tracker.subscribe(),
            not_served: not_served_rx,
        },
        shutdown.clone(),
    )));
    let resource_stats = (cfg.stats.interval_secs > 0 && cfg.hub.is_some()).then(|| {
        let (tx, rx) = watch::channel(None);
        let demand = crate::resource_stats::Demand::default();
        tasks.push(tokio::spawn(crate::resource_stats::run(
            rt.clone(),
            cfg.device_name.clone(),
            crate::resource_stats::HostPaths::host(&cfg.state_dir),
            cfg.stats.interval_secs,
            demand.clone(),
            tx,
            shutdown.clone(),
        )));
        (rx, demand)
    });
    if let Some(hub) = cfg.hub.clone() {
        let state: Arc<dyn link::DeviceState> = Arc::new(AgentDeviceState {
            link: link_tracker,
            device: cfg.device_name.clone(),
            store: store.clone(),
            node_info: info,
            capacity,
            statuses: status_rx,
            rt: rt.clone(),
            not_served: not_served_tx.clone(),
            reconcile_stats: reconcile_stats.clone(),
            resource_stats,
            events: events.clone(),
        });
        info!(endpoint = %hub.endpoint, "starting link to hub");
        tasks.push(tokio::spawn(link::run_link(hub, state, shutdown.clone())));
    }
    tasks.push(tokio::spawn(reload_on_sighup(
        opts.desired_file.clone(),
        store.clone(),
        shutdown.clone(),
    )));
    if let Some(n) = notify::Notifier::from_env() {
        if let Err(e) = n.send("READY=1").await {
            warn!(error = %e, "sd_notify READY failed");
        }
        tasks.push(tokio::spawn(n.keep_alive(shutdown.clone())));
    }
    info!(device = %cfg.device_name, "fleetlet-agent ready");
    shutdown.cancelled().await;
    // Kept until here: the status file writer ends when its channels close.
    drop(not_served_tx);
    info!("shutting down; pods keep running");
    // Draining has a deadline: a stuck Podman call must not keep the agent from exiting.
    let drain = futures::future::join_all(tasks);
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        warn!("shutdown deadline passed; exiting anyway");
    }
    Ok(())
}

/// SIGHUP (`systemctl reload`) re-reads the desired file, if one was given; without this the
/// signal's default action would end the agent.
async fn reload_on_sighup(
    desired_file: Option<PathBuf>,
    store: Arc<DesiredStore>,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot handle SIGHUP");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = hup.recv() => if r.is_none() { return },
        }
        let Some(path) = &desired_file else {
            info!("SIGHUP: no desired file to reload");
            continue;
        };
        match desired_file::load(path) {
            Ok(snap) => {
                let generation = snap.generation;
                match store.apply(snap).await {
                    Ok(true) => info!(generation, file = %path.display(), "desired file reloaded"),
                    Ok(false) => info!(
                        generation,
                        held = store.held_generation(),
                        "desired file is not newer than the held state"
                    ),
                    Err(e) => error!(error = %e, "storing the reloaded desired file failed"),
                }
            }
            Err(e) => {
                error!(error = %e, "reloading the desired file failed; keeping the held state")
            }
        }
    }
}
