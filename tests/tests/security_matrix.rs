//! The security matrix: every gRPC call (Ingest.Push, the six Query calls, Enroll.Enroll,
//! Enroll.Renew) and the HTTPS API × every role × every kind of certificate (valid, none,
//! from another CA, expired, not yet valid, server-auth only, a CA certificate, revoked, a
//! name not matching the report): allowed or refused exactly as specified, over real mutual
//! TLS to a real collector. Then revocation and rotation while everything keeps running:
//! a certificate revoked while its connection is open is refused on that connection and at
//! every new handshake; the collector's own certificate and its client CA are replaced on
//! disk and new handshakes use them without a restart.
//!
//! Specified refusals (documented in docs/RELIABILITY.md):
//! - no certificate → UNAUTHENTICATED (HTTPS 401), the TLS handshake succeeds;
//! - a certificate that does not verify (another CA, expired, not yet valid, without the
//!   clientAuth usage, a CA certificate, revoked) → the handshake fails with a TLS alert;
//!   nothing reaches a service;
//! - a valid certificate of the wrong role → PERMISSION_DENIED (HTTPS 403);
//! - an agent pushing another node's report → PERMISSION_DENIED;
//! - a certificate revoked after its connection was opened → PERMISSION_DENIED on the next
//!   request.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use sov_agent::transport::ClientTls;
use sov_collector::auth::Role;
use sov_collector::pki::PathPair;
use sov_e2e::{InProcessCollector, Pki, eventually, free_port, https_get, report, tls_probe};
use sov_proto::pb;
use sov_proto::pb::enroll_client::EnrollClient;
use sov_proto::pb::ingest_client::IngestClient;
use sov_proto::pb::query_client::QueryClient;
use tonic::Code;

/// The kind of certificate a caller presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Valid,
    NoCert,
    OtherCa,
    Expired,
    NotYetValid,
    ServerAuthOnly,
    CaCertificate,
    Revoked,
}

const KINDS: [Kind; 8] = [
    Kind::Valid,
    Kind::NoCert,
    Kind::OtherCa,
    Kind::Expired,
    Kind::NotYetValid,
    Kind::ServerAuthOnly,
    Kind::CaCertificate,
    Kind::Revoked,
];

/// The TLS alert the collector sends for a certificate of this kind (`None`: the handshake
/// succeeds).
fn alert(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Valid | Kind::NoCert => None,
        // Every Sovereign CA bears the same name: the issuer is found by name, and the
        // signature made by another CA's key does not verify.
        Kind::OtherCa => Some("DecryptError"),
        Kind::Expired | Kind::NotYetValid => Some("CertificateExpired"),
        Kind::ServerAuthOnly => Some("UnsupportedCertificate"),
        Kind::CaCertificate => Some("CertificateUnknown"),
        Kind::Revoked => Some("CertificateRevoked"),
    }
}

/// The certificate of `role` of this kind (`None` for no certificate). Names differ per kind
/// so that nothing is shared between rows.
fn cert(pki: &Pki, other: &Pki, role: Role, kind: Kind) -> Option<PathPair> {
    let name = |k: &str| format!("{role}-{k}");
    Some(match kind {
        Kind::Valid => pki.client(role, &name("valid")),
        Kind::NoCert => return None,
        Kind::OtherCa => other.client(role, &name("foreign")),
        Kind::Expired => pki.client_with(role, &name("expired"), |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }),
        Kind::NotYetValid => pki.client_with(role, &name("future"), |p| {
            p.not_before = rcgen::date_time_ymd(2080, 1, 1);
            p.not_after = rcgen::date_time_ymd(2081, 1, 1);
        }),
        Kind::ServerAuthOnly => pki.client_with(role, &name("serverauth"), |p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        }),
        Kind::CaCertificate => pki.client_with(role, &name("subca"), |p| {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
        }),
        Kind::Revoked => pki.client(role, &name("revoked")),
    })
}

