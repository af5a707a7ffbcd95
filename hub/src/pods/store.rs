//! The relay's pods: a kube-runtime reflector store (fed by the relay's own task, so every read
//! sees exactly the events folded so far) with the indexes the relay looks pods up by: UID, node
//! and referenced ConfigMap/Secret, so a device report, a deletion check, a device's snapshot or
//! a changed ConfigMap touches the pods concerned instead of scanning every bound pod in the
//! cluster.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;

use super::referenced::{Ref, pod_refs};

/// Bound pods with UID and node indexes.
pub(super) struct PodStore {
    writer: reflector::store::Writer<Pod>,
    store: Store<Pod>,
    by_uid: HashMap<String, ObjectRef<Pod>>,
    by_node: HashMap<String, HashSet<ObjectRef<Pod>>>,
    /// Pods by the ConfigMaps and Secrets they reference.
    by_ref: HashMap<Ref, HashSet<ObjectRef<Pod>>>,
    /// UIDs of pods being deleted (deletionTimestamp set).
    terminating: HashSet<String>,
    /// The first list is complete.
    pub(super) synced: bool,
}

impl PodStore {
    pub(super) fn new() -> Self {
        let (store, writer) = reflector::store();
        Self {
            writer,
            store,
            by_uid: HashMap::new(),
            by_node: HashMap::new(),
            by_ref: HashMap::new(),
            terminating: HashSet::new(),
            synced: false,
        }
    }

    /// The key of a pod.
    pub(super) fn key(pod: &Pod) -> ObjectRef<Pod> {
        ObjectRef::from_obj(pod)
    }

    /// The stored pod of `key`.
    pub(super) fn get(&self, key: &ObjectRef<Pod>) -> Option<Arc<Pod>> {
        self.store.get(key)
    }

    /// The pod with `uid`.
    pub(super) fn by_uid(&self, uid: &str) -> Option<Arc<Pod>> {
        self.get(self.by_uid.get(uid)?)
    }

    /// The pods bound to `node`.
    pub(super) fn on_node(&self, node: &str) -> Vec<Arc<Pod>> {
        self.by_node
            .get(node)
            .map(|keys| keys.iter().filter_map(|k| self.get(k)).collect())
            .unwrap_or_default()
    }

    /// The nodes of the pods referencing `r`.
    pub(super) fn nodes_referencing(&self, r: &Ref) -> HashSet<String> {
        self.by_ref
            .get(r)
            .into_iter()
            .flatten()
            .filter_map(|k| super::node_of(self.get(k)?.as_ref()))
            .collect()
    }

    /// UIDs of the pods being deleted.
    pub(super) fn terminating(&self) -> Vec<String> {
        self.terminating.iter().cloned().collect()
    }

    /// Every stored pod (for the passes that need them all: counts, re-lists).
    pub(super) fn all(&self) -> Vec<Arc<Pod>> {
        self.store.state()
    }

    /// Folds one watch event. Returns true when the store's content was replaced by a
    /// completed (re-)list.
    pub(super) fn apply(&mut self, ev: &watcher::Event<Pod>) -> bool {
        if let watcher::Event::Apply(p) | watcher::Event::Delete(p) = ev {
            let key = Self::key(p);
            if let Some(old) = self.store.get(&key) {
                self.unindex(&key, &old);
            }
        }
        self.writer.apply_watcher_event(ev);
        match ev {
            watcher::Event::Apply(p) => {
                self.index(Self::key(p), p);
                false
            }
            watcher::Event::InitDone => {
                self.by_uid.clear();
                self.by_node.clear();
                self.by_ref.clear();
                self.terminating.clear();
                for pod in self.store.state() {
                    self.index(Self::key(&pod), &pod);
                }
                self.synced = true;
                true
            }
            watcher::Event::Delete(_) | watcher::Event::Init | watcher::Event::InitApply(_) => {
                false
            }
        }
    }

    fn index(&mut self, key: ObjectRef<Pod>, pod: &Pod) {
        if let Some(uid) = &pod.metadata.uid {
            self.by_uid.insert(uid.clone(), key.clone());
            if pod.metadata.deletion_timestamp.is_some() {
                self.terminating.insert(uid.clone());
            }
        }
        for r in pod_refs(pod) {
            self.by_ref.entry(r).or_default().insert(key.clone());
        }
        if let Some(node) = super::node_of(pod) {
            self.by_node.entry(node).or_default().insert(key);
        }
    }

