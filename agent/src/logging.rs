//! Tracing setup: journald (identifier `fleetlet-agent`, span/event fields as journal fields such
//! as `POD`, `NAMESPACE`, `CONTAINER`, `GENERATION`, and `DEVICE` on every entry) when journald
//! is there, stderr otherwise.
//!
//! `FLEETLET_AGENT_LOG` chooses: unset or `auto` (journald when its socket exists, else stderr),
//! `journald`, `stderr`, or `journald+stderr` (both: the journal plus a copy on stderr, which the
//! demo keeps in a file).

use std::path::Path;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// journald's native socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// The variable that chooses where logs go.
pub const LOG_ENV: &str = "FLEETLET_AGENT_LOG";

/// Where logs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// journald.
    Journald,
    /// stderr.
    Stderr,
    /// journald, with a copy on stderr.
    JournaldAndStderr,
}

/// What `FLEETLET_AGENT_LOG` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Auto,
    Journald,
    Stderr,
    Both,
}

/// `FLEETLET_AGENT_LOG`'s value is not one of the known ones.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{LOG_ENV}={value:?} is not one of auto, journald, stderr, journald+stderr")]
pub struct LogChoiceError {
    /// The value found.
    pub value: String,
}

fn wanted(value: Option<&str>) -> Result<Wanted, LogChoiceError> {
    match value.map(str::trim) {
        None | Some("" | "auto") => Ok(Wanted::Auto),
        Some("journald") => Ok(Wanted::Journald),
        Some("stderr") => Ok(Wanted::Stderr),
        Some("journald+stderr" | "stderr+journald") => Ok(Wanted::Both),
        Some(other) => Err(LogChoiceError {
            value: other.to_owned(),
        }),
    }
}

/// Install the global subscriber for `device` (its name goes into every journal entry as
/// `DEVICE`, so `journalctl -t fleetlet-agent DEVICE=<name>` works where several agents share a
/// journal). `RUST_LOG` overrides the default level `info`. An unknown `FLEETLET_AGENT_LOG` value
/// is reported on stderr and treated as `auto`; journald requested but absent falls back to
/// stderr.
pub fn init(device: &str) -> LogTarget {
    let choice = std::env::var(LOG_ENV).ok();
    let wanted = wanted(choice.as_deref()).unwrap_or_else(|e| {
        fleetlet_proto::errln!("fleetlet-agent: {e}; using auto");
        Wanted::Auto
    });
    let journald = match wanted {
        Wanted::Stderr => None,
        Wanted::Auto | Wanted::Journald | Wanted::Both => Path::new(JOURNAL_SOCKET)
            .exists()
            .then(tracing_journald::layer)
            .and_then(Result::ok)
            .map(|layer| {
                // No field prefix: the journal gets POD=, NAMESPACE=, ... directly.
                layer
                    .with_syslog_identifier("fleetlet-agent".into())
                    .with_field_prefix(None)
                    .with_custom_fields([("DEVICE", device)])
            }),
    };
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let stderr = || {
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
    };
    let (result, target) = match (journald, wanted) {
        (Some(j), Wanted::Both) => (
            tracing_subscriber::registry()
                .with(j.and_then(stderr()).with_filter(filter()))
                .try_init(),
            LogTarget::JournaldAndStderr,
        ),
        (Some(j), _) => (
            tracing_subscriber::registry()
                .with(j.with_filter(filter()))
                .try_init(),
            LogTarget::Journald,
        ),
        (None, _) => (
            tracing_subscriber::registry()
                .with(stderr().with_filter(filter()))
                .try_init(),
            LogTarget::Stderr,
        ),
    };
    // A subscriber already installed (tests) keeps its target; nothing to report then.
    let _ = result;
    target
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_choice_is_parsed_and_unknown_values_named() {
        assert_eq!(wanted(None), Ok(Wanted::Auto));
        assert_eq!(wanted(Some("auto")), Ok(Wanted::Auto));
        assert_eq!(wanted(Some("stderr")), Ok(Wanted::Stderr));
        assert_eq!(wanted(Some("journald")), Ok(Wanted::Journald));
        assert_eq!(wanted(Some("journald+stderr")), Ok(Wanted::Both));
        let err = wanted(Some("syslog")).unwrap_err().to_string();
        assert!(err.contains("\"syslog\"") && err.contains(LOG_ENV), "{err}");
    }
}
