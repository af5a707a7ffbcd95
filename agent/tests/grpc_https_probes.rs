//! gRPC probes and HTTPS probes and lifecycle handlers, against the real Podman of the local
//! stack and the upstream test servers the node conformance tests use: agnhost's
//! `grpc-health-checking` (a grpc.health.v1 server whose answer can be switched to NOT_SERVING
//! over HTTP) and `netexec` (an HTTP or HTTPS server logging every request), from the e2e
//! agnhost image `tests/conformance/images.sh` provides (with the upstream image's self-signed
//! `/localhost.crt`). The pod uses hostNetwork and loopback ports of its own.

// Test helpers: a failed step should fail the test loudly.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fleetlet_agent::pod::grpc_probe;
use fleetlet_agent::podman::LogOptions;
use futures::StreamExt;
use serde_json::json;
use support::{Agent, IMAGE, bundle, container_ids, free_port, pod, podman, podman_socket};

/// The e2e agnhost image, provided (idempotently: unchanged content is not imported again) by
/// the conformance suite's scripts, built from the module cache like the suite's own run.
fn agnhost_image() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let conformance = root.join("tests/conformance");
    let built = Command::new(conformance.join("build.sh"))
        .current_dir(root)
        .output()
        .expect("run tests/conformance/build.sh");
    assert!(
        built.status.success(),
        "build.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let bin = String::from_utf8_lossy(&built.stdout).trim().to_owned();
    let images = Command::new(conformance.join("images.sh"))
        .arg(&bin)
        .current_dir(root)
        .env("FLEETLET_PODMAN_SOCKET", podman_socket())
        .output()
        .expect("run tests/conformance/images.sh");
    assert!(
        images.status.success(),
        "images.sh: {}",
        String::from_utf8_lossy(&images.stderr)
    );
    let repo_list = std::fs::read_to_string(conformance.join("repo-list.yaml")).unwrap();
    let registry = repo_list
        .lines()
        .find_map(|l| l.strip_prefix("promoterE2eRegistry:"))
        .expect("promoterE2eRegistry in repo-list.yaml")
        .trim();
    format!("{registry}/agnhost:2.63.0")
}

