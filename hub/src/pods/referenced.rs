//! Which ConfigMaps and Secrets fleetlet pods reference: the relay keeps only those in memory.
//!
//! The hub still runs one cluster-wide watch per kind (a watch cannot be limited to a set of
//! names), but stores an object only while some pod on a fleetlet node references it. A newly
//! referenced object is fetched with a GET unless the cache already has it, and the devices of
//! the pods that wait for it get their snapshot once the answer is in, so a pod never starts
//! with a reference the hub simply had not kept.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::Pod;

use super::{Fetched, Input, PodRelay, bundle, node_of};

/// GETs of newly referenced ConfigMaps/Secrets in flight at most.
const MAX_FETCHES: usize = 16;

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

impl PodRelay {
    /// The objects `pod` references if it is on a fleetlet node (none otherwise: the hub keeps
    /// nothing for other nodes' pods).
    pub(super) fn refs_of(&self, pod: &Pod) -> Vec<Ref> {
        match node_of(pod) {
            Some(node) if self.is_ours(&node) => pod_refs(pod),
            _ => Vec::new(),
        }
    }

    /// Recounts every reference (after a pod re-list or a change of which nodes are ours).
    pub(super) fn rebuild_refs(&mut self) {
        if !self.pods.synced {
            return;
        }
        let per_pod: Vec<Vec<Ref>> = self.pods.all().iter().map(|p| self.refs_of(p)).collect();
        let before: HashSet<Ref> = self.referenced.iter().cloned().collect();
        let gone = self.referenced.rebuild(per_pod.iter().map(Vec::as_slice));
        self.drop_unreferenced(&gone);
        let new: Vec<Ref> = self
            .referenced
            .iter()
            .filter(|r| !before.contains(*r))
            .cloned()
            .collect();
        self.queue_fetches(new);
    }

    pub(super) fn has_cached(&self, (kind, key): &Ref) -> bool {
        match kind {
            RefKind::ConfigMap => self.config_maps.items.contains_key(key),
            RefKind::Secret => self.secrets.items.contains_key(key),
        }
    }

    /// Frees what no pod references any more.
    pub(super) fn drop_unreferenced(&mut self, gone: &[Ref]) {
        for (kind, key) in gone {
            let removed = match kind {
                RefKind::ConfigMap => {
                    if let Some(r) = self.config_maps.relist.as_mut() {
                        r.remove(key);
                    }
                    self.config_maps.items.remove(key).is_some()
                }
                RefKind::Secret => {
                    if let Some(r) = self.secrets.relist.as_mut() {
                        r.remove(key);
                    }
                    self.secrets.items.remove(key).is_some()
                }
            };
            if removed {
                tracing::debug!(kind = kind.as_str(), namespace = %key.0, name = %key.1, "no longer referenced; dropped from the cache");
            }
        }
        if !gone.is_empty() {
            self.update_cache_gauges();
        }
    }

    /// Fetches the given newly referenced objects unless the cache has them, a GET is pending
    /// or the API said they do not exist. While the kind's watch lists, its list answers
    /// instead (see [`Referenced::listing_new`]).
    pub(super) fn queue_fetches(&mut self, refs: Vec<Ref>) {
        for r in refs {
            if self.has_cached(&r)
                || self.referenced.absent.contains(&r)
                || self.referenced.fetching.contains(&r)
            {
                continue;
            }
            let listing = match r.0 {
                RefKind::ConfigMap => !self.config_maps.synced || self.config_maps.relist.is_some(),
                RefKind::Secret => !self.secrets.synced || self.secrets.relist.is_some(),
            };
            if listing {
                self.referenced.listing_new.insert(r);
                continue;
            }
            self.referenced.fetching.insert(r.clone());
            self.fetch_queue.push_back(r);
        }
        self.pump_fetches();
    }

    pub(super) fn pump_fetches(&mut self) {
        while self.fetches_in_flight < MAX_FETCHES {
            let Some(r) = self.fetch_queue.pop_front() else {
                return;
            };
            if !self.referenced.fetching.contains(&r) {
                continue; // no longer referenced
            }
            let (kind, (ns, name)) = &r;
            let fut = self.api.fetch(*kind, ns, name);
            let done = self.done_tx.clone();
            self.fetches_in_flight += 1;
            tokio::spawn(async move {
                let result = fut.await;
                let _ = done.send(Input::Fetched { what: r, result }).await;
            });
        }
    }

