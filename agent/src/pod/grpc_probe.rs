//! gRPC probes, as the kubelet runs them (`pkg/probe/grpc`): `grpc.health.v1.Health/Check`
//! in plaintext HTTP/2 to the pod's address at `grpc.port`, asking for `grpc.service` (empty by
//! default), everything bounded by `timeoutSeconds`. `SERVING` succeeds; anything else fails,
//! with the kubelet's words for the Unhealthy Event.
//!
//! The two messages of the health protocol (grpc/grpc-proto `grpc/health/v1/health.proto`) are
//! declared here with prost: `HealthCheckRequest { string service = 1; }` and
//! `HealthCheckResponse { ServingStatus status = 1; }`.

use fleetlet_proto::error_chain;
use std::time::Duration;

use http::uri::PathAndQuery;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::http_get::join_host_port;

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckRequest {
    /// The service whose health is asked; empty for the server as a whole.
    #[prost(string, tag = "1")]
    pub service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckResponse {
    /// `ServingStatus`: 0 UNKNOWN, 1 SERVING, 2 NOT_SERVING, 3 SERVICE_UNKNOWN.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// `ServingStatus.SERVING`.
const SERVING: i32 = 1;

/// The method the probe calls.
const CHECK: &str = "/grpc.health.v1.Health/Check";

/// The user agent of gRPC probes.
const USER_AGENT: &str = "fleetlet-probe/1";

/// How long to wait before dialing again after a failed connect (gRPC's initial backoff).
const REDIAL: Duration = Duration::from_secs(1);

/// One gRPC probe attempt against `host:port`: `Ok` when the server answers `SERVING` for
/// `service` within `timeout`, else the kubelet's message.
///
/// As the kubelet's blocking dial, a refused or failing connection is dialed again until the
/// timeout, which is then what the probe reports.
pub async fn check(host: &str, port: u16, service: &str, timeout: Duration) -> Result<(), String> {
    let addr = join_host_port(host, port);
    let deadline = Instant::now() + timeout;
    let within = go_duration(timeout);
    let Some(channel) = dial(&addr, deadline).await? else {
        return Err(format!(
            "timeout: failed to connect service {addr:?} within {within}: context deadline exceeded"
        ));
    };
    let call = async {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|e| {
            tonic::Status::unavailable(format!("connection error: {}", error_chain(&e)))
        })?;
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: service.to_owned(),
        });
        request.set_timeout(deadline.saturating_duration_since(Instant::now()));
        grpc.unary(
            request,
            PathAndQuery::from_static(CHECK),
            tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default(),
        )
        .await
    };
    let response = match tokio::time::timeout_at(deadline, call).await {
        Err(_) => {
            return Err(format!(
                "timeout: health rpc did not complete within {within}"
            ));
        }
        Ok(Err(status)) => return Err(rpc_error(&status, &within)),
        Ok(Ok(response)) => response.into_inner(),
    };
    if response.status == SERVING {
        Ok(())
    } else {
        Err(format!(
            "service unhealthy (responded with {:?})",
            status_name(response.status)
        ))
    }
}

/// A channel to `addr`, dialing again after failures until `deadline`; `None` when the
/// deadline passed first. A malformed address is an error right away.
async fn dial(addr: &str, deadline: Instant) -> Result<Option<Channel>, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .and_then(|e| e.user_agent(USER_AGENT))
        .map_err(|e| format!("error: failed to connect service at {addr:?}: {e}"))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let attempt = endpoint.clone().connect_timeout(left);
        if let Ok(Ok(channel)) = tokio::time::timeout_at(deadline, attempt.connect()).await {
            return Ok(Some(channel));
        }
        let wait = REDIAL.min(deadline.saturating_duration_since(Instant::now()));
        tokio::time::sleep(wait).await;
    }
}

