//! Output of the command-line tools (`fleetlet-agent`, `fleetlet-hub`) that survives a reader
//! going away. Rust ignores SIGPIPE, so writing to a closed pipe (`fleetlet-agent status | head
//! -1`) fails with `BrokenPipe`, and `println!` turns that into a panic. Here a closed pipe ends
//! the output quietly, as with the usual Unix tools, and other write errors are returned.

use std::io::{ErrorKind, Write};

/// Writes `text` to stdout and flushes. A closed pipe is not an error (the reader has what it
/// wanted); any other failure (disk full behind a redirect) is returned.
pub fn out(text: &str) -> std::io::Result<()> {
    ignore_broken_pipe(write_all(&mut std::io::stdout().lock(), text))
}

/// Writes `text` to stderr. Errors are dropped: there is nowhere left to report them.
pub fn err(text: &str) {
    let _ = write_all(&mut std::io::stderr().lock(), text);
}

fn write_all(w: &mut impl Write, text: &str) -> std::io::Result<()> {
    w.write_all(text.as_bytes())?;
    w.flush()
}

fn ignore_broken_pipe(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// `println!` to stdout through [`out`]: evaluates to its `io::Result`.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::stdio::out(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` through [`err`]: never panics.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::stdio::err(&format!("{}\n", format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    struct Full;
    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(28))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_ends_output_quietly_other_errors_are_returned() {
        assert!(ignore_broken_pipe(write_all(&mut Closed, "x")).is_ok());
        let e = ignore_broken_pipe(write_all(&mut Full, "x")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28));
    }
}
