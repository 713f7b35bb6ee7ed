//! A real container runtime: Debian's containerd and runc, started by the test on a socket of
//! its own, an OCI image the test builds from local files (a static busybox and a generated
//! safetensors file: no registry is needed), a container started with the kubelet's labels that
//! holds the weight file open and sends bytes to a host in a network namespace of the test's
//! (a veth into the container's own namespace). `sov-agent scan --json` must name the pod, its
//! namespace and uid, the container, the image and its digest on the weight copy, its user and
//! the flow; through a real collector (the host placed in FR by an override, a policy for MA),
//! `sovctl egress --by pod` and `sovctl models` must show the pod, its namespace, the container
//! and the image, and the `foreign-egress` breach's evidence must name them; and without a
//! reachable runtime, the cgroup's container id, marked as such.
//!
//! Skips loudly without containerd, ctr, runc or a static busybox; `SOV_REQUIRE_CONTAINERD=1`
//! (set by `.ci/run`) turns the skip into a failure.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use sov_agent::collect::namespaces;
use sov_collector::auth::Role;
use sov_collector::config::GeoOverride;
use sov_e2e::netns::{ip, sink};
use sov_e2e::{
    InProcessCollector, KillOnDrop, Pki, agent_config, agent_scan, scan_config, sha256sum, sovctl,
};
use tokio_util::sync::CancellationToken;

const IMAGE: &str = "docker.io/sovereign/weights-test:1";
const POD: &str = "web-0";
const POD_NAMESPACE: &str = "inference";
const POD_UID: &str = "0b6f7e4c-1d2a-4c3b-9e8f-7a6b5c4d3e2f";
const CONTAINER: &str = "server";
const WEIGHT_PATH: &str = "/models/llama/model.safetensors";
const BUSYBOX: &str = "/bin/busybox";

fn required() -> bool {
    std::env::var("SOV_REQUIRE_CONTAINERD").is_ok_and(|v| v == "1")
}

