//! Running probes (exec, httpGet, tcpSocket) and tracking their thresholds.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

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

/// Run one probe attempt; on failure, what the kubelet's prober puts after "probe failed: "
/// in its Unhealthy Event (`HTTP probe failed with statuscode: 500`, `dial tcp
/// 127.0.0.1:80: connect: connection refused`). An exec probe's output is not captured by the
/// agent; its exit code stands in for it.
pub async fn probe_output<R: ContainerRuntime>(
    rt: &R,
    container_id: &str,
    default_host: &str,
    probe: &ProbePlan,
) -> Result<(), String> {
    match &probe.action {
        ProbeAction::Exec(cmd) => match rt.exec(container_id, cmd, probe.timeout).await {
            Ok(0) => Ok(()),
            Ok(code) => Err(format!("command {cmd:?} exited with {code}")),
            Err(e) => Err(e.to_string()),
        },
        ProbeAction::TcpSocket { host, port } => {
            let host = host.as_deref().unwrap_or(default_host);
            match tokio::time::timeout(probe.timeout, TcpStream::connect((host, *port))).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(dial_error(host, *port, &e)),
                Err(_) => Err(format!("dial tcp {host}:{port}: i/o timeout")),
            }
        }
        ProbeAction::HttpGet(get) => match get.status(default_host, probe.timeout).await {
            Ok(code) if (200..400).contains(&code) => Ok(()),
            Ok(code) => Err(format!("HTTP probe failed with statuscode: {code}")),
            Err(e) => Err(format!(
                "Get \"http://{}:{}{}\": {e}",
                get.host.as_deref().unwrap_or(default_host),
                get.port,
                get.path
            )),
        },
    }
}

/// A failed connect in Go's words (`dial tcp 127.0.0.1:80: connect: connection refused`).
fn dial_error(host: &str, port: u16, e: &std::io::Error) -> String {
    let what = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect: connection refused".to_owned(),
        std::io::ErrorKind::TimedOut => "i/o timeout".to_owned(),
        _ => e.to_string(),
    };
    format!("dial tcp {host}:{port}: {what}")
}

/// The HTTP GET of a probe or a lifecycle hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpGetAction {
    /// Host (default: the pod's address).
    pub host: Option<String>,
    /// Port.
    pub port: u16,
    /// Path.
    pub path: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
}

impl HttpGetAction {
    /// One GET bounded by `timeout`: the response status, or what went wrong.
    ///
    /// Redirects to the same host are followed (at most 10), as the kubelet's prober follows
    /// them; a redirect elsewhere is not, and its 3xx status counts (a success).
    pub async fn status(&self, default_host: &str, timeout: Duration) -> Result<u16, String> {
        let host = self.host.as_deref().unwrap_or(default_host);
        let follow = async {
            let (mut port, mut path) = (self.port, self.path.clone());
            for _ in 0..=MAX_REDIRECTS {
                let (code, location) = http_get(host, port, &path, &self.headers).await?;
                let next = location
                    .filter(|_| (300..400).contains(&code))
                    .and_then(|l| same_host_redirect(host, port, &l));
                match next {
                    Some((p, target)) => (port, path) = (p, target),
                    None => return Ok(code),
                }
            }
            Err(format!("stopped after {MAX_REDIRECTS} redirects"))
        };
        tokio::time::timeout(timeout, follow)
            .await
            .unwrap_or_else(|_| Err("timed out".into()))
    }
}

/// Redirects a probe follows, as Go's HTTP client (and so the kubelet) does.
const MAX_REDIRECTS: usize = 10;

/// Where a redirect `location` from `host:port` leads when it stays on `host` (plain HTTP):
/// the port and the path with its query. `None` for another host or scheme.
fn same_host_redirect(host: &str, port: u16, location: &str) -> Option<(u16, String)> {
    if location.starts_with('/') && !location.starts_with("//") {
        return Some((port, location.to_owned()));
    }
    let uri: http::Uri = location.parse().ok()?;
    if uri.scheme_str() != Some("http") || uri.host()? != host.trim_matches(['[', ']']) {
        return None;
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Some((uri.port_u16().unwrap_or(80), path))
}

/// One HTTP GET; the response status and its Location header, or what went wrong.
async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<(u16, Option<String>), String> {
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| dial_error(host, port, &e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::get(path)
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::USER_AGENT, "fleetlet-probe/1");
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    sender
        .send_request(req)
        .await
        .map(|resp| {
            let location = resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (resp.status().as_u16(), location)
        })
        .map_err(|e| e.to_string())
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
mod redirect_tests {
    use super::same_host_redirect;

    #[test]
    fn only_redirects_to_the_same_host_are_followed() {
        assert_eq!(
            same_host_redirect("10.88.0.5", 8080, "/healthz?x=1"),
            Some((8080, "/healthz?x=1".into()))
        );
        assert_eq!(
            same_host_redirect("10.88.0.5", 8080, "http://10.88.0.5:9090/a"),
            Some((9090, "/a".into()))
        );
        assert_eq!(
            same_host_redirect("10.88.0.5", 8080, "http://10.88.0.5"),
            Some((80, "/".into()))
        );
        assert_eq!(
            same_host_redirect("10.88.0.5", 8080, "http://example.com/"),
            None
        );
        assert_eq!(
            same_host_redirect("10.88.0.5", 8080, "https://10.88.0.5/"),
            None
        );
        assert_eq!(
            same_host_redirect("10.88.0.5", 8080, "//example.com/x"),
            None
        );
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
            for _ in 0..4 {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
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
            host: None,
            port,
            path: "/ok".into(),
            headers: vec![],
        });
        assert!(run_probe(&rt, "", "127.0.0.1", &p).await);
        p.action = ProbeAction::HttpGet(HttpGetAction {
            host: None,
            port,
            path: "/bad".into(),
            headers: vec![],
        });
        assert!(!run_probe(&rt, "", "127.0.0.1", &p).await);
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
