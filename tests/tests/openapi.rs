//! `docs/openapi.json` describes the server exactly: the same routes, every documented
//! parameter accepted (with its example) and any other refused, every enum enforced, and each
//! answer carrying the keys its schema requires (objects, arrays of objects, nested ones).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeSet;

use serde_json::Value;
use sov_collector::auth::Role;
use sov_e2e::{InProcessCollector, Pki, free_port, https_get, push_client};
use sov_proto::pb;

const SPEC: &str = include_str!("../../docs/openapi.json");

/// Follow a `$ref` into `components`.
fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            let s = &spec["components"]["schemas"][name];
            assert!(s.is_object(), "dangling $ref {r}");
            s
        }
        None => schema,
    }
}

/// Check `value` against `schema`: required keys present, known properties checked in turn,
/// arrays item by item. Returns how many objects were checked.
fn check(spec: &Value, schema: &Value, value: &Value, at: &str) -> usize {
    let schema = resolve(spec, schema);
    let mut checked = 0;
    if value.is_null() && schema["nullable"] == true {
        return 0;
    }
    match schema["type"].as_str() {
        Some("object") => {
            assert!(value.is_object(), "{at}: expected an object, got {value}");
            checked += 1;
            for key in schema["required"].as_array().into_iter().flatten() {
                let key = key.as_str().unwrap();
                assert!(
                    value.get(key).is_some(),
                    "{at}: missing required key {key:?} in {value}"
                );
            }
            for (key, sub) in schema["properties"].as_object().into_iter().flatten() {
                if let Some(v) = value.get(key)
                    && !sub.as_object().is_some_and(serde_json::Map::is_empty)
                {
                    checked += check(spec, sub, v, &format!("{at}.{key}"));
                }
            }
        }
        Some("array") => {
            let items = value
                .as_array()
                .unwrap_or_else(|| panic!("{at}: expected an array"));
            for (i, item) in items.iter().enumerate() {
                checked += check(spec, &schema["items"], item, &format!("{at}[{i}]"));
            }
        }
        Some("string") => assert!(value.is_string(), "{at}: expected a string, got {value}"),
        Some("integer") => assert!(
            value.is_u64() || value.is_i64(),
            "{at}: expected an integer"
        ),
        Some("boolean") => assert!(value.is_boolean(), "{at}: expected a boolean"),
        _ => {}
    }
    if let Some(allowed) = schema["enum"].as_array() {
        assert!(allowed.contains(value), "{at}: {value} not in {allowed:?}");
    }
    checked
}

/// The pod the seeded process runs in.
fn pod() -> pb::ContainerRef {
    pb::ContainerRef {
        runtime: "containerd".into(),
        id: "0123456789abcdef".into(),
        name: "0123456789abcdef".into(),
        image: "docker.io/ollama/ollama:0.3".into(),
        pod_name: "ollama-0".into(),
        pod_namespace: "inference".into(),
        container_name: "ollama".into(),
        source: "runtime".into(),
        ..Default::default()
    }
}

