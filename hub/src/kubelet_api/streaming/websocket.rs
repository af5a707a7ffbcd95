//! exec and attach over a websocket, for clients that call the kubelet endpoint directly (the
//! API server itself speaks SPDY to kubelets): the channel protocols `v5.channel.k8s.io`,
//! `v4.channel.k8s.io` and `channel.k8s.io`, binary messages whose first byte is the channel
//! (0 stdin, 1 stdout, 2 stderr, 3 error/status, 4 resize; v5 adds 255 CLOSE, `[255, channel]`,
//! which ends stdin).
//!
//! RFC 6455 framing is written here: client frames must be masked, control frames are at most
//! 125 bytes, a message (fragments included) at most [`MAX_MESSAGE`]; anything else closes the
//! connection with a close frame, never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fleetlet_proto::v1::StreamChannel;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::RemoteCommandQuery;
use crate::link::StreamEvent;
use crate::sessions::DeviceStream;

/// The remotecommand websocket protocols, most preferred first.
pub const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"];

/// Largest message accepted from a client.
pub const MAX_MESSAGE: usize = 1024 * 1024;

const OP_CONTINUATION: u8 = 0;
const OP_TEXT: u8 = 1;
const OP_BINARY: u8 = 2;
const OP_CLOSE: u8 = 8;
const OP_PING: u8 = 9;
const OP_PONG: u8 = 10;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    use base64::Engine;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.trim().as_bytes());
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// One frame from a client, unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Last fragment of its message.
    pub fin: bool,
    /// Opcode.
    pub opcode: u8,
    /// Payload.
    pub payload: Bytes,
}

/// Why the bytes are not a client's websocket frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// A client frame without a mask.
    #[error("unmasked client frame")]
    Unmasked,
    /// Reserved bits, unknown opcodes, or a fragmented or oversized control frame.
    #[error("malformed websocket frame")]
    Malformed,
    /// Bigger than [`MAX_MESSAGE`].
    #[error("websocket message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
}

/// Parses one client frame from the front of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    if buf[0] & 0x70 != 0 {
        return Err(WsError::Malformed);
    }
    let opcode = buf[0] & 0x0f;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(WsError::Malformed);
    }
    if buf[1] & 0x80 == 0 {
        return Err(WsError::Unmasked);
    }
    let (len, mut at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            (usize::try_from(len).unwrap_or(usize::MAX), 10)
        }
        n => (usize::from(n), 2),
    };
    if opcode >= OP_CLOSE && (len > 125 || !fin) {
        return Err(WsError::Malformed);
    }
    if len > MAX_MESSAGE {
        return Err(WsError::TooLarge);
    }
    if buf.len() < at + 4 + len {
        return Ok(None);
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    at += 4;
    let payload: Vec<u8> = buf[at..at + len]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Ok(Some((
        Frame {
            fin,
            opcode,
            payload: Bytes::from(payload),
        },
        at + len,
    )))
}

/// Encodes a server frame (unmasked, final).
pub fn encode_frame(opcode: u8, payload: &[u8], out: &mut BytesMut) {
    out.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
}

enum Out {
    Binary(Bytes),
    Pong(Bytes),
    Close(u16),
}

/// The websocket protocols of port-forward ("" is the kubelet's binary default).
pub const PORTFORWARD_PROTOCOLS: &[&str] = &["v4.channel.k8s.io"];

/// A served websocket: complete client messages in, frames out, and whether it is gone.
struct Conn {
    messages: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Out>,
    closed: CancellationToken,
}

fn start<IO>(io: IO) -> Conn
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (read, write) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::channel::<Out>(64);
    let (msg_tx, messages) = mpsc::channel::<Bytes>(16);
    let closed = CancellationToken::new();
    tokio::spawn(write_loop(write, out_rx, closed.clone()));
    tokio::spawn(read_loop(read, msg_tx, out_tx.clone(), closed.clone()));
    Conn {
        messages,
        out: out_tx,
        closed,
    }
}

fn channel_message(channel: u8, data: &[u8]) -> Out {
    let mut m = BytesMut::with_capacity(data.len() + 1);
    m.put_u8(channel);
    m.put_slice(data);
    Out::Binary(m.freeze())
}

/// The ports of a websocket port-forward request (`port=` repeated or comma-separated).
pub fn parse_ports(query: Option<&str>) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for pair in query.unwrap_or_default().split('&') {
        let Some(value) = pair.strip_prefix("port=") else {
            continue;
        };
        if value.is_empty() {
            return Err("query parameter \"port\" cannot be empty".into());
        }
        for p in value.split(',') {
            let port: u16 = p
                .parse()
                .map_err(|_| format!("unable to parse {value:?} as a port"))?;
            if port == 0 {
                return Err(format!("port {value:?} must be > 0"));
            }
            ports.push(port);
        }
    }
    if ports.is_empty() {
        return Err("query parameter \"port\" is required".into());
    }
    if ports.len() > 64 {
        return Err("at most 64 ports at once".into());
    }
    Ok(ports)
}

