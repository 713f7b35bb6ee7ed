//! Who a process is, in container terms: the container, its image, and for Kubernetes the pod.
//!
//! - [`cgroup`]: what the cgroup path alone says (container id, runtime, pod uid);
//! - [`containerd`], [`cri`], [`docker`]: the runtimes' own records over their local sockets
//!   (containerd's gRPC API, the Kubernetes CRI for CRI-O, Docker's and Podman's Engine API),
//!   with the kubelet's labels on each container (`io.kubernetes.pod.name`, …): the pod
//!   identity without any call to the Kubernetes API server.
//!
//! [`Containers`] is the cache every collector asks (`of_pid`): the cgroup of each pid is read
//! once and remembered while the process table's generation of the pid stays the same and
//! the runtimes' containers do not change (without process events, at most `refresh_secs`);
//! the runtimes are asked every `[processes.containers] refresh_secs` on a thread of their own
//! ("sov-containers"), and sooner (at most every [`MIN_REFRESH_GAP`]) when a process shows up
//! in a container the cache does not know.
//! Asking never blocks on a runtime. Without a reachable runtime the answer is what the cgroup
//! says, marked `source = "cgroup"`; a runtime that fails is named in [`Containers::statuses`]
//! and never fails the report.
//!
//! Bounded: at most [`MAX_CONTAINERS`] containers and [`MAX_PIDS`] cached pids; every call to a
//! runtime has `[processes.containers] timeout_ms`.

pub mod cgroup;
pub mod containerd;
pub mod cri;
pub mod docker;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use sov_proto::pb;

use self::cgroup::CgroupFacts;
use crate::collect::proctable::{Gen, ProcTable};
use crate::config::ContainersConfig;

/// `ContainerRef.source` when a runtime described the container.
pub const SOURCE_RUNTIME: &str = "runtime";
/// `ContainerRef.source` when only the cgroup path was known.
pub const SOURCE_CGROUP: &str = "cgroup";
/// The kubelet's labels on every container it creates.
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// At most this many containers are remembered (all runtimes together).
pub const MAX_CONTAINERS: usize = 10_000;
/// At most this many pids' cgroups are remembered between two refreshes.
pub const MAX_PIDS: usize = 100_000;
/// Shortest time between two refreshes asked for by unknown containers (while the runtimes
/// answer; after a refresh where one failed, the next waits `refresh_secs`).
pub const MIN_REFRESH_GAP: Duration = Duration::from_secs(2);
/// Each string a runtime gives (names, image references, labels) is cut to this many bytes:
/// what a runtime answers is as hostile as anything else on the node.
pub const MAX_FIELD_BYTES: usize = 512;

