//! Who uses each weight file: the processes that have it memory-mapped (`/proc/<pid>/maps`) or
//! open (`/proc/<pid>/fd/*`), so that a model can be linked to the GPUs those processes run on.
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
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

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
    let mut found: HashMap<(u64, u64), Vec<FileUse>> = HashMap::new();
    if wanted.is_empty() {
        return found;
    }
    let Ok(dir) = fs::read_dir(proc_root) else {
        tracing::warn!(proc_root = %proc_root.display(), "cannot list processes");
        return found;
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();

    let mut line = String::new();
    let mut unreadable = 0usize;
    for &pid in &pids {
        let base = proc_root.join(pid.to_string());
        let mut uses: BTreeMap<(u64, u64), FileUse> = BTreeMap::new();
        let new_use = || FileUse {
            pid,
            mapped: false,
            open: false,
        };
        let maps_ok = scan_maps(&base.join("maps"), wanted, &mut line, |key| {
            uses.entry(key).or_insert_with(new_use).mapped = true;
        });
        let fds_ok = scan_fds(&base.join("fd"), wanted, |key| {
            uses.entry(key).or_insert_with(new_use).open = true;
        });
        if !maps_ok && !fds_ok {
            unreadable += 1;
        }
        for (key, u) in uses {
            // Pids are visited in ascending order, so each list stays sorted.
            found.entry(key).or_default().push(u);
        }
    }
    tracing::debug!(
        processes = pids.len(),
        unreadable,
        files_in_use = found.len(),
        "weight file users scanned"
    );
    found
}

/// Calls `hit` for each mapping of a wanted file. False when `maps` could not be opened (the
/// process is gone or not ours to read).
fn scan_maps(
    path: &Path,
    wanted: &HashSet<(u64, u64)>,
    line: &mut String,
    mut hit: impl FnMut((u64, u64)),
) -> bool {
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    let mut reader = BufReader::new(file);
    loop {
        line.clear();
        match reader.read_line(line) {
            Ok(0) | Err(_) => break, // end, or the process exited mid-read
            Ok(_) => {}
        }
        if let Some(key) = parse_maps_line(line)
            && wanted.contains(&key)
        {
            hit(key);
        }
    }
    true
}

/// `(device, inode)` of one `maps` line
/// (`7f3a… r--s 00000000 fd:01 1234567   /models/x.safetensors`); `None` for anonymous mappings.
fn parse_maps_line(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_ascii_whitespace().skip(3);
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode: u64 = fields.next()?.parse().ok()?;
    if inode == 0 {
        return None;
    }
    let dev = makedev(
        u64::from_str_radix(major, 16).ok()?,
        u64::from_str_radix(minor, 16).ok()?,
    );
    Some((dev, inode))
}

/// Calls `hit` for each descriptor on a wanted file. False when the `fd` directory could not be
/// listed.
fn scan_fds(dir: &Path, wanted: &HashSet<(u64, u64)>, mut hit: impl FnMut((u64, u64))) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    for entry in entries.take(MAX_FDS_PER_PROCESS).flatten() {
        // metadata() follows the magic link to the open file itself, even a deleted one.
        if let Ok(meta) = fs::metadata(entry.path()) {
            let key = (meta.dev(), meta.ino());
            if wanted.contains(&key) {
                hit(key);
            }
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
