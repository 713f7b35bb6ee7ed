//! The queries regulators and admins ask (agents may not read), answered over gRPC
//! (`sovereign.v1.Query`) and over HTTPS JSON ([`http`]) by the same code.
//!
//! Every query goes through [`QueryService`]'s `*_as` methods with the [`Caller`] that asked:
//! role check (regulator or admin), validation and limits, the store, then one audit record
//! ([`sov_evidence::audit`]) before the answer leaves. A query whose audit record cannot be written
//! is refused.
//!
//! - [`http`]: the HTTPS JSON API under `/api/v1/` and the read-only web page;
//! - [`scorecard`]: the sovereignty scorecard.

use std::sync::Arc;

use serde_json::{Value, json};
use sov_proto::pb;
use tonic::{Request, Response, Status};

use crate::error::ApiError;

use crate::auth::{self, Identity, Role};
use crate::store::{NodeRow, Store};
use sov_evidence::audit::AuditEntry;

pub mod http;
pub mod refusals;
pub mod scorecard;
pub mod series;

/// Page size when a request asks for none.
pub const DEFAULT_PAGE: u32 = 100;
/// Longest outcome text kept in an audit record.
const MAX_OUTCOME_CHARS: usize = 256;

/// How a caller reached the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// gRPC with a client certificate.
    Grpc,
    /// HTTPS with a client certificate.
    HttpsCert,
    /// HTTPS with an API token.
    HttpsToken,
}

impl Via {
    /// `grpc`, `https-cert` or `https-token` (as the audit log records it).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpsCert => "https-cert",
            Self::HttpsToken => "https-token",
        }
    }
}

/// Who asks, as proven by a certificate or a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Name and role.
    pub id: Identity,
    /// How.
    pub via: Via,
}

/// How many rows (or objects) an answer holds, for the audit log.
pub trait RowCount {
    /// Rows in the answer.
    fn row_count(&self) -> u64;
}

/// An answer built here as JSON, with its row count.
#[derive(Debug, Clone)]
pub struct JsonAnswer {
    /// The answer.
    pub value: Value,
    /// Rows it holds (for the audit record).
    pub rows: u64,
}

impl RowCount for JsonAnswer {
    fn row_count(&self) -> u64 {
        self.rows
    }
}

impl RowCount for pb::GetPolicyResponse {
    fn row_count(&self) -> u64 {
        1
    }
}
impl RowCount for pb::ListNodesResponse {
    fn row_count(&self) -> u64 {
        self.nodes.len() as u64
    }
}
impl RowCount for pb::ListModelsResponse {
    fn row_count(&self) -> u64 {
        self.models.len() as u64
    }
}
impl RowCount for pb::ListTrainingResponse {
    fn row_count(&self) -> u64 {
        self.runs.len() as u64
    }
}
impl RowCount for pb::EgressResponse {
    fn row_count(&self) -> u64 {
        self.rows.len() as u64
    }
}
impl RowCount for pb::ListBreachesResponse {
    fn row_count(&self) -> u64 {
        self.breaches.len() as u64
    }
}
impl RowCount for pb::ListAuditResponse {
    fn row_count(&self) -> u64 {
        self.records.len() as u64
    }
}
impl RowCount for pb::ExportReportResponse {
    fn row_count(&self) -> u64 {
        1
    }
}
impl RowCount for pb::ScorecardResponse {
    fn row_count(&self) -> u64 {
        1
    }
}

/// The query service, shared by gRPC and HTTPS.
#[derive(Debug, Clone)]
pub struct QueryService {
    store: Arc<dyn Store>,
    trust_domain: String,
    max_page: u32,
    policy: Option<Arc<crate::policy::PolicyWatch>>,
    signer: Option<Arc<sov_evidence::report::ReportSigner>>,
    geo: Option<crate::geo::Geo>,
    refusals: Arc<refusals::RefusalLog>,
    /// Acknowledged vs derived: queries of derived state wait for what was acknowledged
    /// before them (at most `[derive] query_wait_ms`).
    freshness: Option<Arc<crate::derive::Freshness>>,
}

impl QueryService {
    /// A service reading `store`.
    pub fn new(store: Arc<dyn Store>, trust_domain: String, max_page: u32) -> Self {
        Self {
            store,
            trust_domain,
            max_page,
            policy: None,
            signer: None,
            geo: None,
            refusals: Arc::default(),
            freshness: None,
        }
    }

    /// The same, answering queries of derived state only once the reports this collector
    /// acknowledged before them are derived (or the wait in `freshness` ran out).
    pub fn with_freshness(mut self, freshness: Arc<crate::derive::Freshness>) -> Self {
        self.freshness = Some(freshness);
        self
    }

    /// Record a refused call (audit log and log, rate-limited: [`refusals`]).
    pub async fn record_refusal(&self, r: refusals::Refusal<'_>) {
        self.refusals
            .record(&self.store, r, sov_common::clock::now_unix_ms())
            .await;
    }

    /// The same, signing evidence reports with `signer` and naming `geo`'s databases in them.
    pub fn with_evidence(
        mut self,
        signer: Option<Arc<sov_evidence::report::ReportSigner>>,
        geo: Option<crate::geo::Geo>,
    ) -> Self {
        self.signer = signer;
        self.geo = geo;
        self
    }

