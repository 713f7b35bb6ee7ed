//! PostgreSQL restarted under load: a private PostgreSQL instance the test starts itself
//! (`initdb` and `pg_ctl` in a temporary directory, its own port; the machine's shared server
//! is never touched), a collector storing into it, two agents (child processes) reporting
//! every second. The database is stopped hard (`pg_ctl -m immediate`, like a crash) and started
//! again twice while reports arrive. Afterwards every node's reports 1..=last are stored
//! exactly once, nothing is missing, and the collector never exited.
//!
//! Needs the PostgreSQL server binaries (`/usr/lib/postgresql/*/bin`) and, as root, the
//! `postgres` user; without them the test says so and passes, unless `SOV_REQUIRE_POSTGRES=1`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sov_e2e::{AgentProcess, CollectorProcess, Pki, agent_config, eventually, free_port, node};

/// A private PostgreSQL cluster, stopped (immediately) on drop.
struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    log: PathBuf,
    as_postgres: bool,
}

impl PrivatePostgres {
    fn find_bin() -> Option<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("pg_ctl").exists() && b.join("initdb").exists())
            .collect();
        dirs.sort();
        dirs.pop()
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let out = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        }
        .map_err(|e| format!("{tool}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool} {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn create(dir: &Path) -> Result<Self, String> {
        let bin =
            Self::find_bin().ok_or("no PostgreSQL server binaries under /usr/lib/postgresql")?;
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let home = dir.join("pg");
        std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
        if as_postgres {
            // initdb refuses to run as root: the cluster belongs to the postgres user.
            let ok = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir)
                .status()
                .map_err(|e| e.to_string())?
                .success();
            if !ok {
                return Err("chown to postgres failed".into());
            }
        }
        let pg = Self {
            bin,
            data: home.join("data"),
            port: free_port(),
            log: home.join("postgres.log"),
            as_postgres,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                pg.data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ],
        )?;
        pg.start()?;
        Ok(pg)
    }

    fn start(&self) -> Result<(), String> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=on",
            self.port,
            self.data.parent().unwrap().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-l",
                self.log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        )
    }

    /// Stop as if it crashed: no checkpoint, clients cut.
    fn crash(&self) -> Result<(), String> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.crash();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_crashing_and_restarting_twice_under_load_loses_no_report_and_stores_none_twice() {
    let work = tempfile::tempdir().unwrap();
    let pg = match PrivatePostgres::create(work.path()) {
        Ok(pg) => pg,
        Err(e) if !sov_e2e::postgres_required() => {
            sov_e2e::skipped(
                "postgres_restart::postgres_crashing_and_restarting_twice_under_load_loses_no_report_and_stores_none_twice",
                &format!(
                    "cannot start a private PostgreSQL ({e}); set SOV_REQUIRE_POSTGRES=1 to fail instead"
                ),
            );
            return;
        }
        Err(e) => panic!("cannot start a private PostgreSQL: {e}"),
    };
    let pki = Pki::new();
    let port = free_port();
    let store_url = pg.url();
    let mut collector = CollectorProcess::start_with(&pki, work.path(), port, |c| {
        c.store.url = store_url;
    });
    let url = collector.url();
    let names = ["pg-a", "pg-b"];
    let mut agents: Vec<AgentProcess> = names
        .iter()
        .map(|name| {
            let cfg = agent_config(&pki, name, vec![url.clone()], &work.path().join(name));
            let path = work.path().join(format!("{name}.toml"));
            sov_e2e::write_agent_toml(&cfg, &path);
            AgentProcess::start(&path, &work.path().join(format!("{name}.log")))
        })
        .collect();

    let mut reached = 3;
    for round in 0..2 {
        for name in names {
            eventually(
                Duration::from_secs(90),
                &format!("{name} through seq {reached} (round {round})"),
                || async {
                    node(&pki, &url, name)
                        .await
                        .filter(|n| n.last_seq >= reached)
                },
            )
            .await;
        }
        pg.crash().unwrap();
        // Reports keep coming while the database is down.
        tokio::time::sleep(Duration::from_secs(4)).await;
        pg.start().unwrap();
        reached += 8;
    }
    // Everything built during the outages arrives.
    for name in names {
        eventually(
            Duration::from_secs(90),
            &format!("{name} through seq {reached} after the restarts"),
            || async {
                node(&pki, &url, name)
                    .await
                    .filter(|n| n.last_seq >= reached)
            },
        )
        .await;
    }
    for a in &mut agents {
        assert!(a.is_running(), "an agent exited");
        a.kill9();
    }
    assert!(
        collector.is_running(),
        "the collector exited when PostgreSQL went away"
    );
    for name in names {
        let n = node(&pki, &url, name).await.unwrap();
        assert_eq!(n.reports, n.last_seq, "{n:?}");
        assert_eq!(n.missing, 0, "{n:?}");
        assert_eq!(n.conflicts, 0, "{n:?}");
        assert_eq!(n.epochs, 1, "{n:?}");
    }
    collector.kill9();
}
