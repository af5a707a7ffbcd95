//! Caches of the kubelet endpoint's TokenReview and SubjectAccessReview answers, with the
//! kubelet's default TTLs (`--authentication-token-webhook-cache-ttl=2m`,
//! `--authorization-webhook-cache-authorized-ttl=5m`, `...-unauthorized-ttl=30s`) and a bounded
//! size, so a caller repeating requests (a `kubectl logs -f` reconnecting, a scraper) costs the
//! API server one review per TTL, and a caller inventing tokens cannot grow the hub's memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::RwLock;
use std::time::Duration;

use tokio::time::Instant;

/// How long an authenticated (or rejected) token is remembered: the kubelet's default.
pub const TOKEN_TTL: Duration = Duration::from_secs(120);
/// How long an allowed authorization is remembered: the kubelet's default.
pub const ALLOWED_TTL: Duration = Duration::from_secs(300);
/// How long a denied authorization is remembered: the kubelet's default.
pub const DENIED_TTL: Duration = Duration::from_secs(30);
/// Entries per cache.
pub const MAX_ENTRIES: usize = 4096;

/// A map whose entries expire, holding at most `max` of them: when full, expired entries go
/// first, then the one closest to expiry.
pub struct TtlCache<K, V> {
    entries: RwLock<HashMap<K, (V, Instant)>>,
    max: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    /// An empty cache of at most `max` entries.
    pub fn new(max: usize) -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
            max: max.max(1),
        }
    }

    /// The value for `key` if it has not expired.
    pub fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(v, _)| v.clone())
    }

    /// Remembers `value` for `ttl`.
    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        let now = Instant::now();
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.max && !entries.contains_key(&key) {
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= self.max
                && let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(k, _)| k.clone())
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(key, (value, now + ttl));
    }

    /// Entries held (expired ones included until they are pushed out).
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The cache key of a bearer token: a salted SHA-256, so the cache never holds a token itself.
pub fn token_key(salt: &[u8; 16], token: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(salt);
    ctx.update(token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_their_ttl() {
        let c = TtlCache::new(4);
        c.insert("a", true, Duration::from_secs(30));
        assert_eq!(c.get(&"a"), Some(true));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(c.get(&"a"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_never_grows_past_its_bound() {
        let c = TtlCache::new(3);
        for i in 0..100u32 {
            c.insert(i, i, Duration::from_secs(60 + u64::from(i)));
        }
        assert_eq!(c.len(), 3);
        // The entries closest to expiry were pushed out; the newest stay.
        assert_eq!(c.get(&99), Some(99));
        assert_eq!(c.get(&0), None);
    }

    #[test]
    fn token_keys_depend_on_the_salt_and_the_token() {
        let (s1, s2) = ([1u8; 16], [2u8; 16]);
        assert_eq!(token_key(&s1, "t"), token_key(&s1, "t"));
        assert_ne!(token_key(&s1, "t"), token_key(&s2, "t"));
        assert_ne!(token_key(&s1, "t"), token_key(&s1, "u"));
    }
}
