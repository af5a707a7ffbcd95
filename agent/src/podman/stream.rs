//! Interactive sessions with containers through Podman (`kubectl exec` and `attach`): the exec
//! or attach call is answered by Podman switching the HTTP connection to a raw byte stream
//! ("hijacking"), on which stdin goes in and the output comes out — with a TTY as is, without
//! one multiplexed in Docker's 8-byte frames (stream number, 3 zero bytes, big-endian length).

use std::path::Path;
use std::pin::Pin;

use bytes::{Buf, Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use super::PodmanError;

/// Which output channel bytes came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputChannel {
    /// stdout (everything, with a TTY).
    Stdout,
    /// stderr.
    Stderr,
}

/// What to run with `exec`, and which streams to attach.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExecSpec {
    /// The command and its arguments.
    pub cmd: Vec<String>,
    /// Allocate a TTY.
    pub tty: bool,
    /// Attach stdin.
    pub attach_stdin: bool,
    /// Attach stdout.
    pub attach_stdout: bool,
    /// Attach stderr.
    pub attach_stderr: bool,
    /// The TTY's initial width (0: Podman's default).
    #[serde(skip)]
    pub width: u32,
    /// The TTY's initial height.
    #[serde(skip)]
    pub height: u32,
}

/// Which streams `attach` connects.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttachSpec {
    /// stdin.
    pub stdin: bool,
    /// stdout.
    pub stdout: bool,
    /// stderr.
    pub stderr: bool,
    /// The container has a TTY (its output is not multiplexed).
    pub tty: bool,
}

/// The container's output, in order, until it ends.
pub type OutputStream = BoxStream<'static, Result<(OutputChannel, Bytes), PodmanError>>;

/// The input side of a session; shut down to close the process's stdin.
pub type InputSink = Pin<Box<dyn AsyncWrite + Send>>;

/// A live exec or attach session.
pub struct Session {
    /// The exec session's id (exec only; empty for attach).
    pub exec_id: String,
    /// Output.
    pub output: OutputStream,
    /// Input, when stdin is attached.
    pub input: Option<InputSink>,
}

/// Largest response head accepted from Podman.
const MAX_HEAD: usize = 16 * 1024;

/// Sends `POST path` with a JSON body on a fresh connection and returns the hijacked stream
/// and whatever Podman sent after its response head.
pub(super) async fn hijack(
    socket: &Path,
    path: &str,
    body: &[u8],
) -> Result<(UnixStream, Bytes), PodmanError> {
    let endpoint = format!("POST {path}");
    let http = |message: String| PodmanError::Http {
        endpoint: endpoint.clone(),
        message,
    };
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|source| PodmanError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    // Origin-form target, for the reason given in client.rs.
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: podman\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| http(e.to_string()))?;
    stream
        .write_all(body)
        .await
        .map_err(|e| http(e.to_string()))?;
    let mut buf = BytesMut::with_capacity(1024);
    let end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > MAX_HEAD {
            return Err(http("response head too large".into()));
        }
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            stream.read_buf(&mut buf),
        )
        .await
        .map_err(|_| PodmanError::Timeout {
            endpoint: endpoint.clone(),
        })?
        .map_err(|e| http(e.to_string()))?;
        if n == 0 {
            return Err(http("connection closed before a response".into()));
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| http(format!("unexpected response {head:?}")))?;
    buf.advance(end + 4);
    if status != 101 && status != 200 {
        // Podman's error body is JSON; read what came with the head, and a little more.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while buf.len() < 4096 {
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if serde_json::from_slice::<serde_json::Value>(trim_chunk(&buf)).is_ok() {
                    break;
                }
            }
        })
        .await;
        let text = String::from_utf8_lossy(trim_chunk(&buf)).into_owned();
        let message = serde_json::from_str::<super::types::ErrorBody>(&text)
            .map(|b| b.message)
            .unwrap_or(text);
        return Err(PodmanError::Api {
            endpoint,
            status,
            message,
        });
    }
    Ok((stream, buf.freeze()))
}

