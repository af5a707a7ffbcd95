//! Flightctl's Device and Fleet objects, parsed once at the edge into the few fields the hub uses.
//!
//! Flightctl (API `v1beta1`, served under `/api/v1`) returns lists as
//! `{"items": [...], "metadata": {"continue": "..."}}`. Every item is parsed on its own so that
//! one malformed object costs only that object, never the whole list.

use std::collections::BTreeMap;

use serde_json::Value;

/// Why one object of a list could not be used. Not retryable: the object must be fixed in Flightctl.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// A field is missing or has the wrong JSON type.
    #[error("{kind} {name}: field {field}: {reason}")]
    Field {
        /// `Device` or `Fleet`.
        kind: &'static str,
        /// The object's name, or `<unnamed #index>` if even that is unusable.
        name: String,
        /// JSON path of the field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// One page of a list response.
#[derive(Debug)]
pub struct Page {
    /// The raw items, parsed one by one by the caller.
    pub items: Vec<Value>,
    /// Token for the next page; `None` on the last page.
    pub continue_token: Option<String>,
}

/// Why a list response as a whole is unusable (retryable: the next poll may succeed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PageError(pub String);

/// Splits a list response into items and the continue token.
pub fn parse_page(body: &[u8]) -> Result<Page, PageError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| PageError(format!("not JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(PageError("list response is not a JSON object".into()));
    };
    let items = match obj.remove("items") {
        Some(Value::Array(items)) => items,
        // Flightctl omits or nulls `items` on an empty list.
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err(PageError("`items` is not an array".into())),
    };
    let continue_token = match obj.get("metadata").and_then(|m| m.get("continue")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(PageError("`metadata.continue` is not a string".into())),
    };
    Ok(Page {
        items,
        continue_token,
    })
}

/// The parts of a Flightctl Device the hub uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// The fleet from `metadata.owner` = `Fleet/<name>`.
    pub fleet: Option<String>,
    /// `status.summary.status` (Online, Degraded, Error, Rebooting, PoweredOff, Unknown, ...).
    pub summary_status: Option<String>,
    /// `status.summary.info`.
    pub summary_info: Option<String>,
    /// `status.lastSeen` when the server includes it (RFC 3339).
    pub last_seen: Option<String>,
    /// True when the device is being or has been decommissioned (`spec.decommissioning` set, or
    /// `status.lifecycle.status` Decommissioning/Decommissioned).
    pub decommissioned: bool,
}

/// The parts of a Flightctl Fleet the hub uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

/// The name of an item, for error messages, even when the rest is malformed.
pub fn item_name(item: &Value, index: usize) -> String {
    item.get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map_or_else(|| format!("<unnamed #{index}>"), str::to_owned)
}

fn field_err(kind: &'static str, name: &str, field: &'static str, reason: &str) -> ObjectError {
    ObjectError::Field {
        kind,
        name: name.to_owned(),
        field,
        reason: reason.to_owned(),
    }
}

fn parse_name(kind: &'static str, item: &Value, index: usize) -> Result<String, ObjectError> {
    let shown = item_name(item, index);
    let meta = item
        .get("metadata")
        .filter(|m| m.is_object())
        .ok_or_else(|| field_err(kind, &shown, "metadata", "missing or not an object"))?;
    match meta.get("name") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(field_err(
            kind,
            &shown,
            "metadata.name",
            "missing, empty or not a string",
        )),
    }
}

fn parse_labels(
    kind: &'static str,
    name: &str,
    item: &Value,
) -> Result<BTreeMap<String, String>, ObjectError> {
    let mut labels = BTreeMap::new();
    match item.get("metadata").and_then(|m| m.get("labels")) {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                let Value::String(v) = v else {
                    return Err(field_err(
                        kind,
                        name,
                        "metadata.labels",
                        &format!("value of {k:?} is not a string"),
                    ));
                };
                labels.insert(k.clone(), v.clone());
            }
        }
        Some(_) => {
            return Err(field_err(kind, name, "metadata.labels", "not an object"));
        }
    }
    Ok(labels)
}

