//! SPDY/3.1 as the kubelet's streaming endpoints speak it (the API server is the client): the
//! frames, the zlib-compressed header blocks, and a server connection that hands the client's
//! streams to a handler.
//!
//! Only what Kubernetes' SPDY client uses is acted on; SETTINGS and WINDOW_UPDATE are parsed and
//! ignored (the client does not do SPDY flow control either: TCP's backpressure paces a
//! connection, and the device link's windows pace each stream). Every length is checked before
//! anything is allocated; a malformed frame ends the connection with GOAWAY, never a panic.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::dictionary::SPDY3_DICTIONARY;

/// The SPDY version this speaks.
pub const VERSION: u16 = 3;
/// Largest control frame payload accepted (headers of a stream are a few hundred bytes).
pub const MAX_CONTROL_PAYLOAD: usize = 64 * 1024;
/// Largest data frame payload accepted (clients write 32 KiB at a time).
pub const MAX_DATA_PAYLOAD: usize = 1024 * 1024;
/// Largest decompressed header block accepted.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Most header pairs in one block.
pub const MAX_HEADERS: u32 = 256;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// FLAG_FIN on SYN_STREAM, SYN_REPLY, HEADERS and data frames.
pub const FLAG_FIN: u8 = 0x01;

/// RST_STREAM status codes used here.
pub mod rst {
    /// PROTOCOL_ERROR.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// REFUSED_STREAM.
    pub const REFUSED_STREAM: u32 = 3;
    /// CANCEL.
    pub const CANCEL: u32 = 5;
    /// INTERNAL_ERROR.
    pub const INTERNAL_ERROR: u32 = 6;
}

/// A frame with its header block still compressed (parsing is stateless; the block is
/// decompressed by the connection's [`HeaderDecoder`], which is stateful).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawFrame {
    /// DATA.
    Data {
        /// Stream.
        stream_id: u32,
        /// Flags (FIN).
        flags: u8,
        /// Payload.
        data: Bytes,
    },
    /// SYN_STREAM.
    SynStream {
        /// New stream.
        stream_id: u32,
        /// Associated stream (server push; unused here).
        associated_to: u32,
        /// Priority (0 highest).
        priority: u8,
        /// Flags (FIN, UNIDIRECTIONAL).
        flags: u8,
        /// Compressed header block.
        headers: Bytes,
    },
    /// SYN_REPLY.
    SynReply {
        /// Stream.
        stream_id: u32,
        /// Flags (FIN).
        flags: u8,
        /// Compressed header block.
        headers: Bytes,
    },
    /// RST_STREAM.
    RstStream {
        /// Stream.
        stream_id: u32,
        /// Status code.
        status: u32,
    },
    /// SETTINGS (entries as id/value pairs).
    Settings(Vec<(u32, u32)>),
    /// PING.
    Ping(u32),
    /// GOAWAY.
    GoAway {
        /// Last stream the sender processed.
        last_good_stream_id: u32,
        /// Status.
        status: u32,
    },
    /// HEADERS.
    Headers {
        /// Stream.
        stream_id: u32,
        /// Flags (FIN).
        flags: u8,
        /// Compressed header block.
        headers: Bytes,
    },
    /// WINDOW_UPDATE.
    WindowUpdate {
        /// Stream (0: the session).
        stream_id: u32,
        /// Delta.
        delta: u32,
    },
    /// A control frame of a type SPDY/3 does not define; ignored as the spec says.
    Unknown {
        /// Its type.
        frame_type: u16,
    },
}

/// Why the bytes are not SPDY/3.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A control frame of another version.
    #[error("SPDY control frame of version {0}; only version 3 is spoken")]
    Version(u16),
    /// A frame larger than the bounds above.
    #[error("SPDY frame of {len} bytes is larger than the {max} allowed")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A frame shorter than its type needs, or with inconsistent counts.
    #[error("malformed SPDY {0} frame")]
    Malformed(&'static str),
    /// A header block that does not decompress or parse.
    #[error("malformed SPDY header block: {0}")]
    Headers(String),
}