/// A chunked error body's JSON (without its chunk-size lines), or the bytes as they are.
fn trim_chunk(buf: &[u8]) -> &[u8] {
    let start = buf.iter().position(|b| *b == b'{').unwrap_or(0);
    let end = buf
        .iter()
        .rposition(|b| *b == b'}')
        .map_or(buf.len(), |p| p + 1);
    if start < end { &buf[start..end] } else { buf }
}

/// The output of a hijacked stream: raw with a TTY, demultiplexed without.
pub(super) fn output<R>(read: R, buffered: Bytes, tty: bool) -> OutputStream
where
    R: AsyncRead + Send + Unpin + 'static,
{
    let state = (read, BytesMut::from(&buffered[..]), false);
    futures::stream::unfold(state, move |(mut read, mut buf, done)| async move {
        loop {
            if tty {
                if !buf.is_empty() {
                    let data = buf.split().freeze();
                    return Some((Ok((OutputChannel::Stdout, data)), (read, buf, done)));
                }
            } else if let Some((channel, frame)) = take_frame(&mut buf) {
                match channel {
                    Some(channel) => {
                        return Some((Ok((channel, frame)), (read, buf, done)));
                    }
                    None => continue,
                }
            }
            if done {
                return None;
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(32 * 1024);
            }
            match read.read_buf(&mut buf).await {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    let err = PodmanError::Http {
                        endpoint: "attached stream".into(),
                        message: e.to_string(),
                    };
                    return Some((Err(err), (read, buf, true)));
                }
            }
        }
    })
    .boxed()
}

/// One complete multiplexed frame from the front of `buf`: its channel (`None` for stdin
/// echoes and unknown numbers, which are skipped) and payload.
pub fn take_frame(buf: &mut BytesMut) -> Option<(Option<OutputChannel>, Bytes)> {
    if buf.len() < 8 {
        return None;
    }
    let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if buf.len() < 8 + len {
        return None;
    }
    let channel = match buf[0] {
        1 => Some(OutputChannel::Stdout),
        2 => Some(OutputChannel::Stderr),
        _ => None,
    };
    buf.advance(8);
    Some((channel, buf.split_to(len).freeze()))
}

/// Splits a hijacked stream into the session's output and input.
pub(super) fn session(
    exec_id: String,
    stream: UnixStream,
    buffered: Bytes,
    tty: bool,
    stdin: bool,
) -> Session {
    let (read, write) = stream.into_split();
    Session {
        exec_id,
        output: output(read, buffered, tty),
        input: stdin.then(|| Box::pin(write) as InputSink),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiplexed_frames_are_split_by_channel() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 3]);
        buf.extend_from_slice(b"out");
        buf.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 3]);
        buf.extend_from_slice(b"err");
        buf.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 9, b'p']);
        assert_eq!(
            take_frame(&mut buf),
            Some((Some(OutputChannel::Stdout), Bytes::from_static(b"out")))
        );
        assert_eq!(
            take_frame(&mut buf),
            Some((Some(OutputChannel::Stderr), Bytes::from_static(b"err")))
        );
        assert_eq!(take_frame(&mut buf), None, "incomplete");
        assert_eq!(buf.len(), 9);
    }

    #[tokio::test]
    async fn output_demultiplexes_or_passes_through() {
        let (mut w, r) = tokio::io::duplex(64);
        let mut out = output(
            r,
            Bytes::from_static(&[2, 0, 0, 0, 0, 0, 0, 1, b'e']),
            false,
        );
        w.write_all(&[1, 0, 0, 0, 0, 0, 0, 2, b'o', b'k'])
            .await
            .expect("write");
        drop(w);
        let got: Vec<_> = out.by_ref().map(|r| r.expect("ok")).collect().await;
        assert_eq!(
            got,
            [
                (OutputChannel::Stderr, Bytes::from_static(b"e")),
                (OutputChannel::Stdout, Bytes::from_static(b"ok"))
            ]
        );
        let (mut w, r) = tokio::io::duplex(64);
        let mut out = output(r, Bytes::new(), true);
        w.write_all(b"\x01raw").await.expect("write");
        drop(w);
        let (channel, data) = out.next().await.expect("some").expect("ok");
        assert_eq!(
            (channel, &data[..]),
            (OutputChannel::Stdout, &b"\x01raw"[..])
        );
        assert!(out.next().await.is_none());
    }
}
