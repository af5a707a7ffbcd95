//! Registry credentials from image pull secrets, chosen per image the way the kubelet's
//! credential keyring does (`pkg/credentialprovider`: `BasicDockerKeyring`, `URLsMatch`).
//!
//! A pull secret is a Secret of type `kubernetes.io/dockerconfigjson` (key `.dockerconfigjson`,
//! `{"auths": {"<registry>": {...}}}`) or `kubernetes.io/dockercfg` (key `.dockercfg`, the
//! `auths` map alone). Every entry is keyed by its registry: `host[:port][/path]`, scheme
//! dropped, a leading `/v1/` or `/v2/` of the path dropped. An image matches a key when the
//! ports are equal, the hosts have the same number of dot-separated labels and each label
//! matches the key's label as a glob (`*.example.com`), and the key's path is a prefix of the
//! image's repository path. Keys are tried most specific first (reverse lexical order), and an
//! image of the default registry (Docker Hub) also takes the `index.docker.io` entry.
//!
//! Credentials are secrets: `RegistryAuth`'s `Debug` hides the password, and no error here
//! quotes a Secret's content (JSON errors are reported by position only).

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use serde::Deserialize;

/// `type` of a Secret holding a `.dockerconfigjson`.
pub const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";
/// Key of a `kubernetes.io/dockerconfigjson` Secret.
pub const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";
/// `type` of a Secret holding a legacy `.dockercfg`.
pub const DOCKERCFG_TYPE: &str = "kubernetes.io/dockercfg";
/// Key of a `kubernetes.io/dockercfg` Secret.
pub const DOCKERCFG_KEY: &str = ".dockercfg";

/// Registry key of Docker Hub's credentials (`index.docker.io/v1/` once its path is dropped).
const DEFAULT_REGISTRY_HOST: &str = "index.docker.io";

/// One registry credential.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl RegistryAuth {
    /// The value of Podman's `X-Registry-Auth` header: base64url (padded) of
    /// `{"username": ..., "password": ...}`. Podman 4.3 (`pkg/auth`) decodes a single
    /// credential from it without writing an auth file, so the credential stays in memory.
    pub fn header_value(&self) -> String {
        let json = serde_json::json!({"username": self.username, "password": self.password});
        base64::engine::general_purpose::URL_SAFE.encode(json.to_string())
    }
}

/// A pull secret that cannot be read. Not retryable until the Secret is fixed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PullSecretError {
    /// The config is not JSON of the Docker config shape.
    #[error("image pull secret {secret:?}: {key} is not a Docker config: {problem}")]
    Malformed {
        /// Secret name.
        secret: String,
        /// `.dockerconfigjson` or `.dockercfg`.
        key: &'static str,
        /// Where parsing failed (never the content).
        problem: String,
    },
    /// An entry's `auth` is not `base64(username:password)`.
    #[error(
        "image pull secret {secret:?}: the auth field of registry {registry:?} must be base64(username:password)"
    )]
    BadAuthField {
        /// Secret name.
        secret: String,
        /// Registry key of the entry.
        registry: String,
    },
}

/// One entry of a Docker config, as the kubelet's `DockerConfigEntry` reads it.
#[derive(Deserialize)]
struct ConfigEntry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    auth: String,
}

#[derive(Deserialize)]
struct ConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, ConfigEntry>,
}

/// The credentials of a pod's pull secrets, indexed by registry key.
#[derive(Debug, Default, Clone)]
pub struct Keyring {
    /// Registry key → credentials in the order the secrets were added.
    creds: BTreeMap<String, Vec<RegistryAuth>>,
}

impl Keyring {
    /// Adds the credentials of one Secret. A Secret that is not of a pull-secret type, or lacks
    /// its type's key, adds nothing (the kubelet ignores it too).
    pub fn add_secret(
        &mut self,
        name: &str,
        secret_type: &str,
        data: &std::collections::HashMap<String, bytes::Bytes>,
    ) -> Result<(), PullSecretError> {
        let auths = match secret_type {
            DOCKER_CONFIG_JSON_TYPE => match data.get(DOCKER_CONFIG_JSON_KEY) {
                Some(b) if !b.is_empty() => {
                    serde_json::from_slice::<ConfigJson>(b)
                        .map_err(|e| malformed(name, DOCKER_CONFIG_JSON_KEY, &e))?
                        .auths
                }
                _ => return Ok(()),
            },
            DOCKERCFG_TYPE => match data.get(DOCKERCFG_KEY) {
                Some(b) if !b.is_empty() => {
                    serde_json::from_slice(b).map_err(|e| malformed(name, DOCKERCFG_KEY, &e))?
                }
                _ => return Ok(()),
            },
            _ => return Ok(()),
        };
        for (registry, entry) in auths {
            let auth = entry_auth(name, &registry, entry)?;
            // As the kubelet: an entry whose location has no host is skipped.
            let Some(k) = registry_key(&registry) else {
                continue;
            };
            self.creds.entry(k).or_default().push(auth);
        }
        Ok(())
    }

