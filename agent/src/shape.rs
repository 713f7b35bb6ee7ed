//! Reports that always fit: the weight inventory packed into as many reports as its size needs,
//! and a report the collector refuses trimmed and sent again, with what was left out declared.
//!
//! # Packing ([`pack`])
//!
//! Every weight file is first bounded ([`crate::bounds`]: at most
//! [`crate::bounds::MAX_FILE_REPORT_BYTES`] encoded), then the files go, in path order, into the
//! interval's report while it stays under the report budget, and into continuation reports after
//! it (each with the node's identity, host sample and agent facts, but no GPU samples, processes
//! or flows, which would count twice). A full inventory becomes one generation of
//! [`pb::InventoryChunk`]s; `weight_inventory_full` is set only when it fits one report, so a
//! collector that does not know chunks never takes a part for the whole.
//!
//! # Withholding ([`withhold`])
//!
//! For a report refused as INVALID_ARGUMENT, RESOURCE_EXHAUSTED or OUT_OF_RANGE, the same seq is
//! sent again with less in it, each step declared in `Report.withheld`:
//! 1. the item the collector's message names (`weight_files[3].parameter_count …`,
//!    `flows[12]…`, `processes[0]…`, `gpus[1]…`, `gaps[0]…`);
//! 2. else, when the collector's size limit is known and exceeded, items from the end of the
//!    largest list until the report fits three quarters of it;
//! 3. else the second half of the largest list.
//!
//! Weight files withheld for size are handed back to the inventory to go out again in a later
//! report ([`Withholding::requeue`]); a file the collector named as invalid is not (it would be
//! refused again), and the next full inventory declares it again. When nothing is left to
//! withhold, the caller gives the seq up as a gap with reason REFUSED and the collector's words.

use prost::Message;
use sov_proto::pb;
use tonic::Code;

use crate::bounds;

/// The interval's reports aim at this size when the collector's limit is not known yet.
pub const DEFAULT_REPORT_BUDGET_BYTES: usize = 4 * 1024 * 1024;
/// Paths listed in one `Withheld` record; the rest are counted.
pub const MAX_WITHHELD_PATHS: usize = 1000;
/// Longest refusal message kept in a `Withheld` reason.
const MAX_REASON_BYTES: usize = 512;

/// The report budget for a collector that accepts `limit` bytes (0 = not known yet): half of
/// it, so that headers, gaps and growth never tip a packed report over, and never more than
/// [`DEFAULT_REPORT_BUDGET_BYTES`].
pub fn report_budget(limit: u64) -> usize {
    if limit == 0 {
        return DEFAULT_REPORT_BUDGET_BYTES;
    }
    usize::try_from(limit / 2)
        .unwrap_or(usize::MAX)
        .clamp(4 * 1024, DEFAULT_REPORT_BUDGET_BYTES)
}

/// A weight inventory update to pack (see [`crate::collect::weights::inventory::WeightUpdate`]).
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// Some(generation) for a full inventory.
    pub generation: Option<u64>,
    pub files: Vec<pb::WeightFile>,
    pub removed: Vec<String>,
}

/// Puts `inventory` into `base` (the interval's report, which already holds everything else)
/// and into as many continuation reports as needed so that each stays under `budget` bytes.
/// Returns the reports in the order to spool them; `base` is always the first.
pub fn pack(base: pb::Report, inventory: Inventory, budget: usize) -> Vec<pb::Report> {
    let Inventory {
        generation,
        mut files,
        removed,
    } = inventory;
    for f in &mut files {
        bounds::bound_weight_file(f);
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let total_files = files.len() as u64;
    let continuation = pb::Report {
        epoch: base.epoch,
        observed_unix_ms: base.observed_unix_ms,
        node_info: base.node_info.clone(),
        host: base.host.clone(),
        gpu_state: base.gpu_state.clone(),
        agent: base.agent.clone(),
        ..Default::default()
    };
    let mut out: Vec<pb::Report> = Vec::new();
    let mut current = base;
    let mut used = current.encoded_len();
    // Removed paths first (small), then files.
    for path in removed {
        let len = path.len() + 4;
        if used + len > budget && !is_empty_of_inventory(&current) {
            out.push(std::mem::replace(&mut current, continuation.clone()));
            used = current.encoded_len();
        }
        used += len;
        current.weight_files_removed.push(path);
    }
    for f in files {
        let len = f.encoded_len() + 4;
        if used + len > budget && !is_empty_of_inventory(&current) {
            out.push(std::mem::replace(&mut current, continuation.clone()));
            used = current.encoded_len();
        }
        used += len;
        current.weight_files.push(f);
    }
    out.push(current);
    if let Some(generation) = generation {
        let last = out.len() - 1;
        for (i, r) in out.iter_mut().enumerate() {
            r.weight_inventory = Some(pb::InventoryChunk {
                generation,
                index: u32::try_from(i).unwrap_or(u32::MAX),
                last: i == last,
                total_files,
            });
            r.weight_inventory_full = last == 0;
        }
    }
    out
}

fn is_empty_of_inventory(r: &pb::Report) -> bool {
    r.weight_files.is_empty() && r.weight_files_removed.is_empty()
}

/// What one withholding step left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Withholding {
    /// Weight files left out for size, to send again in a later report.
    pub requeue: Vec<String>,
    /// The report's gaps were left out (the collector refused them). They are declared in
    /// `withheld` instead, and the ack clears them like carried ones: sending them again would
    /// only be refused again.
    pub gaps_withheld: bool,
}

