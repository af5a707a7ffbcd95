//! The device link end to end: the real hub server and the real agent client over real TLS 1.3 and
//! gRPC on 127.0.0.1, with a development PKI made by `fleetlet_hub::pki`. Only the device's state
//! (the agent's disk store, another component) is the in-memory `MemoryDeviceState`.

// Test harness helpers outside #[test] fns: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use fleetlet_agent::link::memory::MemoryDeviceState;
use fleetlet_agent::link::{DeviceState, LinkClientError, LinkConfig, run_link, run_link_once};
use fleetlet_hub::inventory::{Inventory, InventoryDevice, StaticInventory};
use fleetlet_hub::link::{DeviceSessions, LinkServer, LinkServerConfig, LinkStats, SessionEvent};
use fleetlet_hub::pki;
use fleetlet_proto::v1;
use futures::StreamExt;
use prost::Message;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Upper bound for waiting on anything in these tests (a bound, not a timing assertion).
const WAIT: Duration = Duration::from_secs(30);

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new(devices: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), false).unwrap();
        pki::issue_server(
            dir.path(),
            &["localhost".into(), "127.0.0.1".into()],
            pki::time_span(30),
        )
        .unwrap();
        for device in devices {
            pki::issue_device(dir.path(), device, "", pki::time_span(30)).unwrap();
        }
        Self { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn device_files(&self, device: &str) -> (PathBuf, PathBuf) {
        (
            self.path(&format!("devices/{device}.pem")),
            self.path(&format!("devices/{device}-key.pem")),
        )
    }

    fn server_config(&self, listen: SocketAddr) -> LinkServerConfig {
        let mut config = LinkServerConfig::new(
            listen,
            self.path("ca.pem"),
            self.path("hub.pem"),
            self.path("hub-key.pem"),
        );
        config.reload_interval_secs = 1;
        config
    }

    fn link_config(&self, device: &str, addr: SocketAddr) -> LinkConfig {
        let (cert, key) = self.device_files(device);
        let mut cfg = LinkConfig::new(format!("https://{addr}"), self.path("ca.pem"), cert, key);
        cfg.reconnect_max_backoff_secs = 1;
        cfg
    }
}

fn device(name: &str) -> InventoryDevice {
    InventoryDevice {
        name: name.into(),
        labels: Default::default(),
        fleet: None,
        enabled: true,
    }
}

struct Hub {
    addr: SocketAddr,
    sessions: DeviceSessions,
    events: mpsc::Receiver<SessionEvent>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), fleetlet_hub::link::LinkError>>,
}

impl Hub {
    async fn start(config: LinkServerConfig, inventory: Arc<dyn Inventory>) -> Self {
        let sessions = DeviceSessions::default();
        Self::start_with(config, inventory, sessions).await
    }

    async fn start_with(
        config: LinkServerConfig,
        inventory: Arc<dyn Inventory>,
        sessions: DeviceSessions,
    ) -> Self {
        let server = LinkServer::bind(config).await.unwrap();
        let addr = server.local_addr().unwrap();
        let events = sessions.subscribe();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.serve(sessions.clone(), inventory, shutdown.clone()));
        Self {
            addr,
            sessions,
            events,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("hub stops")
            .unwrap()
            .unwrap();
    }

    fn stats(&self) -> Arc<LinkStats> {
        self.sessions.stats()
    }

    /// The next event matching `pred` (others are skipped).
    async fn event(&mut self, what: &str, pred: impl Fn(&SessionEvent) -> bool) -> SessionEvent {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what} event within {WAIT:?}"))
                .expect("event stream open");
            if pred(&event) {
                return event;
            }
        }
    }
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_applied(state: &MemoryDeviceState, generation: u64) {
    let mut rx = state.applied();
    tokio::time::timeout(WAIT, rx.wait_for(|g| *g >= generation))
        .await
        .unwrap_or_else(|_| panic!("device stores generation {generation}"))
        .unwrap();
}