    /// True when no credential was added.
    pub fn is_empty(&self) -> bool {
        self.creds.is_empty()
    }

    /// The credentials for `image`, best match first; empty when none applies (pull anonymously).
    pub fn lookup(&self, image: &str) -> Vec<&RegistryAuth> {
        let repo = normalized_repository(image);
        let mut out: Vec<&RegistryAuth> = Vec::new();
        // Reverse lexical order: "quay.io/coreos" before "quay.io".
        for (key, creds) in self.creds.iter().rev() {
            if urls_match(key, &repo) {
                out.extend(creds);
            }
        }
        if out.is_empty()
            && is_default_registry(&repo)
            && let Some(creds) = self.creds.get(DEFAULT_REGISTRY_HOST)
        {
            out.extend(creds);
        }
        out
    }
}

fn malformed(secret: &str, key: &'static str, e: &serde_json::Error) -> PullSecretError {
    // serde_json's message may quote the offending value; only its category and position are
    // reported, so a Secret's content never reaches a log or a pod status.
    PullSecretError::Malformed {
        secret: secret.to_owned(),
        key,
        problem: format!(
            "{} at line {} column {}",
            match e.classify() {
                serde_json::error::Category::Syntax => "invalid JSON",
                serde_json::error::Category::Eof => "truncated JSON",
                serde_json::error::Category::Data => "JSON of the wrong shape",
                serde_json::error::Category::Io => "unreadable JSON",
            },
            e.line(),
            e.column()
        ),
    }
}

/// username/password of an entry; `auth` (base64 of `user:password`) wins when present.
fn entry_auth(
    secret: &str,
    registry: &str,
    entry: ConfigEntry,
) -> Result<RegistryAuth, PullSecretError> {
    if entry.auth.is_empty() {
        return Ok(RegistryAuth {
            username: entry.username,
            password: entry.password,
        });
    }
    let bad = || PullSecretError::BadAuthField {
        secret: secret.to_owned(),
        registry: registry.to_owned(),
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry.auth.trim())
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let (username, password) = decoded.split_once(':').ok_or_else(bad)?;
    Ok(RegistryAuth {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

/// The keyring key of a config location: scheme dropped, a `/v1/` or `/v2/` path prefix
/// dropped, a path of `/` dropped. `None` without a host.
fn registry_key(location: &str) -> Option<String> {
    let rest = location
        .strip_prefix("https://")
        .or_else(|| location.strip_prefix("http://"))
        .unwrap_or(location);
    let (host, path) = split_host_path(rest);
    if host.is_empty() {
        return None;
    }
    let path = if path.starts_with("/v2/") || path.starts_with("/v1/") {
        &path[3..]
    } else {
        path
    };
    if path.is_empty() || path == "/" {
        Some(host.to_owned())
    } else {
        Some(format!("{host}{path}"))
    }
}

/// `host[:port]` and `/path` of a schemeless URL (query and fragment dropped, user info too).
fn split_host_path(s: &str) -> (&str, &str) {
    let s = s.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = match s.find('/') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let host = authority.rsplit('@').next().unwrap_or_default();
    (host, path)
}

/// Host labels and port of `host[:port]` (Go's `net.SplitHostPort`, whole host when it fails).
fn split_port(host: &str) -> (Vec<&str>, &str) {
    if let Some(rest) = host.strip_prefix('[')
        && let Some((h, after)) = rest.split_once(']')
    {
        let port = after.strip_prefix(':').unwrap_or_default();
        return (h.split('.').collect(), port);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.split('.').collect(), p),
        _ => (host.split('.').collect(), ""),
    }
}

/// The kubelet's `URLsMatch`: equal ports, equal label counts, each label a glob match, and the
/// key's path a prefix of the image's.
fn urls_match(key: &str, repo: &str) -> bool {
    let (key_host, key_path) = split_host_path(key);
    let (repo_host, repo_path) = split_host_path(repo);
    let (key_labels, key_port) = split_port(key_host);
    let (repo_labels, repo_port) = split_port(repo_host);
    key_port == repo_port
        && key_labels.len() == repo_labels.len()
        && repo_path.starts_with(key_path)
        && key_labels
            .iter()
            .zip(&repo_labels)
            .all(|(k, r)| glob_match(k.as_bytes(), r.as_bytes()))
}

/// Go's `filepath.Match` on one host label: `*`, `?`, `[...]` (ranges, `^` negation) and `\`
/// escapes. A malformed pattern matches nothing, as the kubelet ignores the error.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| glob_match(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && glob_match(rest, &name[1..]),
        Some((b'[', rest)) => {
            let Some((&c, name_rest)) = name.split_first() else {
                return false;
            };
            match class_match(rest, c) {
                Some((true, after)) => glob_match(after, name_rest),
                _ => false,
            }
        }
        Some((b'\\', rest)) => match (rest.split_first(), name.split_first()) {
            (Some((p, rest)), Some((c, name_rest))) => p == c && glob_match(rest, name_rest),
            _ => false,
        },
        Some((p, rest)) => name
            .split_first()
            .is_some_and(|(c, name_rest)| p == c && glob_match(rest, name_rest)),
    }
}

