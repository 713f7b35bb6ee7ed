//! Who uses each weight file: the processes that have it memory-mapped (`/proc/<pid>/maps`) or
//! open (`/proc/<pid>/fd/*`), so that a model can be linked to the GPUs those processes run on;
//! and, in the same pass ([`scan_processes`]), the files that processes use outside every weight
//! root, wherever they live (another mount namespace: a container image, a volume), each with a
//! handle the agent can open it through (`/proc/<pid>/map_files/<range>`, `/proc/<pid>/fd/<n>`).
//!
//! Files are matched by `(device, inode)`, never by path: a mapped path may read `(deleted)`, or
//! name a link, a bind mount or another mount namespace. The device column of `maps` (hex
//! `major:minor`) is encoded with [`super::storage::makedev`], the same number as
//! `MetadataExt::dev()`.
//!
//! Bounded: processes that vanish or refuse to be read are skipped, and at most
//! [`MAX_FDS_PER_PROCESS`] descriptors of one process are examined. Reading other users'
//! processes needs root (or `CAP_SYS_PTRACE` + `CAP_DAC_READ_SEARCH`); without it only the
//! agent's own user's processes are seen.
//!
//! Known limits:
//! - every open descriptor is `stat`ed through its `/proc` link, which follows to the file: a
//!   descriptor on a hung NFS mount can block that call (run the scan on a blocking thread);
//! - on overlayfs, `maps` shows the lower or upper layer's device and inode while `stat` through
//!   the overlay may show the overlay's, so a file mapped inside a container is found when the
//!   caller also asks for the layer file's `(device, inode)`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::storage::makedev;

/// At most this many descriptors of one process are examined.
pub const MAX_FDS_PER_PROCESS: usize = 65_536;

/// One process's use of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileUse {
    /// The process.
    pub pid: u32,
    /// The file appears in the process's memory maps.
    pub mapped: bool,
    /// The process holds a descriptor on the file.
    pub open: bool,
}

/// For the set of `(device, inode)` of known weight files, scans every `/proc/<pid>/maps` (by the
/// device and inode columns) and `/proc/<pid>/fd/*` (by `stat` of the descriptor, which follows
/// it to the open file), and returns the users of each file that has any, sorted by pid. Files
/// nobody uses are absent from the map.
pub fn scan_users(
    proc_root: &Path,
    wanted: &HashSet<(u64, u64)>,
) -> HashMap<(u64, u64), Vec<FileUse>> {
    if wanted.is_empty() {
        return HashMap::new();
    }
    scan_processes(proc_root, &|key| {
        if wanted.contains(&key) {
            Interest::User
        } else {
            Interest::Ignore
        }
    })
    .uses
}

/// What [`scan_processes`] should do with a file it meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Nothing (known not to be a weight file).
    Ignore,
    /// Record its users (a known weight file).
    User,
    /// Record its users and where it was first seen (a file to examine).
    Candidate,
}

/// Where a process was seen using a file, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    /// The process.
    pub pid: u32,
    /// The file's path as that process sees it (inside its mount namespace), without the
    /// kernel's ` (deleted)` mark.
    pub path: PathBuf,
    /// The file was deleted (only the process's mapping or descriptor keeps it).
    pub deleted: bool,
    /// A path the agent can open the very file through, whatever namespace it lives in:
    /// `/proc/<pid>/map_files/<start>-<end>` or `/proc/<pid>/fd/<n>`.
    pub handle: PathBuf,
    /// The handle is a descriptor (its `stat` gives the file as the process opened it: an
    /// overlay's device for a container's file), not a mapping (the layer file underneath).
    pub via_fd: bool,
}

/// What one pass over every process found.
#[derive(Debug, Default)]
pub struct ProcessFiles {
    /// Users of every file of interest, sorted by pid.
    pub uses: HashMap<(u64, u64), Vec<FileUse>>,
    /// The first sighting of every candidate file.
    pub sightings: HashMap<(u64, u64), Sighting>,
    /// Every file met (ignored ones included), for the caller's caches.
    pub seen: HashSet<(u64, u64)>,
    /// Processes examined, and those whose maps and descriptors could not be read.
    pub processes: usize,
    pub unreadable: usize,
}

