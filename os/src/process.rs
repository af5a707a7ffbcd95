//! The Tokio runtime and the shutdown signals of a daemon.

use std::future::Future;

use tokio_util::sync::CancellationToken;

/// Which Tokio runtime a daemon runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// One thread (the agent: small footprint on a device).
    CurrentThread,
    /// One worker per core (the hub).
    MultiThread,
}

/// Builds the runtime, cancels the token handed to `main` on SIGTERM or SIGINT (logged as
/// `shutting down`), and runs `main` to its end: the one place a daemon's shutdown starts.
pub fn run_until_signalled<F, T, E>(
    runtime: Runtime,
    main: impl FnOnce(CancellationToken) -> F,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
    E: From<std::io::Error>,
{
    let runtime = match runtime {
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Runtime::MultiThread => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            terminated().await;
            tracing::info!("shutting down");
            signals.cancel();
        });
        main(shutdown).await
    })
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