/// Matches `c` against a character class starting after `[`; returns whether it matched and
/// the pattern after `]`, or `None` for a malformed class.
fn class_match(mut p: &[u8], c: u8) -> Option<(bool, &[u8])> {
    let negate = p.first() == Some(&b'^');
    if negate {
        p = &p[1..];
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let (&lo, rest) = p.split_first()?;
        if lo == b']' && !first {
            return Some((matched != negate, rest));
        }
        first = false;
        let (lo, rest) = if lo == b'\\' {
            let (&e, r) = rest.split_first()?;
            (e, r)
        } else {
            (lo, rest)
        };
        p = rest;
        let hi = if p.first() == Some(&b'-') && p.get(1).is_some_and(|&h| h != b']') {
            let (h, r) = match p[1] {
                b'\\' => (*p.get(2)?, &p[3..]),
                h => (h, &p[2..]),
            };
            p = r;
            h
        } else {
            lo
        };
        if lo <= c && c <= hi {
            matched = true;
        }
    }
}

/// The repository an image pulls from, normalized as the kubelet's `ParseImageName` does
/// (`busybox:1` → `docker.io/library/busybox`): tag and digest dropped, Docker Hub implied
/// when the first component is not a registry host.
pub fn normalized_repository(image: &str) -> String {
    let name = image.split('@').next().unwrap_or_default();
    let name = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    };
    let (domain, remainder) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (first, rest.to_owned())
        }
        _ => ("docker.io", name.to_owned()),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    if domain == "docker.io" && !remainder.contains('/') {
        format!("docker.io/library/{remainder}")
    } else {
        format!("{domain}/{remainder}")
    }
}

