//! Streams multiplexed on a device's link: `kubectl exec`, `attach` and `port-forward` relayed
//! to the device as `StreamOpen` / `StreamData` / `StreamWindow` / `StreamResize` / `StreamEnd`.
//!
//! Flow control is per stream and direction, counted in data bytes: the device may have
//! [`OUTPUT_WINDOW`] bytes of output in flight beyond what the hub has handed to its consumer,
//! and the hub may send [`fleetlet_proto::STREAM_INPUT_WINDOW`] bytes of input beyond what the
//! device has written to the container. Neither side buffers without bound: the hub's queue of
//! a stream holds at most one window, and a device that sends past its window loses the stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use fleetlet_proto::v1;
use tokio::sync::{Semaphore, mpsc};

use super::LinkError;
use super::sessions::SessionHandle;

/// Bytes of output a device may send on a stream before the hub grants more.
pub const OUTPUT_WINDOW: u32 = 256 * 1024;

/// Hub→device stream messages (data, windows, resizes, ends) one session may have queued; with
/// the per-stream windows this bounds what a device that stopped reading costs the hub.
pub const STREAM_QUEUE_PER_SESSION: usize = 4096;

/// Something that came from the device on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Output on a channel (stdout, stderr; port-forward: bytes from the port).
    Data {
        /// Which channel.
        channel: v1::StreamChannel,
        /// The bytes.
        data: Bytes,
    },
    /// No more output on this channel.
    Eof {
        /// Which channel.
        channel: v1::StreamChannel,
    },
    /// The stream is over; nothing follows.
    End {
        /// The command's exit code (exec).
        exit_code: Option<i32>,
        /// Why the stream failed, if it did.
        error: Option<String>,
    },
}

/// Per-stream state shared by the session (routing) and the stream's two halves.
pub(crate) struct StreamShared {
    id: u64,
    device: String,
    session: SessionHandle,
    /// Bytes of input the hub may still send.
    input_credit: Semaphore,
    events: mpsc::UnboundedSender<StreamEvent>,
    counters: RwLock<Counters>,
    /// Set once the stream ended (either side); no StreamEnd goes to the device after it.
    ended: AtomicBool,
}

#[derive(Default)]
struct Counters {
    /// Output bytes received from the device.
    received: u64,
    /// Output bytes the device may send in total so far.
    granted: u64,
    /// Output bytes handed to the consumer.
    consumed: u64,
}

impl StreamShared {
    fn push(&self, kind: v1::hub_message::Kind) -> bool {
        self.session
            .push_stream(v1::HubMessage { kind: Some(kind) })
    }

    /// Ends the stream from the hub's side: the device is told to close it.
    fn end_from_hub(&self) {
        if self.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        self.session.streams().remove(&self.id);
        self.input_credit.close();
        self.push(v1::hub_message::Kind::StreamEnd(v1::StreamEnd {
            stream_id: self.id,
            exit_code: None,
            error: String::new(),
        }));
    }

    /// Ends the stream on both sides: the consumer gets `error`, the device a `StreamEnd`.
    fn abort(&self, error: String) {
        if self.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        self.session.streams().remove(&self.id);
        self.input_credit.close();
        let _ = self.events.send(StreamEvent::End {
            exit_code: None,
            error: Some(error),
        });
        self.push(v1::hub_message::Kind::StreamEnd(v1::StreamEnd {
            stream_id: self.id,
            exit_code: None,
            error: String::new(),
        }));
    }

    /// Ends the stream from the device's side (or because the link dropped).
    fn end_from_device(&self, exit_code: Option<i32>, error: Option<String>) {
        if self.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        self.input_credit.close();
        let _ = self.events.send(StreamEvent::End { exit_code, error });
    }
}

/// Ends the stream on the device when the last of its halves is dropped.
struct Guard(Arc<StreamShared>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.end_from_hub();
    }
}

/// The input half of a stream: stdin, resizes, bytes towards a forwarded port.
#[derive(Clone)]
pub struct StreamInput {
    shared: Arc<StreamShared>,
    _guard: Arc<Guard>,
}

