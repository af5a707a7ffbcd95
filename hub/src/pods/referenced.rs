//! Which ConfigMaps and Secrets fleetlet pods reference: the relay keeps only those in memory.
//!
//! The hub still runs one cluster-wide watch per kind (a watch cannot be limited to a set of
//! names), but stores an object only while some pod on a fleetlet node references it. A newly
//! referenced object is fetched with a GET unless the cache already has it, and the devices of
//! the pods that wait for it get their snapshot once the answer is in, so a pod never starts
//! with a reference the hub simply had not kept.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::Pod;

use super::bundle;

/// The kind of a referenced object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefKind {
    /// A ConfigMap.
    ConfigMap,
    /// A Secret.
    Secret,
}

impl RefKind {
    /// Lowercase name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RefKind::ConfigMap => "configmap",
            RefKind::Secret => "secret",
        }
    }
}

/// (namespace, name) of an object.
pub type Key = (String, String);

/// One referenced object: its kind and key.
pub type Ref = (RefKind, Key);

/// The objects a pod references, in its own namespace.
pub fn pod_refs(pod: &Pod) -> Vec<Ref> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let r = bundle::references(pod);
    r.config_maps
        .into_iter()
        .map(|n| (RefKind::ConfigMap, (ns.clone(), n)))
        .chain(
            r.secrets
                .into_iter()
                .map(|n| (RefKind::Secret, (ns.clone(), n))),
        )
        .collect()
}

/// Reference counts plus what the relay knows about each referenced object it has not cached.
#[derive(Debug, Default)]
pub struct Referenced {
    counts: HashMap<Ref, usize>,
    /// A GET is in flight; snapshots of pods referencing it wait for the answer.
    pub fetching: HashSet<Ref>,
    /// The API says it does not exist (a GET answered 404, a watch deleted it, or a full list
    /// did not have it); fetched again only once a watch event brings it.
    pub absent: HashSet<Ref>,
    /// The last GET failed; retried on the relay's periodic pass, snapshots do not wait.
    pub failed: HashSet<Ref>,
    /// Referenced for the first time while its kind's watch was listing: the list may have
    /// passed it by before the reference existed, so if the list lacks it, it is fetched.
    /// (A reference older than the list's start needs no GET: the list kept it if it exists.)
    pub listing_new: HashSet<Ref>,
}

impl Referenced {
    /// Counts the references of one pod; returns the objects referenced for the first time.
    pub fn add(&mut self, refs: &[Ref]) -> Vec<Ref> {
        let mut new = Vec::new();
        for r in refs {
            let n = self.counts.entry(r.clone()).or_default();
            *n += 1;
            if *n == 1 {
                new.push(r.clone());
            }
        }
        new
    }

    /// Uncounts the references of one pod; returns the objects no pod references any more.
    pub fn remove(&mut self, refs: &[Ref]) -> Vec<Ref> {
        let mut gone = Vec::new();
        for r in refs {
            if let Some(n) = self.counts.get_mut(r) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.counts.remove(r);
                    self.forget(r);
                    gone.push(r.clone());
                }
            }
        }
        gone
    }

    /// Whether some pod references `r`.
    pub fn contains(&self, r: &Ref) -> bool {
        self.counts.contains_key(r)
    }

    /// Every referenced object.
    pub fn iter(&self) -> impl Iterator<Item = &Ref> {
        self.counts.keys()
    }

    /// Replaces the counts with those of `pods` (after a re-list or an inventory change);
    /// returns the objects no longer referenced.
    pub fn rebuild<'a>(&mut self, pods: impl Iterator<Item = &'a [Ref]>) -> Vec<Ref> {
        let mut counts: HashMap<Ref, usize> = HashMap::new();
        for refs in pods {
            for r in refs {
                *counts.entry(r.clone()).or_default() += 1;
            }
        }
        let gone: Vec<Ref> = self
            .counts
            .keys()
            .filter(|r| !counts.contains_key(*r))
            .cloned()
            .collect();
        for r in &gone {
            self.forget(r);
        }
        self.counts = counts;
        gone
    }

    fn forget(&mut self, r: &Ref) {
        self.fetching.remove(r);
        self.absent.remove(r);
        self.failed.remove(r);
        self.listing_new.remove(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(name: &str) -> Ref {
        (RefKind::ConfigMap, ("ns".into(), name.into()))
    }

    #[test]
    fn counts_report_first_and_last_references() {
        let mut r = Referenced::default();
        assert_eq!(r.add(&[cm("a"), cm("b")]), [cm("a"), cm("b")]);
        assert_eq!(r.add(&[cm("a")]), Vec::<Ref>::new(), "already referenced");
        r.absent.insert(cm("b"));
        assert_eq!(r.remove(&[cm("a"), cm("b")]), [cm("b")]);
        assert!(
            !r.absent.contains(&cm("b")),
            "forgotten with its last reference"
        );
        assert!(r.contains(&cm("a")));
        assert_eq!(r.remove(&[cm("a")]), [cm("a")]);
        assert_eq!(r.remove(&[cm("a")]), Vec::<Ref>::new(), "never below zero");
        assert_eq!(r.iter().count(), 0);
    }

    #[test]
    fn rebuild_returns_what_is_no_longer_referenced() {
        let mut r = Referenced::default();
        r.add(&[cm("a"), cm("b")]);
        let pods = [vec![cm("b"), cm("c")]];
        let gone = r.rebuild(pods.iter().map(Vec::as_slice));
        assert_eq!(gone, [cm("a")]);
        assert!(r.contains(&cm("c")) && r.contains(&cm("b")) && !r.contains(&cm("a")));
    }
}