    /// The same, answering the scorecard under the collector's policy.
    pub fn with_policy(mut self, policy: Option<Arc<crate::policy::PolicyWatch>>) -> Self {
        self.policy = policy;
        self
    }

    /// The store (the HTTPS API looks tokens up in it).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The trust domain of client certificates.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

impl QueryService {
    /// The page size for a request's `limit` (0 = default), capped by the server.
    fn page(&self, requested: u32) -> u32 {
        match requested {
            0 => DEFAULT_PAGE.min(self.max_page),
            n => n.min(self.max_page),
        }
    }

    /// Refuse callers that may not query (agents).
    async fn allow(&self, caller: &Caller, call: &str) -> Result<(), ApiError> {
        let allowed = auth::require_role(
            &caller.id,
            &[Role::Regulator, Role::Admin],
            &format!("Query.{call}"),
        );
        if let Err(e) = &allowed {
            self.record_refusal(refusals::Refusal {
                who: &caller.id.name,
                role: caller.id.role.as_str(),
                via: caller.via.as_str(),
                call,
                why: &e.to_string(),
                peer: None,
            })
            .await;
        }
        allowed
    }

    /// Refuse callers that may not query; then wait (bounded) until what this collector
    /// acknowledged before the query is derived, so that its answer includes it.
    async fn admit(&self, caller: &Caller, call: &str) -> Result<(), ApiError> {
        self.allow(caller, call).await?;
        if let Some(f) = &self.freshness
            && !f.wait().await
        {
            tracing::debug!(call, "derivation lags; answering with what is derived");
        }
        Ok(())
    }

    /// Record the query and its outcome, then hand the answer back; refuse it when the record
    /// cannot be written.
    async fn audited<T: RowCount>(
        &self,
        caller: &Caller,
        call: &str,
        params: Value,
        result: Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let (rows, outcome) = match &result {
            Ok(r) => (r.row_count(), "ok".to_owned()),
            Err(s) => {
                let mut text = s.to_string();
                if text.chars().count() > MAX_OUTCOME_CHARS {
                    text = text.chars().take(MAX_OUTCOME_CHARS).collect();
                }
                (0, text)
            }
        };
        let entry = AuditEntry {
            at_unix_ms: sov_common::clock::now_unix_ms(),
            who: caller.id.name.clone(),
            role: caller.id.role.as_str().to_owned(),
            via: caller.via.as_str().to_owned(),
            call: call.to_owned(),
            params,
            rows,
            outcome,
        };
        if let Err(err) = self.store.append_audit(entry).await {
            tracing::error!(error = %err, call, who = %caller.id.name, "audit log append failed; query refused");
            return Err(ApiError::unavailable(format!(
                "the audit log could not record this query, so it is not answered: {err}"
            )));
        }
        tracing::info!(who = %caller.id.name, role = %caller.id.role, via = caller.via.as_str(), call, rows, "query");
        result
    }
}

impl From<NodeRow> for pb::NodeSummary {
    fn from(n: NodeRow) -> Self {
        Self {
            node: n.node,
            site: n.site,
            country: n.country,
            hostname: n.hostname,
            agent_version: n.agent_version,
            labels: n.labels.into_iter().collect(),
            last_seen_unix_ms: n.last_seen_unix_ms,
            epoch: n.epoch,
            reports: n.reports,
            last_seq: n.last_seq,
            missing: n.missing,
            dropped: n.dropped,
            epochs: n.epochs,
            conflicts: n.conflicts,
            gpu_state: n.gpu_state,
            gpu_count: n.gpu_count,
            gpu_util_percent: n.gpu_util_percent,
            gpu_memory_used_bytes: n.gpu_memory_used_bytes,
            gpu_memory_total_bytes: n.gpu_memory_total_bytes,
            cpu_percent: n.cpu_percent,
            memory_used_bytes: n.memory_used_bytes,
            memory_total_bytes: n.memory_total_bytes,
        }
    }
}

impl From<crate::breach::Breach> for pb::BreachSummary {
    fn from(b: crate::breach::Breach) -> Self {
        Self {
            evidence_json: sov_evidence::chain::canonical_json(&b.evidence),
            breach_id: b.breach_id,
            rule: b.rule,
            state: b.state.as_str().to_owned(),
            severity: b.severity.as_str().to_owned(),
            node: b.node,
            subject: b.subject,
            opened_at_unix_ms: b.opened_at_unix_ms,
            last_seen_unix_ms: b.last_seen_unix_ms,
            resolved_at_unix_ms: b.resolved_at_unix_ms.unwrap_or(0),
            count: b.count,
        }
    }
}

/// Cut `rows`, read with one row more than `limit`, to one page, and return the cursor of
/// the next page: the last row's `key` when the extra row came (another page follows), else
/// the empty cursor (`""`, 0).
fn one_page<T, K: Default>(rows: &mut Vec<T>, limit: u32, key: impl Fn(&T) -> K) -> K {
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    match rows.last() {
        Some(last) if more => key(last),
        _ => K::default(),
    }
}

fn store_unavailable(e: crate::store::StoreError) -> ApiError {
    ApiError::unavailable(format!("collector store unavailable: {e}"))
}

/// Most breaches and breach-log records in one evidence report.
pub const MAX_REPORT_ROWS: u32 = 100_000;

/// Largest time range an egress query or a scorecard may span.
pub const MAX_EGRESS_RANGE_MS: i64 = 366 * 86_400_000;

/// `until` (0 = now), checked against `since` and [`MAX_EGRESS_RANGE_MS`].
fn time_range(since_unix_ms: i64, until_unix_ms: i64) -> Result<i64, ApiError> {
    let until = if until_unix_ms == 0 {
        sov_common::clock::now_unix_ms()
    } else {
        until_unix_ms
    };
    if since_unix_ms >= until {
        return Err(ApiError::invalid_argument(format!(
            "since_unix_ms {since_unix_ms} must be before until_unix_ms {until}"
        )));
    }
    if until.saturating_sub(since_unix_ms) > MAX_EGRESS_RANGE_MS {
        return Err(ApiError::invalid_argument(
            "the time range is longer than 366 days",
        ));
    }
    Ok(until)
}

/// Where an answer over `[since, until)` starts: `since`, or for a range of a day or more
/// (`--since 7d`) the hour `since` falls in. The hour and day rows then answer the range from
/// its first hour on, instead of minute rows for its first partial hour (at country scale,
/// millions of rows for the minutes that make the difference); nothing asked is left out,
/// and each answer states the start it used (`from`).
pub fn covered_from(since_unix_ms: i64, until_unix_ms: i64) -> i64 {
    if until_unix_ms.saturating_sub(since_unix_ms) >= crate::store::rollup::DAY_MS {
        since_unix_ms - since_unix_ms.rem_euclid(crate::store::rollup::HOUR_MS)
    } else {
        since_unix_ms
    }
}

impl QueryService {
    /// `ListNodes` for `caller`.
    pub async fn list_nodes_as(
        &self,
        caller: &Caller,
        r: pb::ListNodesRequest,
    ) -> Result<pb::ListNodesResponse, ApiError> {
        self.admit(caller, "ListNodes").await?;
        let params = json!({"limit": r.limit, "after": r.after});
        let result = self.list_nodes_inner(r).await;
        self.audited(caller, "ListNodes", params, result).await
    }

