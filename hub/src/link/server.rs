//! The gRPC server: accepts mutual-TLS connections, admits inventory devices, and runs one
//! session per `Connect` stream.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fleetlet_proto::v1::device_link_server::{DeviceLink, DeviceLinkServer};
use fleetlet_proto::v1::{self, agent_message, hub_message};
use futures::stream::BoxStream;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codec::CompressionEncoding;
use tonic::{Code, Request, Response, Status, Streaming};
use tower_service::Service;

use super::sessions::{DeviceSlot, Registered, SessionHandle};
use super::tls::{ServerTls, device_identity_checked};
use super::{DeviceSessions, LinkError, LinkServerConfig, SessionEvent};
use crate::inventory::Inventory;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a connection, decided once after the handshake.
#[derive(Debug, Clone)]
pub(crate) struct PeerIdentity(pub(crate) Result<String, String>);

/// How long shutdown waits for streams to finish before connections are cut.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// A verified TLS connection plus the identity its client certificate carries. `killed` aborts
/// the connection when the drain deadline passes (a peer that keeps an idle connection open
/// must not hold up shutdown).
struct DeviceConn {
    io: TlsStream<TcpStream>,
    killed: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl DeviceConn {
    fn check_killed(&mut self, cx: &mut Context<'_>) -> Result<(), std::io::Error> {
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "hub shutting down",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for DeviceConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check_killed(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for DeviceConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check_killed(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Settings every session needs, fixed at start.
struct SessionSettings {
    hello_timeout: Duration,
    stall_timeout: Duration,
    budget: super::budget::BudgetConfig,
}

/// The `DeviceLink` service.
struct LinkService {
    sessions: DeviceSessions,
    inventory: Arc<dyn Inventory>,
    settings: Arc<SessionSettings>,
    shutdown: CancellationToken,
    leading: watch::Receiver<bool>,
}

/// A bound link listener, ready to serve. Binding first lets callers (and tests) learn the
/// actual port before serving.
pub struct LinkServer {
    listener: TcpListener,
    config: LinkServerConfig,
    tls: Arc<ServerTls>,
    leading: watch::Receiver<bool>,
}

impl LinkServer {
    /// Load the TLS material and bind `config.listen`.
    pub async fn bind(config: LinkServerConfig) -> Result<Self, LinkError> {
        let tls = Arc::new(ServerTls::load(&config)?);
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| LinkError::Listen {
                addr: config.listen,
                message: e.to_string(),
            })?;
        Ok(Self {
            listener,
            config,
            tls,
            // Without a gate the server always accepts (a hub without leader election).
            leading: watch::channel(true).1,
        })
    }

    /// Accept device streams only while `leading` is true; otherwise answer `UNAVAILABLE`
    /// ("not leader") so an agent moves on to its next hub endpoint. A standby replica listens
    /// (its port answers, its TLS works) but never holds a device session.
    pub fn gated(mut self, leading: watch::Receiver<bool>) -> Self {
        self.leading = leading;
        self
    }

    /// The address actually bound (resolves port 0).
    pub fn local_addr(&self) -> Result<std::net::SocketAddr, LinkError> {
        self.listener.local_addr().map_err(|e| LinkError::Listen {
            addr: self.config.listen,
            message: e.to_string(),
        })
    }

    /// Serve until `shutdown` fires; every session then ends with `Unavailable`.
    ///
    /// Connections are served by hyper's HTTP/2 server directly, one task per connection that
    /// first runs the TLS handshake and then the HTTP/2 connection (tonic's transport server
    /// would add a second task, a per-connection service stack and an HTTP/1 state per
    /// connection: a few KiB for every idle device).
    pub async fn serve(
        self,
        sessions: DeviceSessions,
        inventory: Arc<dyn Inventory>,
        shutdown: CancellationToken,
    ) -> Result<(), LinkError> {
        let config = self.config;
        let addr = self.listener.local_addr().unwrap_or(config.listen);
        tracing::info!(%addr, "device link listening");

        let service = LinkService {
            sessions: sessions.clone(),
            inventory: Arc::clone(&inventory),
            settings: Arc::new(SessionSettings {
                hello_timeout: Duration::from_secs(config.hello_timeout_secs.max(1)),
                stall_timeout: Duration::from_secs(config.stall_timeout_secs.max(1)),
                budget: config.device_budget,
            }),
            shutdown: shutdown.clone(),
            leading: self.leading,
        };
        let grpc = DeviceLinkServer::new(service)
            .max_decoding_message_size(fleetlet_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(fleetlet_proto::MAX_MESSAGE_BYTES)
            .accept_compressed(CompressionEncoding::Zstd)
            .accept_compressed(CompressionEncoding::Gzip);
        // gzip rather than zstd when asked: zstd compresses a little better but allocates a
        // larger context per message. See `compress_snapshots` for why it is off by default.
        let grpc = if config.compress_snapshots {
            grpc.send_compressed(CompressionEncoding::Gzip)
        } else {
            grpc
        };
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(
                config.keepalive_interval_secs.max(1),
            )))
            .keep_alive_timeout(Duration::from_secs(config.keepalive_timeout_secs.max(1)))
            // Small windows: a device that stops reading can pin at most this much per stream.
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(512 * 1024)
            .max_concurrent_streams(4);

        let connections = TaskTracker::new();
        let kill = CancellationToken::new();
        let accept = tokio::spawn(accept_loop(
            self.listener,
            Arc::clone(&self.tls),
            config.clone(),
            sessions.clone(),
            Arc::new(ConnServer {
                http2,
                grpc,
                connections: connections.clone(),
                shutdown: shutdown.clone(),
                kill: kill.clone(),
            }),
        ));
        let reload = tokio::spawn(reload_loop(
            Arc::clone(&self.tls),
            Duration::from_secs(config.reload_interval_secs.max(1)),
            shutdown.clone(),
        ));
        let watch = tokio::spawn(inventory_loop(
            Arc::clone(&inventory),
            sessions.clone(),
            shutdown.clone(),
        ));

        shutdown.cancelled().await;
        // The accept loop stops; every connection sends GOAWAY and finishes its streams, which
        // end with `Unavailable` (see `run_inbound`). A peer that keeps its connection open past
        // the deadline is cut.
        let _ = accept.await;
        connections.close();
        if tokio::time::timeout(DRAIN_DEADLINE, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(%addr, "link connections did not drain in time; cutting them");
            kill.cancel();
            connections.wait().await;
        }
        kill.cancel();
        reload.abort();
        watch.abort();
        tracing::info!(%addr, "device link stopped");
        Ok(())
    }
}

/// What every connection task needs to serve HTTP/2 on a verified TLS connection.
struct ConnServer {
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    grpc: DeviceLinkServer<LinkService>,
    connections: TaskTracker,
    shutdown: CancellationToken,
    kill: CancellationToken,
}

impl ConnServer {
    /// Serve one verified connection in its own task until it ends or the hub shuts down (then
    /// gracefully: GOAWAY, open streams finish, `kill` cuts what is left after the drain
    /// deadline).
    ///
    /// The connection is built here, outside any async fn, and boxed: moved through the locals
    /// of an async fn it would be copied (rustc keeps moved-from locals in the future's state),
    /// and that state lives as long as the device stays connected.
    fn spawn(&self, io: TlsStream<TcpStream>, identity: PeerIdentity, peer: SocketAddr) {
        let conn = DeviceConn {
            io,
            killed: Box::pin(self.kill.clone().cancelled_owned()),
        };
        let grpc = self.grpc.clone();
        let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
            request.extensions_mut().insert(identity.clone());
            let mut grpc = grpc.clone();
            grpc.call(request.map(tonic::body::Body::new))
        });
        let mut connection = Box::pin(self.http2.serve_connection(TokioIo::new(conn), service));
        let shutdown = self.shutdown.clone();
        let task = async move {
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "link connection ended");
            }
        };
        self.connections.spawn(task);
    }
}

