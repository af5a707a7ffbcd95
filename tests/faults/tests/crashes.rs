//! Crashes: `kill -9` of the hub during a rollout, of an agent while it applies a snapshot, and of
//! Podman's API service under a running agent. After each, the process is started again and the
//! test measures how long until every desired pod runs exactly once in Podman, no container is
//! left for a pod that is not desired (orphan), the API's statuses say what Podman runs and the
//! Nodes are Ready.
//!
//! Podman's API service is never the stack's shared one: the test starts a private
//! `podman system service` on a socket of its own (same storage and `CONTAINERS_CONF`, so the
//! stack's service still sees the containers) and kills only that process.
//!
//! `make test` rolls out 15 pods when killing the hub; `make faults` (FLEETLET_FAULTS_FULL=1) 50.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use fleetlet_faults::fixture::{Agreement, Fleet, record_outcome, running_snapshot};
use fleetlet_faults::{Outcome, full_suite, passed};
use fleetlet_test_support::harness::Proc;
use fleetlet_test_support::{PodmanClient, Stack};

/// How long a restarted system may take before the fault counts as not recovered.
const CONVERGE_LIMIT: Duration = Duration::from_secs(300);

fn outcome(fault: &str, secs: Option<f64>, a: &Agreement, ok: bool, note: String) -> Outcome {
    let o = Outcome {
        fault: fault.to_string(),
        recovered: secs.is_some() && ok,
        converge_secs: secs,
        pods_lost: u32::try_from(a.lost.len()).unwrap_or(u32::MAX),
        pods_duplicated: u32::try_from(a.duplicated.len()).unwrap_or(u32::MAX),
        detail: format!("{note}; {}", a.summary()),
    };
    record_outcome(&o);
    o
}

fn assert_passed(o: &Outcome) {
    assert!(passed(o), "fault not recovered: {o:#?}");
}

/// App containers of the fleet's devices that exist (any state) and that run.
async fn app_containers(fleet: &Fleet, podman: &PodmanClient) -> Option<(usize, usize)> {
    let ctrs = fleet.containers_via(podman).await?;
    let apps: Vec<_> = ctrs.iter().filter(|c| c.container.is_some()).collect();
    let running = apps.iter().filter(|c| c.state == "running").count();
    Some((apps.len(), running))
}

type Snapshot = std::collections::BTreeMap<(String, String), (String, i64)>;