/// One pass over every `/proc/<pid>/maps` and `/proc/<pid>/fd/*`: for each file that
/// `interest` wants, its users; for each candidate, where it was first seen. Descriptors on
/// anything but a path (sockets, pipes, `anon_inode:`) and on `/dev`, `/proc` and `/sys` are not
/// `stat`ed.
pub fn scan_processes(proc_root: &Path, interest: &dyn Fn((u64, u64)) -> Interest) -> ProcessFiles {
    let mut out = ProcessFiles::default();
    let Ok(dir) = fs::read_dir(proc_root) else {
        tracing::warn!(proc_root = %proc_root.display(), "cannot list processes");
        return out;
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    out.processes = pids.len();

    let mut line = String::new();
    for &pid in &pids {
        let base = proc_root.join(pid.to_string());
        let mut uses: BTreeMap<(u64, u64), FileUse> = BTreeMap::new();
        let new_use = || FileUse {
            pid,
            mapped: false,
            open: false,
        };
        let mut sightings: Vec<((u64, u64), Sighting)> = Vec::new();
        // One file met through a mapping (its map_files name) or a descriptor (its path).
        let mut note = |key: (u64, u64), raw: &[u8], via: Via<'_>| {
            out.seen.insert(key);
            let what = interest(key);
            if what == Interest::Ignore {
                return;
            }
            let u = uses.entry(key).or_insert_with(new_use);
            match via {
                Via::Map(_) => u.mapped = true,
                Via::Fd(_) => u.open = true,
            }
            if what == Interest::Candidate {
                let (path, deleted) = undeleted(raw);
                let (handle, via_fd) = match via {
                    Via::Map(range) => (base.join("map_files").join(range), false),
                    Via::Fd(fd) => (fd.to_path_buf(), true),
                };
                sightings.push((
                    key,
                    Sighting {
                        pid,
                        path,
                        deleted,
                        handle,
                        via_fd,
                    },
                ));
            }
        };
        let maps_ok = scan_maps(&base.join("maps"), &mut line, |key, range, path| {
            note(key, path, Via::Map(range));
        });
        let fds_ok = scan_fds(&base.join("fd"), |key, fd, target| {
            note(key, target, Via::Fd(fd));
        });
        if !maps_ok && !fds_ok {
            out.unreadable += 1;
        }
        for (key, u) in uses {
            // Pids are visited in ascending order, so each list stays sorted.
            out.uses.entry(key).or_default().push(u);
        }
        for (key, s) in sightings {
            out.sightings.entry(key).or_insert(s);
        }
    }
    tracing::debug!(
        processes = out.processes,
        unreadable = out.unreadable,
        files_in_use = out.uses.len(),
        candidates = out.sightings.len(),
        "process files scanned"
    );
    out
}

