//! A Node's Ready condition as the hub decides it: a typed state with one transition function
//! (`Readiness::step`), read back from the API after a restart with `ReadyState::from_condition`.

use std::time::Duration;

/// The status of a Kubernetes condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionStatus {
    /// `True`.
    True,
    /// `False`.
    False,
    /// `Unknown`.
    Unknown,
}

impl ConditionStatus {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }

    /// Parses the API's spelling; anything else is `Unknown`, as the API server treats it.
    pub fn parse(s: &str) -> Self {
        match s {
            "True" => Self::True,
            "False" => Self::False,
            _ => Self::Unknown,
        }
    }
}

/// Which Ready condition a Node carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyState {
    /// The device's agent is connected: True / DeviceConnected.
    Connected,
    /// The device has not been seen connected since this hub started: Unknown /
    /// DeviceNotConnected.
    NotConnected,
    /// The device has been away longer than the grace: Unknown / DeviceDisconnected.
    Disconnected,
    /// A condition the hub did not derive from the device's stream: Flightctl's override
    /// (False with Flightctl's reason), or one read from the API that another writer set.
    Other {
        /// Its status.
        status: ConditionStatus,
        /// Its reason.
        reason: String,
    },
}

impl ReadyState {
    /// Reads a Ready condition's status and reason.
    pub fn from_condition(status: &str, reason: &str) -> Self {
        match (ConditionStatus::parse(status), reason) {
            (ConditionStatus::True, "DeviceConnected") => Self::Connected,
            (ConditionStatus::Unknown, "DeviceNotConnected") => Self::NotConnected,
            (ConditionStatus::Unknown, "DeviceDisconnected") => Self::Disconnected,
            (status, reason) => Self::Other {
                status,
                reason: reason.to_string(),
            },
        }
    }

    /// The condition's status.
    pub fn status(&self) -> ConditionStatus {
        match self {
            Self::Connected => ConditionStatus::True,
            Self::NotConnected | Self::Disconnected => ConditionStatus::Unknown,
            Self::Other { status, .. } => *status,
        }
    }

    /// The condition's reason.
    pub fn reason(&self) -> &str {
        match self {
            Self::Connected => "DeviceConnected",
            Self::NotConnected => "DeviceNotConnected",
            Self::Disconnected => "DeviceDisconnected",
            Self::Other { reason, .. } => reason,
        }
    }

    /// Whether the condition is True.
    pub fn is_ready(&self) -> bool {
        self.status() == ConditionStatus::True
    }

    /// Why pods on a Node in this state are held not ready (see [`UnreadyNodes`]): never for a
    /// node that is ready, and never for one not seen since the hub started (right after a
    /// restart every node is in that state until its agent is back, and a restart must not
    /// flap pods).
    ///
    /// [`UnreadyNodes`]: super::UnreadyNodes
    pub fn unready(&self) -> Option<Unready> {
        match self {
            _ if self.is_ready() => None,
            Self::NotConnected => None,
            Self::Disconnected => Some(Unready::Disconnected),
            Self::Connected | Self::Other { .. } => Some(Unready::Down),
        }
    }
}

/// Why the hub holds a Node's Ready condition at other than True in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unready {
    /// The device's stream is gone for longer than the grace (Ready=Unknown, DeviceDisconnected).
    Disconnected,
    /// The device is connected but Flightctl reports it going down (Ready=False).
    Down,
}

/// The readiness the hub reports for a node, and whether a disconnect was announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Status and reason.
    pub state: ReadyState,
    /// Message of the Ready condition.
    pub message: String,
    /// RFC 3339 time of the last change.
    pub since: String,
    /// A DeviceDisconnected event went out and no DeviceReconnected yet.
    pub announced_disconnect: bool,
}

/// A node event to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeEvent {
    /// The device has been away longer than the grace.
    Disconnected,
    /// The device is back after a disconnect was announced.
    Reconnected,
}

impl Readiness {
    /// Readiness of a node the hub has not seen connected.
    pub fn not_connected(now: &str) -> Self {
        Self {
            state: ReadyState::NotConnected,
            message: "the device has not connected to the hub yet".into(),
            since: now.into(),
            announced_disconnect: false,
        }
    }