/// Serves a port-forward over an upgraded websocket: per port `i`, channel `2i` carries the
/// data and `2i+1` errors, each starting with the port (2 bytes, little endian) as the kubelet
/// sends it; each port is one connection, one stream on the device's link.
pub(super) async fn serve_portforward<IO>(
    io: IO,
    ports: Vec<u16>,
    sessions: std::sync::Arc<dyn crate::sessions::Sessions>,
    device: String,
    pod_uid: String,
) where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Conn {
        mut messages,
        out,
        closed,
    } = start(io);
    let mut inputs = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let (data_ch, error_ch) = ((2 * i) as u8, (2 * i + 1) as u8);
        let _ = out
            .send(channel_message(data_ch, &port.to_le_bytes()))
            .await;
        let _ = out
            .send(channel_message(error_ch, &port.to_le_bytes()))
            .await;
        let open = fleetlet_proto::v1::StreamOpen {
            kind: fleetlet_proto::v1::StreamKind::PortForward as i32,
            pod_uid: pod_uid.clone(),
            port: u32::from(port),
            ..Default::default()
        };
        let pod = pod_uid.clone();
        let fail = move |message: String| {
            channel_message(
                error_ch,
                format!("error forwarding port {port} to pod {pod}: {message}").as_bytes(),
            )
        };
        match sessions.open_stream(&device, open).await {
            Ok((input, mut output)) => {
                inputs.push(Some(input));
                let out = out.clone();
                let fail = fail.clone();
                tasks.spawn(async move {
                    while let Some(event) = output.next().await {
                        match event {
                            StreamEvent::Data { data, .. } => {
                                for chunk in data.chunks(32 * 1024) {
                                    if out.send(channel_message(data_ch, chunk)).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            StreamEvent::Eof { .. } => {}
                            StreamEvent::End { error: Some(e), .. } => {
                                let _ = out.send(fail(e)).await;
                                return;
                            }
                            StreamEvent::End { .. } => return,
                        }
                    }
                });
            }
            Err(e) => {
                inputs.push(None);
                let _ = out.send(fail(e.to_string())).await;
            }
        }
    }
    let pump = tokio::spawn(async move {
        while let Some(message) = messages.recv().await {
            let Some((&channel, _)) = message.split_first() else {
                continue;
            };
            let i = usize::from(channel / 2);
            if channel % 2 == 0
                && let Some(Some(input)) = inputs.get(i)
                && message.len() > 1
                && input
                    .send(StreamChannel::Stdin, message.slice(1..))
                    .await
                    .is_err()
            {
                return;
            }
        }
    });
    // Over once every connection ended (or the client went away).
    tokio::select! {
        () = closed.cancelled() => {}
        () = async { while tasks.join_next().await.is_some() {} } => {
            let _ = out.send(Out::Close(1000)).await;
        }
    }
    pump.abort();
    tasks.abort_all();
}

