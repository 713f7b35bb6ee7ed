//! Training runs, shared by both backends: what a stored run row holds and how it reads back.

use sov_proto::pb;

/// The model names of a run's base-weight inputs, as the JSON array stored with the run
/// (a model derived from the run lists them as its observed bases).
pub(crate) fn input_models_json(run: &pb::TrainingRun) -> String {
    let mut names: Vec<&str> = run
        .inputs
        .iter()
        .filter(|i| i.kind == "base-weights" && !i.model.is_empty())
        .map(|i| i.model.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    serde_json::to_string(&names).unwrap_or_else(|_| "[]".to_owned())
}

/// A stored run as the query answers it: `detail` is the run as reported.
pub(crate) fn summary(
    node: String,
    site: String,
    country: String,
    detail: &[u8],
    first_seen_unix_ms: i64,
    last_seen_unix_ms: i64,
) -> pb::TrainingRunSummary {
    pb::TrainingRunSummary {
        node,
        site,
        country,
        run: <pb::TrainingRun as prost::Message>::decode(detail).ok(),
        first_seen_unix_ms,
        last_seen_unix_ms,
    }
}
