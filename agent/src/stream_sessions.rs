//! exec, attach and port-forward sessions the hub opens on the device (`kubectl exec`,
//! `attach`, `port-forward`): exec and attach through the container runtime's attached
//! sessions, port-forward by connecting to the port inside the pod's network namespace, as CRI
//! runtimes do (a thread enters the namespace of one of the pod's processes, connects to
//! localhost, and leaves; the socket stays in the pod's namespace).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetlet_proto::v1;
use futures::StreamExt;

use crate::link::{StreamControl, StreamIo};
use crate::podman::stream::{AttachSpec, ExecSpec, OutputChannel};
use crate::podman::{ContainerRuntime, labels};

/// How long connecting to a forwarded port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exec's exit code may take to show after its output ended.
const EXIT_CODE_WAIT: Duration = Duration::from_secs(10);

/// Opens the session `open` asks for on `device`.
pub async fn open_stream<R: ContainerRuntime>(
    rt: &Arc<R>,
    device: &str,
    open: v1::StreamOpen,
) -> Result<StreamIo, String> {
    match v1::StreamKind::try_from(open.kind) {
        Ok(v1::StreamKind::Exec) => exec(rt, device, open).await,
        Ok(v1::StreamKind::Attach) => attach(rt, device, open).await,
        Ok(v1::StreamKind::PortForward) => port_forward(rt, device, open).await,
        _ => Err(format!("unknown stream kind {}", open.kind)),
    }
}

/// The id of container `name` of pod `uid`, which must be running.
async fn running_container<R: ContainerRuntime>(
    rt: &R,
    device: &str,
    uid: &str,
    name: &str,
) -> Result<String, String> {
    let filter = [
        format!("{}={device}", labels::DEVICE),
        format!("{}={uid}", labels::POD_UID),
        format!("{}={name}", labels::CONTAINER),
    ];
    let found = rt
        .list_containers(&filter)
        .await
        .map_err(|e| e.to_string())?;
    let Some(c) = found.first() else {
        return Err(format!(
            "container {name:?} of pod {uid} not found on this device"
        ));
    };
    let inspect = rt
        .inspect_container(&c.id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("container {name:?} of pod {uid} not found on this device"))?;
    if !inspect.state.running {
        return Err(format!(
            "container {name:?} of pod {uid} is not running (state {})",
            inspect.state.status
        ));
    }
    Ok(c.id.clone())
}

fn output_of(output: crate::podman::stream::OutputStream) -> crate::link::StreamOutput {
    output
        .map(|r| {
            r.map(|(channel, data)| {
                let channel = match channel {
                    OutputChannel::Stdout => v1::StreamChannel::Stdout,
                    OutputChannel::Stderr => v1::StreamChannel::Stderr,
                };
                (channel, data)
            })
            .map_err(|e| e.to_string())
        })
        .boxed()
}

struct ExecControl<R> {
    rt: Arc<R>,
    exec_id: String,
}

#[tonic::async_trait]
impl<R: ContainerRuntime> StreamControl for ExecControl<R> {
    async fn resize(&self, width: u32, height: u32) -> Result<(), String> {
        // The first size can arrive while the session is still starting: retry briefly.
        let mut last = String::new();
        for _ in 0..10 {
            match self.rt.exec_resize(&self.exec_id, width, height).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last)
    }

