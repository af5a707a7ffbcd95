//! One connection to the hub: TLS connector, hello, and the session loop.

use fleetlet_proto::error_chain;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fleetlet_proto::v1::device_link_client::DeviceLinkClient;
use fleetlet_proto::v1::{self, agent_message, hub_message};
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Endpoint, Uri};

use super::{DeviceState, LinkClientError, LinkConfig, PodStatusMap};

/// Messages queued towards the hub before the session loop waits (flow control beyond this is
/// HTTP/2's job).
const OUTBOUND_QUEUE: usize = 32;
/// Connect (TCP + TLS) must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// First and longest wait before storing a snapshot again that the device failed to store.
const STORE_RETRY_FIRST: Duration = Duration::from_secs(1);
const STORE_RETRY_MAX: Duration = Duration::from_secs(30);
/// Pod Events recorded within this long after the first go out as one batch.
const EVENT_BATCH_DELAY: Duration = Duration::from_millis(100);

/// A snapshot the device could not store (full or failing state directory). The hub sends a
/// generation once per session, so the link retries it with backoff and acknowledges it when
/// storage works again: the device catches up by itself, without a reconnect or a new rollout.
struct PendingSnapshot {
    snapshot: v1::DesiredSnapshot,
    wait: Duration,
    next: tokio::time::Instant,
}

impl PendingSnapshot {
    fn new(snapshot: v1::DesiredSnapshot) -> Self {
        Self {
            snapshot,
            wait: STORE_RETRY_FIRST,
            next: tokio::time::Instant::now() + STORE_RETRY_FIRST,
        }
    }

