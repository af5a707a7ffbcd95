//! Port-forward over SPDY (`portforward.k8s.io`), each forwarded connection relayed as one
//! stream on the device's link.
//!
//! The client opens two SPDY streams per connection, `streamType: error` and `streamType: data`,
//! both with `port` and the same `requestID` header. Once both are there the hub opens a
//! port-forward stream to the device, which connects to the port in the pod's network namespace;
//! bytes flow on the data stream, and a failure is written to the error stream as text.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use fleetlet_proto::v1::{StreamChannel, StreamKind, StreamOpen};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::spdy::{self, IncomingStream, SpdyConnection, SpdyWriter};
use crate::link::StreamEvent;
use crate::sessions::Sessions;

/// Half-open pairs (one of the two streams seen) one connection may have.
const MAX_PENDING_PAIRS: usize = 64;

#[derive(Default)]
struct Pair {
    port: u16,
    error: Option<u32>,
    data: Option<(u32, mpsc::Receiver<Bytes>)>,
}

/// Why a stream's headers are refused, as the kubelet words it.
fn stream_headers(s: &IncomingStream) -> Result<(String, u16, String), String> {
    let port = spdy::header(&s.headers, "port").ok_or("\"port\" header is required")?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("unable to parse {port:?} as a port"))?;
    if port == 0 {
        return Err(format!("port {port:?} must be > 0"));
    }
    let kind = spdy::header(&s.headers, "streamtype")
        .ok_or("\"streamType\" header is required")?
        .to_string();
    if kind != "error" && kind != "data" {
        return Err(format!("invalid stream type {kind:?}"));
    }
    // Without a requestID the pair is found from the stream ids, as the kubelet does.
    let request = match spdy::header(&s.headers, "requestid") {
        Some(r) if !r.is_empty() => r.to_string(),
        _ if kind == "error" => s.id.to_string(),
        _ => s.id.saturating_sub(2).to_string(),
    };
    Ok((kind, port, request))
}

/// Serves one port-forward connection.
pub(super) async fn serve(
    mut conn: SpdyConnection,
    sessions: Arc<dyn Sessions>,
    device: String,
    pod_uid: String,
) {
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    loop {
        let incoming = tokio::select! {
            () = conn.closed.cancelled() => return,
            s = conn.incoming.recv() => match s {
                Some(s) => s,
                None => return,
            },
        };
        let (kind, port, request) = match stream_headers(&incoming) {
            Ok(h) => h,
            Err(error) => {
                tracing::debug!(%error, "port-forward stream refused");
                conn.writer
                    .reset(incoming.id, spdy::rst::PROTOCOL_ERROR)
                    .await;
                continue;
            }
        };
        if !pairs.contains_key(&request) && pairs.len() >= MAX_PENDING_PAIRS {
            conn.writer
                .reset(incoming.id, spdy::rst::REFUSED_STREAM)
                .await;
            continue;
        }
        conn.writer.reply(incoming.id).await;
        let pair = pairs.entry(request.clone()).or_default();
        pair.port = port;
        let duplicate = match kind.as_str() {
            "error" => pair.error.replace(incoming.id).is_some(),
            _ => pair.data.replace((incoming.id, incoming.data)).is_some(),
        };
        if duplicate {
            tracing::debug!(request, "port-forward stream already assigned");
        }
        if pair.error.is_some() && pair.data.is_some() {
            let Some(Pair {
                port,
                error: Some(error),
                data: Some(data),
            }) = pairs.remove(&request)
            else {
                continue;
            };
            tokio::spawn(forward(
                conn.writer.clone(),
                conn.closed.clone(),
                Arc::clone(&sessions),
                device.clone(),
                pod_uid.clone(),
                port,
                error,
                data,
            ));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    writer: SpdyWriter,
    closed: CancellationToken,
    sessions: Arc<dyn Sessions>,
    device: String,
    pod_uid: String,
    port: u16,
    error_id: u32,
    (data_id, mut data): (u32, mpsc::Receiver<Bytes>),
) {
    let fail = |message: String| {
        let writer = writer.clone();
        let pod_uid = pod_uid.clone();
        async move {
            writer
                .data(
                    error_id,
                    Bytes::from(format!(
                        "error forwarding port {port} to pod {pod_uid}: {message}"
                    )),
                    true,
                )
                .await;
            writer.reset(data_id, spdy::rst::CANCEL).await;
        }
    };
    let open = StreamOpen {
        kind: StreamKind::PortForward as i32,
        pod_uid: pod_uid.clone(),
        port: u32::from(port),
        ..Default::default()
    };
    let (input, mut output) = match sessions.open_stream(&device, open).await {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()).await,
    };
    let pump = {
        let input = input.clone();
        tokio::spawn(async move {
            while let Some(bytes) = data.recv().await {
                if input.send(StreamChannel::Stdin, bytes).await.is_err() {
                    return;
                }
            }
            let _ = input.eof(StreamChannel::Stdin);
        })
    };
    let mut data_open = true;
    loop {
        let event = tokio::select! {
            () = closed.cancelled() => break,
            e = output.next() => e,
        };
        match event {
            Some(StreamEvent::Data { data, .. }) => {
                if data_open && !writer.data(data_id, data, false).await {
                    break;
                }
            }
            Some(StreamEvent::Eof { .. }) => {
                if data_open {
                    writer.data(data_id, Bytes::new(), true).await;
                    data_open = false;
                }
            }
            Some(StreamEvent::End { error: Some(e), .. }) => {
                pump.abort();
                return fail(e).await;
            }
            Some(StreamEvent::End { error: None, .. }) | None => {
                if data_open {
                    writer.data(data_id, Bytes::new(), true).await;
                }
                writer.data(error_id, Bytes::new(), true).await;
                break;
            }
        }
    }
    pump.abort();
}
