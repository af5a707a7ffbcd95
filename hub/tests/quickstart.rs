//! docs/quickstart.md, run as written: every ```sh block of the document, in order, in one bash
//! session, against a demo of this test's own (`make demo` with its own directory, device names,
//! fleets, namespace, hub instance and ports: the document's names are mapped onto them), then
//! what each scenario must have shown is checked in its output. So the document cannot drift
//! from what fleetlet does.
//!
//! Needs `make env-up` and both binaries built (`cargo build -p fleetlet-hub -p fleetlet-agent`);
//! the demo uses them instead of building.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{free_port, hub_binary, owner_env, reap_orphans, unique};

/// One ```sh block and the heading it sits under.
struct Block {
    heading: String,
    code: String,
}

fn sh_blocks(doc: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut heading = String::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match &mut current {
            Some(code) if line.trim_start().starts_with("```") => {
                blocks.push(Block {
                    heading: heading.clone(),
                    code: std::mem::take(code),
                });
                current = None;
            }
            Some(code) => {
                code.push_str(line);
                code.push('\n');
            }
            None if line.trim() == "```sh" => current = Some(String::new()),
            None => {
                if let Some(h) = line.strip_prefix("## ") {
                    heading = h.trim().to_owned();
                }
            }
        }
    }
    assert!(
        current.is_none(),
        "docs/quickstart.md: a ```sh block is not closed"
    );
    blocks
}

/// The document's names and this test's.
struct Names {
    prefix: String,
    dir: PathBuf,
    bin: PathBuf,
    ops_port: u16,
    link_port: u16,
    kubelet_port: u16,
}

impl Names {
    fn map(&self, code: &str) -> String {
        let p = &self.prefix;
        [
            ("demo.edge.device.", format!("{}.", self.device_base())),
            ("fleetlet.io/demo=demo", format!("fleetlet.io/demo={p}")),
            (" FLEET=a", format!(" FLEET={p}-a")),
            (" FLEET=b", format!(" FLEET={p}-b")),
            ("target/demo/", format!("{}/", self.dir.display())),
            ("target/debug/", format!("{}/", self.bin.display())),
            (
                "fleetlet.io/managed-by=demo",
                format!("fleetlet.io/managed-by={p}"),
            ),
            ("fleetlet-demo", format!("fleetlet-{p}")),
            ("127.0.0.1:17480", format!("127.0.0.1:{}", self.ops_port)),
        ]
        .iter()
        .fold(code.to_owned(), |c, (from, to)| c.replace(from, to))
    }

    /// What tests/demo/lib.sh puts before the device names: the demo's name with dots for its
    /// hyphens (Flightctl's signer reads a device's fingerprint after the last "-").
    fn device_base(&self) -> String {
        format!("{}.edge.device", self.prefix.replace('-', "."))
    }

    /// The name of one of the demo's devices (and its Node), e.g. `device("a1")`.
    fn device(&self, which: &str) -> String {
        format!("{}.{which}", self.device_base())
    }

    fn env(&self, cmd: &mut Command) {
        let p = &self.prefix;
        cmd.env("FLEETLET_DEMO_DIR", &self.dir)
            .env("FLEETLET_DEMO_NAME", p)
            .env("FLEETLET_DEMO_FLEET_A", format!("{p}-a"))
            .env("FLEETLET_DEMO_FLEET_B", format!("{p}-b"))
            .env("FLEETLET_DEMO_BIN", &self.bin)
            .env("FLEETLET_DEMO_LINK_PORT", self.link_port.to_string())
            .env("FLEETLET_DEMO_KUBELET_PORT", self.kubelet_port.to_string())
            .env("FLEETLET_DEMO_OPS_PORT", self.ops_port.to_string())
            .env(fleetlet_test_support::orphans::OWNER_ENV, owner_env());
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// `make demo-down` for this test's demo, also when an assertion failed.
struct DemoDown<'a>(&'a Names);
impl Drop for DemoDown<'_> {
    fn drop(&mut self) {
        let mut cmd = Command::new("tests/demo/demo-down.sh");
        cmd.current_dir(repo());
        self.0.env(&mut cmd);
        match cmd.output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "demo-down failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("demo-down did not run: {e}"),
        }
    }
}