/// One step of trimming `report` after the collector refused it with `code` and `message`;
/// `limit` is the collector's `max_report_bytes` when known (0 = unknown). `None` when nothing
/// is left to withhold: the report cannot be sent.
pub fn withhold(
    report: &mut pb::Report,
    code: Code,
    message: &str,
    limit: u64,
) -> Option<Withholding> {
    let reason = refusal_reason(code, message);
    if let Some((list, index)) = named_item(message)
        && let Some(w) = withhold_named(report, list, index, &reason)
    {
        return Some(w);
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let size = report.encoded_len();
    if limit > 0 && size > limit {
        return withhold_to_fit(report, limit * 3 / 4, &reason, limit);
    }
    if code == Code::ResourceExhausted || code == Code::OutOfRange {
        // Too large by a limit we do not know: aim at half of what we sent.
        return withhold_to_fit(report, size / 2, &reason, limit);
    }
    withhold_half(report, &reason, limit)
}

/// "CODE: message", cut.
fn refusal_reason(code: Code, message: &str) -> String {
    let mut s = format!("{code:?}: {message}");
    bounds::truncate(&mut s, MAX_REASON_BYTES);
    s
}

/// The list and index a collector message names first, as in `weight_files[3].size_bytes`.
fn named_item(message: &str) -> Option<(&'static str, usize)> {
    const LISTS: [&str; 5] = ["weight_files", "flows", "processes", "gpus", "gaps"];
    let mut best: Option<(usize, &'static str, usize)> = None;
    for list in LISTS {
        let mut from = 0;
        while let Some(at) = message[from..].find(list) {
            let start = from + at;
            let after = start + list.len();
            from = after;
            // A whole word: not the tail of another name (`removed_flows`).
            let word_start = message[..start]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
            if !word_start {
                continue;
            }
            let rest = &message[after..];
            let index = rest.strip_prefix('[').and_then(|r| {
                let digits: String = r.chars().take_while(char::is_ascii_digit).collect();
                r[digits.len()..]
                    .starts_with(']')
                    .then(|| digits.parse::<usize>().ok())
                    .flatten()
            });
            let Some(index) = index else {
                if list == "gaps" {
                    // "gaps has 12000 entries": every gap.
                    if best.is_none_or(|(s, _, _)| start < s) {
                        best = Some((start, list, usize::MAX));
                    }
                }
                continue;
            };
            if best.is_none_or(|(s, _, _)| start < s) {
                best = Some((start, list, index));
            }
            break;
        }
    }
    best.map(|(_, list, index)| (list, index))
}

fn withhold_named(
    report: &mut pb::Report,
    list: &str,
    index: usize,
    reason: &str,
) -> Option<Withholding> {
    match list {
        "weight_files" if index < report.weight_files.len() => {
            let f = report.weight_files.remove(index);
            declare_files(report, &[f.path], reason);
            // Named as invalid: sending it again would be refused again.
            Some(Withholding::default())
        }
        "flows" if index < report.flows.len() => {
            let f = report.flows.remove(index);
            declare_flows(report, &[f], reason);
            Some(Withholding::default())
        }
        "processes" if index < report.processes.len() => {
            report.processes.remove(index);
            declare_count(report, "process", 1, reason);
            Some(Withholding::default())
        }
        "gpus" if index < report.gpus.len() => {
            report.gpus.remove(index);
            declare_count(report, "gpu", 1, reason);
            Some(Withholding::default())
        }
        "gaps" if !report.gaps.is_empty() => {
            let n = report.gaps.len() as u64;
            report.gaps.clear();
            declare_count(report, "gap", n, reason);
            Some(Withholding {
                gaps_withheld: true,
                ..Default::default()
            })
        }
        _ => None,
    }
}

/// The lists that can lose items, largest (encoded) first.
fn lists_by_size(report: &pb::Report) -> Vec<(&'static str, usize)> {
    let mut sizes: Vec<(&'static str, usize)> = vec![
        (
            "weight_files",
            report.weight_files.iter().map(Message::encoded_len).sum(),
        ),
        ("flows", report.flows.iter().map(Message::encoded_len).sum()),
        (
            "processes",
            report.processes.iter().map(Message::encoded_len).sum(),
        ),
        ("gpus", report.gpus.iter().map(Message::encoded_len).sum()),
    ];
    sizes.retain(|(_, s)| *s > 0);
    sizes.sort_by_key(|s| std::cmp::Reverse(s.1));
    sizes
}

fn len_of(report: &pb::Report, list: &str) -> usize {
    match list {
        "weight_files" => report.weight_files.len(),
        "flows" => report.flows.len(),
        "processes" => report.processes.len(),
        _ => report.gpus.len(),
    }
}

/// Withholds items from the end of the largest lists until the report encodes to `target`
/// bytes or less.
fn withhold_to_fit(
    report: &mut pb::Report,
    target: usize,
    reason: &str,
    limit: usize,
) -> Option<Withholding> {
    let mut w = Withholding::default();
    let mut any = false;
    while report.encoded_len() > target {
        let Some((list, _)) = lists_by_size(report).first().copied() else {
            break;
        };
        // Take enough items at once that a report of 100,000 flows is not re-encoded 100,000
        // times: an eighth of the list, at least one.
        let n = len_of(report, list);
        let take = (n / 8).max(1);
        split_off(report, list, n - take, reason, limit, &mut w);
        any = true;
    }
    any.then_some(w)
}

/// Withholds the second half of the largest list.
fn withhold_half(report: &mut pb::Report, reason: &str, limit: usize) -> Option<Withholding> {
    let (list, _) = lists_by_size(report).first().copied()?;
    let n = len_of(report, list);
    let mut w = Withholding::default();
    split_off(report, list, n / 2, reason, limit, &mut w);
    Some(w)
}

fn split_off(
    report: &mut pb::Report,
    list: &str,
    at: usize,
    reason: &str,
    limit: usize,
    w: &mut Withholding,
) {
    match list {
        "weight_files" => {
            let gone = report.weight_files.split_off(at);
            let paths: Vec<String> = gone.iter().map(|f| f.path.clone()).collect();
            // Sent again later when one fits a report on its own; else only declared.
            let fits = |f: &pb::WeightFile| limit == 0 || f.encoded_len() <= limit / 2;
            w.requeue
                .extend(gone.iter().filter(|f| fits(f)).map(|f| f.path.clone()));
            declare_files(report, &paths, reason);
        }
        "flows" => {
            let gone = report.flows.split_off(at);
            declare_flows(report, &gone, reason);
        }
        "processes" => {
            let n = report.processes.len() - at;
            report.processes.truncate(at);
            declare_count(report, "process", n as u64, reason);
        }
        _ => {
            let n = report.gpus.len() - at;
            report.gpus.truncate(at);
            declare_count(report, "gpu", n as u64, reason);
        }
    }
}

/// The `Withheld` record of `kind` and `reason` in the report, made when missing.
fn record<'a>(report: &'a mut pb::Report, kind: &str, reason: &str) -> &'a mut pb::Withheld {
    let pos = report
        .withheld
        .iter()
        .position(|w| w.kind == kind && w.reason == reason);
    let pos = pos.unwrap_or_else(|| {
        report.withheld.push(pb::Withheld {
            kind: kind.to_owned(),
            reason: reason.to_owned(),
            ..Default::default()
        });
        report.withheld.len() - 1
    });
    &mut report.withheld[pos]
}