    pub(super) fn fetched(&mut self, what: Ref, result: Result<Option<Fetched>, kube::Error>) {
        self.fetches_in_flight = self.fetches_in_flight.saturating_sub(1);
        if self.referenced.fetching.remove(&what) {
            let (kind, key) = &what;
            match result {
                Ok(Some(obj)) => {
                    self.referenced.failed.remove(&what);
                    // A watch event that came meanwhile is at least as new: it wins.
                    match obj {
                        Fetched::ConfigMap(cm) => {
                            if let Some(r) = self.config_maps.relist.as_mut() {
                                r.entry(key.clone()).or_insert_with(|| cm.clone());
                            }
                            self.config_maps.items.entry(key.clone()).or_insert(cm);
                        }
                        Fetched::Secret(sec) => {
                            if let Some(r) = self.secrets.relist.as_mut() {
                                r.entry(key.clone()).or_insert_with(|| sec.clone());
                            }
                            self.secrets.items.entry(key.clone()).or_insert(sec);
                        }
                    }
                    self.update_cache_gauges();
                }
                Ok(None) => {
                    self.referenced.failed.remove(&what);
                    self.referenced.absent.insert(what.clone());
                }
                Err(error) => {
                    tracing::warn!(kind = kind.as_str(), namespace = %key.0, name = %key.1, %error, "reading a referenced object failed; retrying, snapshots go out without it meanwhile");
                    self.referenced.failed.insert(what.clone());
                }
            }
            if let Some(devices) = self.waiting.remove(&what) {
                for d in devices {
                    self.mark(&d);
                }
            }
        }
        self.pump_fetches();
    }

    /// Bookkeeping after a ConfigMap/Secret watch event: what exists, what to fetch again.
    pub(super) fn after_watch(
        &mut self,
        kind: RefKind,
        changed: &[Key],
        deleted: Option<Key>,
        listed: bool,
    ) {
        for key in changed {
            let r = (kind, key.clone());
            if self.has_cached(&r) {
                self.referenced.absent.remove(&r);
                self.referenced.failed.remove(&r);
                // The watch answered before the GET did: nothing to wait for.
                if self.referenced.fetching.remove(&r)
                    && let Some(devices) = self.waiting.remove(&r)
                {
                    for d in devices {
                        self.mark(&d);
                    }
                }
            }
        }
        if let Some(key) = deleted {
            let r = (kind, key);
            if self.referenced.contains(&r) {
                self.referenced.absent.insert(r);
            }
        }
        if listed {
            tracing::debug!(
                kind = kind.as_str(),
                referenced_cached = match kind {
                    RefKind::ConfigMap => self.config_maps.items.len(),
                    RefKind::Secret => self.secrets.items.len(),
                },
                "listed"
            );
            // The list is the truth for references older than it; one that appeared while it
            // ran may have been passed by, and is read with a GET.
            let missing: Vec<Ref> = self
                .referenced
                .iter()
                .filter(|r| {
                    r.0 == kind && !self.has_cached(r) && !self.referenced.fetching.contains(*r)
                })
                .cloned()
                .collect();
            let mut fetch = Vec::new();
            for r in missing {
                if self.referenced.listing_new.contains(&r) {
                    fetch.push(r);
                } else {
                    self.referenced.absent.insert(r);
                }
            }
            self.referenced.listing_new.retain(|r| r.0 != kind);
            self.queue_fetches(fetch);
            // A flush that found this cache unsynced dropped out; the filtered list may have
            // changed nothing that would schedule another, so schedule one for every device.
            if self.synced() {
                self.mark_all();
            }
        }
        self.update_cache_gauges();
    }

    pub(super) fn update_cache_gauges(&self) {
        for (kind, n) in [
            (RefKind::ConfigMap, self.config_maps.items.len()),
            (RefKind::Secret, self.secrets.items.len()),
        ] {
            self.metrics
                .cached_objects
                .get_or_create(&crate::metrics::KindLabels {
                    kind: kind.as_str().to_string(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
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
