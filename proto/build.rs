//! Generates the fleetlet.v1 code. The .proto is parsed by `protox` (pure Rust), so building
//! fleetlet never needs `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "fleetlet/v1/link.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    tonic_prost_build::configure()
        .bytes(".fleetlet.v1")
        // The RPC is called `Connect`; the generated `DeviceLinkClient::connect(dst)` helper
        // would clash with it. Clients build a `Channel` themselves and call `new`.
        .build_transport(false)
        // Small per-stream buffers: see `LinkCodec`.
        .codec_path("crate::LinkCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
