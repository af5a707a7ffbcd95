//! A device's reported application status as the status of the pod it runs.
//!
//! Flightctl reports per application: `status` (Preparing, Starting, Running, Error, Completed,
//! Unknown), `ready` ("n/m" containers) and `restarts` (one count for the whole application).
//! That is all a pod can get in agentless mode: no per-container exit codes, no per-container
//! readiness when only some containers are ready, no probe results.

use serde_json::{Value, json};

/// What the hub needs of one pod to write its status.
#[derive(Debug, Clone)]
pub struct PodShape {
    /// Container names and images, in pod order.
    pub containers: Vec<(String, String)>,
    /// `spec.restartPolicy` (Always when unset).
    pub restart_policy: String,
}

/// One entry of `status.applications[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppStatus {
    /// Application name.
    pub name: String,
    /// Preparing, Starting, Running, Error, Completed, Unknown.
    pub status: String,
    /// Ready containers, when `ready` parses as "n/m".
    pub ready: Option<(u32, u32)>,
    /// Restarts Flightctl observed for the application.
    pub restarts: i64,
}

impl AppStatus {
    /// Parses one `status.applications[]` item; `None` when it has no name.
    pub fn parse(v: &Value) -> Option<Self> {
        let name = v.get("name")?.as_str()?.to_owned();
        let ready = v.get("ready").and_then(Value::as_str).and_then(|r| {
            let (a, b) = r.split_once('/')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        });
        Some(Self {
            name,
            status: v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("Unknown")
                .to_owned(),
            ready,
            restarts: v
                .get("restarts")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                .max(0),
        })
    }
}