/// Accept TCP connections, run each TLS handshake and then its HTTP/2 connection in its own
/// task (a slow or hostile client never holds up the others).
async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    config: LinkServerConfig,
    sessions: DeviceSessions,
    server: Arc<ConnServer>,
) {
    let stats = sessions.stats();
    let mut listener = fleetlet_os::net::Acceptor::new(listener, "device link");
    loop {
        let Some((tcp, peer)) = listener.accept(&server.shutdown).await else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let stats = Arc::clone(&stats);
        let source = config.identity_source;
        let prefix = config.identity_prefix.clone();
        let require_fingerprint = config.require_device_fingerprint;
        let conn_server = Arc::clone(&server);
        let task = async move {
            // This task ends after the handshake: `ConnServer::spawn` serves the connection in a
            // small task of its own.
            let io = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(io)) => io,
                Ok(Err(error)) => {
                    stats.handshakes_failed.inc();
                    tracing::warn!(%peer, %error, "link TLS handshake failed");
                    return;
                }
                Err(_) => {
                    stats.handshakes_failed.inc();
                    tracing::warn!(%peer, "link TLS handshake timed out");
                    return;
                }
            };
            let identity = io
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map_or_else(
                    || Err("no client certificate".to_owned()),
                    |leaf| device_identity_checked(leaf, source, &prefix, require_fingerprint),
                );
            conn_server.spawn(io, PeerIdentity(identity), peer);
        };
        server.connections.spawn(task);
    }
}

