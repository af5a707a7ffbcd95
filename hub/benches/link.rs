//! Link benchmark: simulated devices in this process (real agent link client, real TLS 1.3 and
//! gRPC) against a real hub process (this binary re-executed with `--hub-child`, running the
//! hub's `LinkServer` with a static inventory; no Kubernetes, which the link does not touch).
//!
//! Per run it prints:
//! - time to connect all devices (hello, full status resync and snapshot ack for every device);
//! - hub RSS per connected idle device ((RSS after connect and settle − RSS before) / devices);
//! - idle link traffic per device (bytes sent and received on the hub's link port during an idle
//!   window, summed over its TCP connections from the kernel's `tcp_info` (`ss -ti`): TLS
//!   records and HTTP/2 frames, keepalives included; TCP/IP headers not);
//! - reconnect storm: the hub is SIGKILLed and restarted on the same port with a new desired
//!   generation for every device; time from restart until every device is connected, has
//!   resent its full status and has acknowledged the new snapshot.
//!
//! - link traffic per device while its resource figures are read: an agent sends figures only
//!   while the hub asks (someone reads the Node's stats), then a `ResourceStats` reading every
//!   `--stats-interval-secs` (15, the agent's default); here every device sends such readings
//!   describing `--stats-pods` pods of one container (5), measured over the same window. The
//!   idle window above is also the idle cost with figures on: nobody reads them, none are sent.
//!
//! Then the medians over all runs. Options: `--devices N` (2000), `--runs R` (3),
//! `--idle-secs S` (60), `--stats-interval-secs` (15), `--stats-pods` (5).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetlet_agent::link::memory::MemoryDeviceState;
use fleetlet_agent::link::{DeviceState, LinkConfig, run_link};
use fleetlet_hub::inventory::{InventoryDevice, StaticInventory};
use fleetlet_hub::link::{DeviceSessions, LinkServer, LinkServerConfig, SessionEvent};
use fleetlet_hub::pki;
use fleetlet_proto::v1;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bound on waiting for any phase; a phase that takes longer fails the run.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("link bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if let Some(pos) = args.iter().position(|a| a == "--hub-child") {
        runtime.block_on(hub_child(&args[pos + 1..]))
    } else {
        runtime.block_on(orchestrate(&args))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("link bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn option(args: &[String], name: &str, default: u64) -> Result<u64, BoxError> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args
            .get(i + 1)
            .ok_or(format!("{name} needs a value"))?
            .parse()?),
        None => Ok(default),
    }
}

fn device_name(i: usize) -> String {
    format!("bench-{i:05}")
}

// ---------------------------------------------------------------- hub process