    async fn finish(&self) -> Result<Option<i32>, String> {
        let deadline = tokio::time::Instant::now() + EXIT_CODE_WAIT;
        loop {
            match self.rt.exec_exit_code(&self.exec_id).await {
                Ok(Some(code)) => return Ok(Some(code)),
                Ok(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(None) => {
                    return Err("the command's output ended but it is still running".into());
                }
                Err(e) => return Err(format!("reading the command's exit code: {e}")),
            }
        }
    }
}

async fn exec<R: ContainerRuntime>(
    rt: &Arc<R>,
    device: &str,
    open: v1::StreamOpen,
) -> Result<StreamIo, String> {
    if open.command.is_empty() {
        return Err("no command to run".into());
    }
    let id = running_container(rt.as_ref(), device, &open.pod_uid, &open.container).await?;
    let spec = ExecSpec {
        cmd: open.command.clone(),
        tty: open.tty,
        attach_stdin: open.stdin,
        attach_stdout: open.stdout,
        attach_stderr: open.stderr && !open.tty,
        width: open.width,
        height: open.height,
    };
    let session = rt
        .exec_session(&id, &spec)
        .await
        .map_err(|e| format!("starting {:?}: {e}", open.command))?;
    tracing::info!(container = %open.container, pod = %open.pod_uid, tty = open.tty, "exec session started");
    Ok(StreamIo {
        output: output_of(session.output),
        input: session.input,
        control: Arc::new(ExecControl {
            rt: Arc::clone(rt),
            exec_id: session.exec_id,
        }),
    })
}

struct AttachControl<R> {
    rt: Arc<R>,
    id: String,
}

#[tonic::async_trait]
impl<R: ContainerRuntime> StreamControl for AttachControl<R> {
    async fn resize(&self, width: u32, height: u32) -> Result<(), String> {
        self.rt
            .container_resize(&self.id, width, height)
            .await
            .map_err(|e| e.to_string())
    }