    async fn list_nodes_inner(
        &self,
        r: pb::ListNodesRequest,
    ) -> Result<pb::ListNodesResponse, ApiError> {
        let limit = self.page(r.limit);
        let derived_up_to_unix_ms = self.derived_up_to().await;
        // One extra row tells whether another page follows.
        let mut rows = self
            .store
            .list_nodes(&r.after, limit.saturating_add(1))
            .await
            .map_err(store_unavailable)?;
        let next_after = one_page(&mut rows, limit, |n| n.node.clone());
        Ok(pb::ListNodesResponse {
            nodes: rows.into_iter().map(Into::into).collect(),
            next_after,
            derived_up_to_unix_ms,
        })
    }

    /// `ListModels` for `caller`.
    pub async fn list_models_as(
        &self,
        caller: &Caller,
        r: pb::ListModelsRequest,
    ) -> Result<pb::ListModelsResponse, ApiError> {
        self.admit(caller, "ListModels").await?;
        let params = json!({"query": r.query, "limit": r.limit, "after": r.after});
        let result = self.list_models_inner(r).await;
        self.audited(caller, "ListModels", params, result).await
    }

    async fn list_models_inner(
        &self,
        r: pb::ListModelsRequest,
    ) -> Result<pb::ListModelsResponse, ApiError> {
        if r.query.len() > 256 {
            return Err(ApiError::invalid_argument(
                "query is longer than 256 characters",
            ));
        }
        let limit = self.page(r.limit);
        let derived_up_to_unix_ms = self.derived_up_to().await;
        let mut models = self
            .store
            .list_models(&r.query, &r.after, limit.saturating_add(1))
            .await
            .map_err(store_unavailable)?;
        let next_after = one_page(&mut models, limit, |m| m.key.clone());
        self.fill_base_origins(&mut models);
        Ok(pb::ListModelsResponse {
            models,
            next_after,
            derived_up_to_unix_ms,
        })
    }

    /// `ListTraining` for `caller`: training runs active since a time, newest first.
    pub async fn list_training_as(
        &self,
        caller: &Caller,
        r: pb::ListTrainingRequest,
    ) -> Result<pb::ListTrainingResponse, ApiError> {
        self.admit(caller, "ListTraining").await?;
        let params = json!({"since_unix_ms": r.since_unix_ms, "limit": r.limit});
        let result = async {
            let limit = self.page(r.limit);
            let mut runs = self
                .store
                .list_training(r.since_unix_ms, limit.saturating_add(1))
                .await
                .map_err(store_unavailable)?;
            let truncated = runs.len() > limit as usize;
            runs.truncate(limit as usize);
            Ok(pb::ListTrainingResponse { runs, truncated })
        }
        .await;
        self.audited(caller, "ListTraining", params, result).await
    }

    /// `Egress` for `caller`.
    pub async fn egress_as(
        &self,
        caller: &Caller,
        r: pb::EgressRequest,
    ) -> Result<pb::EgressResponse, ApiError> {
        self.admit(caller, "Egress").await?;
        let params = json!({
            "since_unix_ms": r.since_unix_ms,
            "until_unix_ms": r.until_unix_ms,
            "by": r.by,
            "limit": r.limit,
        });
        let result = self.egress_inner(r).await;
        self.audited(caller, "Egress", params, result).await
    }