    fn back_off(mut self) -> Self {
        self.wait = (self.wait * 2).min(STORE_RETRY_MAX);
        self.next = tokio::time::Instant::now() + self.wait;
        self
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Where to connect: `host:port` for TCP and the name the hub's certificate must carry.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) authority: String,
    pub(crate) server_name: ServerName<'static>,
}

impl Target {
    pub(crate) fn parse(cfg: &LinkConfig) -> Result<Self, LinkClientError> {
        let invalid = |message: &str| LinkClientError::Endpoint {
            endpoint: cfg.endpoint.clone(),
            message: message.to_owned(),
        };
        let uri: Uri = cfg
            .endpoint
            .parse()
            .map_err(|e: tonic::codegen::http::uri::InvalidUri| invalid(&e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(invalid("the hub endpoint must be https://host:port"));
        }
        let host = uri.host().ok_or_else(|| invalid("no host"))?;
        let port = uri.port_u16().unwrap_or(443);
        let host_bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = cfg
            .server_name
            .clone()
            .unwrap_or_else(|| host_bare.to_owned());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| invalid(&format!("server name {name:?}: {e}")))?;
        Ok(Self {
            authority: format!("{host}:{port}"),
            server_name,
        })
    }
}

/// Opens TCP + TLS 1.3 to the hub for tonic (which then speaks HTTP/2 over it).
#[derive(Clone)]
struct TlsConnector {
    target: Target,
    config: Arc<rustls::ClientConfig>,
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let target = self.target.clone();
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.config));
        Box::pin(async move {
            let tcp = TcpStream::connect(&target.authority).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(target.server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// How a session ended without an error.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The hub closed the stream cleanly.
    ClosedByHub,
}

/// Connect once and run the session until it ends. `on_connected` fires once the hub has
/// accepted the hello (the caller resets its backoff then).
pub(crate) async fn run_session(
    cfg: &LinkConfig,
    target: &Target,
    tls: Arc<rustls::ClientConfig>,
    state: &Arc<dyn DeviceState>,
    shutdown: &CancellationToken,
    on_connected: impl FnOnce(),
) -> Result<SessionEnd, LinkClientError> {
    let endpoint = Endpoint::from_shared(format!("http://{}", target.authority))
        .map_err(|e| LinkClientError::Endpoint {
            endpoint: cfg.endpoint.clone(),
            message: e.to_string(),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(cfg.keepalive_interval_secs.max(1)))
        .keep_alive_timeout(Duration::from_secs(cfg.keepalive_timeout_secs.max(1)))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(1024 * 1024))
        .initial_connection_window_size(Some(2 * 1024 * 1024));
    let connector = TlsConnector {
        target: target.clone(),
        config: tls,
    };
    let channel = tokio::select! {
        () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        channel = endpoint.connect_with_connector(connector) => channel.map_err(|e| LinkClientError::Connect {
            endpoint: cfg.endpoint.clone(),
            message: error_chain(&e),
        })?,
    };
    let mut client = DeviceLinkClient::new(channel)
        .max_decoding_message_size(fleetlet_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fleetlet_proto::MAX_MESSAGE_BYTES)
        .accept_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);

    let device = state.device_name();
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(OUTBOUND_QUEUE);
    let hello = v1::Hello {
        device_name: device.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        boot_id: state.hello_info().boot_id,
        held_generation: state.held_generation(),
        node_info: Some(state.hello_info()),
    };
    let held = hello.held_generation;
    send(&tx, agent_message::Kind::Hello(hello)).await?;
    let response = tokio::select! {
        () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        response = client.connect(tokio_stream_from(rx)) => response.map_err(|status| {
            if fleetlet_proto::is_not_served(&status) {
                LinkClientError::NotServed { endpoint: cfg.endpoint.clone(), message: status_text(&status) }
            } else {
                LinkClientError::Rejected {
                    endpoint: cfg.endpoint.clone(),
                    code: status.code(),
                    message: status_text(&status),
                }
            }
        })?,
    };
    let mut inbound = response.into_inner();
    tracing::info!(device, held_generation = held, "connected to hub");
    on_connected();

    // Full resync: whatever was lost while disconnected is covered by sending the current level.
    let mut capacity = state.capacity();
    let mut pods = state.pod_statuses();
    let current_capacity = capacity.borrow_and_update().clone();
    send(&tx, agent_message::Kind::Capacity(current_capacity)).await?;
    let mut last_pods = pods.borrow_and_update().clone();
    send(&tx, full_report(&last_pods)).await?;

    let mut logs: HashMap<u64, CancellationToken> = HashMap::new();
    let mut streams = super::streams::Streams::default();
    let mut pending: Option<PendingSnapshot> = None;
    let session_end = CancellationToken::new();
    let _stop_logs = session_end.clone().drop_guard();
    // Reconcile figures go out at most once a minute, and only when passes happened.
    let stats = state.reconcile_stats();
    let mut stats_tick = tokio::time::interval(Duration::from_secs(cfg.stats_interval_secs.max(1)));
    stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stats_sent: Option<u64> = None;
    // Resource figures: each new reading once (one message per `[stats]` interval); the one
    // taken while disconnected goes out first.
    let mut figures = state.resource_stats();
    let first = figures.as_mut().and_then(|f| f.borrow_and_update().clone());
    if let Some(r) = first {
        send(&tx, agent_message::Kind::ResourceStats((*r).clone())).await?;
    }
    // Events not acknowledged by the previous session's hub go out again (the hub knows a
    // repeat by its id and count).
    let events = state.events();
    if let Some(events) = &events {
        events.reconnected();
    }
    let mut events_due: Option<tokio::time::Instant> = None;
    let mut events_dropped_logged = events.as_ref().map_or(0, |e| e.counts().dropped);
    if events_dropped_logged > 0 {
        tracing::warn!(
            device,
            dropped_total = events_dropped_logged,
            "pod Events dropped while the hub could not take them (events_buffer full); the hub is told the count"
        );
    }
    loop {
        tokio::select! {
            changed = async { figures.as_mut()?.changed().await.ok() }, if figures.is_some() => {
                let latest = match (changed, figures.as_mut()) {
                    (Some(()), Some(f)) => f.borrow_and_update().clone(),
                    _ => {
                        figures = None;
                        None
                    }
                };
                if let Some(r) = latest {
                    send(&tx, agent_message::Kind::ResourceStats((*r).clone())).await?;
                }
            }
            () = async {
                match &events {
                    Some(events) => events.changed().await,
                    None => std::future::pending().await,
                }
            }, if events_due.is_none() => {
                // What a pass records comes in a burst (Pulled, Created, Started): one batch.
                events_due = Some(tokio::time::Instant::now() + EVENT_BATCH_DELAY);
            }
            () = sleep_until(events_due) => {
                events_due = None;
                if let Some(events) = &events {
                    while let Some(batch) = events.take_batch() {
                        if batch.dropped_total > events_dropped_logged {
                            tracing::warn!(device, dropped_total = batch.dropped_total, "pod Events dropped while the hub could not take them (events_buffer full); the hub is told the count");
                            events_dropped_logged = batch.dropped_total;
                        }
                        tracing::debug!(device, seq = batch.seq, events = batch.events.len(), "sending events");
                        send(&tx, agent_message::Kind::Events(batch)).await?;
                    }
                }
            }
            _ = stats_tick.tick(), if stats.is_some() => {
                if let Some(stats) = &stats
                    && stats_sent != Some(stats.passes())
                {
                    let r = stats.take();
                    stats_sent = Some(r.passes);
                    send(&tx, agent_message::Kind::Stats(v1::AgentStats {
                        reconcile_passes: r.passes,
                        reconcile_seconds_sum: r.seconds_sum,
                        reconcile_seconds_max: r.seconds_max,
                    })).await?;
                }
            }
            () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            () = sleep_until(pending.as_ref().map(|p| p.next)) => {
                if let Some(p) = pending.take() {
                    pending = retry_store(state, &device, &tx, p).await?;
                }
            }
            message = inbound.message() => match message {
                Ok(Some(message)) => {
                    if let Some(message) = streams.handle(state, &tx, &session_end, message) {
                        handle_hub_message(state, &device, &tx, &mut logs, &mut pending, &session_end, message).await?;
                    }
                }
                Ok(None) => return Ok(SessionEnd::ClosedByHub),
                Err(status) if fleetlet_proto::is_not_served(&status) => {
                    return Err(LinkClientError::NotServed {
                        endpoint: cfg.endpoint.clone(),
                        message: status_text(&status),
                    });
                }
                Err(status) => return Err(LinkClientError::Stream {
                    endpoint: cfg.endpoint.clone(),
                    code: status.code(),
                    message: status_text(&status),
                }),
            },
            changed = capacity.changed() => {
                if changed.is_ok() {
                    let current = capacity.borrow_and_update().clone();
                    send(&tx, agent_message::Kind::Capacity(current)).await?;
                }
            }
            changed = pods.changed() => {
                if changed.is_ok() {
                    let current = pods.borrow_and_update().clone();
                    if let Some(report) = delta_report(&last_pods, &current) {
                        send(&tx, report).await?;
                    }
                    last_pods = current;
                }
            }
        }
        logs.retain(|_, token| !token.is_cancelled());
    }
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<v1::AgentMessage>,
) -> impl futures::Stream<Item = v1::AgentMessage> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn send(
    tx: &mpsc::Sender<v1::AgentMessage>,
    kind: agent_message::Kind,
) -> Result<(), LinkClientError> {
    tx.send(v1::AgentMessage { kind: Some(kind) })
        .await
        .map_err(|_| LinkClientError::StreamClosed)
}

fn full_report(pods: &PodStatusMap) -> agent_message::Kind {
    agent_message::Kind::PodStatus(v1::PodStatusReport {
        full: true,
        pods: pods.values().cloned().collect(),
    })
}

/// Only what changed since the last report (`None` when nothing did); a pod that vanished from
/// the map without a `removed` entry can only be conveyed by a full report.
fn delta_report(before: &PodStatusMap, after: &PodStatusMap) -> Option<agent_message::Kind> {
    if before.keys().any(|uid| !after.contains_key(uid)) {
        return Some(full_report(after));
    }
    let changed: Vec<_> = after
        .iter()
        .filter(|(uid, entry)| before.get(*uid) != Some(*entry))
        .map(|(_, entry)| entry.clone())
        .collect();
    (!changed.is_empty()).then_some(agent_message::Kind::PodStatus(v1::PodStatusReport {
        full: false,
        pods: changed,
    }))
}

/// Stores a snapshot that failed before; acknowledges it once stored, else backs off again.
async fn retry_store(
    state: &Arc<dyn DeviceState>,
    device: &str,
    tx: &mpsc::Sender<v1::AgentMessage>,
    pending: PendingSnapshot,
) -> Result<Option<PendingSnapshot>, LinkClientError> {
    let generation = pending.snapshot.generation;
    match state.apply_snapshot(pending.snapshot.clone()).await {
        Ok(stored) => {
            let held = state.held_generation();
            tracing::info!(
                device,
                generation,
                held,
                stored,
                "desired snapshot stored after an earlier failure"
            );
            let ack = v1::Ack {
                generation: if stored { generation } else { held },
                error: String::new(),
            };
            send(tx, agent_message::Kind::Ack(ack)).await?;
            Ok(None)
        }
        Err(error) => {
            let pending = pending.back_off();
            tracing::warn!(
                device,
                generation,
                error,
                retry_in_secs = pending.wait.as_secs(),
                "storing desired snapshot failed again; running pods are kept"
            );
            Ok(Some(pending))
        }
    }
}

async fn handle_hub_message(
    state: &Arc<dyn DeviceState>,
    device: &str,
    tx: &mpsc::Sender<v1::AgentMessage>,
    logs: &mut HashMap<u64, CancellationToken>,
    pending: &mut Option<PendingSnapshot>,
    session_end: &CancellationToken,
    message: v1::HubMessage,
) -> Result<(), LinkClientError> {
    match message.kind {
        Some(hub_message::Kind::Snapshot(snapshot)) => {
            let generation = snapshot.generation;
            let pods = snapshot.pods.len();
            tracing::debug!(device, generation, pods, "desired snapshot received");
            // A newer snapshot supersedes one that is waiting for storage to work again.
            let retained = pending.take();
            let copy = snapshot.clone();
            // Persist first: the ack promises the hub that the device holds this generation.
            let ack = match state.apply_snapshot(snapshot).await {
                Ok(true) => {
                    tracing::info!(device, generation, pods, "desired snapshot stored");
                    v1::Ack {
                        generation,
                        error: String::new(),
                    }
                }
                Ok(false) => {
                    // Not newer than what is held: a waiting older snapshot stays waiting.
                    if let Some(p) = retained
                        && p.snapshot.generation > state.held_generation()
                    {
                        *pending = Some(p);
                    }
                    let held = state.held_generation();
                    tracing::debug!(
                        device,
                        generation,
                        held,
                        "snapshot not newer than held; ignored"
                    );
                    v1::Ack {
                        generation: held,
                        error: String::new(),
                    }
                }
                Err(error) => {
                    tracing::error!(
                        device,
                        generation,
                        error,
                        "storing desired snapshot failed; running pods are kept, retrying"
                    );
                    *pending = Some(match retained {
                        // Keep the backoff when the hub resends while storage still fails.
                        Some(p) if p.snapshot.generation <= generation => PendingSnapshot {
                            snapshot: copy,
                            ..p
                        },
                        _ => PendingSnapshot::new(copy),
                    });
                    v1::Ack { generation, error }
                }
            };
            send(tx, agent_message::Kind::Ack(ack)).await
        }
        Some(hub_message::Kind::LogRequest(request)) => {
            let request_id = request.request_id;
            let token = session_end.child_token();
            if let Some(previous) = logs.insert(request_id, token.clone()) {
                previous.cancel();
            }
            tokio::spawn(stream_logs(Arc::clone(state), request, tx.clone(), token));
            Ok(())
        }
        Some(hub_message::Kind::EventAck(ack)) => {
            if let Some(events) = state.events() {
                events.ack(ack.epoch, ack.seq);
            }
            Ok(())
        }
        Some(hub_message::Kind::StatsRequest(request)) => {
            state.want_stats(request.for_secs);
            Ok(())
        }
        Some(hub_message::Kind::LogCancel(cancel)) => {
            if let Some(token) = logs.remove(&cancel.request_id) {
                token.cancel();
            }
            Ok(())
        }
        None => {
            tracing::warn!(device, "hub sent an empty message; ignored");
            Ok(())
        }
        Some(_) => Ok(()),
    }
}

/// Relay one container log to the hub until it ends or is cancelled.
async fn stream_logs(
    state: Arc<dyn DeviceState>,
    request: v1::LogRequest,
    tx: mpsc::Sender<v1::AgentMessage>,
    cancel: CancellationToken,
) {
    let request_id = request.request_id;
    let chunk = |data: bytes::Bytes, eof: bool, error: String| v1::AgentMessage {
        kind: Some(agent_message::Kind::LogChunk(v1::LogChunk {
            request_id,
            data,
            eof,
            error,
        })),
    };
    let mut stream = match state.logs(request).await {
        Ok(stream) => stream,
        Err(error) => {
            let _ = tx.send(chunk(bytes::Bytes::new(), true, error)).await;
            return;
        }
    };
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => return,
            next = stream.next() => next,
        };
        let message = match next {
            Some(Ok(data)) => chunk(data, false, String::new()),
            Some(Err(error)) => {
                let _ = tx.send(chunk(bytes::Bytes::new(), true, error)).await;
                return;
            }
            None => {
                let _ = tx
                    .send(chunk(bytes::Bytes::new(), true, String::new()))
                    .await;
                return;
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            sent = tx.send(message) => if sent.is_err() { return },
        }
    }
}

