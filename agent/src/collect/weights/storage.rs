//! Where a weight file physically lives: the mount holding it (from `/proc/self/mountinfo`), its
//! filesystem type and source, whether that filesystem is local or reached over the network, and
//! for network filesystems the server's address, so that the collector can geolocate the storage
//! itself and not only the node.
//!
//! - [`MountTable`] parses mountinfo (octal escapes, optional fields) and [`MountTable::locate`]
//!   finds the mount of a path (longest mount-point prefix, the top of a stack, cross-checked with
//!   the file's device number);
//! - [`is_network_fs`] and [`server_address`] classify a mount; [`location`] turns it into the
//!   wire type;
//! - [`makedev`] encodes `major:minor` the way `std::os::unix::fs::MetadataExt::dev` returns it,
//!   shared with [`super::users`], which reads the same numbers out of `/proc/<pid>/maps`.
//!
//! Limits: the table is the agent's own mount namespace. A file seen through a container's
//! namespace (another `/proc/<pid>/mountinfo`) can be located by loading that file with
//! [`MountTable::load_from`]. On btrfs a subvolume's files report a device number that no mount
//! shows; [`MountTable::locate`] then falls back to the longest prefix.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

use sov_proto::pb;

/// The agent's own mount table.
pub const DEFAULT_MOUNTINFO_PATH: &str = "/proc/self/mountinfo";

/// Filesystem types whose data lives on another machine (the exact `fs_type` of mountinfo; FUSE
/// filesystems appear as `fuse.<subtype>`).
pub const NETWORK_FS_TYPES: &[&str] = &[
    // NFS and SMB
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    // Ceph, kernel and FUSE clients
    "ceph",
    "fuse.ceph",
    "fuse.cephfs",
    "fuse.ceph-fuse",
    // Gluster
    "glusterfs",
    "fuse.glusterfs",
    // Parallel filesystems of HPC and AI clusters
    "lustre",
    "gpfs",
    "beegfs",
    "wekafs",
    "orangefs",
    "pvfs2",
    // Object stores and remotes through FUSE
    "fuse.s3fs",
    "fuse.gcsfuse",
    "fuse.rclone",
    "fuse.juicefs",
    "fuse.goofys",
    "fuse.mountpoint-s3",
    "fuse.blobfuse2",
    "fuse.sshfs",
    // Others
    "9p",
    "afs",
    "coda",
    "ncpfs",
];

/// FUSE filesystems whose mount source is a bucket or remote name rather than a host.
const BUCKET_FS_TYPES: &[&str] = &[
    "fuse.s3fs",
    "fuse.gcsfuse",
    "fuse.rclone",
    "fuse.juicefs",
    "fuse.goofys",
    "fuse.mountpoint-s3",
    "fuse.blobfuse2",
];

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    /// Unique id of the mount (field 1).
    pub mount_id: u32,
    /// Device number of the filesystem, encoded like `MetadataExt::dev()` (see [`makedev`]).
    pub device: u64,
    /// Where it is mounted, unescaped.
    pub mount_point: PathBuf,
    /// The directory of the filesystem that is mounted there (field 4: `/` for a whole
    /// filesystem, the source directory of a bind mount such as a volume).
    pub root: PathBuf,
    /// Filesystem type, e.g. `ext4`, `nfs4`, `fuse.sshfs`.
    pub fs_type: String,
    /// Mount source, e.g. `/dev/nvme0n1p1`, `10.0.0.5:/export`, `//filer/share`.
    pub source: String,
    /// The per-mount options followed by the superblock options (where `addr=`, `mon_addr=` are),
    /// comma-separated, e.g. `ro,relatime,rw,vers=4.2,addr=10.0.0.5`.
    pub options: String,
}

/// The mounts of one mount namespace, in mountinfo order (later lines are mounted on top of
/// earlier ones).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MountTable {
    mounts: Vec<Mount>,
}

impl MountTable {
    /// Reads the agent's own `/proc/self/mountinfo`.
    pub fn load() -> io::Result<Self> {
        Self::load_from(Path::new(DEFAULT_MOUNTINFO_PATH))
    }

