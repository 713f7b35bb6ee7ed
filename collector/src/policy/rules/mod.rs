//! The breach rules, one file each, evaluated every [`EVAL_EVERY`] (and soon after a report
//! arrives) by the server's evaluation loop when the collector configuration names a `policy`.
//!
//! Each rule is a pure function from a [`Context`] (the policy, the [`Facts`] gathered once per
//! evaluation, the time) to the [`Observation`]s of what it finds violated now; [`RULES`] is
//! the one registration point. [`evaluate`] folds every observation into the breaches
//! (`observe_breach`: open, or update), then resolves the breaches of each rule that were not
//! observed for the rule's quiet period.
//!
//! | rule | severity | subject | observed while |
//! |---|---|---|---|
//! | [`agent_silent`] | warning | `silence` | no report for `silence_secs` |
//! | [`foreign_egress`] | critical | `country:XX` | a node inside sent more than `foreign_egress_bytes` over the window to one country outside (allowed destinations not counted) |
//! | [`unresolved_destination`] | warning | `unresolved` | more than `unresolved_bytes` to destinations no database places |
//! | [`weights_offshore`] | critical | `sha256:…` | a restricted model's copy is on a node outside, or on network storage whose server is outside |
//! | [`compute_offshore`] | critical | `sha256:…` | a process on a node outside has a restricted model open or mapped |
//! | [`weights_exfiltration`] | critical | `process:NAME/PID` | a process holding restricted weights sent more than `exfiltration_fraction` of their size outside |
//! | [`location_mismatch`] | warning | `location` | the address a node reports from geolocates to another country than the node's |
//! | [`training_offshore`] | critical | `run:<run_id>` | a training run on a node outside maps or reads base weights the policy restricts |
//! | [`restricted_derivative`] | critical | `sha256:…` | a model derived from a restricted base (declared, or observed as a run's output) resides on, or is loaded by a process on, a node outside |
//! | [`impossible_verdict`] | warning | `review:country:XX` | a node inside sent bytes to destinations placed in XX that the speed of light rules out (counted as not foreign under `impossible = "review"`) |
//!
//! Volatile evidence (bytes, durations, top lists) sits under the evidence's `counters` key:
//! it keeps the breach row current without a log record (and an alert) at every evaluation.

pub mod agent_silent;
pub mod compute_offshore;
pub mod foreign_egress;
pub mod impossible_verdict;
pub mod location_mismatch;
pub mod restricted_derivative;
pub mod training_offshore;
pub mod unresolved_destination;
pub mod weights_exfiltration;
pub mod weights_offshore;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use sov_proto::pb;

use super::{Counted, ModelClass, ModelPlaces, Policy};
use crate::breach::{BreachChange, Observation};
use crate::geo::Geo;
use crate::store::{EgressQuery, NodePeer, Store, StoreError};

pub use agent_silent::AGENT_SILENT;
pub use compute_offshore::COMPUTE_OFFSHORE;
pub use foreign_egress::FOREIGN_EGRESS;
pub use impossible_verdict::IMPOSSIBLE_VERDICT;
pub use location_mismatch::LOCATION_MISMATCH;
pub use restricted_derivative::RESTRICTED_DERIVATIVE;
pub use training_offshore::TRAINING_OFFSHORE;
pub use unresolved_destination::UNRESOLVED_DESTINATION;
pub use weights_exfiltration::WEIGHTS_EXFILTRATION;
pub use weights_offshore::WEIGHTS_OFFSHORE;

/// How often the rules are evaluated when nothing wakes the loop sooner.
pub const EVAL_EVERY: Duration = Duration::from_secs(2);
/// Most destinations listed in a breach's evidence.
pub const MAX_EVIDENCE_DESTINATIONS: usize = 5;
/// Most egress rows read per evaluation.
const EGRESS_ROWS: u32 = 100_000;
/// Most nodes and most models read per evaluation.
const MAX_ROWS: usize = 1_000_000;
/// Most training runs read per evaluation.
const MAX_TRAINING_RUNS: u32 = 100_000;