/// The output half of a stream: what the device sends back.
pub struct StreamOutput {
    shared: Arc<StreamShared>,
    events: mpsc::UnboundedReceiver<StreamEvent>,
    /// `End` was handed out.
    done: bool,
    _guard: Arc<Guard>,
}

impl StreamInput {
    /// The stream's id on the link.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Sends `data` on `channel`, waiting for the device's window; an error once the stream
    /// ended or the link is congested.
    pub async fn send(&self, channel: v1::StreamChannel, data: Bytes) -> Result<(), LinkError> {
        for chunk in data.chunks(fleetlet_proto::STREAM_CHUNK_BYTES) {
            let n = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            match self.shared.input_credit.acquire_many(n).await {
                Ok(permit) => permit.forget(),
                Err(_) => return Err(self.ended()),
            }
            let message = v1::hub_message::Kind::StreamData(v1::StreamData {
                stream_id: self.shared.id,
                channel: channel as i32,
                data: data.slice_ref(chunk),
                eof: false,
            });
            if !self.shared.push(message) {
                return Err(self.congested());
            }
        }
        Ok(())
    }

    /// No more input on `channel` (stdin closed).
    pub fn eof(&self, channel: v1::StreamChannel) -> Result<(), LinkError> {
        if self.shared.ended.load(Ordering::Acquire) {
            return Err(self.ended());
        }
        let message = v1::hub_message::Kind::StreamData(v1::StreamData {
            stream_id: self.shared.id,
            channel: channel as i32,
            data: Bytes::new(),
            eof: true,
        });
        if self.shared.push(message) {
            Ok(())
        } else {
            Err(self.congested())
        }
    }

    /// The terminal's new size.
    pub fn resize(&self, width: u32, height: u32) -> Result<(), LinkError> {
        if self.shared.ended.load(Ordering::Acquire) {
            return Err(self.ended());
        }
        let message = v1::hub_message::Kind::StreamResize(v1::StreamResize {
            stream_id: self.shared.id,
            width,
            height,
        });
        if self.shared.push(message) {
            Ok(())
        } else {
            Err(self.congested())
        }
    }

    fn ended(&self) -> LinkError {
        LinkError::StreamEnded {
            device: self.shared.device.clone(),
        }
    }

    fn congested(&self) -> LinkError {
        LinkError::Congested {
            device: self.shared.device.clone(),
        }
    }
}

impl StreamOutput {
    /// The next thing the device sent; `None` after `End`.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        if self.done {
            return None;
        }
        let event = self.events.recv().await?;
        match &event {
            StreamEvent::Data { data, .. } => self.consumed(data.len()),
            StreamEvent::End { .. } => self.done = true,
            StreamEvent::Eof { .. } => {}
        }
        Some(event)
    }

    /// Grants the device more window once half of it was consumed.
    fn consumed(&self, bytes: usize) {
        let grant = {
            let mut c = self
                .shared
                .counters
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            c.consumed += bytes as u64;
            let grant = (c.consumed + u64::from(OUTPUT_WINDOW)).saturating_sub(c.granted);
            if grant < u64::from(OUTPUT_WINDOW / 2) {
                return;
            }
            c.granted += grant;
            grant
        };
        self.shared
            .push(v1::hub_message::Kind::StreamWindow(v1::StreamWindow {
                stream_id: self.shared.id,
                bytes: u32::try_from(grant).unwrap_or(u32::MAX),
            }));
    }
}

/// The streams of one session, by id.
pub(crate) type StreamMap = HashMap<u64, Arc<StreamShared>>;