/// Parses one frame from the front of `buf`: `Ok(None)` when more bytes are needed, else the
/// frame and how many bytes it took.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(RawFrame, usize)>, FrameError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let first = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let flags = buf[4];
    let len = (usize::from(buf[5]) << 16) | (usize::from(buf[6]) << 8) | usize::from(buf[7]);
    let control = first & 0x8000_0000 != 0;
    let max = if control {
        MAX_CONTROL_PAYLOAD
    } else {
        MAX_DATA_PAYLOAD
    };
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if control {
        let version = ((first >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
    }
    if buf.len() < 8 + len {
        return Ok(None);
    }
    let mut p = &buf[8..8 + len];
    let frame = if !control {
        RawFrame::Data {
            stream_id: first & 0x7fff_ffff,
            flags,
            data: Bytes::copy_from_slice(p),
        }
    } else {
        let frame_type = (first & 0xffff) as u16;
        let need = |n: usize, name: &'static str| {
            if len < n {
                Err(FrameError::Malformed(name))
            } else {
                Ok(())
            }
        };
        match frame_type {
            TYPE_SYN_STREAM => {
                need(10, "SYN_STREAM")?;
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let associated_to = p.get_u32() & 0x7fff_ffff;
                let priority = p.get_u8() >> 5;
                let _slot = p.get_u8();
                RawFrame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    flags,
                    headers: Bytes::copy_from_slice(p),
                }
            }
            TYPE_SYN_REPLY => {
                need(4, "SYN_REPLY")?;
                RawFrame::SynReply {
                    stream_id: p.get_u32() & 0x7fff_ffff,
                    flags,
                    headers: Bytes::copy_from_slice(p),
                }
            }
            TYPE_RST_STREAM => {
                if len != 8 {
                    return Err(FrameError::Malformed("RST_STREAM"));
                }
                RawFrame::RstStream {
                    stream_id: p.get_u32() & 0x7fff_ffff,
                    status: p.get_u32(),
                }
            }
            TYPE_SETTINGS => {
                need(4, "SETTINGS")?;
                let n = p.get_u32() as usize;
                if p.len() != n.saturating_mul(8) {
                    return Err(FrameError::Malformed("SETTINGS"));
                }
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = p.get_u32() & 0x00ff_ffff;
                    entries.push((id, p.get_u32()));
                }
                RawFrame::Settings(entries)
            }
            TYPE_PING => {
                if len != 4 {
                    return Err(FrameError::Malformed("PING"));
                }
                RawFrame::Ping(p.get_u32())
            }
            TYPE_GOAWAY => {
                if len != 8 {
                    return Err(FrameError::Malformed("GOAWAY"));
                }
                RawFrame::GoAway {
                    last_good_stream_id: p.get_u32() & 0x7fff_ffff,
                    status: p.get_u32(),
                }
            }
            TYPE_HEADERS => {
                need(4, "HEADERS")?;
                RawFrame::Headers {
                    stream_id: p.get_u32() & 0x7fff_ffff,
                    flags,
                    headers: Bytes::copy_from_slice(p),
                }
            }
            TYPE_WINDOW_UPDATE => {
                if len != 8 {
                    return Err(FrameError::Malformed("WINDOW_UPDATE"));
                }
                RawFrame::WindowUpdate {
                    stream_id: p.get_u32() & 0x7fff_ffff,
                    delta: p.get_u32() & 0x7fff_ffff,
                }
            }
            frame_type => RawFrame::Unknown { frame_type },
        }
    };
    Ok(Some((frame, 8 + len)))
}

fn control_header(out: &mut BytesMut, frame_type: u16, flags: u8, len: usize) {
    out.put_u32(0x8000_0000 | (u32::from(VERSION) << 16) | u32::from(frame_type));
    out.put_u32((u32::from(flags) << 24) | (len as u32 & 0x00ff_ffff));
}