    /// Advances readiness: connected → True; away at least `grace` → Unknown/DeviceDisconnected.
    /// Returns the event to publish, if any.
    pub fn step(
        &mut self,
        connected: bool,
        away_for: Duration,
        grace: Duration,
        now: &str,
    ) -> Option<NodeEvent> {
        if connected {
            let event = self.announced_disconnect.then_some(NodeEvent::Reconnected);
            if !self.state.is_ready() {
                *self = Self {
                    state: ReadyState::Connected,
                    message: "the device's fleetlet agent is connected".into(),
                    since: now.into(),
                    announced_disconnect: false,
                };
            }
            self.announced_disconnect = false;
            return event;
        }
        if away_for < grace || self.state == ReadyState::Disconnected {
            return None;
        }
        let was_ready = self.state.is_ready();
        if was_ready || self.state != ReadyState::NotConnected {
            *self = Self {
                state: ReadyState::Disconnected,
                message: format!(
                    "the device has been disconnected for more than {}s",
                    grace.as_secs()
                ),
                since: now.into(),
                announced_disconnect: was_ready || self.announced_disconnect,
            };
            return was_ready.then_some(NodeEvent::Disconnected);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(20);

    #[test]
    fn a_new_device_turns_ready_on_connect_without_events() {
        let mut r = Readiness::not_connected("t0");
        assert_eq!(
            r.step(false, Duration::from_secs(100), GRACE, "t1"),
            None,
            "never connected: quiet"
        );
        assert_eq!(r.state, ReadyState::NotConnected);
        assert_eq!(r.step(true, Duration::ZERO, GRACE, "t2"), None);
        assert_eq!((&r.state, r.since.as_str()), (&ReadyState::Connected, "t2"));
    }

    #[test]
    fn disconnect_after_grace_then_reconnect_emit_events_once() {
        let mut r = Readiness::not_connected("t0");
        r.step(true, Duration::ZERO, GRACE, "t1");
        assert_eq!(
            r.step(false, Duration::from_secs(5), GRACE, "t2"),
            None,
            "within grace"
        );
        assert_eq!(r.state, ReadyState::Connected);
        assert_eq!(
            r.step(false, GRACE, GRACE, "t3"),
            Some(NodeEvent::Disconnected)
        );
        assert_eq!(
            (&r.state, r.since.as_str()),
            (&ReadyState::Disconnected, "t3")
        );
        assert_eq!(
            r.step(false, GRACE * 2, GRACE, "t4"),
            None,
            "announced once"
        );
        assert_eq!(
            r.step(true, Duration::ZERO, GRACE, "t5"),
            Some(NodeEvent::Reconnected)
        );
        assert_eq!((&r.state, r.since.as_str()), (&ReadyState::Connected, "t5"));
        assert_eq!(r.step(true, Duration::ZERO, GRACE, "t6"), None);
        assert_eq!(r.since, "t5", "transition time stays while status stays");
    }

    #[test]
    fn a_short_blip_changes_nothing() {
        let mut r = Readiness::not_connected("t0");
        r.step(true, Duration::ZERO, GRACE, "t1");
        assert_eq!(r.step(false, Duration::from_secs(3), GRACE, "t2"), None);
        assert_eq!(r.step(true, Duration::ZERO, GRACE, "t3"), None);
        assert_eq!(r.since, "t1");
    }

    #[test]
    fn conditions_read_back_from_the_api_keep_their_meaning() {
        assert_eq!(
            ReadyState::from_condition("True", "DeviceConnected"),
            ReadyState::Connected
        );
        assert_eq!(
            ReadyState::from_condition("Unknown", "DeviceDisconnected"),
            ReadyState::Disconnected
        );
        let lifecycle = ReadyState::from_condition("Unknown", "NodeStatusUnknown");
        assert_eq!(lifecycle.status(), ConditionStatus::Unknown);
        assert_eq!(lifecycle.reason(), "NodeStatusUnknown");
        assert_eq!(lifecycle.unready(), Some(Unready::Down));
        assert_eq!(ReadyState::NotConnected.unready(), None);
        assert_eq!(ReadyState::Connected.unready(), None);
        assert_eq!(
            ReadyState::Disconnected.unready(),
            Some(Unready::Disconnected)
        );
        // A seeded Ready condition another writer left True counts as ready.
        assert!(ReadyState::from_condition("True", "KubeletReady").is_ready());
    }

    #[test]
    fn a_node_seeded_as_down_turns_disconnected_after_the_grace_without_an_event() {
        let mut r = Readiness {
            state: ReadyState::from_condition("False", "FlightctlDeviceError"),
            message: String::new(),
            since: "t0".into(),
            announced_disconnect: false,
        };
        assert_eq!(r.step(false, GRACE, GRACE, "t1"), None);
        assert_eq!(r.state, ReadyState::Disconnected);
    }
}
