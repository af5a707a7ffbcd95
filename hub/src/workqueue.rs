//! The one keyed work queue of the hub's controllers: the pod relay's per-device snapshots, the
//! status writer's per-pod writes and the node manager's per-node passes all use it.
//!
//! It behaves like client-go's delaying work queue and kube-runtime's scheduler: a key is queued
//! at most once, at the earliest time anyone asked for (so a burst of changes to one device is
//! one snapshot after the debounce, and a change arriving while a retry waits for its back-off
//! runs now); a key taken for processing is held back until it is done, and one queued again
//! meanwhile is taken only after that, so one key is never processed twice at once.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// Keys due at given instants, each at most once, none taken twice at once.
#[derive(Debug)]
pub struct WorkQueue<K> {
    /// (due, insertion order, key): the order keys are taken in.
    due: BTreeSet<(Instant, u64, K)>,
    /// Each queued key's place in `due`.
    queued: HashMap<K, (Instant, u64)>,
    /// Keys taken and not yet done.
    busy: HashSet<K>,
    seq: u64,
}

impl<K: Clone + Eq + Hash + Ord> Default for WorkQueue<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone + Eq + Hash + Ord> WorkQueue<K> {
    /// An empty queue.
    pub fn new() -> Self {
        Self {
            due: BTreeSet::new(),
            queued: HashMap::new(),
            busy: HashSet::new(),
            seq: 0,
        }
    }

    /// Queues `key` due at `at`, or keeps it where it is if it is already due earlier.
    pub fn add_at(&mut self, key: K, at: Instant) {
        if let Some(&(when, seq)) = self.queued.get(&key) {
            if when <= at {
                return;
            }
            self.due.remove(&(when, seq, key.clone()));
        }
        self.seq += 1;
        self.queued.insert(key.clone(), (at, self.seq));
        self.due.insert((at, self.seq, key));
    }

    /// Queues `key` due after `delay` (a debounce or a back-off), unless it is due sooner.
    pub fn add_after(&mut self, key: K, delay: Duration) {
        self.add_at(key, Instant::now() + delay);
    }

    /// Queues `key` due now.
    pub fn add(&mut self, key: K) {
        self.add_at(key, Instant::now());
    }

    /// Whether `key` is queued.
    #[cfg(test)]
    pub(crate) fn contains(&self, key: &K) -> bool {
        self.queued.contains_key(key)
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// When the next key that may be taken falls due.
    pub fn next_due(&self) -> Option<Instant> {
        self.due
            .iter()
            .find(|(_, _, k)| !self.busy.contains(k))
            .map(|(at, _, _)| *at)
    }

    /// Takes the earliest key due by `now` that is not being processed; it counts as being
    /// processed until [`WorkQueue::done`].
    pub fn pop_due(&mut self, now: Instant) -> Option<K> {
        let entry = self
            .due
            .iter()
            .take_while(|(at, _, _)| *at <= now)
            .find(|(_, _, k)| !self.busy.contains(k))
            .cloned()?;
        self.due.remove(&entry);
        let (_, _, key) = entry;
        self.queued.remove(&key);
        self.busy.insert(key.clone());
        Some(key)
    }

    /// Takes every key due by `now` that is not being processed, in order (each being processed
    /// until [`WorkQueue::done`]).
    pub fn drain_due(&mut self, now: Instant) -> Vec<K> {
        std::iter::from_fn(|| self.pop_due(now)).collect()
    }

    /// Processing of `key` ended; queued again meanwhile, it may now be taken.
    pub fn done(&mut self, key: &K) {
        self.busy.remove(key);
    }

    /// Resolves once a key that may be taken is due; never while none is queued.
    pub async fn due(&self) {
        match self.next_due() {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_queued_once_at_its_earliest_time() {
        let t0 = Instant::now();
        let mut q = WorkQueue::new();
        q.add_at("a", t0 + Duration::from_secs(5));
        q.add_at("a", t0 + Duration::from_secs(9));
        assert_eq!(
            q.next_due(),
            Some(t0 + Duration::from_secs(5)),
            "later ask ignored"
        );
        q.add_at("a", t0 + Duration::from_secs(1));
        assert_eq!(
            q.next_due(),
            Some(t0 + Duration::from_secs(1)),
            "earlier ask wins"
        );
        assert_eq!(q.pop_due(t0), None, "not due yet");
        assert_eq!(q.pop_due(t0 + Duration::from_secs(1)), Some("a"));
        assert!(q.is_empty());
    }

    #[test]
    fn keys_come_out_in_due_then_arrival_order() {
        let t0 = Instant::now();
        let mut q = WorkQueue::new();
        q.add_at("late", t0 + Duration::from_secs(2));
        q.add_at("b", t0);
        q.add_at("a", t0);
        assert_eq!(q.drain_due(t0 + Duration::from_secs(1)), ["b", "a"]);
        assert_eq!(q.drain_due(t0 + Duration::from_secs(2)), ["late"]);
    }

    #[test]
    fn a_busy_key_is_held_until_done() {
        let t0 = Instant::now();
        let mut q = WorkQueue::new();
        q.add_at("a", t0);
        assert_eq!(q.pop_due(t0), Some("a"));
        q.add_at("a", t0);
        assert_eq!(q.pop_due(t0), None, "a is held while it is processed");
        q.add_at("b", t0 + Duration::from_secs(1));
        assert_eq!(
            q.next_due(),
            Some(t0 + Duration::from_secs(1)),
            "a is skipped while it is processed"
        );
        assert_eq!(q.pop_due(t0 + Duration::from_secs(1)), Some("b"));
        q.done(&"a");
        assert_eq!(q.pop_due(t0 + Duration::from_secs(1)), Some("a"));
        assert!(!q.contains(&"b"), "b was taken");
    }

    #[tokio::test(start_paused = true)]
    async fn due_waits_for_the_earliest_key() {
        let mut q = WorkQueue::new();
        q.add_after("x", Duration::from_secs(3));
        let start = Instant::now();
        q.due().await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert_eq!(q.pop_due(Instant::now()), Some("x"));
        let never = tokio::time::timeout(Duration::from_secs(60), q.due()).await;
        assert!(never.is_err(), "nothing queued: never due");
    }
}