async fn seed(pki: &Pki, url: &str, data: &std::path::Path) {
    let at = sov_common::clock::now_unix_ms() - 600_000;
    let r = pb::Report {
        epoch: 1,
        seq: 1,
        observed_unix_ms: at,
        node_info: Some(pb::NodeInfo {
            node: "n1".into(),
            site: "rabat-1".into(),
            country: "MA".into(),
            ..Default::default()
        }),
        host: Some(pb::HostSample::default()),
        weight_inventory_full: true,
        weight_files: vec![pb::WeightFile {
            path: "/models/llama.gguf".into(),
            format: pb::WeightFormat::Gguf as i32,
            size_bytes: 10,
            sha256: "d".repeat(64),
            identity: Some(pb::ModelIdentity {
                model: "meta-llama/llama-3".into(),
                base_models: vec![pb::BaseModel {
                    name: "meta-llama/Llama-3.1-8B".into(),
                    source: "gguf-metadata".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            users: vec![pb::WeightUser {
                pid: 7,
                process: "ollama".into(),
                container: Some(Box::new(pod())),
                ..Default::default()
            }],
            container: Some(pod()),
            container_path: "/models/llama.gguf".into(),
            ..Default::default()
        }],
        training_runs: vec![pb::TrainingRun {
            run_id: "7-100-abcd".into(),
            pid: 7,
            process: "python3".into(),
            start_unix_ms: at,
            last_activity_unix_ms: at,
            gpu_seconds: 36.0,
            inputs: vec![
                pb::TrainingInput {
                    kind: "base-weights".into(),
                    path: "/models/llama.gguf".into(),
                    model: "meta-llama/llama-3".into(),
                    mapped: true,
                    ..Default::default()
                },
                pb::TrainingInput {
                    kind: "dataset".into(),
                    path: "/data/train.parquet".into(),
                    format: "parquet".into(),
                    size_bytes: 5 << 20,
                    ..Default::default()
                },
            ],
            outputs: vec![pb::TrainingOutput {
                path: "/out/ckpt-1.safetensors".into(),
                size_bytes: 1000,
                ..Default::default()
            }],
            ..Default::default()
        }],
        flows: vec![pb::Flow {
            protocol: pb::Protocol::Tcp as i32,
            remote_address: "192.0.2.1".into(),
            remote_port: 443,
            pid: 7,
            bytes_sent: 100,
            direction: pb::Direction::Outbound as i32,
            connections: 1,
            end_unix_ms: at,
            container: Some(pod()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut c = push_client(&pki.client_tls(Role::Agent, "n1"), url)
        .await
        .unwrap();
    c.push(r).await.unwrap();
    let store = sov_collector::store::open("", data).await.unwrap();
    store
        .observe_breach(sov_collector::breach::Observation {
            rule: "foreign-egress".into(),
            node: "n1".into(),
            subject: "country:US".into(),
            severity: sov_collector::breach::Severity::Critical,
            evidence: serde_json::json!({"bytes": 100}),
            at_unix_ms: at,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn the_openapi_file_matches_the_routes_parameters_and_answers_of_the_server() {
    let spec: Value = serde_json::from_str(SPEC).unwrap();
    assert_eq!(spec["openapi"], "3.0.3");
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let policy = data.path().join("policy.toml");
    std::fs::write(
        &policy,
        "jurisdiction = \"MA\"\n[[site]]\nname = \"rabat\"\ncountry = \"MA\"\n[[model]]\nmatch = \"acme/*\"\nclass = \"restricted\"\n[[allow]]\ncidr = \"198.51.100.0/24\"\nreason = \"backup provider\"\nexpires = \"2030-01-01T00:00:00Z\"\n",
    )
    .unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |c| {
        c.http.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
        c.policy = Some(policy);
    })
    .await;
    seed(&pki, &collector.url(), data.path()).await;
    let addr = collector.config.http.listen.unwrap();
    // An admin may call every route (the policy is admins' only).
    let reg = pki.client(Role::Admin, "operator");

    // The same routes.
    let documented: BTreeSet<String> = spec["paths"].as_object().unwrap().keys().cloned().collect();
    let served: BTreeSet<String> = sov_collector::query::http::ROUTES
        .iter()
        .map(|r| format!("/api/v1/{r}"))
        .collect();
    assert_eq!(documented, served);

    // The breach page's id: a real one (the example's breach is not in this store).
    let breach_id = https_get(&pki, addr, Some(&reg), None, "/api/v1/breaches")
        .await
        .unwrap()
        .json()["breaches"][0]["breach_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut objects = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        let op = &item["get"];
        let params = op["parameters"].as_array().unwrap();
        // Every documented parameter with its example is accepted.
        let query: Vec<String> = params
            .iter()
            .filter_map(|p| {
                let example = p["example"].as_str()?;
                let name = p["name"].as_str().unwrap();
                if path == "/api/v1/breach" && name == "id" {
                    return Some(format!("id={breach_id}"));
                }
                Some(format!("{name}={example}"))
            })
            .collect();
        let url = format!("{path}?{}", query.join("&"));
        let reply = https_get(&pki, addr, Some(&reg), None, &url).await.unwrap();
        assert_eq!(reply.status, 200, "GET {url}: {}", reply.body);
        let schema = &op["responses"]["200"]["content"]["application/json"]["schema"];
        objects += check(&spec, schema, &reply.json(), &url);

        // Anything undocumented is refused, with the documented error shape.
        let reply = https_get(
            &pki,
            addr,
            Some(&reg),
            None,
            &format!("{path}?undocumented=1"),
        )
        .await
        .unwrap();
        assert_eq!(
            reply.status, 400,
            "{path} accepted an undocumented parameter"
        );
        check(
            &spec,
            &op["responses"]["default"]["content"]["application/json"]["schema"],
            &reply.json(),
            path,
        );
        // Documented enumerations are enforced, and each documented value is served as the
        // schema says.
        for p in params {
            if let Some(values) = p["schema"]["enum"].as_array() {
                let name = p["name"].as_str().unwrap();
                for v in values {
                    let url = format!("{path}?{name}={}", v.as_str().unwrap());
                    let reply = https_get(&pki, addr, Some(&reg), None, &url).await.unwrap();
                    assert_eq!(reply.status, 200, "GET {url}: {}", reply.body);
                    // Answers in another format (a report as HTML) have no JSON schema.
                    let value = reply.json();
                    if !value.is_null() {
                        let schema =
                            &op["responses"]["200"]["content"]["application/json"]["schema"];
                        objects += check(&spec, schema, &value, &url);
                    }
                }
                let reply = https_get(
                    &pki,
                    addr,
                    Some(&reg),
                    None,
                    &format!("{path}?{name}=nonsense"),
                )
                .await
                .unwrap();
                assert_eq!(reply.status, 400, "{path}?{name}=nonsense: {}", reply.body);
            }
        }
        // Without a credential: 401 with the error shape.
        let reply = https_get(&pki, addr, None, None, path).await.unwrap();
        assert_eq!(reply.status, 401);
        check(
            &spec,
            &op["responses"]["default"]["content"]["application/json"]["schema"],
            &reply.json(),
            path,
        );
    }
    // Arrays were not empty: nodes, models, egress rows, breaches, audit records and the
    // scorecard's parts were all checked against their schemas.
    assert!(objects >= 14, "only {objects} objects checked");

    // The server publishes the same file.
    let reply = https_get(&pki, addr, None, None, "/api/v1/openapi.json")
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, SPEC);
    collector.stop().await;
}