/// One rule: its name, what it observes, and how long a breach of it stays open unobserved.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Rule name, e.g. "foreign-egress".
    pub name: &'static str,
    /// The observations of what is violated now.
    pub observe: fn(&Context<'_>) -> Vec<Observation>,
    /// Milliseconds without an observation before a breach of this rule resolves.
    pub quiet_ms: fn(&Policy) -> i64,
}

/// Every rule, in evaluation order.
pub const RULES: [Rule; 10] = [
    agent_silent::RULE,
    foreign_egress::RULE,
    unresolved_destination::RULE,
    weights_offshore::RULE,
    compute_offshore::RULE,
    weights_exfiltration::RULE,
    location_mismatch::RULE,
    impossible_verdict::RULE,
    training_offshore::RULE,
    restricted_derivative::RULE,
];

/// `thresholds.quiet_secs` in milliseconds: the quiet period of most rules.
pub fn policy_quiet_ms(policy: &Policy) -> i64 {
    secs_to_ms(policy.thresholds.quiet_secs)
}

/// Seconds to milliseconds, saturating.
pub fn secs_to_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// What the collector knows of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFact {
    /// Node name.
    pub node: String,
    /// Declared site.
    pub site: String,
    /// Declared country.
    pub declared_country: String,
    /// When its last report arrived.
    pub last_seen_unix_ms: i64,
    /// Where its reports come from.
    pub peer: Option<NodePeer>,
}

/// Where a storage server geolocates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// The server's IP address, as parsed from the storage's server field.
    pub address: String,
    /// Its country ("" when unknown or when the server is a host name).
    pub country: String,
    /// Which database said so.
    pub source: String,
}

/// Everything the rules read, gathered once per evaluation.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Every node.
    pub nodes: Vec<NodeFact>,
    /// Outbound bytes over the window by node, process and destination (the store's "flow"
    /// grouping).
    pub flows: Vec<pb::EgressRow>,
    /// Every model whose weights reside somewhere now, with copies and users.
    pub models: Vec<pb::ModelSummary>,
    /// Network storage servers named by copies → where they are.
    pub servers: BTreeMap<String, Placement>,
    /// Training runs active within the window.
    pub training: Vec<pb::TrainingRunSummary>,
}

/// What a rule sees: the policy, the facts and the time.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The policy in force.
    pub policy: &'a Policy,
    /// The facts.
    pub facts: &'a Facts,
    /// Now, Unix ms.
    pub now_unix_ms: i64,
}

impl Context<'_> {
    /// The node's facts.
    pub fn node(&self, name: &str) -> Option<&NodeFact> {
        self.facts.nodes.iter().find(|n| n.node == name)
    }

    /// The node's country: its site's in the policy, else the one it declares ("" for a node
    /// never seen).
    pub fn node_country(&self, name: &str) -> String {
        self.node(name)
            .map(|n| self.policy.node_country(&n.site, &n.declared_country))
            .unwrap_or_default()
    }

    /// Whether the node is inside the jurisdiction.
    pub fn node_inside(&self, name: &str) -> bool {
        self.policy.is_inside(&self.node_country(name))
    }

    /// Whether traffic of this egress row is covered by an `[[allow]]` entry (a country
    /// entry is matched against the country the row counts in, else its verdict's; a scoped
    /// entry against the row's Kubernetes namespace and image).
    pub fn allowed(&self, r: &pb::EgressRow) -> bool {
        let ip: IpAddr = r
            .remote_address
            .parse()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let asn = (r.asn != 0).then_some(r.asn);
        let country = match self.policy.count(r) {
            Counted::Outside(c) | Counted::Review(c) => c,
            Counted::Inside | Counted::Unresolved => r.country.clone(),
        };
        let from = super::Workload {
            namespace: &r.pod_namespace,
            image: &r.image,
        };
        self.policy
            .allowed_from(ip, asn, &country, &from, self.now_unix_ms)
            .is_some()
    }

    /// The policy class of a model.
    pub fn class(&self, m: &pb::ModelSummary) -> ModelClass {
        let places = ModelPlaces::of(m);
        self.policy.model_class(&places.facts(m)).0
    }

    /// Whether the policy restricts a model known only by name (and organisation): a base a
    /// model declares, or a training run's input.
    pub fn restricted_name(&self, model: &str, organization: &str, sha256: &str) -> bool {
        self.policy
            .model_class(&super::ModelFacts {
                model,
                sha256,
                publisher: organization,
                ..Default::default()
            })
            .0
            == ModelClass::Restricted
    }

    /// The models the policy restricts.
    pub fn restricted(&self) -> impl Iterator<Item = &pb::ModelSummary> {
        self.facts
            .models
            .iter()
            .filter(|m| self.class(m) == ModelClass::Restricted)
    }

    /// The window, seconds.
    pub fn window_secs(&self) -> u64 {
        self.policy.thresholds.window_secs
    }
}

