//! `sov-proto`: the `sovereign.v1` wire contract shared by the agent, the collector and `sovctl`,
//! and the clients of the container runtimes' APIs the agent asks who a container is.
//!
//! The `.proto` files under `sovereign/v1/` are the source of truth; `build.rs` generates the
//! Rust code with protox at build time. Everything is re-exported as one module, [`pb`]. The
//! runtimes' calls (`runtime/*.proto`, the few messages the agent reads, written for this
//! project) are in [`runtime`].

/// Generated messages and gRPC services of the `sovereign.v1` package.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("sovereign.v1");
}

/// Clients of container runtimes' local gRPC APIs (containerd, the Kubernetes CRI).
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod runtime {
    /// containerd's containers service (`containerd.services.containers.v1`).
    pub mod containerd_containers {
        tonic::include_proto!("containerd.services.containers.v1");
    }
    /// containerd's namespaces service (`containerd.services.namespaces.v1`).
    pub mod containerd_namespaces {
        tonic::include_proto!("containerd.services.namespaces.v1");
    }
    /// containerd's image store (`containerd.services.images.v1`).
    pub mod containerd_images {
        tonic::include_proto!("containerd.services.images.v1");
    }
    /// The Kubernetes Container Runtime Interface (`runtime.v1`), for CRI-O.
    pub mod cri {
        tonic::include_proto!("runtime.v1");
    }
}
