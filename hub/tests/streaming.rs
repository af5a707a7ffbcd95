//! `kubectl exec`, `attach` and `port-forward` end to end: the real kubectl through the real
//! kube-apiserver (which speaks SPDY to the hub's kubelet endpoint) to the real `fleetlet-hub`,
//! over the device link to a real `fleetlet-agent` and the stack's Podman.
//!
//! Needs `make env-up` and the agent binary next to the hub's (`cargo build -p fleetlet-agent`).

use std::io::{BufRead, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

mod common;
use common::{
    HubSetup, HubSpec, KubeCleanup, Proc, client, create_namespace, kube_config_path, kubectl,
    kubectl_spawn, node_ready, remove_device_containers, start_agent, unique, wait_for,
};

/// Streams one device may have open in these tests.
const STREAM_LIMIT: usize = 3;

struct Setup {
    dev: String,
    kubelet_port: u16,
    ns: String,
    client: kube::Client,
    agent: Option<Proc>,
    _hub: Proc,
    _cleanup: KubeCleanup,
    _dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.agent.take();
        remove_device_containers(&self.dev);
    }
}

impl Setup {
    async fn start(prefix: &str) -> Self {
        let id = unique(prefix);
        let dev = format!("{id}-d");
        let cleanup = KubeCleanup {
            nodes: vec![dev.clone()],
            namespace: Some(id.clone()),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let setup = HubSetup::write(
            dir.path(),
            HubSpec::new(&id, &[(dev.clone(), format!("{id}-f"))]),
        );
        // The stream limit, in the [kubelet] table the harness wrote.
        let config = dir.path().join("hub.toml");
        let text = std::fs::read_to_string(&config).expect("hub config");
        std::fs::write(
            &config,
            text.replacen(
                "[kubelet]\n",
                &format!("[kubelet]\nmax_streams_per_device = {STREAM_LIMIT}\n"),
                1,
            ),
        )
        .expect("hub config");
        let (hub, ports) = (setup.spawn(), setup.ports);
        let agent = start_agent(dir.path(), &dev, ports.link);
        let client = client().await;
        let nodes: Api<Node> = Api::all(client.clone());
        wait_for("node Ready from its real agent", 90, || async {
            node_ready(&nodes.get(&dev).await.ok()?).then_some(())
        })
        .await;
        create_namespace(&client, &id).await;
        Self {
            dev,
            kubelet_port: ports.kubelet,
            ns: id,
            client,
            agent: Some(agent),
            _hub: hub,
            _cleanup: cleanup,
            _dir: dir,
        }
    }

    async fn run_pod(&self, name: &str, mut spec: Value) {
        spec["nodeName"] = json!(self.dev);
        spec["tolerations"] = json!([{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"}]);
        let pod: Pod =
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("pod");
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
        wait_for("pod Running on the device", 120, || async {
            let p = pods.get(name).await.ok()?;
            (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(())
        })
        .await;
    }
}

fn image() -> String {
    std::env::var("FLEETLET_TEST_IMAGE")
        .unwrap_or_else(|_| "localhost/fleetlet-test/busybox:1".into())
}

fn kubectl_path() -> String {
    std::env::var("FLEETLET_KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// Runs kubectl with `input` on its stdin: (exit code, stdout, stderr).
fn kubectl_with_input(args: &[&str], input: &[u8]) -> (Option<i32>, String, String) {
    let mut child = Command::new(kubectl_path())
        .arg("--kubeconfig")
        .arg(kube_config_path())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).expect("write stdin");
    drop(stdin);
    wait_output(child, Duration::from_secs(60))
}

/// Waits for `child` with a bound (killed past it): (exit code, stdout, stderr).
fn wait_output(mut child: std::process::Child, bound: Duration) -> (Option<i32>, String, String) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut out = String::new();
            let mut err = String::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return (status.code(), out, err);
        }
        if started.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kubectl did not finish within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lines of a child's stdout (or stderr), read on a thread so the test can wait with a bound.
fn lines(out: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn web_pod() -> Value {
    json!({"containers": [
        {"name": "app", "image": image(),
         "command": ["sh", "-c", "mkdir -p /www && echo hello-from-the-pod > /www/index.html && exec httpd -f -p 8080 -h /www"]},
        {"name": "ticker", "image": image(),
         "command": ["sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 1; done"]},
    ]})
}

/// exec (exit code, both streams, stdin, a TTY and its size), attach, port-forward, the stream
/// limit, and a link that drops mid-exec.
#[tokio::test]
async fn kubectl_exec_attach_and_port_forward_through_the_hub() {
    let mut s = Setup::start("stream").await;
    s.run_pod("web", web_pod()).await;
    let ns = s.ns.clone();

    // Both streams and the exit code.
    let started = Instant::now();
    let (code, out, err) = kubectl_with_input(
        &[
            "-n",
            &ns,
            "exec",
            "web",
            "-c",
            "app",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
        b"",
    );
    println!(
        "kubectl exec: exit {code:?} in {:?}, stdout {out:?}, stderr {err:?}",
        started.elapsed()
    );
    assert_eq!(code, Some(3), "exit code propagated: {out} {err}");
    assert_eq!(out, "out\n");
    assert!(err.starts_with("err\n"), "stderr: {err:?}");
    let (code, out, _) =
        kubectl_with_input(&["-n", &ns, "exec", "web", "-c", "app", "--", "true"], b"");
    assert_eq!((code, out.as_str()), (Some(0), ""));

    // stdin, piped, with its end reaching the command; a few hundred KiB to cross the windows.
    let big: Vec<u8> = (0..400_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (code, out, err) = kubectl_with_input(
        &[
            "-n",
            &ns,
            "exec",
            "-i",
            "web",
            "-c",
            "app",
            "--",
            "sh",
            "-c",
            "wc -c; echo done",
        ],
        &big,
    );
    println!("kubectl exec -i: exit {code:?}, stdout {out:?}");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["400000", "done"]
    );
    let (code, out, _) = kubectl_with_input(
        &["-n", &ns, "exec", "-i", "web", "-c", "app", "--", "cat"],
        b"piped line\n",
    );
    assert_eq!((code, out.as_str()), (Some(0), "piped line\n"));

    // A TTY: `script` gives kubectl a terminal of a known size; the command sees it.
    let command = format!(
        "stty rows 33 cols 111; {} --kubeconfig {} -n {ns} exec -it web -c app -- sh -c 'stty size; tty; exit 4'",
        kubectl_path(),
        kube_config_path().display()
    );
    let child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script");
    let (code, out, err) = wait_output(child, Duration::from_secs(60));
    println!("kubectl exec -it: exit {code:?}, output {out:?}");
    assert!(
        out.contains("33 111"),
        "the TTY has the client's size: {out:?} {err}"
    );
    assert!(out.contains("/dev/pts/"), "a TTY: {out:?}");
    assert_eq!(code, Some(4), "{out} {err}");

    // attach: the running container's output arrives.
    let mut attach = kubectl_spawn(&["-n", &ns, "attach", "web", "-c", "ticker"]);
    let rx = lines(attach.stdout.take().expect("stdout"));
    let mut ticks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ticks.len() < 2 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(1))
            && line.starts_with("tick-")
        {
            ticks.push(line);
        }
    }
    let _ = attach.kill();
    let _ = attach.wait();
    println!("kubectl attach: {ticks:?}");
    assert_eq!(ticks.len(), 2, "attach relays the container's output");

    // port-forward to the pod's HTTP server; two connections through one forward.
    let mut forward = kubectl_spawn(&["-n", &ns, "port-forward", "pod/web", ":8080"]);
    let rx = lines(forward.stdout.take().expect("stdout"));
    let port: u16 = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "port-forward did not start");
            if let Ok(line) = rx.recv_timeout(Duration::from_secs(1))
                && let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:")
            {
                break rest
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("port");
            }
        }
    };
    for round in 0..2 {
        let started = Instant::now();
        let body = http_get(port);
        println!(
            "port-forward GET {round}: {:?} in {:?}",
            body.lines().last(),
            started.elapsed()
        );
        assert!(body.starts_with("HTTP/1."), "{body}");
        assert!(body.contains("hello-from-the-pod"), "{body}");
    }
    let _ = forward.kill();
    let _ = forward.wait();

    // A port nothing listens on: the connection fails and kubectl says why.
    let mut closed = kubectl_spawn(&["-n", &ns, "port-forward", "pod/web", ":9"]);
    let rx = lines(closed.stdout.take().expect("stdout"));
    let errors = lines(closed.stderr.take().expect("stderr"));
    let port: u16 = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "port-forward did not start");
            if let Ok(line) = rx.recv_timeout(Duration::from_secs(1))
                && let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:")
            {
                break rest
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("port");
            }
        }
    };
    let _ = http_get(port);
    let said = (0..30)
        .filter_map(|_| errors.recv_timeout(Duration::from_secs(1)).ok())
        .find(|l| l.contains("error forwarding port 9"));
    let _ = closed.kill();
    let _ = closed.wait();
    println!("port-forward to a closed port: {said:?}");
    let said = said.expect("kubectl reports the failed connection");
    assert!(
        said.contains("connecting to localhost:9 in the pod"),
        "{said}"
    );

    // The stream limit: STREAM_LIMIT sessions open, one more is refused with a clear message.
    let holders: Vec<_> = (0..STREAM_LIMIT)
        .map(|_| {
            let mut h = kubectl_spawn(&[
                "-n",
                &ns,
                "exec",
                "web",
                "-c",
                "app",
                "--",
                "sh",
                "-c",
                "echo held; sleep 60",
            ]);
            let rx = lines(h.stdout.take().expect("stdout"));
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(30)).as_deref(),
                Ok("held"),
                "a session within the limit opens"
            );
            h
        })
        .collect();
    let refused = wait_for("an exec over the limit is refused", 60, || async {
        let (ok, _, err) = kubectl(&["-n", &ns, "exec", "web", "-c", "app", "--", "true"]);
        println!(
            "exec while {STREAM_LIMIT} sessions are open: ok={ok} {}",
            err.trim()
        );
        (!ok && err.contains("at most")).then_some(err)
    })
    .await;
    println!("over the limit: {}", refused.trim());
    assert!(refused.contains("max_streams_per_device"), "{refused}");
    for mut h in holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    // Closed by the users, the sessions are released.
    wait_for("sessions released after the users left", 60, || async {
        let (ok, _, _) = kubectl(&["-n", &ns, "exec", "web", "-c", "app", "--", "true"]);
        ok.then_some(())
    })
    .await;

    // A client calling the kubelet endpoint directly over a websocket (v5.channel.k8s.io).
    let messages = direct_websocket(
        s.kubelet_port,
        &format!(
            "/exec/{ns}/web/app?command=sh&command=-c&command=cat%3B%20echo%20err%20%3E%262%3B%20exit%202&input=1&output=1&error=1"
        ),
        "v5.channel.k8s.io",
        &[b"\x00over a websocket\n".to_vec(), vec![255, 0]],
    )
    .await;
    let channel = |c: u8| -> Vec<u8> {
        messages
            .iter()
            .filter(|m| m.first() == Some(&c))
            .flat_map(|m| m[1..].to_vec())
            .collect()
    };
    println!(
        "websocket exec: stdout {:?}, stderr {:?}, status {}",
        String::from_utf8_lossy(&channel(1)),
        String::from_utf8_lossy(&channel(2)),
        String::from_utf8_lossy(&channel(3))
    );
    assert_eq!(channel(1), b"over a websocket\n");
    assert_eq!(channel(2), b"err\n");
    let status: Value = serde_json::from_slice(&channel(3)).expect("status");
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "2");

    // port-forward over a websocket (v4.channel.k8s.io): channel 0 data, 1 errors, each
    // starting with the port.
    let messages = direct_websocket(
        s.kubelet_port,
        &format!("/portForward/{ns}/web?port=8080"),
        "v4.channel.k8s.io",
        &[b"\x00GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n".to_vec()],
    )
    .await;
    assert!(messages.contains(&vec![0, 0x90, 0x1f]), "{messages:?}");
    assert!(messages.contains(&vec![1, 0x90, 0x1f]), "{messages:?}");
    let data: Vec<u8> = messages
        .iter()
        .filter(|m| m.first() == Some(&0))
        .flat_map(|m| m[1..].to_vec())
        .collect();
    let data = String::from_utf8_lossy(&data);
    println!("websocket port-forward: {:?}", data.lines().last());
    assert!(data.contains("hello-from-the-pod"), "{data}");

    // The device's link drops mid-exec: the session ends with a message saying so.
    let mut long = kubectl_spawn(&[
        "-n",
        &ns,
        "exec",
        "web",
        "-c",
        "app",
        "--",
        "sh",
        "-c",
        "echo started; sleep 120",
    ]);
    let rx = lines(long.stdout.take().expect("stdout"));
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("exec started");
    assert_eq!(line, "started");
    let cut = Instant::now();
    s.agent.take();
    let (code, _, err) = wait_output(long, Duration::from_secs(60));
    println!(
        "link cut mid-exec: exit {code:?} after {:?}: {}",
        cut.elapsed(),
        err.trim()
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("link between device"), "{err}");
}

