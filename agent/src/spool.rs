//! Durable outbound queue: reports wait here, on disk, until the collector acknowledges them.
//!
//! # Layout and format
//!
//! The spool directory (mode 0700) holds `state.json` and segment files
//! `seg-<first seq as 20 digits>.log`; only the newest segment is appended to. A record is
//! `[u32 LE payload_len][u32 LE crc32(seq LE bytes ++ payload)][u64 LE seq][payload]`.
//! `state.json` holds `version` (1), `epoch` (Unix ms when the spool was created), `head_seq`
//! (first seq neither acknowledged nor dropped), `pending_gaps` and `dropped_total`. The next seq
//! is the largest of `head_seq`, last record seq + 1 and last pending gap seq + 1, so seqs
//! persist across restarts for as long as the directory does.
//!
//! # Crash safety
//!
//! - `append` returns only after `sync_data` of the record (and, for a new segment, an fsync of
//!   the directory naming it): every seq handed out is on disk. A crash mid-write leaves an
//!   incomplete record at the tail of the newest segment; `open` truncates it and reuses its
//!   seq, which is harmless because that `append` never returned.
//! - `state.json` is replaced atomically: write `state.json.tmp`, fsync, rename, fsync the dir.
//! - An ack is saved to `state.json` lazily: at once when it frees a segment (before the unlink),
//!   when another change (a gap) is saved, when [`ACK_SAVE_INTERVAL`] has passed since the
//!   first unsaved one, at [`Spool::flush`] and when the spool is dropped. A crash loses at most
//!   that long of acknowledgements: those reports (and the gaps they carried) are sent again
//!   and the collector answers them as duplicates (it keys reports and gaps by epoch and seq).
//!   Saving every ack was two `fsync`s and a rename per report, most of the spool's cost.
//! - The newest segment is appended to until it is full, even once every report in it is
//!   acknowledged (deleting it made a new file and a directory `fsync` per report); older
//!   segments are deleted once wholly acknowledged, and `open` deletes a newest one that is;
//!   on a full disk an append deletes it too, before giving up.
//! - Drop (spool full) and ack persist the new `head_seq` and gaps *before* unlinking a segment;
//!   a crash in between leaves a segment entirely below `head_seq`, which `open` deletes (so the
//!   unlink needs no directory fsync).
//! - A drop (spool full) that takes the report on its way to a collector (the last one `peek`
//!   returned) does not count it lost yet: `state.json` keeps it as `gone_in_flight`, cleared by
//!   its ack (it was delivered: no gap, `dropped_total` unchanged, saved at once) and made a gap
//!   when it is peeked past, skipped, or found at `open` (its ack never came). Counting it at the
//!   drop made the collector hold the report *and* a gap over it, and the agent's counter one
//!   loss too many, which no later ack could take back from a Prometheus counter.
//!
//! # Departures from the first design, and why
//!
//! - A damaged record does not end its segment: `open` re-synchronises on the next record whose
//!   seq range and crc check out. Truncating at the damage would lose good records and, in the
//!   newest segment, would hand out again the seqs of complete records that `append` had
//!   already returned (duplicates). Only an incomplete or zero-filled tail of the newest segment
//!   is a torn write; a complete record with a bad crc there is counted as lost (Corrupt gap,
//!   seq consumed): at worst a spurious gap, never a duplicate. Residual risk: damage to the
//!   length field of the very last record can make it look torn.
//! - A new gap covers only seqs that no pending gap covers, and extends an adjacent pending gap
//!   of the same reason, so pending gaps are disjoint.
//! - A record found damaged by `peek` becomes a Corrupt gap and `peek` moves on.
//! - `skip(seq, kind, detail)` gives up on a report the collector refuses (recorded as a gap).
//! - Segment files without `state.json`, and an ack of a seq never assigned, are errors.
//! - A report carries only the pending gaps that lie wholly before its own seq
//!   ([`Spool::gaps_for`], at most [`MAX_GAPS_PER_REPORT`]), and its ack clears exactly those
//!   ([`Spool::ack_carrying`]). Attaching a gap of a later seq (damage found further on at
//!   open) made the collector refuse the report, which was then given up as another gap: two
//!   damaged records cost six seqs. A gap after the report waits for a later one.
//!
//! # One agent per spool
//!
//! `open` takes an exclusive `flock` on `<dir>/lock` (and writes its pid there) and holds it
//! until the spool is dropped: a second agent on the same directory is refused with
//! [`SpoolError::Locked`], naming the holder's pid. Two agents sharing a spool would hand out
//! the same seqs twice.
//!
//! # A full disk
//!
//! The spool keeps a small reserve file (`reserve`, [`RESERVE_BYTES`]). When the disk is so
//! full that `state.json` cannot be written (every ack and drop needs that), the reserve is
//! deleted and the write tried again, so that acks still go through and, once a segment is
//! wholly acknowledged, free its space. `append` makes the reserve again before it writes, and
//! refuses the report ([`SpoolError::DiskFull`]) while it cannot: new reports never eat the
//! room the acks need. Without this, a spool that filled its disk could never acknowledge
//! anything again (measured: the `spool_full` test's agent hit it whenever the disk filled to
//! its last page, and its sender stopped for good).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sov_common::clock::now_unix_ms;
use tracing::{debug, warn};

/// Longest time an acknowledgement stays only in memory (see the crash-safety notes above).
pub const ACK_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Default bound on the bytes of all segment files.
pub const DEFAULT_MAX_SPOOL_BYTES: u64 = 64 * 1024 * 1024;
/// Most gap records attached to one report (the collector accepts 10,000).
pub const MAX_GAPS_PER_REPORT: usize = 1000;
/// Bytes kept free in the reserve file for `state.json` on a full disk.
pub const RESERVE_BYTES: usize = 32 * 1024;
/// Name of the lock file inside the spool directory.
pub const LOCK_FILE: &str = "lock";
/// Longest `detail` kept on a gap.
const MAX_GAP_DETAIL_BYTES: usize = 512;
const RESERVE_FILE: &str = "reserve";

const STATE_FILE: &str = "state.json";
const STATE_TMP_FILE: &str = "state.json.tmp";
const STATE_VERSION: u64 = 1;
const HEADER_BYTES: usize = 16;
const MIN_SEGMENT_BYTES: u64 = 4 * 1024;
const MAX_SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// Largest seq step accepted for the first record after damage in the newest segment.
const MAX_SEQ_JUMP: u64 = 1 << 32;

/// Why a range of seqs will never be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GapKind {
    /// Dropped, oldest first, to keep the spool under `max_spool_bytes`.
    SpoolFull,
    /// Lost to on-disk damage (failed checksum, truncated record).
    Corrupt,
    /// A single report larger than the whole spool.
    TooLarge,
    /// The collector refused the report even with every optional item withheld.
    Refused,
}

/// Seqs `first_seq..=last_seq` that the collector will never receive, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GapRange {
    pub first_seq: u64,
    pub last_seq: u64,
    pub reason: GapKind,
    pub dropped_unix_ms: i64,
    /// Why, in words, when the reason alone does not say (the collector's refusal message).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// One spooled report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// What `append` did: the seq is consumed either way; `stored` is false for a `TooLarge` gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub seq: u64,
    pub stored: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Bytes of all segment files.
    pub bytes: u64,
    /// Records waiting for an ack.
    pub reports: u64,
    /// Seqs recorded as gaps since the spool was created.
    pub dropped_total: u64,
    pub head_seq: u64,
    pub next_seq: u64,
    pub epoch: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot {op} {}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "damaged spool state {}: restore it, or delete the whole spool directory to start a new \
         epoch (its unsent reports are then lost)",
        .path.display()
    )]
    DamagedState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("spool state {} has unsupported version {version}", .path.display())]
    UnsupportedVersion { path: PathBuf, version: u64 },
    #[error(
        "spool directory {} has segment files but no state.json: restore it, or delete the \
         directory to start a new epoch",
        .dir.display()
    )]
    MissingState { dir: PathBuf },
    #[error("ack of seq {seq} that was never assigned (next seq is {next_seq})")]
    AckBeyondNext { seq: u64, next_seq: u64 },
    #[error("spool {} is in an unknown state after a failed write; reopen it", .dir.display())]
    Broken { dir: PathBuf },
    #[error(
        "spool directory {} is in use by another agent ({holder}): two agents must not share a \
         spool_dir; stop that one, or give this one its own spool_dir",
        .dir.display()
    )]
    Locked { dir: PathBuf, holder: String },
    #[error(
        "the disk under the spool {} is full: the report is not written, to keep {RESERVE_BYTES} \
         bytes for acknowledgements",
        .dir.display()
    )]
    DiskFull { dir: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    version: u64,
    epoch: u64,
    head_seq: u64,
    pending_gaps: Vec<GapRange>,
    dropped_total: u64,
    /// The report whose bytes a full spool dropped while it was on its way to a collector:
    /// delivered if its ack comes, a gap when it is peeked past, skipped or found at open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gone_in_flight: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    seq: u64,
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    bytes: u64,
    records: Vec<Loc>,
}

