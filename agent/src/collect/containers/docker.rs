//! Docker's Engine API (and Podman's compatible one) over the local Unix socket:
//! `GET /containers/json` lists the running containers with their names, image, image id and
//! labels (the kubelet's `io.kubernetes.*` labels where Kubernetes runs on Docker through
//! cri-dockerd).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use serde::Deserialize;
use sov_proto::pb;

use super::{RuntimeError, from_labels};

/// The Engine API path listing running containers.
pub const LIST_PATH: &str = "/containers/json";
/// Largest answer read.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// One entry of `GET /containers/json` (only the keys read).
#[derive(Debug, Deserialize)]
struct Listed {
    #[serde(rename = "Id", default)]
    id: String,
    #[serde(rename = "Names", default)]
    names: Option<Vec<String>>,
    #[serde(rename = "Image", default)]
    image: String,
    #[serde(rename = "ImageID", default)]
    image_id: String,
    #[serde(rename = "Labels", default)]
    labels: Option<HashMap<String, String>>,
}

/// Containers from the JSON body of `GET /containers/json`, marked as `runtime`.
pub fn parse(body: &[u8], runtime: &str) -> Result<Vec<pb::ContainerRef>, RuntimeError> {
    let listed: Vec<Listed> = serde_json::from_slice(body)
        .map_err(|e| RuntimeError::Protocol(format!("not a container list: {e}")))?;
    Ok(listed
        .into_iter()
        .take(super::MAX_CONTAINERS)
        .map(|c| {
            let mut r = from_labels(&c.labels.unwrap_or_default());
            r.runtime = runtime.to_owned();
            r.name = c
                .names
                .unwrap_or_default()
                .first()
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_default();
            r.image = c.image;
            r.image_digest = c.image_id;
            r.id = c.id;
            r
        })
        .collect())
}

/// Every running container the daemon at `socket` knows.
pub async fn list(
    socket: &Path,
    timeout: Duration,
    runtime: &str,
) -> Result<Vec<pb::ContainerRef>, RuntimeError> {
    let call = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(RuntimeError::Connect)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| RuntimeError::Protocol(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let req = hyper::Request::get(LIST_PATH)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .map_err(|e| RuntimeError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| RuntimeError::Protocol(e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| RuntimeError::Protocol(e.to_string()))?
            .to_bytes();
        driver.abort();
        if !status.is_success() {
            return Err(RuntimeError::Protocol(format!(
                "{LIST_PATH} answered {status}"
            )));
        }
        parse(&body, runtime)
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| RuntimeError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_gives_name_image_digest_and_the_kubelets_labels() {
        let body = br#"[{"Id":"abc","Names":["/k8s_vllm_pod-a_ml_uid_0"],"Image":"vllm/vllm-openai:v0.6","ImageID":"sha256:99","Labels":{"io.kubernetes.pod.name":"pod-a","io.kubernetes.pod.namespace":"ml","io.kubernetes.pod.uid":"u-1","io.kubernetes.container.name":"vllm"}},{"Id":"def","Names":null,"Labels":null}]"#;
        let got = parse(body, "docker").unwrap_or_default();
        assert_eq!(got.len(), 2);
        let a = &got[0];
        assert_eq!(
            (
                a.id.as_str(),
                a.name.as_str(),
                a.image.as_str(),
                a.image_digest.as_str()
            ),
            (
                "abc",
                "k8s_vllm_pod-a_ml_uid_0",
                "vllm/vllm-openai:v0.6",
                "sha256:99"
            )
        );
        assert_eq!(
            (
                a.pod_name.as_str(),
                a.pod_namespace.as_str(),
                a.pod_uid.as_str(),
                a.container_name.as_str()
            ),
            ("pod-a", "ml", "u-1", "vllm")
        );
        assert_eq!(a.runtime, "docker");
        assert_eq!(got[1].id, "def");
        assert!(parse(b"{\"message\":\"x\"}", "docker").is_err());
    }
}