    fn unindex(&mut self, key: &ObjectRef<Pod>, pod: &Pod) {
        if let Some(uid) = &pod.metadata.uid
            && self.by_uid.get(uid) == Some(key)
        {
            self.by_uid.remove(uid);
            self.terminating.remove(uid);
        }
        if let Some(node) = super::node_of(pod)
            && let Some(keys) = self.by_node.get_mut(&node)
        {
            keys.remove(key);
            if keys.is_empty() {
                self.by_node.remove(&node);
            }
        }
        for r in pod_refs(pod) {
            if let Some(keys) = self.by_ref.get_mut(&r) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_ref.remove(&r);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, uid: &str, node: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "uid": uid},
            "spec": {"nodeName": node, "containers": []}
        }))
        .expect("pod")
    }

    fn names(pods: Vec<Arc<Pod>>) -> Vec<String> {
        let mut n: Vec<String> = pods
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn indexes_follow_applies_deletes_and_relists() {
        let mut s = PodStore::new();
        s.apply(&watcher::Event::Init);
        s.apply(&watcher::Event::InitApply(pod("a", "u-a", "n1")));
        assert!(
            s.by_uid("u-a").is_none(),
            "not visible before the list completes"
        );
        assert!(s.apply(&watcher::Event::InitDone));
        assert!(s.synced);
        assert_eq!(names(s.on_node("n1")), ["a"]);
        s.apply(&watcher::Event::Apply(pod("b", "u-b", "n1")));
        s.apply(&watcher::Event::Apply(pod("c", "u-c", "n2")));
        assert_eq!(names(s.on_node("n1")), ["a", "b"]);
        // The same name again with another UID (deleted and created): the old UID goes.
        s.apply(&watcher::Event::Apply(pod("b", "u-b2", "n2")));
        assert!(s.by_uid("u-b").is_none());
        assert_eq!(
            s.by_uid("u-b2").and_then(|p| p.metadata.name.clone()),
            Some("b".into())
        );
        assert_eq!(names(s.on_node("n1")), ["a"]);
        assert_eq!(names(s.on_node("n2")), ["b", "c"]);
        s.apply(&watcher::Event::Delete(pod("c", "u-c", "n2")));
        assert!(s.by_uid("u-c").is_none());
        assert_eq!(names(s.on_node("n2")), ["b"]);
        let mut going = pod("b", "u-b2", "n2");
        going.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        s.apply(&watcher::Event::Apply(going.clone()));
        assert_eq!(s.terminating(), ["u-b2"]);
        s.apply(&watcher::Event::Delete(going));
        assert!(s.terminating().is_empty());
        s.apply(&watcher::Event::Apply(pod("b", "u-b2", "n2")));
        // A re-list replaces everything.
        s.apply(&watcher::Event::Init);
        s.apply(&watcher::Event::InitApply(pod("d", "u-d", "n3")));
        s.apply(&watcher::Event::InitDone);
        assert!(s.by_uid("u-a").is_none() && s.by_uid("u-b2").is_none());
        assert!(s.on_node("n1").is_empty() && s.on_node("n2").is_empty());
        assert_eq!(names(s.on_node("n3")), ["d"]);
        assert_eq!(names(s.all()), ["d"]);
    }

    fn with_config_map(name: &str, uid: &str, node: &str, config_map: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "uid": uid},
            "spec": {"nodeName": node, "containers": [], "volumes": [
                {"name": "v", "configMap": {"name": config_map}}
            ]}
        }))
        .expect("pod")
    }

    #[test]
    fn pods_are_found_by_the_config_maps_they_reference() {
        use super::super::referenced::RefKind;
        let cm = |n: &str| (RefKind::ConfigMap, ("ns".to_string(), n.to_string()));
        let nodes = |s: &PodStore, n: &str| {
            let mut v: Vec<String> = s.nodes_referencing(&cm(n)).into_iter().collect();
            v.sort();
            v
        };
        let mut s = PodStore::new();
        s.apply(&watcher::Event::Init);
        s.apply(&watcher::Event::InitApply(with_config_map(
            "a", "u-a", "n1", "cfg",
        )));
        s.apply(&watcher::Event::InitDone);
        s.apply(&watcher::Event::Apply(with_config_map(
            "b", "u-b", "n2", "cfg",
        )));
        assert_eq!(nodes(&s, "cfg"), ["n1", "n2"]);
        assert!(nodes(&s, "other").is_empty());
        // b now references another ConfigMap; a is deleted.
        s.apply(&watcher::Event::Apply(with_config_map(
            "b", "u-b", "n2", "other",
        )));
        assert_eq!(nodes(&s, "cfg"), ["n1"]);
        assert_eq!(nodes(&s, "other"), ["n2"]);
        s.apply(&watcher::Event::Delete(with_config_map(
            "a", "u-a", "n1", "cfg",
        )));
        assert!(nodes(&s, "cfg").is_empty());
        assert!(
            !s.by_ref.contains_key(&cm("cfg")),
            "no empty index entries are kept"
        );
    }
}