/// Opens a stream on `session`: registers it and queues the `StreamOpen`.
pub(crate) fn open(
    device: &str,
    session: &SessionHandle,
    id: u64,
    mut open: v1::StreamOpen,
    max_streams: usize,
) -> Result<(StreamInput, StreamOutput), LinkError> {
    open.stream_id = id;
    open.window = OUTPUT_WINDOW;
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(StreamShared {
        id,
        device: device.to_owned(),
        session: session.clone(),
        input_credit: Semaphore::new(fleetlet_proto::STREAM_INPUT_WINDOW as usize),
        events: tx,
        counters: RwLock::new(Counters {
            granted: u64::from(OUTPUT_WINDOW),
            ..Counters::default()
        }),
        ended: AtomicBool::new(false),
    });
    {
        let mut streams = session.streams();
        if streams.len() >= max_streams {
            return Err(LinkError::TooManyStreams {
                device: device.to_owned(),
                limit: max_streams,
            });
        }
        streams.insert(id, Arc::clone(&shared));
    }
    if !session.push_stream(v1::HubMessage {
        kind: Some(v1::hub_message::Kind::StreamOpen(open)),
    }) {
        session.streams().remove(&id);
        return Err(LinkError::Congested {
            device: device.to_owned(),
        });
    }
    let guard = Arc::new(Guard(Arc::clone(&shared)));
    Ok((
        StreamInput {
            shared: Arc::clone(&shared),
            _guard: Arc::clone(&guard),
        },
        StreamOutput {
            shared,
            events: rx,
            done: false,
            _guard: guard,
        },
    ))
}

/// Routes one stream message from the device. A device that breaks the protocol (output past
/// its window) loses the stream, not the session.
pub(crate) fn route(session: &SessionHandle, message: v1::agent_message::Kind) {
    use v1::agent_message::Kind;
    let id = match &message {
        Kind::StreamData(d) => d.stream_id,
        Kind::StreamWindow(w) => w.stream_id,
        Kind::StreamEnd(e) => e.stream_id,
        _ => return,
    };
    let Some(shared) = session.streams().get(&id).cloned() else {
        // Ended meanwhile; late messages are dropped.
        return;
    };
    match message {
        Kind::StreamData(d) => {
            let channel =
                v1::StreamChannel::try_from(d.channel).unwrap_or(v1::StreamChannel::Stdout);
            if !d.data.is_empty() {
                let over = {
                    let mut c = shared
                        .counters
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    c.received += d.data.len() as u64;
                    c.received > c.granted
                };
                if over {
                    shared.abort(format!(
                        "device {} sent more output on stream {id} than its window; stream closed",
                        shared.device
                    ));
                    return;
                }
                let _ = shared.events.send(StreamEvent::Data {
                    channel,
                    data: d.data,
                });
            }
            if d.eof {
                let _ = shared.events.send(StreamEvent::Eof { channel });
            }
        }
        Kind::StreamWindow(w) => {
            // Bounded so a confused device cannot overflow the semaphore.
            let available = shared.input_credit.available_permits();
            let room = (1usize << 30).saturating_sub(available);
            shared
                .input_credit
                .add_permits((w.bytes as usize).min(room));
        }
        Kind::StreamEnd(e) => {
            session.streams().remove(&id);
            shared.end_from_device(e.exit_code, (!e.error.is_empty()).then_some(e.error));
        }
        _ => {}
    }
}