/// A model's subject: `sha256:<hex>` when hashed, else `model:<key>`.
pub fn model_subject(m: &pb::ModelSummary) -> String {
    if m.sha256.is_empty() {
        format!("model:{}", m.key)
    } else {
        format!("sha256:{}", m.sha256)
    }
}

/// The largest rows first, at most [`MAX_EVIDENCE_DESTINATIONS`], as evidence.
pub fn top_destinations(rows: &[&pb::EgressRow]) -> Vec<serde_json::Value> {
    let mut rows = rows.to_vec();
    rows.sort_by(|a, b| {
        b.bytes_sent
            .cmp(&a.bytes_sent)
            .then_with(|| a.remote_address.cmp(&b.remote_address))
    });
    rows.iter()
        .take(MAX_EVIDENCE_DESTINATIONS)
        .map(|d| {
            serde_json::json!({
                "process": d.process,
                "pid": d.pid,
                "address": d.remote_address,
                "port": d.remote_port,
                "country": d.country,
                "asn": d.asn,
                "org": d.org,
                "operator_country": d.operator_country,
                "bytes": d.bytes_sent,
                "min_rtt_us": d.min_rtt_us,
                "answers": answers_json(d),
                "contested": d.contested,
                "physics": d.physics,
                "distance_km": d.distance_km,
                "limit_km": d.limit_km,
                "conntrack_bytes": d.conntrack_bytes,
                "unmeasured_flows": d.unmeasured_flows,
                "namespace": d.pod_namespace,
                "pod": d.pod_name,
                "container": d.container_name,
                "container_id": d.container_id,
                "image": d.image,
            })
        })
        .collect()
}

/// Who a copy's container or a user's process is, as evidence: `namespace`, `pod`,
/// `container` (its name in the pod spec), `container_id` and `image`; `null` outside any
/// container.
pub fn workload_json(c: Option<&pb::ContainerRef>) -> serde_json::Value {
    match c {
        None => serde_json::Value::Null,
        Some(c) => serde_json::json!({
            "namespace": c.pod_namespace,
            "pod": c.pod_name,
            "container": if c.container_name.is_empty() { &c.name } else { &c.container_name },
            "container_id": c.id,
            "image": c.image,
        }),
    }
}

/// Every source's answer for a destination, side by side, as evidence.
pub fn answers_json(d: &pb::EgressRow) -> Vec<serde_json::Value> {
    d.answers
        .iter()
        .map(|a| {
            serde_json::json!({
                "source": a.source,
                "country": a.country,
                "kind": a.kind,
                "impossible": a.impossible,
                "distance_km": a.distance_km,
            })
        })
        .collect()
}

/// The host part of a storage server field (`10.0.0.5:/export`, `//10.0.0.5/share`,
/// `[2001:db8::1]:/x`, `10.0.0.5`) as an IP address, when it is one.
pub fn server_ip(server: &str) -> Option<IpAddr> {
    let s = server.trim().trim_start_matches('/');
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    let host = s.split(['/', ':', ',']).next()?;
    host.parse().ok()
}