/// How many of the containers in `before` still run now with the same id and start time.
async fn kept_running(fleet: &Fleet, before: &Snapshot) -> usize {
    let now = running_snapshot(&fleet.containers().await.unwrap_or_default());
    before
        .iter()
        .filter(|(k, v)| now.get(*k) == Some(*v))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_killed_during_a_rollout() {
    let replicas: usize = if full_suite() { 50 } else { 15 };
    let mut fleet = Fleet::start("fhubkill", 3, |_| {}, |_| {}).await;
    fleet
        .create_deployment("roll", i32::try_from(replicas).expect("replicas"))
        .await;
    // Kill once the rollout is under way: the first containers run (at most a few polls later).
    let podman = fleet.podman.clone();
    let start = tokio::time::Instant::now();
    let mut at_kill = (0, 0);
    // Bounded: 120 s of 50 ms polls.
    while start.elapsed() < Duration::from_secs(120) {
        if let Some((_, running)) = app_containers(&fleet, &podman).await
            && running >= 1
        {
            at_kill = (running, replicas);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(at_kill.0 > 0, "the rollout never started");
    fleet.kill_hub();
    let running_at_kill = running_snapshot(&fleet.containers().await.unwrap_or_default());
    let pods_at_kill = fleet
        .pods()
        .list(&Default::default())
        .await
        .map(|l| l.items.len())
        .unwrap_or(0);
    // The hub stays down while the Deployment controller and the scheduler keep going.
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet.restart_hub();
    let (secs, a) = fleet.converge(replicas, CONVERGE_LIMIT).await;
    let kept = kept_running(&fleet, &running_at_kill).await;
    let o = outcome(
        &format!("kill -9 hub during rollout of {replicas} pods"),
        secs,
        &a,
        kept == running_at_kill.len(),
        format!(
            "killed with {} of {} containers running and {pods_at_kill} pods in the API, restarted after 3 s (new leader election); {kept}/{} containers running at the kill untouched",
            at_kill.0,
            at_kill.1,
            running_at_kill.len()
        ),
    );
    // Assert first: a failing fault prints the hub's and agents' logs as the fleet drops.
    assert_passed(&o);
    drop(fleet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_applying_a_snapshot() {
    const PODS: usize = 12;
    let mut fleet = Fleet::start("fagentkill", 1, |_| {}, |_| {}).await;
    let node = fleet.devices[0].clone();
    for i in 0..PODS {
        fleet.create_pod(&format!("s{i}"), &node, false).await;
    }
    // Kill as soon as the agent has begun creating containers for the new snapshot.
    let podman = fleet.podman.clone();
    let start = tokio::time::Instant::now();
    let mut at_kill = None;
    // Bounded: 120 s of polls.
    while start.elapsed() < Duration::from_secs(120) {
        if let Some((created, running)) = app_containers(&fleet, &podman).await
            && created >= 1
        {
            at_kill = Some((created, running));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (created, running) = at_kill.expect("the agent never began applying the snapshot");
    fleet.kill_agent(0);
    let running_at_kill = running_snapshot(&fleet.containers().await.unwrap_or_default());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let state_files: Vec<String> = std::fs::read_dir(&fleet.agents[0].state_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    fleet.restart_agent(0);
    let (secs, a) = fleet.converge(PODS, CONVERGE_LIMIT).await;
    let adopted = kept_running(&fleet, &running_at_kill).await;
    let o = outcome(
        &format!("kill -9 agent while applying a snapshot of {PODS} pods"),
        secs,
        &a,
        adopted == running_at_kill.len(),
        format!(
            "killed with {created} of {PODS} app containers created ({running} running); state dir held {state_files:?}; restarted after 2 s; {adopted}/{} containers running at the kill adopted (same id and start time)",
            running_at_kill.len()
        ),
    );
    // Assert first: a failing fault prints the hub's and agents' logs as the fleet drops.
    assert_passed(&o);
    drop(fleet);
}

/// A Podman API service of this test only, on its own socket.
struct PrivatePodman {
    dir: tempfile::TempDir,
    socket: PathBuf,
    conf: PathBuf,
}

impl PrivatePodman {
    fn new() -> PrivatePodman {
        let stack = Stack::shared().expect("local stack (make env-up)");
        let conf = PathBuf::from(
            stack
                .var("CONTAINERS_CONF")
                .expect("CONTAINERS_CONF in the stack's env"),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("podman.sock");
        PrivatePodman { dir, socket, conf }
    }

    /// Starts the service and waits until it answers.
    async fn start(&self) -> Proc {
        let _ = std::fs::remove_file(&self.socket);
        let proc = Proc::spawn(
            "podman system service (private)",
            Command::new("podman")
                .args(["system", "service", "--time=0"])
                .arg(format!("unix://{}", self.socket.display()))
                .env("CONTAINERS_CONF", &self.conf),
            self.dir.path().join("podman.log"),
        );
        let client = PodmanClient::new(&self.socket);
        fleetlet_test_support::wait_for("private Podman service", Duration::from_secs(30), || {
            let c = client.clone();
            async move { c.ping().await.unwrap_or(false) }
        })
        .await
        .expect("private Podman service answers");
        proc
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_service_killed_under_a_running_agent() {
    let podman = PrivatePodman::new();
    let mut service = Some(podman.start().await);
    let socket = podman.socket.clone();
    let mut fleet = Fleet::start(
        "fpodmankill",
        1,
        |_| {},
        |a| a.podman_socket = socket.clone(),
    )
    .await;
    let node = fleet.devices[0].clone();
    for i in 0..3 {
        fleet.create_pod(&format!("k{i}"), &node, false).await;
    }
    let (secs, a) = fleet.converge(3, Duration::from_secs(120)).await;
    assert!(secs.is_some(), "pods never ran: {}", a.summary());
    let before = running_snapshot(&fleet.containers().await.expect("containers"));

    if let Some(s) = service.take() {
        s.kill9();
    }
    // While Podman's API is gone: the desired state changes (two more pods), the containers
    // keep running (seen through the stack's own Podman service), the agent keeps running.
    for i in 3..5 {
        fleet.create_pod(&format!("k{i}"), &node, false).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = running_snapshot(&fleet.containers().await.unwrap_or_default());
    let kept_running = before.iter().all(|(k, v)| during.get(k) == Some(v));
    let agent_alive = fleet.agent_procs[0].as_mut().is_some_and(Proc::running);

    service = Some(podman.start().await);
    let (secs, a) = fleet.converge(5, CONVERGE_LIMIT).await;
    let after = running_snapshot(&fleet.containers().await.unwrap_or_default());
    let adopted = before.iter().all(|(k, v)| after.get(k) == Some(v));
    let o = outcome(
        "kill -9 Podman API service (private), 2 pods added meanwhile",
        secs,
        &a,
        kept_running && agent_alive && adopted,
        format!(
            "service down 10 s: 3 containers kept running {kept_running}, agent alive {agent_alive}; after restart the same 3 containers adopted (ids, start times) {adopted}"
        ),
    );
    assert_passed(&o);
    drop(fleet);
    drop(service);
}
