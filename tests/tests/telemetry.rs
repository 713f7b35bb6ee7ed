//! Host and GPU telemetry travels from the agent to the collector and out through sovctl.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use sov_agent::Agent;
use sov_agent::collect::gpu::GpuCollector;
use sov_agent::collect::gpu::fake::{ScriptedProbe, device, process};
use sov_e2e::{InProcessCollector, Pki, agent_config, eventually, node};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_gpu_samples_arrive_at_the_collector_and_in_sovctl() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |_| {}).await;
    let url = collector.url();
    let spool = tempfile::tempdir().unwrap();
    let cfg = agent_config(&pki, "gpu-node", vec![url.clone()], spool.path());
    // Two GPUs (a scripted NVML double): 80 % and 20 % busy, one process on the first.
    let me = std::process::id();
    let mut busy = device(0).with_process(process(me, 2 << 30).sm(50));
    busy.utilization_gpu_percent = 80;
    let mut idle = device(1);
    idle.utilization_gpu_percent = 20;
    let probe = ScriptedProbe::new().then_ok(vec![busy, idle]);
    let agent = Agent::open(cfg)
        .unwrap()
        .with_gpu(Some(GpuCollector::with_probe(Box::new(probe))));
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));

    let n = eventually(
        Duration::from_secs(30),
        "two reports with GPU samples",
        || async {
            node(&pki, &url, "gpu-node")
                .await
                .filter(|n| n.reports >= 2 && n.gpu_count == 2)
        },
    )
    .await;
    assert_eq!(n.gpu_state, "ok");
    assert!((n.gpu_util_percent - 50.0).abs() < 0.01, "{n:?}");
    assert!(n.memory_total_bytes > 0 && n.memory_used_bytes > 0, "{n:?}");
    stop.cancel();
    task.await.unwrap().unwrap();

    // The time series rows exist, and GPU-seconds name the process.
    let db = rusqlite::Connection::open(data.path().join(sov_collector::store::sqlite::DB_FILE))
        .unwrap();
    let count = |sql: &str| db.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
    assert!(count("SELECT COUNT(*) FROM host_samples WHERE node = 'gpu-node'") >= 2);
    assert!(count("SELECT COUNT(*) FROM gpu_samples WHERE node = 'gpu-node'") >= 4);
    let (pid, name, secs): (i64, String, f64) = db
        .query_row(
            "SELECT pid, process_name, SUM(gpu_seconds) FROM gpu_usage WHERE node = 'gpu-node' GROUP BY pid",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(pid, i64::from(me));
    assert!(
        !name.is_empty(),
        "the GPU process is named from the process list"
    );
    assert!(secs > 0.0, "GPU-seconds accounted: {secs}");

    // sovctl shows the new columns.
    let reg = pki.client(sov_collector::auth::Role::Regulator, "alice");
    let args = vec![
        "--collector".to_owned(),
        url.clone(),
        "--ca".to_owned(),
        pki.ca.display().to_string(),
        "--cert".to_owned(),
        reg.cert.display().to_string(),
        "--key".to_owned(),
        reg.key.display().to_string(),
        "--output".to_owned(),
        "json".to_owned(),
        "nodes".to_owned(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(sov_e2e::bin_path("e2e-sovctl"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &v[0];
    assert_eq!(row["gpus"], 2);
    assert_eq!(row["gpu_util_percent"], 50.0);
    assert_eq!(row["gpu_state"], "ok");
    assert!(
        row["cpu_percent"].is_f64() && row["memory_percent"].as_f64().unwrap() > 0.0,
        "{row}"
    );
    collector.stop().await;
}
