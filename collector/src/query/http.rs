//! The HTTPS JSON API (`/api/v1/...`) and the read-only web page (`/`), on `[http] listen`.
//!
//! Same certificate as gRPC. Client certificates are asked for but optional at the TLS layer,
//! so a tool can present `Authorization: Bearer TOKEN` instead ([`crate::token`]); a
//! certificate that does not chain to the CA still fails the handshake. Every API route goes
//! through [`QueryService`] (roles, limits, audit), so it answers exactly what gRPC answers:
//!
//! | route | gRPC | parameters |
//! |---|---|---|
//! | `GET /api/v1/nodes` | `ListNodes` | `limit`, `after` |
//! | `GET /api/v1/models` | `ListModels` | `q`, `limit`, `after` |
//! | `GET /api/v1/training` | `ListTraining` | `since`, `limit` |
//! | `GET /api/v1/bom` | — (`sovctl bom` builds the same from `ListModels`) | `q` |
//! | `GET /api/v1/breach` | — (the console's breach page) | `id` |
//! | `GET /api/v1/series` | — (the console's charts) | `since`, `until`, `jurisdiction`, `buckets` |
//! | `GET /api/v1/egress` | `Egress` | `since`, `until`, `by`, `limit` |
//! | `GET /api/v1/breaches` | `ListBreaches` | `state`, `rule`, `node`, `min_severity`, `since`, `limit` |
//! | `GET /api/v1/audit` | `ListAudit` | `after_seq`, `limit` |
//! | `GET /api/v1/scorecard` | `Scorecard` | `since`, `until`, `jurisdiction` |
//! | `GET /api/v1/report` | `ExportReport` | `since`, `until`, `jurisdiction`, `format` (`json`, `html`) |
//!
//! Static assets: `/` (the console), `/assets/geo/countries-110m.json` and
//! `/assets/geo/iso3166.csv` (country shapes and codes for its map), `/api/v1/openapi.json`.
//!
//! Times (`since`, `until`) are a duration back from now (`90m`, `24h`, `7d`) or Unix
//! milliseconds. Unknown parameters are refused. Errors are JSON `{"error", "code"}` with
//! 400 (bad parameter), 401 (no or bad credential), 403 (role may not), 404, 405, 412, 503.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections (more wait in the kernel's backlog), a
//! TLS handshake within [`TLS_HANDSHAKE_TIMEOUT`], a request line and headers within hyper's
//! limits, and no request bodies (GET only).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use sov_proto::pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Caller, QueryService, Via};
use crate::auth::{self, Identity};
use crate::error::{ApiError, ErrorCode};

/// `[http]`: the HTTPS JSON API under `/api/v1/` and the read-only web page at `/`, with the
/// collector's certificate; callers present a client certificate (role regulator or admin) or
/// `Authorization: Bearer TOKEN`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address serving HTTPS, e.g. "127.0.0.1:8443". Default: none (off).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// Most concurrent HTTPS connections.
pub const MAX_CONNECTIONS: usize = 256;
/// Longest a TLS handshake may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a connection may stay open.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest an HTTP/1 client may take to send a request's headers, counted from the moment the
/// connection waits for them (so also the longest an idle keep-alive connection stays).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest query string accepted.
const MAX_QUERY_LEN: usize = 2048;

/// The web page (one self-contained file: no external assets).
const INDEX_HTML: &str = include_str!("web/index.html");
/// Country shapes for the console's world map (Natural Earth 1:110m as TopoJSON, public
/// domain; see `collector/assets/geo/README.md`) and the ISO 3166 numeric → alpha-2 table.
/// Served without credentials: they hold no data.
pub const ASSETS: [(&str, &str, &str); 2] = [
    (
        "/assets/geo/countries-110m.json",
        "application/json",
        include_str!("../../assets/geo/countries-110m.json"),
    ),
    (
        "/assets/geo/iso3166.csv",
        "text/csv; charset=utf-8",
        include_str!("../../assets/geo/iso3166.csv"),
    ),
];
/// The OpenAPI description of this API.
pub const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");

/// Why the HTTPS API could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A PEM file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls configuration refused")]
    Tls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// What the TLS layer proved about the client.
#[derive(Debug, Clone)]
enum Peer {
    /// No client certificate.
    Anonymous,
    /// A certificate with a valid identity.
    Cert(Identity),
    /// A certificate whose identity is refused (why).
    Refused(String),
}

