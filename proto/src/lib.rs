//! The fleetlet.v1 agent-hub contract: generated message types and the `DeviceLink` service.
//!
//! See `fleetlet/v1/link.proto` for what every message means and who sends it. Also the plumbing
//! both ends of the link share: retry [`backoff`], TLS material on disk ([`pem`]) and the command
//! line tools' output that a closed pipe does not crash ([`stdio`]).
#![forbid(unsafe_code)]

pub mod backoff;
pub mod pem;
pub mod stdio;

/// Generated code for the `fleetlet.v1` package.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("fleetlet.v1");
}

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
