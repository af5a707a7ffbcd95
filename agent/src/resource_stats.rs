//! Resource figures of the device and its pods' running containers, for the hub's
//! `/stats/summary` and `/metrics/resource` (and so `kubectl top`, metrics-server and the HPA).
//!
//! Every `[stats] interval_secs` (15 s by default, metrics-server's resolution) the agent takes
//! one reading and publishes it as a `ResourceStats` report; the link sends each new report once
//! while connected (one message per interval, nothing queued while offline).
//!
//! - Containers: CPU time and memory usage from Podman (`containers/stats?stream=false`, behind
//!   [`ContainerRuntime`]); working set (usage minus `inactive_file`, as cAdvisor and the
//!   kubelet compute it) and RSS (`rss` / `anon`) from the container's cgroup `memory.stat`
//!   (cgroup v1 or v2).
//! - Pods: network counters of the pod's network namespace (`/proc/<pid>/net/dev` of one of its
//!   containers, loopback left out; none for host-network pods).
//! - The node: CPU time from `/proc/stat`, memory from `/proc/meminfo` (working set = used minus
//!   inactive file pages), boot time, and a statvfs of the agent's state directory (where pod
//!   volumes live).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleetlet_proto::v1::{
    ContainerResourceStats, FsStats, InterfaceStats, NodeResourceStats, PodResourceStats,
    ResourceStats,
};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::podman::{ContainerRuntime, ContainerStats, labels};

/// The `[stats]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatsConfig {
    /// Seconds between readings while the hub asks for them (someone reads the Node's stats);
    /// 0 turns resource figures off.
    pub interval_secs: u64,
}

impl Default for StatsConfig {
    fn default() -> Self {
        Self { interval_secs: 15 }
    }
}

/// Longest interval accepted (an hour): the hub treats figures older than twice it as stale.
pub const MAX_INTERVAL_SECS: u64 = 3600;

/// Where the host's figures are read (the real `/proc` and `/sys/fs/cgroup` outside tests).
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// procfs.
    pub proc: PathBuf,
    /// cgroupfs root.
    pub cgroup: PathBuf,
    /// Directory whose filesystem is the node's `fs` (the agent's state directory).
    pub state_dir: PathBuf,
}

impl HostPaths {
    /// The real host, with `state_dir`.
    pub fn host(state_dir: &Path) -> Self {
        Self {
            proc: PathBuf::from("/proc"),
            cgroup: PathBuf::from("/sys/fs/cgroup"),
            state_dir: state_dir.to_path_buf(),
        }
    }
}

/// The latest report, as the link reads it.
pub type Latest = watch::Receiver<Option<Arc<ResourceStats>>>;

/// Until when the hub wants readings (its `StatsRequest`s); `None` before the first.
#[derive(Debug, Clone)]
pub struct Demand(Arc<watch::Sender<Option<tokio::time::Instant>>>);

impl Default for Demand {
    fn default() -> Self {
        Self(Arc::new(watch::channel(None).0))
    }
}

impl Demand {
    /// The hub wants readings for the next `for_secs` seconds (an earlier end stays if later).
    pub fn want(&self, for_secs: u32) {
        let until = tokio::time::Instant::now() + Duration::from_secs(u64::from(for_secs));
        self.0.send_if_modified(|current| {
            if current.is_some_and(|c| c >= until) {
                return false;
            }
            *current = Some(until);
            true
        });
    }

    fn subscribe(&self) -> watch::Receiver<Option<tokio::time::Instant>> {
        self.0.subscribe()
    }
}

/// Linux's USER_HZ: the unit of `/proc/stat`, fixed at 100 by the kernel's ABI.
const USER_HZ: u64 = 100;

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// `key value` lines (memory.stat) or `Key: value kB` lines (meminfo) as numbers.
fn keyed(text: &str) -> BTreeMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let k = parts.next()?.trim_end_matches(':');
            let v: u64 = parts.next()?.parse().ok()?;
            let v = if parts.next() == Some("kB") {
                v.saturating_mul(1024)
            } else {
                v
            };
            Some((k, v))
        })
        .collect()
}

