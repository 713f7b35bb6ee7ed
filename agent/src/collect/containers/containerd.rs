//! containerd over its local gRPC socket: every namespace (`k8s.io` for Kubernetes, `moby` for
//! Docker, `default` for `ctr`), every container in it with its labels and image, and each
//! image's digest. The kubelet's labels on a container (`io.kubernetes.pod.name`, …) carry the
//! pod identity, so no call to the Kubernetes API server is needed.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use sov_proto::pb;
use sov_proto::runtime::containerd_containers::ListContainersRequest;
use sov_proto::runtime::containerd_containers::containers_client::ContainersClient;
use sov_proto::runtime::containerd_images::GetImageRequest;
use sov_proto::runtime::containerd_images::images_client::ImagesClient;
use sov_proto::runtime::containerd_namespaces::ListNamespacesRequest;
use sov_proto::runtime::containerd_namespaces::namespaces_client::NamespacesClient;

use super::{RuntimeError, from_labels, unix_channel};

/// `ContainerRef.runtime` of containers containerd lists.
pub const RUNTIME: &str = "containerd";
/// The gRPC header naming the containerd namespace of a call.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// At most this many namespaces are listed.
pub const MAX_NAMESPACES: usize = 64;
/// Largest answer decoded (a node with thousands of containers stays well below).
const MAX_MESSAGE_BYTES: usize = 16 << 20;

fn in_namespace<T>(msg: T, ns: &str) -> Result<tonic::Request<T>, RuntimeError> {
    let mut req = tonic::Request::new(msg);
    let value = ns
        .parse()
        .map_err(|_| RuntimeError::Protocol(format!("namespace name {ns:?} is not a header")))?;
    req.metadata_mut().insert(NAMESPACE_HEADER, value);
    Ok(req)
}

/// Every container of every namespace, with its image digest where the image store has it.
pub async fn list(socket: &Path, timeout: Duration) -> Result<Vec<pb::ContainerRef>, RuntimeError> {
    let channel = unix_channel(socket, timeout).await?;
    let mut namespaces =
        NamespacesClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut containers =
        ContainersClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut images = ImagesClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let names = namespaces
        .list(ListNamespacesRequest::default())
        .await
        .map_err(RuntimeError::Status)?
        .into_inner()
        .namespaces;
    let mut out = Vec::new();
    for ns in names.iter().take(MAX_NAMESPACES) {
        let listed = containers
            .list(in_namespace(ListContainersRequest::default(), &ns.name)?)
            .await
            .map_err(RuntimeError::Status)?
            .into_inner()
            .containers;
        let mut digests: HashMap<String, String> = HashMap::new();
        for c in listed.into_iter().take(super::MAX_CONTAINERS) {
            if !digests.contains_key(&c.image) && !c.image.is_empty() {
                // An image removed since the container was made has no digest: not an error.
                let digest = match images
                    .get(in_namespace(
                        GetImageRequest {
                            name: c.image.clone(),
                        },
                        &ns.name,
                    )?)
                    .await
                {
                    Ok(r) => r
                        .into_inner()
                        .image
                        .and_then(|i| i.target)
                        .map(|t| t.digest)
                        .unwrap_or_default(),
                    Err(_) => String::new(),
                };
                digests.insert(c.image.clone(), digest);
            }
            let mut r = from_labels(&c.labels);
            r.runtime = RUNTIME.to_owned();
            r.runtime_namespace = ns.name.clone();
            r.name = c.id.clone();
            r.image_digest = digests.get(&c.image).cloned().unwrap_or_default();
            r.image = c.image;
            r.id = c.id;
            out.push(r);
        }
    }
    Ok(out)
}