    async fn egress_inner(&self, r: pb::EgressRequest) -> Result<pb::EgressResponse, ApiError> {
        let until = time_range(r.since_unix_ms, r.until_unix_ms)?;
        const GROUPINGS: [&str; 10] = [
            "",
            "country",
            "node",
            "process",
            "asn",
            "destination",
            "pod",
            "namespace",
            "image",
            "container",
        ];
        if !GROUPINGS.contains(&r.by.as_str()) {
            return Err(ApiError::invalid_argument(format!(
                "by {:?} is not one of country, node, process, asn, destination, pod, namespace, image, container",
                r.by
            )));
        }
        let from = covered_from(r.since_unix_ms, until);
        let q = crate::store::EgressQuery {
            since_unix_ms: from,
            until_unix_ms: until,
            by: r.by.clone(),
            limit: self.page(r.limit),
            ..Default::default()
        };
        let derived_up_to_unix_ms = self.derived_up_to().await;
        let (rows, truncated) = self.store.egress(q).await.map_err(store_unavailable)?;
        Ok(pb::EgressResponse {
            rows,
            truncated,
            derived_up_to_unix_ms,
            from_unix_ms: from,
            until_unix_ms: until,
        })
    }

    /// `ListBreaches` for `caller`.
    pub async fn list_breaches_as(
        &self,
        caller: &Caller,
        r: pb::ListBreachesRequest,
    ) -> Result<pb::ListBreachesResponse, ApiError> {
        self.admit(caller, "ListBreaches").await?;
        let params = json!({
            "state": r.state,
            "rule": r.rule,
            "node": r.node,
            "min_severity": r.min_severity,
            "since_unix_ms": r.since_unix_ms,
            "limit": r.limit,
        });
        let result = self.list_breaches_inner(r).await;
        self.audited(caller, "ListBreaches", params, result).await
    }

    async fn list_breaches_inner(
        &self,
        r: pb::ListBreachesRequest,
    ) -> Result<pb::ListBreachesResponse, ApiError> {
        let state = match r.state.as_str() {
            "" => None,
            s => Some(
                s.parse::<crate::breach::BreachState>()
                    .map_err(|e| ApiError::invalid_argument(format!("state: {e}")))?,
            ),
        };
        if r.rule.len() > 256 {
            return Err(ApiError::invalid_argument(
                "rule is longer than 256 characters",
            ));
        }
        if r.node.len() > 256 {
            return Err(ApiError::invalid_argument(
                "node is longer than 256 characters",
            ));
        }
        let min_severity = match r.min_severity.as_str() {
            "" => None,
            s => Some(
                s.parse::<crate::breach::Severity>()
                    .map_err(|e| ApiError::invalid_argument(format!("min_severity: {e}")))?,
            ),
        };
        let limit = self.page(r.limit);
        // Node and severity are filtered here, over at most MAX_REPORT_ROWS of the store's
        // answer (newest first), so the page stays the newest matching ones.
        let narrowed = !r.node.is_empty() || min_severity.is_some();
        let filter = crate::breach::BreachFilter {
            state,
            rule: (!r.rule.is_empty()).then(|| r.rule.clone()),
            since_unix_ms: (r.since_unix_ms != 0).then_some(r.since_unix_ms),
            limit: if narrowed { MAX_REPORT_ROWS } else { limit },
        };
        let derived_up_to_unix_ms = self.derived_up_to().await;
        let breaches = self
            .store
            .list_breaches(filter)
            .await
            .map_err(store_unavailable)?;
        Ok(pb::ListBreachesResponse {
            derived_up_to_unix_ms,
            breaches: breaches
                .into_iter()
                .filter(|b| r.node.is_empty() || b.node == r.node)
                .filter(|b| min_severity.is_none_or(|m| b.severity >= m))
                .take(limit as usize)
                .map(Into::into)
                .collect(),
        })
    }

    /// `ListAudit` for `caller`. The query that reads the log is itself recorded (after the
    /// page is read, so a page never holds its own record).
    pub async fn list_audit_as(
        &self,
        caller: &Caller,
        r: pb::ListAuditRequest,
    ) -> Result<pb::ListAuditResponse, ApiError> {
        self.allow(caller, "ListAudit").await?;
        let params = json!({"after_seq": r.after_seq, "limit": r.limit});
        let result = self.list_audit_inner(r).await;
        self.audited(caller, "ListAudit", params, result).await
    }

    async fn list_audit_inner(
        &self,
        r: pb::ListAuditRequest,
    ) -> Result<pb::ListAuditResponse, ApiError> {
        let limit = self.page(r.limit);
        if r.after_seq > i64::MAX as u64 {
            // No record is numbered past 2^63-1 (the column is signed): the page after it is
            // empty, an answer rather than a store error.
            return Ok(pb::ListAuditResponse::default());
        }
        let mut records = self
            .store
            .audit_log(r.after_seq, limit.saturating_add(1))
            .await
            .map_err(store_unavailable)?;
        let next_after_seq = one_page(&mut records, limit, |r| r.seq);
        Ok(pb::ListAuditResponse {
            records: records.into_iter().map(Into::into).collect(),
            next_after_seq,
        })
    }