/// `GET /` on 127.0.0.1:`port`, the whole response.
fn http_get(port: u16) -> String {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    conn.write_all(b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    let _ = conn.read_to_string(&mut response);
    response
}

/// A websocket straight to the hub's kubelet endpoint, authenticated with the API server's
/// kubelet client certificate, speaking `protocol`: sends the `send` messages, returns every
/// binary message until the server closes.
async fn direct_websocket(port: u16, path: &str, protocol: &str, send: &[Vec<u8>]) -> Vec<Vec<u8>> {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = common::dev_dir().join("pki");
    let mut roots = rustls::RootCertStore::empty();
    for c in fleetlet_proto::pem::load_certs(&pki.join("ca.crt")).expect("ca") {
        roots.add(c).expect("root");
    }
    let certs =
        fleetlet_proto::pem::load_certs(&pki.join("apiserver-kubelet-client.crt")).expect("cert");
    let key =
        fleetlet_proto::pem::load_key(&pki.join("apiserver-kubelet-client.key")).expect("key");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .expect("client cert");
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name =
        rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("tls");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.expect("request");
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut chunk))
            .await
            .expect("response")
            .expect("read");
        assert!(
            n > 0,
            "closed before the response: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("sec-websocket-protocol: {protocol}")),
        "{head}"
    );
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    let mut rest = buf[head_end + 4..].to_vec();
    let masked = |payload: &[u8]| {
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![0x82, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    };
    for message in send {
        assert!(message.len() < 126, "short messages only");
        tls.write_all(&masked(message)).await.expect("send");
    }
    let mut messages = Vec::new();
    for _ in 0..200 {
        while rest.len() >= 2 {
            let (len, at) = match rest[1] & 0x7f {
                126 if rest.len() >= 4 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
                126 | 127 => break,
                n => (usize::from(n), 2),
            };
            if rest.len() < at + len {
                break;
            }
            let opcode = rest[0] & 0x0f;
            let payload = rest[at..at + len].to_vec();
            rest.drain(..at + len);
            match opcode {
                2 => messages.push(payload),
                8 => return messages,
                _ => {}
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut chunk))
            .await
            .expect("frames")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&chunk[..n]);
    }
    messages
}