impl Segment {
    fn last_seq(&self) -> Option<u64> {
        self.records.last().map(|l| l.seq)
    }

    fn first_unacked(&self, head: u64) -> usize {
        self.records.partition_point(|l| l.seq < head)
    }
}

/// The agent's durable outbound queue (see the module doc for format and crash safety).
///
/// Caller contract: `peek` the oldest report, send it with `pending_gaps()` attached, and call
/// `ack(seq)` once the collector acknowledges it; ack clears the gaps below `seq`. A gap may
/// cover a report that was in flight when it was dropped: the collector should let a stored
/// report win over a gap. Blocking file IO; use from one thread at a time.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    state: State,
    segments: VecDeque<Segment>,
    /// Append handle of `segments.back()`; `Some` exactly when `segments` is not empty.
    active: Option<File>,
    total_bytes: u64,
    next_seq: u64,
    broken: bool,
    /// Since when `state` holds acknowledgements not yet in `state.json`.
    unsaved_since: Option<std::time::Instant>,
    /// The seq the last `peek` returned, until it is acknowledged or skipped.
    in_flight: Option<u64>,
    /// Holds the exclusive lock on `<dir>/lock` for as long as the spool is open.
    _lock: File,
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            warn!(dir = %self.dir.display(), error = %e, "cannot save the latest acks; those reports will be sent again");
        }
    }
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, bounded by `max_bytes` of segment files,
    /// and recovers from torn writes and damaged records.
    pub fn open(dir: impl AsRef<Path>, max_bytes: u64) -> Result<Self, SpoolError> {
        let dir = dir.as_ref().to_path_buf();
        create_dir(&dir)?;
        let lock = lock_dir(&dir)?;
        let tmp = dir.join(STATE_TMP_FILE);
        match fs::remove_file(&tmp) {
            Ok(()) => debug!(path = %tmp.display(), "removed leftover spool state"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &tmp)(e)),
        }
        let names = list_segments(&dir)?;
        let state_path = dir.join(STATE_FILE);
        let state = match fs::read(&state_path) {
            Ok(bytes) => parse_state(&state_path, &bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !names.is_empty() {
                    return Err(SpoolError::MissingState { dir });
                }
                let epoch = u64::try_from(now_unix_ms()).unwrap_or(0).max(1);
                let state = State {
                    version: STATE_VERSION,
                    epoch,
                    head_seq: 1,
                    pending_gaps: Vec::new(),
                    dropped_total: 0,
                    gone_in_flight: None,
                };
                write_state(&dir, &state)?;
                state
            }
            Err(e) => return Err(io_err("read", &state_path)(e)),
        };
        let mut spool = Spool {
            dir,
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES),
            next_seq: state.head_seq,
            state,
            segments: VecDeque::new(),
            active: None,
            total_bytes: 0,
            broken: false,
            unsaved_since: None,
            in_flight: None,
            _lock: lock,
        };
        spool.recover(names)?;
        ensure_reserve(&spool.dir);
        Ok(spool)
    }

    fn recover(&mut self, names: Vec<(u64, PathBuf)>) -> Result<(), SpoolError> {
        let head = self.state.head_seq;
        let mut found = Vec::new();
        let mut lost_tail = None;
        for (i, (first_seq, path)) in names.iter().enumerate() {
            let upper = names.get(i + 1).map(|(f, _)| *f);
            if upper.is_some_and(|u| u <= head) {
                fs::remove_file(path).map_err(io_err("remove", path))?;
                continue;
            }
            let data = fs::read(path).map_err(io_err("read", path))?;
            let scan = scan_segment(&data, *first_seq, upper);
            if scan.resynced > 0 {
                warn!(path = %path.display(), regions = scan.resynced, "skipped damaged spool records");
            }
            match scan.tail {
                Tail::Clean => {}
                Tail::Torn if upper.is_none() => {
                    warn!(path = %path.display(), offset = scan.keep_len, "truncating torn last write");
                }
                Tail::Torn | Tail::Damaged(_) => {
                    warn!(path = %path.display(), offset = scan.keep_len, "truncating damaged spool records");
                }
            }
            if let (None, Tail::Damaged(seq)) = (upper, scan.tail) {
                lost_tail = Some(seq);
            }
            let segment = Segment {
                path: path.clone(),
                bytes: scan.keep_len as u64,
                records: scan.records,
            };
            found.push((segment, data.len() as u64));
        }

        // Every seq from head_seq on has a record or a pending gap; anything else was damaged.
        let mut state = self.state.clone();
        let mut expected = head;
        // On its way when its bytes went, and its ack never came before the agent stopped.
        let mut added = state.settle_gone_in_flight(GapKind::SpoolFull, "");
        for loc in found
            .iter()
            .flat_map(|(s, _)| &s.records)
            .filter(|l| l.seq >= head)
        {
            if loc.seq > expected {
                added += state.add_gap(expected, loc.seq - 1, GapKind::Corrupt, "");
            }
            expected = loc.seq + 1;
        }
        if let Some(lost) = lost_tail.filter(|&l| l >= expected) {
            added += state.add_gap(expected, lost, GapKind::Corrupt, "");
            expected = lost + 1;
        }
        if added > 0 {
            warn!(dir = %self.dir.display(), seqs = added, "spool records lost to damage");
            self.commit(state)?;
        }
        let after_gaps = self.state.pending_gaps.iter().map(|g| g.last_seq + 1).max();
        self.next_seq = expected.max(head).max(after_gaps.unwrap_or(0));

        // Only now that the gaps are durable may damaged bytes and acked segments go.
        for (segment, file_len) in found {
            if segment.last_seq().is_none_or(|l| l < head) {
                fs::remove_file(&segment.path).map_err(io_err("remove", &segment.path))?;
                continue;
            }
            if segment.bytes < file_len {
                let truncate = |f: File| f.set_len(segment.bytes).and_then(|()| f.sync_all());
                OpenOptions::new()
                    .write(true)
                    .open(&segment.path)
                    .and_then(truncate)
                    .map_err(io_err("truncate", &segment.path))?;
            }
            self.total_bytes += segment.bytes;
            self.segments.push_back(segment);
        }
        if let Some(segment) = self.segments.back() {
            let file = OpenOptions::new().append(true).open(&segment.path);
            self.active = Some(file.map_err(io_err("open", &segment.path))?);
        }
        Ok(())
    }

    /// Assigns the next seq and stores `payload` durably under it, dropping the oldest segments
    /// when the spool would exceed its bound.
    pub fn append(&mut self, payload: &[u8]) -> Result<AppendOutcome, SpoolError> {
        self.check_usable()?;
        // On a full disk the newest segment's acknowledged reports are room to make.
        let room =
            ensure_reserve(&self.dir) || (self.free_acknowledged()? && ensure_reserve(&self.dir));
        if !room {
            return Err(SpoolError::DiskFull {
                dir: self.dir.clone(),
            });
        }
        let seq = self.next_seq;
        let record_bytes = (HEADER_BYTES + payload.len()) as u64;
        let Ok(len) = u32::try_from(payload.len()) else {
            return self.append_too_large(seq, payload.len());
        };
        if record_bytes > self.max_bytes {
            return self.append_too_large(seq, payload.len());
        }
        while self.total_bytes + record_bytes > self.max_bytes && !self.segments.is_empty() {
            self.drop_oldest()?;
        }
        let roll = match self.segments.back() {
            None => true,
            Some(s) => s.bytes > 0 && s.bytes + record_bytes > self.segment_bytes,
        };
        if roll {
            self.start_segment(seq)?;
        }
        let (Some(segment), Some(file)) = (self.segments.back_mut(), self.active.as_mut()) else {
            return Err(SpoolError::Broken {
                dir: self.dir.clone(),
            });
        };
        let mut buf = Vec::with_capacity(HEADER_BYTES + payload.len());
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&checksum(seq, payload).to_le_bytes());
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(payload);
        let offset = segment.bytes;
        if let Err(e) = file.write_all(&buf).and_then(|()| file.sync_data()) {
            if let Err(undo) = file.set_len(offset).and_then(|()| file.sync_data()) {
                warn!(path = %segment.path.display(), error = %undo, "cannot undo failed spool write");
                self.broken = true;
            }
            let err = io_err("append to", &segment.path)(e);
            if !self.broken
                && let SpoolError::Io { source, .. } = &err
                && source.kind() == io::ErrorKind::StorageFull
            {
                // The next append finds the room the acknowledged reports held.
                let _ = self.free_acknowledged();
            }
            return Err(err);
        }
        segment.bytes += record_bytes;
        segment.records.push(Loc { seq, offset, len });
        self.total_bytes += record_bytes;
        self.next_seq += 1;
        Ok(AppendOutcome { seq, stored: true })
    }

    fn append_too_large(&mut self, seq: u64, len: usize) -> Result<AppendOutcome, SpoolError> {
        let mut state = self.state.clone();
        state.add_gap(seq, seq, GapKind::TooLarge, "");
        self.commit(state)?;
        self.next_seq += 1;
        warn!(
            seq,
            bytes = len,
            max_bytes = self.max_bytes,
            "report larger than the spool dropped"
        );
        Ok(AppendOutcome { seq, stored: false })
    }

    fn start_segment(&mut self, first_seq: u64) -> Result<(), SpoolError> {
        let path = self.dir.join(format!("seg-{first_seq:020}.log"));
        let file = OpenOptions::new().append(true).create_new(true).open(&path);
        let file = file.map_err(io_err("create", &path))?;
        sync_dir(&self.dir)?;
        self.segments.push_back(Segment {
            path,
            bytes: 0,
            records: Vec::new(),
        });
        self.active = Some(file);
        Ok(())
    }

    fn drop_oldest(&mut self) -> Result<(), SpoolError> {
        let head = self.state.head_seq;
        let last = self.segments.front().and_then(Segment::last_seq);
        if let Some(last) = last.filter(|&l| l >= head) {
            let mut state = self.state.clone();
            // The report on its way may still be acknowledged: a gap only if it is not.
            let on_its_way = self.in_flight.take().filter(|s| (head..=last).contains(s));
            let mut dropped = 0;
            match on_its_way {
                Some(sent) => {
                    if sent > head {
                        dropped += state.add_gap(head, sent - 1, GapKind::SpoolFull, "");
                    }
                    if sent < last {
                        dropped += state.add_gap(sent + 1, last, GapKind::SpoolFull, "");
                    }
                    state.gone_in_flight = Some(sent);
                }
                None => dropped = state.add_gap(head, last, GapKind::SpoolFull, ""),
            }
            state.head_seq = last + 1;
            self.commit(state)?;
            warn!(
                first_seq = head,
                last_seq = last,
                dropped,
                "spool full, dropped oldest reports"
            );
        }
        self.remove_front()
    }

    fn remove_front(&mut self) -> Result<(), SpoolError> {
        if let Some(segment) = self.segments.front() {
            fs::remove_file(&segment.path).map_err(io_err("remove", &segment.path))?;
            self.total_bytes -= segment.bytes;
            self.segments.pop_front();
            if self.segments.is_empty() {
                self.active = None;
            }
        }
        Ok(())
    }

    /// The oldest report not yet acknowledged, read from disk.
    pub fn peek(&mut self) -> Result<Option<Record>, SpoolError> {
        self.check_usable()?;
        if self.state.gone_in_flight.is_some() {
            // Peeked again without its ack: the report whose bytes went is lost.
            let mut state = self.state.clone();
            state.settle_gone_in_flight(GapKind::SpoolFull, "");
            self.commit(state)?;
        }
        let head = self.state.head_seq;
        loop {
            let found = self.segments.iter().enumerate().find_map(|(i, s)| {
                let r = s.first_unacked(head);
                (r < s.records.len()).then_some((i, r))
            });
            let Some((si, ri)) = found else {
                return Ok(None);
            };
            let segment = &self.segments[si];
            let loc = segment.records[ri];
            if let Some(payload) = read_record(&segment.path, loc)? {
                self.in_flight = Some(loc.seq);
                return Ok(Some(Record {
                    seq: loc.seq,
                    payload,
                }));
            }
            warn!(path = %segment.path.display(), seq = loc.seq, "spool record damaged since open");
            let mut state = self.state.clone();
            state.add_gap(loc.seq, loc.seq, GapKind::Corrupt, "");
            self.commit(state)?;
            self.segments[si].records.remove(ri);
        }
    }

    /// The pending gaps a report with `seq` carries: those wholly before `seq` (a collector
    /// refuses a gap at or after the report's own seq), oldest first, at most
    /// [`MAX_GAPS_PER_REPORT`]. The rest wait for a later report.
    pub fn gaps_for(&self, seq: u64) -> Vec<GapRange> {
        self.state
            .pending_gaps
            .iter()
            .filter(|g| g.last_seq < seq)
            .take(MAX_GAPS_PER_REPORT)
            .cloned()
            .collect()
    }

    /// [`Spool::ack_carrying`] with the gaps [`Spool::gaps_for`] gives for `seq` now.
    pub fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
        let carried = self.gaps_for(seq);
        self.ack_carrying(seq, &carried)
    }

    /// Marks every seq up to `seq` delivered, clears the `carried` gaps (they went out with
    /// that report; only the seqs they cover, so a gap extended since is kept for the rest) and
    /// deletes the segments that hold nothing newer.
    pub fn ack_carrying(&mut self, seq: u64, carried: &[GapRange]) -> Result<(), SpoolError> {
        self.check_usable()?;
        if seq >= self.next_seq {
            return Err(SpoolError::AckBeyondNext {
                seq,
                next_seq: self.next_seq,
            });
        }
        let mut state = self.state.clone();
        state.head_seq = state.head_seq.max(seq + 1);
        for c in carried {
            state.remove_range(c.first_seq, c.last_seq);
        }
        // Its bytes went with a full spool's oldest segment while it was on its way: delivered
        // after all, neither a gap to declare nor a loss to count.
        let delivered_after_drop = state.gone_in_flight == Some(seq);
        if delivered_after_drop {
            state.gone_in_flight = None;
        }
        self.in_flight = None;
        if state != self.state {
            let frees_segment = self.segments.len() > 1
                && self
                    .segments
                    .front()
                    .is_some_and(|s| s.last_seq().is_none_or(|l| l < state.head_seq));
            let overdue = self
                .unsaved_since
                .is_some_and(|t| t.elapsed() >= ACK_SAVE_INTERVAL);
            if frees_segment || overdue || delivered_after_drop {
                self.commit(state)?;
            } else {
                // Saved later (crash-safety notes above): a lost ack only sends a report again.
                self.state = state;
                self.unsaved_since
                    .get_or_insert_with(std::time::Instant::now);
            }
        }
        self.remove_delivered()
    }

    /// Deletes every wholly acknowledged segment, the newest too (a full disk needs its room);
    /// true when one was deleted.
    fn free_acknowledged(&mut self) -> Result<bool, SpoolError> {
        let head = self.state.head_seq;
        let wholly = |s: &Segment| s.last_seq().is_none_or(|l| l < head);
        if !self.segments.front().is_some_and(wholly) {
            return Ok(false);
        }
        // `head_seq` on disk before any unlink (crash-safety notes above).
        self.flush()?;
        while self.segments.front().is_some_and(wholly) {
            self.remove_front()?;
        }
        Ok(true)
    }

    /// Saves acknowledgements kept only in memory (see the crash-safety notes above).
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        if self.unsaved_since.is_some() && !self.broken {
            write_state(&self.dir, &self.state)?;
            self.unsaved_since = None;
        }
        Ok(())
    }

    /// Gives up on every seq up to `seq` not yet acknowledged (normally the report that `peek`
    /// returned and the collector refused): records them as a gap of `kind` (with `detail`, the
    /// collector's words) and moves past them. Unlike `ack` it clears no pending gap, since no
    /// report carried them.
    pub fn skip(&mut self, seq: u64, kind: GapKind, detail: &str) -> Result<(), SpoolError> {
        self.check_usable()?;
        if seq >= self.next_seq {
            return Err(SpoolError::AckBeyondNext {
                seq,
                next_seq: self.next_seq,
            });
        }
        let mut state = self.state.clone();
        self.in_flight = None;
        if state.gone_in_flight.is_some_and(|gone| gone <= seq) {
            state.settle_gone_in_flight(kind, detail);
        }
        let head = self.state.head_seq;
        if seq < head {
            return if state == self.state {
                Ok(())
            } else {
                self.commit(state)
            };
        }
        state.add_gap(head, seq, kind, detail);
        state.head_seq = seq + 1;
        self.commit(state)?;
        warn!(first_seq = head, last_seq = seq, reason = ?kind, "spooled reports given up");
        self.remove_delivered()
    }

    /// Deletes the segments wholly acknowledged, except the newest: appends go on into it
    /// until it is full (deleting it at every ack made a new file, and two directory
    /// `fsync`s, per report).
    fn remove_delivered(&mut self) -> Result<(), SpoolError> {
        let head = self.state.head_seq;
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|s| s.last_seq().is_none_or(|l| l < head))
        {
            self.remove_front()?;
        }
        Ok(())
    }

    pub fn pending_gaps(&self) -> &[GapRange] {
        &self.state.pending_gaps
    }

    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    pub fn stats(&self) -> SpoolStats {
        let head = self.state.head_seq;
        let reports = self
            .segments
            .iter()
            .map(|s| s.records.len() - s.first_unacked(head))
            .sum::<usize>();
        SpoolStats {
            bytes: self.total_bytes,
            reports: reports as u64,
            dropped_total: self.state.dropped_total,
            head_seq: head,
            next_seq: self.next_seq,
            epoch: self.state.epoch,
        }
    }

    fn check_usable(&self) -> Result<(), SpoolError> {
        if self.broken {
            return Err(SpoolError::Broken {
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Persists `state`, then makes it current; on error nothing changes in memory.
    fn commit(&mut self, state: State) -> Result<(), SpoolError> {
        write_state(&self.dir, &state)?;
        self.state = state;
        self.unsaved_since = None;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Tail {
    Clean,
    /// Incomplete or zero-filled: a write that never finished.
    Torn,
    /// A complete record that fails its check; holds the seq it most likely had.
    Damaged(u64),
}

#[derive(Debug)]
struct Scan {
    records: Vec<Loc>,
    keep_len: usize,
    resynced: usize,
    tail: Tail,
}

/// Reads the records of one segment; `upper` is the next segment's first seq.
fn scan_segment(data: &[u8], first_seq: u64, upper: Option<u64>) -> Scan {
    let mut records: Vec<Loc> = Vec::new();
    let mut resynced = 0;
    let mut pos = 0;
    while pos < data.len() {
        let min = records.last().map_or(first_seq, |l| l.seq + 1);
        let max = upper.map_or(min.saturating_add(MAX_SEQ_JUMP), |u| u.saturating_sub(1));
        if let Some(loc) = parse_at(data, pos, min, max) {
            records.push(loc);
            pos += HEADER_BYTES + loc.len as usize;
            continue;
        }
        if let Some(next) = (pos + 1..data.len()).find(|&p| parse_at(data, p, min, max).is_some()) {
            resynced += 1;
            pos = next;
            continue;
        }
        let rest = &data[pos..];
        let complete =
            rest.len() >= HEADER_BYTES && HEADER_BYTES + le_u32(&rest[0..4]) as usize <= rest.len();
        let tail = if !complete || rest.iter().all(|&b| b == 0) {
            Tail::Torn
        } else {
            let seq = le_u64(&rest[8..16]);
            Tail::Damaged(if (min..=max).contains(&seq) { seq } else { min })
        };
        return Scan {
            records,
            keep_len: pos,
            resynced,
            tail,
        };
    }
    Scan {
        records,
        keep_len: pos,
        resynced,
        tail: Tail::Clean,
    }
}

fn parse_at(data: &[u8], pos: usize, min_seq: u64, max_seq: u64) -> Option<Loc> {
    let header = data.get(pos..pos + HEADER_BYTES)?;
    let seq = le_u64(&header[8..16]);
    if seq < min_seq || seq > max_seq {
        return None;
    }
    let len = le_u32(&header[0..4]);
    let start = pos + HEADER_BYTES;
    let payload = data.get(start..start + len as usize)?;
    (checksum(seq, payload) == le_u32(&header[4..8])).then_some(Loc {
        seq,
        offset: pos as u64,
        len,
    })
}

/// The payload at `loc`, or `None` when the bytes there no longer check out.
fn read_record(path: &Path, loc: Loc) -> Result<Option<Vec<u8>>, SpoolError> {
    let mut buf = vec![0; HEADER_BYTES + loc.len as usize];
    let read = File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(loc.offset))?;
        f.read_exact(&mut buf)
    });
    match read {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(io_err("read", path)(e)),
    }
    Ok(parse_at(&buf, 0, loc.seq, loc.seq).map(|_| buf.split_off(HEADER_BYTES)))
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

impl State {
    /// Takes `first..=last` out of the pending gaps (a gap straddling the range keeps its parts
    /// outside it).
    fn remove_range(&mut self, first: u64, last: u64) {
        let mut kept = Vec::with_capacity(self.pending_gaps.len());
        for g in self.pending_gaps.drain(..) {
            if g.last_seq < first || g.first_seq > last {
                kept.push(g);
                continue;
            }
            if g.first_seq < first {
                kept.push(GapRange {
                    last_seq: first - 1,
                    ..g.clone()
                });
            }
            if g.last_seq > last {
                kept.push(GapRange {
                    first_seq: last + 1,
                    ..g
                });
            }
        }
        self.pending_gaps = kept;
    }

    /// Records the report on its way when a full spool dropped its bytes as a gap of `reason`
    /// (it was not acknowledged); returns how many seqs were added.
    fn settle_gone_in_flight(&mut self, reason: GapKind, detail: &str) -> u64 {
        match self.gone_in_flight.take() {
            Some(gone) => self.add_gap(gone, gone, reason, detail),
            None => 0,
        }
    }

    /// Records `first..=last` as a gap, except the seqs that a pending gap already covers, and
    /// counts them in `dropped_total`. Returns how many seqs were added.
    fn add_gap(&mut self, first: u64, last: u64, reason: GapKind, detail: &str) -> u64 {
        let mut covered: Vec<(u64, u64)> = self
            .pending_gaps
            .iter()
            .map(|g| (g.first_seq, g.last_seq))
            .collect();
        covered.sort_unstable();
        let mut missing = Vec::new();
        let mut cur = first;
        for (a, b) in covered {
            if a > last || cur > last {
                break;
            }
            if b >= cur && a > cur {
                missing.push((cur, a - 1));
            }
            cur = cur.max(b.saturating_add(1));
        }
        if cur <= last {
            missing.push((cur, last));
        }
        let now = now_unix_ms();
        let mut added = 0;
        for (a, b) in missing {
            added += b - a + 1;
            let gaps = &mut self.pending_gaps;
            match gaps.iter_mut().find(|g| {
                g.reason == reason && g.detail == detail && g.last_seq.checked_add(1) == Some(a)
            }) {
                Some(g) => g.last_seq = b,
                None => gaps.push(GapRange {
                    first_seq: a,
                    last_seq: b,
                    reason,
                    dropped_unix_ms: now,
                    detail: cut(detail, MAX_GAP_DETAIL_BYTES),
                }),
            }
        }
        self.pending_gaps.sort_by_key(|g| g.first_seq);
        self.dropped_total += added;
        added
    }
}

fn parse_state(path: &Path, bytes: &[u8]) -> Result<State, SpoolError> {
    #[derive(Deserialize)]
    struct Version {
        version: u64,
    }
    let damaged = |source| SpoolError::DamagedState {
        path: path.to_path_buf(),
        source,
    };
    let Version { version } = serde_json::from_slice(bytes).map_err(damaged)?;
    if version != STATE_VERSION {
        return Err(SpoolError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    serde_json::from_slice(bytes).map_err(damaged)
}

fn write_state(dir: &Path, state: &State) -> Result<(), SpoolError> {
    let tmp = dir.join(STATE_TMP_FILE);
    let path = dir.join(STATE_FILE);
    let bytes = serde_json::to_vec_pretty(state)
        .map_err(|e| io_err("encode", &path)(io::Error::other(e)))?;
    let write =
        || File::create(&tmp).and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()));
    match write() {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::StorageFull => {
            // The disk is full: spend the reserve on the state, which acks need to free space.
            let reserve = dir.join(RESERVE_FILE);
            if fs::remove_file(&reserve).is_err() {
                return Err(io_err("write", &tmp)(e));
            }
            warn!(dir = %dir.display(), "disk full: spool reserve released to write the spool state");
            write().map_err(io_err("write", &tmp))?;
        }
        Err(e) => return Err(io_err("write", &tmp)(e)),
    }
    fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
    sync_dir(dir)
}

/// Makes the reserve file when it is missing and there is room. False when it cannot (the
/// disk is full): nothing else may be written then.
fn ensure_reserve(dir: &Path) -> bool {
    let path = dir.join(RESERVE_FILE);
    if fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() >= RESERVE_BYTES as u64) {
        return true;
    }
    let made = File::create(&path).and_then(|mut f| {
        f.write_all(&[0; RESERVE_BYTES])?;
        f.sync_all()
    });
    match made {
        Ok(()) => true,
        Err(e) => {
            debug!(path = %path.display(), error = %e, "cannot make the spool reserve");
            let _ = fs::remove_file(&path);
            false
        }
    }
}

/// Takes the spool's exclusive lock, or names who holds it.
fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("open", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("pid {pid}"),
                Err(_) => "pid unknown".to_owned(),
            };
            return Err(SpoolError::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &path)(e)),
    }
    let pid = std::process::id().to_string();
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
        .and_then(|()| file.write_all(pid.as_bytes()))
        .map_err(io_err("write", &path))?;
    Ok(file)
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