    /// `Scorecard` for `caller`.
    pub async fn scorecard_as(
        &self,
        caller: &Caller,
        r: pb::ScorecardRequest,
    ) -> Result<pb::ScorecardResponse, ApiError> {
        self.admit(caller, "Scorecard").await?;
        let params = json!({
            "since_unix_ms": r.since_unix_ms,
            "until_unix_ms": r.until_unix_ms,
            "jurisdiction": r.jurisdiction,
        });
        let result = self
            .scorecard_value(r.since_unix_ms, r.until_unix_ms, &r.jurisdiction)
            .await
            .map(|v| pb::ScorecardResponse {
                scorecard_json: v.to_string(),
            });
        self.audited(caller, "Scorecard", params, result).await
    }

    /// `GetPolicy` for `caller`: admins only. A regulator's attempt is refused and recorded
    /// (the allowed destinations say where data may go: an operator's business).
    pub async fn get_policy_as(
        &self,
        caller: &Caller,
        _r: pb::GetPolicyRequest,
    ) -> Result<pb::GetPolicyResponse, ApiError> {
        self.allow(caller, "GetPolicy").await?;
        let result = auth::require_role(&caller.id, &[Role::Admin], "Query.GetPolicy").and_then(
            |()| {
                let watch = self.policy.as_ref().ok_or_else(|| {
                    ApiError::failed_precondition(
                        "this collector runs without a policy file (set `policy` in its configuration)",
                    )
                })?;
                let mut v = watch.current().to_json(sov_common::clock::now_unix_ms());
                v["file"] = json!(watch.path().display().to_string());
                Ok(pb::GetPolicyResponse {
                    policy_json: v.to_string(),
                })
            },
        );
        self.audited(caller, "GetPolicy", json!({}), result).await
    }

    /// `ExportReport` for `caller`.
    pub async fn export_report_as(
        &self,
        caller: &Caller,
        r: pb::ExportReportRequest,
    ) -> Result<pb::ExportReportResponse, ApiError> {
        self.admit(caller, "ExportReport").await?;
        let params = json!({
            "since_unix_ms": r.since_unix_ms,
            "until_unix_ms": r.until_unix_ms,
            "jurisdiction": r.jurisdiction,
        });
        let result = self.export_report_inner(caller, r).await;
        self.audited(caller, "ExportReport", params, result).await
    }

    async fn export_report_inner(
        &self,
        caller: &Caller,
        r: pb::ExportReportRequest,
    ) -> Result<pb::ExportReportResponse, ApiError> {
        let signer = self.signer.as_ref().ok_or_else(|| {
            ApiError::failed_precondition(
                "this collector cannot sign reports: its TLS key is not an ECDSA P-256 PKCS#8 key",
            )
        })?;
        let until = time_range(r.since_unix_ms, r.until_unix_ms)?;
        let card = self
            .scorecard_value(r.since_unix_ms, until, &r.jurisdiction)
            .await?;
        let breaches = self
            .store
            .list_breaches(crate::breach::BreachFilter {
                state: None,
                rule: None,
                since_unix_ms: Some(r.since_unix_ms),
                limit: MAX_REPORT_ROWS,
            })
            .await
            .map_err(store_unavailable)?;
        let breaches: Vec<Value> = breaches
            .into_iter()
            .filter(|b| b.opened_at_unix_ms < until)
            .map(|b| sov_evidence::view::breach_json(&pb::BreachSummary::from(b)))
            .collect();
        // The breach-log segment: from the first record at or after `since` to the last one
        // before `until`, consecutive (so its chain can be checked on its own).
        let mut records = Vec::new();
        let mut after = 0;
        let mut truncated = false;
        'read: loop {
            let page = self
                .store
                .breach_log(after, 1000)
                .await
                .map_err(store_unavailable)?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for rec in page {
                if records.is_empty() && rec.at_unix_ms < r.since_unix_ms {
                    continue;
                }
                if rec.at_unix_ms >= until {
                    break 'read;
                }
                if records.len() >= MAX_REPORT_ROWS as usize {
                    truncated = true;
                    break 'read;
                }
                records.push(sov_evidence::report::log_record_json(&rec));
            }
        }
        let from = covered_from(r.since_unix_ms, until);
        let report = json!({
            "generated_at": sov_evidence::view::rfc3339(sov_common::clock::now_unix_ms()),
            "since": sov_evidence::view::rfc3339(r.since_unix_ms),
            "until": sov_evidence::view::rfc3339(until),
            "since_unix_ms": r.since_unix_ms,
            "until_unix_ms": until,
            "from": sov_evidence::view::rfc3339(from),
            "from_unix_ms": from,
            "requested_by": format!("{}/{}", caller.id.role, caller.id.name),
            "scorecard": card,
            "destinations": sov_evidence::view::breach_destinations(&breaches),
            "breaches": breaches,
            "breach_log": {"records": records, "truncated": truncated},
            // The latest signed checkpoints of the logs' heads: a regulator keeping this report
            // can later find the logs rewritten or cut short (`verify-log --checkpoint`).
            "checkpoints": {
                "breach_log": crate::checkpoint::latest_json(
                    self.store.as_ref(),
                    sov_evidence::checkpoint::BREACH_LOG,
                ).await,
                "audit_log": crate::checkpoint::latest_json(
                    self.store.as_ref(),
                    sov_evidence::checkpoint::AUDIT_LOG,
                ).await,
            },
            "geo_sources": self.geo.as_ref().map(crate::geo::Geo::builds).unwrap_or_default(),
        });
        let signed_json = signer
            .sign(report)
            .map_err(|e| ApiError::internal(format!("signing the report failed: {e}")))?;
        Ok(pb::ExportReportResponse { signed_json })
    }