fn pod(uid: &str) -> v1::PodBundle {
    v1::PodBundle {
        pod_json: Bytes::from(format!(r#"{{"metadata":{{"uid":"{uid}"}}}}"#)),
        ..Default::default()
    }
}

fn status(uid: &str, phase: &str) -> v1::PodStatusEntry {
    v1::PodStatusEntry {
        uid: uid.into(),
        namespace: "default".into(),
        name: uid.into(),
        status_json: Bytes::from(format!(r#"{{"phase":"{phase}"}}"#)),
        removed: false,
    }
}

fn is_acked(name: &str, generation: u64) -> impl Fn(&SessionEvent) -> bool + '_ {
    move |e| matches!(e, SessionEvent::Acked { device, generation: g, error: None } if device == name && *g == generation)
}

fn start_agent(
    cfg: LinkConfig,
    state: Arc<MemoryDeviceState>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_link(cfg, state as Arc<dyn DeviceState>, stop.clone()));
    (stop, task)
}

#[tokio::test]
async fn snapshot_ack_status_and_logs_flow_end_to_end() {
    let pki = Pki::new(&["dev-1"]);
    let inventory = Arc::new(StaticInventory::new([device("dev-1")]));
    let mut hub = Hub::start(pki.server_config("127.0.0.1:0".parse().unwrap()), inventory).await;
    let first = hub.sessions.set_desired("dev-1", vec![pod("a")]);

    let state = MemoryDeviceState::new("dev-1");
    state.set_pod_status(status("a", "Pending"));
    state.set_log_text(b"hello from dev-1\n");
    let (stop, task) = start_agent(pki.link_config("dev-1", hub.addr), Arc::clone(&state));

    hub.event("connected", |e| matches!(e, SessionEvent::Connected { device, hello } if device == "dev-1" && hello.held_generation == 0)).await;
    let SessionEvent::PodStatus { report, .. } = hub
        .event(
            "full status",
            |e| matches!(e, SessionEvent::PodStatus { report, .. } if report.full),
        )
        .await
    else {
        unreachable!()
    };
    assert_eq!(report.pods.len(), 1);
    hub.event("ack", is_acked("dev-1", first)).await;
    // Persisted before acknowledged.
    assert_eq!(state.held_generation(), first);
    assert_eq!(state.snapshots()[0].pods[0].pod_json, pod("a").pod_json);

    // Status changes travel as deltas.
    state.set_pod_status(status("a", "Running"));
    let SessionEvent::PodStatus { report, .. } = hub
        .event(
            "delta status",
            |e| matches!(e, SessionEvent::PodStatus { report, .. } if !report.full),
        )
        .await
    else {
        unreachable!()
    };
    assert_eq!(report.pods, vec![status("a", "Running")]);

    // A new desired set is pushed while connected.
    let second = hub.sessions.set_desired("dev-1", vec![pod("a"), pod("b")]);
    hub.event("second ack", is_acked("dev-1", second)).await;
    assert_eq!(state.snapshots().last().unwrap().pods.len(), 2);

    // Logs are relayed; an error from the device arrives as an error.
    let mut logs = hub
        .sessions
        .open_logs(
            "dev-1",
            v1::LogRequest {
                pod_uid: "a".into(),
                container: "c".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut text = Vec::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, logs.next()).await.unwrap() {
        text.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(text, b"hello from dev-1\n");
    let mut failing = hub
        .sessions
        .open_logs(
            "dev-1",
            v1::LogRequest {
                pod_uid: "a".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let err = tokio::time::timeout(WAIT, failing.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("no container named"), "{err}");

    stop.cancel();
    task.await.unwrap();
    hub.event(
        "disconnected",
        |e| matches!(e, SessionEvent::Disconnected { device } if device == "dev-1"),
    )
    .await;
    assert!(!hub.sessions.is_connected("dev-1"));
    hub.stop().await;
}

#[tokio::test]
async fn device_recovers_after_hub_restart_without_losing_snapshot_or_status() {
    let pki = Pki::new(&["dev-1"]);
    let inventory: Arc<dyn Inventory> = Arc::new(StaticInventory::new([device("dev-1")]));
    let mut hub = Hub::start(
        pki.server_config("127.0.0.1:0".parse().unwrap()),
        Arc::clone(&inventory),
    )
    .await;
    let addr = hub.addr;
    let first = hub.sessions.set_desired("dev-1", vec![pod("a")]);
    let state = MemoryDeviceState::new("dev-1");
    let (stop, task) = start_agent(pki.link_config("dev-1", addr), Arc::clone(&state));
    hub.event("ack", is_acked("dev-1", first)).await;
    hub.stop().await;

    // While the hub is down the device's pod changes; the restarted hub knows nothing.
    state.set_pod_status(status("a", "Failed"));
    let mut hub = Hub::start(pki.server_config(addr), Arc::clone(&inventory)).await;
    let second = hub.sessions.set_desired("dev-1", vec![pod("b")]);
    assert!(
        second > first,
        "generations keep increasing across hub restarts"
    );
    let SessionEvent::Connected { hello, .. } = hub
        .event("reconnect", |e| matches!(e, SessionEvent::Connected { .. }))
        .await
    else {
        unreachable!()
    };
    assert_eq!(hello.held_generation, first);
    let SessionEvent::PodStatus { report, .. } = hub
        .event(
            "resync",
            |e| matches!(e, SessionEvent::PodStatus { report, .. } if report.full),
        )
        .await
    else {
        unreachable!()
    };
    assert_eq!(report.pods, vec![status("a", "Failed")]);
    hub.event("ack after restart", is_acked("dev-1", second))
        .await;
    assert_eq!(state.held_generation(), second);

    // A restarted hub that already has the device's generation does not resend it.
    let sent_before = LinkStats::get(&hub.stats().snapshots_sent);
    hub.stop().await;
    let sessions = DeviceSessions::default();
    let mut hub = Hub::start_with(pki.server_config(addr), inventory, sessions).await;
    hub.event("reconnect 2", |e| {
        matches!(e, SessionEvent::Connected { .. })
    })
    .await;
    assert_eq!(
        LinkStats::get(&hub.stats().snapshots_sent),
        0,
        "nothing pushed before the hub decides ({sent_before} before)"
    );
    stop.cancel();
    task.await.unwrap();
    hub.stop().await;
}

/// A loopback TCP proxy the test controls: it can drop every current connection, or make them go
/// silent (sockets stay open, nothing is forwarded: a half-open link). New connections are
/// always forwarded.
struct Proxy {
    addr: SocketAddr,
    state: watch::Sender<ProxyState>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Debug, Clone, Copy, Default)]
struct ProxyState {
    epoch: u64,
    dropped_below: u64,
    silent_below: u64,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, _) = watch::channel(ProxyState::default());
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let state_tx = state.clone();
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::Relaxed);
                let mut state = state_tx.subscribe();
                let epoch = state.borrow_and_update().epoch;
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let pump = async {
                        tokio::select! {
                            _ = tokio::io::copy(&mut cr, &mut sw) => {}
                            _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        }
                    };
                    tokio::select! {
                        () = pump => {}
                        _ = async { state.wait_for(|s| epoch < s.dropped_below || epoch < s.silent_below).await.is_ok() } => {
                            // Silent: hold the sockets, forward nothing, until dropped or the
                            // proxy goes away.
                            let _ = async { state.wait_for(|s| epoch < s.dropped_below).await.is_ok() }.await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            state,
            accepted,
        }
    }

    /// Close every current connection.
    fn drop_all(&self) {
        self.state.send_modify(|s| {
            s.dropped_below = s.epoch + 1;
            s.epoch += 1;
        });
    }

    /// Stop forwarding on current connections, keeping them open.
    fn go_silent(&self) {
        self.state.send_modify(|s| {
            s.silent_below = s.epoch + 1;
            s.epoch += 1;
        });
    }
}

#[tokio::test]
async fn dropped_connection_recovers_and_delivers_what_changed_meanwhile() {
    let pki = Pki::new(&["dev-1"]);
    let inventory = Arc::new(StaticInventory::new([device("dev-1")]));
    let mut hub = Hub::start(pki.server_config("127.0.0.1:0".parse().unwrap()), inventory).await;
    let proxy = Proxy::start(hub.addr).await;
    let state = MemoryDeviceState::new("dev-1");
    let (stop, task) = start_agent(pki.link_config("dev-1", proxy.addr), Arc::clone(&state));
    hub.event("connected", |e| matches!(e, SessionEvent::Connected { .. }))
        .await;
    let first = hub.sessions.set_desired("dev-1", vec![pod("a")]);
    hub.event("ack", is_acked("dev-1", first)).await;

    proxy.drop_all();
    hub.event("disconnected", |e| {
        matches!(e, SessionEvent::Disconnected { .. })
    })
    .await;
    let second = hub.sessions.set_desired("dev-1", vec![pod("b")]);
    state.set_pod_status(status("b", "Running"));
    hub.event("reconnected", |e| {
        matches!(e, SessionEvent::Connected { .. })
    })
    .await;
    let SessionEvent::PodStatus { report, .. } = hub
        .event(
            "resync",
            |e| matches!(e, SessionEvent::PodStatus { report, .. } if report.full),
        )
        .await
    else {
        unreachable!()
    };
    assert_eq!(report.pods, vec![status("b", "Running")]);
    hub.event("ack", is_acked("dev-1", second)).await;
    wait_applied(&state, second).await;
    assert!(proxy.accepted.load(Ordering::Relaxed) >= 2);
    stop.cancel();
    task.await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn half_open_link_is_detected_by_keepalive_on_both_sides() {
    let pki = Pki::new(&["dev-1"]);
    let inventory = Arc::new(StaticInventory::new([device("dev-1")]));
    let mut config = pki.server_config("127.0.0.1:0".parse().unwrap());
    config.keepalive_interval_secs = 1;
    config.keepalive_timeout_secs = 1;
    let mut hub = Hub::start(config, inventory).await;
    let proxy = Proxy::start(hub.addr).await;
    let state = MemoryDeviceState::new("dev-1");
    let mut cfg = pki.link_config("dev-1", proxy.addr);
    cfg.keepalive_interval_secs = 1;
    cfg.keepalive_timeout_secs = 1;
    let (stop, task) = start_agent(cfg, Arc::clone(&state));
    hub.event("connected", |e| matches!(e, SessionEvent::Connected { .. }))
        .await;

    // Nothing is closed: only keepalive can notice that no byte gets through any more.
    proxy.go_silent();
    hub.event("hub notices the dead link", |e| {
        matches!(e, SessionEvent::Disconnected { .. })
    })
    .await;
    let generation = hub.sessions.set_desired("dev-1", vec![pod("a")]);
    hub.event("agent reconnects by itself", |e| {
        matches!(e, SessionEvent::Connected { .. })
    })
    .await;
    hub.event("ack", is_acked("dev-1", generation)).await;
    stop.cancel();
    task.await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn misuse_is_refused_with_a_clear_error_while_others_keep_working() {
    let pki = Pki::new(&["dev-1", "dev-2", "stranger"]);
    // Expired certificate for dev-2 (issued by the right CA).
    let expired = tempfile::tempdir().unwrap();
    std::fs::copy(pki.path("ca.pem"), expired.path().join("ca.pem")).unwrap();
    std::fs::copy(pki.path("ca-key.pem"), expired.path().join("ca-key.pem")).unwrap();
    let now = time::OffsetDateTime::now_utc();
    pki::issue_device(
        expired.path(),
        "dev-2",
        "",
        pki::Validity {
            not_before: now - time::Duration::days(10),
            not_after: now - time::Duration::days(1),
        },
    )
    .unwrap();
    let rogue = Pki::new(&["dev-1"]);

    let inventory = Arc::new(StaticInventory::new([device("dev-1"), device("dev-2")]));
    let mut hub = Hub::start(pki.server_config("127.0.0.1:0".parse().unwrap()), inventory).await;
    let good = MemoryDeviceState::new("dev-1");
    let (stop, task) = start_agent(pki.link_config("dev-1", hub.addr), Arc::clone(&good));
    hub.event("dev-1 connected", |e| {
        matches!(e, SessionEvent::Connected { .. })
    })
    .await;
    let never = CancellationToken::new();

    // Unknown CA.
    let mut cfg = pki.link_config("dev-1", hub.addr);
    (cfg.cert_file, cfg.key_file) = rogue.device_files("dev-1");
    let err = run_link_once(&cfg, MemoryDeviceState::new("dev-1"), &never)
        .await
        .unwrap_err();
    println!("unknown CA: {err}");
    assert!(
        matches!(
            err,
            LinkClientError::Connect { .. }
                | LinkClientError::Stream { .. }
                | LinkClientError::Rejected { .. }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("received fatal alert: UnknownCA"),
        "{err}"
    );

    // Expired certificate.
    let mut cfg = pki.link_config("dev-2", hub.addr);
    cfg.cert_file = expired.path().join("devices/dev-2.pem");
    cfg.key_file = expired.path().join("devices/dev-2-key.pem");
    let err = run_link_once(&cfg, MemoryDeviceState::new("dev-2"), &never)
        .await
        .unwrap_err();
    println!("expired: {err}");
    assert!(err.to_string().contains("Expired"), "{err}");
    wait_until("both handshakes counted", || {
        LinkStats::get(&hub.stats().handshakes_failed) >= 2
    })
    .await;

    // Valid certificate, but the device is not in the inventory.
    let cfg = pki.link_config("stranger", hub.addr);
    let err = run_link_once(&cfg, MemoryDeviceState::new("stranger"), &never)
        .await
        .unwrap_err();
    println!("not in inventory: {err}");
    assert!(
        matches!(&err, LinkClientError::NotServed { message, .. } if message.contains("stranger") && message.contains("inventory")),
        "{err}"
    );

    // dev-1's certificate, hello naming dev-2: device A cannot act as B.
    let mut raw = RawClient::connect(&pki, "dev-1", hub.addr, 1 << 20).await;
    let (code, message) = raw.call(vec![frame(&hello("dev-2"))]).await;
    println!("impersonation: {code} {message}");
    assert_eq!(code, tonic::Code::PermissionDenied as i32);
    assert!(
        message.contains("dev-2") && message.contains("dev-1"),
        "{message}"
    );

    // Malformed protobuf as the first message.
    let (code, message) = raw
        .call(vec![frame(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0x01])])
        .await;
    println!("malformed: {code} {message}");
    assert_eq!(code, tonic::Code::InvalidArgument as i32);
    assert!(message.contains("malformed"), "{message}");

    // Oversized message: the length prefix alone is refused, nothing that big is buffered.
    let too_big = u32::try_from(fleetlet_proto::MAX_MESSAGE_BYTES + 1).unwrap();
    let mut header = vec![0u8];
    header.extend_from_slice(&too_big.to_be_bytes());
    header.extend_from_slice(&[0u8; 1024]);
    let (code, message) = raw.call(vec![Bytes::from(header)]).await;
    println!("oversized: {code} {message}");
    assert_eq!(code, tonic::Code::ResourceExhausted as i32);

    // Malformed protobuf after a good hello ends that session with InvalidArgument.
    let (code, message) = raw
        .call(vec![frame(&hello("dev-1")), frame(&[0x0a, 0xff, 0xff])])
        .await;
    println!("malformed after hello: {code} {message}");
    assert_eq!(code, tonic::Code::InvalidArgument as i32);

    // Through all of it dev-1 stays served (its raw impersonation replaced and then ended the
    // real session once; the real agent reconnects on its own).
    let generation = hub.sessions.set_desired("dev-1", vec![pod("a")]);
    wait_applied(&good, generation).await;
    assert!(LinkStats::get(&hub.stats().streams_rejected) >= 4);
    stop.cancel();
    task.await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn a_device_that_never_reads_costs_bounded_memory_and_is_cut() {
    let pki = Pki::new(&["dev-1", "slow"]);
    let inventory = Arc::new(StaticInventory::new([device("dev-1"), device("slow")]));
    let mut config = pki.server_config("127.0.0.1:0".parse().unwrap());
    config.stall_timeout_secs = 1;
    let mut hub = Hub::start(config, inventory).await;

    // A raw HTTP/2 client that advertises a 1 KiB window and never reads its response.
    let mut slow = RawClient::connect(&pki, "slow", hub.addr, 1024).await;
    let _stream = slow.open(vec![frame(&hello("slow"))]).await;
    hub.event(
        "slow connected",
        |e| matches!(e, SessionEvent::Connected { device, .. } if device == "slow"),
    )
    .await;
    let noise: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let big = v1::PodBundle {
        pod_json: Bytes::from(noise),
        ..Default::default()
    };
    let rounds = 50;
    for _ in 0..rounds {
        hub.sessions.set_desired("slow", vec![big.clone()]);
        tokio::task::yield_now().await;
    }
    let stats = hub.stats();
    hub.event(
        "slow cut",
        |e| matches!(e, SessionEvent::Disconnected { device } if device == "slow"),
    )
    .await;
    let sent = LinkStats::get(&stats.snapshots_sent);
    let superseded = LinkStats::get(&stats.snapshots_superseded);
    println!(
        "sent {sent} superseded {superseded} cut {}",
        LinkStats::get(&stats.sessions_cut_stalled)
    );
    // Level-triggered: at most a couple of snapshots were ever handed to the stuck stream; every
    // other one replaced its predecessor instead of queueing behind it.
    assert!(sent <= 2, "sent {sent}");
    assert!(
        sent + superseded + 1 >= rounds,
        "sent {sent} superseded {superseded}"
    );
    assert_eq!(LinkStats::get(&stats.sessions_cut_stalled), 1);

    // Meanwhile a normal device is served as usual.
    let state = MemoryDeviceState::new("dev-1");
    let (stop, task) = start_agent(pki.link_config("dev-1", hub.addr), Arc::clone(&state));
    let generation = hub.sessions.set_desired("dev-1", vec![pod("a")]);
    wait_applied(&state, generation).await;
    stop.cancel();
    task.await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn certificates_reload_from_disk_on_both_sides() {
    let pki = Pki::new(&["dev-1"]);
    let inventory = Arc::new(StaticInventory::new([device("dev-1")]));
    let mut hub = Hub::start(pki.server_config("127.0.0.1:0".parse().unwrap()), inventory).await;

    // Hub: a re-issued serving certificate is used by new connections.
    let before = served_certificate(&pki, "dev-1", hub.addr).await;
    pki::issue_server(
        pki.dir.path(),
        &["localhost".into(), "127.0.0.1".into()],
        pki::time_span(30),
    )
    .unwrap();
    let on_disk = CertificateDer::pem_file_iter(pki.path("hub.pem"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_ne!(before, on_disk);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if served_certificate(&pki, "dev-1", hub.addr).await == on_disk {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hub serves the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Agent: starts with a certificate the hub refuses (foreign CA); once the right one is
    // written to the same paths, the next connection attempt uses it.
    let rogue = Pki::new(&["dev-1"]);
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("dev.pem");
    let key = dir.path().join("dev-key.pem");
    let (rogue_cert, rogue_key) = rogue.device_files("dev-1");
    std::fs::copy(&rogue_cert, &cert).unwrap();
    std::fs::copy(&rogue_key, &key).unwrap();
    let mut cfg = pki.link_config("dev-1", hub.addr);
    cfg.cert_file = cert.clone();
    cfg.key_file = key.clone();
    let state = MemoryDeviceState::new("dev-1");
    let (stop, task) = start_agent(cfg, Arc::clone(&state));
    wait_until("refused handshakes", || {
        LinkStats::get(&hub.stats().handshakes_failed) >= 1
    })
    .await;
    assert!(!hub.sessions.is_connected("dev-1"));
    let (good_cert, good_key) = pki.device_files("dev-1");
    std::fs::copy(&good_key, &key).unwrap();
    std::fs::copy(&good_cert, &cert).unwrap();
    hub.event("connected with rotated certificate", |e| {
        matches!(e, SessionEvent::Connected { .. })
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn removal_from_inventory_cuts_the_session() {
    let pki = Pki::new(&["dev-1"]);
    let inventory = Arc::new(StaticInventory::new([device("dev-1")]));
    let mut hub = Hub::start(
        pki.server_config("127.0.0.1:0".parse().unwrap()),
        Arc::clone(&inventory) as Arc<dyn Inventory>,
    )
    .await;
    let state = MemoryDeviceState::new("dev-1");
    let (stop, task) = start_agent(pki.link_config("dev-1", hub.addr), Arc::clone(&state));
    hub.event("connected", |e| matches!(e, SessionEvent::Connected { .. }))
        .await;
    let removed = tokio::time::Instant::now();
    inventory.replace([]);
    hub.event("cut", |e| matches!(e, SessionEvent::Disconnected { .. }))
        .await;
    let cut_after = removed.elapsed().as_secs_f64();
    let refused = LinkStats::get(&hub.stats().streams_rejected);
    wait_until("reconnect refused", || {
        LinkStats::get(&hub.stats().streams_rejected) > refused
    })
    .await;
    assert!(!hub.sessions.is_connected("dev-1"));
    let outcome = fleetlet_faults::Outcome {
        fault: "device removed from the inventory".into(),
        recovered: true,
        converge_secs: Some(cut_after),
        pods_lost: 0,
        pods_duplicated: 0,
        detail: format!(
            "live session cut {:.0} ms after removal; the reconnect attempt refused",
            cut_after * 1000.0
        ),
    };
    println!("{outcome:?}");
    fleetlet_faults::record(&outcome).unwrap();
    stop.cancel();
    task.await.unwrap();
    hub.stop().await;
}

// ---- raw HTTP/2 client for what a well-behaved agent never sends ----

fn hello(name: &str) -> Vec<u8> {
    v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Hello(v1::Hello {
            device_name: name.into(),
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

/// A gRPC length-prefixed message (uncompressed).
fn frame(payload: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

fn client_tls(pki: &Pki, device: &str) -> Arc<rustls::ClientConfig> {
    let (cert, key) = pki.device_files(device);
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

async fn tls_connect(
    pki: &Pki,
    device: &str,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(client_tls(pki, device))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap()
}

async fn served_certificate(pki: &Pki, device: &str, addr: SocketAddr) -> CertificateDer<'static> {
    let tls = tls_connect(pki, device, addr).await;
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

struct RawClient {
    send: h2::client::SendRequest<Bytes>,
}

struct OpenStream {
    _body: h2::SendStream<Bytes>,
    response: h2::client::ResponseFuture,
}

impl RawClient {
    async fn connect(pki: &Pki, device: &str, addr: SocketAddr, window: u32) -> Self {
        let tls = tls_connect(pki, device, addr).await;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(window.max(65_535))
            .handshake::<_, Bytes>(tls)
            .await
            .unwrap();
        tokio::spawn(conn);
        Self { send }
    }

    async fn open(&mut self, frames: Vec<Bytes>) -> OpenStream {
        let request = http::Request::builder()
            .method("POST")
            .uri("https://127.0.0.1/fleetlet.v1.DeviceLink/Connect")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let mut send = self.send.clone().ready().await.unwrap();
        let (response, mut body) = send.send_request(request, false).unwrap();
        for data in frames {
            body.send_data(data, false).unwrap();
        }
        OpenStream {
            _body: body,
            response,
        }
    }

    /// Send `frames` on a new stream and return the stream's final grpc-status and message.
    async fn call(&mut self, frames: Vec<Bytes>) -> (i32, String) {
        let open = self.open(frames).await;
        let response = tokio::time::timeout(WAIT, open.response)
            .await
            .unwrap()
            .unwrap();
        let status_of = |headers: &http::HeaderMap| {
            headers.get("grpc-status").map(|code| {
                let code = code.to_str().unwrap().parse::<i32>().unwrap();
                let message = headers
                    .get("grpc-message")
                    .map(|m| percent_decode(m.to_str().unwrap()))
                    .unwrap_or_default();
                (code, message)
            })
        };
        if let Some(status) = status_of(response.headers()) {
            return status;
        }
        let mut body = response.into_body();
        while let Some(data) = tokio::time::timeout(WAIT, body.data()).await.unwrap() {
            let data = data.unwrap();
            let _ = body.flow_control().release_capacity(data.len());
        }
        let trailers = tokio::time::timeout(WAIT, body.trailers())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        status_of(&trailers).unwrap()
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn compressed_snapshots_arrive_intact_when_enabled() {
    let pki = Pki::new(&["dev-1"]);
    let inventory = Arc::new(StaticInventory::new([device("dev-1")]));
    let mut config = pki.server_config("127.0.0.1:0".parse().unwrap());
    config.compress_snapshots = true;
    let mut hub = Hub::start(config, inventory).await;
    let state = MemoryDeviceState::new("dev-1");
    let (stop, task) = start_agent(pki.link_config("dev-1", hub.addr), Arc::clone(&state));
    hub.event("connected", |e| matches!(e, SessionEvent::Connected { .. }))
        .await;
    // A large, compressible bundle (a pod with a big ConfigMap) and a small one.
    let mut big = pod("big");
    big.pod_json = Bytes::from(format!(
        r#"{{"metadata":{{"uid":"big"}},"data":"{}"}}"#,
        "key=value\n".repeat(20_000)
    ));
    let generation = hub
        .sessions
        .set_desired("dev-1", vec![big.clone(), pod("a")]);
    hub.event("ack", is_acked("dev-1", generation)).await;
    wait_applied(&state, generation).await;
    let held = state.snapshots();
    let last = held.last().expect("a snapshot");
    assert_eq!(last.pods[0].pod_json, big.pod_json);
    assert_eq!(last.pods[1].pod_json, pod("a").pod_json);
    stop.cancel();
    task.await.unwrap();
    hub.stop().await;
}

#[tokio::test]
async fn a_removed_device_learns_it_is_not_served_and_removes_its_pods_only_when_configured() {
    let pki = Pki::new(&["dev-1", "dev-2"]);
    let inventory = Arc::new(StaticInventory::new([device("dev-1"), device("dev-2")]));
    let mut hub = Hub::start(
        pki.server_config("127.0.0.1:0".parse().unwrap()),
        Arc::clone(&inventory) as Arc<dyn Inventory>,
    )
    .await;
    // dev-1 removes its pods after 2 s of refusal; dev-2 keeps the default (never).
    let (one, two) = (
        MemoryDeviceState::new("dev-1"),
        MemoryDeviceState::new("dev-2"),
    );
    let mut cfg_one = pki.link_config("dev-1", hub.addr);
    cfg_one.remove_pods_when_not_served_secs = Some(2);
    let (stop_one, task_one) = start_agent(cfg_one, Arc::clone(&one));
    let (stop_two, task_two) = start_agent(pki.link_config("dev-2", hub.addr), Arc::clone(&two));
    for _ in 0..2 {
        hub.event("connected", |e| matches!(e, SessionEvent::Connected { .. }))
            .await;
    }
    let g1 = hub.sessions.set_desired("dev-1", vec![pod("a")]);
    let g2 = hub.sessions.set_desired("dev-2", vec![pod("b")]);
    wait_applied(&one, g1).await;
    wait_applied(&two, g2).await;

    let removed = tokio::time::Instant::now();
    inventory.replace([]);
    let mut not_served = one.not_served();
    tokio::time::timeout(WAIT, not_served.wait_for(Option::is_some))
        .await
        .expect("dev-1 learns it is not served")
        .expect("open");
    let mut rx = two.not_served();
    tokio::time::timeout(WAIT, rx.wait_for(Option::is_some))
        .await
        .expect("dev-2 learns it is not served")
        .expect("open");
    // dev-1 empties its desired set once the refusal lasted 2 s; dev-2 never does.
    wait_until("dev-1 removed its pods", || {
        one.snapshots().last().is_some_and(|s| s.pods.is_empty())
    })
    .await;
    let removed_after = removed.elapsed();
    assert!(
        removed_after >= Duration::from_secs(2),
        "not before the configured time: {removed_after:?}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        two.snapshots().iter().all(|s| !s.pods.is_empty()),
        "by default the pods keep running"
    );
    // Back in the inventory: served again, the refusal is cleared.
    inventory.replace([device("dev-1"), device("dev-2")]);
    let mut not_served = one.not_served();
    tokio::time::timeout(WAIT, not_served.wait_for(Option::is_none))
        .await
        .expect("dev-1 served again")
        .expect("open");
    let outcome = fleetlet_faults::Outcome {
        fault: "removed device: told it is not served, pods only removed if configured".into(),
        recovered: true,
        converge_secs: None,
        pods_lost: 0,
        pods_duplicated: 0,
        detail: format!(
            "both devices got PERMISSION_DENIED + fleetlet-refusal: not-served; the one configured with 2 s emptied its desired set after {:.1} s, the default one kept its pods; served again once back in the inventory",
            removed_after.as_secs_f64()
        ),
    };
    println!("{outcome:?}");
    fleetlet_faults::record(&outcome).unwrap();
    for (stop, task) in [(stop_one, task_one), (stop_two, task_two)] {
        stop.cancel();
        task.await.unwrap();
    }
    hub.stop().await;
}
