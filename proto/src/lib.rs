//! The fleetlet.v1 agent-hub contract: generated message types and the `DeviceLink` service.
//!
//! See `fleetlet/v1/link.proto` for what every message means and who sends it.
#![forbid(unsafe_code)]

/// Generated code for the `fleetlet.v1` package.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("fleetlet.v1");
}

/// Upper bound on one decoded message, in bytes. A snapshot bigger than this is a bug or an
/// attack either way; both sides reject it with a clear status instead of allocating.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