/// Why a runtime could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The socket refused the connection.
    #[error("cannot connect")]
    Connect(#[source] io::Error),
    /// The gRPC channel could not be set up.
    #[error("gRPC channel failed")]
    Transport(#[source] tonic::transport::Error),
    /// The runtime answered a call with an error.
    #[error("the runtime refused the call")]
    Status(#[source] tonic::Status),
    /// The answer made no sense.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// No answer within `timeout_ms`.
    #[error("no answer in time")]
    Timeout,
}

/// The pod and container facts from the kubelet's labels (empty strings where absent).
pub fn from_labels<S: std::hash::BuildHasher>(
    labels: &HashMap<String, String, S>,
) -> pb::ContainerRef {
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    pb::ContainerRef {
        pod_name: get(LABEL_POD_NAME),
        pod_namespace: get(LABEL_POD_NAMESPACE),
        pod_uid: get(LABEL_POD_UID),
        container_name: get(LABEL_CONTAINER_NAME),
        source: SOURCE_RUNTIME.to_owned(),
        ..Default::default()
    }
}

/// A gRPC channel over the Unix socket `socket`.
pub(crate) async fn unix_channel(
    socket: &Path,
    timeout: Duration,
) -> Result<tonic::transport::Channel, RuntimeError> {
    let path = socket.to_path_buf();
    // The URI is required by the API and unused: the connector below ignores it.
    tonic::transport::Endpoint::from_static("http://runtime.invalid")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .map_err(RuntimeError::Transport)
}

/// Which API a socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Containerd,
    Cri,
    Engine(&'static str),
}

/// One configured runtime and what it said at the latest refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeStatus {
    /// "containerd", "cri-o", "docker" or "podman".
    pub runtime: &'static str,
    /// Its socket.
    pub socket: PathBuf,
    /// Containers it listed (0 on error).
    pub containers: usize,
    /// Why it could not be asked, when it could not.
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    by_id: HashMap<String, pb::ContainerRef>,
    /// pid → the process table's generation of that pid when read (`None`: no table) and
    /// what its cgroup said (`None`: not in a container).
    pids: HashMap<u32, (Option<Gen>, Option<CgroupFacts>)>,
    statuses: Vec<RuntimeStatus>,
    last_refresh: Option<Instant>,
    /// When `pids` was last emptied (see [`refresh`]).
    pids_cleared: Option<Instant>,
    /// Every runtime asked at the latest refresh answered.
    last_ok: bool,
    refreshes: u64,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    cfg: ContainersConfig,
    proc_root: PathBuf,
    /// The agent's process table (events or listing), when shared: a cached pid is valid while
    /// its generation (born, exec) is the one it was read under.
    table: Option<ProcTable>,
    /// Wakes the refresher thread (absent until it is started).
    wake: Mutex<Option<SyncSender<()>>>,
}

/// The container directory: pid → container, shared by every collector (cheap to clone).
#[derive(Debug, Clone)]
pub struct Containers {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Default for Containers {
    fn default() -> Self {
        Self::new(ContainersConfig::default(), Path::new("/proc"))
    }
}

impl Containers {
    /// A directory asking the runtimes `cfg` names (when `cfg.enabled`), reading cgroups under
    /// `proc_root`. Nothing is asked until [`Containers::refresh`] or
    /// [`Containers::spawn_refresher`].
    pub fn new(cfg: ContainersConfig, proc_root: &Path) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                cfg,
                proc_root: proc_root.to_path_buf(),
                table: None,
                wake: Mutex::new(None),
            }),
        }
    }

    /// The same directory, its pid cache checked against `table`'s generations (with the
    /// kernel's process events, a reused pid or an `exec` is seen at once, so the cache needs
    /// no periodic emptying). Call before sharing it (before any clone).
    pub fn with_table(mut self, table: ProcTable) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.table = Some(table);
        }
        self
    }

    /// Start the refresher thread: a refresh at once, then every `refresh_secs`, and when
    /// asked. It ends when the last handle is dropped.
    ///
    /// # Errors
    ///
    /// The operating system's error when it cannot create the thread.
    pub fn spawn_refresher(&self) -> io::Result<()> {
        if !self.inner.cfg.enabled {
            return Ok(());
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        *lock(&self.inner.wake) = Some(tx);
        let weak = Arc::downgrade(&self.inner);
        let every = Duration::from_secs(self.inner.cfg.refresh_secs.max(1));
        std::thread::Builder::new()
            .name("sov-containers".into())
            .spawn(move || refresher(&weak, &rx, every))?;
        Ok(())
    }

    /// Ask every configured runtime whose socket exists now (blocking, at most `timeout_ms`
    /// per runtime; never from an async task). A runtime that fails keeps its previous
    /// containers and is named in [`Containers::statuses`].
    pub fn refresh(&self) {
        refresh(&self.inner);
    }

    /// What each runtime said at the latest refresh.
    pub fn statuses(&self) -> Vec<RuntimeStatus> {
        lock(&self.inner.state).statuses.clone()
    }

    /// Refreshes done so far.
    pub fn refreshes(&self) -> u64 {
        lock(&self.inner.state).refreshes
    }

    /// The container of `pid`, or `None` for a host process (or a pid that is gone).
    pub fn of_pid(&self, pid: u32) -> Option<pb::ContainerRef> {
        self.of_pids(&[pid]).remove(&pid)
    }

    /// The runtime's record of `r`, a container described from its cgroup alone, once a
    /// runtime lists it (`None` while none does, or when `r` is a runtime's record already).
    /// What was found in a container before the runtimes first answered is named again
    /// with it: a description taken once is not left cgroup-only for the file's life.
    pub fn runtime_record(&self, r: &pb::ContainerRef) -> Option<pb::ContainerRef> {
        if r.source == SOURCE_RUNTIME || r.id.is_empty() {
            return None;
        }
        let mut known = lock(&self.inner.state).by_id.get(&r.id)?.clone();
        if known.pod_uid.is_empty() {
            known.pod_uid.clone_from(&r.pod_uid);
        }
        Some(known)
    }

    /// Remember `r` as a runtime's record (what a refresh would have listed).
    #[cfg(test)]
    pub(crate) fn remember(&self, r: pb::ContainerRef) {
        lock(&self.inner.state).by_id.insert(r.id.clone(), r);
    }

    /// The containers of these pids (host processes are absent from the map).
    pub fn of_pids(&self, pids: &[u32]) -> HashMap<u32, pb::ContainerRef> {
        let mut out = HashMap::new();
        let mut unknown = false;
        let live = self.inner.table.as_ref().map(ProcTable::live);
        let mut st = lock(&self.inner.state);
        for &pid in pids {
            if pid == 0 {
                continue;
            }
            let generation = live.as_ref().and_then(|l| l.get(&pid).copied());
            if st.pids.get(&pid).is_none_or(|(g, _)| *g != generation) {
                if st.pids.len() >= MAX_PIDS {
                    st.pids.clear();
                }
                let facts = read_facts(&self.inner.proc_root, pid);
                st.pids.insert(pid, (generation, facts));
            }
            let Some((_, Some(facts))) = st.pids.get(&pid) else {
                continue;
            };
            match resolve(&st.by_id, facts) {
                Some(r) => {
                    unknown |= r.source != SOURCE_RUNTIME;
                    out.insert(pid, r);
                }
                None => unknown = true,
            }
        }
        let gap = if st.last_ok {
            MIN_REFRESH_GAP
        } else {
            Duration::from_secs(self.inner.cfg.refresh_secs.max(1))
        };
        let due = unknown && st.last_refresh.is_none_or(|t| t.elapsed() >= gap);
        drop(st);
        if due && let Some(tx) = lock(&self.inner.wake).as_ref() {
            match tx.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
            }
        }
        out
    }
}

