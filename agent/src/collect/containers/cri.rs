//! A Kubernetes CRI runtime (CRI-O) over its local gRPC socket: `RuntimeService.ListContainers`
//! gives every container with the kubelet's labels, its name in the pod and its image.

use std::path::Path;
use std::time::Duration;

use sov_proto::pb;
use sov_proto::runtime::cri::ListContainersRequest;
use sov_proto::runtime::cri::runtime_service_client::RuntimeServiceClient;

use super::{RuntimeError, from_labels, unix_channel};

/// `ContainerRef.runtime` of containers a CRI socket lists.
pub const RUNTIME: &str = "cri-o";
/// Largest answer decoded.
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// `sha256:<hex>` of a digest reference (`repo@sha256:<hex>`) or of an image id.
fn digest_of(image_ref: &str) -> String {
    match image_ref.rsplit_once('@') {
        Some((_, d)) => d.to_owned(),
        None if image_ref.starts_with("sha256:") => image_ref.to_owned(),
        None => String::new(),
    }
}

/// Every container the runtime knows.
pub async fn list(socket: &Path, timeout: Duration) -> Result<Vec<pb::ContainerRef>, RuntimeError> {
    let channel = unix_channel(socket, timeout).await?;
    let listed = RuntimeServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .list_containers(ListContainersRequest::default())
        .await
        .map_err(RuntimeError::Status)?
        .into_inner()
        .containers;
    Ok(listed
        .into_iter()
        .take(super::MAX_CONTAINERS)
        .map(|c| {
            let mut r = from_labels(&c.labels);
            r.runtime = RUNTIME.to_owned();
            r.name = c.metadata.map(|m| m.name).unwrap_or_default();
            if r.container_name.is_empty() {
                r.container_name.clone_from(&r.name);
            }
            r.image = c.image.map(|i| i.image).unwrap_or_default();
            r.image_digest = digest_of(&c.image_ref);
            r.id = c.id;
            r
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_comes_from_a_digest_reference_or_an_image_id() {
        assert_eq!(digest_of("quay.io/x/y@sha256:abcd"), "sha256:abcd");
        assert_eq!(digest_of("sha256:ef01"), "sha256:ef01");
        assert_eq!(digest_of("quay.io/x/y:latest"), "");
    }
}