    /// The console's time series of `[since, until)` in `buckets` buckets (HTTPS only:
    /// `GET /api/v1/series`), for `caller`; audited as one query, `Series`.
    pub async fn series_as(
        &self,
        caller: &Caller,
        since_unix_ms: i64,
        until_unix_ms: i64,
        jurisdiction: &str,
        buckets: u32,
    ) -> Result<JsonAnswer, ApiError> {
        self.admit(caller, "Series").await?;
        let params = json!({
            "since_unix_ms": since_unix_ms,
            "until_unix_ms": until_unix_ms,
            "jurisdiction": jurisdiction,
            "buckets": buckets,
        });
        let result = async {
            if buckets > series::MAX_BUCKETS {
                return Err(ApiError::invalid_argument(format!(
                    "buckets {buckets} is over {}",
                    series::MAX_BUCKETS
                )));
            }
            let until = time_range(since_unix_ms, until_unix_ms)?;
            let policy = self.policy_or(jurisdiction)?;
            let buckets = if buckets == 0 {
                series::DEFAULT_BUCKETS
            } else {
                buckets
            };
            let value = series::series(self.store.as_ref(), &policy, since_unix_ms, until, buckets)
                .await
                .map_err(store_unavailable)?;
            let rows = value["buckets"].as_array().map_or(0, |b| b.len() as u64);
            Ok(JsonAnswer { value, rows })
        }
        .await;
        self.audited(caller, "Series", params, result).await
    }

    /// The observed model inventory (models matching `query`, every one when empty) as a
    /// CycloneDX 1.6 AI bill of materials (HTTPS: `GET /api/v1/bom`), for `caller`; audited
    /// as one query, `Bom`.
    pub async fn bom_as(&self, caller: &Caller, query: &str) -> Result<JsonAnswer, ApiError> {
        self.admit(caller, "Bom").await?;
        let result = async {
            let mut models = Vec::new();
            let mut after = String::new();
            loop {
                let mut page = self
                    .store
                    .list_models(query, &after, self.max_page)
                    .await
                    .map_err(store_unavailable)?;
                let full = page.len() >= self.max_page as usize;
                after = page.last().map(|m| m.key.clone()).unwrap_or_default();
                models.append(&mut page);
                if !full || after.is_empty() || models.len() >= scorecard::MAX_ROWS as usize {
                    break;
                }
            }
            self.fill_base_origins(&mut models);
            let rows = models.len() as u64;
            let value = sov_evidence::bom::cyclonedx(
                &models,
                sov_common::clock::now_unix_ms(),
                "sov-collector",
                env!("CARGO_PKG_VERSION"),
            );
            Ok(JsonAnswer { value, rows })
        }
        .await;
        self.audited(caller, "Bom", json!({"query": query}), result)
            .await
    }