/// Ends every stream of a session whose link dropped, with a message that says so.
pub(crate) fn end_all(device: &str, streams: StreamMap) {
    for (_, shared) in streams {
        shared.end_from_device(
            None,
            Some(format!(
                "the link between device {device} and fleetlet-hub dropped; the session on the device was closed"
            )),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::DeviceSessions;

    async fn connected(sessions: &DeviceSessions) -> super::super::sessions::Registered {
        let hello = v1::Hello {
            device_name: "d".into(),
            ..Default::default()
        };
        sessions.register("d", &hello).await
    }

    fn exec() -> v1::StreamOpen {
        v1::StreamOpen {
            kind: v1::StreamKind::Exec as i32,
            pod_uid: "uid".into(),
            container: "c".into(),
            command: vec!["sh".into()],
            stdout: true,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn output_is_windowed_and_excess_output_ends_the_stream() {
        let sessions = DeviceSessions::default();
        let reg = connected(&sessions).await;
        let (input, mut output) = sessions.open_stream("d", exec()).await.expect("open");
        let id = input.id();
        let Some(v1::hub_message::Kind::StreamOpen(open)) = reg.handle.next_control().await.kind
        else {
            panic!("open first")
        };
        assert_eq!((open.stream_id, open.window), (id, OUTPUT_WINDOW));
        let data = |n: usize| {
            v1::agent_message::Kind::StreamData(v1::StreamData {
                stream_id: id,
                channel: v1::StreamChannel::Stdout as i32,
                data: Bytes::from(vec![b'x'; n]),
                eof: false,
            })
        };
        route(&reg.handle, data(OUTPUT_WINDOW as usize / 2));
        let Some(StreamEvent::Data { data: got, .. }) = output.next().await else {
            panic!("data")
        };
        assert_eq!(got.len(), OUTPUT_WINDOW as usize / 2);
        // Consuming half the window grants it again.
        let Some(v1::hub_message::Kind::StreamWindow(w)) = reg.handle.next_control().await.kind
        else {
            panic!("window")
        };
        assert_eq!(w.bytes, OUTPUT_WINDOW / 2);
        // The device may now have one whole window in flight, and no more.
        route(&reg.handle, data(OUTPUT_WINDOW as usize));
        route(&reg.handle, data(1));
        assert!(matches!(
            output.next().await,
            Some(StreamEvent::Data { .. })
        ));
        match output.next().await {
            Some(StreamEvent::End { error: Some(e), .. }) => assert!(e.contains("window"), "{e}"),
            other => panic!("expected the stream's end, got {other:?}"),
        }
        // The device is told to close it.
        loop {
            match reg.handle.next_control().await.kind {
                Some(v1::hub_message::Kind::StreamEnd(e)) => {
                    assert_eq!(e.stream_id, id);
                    break;
                }
                Some(v1::hub_message::Kind::StreamWindow(_)) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn input_waits_for_the_devices_window() {
        let sessions = DeviceSessions::default();
        let reg = connected(&sessions).await;
        let (input, _output) = sessions.open_stream("d", exec()).await.expect("open");
        let id = input.id();
        let window = fleetlet_proto::STREAM_INPUT_WINDOW as usize;
        input
            .send(v1::StreamChannel::Stdin, Bytes::from(vec![0u8; window]))
            .await
            .expect("within the window");
        let more = tokio::spawn({
            let input = input.clone();
            async move {
                input
                    .send(v1::StreamChannel::Stdin, Bytes::from_static(b"x"))
                    .await
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!more.is_finished(), "waits for a window");
        route(
            &reg.handle,
            v1::agent_message::Kind::StreamWindow(v1::StreamWindow {
                stream_id: id,
                bytes: 1,
            }),
        );
        tokio::time::timeout(std::time::Duration::from_secs(5), more)
            .await
            .expect("sent")
            .expect("task")
            .expect("ok");
    }

    #[tokio::test]
    async fn the_stream_limit_refuses_with_a_clear_error_and_a_dropped_link_ends_streams() {
        let sessions = DeviceSessions::new(crate::link::SessionLimits {
            max_streams_per_device: 1,
            ..Default::default()
        });
        let reg = connected(&sessions).await;
        let (_input, mut output) = sessions.open_stream("d", exec()).await.expect("open");
        let err = sessions
            .open_stream("d", exec())
            .await
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains("at most 1"),
            "clear message: {err}"
        );
        sessions.unregister("d", &reg.slot, &reg.handle).await;
        match output.next().await {
            Some(StreamEvent::End { error: Some(e), .. }) => {
                assert!(
                    e.contains("link between device d and fleetlet-hub dropped"),
                    "{e}"
                )
            }
            other => panic!("expected the end, got {other:?}"),
        }
        assert!(output.next().await.is_none());
    }

    #[tokio::test]
    async fn dropping_both_halves_tells_the_device() {
        let sessions = DeviceSessions::default();
        let reg = connected(&sessions).await;
        let (input, output) = sessions.open_stream("d", exec()).await.expect("open");
        let id = input.id();
        let _ = reg.handle.next_control().await;
        drop(input);
        assert!(
            reg.handle.streams().contains_key(&id),
            "output half still open"
        );
        drop(output);
        let Some(v1::hub_message::Kind::StreamEnd(e)) = reg.handle.next_control().await.kind else {
            panic!("end")
        };
        assert_eq!(e.stream_id, id);
        assert!(reg.handle.streams().is_empty());
    }
}
