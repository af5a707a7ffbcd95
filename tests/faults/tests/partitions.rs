//! Partitions: the agent runs in a network namespace of its own, linked to the hub (root
//! namespace, listening on the veth address) by a veth pair in 198.18.0.0/15 (the benchmarking
//! range, so no real network is ever addressed). The link is cut (veth down), cut half-open (the
//! device drops everything the hub sends), and flapped; after each heal the test measures how long
//! the API takes to say again what Podman runs, and checks that the pods kept running the whole
//! time (same container ids and start times) and that no container was duplicated.
//!
//! Timeouts are scaled down by configuration (hub disconnect grace 5 s, keepalives 2 s + 3 s on
//! both sides) so a cut turns the Node `Ready=Unknown` within seconds and the node lifecycle
//! controller taints it unreachable; the pods tolerate that taint, as an edge workload that must
//! stay where it is does. (The test also samples whether the API shows the pods not Ready while
//! the Node is Unknown: today it does not, see docs/faults.md.)
//!
//! `make test` runs the short variants; `make faults` (FLEETLET_FAULTS_FULL=1) adds a cut of
//! three minutes and a minute of flapping. Needs root (`ip netns`), `iptables` and `make env-up`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fleetlet_faults::fixture::{Fleet, record_outcome, running_snapshot};
use fleetlet_faults::{Outcome, full_suite, passed};

/// Pods on the partitioned device.
const PODS: usize = 3;
/// How long the API may take after a heal before the fault counts as not recovered.
const CONVERGE_LIMIT: Duration = Duration::from_secs(90);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace for the device and the veth pair linking it to the root namespace.
/// Removed on drop (also when the test fails); its iptables rules go with it.
struct Netns {
    name: String,
    host_if: String,
    hub_ip: Ipv4Addr,
    device_ip: Ipv4Addr,
}

impl Netns {
    fn create() -> Netns {
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("fleetlet-p{pid}-{n}");
        let host_if = format!("flh{}{n}", pid % 100_000);
        let dev_if = format!("fld{}{n}", pid % 100_000);
        // One /30 of 198.18.0.0/15 per (process, namespace); skip blocks another test holds.
        let used = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-4", "-o", "addr", "show"])
                .output()
                .expect("ip addr")
                .stdout,
        )
        .into_owned();
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
        let block = (0..64u32)
            .map(|k| (pid.wrapping_mul(8).wrapping_add(n).wrapping_add(k * 977)) % 32_768)
            .find(|b| !used.contains(&format!(" {}/", Ipv4Addr::from(base + b * 4 + 1))))
            .expect("a free /30 in 198.18.0.0/15");
        let hub_ip = Ipv4Addr::from(base + block * 4 + 1);
        let device_ip = Ipv4Addr::from(base + block * 4 + 2);
        ip(&["netns", "add", &name]);
        // From here on, drop cleans up whatever was created.
        let ns = Netns {
            name,
            host_if,
            hub_ip,
            device_ip,
        };
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &dev_if,
        ]);
        ip(&["link", "set", &dev_if, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{hub_ip}/30"), "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        let d = ["-n", ns.name.as_str()];
        ip(&[
            &d[..],
            &["addr", "add", &format!("{device_ip}/30"), "dev", &dev_if],
        ]
        .concat());
        ip(&[&d[..], &["link", "set", &dev_if, "up"]].concat());
        ip(&[&d[..], &["link", "set", "lo", "up"]].concat());
        ns
    }

    /// Cuts the link: the root side of the veth goes down (the device side loses carrier).
    fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]);
    }

    /// Heals a cut.
    fn heal(&self) {
        ip(&["link", "set", &self.host_if, "up"]);
    }

    /// Half-open: the device silently drops every packet from the hub (its own still go out).
    fn drop_inbound(&self, on: bool) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "iptables"])
            .arg(if on { "-A" } else { "-D" })
            .args(["INPUT", "-s", &self.hub_ip.to_string(), "-j", "DROP"])
            .output()
            .expect("run iptables");
        assert!(
            out.status.success(),
            "iptables in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A fault on the link.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Link down for this long.
    Cut(Duration),
    /// Device drops the hub's packets for this long.
    HalfOpen(Duration),
    /// `cycles` times: down for `down`, up for `up`.
    Flap {
        cycles: u32,
        down: Duration,
        up: Duration,
    },
}

/// What was seen while the fault lasted.
#[derive(Default)]
struct DuringFault {
    node_states: BTreeSet<String>,
    samples: u32,
    samples_with_changed_pods: u32,
    /// Samples in which the API showed some pod not Ready while the fault lasted.
    samples_with_unready_pods: u32,
}

/// Samples, every 2 s for `d`: the Node's Ready status and whether the pods still run unchanged.
async fn watch(
    fleet: &Fleet,
    before: &BTreeMap<(String, String), (String, i64)>,
    d: Duration,
    seen: &mut DuringFault,
) {
    let end = tokio::time::Instant::now() + d;
    // Bounded by d / 2 s rounds (each round's reads time out with the client).
    while tokio::time::Instant::now() < end {
        for s in fleet.node_ready_status().await.into_values() {
            seen.node_states.insert(s);
        }
        if let Ok(pods) = fleet.pods().list(&Default::default()).await
            && pods.items.iter().any(|p| !pod_ready(p))
        {
            seen.samples_with_unready_pods += 1;
        }
        if let Some(ctrs) = fleet.containers().await {
            seen.samples += 1;
            if &running_snapshot(&ctrs) != before {
                seen.samples_with_changed_pods += 1;
            }
        }
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::sleep(left.min(Duration::from_secs(2))).await;
    }
}

