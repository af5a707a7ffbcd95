//! The Tokio runtime and the shutdown signals of a daemon, and what `/proc` shows of another process.

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

/// What `/proc` shows of another process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    /// It runs and its namespaces can be joined.
    Alive,
    /// It exited and its parent has not reaped it: no namespaces are left to join.
    Zombie,
    /// No such process in this PID namespace (gone, or never visible from here).
    Absent,
}

/// The state of process `pid` as `/proc/<pid>` shows it.
pub fn process_state(pid: i64) -> ProcessState {
    process_state_in(std::path::Path::new("/proc"), pid)
}

fn process_state_in(proc_root: &std::path::Path, pid: i64) -> ProcessState {
    let dir = proc_root.join(pid.to_string());
    let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
        return ProcessState::Absent;
    };
    // The command name (field 2) may hold spaces and parentheses: the state follows the last ')'.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    match state {
        Some("Z" | "X" | "x") => ProcessState::Zombie,
        // A process that is exiting has dropped its namespaces before it turns zombie.
        _ if std::fs::symlink_metadata(dir.join("ns").join("net")).is_err() => ProcessState::Zombie,
        _ => ProcessState::Alive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_a_missing_one_absent_and_a_zombie_is_seen() {
        assert_eq!(
            process_state(i64::from(std::process::id())),
            ProcessState::Alive
        );
        assert_eq!(process_state(i64::from(i32::MAX)), ProcessState::Absent);
        // A child that exited and is not waited for yet is a zombie.
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = i64::from(child.id());
        let mut seen = ProcessState::Alive;
        for _ in 0..200 {
            seen = process_state(pid);
            if seen == ProcessState::Zombie {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(seen, ProcessState::Zombie);
        child.wait().expect("wait");
        assert_eq!(process_state(pid), ProcessState::Absent);
    }

    #[test]
    fn the_state_follows_the_last_parenthesis_of_the_command_name() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("42");
        std::fs::create_dir_all(dir.join("ns")).expect("dir");
        std::fs::write(dir.join("stat"), "42 (a) Z (b) S 1 2").expect("stat");
        std::fs::write(dir.join("ns").join("net"), "").expect("ns");
        assert_eq!(process_state_in(root.path(), 42), ProcessState::Alive);
        std::fs::write(dir.join("stat"), "42 (a) S (b) Z 1 2").expect("stat");
        assert_eq!(process_state_in(root.path(), 42), ProcessState::Zombie);
    }
}