/// CPU time used since boot (ns) and boot time from `/proc/stat`.
pub fn node_cpu(proc_stat: &str) -> (Option<u64>, Option<i64>) {
    let mut cpu = None;
    let mut btime = None;
    for line in proc_stat.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("cpu") => {
                let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal (guest is inside user).
                let busy = [0, 1, 2, 5, 6, 7]
                    .iter()
                    .filter_map(|i| v.get(*i))
                    .sum::<u64>();
                cpu = Some(busy.saturating_mul(1_000_000_000 / USER_HZ));
            }
            Some("btime") => btime = f.next().and_then(|x| x.parse().ok()),
            _ => {}
        }
    }
    (cpu, btime)
}

/// Node memory from `/proc/meminfo`: (usage, working set, rss, available), bytes.
pub fn node_memory(meminfo: &str) -> Option<(u64, u64, u64, u64)> {
    let m = keyed(meminfo);
    let total = *m.get("MemTotal")?;
    let usage = total.saturating_sub(*m.get("MemFree")?);
    let working_set = usage.saturating_sub(m.get("Inactive(file)").copied().unwrap_or(0));
    let rss = m.get("AnonPages").copied().unwrap_or(0);
    // The kubelet's node availableBytes: capacity minus working set.
    Some((usage, working_set, rss, total.saturating_sub(working_set)))
}

/// A container's working set and RSS from its cgroup: `usage` minus inactive file pages, and
/// anonymous memory. Looks at cgroup v2 (`<root>/<path>/memory.stat`) and v1
/// (`<root>/memory/<path>/memory.stat`, with `memory.usage_in_bytes`).
pub fn container_memory(cgroup_root: &Path, cgroup_path: &str, usage: u64) -> Option<(u64, u64)> {
    let rel = cgroup_path.trim_start_matches('/');
    if rel.is_empty() || rel.split('/').any(|c| c == "..") {
        return None;
    }
    let v2 = cgroup_root.join(rel);
    if let Some(stat) = read(&v2.join("memory.stat")) {
        let m = keyed(&stat);
        let usage = read(&v2.join("memory.current"))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(usage);
        let inactive = m.get("inactive_file").copied().unwrap_or(0);
        return Some((usage.saturating_sub(inactive), m.get("anon").copied()?));
    }
    let v1 = cgroup_root.join("memory").join(rel);
    let stat = read(&v1.join("memory.stat"))?;
    let m = keyed(&stat);
    let usage = read(&v1.join("memory.usage_in_bytes"))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(usage);
    let inactive = m.get("total_inactive_file").copied().unwrap_or(0);
    Some((usage.saturating_sub(inactive), m.get("total_rss").copied()?))
}

/// Interfaces of `/proc/<pid>/net/dev`, loopback left out.
pub fn interfaces(net_dev: &str) -> Vec<InterfaceStats> {
    net_dev
        .lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let name = name.trim();
            if name == "lo" {
                return None;
            }
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            Some(InterfaceStats {
                name: name.to_string(),
                rx_bytes: *v.first()?,
                rx_errors: *v.get(2)?,
                tx_bytes: *v.get(8)?,
                tx_errors: *v.get(10)?,
            })
        })
        .collect()
}

fn fs_stats(dir: &Path) -> Option<FsStats> {
    let s = rustix::fs::statvfs(dir).ok()?;
    let frag = s.f_frsize;
    Some(FsStats {
        capacity_bytes: s.f_blocks.saturating_mul(frag),
        available_bytes: s.f_bavail.saturating_mul(frag),
        used_bytes: s.f_blocks.saturating_sub(s.f_bfree).saturating_mul(frag),
        inodes: s.f_files,
        inodes_free: s.f_ffree,
    })
}

/// Whether `pid` lives in another network namespace than the agent (a pod network).
fn own_netns(paths: &HostPaths, pid: i64) -> bool {
    let ns = |p: PathBuf| std::fs::read_link(p).ok();
    match (
        ns(paths.proc.join(pid.to_string()).join("ns/net")),
        ns(paths.proc.join("self/ns/net")),
    ) {
        (Some(a), Some(b)) => a != b,
        _ => false,
    }
}

