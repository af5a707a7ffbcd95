//! exec and attach over SPDY (the kubelet's remotecommand protocols v1..v4), relayed to one
//! stream on the device's link.
//!
//! The client opens one SPDY stream per channel, named by its `streamType` header: `error`
//! always, `stdin`/`stdout`/`stderr` as the query asked, and `resize` with a TTY from v3 on.
//! Once all are there, stdin and resizes go to the device, its output comes back on the
//! matching streams, and when the session ends the error stream carries the result: from v4 a
//! JSON `Status` (exit code in `NonZeroExitCode`'s cause), before that a plain message on failure.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetlet_proto::v1::StreamChannel;
use serde_json::json;
use tokio::sync::mpsc;

use super::RemoteCommandQuery;
use super::spdy::{self, SpdyConnection, SpdyWriter};
use crate::link::StreamEvent;
use crate::sessions::DeviceStream;

/// How long the client may take to open its streams (the kubelet's default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest resize message buffered before it is parsed.
const MAX_RESIZE_BUFFER: usize = 4096;

/// The remotecommand protocol version in use, 1..4.
fn version(protocol: &str) -> u8 {
    match protocol {
        "v4.channel.k8s.io" => 4,
        "v3.channel.k8s.io" => 3,
        "v2.channel.k8s.io" => 2,
        _ => 1,
    }
}

/// The streams the client opened.
#[derive(Default)]
struct Channels {
    error: Option<u32>,
    stdin: Option<mpsc::Receiver<Bytes>>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<mpsc::Receiver<Bytes>>,
}

/// Serves one exec or attach session on `conn`, relaying to `stream` on the device's link.
pub(super) async fn serve(
    mut conn: SpdyConnection,
    protocol: &str,
    q: RemoteCommandQuery,
    stream: DeviceStream,
) {
    let version = version(protocol);
    let (input, mut output) = stream;
    let expected = 1
        + usize::from(q.stdin)
        + usize::from(q.stdout)
        + usize::from(q.stderr)
        + usize::from(q.tty && version >= 3);
    let mut ch = Channels::default();
    let deadline = tokio::time::sleep(STREAM_CREATION_TIMEOUT);
    tokio::pin!(deadline);
    let mut received = 0;
    while received < expected {
        let incoming = tokio::select! {
            () = &mut deadline => {
                tracing::debug!("client did not open its streams in time; session closed");
                conn.writer.go_away().await;
                return;
            }
            () = conn.closed.cancelled() => return,
            s = conn.incoming.recv() => match s {
                Some(s) => s,
                None => return,
            },
        };
        let kind = spdy::header(&incoming.headers, "streamtype").unwrap_or("");
        let id = incoming.id;
        let slot_free = match kind {
            "error" => ch.error.replace(id).is_none(),
            "stdin" => ch.stdin.replace(incoming.data).is_none(),
            "stdout" => ch.stdout.replace(id).is_none(),
            "stderr" => ch.stderr.replace(id).is_none(),
            "resize" => ch.resize.replace(incoming.data).is_none(),
            other => {
                tracing::debug!(stream_type = other, "unexpected stream type; reset");
                conn.writer.reset(id, spdy::rst::PROTOCOL_ERROR).await;
                continue;
            }
        };
        conn.writer.reply(id).await;
        if slot_free {
            received += 1;
        }
    }
    let writer = conn.writer.clone();
    let mut pumps = tokio::task::JoinSet::new();
    if let Some(mut stdin) = ch.stdin.take() {
        // v1 closes stdin at once (kept by the kubelet for old clients).
        let input = input.clone();
        pumps.spawn(async move {
            if version > 1 {
                while let Some(data) = stdin.recv().await {
                    if input.send(StreamChannel::Stdin, data).await.is_err() {
                        return;
                    }
                }
            }
            let _ = input.eof(StreamChannel::Stdin);
        });
    }
    if let Some(mut resize) = ch.resize.take() {
        let input = input.clone();
        pumps.spawn(async move {
            let mut buf = BytesMut::new();
            while let Some(data) = resize.recv().await {
                buf.extend_from_slice(&data);
                for (width, height) in drain_sizes(&mut buf) {
                    if input.resize(width, height).is_err() {
                        return;
                    }
                }
                if buf.len() > MAX_RESIZE_BUFFER {
                    tracing::debug!("resize stream sent an oversized message; resizes ignored");
                    return;
                }
            }
        });
    }
    let mut stdout_open = ch.stdout.is_some();
    let mut stderr_open = ch.stderr.is_some();
    let (exit_code, error) = loop {
        let event = tokio::select! {
            () = conn.closed.cancelled() => {
                // The user went away: dropping the stream closes the session on the device.
                tracing::info!(stream = input.id(), "client closed the connection; device session closed");
                pumps.abort_all();
                return;
            }
            e = output.next() => e,
        };
        match event {
            Some(StreamEvent::Data { channel, data }) => {
                let target = match channel {
                    StreamChannel::Stderr if stderr_open => ch.stderr,
                    StreamChannel::Stdout if stdout_open => ch.stdout,
                    _ => None,
                };
                if let Some(id) = target
                    && !writer.data(id, data, false).await
                {
                    pumps.abort_all();
                    return;
                }
            }
            Some(StreamEvent::Eof { channel }) => {
                let (open, id) = match channel {
                    StreamChannel::Stderr => (&mut stderr_open, ch.stderr),
                    _ => (&mut stdout_open, ch.stdout),
                };
                if *open && let Some(id) = id {
                    writer.data(id, Bytes::new(), true).await;
                }
                *open = false;
            }
            Some(StreamEvent::End { exit_code, error }) => break (exit_code, error),
            None => {
                break (
                    None,
                    Some("the device stream ended unexpectedly".to_string()),
                );
            }
        }
    };
    pumps.abort_all();
    tracing::info!(
        stream = input.id(),
        ?exit_code,
        error = error.as_deref().unwrap_or(""),
        "streaming session ended"
    );
    for (open, id) in [(stdout_open, ch.stdout), (stderr_open, ch.stderr)] {
        if open && let Some(id) = id {
            writer.data(id, Bytes::new(), true).await;
        }
    }
    if let Some(id) = ch.error {
        let status = status_message(version, exit_code, error.as_deref());
        writer.data(id, status, true).await;
    }
    close(&writer).await;
}

