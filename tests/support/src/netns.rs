//! A network namespace joined to the root namespace by a veth pair with a /30 from
//! 198.18.0.0/15 (the benchmarking range: no real network is ever addressed). The root end's
//! address is a non-loopback address of this machine, which the API server accepts as a Node
//! address for `nodes/proxy` (it refuses loopback ones) and which is only ever routed into the
//! test's own namespace. Everything is removed on drop.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespace and its veth pair.
#[derive(Debug)]
pub struct TestNetns {
    /// Namespace name (`ip netns exec <name>`).
    pub name: String,
    /// Root end of the veth.
    pub host_if: String,
    /// Address of the root end (where a hub listens).
    pub host_ip: Ipv4Addr,
    /// Address of the namespace end.
    pub ns_ip: Ipv4Addr,
}

impl TestNetns {
    /// Creates it (needs root); `tag` (at most 3 characters) tells the interfaces of different
    /// users apart.
    pub fn create(tag: &str) -> Result<Self, String> {
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("fleetlet-{tag}{pid}-{n}");
        let host_if = format!("{tag}h{}{n}", pid % 100_000);
        let ns_if = format!("{tag}d{}{n}", pid % 100_000);
        let used = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-4", "-o", "addr", "show"])
                .output()
                .map_err(|e| format!("ip addr: {e}"))?
                .stdout,
        )
        .into_owned();
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
        let block = (0..64u32)
            .map(|k| {
                (pid.wrapping_mul(11)
                    .wrapping_add(n)
                    .wrapping_add(k * 1277)
                    .wrapping_add(16_384))
                    % 32_768
            })
            .find(|b| !used.contains(&format!(" {}/", Ipv4Addr::from(base + b * 4 + 1))))
            .ok_or("no free /30 in 198.18.0.0/15")?;
        let host_ip = Ipv4Addr::from(base + block * 4 + 1);
        let ns_ip = Ipv4Addr::from(base + block * 4 + 2);
        ip(&["netns", "add", &name])?;
        let ns = TestNetns {
            name,
            host_if,
            host_ip,
            ns_ip,
        };
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        let d = ["-n", ns.name.as_str()];
        ip(&[
            &d[..],
            &["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if],
        ]
        .concat())?;
        ip(&[&d[..], &["link", "set", &ns_if, "up"]].concat())?;
        ip(&[&d[..], &["link", "set", "lo", "up"]].concat())?;
        Ok(ns)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