/// A container's log so far.
async fn logs(id: &str) -> String {
    let mut stream = podman().logs(id, &LogOptions::default()).await.unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits (bounded) until the log of container `name` of the pod contains `needle`.
async fn wait_log(device: &str, uid: &str, name: &str, needle: &str) {
    let mut last = String::new();
    for _ in 0..60 {
        if let Some(id) = container_ids(device, uid).await.get(name) {
            last = logs(id).await;
            if last.contains(needle) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{name}'s log never showed {needle:?}; it is:\n{last}");
}

/// A plain HTTP GET to the test server's control endpoint on loopback.
async fn plain_get(port: u16, path: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    assert!(
        reply.starts_with("HTTP/1.") && reply.contains(" 200 "),
        "{path}: {reply}"
    );
}

fn container<'a>(
    status: &'a serde_json::Value,
    list: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    status[list].as_array()?.iter().find(|c| c["name"] == name)
}

#[tokio::test]
async fn grpc_probes_and_https_probes_and_hooks_against_agnhost() {
    let agnhost = agnhost_image();
    let device = "t-grpc-https";
    let uid = "uid-grpc-https";
    let mut a = Agent::new(device);
    let [tls, plain, grpc, grpc_http, svc, svc_http] = std::array::from_fn(|_| free_port());
    let sleeper = "trap 'exit 0' TERM; while true; do sleep 1; done";
    let https_get =
        |path: &str, port: u16| json!({"httpGet": {"scheme": "HTTPS", "port": port, "path": path}});
    a.set_desired(
        1,
        vec![bundle(uid, "grpc-https", json!({
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 2,
            "initContainers": [
                // An HTTPS server with the self-signed certificate of the upstream image, a
                // sidecar probed in HTTPS.
                {"name": "tls", "image": agnhost, "restartPolicy": "Always",
                 "args": ["netexec", "--http-port", tls.to_string(), "--udp-port", "-1",
                          "--tls-cert-file", "/localhost.crt", "--tls-private-key-file", "/localhost.key"],
                 "startupProbe": {"httpGet": {"scheme": "HTTPS", "port": tls, "path": "/echo?msg=startup"},
                                  "periodSeconds": 1, "failureThreshold": 60},
                 "readinessProbe": {"httpGet": {"scheme": "HTTPS", "port": tls, "path": "/echo?msg=ready"},
                                    "periodSeconds": 1}},
                // A plain HTTP server, the target of an HTTPS hook that falls back to HTTP.
                {"name": "plain", "image": agnhost, "restartPolicy": "Always",
                 "args": ["netexec", "--http-port", plain.to_string(), "--udp-port", "-1"],
                 "startupProbe": {"httpGet": {"port": plain, "path": "/echo?msg=startup"},
                                  "periodSeconds": 1, "failureThreshold": 60}}
            ],
            "containers": [
                // Live while its health service answers SERVING; its hooks call the HTTPS server.
                {"name": "grpc", "image": agnhost,
                 "args": ["grpc-health-checking", "--port", grpc.to_string(), "--http-port", grpc_http.to_string()],
                 "livenessProbe": {"grpc": {"port": grpc}, "periodSeconds": 1, "failureThreshold": 1,
                                   "timeoutSeconds": 2, "initialDelaySeconds": 1},
                 "lifecycle": {"postStart": https_get("/echo?msg=poststart-https", tls),
                               "preStop": https_get("/echo?msg=prestop-https", tls)}},
                // Ready while its health service answers SERVING for the service "svc".
                {"name": "svc", "image": agnhost,
                 "args": ["grpc-health-checking", "--port", svc.to_string(), "--http-port", svc_http.to_string(),
                          "--service", "svc"],
                 "readinessProbe": {"grpc": {"port": svc, "service": "svc"}, "periodSeconds": 1}},
                // An HTTPS postStart hook against the plain HTTP server: retried in HTTP.
                {"name": "fallback", "image": IMAGE, "command": ["sh", "-c", sleeper],
                 "lifecycle": {"postStart": https_get("/echo?msg=fallback", plain)}}
            ]
        }))],
    );
    a.start();
    let s = a
        .wait_status("all containers ready", Duration::from_secs(120), |s| {
            pod(s, uid).is_some_and(|p| {
                ["grpc", "svc", "fallback"].iter().all(|n| {
                    container(&p.status, "containerStatuses", n).is_some_and(|c| c["ready"] == true)
                }) && container(&p.status, "initContainerStatuses", "tls")
                    .is_some_and(|c| c["ready"] == true && c["started"] == true)
            })
        })
        .await;
    let p = pod(&s, uid).unwrap();
    assert_eq!(p.restarts["grpc"], 0, "{:?}", p.status);
    assert_eq!(
        p.restarts["fallback"], 0,
        "the HTTPS hook against an HTTP server succeeded in HTTP"
    );

    // The HTTPS probes and the postStart hook reached the HTTPS server (which verified nothing
    // about the client; the agent accepted its self-signed certificate for "localhost" at
    // 127.0.0.1).
    wait_log(device, uid, "tls", "GET /echo?msg=startup").await;
    wait_log(device, uid, "tls", "GET /echo?msg=ready").await;
    wait_log(device, uid, "tls", "GET /echo?msg=poststart-https").await;
    // The fallback: the HTTP server got the retried request; the Warning is in the agent's log.
    wait_log(device, uid, "plain", "GET /echo?msg=fallback").await;
    assert!(a.logs().contains("LifecycleHTTPFallback"), "{}", a.logs());

    // The probe's verdicts, in the kubelet's words, against the real server.
    let t = Duration::from_secs(2);
    assert_eq!(grpc_probe::check("127.0.0.1", svc, "svc", t).await, Ok(()));
    assert_eq!(
        grpc_probe::check("127.0.0.1", svc, "other", t).await,
        Err(
            "error: health rpc probe failed: rpc error: code = NotFound desc = unknown service"
                .into()
        )
    );

    // NOT_SERVING: `svc` goes unready (and the probe says why), without a restart.
    plain_get(svc_http, "/make-not-serving").await;
    a.wait_status("svc unready", Duration::from_secs(30), |s| {
        pod(s, uid).is_some_and(|p| {
            container(&p.status, "containerStatuses", "svc").is_some_and(|c| c["ready"] == false)
        })
    })
    .await;
    assert_eq!(
        grpc_probe::check("127.0.0.1", svc, "svc", t).await,
        Err("service unhealthy (responded with \"NOT_SERVING\")".into())
    );

    // NOT_SERVING on the liveness probe's server: `grpc` is restarted (its preStop hook calls
    // the HTTPS server first) and, serving again, stays up.
    plain_get(grpc_http, "/make-not-serving").await;
    let s = a
        .wait_status("grpc restarted", Duration::from_secs(60), |s| {
            pod(s, uid).is_some_and(|p| {
                p.restarts.get("grpc").copied().unwrap_or(0) >= 1
                    && container(&p.status, "containerStatuses", "grpc")
                        .is_some_and(|c| c["ready"] == true)
            })
        })
        .await;
    wait_log(device, uid, "tls", "GET /echo?msg=prestop-https").await;
    let p = pod(&s, uid).unwrap();
    assert_eq!(p.restarts["svc"], 0, "a readiness failure restarts nothing");
    let ids = container_ids(device, uid).await;
    let tls_log = logs(&ids["tls"]).await;
    assert_eq!(
        tls_log.matches("GET /echo?msg=poststart-https").count(),
        2,
        "postStart ran again for the restarted container:\n{tls_log}"
    );
}
