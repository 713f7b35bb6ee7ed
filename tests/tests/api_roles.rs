//! The role matrix: every gRPC call and every HTTPS route × every kind of caller (agent,
//! regulator and admin certificates, no certificate, a token of each role, an expired token),
//! allowed or refused exactly as specified, over real TLS to a real collector; then the audit
//! log holds exactly the regulators' and admins' queries, and its chain verifies.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;

use sov_agent::transport::ClientTls;
use sov_collector::auth::Role;
use sov_collector::pki::PathPair;
use sov_e2e::{InProcessCollector, Pki, free_port, https_get, push_client, report};
use sov_proto::pb;
use sov_proto::pb::query_client::QueryClient;
use tonic::Code;

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Agent,
    Regulator,
    Admin,
    NoCert,
    AgentToken,
    RegulatorToken,
    AdminToken,
    ExpiredToken,
}

const EVERYONE: [Who; 8] = [
    Who::Agent,
    Who::Regulator,
    Who::Admin,
    Who::NoCert,
    Who::AgentToken,
    Who::RegulatorToken,
    Who::AdminToken,
    Who::ExpiredToken,
];

/// The tokens of each kind, made through the real command line (`token create`) except the
/// expired one, which is written to the store with an expiry in the past.
struct Tokens {
    agent: String,
    regulator: String,
    admin: String,
    expired: String,
}

impl Tokens {
    fn of(&self, who: Who) -> Option<&str> {
        match who {
            Who::AgentToken => Some(&self.agent),
            Who::RegulatorToken => Some(&self.regulator),
            Who::AdminToken => Some(&self.admin),
            Who::ExpiredToken => Some(&self.expired),
            _ => None,
        }
    }
}

fn cert_of(pki: &Pki, who: Who) -> Option<PathPair> {
    match who {
        Who::Agent => Some(pki.client(Role::Agent, "node-a")),
        Who::Regulator => Some(pki.client(Role::Regulator, "analyst")),
        Who::Admin => Some(pki.client(Role::Admin, "operator")),
        _ => None,
    }
}

