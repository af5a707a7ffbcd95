//! Kubernetes label rules: turning arbitrary device labels into valid Node labels.
//!
//! Flightctl labels are free-form; a Node label key is `[prefix/]name` where the prefix is a DNS
//! subdomain (at most 253 characters) and the name, like every value, is at most 63 characters of
//! `[A-Za-z0-9._-]` that begin and end alphanumeric. We map rather than reject, so a device with an
//! unusual label still gets a Node, and we drop what cannot be mapped or would impersonate
//! Kubernetes' own labels.

use std::collections::BTreeMap;

/// Longest label name and value Kubernetes accepts.
const MAX_NAME: usize = 63;
/// Longest label key prefix (a DNS subdomain) Kubernetes accepts.
const MAX_PREFIX: usize = 253;

/// Maps a label name or value onto `[A-Za-z0-9._-]{0,63}`, beginning and ending alphanumeric.
/// Returns an empty string when nothing valid remains (a valid value, but not a valid name).
pub fn sanitize_value(raw: &str) -> String {
    let mapped: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = trim_to_alnum(&mapped);
    // Truncating may leave a non-alphanumeric last character behind; trim again.
    let cut: String = trimmed.chars().take(MAX_NAME).collect();
    trim_to_alnum(&cut).to_string()
}

fn trim_to_alnum(s: &str) -> &str {
    s.trim_matches(|c: char| !c.is_ascii_alphanumeric())
}

/// Maps a key prefix onto a lowercase DNS subdomain; `None` when nothing valid remains.
fn sanitize_prefix(raw: &str) -> Option<String> {
    let labels: Vec<String> = raw
        .split('.')
        .map(|part| {
            let mapped: String = part
                .chars()
                .map(|c| {
                    let c = c.to_ascii_lowercase();
                    if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            let cut: String = trim_to_alnum(&mapped).chars().take(MAX_NAME).collect();
            trim_to_alnum(&cut).to_string()
        })
        .filter(|p| !p.is_empty())
        .collect();
    let joined = labels.join(".");
    (!joined.is_empty() && joined.len() <= MAX_PREFIX).then_some(joined)
}

/// Maps a label key onto Kubernetes' key rules; `None` when the name part is empty afterwards
/// or the key falls under a prefix Kubernetes reserves for itself.
pub fn sanitize_key(raw: &str) -> Option<String> {
    let (prefix, name) = match raw.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, raw),
    };
    let name = sanitize_value(name);
    if name.is_empty() {
        return None;
    }
    match prefix {
        None => Some(name),
        Some(p) => {
            let prefix = sanitize_prefix(p)?;
            if is_reserved_prefix(&prefix) {
                return None;
            }
            Some(format!("{prefix}/{name}"))
        }
    }
}

/// `kubernetes.io` and `k8s.io` (and their subdomains) belong to Kubernetes; a device label there
/// could pose as e.g. a node role, so it is dropped.
fn is_reserved_prefix(prefix: &str) -> bool {
    ["kubernetes.io", "k8s.io"]
        .iter()
        .any(|r| prefix == *r || prefix.ends_with(&format!(".{r}")))
}

/// True when `s` is a valid label key outside the reserved prefixes.
pub fn is_valid_key(s: &str) -> bool {
    sanitize_key(s).as_deref() == Some(s)
}

/// True when `s` is a valid label value as Kubernetes checks it.
pub fn is_valid_value(s: &str) -> bool {
    sanitize_value(s) == s
}

/// Sanitizes a whole device label map. When two raw keys map to the same key, the
/// lexicographically first raw key wins, so the result does not depend on map order.
pub fn sanitize_labels(raw: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in raw {
        if let Some(key) = sanitize_key(k) {
            out.entry(key).or_insert_with(|| sanitize_value(v));
        }
    }
    out
}

/// True when `s` is a valid Node name (an RFC 1123 DNS subdomain).
pub fn is_valid_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_PREFIX
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= MAX_NAME
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && part.starts_with(|c: char| c.is_ascii_alphanumeric())
                && part.ends_with(|c: char| c.is_ascii_alphanumeric())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_labels_pass_unchanged() {
        assert_eq!(sanitize_key("region").as_deref(), Some("region"));
        assert_eq!(
            sanitize_key("example.com/site_A-1.x").as_deref(),
            Some("example.com/site_A-1.x")
        );
        assert_eq!(sanitize_value("eu-west_1.a"), "eu-west_1.a");
        assert_eq!(sanitize_value(""), "");
    }

    #[test]
    fn invalid_characters_become_dashes_and_ends_are_trimmed() {
        assert_eq!(
            sanitize_value("Building 7 / floor 2"),
            "Building-7---floor-2"
        );
        assert_eq!(sanitize_value("--x--"), "x");
        assert_eq!(sanitize_value("äöü"), "");
        assert_eq!(sanitize_key("my label").as_deref(), Some("my-label"));
        assert_eq!(
            sanitize_key("Example.COM/zone").as_deref(),
            Some("example.com/zone")
        );
        assert_eq!(sanitize_key("a_b.c/zone").as_deref(), Some("a-b.c/zone"));
    }

    #[test]
    fn long_names_are_truncated_to_63_and_stay_valid() {
        let long = format!("{}-{}", "a".repeat(62), "b".repeat(10));
        let v = sanitize_value(&long);
        assert_eq!(v.len(), 62, "63rd character was '-', which must be trimmed");
        assert!(is_valid_value(&v));
        let k = sanitize_key(&"k".repeat(100)).expect("key");
        assert_eq!(k.len(), 63);
    }

    #[test]
    fn empty_or_reserved_keys_are_dropped() {
        assert_eq!(sanitize_key("///"), None);
        assert_eq!(sanitize_key("ü"), None);
        assert_eq!(sanitize_key("kubernetes.io/role"), None);
        assert_eq!(sanitize_key("node-role.kubernetes.io/master"), None);
        assert_eq!(sanitize_key("k8s.io/x"), None);
        assert_eq!(
            sanitize_key("/name").as_deref(),
            None,
            "an empty prefix is invalid"
        );
    }

    #[test]
    fn label_maps_are_sanitized_deterministically() {
        let raw: BTreeMap<String, String> = [
            ("site name".to_string(), "HQ #1".to_string()),
            ("site-name".to_string(), "other".to_string()),
            ("kubernetes.io/hostname".to_string(), "spoof".to_string()),
        ]
        .into_iter()
        .collect();
        let out = sanitize_labels(&raw);
        assert_eq!(out.len(), 1);
        assert_eq!(out.get("site-name").map(String::as_str), Some("HQ--1"));
        for (k, v) in &out {
            assert!(is_valid_key(k), "{k}");
            assert!(is_valid_value(v), "{v}");
        }
    }

    #[test]
    fn node_names_follow_dns_subdomain_rules() {
        assert!(is_valid_node_name("device-1.fleet-a"));
        assert!(!is_valid_node_name("Device-1"));
        assert!(!is_valid_node_name("-x"));
        assert!(!is_valid_node_name(""));
        assert!(!is_valid_node_name("a..b"));
    }
}