/// Serve the API and the page on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<crate::tls::ServerTls>,
    query: QueryService,
    per_address: crate::tls::limits::PerAddress,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let stop = CancellationToken::new();
    let _stop_connections = stop.clone().drop_guard();
    tokio::pin!(shutdown);
    let mut shed: u64 = 0;
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(error = %err, "https accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        // Accepted at once and closed at once when over a limit (the kernel queue never holds
        // the others back): one address may hold `max_connections_per_address`, all together
        // `MAX_CONNECTIONS`.
        let Some(address) = per_address.take(addr.ip()) else {
            shed += 1;
            if shed.is_power_of_two() {
                tracing::warn!(peer.addr = %addr, limit = per_address.limit(), refused_so_far = shed, "https connection limit of one address reached; connection closed");
            }
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shed += 1;
            if shed.is_power_of_two() {
                tracing::warn!(peer.addr = %addr, limit = MAX_CONNECTIONS, refused_so_far = shed, "https connection limit reached; connection closed");
            }
            continue;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let query = query.clone();
        let stop = stop.clone();
        let deny = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _address = address;
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => {
                    sov_common::tls_diagnose::log_refused_handshake("https", addr, &err);
                    return;
                }
                Err(_) => return,
            };
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec());
            let peer = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                None => Peer::Anonymous,
                Some(leaf) => match auth::identity_from_der(leaf.as_ref(), query.trust_domain()) {
                    Ok(id) => Peer::Cert(id),
                    Err(err) => Peer::Refused(err.to_string()),
                },
            };
            let service = hyper::service::service_fn(move |req| {
                let query = query.clone();
                // A certificate revoked after the handshake is refused on the next request.
                let peer = match leaf.as_deref().and_then(|l| deny.revoked(l)) {
                    Some(by) => Peer::Refused(format!(
                        "client certificate revoked (by {by} in the collector's deny list)"
                    )),
                    None => peer.clone(),
                };
                async move { Ok::<_, std::convert::Infallible>(handle(&query, &peer, addr, req).await) }
            });
            // The protocol is the one ALPN chose (HTTP/1.1 without ALPN): no version sniffing,
            // which would wait for a first byte without a timeout.
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            builder.http2().timer(hyper_util::rt::TokioTimer::new());
            let builder = if h2 {
                builder.http2_only()
            } else {
                builder.http1_only()
            };
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::select! {
                res = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {
                    if let Ok(Err(err)) = res {
                        tracing::debug!(peer.addr = %addr, error = %err, "https connection ended");
                    }
                }
                () = stop.cancelled() => {}
            }
        });
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    resp
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", v.to_string())
}

/// The JSON error answer of a refusal: its message and code name, with the HTTP status of
/// its code ([`ErrorCode::http_status`], the one mapping); a 401 names the bearer scheme.
fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let status =
        StatusCode::from_u16(e.code().http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut resp = json_response(
        status,
        &json!({"error": e.message(), "code": e.code().as_str()}),
    );
    if e.code() == ErrorCode::Unauthenticated {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"sovereign\""),
        );
    }
    resp
}

/// Answer one request.
async fn handle<B>(
    query: &QueryService,
    peer: &Peer,
    addr: std::net::SocketAddr,
    req: Request<B>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = error_response(&ApiError::unimplemented("only GET is served"));
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let path = req.uri().path();
    match path {
        "/" | "/index.html" => {
            return respond(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML);
        }
        "/api/v1/openapi.json" => return respond(StatusCode::OK, "application/json", OPENAPI_JSON),
        _ => {}
    }
    if let Some((_, content_type, body)) = ASSETS.iter().find(|(p, _, _)| *p == path) {
        let mut resp = respond(StatusCode::OK, content_type, *body);
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=86400"),
        );
        return resp;
    }
    let Some(route) = path.strip_prefix("/api/v1/") else {
        return error_response(&ApiError::not_found(format!("no page {path}")));
    };
    if !ROUTES.contains(&route) {
        return error_response(&ApiError::not_found(format!(
            "no route /api/v1/{route}; routes: {}",
            ROUTES.join(", ")
        )));
    }
    let caller = match authenticate(query, peer, req.headers()).await {
        Ok(c) => c,
        Err(s) => {
            let via = match peer {
                _ if req.headers().contains_key(header::AUTHORIZATION) => "https-token",
                Peer::Anonymous => "https",
                _ => "https-cert",
            };
            query
                .record_refusal(super::refusals::Refusal {
                    who: "unknown",
                    role: "",
                    via,
                    call: route,
                    why: &s.to_string(),
                    peer: Some(addr),
                })
                .await;
            return error_response(&s);
        }
    };
    let params = match Params::parse(req.uri().query().unwrap_or("")) {
        Ok(p) => p,
        Err(s) => return error_response(&s),
    };
    if route == "report" {
        return match report(query, &caller, params).await {
            Ok((content_type, text)) => respond(StatusCode::OK, content_type, text),
            Err(s) => error_response(&s),
        };
    }
    match answer(query, &caller, route, params).await {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(s) => error_response(&s),
    }
}