/// Serves exec or attach on an upgraded websocket connection.
pub(super) async fn serve<IO>(io: IO, protocol: &str, q: RemoteCommandQuery, stream: DeviceStream)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let version: u8 = match protocol {
        "v5.channel.k8s.io" => 5,
        "v4.channel.k8s.io" => 4,
        _ => 1,
    };
    let Conn {
        mut messages,
        out: out_tx,
        closed,
    } = start(io);
    let (input, mut output) = stream;
    // Client → device: stdin, resizes, v5's CLOSE of stdin.
    let pump = {
        let input = input.clone();
        let stdin = q.stdin;
        tokio::spawn(async move {
            let mut resize = BytesMut::new();
            while let Some(message) = messages.recv().await {
                let Some((&channel, data)) = message.split_first() else {
                    continue;
                };
                match channel {
                    0 if stdin => {
                        let data = message.slice(1..);
                        if !data.is_empty() && input.send(StreamChannel::Stdin, data).await.is_err()
                        {
                            return;
                        }
                    }
                    4 => {
                        resize.extend_from_slice(data);
                        for (w, h) in super::remotecommand::drain_sizes(&mut resize) {
                            let _ = input.resize(w, h);
                        }
                        if resize.len() > 4096 {
                            resize.clear();
                        }
                    }
                    255 if version >= 5 && data.first() == Some(&0) => {
                        let _ = input.eof(StreamChannel::Stdin);
                    }
                    _ => {}
                }
            }
        })
    };
    let send = |channel: u8, data: &[u8]| out_tx.send(channel_message(channel, data));
    let (exit_code, error) = loop {
        let event = tokio::select! {
            () = closed.cancelled() => {
                pump.abort();
                return;
            }
            e = output.next() => e,
        };
        match event {
            Some(StreamEvent::Data { channel, data }) => {
                let ch = match channel {
                    StreamChannel::Stderr if q.stderr => 2,
                    StreamChannel::Stdout if q.stdout => 1,
                    _ => continue,
                };
                for chunk in data.chunks(32 * 1024) {
                    if send(ch, chunk).await.is_err() {
                        pump.abort();
                        return;
                    }
                }
            }
            Some(StreamEvent::Eof { .. }) => {}
            Some(StreamEvent::End { exit_code, error }) => break (exit_code, error),
            None => break (None, Some("the device stream ended unexpectedly".into())),
        }
    };
    pump.abort();
    let status = super::remotecommand::status_message(version.min(4), exit_code, error.as_deref());
    if !status.is_empty() {
        let _ = send(3, &status).await;
    }
    let _ = out_tx.send(Out::Close(1000)).await;
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Out>,
    closed: CancellationToken,
) {
    let mut buf = BytesMut::new();
    loop {
        let out = tokio::select! {
            biased;
            out = rx.recv() => match out {
                Some(out) => out,
                None => break,
            },
            () = closed.cancelled() => break,
        };
        buf.clear();
        let close = matches!(out, Out::Close(_));
        match out {
            Out::Binary(data) => encode_frame(OP_BINARY, &data, &mut buf),
            Out::Pong(data) => encode_frame(OP_PONG, &data, &mut buf),
            Out::Close(code) => encode_frame(OP_CLOSE, &code.to_be_bytes(), &mut buf),
        }
        if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
            break;
        }
        if close {
            let _ = w.shutdown().await;
            break;
        }
    }
    closed.cancel();
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    messages: mpsc::Sender<Bytes>,
    out: mpsc::Sender<Out>,
    closed: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut partial: Option<BytesMut> = None;
    'conn: loop {
        loop {
            let (frame, used) = match parse_frame(&buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(%error, "bad websocket frame; connection closed");
                    let code = if error == WsError::TooLarge {
                        1009
                    } else {
                        1002
                    };
                    let _ = out.send(Out::Close(code)).await;
                    break 'conn;
                }
            };
            buf.advance(used);
            match frame.opcode {
                OP_PING => {
                    let _ = out.send(Out::Pong(frame.payload)).await;
                }
                OP_PONG => {}
                OP_CLOSE => {
                    let _ = out.send(Out::Close(1000)).await;
                    break 'conn;
                }
                opcode => {
                    let message = match (opcode, partial.take()) {
                        (OP_CONTINUATION, None) => {
                            let _ = out.send(Out::Close(1002)).await;
                            break 'conn;
                        }
                        (OP_CONTINUATION, Some(mut p)) => {
                            p.extend_from_slice(&frame.payload);
                            p
                        }
                        (_, Some(_)) => {
                            // A new message inside a fragmented one.
                            let _ = out.send(Out::Close(1002)).await;
                            break 'conn;
                        }
                        (_, None) => BytesMut::from(&frame.payload[..]),
                    };
                    if message.len() > MAX_MESSAGE {
                        let _ = out.send(Out::Close(1009)).await;
                        break 'conn;
                    }
                    if !frame.fin {
                        partial = Some(message);
                        continue;
                    }
                    let sent = tokio::select! {
                        () = closed.cancelled() => break 'conn,
                        s = messages.send(message.freeze()) => s.is_ok(),
                    };
                    if !sent {
                        break 'conn;
                    }
                }
            }
        }
        if buf.capacity() - buf.len() < 8 * 1024 {
            buf.reserve(16 * 1024);
        }
        let n = tokio::select! {
            () = closed.cancelled() => break,
            n = r.read_buf(&mut buf) => n,
        };
        match n {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    drop(messages);
    // Give a close frame queued above its chance to go out before the connection counts as gone.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), out.closed()).await;
    closed.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::DeviceSessions;
    use fleetlet_proto::v1;
    use proptest::prelude::*;

    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let mask = [0x11, 0x22, 0x33, 0x44];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn port_forward_ports_parse_like_the_kubelets() {
        assert_eq!(
            parse_ports(Some("port=80&port=443,8080")),
            Ok(vec![80, 443, 8080])
        );
        assert!(parse_ports(Some("port=")).is_err());
        assert!(parse_ports(Some("port=0")).is_err());
        assert!(parse_ports(Some("port=http")).is_err());
        assert!(parse_ports(None).is_err());
    }

    #[test]
    fn the_accept_key_is_rfc_6455s() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn client_frames_parse_and_bad_ones_are_refused() {
        let f = client_frame(OP_BINARY, true, b"\x00hello");
        let (frame, used) = parse_frame(&f).expect("valid").expect("complete");
        assert_eq!(used, f.len());
        assert_eq!(frame.payload, Bytes::from_static(b"\x00hello"));
        let long = vec![7u8; 300];
        let f = client_frame(OP_BINARY, true, &long);
        assert_eq!(
            parse_frame(&f).expect("valid").expect("complete").0.payload,
            long
        );
        for cut in 0..f.len() {
            assert_eq!(parse_frame(&f[..cut]), Ok(None));
        }
        assert_eq!(parse_frame(&[0x82, 0x01, b'x']), Err(WsError::Unmasked));
        assert_eq!(
            parse_frame(&[0xf2, 0x80, 0, 0, 0, 0]),
            Err(WsError::Malformed)
        );
        assert_eq!(
            parse_frame(&client_frame(OP_PING, false, b"")),
            Err(WsError::Malformed)
        );
        let huge = [0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(parse_frame(&huge), Err(WsError::TooLarge));
    }

    proptest! {
        #[test]
        fn no_input_makes_the_frame_parser_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut rest: &[u8] = &bytes;
            while let Ok(Some((_, used))) = parse_frame(rest) {
                prop_assert!(used > 0 && used <= rest.len());
                rest = &rest[used..];
            }
        }
    }

    /// Reads server frames (opcode, payload) until a close frame (bounded).
    async fn server_frames(io: &mut tokio::io::DuplexStream) -> Vec<(u8, Bytes)> {
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for _ in 0..100 {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), io.read_buf(&mut buf))
                .await
                .expect("an answer")
                .expect("read");
            while buf.len() >= 2 {
                let (len, at) = match buf[1] & 0x7f {
                    126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                    126 => break,
                    n => (usize::from(n), 2),
                };
                if buf.len() < at + len {
                    break;
                }
                let opcode = buf[0] & 0x0f;
                buf.advance(at);
                frames.push((opcode, buf.split_to(len).freeze()));
                if opcode == OP_CLOSE {
                    return frames;
                }
            }
            if n == 0 {
                break;
            }
        }
        frames
    }

    #[tokio::test]
    async fn an_exec_session_relays_channels_and_ends_with_the_exit_status() {
        let sessions = DeviceSessions::default();
        let hello = v1::Hello {
            device_name: "d".into(),
            ..Default::default()
        };
        let reg = sessions.register("d", &hello).await;
        let stream = sessions
            .open_stream("d", v1::StreamOpen::default())
            .await
            .expect("open");
        let id = stream.0.id();
        let _open = reg.handle.next_control().await;
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let q = RemoteCommandQuery {
            command: vec!["sh".into()],
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
        };
        let served = tokio::spawn(serve(server, "v5.channel.k8s.io", q, stream));
        client
            .write_all(&client_frame(OP_BINARY, true, b"\x00typed"))
            .await
            .expect("stdin");
        client
            .write_all(&client_frame(OP_BINARY, true, b"\xff\x00"))
            .await
            .expect("close stdin");
        // What reaches the device: the bytes, then the end of stdin.
        let Some(v1::hub_message::Kind::StreamData(d)) = reg.handle.next_control().await.kind
        else {
            panic!("stdin data")
        };
        assert_eq!(
            (d.stream_id, &d.data[..], d.eof),
            (id, &b"typed"[..], false)
        );
        let Some(v1::hub_message::Kind::StreamData(d)) = reg.handle.next_control().await.kind
        else {
            panic!("stdin eof")
        };
        assert!(d.eof);
        for (channel, data) in [
            (v1::StreamChannel::Stdout, "out"),
            (v1::StreamChannel::Stderr, "err"),
        ] {
            crate::link::route_stream_message(
                &reg.handle,
                v1::agent_message::Kind::StreamData(v1::StreamData {
                    stream_id: id,
                    channel: channel as i32,
                    data: Bytes::from(data),
                    eof: false,
                }),
            );
        }
        crate::link::route_stream_message(
            &reg.handle,
            v1::agent_message::Kind::StreamEnd(v1::StreamEnd {
                stream_id: id,
                exit_code: Some(3),
                error: String::new(),
            }),
        );
        let frames = server_frames(&mut client).await;
        served.await.expect("served");
        assert_eq!(frames[0], (OP_BINARY, Bytes::from_static(b"\x01out")));
        assert_eq!(frames[1], (OP_BINARY, Bytes::from_static(b"\x02err")));
        assert_eq!(frames[2].1[0], 3);
        let status: serde_json::Value = serde_json::from_slice(&frames[2].1[1..]).expect("json");
        assert_eq!(status["details"]["causes"][0]["message"], "3");
        assert_eq!(frames.last().map(|f| f.0), Some(OP_CLOSE));
    }
}
