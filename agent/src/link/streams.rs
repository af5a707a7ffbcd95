//! The device's end of the streams the hub multiplexes on the link (`kubectl exec`, `attach`,
//! `port-forward`): each `StreamOpen` starts a task that opens the session through
//! [`DeviceState::open_stream`] and relays bytes both ways with per-stream windows, until the
//! session ends (its `StreamEnd` carries the exit code), the hub ends it (the user went away),
//! or the link drops; in the last two cases the session on the device is closed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use fleetlet_proto::v1::{self, agent_message, hub_message};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::DeviceState;

/// A session's output: bytes per channel, in order; an `Err` ends it with that message.
pub type StreamOutput = BoxStream<'static, Result<(v1::StreamChannel, Bytes), String>>;

/// What a session needs besides its bytes.
#[tonic::async_trait]
pub trait StreamControl: Send + Sync + 'static {
    /// The terminal was resized.
    async fn resize(&self, width: u32, height: u32) -> Result<(), String>;
    /// Called once the output ended: the exit code (exec), `None` when there is none.
    async fn finish(&self) -> Result<Option<i32>, String>;
}

/// An open exec, attach or port-forward session on the device.
pub struct StreamIo {
    /// Its output.
    pub output: StreamOutput,
    /// Its input (stdin, the connection's write side), when attached.
    pub input: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    /// Resizes and the exit code.
    pub control: Arc<dyn StreamControl>,
}

/// Input from the hub for one stream.
enum HubInput {
    Data(Bytes),
    Eof,
    Resize(u32, u32),
}

struct Entry {
    input: mpsc::UnboundedSender<HubInput>,
    credit: Arc<Semaphore>,
    cancel: CancellationToken,
}

/// The session's streams.
#[derive(Default)]
pub(super) struct Streams {
    open: HashMap<u64, Entry>,
}

impl Streams {
    /// Handles `message` if it is a stream message; otherwise gives it back.
    pub(super) fn handle(
        &mut self,
        state: &Arc<dyn DeviceState>,
        tx: &mpsc::Sender<v1::AgentMessage>,
        session_end: &CancellationToken,
        message: v1::HubMessage,
    ) -> Option<v1::HubMessage> {
        self.open.retain(|_, e| !e.cancel.is_cancelled());
        match message.kind {
            Some(hub_message::Kind::StreamOpen(open)) => {
                let id = open.stream_id;
                let (input_tx, input_rx) = mpsc::unbounded_channel();
                let credit = Arc::new(Semaphore::new(open.window as usize));
                let cancel = session_end.child_token();
                if let Some(previous) = self.open.insert(
                    id,
                    Entry {
                        input: input_tx,
                        credit: Arc::clone(&credit),
                        cancel: cancel.clone(),
                    },
                ) {
                    previous.cancel.cancel();
                }
                tokio::spawn(run(
                    Arc::clone(state),
                    open,
                    input_rx,
                    credit,
                    tx.clone(),
                    cancel,
                ));
                None
            }
            Some(hub_message::Kind::StreamData(d)) => {
                if let Some(e) = self.open.get(&d.stream_id) {
                    if !d.data.is_empty() {
                        let _ = e.input.send(HubInput::Data(d.data));
                    }
                    if d.eof {
                        let _ = e.input.send(HubInput::Eof);
                    }
                }
                None
            }
            Some(hub_message::Kind::StreamWindow(w)) => {
                if let Some(e) = self.open.get(&w.stream_id) {
                    let room = (1usize << 30).saturating_sub(e.credit.available_permits());
                    e.credit.add_permits((w.bytes as usize).min(room));
                }
                None
            }
            Some(hub_message::Kind::StreamResize(r)) => {
                if let Some(e) = self.open.get(&r.stream_id) {
                    let _ = e.input.send(HubInput::Resize(r.width, r.height));
                }
                None
            }
            Some(hub_message::Kind::StreamEnd(end)) => {
                if let Some(e) = self.open.remove(&end.stream_id) {
                    tracing::debug!(stream = end.stream_id, "hub closed the stream");
                    e.cancel.cancel();
                }
                None
            }
            kind => Some(v1::HubMessage { kind }),
        }
    }
}

fn message(kind: agent_message::Kind) -> v1::AgentMessage {
    v1::AgentMessage { kind: Some(kind) }
}

/// How long a TTY session waits for the client's terminal size before it starts.
const FIRST_SIZE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

