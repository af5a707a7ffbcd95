//! Small helpers around kube-rs shared by the controllers.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

/// The HTTP status code of an API error, if the API server answered.
pub fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// True when the API server said 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    status_code(e) == Some(404)
}

/// `now` as a Kubernetes `Time` JSON value (RFC 3339, seconds).
pub fn time_json(now: Timestamp) -> Value {
    serde_json::to_value(Time(now)).unwrap_or(Value::Null)
}

/// `now` as a Kubernetes `MicroTime` JSON value (RFC 3339, microseconds).
pub fn micro_time_json(now: Timestamp) -> Value {
    serde_json::to_value(MicroTime(now)).unwrap_or(Value::Null)
}

/// `now` as the string a `Time` serializes to.
pub fn time_string(now: Timestamp) -> String {
    match time_json(now) {
        Value::String(s) => s,
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_serialize_like_kubernetes() {
        let t: Timestamp = "2026-01-02T03:04:05.123456789Z".parse().expect("ts");
        assert_eq!(time_string(t), "2026-01-02T03:04:05Z");
        assert_eq!(
            micro_time_json(t),
            Value::String("2026-01-02T03:04:05.123456Z".into())
        );
    }
}