    /// One breach with every breach-log record of it, each with its position in the chain,
    /// and whether the chain up to the last of them verifies (HTTPS: `GET /api/v1/breach`),
    /// for `caller`; audited as one query, `GetBreach`. The log is read from its start, at
    /// most [`MAX_REPORT_ROWS`] records.
    pub async fn breach_as(
        &self,
        caller: &Caller,
        breach_id: &str,
    ) -> Result<JsonAnswer, ApiError> {
        self.admit(caller, "GetBreach").await?;
        let result = async {
            if breach_id.is_empty() || breach_id.len() > 64 {
                return Err(ApiError::invalid_argument(
                    "id must be a breach id (32 hex digits)",
                ));
            }
            let breaches = self
                .store
                .list_breaches(crate::breach::BreachFilter {
                    limit: MAX_REPORT_ROWS,
                    ..Default::default()
                })
                .await
                .map_err(store_unavailable)?;
            let breach = breaches
                .into_iter()
                .find(|b| b.breach_id == breach_id)
                .ok_or_else(|| ApiError::not_found(format!("no breach {breach_id}")))?;
            let mut verifier = sov_evidence::chain::ChainVerifier::new();
            let mut records = Vec::new();
            let mut chain_error = None;
            let mut after = 0u64;
            let mut read = 0u32;
            'pages: while read < MAX_REPORT_ROWS {
                let page = self
                    .store
                    .breach_log(after, 1000)
                    .await
                    .map_err(store_unavailable)?;
                if page.is_empty() {
                    break;
                }
                for r in &page {
                    read += 1;
                    after = r.seq;
                    if chain_error.is_none()
                        && let Err(e) = verifier.push(r)
                    {
                        chain_error = Some(format!("record {}: {e}", r.seq));
                    }
                    if r.breach_id == breach_id {
                        records.push(sov_evidence::report::log_record_json(r));
                    }
                    if read >= MAX_REPORT_ROWS {
                        break 'pages;
                    }
                }
            }
            let summary = pb::BreachSummary::from(breach);
            let rows = records.len() as u64 + 1;
            Ok(JsonAnswer {
                value: json!({
                    "breach": sov_evidence::view::breach_json(&summary),
                    "records": records,
                    "chain": {
                        "records_checked": verifier.checked(),
                        "last_hash": verifier.last_hash(),
                        "verified": chain_error.is_none(),
                        "error": chain_error,
                    },
                    "exported_at": sov_evidence::view::rfc3339(sov_common::clock::now_unix_ms()),
                }),
                rows,
            })
        }
        .await;
        self.audited(caller, "GetBreach", json!({"breach_id": breach_id}), result)
            .await
    }

    /// Each declared base's origin country: the policy's publisher table (its organisation,
    /// else its repository id), or the built-in defaults without a policy file.
    pub fn fill_base_origins(&self, models: &mut [pb::ModelSummary]) {
        let policy = self.policy.as_ref().map(|w| w.current());
        for b in models.iter_mut().flat_map(|m| m.base_models.iter_mut()) {
            b.origin = base_origin(policy.as_deref(), &b.organization, &b.name);
        }
    }

    /// The class the policy in force gives a model ("restricted", "public", "unclassified"),
    /// or `None` without a policy file.
    pub fn model_class(&self, m: &pb::ModelSummary) -> Option<&'static str> {
        let policy = self.policy.as_ref()?.current();
        let places = crate::policy::ModelPlaces::of(m);
        let (class, _) = policy.model_class(&places.facts(m));
        Some(class.as_str())
    }

    /// The policy in force, or one for `jurisdiction` when the collector has no policy file.
    fn policy_or(&self, jurisdiction: &str) -> Result<Arc<crate::policy::Policy>, ApiError> {
        match &self.policy {
            Some(w) => Ok(w.current()),
            None => Ok(Arc::new(scorecard::policy_for(jurisdiction).ok_or_else(|| {
                ApiError::failed_precondition(format!(
                    "the collector has no policy file, so this question needs a jurisdiction \
                     (jurisdiction=MA on HTTPS, --jurisdiction MA with sovctl); got {jurisdiction:?}"
                ))
            })?)),
        }
    }

    /// The scorecard as JSON (not audited: callers audit).
    pub async fn scorecard_value(
        &self,
        since_unix_ms: i64,
        until_unix_ms: i64,
        jurisdiction: &str,
    ) -> Result<Value, ApiError> {
        let until = time_range(since_unix_ms, until_unix_ms)?;
        let policy = self.policy_or(jurisdiction)?;
        let derived_up_to = self.derived_up_to().await;
        let from = covered_from(since_unix_ms, until);
        let inputs = scorecard::read_inputs(self.store.as_ref(), from, until)
            .await
            .map_err(store_unavailable)?;
        let mut card = scorecard::build(
            &policy,
            &inputs,
            since_unix_ms,
            until,
            sov_common::clock::now_unix_ms(),
        );
        if let Value::Object(m) = &mut card {
            m.insert("from_unix_ms".to_owned(), json!(from));
            m.insert("from".to_owned(), json!(sov_evidence::view::rfc3339(from)));
            m.insert("derived_up_to_unix_ms".to_owned(), json!(derived_up_to));
            m.insert(
                "derived_up_to".to_owned(),
                json!(sov_evidence::view::rfc3339(derived_up_to)),
            );
        }
        Ok(card)
    }

    /// Every report received before this instant is derived (read before the data it
    /// qualifies); 0 when the store cannot say.
    async fn derived_up_to(&self) -> i64 {
        match self.store.derive_status().await {
            Ok(s) => s.derived_up_to(sov_common::clock::now_unix_ms()),
            Err(err) => {
                tracing::warn!(error = %err, "cannot read how far derivation has come");
                0
            }
        }
    }
}

/// The caller of a gRPC request, from its client certificate.
fn grpc_caller<T>(req: &Request<T>, trust_domain: &str) -> Result<Caller, ApiError> {
    Ok(Caller {
        id: auth::identity_from_request(req, trust_domain)?,
        via: Via::Grpc,
    })
}

/// The gRPC `Query` service: each method authenticates the caller from its certificate and
/// answers through the `*_as` method of the same query, its [`ApiError`] becoming the status.
macro_rules! grpc_queries {
    ($($method:ident($request:ident) -> $response:ident = $query:ident;)*) => {
        #[tonic::async_trait]
        impl pb::query_server::Query for QueryService {
            $(
                async fn $method(
                    &self,
                    req: Request<pb::$request>,
                ) -> Result<Response<pb::$response>, Status> {
                    let caller = match grpc_caller(&req, &self.trust_domain) {
                        Ok(c) => c,
                        Err(e) => {
                            let call = stringify!($request).trim_end_matches("Request");
                            self.record_refusal(refusals::Refusal {
                                who: "unknown",
                                role: "",
                                via: Via::Grpc.as_str(),
                                call,
                                why: &e.to_string(),
                                peer: req.remote_addr(),
                            })
                            .await;
                            return Err(e.into());
                        }
                    };
                    Ok(Response::new(self.$query(&caller, req.into_inner()).await?))
                }
            )*
        }
    };
}