    /// Reads a mountinfo file, e.g. `/proc/<pid>/mountinfo` of a process in a container.
    pub fn load_from(path: &Path) -> io::Result<Self> {
        Ok(Self::parse(&fs::read_to_string(path)?))
    }

    /// Parses mountinfo text; lines that do not parse are skipped.
    pub fn parse(text: &str) -> Self {
        Self {
            mounts: text.lines().filter_map(parse_line).collect(),
        }
    }

    /// The mounts, in table order.
    pub fn mounts(&self) -> &[Mount] {
        &self.mounts
    }

    /// The mount containing `path` (longest mount_point prefix of the canonical path, ties → the
    /// later mount in the table, i.e. the top of a stack), cross-checked with the file's device
    /// when given: the longest prefix whose device matches wins; when none matches (a btrfs
    /// subvolume, an overlay reporting a lower layer's device) the longest prefix is returned.
    ///
    /// A path that cannot be canonicalized (deleted, or no permission) is matched as given after
    /// removing `.` and `..` lexically; a relative path that cannot be resolved matches nothing.
    pub fn locate(&self, path: &Path, device: Option<u64>) -> Option<&Mount> {
        let path = fs::canonicalize(path).unwrap_or_else(|_| lexical_normal(path));
        self.locate_resolved(&path, device)
    }

    /// [`MountTable::locate`] for a path already free of links, as another mount namespace
    /// sees it (a container's table, loaded from `/proc/<pid>/mountinfo`): never canonicalized
    /// in the agent's own namespace, where it would name another file.
    pub fn locate_in_namespace(&self, path: &Path, device: Option<u64>) -> Option<&Mount> {
        self.locate_resolved(&lexical_normal(path), device)
    }

    fn locate_resolved(&self, path: &Path, device: Option<u64>) -> Option<&Mount> {
        if !path.is_absolute() {
            return None;
        }
        // Candidates ordered best first: longest mount point, then later in the table.
        let mut candidates: Vec<(usize, usize, &Mount)> = self
            .mounts
            .iter()
            .enumerate()
            .filter(|(_, m)| path.starts_with(&m.mount_point))
            .map(|(i, m)| (m.mount_point.components().count(), i, m))
            .collect();
        candidates.sort_by_key(|&(len, i, _)| std::cmp::Reverse((len, i)));
        if let Some(dev) = device
            && let Some(&(_, _, m)) = candidates.iter().find(|(_, _, m)| m.device == dev)
        {
            return Some(m);
        }
        candidates.first().map(|&(_, _, m)| m)
    }
}

/// Into the wire type.
pub fn location(m: &Mount) -> pb::StorageLocation {
    let fs_type = effective_fs_type(m);
    pb::StorageLocation {
        mount_point: m.mount_point.to_string_lossy().into_owned(),
        fs_type: m.fs_type.clone(),
        source: m.source.clone(),
        network: is_network_fs(&fs_type),
        server_address: server_address(&fs_type, &m.source, &m.options),
    }
}

/// A plain `fuse`/`fuseblk` mount whose daemon set no subtype usually names itself in the source
/// (`s3fs`, `rclone`, …): classify it as `fuse.<source>`.
fn effective_fs_type(m: &Mount) -> String {
    if matches!(m.fs_type.as_str(), "fuse" | "fuseblk") {
        let guess = format!("fuse.{}", m.source);
        if is_network_fs(&guess) {
            return guess;
        }
    }
    m.fs_type.clone()
}

/// True when `fs_type` (as mountinfo spells it) is in [`NETWORK_FS_TYPES`].
pub fn is_network_fs(fs_type: &str) -> bool {
    NETWORK_FS_TYPES.contains(&fs_type)
}