/// Encodes a frame; header blocks in `frame` must already be compressed.
pub fn encode_frame(frame: &RawFrame, out: &mut BytesMut) {
    match frame {
        RawFrame::Data {
            stream_id,
            flags,
            data,
        } => {
            out.put_u32(stream_id & 0x7fff_ffff);
            out.put_u32((u32::from(*flags) << 24) | (data.len() as u32 & 0x00ff_ffff));
            out.put_slice(data);
        }
        RawFrame::SynStream {
            stream_id,
            associated_to,
            priority,
            flags,
            headers,
        } => {
            control_header(out, TYPE_SYN_STREAM, *flags, 10 + headers.len());
            out.put_u32(stream_id & 0x7fff_ffff);
            out.put_u32(associated_to & 0x7fff_ffff);
            out.put_u8((priority & 0x7) << 5);
            out.put_u8(0);
            out.put_slice(headers);
        }
        RawFrame::SynReply {
            stream_id,
            flags,
            headers,
        } => {
            control_header(out, TYPE_SYN_REPLY, *flags, 4 + headers.len());
            out.put_u32(stream_id & 0x7fff_ffff);
            out.put_slice(headers);
        }
        RawFrame::RstStream { stream_id, status } => {
            control_header(out, TYPE_RST_STREAM, 0, 8);
            out.put_u32(stream_id & 0x7fff_ffff);
            out.put_u32(*status);
        }
        RawFrame::Settings(entries) => {
            control_header(out, TYPE_SETTINGS, 0, 4 + 8 * entries.len());
            out.put_u32(entries.len() as u32);
            for (id, value) in entries {
                out.put_u32(id & 0x00ff_ffff);
                out.put_u32(*value);
            }
        }
        RawFrame::Ping(id) => {
            control_header(out, TYPE_PING, 0, 4);
            out.put_u32(*id);
        }
        RawFrame::GoAway {
            last_good_stream_id,
            status,
        } => {
            control_header(out, TYPE_GOAWAY, 0, 8);
            out.put_u32(last_good_stream_id & 0x7fff_ffff);
            out.put_u32(*status);
        }
        RawFrame::Headers {
            stream_id,
            flags,
            headers,
        } => {
            control_header(out, TYPE_HEADERS, *flags, 4 + headers.len());
            out.put_u32(stream_id & 0x7fff_ffff);
            out.put_slice(headers);
        }
        RawFrame::WindowUpdate { stream_id, delta } => {
            control_header(out, TYPE_WINDOW_UPDATE, 0, 8);
            out.put_u32(stream_id & 0x7fff_ffff);
            out.put_u32(delta & 0x7fff_ffff);
        }
        RawFrame::Unknown { .. } => {}
    }
}

/// Header name/value pairs; names lower case, several values of one name joined by NUL.
pub type HeaderList = Vec<(String, String)>;

/// The value of header `name` (case-insensitive), the first of several.
pub fn header<'a>(headers: &'a HeaderList, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.split('\0').next().unwrap_or(""))
}

/// Compresses header blocks: one zlib stream per direction and connection, primed with the
/// SPDY/3 dictionary, each block ending in a sync flush.
pub struct HeaderEncoder {
    z: Compress,
}

impl Default for HeaderEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderEncoder {
    /// A fresh compressor.
    pub fn new() -> Self {
        let mut z = Compress::new(Compression::default(), true);
        // Only fails for a stream that already produced output; this one has not.
        let _ = z.set_dictionary(SPDY3_DICTIONARY);
        Self { z }
    }

    /// The compressed block of `headers`.
    pub fn encode(&mut self, headers: &HeaderList) -> Bytes {
        let mut plain = BytesMut::new();
        plain.put_u32(headers.len() as u32);
        for (name, value) in headers {
            plain.put_u32(name.len() as u32);
            plain.put_slice(name.to_ascii_lowercase().as_bytes());
            plain.put_u32(value.len() as u32);
            plain.put_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(plain.len() + 64);
        let mut input: &[u8] = &plain;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(256);
            }
            let before = self.z.total_in();
            let status = self.z.compress_vec(input, &mut out, FlushCompress::Sync);
            let used = (self.z.total_in() - before) as usize;
            input = &input[used..];
            // A sync flush is complete when it had room left over.
            if matches!(status, Ok(Status::Ok | Status::BufError))
                && input.is_empty()
                && out.len() < out.capacity()
            {
                break;
            }
            if status.is_err() {
                break;
            }
        }
        Bytes::from(out)
    }
}

/// Decompresses the peer's header blocks (one zlib stream for the connection).
pub struct HeaderDecoder {
    z: Decompress,
}

impl Default for HeaderDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecoder {
    /// A fresh decompressor.
    pub fn new() -> Self {
        Self {
            z: Decompress::new(true),
        }
    }