fn tls_for(pki: &Pki, pair: Option<&PathPair>) -> ClientTls {
    match pair {
        Some(p) => ClientTls::load(&pki.ca, &p.cert, &p.key, None).unwrap(),
        None => ClientTls::ca_only(&std::fs::read_to_string(&pki.ca).unwrap()),
    }
}

fn der_of(pair: &PathPair) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::from_pem_file(&pair.cert).unwrap().to_vec()
}

/// A real certificate request (for Enroll), from a fresh key.
fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

/// Every gRPC call once; each result as `Ok(())` or the status code. `None` when the channel
/// could not even be set up.
async fn every_call(
    tls: &ClientTls,
    url: &str,
    node: &str,
    seq: u64,
) -> Vec<(&'static str, Result<(), Code>)> {
    let code = |r: Result<(), tonic::Status>| r.map_err(|s| s.code());
    let channel = match tls.connect(url).await {
        Ok(c) => c,
        Err(_) => return vec![("connect", Err(Code::Unavailable))],
    };
    let mut ingest = IngestClient::new(channel.clone());
    let mut query = QueryClient::new(channel.clone());
    let mut enroll = EnrollClient::new(channel);
    let since = sov_common::clock::now_unix_ms() - 3_600_000;
    vec![
        (
            "Ingest.Push",
            code(ingest.push(report(node, 1, seq)).await.map(|_| ())),
        ),
        (
            "Ingest.Push(other node)",
            code(
                ingest
                    .push(report("someone-else", 1, seq))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Query.ListNodes",
            code(
                query
                    .list_nodes(pb::ListNodesRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Query.ListModels",
            code(
                query
                    .list_models(pb::ListModelsRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Query.Egress",
            code(
                query
                    .egress(pb::EgressRequest {
                        since_unix_ms: since,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Query.ListBreaches",
            code(
                query
                    .list_breaches(pb::ListBreachesRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Query.ListAudit",
            code(
                query
                    .list_audit(pb::ListAuditRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Query.Scorecard",
            code(
                query
                    .scorecard(pb::ScorecardRequest {
                        since_unix_ms: since,
                        until_unix_ms: 0,
                        jurisdiction: "MA".into(),
                    })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Query.GetPolicy",
            code(query.get_policy(pb::GetPolicyRequest {}).await.map(|_| ())),
        ),
        (
            "Enroll.Enroll(unknown token)",
            code(
                enroll
                    .enroll(pb::EnrollRequest {
                        token: "not-a-token".into(),
                        node: "newcomer".into(),
                        csr_der: csr(),
                    })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "Enroll.Renew(empty request)",
            code(enroll.renew(pb::RenewRequest::default()).await.map(|_| ())),
        ),
    ]
}

/// What a caller with a valid certificate of `role` (or none) must get from `call`.
fn expected(role: Option<Role>, call: &str) -> Result<(), Code> {
    let Some(role) = role else {
        // No certificate: every call needs an identity, Enroll a token.
        return Err(Code::Unauthenticated);
    };
    match (call, role) {
        ("Ingest.Push", Role::Agent) => Ok(()),
        ("Ingest.Push(other node)", Role::Agent) => Err(Code::PermissionDenied),
        ("Ingest.Push" | "Ingest.Push(other node)", _) => Err(Code::PermissionDenied),
        // The policy is the operator's business: admins only.
        ("Query.GetPolicy", Role::Admin) => Ok(()),
        ("Query.GetPolicy", _) => Err(Code::PermissionDenied),
        (q, Role::Regulator | Role::Admin) if q.starts_with("Query.") => Ok(()),
        (q, Role::Agent) if q.starts_with("Query.") => Err(Code::PermissionDenied),
        ("Enroll.Enroll(unknown token)", _) => Err(Code::Unauthenticated),
        // Past authentication and the role check: the empty request itself is refused.
        ("Enroll.Renew(empty request)", Role::Agent) => Err(Code::InvalidArgument),
        ("Enroll.Renew(empty request)", _) => Err(Code::PermissionDenied),
        (other, _) => panic!("no expectation for {other}"),
    }
}

async fn start(pki: &Pki, data: &Path, revoked: &Path) -> (InProcessCollector, SocketAddr) {
    let http_port = free_port();
    let ca_key = pki.dir.path().join(sov_collector::pki::CA_KEY_FILE);
    let policy = data.join("policy.toml");
    std::fs::write(&policy, "jurisdiction = \"MA\"\n").unwrap();
    let collector = InProcessCollector::start(pki, data, |c| {
        c.http.listen = Some(format!("127.0.0.1:{http_port}").parse().unwrap());
        c.policy = Some(policy);
        c.tls.revoked = Some(revoked.to_owned());
        c.enroll.ca_key = Some(ca_key);
    })
    .await;
    let http = collector.config.http.listen.unwrap();
    (collector, http)
}

#[tokio::test]
async fn every_call_and_route_times_every_role_and_certificate_kind_is_allowed_or_refused_as_specified()
 {
    let pki = Pki::new();
    let other = Pki::new();
    let data = tempfile::tempdir().unwrap();
    // The revoked certificates: agent by fingerprint, regulator by serial, admin by identity.
    let revoked_file = data.path().join("revoked.txt");
    let mut deny = String::from("# revoked for the matrix\n");
    for role in Role::ALL {
        let pair = cert(&pki, &other, role, Kind::Revoked).unwrap();
        let der = der_of(&pair);
        if role == Role::Admin {
            deny.push_str(&format!(
                "id:{}\n",
                sov_collector::auth::spiffe_id("sovereign", role, &format!("{role}-revoked"))
            ));
        } else if role == Role::Regulator {
            let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
            deny.push_str(&format!(
                "serial:{}\n",
                x.tbs_certificate.raw_serial_as_string()
            ));
        } else {
            deny.push_str(&format!(
                "{}  # {role}\n",
                sov_collector::tls::fingerprint_hex(&der)
            ));
        }
    }
    std::fs::write(&revoked_file, deny).unwrap();
    let (collector, http) = start(&pki, data.path(), &revoked_file).await;
    let url = collector.url();

    let mut seq = 0;
    let mut agent_reports = 0;
    for kind in KINDS {
        for role in Role::ALL {
            if kind == Kind::NoCert && role != Role::Agent {
                continue; // one row: no certificate has no role
            }
            let pair = cert(&pki, &other, role, kind);
            // The handshake itself.
            let probe = tls_probe(&pki.ca, pair.as_ref(), collector.addr).await;
            match alert(kind) {
                None => assert_eq!(probe, Ok(()), "{kind:?} {role}: handshake"),
                Some(a) => {
                    let err = probe.expect_err(&format!("{kind:?} {role}: handshake accepted"));
                    assert!(
                        err.contains(a),
                        "{kind:?} {role}: want alert {a}, got {err}"
                    );
                }
            }
            // Every gRPC call.
            seq += 1;
            let node = format!("{role}-valid");
            let tls = tls_for(&pki, pair.as_ref());
            for (call, got) in every_call(&tls, &url, &node, seq).await {
                match kind {
                    Kind::Valid => {
                        assert_eq!(got, expected(Some(role), call), "{call} as {kind:?} {role}");
                        if call == "Ingest.Push" && got.is_ok() {
                            agent_reports += 1;
                        }
                    }
                    Kind::NoCert => {
                        assert_eq!(got, expected(None, call), "{call} without a certificate")
                    }
                    _ => {
                        let code = got.expect_err(&format!("{call} as {kind:?} {role} allowed"));
                        assert!(
                            !matches!(code, Code::InvalidArgument | Code::FailedPrecondition),
                            "{call} as {kind:?} {role} reached the service: {code:?}"
                        );
                    }
                }
            }
            // The HTTPS API.
            let reply = https_get(&pki, http, pair.as_ref(), None, "/api/v1/nodes").await;
            match (kind, role) {
                (Kind::Valid, Role::Agent) => assert_eq!(reply.unwrap().status, 403),
                (Kind::Valid, _) => assert_eq!(reply.unwrap().status, 200, "{role}"),
                (Kind::NoCert, _) => assert_eq!(reply.unwrap().status, 401),
                _ => assert!(
                    reply.is_err(),
                    "HTTPS as {kind:?} {role} got through: {reply:?}"
                ),
            }
        }
    }
    // Only the valid agent's reports were stored; no other node exists.
    let nodes = sov_e2e::list_nodes(&pki, &url).await.unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0].node, "agent-valid");
    assert_eq!(nodes[0].reports, agent_reports);

    // ---- revocation while connected ----
    // An HTTPS reader with a keep-alive connection, opened before its revocation.
    let reader = pki.client(Role::Regulator, "late-reader");
    let mut https = https_keepalive(&pki, http, &reader).await;
    assert_eq!(get_status(&mut https, "/api/v1/nodes").await, 200);
    let late = pki.client(Role::Agent, "late");
    let channel = tls_for(&pki, Some(&late)).connect(&url).await.unwrap();
    let mut ingest = IngestClient::new(channel);
    ingest.push(report("late", 1, 1)).await.unwrap();
    let mut deny = std::fs::read_to_string(&revoked_file).unwrap();
    deny.push_str(&format!(
        "{}  # late\nid:{}\n",
        sov_collector::tls::fingerprint_hex(&der_of(&late)),
        sov_collector::auth::spiffe_id("sovereign", Role::Regulator, "late-reader")
    ));
    std::fs::write(&revoked_file, &deny).unwrap();
    let mut n = 1;
    let status = eventually(
        Duration::from_secs(30),
        "the open connection refused",
        || {
            n += 1;
            let mut c = ingest.clone();
            async move { c.push(report("late", 1, n)).await.err() }
        },
    )
    .await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("revoked"), "{}", status.message());
    let err = tls_probe(&pki.ca, Some(&late), collector.addr)
        .await
        .expect_err("a revoked certificate completed a new handshake");
    assert!(err.contains("CertificateRevoked"), "{err}");
    let late_node = sov_e2e::node(&pki, &url, "late").await.unwrap();
    assert!(late_node.reports < n, "a refused report was stored");
    // The HTTPS connection opened before is refused on its next requests (once the HTTPS
    // listener, which reloads on its own schedule, has the new list).
    let mut refused = false;
    for _ in 0..100 {
        match get_status(&mut https, "/api/v1/nodes").await {
            403 => {
                refused = true;
                break;
            }
            200 => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        refused,
        "the revoked reader kept reading on its open connection"
    );
    assert!(
        https_get(&pki, http, Some(&reader), None, "/api/v1/nodes")
            .await
            .is_err(),
        "a revoked identity completed a new HTTPS handshake"
    );

    // A malformed deny list is not applied: the previous one stays in force.
    std::fs::write(&revoked_file, format!("{deny}not a fingerprint\n")).unwrap();
    tokio::time::sleep(sov_collector::tls::TLS_RELOAD_EVERY * 2).await;
    assert!(
        tls_probe(&pki.ca, Some(&late), collector.addr)
            .await
            .is_err(),
        "a malformed deny list lifted the revocations"
    );
    // Taking the line out lets the node back in, without a restart.
    std::fs::write(&revoked_file, "").unwrap();
    eventually(
        Duration::from_secs(30),
        "the unrevoked node accepted",
        || async { tls_probe(&pki.ca, Some(&late), collector.addr).await.ok() },
    )
    .await;
    collector.stop().await;
}

/// An HTTP/1.1 keep-alive connection to the HTTPS API presenting `client`.
async fn https_keepalive(
    pki: &Pki,
    addr: SocketAddr,
    client: &PathPair,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&pki.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let certs = CertificateDer::pem_file_iter(&client.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&client.key).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// `GET path` on an open connection: the status.
async fn get_status(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
) -> u16 {
    use http_body_util::BodyExt as _;
    sender.ready().await.unwrap();
    let req = hyper::Request::get(path)
        .header("host", "localhost")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

/// Replace `to` with `from`'s bytes by rename, the way deployment tools rotate files.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[tokio::test]
async fn the_collector_certificate_and_its_client_ca_rotate_without_a_restart() {
    let pki = Pki::new();
    let next = Pki::new(); // the new collector certificate and the new client CA
    let data = tempfile::tempdir().unwrap();
    // The collector reads copies, which the test replaces.
    let files = data.path().join("tls");
    std::fs::create_dir(&files).unwrap();
    let (ca, cert, key) = (
        files.join("clients-ca.pem"),
        files.join("collector.pem"),
        files.join("collector.key"),
    );
    std::fs::copy(&pki.ca, &ca).unwrap();
    std::fs::copy(&pki.collector.cert, &cert).unwrap();
    std::fs::copy(&pki.collector.key, &key).unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |c| {
        c.tls.ca = ca.clone();
        c.tls.cert = cert.clone();
        c.tls.key = key.clone();
    })
    .await;
    let url = collector.url();
    let old_agent = pki.client(Role::Agent, "old-agent");
    let new_agent = next.client(Role::Agent, "new-agent");

    // Before: the old collector certificate; a client CA that knows only `pki`.
    let old_trust = tls_for(&pki, Some(&old_agent));
    let open = IngestClient::new(old_trust.connect(&url).await.unwrap());
    open.clone().push(report("old-agent", 1, 1)).await.unwrap();
    assert!(
        tls_probe(&next.ca, Some(&old_agent), collector.addr)
            .await
            .is_err()
    );
    let err = tls_probe(&pki.ca, Some(&new_agent), collector.addr)
        .await
        .unwrap_err();
    assert!(err.contains("DecryptError"), "{err}");

    // Rotate: the collector's certificate and key now come from `next`; the client CA file
    // holds both CAs (old agents keep working while new ones are issued).
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&pki.ca).unwrap(),
        std::fs::read_to_string(&next.ca).unwrap()
    );
    std::fs::write(files.join("both.pem"), both).unwrap();
    replace(&files.join("both.pem"), &ca);
    replace(&next.collector.key, &key);
    replace(&next.collector.cert, &cert);

    // New handshakes present the new certificate (verified against `next`'s CA only) ...
    eventually(
        Duration::from_secs(30),
        "the new collector certificate",
        || async {
            tls_probe(&next.ca, Some(&old_agent), collector.addr)
                .await
                .ok()
        },
    )
    .await;
    let err = tls_probe(&pki.ca, Some(&old_agent), collector.addr)
        .await
        .unwrap_err();
    assert!(
        err.contains("certificate"),
        "the old certificate is still served: {err}"
    );
    // ... and accept agents of the new CA, and still those of the old one.
    let mut new = IngestClient::new(
        ClientTls::load(&next.ca, &new_agent.cert, &new_agent.key, None)
            .unwrap()
            .connect(&url)
            .await
            .unwrap(),
    );
    new.push(report("new-agent", 1, 1)).await.unwrap();
    let mut old_again = IngestClient::new(
        ClientTls::load(&next.ca, &old_agent.cert, &old_agent.key, None)
            .unwrap()
            .connect(&url)
            .await
            .unwrap(),
    );
    old_again.push(report("old-agent", 1, 2)).await.unwrap();
    // The connection opened before the rotation was never cut.
    open.clone().push(report("old-agent", 1, 3)).await.unwrap();
    collector.stop().await;
}
