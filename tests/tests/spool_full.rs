//! The agent's spool on a tiny tmpfs that fills up while the collector is down: the agent
//! keeps running, reports it cannot write get no sequence number (so no hole appears), and
//! when the collector returns everything spooled arrives exactly once and spooling resumes
//! (the spool's reserve file lets it write its state, and so acknowledge, on the full disk).
//! Its waits follow the system (a seq that moves, bytes that grow, a line logged), so a busy
//! machine slows it down without failing it.
//! Needs root (to mount); without it the test says so and passes, unless
//! `SOV_REQUIRE_MOUNT=1`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use sov_e2e::{
    AgentProcess, CollectorProcess, Pki, Progress, agent_config, agent_stall, await_last_seq,
    free_port, node, while_progressing,
};

/// A tmpfs mounted for the test, unmounted on drop (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Bytes of every file under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_whose_spool_disk_fills_keeps_running_and_delivers_what_it_spooled_exactly_once() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let spool_fs = work.path().join("spool-fs");
    let _tmpfs = match Tmpfs::mount(&spool_fs, "256k") {
        Ok(t) => t,
        Err(e) if std::env::var("SOV_REQUIRE_MOUNT").as_deref() != Ok("1") => {
            sov_e2e::skipped(
                "spool_full::an_agent_whose_spool_disk_fills_keeps_running_and_delivers_what_it_spooled_exactly_once",
                &format!("cannot mount a tmpfs ({e}); set SOV_REQUIRE_MOUNT=1 to fail instead"),
            );
            return;
        }
        Err(e) => panic!("cannot mount a tmpfs: {e}"),
    };
    let port = free_port();
    let mut collector = CollectorProcess::start(&pki, work.path(), port);
    let url = collector.url();
    // Reports of ~16 KiB; the spool's own bound (64 MiB) is far above the disk's 256 KiB, so
    // the disk fills first.
    let mut cfg = agent_config(&pki, "node-t", vec![url.clone()], &spool_fs.join("spool"));
    cfg.node.labels.insert("pad".into(), "x".repeat(16 * 1024));
    let cfg_path = work.path().join("agent.toml");
    sov_e2e::write_agent_toml(&cfg, &cfg_path);
    let mut agent = AgentProcess::start(&cfg_path, &work.path().join("agent.log"));
    // Every wait below fails only when the system stops moving for longer than the agent's own
    // retry cycle allows (`agent_stall`), never after a fixed time a busy machine can exceed.
    let stall = agent_stall(&cfg);
    await_last_seq(&pki, &url, "node-t", 2, stall).await;

    // The collector goes away; the spool fills the disk.
    let at_kill = node(&pki, &url, "node-t").await.unwrap().last_seq;
    collector.kill9();
    let log = work.path().join("agent.log");
    let refusals = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("cannot spool report")
            .count()
    };
    // The mark is the bytes on the tmpfs: they grow each interval until the disk is full.
    // Then three more intervals on the full disk: the agent keeps observing and refusing.
    while_progressing(
        stall,
        "the disk to fill and three reports refused",
        || async {
            if refusals() >= 3 {
                Progress::Done(())
            } else {
                Progress::At((disk_bytes(&spool_fs), refusals()))
            }
        },
    )
    .await;
    assert!(
        agent.is_running(),
        "the agent died on a full disk; see {}",
        log.display()
    );

    // Back: everything spooled arrives, then spooling resumes on the freed space.
    collector = CollectorProcess::start(&pki, work.path(), port);
    // About fifteen reports fit on the disk: at least five were spooled while it was down.
    let drained = await_last_seq(&pki, &url, "node-t", at_kill + 5, stall).await;
    await_last_seq(&pki, &url, "node-t", drained.last_seq + 3, stall).await;
    assert!(agent.is_running(), "the agent died; see {}", log.display());
    agent.kill9();
    let n = node(&pki, &url, "node-t").await.unwrap();
    assert_eq!(n.reports, n.last_seq, "{n:?}");
    assert_eq!(n.missing, 0, "{n:?}");
    assert_eq!(n.conflicts, 0, "{n:?}");
    drop(collector);
}