fn pod_ready(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Injects `fault`, heals it, measures convergence and records the outcome.
async fn inject(fleet: &Fleet, ns: &Netns, name: &str, fault: Fault) -> Outcome {
    let before = running_snapshot(&fleet.containers().await.expect("Podman containers"));
    assert_eq!(before.len(), PODS, "every pod runs before the fault");
    let mut seen = DuringFault::default();
    match fault {
        Fault::Cut(d) => {
            ns.cut();
            watch(fleet, &before, d, &mut seen).await;
            ns.heal();
        }
        Fault::HalfOpen(d) => {
            ns.drop_inbound(true);
            watch(fleet, &before, d, &mut seen).await;
            ns.drop_inbound(false);
        }
        Fault::Flap { cycles, down, up } => {
            for i in 0..cycles {
                ns.cut();
                watch(fleet, &before, down, &mut seen).await;
                ns.heal();
                if i + 1 < cycles {
                    watch(fleet, &before, up, &mut seen).await;
                }
            }
        }
    }
    let (secs, agreement) = fleet.converge(PODS, CONVERGE_LIMIT).await;
    let after = running_snapshot(&fleet.containers().await.unwrap_or_default());
    let restarted: Vec<&String> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(*v))
        .map(|((uid, _), _)| uid)
        .collect();
    let outcome = Outcome {
        fault: name.to_string(),
        recovered: secs.is_some() && restarted.is_empty() && seen.samples_with_changed_pods == 0,
        converge_secs: secs,
        pods_lost: u32::try_from(agreement.lost.len().max(restarted.len())).unwrap_or(u32::MAX),
        pods_duplicated: u32::try_from(agreement.duplicated.len()).unwrap_or(u32::MAX),
        detail: format!(
            "Node Ready during fault {:?}, pods not Ready in API in {} samples; pods unchanged in {}/{} samples and after heal: {}; API = Podman {}; {}",
            seen.node_states,
            seen.samples_with_unready_pods,
            seen.samples - seen.samples_with_changed_pods,
            seen.samples,
            restarted.is_empty(),
            match secs {
                Some(s) if s <= 10.0 => "within 10 s",
                Some(_) => "AFTER MORE THAN 10 s",
                None => "never",
            },
            agreement.summary()
        ),
    };
    record_outcome(&outcome);
    outcome
}

/// A fleet of one device behind its own namespace, running [`PODS`] pods, converged.
async fn partitioned_fleet(prefix: &str) -> (Netns, Fleet) {
    let ns = Netns::create();
    let hub_ip = IpAddr::V4(ns.hub_ip);
    let netns = ns.name.clone();
    let fleet = Fleet::start(
        prefix,
        1,
        |h| {
            h.link_ip = hub_ip;
            h.disconnect_grace_secs = 5;
            h.keepalive_secs = Some((2, 3));
        },
        |a| {
            a.netns = Some(netns.clone());
            a.keepalive_secs = Some((2, 3));
        },
    )
    .await;
    let node = fleet.devices[0].clone();
    for i in 0..PODS {
        fleet.create_pod(&format!("p{i}"), &node, true).await;
    }
    let (secs, a) = fleet.converge(PODS, Duration::from_secs(120)).await;
    assert!(
        secs.is_some(),
        "pods never ran before the fault: {}",
        a.summary()
    );
    println!(
        "device {node} in netns {} at {}, hub link at {}",
        ns.name,
        ns.device_ip,
        fleet.hub.endpoint()
    );
    (ns, fleet)
}

fn assert_all_passed(outcomes: &[Outcome]) {
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !passed(o)).collect();
    assert!(failed.is_empty(), "faults not recovered: {failed:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_partitions_keep_pods_running_and_statuses_converge() {
    let (ns, fleet) = partitioned_fleet("fpart").await;
    let mut outcomes = vec![
        inject(
            &fleet,
            &ns,
            "partition 30 s (veth down)",
            Fault::Cut(Duration::from_secs(30)),
        )
        .await,
    ];
    outcomes.push(
        inject(
            &fleet,
            &ns,
            "half-open partition 20 s (device drops hub packets)",
            Fault::HalfOpen(Duration::from_secs(20)),
        )
        .await,
    );
    outcomes.push(
        inject(
            &fleet,
            &ns,
            "flapping link 3 s down / 3 s up x4",
            Fault::Flap {
                cycles: 4,
                down: Duration::from_secs(3),
                up: Duration::from_secs(3),
            },
        )
        .await,
    );
    // Assert first: a failing fault prints the hub's and agent's logs as the fleet drops.
    assert_all_passed(&outcomes);
    drop(fleet);
    drop(ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_partitions_turn_the_node_unknown_and_back() {
    if !full_suite() {
        println!("long partitions run with FLEETLET_FAULTS_FULL=1 (make faults)");
        return;
    }
    let (ns, fleet) = partitioned_fleet("fpartl").await;
    let mut outcomes = vec![
        inject(
            &fleet,
            &ns,
            "partition 3 min (veth down, node Unknown)",
            Fault::Cut(Duration::from_secs(180)),
        )
        .await,
    ];
    outcomes.push(
        inject(
            &fleet,
            &ns,
            "flapping link 3 s down / 3 s up for 60 s",
            Fault::Flap {
                cycles: 10,
                down: Duration::from_secs(3),
                up: Duration::from_secs(3),
            },
        )
        .await,
    );
    // Assert first: a failing fault prints the hub's and agent's logs as the fleet drops.
    assert_all_passed(&outcomes);
    drop(fleet);
    drop(ns);
}
