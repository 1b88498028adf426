//! Generates the tonic/prost code for `cluster.proto`.
//!
//! `protoc` comes from the `protoc-bin-vendored` crate so that a fresh
//! machine needs nothing but cargo to build the workspace.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY of intent: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/cluster.proto");
    tonic_prost_build::configure()
        .bytes(".cluster.Forwarded.xml")
        .compile_protos(&["proto/cluster.proto"], &["proto"])?;
    Ok(())
}