/// The API routes under `/api/v1/`.
pub const ROUTES: [&str; 12] = [
    "nodes",
    "models",
    "training",
    "bom",
    "series",
    "breach",
    "egress",
    "breaches",
    "audit",
    "scorecard",
    "report",
    "policy",
];

/// `GET /api/v1/report`: the signed evidence report, JSON (default) or HTML.
async fn report(
    query: &QueryService,
    caller: &Caller,
    p: Params,
) -> Result<(&'static str, String), ApiError> {
    p.only(&["since", "until", "jurisdiction", "format"])?;
    let html = match p.get("format").unwrap_or("json") {
        "json" | "" => false,
        "html" => true,
        other => {
            return Err(ApiError::invalid_argument(format!(
                "format {other:?} is not json or html"
            )));
        }
    };
    let now = sov_common::clock::now_unix_ms();
    let since = match p.time("since", now)? {
        0 => now.saturating_sub(30 * 86_400_000),
        t => t,
    };
    let r = query
        .export_report_as(
            caller,
            pb::ExportReportRequest {
                since_unix_ms: since,
                until_unix_ms: p.time("until", now)?,
                jurisdiction: p.text("jurisdiction"),
            },
        )
        .await?;
    Ok(if html {
        (
            "text/html; charset=utf-8",
            sov_evidence::report::render_html(&r.signed_json),
        )
    } else {
        ("application/json", r.signed_json)
    })
}

/// The caller: a bearer token when the request carries one, else the client certificate.
async fn authenticate(
    query: &QueryService,
    peer: &Peer,
    headers: &hyper::HeaderMap,
) -> Result<Caller, ApiError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let text = value.to_str().unwrap_or("");
        let token = text
            .strip_prefix("Bearer ")
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthenticated("Authorization must be \"Bearer TOKEN\""))?;
        if !crate::token::well_formed(token) {
            return Err(ApiError::unauthenticated("unknown token"));
        }
        let record = query
            .store()
            .token_by_hash(&crate::token::token_hash(token))
            .await
            .map_err(|e| ApiError::unavailable(format!("collector store unavailable: {e}")))?
            .ok_or_else(|| ApiError::unauthenticated("unknown token"))?;
        if record.expires_unix_ms <= sov_common::clock::now_unix_ms() {
            return Err(ApiError::unauthenticated(format!(
                "token {} expired at {}",
                record.token_id,
                sov_evidence::view::rfc3339(record.expires_unix_ms)
            )));
        }
        return Ok(Caller {
            id: Identity {
                name: format!("token:{}", record.token_id),
                role: record.role,
            },
            via: Via::HttpsToken,
        });
    }
    match peer {
        Peer::Cert(id) => Ok(Caller {
            id: id.clone(),
            via: Via::HttpsCert,
        }),
        Peer::Refused(why) => Err(ApiError::permission_denied(format!(
            "client certificate refused: {why}"
        ))),
        Peer::Anonymous => Err(ApiError::unauthenticated(
            "a client certificate issued by the collector CA, or Authorization: Bearer TOKEN, is required",
        )),
    }
}