async fn run(
    state: Arc<dyn DeviceState>,
    mut open: v1::StreamOpen,
    mut input: mpsc::UnboundedReceiver<HubInput>,
    credit: Arc<Semaphore>,
    tx: mpsc::Sender<v1::AgentMessage>,
    cancel: CancellationToken,
) {
    let id = open.stream_id;
    let end = |exit_code: Option<i32>, error: String| {
        message(agent_message::Kind::StreamEnd(v1::StreamEnd {
            stream_id: id,
            exit_code,
            error,
        }))
    };
    // A TTY starts with the client's size: the first resize usually follows the open at once.
    let mut early = Vec::new();
    if open.tty && open.width == 0 {
        let deadline = tokio::time::sleep(FIRST_SIZE_WAIT);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => break,
                () = cancel.cancelled() => return,
                i = input.recv() => match i {
                    Some(HubInput::Resize(w, h)) => {
                        (open.width, open.height) = (w, h);
                        break;
                    }
                    Some(other) => early.push(other),
                    None => return,
                },
            }
        }
    }
    let io = tokio::select! {
        () = cancel.cancelled() => return,
        io = state.open_stream(open.clone()) => io,
    };
    let io = match io {
        Ok(io) => io,
        Err(error) => {
            tracing::info!(stream = id, error, "stream refused");
            let _ = tx.send(end(None, error)).await;
            cancel.cancel();
            return;
        }
    };
    let StreamIo {
        output,
        input: sink,
        control,
    } = io;
    // stdin is written by its own task, so a process that does not read its input never keeps
    // its output (and the windows that pace it) from flowing.
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_input(sink, stdin_rx, tx.clone(), id));
    let mut reader = tokio::spawn(relay_output(output, credit, tx.clone(), id));
    for i in early {
        match i {
            HubInput::Data(d) => {
                let _ = stdin_tx.send(Some(d));
            }
            HubInput::Eof => {
                let _ = stdin_tx.send(None);
            }
            HubInput::Resize(..) => {}
        }
    }
    let result = loop {
        tokio::select! {
            () = cancel.cancelled() => {
                reader.abort();
                writer.abort();
                return;
            }
            r = &mut reader => break r.unwrap_or_else(|e| Err(e.to_string())),
            i = input.recv() => match i {
                Some(HubInput::Data(d)) => { let _ = stdin_tx.send(Some(d)); }
                Some(HubInput::Eof) => { let _ = stdin_tx.send(None); }
                Some(HubInput::Resize(w, h)) => {
                    if let Err(error) = control.resize(w, h).await {
                        tracing::debug!(stream = id, error, "resize failed");
                    }
                }
                None => {
                    reader.abort();
                    writer.abort();
                    return;
                }
            },
        }
    };
    writer.abort();
    let message = match result {
        Ok(()) => match control.finish().await {
            Ok(code) => end(code, String::new()),
            Err(error) => end(None, error),
        },
        Err(error) => end(None, error),
    };
    let _ = tx.send(message).await;
    cancel.cancel();
}

async fn write_input(
    sink: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    mut rx: mpsc::UnboundedReceiver<Option<Bytes>>,
    tx: mpsc::Sender<v1::AgentMessage>,
    id: u64,
) {
    let mut sink = sink;
    while let Some(item) = rx.recv().await {
        match item {
            Some(data) => {
                let n = data.len();
                if let Some(s) = sink.as_mut()
                    && s.write_all(&data).await.is_err()
                {
                    sink = None;
                }
                // Written (or dropped, with no stdin): the hub may send as much again.
                let window = v1::StreamWindow {
                    stream_id: id,
                    bytes: u32::try_from(n).unwrap_or(u32::MAX),
                };
                if tx
                    .send(message(agent_message::Kind::StreamWindow(window)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            None => {
                if let Some(mut s) = sink.take() {
                    let _ = s.shutdown().await;
                }
            }
        }
    }
}

async fn relay_output(
    mut output: StreamOutput,
    credit: Arc<Semaphore>,
    tx: mpsc::Sender<v1::AgentMessage>,
    id: u64,
) -> Result<(), String> {
    while let Some(item) = output.next().await {
        let (channel, data) = item?;
        for chunk in data.chunks(fleetlet_proto::STREAM_CHUNK_BYTES) {
            let n = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            credit
                .acquire_many(n)
                .await
                .map_err(|_| "stream closed".to_string())?
                .forget();
            let data = v1::StreamData {
                stream_id: id,
                channel: channel as i32,
                data: data.slice_ref(chunk),
                eof: false,
            };
            tx.send(message(agent_message::Kind::StreamData(data)))
                .await
                .map_err(|_| "link closed".to_string())?;
        }
    }
    Ok(())
}