async fn close(writer: &SpdyWriter) {
    writer.go_away().await;
}

/// What the error stream carries at the end of a session.
pub(super) fn status_message(version: u8, exit_code: Option<i32>, error: Option<&str>) -> Bytes {
    let failure = match (exit_code, error) {
        (_, Some(error)) => Some((
            None,
            format!("error executing command in container: {error}"),
        )),
        (Some(code), None) if code != 0 => Some((
            Some(code),
            format!("command terminated with non-zero exit code: exit status {code}"),
        )),
        _ => None,
    };
    if version < 4 {
        return match failure {
            None => Bytes::new(),
            Some((_, message)) => Bytes::from(message),
        };
    }
    let status = match failure {
        None => json!({"metadata": {}, "status": "Success"}),
        Some((Some(code), message)) => json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Some((None, message)) => json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
            "details": {"causes": [{"message": message}]},
            "code": 500,
        }),
    };
    Bytes::from(status.to_string())
}

/// The terminal sizes complete in `buf` (a stream of JSON objects `{"Width":..,"Height":..}`),
/// removed from it; a malformed object is skipped.
pub(super) fn drain_sizes(buf: &mut BytesMut) -> Vec<(u32, u32)> {
    #[derive(serde::Deserialize)]
    struct Size {
        #[serde(rename = "Width", default)]
        width: u32,
        #[serde(rename = "Height", default)]
        height: u32,
    }
    let mut sizes = Vec::new();
    let mut consumed = 0;
    {
        let mut de = serde_json::Deserializer::from_slice(buf).into_iter::<serde_json::Value>();
        loop {
            match de.next() {
                Some(Ok(value)) => {
                    consumed = de.byte_offset();
                    if let Ok(size) = serde_json::from_value::<Size>(value) {
                        sizes.push((size.width, size.height));
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(_)) => {
                    // Not JSON: drop what was buffered.
                    consumed = buf.len();
                    break;
                }
                None => break,
            }
        }
    }
    let _ = buf.split_to(consumed);
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_statuses_carry_the_exit_code() {
        let ok: serde_json::Value =
            serde_json::from_slice(&status_message(4, Some(0), None)).expect("json");
        assert_eq!(ok["status"], "Success");
        let failed: serde_json::Value =
            serde_json::from_slice(&status_message(4, Some(3), None)).expect("json");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        let broken: serde_json::Value =
            serde_json::from_slice(&status_message(4, None, Some("link dropped"))).expect("json");
        assert_eq!(broken["reason"], "InternalError");
        assert!(
            broken["message"]
                .as_str()
                .unwrap_or("")
                .contains("link dropped")
        );
        assert!(status_message(3, Some(0), None).is_empty());
        assert_eq!(
            status_message(2, Some(1), None),
            "command terminated with non-zero exit code: exit status 1"
        );
    }

    #[test]
    fn resize_messages_are_parsed_across_frames() {
        let mut buf = BytesMut::from(&b"{\"Width\":80,\"Height\":24}{\"Wid"[..]);
        assert_eq!(drain_sizes(&mut buf), [(80, 24)]);
        buf.extend_from_slice(b"th\":100,\"Height\":40}");
        assert_eq!(drain_sizes(&mut buf), [(100, 40)]);
        assert!(buf.is_empty());
        let mut junk = BytesMut::from(&b"]]]"[..]);
        assert!(drain_sizes(&mut junk).is_empty());
        assert!(junk.is_empty());
    }
}
