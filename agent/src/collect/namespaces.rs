//! Which namespaces a process is in: the inode of `/proc/<pid>/ns/<kind>` (`net:[4026531840]`)
//! names a namespace for as long as it exists, and is the same for every process in it.

use std::path::Path;

/// Network namespace.
pub const NET: &str = "net";
/// Mount namespace.
pub const MNT: &str = "mnt";

/// The inode of namespace link text `kind:[N]`.
pub fn parse_link(kind: &str, target: &[u8]) -> Option<u64> {
    let inner = target
        .strip_prefix(kind.as_bytes())?
        .strip_prefix(b":[")?
        .strip_suffix(b"]")?;
    std::str::from_utf8(inner).ok()?.parse().ok()
}

/// The inode of `pid`'s namespace of `kind` ([`NET`], [`MNT`]); `None` when the process is gone
/// or not ours to see.
pub fn of_pid(proc_root: &Path, pid: u32, kind: &str) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::fs::read_link(proc_root.join(pid.to_string()).join("ns").join(kind)).ok()?;
    parse_link(kind, target.as_os_str().as_bytes())
}

/// The agent's own namespace of `kind`.
pub fn own(kind: &str) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::fs::read_link(Path::new("/proc/thread-self/ns").join(kind)).ok()?;
    parse_link(kind, target.as_os_str().as_bytes())
}

/// The pids listed in `proc_root` (empty when it cannot be listed).
pub fn pids(proc_root: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// Every namespace of `kind` with its processes (pids sorted), from one pass over `proc_root`.
pub fn by_namespace(proc_root: &Path, kind: &str) -> std::collections::HashMap<u64, Vec<u32>> {
    let mut out: std::collections::HashMap<u64, Vec<u32>> = std::collections::HashMap::new();
    for pid in pids(proc_root) {
        if let Some(ns) = of_pid(proc_root, pid, kind) {
            out.entry(ns).or_default().push(pid);
        }
    }
    for v in out.values_mut() {
        v.sort_unstable();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_text_gives_the_inode_of_the_right_kind_only() {
        assert_eq!(parse_link(NET, b"net:[4026531840]"), Some(4_026_531_840));
        assert_eq!(parse_link(MNT, b"net:[4026531840]"), None);
        assert_eq!(parse_link(NET, b"net:[]"), None);
    }

    #[test]
    fn this_process_is_in_its_own_namespaces() {
        let me = std::process::id();
        let net = of_pid(Path::new("/proc"), me, NET);
        assert!(net.is_some());
        assert_eq!(own(NET), net);
        assert_eq!(own(MNT), of_pid(Path::new("/proc"), me, MNT));
    }
}