/// Read the facts the rules need: nodes and their peers, the window's outbound flows, the
/// models that reside somewhere and where their storage servers are.
pub async fn gather(
    policy: &Policy,
    store: &dyn Store,
    geo: &Geo,
    now_unix_ms: i64,
) -> Result<Facts, StoreError> {
    let mut peers: BTreeMap<String, NodePeer> = store
        .node_peers()
        .await?
        .into_iter()
        .map(|p| (p.node.clone(), p))
        .collect();
    let (rows, cut) = crate::store::all_nodes(store, MAX_ROWS).await?;
    if cut {
        tracing::warn!(
            cap = MAX_ROWS,
            "more nodes than the rules read; the rest are not evaluated"
        );
    }
    let nodes = rows
        .into_iter()
        .map(|n| NodeFact {
            peer: peers.remove(&n.node),
            node: n.node,
            site: n.site,
            declared_country: n.country,
            last_seen_unix_ms: n.last_seen_unix_ms,
        })
        .collect();
    let window_ms = secs_to_ms(policy.thresholds.window_secs);
    let (flows, left_out) = store
        .egress(EgressQuery {
            since_unix_ms: now_unix_ms.saturating_sub(window_ms),
            until_unix_ms: now_unix_ms.saturating_add(1),
            by: "flow".to_owned(),
            limit: EGRESS_ROWS,
            // No rule counts a destination plainly inside (`policy::verdicts`): the store
            // leaves those out, so an evaluation reads what may breach, not all traffic.
            leave_out_inside: policy.inside.iter().cloned().collect(),
        })
        .await?;
    if left_out > 0 {
        tracing::warn!(
            left_out,
            "more egress rows in the window than the rules read; the smallest are not evaluated"
        );
    }
    let (models, cut) = crate::store::all_models(store, MAX_ROWS).await?;
    if cut {
        tracing::warn!(
            cap = MAX_ROWS,
            "more models than the rules read; the rest are not evaluated"
        );
    }
    let mut servers = BTreeMap::new();
    for c in models.iter().flat_map(|m| &m.copies) {
        if c.server.is_empty() || servers.contains_key(&c.server) {
            continue;
        }
        let placement = match server_ip(&c.server) {
            Some(ip) => {
                let v = geo.lookup(ip);
                Placement {
                    address: ip.to_string(),
                    country: v.country.clone(),
                    source: v.source.clone(),
                }
            }
            None => Placement::default(),
        };
        servers.insert(c.server.clone(), placement);
    }
    let training = store
        .list_training(now_unix_ms.saturating_sub(window_ms), MAX_TRAINING_RUNS)
        .await?;
    Ok(Facts {
        nodes,
        flows,
        models,
        servers,
        training,
    })
}

/// What one evaluation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evaluation {
    /// Observations made.
    pub observed: usize,
    /// Breaches opened.
    pub opened: usize,
    /// Breaches whose severity or evidence changed.
    pub updated: usize,
    /// Breaches resolved.
    pub resolved: usize,
}

impl Evaluation {
    /// Whether the breach log grew.
    pub fn changed(&self) -> bool {
        self.opened + self.updated + self.resolved > 0
    }
}

/// Every rule's observations at `now_unix_ms`.
pub fn observe_all(policy: &Policy, facts: &Facts, now_unix_ms: i64) -> Vec<Observation> {
    let ctx = Context {
        policy,
        facts,
        now_unix_ms,
    };
    RULES.iter().flat_map(|r| (r.observe)(&ctx)).collect()
}