/// `--hub-child <pki dir> <port> <devices>`: serve the link, set one pod for every device, and
/// report on stdout: `ready <port>`, then `synced <n>` whenever all devices are in sync.
async fn hub_child(args: &[String]) -> Result<(), BoxError> {
    let [dir, port, devices, ..] = args else {
        return Err("usage: --hub-child <pki dir> <port> <devices>".into());
    };
    let dir = PathBuf::from(dir);
    let port: u16 = port.parse()?;
    let devices: usize = devices.parse()?;
    let config = LinkServerConfig::new(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        dir.join("ca.pem"),
        dir.join("hub.pem"),
        dir.join("hub-key.pem"),
    );
    let inventory = Arc::new(StaticInventory::new((0..devices).map(|i| {
        InventoryDevice {
            name: device_name(i),
            labels: Default::default(),
            fleet: None,
            enabled: true,
        }
    })));
    let sessions = DeviceSessions::default();
    let mut events = sessions.subscribe();
    let mut desired = HashMap::new();
    for i in 0..devices {
        let name = device_name(i);
        let pod = v1::PodBundle {
            pod_json: Bytes::from(format!(
                r#"{{"metadata":{{"name":"app","namespace":"default","uid":"{name}-app"}},"spec":{{"containers":[{{"name":"app","image":"localhost/fleetlet-test/busybox:1"}}]}}}}"#
            )),
            ..Default::default()
        };
        let generation = sessions.set_desired(&name, vec![pod]);
        desired.insert(name, generation);
    }
    let server = LinkServer::bind(config).await?;
    let bound = server.local_addr()?.port();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.serve(sessions.clone(), inventory, shutdown.clone()));
    say(&format!("ready {bound}"));
    // Profiling aid: exit cleanly after this many seconds so a wrapper can write its report.
    if let Some(secs) = std::env::var("FLEETLET_BENCH_HUB_EXIT_AFTER_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            std::process::exit(0);
        });
    }

    // Per device: (full status seen, current generation acknowledged) for the live session.
    let mut state: HashMap<String, (bool, bool)> = HashMap::new();
    let mut synced: HashSet<String> = HashSet::new();
    let mut connected = 0usize;
    while let Some(event) = events.recv().await {
        let (device, changed) = match event {
            SessionEvent::Connected { device, hello } => {
                connected += 1;
                let acked = desired.get(&device) == Some(&hello.held_generation);
                state.insert(device.clone(), (false, acked));
                if connected == devices {
                    say(&format!("connected {connected}"));
                }
                (device, true)
            }
            SessionEvent::Disconnected { device } => {
                connected = connected.saturating_sub(1);
                state.remove(&device);
                (device, true)
            }
            SessionEvent::PodStatus { device, report, .. } if report.full => {
                if let Some(s) = state.get_mut(&device) {
                    s.0 = true;
                }
                (device, true)
            }
            SessionEvent::Acked {
                device, generation, ..
            } => {
                if desired.get(&device) == Some(&generation)
                    && let Some(s) = state.get_mut(&device)
                {
                    s.1 = true;
                }
                (device, true)
            }
            _ => continue,
        };
        if changed {
            let now = state
                .get(&device)
                .is_some_and(|(status, acked)| *status && *acked);
            let was = synced.contains(&device);
            if now && !was {
                synced.insert(device);
                if synced.len() == devices {
                    say(&format!("synced {}", synced.len()));
                }
            } else if !now && was {
                synced.remove(&device);
            }
        }
    }
    Ok(())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

// ---------------------------------------------------------------- orchestrator

struct HubProcess {
    child: tokio::process::Child,
    pid: u32,
    lines: mpsc::Receiver<String>,
}