grpc_queries! {
    egress(EgressRequest) -> EgressResponse = egress_as;
    list_models(ListModelsRequest) -> ListModelsResponse = list_models_as;
    list_training(ListTrainingRequest) -> ListTrainingResponse = list_training_as;
    list_nodes(ListNodesRequest) -> ListNodesResponse = list_nodes_as;
    list_breaches(ListBreachesRequest) -> ListBreachesResponse = list_breaches_as;
    list_audit(ListAuditRequest) -> ListAuditResponse = list_audit_as;
    export_report(ExportReportRequest) -> ExportReportResponse = export_report_as;
    scorecard(ScorecardRequest) -> ScorecardResponse = scorecard_as;
    get_policy(GetPolicyRequest) -> GetPolicyResponse = get_policy_as;
}

/// The origin country of a base model's publisher: by its declared organisation, else by its
/// name (a repository id is looked up by its organisation); the policy's table when there is a
/// policy, else the built-in defaults. Empty when unknown.
pub fn base_origin(
    policy: Option<&crate::policy::Policy>,
    organization: &str,
    name: &str,
) -> String {
    let look = |s: &str| -> Option<String> {
        if s.trim().is_empty() {
            return None;
        }
        match policy {
            Some(p) => p.publisher_country(s),
            None => {
                crate::policy::publishers::default_country(crate::policy::publishers::org_of(s))
                    .map(str::to_owned)
            }
        }
    };
    look(organization)
        .or_else(|| look(name))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breach::{Observation, Severity};

    fn regulator() -> Caller {
        Caller {
            id: Identity {
                name: "analyst".into(),
                role: Role::Regulator,
            },
            via: Via::Grpc,
        }
    }

    async fn service() -> (tempfile::TempDir, QueryService) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        for (node, severity, at) in [
            ("a", Severity::Warning, 1000),
            ("b", Severity::Critical, 2000),
            ("a", Severity::Critical, 3000),
        ] {
            store
                .observe_breach(Observation {
                    rule: "r".into(),
                    node: node.into(),
                    subject: format!("s{at}"),
                    severity,
                    evidence: serde_json::Value::Null,
                    at_unix_ms: at,
                })
                .await
                .unwrap();
        }
        (dir, QueryService::new(store, "sovereign".into(), 1000))
    }

    #[tokio::test]
    async fn breaches_are_filtered_by_node_and_minimum_severity_newest_first() {
        let (_dir, q) = service().await;
        let list = |node: &str, sev: &str, limit: u32| {
            let q = q.clone();
            let r = pb::ListBreachesRequest {
                node: node.into(),
                min_severity: sev.into(),
                limit,
                ..Default::default()
            };
            async move {
                q.list_breaches_as(&regulator(), r).await.map(|r| {
                    r.breaches
                        .into_iter()
                        .map(|b| (b.node, b.severity))
                        .collect::<Vec<_>>()
                })
            }
        };
        let pair = |n: &str, s: &str| (n.to_owned(), s.to_owned());
        assert_eq!(
            list("a", "", 0).await.unwrap(),
            [pair("a", "critical"), pair("a", "warning")]
        );
        assert_eq!(
            list("", "critical", 0).await.unwrap(),
            [pair("a", "critical"), pair("b", "critical")]
        );
        assert_eq!(
            list("a", "critical", 0).await.unwrap(),
            [pair("a", "critical")]
        );
        assert_eq!(list("", "warning", 1).await.unwrap().len(), 1);
        let err = list("", "severe", 0).await.unwrap_err();
        assert_eq!(err.code(), crate::error::ErrorCode::InvalidArgument);
    }

    #[tokio::test]
    async fn every_query_and_refusal_of_a_regulator_is_audited_and_so_is_an_agents_refusal() {
        let (_dir, q) = service().await;
        q.list_nodes_as(&regulator(), pb::ListNodesRequest::default())
            .await
            .unwrap();
        let bad = pb::EgressRequest {
            since_unix_ms: 10,
            until_unix_ms: 5,
            ..Default::default()
        };
        assert!(q.egress_as(&regulator(), bad).await.is_err());
        let agent = Caller {
            id: Identity {
                name: "n1".into(),
                role: Role::Agent,
            },
            via: Via::Grpc,
        };
        let s = q
            .list_nodes_as(&agent, pb::ListNodesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(s.code(), crate::error::ErrorCode::PermissionDenied);
        let log = q.store().audit_log(0, 10).await.unwrap();
        assert_eq!(log.len(), 3, "{log:?}");
        assert_eq!(log[2].call, "ListNodes");
        assert_eq!(log[2].actor, "agent/n1");
        assert!(
            log[2].body()["outcome"]
                .as_str()
                .unwrap()
                .starts_with("refused: PermissionDenied: role agent"),
            "{:?}",
            log[2]
        );
        assert_eq!(log[0].call, "ListNodes");
        assert_eq!(log[0].body()["outcome"], "ok");
        assert_eq!(log[1].call, "Egress");
        assert!(
            log[1].body()["outcome"]
                .as_str()
                .unwrap()
                .starts_with("InvalidArgument"),
            "{:?}",
            log[1]
        );
    }
}