    async fn finish(&self) -> Result<Option<i32>, String> {
        Ok(None)
    }
}

async fn attach<R: ContainerRuntime>(
    rt: &Arc<R>,
    device: &str,
    open: v1::StreamOpen,
) -> Result<StreamIo, String> {
    let id = running_container(rt.as_ref(), device, &open.pod_uid, &open.container).await?;
    let spec = AttachSpec {
        stdin: open.stdin,
        stdout: open.stdout,
        stderr: open.stderr,
        tty: open.tty,
    };
    let session = rt
        .attach_session(&id, spec)
        .await
        .map_err(|e| format!("attaching to container {:?}: {e}", open.container))?;
    Ok(StreamIo {
        output: output_of(session.output),
        input: session.input,
        control: Arc::new(AttachControl {
            rt: Arc::clone(rt),
            id,
        }),
    })
}

struct NoControl;

#[tonic::async_trait]
impl StreamControl for NoControl {
    async fn resize(&self, _width: u32, _height: u32) -> Result<(), String> {
        Ok(())
    }
    async fn finish(&self) -> Result<Option<i32>, String> {
        Ok(None)
    }
}

async fn port_forward<R: ContainerRuntime>(
    rt: &Arc<R>,
    device: &str,
    open: v1::StreamOpen,
) -> Result<StreamIo, String> {
    let port = u16::try_from(open.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("invalid port {}", open.port))?;
    let pid = pod_pid(rt.as_ref(), device, &open.pod_uid).await?;
    let stream = tokio::task::spawn_blocking(move || connect_in_netns(pid, port))
        .await
        .map_err(|e| e.to_string())??;
    let stream = tokio::net::TcpStream::from_std(stream).map_err(|e| e.to_string())?;
    let (read, write) = stream.into_split();
    let output = tokio_util::io::ReaderStream::with_capacity(read, 32 * 1024)
        .map(|r| {
            r.map(|b: Bytes| (v1::StreamChannel::Stdout, b))
                .map_err(|e| e.to_string())
        })
        .boxed();
    Ok(StreamIo {
        output,
        input: Some(Box::pin(write)),
        control: Arc::new(NoControl),
    })
}

/// A process of pod `uid` (one of its running containers), whose network namespace is the
/// pod's (the host's, with hostNetwork).
async fn pod_pid<R: ContainerRuntime>(rt: &R, device: &str, uid: &str) -> Result<i64, String> {
    let filter = [
        format!("{}={device}", labels::DEVICE),
        format!("{}={uid}", labels::POD_UID),
    ];
    let found = rt
        .list_containers(&filter)
        .await
        .map_err(|e| e.to_string())?;
    for c in &found {
        if let Ok(Some(inspect)) = rt.inspect_container(&c.id).await
            && inspect.state.running
            && inspect.state.pid > 0
        {
            return Ok(inspect.state.pid);
        }
    }
    Err(format!("pod {uid} has no running container on this device"))
}

/// Connects to localhost:`port` in the network namespace of process `pid`, on a thread of its
/// own (a namespace is per thread; this one ends right after).
fn connect_in_netns(pid: i64, port: u16) -> Result<std::net::TcpStream, String> {
    let path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&path).map_err(|e| format!("opening {path}: {e}"))?;
    let handle = std::thread::Builder::new()
        .name("fleetlet-portfwd".into())
        .spawn(move || -> Result<std::net::TcpStream, String> {
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| format!("entering the pod's network namespace: {e}"))?;
            let mut last = String::new();
            for ip in [
                std::net::IpAddr::V4(Ipv4Addr::LOCALHOST),
                std::net::IpAddr::V6(Ipv6Addr::LOCALHOST),
            ] {
                match std::net::TcpStream::connect_timeout(
                    &SocketAddr::new(ip, port),
                    CONNECT_TIMEOUT,
                ) {
                    Ok(s) => {
                        s.set_nonblocking(true).map_err(|e| e.to_string())?;
                        return Ok(s);
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            Err(format!("connecting to localhost:{port} in the pod: {last}"))
        })
        .map_err(|e| e.to_string())?;
    handle
        .join()
        .map_err(|_| "the port-forward thread failed".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::podman::fake::FakeRuntime;
    use crate::podman::{ContainerCreate, PodCreate};
    use tokio::io::AsyncWriteExt;

    async fn running(rt: &FakeRuntime, device: &str, uid: &str, name: &str) {
        rt.create_pod(&PodCreate {
            name: "p".into(),
            ..Default::default()
        })
        .await
        .expect("pod");
        let labels = [
            (labels::DEVICE, device),
            (labels::POD_UID, uid),
            (labels::CONTAINER, name),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let id = rt
            .create_container(&ContainerCreate {
                name: format!("p-{name}"),
                pod: "p".into(),
                labels,
                ..Default::default()
            })
            .await
            .expect("container");
        rt.start_container(&id).await.expect("start");
    }

    fn exec_open(command: &[&str]) -> v1::StreamOpen {
        v1::StreamOpen {
            kind: v1::StreamKind::Exec as i32,
            pod_uid: "uid-1".into(),
            container: "app".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            stdin: true,
            stdout: true,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn exec_relays_stdin_and_output_and_reports_the_exit_code() {
        let rt = Arc::new(FakeRuntime::default());
        running(&rt, "dev", "uid-1", "app").await;
        let mut io = open_stream(&rt, "dev", exec_open(&["exit", "7"]))
            .await
            .expect("exec");
        let mut input = io.input.take().expect("stdin attached");
        input.write_all(b"typed\n").await.expect("stdin");
        input.shutdown().await.expect("eof");
        let mut out = Vec::new();
        while let Some(item) = io.output.next().await {
            let (channel, data) = item.expect("output");
            assert_eq!(channel, v1::StreamChannel::Stdout);
            out.extend_from_slice(&data);
        }
        assert_eq!(out, b"exit 7\ntyped\n");
        assert_eq!(io.control.finish().await, Ok(Some(7)));
    }

    #[tokio::test]
    async fn unknown_or_stopped_containers_are_refused_with_a_message() {
        let rt = Arc::new(FakeRuntime::default());
        let err = open_stream(&rt, "dev", exec_open(&["sh"]))
            .await
            .err()
            .expect("no such container");
        assert!(err.contains("\"app\" of pod uid-1 not found"), "{err}");
        let mut open = exec_open(&[]);
        running(&rt, "dev", "uid-1", "app").await;
        let err = open_stream(&rt, "dev", open.clone())
            .await
            .err()
            .expect("no command");
        assert!(err.contains("no command"), "{err}");
        open.kind = v1::StreamKind::PortForward as i32;
        open.port = 0;
        let err = open_stream(&rt, "dev", open).await.err().expect("port 0");
        assert!(err.contains("invalid port"), "{err}");
    }
}
