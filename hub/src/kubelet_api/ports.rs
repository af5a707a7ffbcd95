//! One kubelet port per fleetlet Node.
//!
//! A kubelet serves one node, so `/stats/summary`, `/metrics/resource`, `/pods` and
//! `/runningpods/` do not say which node they are about: the node is whoever listens on the
//! address and port in its `status.daemonEndpoints`. The hub serves every fleetlet Node from one
//! process, so it gives each Node its own port from `[kubelet] node_ports` and publishes it in
//! the Node's daemonEndpoints; a request arriving on that port is for that Node.
//!
//! Ports are stable: after a restart the hub first takes back each existing Node's advertised
//! port ([`NodePorts::assign`] with `preferred`), then gives new Nodes the lowest free port. The
//! range bounds the number of listeners; when it is exhausted a Node gets no port of its own
//! (the caller reports it and advertises the shared port).

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use thiserror::Error;
use tokio::sync::watch;

/// Largest range accepted: every port is a listening socket.
pub const MAX_RANGE: usize = 4096;

/// An inclusive range of TCP ports, written `first-last` (or one port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Number of ports.
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Never empty once parsed; here for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{p:?} is not a port number (1-65535)"))
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if first > last {
            return Err(format!("{s:?}: the first port is above the last"));
        }
        let range = PortRange { first, last };
        if range.len() > MAX_RANGE {
            return Err(format!(
                "{s:?} holds {} ports; at most {MAX_RANGE} (one listener each)",
                range.len()
            ));
        }
        Ok(range)
    }
}

impl<'de> serde::Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Every port of the range is taken.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "no kubelet port left for node {node}: all {size} ports of [kubelet] node_ports {first}-{last} are taken; widen the range"
)]
pub struct PortsExhausted {
    /// The node that got none.
    pub node: String,
    /// Range size.
    pub size: usize,
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

/// Node name → port, as served.
pub type PortMap = Arc<BTreeMap<String, u16>>;

/// The port of every Node, and which of them are served.
#[derive(Debug)]
pub struct NodePorts {
    range: PortRange,
    assigned: RwLock<BTreeMap<String, u16>>,
    served: watch::Sender<PortMap>,
}

impl NodePorts {
    /// No ports assigned yet.
    pub fn new(range: PortRange) -> Self {
        Self {
            range,
            assigned: RwLock::new(BTreeMap::new()),
            served: watch::channel(Arc::new(BTreeMap::new())).0,
        }
    }

    /// The range.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// The node's port: the one it has, else `preferred` when it is in the range and free, else
    /// the lowest free port.
    pub fn assign(&self, node: &str, preferred: Option<u16>) -> Result<u16, PortsExhausted> {
        let mut assigned = self.assigned.write().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = assigned.get(node) {
            return Ok(*p);
        }
        let used: BTreeSet<u16> = assigned.values().copied().collect();
        let port = preferred
            .filter(|p| self.range.contains(*p) && !used.contains(p))
            .or_else(|| (self.range.first..=self.range.last).find(|p| !used.contains(p)))
            .ok_or_else(|| PortsExhausted {
                node: node.to_string(),
                size: self.range.len(),
                first: self.range.first,
                last: self.range.last,
            })?;
        assigned.insert(node.to_string(), port);
        Ok(port)
    }

    /// The node's port, if it has one.
    pub fn get(&self, node: &str) -> Option<u16> {
        self.assigned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .copied()
    }

    /// Releases the ports of nodes not in `kept` (their Nodes are gone), and serves the ports of
    /// the nodes in `served` (devices in the inventory) only.
    pub fn sync(&self, kept: &BTreeSet<String>, served: &BTreeSet<String>) {
        let mut assigned = self.assigned.write().unwrap_or_else(|e| e.into_inner());
        assigned.retain(|n, _| kept.contains(n));
        let map: BTreeMap<String, u16> = assigned
            .iter()
            .filter(|(n, _)| served.contains(*n))
            .map(|(n, p)| (n.clone(), *p))
            .collect();
        drop(assigned);
        self.served.send_if_modified(|cur| {
            if **cur == map {
                false
            } else {
                *cur = Arc::new(map);
                true
            }
        });
    }

    /// The served ports, as they change.
    pub fn subscribe(&self) -> watch::Receiver<PortMap> {
        self.served.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ranges_parse_with_clear_errors() {
        assert_eq!(
            "10300-10999".parse::<PortRange>(),
            Ok(PortRange {
                first: 10300,
                last: 10999
            })
        );
        assert_eq!("10300".parse::<PortRange>().map(|r| r.len()), Ok(1));
        assert!(
            "10999-10300"
                .parse::<PortRange>()
                .expect_err("reversed")
                .contains("above")
        );
        assert!(
            "0-10"
                .parse::<PortRange>()
                .expect_err("zero")
                .contains("not a port")
        );
        assert!(
            "1-65535"
                .parse::<PortRange>()
                .expect_err("too big")
                .contains("at most 4096")
        );
        assert!("a-b".parse::<PortRange>().is_err());
    }

    #[test]
    fn ports_are_stable_preferred_then_lowest_free_and_bounded() {
        let ports = NodePorts::new("100-102".parse().expect("range"));
        // After a restart: existing Nodes take back their advertised ports first.
        assert_eq!(ports.assign("b", Some(101)), Ok(101));
        // Out of range or taken: the lowest free one.
        assert_eq!(ports.assign("c", Some(101)), Ok(100));
        assert_eq!(ports.assign("b", None), Ok(101), "a node keeps its port");
        assert_eq!(ports.assign("d", Some(9)), Ok(102));
        let e = ports.assign("e", None).expect_err("exhausted");
        assert_eq!(e.size, 3);
        assert!(e.to_string().contains("node e") && e.to_string().contains("100-102"));
        // Released when the Node is gone; served only while the device is in the inventory.
        let rx = ports.subscribe();
        ports.sync(&names(&["b", "d"]), &names(&["b"]));
        assert_eq!(
            rx.borrow().iter().collect::<Vec<_>>(),
            [(&"b".to_string(), &101)]
        );
        assert_eq!(ports.get("c"), None);
        assert_eq!(ports.get("d"), Some(102));
        assert_eq!(ports.assign("e", None), Ok(100));
    }
}