/// A failed Check in the kubelet's words.
fn rpc_error(status: &tonic::Status, within: &str) -> String {
    match status.code() {
        tonic::Code::Unimplemented => format!(
            "error: this server does not implement the grpc health protocol (grpc.health.v1.Health): {}",
            status.message()
        ),
        tonic::Code::DeadlineExceeded => {
            format!("timeout: health rpc did not complete within {within}")
        }
        code => format!(
            "error: health rpc probe failed: rpc error: code = {} desc = {}",
            code_name(code),
            status.message()
        ),
    }
}

/// A gRPC status code as grpc-go names it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// A `ServingStatus` as the protobuf enum names it (an unknown value as its number).
fn status_name(status: i32) -> String {
    match status {
        0 => "UNKNOWN".into(),
        1 => "SERVING".into(),
        2 => "NOT_SERVING".into(),
        3 => "SERVICE_UNKNOWN".into(),
        n => n.to_string(),
    }
}

/// A whole number of seconds as Go's `time.Duration` prints it (`1s`, `1m30s`, `1h0m5s`).
fn go_duration(d: Duration) -> String {
    let s = d.as_secs();
    let ms = d.subsec_millis();
    if s == 0 && ms > 0 {
        return format!("{ms}ms");
    }
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let frac = if ms > 0 {
        format!(".{ms:03}").trim_end_matches('0').to_owned()
    } else {
        String::new()
    };
    match (h, m) {
        (0, 0) => format!("{s}{frac}s"),
        (0, m) => format!("{m}m{s}{frac}s"),
        (h, m) => format!("{h}h{m}m{s}{frac}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_go_prints_them() {
        assert_eq!(go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(go_duration(Duration::from_secs(5)), "5s");
        assert_eq!(go_duration(Duration::from_secs(60)), "1m0s");
        assert_eq!(go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_duration(Duration::from_secs(3605)), "1h0m5s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn failures_in_the_kubelets_words() {
        let within = "5s";
        assert_eq!(
            rpc_error(&tonic::Status::not_found("unknown service"), within),
            "error: health rpc probe failed: rpc error: code = NotFound desc = unknown service"
        );
        assert_eq!(
            rpc_error(
                &tonic::Status::unimplemented("unknown service grpc.health.v1.Health"),
                within
            ),
            "error: this server does not implement the grpc health protocol (grpc.health.v1.Health): unknown service grpc.health.v1.Health"
        );
        assert_eq!(
            rpc_error(&tonic::Status::deadline_exceeded("late"), within),
            "timeout: health rpc did not complete within 5s"
        );
        assert_eq!(code_name(tonic::Code::Cancelled), "Canceled");
        assert_eq!(status_name(2), "NOT_SERVING");
        assert_eq!(status_name(0), "UNKNOWN");
        assert_eq!(status_name(9), "9");
    }

    #[test]
    fn messages_encode_as_the_health_protocol() {
        use prost::Message;
        let req = HealthCheckRequest {
            service: "svc".into(),
        };
        // Field 1, length-delimited, "svc".
        assert_eq!(req.encode_to_vec(), b"\x0a\x03svc");
        let resp = HealthCheckResponse::decode(&b"\x08\x02"[..]).unwrap();
        assert_eq!(resp.status, 2);
    }

    #[tokio::test]
    async fn a_closed_port_is_dialed_until_the_timeout() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let started = Instant::now();
        let err = check("127.0.0.1", port, "", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            format!(
                "timeout: failed to connect service \"127.0.0.1:{port}\" within 1s: context deadline exceeded"
            )
        );
        assert!(started.elapsed() >= Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_server_that_is_not_grpc_fails_the_probe() {
        // A plain HTTP/1 server: the HTTP/2 handshake fails and the probe reports it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for _ in 0..8 {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                use tokio::io::AsyncWriteExt;
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let err = check("127.0.0.1", port, "", Duration::from_secs(2))
            .await
            .unwrap_err();
        // grpc-go would not finish its dial and report the timeout; tonic's dial completes
        // and the call fails. Either way the probe fails in the kubelet's form.
        assert!(
            err.starts_with("error: health rpc probe failed: rpc error: code = ")
                || err.starts_with("timeout: failed to connect service"),
            "{err}"
        );
    }
}