/// The facts of a pid's cgroup; `None` when it is not in a container (or is gone).
fn read_facts(proc_root: &Path, pid: u32) -> Option<CgroupFacts> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    let (path, _) = crate::collect::procs::cgroup_and_container(&text);
    let facts = cgroup::facts(&path);
    let host_unit = facts.keys.first().is_none_or(|k| {
        k.ends_with(".service") || k.ends_with(".slice") || k.ends_with(".scope") || k == "/"
    });
    (facts.id.is_some() || !facts.pod_uid.is_empty() || !host_unit).then_some(facts)
}

/// The runtime's record matching these facts, else the cgroup's own facts when they name a
/// container.
fn resolve(
    by_id: &HashMap<String, pb::ContainerRef>,
    facts: &CgroupFacts,
) -> Option<pb::ContainerRef> {
    let known = facts
        .id
        .iter()
        .chain(facts.keys.first())
        .find_map(|k| by_id.get(k));
    if let Some(r) = known {
        let mut r = r.clone();
        if r.pod_uid.is_empty() {
            r.pod_uid.clone_from(&facts.pod_uid);
        }
        return Some(r);
    }
    if facts.id.is_none() && facts.pod_uid.is_empty() {
        return None;
    }
    Some(pb::ContainerRef {
        runtime: facts.runtime.to_owned(),
        id: facts.id.clone().unwrap_or_default(),
        pod_uid: facts.pod_uid.clone(),
        source: SOURCE_CGROUP.to_owned(),
        ..Default::default()
    })
}