/// A status's message plus its causes: for transport failures tonic's message is only
/// "transport error" and the reason (TLS alert, keepalive timeout) is in the source chain.
fn status_text(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn entry(uid: &str, phase: &str) -> v1::PodStatusEntry {
        v1::PodStatusEntry {
            uid: uid.into(),
            status_json: bytes::Bytes::from(phase.to_owned()),
            ..Default::default()
        }
    }

    fn map(entries: &[v1::PodStatusEntry]) -> PodStatusMap {
        Arc::new(
            entries
                .iter()
                .map(|e| (e.uid.clone(), e.clone()))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    #[test]
    fn deltas_carry_only_changes_and_vanished_pods_force_a_full_report() {
        let before = map(&[entry("a", "Running"), entry("b", "Pending")]);
        assert!(delta_report(&before, &before).is_none());
        let changed = map(&[entry("a", "Running"), entry("b", "Running")]);
        let Some(agent_message::Kind::PodStatus(report)) = delta_report(&before, &changed) else {
            panic!("expected a report")
        };
        assert!(!report.full);
        assert_eq!(report.pods, vec![entry("b", "Running")]);
        let vanished = map(&[entry("a", "Running")]);
        let Some(agent_message::Kind::PodStatus(report)) = delta_report(&before, &vanished) else {
            panic!("expected a report")
        };
        assert!(report.full);
        assert_eq!(report.pods, vec![entry("a", "Running")]);
    }

    #[test]
    fn endpoint_must_be_https_with_a_host() {
        let cfg = |endpoint: &str| LinkConfig::new(endpoint, "ca", "cert", "key");
        let target = Target::parse(&cfg("https://hub.example:7443")).unwrap();
        assert_eq!(target.authority, "hub.example:7443");
        assert!(Target::parse(&cfg("http://hub.example:7443")).is_err());
        assert!(Target::parse(&cfg("hub.example")).is_err());
        let mut named = cfg("https://127.0.0.1:7443");
        named.server_name = Some("hub.internal".into());
        assert_eq!(
            Target::parse(&named).unwrap().server_name,
            ServerName::try_from("hub.internal").unwrap()
        );
    }
}