    /// The header pairs of one compressed block.
    pub fn decode(&mut self, block: &[u8]) -> Result<HeaderList, FrameError> {
        let bad = |m: &str| FrameError::Headers(m.to_string());
        let mut out: Vec<u8> = Vec::with_capacity(512);
        let mut input = block;
        let mut rounds = 0;
        loop {
            rounds += 1;
            if rounds > 10_000 {
                return Err(bad("does not end"));
            }
            if out.capacity() - out.len() < 256 {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(bad("larger than 64 KiB decompressed"));
                }
                out.reserve(1024);
            }
            let before = self.z.total_in();
            let r = self
                .z
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = (self.z.total_in() - before) as usize;
            input = &input[used..];
            match r {
                Ok(_) => {
                    if input.is_empty() && out.len() < out.capacity() {
                        break;
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(SPDY3_DICTIONARY)
                        .map_err(|_| bad("needs another dictionary than SPDY/3's"))?;
                }
                Err(e) => return Err(FrameError::Headers(e.to_string())),
            }
        }
        parse_header_block(&out)
    }
}

/// Parses a decompressed header block.
pub fn parse_header_block(mut p: &[u8]) -> Result<HeaderList, FrameError> {
    let bad = |m: &str| FrameError::Headers(m.to_string());
    if p.len() < 4 {
        return Err(bad("no header count"));
    }
    let n = p.get_u32();
    if n > MAX_HEADERS {
        return Err(bad("too many headers"));
    }
    let mut headers = Vec::with_capacity(n as usize);
    let string = |p: &mut &[u8]| -> Result<String, FrameError> {
        if p.len() < 4 {
            return Err(bad("truncated length"));
        }
        let len = p.get_u32() as usize;
        if p.len() < len {
            return Err(bad("truncated string"));
        }
        let s = std::str::from_utf8(&p[..len])
            .map_err(|_| bad("not UTF-8"))?
            .to_string();
        p.advance(len);
        Ok(s)
    };
    for _ in 0..n {
        let name = string(&mut p)?;
        let value = string(&mut p)?;
        if name.is_empty() {
            return Err(bad("empty header name"));
        }
        headers.push((name.to_ascii_lowercase(), value));
    }
    Ok(headers)
}

/// A stream the client opened.
pub struct IncomingStream {
    /// Its id.
    pub id: u32,
    /// Its headers.
    pub headers: HeaderList,
    /// The client's data on it; ends at the client's FIN or reset.
    pub data: mpsc::Receiver<Bytes>,
    /// The client closed its side with FIN already in the SYN_STREAM.
    pub fin: bool,
}

/// What the connection writes.
enum Out {
    Reply(u32),
    Data(u32, Bytes, bool),
    Reset(u32, u32),
    Ping(u32),
    GoAway,
}

/// The writing side of a server connection; cheap to clone.
#[derive(Clone)]
pub struct SpdyWriter {
    tx: mpsc::Sender<Out>,
}

/// A stream's data frames are at most this big.
const DATA_FRAME: usize = 32 * 1024;

impl SpdyWriter {
    /// Accepts stream `id` (SYN_REPLY).
    pub async fn reply(&self, id: u32) -> bool {
        self.tx.send(Out::Reply(id)).await.is_ok()
    }