/// Cut every string of a runtime's record to [`MAX_FIELD_BYTES`] (at a character boundary).
fn bound(r: &mut pb::ContainerRef) {
    for f in [
        &mut r.runtime,
        &mut r.runtime_namespace,
        &mut r.id,
        &mut r.name,
        &mut r.image,
        &mut r.image_digest,
        &mut r.pod_name,
        &mut r.pod_namespace,
        &mut r.pod_uid,
        &mut r.container_name,
        &mut r.source,
    ] {
        if f.len() > MAX_FIELD_BYTES {
            let mut end = MAX_FIELD_BYTES;
            while !f.is_char_boundary(end) {
                end -= 1;
            }
            f.truncate(end);
        }
    }
}

fn refresher(weak: &Weak<Inner>, rx: &Receiver<()>, every: Duration) {
    loop {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        refresh(&inner);
        drop(inner);
        match rx.recv_timeout(every) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn refresh(inner: &Inner) {
    let cfg = &inner.cfg;
    if !cfg.enabled {
        return;
    }
    let sockets: Vec<(&'static str, &Path, Api)> = [
        (
            "containerd",
            cfg.containerd_socket.as_path(),
            Api::Containerd,
        ),
        ("cri-o", cfg.crio_socket.as_path(), Api::Cri),
        ("docker", cfg.docker_socket.as_path(), Api::Engine("docker")),
        ("podman", cfg.podman_socket.as_path(), Api::Engine("podman")),
    ]
    .into_iter()
    .filter(|(_, p, _)| !p.as_os_str().is_empty() && p.exists())
    .collect();
    let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
    let mut results = Vec::new();
    if !sockets.is_empty() {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => {
                for (name, socket, api) in &sockets {
                    let listed = rt.block_on(async {
                        let call = async {
                            match api {
                                Api::Containerd => containerd::list(socket, timeout).await,
                                Api::Cri => cri::list(socket, timeout).await,
                                Api::Engine(rt) => docker::list(socket, timeout, rt).await,
                            }
                        };
                        tokio::time::timeout(timeout * 4, call)
                            .await
                            .unwrap_or(Err(RuntimeError::Timeout))
                    });
                    results.push((*name, socket.to_path_buf(), listed));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot start the runtime client"),
        }
    }
    let mut st = lock(&inner.state);
    let mut by_id: HashMap<String, pb::ContainerRef> = HashMap::new();
    let mut statuses = Vec::new();
    for (name, socket, listed) in results {
        match listed {
            Ok(list) => {
                statuses.push(RuntimeStatus {
                    runtime: name,
                    socket,
                    containers: list.len(),
                    error: None,
                });
                for mut r in list {
                    if by_id.len() >= MAX_CONTAINERS {
                        break;
                    }
                    bound(&mut r);
                    // A later runtime's record (Docker's, with a name) wins over containerd's
                    // record of the same container in its "moby" namespace.
                    by_id.insert(r.id.clone(), r);
                }
            }
            Err(e) => {
                let why = crate::collect::error_chain(&e);
                tracing::debug!(runtime = name, socket = %socket.display(), error = %why, "container runtime not answering");
                for (id, r) in st.by_id.iter().filter(|(_, r)| r.runtime == name) {
                    if by_id.len() < MAX_CONTAINERS {
                        by_id.entry(id.clone()).or_insert_with(|| r.clone());
                    }
                }
                statuses.push(RuntimeStatus {
                    runtime: name,
                    socket,
                    containers: 0,
                    error: Some(why),
                });
            }
        }
    }
    // Pids are read again when the runtimes' containers changed (a pid cached while its
    // container was being set up is then re-examined) and at least every `refresh_secs` (a
    // reused pid). Not at every refresh: a process in a container no runtime knows asks for a
    // refresh every `MIN_REFRESH_GAP`, and emptying the cache each time read every process's
    // cgroup again that often (measured: 7 % of the whole agent's CPU on a node of 700
    // processes). What a cached cgroup resolves to follows `by_id` at every lookup anyway.
    let now = Instant::now();
    let changed =
        by_id.len() != st.by_id.len() || by_id.keys().any(|id| !st.by_id.contains_key(id));
    // With the kernel's process events a pid's generation says when it was born again or
    // executed, and a cached pid is read again then: no periodic emptying is needed.
    let every = Duration::from_secs(cfg.refresh_secs.max(1));
    let events = inner
        .table
        .as_ref()
        .is_some_and(|t| t.mode() == crate::collect::proctable::Mode::Events);
    let periodic = !events
        && st
            .pids_cleared
            .is_none_or(|t| now.saturating_duration_since(t) >= every);
    if changed || periodic {
        st.pids.clear();
        st.pids_cleared = Some(now);
    } else if let Some(t) = &inner.table {
        // Pids that left the table are forgotten (the cache stays the size of the node).
        let live = t.live();
        st.pids.retain(|pid, _| live.contains_key(pid));
    }
    st.by_id = by_id;
    st.last_ok = statuses.iter().all(|s| s.error.is_none());
    st.statuses = statuses;
    st.last_refresh = Some(now);
    st.refreshes += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1e9c0d5b7a4e2f8c6d1a0b9e8f7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e";

    fn fake_proc(root: &Path, pid: u32, cgroup: &str) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("cgroup"), cgroup).expect("write");
    }

    #[test]
    fn a_cached_pid_is_read_again_when_the_process_table_says_it_executed() {
        let table = ProcTable::new(Path::new("/proc"));
        if table.mode() != crate::collect::proctable::Mode::Events {
            crate::skipped::record(
                "collect::containers::tests::a_cached_pid_is_read_again_when_the_process_table_says_it_executed",
                "no process events here (needs root in the host's namespaces)",
            );
            return;
        }
        let c =
            Containers::new(cfg_without_runtimes(), Path::new("/proc")).with_table(table.clone());
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read x; exec sleep 600"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let pid = child.id();
        let cached = |c: &Containers| lock(&c.inner.state).pids.get(&pid).map(|(g, _)| *g);
        // Until the table has seen the fork, the pid is cached without a generation.
        let until = Instant::now() + Duration::from_secs(30);
        let born = loop {
            let live = table.refresh(Duration::ZERO);
            if let Some(g) = live.get(&pid) {
                break *g;
            }
            assert!(Instant::now() < until, "the fork was never seen");
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = c.of_pid(pid);
        assert_eq!(cached(&c), Some(Some(born)));
        // Asked again, the same process: nothing is read (the entry is the same one).
        let _ = c.of_pid(pid);
        assert_eq!(cached(&c), Some(Some(born)));
        // It executes another program: the table's generation moves, and so does the entry.
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(b"go\n").expect("write");
        }
        let executed = loop {
            let live = table.refresh(Duration::ZERO);
            if let Some(g) = live.get(&pid).filter(|g| **g != born) {
                break *g;
            }
            assert!(Instant::now() < until, "the exec was never seen");
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = c.of_pid(pid);
        let after = cached(&c);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            after,
            Some(Some(executed)),
            "read again under its new generation"
        );
        // A refresh forgets pids that left the table, without emptying the rest.
        let live = loop {
            let live = table.refresh(Duration::ZERO);
            if !live.contains_key(&pid) {
                break live;
            }
            assert!(Instant::now() < until, "the exit was never seen");
            std::thread::sleep(Duration::from_millis(20));
        };
        let me = std::process::id();
        let _ = c.of_pid(me);
        c.refresh();
        assert_eq!(cached(&c), None, "an exited pid is forgotten");
        assert!(
            lock(&c.inner.state).pids.contains_key(&me) || !live.contains_key(&me),
            "a live pid is kept"
        );
    }

    fn cfg_without_runtimes() -> ContainersConfig {
        ContainersConfig {
            containerd_socket: PathBuf::from("/nonexistent/containerd.sock"),
            crio_socket: PathBuf::from("/nonexistent/crio.sock"),
            docker_socket: PathBuf::from("/nonexistent/docker.sock"),
            podman_socket: PathBuf::from("/nonexistent/podman.sock"),
            ..ContainersConfig::default()
        }
    }

    #[test]
    fn without_a_runtime_the_cgroup_id_is_reported_and_marked_as_such() {
        let root = tempfile::tempdir().expect("tempdir");
        fake_proc(
            root.path(),
            10,
            &format!("0::/system.slice/docker-{ID}.scope\n"),
        );
        fake_proc(
            root.path(),
            11,
            "0::/user.slice/user-1000.slice/session-1.scope\n",
        );
        let c = Containers::new(cfg_without_runtimes(), root.path());
        c.refresh();
        assert!(c.statuses().is_empty(), "no socket exists: nothing asked");
        let r = c.of_pid(10).expect("a container");
        assert_eq!(
            (r.id.as_str(), r.runtime.as_str(), r.source.as_str()),
            (ID, "docker", SOURCE_CGROUP)
        );
        assert_eq!(c.of_pid(11), None, "a host process");
        assert_eq!(c.of_pid(99), None, "a pid that does not exist");
    }

    #[test]
    fn a_runtime_record_matches_a_chosen_id_and_keeps_the_cgroup_pod_uid() {
        let root = tempfile::tempdir().expect("tempdir");
        fake_proc(root.path(), 20, "0::/default/sov-web-1\n");
        let c = Containers::new(cfg_without_runtimes(), root.path());
        assert_eq!(c.of_pid(20), None, "unknown to every runtime yet");
        c.remember(pb::ContainerRef {
            id: "sov-web-1".into(),
            runtime: "containerd".into(),
            image: "docker.io/library/busybox:latest".into(),
            source: SOURCE_RUNTIME.into(),
            ..Default::default()
        });
        let r = c.of_pid(20).expect("matched by id");
        assert_eq!(r.image, "docker.io/library/busybox:latest");
        assert_eq!(r.source, SOURCE_RUNTIME);
    }

    #[test]
    fn a_socket_that_is_not_a_runtime_is_named_and_never_fatal() {
        let root = tempfile::tempdir().expect("tempdir");
        let sock = root.path().join("containerd.sock");
        std::fs::write(&sock, b"").expect("a plain file where the socket should be");
        let c = Containers::new(
            ContainersConfig {
                containerd_socket: sock,
                timeout_ms: 200,
                ..cfg_without_runtimes()
            },
            root.path(),
        );
        c.refresh();
        let st = c.statuses();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].runtime, "containerd");
        assert!(st[0].error.is_some(), "{st:?}");
    }

    #[test]
    fn a_runtimes_strings_are_cut_to_a_bound() {
        let mut r = pb::ContainerRef {
            pod_name: "é".repeat(MAX_FIELD_BYTES),
            image: "x".repeat(10 * MAX_FIELD_BYTES),
            ..Default::default()
        };
        bound(&mut r);
        assert!(r.pod_name.len() <= MAX_FIELD_BYTES && r.pod_name.chars().all(|c| c == 'é'));
        assert_eq!(r.image.len(), MAX_FIELD_BYTES);
    }

    #[test]
    fn labels_give_the_pod() {
        let labels: HashMap<String, String> = [
            (LABEL_POD_NAME, "vllm-0"),
            (LABEL_POD_NAMESPACE, "inference"),
            (LABEL_POD_UID, "u"),
            (LABEL_CONTAINER_NAME, "server"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let r = from_labels(&labels);
        assert_eq!(
            (
                r.pod_name.as_str(),
                r.pod_namespace.as_str(),
                r.pod_uid.as_str(),
                r.container_name.as_str()
            ),
            ("vllm-0", "inference", "u", "server")
        );
    }
}