/// The PodStatus for `app`, or `None` when Flightctl does not know (Unknown): the pod then keeps
/// what it has. `running_since` is when the hub first saw the application Running (RFC 3339).
pub fn pod_status(
    shape: &PodShape,
    app: &AppStatus,
    running_since: Option<&str>,
    info: Option<&str>,
) -> Option<Value> {
    let message = |what: &str| match info {
        Some(i) if !i.is_empty() => format!("Flightctl reports the application {what}: {i}"),
        _ => format!("Flightctl reports the application {what}"),
    };
    let (phase, all_ready, state): (&str, bool, Value) = match app.status.as_str() {
        "Preparing" | "Starting" => (
            "Pending",
            false,
            json!({"waiting": {"reason": "ContainerCreating", "message": message(&app.status)}}),
        ),
        "Running" => {
            let ready = app.ready.is_some_and(|(n, m)| m > 0 && n >= m);
            let mut running = json!({});
            if let Some(t) = running_since {
                running["startedAt"] = json!(t);
            }
            ("Running", ready, json!({ "running": running }))
        }
        "Completed" => (
            "Succeeded",
            false,
            json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
        ),
        "Error" => {
            let phase = if shape.restart_policy == "Never" {
                "Failed"
            } else if running_since.is_some() {
                "Running"
            } else {
                "Pending"
            };
            (
                phase,
                false,
                json!({"waiting": {"reason": "FlightctlApplicationError", "message": message("Error")}}),
            )
        }
        _ => return None,
    };
    let single = shape.containers.len() == 1;
    let statuses: Vec<Value> = shape
        .containers
        .iter()
        .enumerate()
        .map(|(i, (name, image))| {
            // Flightctl counts restarts per application: a single container gets them all;
            // with several, the first carries the application's count.
            let restarts = if single || i == 0 { app.restarts } else { 0 };
            json!({
                "name": name,
                "image": image,
                "imageID": "",
                "ready": all_ready,
                "started": phase == "Running" && app.status == "Running",
                "restartCount": restarts,
                "state": state,
            })
        })
        .collect();
    let ready = if all_ready { "True" } else { "False" };
    let not_ready_reason = (!all_ready).then_some("ContainersNotReady");
    let cond = |t: &str, s: &str, reason: Option<&str>| {
        let mut c = json!({"type": t, "status": s});
        if let Some(r) = reason {
            c["reason"] = json!(r);
        }
        c
    };
    let mut status = json!({
        "phase": phase,
        "conditions": [
            cond("Initialized", "True", None),
            cond("ContainersReady", ready, not_ready_reason),
            cond("Ready", ready, not_ready_reason),
        ],
        "containerStatuses": statuses,
    });
    if let Some(t) = running_since {
        status["startTime"] = json!(t);
    }
    if app.status == "Error" {
        status["reason"] = json!("FlightctlApplicationError");
        status["message"] = json!(message("Error"));
    }
    Some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n: usize, policy: &str) -> PodShape {
        PodShape {
            containers: (0..n)
                .map(|i| (format!("c{i}"), format!("docker.io/library/busybox:{i}")))
                .collect(),
            restart_policy: policy.into(),
        }
    }

    fn app(status: &str, ready: &str, restarts: i64) -> AppStatus {
        AppStatus::parse(
            &json!({"name": "fleetlet-x", "status": status, "ready": ready, "restarts": restarts}),
        )
        .expect("parses")
    }

    #[test]
    fn running_and_ready() {
        let s = pod_status(
            &shape(1, "Always"),
            &app("Running", "1/1", 2),
            Some("2026-12-06T17:00:00Z"),
            None,
        )
        .expect("status");
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["startTime"], "2026-12-06T17:00:00Z");
        assert_eq!(s["containerStatuses"][0]["ready"], true);
        assert_eq!(s["containerStatuses"][0]["restartCount"], 2);
        assert_eq!(
            s["containerStatuses"][0]["state"]["running"]["startedAt"],
            "2026-12-06T17:00:00Z"
        );
        assert_eq!(
            s["conditions"][2],
            json!({"type": "Ready", "status": "True"})
        );
    }

    #[test]
    fn partially_ready_is_not_ready_and_restarts_sit_on_the_first_container() {
        let s =
            pod_status(&shape(2, "Always"), &app("Running", "1/2", 3), None, None).expect("status");
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["containerStatuses"][0]["ready"], false);
        assert_eq!(s["containerStatuses"][0]["restartCount"], 3);
        assert_eq!(s["containerStatuses"][1]["restartCount"], 0);
        assert_eq!(s["conditions"][2]["status"], "False");
    }

    #[test]
    fn other_states() {
        let p = pod_status(&shape(1, "Always"), &app("Preparing", "0/1", 0), None, None)
            .expect("status");
        assert_eq!(p["phase"], "Pending");
        assert_eq!(
            p["containerStatuses"][0]["state"]["waiting"]["reason"],
            "ContainerCreating"
        );
        let c = pod_status(&shape(1, "Never"), &app("Completed", "0/1", 0), None, None)
            .expect("status");
        assert_eq!(c["phase"], "Succeeded");
        assert_eq!(
            c["containerStatuses"][0]["state"]["terminated"]["exitCode"],
            0
        );
        let e = pod_status(
            &shape(1, "Never"),
            &app("Error", "0/1", 0),
            None,
            Some("exit 1"),
        )
        .expect("status");
        assert_eq!(e["phase"], "Failed");
        assert!(e["message"].as_str().expect("message").contains("exit 1"));
        let e = pod_status(
            &shape(1, "Always"),
            &app("Error", "0/1", 4),
            Some("2026-12-06T17:00:00Z"),
            None,
        )
        .expect("status");
        assert_eq!(e["phase"], "Running");
        let e =
            pod_status(&shape(1, "Always"), &app("Error", "0/1", 0), None, None).expect("status");
        assert_eq!(e["phase"], "Pending");
        assert!(pod_status(&shape(1, "Always"), &app("Unknown", "0/1", 0), None, None).is_none());
        assert_eq!(
            AppStatus::parse(&json!({"name": "a", "ready": "x"}))
                .expect("parses")
                .ready,
            None
        );
        assert!(AppStatus::parse(&json!({"status": "Running"})).is_none());
    }
}
