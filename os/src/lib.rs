//! What the hub and the agent need from the operating system, written once for both:
//!
//! - [`fs`]: crash-safe file writes (temp file in the same directory, fsync, rename, fsync of
//!   the directory), so a crash leaves either the old or the new content, never a torn file;
//! - [`net`]: one accept loop for every listener, backing off when the process is out of file
//!   descriptors (EMFILE) instead of spinning on the error;
//! - [`process`]: the Tokio runtime and the shutdown signals (SIGTERM, SIGINT) of a daemon.
#![forbid(unsafe_code)]

pub mod fs;
pub mod net;
pub mod process;