/// Evaluate every rule once at `now_unix_ms`: observe what is violated, then resolve what has
/// been quiet.
pub async fn evaluate(
    policy: &Policy,
    store: &dyn Store,
    geo: &Geo,
    now_unix_ms: i64,
) -> Result<Evaluation, StoreError> {
    let facts = gather(policy, store, geo, now_unix_ms).await?;
    let observations = observe_all(policy, &facts, now_unix_ms);
    let mut e = Evaluation {
        observed: observations.len(),
        ..Evaluation::default()
    };
    let quiet = RULES
        .iter()
        .map(|rule| {
            (
                rule.name.to_owned(),
                now_unix_ms.saturating_sub((rule.quiet_ms)(policy)),
            )
        })
        .collect();
    // One take of the writer for the whole evaluation: under load each take waits for an
    // append batch, and one per observation and per rule made an evaluation take 0.3–0.5 s
    // of which the facts were 0.1 s (PERFORMANCE.md §8w).
    let (changes, resolved) = store
        .record_evaluation(observations, quiet, now_unix_ms)
        .await?;
    for change in changes {
        match change {
            BreachChange::Opened(b) => {
                e.opened += 1;
                tracing::warn!(rule = %b.rule, node = %b.node, subject = %b.subject,
                    severity = %b.severity, breach_id = %b.breach_id, "breach opened");
            }
            BreachChange::Updated(_) => e.updated += 1,
            BreachChange::Unchanged(_) => {}
        }
    }
    for b in resolved {
        e.resolved += 1;
        tracing::info!(rule = %b.rule, node = %b.node, subject = %b.subject,
            breach_id = %b.breach_id, "breach resolved");
    }
    Ok(e)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Facts and policies for the rules' tests.

    use super::*;

    /// A fixed "now" for the tests.
    pub const NOW: i64 = 1_800_000_000_000;

    /// A policy for MA with small thresholds and `extra` appended.
    pub fn policy(extra: &str) -> Policy {
        Policy::parse_at(
            &format!(
                "jurisdiction = \"MA\"\n{extra}\n[thresholds]\nforeign_egress_bytes = 1000\nwindow_secs = 60\nsilence_secs = 30\nquiet_secs = 0\nexfiltration_fraction = 0.5\nunresolved_bytes = 1000\n"
            ),
            "test",
            NOW,
        )
        .unwrap_or_else(|e| panic!("test policy: {e}"))
    }

    /// A node seen just now.
    pub fn node(name: &str, site: &str, country: &str) -> NodeFact {
        NodeFact {
            node: name.to_owned(),
            site: site.to_owned(),
            declared_country: country.to_owned(),
            last_seen_unix_ms: NOW,
            peer: None,
        }
    }

    /// An outbound egress row.
    pub fn flow(node: &str, pid: u32, country: &str, addr: &str, bytes: u64) -> pb::EgressRow {
        pb::EgressRow {
            node: node.to_owned(),
            pid,
            process: format!("proc{pid}"),
            country: country.to_owned(),
            remote_address: addr.to_owned(),
            remote_port: 443,
            bytes_sent: bytes,
            ..Default::default()
        }
    }

    /// A model with one copy on `node` at `path`.
    pub fn model(name: &str, sha: &str, size: u64, node: &str, path: &str) -> pb::ModelSummary {
        pb::ModelSummary {
            model: name.to_owned(),
            sha256: sha.to_owned(),
            size_bytes: size,
            key: sha.to_owned(),
            copies: vec![pb::ModelCopy {
                node: node.to_owned(),
                path: path.to_owned(),
                storage: "local".to_owned(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A user of a model's file.
    pub fn user(node: &str, pid: u32, path: &str) -> pb::ModelUser {
        pb::ModelUser {
            node: node.to_owned(),
            pid,
            process: format!("proc{pid}"),
            path: path.to_owned(),
            gpus: Vec::new(),
            container: None,
        }
    }

    /// The observations of one rule.
    pub fn run(rule: &Rule, policy: &Policy, facts: &Facts) -> Vec<Observation> {
        (rule.observe)(&Context {
            policy,
            facts,
            now_unix_ms: NOW,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_fields_give_their_ip_address() {
        assert_eq!(
            server_ip("10.0.0.5:/export"),
            Some(
                "10.0.0.5"
                    .parse()
                    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
            )
        );
        assert_eq!(
            server_ip("//192.0.2.7/share").map(|i| i.to_string()),
            Some("192.0.2.7".into())
        );
        assert_eq!(
            server_ip("[2001:db8::1]:/x").map(|i| i.to_string()),
            Some("2001:db8::1".into())
        );
        assert_eq!(
            server_ip("2001:db8::2").map(|i| i.to_string()),
            Some("2001:db8::2".into())
        );
        assert_eq!(server_ip("nas.example.net:/export"), None);
        assert_eq!(server_ip(""), None);
    }

    #[test]
    fn every_rule_is_registered_once_with_its_own_name() {
        let mut names: Vec<&str> = RULES.iter().map(|r| r.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), RULES.len());
        for name in [
            AGENT_SILENT,
            FOREIGN_EGRESS,
            UNRESOLVED_DESTINATION,
            WEIGHTS_OFFSHORE,
            COMPUTE_OFFSHORE,
            WEIGHTS_EXFILTRATION,
            LOCATION_MISMATCH,
        ] {
            assert!(names.contains(&name), "{name} is not registered");
        }
    }
}

#[cfg(test)]
mod lineage_lifecycle_tests {
    //! `training-offshore` and `restricted-derivative` through the real store: reports are
    //! ingested, `evaluate` opens the breach, and resolves it once the cause is gone.

    use super::testutil::{NOW, policy};
    use super::*;
    use crate::store::suite::{report, weight};
    use crate::store::{BreachFilter, SqliteStore, WeightUpdate};

    fn training_run(ended: bool) -> pb::TrainingRun {
        pb::TrainingRun {
            run_id: "9-100-abcd".into(),
            pid: 9,
            process: "python3".into(),
            start_unix_ms: NOW - 10_000,
            last_activity_unix_ms: NOW - 1_000,
            ended,
            inputs: vec![pb::TrainingInput {
                kind: "base-weights".into(),
                model: "acme/secret".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn both_lineage_rules_open_and_resolve_breaches_through_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let p = policy("[[model]]\nmatch = \"acme/*\"\nclass = \"restricted\"\n");
        let geo = Geo::embedded_only();
        let mut derived = weight("/models/lora/adapter_model.safetensors", "team/lora", "");
        if let Some(id) = derived.identity.as_mut() {
            id.base_models = vec![pb::BaseModel {
                name: "acme/secret".into(),
                source: "adapter-config".into(),
                ..Default::default()
            }];
        }
        // A node outside (DE) trains on the restricted base and holds a derivative of it.
        let mut r = report("berlin-1", 1, 1);
        r.country = "DE".into();
        r.received_unix_ms = NOW - 1_000;
        r.telemetry.training = vec![training_run(false)];
        r.telemetry.weights = WeightUpdate {
            full: true,
            files: vec![derived],
            removed: vec![],
            ..Default::default()
        };
        crate::store::suite::ingest(&store, r).await;
        let e = evaluate(&p, &store, &geo, NOW).await.unwrap();
        let open = store
            .list_breaches(BreachFilter {
                state: Some(crate::breach::BreachState::Open),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut got: Vec<(&str, &str, &str)> = open
            .iter()
            .map(|b| (b.rule.as_str(), b.node.as_str(), b.subject.as_str()))
            .collect();
        got.sort_unstable();
        assert_eq!(
            got,
            vec![
                (
                    "restricted-derivative",
                    "berlin-1",
                    "model:team/lora|~berlin-1:/models/lora/adapter_model.safetensors"
                ),
                ("training-offshore", "berlin-1", "run:9-100-abcd"),
            ],
            "{e:?}"
        );

        // The run ends and the derivative is deleted: both resolve (quiet_secs = 0).
        let mut r = report("berlin-1", 1, 2);
        r.country = "DE".into();
        r.received_unix_ms = NOW + 1_000;
        r.telemetry.training = vec![training_run(true)];
        r.telemetry.weights = WeightUpdate {
            full: true,
            files: vec![],
            removed: vec![],
            ..Default::default()
        };
        crate::store::suite::ingest(&store, r).await;
        let e = evaluate(&p, &store, &geo, NOW + 2_000).await.unwrap();
        assert_eq!(e.resolved, 2, "{e:?}");
        let resolved = store
            .list_breaches(BreachFilter {
                state: Some(crate::breach::BreachState::Resolved),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(resolved.len(), 2);
    }
}