fn declare_files(report: &mut pb::Report, paths: &[String], reason: &str) {
    let w = record(report, "weight_file", reason);
    w.count += paths.len() as u64;
    for p in paths {
        if w.paths.len() < MAX_WITHHELD_PATHS {
            w.paths.push(p.clone());
        } else {
            w.paths_omitted += 1;
        }
    }
}

fn declare_flows(report: &mut pb::Report, flows: &[pb::Flow], reason: &str) {
    let w = record(report, "flow", reason);
    w.count += flows.len() as u64;
    for f in flows {
        w.bytes_sent = w.bytes_sent.saturating_add(f.bytes_sent);
        w.bytes_received = w.bytes_received.saturating_add(f.bytes_received);
    }
}

fn declare_count(report: &mut pb::Report, kind: &str, n: u64, reason: &str) {
    record(report, kind, reason).count += n;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, meta_bytes: usize) -> pb::WeightFile {
        pb::WeightFile {
            path: path.to_owned(),
            metadata: [("k".to_owned(), "v".repeat(meta_bytes))]
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    fn base() -> pb::Report {
        pb::Report {
            epoch: 7,
            node_info: Some(pb::NodeInfo {
                node: "n".into(),
                ..Default::default()
            }),
            host: Some(pb::HostSample {
                cpu_percent: 5.0,
                ..Default::default()
            }),
            processes: vec![pb::ProcessInfo {
                pid: 1,
                ..Default::default()
            }],
            flows: vec![pb::Flow {
                bytes_sent: 10,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_full_inventory_larger_than_the_budget_spans_chunks_of_one_generation() {
        let files: Vec<pb::WeightFile> = (0..40)
            .map(|i| file(&format!("/m/{i:02}"), 10_000))
            .collect();
        let inv = Inventory {
            generation: Some(99),
            files,
            removed: vec![],
        };
        let reports = pack(base(), inv, 64 * 1024);
        assert!(reports.len() >= 6, "{}", reports.len());
        let mut paths = Vec::new();
        for (i, r) in reports.iter().enumerate() {
            assert!(
                r.encoded_len() <= 64 * 1024,
                "report {i}: {}",
                r.encoded_len()
            );
            let chunk = r.weight_inventory.as_ref().unwrap();
            assert_eq!(
                (chunk.generation, chunk.index as usize, chunk.total_files),
                (99, i, 40)
            );
            assert_eq!(chunk.last, i == reports.len() - 1);
            assert!(
                !r.weight_inventory_full,
                "a part is never declared the whole"
            );
            assert_eq!(r.node_info.as_ref().unwrap().node, "n");
            if i > 0 {
                assert!(r.processes.is_empty() && r.flows.is_empty() && r.gpus.is_empty());
                assert_eq!(r.host.as_ref().unwrap().cpu_percent, 5.0);
            }
            paths.extend(r.weight_files.iter().map(|f| f.path.clone()));
        }
        assert_eq!(
            reports[0].flows.len(),
            1,
            "the interval's report keeps its flows"
        );
        let want: Vec<String> = (0..40).map(|i| format!("/m/{i:02}")).collect();
        assert_eq!(paths, want, "every file once, in path order");
    }

    #[test]
    fn a_full_inventory_that_fits_is_one_report_marked_full() {
        let inv = Inventory {
            generation: Some(5),
            files: vec![file("/m/a", 10)],
            removed: vec![],
        };
        let reports = pack(base(), inv, 1 << 20);
        assert_eq!(reports.len(), 1);
        assert!(reports[0].weight_inventory_full);
        assert!(reports[0].weight_inventory.as_ref().unwrap().last);
    }

    #[test]
    fn changes_are_packed_too_and_carry_no_chunk() {
        let inv = Inventory {
            generation: None,
            files: (0..10).map(|i| file(&format!("/m/{i}"), 10_000)).collect(),
            removed: vec!["/gone".into()],
        };
        let reports = pack(base(), inv, 40 * 1024);
        assert_eq!(reports.len(), 3, "four files of 10 kB per 40 KiB report");
        assert!(reports.iter().all(|r| r.encoded_len() <= 40 * 1024));
        assert!(
            reports
                .iter()
                .all(|r| r.weight_inventory.is_none() && !r.weight_inventory_full)
        );
        assert_eq!(reports[0].weight_files_removed, ["/gone"]);
        assert_eq!(
            reports.iter().map(|r| r.weight_files.len()).sum::<usize>(),
            10
        );
    }

    #[test]
    fn the_item_a_refusal_names_is_withheld_and_declared_and_not_sent_again() {
        let mut r = base();
        r.weight_files = vec![file("/m/a", 1), file("/m/b", 1), file("/m/c", 1)];
        let w = withhold(
            &mut r,
            Code::InvalidArgument,
            "weight_files[1].parameter_count 18446744073709551615 is larger than 2^63-1",
            0,
        )
        .unwrap();
        assert!(w.requeue.is_empty());
        let paths: Vec<&str> = r.weight_files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["/m/a", "/m/c"]);
        assert_eq!(r.withheld.len(), 1);
        let d = &r.withheld[0];
        assert_eq!((d.kind.as_str(), d.count), ("weight_file", 1));
        assert_eq!(d.paths, ["/m/b"]);
        assert!(
            d.reason.starts_with("InvalidArgument: weight_files[1]"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_named_flow_is_withheld_with_its_bytes_declared() {
        let mut r = base();
        r.flows = vec![
            pb::Flow {
                bytes_sent: 5,
                ..Default::default()
            },
            pb::Flow {
                bytes_sent: 1000,
                bytes_received: 3,
                ..Default::default()
            },
        ];
        withhold(
            &mut r,
            Code::InvalidArgument,
            "flows[1].remote_address \"x\" is not an IP address",
            0,
        )
        .unwrap();
        assert_eq!(r.flows.len(), 1);
        let d = &r.withheld[0];
        assert_eq!(
            (d.kind.as_str(), d.count, d.bytes_sent, d.bytes_received),
            ("flow", 1, 1000, 3)
        );
    }

    #[test]
    fn a_report_over_a_known_limit_is_trimmed_to_fit_and_its_files_requeued() {
        let mut r = base();
        r.weight_files = (0..30).map(|i| file(&format!("/m/{i:02}"), 4000)).collect();
        let limit = 40_000;
        assert!(r.encoded_len() > limit);
        let w = withhold(
            &mut r,
            Code::ResourceExhausted,
            "message too large",
            limit as u64,
        )
        .unwrap();
        assert!(r.encoded_len() <= limit * 3 / 4, "{}", r.encoded_len());
        let kept = r.weight_files.len();
        assert!(kept > 0);
        assert_eq!(
            w.requeue.len(),
            30 - kept,
            "every file left out goes out again later"
        );
        assert_eq!(r.withheld[0].count as usize, 30 - kept);
        assert_eq!(r.withheld[0].paths, w.requeue);
    }

    #[test]
    fn an_unexplained_refusal_halves_the_largest_list_until_nothing_is_left() {
        let mut r = base();
        r.weight_files = (0..8).map(|i| file(&format!("/m/{i}"), 100)).collect();
        let mut steps = 0;
        while withhold(&mut r, Code::InvalidArgument, "something is wrong", 0).is_some() {
            steps += 1;
            assert!(steps < 64, "bounded");
        }
        assert!(r.weight_files.is_empty() && r.flows.is_empty() && r.processes.is_empty());
        let declared: u64 = r.withheld.iter().map(|w| w.count).sum();
        assert_eq!(declared, 8 + 1 + 1, "every item left out is declared");
        assert!(steps <= 8, "{steps} steps");
    }

    #[test]
    fn refused_gaps_are_declared_not_silently_lost() {
        let mut r = base();
        r.seq = 5;
        r.gaps = vec![pb::Gap {
            first_seq: 9,
            last_seq: 9,
            ..Default::default()
        }];
        let w = withhold(
            &mut r,
            Code::InvalidArgument,
            "gaps[0] 9..=9 must satisfy 1 <= first_seq <= last_seq < seq (5)",
            0,
        )
        .unwrap();
        assert!(w.gaps_withheld);
        assert!(r.gaps.is_empty());
        assert_eq!(r.withheld[0].kind, "gap");
    }

    #[test]
    fn a_name_inside_another_word_is_not_taken_for_the_list() {
        assert_eq!(named_item("removed_flows[2] bad"), None);
        assert_eq!(
            named_item("x: flows[2] bad, weight_files[0]"),
            Some(("flows", 2))
        );
        assert_eq!(named_item("weight_files[] bad"), None);
        assert_eq!(
            named_item("gaps has 20000 entries"),
            Some(("gaps", usize::MAX))
        );
    }

    #[test]
    fn the_budget_follows_the_collectors_limit() {
        assert_eq!(report_budget(0), DEFAULT_REPORT_BUDGET_BYTES);
        assert_eq!(report_budget(16 << 20), DEFAULT_REPORT_BUDGET_BYTES);
        assert_eq!(report_budget(1 << 20), 512 << 10);
        assert_eq!(report_budget(100), 4096);
    }
}
