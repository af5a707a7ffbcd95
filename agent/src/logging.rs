//! Tracing setup: journald (identifier `fleetlet-agent`, span/event fields as journal fields such
//! as `POD`, `NAMESPACE`, `CONTAINER`, `GENERATION`) when journald is there, stderr otherwise.

use std::path::Path;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// journald's native socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Where logs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// journald.
    Journald,
    /// stderr.
    Stderr,
}

/// Install the global subscriber. `RUST_LOG` overrides the default level `info`;
/// `FLEETLET_AGENT_LOG=stderr` forces stderr even when journald is there.
pub fn init() -> LogTarget {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let forced_stderr = std::env::var("FLEETLET_AGENT_LOG").is_ok_and(|v| v == "stderr");
    if !forced_stderr
        && Path::new(JOURNAL_SOCKET).exists()
        && let Ok(layer) = tracing_journald::layer()
    {
        // No field prefix: the journal gets POD=, NAMESPACE=, ... directly.
        let layer = layer
            .with_syslog_identifier("fleetlet-agent".into())
            .with_field_prefix(None);
        if tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init()
            .is_ok()
        {
            return LogTarget::Journald;
        }
        return LogTarget::Stderr;
    }
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
    LogTarget::Stderr
}