/// The node's figures.
pub fn node_stats(paths: &HostPaths) -> NodeResourceStats {
    let (cpu, btime) = read(&paths.proc.join("stat"))
        .map(|s| node_cpu(&s))
        .unwrap_or_default();
    let (usage, ws, rss, avail) = read(&paths.proc.join("meminfo"))
        .and_then(|s| node_memory(&s))
        .unwrap_or_default();
    NodeResourceStats {
        start_unix: btime.unwrap_or(0),
        cpu_usage_core_nanos: cpu.unwrap_or(0),
        memory_usage_bytes: usage,
        memory_working_set_bytes: ws,
        memory_rss_bytes: rss,
        memory_available_bytes: avail,
        fs: fs_stats(&paths.state_dir),
        image_fs: None,
    }
}

/// One reading of the node and of every running container of `device`'s pods.
pub async fn collect<R: ContainerRuntime>(
    rt: &R,
    device: &str,
    paths: &HostPaths,
    interval_secs: u64,
) -> Result<ResourceStats, crate::podman::PodmanError> {
    let listed = rt
        .list_containers(&[format!("{}={device}", labels::DEVICE)])
        .await?;
    let running: Vec<_> = listed
        .into_iter()
        .filter(|c| c.state == "running" && !c.is_infra && c.labels.contains_key(labels::POD_UID))
        .collect();
    let ids: Vec<String> = running.iter().map(|c| c.id.clone()).collect();
    let counters: BTreeMap<String, ContainerStats> = match rt.container_stats(&ids).await {
        Ok(v) => v,
        // One container stopping between the list and the reading fails the whole call.
        Err(_) => {
            let mut all = Vec::new();
            for id in &ids {
                if let Ok(v) = rt.container_stats(std::slice::from_ref(id)).await {
                    all.extend(v);
                }
            }
            all
        }
    }
    .into_iter()
    .map(|s| (s.id.clone(), s))
    .collect();
    let mut pods: BTreeMap<String, PodResourceStats> = BTreeMap::new();
    let mut netns_pid: BTreeMap<String, i64> = BTreeMap::new();
    for c in &running {
        let Some(counter) = counters.get(&c.id) else {
            continue;
        };
        let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
        let uid = label(labels::POD_UID);
        let cgroup = match rt.inspect_container(&c.id).await {
            Ok(Some(i)) => i.state.cgroup_path,
            _ => String::new(),
        };
        let memory = container_memory(&paths.cgroup, &cgroup, counter.mem_usage);
        let pod = pods.entry(uid.clone()).or_insert_with(|| PodResourceStats {
            uid: uid.clone(),
            namespace: label(labels::POD_NAMESPACE),
            name: label(labels::POD_NAME),
            ..Default::default()
        });
        if pod.start_unix == 0 || (c.started_at > 0 && c.started_at < pod.start_unix) {
            pod.start_unix = c.started_at;
        }
        pod.containers.push(ContainerResourceStats {
            name: label(labels::CONTAINER),
            id: c.id.clone(),
            image: c.image.clone(),
            start_unix: c.started_at,
            cpu_usage_core_nanos: counter.cpu_nanos,
            memory_usage_bytes: counter.mem_usage,
            memory_working_set_bytes: memory.map(|m| m.0),
            memory_rss_bytes: memory.map(|m| m.1),
        });
        if c.pid > 0 {
            netns_pid.entry(uid).or_insert(c.pid);
        }
    }
    for (uid, pid) in netns_pid {
        if own_netns(paths, pid)
            && let (Some(pod), Some(dev)) = (
                pods.get_mut(&uid),
                read(&paths.proc.join(pid.to_string()).join("net/dev")),
            )
        {
            pod.interfaces = interfaces(&dev);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Ok(ResourceStats {
        timestamp_unix_nanos: now,
        interval_secs: u32::try_from(interval_secs).unwrap_or(u32::MAX),
        node: Some(node_stats(paths)),
        pods: pods.into_values().collect(),
    })
}

/// Takes readings while the hub wants them (`demand`): one at once when a demand comes after the
/// last reading is older than `interval_secs`, then one every `interval_secs` until the demand
/// runs out; none while nobody reads the device's figures. Publishes each on `tx` until
/// `shutdown`. A failed reading (Podman down) is logged once per failure streak and leaves the
/// last report stale.
pub async fn run<R: ContainerRuntime>(
    rt: Arc<R>,
    device: String,
    paths: HostPaths,
    interval_secs: u64,
    demand: Demand,
    tx: watch::Sender<Option<Arc<ResourceStats>>>,
    shutdown: CancellationToken,
) {
    let interval = Duration::from_secs(interval_secs.max(1));
    let mut wanted = demand.subscribe();
    let mut last: Option<tokio::time::Instant> = None;
    let mut failing = false;
    loop {
        let until = *wanted.borrow_and_update();
        let now = tokio::time::Instant::now();
        let next = last.map_or(now, |t| (t + interval).max(now));
        let due = until.filter(|u| next < *u).map(|_| next);
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = wanted.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            () = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        last = Some(tokio::time::Instant::now());
        match collect(rt.as_ref(), &device, &paths, interval_secs).await {
            Ok(r) => {
                failing = false;
                tx.send_replace(Some(Arc::new(r)));
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "reading resource figures; retrying every interval");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::podman::fake::{FakeContainer, FakeRuntime};

    #[test]
    fn proc_files_parse() {
        let stat = "cpu  100 5 50 9000 10 2 3 4 0 0\ncpu0 1 2 3\nbtime 1767000000\n";
        assert_eq!(
            node_cpu(stat),
            (
                Some((100 + 5 + 50 + 2 + 3 + 4) * 10_000_000),
                Some(1_767_000_000)
            )
        );
        let meminfo = "MemTotal: 1000 kB\nMemFree: 400 kB\nMemAvailable: 500 kB\nInactive(file): 100 kB\nAnonPages: 200 kB\n";
        assert_eq!(
            node_memory(meminfo),
            Some((600 * 1024, 500 * 1024, 200 * 1024, 500 * 1024))
        );
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n  eth0: 1360 16 2 0 0 0 0 0 586 7 3 0 0 0 0 0\n";
        assert_eq!(
            interfaces(dev),
            [InterfaceStats {
                name: "eth0".into(),
                rx_bytes: 1360,
                rx_errors: 2,
                tx_bytes: 586,
                tx_errors: 3
            }]
        );
    }

    #[test]
    fn container_memory_from_cgroup_v1_and_v2() {
        let root = tempfile::tempdir().expect("tempdir");
        let v1 = root.path().join("memory/libpod_parent/p/libpod-a");
        std::fs::create_dir_all(&v1).expect("v1");
        std::fs::write(v1.join("memory.usage_in_bytes"), "2125824\n").expect("usage");
        std::fs::write(
            v1.join("memory.stat"),
            "cache 1601536\nrss 49152\ntotal_rss 49152\ntotal_inactive_file 1433600\n",
        )
        .expect("stat");
        assert_eq!(
            container_memory(root.path(), "/libpod_parent/p/libpod-a", 0),
            Some((2125824 - 1433600, 49152))
        );
        let v2 = root.path().join("machine.slice/libpod-b.scope");
        std::fs::create_dir_all(&v2).expect("v2");
        std::fs::write(v2.join("memory.current"), "5000\n").expect("current");
        std::fs::write(v2.join("memory.stat"), "anon 3000\ninactive_file 1500\n").expect("stat");
        assert_eq!(
            container_memory(root.path(), "/machine.slice/libpod-b.scope", 0),
            Some((3500, 3000))
        );
        assert_eq!(container_memory(root.path(), "/missing", 7), None);
        assert_eq!(container_memory(root.path(), "/../etc", 7), None);
        assert_eq!(container_memory(root.path(), "", 7), None);
    }

    /// Readings go out only while the hub asks: none before, one at once on a request, one per
    /// interval while it lasts, none after.
    #[tokio::test(start_paused = true)]
    async fn readings_follow_the_hubs_demand() {
        let rt = Arc::new(FakeRuntime::default());
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = HostPaths {
            proc: dir.path().join("proc"),
            cgroup: dir.path().join("cgroup"),
            state_dir: dir.path().to_path_buf(),
        };
        let demand = Demand::default();
        let (tx, mut rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            rt,
            "dev".into(),
            paths,
            10,
            demand.clone(),
            tx,
            stop.clone(),
        ));
        let count = |rx: &mut Latest| {
            let mut n = 0;
            while rx.has_changed().unwrap_or(false) {
                rx.borrow_and_update();
                n += 1;
            }
            n
        };
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(count(&mut rx), 0, "nobody asked: no reading");
        demand.want(35);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(rx.borrow().is_some(), "a request gets a reading at once");
        let mut readings = count(&mut rx);
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            readings += count(&mut rx);
        }
        // At 0, 10, 20 and 30 s of the 35 s asked for; none after.
        assert_eq!(readings, 4);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(count(&mut rx), 0, "the request ran out");
        stop.cancel();
        task.await.expect("run");
    }

    #[tokio::test]
    async fn collects_running_pod_containers_of_this_device_only() {
        let rt = FakeRuntime::default();
        {
            let mut s = rt.state.lock().await;
            let mut add = |id: &str, device: &str, state: &str, infra: bool| {
                let mut labels = BTreeMap::new();
                labels.insert(labels::DEVICE.to_string(), device.to_string());
                labels.insert(labels::POD_UID.to_string(), "uid-1".to_string());
                labels.insert(labels::POD_NAMESPACE.to_string(), "ns".to_string());
                labels.insert(labels::POD_NAME.to_string(), "web".to_string());
                labels.insert(labels::CONTAINER.to_string(), format!("c-{id}"));
                let spec = crate::podman::ContainerCreate {
                    name: id.to_string(),
                    image: "busybox:1".to_string(),
                    ..Default::default()
                };
                s.containers.insert(
                    id.to_string(),
                    FakeContainer {
                        id: id.to_string(),
                        pod: "p".into(),
                        spec,
                        labels,
                        state: state.into(),
                        exit_code: 0,
                        started: 1_767_000_100,
                        infra,
                    },
                );
            };
            add("a", "dev", "running", false);
            add("b", "dev", "exited", false);
            add("i", "dev", "running", true);
            add("x", "other", "running", false);
            s.stats.insert(
                "a".into(),
                ContainerStats {
                    id: "a".into(),
                    cpu_nanos: 123,
                    mem_usage: 456,
                },
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = HostPaths {
            proc: dir.path().join("proc"),
            cgroup: dir.path().join("cgroup"),
            state_dir: dir.path().to_path_buf(),
        };
        let r = collect(&rt, "dev", &paths, 15).await.expect("collect");
        assert_eq!(r.interval_secs, 15);
        assert!(r.timestamp_unix_nanos > 0);
        assert_eq!(r.pods.len(), 1);
        let p = &r.pods[0];
        assert_eq!(
            (p.uid.as_str(), p.name.as_str(), p.start_unix),
            ("uid-1", "web", 1_767_000_100)
        );
        assert_eq!(
            p.containers.len(),
            1,
            "running, not infra, this device: {p:?}"
        );
        let c = &p.containers[0];
        assert_eq!((c.name.as_str(), c.image.as_str()), ("c-a", "busybox:1"));
        assert_eq!((c.cpu_usage_core_nanos, c.memory_usage_bytes), (123, 456));
        assert_eq!(c.memory_working_set_bytes, None, "no cgroup to read");
        let node = r.node.expect("node");
        assert!(
            node.fs.is_some_and(|f| f.capacity_bytes > 0),
            "statvfs of the state dir"
        );
    }
}