/// `sov-collector token create` through the real binary: the token on stdout, once.
fn create_token(config: &Path, role: &str, expires: &str) -> String {
    let out = std::process::Command::new(sov_e2e::bin_path("e2e-collector"))
        .args([
            "token",
            "create",
            "--config",
            config.to_str().unwrap(),
            "--role",
            role,
            "--expires",
            expires,
            "--name",
            "matrix",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shown once"), "{stderr}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(sov_collector::token::well_formed(&token), "{token:?}");
    token
}

/// The gRPC query calls, each made once; `Ok(())` or the status code.
async fn grpc_queries(
    client: &mut QueryClient<tonic::transport::Channel>,
    since_unix_ms: i64,
) -> Vec<(&'static str, Result<(), Code>)> {
    let code = |r: Result<(), tonic::Status>| r.map_err(|s| s.code());
    vec![
        (
            "ListNodes",
            code(
                client
                    .list_nodes(pb::ListNodesRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "ListModels",
            code(
                client
                    .list_models(pb::ListModelsRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Egress",
            code(
                client
                    .egress(pb::EgressRequest {
                        since_unix_ms,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "ListBreaches",
            code(
                client
                    .list_breaches(pb::ListBreachesRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "ListAudit",
            code(
                client
                    .list_audit(pb::ListAuditRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "ExportReport",
            code(
                client
                    .export_report(pb::ExportReportRequest {
                        since_unix_ms,
                        until_unix_ms: 0,
                        jurisdiction: "MA".into(),
                    })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Scorecard",
            code(
                client
                    .scorecard(pb::ScorecardRequest {
                        since_unix_ms,
                        until_unix_ms: 0,
                        jurisdiction: "MA".into(),
                    })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "GetPolicy",
            code(client.get_policy(pb::GetPolicyRequest {}).await.map(|_| ())),
        ),
    ]
}

/// gRPC TLS for `who`: its certificate, or none (tokens are an HTTPS credential only; a
/// token sent as gRPC metadata is ignored, so those callers have no identity over gRPC).
fn grpc_tls(pki: &Pki, who: Who) -> ClientTls {
    match cert_of(pki, who) {
        Some(pair) => ClientTls::load(&pki.ca, &pair.cert, &pair.key, None).unwrap(),
        None => ClientTls::ca_only(&std::fs::read_to_string(&pki.ca).unwrap()),
    }
}

#[tokio::test]
async fn every_call_and_route_is_allowed_or_refused_exactly_as_specified_and_queries_are_audited() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let policy = data.path().join("policy.toml");
    std::fs::write(&policy, "jurisdiction = \"MA\"\n").unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |c| {
        c.http.listen = Some(format!("127.0.0.1:{http_port}").parse().unwrap());
        c.policy = Some(policy);
    })
    .await;
    let url = collector.url();
    let http_addr = collector.config.http.listen.unwrap();
    let config_file = data.path().join("collector.toml");
    sov_e2e::write_collector_toml(&collector.config, &config_file);

    let store = sov_collector::store::open("", data.path()).await.unwrap();
    let now = sov_common::clock::now_unix_ms();
    let (expired, record) =
        sov_collector::token::generate(Role::Regulator, "old", now - 10_000, 1).unwrap();
    store.insert_token(record).await.unwrap();
    let tokens = Tokens {
        agent: create_token(&config_file, "agent", "1d"),
        regulator: create_token(&config_file, "regulator", "1d"),
        admin: create_token(&config_file, "admin", "30d"),
        expired,
    };

    // ---- gRPC ----
    for who in EVERYONE {
        let tls = grpc_tls(&pki, who);
        // Ingest.Push: agents only.
        let mut ingest = push_client(&tls, &url).await.unwrap();
        let mut req = tonic::Request::new(report("node-a", 1, 1));
        if let Some(t) = tokens.of(who) {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let got = ingest.push(req).await.map(|_| ()).map_err(|s| s.code());
        let want = match who {
            Who::Agent => Ok(()),
            Who::Regulator | Who::Admin => Err(Code::PermissionDenied),
            _ => Err(Code::Unauthenticated),
        };
        assert_eq!(got, want, "Ingest.Push as {who:?}");

        // Query.*: regulators and admins only.
        let channel = tls.connect(&url).await.unwrap();
        let mut query = QueryClient::new(channel);
        for (call, got) in grpc_queries(&mut query, now - 3_600_000).await {
            let want = match who {
                // The policy is the operator's business: admins only.
                Who::Regulator if call == "GetPolicy" => Err(Code::PermissionDenied),
                Who::Regulator | Who::Admin => Ok(()),
                Who::Agent => Err(Code::PermissionDenied),
                _ => Err(Code::Unauthenticated),
            };
            assert_eq!(got, want, "Query.{call} as {who:?}");
        }
    }

    // ---- HTTPS ----
    let routes = [
        "/api/v1/nodes",
        "/api/v1/models",
        "/api/v1/egress?since=1h",
        "/api/v1/breaches",
        "/api/v1/audit",
        "/api/v1/scorecard?since=1h&jurisdiction=MA",
        "/api/v1/report?since=1h&jurisdiction=MA",
        "/api/v1/policy",
    ];
    for who in EVERYONE {
        let cert = cert_of(&pki, who);
        for route in routes {
            let reply = https_get(&pki, http_addr, cert.as_ref(), tokens.of(who), route)
                .await
                .unwrap();
            let want = match who {
                Who::Regulator | Who::RegulatorToken if route == "/api/v1/policy" => 403,
                Who::Regulator | Who::Admin | Who::RegulatorToken | Who::AdminToken => 200,
                Who::Agent | Who::AgentToken => 403,
                Who::NoCert | Who::ExpiredToken => 401,
            };
            assert_eq!(reply.status, want, "GET {route} as {who:?}: {}", reply.body);
            assert!(
                reply.content_type.starts_with("application/json"),
                "{route}: {}",
                reply.content_type
            );
            if want != 200 {
                let body = reply.json();
                assert!(body["error"].is_string(), "{route} as {who:?}: {body}");
            }
            if who == Who::ExpiredToken {
                assert!(reply.body.contains("expired"), "{}", reply.body);
            }
        }
        // The page itself holds no data: anyone who completes the TLS handshake gets it,
        // and it asks the API (with the caller's credential) for everything it shows.
        let page = https_get(&pki, http_addr, cert.as_ref(), tokens.of(who), "/")
            .await
            .unwrap();
        assert_eq!(page.status, 200, "page as {who:?}");
        assert!(page.content_type.starts_with("text/html"));
    }
    // A token wins over a certificate: a regulator certificate with an expired token is refused.
    let reply = https_get(
        &pki,
        http_addr,
        cert_of(&pki, Who::Regulator).as_ref(),
        Some(&tokens.expired),
        "/api/v1/nodes",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 401);
    // A made-up token of the right shape is unknown.
    let forged = format!("sov_{}", "ab".repeat(32));
    let reply = https_get(&pki, http_addr, None, Some(&forged), "/api/v1/nodes")
        .await
        .unwrap();
    assert_eq!(reply.status, 401, "{}", reply.body);
    // A certificate from another CA fails the handshake.
    let other = Pki::new();
    let stranger = other.client(Role::Admin, "stranger");
    let mut foreign = Pki::new();
    foreign.ca = pki.ca.clone();
    assert!(
        https_get(&foreign, http_addr, Some(&stranger), None, "/api/v1/nodes")
            .await
            .is_err(),
        "a certificate from another CA must fail the TLS handshake"
    );

    // ---- the audit log ----
    // Regulator and admin (certificates over gRPC and HTTPS, tokens over HTTPS): 8 gRPC calls
    // each, and 8 routes for each of the four HTTPS callers — a regulator's refused GetPolicy
    // is recorded too. Refusals (agents, unknown or expired tokens, refused certificates) are
    // records of their own, outcome `refused: …` (issue 17, finding 10), counted apart.
    let mut records = Vec::new();
    let mut after = 0;
    loop {
        let page = store.audit_log(after, 1000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        records.extend(page);
    }
    let (refusals, records): (Vec<_>, Vec<_>) = records.into_iter().partition(|r| {
        r.body()["outcome"]
            .as_str()
            .is_some_and(|o| o.starts_with("refused: "))
    });
    assert!(
        refusals.iter().any(|r| r.body()["role"] == "agent"),
        "{refusals:#?}"
    );
    assert_eq!(records.len(), 2 * 8 + 4 * 8, "{records:#?}");
    let by = |role: &str, via: &str| {
        records
            .iter()
            .filter(|r| {
                let b = r.body();
                b["role"] == role && b["via"] == via
            })
            .count()
    };
    assert_eq!(by("regulator", "grpc"), 8);
    assert_eq!(by("admin", "grpc"), 8);
    assert_eq!(by("regulator", "https-cert"), 8);
    assert_eq!(by("admin", "https-cert"), 8);
    assert_eq!(by("regulator", "https-token"), 8);
    assert_eq!(by("admin", "https-token"), 8);
    assert!(records.iter().all(|r| !r.actor.starts_with("agent/")));
    let refused = records
        .iter()
        .find(|r| r.call == "GetPolicy" && r.body()["role"] == "regulator")
        .unwrap()
        .body();
    assert!(
        refused["outcome"]
            .as_str()
            .unwrap()
            .contains("PermissionDenied"),
        "{refused}"
    );
    let egress = records
        .iter()
        .find(|r| r.call == "Egress" && r.body()["via"] == "https-cert")
        .unwrap()
        .body();
    assert_eq!(egress["who"], "analyst");
    assert_eq!(egress["params"]["by"], "country");
    assert_eq!(egress["outcome"], "ok");
    let token_record = records
        .iter()
        .find(|r| r.body()["via"] == "https-token")
        .unwrap();
    assert!(
        token_record.body()["who"]
            .as_str()
            .unwrap()
            .starts_with("token:"),
        "{token_record:?}"
    );
    // The chain verifies, through the real command line too.
    let out = std::process::Command::new(sov_e2e::bin_path("e2e-collector"))
        .args(["verify-audit", "--config", config_file.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("{} records", records.len() + refusals.len())),
        "{stdout}"
    );
    // The collector signed the audit log's head when it started.
    assert!(stdout.contains("signed checkpoint"), "{stdout}");

    // A revoked token stops working at once; `token list` no longer shows it.
    let id = &sov_collector::token::token_hash(&tokens.regulator)[..12];
    let cli = |args: &[&str]| {
        std::process::Command::new(sov_e2e::bin_path("e2e-collector"))
            .args(["token"])
            .args(args)
            .args(["--config", config_file.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let listed = String::from_utf8(cli(&["list"]).stdout).unwrap();
    assert!(
        listed.contains(id) && listed.contains("expired"),
        "{listed}"
    );
    assert!(cli(&["revoke", id]).status.success());
    let reply = https_get(
        &pki,
        http_addr,
        None,
        Some(&tokens.regulator),
        "/api/v1/nodes",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert!(
        !String::from_utf8(cli(&["list"]).stdout)
            .unwrap()
            .contains(id)
    );
    assert!(!cli(&["revoke", id]).status.success());

    collector.stop().await;
}
