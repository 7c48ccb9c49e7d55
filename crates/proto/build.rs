//! Compiles the protocol with protox (pure Rust), so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script compiled for one checkout may be reused (same target
    // directory, same hash) by another, and must read that checkout's protocol.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "signpost/v1/record.proto",
        "signpost/v1/registry.proto",
        "signpost/v1/cluster.proto",
        "signpost/v1/raft.proto",
        "signpost/v1/audit.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    // For server reflection on the client listener: the client-facing API and what it imports,
    // not the node-only Raft service.
    let client_api = protox::compile(
        [
            "signpost/v1/registry.proto",
            "signpost/v1/cluster.proto",
            "signpost/v1/audit.proto",
        ],
        [&root],
    )?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("signpost_descriptor.bin"),
        prost::Message::encode_to_vec(&client_api),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    // etcd's API, client side only: `signpost bench --target etcd` measures etcd with the same
    // generator it measures Signpost with.
    let etcd = "etcd/etcdserverpb.proto";
    println!("cargo:rerun-if-changed={}", root.join(etcd).display());
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(protox::compile([etcd], [&root])?)?;
    Ok(())
}