/// Pick up rotated TLS files and re-check expiry (about daily) while serving.
async fn reload_loop(tls: Arc<ServerTls>, every: Duration, shutdown: CancellationToken) {
    let expiry_every = (86_400 / every.as_secs().max(1)).max(1);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        ticks += 1;
        if !tls.reload_if_changed() && ticks.is_multiple_of(expiry_every) {
            tls.check_expiry();
        }
    }
}

/// Cut sessions of devices that leave the inventory or get disabled.
async fn inventory_loop(
    inventory: Arc<dyn Inventory>,
    sessions: DeviceSessions,
    shutdown: CancellationToken,
) {
    let mut devices = inventory.devices();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = devices.changed() => if changed.is_err() { return },
        }
        let current = devices.borrow_and_update().clone();
        let cut = sessions.cut_unadmitted(|name| current.get(name).is_some_and(|d| d.enabled));
        if cut > 0 {
            tracing::info!(
                sessions = cut,
                "cut sessions of devices that left the inventory"
            );
        }
    }
}

fn reject(sessions: &DeviceSessions, status: Status) -> Status {
    sessions.stats().streams_rejected.inc();
    status
}

/// A decode failure is the client's fault: say so instead of tonic's `Internal`.
fn classify_inbound_error(device: &str, status: Status) -> Status {
    match status.code() {
        Code::Internal if status.message().contains("decode") => Status::invalid_argument(format!(
            "malformed message from device {device}: {}",
            status.message()
        )),
        Code::OutOfRange | Code::ResourceExhausted => Status::resource_exhausted(format!(
            "message from device {device} exceeds the limit of {} bytes: {}",
            fleetlet_proto::MAX_MESSAGE_BYTES,
            status.message()
        )),
        _ => status,
    }
}

