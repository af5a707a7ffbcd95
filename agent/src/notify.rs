//! systemd readiness and watchdog notifications (sd_notify protocol), without libsystemd: one
//! datagram per message to the socket named by `NOTIFY_SOCKET`.

use std::path::PathBuf;
use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Where and how often to notify, from the environment systemd sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifier {
    socket: PathBuf,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` and `WATCHDOG_USEC` (honouring `WATCHDOG_PID`); `None` when systemd
    /// did not ask for notifications. Abstract sockets ("@...") are not supported without
    /// platform-specific code and are skipped.
    pub fn from_env() -> Option<Self> {
        let socket = std::env::var_os("NOTIFY_SOCKET")?;
        let socket = PathBuf::from(socket);
        if socket.as_os_str().to_string_lossy().starts_with('@') {
            return None;
        }
        let pid_ok = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|us| *us > 0 && pid_ok)
            .map(Duration::from_micros);
        Some(Self { socket, watchdog })
    }

    /// Send one notification, e.g. "READY=1".
    pub async fn send(&self, msg: &str) -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        sock.send_to(msg.as_bytes(), &self.socket).await.map(|_| ())
    }

    /// The watchdog interval systemd asked for.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Ping the watchdog at half its interval until `shutdown`.
    pub async fn keep_alive(self, shutdown: CancellationToken) {
        let Some(interval) = self.watchdog else {
            return;
        };
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = self.send("WATCHDOG=1").await {
                        debug!(error = %e, "watchdog notification failed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sends_ready_and_watchdog_datagrams_to_own_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: path.clone(),
            watchdog: Some(Duration::from_millis(100)),
        };
        n.send("READY=1").await.unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        let stop = CancellationToken::new();
        let task = tokio::spawn(n.keep_alive(stop.clone()));
        for _ in 0..2 {
            let len = tokio::time::timeout(Duration::from_secs(5), server.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..len], b"WATCHDOG=1");
        }
        stop.cancel();
        task.await.unwrap();
    }
}