/// How a process reaches a file: a mapping (its `map_files` name) or a descriptor (its path).
#[derive(Debug, Clone, Copy)]
enum Via<'a> {
    Map(&'a str),
    Fd(&'a Path),
}

/// A path without the kernel's ` (deleted)` mark, and whether it had it.
fn undeleted(path: &[u8]) -> (PathBuf, bool) {
    const MARK: &[u8] = b" (deleted)";
    match path.strip_suffix(MARK) {
        Some(p) => (PathBuf::from(OsStr::from_bytes(p)), true),
        None => (PathBuf::from(OsStr::from_bytes(path)), false),
    }
}

/// Calls `hit(key, map_files name, path)` for each file mapping. False when `maps` could not
/// be opened (the process is gone or not ours to read).
fn scan_maps(path: &Path, line: &mut String, mut hit: impl FnMut((u64, u64), &str, &[u8])) -> bool {
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    let mut reader = BufReader::new(file);
    let mut last: Option<(u64, u64)> = None;
    loop {
        line.clear();
        match reader.read_line(line) {
            Ok(0) | Err(_) => break, // end, or the process exited mid-read
            Ok(_) => {}
        }
        if let Some((key, range, path)) = parse_maps_line(line)
            // One file is usually several consecutive mappings: report it once.
            && last != Some(key)
        {
            last = Some(key);
            hit(key, &range, path.as_bytes());
        }
    }
    true
}

/// `(device, inode)`, the `map_files` name (`<start>-<end>` in lower-case hex without leading
/// zeros) and the path of one `maps` line
/// (`7f3a… r--s 00000000 fd:01 1234567   /models/x.safetensors`); `None` for anonymous mappings.
fn parse_maps_line(line: &str) -> Option<((u64, u64), String, &str)> {
    let line = line.trim_end_matches('\n');
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let (start, end) = range.split_once('-')?;
    let range = format!(
        "{:x}-{:x}",
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?
    );
    let _perms = fields.next()?;
    let _offset = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode: u64 = fields.next()?.parse().ok()?;
    if inode == 0 {
        return None;
    }
    let path = fields.next().unwrap_or("").trim_start();
    let dev = makedev(
        u64::from_str_radix(major, 16).ok()?,
        u64::from_str_radix(minor, 16).ok()?,
    );
    Some(((dev, inode), range, path))
}

/// Descriptor link targets that are never weight files.
fn never_weights(target: &[u8]) -> bool {
    !target.starts_with(b"/")
        || target.starts_with(b"/dev/")
        || target.starts_with(b"/proc/")
        || target.starts_with(b"/sys/")
}

/// Calls `hit(key, descriptor path, target)` for each descriptor on a file. False when the `fd`
/// directory could not be listed.
fn scan_fds(dir: &Path, mut hit: impl FnMut((u64, u64), &Path, &[u8])) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    for entry in entries.take(MAX_FDS_PER_PROCESS).flatten() {
        let fd = entry.path();
        let Ok(target) = fs::read_link(&fd) else {
            continue;
        };
        let target = target.as_os_str().as_bytes();
        if never_weights(target) {
            continue;
        }
        // metadata() follows the magic link to the open file itself, even a deleted one.
        if let Ok(meta) = fs::metadata(&fd)
            && meta.is_file()
        {
            hit((meta.dev(), meta.ino()), &fd, target);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    fn key_of(path: &Path) -> (u64, u64) {
        let m = fs::metadata(path).expect("stat");
        (m.dev(), m.ino())
    }

    fn weight_file(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, vec![7u8; 4 * 4096]).expect("write");
        path
    }

    fn users_of(path: &Path) -> Vec<FileUse> {
        let key = key_of(path);
        scan_users(Path::new("/proc"), &HashSet::from([key]))
            .remove(&key)
            .unwrap_or_default()
    }

    /// Kills and reaps the mapping child even when an assertion fails.
    struct KillOnDrop(Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    const MAP_AND_WAIT: &str = "import mmap,os,sys,time\n\
        f=open(sys.argv[1],'rb')\n\
        m=mmap.mmap(f.fileno(),0,access=mmap.ACCESS_READ)\n\
        print('ready',os.getpid(),flush=True)\n\
        time.sleep(30)\n";

    #[test]
    fn a_child_that_maps_the_file_is_found_until_it_exits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = weight_file(dir.path(), "model.safetensors");
        let spawned = Command::new("python3")
            .arg("-c")
            .arg(MAP_AND_WAIT)
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::skipped::record(
                    "collect::weights::users::a_child_that_maps_the_file_is_found_until_it_exits",
                    "no python3",
                );
                return;
            }
            Err(e) => panic!("spawn python3: {e}"),
        };
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().expect("stdout");
        let mut ready = String::new();
        BufReader::new(stdout).read_line(&mut ready).expect("read");
        if !ready.starts_with("ready") {
            let mut err = String::new();
            if let Some(mut e) = child.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("python3 did not map the file: {ready:?} {err}");
        }
        let pid: u32 = ready
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("pid");
        // pyenv-style shims exec the interpreter, so this is the child itself.
        assert_eq!(pid, child.0.id());

        let users = users_of(&path);
        assert!(
            users.contains(&FileUse {
                pid,
                mapped: true,
                open: true
            }),
            "{users:?}"
        );

        drop(child); // kill and reap
        let users = users_of(&path);
        assert!(users.iter().all(|u| u.pid != pid), "{users:?}");
    }

    #[test]
    fn a_file_this_process_holds_open_is_open_but_not_mapped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = weight_file(dir.path(), "open.gguf");
        let _held = fs::File::open(&path).expect("open");
        let users = users_of(&path);
        assert_eq!(
            users,
            vec![FileUse {
                pid: std::process::id(),
                mapped: false,
                open: true
            }]
        );
    }

    #[test]
    fn a_file_nobody_uses_is_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = weight_file(dir.path(), "idle.bin");
        let key = key_of(&path);
        let found = scan_users(Path::new("/proc"), &HashSet::from([key]));
        assert!(!found.contains_key(&key), "{found:?}");
    }

    #[test]
    fn maps_are_matched_by_hex_device_and_inode_even_when_deleted() {
        let proc_root = tempfile::tempdir().expect("tempdir");
        let dir = proc_root.path().join("4242");
        fs::create_dir_all(dir.join("fd")).expect("mkdir");
        fs::write(
            dir.join("maps"),
            "55d0c0000000-55d0c0001000 r--p 00000000 fd:01 131 /usr/bin/python3\n\
             7f0000000000-7f0000400000 r--s 00000000 fd:01 1234567 /models/a.safetensors (deleted)\n\
             7f0000400000-7f0000800000 r--s 00400000 103:12 99 /other\n\
             7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n",
        )
        .expect("maps");
        // A process without permission to read: no maps file, no fd listing.
        fs::create_dir_all(proc_root.path().join("17")).expect("mkdir");
        fs::create_dir_all(proc_root.path().join("self")).expect("mkdir");

        let a = (makedev(0xfd, 1), 1_234_567);
        let b = (makedev(0x103, 0x12), 99);
        let unused = (makedev(0xfd, 1), 5);
        let found = scan_users(proc_root.path(), &HashSet::from([a, b, unused]));
        let mapped = vec![FileUse {
            pid: 4242,
            mapped: true,
            open: false,
        }];
        assert_eq!(found.get(&a), Some(&mapped));
        assert_eq!(found.get(&b), Some(&mapped));
        assert!(!found.contains_key(&unused));
    }

    #[test]
    fn maps_lines_give_key_map_files_name_and_path() {
        let (key, range, path) = parse_maps_line(
            "00400000-0040b000 r--s 00000000 fd:01 1234567                    /m/a b.gguf (deleted)\n",
        )
        .expect("a file mapping");
        assert_eq!(key, (makedev(0xfd, 1), 1_234_567));
        assert_eq!(range, "400000-40b000");
        assert_eq!(path, "/m/a b.gguf (deleted)");
        assert_eq!(
            undeleted(path.as_bytes()),
            (PathBuf::from("/m/a b.gguf"), true)
        );
        assert!(parse_maps_line("7ffd0-7ffd1 rw-p 00000000 00:00 0 [stack]\n").is_none());
    }

    #[test]
    fn a_file_outside_every_root_is_a_candidate_with_a_handle_that_opens_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = weight_file(dir.path(), "outside.safetensors");
        let held = fs::File::open(&path).expect("open");
        let key = key_of(&path);
        let found = scan_processes(Path::new("/proc"), &|k| {
            if k == key {
                Interest::Candidate
            } else {
                Interest::Ignore
            }
        });
        let s = found
            .sightings
            .get(&key)
            .expect("seen through our descriptor");
        assert_eq!(s.pid, std::process::id());
        assert_eq!(s.path, path);
        assert!(s.via_fd && !s.deleted);
        assert_eq!(key_of(&s.handle), key, "the handle opens the very file");
        assert!(found.seen.contains(&key));
        drop(held);
    }

    #[test]
    fn descriptors_are_followed_to_the_file_they_point_at() {
        let files = tempfile::tempdir().expect("tempdir");
        let path = weight_file(files.path(), "w.bin");
        let proc_root = tempfile::tempdir().expect("tempdir");
        for pid in ["30", "4"] {
            let fd = proc_root.path().join(pid).join("fd");
            fs::create_dir_all(&fd).expect("mkdir");
            std::os::unix::fs::symlink(&path, fd.join("3")).expect("symlink");
            std::os::unix::fs::symlink("/nonexistent", fd.join("4")).expect("symlink");
        }
        let key = key_of(&path);
        let found = scan_users(proc_root.path(), &HashSet::from([key]));
        let pids: Vec<(u32, bool, bool)> = found[&key]
            .iter()
            .map(|u| (u.pid, u.mapped, u.open))
            .collect();
        assert_eq!(pids, vec![(4, false, true), (30, false, true)]);
    }

    #[test]
    fn one_scan_over_the_real_proc_reports_its_cost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = weight_file(dir.path(), "cost.bin");
        let wanted: HashSet<(u64, u64)> = (0..1000u64)
            .map(|i| (1, i))
            .chain([key_of(&path)])
            .collect();
        let processes = fs::read_dir("/proc")
            .expect("proc")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            })
            .count();
        let started = Instant::now();
        let found = scan_users(Path::new("/proc"), &wanted);
        let took = started.elapsed();
        eprintln!(
            "scan_users: {processes} processes, {} wanted files, {} in use: {took:?}",
            wanted.len(),
            found.len()
        );
        assert!(!found.contains_key(&key_of(&path)));
    }
}