fn create_dir(dir: &Path) -> Result<(), SpoolError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_err("create directory", dir))
}

/// Segment files in `dir`, sorted by first seq.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let path = entry.map_err(io_err("list", dir))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let digits = name
            .strip_prefix("seg-")
            .and_then(|n| n.strip_suffix(".log"));
        match digits
            .filter(|d| d.len() == 20)
            .and_then(|d| d.parse::<u64>().ok())
        {
            Some(first_seq) => out.push((first_seq, path)),
            None => debug!(path = %path.display(), "ignoring non-segment file in spool"),
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpoolError + use<> {
    let path = path.to_path_buf();
    move |source| SpoolError::Io { op, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: u64 = 64 * 1024; // 8 KiB segments

    fn body(seq: u64, len: usize) -> Vec<u8> {
        let mut b = vec![(seq % 251) as u8 + 1; len];
        b[..8].copy_from_slice(&seq.to_le_bytes());
        b
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        list_segments(dir)
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    fn disk_bytes(dir: &Path) -> u64 {
        segment_files(dir)
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum()
    }

    fn drain(spool: &mut Spool) -> Vec<u64> {
        let mut seqs = Vec::new();
        while let Some(r) = spool.peek().unwrap() {
            assert_eq!(
                r.payload,
                body(r.seq, r.payload.len()),
                "payload of seq {}",
                r.seq
            );
            seqs.push(r.seq);
            spool.ack(r.seq).unwrap();
        }
        seqs
    }

    fn gap(first_seq: u64, last_seq: u64, reason: GapKind) -> (u64, u64, GapKind) {
        (first_seq, last_seq, reason)
    }

    fn gaps(spool: &Spool) -> Vec<(u64, u64, GapKind)> {
        spool
            .pending_gaps()
            .iter()
            .map(|g| (g.first_seq, g.last_seq, g.reason))
            .collect()
    }

    /// 20 records of 1000 bytes: segments 1..=8, 9..=16, 17..=20.
    fn three_segments(dir: &Path) {
        let mut spool = Spool::open(dir, SMALL).unwrap();
        for seq in 1..=20 {
            assert_eq!(spool.append(&body(seq, 1000)).unwrap().seq, seq);
        }
        assert_eq!(segment_files(dir).len(), 3);
    }

    fn flip_byte(path: &Path, offset: usize) {
        let mut data = fs::read(path).unwrap();
        data[offset] ^= 0x5a;
        fs::write(path, data).unwrap();
    }

    #[test]
    fn seqs_start_at_one_are_contiguous_and_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        let epoch = spool.epoch();
        assert!(epoch >= 1);
        let seqs: Vec<u64> = (0..3)
            .map(|_| spool.append(b"report").unwrap().seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        drop(spool);

        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(spool.epoch(), epoch);
        assert_eq!(
            spool.append(b"report").unwrap(),
            AppendOutcome {
                seq: 4,
                stored: true
            }
        );
        spool.ack(2).unwrap();
        drop(spool);

        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(spool.stats().head_seq, 3);
        assert_eq!(spool.append(b"report").unwrap().seq, 5);
        assert_eq!(spool.stats().reports, 3);
    }

    #[test]
    fn seqs_continue_after_everything_was_acked_and_all_segments_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        for seq in 1..=3 {
            spool.append(&body(seq, 100)).unwrap();
        }
        spool.ack(3).unwrap();
        // The newest segment is kept for the next appends, with nothing left to send.
        assert_eq!(segment_files(dir.path()).len(), 1);
        assert_eq!(spool.stats().reports, 0);
        assert_eq!(spool.append(&body(4, 100)).unwrap().seq, 4);
        assert_eq!(
            segment_files(dir.path()).len(),
            1,
            "appended to the same segment"
        );
        spool.ack(4).unwrap();
        drop(spool);

        // Reopened: the wholly acknowledged segment is deleted.
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert!(segment_files(dir.path()).is_empty());
        assert_eq!(spool.peek().unwrap(), None);
        assert_eq!(spool.stats().next_seq, 5);
        assert_eq!(spool.append(&body(5, 100)).unwrap().seq, 5);
    }

    #[test]
    fn peek_returns_the_oldest_unacked_and_reopen_does_not_return_acked_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        for payload in [&b"a"[..], b"b", b"c"] {
            spool.append(payload).unwrap();
        }
        let first = Record {
            seq: 1,
            payload: b"a".to_vec(),
        };
        assert_eq!(spool.peek().unwrap(), Some(first.clone()));
        assert_eq!(spool.peek().unwrap(), Some(first), "peek does not consume");
        spool.ack(1).unwrap();
        assert_eq!(
            spool.peek().unwrap(),
            Some(Record {
                seq: 2,
                payload: b"b".to_vec()
            })
        );
        drop(spool);

        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(spool.peek().unwrap().map(|r| r.seq), Some(2));
        spool.ack(1).unwrap(); // below head: no-op
        assert_eq!(spool.peek().unwrap().map(|r| r.seq), Some(2));
        spool.ack(3).unwrap();
        assert_eq!(spool.peek().unwrap(), None);
        drop(spool);

        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(spool.peek().unwrap(), None);
        assert_eq!(spool.stats().reports, 0);
    }

    #[test]
    fn an_ack_of_a_seq_never_assigned_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        spool.append(b"x").unwrap();
        assert!(matches!(
            spool.ack(2),
            Err(SpoolError::AckBeyondNext {
                seq: 2,
                next_seq: 2
            })
        ));
        assert_eq!(spool.append(b"y").unwrap().seq, 2);
    }

    #[test]
    fn a_torn_last_write_is_truncated_and_its_unreturned_seq_is_reused() {
        for tear in ["cut", "garbage", "zeros"] {
            let dir = tempfile::tempdir().unwrap();
            let mut spool = Spool::open(dir.path(), SMALL).unwrap();
            for seq in 1..=3 {
                spool.append(&body(seq, 100)).unwrap();
            }
            drop(spool);
            let path = segment_files(dir.path()).pop().unwrap();
            let clean = fs::read(&path).unwrap();
            let mut data = clean.clone();
            match tear {
                // The third record's append never returned: it was cut mid-write.
                "cut" => data.truncate(data.len() - 5),
                // A fourth record's header, partly written.
                "garbage" => data.extend_from_slice(&[100, 0, 0, 0, 0xde, 0xad]),
                _ => data.extend_from_slice(&[0; 40]),
            }
            fs::write(&path, &data).unwrap();

            let mut spool = Spool::open(dir.path(), SMALL).unwrap();
            let survivors = if tear == "cut" { 2 } else { 3 };
            assert!(spool.pending_gaps().is_empty(), "{tear}");
            let kept = survivors as usize * (HEADER_BYTES + 100);
            assert_eq!(
                fs::read(&path).unwrap(),
                clean[..kept],
                "{tear}: truncated to the good records"
            );
            assert_eq!(
                spool.append(&body(survivors + 1, 100)).unwrap().seq,
                survivors + 1,
                "{tear}"
            );
            assert_eq!(
                drain(&mut spool),
                (1..=survivors + 1).collect::<Vec<_>>(),
                "{tear}"
            );
        }
    }

    #[test]
    fn a_flipped_byte_in_a_non_last_segment_yields_a_corrupt_gap_of_exactly_the_lost_seq() {
        let dir = tempfile::tempdir().unwrap();
        three_segments(dir.path());
        let first = &segment_files(dir.path())[0];
        flip_byte(first, 3 * 1016 + 16 + 500); // payload of seq 4

        let spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(gaps(&spool), [gap(4, 4, GapKind::Corrupt)]);
        assert_eq!(spool.stats().dropped_total, 1);
        drop(spool);
        // Detected again on every open, but recorded once.
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(gaps(&spool), [gap(4, 4, GapKind::Corrupt)]);
        assert_eq!(spool.append(&body(21, 1000)).unwrap().seq, 21);
        let expected: Vec<u64> = (1..=21).filter(|&s| s != 4).collect();
        assert_eq!(drain(&mut spool), expected);
        assert!(spool.pending_gaps().is_empty(), "acked past the gap");
    }

    #[test]
    fn a_flipped_length_in_a_non_last_segment_loses_only_that_record() {
        let dir = tempfile::tempdir().unwrap();
        three_segments(dir.path());
        flip_byte(&segment_files(dir.path())[1], 2 * 1016 + 1); // length of seq 11

        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(gaps(&spool), [gap(11, 11, GapKind::Corrupt)]);
        let expected: Vec<u64> = (1..=20).filter(|&s| s != 11).collect();
        assert_eq!(drain(&mut spool), expected);
    }

    #[test]
    fn damage_in_the_newest_segment_never_reassigns_a_returned_seq() {
        let dir = tempfile::tempdir().unwrap();
        three_segments(dir.path());
        let last = segment_files(dir.path()).pop().unwrap();
        flip_byte(&last, 1016 + 16 + 10); // payload of seq 18, a middle record
        flip_byte(&last, 3 * 1016 + 16 + 10); // payload of seq 20, the complete last record

        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(
            gaps(&spool),
            [gap(18, 18, GapKind::Corrupt), gap(20, 20, GapKind::Corrupt)]
        );
        assert_eq!(spool.append(&body(21, 1000)).unwrap().seq, 21);
        drop(spool);
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(gaps(&spool).len(), 2);
        assert_eq!(spool.stats().next_seq, 22);
        let expected: Vec<u64> = (1..=21).filter(|&s| s != 18 && s != 20).collect();
        assert_eq!(drain(&mut spool), expected);
    }

    #[test]
    fn a_report_dropped_while_on_its_way_and_then_acknowledged_is_neither_a_gap_nor_a_loss() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        for seq in 1..=64 {
            spool.append(&body(seq, 1000)).unwrap();
        }
        // Seq 1 goes out; meanwhile a new report fills the spool and drops segment 1..=8.
        let sent = spool.peek().unwrap().unwrap();
        let carried = spool.gaps_for(sent.seq);
        spool.append(&body(65, 1000)).unwrap();
        assert_eq!(gaps(&spool), [gap(2, 8, GapKind::SpoolFull)]);
        assert_eq!(spool.stats().dropped_total, 7);
        // The collector acknowledges seq 1 after all.
        spool.ack_carrying(sent.seq, &carried).unwrap();
        assert_eq!(gaps(&spool), [gap(2, 8, GapKind::SpoolFull)]);
        assert_eq!(spool.stats().dropped_total, 7);
        assert_eq!(spool.peek().unwrap().map(|r| r.seq), Some(9));
        drop(spool);
        let spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(
            (gaps(&spool), spool.stats().dropped_total),
            (vec![gap(2, 8, GapKind::SpoolFull)], 7),
            "saved at once"
        );
    }

    /// Seq 1 on its way when a full spool drops segment 1..=8; the next append is seq 65.
    fn sent_when_dropped(dir: &Path) -> Spool {
        let mut spool = Spool::open(dir, SMALL).unwrap();
        for seq in 1..=64 {
            spool.append(&body(seq, 1000)).unwrap();
        }
        assert_eq!(spool.peek().unwrap().map(|r| r.seq), Some(1));
        spool.append(&body(65, 1000)).unwrap();
        spool
    }

    #[test]
    fn a_report_dropped_while_on_its_way_and_never_acknowledged_becomes_a_gap() {
        // Sent again after a broken connection: the next peek finds its bytes gone.
        let dir = tempfile::tempdir().unwrap();
        let mut spool = sent_when_dropped(dir.path());
        assert_eq!(spool.peek().unwrap().map(|r| r.seq), Some(9));
        let mut covered: Vec<u64> = spool
            .gaps_for(9)
            .iter()
            .flat_map(|g| g.first_seq..=g.last_seq)
            .collect();
        covered.sort_unstable();
        assert_eq!(covered, (1..=8).collect::<Vec<_>>());
        assert_eq!(spool.stats().dropped_total, 8);

        // Refused by the collector and given up.
        let dir = tempfile::tempdir().unwrap();
        let mut spool = sent_when_dropped(dir.path());
        spool.skip(1, GapKind::Refused, "no").unwrap();
        assert!(gaps(&spool).contains(&gap(1, 1, GapKind::Refused)));
        assert_eq!(spool.stats().dropped_total, 8);

        // The agent stopped before its ack came.
        let dir = tempfile::tempdir().unwrap();
        drop(sent_when_dropped(dir.path()));
        let spool = Spool::open(dir.path(), SMALL).unwrap();
        assert!(gaps(&spool).contains(&gap(1, 1, GapKind::SpoolFull)));
        assert_eq!(spool.stats().dropped_total, 8);
    }

    #[test]
    fn a_record_damaged_after_open_becomes_a_corrupt_gap_when_peeked() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        for seq in 1..=3 {
            spool.append(&body(seq, 100)).unwrap();
        }
        flip_byte(&segment_files(dir.path())[0], 20); // seq 1
        assert_eq!(spool.peek().unwrap().map(|r| r.seq), Some(2));
        assert_eq!(gaps(&spool), [gap(1, 1, GapKind::Corrupt)]);
    }

    #[test]
    fn filling_beyond_max_bytes_drops_the_oldest_and_records_an_exact_gap() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        for seq in 1..=80 {
            assert_eq!(
                spool.append(&body(seq, 1000)).unwrap(),
                AppendOutcome { seq, stored: true }
            );
            assert!(disk_bytes(dir.path()) <= SMALL, "after seq {seq}");
            assert_eq!(spool.stats().bytes, disk_bytes(dir.path()));
        }
        // 8 records per segment, 8 segments fit: the two oldest segments went.
        assert_eq!(gaps(&spool), [gap(1, 16, GapKind::SpoolFull)]);
        assert_eq!(spool.stats().dropped_total, 16);
        assert_eq!(spool.stats().reports, 64);
        assert_eq!(spool.peek().unwrap().map(|r| r.seq), Some(17));
        drop(spool);

        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(
            gaps(&spool),
            [gap(1, 16, GapKind::SpoolFull)],
            "still pending after reopen"
        );
        assert_eq!(spool.stats().dropped_total, 16);
        spool.ack(17).unwrap();
        assert!(
            spool.pending_gaps().is_empty(),
            "cleared by the ack of the report that carried it"
        );
        drop(spool);

        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert!(spool.pending_gaps().is_empty());
        assert_eq!(drain(&mut spool), (18..=80).collect::<Vec<_>>());
        assert_eq!(spool.append(&body(81, 10)).unwrap().seq, 81);
    }

    #[test]
    fn a_gap_created_while_a_report_is_in_flight_survives_that_reports_ack() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        for seq in 1..=64 {
            spool.append(&body(seq, 1000)).unwrap();
        }
        spool.ack(7).unwrap();
        let in_flight = spool.peek().unwrap().unwrap().seq;
        assert_eq!(in_flight, 8);
        spool.append(&body(65, 1000)).unwrap(); // drops segment 1..=8, seq 8 with it
        spool.append(&vec![0; SMALL as usize]).unwrap(); // seq 66, too large
        assert_eq!(
            spool.stats().dropped_total,
            1,
            "seq 8 may still be acknowledged"
        );
        spool.ack(in_flight).unwrap();
        // Seq 8 reached the collector after all; seq 66's gap waits for a report to carry it.
        assert_eq!(gaps(&spool), [gap(66, 66, GapKind::TooLarge)]);
        assert_eq!(spool.stats().dropped_total, 1);
        assert_eq!(spool.peek().unwrap().map(|r| r.seq), Some(9));
    }

    #[test]
    fn a_skipped_report_becomes_a_gap_that_the_next_ack_clears() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        for seq in 1..=3 {
            spool.append(&body(seq, 100)).unwrap();
        }
        spool.skip(1, GapKind::Corrupt, "").unwrap();
        assert_eq!(gaps(&spool), [gap(1, 1, GapKind::Corrupt)]);
        assert_eq!(spool.stats().dropped_total, 1);
        drop(spool);
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(gaps(&spool), [gap(1, 1, GapKind::Corrupt)]);
        assert_eq!(spool.peek().unwrap().map(|r| r.seq), Some(2));
        spool.ack(2).unwrap();
        assert!(spool.pending_gaps().is_empty());
        assert!(matches!(
            spool.skip(4, GapKind::TooLarge, ""),
            Err(SpoolError::AckBeyondNext { .. })
        ));
    }

    #[test]
    fn a_record_larger_than_max_bytes_is_recorded_as_a_too_large_gap() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 4096).unwrap();
        assert_eq!(spool.append(&body(1, 100)).unwrap().seq, 1);
        assert_eq!(
            spool.append(&[7; 4096]).unwrap(),
            AppendOutcome {
                seq: 2,
                stored: false
            }
        );
        assert_eq!(gaps(&spool), [gap(2, 2, GapKind::TooLarge)]);
        assert_eq!(spool.stats().dropped_total, 1);
        assert_eq!(spool.stats().reports, 1);
        drop(spool);

        // The consumed seq is not handed out again after a restart.
        let mut spool = Spool::open(dir.path(), 4096).unwrap();
        assert_eq!(gaps(&spool), [gap(2, 2, GapKind::TooLarge)]);
        assert_eq!(spool.append(&body(3, 100)).unwrap().seq, 3);
        assert_eq!(drain(&mut spool), [1, 3]);
        assert!(spool.pending_gaps().is_empty());
    }

    #[test]
    fn acks_are_saved_lazily_but_before_a_segment_is_freed_and_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let saved_head = || {
            let path = dir.path().join(STATE_FILE);
            parse_state(&path, &fs::read(&path).unwrap())
                .unwrap()
                .head_seq
        };
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        for seq in 1..=3 {
            assert_eq!(spool.append(&body(seq, 100)).unwrap().seq, seq);
        }
        // An ack that frees no segment stays in memory: a crash now sends report 1 again.
        spool.ack(1).unwrap();
        assert_eq!(spool.stats().head_seq, 2);
        assert_eq!(saved_head(), 1);
        // Dropping the spool (a clean stop) saves it.
        drop(spool);
        assert_eq!(saved_head(), 2);
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(spool.peek().unwrap().map(|r| r.seq), Some(2));
        // Fill the first segment and start a second; an ack of the first one's last report
        // is saved before the segment is deleted.
        let mut seq = 4;
        while segment_files(dir.path()).len() < 2 {
            assert_eq!(spool.append(&body(seq, 1000)).unwrap().seq, seq);
            seq += 1;
        }
        let last_of_first = seq - 2;
        spool.ack(last_of_first - 1).unwrap();
        assert_eq!(saved_head(), 2, "nothing freed yet");
        assert_eq!(segment_files(dir.path()).len(), 2);
        spool.ack(last_of_first).unwrap();
        assert_eq!(saved_head(), last_of_first + 1);
        assert_eq!(segment_files(dir.path()).len(), 1);
        // flush saves what is pending (the second segment holds one more report).
        assert_eq!(spool.append(&body(seq, 100)).unwrap().seq, seq);
        spool.ack(last_of_first + 1).unwrap();
        assert_eq!(saved_head(), last_of_first + 1);
        spool.flush().unwrap();
        assert_eq!(saved_head(), last_of_first + 2);
        // A gap is saved at once, with the acks before it.
        spool.ack(seq).unwrap();
        let next = spool.append(&body(seq + 1, 100)).unwrap().seq;
        spool.skip(next, GapKind::Refused, "refused").unwrap();
        assert_eq!(saved_head(), next + 1);
    }

    #[test]
    fn a_damaged_state_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        spool.append(b"x").unwrap();
        drop(spool);
        let state = dir.path().join(STATE_FILE);
        let good = fs::read(&state).unwrap();

        fs::write(&state, &good[..good.len() / 2]).unwrap();
        let err = Spool::open(dir.path(), SMALL).unwrap_err();
        assert!(matches!(err, SpoolError::DamagedState { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&state.display().to_string()),
            "{err}"
        );

        let v2 = String::from_utf8(good.clone())
            .unwrap()
            .replace("\"version\": 1", "\"version\": 2");
        fs::write(&state, v2).unwrap();
        let err = Spool::open(dir.path(), SMALL).unwrap_err();
        assert!(
            matches!(err, SpoolError::UnsupportedVersion { version: 2, .. }),
            "{err:?}"
        );

        fs::remove_file(&state).unwrap();
        let err = Spool::open(dir.path(), SMALL).unwrap_err();
        assert!(matches!(err, SpoolError::MissingState { .. }), "{err:?}");

        fs::write(&state, &good).unwrap();
        assert_eq!(
            Spool::open(dir.path(), SMALL)
                .unwrap()
                .append(b"y")
                .unwrap()
                .seq,
            2
        );
    }

    #[test]
    fn open_creates_a_private_directory_and_removes_a_leftover_temporary_state() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/spool");
        Spool::open(&dir, SMALL).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
        fs::write(dir.join(STATE_TMP_FILE), b"{half").unwrap();
        Spool::open(&dir, SMALL).unwrap();
        assert!(!dir.join(STATE_TMP_FILE).exists());
    }

    #[test]
    fn the_spool_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<Spool>();
    }

    /// Sends like the agent does and checks each report as the collector does: every gap it
    /// carries lies wholly before its seq. Returns the seqs delivered and the gaps carried.
    fn drain_as_the_collector_checks(spool: &mut Spool) -> (Vec<u64>, Vec<(u64, u64, GapKind)>) {
        let (mut seqs, mut carried_all) = (Vec::new(), Vec::new());
        while let Some(r) = spool.peek().unwrap() {
            let carried = spool.gaps_for(r.seq);
            for g in &carried {
                assert!(
                    g.first_seq >= 1 && g.first_seq <= g.last_seq && g.last_seq < r.seq,
                    "report {} carries gap {g:?}: the collector would refuse it",
                    r.seq
                );
                carried_all.push((g.first_seq, g.last_seq, g.reason));
            }
            seqs.push(r.seq);
            spool.ack_carrying(r.seq, &carried).unwrap();
        }
        (seqs, carried_all)
    }

    #[test]
    fn two_damaged_records_cost_exactly_two_seqs_and_every_report_carries_only_earlier_gaps() {
        let dir = tempfile::tempdir().unwrap();
        three_segments(dir.path());
        let files = segment_files(dir.path());
        flip_byte(&files[1], 16 + 500); // payload of seq 9, first of the second segment
        flip_byte(&files[2], 2 * 1016 + 16 + 10); // payload of seq 19

        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert_eq!(
            gaps(&spool),
            [gap(9, 9, GapKind::Corrupt), gap(19, 19, GapKind::Corrupt)]
        );
        assert!(spool.gaps_for(1).is_empty(), "seq 1 carries no later gap");
        let (seqs, carried) = drain_as_the_collector_checks(&mut spool);
        let expected: Vec<u64> = (1..=20).filter(|&s| s != 9 && s != 19).collect();
        assert_eq!(seqs, expected, "every good record delivered");
        assert_eq!(
            carried,
            [gap(9, 9, GapKind::Corrupt), gap(19, 19, GapKind::Corrupt)],
            "each damaged seq declared once, by the first report after it"
        );
        assert_eq!(spool.stats().dropped_total, 2, "two seqs lost, not six");
        assert!(spool.pending_gaps().is_empty());
    }

    #[test]
    fn a_gap_after_the_last_report_waits_for_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        three_segments(dir.path());
        let last = segment_files(dir.path()).pop().unwrap();
        flip_byte(&last, 3 * 1016 + 16 + 10); // seq 20, the newest record

        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        let (seqs, carried) = drain_as_the_collector_checks(&mut spool);
        assert_eq!(seqs, (1..=19).collect::<Vec<_>>());
        assert!(carried.is_empty(), "no report after seq 20 yet");
        assert_eq!(
            gaps(&spool),
            [gap(20, 20, GapKind::Corrupt)],
            "still pending"
        );
        assert_eq!(spool.append(&body(21, 100)).unwrap().seq, 21);
        let (seqs, carried) = drain_as_the_collector_checks(&mut spool);
        assert_eq!(seqs, [21]);
        assert_eq!(carried, [gap(20, 20, GapKind::Corrupt)]);
    }

    #[test]
    fn an_ack_clears_only_the_gaps_its_report_carried() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        let n = MAX_GAPS_PER_REPORT as u64 + 5;
        // Every odd seq given up as its own gap (distinct details keep them apart).
        for seq in 1..=2 * n {
            spool.append(&body(seq, 10)).unwrap();
        }
        for seq in (1..=2 * n).step_by(2) {
            spool.ack_carrying(seq - 1, &[]).unwrap();
            spool
                .skip(seq, GapKind::Refused, &format!("refusal {seq}"))
                .unwrap();
        }
        spool.append(&body(2 * n + 1, 10)).unwrap();
        assert_eq!(spool.pending_gaps().len() as u64, n);
        let carried = spool.gaps_for(2 * n + 1);
        assert_eq!(carried.len(), MAX_GAPS_PER_REPORT, "bounded");
        spool.ack_carrying(2 * n + 1, &carried).unwrap();
        assert_eq!(
            spool.pending_gaps().len(),
            5,
            "the five not carried stay pending"
        );
        assert_eq!(
            spool.pending_gaps()[0].detail,
            format!("refusal {}", 2 * MAX_GAPS_PER_REPORT + 1)
        );
    }

    #[test]
    fn a_carried_gap_extended_since_keeps_its_new_part() {
        let mut state = State {
            version: STATE_VERSION,
            epoch: 1,
            head_seq: 1,
            pending_gaps: vec![],
            dropped_total: 0,
            gone_in_flight: None,
        };
        state.add_gap(3, 5, GapKind::SpoolFull, "");
        state.add_gap(6, 9, GapKind::SpoolFull, "");
        assert_eq!(state.pending_gaps.len(), 1, "extended in place");
        state.remove_range(3, 5);
        let left: Vec<(u64, u64)> = state
            .pending_gaps
            .iter()
            .map(|g| (g.first_seq, g.last_seq))
            .collect();
        assert_eq!(left, [(6, 9)]);
        state.remove_range(7, 7);
        let left: Vec<(u64, u64)> = state
            .pending_gaps
            .iter()
            .map(|g| (g.first_seq, g.last_seq))
            .collect();
        assert_eq!(left, [(6, 6), (8, 9)]);
    }

    #[test]
    fn a_refused_gap_keeps_the_collectors_words_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        spool.append(b"a").unwrap();
        spool.append(b"b").unwrap();
        let words = "INVALID_ARGUMENT: node_info.country \"X\" is not an ISO code ".repeat(20);
        spool.skip(1, GapKind::Refused, &words).unwrap();
        drop(spool);
        let spool = Spool::open(dir.path(), SMALL).unwrap();
        let g = &spool.pending_gaps()[0];
        assert_eq!(g.reason, GapKind::Refused);
        assert!(words.starts_with(&g.detail) && g.detail.len() <= MAX_GAP_DETAIL_BYTES);
    }

    #[test]
    fn a_second_spool_on_the_same_directory_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = Spool::open(dir.path(), SMALL).unwrap();
        let err = Spool::open(dir.path(), SMALL).unwrap_err();
        let SpoolError::Locked { holder, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(holder, &format!("pid {}", std::process::id()));
        assert!(err.to_string().contains("in use by another agent"), "{err}");
        drop(first);
        Spool::open(dir.path(), SMALL).expect("free again once the first is closed");
    }

    #[test]
    fn a_spool_keeps_a_reserve_for_its_state_on_a_full_disk() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SMALL).unwrap();
        let reserve = dir.path().join(RESERVE_FILE);
        assert_eq!(fs::metadata(&reserve).unwrap().len(), RESERVE_BYTES as u64);
        drop(spool);
        fs::remove_file(&reserve).unwrap();
        let mut spool = Spool::open(dir.path(), SMALL).unwrap();
        assert!(reserve.exists(), "made again at open");
        fs::remove_file(&reserve).unwrap();
        spool.append(b"x").unwrap();
        assert!(reserve.exists(), "made again before an append");
        // A reserve that cannot be made (a full disk; here a directory in its way) refuses
        // the append, seq untouched, and the ack still goes through.
        fs::remove_file(&reserve).unwrap();
        fs::create_dir(&reserve).unwrap();
        let err = spool.append(b"y").unwrap_err();
        assert!(matches!(err, SpoolError::DiskFull { .. }), "{err:?}");
        spool.ack(1).unwrap();
        fs::remove_dir(&reserve).unwrap();
        assert_eq!(
            spool.append(b"y").unwrap().seq,
            2,
            "no seq spent on the refusal"
        );
    }
}
