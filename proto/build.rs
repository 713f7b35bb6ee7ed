//! Generates the `sovereign.v1` code, and the clients of the container runtimes' APIs the agent
//! calls, from the `.proto` files with protox (pure Rust, no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["sovereign/v1/report.proto", "sovereign/v1/services.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    // A `ContainerRef` is eleven strings (264 bytes inline): boxed in the two messages a report
    // carries by the thousand (a weight file's users, the processes), where most are absent
    // (host processes) and an absent one then costs 8 bytes (docs/PERFORMANCE.md §3b).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .boxed(".sovereign.v1.WeightUser.container")
        .boxed(".sovereign.v1.ProcessInfo.container")
        .compile_fds(fds)?;

    // The runtimes' APIs: clients only (the tests' own fake servers are not needed: the tests
    // run the real containerd).
    let runtime = [
        "runtime/containerd.proto",
        "runtime/containerd_namespaces.proto",
        "runtime/containerd_images.proto",
        "runtime/cri.proto",
    ];
    for f in runtime {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(runtime, ["."])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