#[tonic::async_trait]
impl DeviceLink for LinkService {
    type ConnectStream = BoxStream<'static, Result<v1::HubMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let identity = request.extensions().get::<PeerIdentity>().cloned();
        let device = match identity {
            Some(PeerIdentity(Ok(device))) => device,
            Some(PeerIdentity(Err(why))) => {
                tracing::warn!(reason = %why, "link stream refused: no usable identity");
                return Err(reject(&self.sessions, Status::unauthenticated(why)));
            }
            None => {
                return Err(reject(
                    &self.sessions,
                    Status::unauthenticated("connection carries no verified client certificate"),
                ));
            }
        };
        if !*self.leading.borrow() {
            tracing::debug!(device, "link stream refused: this replica is a standby");
            return Err(reject(
                &self.sessions,
                Status::unavailable(format!(
                    "not leader: this fleetlet-hub replica is a standby; device {device} must connect to the leading replica"
                )),
            ));
        }
        if !self.inventory.admits(&device) {
            tracing::warn!(device, "link stream refused: device not in the inventory");
            return Err(reject(
                &self.sessions,
                fleetlet_proto::not_served(format!(
                    "device {device} is not in the hub's inventory or is disabled: this hub does not serve it"
                )),
            ));
        }
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(self.settings.hello_timeout, inbound.message()).await
        {
            Err(_) => {
                return Err(reject(
                    &self.sessions,
                    Status::deadline_exceeded(format!(
                        "device {device} sent no hello within {:?}",
                        self.settings.hello_timeout
                    )),
                ));
            }
            Ok(Err(status)) => {
                let status = classify_inbound_error(&device, status);
                tracing::warn!(device, %status, "link stream refused: bad first message");
                return Err(reject(&self.sessions, status));
            }
            Ok(Ok(None)) => {
                return Err(reject(
                    &self.sessions,
                    Status::cancelled(format!("device {device} closed the stream before hello")),
                ));
            }
            Ok(Ok(Some(message))) => message,
        };
        let hello = match first.kind {
            Some(agent_message::Kind::Hello(hello)) => hello,
            _ => {
                return Err(reject(
                    &self.sessions,
                    Status::invalid_argument(format!(
                        "device {device}: the first message on a stream must be hello"
                    )),
                ));
            }
        };
        if hello.device_name != device {
            tracing::warn!(
                device,
                claimed = hello.device_name,
                "link stream refused: hello names another device"
            );
            return Err(reject(
                &self.sessions,
                Status::permission_denied(format!(
                    "hello names device {:?} but the client certificate is for device {device:?}",
                    hello.device_name
                )),
            ));
        }
        tracing::info!(
            device,
            held_generation = hello.held_generation,
            agent_version = hello.agent_version,
            "device connected"
        );
        let Registered {
            handle,
            desired_rx,
            slot,
        } = self.sessions.register(&device, &hello).await;
        let (end_tx, end_rx) = oneshot::channel();
        let outbound = outbound_stream(
            self.sessions.clone(),
            Arc::clone(&slot),
            desired_rx,
            handle.clone(),
            end_rx,
        );
        let inbound_task = run_inbound(
            InboundSession {
                sessions: self.sessions.clone(),
                device,
                slot,
                handle,
                settings: Arc::clone(&self.settings),
                shutdown: self.shutdown.clone(),
            },
            inbound,
            end_tx,
        );
        tokio::spawn(inbound_task);
        Ok(Response::new(outbound))
    }
}

/// Hub → device: the newest snapshot whenever it changes (superseded ones are never queued),
/// plus log requests; ends with the status the inbound side decided.
fn outbound_stream(
    sessions: DeviceSessions,
    slot: Arc<DeviceSlot>,
    desired: tokio::sync::watch::Receiver<Option<Arc<v1::DesiredSnapshot>>>,
    control: SessionHandle,
    end: oneshot::Receiver<Option<Status>>,
) -> BoxStream<'static, Result<v1::HubMessage, Status>> {
    struct State {
        sessions: DeviceSessions,
        slot: Arc<DeviceSlot>,
        desired: tokio::sync::watch::Receiver<Option<Arc<v1::DesiredSnapshot>>>,
        control: SessionHandle,
        end: oneshot::Receiver<Option<Status>>,
        done: bool,
    }
    let state = State {
        sessions,
        slot,
        desired,
        control,
        end,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            tokio::select! {
                biased;
                end = &mut st.end => {
                    st.done = true;
                    return match end {
                        Ok(Some(status)) => Some((Err(status), st)),
                        _ => None,
                    };
                }
                message = st.control.next_control() => return Some((Ok(message), st)),
                changed = st.desired.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    let snapshot = st.desired.borrow_and_update().clone();
                    if let Some(snapshot) = snapshot {
                        st.sessions.record_sent(&st.slot, snapshot.generation);
                        let message = v1::HubMessage {
                            kind: Some(hub_message::Kind::Snapshot((*snapshot).clone())),
                        };
                        return Some((Ok(message), st));
                    }
                }
            }
        }
    }))
}

/// One session's inbound side and what it needs.
struct InboundSession {
    sessions: DeviceSessions,
    device: String,
    slot: Arc<DeviceSlot>,
    handle: SessionHandle,
    settings: Arc<SessionSettings>,
    shutdown: CancellationToken,
}

/// The snapshot the device has not taken yet and since when, if any.
fn pending_snapshot(
    slot: &DeviceSlot,
    newest: Option<u64>,
    timeout: Duration,
) -> Option<(u64, tokio::time::Instant)> {
    newest
        .filter(|generation| *generation > slot.sent())
        .map(|generation| (generation, tokio::time::Instant::now() + timeout))
}