fn skip(why: &str) {
    assert!(
        !required(),
        "SOV_REQUIRE_CONTAINERD=1 but the container runtime test cannot run: {why}"
    );
    eprintln!(
        "SKIP real container runtime test: {why} (apt-get install containerd runc busybox-static)"
    );
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// containerd on a socket of its own, under a temporary root; stopped (with its tasks) on drop.
struct Containerd {
    dir: tempfile::TempDir,
    sock: PathBuf,
    daemon: KillOnDrop,
    containers: Vec<String>,
}

impl Containerd {
    fn start() -> Result<Self, String> {
        for tool in ["containerd", "ctr", "runc"] {
            match Command::new(tool).arg("--version").output() {
                Ok(o) if o.status.success() => {}
                _ => return Err(format!("{tool} is not installed")),
            }
        }
        if !Path::new(BUSYBOX).exists() {
            return Err(format!("{BUSYBOX} (busybox-static) is not installed"));
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        // No CRI plugin: nothing but the plain API is needed, and it starts faster.
        std::fs::write(
            &config,
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )
        .unwrap();
        let sock = dir.path().join("containerd.sock");
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let daemon = KillOnDrop(
            Command::new("containerd")
                .arg("--config")
                .arg(&config)
                .arg("--root")
                .arg(dir.path().join("root"))
                .arg("--state")
                .arg(dir.path().join("state"))
                .arg("--address")
                .arg(&sock)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot start containerd: {e}"))?,
        );
        let c = Self {
            dir,
            sock,
            daemon,
            containers: vec![],
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if c.ctr(&["version"]).status.success() {
                return Ok(c);
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(c.dir.path().join("containerd.log"))
                    .unwrap_or_default();
                return Err(format!("containerd did not answer on its socket: {log}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ctr(&self, args: &[&str]) -> Output {
        let mut all = vec!["-a", self.sock.to_str().unwrap(), "-n", "default"];
        all.extend_from_slice(args);
        run("ctr", &all)
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Write an OCI image layout with busybox and `weights` at [`WEIGHT_PATH`], and import it.
    fn import_image(&self, weights: &[u8]) {
        let work = self.dir.path().join("image");
        let rootfs = work.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::create_dir_all(rootfs.join("tmp")).unwrap();
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
        let w = rootfs.join(WEIGHT_PATH.trim_start_matches('/'));
        std::fs::create_dir_all(w.parent().unwrap()).unwrap();
        std::fs::write(&w, weights).unwrap();
        let layout = work.join("oci");
        let blobs = layout.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let layer = work.join("layer.tar");
        assert!(
            run(
                "tar",
                &[
                    "-C",
                    rootfs.to_str().unwrap(),
                    "-cf",
                    layer.to_str().unwrap(),
                    "."
                ]
            )
            .status
            .success()
        );
        let blob = |path: &Path| -> (String, u64) {
            let d = sha256sum(path);
            std::fs::copy(path, blobs.join(&d)).unwrap();
            (d, std::fs::metadata(path).unwrap().len())
        };
        let (layer_d, layer_n) = blob(&layer);
        let config = work.join("config.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/bin/busybox","sh"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_d}"]}}}}"#
            ),
        )
        .unwrap();
        let (config_d, config_n) = blob(&config);
        let manifest = work.join("manifest.json");
        std::fs::write(
            &manifest,
            format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_d}","size":{config_n}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_d}","size":{layer_n}}}]}}"#
            ),
        )
        .unwrap();
        let (manifest_d, manifest_n) = blob(&manifest);
        std::fs::write(
            layout.join("index.json"),
            format!(
                r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_d}","size":{manifest_n},"annotations":{{"io.containerd.image.name":"{IMAGE}","org.opencontainers.image.ref.name":"1"}},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
            ),
        )
        .unwrap();
        std::fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let tarball = work.join("image.tar");
        assert!(
            run(
                "tar",
                &[
                    "-C",
                    layout.to_str().unwrap(),
                    "-cf",
                    tarball.to_str().unwrap(),
                    "."
                ]
            )
            .status
            .success()
        );
        let out = self.ctr(&["images", "import", tarball.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "ctr images import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Start container `id` with the kubelet's labels running `script` (busybox sh); its pid.
    fn run_pod_container(&mut self, id: &str, script: &str) -> u32 {
        let labels = [
            format!("io.kubernetes.pod.name={POD}"),
            format!("io.kubernetes.pod.namespace={POD_NAMESPACE}"),
            format!("io.kubernetes.pod.uid={POD_UID}"),
            format!("io.kubernetes.container.name={CONTAINER}"),
        ];
        let mut args = vec!["run", "-d"];
        for l in &labels {
            args.extend(["--label", l.as_str()]);
        }
        args.extend([IMAGE, id, "/bin/busybox", "sh", "-c", script]);
        let out = self.ctr(&args);
        assert!(
            out.status.success(),
            "ctr run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.containers.push(id.to_owned());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.ctr(&["task", "ls"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if let Some(pid) = text
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.first() == Some(&id) && f.get(2) == Some(&"RUNNING"))
                        .then(|| f.get(1)?.parse::<u32>().ok())
                        .flatten()
                })
                .next()
            {
                return pid;
            }
            assert!(Instant::now() < deadline, "the task did not start: {text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in self.containers.clone() {
            let _ = self.ctr(&["task", "kill", "-s", "KILL", &id]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.ctr(&["task", "rm", &id]).status.success() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.ctr(&["containers", "rm", &id]);
        }
        self.daemon.kill9();
    }
}

/// A network namespace "abroad" joined by a veth pair to the container's own namespace.
struct Abroad {
    name: String,
    ip: String,
}

