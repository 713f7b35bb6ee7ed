//! The `Query` service for regulators and admins (agents may not read).

use std::sync::Arc;

use sov_proto::pb;
use tonic::{Request, Response, Status};

use crate::auth::{self, Role};
use crate::store::{NodeRow, Store};

/// Page size when a request asks for none.
pub const DEFAULT_PAGE: u32 = 100;

/// gRPC `sovereign.v1.Query`.
#[derive(Debug, Clone)]
pub struct QueryService {
    store: Arc<dyn Store>,
    trust_domain: String,
    max_page: u32,
}

impl QueryService {
    /// A service reading `store`.
    pub fn new(store: Arc<dyn Store>, trust_domain: String, max_page: u32) -> Self {
        Self {
            store,
            trust_domain,
            max_page,
        }
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
            evidence_json: crate::breach::canonical_json(&b.evidence),
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

/// Largest time range an egress query may span.
pub const MAX_EGRESS_RANGE_MS: i64 = 366 * 86_400_000;

#[tonic::async_trait]
impl pb::query_server::Query for QueryService {
    async fn egress(
        &self,
        req: Request<pb::EgressRequest>,
    ) -> Result<Response<pb::EgressResponse>, Status> {
        let id = auth::identity_from_request(&req, &self.trust_domain)?;
        auth::require_role(&id, &[Role::Regulator, Role::Admin], "Query.Egress")?;
        let r = req.into_inner();
        let until = if r.until_unix_ms == 0 {
            crate::ingest::now_unix_ms()
        } else {
            r.until_unix_ms
        };
        if r.since_unix_ms >= until {
            return Err(Status::invalid_argument(format!(
                "since_unix_ms {} must be before until_unix_ms {until}",
                r.since_unix_ms
            )));
        }
        if until - r.since_unix_ms > MAX_EGRESS_RANGE_MS {
            return Err(Status::invalid_argument(
                "the time range is longer than 366 days",
            ));
        }
        if !["", "country", "node", "process", "asn", "destination"].contains(&r.by.as_str()) {
            return Err(Status::invalid_argument(format!(
                "by {:?} is not one of country, node, process, asn, destination",
                r.by
            )));
        }
        let q = crate::store::EgressQuery {
            since_unix_ms: r.since_unix_ms,
            until_unix_ms: until,
            by: r.by.clone(),
            limit: self.page(r.limit),
        };
        let (rows, truncated) = self
            .store
            .egress(q)
            .await
            .map_err(|e| Status::unavailable(format!("collector store unavailable: {e}")))?;
        tracing::info!(who = %id.name, role = %id.role, call = "Egress", by = %r.by, rows = rows.len(), "query");
        Ok(Response::new(pb::EgressResponse { rows, truncated }))
    }

    async fn list_models(
        &self,
        req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let id = auth::identity_from_request(&req, &self.trust_domain)?;
        auth::require_role(&id, &[Role::Regulator, Role::Admin], "Query.ListModels")?;
        let r = req.into_inner();
        if r.query.len() > 256 {
            return Err(Status::invalid_argument(
                "query is longer than 256 characters",
            ));
        }
        let limit = self.page(r.limit);
        let mut models = self
            .store
            .list_models(&r.query, &r.after, limit.saturating_add(1))
            .await
            .map_err(|e| Status::unavailable(format!("collector store unavailable: {e}")))?;
        let more = models.len() > limit as usize;
        models.truncate(limit as usize);
        let next_after = if more {
            models.last().map(|m| m.key.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        tracing::info!(who = %id.name, role = %id.role, call = "ListModels", query = %r.query, rows = models.len(), "query");
        Ok(Response::new(pb::ListModelsResponse { models, next_after }))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let id = auth::identity_from_request(&req, &self.trust_domain)?;
        auth::require_role(&id, &[Role::Regulator, Role::Admin], "Query.ListNodes")?;
        let r = req.into_inner();
        let limit = self.page(r.limit);
        // One extra row tells whether another page follows.
        let mut rows = self
            .store
            .list_nodes(&r.after, limit.saturating_add(1))
            .await
            .map_err(|e| Status::unavailable(format!("collector store unavailable: {e}")))?;
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let next_after = if more {
            rows.last().map(|n| n.node.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        tracing::info!(who = %id.name, role = %id.role, call = "ListNodes", rows = rows.len(), "query");
        Ok(Response::new(pb::ListNodesResponse {
            nodes: rows.into_iter().map(Into::into).collect(),
            next_after,
        }))
    }

    async fn list_breaches(
        &self,
        req: Request<pb::ListBreachesRequest>,
    ) -> Result<Response<pb::ListBreachesResponse>, Status> {
        let id = auth::identity_from_request(&req, &self.trust_domain)?;
        auth::require_role(&id, &[Role::Regulator, Role::Admin], "Query.ListBreaches")?;
        let r = req.into_inner();
        let state = match r.state.as_str() {
            "" => None,
            s => Some(
                s.parse::<crate::breach::BreachState>()
                    .map_err(|e| Status::invalid_argument(format!("state: {e}")))?,
            ),
        };
        if r.rule.len() > 256 {
            return Err(Status::invalid_argument(
                "rule is longer than 256 characters",
            ));
        }
        let filter = crate::breach::BreachFilter {
            state,
            rule: (!r.rule.is_empty()).then(|| r.rule.clone()),
            since_unix_ms: (r.since_unix_ms != 0).then_some(r.since_unix_ms),
            limit: self.page(r.limit),
        };
        let breaches = self
            .store
            .list_breaches(filter)
            .await
            .map_err(|e| Status::unavailable(format!("collector store unavailable: {e}")))?;
        tracing::info!(who = %id.name, role = %id.role, call = "ListBreaches", rows = breaches.len(), "query");
        Ok(Response::new(pb::ListBreachesResponse {
            breaches: breaches.into_iter().map(Into::into).collect(),
        }))
    }
}