fn opt_str(
    kind: &'static str,
    name: &str,
    value: Option<&Value>,
    field: &'static str,
) -> Result<Option<String>, ObjectError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(field_err(kind, name, field, "not a string")),
    }
}

/// Parses one Device list item.
pub fn parse_device(item: &Value, index: usize) -> Result<Device, ObjectError> {
    const KIND: &str = "Device";
    let name = parse_name(KIND, item, index)?;
    let labels = parse_labels(KIND, &name, item)?;
    let owner = opt_str(
        KIND,
        &name,
        item.get("metadata").and_then(|m| m.get("owner")),
        "metadata.owner",
    )?;
    let fleet = match owner {
        None => None,
        Some(owner) if owner.is_empty() => None,
        Some(owner) => match owner.split_once('/') {
            Some(("Fleet", fleet)) if !fleet.is_empty() => Some(fleet.to_owned()),
            // Owned by something other than a fleet (e.g. a ResourceSync): no fleet.
            Some((kind, rest)) if !kind.is_empty() && !rest.is_empty() && kind != "Fleet" => None,
            _ => {
                return Err(field_err(
                    KIND,
                    &name,
                    "metadata.owner",
                    &format!("{owner:?} is not of the form Kind/name"),
                ));
            }
        },
    };
    let status = item.get("status").filter(|s| !s.is_null());
    if status.is_some_and(|s| !s.is_object()) {
        return Err(field_err(KIND, &name, "status", "not an object"));
    }
    let summary = status.and_then(|s| s.get("summary"));
    let summary_status = opt_str(
        KIND,
        &name,
        summary.and_then(|s| s.get("status")),
        "status.summary.status",
    )?;
    let summary_info = opt_str(
        KIND,
        &name,
        summary.and_then(|s| s.get("info")),
        "status.summary.info",
    )?;
    let last_seen = opt_str(
        KIND,
        &name,
        status.and_then(|s| s.get("lastSeen")),
        "status.lastSeen",
    )?;
    let lifecycle = opt_str(
        KIND,
        &name,
        status
            .and_then(|s| s.get("lifecycle"))
            .and_then(|l| l.get("status")),
        "status.lifecycle.status",
    )?;
    let decommission_requested = item
        .get("spec")
        .and_then(|s| s.get("decommissioning"))
        .is_some_and(|d| !d.is_null());
    let decommissioned = decommission_requested
        || matches!(
            lifecycle.as_deref(),
            Some("Decommissioning" | "Decommissioned")
        );
    Ok(Device {
        name,
        labels,
        fleet,
        summary_status,
        summary_info,
        last_seen,
        decommissioned,
    })
}

/// Parses one Fleet list item.
pub fn parse_fleet(item: &Value, index: usize) -> Result<Fleet, ObjectError> {
    const KIND: &str = "Fleet";
    let name = parse_name(KIND, item, index)?;
    let labels = parse_labels(KIND, &name, item)?;
    Ok(Fleet { name, labels })
}