/// Device → hub: acks, capacity, statuses, log chunks. Also watches for a stalled device and for
/// the session being cut. Ends the session and tells the outbound side how.
async fn run_inbound(
    session: InboundSession,
    mut inbound: Streaming<v1::AgentMessage>,
    end_tx: oneshot::Sender<Option<Status>>,
) {
    // This task lives as long as the session, so its state is paid per idle device: the
    // session is used in place (not destructured into copies), messages are boxed out of the
    // select and handled by a boxed future.
    let s = &session;
    let device = s.device.as_str();
    let mut desired = s.slot.subscribe_desired();
    let newest = |rx: &mut tokio::sync::watch::Receiver<Option<Arc<v1::DesiredSnapshot>>>| {
        rx.borrow_and_update().as_ref().map(|s| s.generation)
    };
    let mut stall = pending_snapshot(&s.slot, newest(&mut desired), s.settings.stall_timeout);
    let mut budget = super::budget::Budget::new(&s.settings.budget);
    let end: Option<Status> = loop {
        let stall_at = stall.map(|(_, at)| at);
        let step = tokio::select! {
            () = s.shutdown.cancelled() => {
                InboundStep::End(Some(Status::unavailable("hub is shutting down")))
            }
            () = s.handle.cancel.cancelled() => InboundStep::End(
                // Only a removal from the inventory cuts with PermissionDenied.
                s.handle.cut_reason().map(|(code, message)| match code {
                    Code::PermissionDenied => fleetlet_proto::not_served(message),
                    _ => Status::new(code, message),
                }),
            ),
            () = async {
                match stall_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => InboundStep::StallCheck,
            changed = desired.changed() => InboundStep::DesiredChanged(changed.is_ok()),
            message = inbound.message() => match message {
                Ok(Some(message)) => InboundStep::Message(Box::new(message)),
                Ok(None) => InboundStep::End(None),
                Err(status) => InboundStep::End(inbound_error(device, status)),
            },
        };
        match step {
            InboundStep::End(end) => break end,
            InboundStep::StallCheck => {
                let Some((generation, _)) = stall.take() else {
                    continue;
                };
                if s.slot.sent() < generation {
                    s.sessions.stats().sessions_cut_stalled.inc();
                    tracing::warn!(
                        device,
                        generation,
                        "device does not read its stream; session cut"
                    );
                    break Some(Status::resource_exhausted(format!(
                        "device {device} did not take snapshot {generation} within {:?}; session cut",
                        s.settings.stall_timeout
                    )));
                }
                stall = pending_snapshot(&s.slot, newest(&mut desired), s.settings.stall_timeout);
            }
            InboundStep::DesiredChanged(true) if stall.is_none() => {
                stall = pending_snapshot(&s.slot, newest(&mut desired), s.settings.stall_timeout);
            }
            InboundStep::DesiredChanged(true) => {
                desired.borrow_and_update();
            }
            InboundStep::DesiredChanged(false) => {}
            InboundStep::Message(message) => {
                // Log chunks are paced by their reader (bounded queues, HTTP/2 flow control)
                // and count as messages only; everything else also counts its bytes. Stream
                // output is paced by the windows the hub grants as its user reads (output past
                // them ends the stream), so it is not charged at all: a port-forward download
                // must not cut the device's session.
                let bytes = match &message.kind {
                    Some(agent_message::Kind::StreamData(_)) => None,
                    Some(
                        agent_message::Kind::LogChunk(_)
                        | agent_message::Kind::StreamWindow(_)
                        | agent_message::Kind::StreamEnd(_),
                    ) => Some(0),
                    _ => Some(prost::Message::encoded_len(message.as_ref())),
                };
                let charged = bytes.map_or(Ok(()), |bytes| budget.charge(bytes));
                if let Err(over) = charged {
                    s.sessions.stats().sessions_cut_over_budget.inc();
                    tracing::error!(
                        device,
                        budget = %over,
                        "device sent more than its input budget; session cut"
                    );
                    break Some(Status::resource_exhausted(format!(
                        "device {device} sent {over}; session cut"
                    )));
                }
                let handled = Box::pin(handle_message(
                    &s.sessions,
                    device,
                    &s.slot,
                    &s.handle,
                    *message,
                ));
                if let Err(status) = handled.await {
                    tracing::warn!(device, %status, "device sent an invalid message; session ended");
                    break Some(status);
                }
            }
        }
    };
    Box::pin(s.sessions.unregister(device, &s.slot, &s.handle)).await;
    tracing::info!(device, "device disconnected");
    let _ = end_tx.send(end);
}

/// What woke the inbound side of a session.
enum InboundStep {
    End(Option<Status>),
    StallCheck,
    DesiredChanged(bool),
    Message(Box<v1::AgentMessage>),
}

/// The end of a session whose inbound stream failed: a bad message is the device's fault and
/// answered with its status; anything else is a dropped link.
fn inbound_error(device: &str, status: Status) -> Option<Status> {
    let status = classify_inbound_error(device, status);
    match status.code() {
        Code::InvalidArgument | Code::ResourceExhausted => {
            tracing::warn!(device, %status, "bad message from device; session ended");
            Some(status)
        }
        _ => {
            tracing::info!(device, error = %status, "device link dropped");
            None
        }
    }
}

async fn handle_message(
    sessions: &DeviceSessions,
    device: &str,
    slot: &DeviceSlot,
    handle: &SessionHandle,
    message: v1::AgentMessage,
) -> Result<(), Status> {
    match message.kind {
        Some(agent_message::Kind::Hello(_)) => Err(Status::invalid_argument(format!(
            "device {device} sent a second hello on one stream"
        ))),
        Some(agent_message::Kind::Ack(ack)) => {
            let error = (!ack.error.is_empty()).then_some(ack.error);
            // A refused snapshot is not held: the device still holds its previous generation.
            if error.is_none() {
                sessions.record_ack(slot, ack.generation);
            }
            if let Some(error) = &error {
                tracing::warn!(
                    device,
                    generation = ack.generation,
                    error,
                    "device rejected snapshot"
                );
            } else {
                tracing::debug!(
                    device,
                    generation = ack.generation,
                    "device acknowledged snapshot"
                );
            }
            sessions
                .emit(SessionEvent::Acked {
                    device: device.to_owned(),
                    generation: ack.generation,
                    error,
                })
                .await;
            Ok(())
        }
        Some(agent_message::Kind::Capacity(capacity)) => {
            sessions
                .emit(SessionEvent::Capacity {
                    device: device.to_owned(),
                    capacity,
                })
                .await;
            Ok(())
        }
        Some(agent_message::Kind::PodStatus(report)) => {
            let inflight = slot
                .take_inflight(prost::Message::encoded_len(&report))
                .await;
            sessions
                .emit(SessionEvent::PodStatus {
                    device: device.to_owned(),
                    report,
                    inflight,
                })
                .await;
            Ok(())
        }
        Some(agent_message::Kind::Stats(stats)) => {
            sessions
                .emit(SessionEvent::Stats {
                    device: device.to_owned(),
                    stats,
                })
                .await;
            Ok(())
        }
        Some(agent_message::Kind::ResourceStats(stats)) => {
            // Figures only feed the kubelet API: a bad report is dropped, the session goes on.
            if let Err(error) = sessions.resource_stats().record(device, stats) {
                tracing::warn!(device, %error, "resource report dropped");
            }
            Ok(())
        }
        Some(agent_message::Kind::LogChunk(chunk)) => {
            sessions.route_log_chunk(device, handle, chunk).await;
            Ok(())
        }
        Some(agent_message::Kind::Events(batch)) => {
            let (epoch, seq) = (batch.epoch, batch.seq);
            sessions
                .emit(SessionEvent::Events {
                    device: device.to_owned(),
                    batch,
                })
                .await;
            // Taken: the relay checks and writes it from here. If the control queue is full the
            // ack is skipped; the device sends the batch again after its next reconnect and the
            // writer drops what it already wrote.
            handle.push_control(v1::HubMessage {
                kind: Some(hub_message::Kind::EventAck(v1::EventAck { epoch, seq })),
            });
            Ok(())
        }
        Some(
            kind @ (agent_message::Kind::StreamData(_)
            | agent_message::Kind::StreamWindow(_)
            | agent_message::Kind::StreamEnd(_)),
        ) => {
            super::streams::route(handle, kind);
            Ok(())
        }
        None => Err(Status::invalid_argument(format!(
            "device {device} sent an empty message"
        ))),
    }
}