impl Abroad {
    fn link(container_pid: u32) -> Self {
        let me = std::process::id();
        let n = me % 200 + 20;
        let a = Self {
            name: format!("sovabroad{me}"),
            ip: format!("10.254.{n}.2"),
        };
        ip(&["netns", "add", &a.name]).unwrap();
        let (inside, outside) = (
            format!("sovci{}", me % 100_000),
            format!("sovco{}", me % 100_000),
        );
        ip(&[
            "link", "add", &inside, "type", "veth", "peer", "name", &outside,
        ])
        .unwrap();
        ip(&["link", "set", &inside, "netns", &container_pid.to_string()]).unwrap();
        ip(&["link", "set", &outside, "netns", &a.name]).unwrap();
        let t = container_pid.to_string();
        let addr = format!("10.254.{n}.1/24");
        for args in [
            vec!["addr", "add", addr.as_str(), "dev", inside.as_str()],
            vec!["link", "set", inside.as_str(), "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut all = vec!["-t", t.as_str(), "-n", "ip"];
            all.extend(args);
            let out = run("nsenter", &all);
            assert!(
                out.status.success(),
                "nsenter {all:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ip(&[
            "-n",
            &a.name,
            "addr",
            "add",
            &format!("{}/24", a.ip),
            "dev",
            &outside,
        ])
        .unwrap();
        ip(&["-n", &a.name, "link", "set", &outside, "up"]).unwrap();
        a
    }
}

impl Drop for Abroad {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn safetensors_bytes() -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let data: Vec<u8> = (0..300_000 * 4).map(|i| (i % 251) as u8).collect();
    let t = TensorView::new(Dtype::F32, vec![300_000], &data).unwrap();
    safetensors::serialize(vec![("w", t)], None).unwrap()
}

fn scan(dir: &Path, containerd_socket: &Path) -> Value {
    let config = scan_config(
        dir,
        &[Path::new("/models")],
        &containerd_socket.to_string_lossy(),
    );
    agent_scan(&config, 1500)
}

fn assert_pod(c: &Value, id: &str, digest: &str, what: &str) {
    assert_eq!(c["runtime"], "containerd", "{what}: {c:#}");
    assert_eq!(c["source"], "runtime", "{what}: {c:#}");
    assert_eq!(c["id"], id, "{what}");
    assert_eq!(c["image"], IMAGE, "{what}");
    assert_eq!(c["image_digest"], digest, "{what}");
    assert_eq!(c["pod_name"], POD, "{what}");
    assert_eq!(c["pod_namespace"], POD_NAMESPACE, "{what}");
    assert_eq!(c["pod_uid"], POD_UID, "{what}");
    assert_eq!(c["container_name"], CONTAINER, "{what}");
}

#[test]
fn a_pods_weights_and_traffic_are_named_with_its_pod_container_and_image() {
    let mut ctd = match Containerd::start() {
        Ok(c) => c,
        Err(why) => return skip(&why),
    };
    let weights = safetensors_bytes();
    ctd.import_image(&weights);
    let digest = {
        let out = ctd.ctr(&["images", "ls"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| l.starts_with(IMAGE))
            .and_then(|l| l.split_whitespace().find(|f| f.starts_with("sha256:")))
            .unwrap_or_else(|| panic!("image digest in {text}"))
            .to_owned()
    };
    // A 64-hex id, as the kubelet's: the cgroup names it even when no runtime answers.
    let id = format!("{:064x}", u128::from(std::process::id()) << 64 | 0x5eed);
    let script = format!(
        "exec 3<{WEIGHT_PATH}\n\
         while [ ! -s /tmp/go ]; do /bin/busybox sleep 0.1; done\n\
         read host port < /tmp/go\n\
         while true; do /bin/busybox dd if=/dev/zero bs=65536 count=4 2>/dev/null; \
         /bin/busybox sleep 0.05; done | /bin/busybox nc $host $port\n\
         /bin/busybox sleep 1000\n"
    );
    let pid = ctd.run_pod_container(&id, &script);
    let netns = namespaces::of_pid(Path::new("/proc"), pid, namespaces::NET).unwrap();
    assert_ne!(
        Some(netns),
        namespaces::own(namespaces::NET),
        "its own network namespace"
    );
    let abroad = Abroad::link(pid);
    let (_sink, port) = sink(Some(&abroad.name), &abroad.ip, 0);
    // Start the traffic: the container waits for the address in its /tmp/go.
    let go = PathBuf::from(format!("/proc/{pid}/root/tmp/go"));
    let mut f = std::fs::File::create(go.with_extension("new")).unwrap();
    writeln!(f, "{} {port}", abroad.ip).unwrap();
    drop(f);
    std::fs::rename(go.with_extension("new"), &go).unwrap();

    let work = tempfile::tempdir().unwrap();
    let v = scan(work.path(), &ctd.sock);

    // The weight copy: in the image's layer, with the container's path and the pod.
    let w = v["weights"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["container_path"] == WEIGHT_PATH)
        .unwrap_or_else(|| panic!("the container's weights: {:#}", v["weights"]))
        .clone();
    assert_pod(&w["container"], &id, &digest, "weight copy");
    assert_eq!(w["found_by"], "container-root", "{w:#}");
    assert_eq!(w["host_path_known"], true, "{w:#}");
    let host_path = PathBuf::from(w["path"].as_str().unwrap());
    assert!(
        host_path.starts_with(ctd.root()),
        "the layer file under containerd's root: {w:#}"
    );
    assert_eq!(
        std::fs::read(&host_path).unwrap(),
        weights,
        "the host path is the very file"
    );
    assert_eq!(w["sha256"], sha256sum(&host_path).as_str());
    assert_eq!(
        w["fs_type"], "overlay",
        "the container's own view of its storage"
    );
    let user = w["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["pid"] == pid)
        .unwrap_or_else(|| panic!("the container's shell holds it open: {w:#}"))
        .clone();
    assert_eq!(user["open"], true);
    assert_pod(&user["container"], &id, &digest, "weight user");

    // The traffic: from the container's namespace, to the host abroad, named with the pod.
    let flows: Vec<&Value> = v["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["remote_address"] == abroad.ip.as_str())
        .collect();
    assert!(
        !flows.is_empty(),
        "flows: {:#} net: {:#}",
        v["flows"],
        v["net"]
    );
    for f in &flows {
        assert_eq!(f["netns_inode"], netns, "{f:#}");
        assert_pod(&f["container"], &id, &digest, "flow");
    }
    let sent: u64 = flows
        .iter()
        .map(|f| f["bytes_sent"].as_u64().unwrap())
        .sum();
    assert!(sent > 256 * 1024, "bytes moved during the window: {sent}");

    // Through a real collector: the pod's egress, its weights and the breach name it.
    through_a_collector(&ctd.sock, &abroad.ip, work.path(), &id, &digest, pid);

    // No runtime reachable: the cgroup's id only, marked as such, and the report still whole.
    let v = scan(work.path(), &work.path().join("no-such.sock"));
    let w = v["weights"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["container_path"] == WEIGHT_PATH)
        .unwrap_or_else(|| panic!("found without the runtime too: {:#}", v["weights"]))
        .clone();
    let c = &w["container"];
    assert_eq!(
        (c["id"].as_str(), c["source"].as_str()),
        (Some(id.as_str()), Some("cgroup")),
        "{c:#}"
    );
    assert_eq!(c["image"], "", "no runtime: no image");
    assert_eq!(c["pod_name"], "");
}

/// `sovctl … --output json ARGS` as a regulator, parsed.
fn sovctl_json(pki: &Pki, url: &str, args: &[&str]) -> Value {
    let reg = pki.client(Role::Regulator, "alice");
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let out = sovctl(pki, &reg, url, &all);
    assert!(
        out.status.success(),
        "sovctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Poll `probe` until it returns `Some` (the agent reports every second and the rules run
/// every two), at most `within`.
fn until<T>(within: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A collector (the host abroad placed in FR, a policy for MA) and an agent on this node that
/// asks `containerd_socket`: `sovctl egress --by pod`, `sovctl models` and the foreign-egress
/// breach must name the pod, its namespace, the container and the image.
fn through_a_collector(
    containerd_socket: &Path,
    abroad_ip: &str,
    work: &Path,
    id: &str,
    digest: &str,
    pid: u32,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let pki = Pki::new();
    let data = work.join("collector");
    std::fs::create_dir_all(&data).unwrap();
    let policy = data.join("policy.toml");
    std::fs::write(
        &policy,
        "jurisdiction = \"MA\"\n[thresholds]\nforeign_egress_bytes = 100000\nwindow_secs = 60\n",
    )
    .unwrap();
    let cidr = format!("{abroad_ip}/32");
    let collector = rt.block_on(InProcessCollector::start(&pki, &data, |c| {
        c.policy = Some(policy.clone());
        c.geo.overrides = vec![GeoOverride {
            cidr,
            country: "FR".into(),
            asn: Some(64_500),
            org: Some("Abroad Transit".into()),
            operator_country: None,
        }];
    }));
    let url = collector.url();
    let mut cfg = agent_config(&pki, "node-pod", vec![url.clone()], &work.join("spool"));
    cfg.net.interval_secs = 1;
    cfg.weights.roots = Some(vec![PathBuf::from("/models")]);
    cfg.weights.state_dir = Some(work.join("agent-state"));
    let c = &mut cfg.processes.containers;
    c.containerd_socket = containerd_socket.to_owned();
    for unused in [
        &mut c.crio_socket,
        &mut c.docker_socket,
        &mut c.podman_socket,
    ] {
        *unused = work.join("no-such.sock");
    }
    let agent = sov_agent::Agent::open(cfg).unwrap();
    let stop = CancellationToken::new();
    let task = rt.spawn(agent.run(stop.clone()));

    // `sovctl egress --by pod`: the pod's bytes to FR, with its namespace and node.
    let rows = until(Duration::from_secs(90), "the pod's egress", || {
        let v = sovctl_json(&pki, &url, &["egress", "--by", "pod"]);
        v.as_array()
            .unwrap()
            .iter()
            .any(|r| {
                r["pod"] == POD && r["country"] == "FR" && r["bytes_sent"].as_u64() > Some(100_000)
            })
            .then_some(v)
    });
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pod"] == POD)
        .unwrap();
    assert_eq!(
        (&row["namespace"], &row["node"]),
        (&Value::from(POD_NAMESPACE), &Value::from("node-pod")),
        "{rows:#}"
    );
    // `--by container`: the container's name in the pod, its id and its image.
    let rows = sovctl_json(&pki, &url, &["egress", "--by", "container"]);
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["container_id"] == id)
        .unwrap_or_else(|| panic!("the container's row: {rows:#}"));
    assert_eq!(
        (&row["container"], &row["image"], &row["pod"]),
        (
            &Value::from(CONTAINER),
            &Value::from(IMAGE),
            &Value::from(POD)
        )
    );

    // `sovctl models`: the copy in the image's layer and its holder, with pod and image. A
    // scan that ran before the agent's first answer from containerd found the copy described
    // by its cgroup alone; the next scans name it with the pod (the wait is for that).
    let models = until(Duration::from_secs(90), "the pod's weights, named", || {
        let v = sovctl_json(&pki, &url, &["models"]);
        v.as_array()
            .unwrap()
            .iter()
            .find(|m| {
                m["copies"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["container_path"] == WEIGHT_PATH && c["container"]["pod"] == POD)
                    && m["users"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|u| u["pid"] == pid)
            })
            .cloned()
    });
    let copy = models["copies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["container_path"] == WEIGHT_PATH)
        .unwrap();
    let assert_named = |c: &Value, what: &str| {
        assert_eq!(c["id"], id, "{what}: {c:#}");
        assert_eq!(c["pod"], POD, "{what}");
        assert_eq!(c["namespace"], POD_NAMESPACE, "{what}");
        assert_eq!(c["container"], CONTAINER, "{what}");
        assert_eq!(c["image"], IMAGE, "{what}");
        assert_eq!(c["image_digest"], digest, "{what}");
    };
    assert_named(&copy["container"], "model copy");
    let user = models["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["pid"] == pid)
        .unwrap();
    assert_named(&user["container"], "model user");
    assert_eq!(
        models["pods"],
        format!("{POD_NAMESPACE}/{POD}"),
        "{models:#}"
    );

    // The foreign-egress breach: its evidence names the pod, namespace, container and image.
    let breach = until(Duration::from_secs(60), "the foreign-egress breach", || {
        let v = sovctl_json(&pki, &url, &["breaches", "--rule", "foreign-egress"]);
        v.as_array()
            .unwrap()
            .iter()
            .find(|b| b["node"] == "node-pod" && b["subject"] == "country:FR")
            .cloned()
    });
    let d = breach["evidence"]["counters"]["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["address"] == abroad_ip)
        .unwrap_or_else(|| panic!("the destination in the evidence: {breach:#}"))
        .clone();
    assert_eq!(
        (&d["pod"], &d["namespace"], &d["container"], &d["image"]),
        (
            &Value::from(POD),
            &Value::from(POD_NAMESPACE),
            &Value::from(CONTAINER),
            &Value::from(IMAGE)
        ),
        "{breach:#}"
    );
    assert_eq!(d["container_id"], id);

    stop.cancel();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the agent stops within 30 s of its cancellation")
            .unwrap()
            .unwrap();
        collector.stop().await;
    });
    // Whatever blocking work is left (a runtime query in flight) is not waited for.
    rt.shutdown_timeout(Duration::from_secs(10));
}