/// The kubelet's `isDefaultRegistryMatch` on a normalized repository.
fn is_default_registry(repo: &str) -> bool {
    let first = repo.split('/').next().unwrap_or_default();
    if first.is_empty() {
        return false;
    }
    !repo.contains('/')
        || first == "docker.io"
        || first == "index.docker.io"
        || !first.contains(['.', ':'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(key: &str, value: &str) -> std::collections::HashMap<String, bytes::Bytes> {
        [(key.to_owned(), bytes::Bytes::from(value.to_owned()))].into()
    }

    fn user(auths: &[&RegistryAuth]) -> Vec<String> {
        auths.iter().map(|a| a.username.clone()).collect()
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn dockerconfigjson_and_dockercfg_entries_with_auth_or_username() {
        let mut k = Keyring::default();
        let json = format!(
            r#"{{"auths": {{"https://reg.example:5000/v2/": {{"auth": "{}"}},
                "other.example": {{"username": "bob", "password": "pw", "email": "b@x"}}}}}}"#,
            b64("alice:s:e:cret")
        );
        k.add_secret(
            "a",
            DOCKER_CONFIG_JSON_TYPE,
            &data(DOCKER_CONFIG_JSON_KEY, &json),
        )
        .unwrap();
        k.add_secret(
            "b",
            DOCKERCFG_TYPE,
            &data(
                DOCKERCFG_KEY,
                r#"{"legacy.example": {"username": "carol", "password": "x"}}"#,
            ),
        )
        .unwrap();
        let a = k.lookup("reg.example:5000/team/app:1.0");
        assert_eq!(
            a,
            [&RegistryAuth {
                username: "alice".into(),
                password: "s:e:cret".into()
            }],
            "the password keeps its colons"
        );
        assert_eq!(user(&k.lookup("other.example/x")), ["bob"]);
        assert_eq!(user(&k.lookup("legacy.example/x@sha256:abc")), ["carol"]);
        assert!(
            k.lookup("reg.example/team/app").is_empty(),
            "port must match"
        );
        assert!(k.lookup("busybox").is_empty());
    }

    #[test]
    fn only_the_pull_secret_types_count_as_the_kubelet_does() {
        let mut k = Keyring::default();
        let json = r#"{"auths": {"reg.example": {"username": "u", "password": "p"}}}"#;
        k.add_secret("o", "Opaque", &data(DOCKER_CONFIG_JSON_KEY, json))
            .unwrap();
        k.add_secret("w", DOCKERCFG_TYPE, &data(DOCKER_CONFIG_JSON_KEY, json))
            .unwrap();
        k.add_secret(
            "e",
            DOCKER_CONFIG_JSON_TYPE,
            &data(DOCKER_CONFIG_JSON_KEY, ""),
        )
        .unwrap();
        assert!(k.is_empty());
    }

    #[test]
    fn most_specific_key_first_and_globs_per_label() {
        let mut k = Keyring::default();
        let json = r#"{"auths": {
            "quay.io": {"username": "host", "password": "p"},
            "quay.io/coreos": {"username": "path", "password": "p"},
            "*.example.com": {"username": "glob", "password": "p"},
            "index.docker.io/v1/": {"username": "hub", "password": "p"}}}"#;
        k.add_secret(
            "s",
            DOCKER_CONFIG_JSON_TYPE,
            &data(DOCKER_CONFIG_JSON_KEY, json),
        )
        .unwrap();
        assert_eq!(user(&k.lookup("quay.io/coreos/etcd:v3")), ["path", "host"]);
        assert_eq!(user(&k.lookup("quay.io/other/x")), ["host"]);
        assert_eq!(user(&k.lookup("reg.example.com/x")), ["glob"]);
        assert!(
            k.lookup("a.b.example.com/x").is_empty(),
            "a glob label matches one label"
        );
        assert_eq!(user(&k.lookup("busybox")), ["hub"]);
        assert_eq!(user(&k.lookup("docker.io/library/busybox:1")), ["hub"]);
        assert_eq!(user(&k.lookup("someone/app")), ["hub"]);
        assert!(k.lookup("reg.example/app").is_empty());
    }

    #[test]
    fn malformed_secrets_are_named_without_their_content() {
        let mut k = Keyring::default();
        let e = k
            .add_secret(
                "regcred",
                DOCKER_CONFIG_JSON_TYPE,
                &data(DOCKER_CONFIG_JSON_KEY, r#"{"auths": "hunter2"}"#),
            )
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("regcred") && msg.contains(".dockerconfigjson"),
            "{msg}"
        );
        assert!(!msg.contains("hunter2"), "{msg}");
        let e = k
            .add_secret(
                "regcred",
                DOCKER_CONFIG_JSON_TYPE,
                &data(
                    DOCKER_CONFIG_JSON_KEY,
                    &format!(
                        r#"{{"auths": {{"r.example": {{"auth": "{}"}}}}}}"#,
                        b64("nocolon")
                    ),
                ),
            )
            .unwrap_err();
        assert!(
            matches!(e, PullSecretError::BadAuthField { ref registry, .. } if registry == "r.example")
        );
        assert!(!e.to_string().contains("nocolon"));
    }

    #[test]
    fn header_is_base64url_json_and_debug_hides_the_password() {
        let a = RegistryAuth {
            username: "u".into(),
            password: "p?>>".into(),
        };
        let raw = base64::engine::general_purpose::URL_SAFE
            .decode(a.header_value())
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(v, serde_json::json!({"username": "u", "password": "p?>>"}));
        assert!(!format!("{a:?}").contains("p?>>"));
    }

    #[test]
    fn image_names_normalize_like_the_kubelet() {
        assert_eq!(
            normalized_repository("busybox"),
            "docker.io/library/busybox"
        );
        assert_eq!(
            normalized_repository("index.docker.io/me/app:2"),
            "docker.io/me/app"
        );
        assert_eq!(
            normalized_repository("127.0.0.1:5000/fleetlet/busybox:1"),
            "127.0.0.1:5000/fleetlet/busybox"
        );
        assert_eq!(
            normalized_repository("localhost/x@sha256:0123"),
            "localhost/x"
        );
        assert_eq!(normalized_repository("reg:5000/x"), "reg:5000/x");
    }

    #[test]
    fn globs_follow_filepath_match() {
        assert!(glob_match(b"r[a-c]g", b"rbg"));
        assert!(!glob_match(b"r[^a-c]g", b"rbg"));
        assert!(glob_match(b"?eg", b"reg"));
        assert!(
            !glob_match(b"r[a-", b"ra"),
            "malformed class matches nothing"
        );
        assert!(glob_match(b"\\*", b"*"));
    }
}