/// Decoded query parameters; each route takes the ones it knows and refuses the rest.
#[derive(Debug, Default)]
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: &str) -> Result<Self, ApiError> {
        if query.len() > MAX_QUERY_LEN {
            return Err(ApiError::invalid_argument(
                "query string longer than 2048 bytes",
            ));
        }
        let decode = |s: &str| {
            let plus = s.replace('+', " ");
            percent_encoding::percent_decode_str(&plus)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ApiError::invalid_argument("query string is not UTF-8"))
        };
        let mut out = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.push((decode(k)?, decode(v)?));
        }
        Ok(Self(out))
    }

    /// Refuse parameters not in `known`, and repeated ones.
    fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        for (i, (k, _)) in self.0.iter().enumerate() {
            if !known.contains(&k.as_str()) {
                return Err(ApiError::invalid_argument(format!(
                    "unknown parameter {k:?}; this route takes: {}",
                    known.join(", ")
                )));
            }
            if self.0[..i].iter().any(|(o, _)| o == k) {
                return Err(ApiError::invalid_argument(format!(
                    "parameter {k:?} given twice"
                )));
            }
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self, key: &str) -> String {
        self.get(key).unwrap_or("").to_owned()
    }

    fn number<T: std::str::FromStr + Default>(&self, key: &str) -> Result<T, ApiError> {
        match self.get(key) {
            None | Some("") => Ok(T::default()),
            Some(v) => v.parse().map_err(|_| {
                ApiError::invalid_argument(format!("{key} {v:?} is not a non-negative integer"))
            }),
        }
    }

    /// A time: a duration back from `now` (`24h`, a number with its unit) or Unix milliseconds
    /// (digits only); 0 when absent.
    fn time(&self, key: &str, now: i64) -> Result<i64, ApiError> {
        match self.get(key) {
            None | Some("") => Ok(0),
            Some(v) if v.bytes().all(|b| b.is_ascii_digit()) => v
                .parse()
                .map_err(|_| ApiError::invalid_argument(format!("{key} {v:?} is out of range"))),
            Some(v) => sov_evidence::view::parse_duration_ms(v)
                .map(|d| now.saturating_sub(d))
                .map_err(|e| ApiError::invalid_argument(format!("{key}: {e}"))),
        }
    }
}