/// Server address from the mount source and options:
/// - NFS `host:/export` or `[v6]:/export`, `addr=` in the options preferred (the resolved IP);
/// - CIFS `//host/share`, `addr=` / `ip=` preferred;
/// - Ceph `mon1,mon2:6789:/path` or `1.2.3.4:6789,5.6.7.8:6789:/` (the first monitor, port
///   removed), new-style `user@fsid.fs=/` through its `mon_addr=` option;
/// - Gluster `host:/volume`, Lustre `10.0.0.1@tcp:/fs` (first NID), sshfs `user@host:path`,
///   9p over `trans=tcp`/`rdma`;
/// - s3fs, gcsfuse, rclone, juicefs and other object-store FUSE mounts: the bucket or remote name
///   as given (not an address), unless the source is only the daemon's name.
///
/// Hosts come back without brackets or port. `""` when unknown.
pub fn server_address(fs_type: &str, source: &str, options: &str) -> String {
    let opt = |key: &str| {
        options
            .split(',')
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
            .filter(|v| !v.is_empty())
    };
    let found = match fs_type {
        "nfs" | "nfs4" => opt("addr")
            .map(strip_brackets)
            .or_else(|| remote_host(source)),
        "cifs" | "smb3" | "smbfs" => opt("addr")
            .or_else(|| opt("ip"))
            .map(strip_brackets)
            .or_else(|| unc_host(source)),
        "ceph" => opt("mon_addr")
            .and_then(|v| v.split('/').next())
            .map(host_without_port)
            .or_else(|| ceph_monitor(source)),
        "glusterfs" | "fuse.glusterfs" | "fuse.sshfs" => remote_host(source),
        "lustre" => source
            .split(':')
            .next()
            .and_then(|nids| nids.split(',').next())
            .map(|nid| nid.split('@').next().unwrap_or(nid))
            .filter(|h| !h.is_empty() && !h.starts_with('/')),
        "9p" if matches!(opt("trans"), Some("tcp" | "rdma")) => {
            Some(host_without_port(source)).filter(|h| !h.is_empty())
        }
        t if BUCKET_FS_TYPES.contains(&t) => {
            let daemon = t.trim_start_matches("fuse.");
            Some(source.trim()).filter(|s| {
                !s.is_empty() && *s != daemon && *s != t && *s != "fuse" && *s != "none"
            })
        }
        _ => None,
    };
    found.unwrap_or("").to_string()
}

/// The host of `[user@]host:path` or `[user@][v6]:path`.
fn remote_host(source: &str) -> Option<&str> {
    let mut depth = 0u32;
    let colon = source.char_indices().find_map(|(i, c)| {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ':' if depth == 0 => return Some(i),
            _ => {}
        }
        None
    })?;
    let user_host = &source[..colon];
    let host = user_host.rsplit_once('@').map_or(user_host, |(_, h)| h);
    Some(strip_brackets(host)).filter(|h| !h.is_empty())
}

/// The host of `//host/share` (or `\\host\share`).
fn unc_host(source: &str) -> Option<&str> {
    let rest = source
        .strip_prefix("//")
        .or_else(|| source.strip_prefix("\\\\"))?;
    let host = rest.split(['/', '\\']).next()?;
    Some(strip_brackets(host)).filter(|h| !h.is_empty())
}

/// The first monitor of an old-style Ceph source `mon1[:port][,mon2…]:/path`.
fn ceph_monitor(source: &str) -> Option<&str> {
    let (monitors, _) = source.split_once(":/")?;
    if monitors.contains('@') {
        return None; // new style without mon_addr: only a cluster fsid
    }
    let first = monitors.split(',').next()?;
    Some(host_without_port(first)).filter(|h| !h.is_empty())
}

/// `1.2.3.4:6789` → `1.2.3.4`; `[::1]:6789` → `::1`; `v2:1.2.3.4:3300` → `1.2.3.4`; a bare
/// IPv6 address or a host without port stays as it is.
fn host_without_port(addr: &str) -> &str {
    let addr = addr
        .strip_prefix("v1:")
        .or_else(|| addr.strip_prefix("v2:"))
        .unwrap_or(addr);
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.split_once(':') {
        Some((host, port)) if !port.contains(':') => host,
        _ => addr,
    }
}

