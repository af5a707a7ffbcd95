//! The real `fleetlet-hub` binary's command line under a reader that went away: every
//! subcommand (`run` with a configuration error, each `pki` command, help and version) with
//! stdout or stderr a closed pipe ends without a panic and with its usual exit code. No stack
//! needed.

use std::process::{Command, Output, Stdio};

fn hub() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fleetlet-hub"))
}

/// Runs `args` with stdout (or stderr) a pipe whose reader is already closed.
fn with_closed(args: &[&str], stream: &str) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut cmd = hub();
    cmd.args(args);
    match stream {
        "stdout" => cmd.stdout(Stdio::from(writer)).stderr(Stdio::piped()),
        _ => cmd.stderr(Stdio::from(writer)).stdout(Stdio::piped()),
    };
    cmd.output().expect("runs")
}

#[test]
fn no_subcommand_panics_on_a_closed_pipe() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = dir.path().join("pki");
    let pki = pki.to_str().expect("utf-8 path");
    let bad = dir.path().join("hub.toml");
    std::fs::write(&bad, "[link]\nlisten = \"not an address\"\n").expect("config");
    let bad = bad.to_str().expect("utf-8 path");
    let cases: Vec<(Vec<&str>, i32)> = vec![
        (vec!["--help"], 0),
        (vec!["--version"], 0),
        (vec!["run", "--help"], 0),
        (vec!["pki", "--help"], 0),
        (vec!["run", "-c", bad], 64),
        (vec!["pki", "--dir", pki, "init", "--force"], 0),
        (
            vec!["pki", "--dir", pki, "issue-server", "--name", "127.0.0.1"],
            0,
        ),
        (vec!["pki", "--dir", pki, "issue-device", "dev-1"], 0),
        (vec!["pki", "--dir", pki, "issue-device", "../escape"], 1),
        (vec!["no-such-command"], 2),
    ];
    for (args, code) in &cases {
        for stream in ["stdout", "stderr"] {
            let out = with_closed(args, stream);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !stderr.contains("panicked") && out.status.code() != Some(101),
                "fleetlet-hub {args:?} with {stream} closed panicked ({}): {stderr}",
                out.status
            );
            assert_eq!(
                out.status.code(),
                Some(*code),
                "fleetlet-hub {args:?} with {stream} closed: {stderr}"
            );
        }
    }
    // The files were written even though nobody read "wrote ...".
    assert!(dir.path().join("pki/devices/dev-1.pem").exists());
}
