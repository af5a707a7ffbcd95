//! Running probes (exec, httpGet, tcpSocket, grpc) and tracking their thresholds.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

pub use super::http_get::{HttpGetAction, Scheme, dial_error};
use super::spec::{ProbeAction, ProbePlan};
use crate::podman::ContainerRuntime;

/// Run one probe attempt; true on success. Never panics; any failure is `false`.
pub async fn run_probe<R: ContainerRuntime>(
    rt: &R,
    container_id: &str,
    default_host: &str,
    probe: &ProbePlan,
) -> bool {
    probe_output(rt, container_id, default_host, probe)
        .await
        .is_ok()
}

/// A probe attempt that succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Passed {
    /// Plainly.
    Ok,
    /// With a warning the kubelet's prober records as a `ProbeWarning` Event (an HTTP probe
    /// whose redirect to another host was not followed: `Probe terminated redirects, Response
    /// body: …`).
    Warning(String),
}

/// Run one probe attempt; on failure, what the kubelet's prober puts after "probe failed: "
/// in its Unhealthy Event (`HTTP probe failed with statuscode: 500`, `dial tcp
/// 127.0.0.1:80: connect: connection refused`, `service unhealthy (responded with
/// "NOT_SERVING")`). An exec probe's output is not captured by the
/// agent; its exit code stands in for it.
pub async fn probe_output<R: ContainerRuntime>(
    rt: &R,
    container_id: &str,
    default_host: &str,
    probe: &ProbePlan,
) -> Result<Passed, String> {
    match &probe.action {
        ProbeAction::Exec(cmd) => match rt.exec(container_id, cmd, probe.timeout).await {
            Ok(0) => Ok(Passed::Ok),
            Ok(code) => Err(format!("command {cmd:?} exited with {code}")),
            Err(e) => Err(e.to_string()),
        },
        ProbeAction::TcpSocket { host, port } => {
            let host = host.as_deref().unwrap_or(default_host);
            match tokio::time::timeout(probe.timeout, TcpStream::connect((host, *port))).await {
                Ok(Ok(_)) => Ok(Passed::Ok),
                Ok(Err(e)) => Err(dial_error(host, *port, &e)),
                Err(_) => Err(format!(
                    "dial tcp {}: i/o timeout",
                    super::http_get::join_host_port(host, *port)
                )),
            }
        }
        ProbeAction::HttpGet(get) => match get.answer(default_host, probe.timeout).await {
            // A redirect the GET did not follow (to another host): success with a warning, as
            // the kubelet's HTTP prober.
            Ok((code, body)) if (300..400).contains(&code) => Ok(Passed::Warning(format!(
                "Probe terminated redirects, Response body: {}",
                String::from_utf8_lossy(&body)
            ))),
            Ok((code, _)) if (200..300).contains(&code) => Ok(Passed::Ok),
            Ok((code, _)) => Err(format!("HTTP probe failed with statuscode: {code}")),
            Err(e) => Err(e),
        },
        ProbeAction::Grpc { port, service } => {
            super::grpc_probe::check(default_host, *port, service, probe.timeout)
                .await
                .map(|()| Passed::Ok)
        }
    }
}

/// Threshold bookkeeping of one probe of one container run.
#[derive(Debug, Clone)]
pub struct ProbeTracker {
    /// When the next attempt is due.
    pub next_due: Instant,
    successes: u32,
    failures: u32,
    /// Current verdict (after thresholds).
    pub passing: bool,
}

/// What a probe result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Crossed successThreshold.
    Passed,
    /// Crossed failureThreshold.
    Failed,
    /// No change.
    Unchanged,
}

impl ProbeTracker {
    /// A tracker for a run that started at `started`.
    pub fn new(plan: &ProbePlan, started: Instant) -> Self {
        Self {
            next_due: started + plan.initial_delay,
            successes: 0,
            failures: 0,
            passing: false,
        }
    }

    /// Record an attempt made at `now`.
    pub fn record(&mut self, plan: &ProbePlan, ok: bool, now: Instant) -> Verdict {
        self.next_due = now + plan.period;
        if ok {
            self.failures = 0;
            self.successes += 1;
            if !self.passing && self.successes >= plan.success_threshold {
                self.passing = true;
                return Verdict::Passed;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.failures >= plan.failure_threshold {
                // Start counting afresh: liveness acts on every crossing of the threshold.
                self.failures = 0;
                self.passing = false;
                return Verdict::Failed;
            }
        }
        Verdict::Unchanged
    }

    /// Time until due (zero when overdue).
    pub fn due_in(&self, now: Instant) -> Duration {
        self.next_due.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(success: u32, failure: u32) -> ProbePlan {
        ProbePlan {
            termination_grace: None,
            action: ProbeAction::TcpSocket {
                host: None,
                port: 1,
            },
            initial_delay: Duration::from_secs(5),
            period: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn thresholds() {
        let p = plan(2, 3);
        let now = Instant::now();
        let mut t = ProbeTracker::new(&p, now);
        assert_eq!(t.due_in(now), Duration::from_secs(5));
        assert_eq!(t.record(&p, true, now), Verdict::Unchanged);
        assert_eq!(t.record(&p, true, now), Verdict::Passed);
        assert!(t.passing);
        assert_eq!(t.record(&p, false, now), Verdict::Unchanged);
        assert_eq!(t.record(&p, false, now), Verdict::Unchanged);
        assert_eq!(t.record(&p, false, now), Verdict::Failed);
        assert!(!t.passing);
        assert_eq!(t.due_in(now), Duration::from_secs(2));
    }

    #[tokio::test]
    async fn tcp_and_http_probes_against_a_loopback_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for _ in 0..5 {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                if req.starts_with("GET /away") {
                    // agnhost's /redirect?loc=http://0.0.0.0/ answers like this (Go's
                    // http.Redirect).
                    let body = "<a href=\"http://0.0.0.0/\">Found</a>.\n";
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 302 Found\r\nlocation: http://0.0.0.0/\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                    continue;
                }
                let code = if req.starts_with("GET /ok") {
                    "200 OK"
                } else {
                    "500 Oops"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {code}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let rt = crate::podman::PodmanClient::new("/nonexistent.sock");
        let mut p = plan(1, 1);
        p.action = ProbeAction::TcpSocket { host: None, port };
        assert!(run_probe(&rt, "", "127.0.0.1", &p).await);
        p.action = ProbeAction::HttpGet(HttpGetAction {
            scheme: Scheme::Http,
            host: None,
            port,
            path: "/ok".into(),
            headers: vec![],
        });
        assert!(run_probe(&rt, "", "127.0.0.1", &p).await);
        p.action = ProbeAction::HttpGet(HttpGetAction {
            scheme: Scheme::Http,
            host: None,
            port,
            path: "/bad".into(),
            headers: vec![],
        });
        assert!(!run_probe(&rt, "", "127.0.0.1", &p).await);
        p.action = ProbeAction::HttpGet(HttpGetAction {
            scheme: Scheme::Http,
            host: None,
            port,
            path: "/away".into(),
            headers: vec![],
        });
        assert_eq!(
            probe_output(&rt, "", "127.0.0.1", &p).await,
            Ok(Passed::Warning(
                "Probe terminated redirects, Response body: <a href=\"http://0.0.0.0/\">Found</a>.\n"
                    .into()
            )),
            "a redirect to another host is not followed: success with the kubelet's warning"
        );
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        p.action = ProbeAction::TcpSocket {
            host: None,
            port: closed_port,
        };
        assert!(!run_probe(&rt, "", "127.0.0.1", &p).await);
    }
}
