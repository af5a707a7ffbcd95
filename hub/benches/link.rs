//! Link benchmark: simulated devices in this process (real agent link client, real TLS 1.3 and
//! gRPC) against a real hub process (this binary re-executed with `--hub-child`, running the
//! hub's `LinkServer` with a static inventory; no Kubernetes, which the link does not touch).
//!
//! Per run it prints:
//! - time to connect all devices (hello, full status resync and snapshot ack for every device);
//! - hub RSS per connected idle device ((RSS after connect and settle − RSS before) / devices);
//! - idle link traffic per device (bytes the hub process read + wrote during an idle window,
//!   from /proc/<pid>/io: everything on its sockets, TLS and HTTP/2 keepalive included);
//! - reconnect storm: the hub is SIGKILLed and restarted on the same port with a new desired
//!   generation for every device; time from restart until every device is connected, has
//!   resent its full status and has acknowledged the new snapshot.
//!
//! Then the medians over all runs. Options: `--devices N` (2000), `--runs R` (3),
//! `--idle-secs S` (60).

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
    fn io_bytes(&self) -> Result<u64, BoxError> {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.pid))?;
        let mut total = 0;
        for line in io.lines() {
            if let Some(v) = line
                .strip_prefix("rchar: ")
                .or_else(|| line.strip_prefix("wchar: "))
            {
                total += v.trim().parse::<u64>()?;
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
    storm_connected_s: f64,
    storm_synced_s: f64,
}

async fn orchestrate(args: &[String]) -> Result<(), BoxError> {
    let devices = usize::try_from(option(args, "--devices", 2000)?)?;
    let runs = option(args, "--runs", 3)?;
    let idle_secs = option(args, "--idle-secs", 60)?;
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
        let figures = one_run(pki_dir.path(), devices, Duration::from_secs(idle_secs)).await?;
        println!(
            "run {run}: connect {:.2}s | hub RSS/device {:.1} KiB | idle {:.0} B/device/min = {:.4} kbit/s | storm: all connected {:.2}s, all resynced {:.2}s",
            figures.connect_s,
            figures.rss_per_device_kib,
            figures.idle_bytes_per_min,
            figures.idle_bits_per_s / 1000.0,
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
        "idle traffic per device:            {:.0} B/min = {:.4} kbit/s (target <= 0.1 kbit/s)",
        median(|f| f.idle_bytes_per_min),
        median(|f| f.idle_bits_per_s) / 1000.0
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

async fn one_run(dir: &Path, devices: usize, idle: Duration) -> Result<RunFigures, BoxError> {
    let mut figures = RunFigures::default();
    let (mut hub, port) = HubProcess::spawn(dir, 0, devices).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = hub.rss_kib()?;

    let stop = CancellationToken::new();
    let mut tasks = Vec::with_capacity(devices);
    let started = Instant::now();
    for i in 0..devices {
        let name = device_name(i);
        let state = MemoryDeviceState::new(name.clone());
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
    let io_before = hub.io_bytes()?;
    tokio::time::sleep(idle).await;
    let io_after = hub.io_bytes()?;
    let bytes_per_device = io_after.saturating_sub(io_before) as f64 / devices as f64;
    figures.idle_bytes_per_min = bytes_per_device * 60.0 / idle.as_secs_f64();
    figures.idle_bits_per_s = bytes_per_device * 8.0 / idle.as_secs_f64();

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
