//! What the link to the hub is doing, as `fleetlet-agent status` shows it: connected to which hub
//! since when, or down since when and why. The link reports [`LinkEvent`]s; [`LinkTracker`]
//! folds them into a [`LinkStatus`] with wall-clock times that the status file records.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Something that happened on the link, reported by `run_link` through
/// [`crate::link::DeviceState::link_changed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// An attempt to `endpoint` starts (TCP, TLS, hello).
    Connecting {
        /// The hub endpoint.
        endpoint: String,
    },
    /// The hub accepted the hello: the session runs.
    Connected {
        /// The hub endpoint.
        endpoint: String,
    },
    /// The attempt failed or the session ended; `error` says why.
    Down {
        /// The hub endpoint.
        endpoint: String,
        /// The error, as an operator reads it.
        error: String,
    },
    /// The agent shuts down.
    Stopped,
}

/// The link's state in the status file (`status.json`, key `link`); part of the documented
/// `fleetlet-agent status --json` format. Times are RFC 3339 UTC, to the second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LinkStatus {
    /// The configuration has no `[hub]`: the desired state comes from a file.
    NotConfigured,
    /// The first attempt since the agent started has not finished.
    Connecting {
        /// The hub endpoint being tried.
        endpoint: String,
        /// When the agent started trying.
        since: String,
    },
    /// A session with the hub runs.
    Connected {
        /// The hub endpoint.
        endpoint: String,
        /// When the hub accepted the hello.
        since: String,
    },
    /// No session: the agent retries with backoff.
    Down {
        /// When the link was lost (or the agent started, if it never connected): retries do not
        /// move it.
        since: String,
        /// The endpoint of the last attempt.
        endpoint: String,
        /// Why the last attempt failed or the last session ended.
        last_error: String,
    },
    /// The agent stopped (the link stopped with it).
    Stopped {
        /// When.
        since: String,
    },
}

/// The current time, RFC 3339 to the second.
pub fn now_rfc3339() -> String {
    Timestamp::from_second(Timestamp::now().as_second())
        .unwrap_or_else(|_| Timestamp::now())
        .to_string()
}

impl LinkStatus {
    /// The state after `event` at time `now` (RFC 3339).
    pub fn next(&self, event: LinkEvent, now: &str) -> LinkStatus {
        match event {
            LinkEvent::Connecting { endpoint } => match self {
                // Retries while down keep the time the link was lost; only the first attempt
                // after start says "connecting".
                LinkStatus::NotConfigured | LinkStatus::Stopped { .. } => LinkStatus::Connecting {
                    endpoint,
                    since: now.to_owned(),
                },
                LinkStatus::Connecting { since, .. } => LinkStatus::Connecting {
                    endpoint,
                    since: since.clone(),
                },
                other => other.clone(),
            },
            LinkEvent::Connected { endpoint } => LinkStatus::Connected {
                endpoint,
                since: now.to_owned(),
            },
            LinkEvent::Down { endpoint, error } => LinkStatus::Down {
                since: match self {
                    LinkStatus::Down { since, .. } | LinkStatus::Connecting { since, .. } => {
                        since.clone()
                    }
                    _ => now.to_owned(),
                },
                endpoint,
                last_error: error,
            },
            LinkEvent::Stopped => LinkStatus::Stopped {
                since: now.to_owned(),
            },
        }
    }
}

/// Folds link events into the current [`LinkStatus`]; the status file watches it.
#[derive(Debug, Clone)]
pub struct LinkTracker {
    tx: watch::Sender<LinkStatus>,
}

impl LinkTracker {
    /// A tracker starting at `initial` ([`LinkStatus::NotConfigured`] without a hub).
    pub fn new(initial: LinkStatus) -> Self {
        Self {
            tx: watch::Sender::new(initial),
        }
    }

    /// Applies one event.
    pub fn record(&self, event: LinkEvent) {
        let now = now_rfc3339();
        self.tx.send_if_modified(|status| {
            let next = status.next(event, &now);
            let changed = next != *status;
            *status = next;
            changed
        });
    }

    /// A receiver of the current status and its changes.
    pub fn subscribe(&self) -> watch::Receiver<LinkStatus> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down(endpoint: &str, error: &str) -> LinkEvent {
        LinkEvent::Down {
            endpoint: endpoint.into(),
            error: error.into(),
        }
    }

    #[test]
    fn down_keeps_the_time_the_link_was_lost_across_retries() {
        let s = LinkStatus::NotConfigured.next(
            LinkEvent::Connecting {
                endpoint: "https://hub:7443".into(),
            },
            "t0",
        );
        assert_eq!(
            s,
            LinkStatus::Connecting {
                endpoint: "https://hub:7443".into(),
                since: "t0".into()
            }
        );
        // Never connected: down since the agent started trying.
        let s = s.next(down("https://hub:7443", "refused"), "t1");
        assert!(
            matches!(&s, LinkStatus::Down { since, .. } if since == "t0"),
            "{s:?}"
        );
        let s = s.next(
            LinkEvent::Connected {
                endpoint: "https://hub:7443".into(),
            },
            "t2",
        );
        assert!(matches!(&s, LinkStatus::Connected { since, .. } if since == "t2"));
        let s = s.next(down("https://hub:7443", "keepalive timeout"), "t3");
        let s = s.next(
            LinkEvent::Connecting {
                endpoint: "https://hub-b:7443".into(),
            },
            "t4",
        );
        let s = s.next(down("https://hub-b:7443", "refused"), "t5");
        assert_eq!(
            s,
            LinkStatus::Down {
                since: "t3".into(),
                endpoint: "https://hub-b:7443".into(),
                last_error: "refused".into()
            }
        );
        assert!(matches!(
            s.next(LinkEvent::Stopped, "t6"),
            LinkStatus::Stopped { since } if since == "t6"
        ));
    }

    #[test]
    fn json_form_is_tagged_by_state() {
        let s = LinkStatus::Connected {
            endpoint: "https://hub:7443".into(),
            since: "2026-12-06T13:40:01Z".into(),
        };
        let v = serde_json::to_value(&s).expect("serializes");
        assert_eq!(
            v,
            serde_json::json!({"state": "connected", "endpoint": "https://hub:7443",
                               "since": "2026-12-06T13:40:01Z"})
        );
        assert_eq!(
            serde_json::to_value(LinkStatus::NotConfigured).expect("serializes"),
            serde_json::json!({"state": "not_configured"})
        );
    }

    #[tokio::test]
    async fn tracker_wakes_readers_only_on_change() {
        let t = LinkTracker::new(LinkStatus::NotConfigured);
        let mut rx = t.subscribe();
        t.record(LinkEvent::Connected {
            endpoint: "https://hub:7443".into(),
        });
        assert!(rx.has_changed().expect("open"));
        rx.borrow_and_update();
        t.record(LinkEvent::Connecting {
            endpoint: "https://hub:7443".into(),
        });
        assert!(
            !rx.has_changed().expect("open"),
            "connecting while connected changes nothing"
        );
    }
}
