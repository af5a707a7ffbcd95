//! The ConfigMap and Secret caches: fed by their watches, rebuilt atomically on every re-list,
//! holding only the objects some pod on a fleetlet node references (see [`super::referenced`]).

use super::*;

/// A cache fed by a watcher, rebuilt atomically on every re-list.
pub(super) struct Cache<K> {
    pub(super) items: BTreeMap<(String, String), K>,
    pub(super) relist: Option<BTreeMap<(String, String), K>>,
    pub(super) synced: bool,
}

impl<K: kube::Resource> Cache<K> {
    pub(super) fn new() -> Self {
        Self {
            items: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
    pub(super) fn key(o: &K) -> (String, String) {
        (
            o.meta().namespace.clone().unwrap_or_default(),
            o.meta().name.clone().unwrap_or_default(),
        )
    }
    /// Folds an event, storing only objects whose key `keep` accepts; returns the keys whose
    /// object changed (all keys on a re-list).
    pub(super) fn apply(
        &mut self,
        ev: watcher::Event<K>,
        keep: impl Fn(&Key) -> bool,
    ) -> Vec<(String, String)> {
        match ev {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(o) => {
                let k = Self::key(&o);
                if let Some(r) = self.relist.as_mut().filter(|_| keep(&k)) {
                    r.insert(k, o);
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                if let Some(r) = self.relist.take() {
                    let mut changed: BTreeSet<_> = self.items.keys().cloned().collect();
                    changed.extend(r.keys().cloned());
                    self.items = r;
                    self.synced = true;
                    changed.into_iter().collect()
                } else {
                    Vec::new()
                }
            }
            watcher::Event::Apply(o) => {
                let k = Self::key(&o);
                if keep(&k) {
                    self.items.insert(k.clone(), o);
                    vec![k]
                } else if self.items.remove(&k).is_some() {
                    vec![k]
                } else {
                    Vec::new()
                }
            }
            watcher::Event::Delete(o) => {
                let k = Self::key(&o);
                self.items.remove(&k);
                vec![k]
            }
        }
    }
}

/// The key of the object a watch event deletes.
pub(super) fn deleted_key<K: kube::Resource>(ev: &watcher::Event<K>) -> Option<Key> {
    match ev {
        watcher::Event::Delete(o) => Some(Cache::<K>::key(o)),
        _ => None,
    }
}
