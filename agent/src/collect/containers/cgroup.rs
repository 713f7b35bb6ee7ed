//! What a process's cgroup path says about its container, without asking any runtime: the
//! container id, the runtime its naming convention belongs to, and for Kubernetes the pod uid.
//!
//! Layouts recognised (cgroup v1 and v2 alike; the innermost component naming a container wins):
//! - systemd driver: `…/docker-<id>.scope`, `…/cri-containerd-<id>.scope`, `…/crio-<id>.scope`,
//!   `…/libpod-<id>.scope`, under `kubepods-<qos>-pod<uid_with_underscores>.slice` for pods;
//! - cgroupfs driver: `/docker/<id>`, `/kubepods/<qos>/pod<uid>/<id>`, containerd's
//!   `/<containerd namespace>/<id>` (an id of the creator's choosing: recognised only once a
//!   runtime has listed it, see [`super::Containers`]).
//!
//! Conmon monitor scopes (`crio-conmon-<id>.scope`) are not containers: they run beside one.

/// What the cgroup path alone says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupFacts {
    /// The container id, when a component is a 64-hex id (or a runtime scope around one).
    pub id: Option<String>,
    /// The runtime whose naming convention the path follows ("docker", "containerd", "cri-o",
    /// "podman"), empty when it does not say.
    pub runtime: &'static str,
    /// The Kubernetes pod uid (with dashes), from a `pod<uid>` component.
    pub pod_uid: String,
    /// The path's components, innermost first, with runtime prefixes and `.scope` removed:
    /// the keys a runtime's container ids are matched against.
    pub keys: Vec<String>,
}

/// Runtime scope prefixes and the runtime each names. `*-conmon-*` is deliberately absent.
const SCOPE_PREFIXES: [(&str, &str); 4] = [
    ("docker-", "docker"),
    ("cri-containerd-", "containerd"),
    ("crio-", "cri-o"),
    ("libpod-", "podman"),
];
/// Length of a 64-hex container id.
const ID_LEN: usize = 64;
/// Components kept as match keys, innermost first.
const MAX_KEYS: usize = 4;

fn is_hex_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The paths in a reported cgroup string: one path, or `controllers:path` entries joined by `;`
/// (a hybrid host whose v1 hierarchies disagree).
fn paths(cgroup: &str) -> Vec<&str> {
    cgroup
        .split(';')
        .map(|entry| match entry.split_once(":/") {
            Some((_, rest)) => &entry[entry.len() - rest.len() - 1..],
            None => entry,
        })
        .filter(|p| !p.is_empty())
        .collect()
}

/// A Kubernetes pod uid in a component: `pod<uid>` (cgroupfs) or
/// `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(component: &str) -> Option<String> {
    let name = component.strip_suffix(".slice").unwrap_or(component);
    let at = name.rfind("pod")?;
    let before = &name[..at];
    if !(before.is_empty() || before.ends_with('-')) {
        return None;
    }
    let uid = name[at + 3..].replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    ok.then_some(uid)
}

/// The facts of one cgroup string (as `ProcessInfo.cgroup` reports it).
pub fn facts(cgroup: &str) -> CgroupFacts {
    let mut out = CgroupFacts::default();
    for path in paths(cgroup) {
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for comp in comps.iter().rev() {
            let base = comp.strip_suffix(".scope").unwrap_or(comp);
            let (key, runtime) = SCOPE_PREFIXES
                .iter()
                .find_map(|(prefix, rt)| base.strip_prefix(prefix).map(|id| (id, *rt)))
                .unwrap_or((base, ""));
            if out.id.is_none() && is_hex_id(key) {
                out.id = Some(key.to_owned());
                if !runtime.is_empty() {
                    out.runtime = runtime;
                }
            }
            if out.pod_uid.is_empty()
                && let Some(uid) = pod_uid(comp)
            {
                out.pod_uid = uid;
            }
            if out.keys.len() < MAX_KEYS && !out.keys.iter().any(|k| k == key) {
                out.keys.push(key.to_owned());
            }
        }
        if out.runtime.is_empty() && comps.first() == Some(&"docker") && out.id.is_some() {
            out.runtime = "docker";
        }
        if out.id.is_some() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1e9c0d5b7a4e2f8c6d1a0b9e8f7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e";
    const UID: &str = "0b6f7e4c-1d2a-4c3b-9e8f-7a6b5c4d3e2f";

    #[test]
    fn systemd_scopes_give_id_runtime_and_pod_uid() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        let f = facts(&path);
        assert_eq!(f.id.as_deref(), Some(ID));
        assert_eq!(f.runtime, "containerd");
        assert_eq!(f.pod_uid, UID);
        assert_eq!(f.keys[0], ID);
        for (prefix, rt) in [
            ("docker-", "docker"),
            ("crio-", "cri-o"),
            ("libpod-", "podman"),
        ] {
            let f = facts(&format!("/system.slice/{prefix}{ID}.scope"));
            assert_eq!((f.id.as_deref(), f.runtime), (Some(ID), rt), "{prefix}");
        }
    }

    #[test]
    fn cgroupfs_layouts_give_the_id_and_the_pod() {
        let f = facts(&format!("/kubepods/besteffort/pod{UID}/{ID}"));
        assert_eq!((f.id.as_deref(), f.pod_uid.as_str()), (Some(ID), UID));
        assert_eq!(f.runtime, "", "cgroupfs paths do not name the runtime");
        let f = facts(&format!("/docker/{ID}"));
        assert_eq!((f.id.as_deref(), f.runtime), (Some(ID), "docker"));
    }

    #[test]
    fn a_containerd_path_with_a_chosen_id_gives_keys_to_match_but_no_id() {
        let f = facts("/default/sov-web-1");
        assert_eq!(f.id, None);
        assert_eq!(f.keys, vec!["sov-web-1".to_owned(), "default".to_owned()]);
    }

    #[test]
    fn host_processes_and_conmon_monitors_are_not_containers() {
        for path in [
            "/",
            "/user.slice/user-1000.slice/session-2.scope",
            "/system.slice/sshd.service",
            &format!("/machine.slice/crio-conmon-{ID}.scope"),
        ] {
            let f = facts(path);
            assert_eq!((f.id, f.pod_uid.as_str()), (None, ""), "{path}");
        }
    }

    #[test]
    fn hybrid_joined_paths_are_each_examined() {
        let f = facts(&format!("cpu,cpuacct:/docker/{ID};memory:/docker/{ID}"));
        assert_eq!(f.id.as_deref(), Some(ID));
        assert_eq!(f.runtime, "docker");
    }
}
