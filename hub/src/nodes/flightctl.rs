//! Flightctl's view of a device on its Node: the `FlightctlDeviceHealthy` condition, and the one
//! case in which Flightctl's view overrides the agent session for `Ready`.
//!
//! The rule (docs/flightctl.md, "Node conditions"):
//!
//! - `FlightctlDeviceHealthy` mirrors Flightctl's device summary: `True` for Online; `False` for
//!   Degraded, Error, Rebooting, PoweredOff and ConflictPaused; `Unknown` for Unknown,
//!   AwaitingReconnect or no summary. Its reason is the summary status, its message Flightctl's
//!   info and the device's lastSeen. It is information for operators and alerts; by itself it
//!   never changes `Ready`.
//! - `Ready` stays driven by the agent session (the direct proof that the device runs fleetlet and
//!   its pods), except when Flightctl reports that the device announced it is going down
//!   (Rebooting or PoweredOff) *after* its current agent session began, in at least two
//!   consecutive polls: then `Ready=False` with reason `FlightctlDeviceRebooting` /
//!   `FlightctlDevicePoweredOff`, so nothing new is scheduled onto a device that is about to go
//!   away. A report older than the session is stale (the device has evidently come back) and a
//!   single poll may be a blip: neither touches `Ready`. Error and Degraded (resource pressure in
//!   Flightctl 1.x) do not either: the device still runs its pods, and evicting them would make
//!   things worse.

use tokio::time::Instant;

use super::object::ConditionView;
use crate::inventory::flightctl::DeviceHealth;

/// The condition type carrying Flightctl's summary.
pub const CONDITION_TYPE: &str = "FlightctlDeviceHealthy";

/// Summary statuses with which a device announces that it is going down.
const GOING_DOWN: [&str; 2] = ["Rebooting", "PoweredOff"];

/// The condition status for a summary status.
pub fn condition_status(summary: Option<&str>) -> &'static str {
    match summary {
        Some("Online") => "True",
        Some("Degraded" | "Error" | "Rebooting" | "PoweredOff" | "ConflictPaused") => "False",
        _ => "Unknown",
    }
}

/// The condition reason: the summary status when it is a plain CamelCase word (Flightctl's are),
/// `NotReported` without one, `Other` for anything else.
pub fn condition_reason(summary: Option<&str>) -> String {
    match summary {
        None => "NotReported".into(),
        Some(s)
            if s.starts_with(|c: char| c.is_ascii_alphabetic())
                && s.len() <= 64
                && s.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            s.to_owned()
        }
        Some(_) => "Other".into(),
    }
}

/// The condition message: Flightctl's info, then lastSeen when `with_last_seen`.
///
/// lastSeen moves with every heartbeat of the device's flightctl-agent; the node manager
/// compares conditions without it, so that it rides along with other writes and the periodic
/// status refresh (like a kubelet's heartbeat) instead of costing one write per device per poll.
pub fn condition_message(health: &DeviceHealth, with_last_seen: bool) -> String {
    let info = health
        .summary_info
        .as_deref()
        .filter(|i| !i.is_empty())
        .unwrap_or("no info");
    let mut message = format!("Flightctl: {info}");
    if health.decommissioned {
        message.push_str("; decommissioning");
    }
    if with_last_seen {
        message.push_str("; lastSeen ");
        message.push_str(health.last_seen.as_deref().unwrap_or("never"));
    }
    message
}

/// The `FlightctlDeviceHealthy` condition (`since` = when its status last changed).
pub fn condition(health: &DeviceHealth, since: &str, with_last_seen: bool) -> ConditionView {
    let summary = health.summary_status.as_deref();
    ConditionView {
        type_: CONDITION_TYPE.into(),
        status: condition_status(summary).into(),
        reason: condition_reason(summary),
        message: condition_message(health, with_last_seen),
        last_transition: since.into(),
    }
}

/// Reason and message of `Ready=False` when Flightctl's view overrides a session the hub still
/// counts as ready (see the module docs); `None` when the session decides.
pub fn ready_override(
    health: Option<&DeviceHealth>,
    session_ready: bool,
    session_started: Option<Instant>,
) -> Option<(String, String)> {
    let health = health?;
    let status = health.summary_status.as_deref()?;
    let fresh = session_started.is_some_and(|started| health.status_since > started);
    if !session_ready || !health.confirmed || !fresh || !GOING_DOWN.contains(&status) {
        return None;
    }
    Some((
        format!("FlightctlDevice{status}"),
        format!(
            "Flightctl reports the device {status} ({}) since after its fleetlet agent connected",
            health.summary_info.as_deref().unwrap_or("no info")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn health(status: &str, since: Instant, confirmed: bool) -> DeviceHealth {
        DeviceHealth {
            summary_status: Some(status.into()),
            summary_info: Some("info".into()),
            last_seen: Some("2026-01-01T00:00:00Z".into()),
            decommissioned: false,
            status_since: since,
            confirmed,
        }
    }

    #[test]
    fn statuses_map_to_condition_status_and_reason() {
        assert_eq!(condition_status(Some("Online")), "True");
        for s in [
            "Degraded",
            "Error",
            "Rebooting",
            "PoweredOff",
            "ConflictPaused",
        ] {
            assert_eq!(condition_status(Some(s)), "False", "{s}");
        }
        for s in [
            Some("Unknown"),
            Some("AwaitingReconnect"),
            Some("Weird"),
            None,
        ] {
            assert_eq!(condition_status(s), "Unknown", "{s:?}");
        }
        assert_eq!(condition_reason(Some("PoweredOff")), "PoweredOff");
        assert_eq!(condition_reason(None), "NotReported");
        assert_eq!(condition_reason(Some("not a word")), "Other");
    }

    #[test]
    fn message_carries_info_and_optionally_last_seen() {
        let h = health("Error", Instant::now(), true);
        assert_eq!(
            condition_message(&h, true),
            "Flightctl: info; lastSeen 2026-01-01T00:00:00Z"
        );
        assert_eq!(condition_message(&h, false), "Flightctl: info");
        let c = condition(&h, "t", true);
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
            (CONDITION_TYPE, "False", "Error")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_confirmed_fresh_going_down_report_overrides_ready() {
        let session = Instant::now();
        tokio::time::advance(Duration::from_secs(5)).await;
        let later = Instant::now();
        let fresh = health("Rebooting", later, true);
        let (reason, _) = ready_override(Some(&fresh), true, Some(session)).expect("override");
        assert_eq!(reason, "FlightctlDeviceRebooting");
        assert!(
            ready_override(
                Some(&health("Rebooting", later, false)),
                true,
                Some(session)
            )
            .is_none(),
            "one poll is not enough"
        );
        assert!(
            ready_override(
                Some(&health("PoweredOff", session, true)),
                true,
                Some(later)
            )
            .is_none(),
            "a report older than the session is stale"
        );
        assert!(
            ready_override(Some(&health("Error", later, true)), true, Some(session)).is_none(),
            "Error does not take a connected device out"
        );
        assert!(
            ready_override(Some(&fresh), false, Some(session)).is_none(),
            "a session already not ready decides on its own"
        );
        assert!(ready_override(None, true, Some(session)).is_none());
        assert!(ready_override(Some(&fresh), true, None).is_none());
    }
}