fn strip_brackets(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Encodes `major:minor` as glibc's `makedev`, which is what `MetadataExt::dev()` returns.
pub fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0xff)
}

/// One mountinfo line:
/// `36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue`.
fn parse_line(line: &str) -> Option<Mount> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    let mount_id = fields.first()?.parse().ok()?;
    let (major, minor) = fields.get(2)?.split_once(':')?;
    let device = makedev(major.parse().ok()?, minor.parse().ok()?);
    let root = PathBuf::from(OsString::from_vec(unescape(fields.get(3)?)));
    let mount_point = PathBuf::from(OsString::from_vec(unescape(fields.get(4)?)));
    let mount_opts = fields.get(5)?;
    let fs_type = lossy_unescape(fields.get(sep + 1)?);
    let source = fields
        .get(sep + 2)
        .map(|s| lossy_unescape(s))
        .unwrap_or_default();
    let super_opts = fields
        .get(sep + 3)
        .map(|s| lossy_unescape(s))
        .unwrap_or_default();
    let options = if super_opts.is_empty() {
        lossy_unescape(mount_opts)
    } else {
        format!("{},{super_opts}", lossy_unescape(mount_opts))
    };
    Some(Mount {
        mount_id,
        device,
        mount_point,
        root,
        fs_type,
        source,
        options,
    })
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(digits) = b.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let v = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn lossy_unescape(s: &str) -> String {
    String::from_utf8_lossy(&unescape(s)).into_owned()
}

/// Removes `.` and `..` without touching the filesystem.
fn lexical_normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The upper directory then the lower directories of an overlay mount's options
/// (`upperdir=…`, `lowerdir=a:b`, with `\\:` escaping a colon in a name), in lookup order.
pub fn overlay_layers(options: &str) -> Vec<PathBuf> {
    let opt = |key: &str| {
        options
            .split(',')
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
            .filter(|v| !v.is_empty())
    };
    let mut layers: Vec<PathBuf> = opt("upperdir").map(PathBuf::from).into_iter().collect();
    if let Some(lower) = opt("lowerdir") {
        let mut cur = String::new();
        let mut chars = lower.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ':' => layers.push(PathBuf::from(std::mem::take(&mut cur))),
                c => cur.push(c),
            }
        }
        if !cur.is_empty() {
            layers.push(PathBuf::from(cur));
        }
    }
    layers.retain(|p| p.is_absolute());
    layers
}