    /// Data on stream `id`; `fin` closes our side of it.
    pub async fn data(&self, id: u32, data: Bytes, fin: bool) -> bool {
        if data.len() <= DATA_FRAME {
            return self.tx.send(Out::Data(id, data, fin)).await.is_ok();
        }
        let mut rest = data;
        while !rest.is_empty() {
            let chunk = rest.split_to(rest.len().min(DATA_FRAME));
            let last = rest.is_empty();
            if self
                .tx
                .send(Out::Data(id, chunk, fin && last))
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// Resets stream `id`.
    pub async fn reset(&self, id: u32, status: u32) -> bool {
        self.tx.send(Out::Reset(id, status)).await.is_ok()
    }

    /// Says GOAWAY and closes the connection once everything queued before it is written.
    pub async fn go_away(&self) {
        let _ = self.tx.send(Out::GoAway).await;
    }
}

/// A served SPDY connection.
pub struct SpdyConnection {
    /// Streams the client opens, in order.
    pub incoming: mpsc::Receiver<IncomingStream>,
    /// Writes frames.
    pub writer: SpdyWriter,
    /// Cancelled once the connection is gone (client closed it, GOAWAY, an error).
    pub closed: CancellationToken,
}

/// Per-stream data frames queued towards a handler before the connection stops reading.
const STREAM_QUEUE: usize = 16;

/// Serves SPDY on `io`, which already switched protocols.
pub fn serve<IO>(io: IO, peer: String) -> SpdyConnection
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (read, write) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::channel(64);
    let (in_tx, in_rx) = mpsc::channel(16);
    let closed = CancellationToken::new();
    tokio::spawn(write_loop(write, out_rx, closed.clone()));
    tokio::spawn(read_loop(
        read,
        in_tx,
        SpdyWriter { tx: out_tx.clone() },
        closed.clone(),
        peer,
    ));
    SpdyConnection {
        incoming: in_rx,
        writer: SpdyWriter { tx: out_tx },
        closed,
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Out>,
    closed: CancellationToken,
) {
    let mut encoder = HeaderEncoder::new();
    let mut buf = BytesMut::new();
    loop {
        // Queued frames first: a GOAWAY queued as the connection closes still goes out.
        let out = tokio::select! {
            biased;
            out = rx.recv() => match out {
                Some(out) => out,
                None => break,
            },
            () = closed.cancelled() => break,
        };
        let mut go_away = false;
        let frame = match out {
            Out::Reply(id) => RawFrame::SynReply {
                stream_id: id,
                flags: 0,
                headers: encoder.encode(&Vec::new()),
            },
            Out::Data(id, data, fin) => RawFrame::Data {
                stream_id: id,
                flags: if fin { FLAG_FIN } else { 0 },
                data,
            },
            Out::Reset(id, status) => RawFrame::RstStream {
                stream_id: id,
                status,
            },
            Out::Ping(id) => RawFrame::Ping(id),
            Out::GoAway => {
                go_away = true;
                RawFrame::GoAway {
                    last_good_stream_id: 0,
                    status: 0,
                }
            }
        };
        buf.clear();
        encode_frame(&frame, &mut buf);
        if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
            break;
        }
        if go_away {
            let _ = w.shutdown().await;
            break;
        }
    }
    closed.cancel();
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    incoming: mpsc::Sender<IncomingStream>,
    writer: SpdyWriter,
    closed: CancellationToken,
    peer: String,
) {
    let mut decoder = HeaderDecoder::new();
    let mut streams: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut last_stream = 0u32;
    let incoming = Arc::new(incoming);
    'conn: loop {
        // Every complete frame in the buffer first.
        loop {
            let parsed = match parse_frame(&buf) {
                Ok(p) => p,
                Err(error) => {
                    tracing::debug!(%peer, %error, "bad SPDY frame; connection closed");
                    writer.go_away().await;
                    break 'conn;
                }
            };
            let Some((frame, used)) = parsed else { break };
            buf.advance(used);
            match frame {
                RawFrame::SynStream {
                    stream_id,
                    flags,
                    headers,
                    ..
                } => {
                    let headers = match decoder.decode(&headers) {
                        Ok(h) => h,
                        Err(error) => {
                            // The compression state is lost with a bad block: the connection
                            // cannot continue.
                            tracing::debug!(%peer, %error, "bad SPDY headers; connection closed");
                            writer.go_away().await;
                            break 'conn;
                        }
                    };
                    if stream_id == 0 || stream_id <= last_stream || stream_id % 2 == 0 {
                        let _ = writer.reset(stream_id, rst::PROTOCOL_ERROR).await;
                        continue;
                    }
                    last_stream = stream_id;
                    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
                    let fin = flags & FLAG_FIN != 0;
                    if !fin {
                        streams.insert(stream_id, tx);
                    }
                    let stream = IncomingStream {
                        id: stream_id,
                        headers,
                        data: rx,
                        fin,
                    };
                    if incoming.send(stream).await.is_err() {
                        let _ = writer.reset(stream_id, rst::REFUSED_STREAM).await;
                    }
                }
                RawFrame::SynReply { headers, .. } | RawFrame::Headers { headers, .. } => {
                    // Keeps the compression state in step; nothing else to do.
                    if decoder.decode(&headers).is_err() {
                        writer.go_away().await;
                        break 'conn;
                    }
                }
                RawFrame::Data {
                    stream_id,
                    flags,
                    data,
                } => {
                    if let Some(tx) = streams.get(&stream_id) {
                        if !data.is_empty() {
                            let sent = tokio::select! {
                                () = closed.cancelled() => break 'conn,
                                s = tx.send(data) => s.is_ok(),
                            };
                            if !sent {
                                // The handler is not interested in this stream's data.
                                streams.remove(&stream_id);
                            }
                        }
                        if flags & FLAG_FIN != 0 {
                            streams.remove(&stream_id);
                        }
                    }
                }
                RawFrame::RstStream { stream_id, .. } => {
                    streams.remove(&stream_id);
                }
                RawFrame::Ping(id) => {
                    // Answer the client's (odd) pings; ours would be even, and we send none.
                    if id % 2 == 1 && writer.tx.send(Out::Ping(id)).await.is_err() {
                        break 'conn;
                    }
                }
                RawFrame::GoAway { .. } => break 'conn,
                RawFrame::Settings(_)
                | RawFrame::WindowUpdate { .. }
                | RawFrame::Unknown { .. } => {}
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
    // Streams see their end; the handler sees the connection's.
    drop(streams);
    closed.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(SPDY3_DICTIONARY.len(), 1423);
        let digest = ring::digest::digest(&ring::digest::SHA256, SPDY3_DICTIONARY);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
        );
    }

    fn round_trip(frame: RawFrame) {
        let mut buf = BytesMut::new();
        encode_frame(&frame, &mut buf);
        let (parsed, used) = parse_frame(&buf).expect("valid").expect("complete");
        assert_eq!(used, buf.len());
        assert_eq!(parsed, frame);
        // Any strict prefix asks for more.
        for cut in 0..buf.len() {
            assert_eq!(parse_frame(&buf[..cut]), Ok(None), "prefix of {cut} bytes");
        }
    }

    #[test]
    fn frames_round_trip() {
        round_trip(RawFrame::Data {
            stream_id: 5,
            flags: FLAG_FIN,
            data: Bytes::from_static(b"hello"),
        });
        round_trip(RawFrame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 3,
            flags: 0,
            headers: Bytes::from_static(b"\x01\x02"),
        });
        round_trip(RawFrame::SynReply {
            stream_id: 7,
            flags: FLAG_FIN,
            headers: Bytes::from_static(b"x"),
        });
        round_trip(RawFrame::RstStream {
            stream_id: 3,
            status: rst::CANCEL,
        });
        round_trip(RawFrame::Settings(vec![(4, 100), (7, 65536)]));
        round_trip(RawFrame::Ping(9));
        round_trip(RawFrame::GoAway {
            last_good_stream_id: 11,
            status: 0,
        });
        round_trip(RawFrame::Headers {
            stream_id: 1,
            flags: 0,
            headers: Bytes::new(),
        });
        round_trip(RawFrame::WindowUpdate {
            stream_id: 0,
            delta: 1000,
        });
    }