const MARK: &str = "@@quickstart block ";

/// Processes whose command line mentions `dir` (the demo's hub and agents name their
/// configuration files there), as (pid, command line).
fn processes_mentioning(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some((pid, cmdline))
        })
        .collect()
}

#[test]
fn quickstart_commands_work_on_a_demo_of_their_own() {
    reap_orphans();
    let doc = std::fs::read_to_string(repo().join("docs/quickstart.md")).expect("quickstart");
    let blocks = sh_blocks(&doc);
    assert!(blocks.len() >= 10, "only {} sh blocks found", blocks.len());
    assert_eq!(
        blocks[0].code.trim(),
        "make demo",
        "the guide starts the demo"
    );
    assert_eq!(
        blocks.last().map(|b| b.code.trim()),
        Some("make demo-down"),
        "the guide ends with the cleanup"
    );

    let tmp = tempfile::tempdir().expect("temp dir");
    let names = Names {
        // Node names, fleets, the namespace and the hub instance derive from it.
        prefix: unique("qs"),
        dir: tmp.path().join("demo"),
        bin: hub_binary().parent().expect("bin dir").to_owned(),
        ops_port: free_port(),
        link_port: free_port(),
        kubelet_port: free_port(),
    };
    let _down = DemoDown(&names);

    let mut script = String::from("set -euo pipefail\n");
    for (i, b) in blocks.iter().enumerate() {
        script.push_str(&format!("echo '{MARK}{i}'\n"));
        script.push_str(&names.map(&b.code));
    }
    script.push_str(&format!("echo '{MARK}end'\n"));
    let log = tmp.path().join("quickstart.log");
    let out_file = std::fs::File::create(&log).expect("log");
    let mut cmd = Command::new("timeout");
    cmd.args(["1500", "bash", "-c", &script])
        .current_dir(repo())
        .stdout(out_file.try_clone().expect("log"))
        .stderr(out_file);
    names.env(&mut cmd);
    let status = cmd.status().expect("bash runs");
    let output = std::fs::read_to_string(&log).expect("log");

    // Output per block.
    let mut outputs = vec![String::new(); blocks.len()];
    let mut at: Option<usize> = None;
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix(MARK) {
            at = rest.parse().ok();
            continue;
        }
        if let Some(i) = at {
            outputs[i].push_str(line);
            outputs[i].push('\n');
        }
    }
    let report = || {
        let demo_logs: String = [
            "hub".to_owned(),
            format!("agent-{}", names.device("a1")),
            format!("agent-{}", names.device("b1")),
        ]
        .iter()
        .map(|n| {
            let file = names.dir.join("logs").join(format!("{n}.log"));
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            format!(
                "----- {} (last lines) -----\n{}\n",
                file.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect();
        format!("----- quickstart run -----\n{output}\n{demo_logs}")
    };
    let failed_at = at.map_or("before the first block".into(), |i| {
        format!("block {i} (section \"{}\")", blocks[i].heading)
    });
    assert!(
        status.success() && output.contains(&format!("{MARK}end")),
        "the quickstart failed ({status}) in {failed_at}:\n{}",
        report()
    );

    // What each scenario must have shown.
    let p = &names.prefix;
    let find = |needle: &str| -> &str {
        blocks
            .iter()
            .position(|b| b.code.contains(needle))
            .map(|i| outputs[i].as_str())
            .unwrap_or_else(|| panic!("no block of the guide runs {needle:?}"))
    };
    let expect = |needle: &str, wants: &[&str]| {
        let out = find(needle);
        for w in wants {
            assert!(
                out.contains(w),
                "the block running {needle:?} did not show {w:?}:\n{out}\n{}",
                report()
            );
        }
    };
    expect(
        "kubectl get node demo.edge.device.a1 -o jsonpath='{.spec.taints}",
        &["virtual-kubelet.io/provider", "fleetlet", "NoSchedule"],
    );
    // Flightctl's view: the three devices in their Flightctl Fleets.
    expect(
        "flightctl get devices -l fleetlet.io/demo=demo",
        &[
            &names.device("a1"),
            &names.device("b1"),
            &format!("Fleet/{p}-a"),
            &format!("Fleet/{p}-b"),
            &format!("fleetlet.io/demo-fleet={p}-a"),
        ],
    );
    // Relabelled in Flightctl, b1's Node moved to fleet a and back to b.
    let relabel = find("make demo-device-fleet DEVICE=demo.edge.device.b1 FLEET=a");
    let fleets: Vec<&str> = relabel
        .lines()
        .filter(|l| l.starts_with(&names.device("b1")) && l.contains(" Ready "))
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert_eq!(
        fleets,
        [format!("{p}-a"), format!("{p}-b")],
        "Node fleets after relabelling: {relabel}\n{}",
        report()
    );
    expect("name: no-toleration", &["untolerated taint"]);
    expect(
        "name: on-b1",
        &["hello from the one device", &names.device("b1")],
    );
    expect(
        "agent-demo.edge.device.b1.toml status",
        &[
            "agent:         running",
            &format!(
                "link:          connected to https://127.0.0.1:{}",
                names.link_port
            ),
            "desired state: current",
            "on-b1",
        ],
    );
    // Fleet a only: every hello pod on a1 or a2, four of them.
    let fleet = find("--replicas=4");
    let hello: Vec<&str> = fleet.lines().filter(|l| l.starts_with("hello-")).collect();
    assert_eq!(hello.len(), 4, "{fleet}");
    assert!(
        hello
            .iter()
            .all(|l| l.ends_with(&names.device("a1")) || l.ends_with(&names.device("a2"))),
        "a hello pod outside fleet a: {fleet}"
    );
    expect("name: too-big\n", &["Insufficient cpu"]);
    expect("name: too-big-pinned", &["OutOfcpu"]);
    expect("echo hola from fleetlet", &["hola from fleetlet"]);
    expect(
        "reason=DeviceDisconnected",
        &[
            "DeviceDisconnected",
            "agent:         NOT RUNNING",
            "link:          stopped with the agent",
        ],
    );
    expect("reason=DeviceReconnected", &["DeviceReconnected"]);
    expect(
        "journalctl -t fleetlet-agent",
        &[
            "fleetlet-agent[",
            &format!(
                "fleetlet_hub_device_capacity{{device=\"{}\",resource=\"cpu\"}}",
                names.device("a1")
            ),
            &format!(
                "fleetlet_hub_device_snapshot_bytes{{device=\"{}\"}}",
                names.device("a1")
            ),
        ],
    );
    // `make demo-down` (the guide's last command) left none of the demo's processes running.
    let left = processes_mentioning(&names.dir);
    assert!(
        left.is_empty(),
        "processes of the demo survived make demo-down: {left:?}"
    );
    // ... and none of its devices, enrollment requests or Fleets in Flightctl (the enrolled
    // flightctl-agent's device included).
    let listing = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -e; source target/dev/env; f() {{ \"$FLIGHTCTL_BIN_DIR/flightctl\" --config-dir \"$FLIGHTCTL_CLI_CONFIG_DIR\" \"$@\"; }}; \
             f get devices -l fleetlet.io/demo={p}; f get fleets -l fleetlet.io/demo={p}; \
             f get enrollmentrequests | grep -F 'fleetlet.io/demo={p},' || true"
        ))
        .current_dir(repo())
        .output()
        .expect("flightctl CLI");
    let left_in_flightctl = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert!(
        listing.status.success(),
        "flightctl get: {left_in_flightctl}"
    );
    assert!(
        left_in_flightctl
            .lines()
            .all(|l| l.starts_with("NAME") || l.trim().is_empty()),
        "Flightctl objects of the demo survived make demo-down:\n{left_in_flightctl}"
    );
    let deletion = find("--cascade=foreground");
    assert!(
        deletion.contains("No resources found"),
        "pods left after deletion: {deletion}"
    );
    assert!(
        !deletion.contains(&format!("fleetlet-{}-", names.device("a1"))),
        "containers left on the device after deletion: {deletion}"
    );
}