/// Parses the answer of `GET /api/v1/devices/{name}/lastseen`: `{"lastSeen": "<RFC 3339>"}`.
pub fn parse_last_seen(body: &[u8]) -> Result<Option<String>, PageError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| PageError(format!("not JSON: {e}")))?;
    match value.get("lastSeen") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(PageError("`lastSeen` is not a string".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn device_with_fleet_owner_status_and_labels() {
        let item = json!({
            "apiVersion": "v1beta1", "kind": "Device",
            "metadata": {"name": "dev-1", "labels": {"site": "lab"}, "owner": "Fleet/edge"},
            "spec": {},
            "status": {"summary": {"status": "Online", "info": "ok"},
                       "lastSeen": "2026-01-01T00:00:00Z",
                       "lifecycle": {"status": "Enrolled"}}
        });
        let d = parse_device(&item, 0).expect("parses");
        assert_eq!(d.name, "dev-1");
        assert_eq!(d.labels.get("site").map(String::as_str), Some("lab"));
        assert_eq!(d.fleet.as_deref(), Some("edge"));
        assert_eq!(d.summary_status.as_deref(), Some("Online"));
        assert_eq!(d.summary_info.as_deref(), Some("ok"));
        assert_eq!(d.last_seen.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert!(!d.decommissioned);
    }

    #[test]
    fn device_without_owner_or_status() {
        let d = parse_device(&json!({"metadata": {"name": "bare"}}), 3).expect("parses");
        assert_eq!(d.fleet, None);
        assert_eq!(d.summary_status, None);
        assert!(d.labels.is_empty());
    }

    #[test]
    fn decommissioning_is_detected_from_spec_and_lifecycle() {
        let by_spec = json!({"metadata": {"name": "a"},
            "spec": {"decommissioning": {"target": "Unenroll"}}});
        assert!(parse_device(&by_spec, 0).expect("parses").decommissioned);
        let by_status = json!({"metadata": {"name": "b"},
            "status": {"lifecycle": {"status": "Decommissioned"}}});
        assert!(parse_device(&by_status, 0).expect("parses").decommissioned);
    }

    #[test]
    fn malformed_devices_name_the_field() {
        let cases = [
            (json!({"metadata": {}}), "metadata.name"),
            (json!({"nometa": 1}), "metadata"),
            (
                json!({"metadata": {"name": "x", "labels": {"a": 1}}}),
                "metadata.labels",
            ),
            (
                json!({"metadata": {"name": "x", "labels": ["a"]}}),
                "metadata.labels",
            ),
            (
                json!({"metadata": {"name": "x", "owner": "edge"}}),
                "metadata.owner",
            ),
            (
                json!({"metadata": {"name": "x"}, "status": {"summary": {"status": 5}}}),
                "status.summary.status",
            ),
            (json!({"metadata": {"name": "x"}, "status": 7}), "status"),
        ];
        for (item, want) in cases {
            match parse_device(&item, 9) {
                Err(ObjectError::Field { field, .. }) => assert_eq!(field, want, "{item}"),
                Ok(d) => panic!("{item} parsed as {d:?}"),
            }
        }
    }

    #[test]
    fn owner_of_another_kind_is_not_a_fleet() {
        let item = json!({"metadata": {"name": "x", "owner": "ResourceSync/rs"}});
        assert_eq!(parse_device(&item, 0).expect("parses").fleet, None);
    }

    #[test]
    fn pages_with_and_without_continue() {
        let p =
            parse_page(br#"{"items":[{"a":1}],"metadata":{"continue":"abc"}}"#).expect("parses");
        assert_eq!(p.items.len(), 1);
        assert_eq!(p.continue_token.as_deref(), Some("abc"));
        let last = parse_page(br#"{"items":[],"metadata":{}}"#).expect("parses");
        assert_eq!(last.continue_token, None);
        let null_items =
            parse_page(br#"{"items":null,"metadata":{"continue":""}}"#).expect("parses");
        assert!(null_items.items.is_empty());
        assert_eq!(null_items.continue_token, None);
        assert!(parse_page(b"<html>").is_err());
        assert!(parse_page(br#"{"items":{}}"#).is_err());
        assert!(parse_page(br#"[1]"#).is_err());
    }

    #[test]
    fn last_seen_answer() {
        assert_eq!(
            parse_last_seen(br#"{"lastSeen":"2026-01-01T00:00:00Z"}"#).expect("parses"),
            Some("2026-01-01T00:00:00Z".to_owned())
        );
        assert!(parse_last_seen(br#"{"lastSeen":1}"#).is_err());
    }
}
