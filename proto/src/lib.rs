//! The fleetlet.v1 agent-hub contract: generated message types and the `DeviceLink` service.
//!
//! See `fleetlet/v1/link.proto` for what every message means and who sends it. Also the plumbing
//! both ends of the link share: retry [`backoff`], TLS material on disk ([`pem`]) and the command
//! line tools' output that a closed pipe does not crash ([`stdio`]).
#![forbid(unsafe_code)]

pub mod backoff;
pub mod pem;
pub mod percent;
pub mod stdio;

/// Generated code for the `fleetlet.v1` package.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("fleetlet.v1");
}

/// An error and its causes on one line, joined by `": "` (tonic's and hyper's transport errors
/// hide the useful part in their sources).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// gRPC metadata key by which the hub says why it refuses a device (see [`not_served`]).
pub const REFUSAL_METADATA: &str = "fleetlet-refusal";

/// Value of [`REFUSAL_METADATA`] when the hub does not serve the device at all: it is not (or no
/// longer) in the hub's inventory, or disabled there. Not a transient error: an agent reports it
/// as such and, if configured to, eventually stops the pods it ran for that hub.
pub const NOT_SERVED: &str = "not-served";

/// The status the hub ends a stream with when it does not serve the device.
pub fn not_served(message: impl Into<String>) -> tonic::Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(
        REFUSAL_METADATA,
        tonic::metadata::MetadataValue::from_static(NOT_SERVED),
    );
    tonic::Status::with_metadata(tonic::Code::PermissionDenied, message, metadata)
}

/// Whether `status` is the hub's [`not_served`] refusal.
pub fn is_not_served(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::PermissionDenied
        && status
            .metadata()
            .get(REFUSAL_METADATA)
            .is_some_and(|v| v == NOT_SERVED)
}

/// Bytes of input the hub may send on a stream before the device grants more (`StreamWindow`).
pub const STREAM_INPUT_WINDOW: u32 = 256 * 1024;

/// Most bytes one `StreamData` message carries; larger writes are split.
pub const STREAM_CHUNK_BYTES: usize = 32 * 1024;

/// Upper bound on one decoded message, in bytes. A snapshot bigger than this is a bug or an
/// attack either way; both sides reject it with a clear status instead of allocating.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The gRPC codec of the link: prost, with small initial buffers. tonic's default allocates
/// 8 KiB per direction and stream up front and keeps it for the stream's life; a hub holding
/// thousands of mostly idle device streams pays that per device. Buffers still grow on demand
/// for big messages.
#[derive(Debug)]
pub struct LinkCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for LinkCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// Initial per-stream codec buffer; most link messages (acks, status deltas) fit.
const CODEC_BUFFER_BYTES: usize = 1024;
/// Encoded bytes gathered before they are handed to HTTP/2 (tonic's default).
const CODEC_YIELD_BYTES: usize = 32 * 1024;

impl<T, U> tonic::codec::Codec for LinkCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(tonic::codec::BufferSettings::new(
            CODEC_BUFFER_BYTES,
            CODEC_YIELD_BYTES,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(tonic::codec::BufferSettings::new(
            CODEC_BUFFER_BYTES,
            CODEC_YIELD_BYTES,
        ))
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("transport error")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn an_error_chain_names_every_cause() {
        let e = Outer(std::io::Error::other("connection refused"));
        assert_eq!(
            super::error_chain(&e),
            "transport error: connection refused"
        );
        let plain = std::io::Error::other("alone");
        assert_eq!(super::error_chain(&plain), "alone");
    }
}