/// Where the file at `path` inside a mount namespace (its mount `m` from that namespace's
/// table) is reachable from the agent's own namespace (`own`), and that file's device and
/// inode: for an overlay (a container's root filesystem), the first layer directory holding it;
/// for a bind mount (a volume, a hostPath), the same directory of the same device mounted in
/// `own`. `None` when neither is reachable (a tmpfs of the container, a layer directory the
/// agent cannot see). `exists(path)` stats a host path (the real filesystem in production).
pub fn host_path(
    m: &Mount,
    path: &Path,
    own: &MountTable,
    exists: &dyn Fn(&Path) -> Option<(u64, u64)>,
) -> Option<(PathBuf, (u64, u64))> {
    let rel = lexical_normal(path);
    let rel = rel.strip_prefix(&m.mount_point).ok()?;
    if m.fs_type == "overlay" {
        return overlay_layers(&m.options).into_iter().find_map(|layer| {
            let p = layer.join(rel);
            exists(&p).map(|k| (p, k))
        });
    }
    // The file's path inside its filesystem, then every mount of that filesystem here.
    let in_fs = m.root.join(rel);
    let mut mounts: Vec<&Mount> = own
        .mounts()
        .iter()
        .filter(|h| h.device == m.device && in_fs.starts_with(&h.root))
        .collect();
    // The most specific mount first (the longest root), then the shortest mount point.
    mounts.sort_by_key(|h| {
        (
            std::cmp::Reverse(h.root.components().count()),
            h.mount_point.components().count(),
        )
    });
    mounts.into_iter().find_map(|h| {
        let below = in_fs.strip_prefix(&h.root).ok()?;
        let p = h.mount_point.join(below);
        exists(&p).map(|k| (p, k))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    /// A node with local disks, an overlay (container), and every network filesystem kind.
    const MOUNTINFO: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 259:3 / /data rw,noatime shared:2 - xfs /dev/nvme1n1 rw,attr2,inode64,noquota
25 24 0:50 / /data/models rw,relatime shared:40 - nfs4 nfs.example.org:/export/models rw,vers=4.2,rsize=1048576,proto=tcp,clientaddr=10.1.0.7,addr=10.0.0.5
26 22 0:51 / /mnt/smb rw,relatime shared:41 - cifs //filer.example.org/weights rw,vers=3.1.1,addr=10.0.0.6,file_mode=0755
27 22 0:52 / /mnt/ceph-old rw,relatime shared:42 - ceph 10.0.1.1:6789,10.0.1.2:6789:/models rw,name=admin,secret=<hidden>,acl
28 22 0:53 / /mnt/ceph-new rw,relatime shared:43 - ceph admin@6c3e1f4a-0b2e-4b5e-9f1c-1a2b3c4d5e6f.cephfs=/ rw,name=admin,mon_addr=10.0.2.1:6789/10.0.2.2:6789
29 22 0:54 / /mnt/remote rw,nosuid,nodev,relatime shared:44 - fuse.sshfs alice@gpu-box.example.org:/srv/weights rw,user_id=0,group_id=0
30 22 0:55 / /mnt/My\\040Models rw,relatime shared:45 - ext4 /dev/sdb1 rw
31 22 0:56 / /var/lib/docker/overlay2/abc/merged rw,relatime - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/X:/var/lib/docker/overlay2/l/Y,upperdir=/var/lib/docker/overlay2/abc/diff,workdir=/var/lib/docker/overlay2/abc/work
32 24 259:3 /cache /data/stack rw,relatime shared:2 - xfs /dev/nvme1n1 rw
33 24 0:57 / /data/stack rw,relatime shared:46 - tmpfs tmpfs rw,size=1024k
34 22 0:58 / /mnt/v6 rw,relatime shared:47 - nfs [fd00::5]:/export rw,vers=3,mountproto=tcp
35 22 0:59 / /mnt/bucket rw,nosuid,nodev,relatime shared:48 - fuse.gcsfuse my-model-bucket rw,user_id=0
";

    fn table() -> MountTable {
        MountTable::parse(MOUNTINFO)
    }

    #[test]
    fn overlay_layers_come_upper_first_then_lower_with_escaped_colons() {
        let t = table();
        let m = mount(&t, "/var/lib/docker/overlay2/abc/merged");
        assert_eq!(
            overlay_layers(&m.options),
            vec![
                PathBuf::from("/var/lib/docker/overlay2/abc/diff"),
                PathBuf::from("/var/lib/docker/overlay2/l/X"),
                PathBuf::from("/var/lib/docker/overlay2/l/Y"),
            ]
        );
        assert_eq!(
            overlay_layers("lowerdir=/a\\:b:/c"),
            vec![PathBuf::from("/a:b"), PathBuf::from("/c")]
        );
        assert_eq!(m.root, Path::new("/"));
        assert_eq!(
            mount(&t, "/data/stack").root,
            Path::new("/"),
            "the tmpfs on top"
        );
    }

    #[test]
    fn a_containers_file_is_found_in_its_overlay_layer_or_its_volumes_source() {
        // The container's own table: an overlay root and a volume bound from the host's
        // /data/cache directory (the host mounts that filesystem at /data).
        let container = MountTable::parse(
            "1 0 0:90 / / rw - overlay overlay rw,lowerdir=/l/1:/l/2,upperdir=/u,workdir=/w\n\
             2 1 259:3 /cache/models /models ro - xfs /dev/nvme1n1 rw\n",
        );
        let host = table();
        let present = |p: &Path| match p.to_str() {
            Some("/l/2/opt/w.safetensors") => Some((1, 2)),
            Some("/data/cache/models/llama/w.gguf") => Some((3, 4)),
            _ => None,
        };
        let root = &container.mounts()[0];
        assert_eq!(
            host_path(root, Path::new("/opt/w.safetensors"), &host, &present),
            Some((PathBuf::from("/l/2/opt/w.safetensors"), (1, 2)))
        );
        let vol = container
            .locate_in_namespace(Path::new("/models/llama/w.gguf"), None)
            .expect("the volume");
        assert_eq!(vol.mount_point, Path::new("/models"));
        assert_eq!(
            host_path(vol, Path::new("/models/llama/w.gguf"), &host, &present),
            Some((PathBuf::from("/data/cache/models/llama/w.gguf"), (3, 4)))
        );
        assert_eq!(host_path(root, Path::new("/tmp/x"), &host, &present), None);
    }

    fn mount<'a>(t: &'a MountTable, point: &str) -> &'a Mount {
        t.mounts()
            .iter()
            .rev()
            .find(|m| m.mount_point == Path::new(point))
            .unwrap_or_else(|| panic!("no mount at {point}"))
    }

    #[test]
    fn makedev_matches_glibc_for_small_and_large_numbers() {
        assert_eq!(makedev(254, 0), 65024);
        assert_eq!(makedev(8, 1), 0x801);
        assert_eq!(makedev(0, 21), 21);
        // Large minor (e.g. anonymous devices past 255) and large major use the high bits.
        assert_eq!(makedev(0, 0x1_2345), 0x1230_0045);
        assert_eq!(makedev(0x1234, 0), (0x1u64 << 44) | (0x234 << 8));
    }

    #[test]
    fn parse_reads_every_field_of_a_realistic_mountinfo() {
        let t = table();
        assert_eq!(t.mounts().len(), 14);
        let root = mount(&t, "/");
        assert_eq!(root.mount_id, 22);
        assert_eq!(root.device, makedev(259, 2));
        assert_eq!(root.fs_type, "ext4");
        assert_eq!(root.source, "/dev/nvme0n1p2");
        assert_eq!(root.options, "rw,relatime,rw,errors=remount-ro");

        let nfs = mount(&t, "/data/models");
        assert_eq!(nfs.fs_type, "nfs4");
        assert_eq!(nfs.source, "nfs.example.org:/export/models");
        assert!(nfs.options.contains("addr=10.0.0.5"));

        let overlay = mount(&t, "/var/lib/docker/overlay2/abc/merged");
        assert_eq!(overlay.fs_type, "overlay");
        assert!(!is_network_fs(&overlay.fs_type));
    }

    #[test]
    fn parse_unescapes_a_mount_point_with_a_space() {
        let t = table();
        let m = mount(&t, "/mnt/My Models");
        assert_eq!(m.source, "/dev/sdb1");
        assert_eq!(
            t.locate(Path::new("/mnt/My Models/llama.gguf"), None)
                .map(|m| m.mount_id),
            Some(30)
        );
    }

    #[test]
    fn parse_skips_garbage_lines_and_handles_no_optional_fields() {
        let t = MountTable::parse(
            "garbage\n\n1 2 3\n40 1 8:1 / /boot rw - vfat /dev/sda1 rw,fmask=0022\n",
        );
        assert_eq!(t.mounts().len(), 1);
        assert_eq!(t.mounts()[0].fs_type, "vfat");
        assert_eq!(t.mounts()[0].device, makedev(8, 1));
    }

    #[test]
    fn locate_picks_the_longest_mount_point_prefix() {
        let t = table();
        let at = |p: &str| t.locate(Path::new(p), None).map(|m| m.mount_id);
        assert_eq!(at("/data/models/llama/model.safetensors"), Some(25));
        assert_eq!(at("/data/other/x.bin"), Some(24));
        assert_eq!(at("/data"), Some(24));
        // A component prefix, not a string prefix: /datax is on /.
        assert_eq!(at("/datax/file"), Some(22));
        assert_eq!(at("/etc/../data/models/./a"), Some(25));
        assert_eq!(at("relative/path"), None);
    }

    #[test]
    fn locate_picks_the_top_of_a_stacked_mount() {
        let t = table();
        let m = t.locate(Path::new("/data/stack/file"), None);
        assert_eq!(m.map(|m| m.fs_type.as_str()), Some("tmpfs"));
    }

    #[test]
    fn locate_prefers_the_mount_whose_device_matches_the_file() {
        let t = table();
        // A file opened before the tmpfs was stacked on top still lives on the xfs bind below.
        let m = t.locate(Path::new("/data/stack/file"), Some(makedev(259, 3)));
        assert_eq!(m.map(|m| m.mount_id), Some(32));
        // No mount has the device (btrfs subvolume): the longest prefix.
        let m = t.locate(Path::new("/data/models/a"), Some(makedev(0, 999)));
        assert_eq!(m.map(|m| m.mount_id), Some(25));
    }

    #[test]
    fn location_reports_network_mounts_with_their_server() {
        let t = table();
        let loc = |p: &str| location(mount(&t, p));

        let nfs = loc("/data/models");
        assert!(nfs.network);
        assert_eq!(nfs.server_address, "10.0.0.5");
        assert_eq!(nfs.mount_point, "/data/models");
        assert_eq!(nfs.fs_type, "nfs4");

        assert_eq!(loc("/mnt/smb").server_address, "10.0.0.6");
        assert_eq!(loc("/mnt/ceph-old").server_address, "10.0.1.1");
        assert_eq!(loc("/mnt/ceph-new").server_address, "10.0.2.1");
        assert_eq!(loc("/mnt/remote").server_address, "gpu-box.example.org");
        assert_eq!(loc("/mnt/v6").server_address, "fd00::5");
        let bucket = loc("/mnt/bucket");
        assert!(bucket.network);
        assert_eq!(bucket.server_address, "my-model-bucket");

        let local = loc("/data");
        assert!(!local.network);
        assert_eq!(local.server_address, "");
        assert_eq!(local.source, "/dev/nvme1n1");
    }

    #[test]
    fn server_address_understands_each_network_filesystem() {
        let cases = [
            (
                "nfs4",
                "nfs.example.org:/export",
                "rw,vers=4.2",
                "nfs.example.org",
            ),
            (
                "nfs4",
                "nfs.example.org:/export",
                "clientaddr=10.1.0.7,addr=10.0.0.5",
                "10.0.0.5",
            ),
            ("nfs", "[fd00::5]:/export", "rw", "fd00::5"),
            ("nfs", "[fd00::5]:/export", "addr=fd00::5", "fd00::5"),
            ("nfs", "10.0.0.9:/", "", "10.0.0.9"),
            ("cifs", "//filer/share", "rw,vers=3.0", "filer"),
            ("cifs", "//filer/share", "ip=10.0.0.6", "10.0.0.6"),
            ("smb3", "//[fd00::6]/share", "", "fd00::6"),
            ("ceph", "mon1,mon2:6789:/path", "name=admin", "mon1"),
            (
                "ceph",
                "1.2.3.4:6789,5.6.7.8:6789:/",
                "name=admin",
                "1.2.3.4",
            ),
            ("ceph", "[fd00::1]:6789:/", "", "fd00::1"),
            (
                "ceph",
                "u@fsid.fs=/",
                "mon_addr=1.2.3.4:6789/5.6.7.8:6789",
                "1.2.3.4",
            ),
            ("ceph", "u@fsid.fs=/", "name=u", ""),
            ("fuse.sshfs", "user@host.example:/srv", "", "host.example"),
            (
                "fuse.sshfs",
                "host.example:relative/dir",
                "",
                "host.example",
            ),
            ("fuse.sshfs", "user@[fd00::7]:/srv", "", "fd00::7"),
            ("fuse.glusterfs", "gluster1:/gv0", "", "gluster1"),
            (
                "lustre",
                "10.0.0.1@tcp,10.0.0.2@tcp:/lustre",
                "",
                "10.0.0.1",
            ),
            ("9p", "192.168.1.1", "trans=tcp,port=564", "192.168.1.1"),
            ("9p", "hostshare", "trans=virtio", ""),
            ("fuse.s3fs", "s3fs", "", ""),
            ("fuse.s3fs", "my-bucket", "", "my-bucket"),
            ("fuse.rclone", "gdrive:models", "", "gdrive:models"),
            ("fuse.gcsfuse", "my-model-bucket", "", "my-model-bucket"),
            ("ext4", "/dev/sda1", "addr=1.2.3.4", ""),
            ("gpfs", "gpfs0", "", ""),
        ];
        for (fs, source, options, want) in cases {
            assert_eq!(
                server_address(fs, source, options),
                want,
                "{fs} {source} {options}"
            );
        }
    }

    #[test]
    fn a_plain_fuse_mount_named_after_a_known_daemon_is_network() {
        let m = Mount {
            mount_id: 1,
            device: 1,
            mount_point: PathBuf::from("/mnt/s3"),
            root: PathBuf::from("/"),
            fs_type: "fuse".into(),
            source: "s3fs".into(),
            options: "rw".into(),
        };
        let loc = location(&m);
        assert!(loc.network);
        assert_eq!(loc.fs_type, "fuse");
        assert_eq!(loc.server_address, "");
    }

    #[test]
    fn every_listed_network_type_is_network_and_local_ones_are_not() {
        for t in NETWORK_FS_TYPES {
            assert!(is_network_fs(t));
        }
        for t in [
            "ext4", "xfs", "btrfs", "zfs", "overlay", "tmpfs", "fuse", "virtiofs",
        ] {
            assert!(!is_network_fs(t), "{t}");
        }
    }

    #[test]
    fn locate_finds_the_real_mount_of_a_tempdir_with_its_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = fs::metadata(dir.path()).expect("stat").dev();
        let table = MountTable::load().expect("mountinfo");
        let m = table
            .locate(dir.path(), Some(dev))
            .expect("a mount holds the tempdir");
        // On ext4/xfs/tmpfs the mount's device is the file's. On btrfs subvolumes the file
        // reports an anonymous device no mount shows; accept any mount there, loudly.
        if m.device != dev {
            assert!(
                m.fs_type == "btrfs" || m.fs_type == "overlay",
                "device {dev} of {} differs from {m:?}",
                dir.path().display()
            );
            eprintln!("NOTE: {} reports a device no mount shows", m.fs_type);
        }
        assert!(
            dir.path()
                .canonicalize()
                .expect("canonical")
                .starts_with(&m.mount_point)
        );
    }

    /// Unmounts on drop, so that a failed assertion does not leave the bind mount behind.
    struct Unmount(PathBuf);

    impl Drop for Unmount {
        fn drop(&mut self) {
            let ok = Command::new("umount")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
    }

    #[test]
    fn a_file_under_a_real_bind_mount_is_located_on_the_bind_mount() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        fs::create_dir(&src).expect("mkdir");
        fs::create_dir(&dst).expect("mkdir");
        fs::write(src.join("w.bin"), b"weights").expect("write");
        let mounted = Command::new("mount")
            .arg("--bind")
            .arg(&src)
            .arg(&dst)
            .output();
        match mounted {
            Ok(out) if out.status.success() => {}
            other => {
                crate::skipped::record(
                    "collect::weights::storage::a_file_under_a_real_bind_mount_is_located_on_the_bind_mount",
                    &format!("`mount --bind` needs root and a mount command ({other:?})"),
                );
                return;
            }
        }
        let _unmount = Unmount(dst.clone());

        let file = dst.join("w.bin");
        let dev = fs::metadata(&file).expect("stat").dev();
        let table = MountTable::load().expect("mountinfo");
        let m = table.locate(&file, Some(dev)).expect("located");
        assert_eq!(m.mount_point, dst.canonicalize().expect("canonical"));
        assert_eq!(m.device, dev);
        // The same file through its original path is on the filesystem below.
        let below = table
            .locate(&src.join("w.bin"), Some(dev))
            .expect("located");
        assert_ne!(below.mount_point, m.mount_point);
        assert_ne!(below.mount_id, m.mount_id);
    }
}