    #[test]
    fn headers_round_trip_across_blocks_of_one_connection() {
        let mut enc = HeaderEncoder::new();
        let mut dec = HeaderDecoder::new();
        let blocks: Vec<HeaderList> = vec![
            vec![("streamtype".into(), "error".into())],
            vec![
                ("streamtype".into(), "data".into()),
                ("port".into(), "8080".into()),
                ("requestid".into(), "0".into()),
            ],
            vec![],
            vec![("x".into(), "a\0b".into())],
        ];
        for block in &blocks {
            let compressed = enc.encode(block);
            assert_eq!(&dec.decode(&compressed).expect("decodes"), block);
        }
        assert_eq!(header(&blocks[3], "X"), Some("a"));
    }

    #[test]
    fn malformed_frames_are_errors() {
        // Version 2 control frame.
        let v2 = [0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1];
        assert_eq!(parse_frame(&v2), Err(FrameError::Version(2)));
        // A PING of 3 bytes.
        let ping = [0x80, 0x03, 0x00, 0x06, 0, 0, 0, 3, 0, 0, 1];
        assert!(matches!(parse_frame(&ping), Err(FrameError::Malformed(_))));
        // A control frame announcing 16 MiB.
        let big = [0x80, 0x03, 0x00, 0x01, 0, 0xff, 0xff, 0xff];
        assert!(matches!(
            parse_frame(&big),
            Err(FrameError::TooLarge { .. })
        ));
        // SETTINGS claiming more entries than it holds.
        let settings = [0x80, 0x03, 0x00, 0x04, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            parse_frame(&settings),
            Err(FrameError::Malformed(_))
        ));
        // Header blocks that are not zlib, or claim absurd counts.
        assert!(HeaderDecoder::new().decode(b"not zlib at all").is_err());
        assert!(parse_header_block(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse_header_block(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']).is_err());
    }

    /// Reads frames from `io` until `want` matches one (bounded).
    async fn read_until(
        io: &mut tokio::io::DuplexStream,
        buf: &mut BytesMut,
        want: impl Fn(&RawFrame) -> bool,
    ) -> Vec<RawFrame> {
        let mut seen = Vec::new();
        for _ in 0..100 {
            while let Ok(Some((frame, used))) = parse_frame(buf) {
                buf.advance(used);
                let done = want(&frame);
                seen.push(frame);
                if done {
                    return seen;
                }
            }
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), io.read_buf(buf))
                .await
                .expect("an answer")
                .expect("read");
            if n == 0 {
                break;
            }
        }
        seen
    }

