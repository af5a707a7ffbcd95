//! One accept loop for every listener.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The first pause after a failed accept.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause between accepts while they keep failing.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// Accepts connections on one listener. A failed accept (EMFILE/ENFILE when the process is out
/// of descriptors, ENOBUFS, ECONNABORTED ...) is logged and followed by a pause that doubles
/// while failures continue (5 ms up to 1 s) and resets after a success: the listener never
/// spins on an error that only time (connections closing) can clear.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    what: &'static str,
    pause: Duration,
    failures: u64,
}

impl Acceptor {
    /// Accepts on `listener`; `what` names it in logs (e.g. `"kubelet endpoint"`).
    pub fn new(listener: TcpListener, what: &'static str) -> Self {
        Self {
            listener,
            what,
            pause: FIRST_PAUSE,
            failures: 0,
        }
    }

    /// The next connection, or `None` once `shutdown` fires.
    pub async fn accept(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return None,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok(pair) => {
                    if self.failures > 0 {
                        tracing::info!(
                            listener = self.what,
                            failures = self.failures,
                            "accepting again"
                        );
                    }
                    self.pause = FIRST_PAUSE;
                    self.failures = 0;
                    return Some(pair);
                }
                Err(error) => {
                    self.failures += 1;
                    // Once per doubling: a descriptor shortage does not flood the log.
                    if self.failures.is_power_of_two() {
                        tracing::warn!(listener = self.what, %error, failures = self.failures, pause_ms = self.pause.as_millis(), "accept failed; pausing");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(self.pause) => {}
                    }
                    self.pause = (self.pause * 2).min(LONGEST_PAUSE);
                }
            }
        }
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepts_and_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut acceptor = Acceptor::new(listener, "test");
        let shutdown = CancellationToken::new();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await });
        let (_, peer) = acceptor.accept(&shutdown).await.expect("a connection");
        assert!(peer.ip().is_loopback());
        client.await.expect("join").expect("connect");
        shutdown.cancel();
        assert!(acceptor.accept(&shutdown).await.is_none());
    }
}