impl HubProcess {
    async fn spawn(dir: &Path, port: u16, devices: usize) -> Result<(Self, u16), BoxError> {
        let exe = std::env::current_exe()?;
        // Profiling aid: FLEETLET_BENCH_HUB_WRAPPER=heaptrack runs the hub under a wrapper.
        let mut command = match std::env::var_os("FLEETLET_BENCH_HUB_WRAPPER") {
            Some(wrapper) => {
                let mut c = tokio::process::Command::new(wrapper);
                c.arg(exe);
                c
            }
            None => tokio::process::Command::new(exe),
        };
        let mut child = command
            .arg("--hub-child")
            .arg(dir)
            .arg(port.to_string())
            .arg(devices.to_string())
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("hub child has no pid")?;
        let stdout = child.stdout.take().ok_or("hub child stdout")?;
        let (tx, lines) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        });
        let mut hub = Self { child, pid, lines };
        let ready = hub.wait_line("ready").await?;
        let port = ready.trim_start_matches("ready ").parse()?;
        Ok((hub, port))
    }

    async fn wait_line(&mut self, prefix: &str) -> Result<String, BoxError> {
        let deadline = Instant::now() + PHASE_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Err(_) => {
                    return Err(
                        format!("hub did not report {prefix:?} within {PHASE_TIMEOUT:?}").into(),
                    );
                }
                Ok(None) => return Err(format!("hub exited before reporting {prefix:?}").into()),
                Ok(Some(line)) if line.starts_with(prefix) => return Ok(line),
                Ok(Some(_)) => {}
            }
        }
    }

    fn rss_kib(&self) -> Result<u64, BoxError> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .ok_or("no VmRSS")?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .ok_or("VmRSS value")?
            .parse()?)
    }

    /// Bytes the process has read and written through syscalls (sockets, here).
    /// TCP payload bytes sent plus received so far on every established connection of the
    /// hub's link `port` (the kernel's per-socket counters, `ss -ti`). /proc/<pid>/io cannot
    /// tell: it counts read()/write() calls only, and sockets are read with recv().
    fn link_bytes(port: u16) -> Result<u64, BoxError> {
        let out = std::process::Command::new("ss")
            .args(["-Htin", "state", "established"])
            .arg(format!("( sport = :{port} )"))
            .output()?;
        if !out.status.success() {
            return Err(format!("ss: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut total = 0u64;
        for word in text.split_whitespace() {
            if let Some(v) = word
                .strip_prefix("bytes_sent:")
                .or_else(|| word.strip_prefix("bytes_received:"))
            {
                total += v.parse::<u64>()?;
            }
        }
        Ok(total)
    }

    async fn kill(mut self) -> Result<(), BoxError> {
        self.child.kill().await?;
        Ok(())
    }
}

#[derive(Debug, Default, Clone)]
struct RunFigures {
    connect_s: f64,
    rss_per_device_kib: f64,
    idle_bits_per_s: f64,
    idle_bytes_per_min: f64,
    stats_bytes_per_min: f64,
    stats_message_bytes: usize,
    storm_connected_s: f64,
    storm_synced_s: f64,
}

async fn orchestrate(args: &[String]) -> Result<(), BoxError> {
    let devices = usize::try_from(option(args, "--devices", 2000)?)?;
    let runs = option(args, "--runs", 3)?;
    let idle_secs = option(args, "--idle-secs", 60)?;
    let stats = StatsLoad {
        interval: Duration::from_secs(option(args, "--stats-interval-secs", 15)?.max(1)),
        pods: usize::try_from(option(args, "--stats-pods", 5)?)?,
    };
    let (soft, hard) = fd_limits();
    println!(
        "link bench: {devices} devices, {runs} runs, idle window {idle_secs}s, fd limit {soft}/{hard}, {} cpus",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if soft < devices as u64 + 256 {
        return Err(format!(
            "open file limit {soft} is below {} needed for {devices} devices; raise `ulimit -n`",
            devices + 256
        )
        .into());
    }

    let pki_dir = tempfile::tempdir()?;
    let started = Instant::now();
    pki::init(pki_dir.path(), false)?;
    pki::issue_server(pki_dir.path(), &["127.0.0.1".into()], pki::time_span(2))?;
    for i in 0..devices {
        pki::issue_device(pki_dir.path(), &device_name(i), "", pki::time_span(2))?;
    }
    println!(
        "pki: {devices} device certificates in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let mut all = Vec::new();
    for run in 1..=runs {
        let figures = one_run(
            pki_dir.path(),
            devices,
            Duration::from_secs(idle_secs),
            stats,
        )
        .await?;
        println!(
            "run {run}: connect {:.2}s | hub RSS/device {:.1} KiB | idle {:.0} B/device/min = {:.4} kbit/s | figures read {:.0} B/device/min ({} B readings) | storm: all connected {:.2}s, all resynced {:.2}s",
            figures.connect_s,
            figures.rss_per_device_kib,
            figures.idle_bytes_per_min,
            figures.idle_bits_per_s / 1000.0,
            figures.stats_bytes_per_min,
            figures.stats_message_bytes,
            figures.storm_connected_s,
            figures.storm_synced_s
        );
        all.push(figures);
    }
    let median = |f: fn(&RunFigures) -> f64| {
        let mut v: Vec<f64> = all.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("---- medians over {runs} runs, {devices} devices ----");
    println!(
        "time to connect all devices:       {:.2} s",
        median(|f| f.connect_s)
    );
    println!(
        "hub RSS per connected idle device:  {:.1} KiB (target <= 50 KiB)",
        median(|f| f.rss_per_device_kib)
    );
    println!(
        "idle traffic per device:            {:.0} B/min = {:.4} kbit/s (target <= 0.1 kbit/s; figures on, nobody reading them)",
        median(|f| f.idle_bytes_per_min),
        median(|f| f.idle_bits_per_s) / 1000.0
    );
    println!(
        "traffic per device, figures read:   {:.0} B/min = {:.4} kbit/s (a reading of {} pods every {} s: {} B encoded)",
        median(|f| f.stats_bytes_per_min),
        median(|f| f.stats_bytes_per_min) * 8.0 / 60.0 / 1000.0,
        stats.pods,
        stats.interval.as_secs(),
        all.first().map_or(0, |f| f.stats_message_bytes),
    );
    println!(
        "reconnect storm, all connected:     {:.2} s",
        median(|f| f.storm_connected_s)
    );
    println!(
        "reconnect storm, all resynced:      {:.2} s (target <= 30 s)",
        median(|f| f.storm_synced_s)
    );
    Ok(())
}

/// The resource figures each simulated device sends in the stats window.
#[derive(Debug, Clone, Copy)]
struct StatsLoad {
    interval: Duration,
    pods: usize,
}

/// A reading as an agent with `pods` one-container pods sends it (field sizes as real: UIDs,
/// 64-hex container ids, image references; counters large, as after days of uptime).
fn reading(device: &str, pods: usize, seq: u64) -> v1::ResourceStats {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    v1::ResourceStats {
        timestamp_unix_nanos: now,
        interval_secs: 15,
        node: Some(v1::NodeResourceStats {
            start_unix: 1_767_000_000,
            cpu_usage_core_nanos: 86_400_000_000_000 + seq * 1_000_000_007,
            memory_usage_bytes: 1_900_000_000 + seq * 4096,
            memory_working_set_bytes: 900_000_000 + seq * 4096,
            memory_rss_bytes: 400_000_000,
            memory_available_bytes: 3_000_000_000,
            fs: Some(v1::FsStats {
                capacity_bytes: 64_000_000_000,
                available_bytes: 40_000_000_000,
                used_bytes: 24_000_000_000,
                inodes: 4_000_000,
                inodes_free: 3_500_000,
            }),
            image_fs: None,
        }),
        pods: (0..pods)
            .map(|p| v1::PodResourceStats {
                uid: format!("{:08x}-1b2c-4d5e-8f90-{:012x}", p, seq % 7),
                namespace: "production".into(),
                name: format!("{device}-app-{p}"),
                start_unix: 1_767_000_100,
                containers: vec![v1::ContainerResourceStats {
                    name: "app".into(),
                    id: format!("{:064x}", p as u64 * 7919 + 1),
                    image: "registry.example.com/team/app:1.2.3".into(),
                    start_unix: 1_767_000_100,
                    cpu_usage_core_nanos: 9_000_000_000_000 + seq * 150_000_000,
                    memory_usage_bytes: 120_000_000 + seq * 512,
                    memory_working_set_bytes: Some(80_000_000 + seq * 512),
                    memory_rss_bytes: Some(60_000_000),
                }],
                interfaces: vec![v1::InterfaceStats {
                    name: "eth0".into(),
                    rx_bytes: 5_000_000_000 + seq * 10_000,
                    rx_errors: 0,
                    tx_bytes: 3_000_000_000 + seq * 8_000,
                    tx_errors: 0,
                }],
            })
            .collect(),
    }
}

async fn one_run(
    dir: &Path,
    devices: usize,
    idle: Duration,
    stats: StatsLoad,
) -> Result<RunFigures, BoxError> {
    let mut figures = RunFigures::default();
    let (mut hub, port) = HubProcess::spawn(dir, 0, devices).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = hub.rss_kib()?;

    let stop = CancellationToken::new();
    let mut tasks = Vec::with_capacity(devices);
    let mut states = Vec::with_capacity(devices);
    let started = Instant::now();
    for i in 0..devices {
        let name = device_name(i);
        let state = MemoryDeviceState::new(name.clone());
        states.push((name.clone(), state.clone()));
        state.set_capacity(v1::Capacity {
            capacity: [
                ("cpu".to_owned(), "2".to_owned()),
                ("pods".to_owned(), "110".to_owned()),
            ]
            .into(),
            ..Default::default()
        });
        state.set_pod_status(v1::PodStatusEntry {
            uid: format!("{name}-app"),
            namespace: "default".into(),
            name: "app".into(),
            status_json: Bytes::from_static(br#"{"phase":"Running"}"#),
            removed: false,
        });
        let cfg = LinkConfig::new(
            format!("https://127.0.0.1:{port}"),
            dir.join("ca.pem"),
            dir.join(format!("devices/{name}.pem")),
            dir.join(format!("devices/{name}-key.pem")),
        );
        tasks.push(tokio::spawn(run_link(
            cfg,
            state as Arc<dyn DeviceState>,
            stop.clone(),
        )));
    }
    hub.wait_line("synced").await?;
    figures.connect_s = started.elapsed().as_secs_f64();

    // Idle: let the resync traffic settle, then measure memory and a traffic window.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_after = hub.rss_kib()?;
    figures.rss_per_device_kib = rss_after.saturating_sub(rss_before) as f64 / devices as f64;
    let io_before = HubProcess::link_bytes(port)?;
    tokio::time::sleep(idle).await;
    let io_after = HubProcess::link_bytes(port)?;
    let bytes_per_device = io_after.saturating_sub(io_before) as f64 / devices as f64;
    figures.idle_bytes_per_min = bytes_per_device * 60.0 / idle.as_secs_f64();
    figures.idle_bits_per_s = bytes_per_device * 8.0 / idle.as_secs_f64();

    // The same window with resource figures on: a new reading per device every interval,
    // the devices' first readings spread over the interval as real agents' would be.
    figures.stats_message_bytes = prost::Message::encoded_len(&reading("d", stats.pods, 0));
    let feeder = {
        let states = states.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let step = stats.interval / u32::try_from(states.len().max(1)).unwrap_or(u32::MAX);
            let mut seq = 0u64;
            loop {
                for (name, state) in &states {
                    state.set_resource_stats(reading(name, stats.pods, seq));
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(step) => {}
                    }
                }
                seq += 1;
            }
        })
    };
    // One interval for every device to be on its cadence, then the window.
    tokio::time::sleep(stats.interval).await;
    let io_before = HubProcess::link_bytes(port)?;
    tokio::time::sleep(idle).await;
    let io_after = HubProcess::link_bytes(port)?;
    feeder.abort();
    let bytes_per_device = io_after.saturating_sub(io_before) as f64 / devices as f64;
    figures.stats_bytes_per_min = bytes_per_device * 60.0 / idle.as_secs_f64();

    // Reconnect storm: the hub dies with every connection and comes back with new snapshots.
    hub.kill().await?;
    let restarted = Instant::now();
    let (mut hub, _) = HubProcess::spawn(dir, port, devices).await?;
    hub.wait_line("connected").await?;
    figures.storm_connected_s = restarted.elapsed().as_secs_f64();
    hub.wait_line("synced").await?;
    figures.storm_synced_s = restarted.elapsed().as_secs_f64();

    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    hub.kill().await?;
    Ok(figures)
}

/// The process's open-file limits (soft, hard), from /proc (no libc call needed).
fn fd_limits() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| {
            let mut parts = l.split_whitespace().skip(3);
            Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
        })
        .unwrap_or((0, 0))
}