    #[tokio::test]
    async fn a_served_connection_replies_answers_pings_and_ends_on_garbage() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut conn = serve(server, "test".into());
        let mut enc = HeaderEncoder::new();
        let mut out = BytesMut::new();
        encode_frame(
            &RawFrame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: enc.encode(&vec![("streamtype".into(), "stdin".into())]),
            },
            &mut out,
        );
        encode_frame(
            &RawFrame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"input"),
            },
            &mut out,
        );
        encode_frame(&RawFrame::Ping(7), &mut out);
        client.write_all(&out).await.expect("write");
        let mut stream = conn.incoming.recv().await.expect("a stream");
        assert_eq!(header(&stream.headers, "streamType"), Some("stdin"));
        assert_eq!(stream.data.recv().await.as_deref(), Some(&b"input"[..]));
        assert_eq!(stream.data.recv().await, None, "FIN ends the stream's data");
        assert!(conn.writer.reply(1).await);
        assert!(conn.writer.data(1, Bytes::from_static(b"out"), true).await);
        let mut buf = BytesMut::new();
        let frames = read_until(&mut client, &mut buf, |f| {
            matches!(f, RawFrame::Data { .. })
        })
        .await;
        assert!(frames.contains(&RawFrame::Ping(7)), "{frames:?}");
        let reply = frames
            .iter()
            .find_map(|f| match f {
                RawFrame::SynReply {
                    stream_id: 1,
                    headers,
                    ..
                } => Some(headers.clone()),
                _ => None,
            })
            .expect("SYN_REPLY");
        assert!(
            HeaderDecoder::new()
                .decode(&reply)
                .expect("headers")
                .is_empty()
        );
        assert!(frames.contains(&RawFrame::Data {
            stream_id: 1,
            flags: FLAG_FIN,
            data: Bytes::from_static(b"out"),
        }));
        // A SPDY/2 frame: GOAWAY and the end of the connection, no panic.
        client
            .write_all(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1])
            .await
            .expect("write");
        let frames = read_until(&mut client, &mut buf, |f| {
            matches!(f, RawFrame::GoAway { .. })
        })
        .await;
        assert!(
            matches!(frames.last(), Some(RawFrame::GoAway { .. })),
            "{frames:?}"
        );
        tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed.cancelled())
            .await
            .expect("closed");
    }

    proptest! {
        #[test]
        fn no_input_makes_the_parser_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut rest: &[u8] = &bytes;
            while let Ok(Some((_, used))) = parse_frame(rest) {
                prop_assert!(used > 0 && used <= rest.len());
                rest = &rest[used..];
            }
            let _ = parse_header_block(&bytes);
            let _ = HeaderDecoder::new().decode(&bytes);
        }

        #[test]
        fn control_frames_with_random_bodies_never_panic(
            frame_type in 0u16..12,
            flags in any::<u8>(),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut buf = BytesMut::new();
            control_header(&mut buf, frame_type, flags, body.len());
            buf.put_slice(&body);
            let _ = parse_frame(&buf);
        }

        #[test]
        fn header_blocks_round_trip(
            pairs in proptest::collection::vec(("[a-z][a-z0-9-]{0,20}", "[ -~]{0,40}"), 0..12),
        ) {
            let headers: HeaderList = pairs;
            let mut enc = HeaderEncoder::new();
            let mut dec = HeaderDecoder::new();
            for _ in 0..3 {
                let block = enc.encode(&headers);
                prop_assert_eq!(&dec.decode(&block).expect("decodes"), &headers);
            }
        }
    }
}