/// Answer one API route as JSON.
async fn answer(
    query: &QueryService,
    caller: &Caller,
    route: &str,
    p: Params,
) -> Result<Value, ApiError> {
    use sov_evidence::view::{EgressBy, breach_json, egress_json, model_json, node_json};
    let now = sov_common::clock::now_unix_ms();
    match route {
        "nodes" => {
            p.only(&["limit", "after"])?;
            let r = query
                .list_nodes_as(
                    caller,
                    pb::ListNodesRequest {
                        limit: p.number("limit")?,
                        after: p.text("after"),
                    },
                )
                .await?;
            Ok(json!({
                "nodes": r.nodes.iter().map(node_json).collect::<Vec<_>>(),
                "next_after": r.next_after,
                "derived_up_to_unix_ms": r.derived_up_to_unix_ms,
            }))
        }
        "models" => {
            p.only(&["q", "limit", "after"])?;
            let r = query
                .list_models_as(
                    caller,
                    pb::ListModelsRequest {
                        query: p.text("q"),
                        limit: p.number("limit")?,
                        after: p.text("after"),
                    },
                )
                .await?;
            Ok(json!({
                "models": r.models.iter().map(|m| {
                    let mut v = model_json(m);
                    if let Some(class) = query.model_class(m) {
                        v["class"] = json!(class);
                    }
                    v
                }).collect::<Vec<_>>(),
                "next_after": r.next_after,
                "derived_up_to_unix_ms": r.derived_up_to_unix_ms,
            }))
        }
        "training" => {
            p.only(&["since", "limit"])?;
            let since = match p.time("since", now)? {
                0 => now.saturating_sub(30 * 86_400_000),
                t => t,
            };
            let r = query
                .list_training_as(
                    caller,
                    pb::ListTrainingRequest {
                        since_unix_ms: since,
                        limit: p.number("limit")?,
                    },
                )
                .await?;
            Ok(json!({
                "runs": r.runs.iter().map(sov_evidence::view::training_json).collect::<Vec<_>>(),
                "truncated": r.truncated,
            }))
        }
        "egress" => {
            p.only(&["since", "until", "by", "limit"])?;
            let by_text = p.get("by").filter(|b| !b.is_empty()).unwrap_or("country");
            let by = by_text
                .parse::<EgressBy>()
                .map_err(ApiError::invalid_argument)?;
            let since = match p.time("since", now)? {
                0 => now.saturating_sub(86_400_000),
                t => t,
            };
            let r = query
                .egress_as(
                    caller,
                    pb::EgressRequest {
                        since_unix_ms: since,
                        until_unix_ms: p.time("until", now)?,
                        by: by_text.to_owned(),
                        limit: p.number("limit")?,
                    },
                )
                .await?;
            Ok(json!({
                "by": by_text,
                "rows": r.rows.iter().map(|row| egress_json(row, by)).collect::<Vec<_>>(),
                "truncated": r.truncated,
                "derived_up_to_unix_ms": r.derived_up_to_unix_ms,
                "from": sov_evidence::view::rfc3339(r.from_unix_ms),
                "from_unix_ms": r.from_unix_ms,
                "until": sov_evidence::view::rfc3339(r.until_unix_ms),
                "until_unix_ms": r.until_unix_ms,
            }))
        }
        "breaches" => {
            p.only(&["state", "rule", "node", "min_severity", "since", "limit"])?;
            let state = match p.get("state").unwrap_or("") {
                "all" => String::new(),
                s => s.to_owned(),
            };
            let r = query
                .list_breaches_as(
                    caller,
                    pb::ListBreachesRequest {
                        state,
                        rule: p.text("rule"),
                        since_unix_ms: p.time("since", now)?,
                        limit: p.number("limit")?,
                        node: p.text("node"),
                        min_severity: p.text("min_severity"),
                    },
                )
                .await?;
            Ok(json!({
                "breaches": r.breaches.iter().map(breach_json).collect::<Vec<_>>(),
                "derived_up_to_unix_ms": r.derived_up_to_unix_ms,
            }))
        }
        "audit" => {
            p.only(&["after_seq", "limit"])?;
            let r = query
                .list_audit_as(
                    caller,
                    pb::ListAuditRequest {
                        after_seq: p.number("after_seq")?,
                        limit: p.number("limit")?,
                    },
                )
                .await?;
            Ok(json!({
                "records": r
                    .records
                    .into_iter()
                    .map(|r| sov_evidence::audit::AuditRecord::from(r).to_json())
                    .collect::<Vec<_>>(),
                "next_after_seq": r.next_after_seq,
            }))
        }
        "policy" => {
            p.only(&[])?;
            let r = query.get_policy_as(caller, pb::GetPolicyRequest {}).await?;
            serde_json::from_str(&r.policy_json)
                .map_err(|e| ApiError::internal(format!("policy JSON: {e}")))
        }
        "scorecard" => {
            p.only(&["since", "until", "jurisdiction"])?;
            let since = match p.time("since", now)? {
                0 => now.saturating_sub(30 * 86_400_000),
                t => t,
            };
            let r = query
                .scorecard_as(
                    caller,
                    pb::ScorecardRequest {
                        since_unix_ms: since,
                        until_unix_ms: p.time("until", now)?,
                        jurisdiction: p.text("jurisdiction"),
                    },
                )
                .await?;
            serde_json::from_str(&r.scorecard_json)
                .map_err(|e| ApiError::internal(format!("scorecard: {e}")))
        }
        "series" => {
            p.only(&["since", "until", "jurisdiction", "buckets"])?;
            let since = match p.time("since", now)? {
                0 => now.saturating_sub(86_400_000),
                t => t,
            };
            let r = query
                .series_as(
                    caller,
                    since,
                    p.time("until", now)?,
                    p.get("jurisdiction").unwrap_or(""),
                    p.number("buckets")?,
                )
                .await?;
            Ok(r.value)
        }
        "breach" => {
            p.only(&["id"])?;
            Ok(query
                .breach_as(caller, p.get("id").unwrap_or(""))
                .await?
                .value)
        }
        "bom" => {
            p.only(&["q"])?;
            Ok(query.bom_as(caller, p.get("q").unwrap_or("")).await?.value)
        }
        other => Err(ApiError::not_found(format!("no route /api/v1/{other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_decoded_and_unknown_or_repeated_ones_are_refused() {
        let p = Params::parse("q=llama%203&limit=5&after=a+b").unwrap();
        assert_eq!(p.text("q"), "llama 3");
        assert_eq!(p.text("after"), "a b");
        assert_eq!(p.number::<u32>("limit").unwrap(), 5);
        p.only(&["q", "limit", "after"]).unwrap();
        let err = p.only(&["q", "limit"]).unwrap_err();
        assert!(err.message().contains("\"after\""), "{err:?}");
        let twice = Params::parse("limit=1&limit=2").unwrap();
        assert!(twice.only(&["limit"]).is_err());
        assert!(
            Params::parse("limit=-1")
                .unwrap()
                .number::<u32>("limit")
                .is_err()
        );
    }

    #[test]
    fn times_are_durations_back_from_now_or_unix_milliseconds() {
        let p = Params::parse("since=2h&until=1700000000000").unwrap();
        assert_eq!(p.time("since", 10_000_000).unwrap(), 10_000_000 - 7_200_000);
        assert_eq!(p.time("until", 0).unwrap(), 1_700_000_000_000);
        assert_eq!(p.time("absent", 5).unwrap(), 0);
        assert!(Params::parse("since=2w").unwrap().time("since", 0).is_err());
    }
}
