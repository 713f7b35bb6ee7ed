//! The store test suite that every backend runs: each `pub(crate) async fn` here checks one
//! behaviour of [`Store`] through its public methods (plus row counts with SQL both backends
//! accept). A backend's tests call [`store_suite!`] with its [`Fixture`], which makes one
//! `#[tokio::test]` per suite function on a fresh, empty store.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use sov_proto::pb;

use super::{
    BreachChange, BreachFilter, Derivation, EgressQuery, FlowRecord, GapRecord, IncomingReport,
    IngestOutcome, NewEnrollToken, NodePeer, OutboxItem, Retention, Settle, SinkStats, Store,
    StoreError, Telemetry, TokenSpend, WeightUpdate,
};
use crate::breach::{BreachState, Observation, Severity};
use sov_evidence::chain::{ChainVerifier, LogRecord, verify_chain};

/// A store under test and a way to look at its tables.
#[async_trait::async_trait(?Send)]
pub(crate) trait Backend {
    /// The store.
    fn store(&self) -> &dyn Store;
    /// The value of `sql`, a `SELECT COUNT(*) ...` that both SQLite and PostgreSQL accept.
    async fn count(&self, sql: &str) -> i64;
}

/// How a backend makes a fresh store for one test and cleans up after it.
#[async_trait::async_trait(?Send)]
pub(crate) trait Fixture: Backend + Sized {
    /// A fresh, empty store; `None` when the backend cannot run here (the test is skipped,
    /// after saying so).
    async fn create() -> Option<Self>;
    /// Remove what `create` made (runs even when the test failed).
    async fn destroy(self);
}

/// Run one suite function on a fresh store of backend `F`.
pub(crate) async fn run<F: Fixture>(test: for<'a> fn(&'a dyn Backend) -> LocalBoxFuture<'a, ()>) {
    let Some(fixture) = F::create().await else {
        return;
    };
    let outcome = AssertUnwindSafe(test(&fixture)).catch_unwind().await;
    fixture.destroy().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// One `#[tokio::test]` per suite function, on the given [`Fixture`] type.
macro_rules! store_suite {
    ($fixture:ty) => {
        $crate::store::suite::store_suite!(@tests $fixture;
            a_report_is_stored_once_and_a_resend_is_a_duplicate,
            an_appended_report_is_derived_once_after_its_ack,
            a_nodes_waiting_reports_are_read_alone_in_queue_order,
            a_stale_batch_does_not_take_a_newer_report_queued_under_its_id,
            one_batch_derives_a_nodes_reports_of_one_instant_as_one_after_the_other,
            missing_counts_holes_and_dropped_counts_declared_gaps,
            a_new_epoch_becomes_the_nodes_current_one,
            nodes_are_paged_in_name_order,
            the_latest_observation_wins_even_when_an_older_report_arrives_later,
            telemetry_becomes_time_series_rows_and_the_nodes_latest_gpu_columns,
            pruning_removes_old_samples_but_keeps_report_keys_idempotent,
            copies_of_one_model_on_two_nodes_are_listed_together_with_their_users,
            a_models_declared_bases_are_listed_with_it_and_bounded,
            a_training_run_is_kept_at_its_latest_state_and_its_outputs_derive_from_it,
            deltas_add_and_remove_and_a_full_inventory_removes_what_it_does_not_list,
            a_chunked_inventory_removes_what_no_chunk_names_once_every_chunk_is_held,
            egress_is_grouped_ordered_by_bytes_sent_and_limited,
            egress_adds_flows_within_a_minute_and_ignores_resends_and_inbound,
            egress_refuses_an_unknown_grouping,
            the_rules_read_leaves_out_only_what_is_plainly_inside,
            pruning_removes_old_flows,
            raw_samples_fold_into_minute_aggregates_that_outlive_them,
            a_breach_opens_updates_and_resolves_with_one_log_record_per_change,
            breaches_are_deduplicated_by_rule_node_and_subject,
            an_unchanged_observation_appends_nothing_and_a_new_severity_does,
            only_quiet_open_breaches_of_the_rule_are_resolved,
            an_evaluation_recorded_at_once_does_what_its_steps_do_one_by_one,
            breaches_are_listed_by_state_rule_and_time_newest_first,
            the_breach_log_is_a_verifiable_chain_read_in_pages_and_never_pruned,
            the_outbox_keeps_one_row_per_sink_and_record_delivered_in_order,
            a_lease_belongs_to_one_holder_until_it_expires,
            a_nodes_peer_address_is_kept_latest_first,
            egress_by_flow_keeps_node_process_and_destination_apart,
            every_answer_and_how_bytes_were_measured_are_kept_with_the_flow,
            flows_of_reports_derived_in_one_batch_merge_as_the_database_merges_them,
            audit_records_form_a_verifiable_chain_read_in_pages,
            an_audit_record_keeps_who_what_parameters_and_result_size,
            tokens_are_found_by_their_hash_only,
            gpu_seconds_are_summed_per_process_within_the_range,
            reports_are_counted_per_node_within_the_range,
            missing_ranges_name_every_hole_of_an_epoch,
            tokens_are_listed_and_a_deleted_token_is_gone,
            reports_pushed_together_are_each_stored_once_whatever_batch_they_share,
            a_bad_report_pushed_with_others_fails_alone,
            flows_with_one_key_in_one_report_become_one_aggregate_row,
            an_enrollment_token_is_spent_once_and_then_names_who_spent_it,
            an_expired_or_unknown_enrollment_token_is_refused_as_such,
            egress_is_grouped_by_pod_namespace_image_and_container,
            gpu_seconds_are_named_with_their_kubernetes_namespace,
            weight_copies_and_users_carry_their_container,
            hour_rows_total_the_minutes_and_answers_are_the_same_after_a_rollup,
            day_rows_total_the_minutes_and_answers_survive_the_minutes,
            fleet_rows_are_the_sums_of_the_node_rows_through_rollups_late_rows_and_retention,
            node_level_groupings_over_rollups_list_the_largest_first_and_count_the_rest,
            late_rows_derived_in_one_batch_reach_their_hour_day_and_fleet_rows_once,
            late_rows_derived_in_one_batch_enter_leave_and_move_within_the_contested_level,
            contested_rows_serve_the_scorecard_through_rollups_late_rows_and_retention,
        );
    };
    (@tests $fixture:ty; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                $crate::store::suite::run::<$fixture>(|db| {
                    ::std::boxed::Box::pin($crate::store::suite::$name(db))
                })
                .await;
            }
        )*
    };
}
pub(crate) use store_suite;

pub(crate) use super::suite_containers::{
    egress_is_grouped_by_pod_namespace_image_and_container,
    gpu_seconds_are_named_with_their_kubernetes_namespace,
    weight_copies_and_users_carry_their_container,
};
pub(crate) use super::suite_late::{
    late_rows_derived_in_one_batch_enter_leave_and_move_within_the_contested_level,
    late_rows_derived_in_one_batch_reach_their_hour_day_and_fleet_rows_once,
};
pub(crate) use super::suite_rollup::{
    contested_rows_serve_the_scorecard_through_rollups_late_rows_and_retention,
    day_rows_total_the_minutes_and_answers_survive_the_minutes,
    fleet_rows_are_the_sums_of_the_node_rows_through_rollups_late_rows_and_retention,
    hour_rows_total_the_minutes_and_answers_are_the_same_after_a_rollup,
    node_level_groupings_over_rollups_list_the_largest_first_and_count_the_rest,
};

/// A report of node `node` observed at `seq` seconds, received 5 ms later.
pub(crate) fn report(node: &str, epoch: u64, seq: u64) -> IncomingReport {
    let at = i64::try_from(seq).unwrap_or(i64::MAX / 2_000) * 1000;
    IncomingReport {
        node: node.to_owned(),
        epoch,
        seq,
        observed_unix_ms: at,
        received_unix_ms: at + 5,
        site: "rabat-1".into(),
        country: "MA".into(),
        hostname: format!("{node}.local"),
        agent_version: "0.1.0".into(),
        labels: BTreeMap::from([("rack".to_owned(), "r1".to_owned())]),
        cpu_percent: 12.5,
        memory_used_bytes: 100,
        memory_total_bytes: 1000,
        telemetry: Default::default(),
        gaps: vec![],
        body: vec![1, 2, 3],
    }
}

/// A host sample and two GPUs (90 % and 30 % busy), the first used by `vllm` (pid 4242).
pub(crate) fn telemetry() -> Telemetry {
    let gpu = |index: u32, util: u32, pids: &[u32]| pb::GpuSample {
        index,
        uuid: format!("GPU-{index}"),
        name: "NVIDIA H100".into(),
        utilization_gpu_percent: util,
        memory_used_bytes: 10 << 30,
        memory_total_bytes: 80 << 30,
        processes: pids
            .iter()
            .map(|&pid| pb::GpuProcess {
                pid,
                gpu_seconds: 7.5,
                used_memory_bytes: 1 << 30,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    Telemetry {
        host: Some(pb::HostSample {
            cpu_percent: 40.0,
            memory_total_bytes: 1000,
            ..Default::default()
        }),
        gpu_state: Some(pb::GpuState {
            availability: pb::gpu_state::Availability::Available as i32,
            ..Default::default()
        }),
        gpus: vec![gpu(0, 90, &[4242]), gpu(1, 30, &[])],
        processes: vec![pb::ProcessInfo {
            pid: 4242,
            name: "vllm".into(),
            exe: "/usr/bin/python3".into(),
            ..Default::default()
        }],
        weights: Default::default(),
        flows: Default::default(),
        training: Default::default(),
    }
}

/// Append `r`, then derive it from the telemetry it carries (what the deriver builds from
/// its body), as the collector does after the ack.
pub(crate) async fn ingest(store: &dyn Store, r: IncomingReport) -> IngestOutcome {
    let outcome = store.ingest(r.clone()).await.unwrap();
    derive_matching(store, &r).await;
    outcome
}

/// Derive the queued report with `r`'s key (if queued) from `r`'s telemetry; how many were
/// derived.
async fn derive_matching(store: &dyn Store, r: &IncomingReport) -> u64 {
    let batch: Vec<Derivation> = store
        .underived(100_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|u| (u.node.as_str(), u.epoch, u.seq) == (r.node.as_str(), r.epoch, r.seq))
        .map(|u| Derivation {
            queue_id: u.queue_id,
            report: r.clone(),
        })
        .collect();
    store.derive(batch).await.unwrap()
}

/// Two reports of one node observed at the same instant (a re-numbered re-send) derived in
/// one batch: the samples are the later report's, as one write per report in queue order
/// would leave them (PostgreSQL writes each table once per batch), and both reports' flows
/// are counted; each report's foreign flows are one row.
pub(crate) async fn one_batch_derives_a_nodes_reports_of_one_instant_as_one_after_the_other(
    db: &dyn Backend,
) {
    let store = db.store();
    let mut first = report("a", 1, 1);
    first.telemetry = telemetry();
    first.telemetry.flows = vec![flow(
        4242,
        "vllm",
        ("1.1.1.1", 443),
        US_CLOUDFLARE,
        1000,
        10,
        500,
        120_000,
    )];
    let mut second = first.clone();
    second.seq = 2;
    if let Some(h) = second.telemetry.host.as_mut() {
        h.cpu_percent = 75.0;
    }
    second.telemetry.gpus[0].utilization_gpu_percent = 10;
    second.telemetry.gpus[0].processes[0].gpu_seconds = 9.5;
    for r in [&first, &second] {
        assert_eq!(
            store.ingest(r.clone()).await.unwrap(),
            IngestOutcome::Stored
        );
    }
    let queued = store.underived(10).await.unwrap();
    assert_eq!(queued.len(), 2);
    let batch: Vec<Derivation> = queued
        .iter()
        .zip([&first, &second])
        .map(|(u, r)| Derivation {
            queue_id: u.queue_id,
            report: r.clone(),
        })
        .collect();
    assert_eq!(store.derive(batch).await.unwrap(), 2);
    assert_eq!(store.derive_status().await.unwrap().pending, 0);
    assert_eq!(db.count("SELECT COUNT(*) FROM host_samples").await, 1);
    assert_eq!(
        db.count("SELECT CAST(cpu_percent AS BIGINT) FROM host_samples")
            .await,
        75
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM gpu_samples").await, 2);
    assert_eq!(
        db.count("SELECT utilization_percent FROM gpu_samples WHERE gpu_uuid = 'GPU-0'")
            .await,
        10
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM gpu_usage").await, 1);
    assert_eq!(
        db.count("SELECT CAST(gpu_seconds * 10 AS BIGINT) FROM gpu_usage")
            .await,
        95
    );
    let nodes = store.list_nodes("", 10).await.unwrap();
    assert!(
        (nodes[0].gpu_util_percent - 20.0).abs() < 0.01,
        "the later report's GPU columns: {nodes:?}"
    );
    let (rows, _) = egress(store, "destination", 10).await;
    assert_eq!(rows.iter().map(|r| r.bytes_sent).sum::<u64>(), 2000);
    assert_eq!(db.count("SELECT COUNT(*) FROM foreign_flows").await, 2);
    assert_eq!(db.count(RAW_FLOWS).await, 2);
}

/// A batch read, then derived another way (its reports derived first), then handed over
/// again after a newer report was queued: the newer report stays queued and is derived once,
/// even where the database gives the newer row the old row's id (SQLite's rowids).
pub(crate) async fn a_stale_batch_does_not_take_a_newer_report_queued_under_its_id(
    db: &dyn Backend,
) {
    let store = db.store();
    let with_flow = |node: &str, seq: u64, bytes: u64| {
        let mut r = report(node, 1, seq);
        r.telemetry.flows = vec![flow(
            1,
            "p",
            ("1.1.1.1", 443),
            US_CLOUDFLARE,
            bytes,
            0,
            0,
            T,
        )];
        r
    };
    let a = with_flow("a", 1, 10);
    assert_eq!(
        store.ingest(a.clone()).await.unwrap(),
        IngestOutcome::Stored
    );
    let read = store.underived(10).await.unwrap();
    let stale = vec![Derivation {
        queue_id: read[0].queue_id,
        report: a.clone(),
    }];
    // Derived first, through its own read.
    let first = store.underived_of(&["a".into()], 10).await.unwrap();
    let batch = vec![Derivation {
        queue_id: first[0].queue_id,
        report: a,
    }];
    assert_eq!(store.derive(batch).await.unwrap(), 1);
    // A newer report is queued (SQLite: under the id just freed), then the stale batch comes.
    let b = with_flow("b", 1, 1000);
    assert_eq!(
        store.ingest(b.clone()).await.unwrap(),
        IngestOutcome::Stored
    );
    assert_eq!(
        store.derive(stale).await.unwrap(),
        0,
        "nothing of the stale batch"
    );
    let queued = store.underived(10).await.unwrap();
    assert_eq!(
        queued.iter().map(|u| u.node.as_str()).collect::<Vec<_>>(),
        ["b"],
        "the newer report is still queued"
    );
    let batch = vec![Derivation {
        queue_id: queued[0].queue_id,
        report: b,
    }];
    assert_eq!(store.derive(batch).await.unwrap(), 1);
    let (rows, _) = egress(store, "node", 10).await;
    let sums: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| (r.node.as_str(), r.bytes_sent))
        .collect();
    assert_eq!(sums, [("b", 1000), ("a", 10)], "each derived once");
}

/// `underived_of`: the deriver reads the waiting reports of the nodes it is told to derive
/// first (reports that may breach a rule), each node's in queue order, nobody else's.
pub(crate) async fn a_nodes_waiting_reports_are_read_alone_in_queue_order(db: &dyn Backend) {
    let store = db.store();
    for (node, seq) in [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("a", 3)] {
        assert_eq!(
            store.ingest(report(node, 1, seq)).await.unwrap(),
            IngestOutcome::Stored
        );
    }
    // The deriver's read (on PostgreSQL it takes its partitions first).
    assert_eq!(store.underived(10).await.unwrap().len(), 5);
    let of = |q: Vec<super::Underived>| -> Vec<(String, u64)> {
        q.into_iter().map(|u| (u.node, u.seq)).collect()
    };
    let want = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
        v.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect()
    };
    assert_eq!(
        of(store
            .underived_of(&["a".into(), "c".into()], 10)
            .await
            .unwrap()),
        want(&[("a", 1), ("a", 2), ("c", 1), ("a", 3)])
    );
    assert_eq!(
        of(store.underived_of(&["a".into()], 2).await.unwrap()),
        want(&[("a", 1), ("a", 2)])
    );
    assert!(store.underived_of(&[], 10).await.unwrap().is_empty());
    assert!(
        store
            .underived_of(&["zz".into()], 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub(crate) async fn an_appended_report_is_derived_once_after_its_ack(db: &dyn Backend) {
    let store = db.store();
    let mut r = report("a", 1, 1);
    r.telemetry = telemetry();
    r.telemetry.flows = vec![flow(
        10,
        "vllm",
        ("1.1.1.1", 443),
        US_CLOUDFLARE,
        1000,
        10,
        500,
        120_000,
    )];
    // The append: the report and its completeness, nothing derived yet.
    assert_eq!(
        store.ingest(r.clone()).await.unwrap(),
        IngestOutcome::Stored
    );
    assert_eq!(store.list_nodes("", 10).await.unwrap()[0].reports, 1);
    assert_eq!(db.count("SELECT COUNT(*) FROM gpu_samples").await, 0);
    assert_eq!(db.count("SELECT COUNT(*) FROM flows_minute").await, 0);
    let status = store.derive_status().await.unwrap();
    assert_eq!(status.pending, 1);
    assert_eq!(
        status.oldest_pending_received_unix_ms,
        Some(r.received_unix_ms)
    );
    assert_eq!(status.derived_up_to(i64::MAX), r.received_unix_ms);
    // A re-send is not queued again.
    assert_eq!(
        store.ingest(r.clone()).await.unwrap(),
        IngestOutcome::Duplicate
    );
    let queued = store.underived(10).await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(
        (queued[0].node.as_str(), queued[0].epoch, queued[0].seq),
        ("a", 1, 1)
    );
    assert_eq!(queued[0].body, r.body);
    // Derived once: the same batch handed over again derives nothing.
    let batch = vec![Derivation {
        queue_id: queued[0].queue_id,
        report: r.clone(),
    }];
    assert_eq!(store.derive(batch.clone()).await.unwrap(), 1);
    assert_eq!(store.derive(batch).await.unwrap(), 0);
    assert_eq!(db.count("SELECT COUNT(*) FROM gpu_samples").await, 2);
    let (rows, _) = store
        .egress(EgressQuery {
            since_unix_ms: 0,
            until_unix_ms: 600_000,
            by: "country".into(),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].bytes_sent, 1000, "{rows:?}");
    let status = store.derive_status().await.unwrap();
    assert_eq!(status.pending, 0);
    assert_eq!(status.derived_up_to(42), 42);
    assert!(store.underived(10).await.unwrap().is_empty());
}

pub(crate) async fn a_report_is_stored_once_and_a_resend_is_a_duplicate(db: &dyn Backend) {
    let store = db.store();
    assert_eq!(
        ingest(store, report("a", 7, 1)).await,
        IngestOutcome::Stored
    );
    assert_eq!(
        ingest(store, report("a", 7, 1)).await,
        IngestOutcome::Duplicate
    );
    assert_eq!(
        ingest(store, report("a", 7, 2)).await,
        IngestOutcome::Stored
    );
    let mut reused = report("a", 7, 2);
    reused.observed_unix_ms += 1;
    assert_eq!(ingest(store, reused).await, IngestOutcome::Conflict);
    let nodes = store.list_nodes("", 10).await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        (nodes[0].reports, nodes[0].last_seq, nodes[0].missing),
        (2, 2, 0)
    );
    assert_eq!(nodes[0].conflicts, 1);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM reports WHERE node = 'a' AND epoch = 7")
            .await,
        2
    );
}

pub(crate) async fn missing_counts_holes_and_dropped_counts_declared_gaps(db: &dyn Backend) {
    let store = db.store();
    ingest(store, report("a", 1, 1)).await;
    // 2..=4 dropped by the agent and declared; 6 lost without a word.
    let mut r5 = report("a", 1, 5);
    r5.gaps = vec![GapRecord {
        first_seq: 2,
        last_seq: 4,
        reason: "spool_full".into(),
        dropped_unix_ms: 1,
    }];
    ingest(store, r5).await;
    ingest(store, report("a", 1, 7)).await;
    let n = &store.list_nodes("", 10).await.unwrap()[0];
    assert_eq!((n.reports, n.last_seq, n.missing, n.dropped), (3, 7, 4, 3));
    // A late arrival of seq 3 (it was in flight when dropped) shrinks both.
    ingest(store, report("a", 1, 3)).await;
    let n = &store.list_nodes("", 10).await.unwrap()[0];
    assert_eq!((n.missing, n.dropped), (3, 2));
}

pub(crate) async fn a_new_epoch_becomes_the_nodes_current_one(db: &dyn Backend) {
    let store = db.store();
    for s in 1..=3 {
        ingest(store, report("a", 100, s)).await;
    }
    ingest(store, report("a", 200, 1)).await;
    let n = &store.list_nodes("", 10).await.unwrap()[0];
    assert_eq!((n.epoch, n.reports, n.last_seq, n.epochs), (200, 1, 1, 2));
}

pub(crate) async fn nodes_are_paged_in_name_order(db: &dyn Backend) {
    let store = db.store();
    // Byte order: upper case before lower case, whatever the database's collation.
    for node in ["c", "a", "b", "B"] {
        ingest(store, report(node, 1, 1)).await;
    }
    let names = |v: &[super::NodeRow]| v.iter().map(|n| n.node.clone()).collect::<Vec<_>>();
    let first = store.list_nodes("", 2).await.unwrap();
    assert_eq!(names(&first), ["B", "a"]);
    let rest = store.list_nodes("a", 2).await.unwrap();
    assert_eq!(names(&rest), ["b", "c"]);
    assert!(store.list_nodes("c", 2).await.unwrap().is_empty());
    assert_eq!(rest[0].labels.get("rack").map(String::as_str), Some("r1"));
    assert_eq!(
        (rest[0].site.as_str(), rest[0].hostname.as_str()),
        ("rabat-1", "b.local")
    );
}

pub(crate) async fn the_latest_observation_wins_even_when_an_older_report_arrives_later(
    db: &dyn Backend,
) {
    let store = db.store();
    let mut newer = report("a", 1, 2);
    newer.agent_version = "0.2.0".into();
    newer.memory_used_bytes = 200;
    ingest(store, newer).await;
    let mut older = report("a", 1, 1);
    older.agent_version = "0.1.0".into();
    older.received_unix_ms = 9_000;
    ingest(store, older).await;
    let n = &store.list_nodes("", 10).await.unwrap()[0];
    assert_eq!(
        (n.agent_version.as_str(), n.memory_used_bytes),
        ("0.2.0", 200)
    );
    // Receiving is still recorded.
    assert_eq!((n.last_seen_unix_ms, n.reports), (9_000, 2));
}

pub(crate) async fn telemetry_becomes_time_series_rows_and_the_nodes_latest_gpu_columns(
    db: &dyn Backend,
) {
    let store = db.store();
    for seq in 1..=3 {
        let mut r = report("a", 1, seq);
        r.telemetry = telemetry();
        ingest(store, r).await;
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM host_samples").await, 3);
    assert_eq!(db.count("SELECT COUNT(*) FROM gpu_samples").await, 6);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM gpu_usage WHERE process_name = 'vllm' AND pid = 4242")
            .await,
        3
    );
    let n = &store.list_nodes("", 10).await.unwrap()[0];
    assert_eq!((n.gpu_state.as_str(), n.gpu_count), ("ok", 2));
    assert!((n.gpu_util_percent - 60.0).abs() < 0.01, "{n:?}");
    assert_eq!(n.gpu_memory_total_bytes, 160 << 30);
    assert_eq!(n.gpu_memory_used_bytes, 20 << 30);
    // An older report arriving late does not overwrite the latest columns.
    let mut late = report("a", 1, 4);
    late.observed_unix_ms = 1;
    late.telemetry = Telemetry::default();
    ingest(store, late).await;
    assert_eq!(store.list_nodes("", 10).await.unwrap()[0].gpu_count, 2);
}

pub(crate) async fn pruning_removes_old_samples_but_keeps_report_keys_idempotent(db: &dyn Backend) {
    let store = db.store();
    for seq in 1..=4 {
        let mut r = report("a", 1, seq);
        r.telemetry = telemetry();
        ingest(store, r).await;
    }
    // Reports 1 and 2 were observed (and received) before 2500 ms.
    let pruned = store.prune(Retention::all_before(2500)).await.unwrap();
    assert_eq!(
        (
            pruned.host_samples,
            pruned.gpu_samples,
            pruned.gpu_usage,
            pruned.report_bodies
        ),
        (2, 4, 2, 2)
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM host_samples").await, 2);
    // Pruning again finds no bodies left to empty.
    assert_eq!(
        store
            .prune(Retention::all_before(2500))
            .await
            .unwrap()
            .report_bodies,
        0
    );
    assert_eq!(
        ingest(store, report("a", 1, 1)).await,
        IngestOutcome::Duplicate
    );
    let n = &store.list_nodes("", 10).await.unwrap()[0];
    assert_eq!((n.reports, n.last_seq, n.missing), (4, 4, 0));
}

pub(crate) fn weight(path: &str, model: &str, sha: &str) -> pb::WeightFile {
    pb::WeightFile {
        path: path.into(),
        format: pb::WeightFormat::Safetensors as i32,
        size_bytes: 1000,
        mtime_unix_ms: 5,
        sha256: sha.into(),
        parameter_count: 250,
        identity: Some(pb::ModelIdentity {
            model: model.into(),
            source: "hf-cache".into(),
            ..Default::default()
        }),
        storage: Some(pb::StorageLocation {
            fs_type: "nfs4".into(),
            network: true,
            server_address: "10.0.0.5".into(),
            mount_point: "/models".into(),
            ..Default::default()
        }),
        users: vec![pb::WeightUser {
            pid: 77,
            process: "vllm".into(),
            mapped: true,
            gpu_uuids: vec!["GPU-0".into()],
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn inventory(
    store: &dyn Store,
    node: &str,
    seq: u64,
    full: bool,
    files: Vec<pb::WeightFile>,
    removed: Vec<String>,
) {
    let mut r = report(node, 1, seq);
    r.telemetry.weights = WeightUpdate {
        full,
        files,
        removed,
        ..Default::default()
    };
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
}

pub(crate) async fn a_models_declared_bases_are_listed_with_it_and_bounded(db: &dyn Backend) {
    let store = db.store();
    let base = |name: &str, source: &str| pb::BaseModel {
        name: name.into(),
        source: source.into(),
        ..Default::default()
    };
    let mut adapter = weight("/models/lora/adapter_model.safetensors", "lora", "");
    if let Some(id) = adapter.identity.as_mut() {
        id.adapter_type = "LORA".into();
        id.base_models = vec![base("mistralai/Mistral-7B-v0.1", "adapter-config")];
    }
    // A hostile node: 100 bases, one with a 10 kB name.
    let mut hostile = weight("/models/h.safetensors", "hostile", "");
    if let Some(id) = hostile.identity.as_mut() {
        id.base_models = (0..100)
            .map(|i| base(&format!("b/{i}"), "gguf-metadata"))
            .collect();
        id.base_models[0].name = "é".repeat(5000);
    }
    inventory(
        store,
        "a",
        1,
        true,
        vec![adapter, hostile, weight("/models/plain.gguf", "plain", "")],
        vec![],
    )
    .await;
    let all = store.list_models("", "", 10).await.unwrap();
    let get = |m: &str| all.iter().find(|x| x.model == m).unwrap();
    let lora = get("lora");
    assert_eq!(lora.adapter_type, "LORA");
    assert_eq!(lora.base_models.len(), 1);
    assert_eq!(
        (
            lora.base_models[0].name.as_str(),
            lora.base_models[0].source.as_str()
        ),
        ("mistralai/Mistral-7B-v0.1", "adapter-config")
    );
    let h = get("hostile");
    assert_eq!(h.base_models.len(), crate::store::rows::MAX_MODEL_BASES);
    assert!(h.base_models[0].name.len() <= crate::store::rows::MAX_MODEL_BASE_FIELD_BYTES);
    assert!(h.base_models[0].name.starts_with('é'));
    let plain = get("plain");
    assert!(plain.base_models.is_empty() && plain.adapter_type.is_empty());
}

pub(crate) async fn a_training_run_is_kept_at_its_latest_state_and_its_outputs_derive_from_it(
    db: &dyn Backend,
) {
    let store = db.store();
    let run = |gpu_seconds: f64, outputs: &[&str]| pb::TrainingRun {
        run_id: "4242-100-abcd".into(),
        pid: 4242,
        process: "python3".into(),
        start_unix_ms: 1_000,
        last_activity_unix_ms: 1_000 + (gpu_seconds as i64),
        gpu_seconds,
        inputs: vec![
            pb::TrainingInput {
                kind: "base-weights".into(),
                path: "/models/base/model.safetensors".into(),
                model: "mistralai/Mistral-7B-v0.1".into(),
                mapped: true,
                ..Default::default()
            },
            pb::TrainingInput {
                kind: "dataset".into(),
                path: "/data/train.parquet".into(),
                format: "parquet".into(),
                size_bytes: 5 << 20,
                ..Default::default()
            },
        ],
        outputs: outputs
            .iter()
            .map(|p| pb::TrainingOutput {
                path: (*p).into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut r = report("gpu-1", 1, 1);
    r.telemetry.training = vec![run(30.0, &["/out/ckpt-1.safetensors"])];
    r.telemetry.weights = WeightUpdate {
        full: true,
        files: vec![weight("/out/ckpt-1.safetensors", "ckpt-1", "")],
        removed: vec![],
        ..Default::default()
    };
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
    // The next report: more GPU time, a second checkpoint.
    let mut r = report("gpu-1", 1, 2);
    r.telemetry.training = vec![run(
        60.0,
        &["/out/ckpt-1.safetensors", "/out/ckpt-2.safetensors"],
    )];
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);

    let runs = store.list_training(0, 10).await.unwrap();
    assert_eq!(runs.len(), 1, "one run, at its latest state: {runs:?}");
    let s = &runs[0];
    assert_eq!(
        (s.node.as_str(), s.site.as_str(), s.country.as_str()),
        ("gpu-1", "rabat-1", "MA")
    );
    let got = s.run.clone().unwrap();
    assert_eq!(got.gpu_seconds, 60.0);
    assert_eq!(got.outputs.len(), 2);
    assert_eq!(got.inputs[1].format, "parquet");
    // Runs whose activity is older than `since` are left out.
    assert!(
        store
            .list_training(10_000_000, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let models = store.list_models("", "", 10).await.unwrap();
    let ckpt = models.iter().find(|m| m.model == "ckpt-1").unwrap();
    assert_eq!(ckpt.derived_from_run, "gpu-1:4242-100-abcd");
    let observed: Vec<(&str, &str)> = ckpt
        .base_models
        .iter()
        .map(|b| (b.name.as_str(), b.source.as_str()))
        .collect();
    assert_eq!(
        observed,
        vec![("mistralai/Mistral-7B-v0.1", "training-run")]
    );
}

pub(crate) async fn copies_of_one_model_on_two_nodes_are_listed_together_with_their_users(
    db: &dyn Backend,
) {
    let store = db.store();
    let sha = "a".repeat(64);
    inventory(
        store,
        "a",
        1,
        true,
        vec![
            weight("/models/x.safetensors", "org/x", &sha),
            weight("/models/y.gguf", "y", ""),
        ],
        vec![],
    )
    .await;
    inventory(
        store,
        "b",
        1,
        true,
        vec![weight("/srv/x.safetensors", "org/x", &sha)],
        vec![],
    )
    .await;
    let all = store.list_models("", "", 10).await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    let x = all.iter().find(|m| m.model == "org/x").unwrap();
    assert_eq!(x.key, format!("org/x|{sha}"));
    assert_eq!(x.copies.len(), 2);
    assert_eq!(
        (
            x.copies[0].node.as_str(),
            x.copies[0].storage.as_str(),
            x.copies[0].server.as_str()
        ),
        ("a", "nfs4", "10.0.0.5")
    );
    assert_eq!(
        (x.copies[1].node.as_str(), x.copies[1].path.as_str()),
        ("b", "/srv/x.safetensors")
    );
    assert_eq!(x.copies[0].country, "MA");
    assert_eq!(x.copies[0].site, "rabat-1");
    assert_eq!(x.copies[0].mount_point, "/models");
    assert_eq!(x.users.len(), 2);
    assert_eq!(
        (x.users[0].pid, x.users[0].gpus.clone()),
        (77, vec!["GPU-0".to_owned()])
    );
    assert_eq!((x.format.as_str(), x.parameter_count), ("safetensors", 250));
    assert_eq!(
        (x.size_bytes, x.identity_source.as_str()),
        (1000, "hf-cache")
    );
    // Lookup by sha256 (any case) and by name; paging by key.
    assert_eq!(store.list_models(&sha, "", 10).await.unwrap().len(), 1);
    assert_eq!(
        store
            .list_models(&sha.to_uppercase(), "", 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.list_models("ORG/", "", 10).await.unwrap().len(), 1);
    assert!(
        store
            .list_models("nothing", "", 10)
            .await
            .unwrap()
            .is_empty()
    );
    let first = store.list_models("", "", 1).await.unwrap();
    assert_eq!(first.len(), 1);
    let rest = store.list_models("", &first[0].key, 10).await.unwrap();
    assert_eq!(first.len() + rest.len(), 2);
    assert_ne!(first[0].key, rest[0].key);
    // A page of one model holds all of its copies.
    assert_eq!(first[0].key, x.key);
    assert_eq!(first[0].copies.len(), 2);
    // The scorecard's read: the same models in the same order, each with its name,
    // publisher, size, every copy's place and every user's pid; at most `cap` of them.
    let (holdings, cut) = store.model_holdings(10).await.unwrap();
    assert!(!cut);
    assert_eq!(
        holdings.iter().map(held).collect::<Vec<_>>(),
        all.iter().map(held).collect::<Vec<_>>()
    );
    assert_eq!(holdings[0].copies.len(), 2);
    assert_eq!(holdings[0].users.len(), 2);
    let (one, cut) = store.model_holdings(1).await.unwrap();
    assert!(cut, "two models, one asked for");
    assert_eq!(one.iter().map(held).collect::<Vec<_>>(), [held(&all[0])]);
}

/// What [`Store::model_holdings`] reads of a listed model: key, name, publisher and size,
/// each copy's node, site and country, and each user's node and pid (sorted).
type Held = (
    String,
    String,
    String,
    u64,
    Vec<(String, String, String)>,
    Vec<(String, u32)>,
);

fn held(m: &pb::ModelSummary) -> Held {
    let mut copies: Vec<_> = m
        .copies
        .iter()
        .map(|c| (c.node.clone(), c.site.clone(), c.country.clone()))
        .collect();
    copies.sort();
    let mut users: Vec<_> = m.users.iter().map(|u| (u.node.clone(), u.pid)).collect();
    users.sort();
    (
        m.key.clone(),
        m.model.clone(),
        m.publisher.clone(),
        m.size_bytes,
        copies,
        users,
    )
}

pub(crate) async fn deltas_add_and_remove_and_a_full_inventory_removes_what_it_does_not_list(
    db: &dyn Backend,
) {
    let store = db.store();
    inventory(
        store,
        "a",
        1,
        true,
        vec![weight("/m/1", "one", ""), weight("/m/2", "two", "")],
        vec![],
    )
    .await;
    inventory(
        store,
        "a",
        2,
        false,
        vec![weight("/m/3", "three", "")],
        vec!["/m/1".into()],
    )
    .await;
    let names = |v: Vec<pb::ModelSummary>| v.into_iter().map(|m| m.model).collect::<Vec<_>>();
    assert_eq!(
        names(store.list_models("", "", 10).await.unwrap()),
        ["three", "two"]
    );
    inventory(
        store,
        "a",
        3,
        true,
        vec![weight("/m/3", "three", "")],
        vec![],
    )
    .await;
    assert_eq!(
        names(store.list_models("", "", 10).await.unwrap()),
        ["three"]
    );
    // A file that comes back is current again.
    inventory(
        store,
        "a",
        4,
        false,
        vec![weight("/m/1", "one", "")],
        vec![],
    )
    .await;
    assert_eq!(
        names(store.list_models("", "", 10).await.unwrap()),
        ["one", "three"]
    );
    // The scorecard's read leaves out the removed files too.
    assert_eq!(
        names(store.model_holdings(10).await.unwrap().0),
        ["one", "three"]
    );
    // Removed files stay in the table (history), marked removed.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM weight_files WHERE removed_ms IS NOT NULL")
            .await,
        1
    );
}

/// One chunk of generation `generation` of node "g", in the report `seq`: `files` (by model
/// name, at `/m/<name>`), the paths it `withheld`, and whether it withheld some unnamed.
#[allow(clippy::too_many_arguments)]
async fn chunk(
    store: &dyn Store,
    seq: u64,
    generation: u64,
    index: u32,
    last: bool,
    files: &[&str],
    withheld: &[&str],
    unnamed: bool,
) {
    let mut r = report("g", 1, seq);
    r.telemetry.weights = WeightUpdate {
        files: files
            .iter()
            .map(|n| weight(&format!("/m/{n}"), n, ""))
            .collect(),
        chunk: Some(pb::InventoryChunk {
            generation,
            index,
            last,
            total_files: 0,
        }),
        withheld_paths: withheld.iter().map(|n| format!("/m/{n}")).collect(),
        withheld_unnamed: unnamed,
        ..Default::default()
    };
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
}

pub(crate) async fn a_chunked_inventory_removes_what_no_chunk_names_once_every_chunk_is_held(
    db: &dyn Backend,
) {
    let store = db.store();
    let names = || async {
        let mut v: Vec<String> = store
            .list_models("", "", 100)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.model)
            .collect();
        v.sort();
        v
    };
    inventory(
        store,
        "g",
        1,
        true,
        vec![
            weight("/m/a", "a", ""),
            weight("/m/b", "b", ""),
            weight("/m/c", "c", ""),
        ],
        vec![],
    )
    .await;
    // Generation 100 in three chunks, out of order; b was deleted, d is new. Until every chunk
    // is held nothing is removed.
    chunk(store, 4, 100, 2, true, &["c"], &[], false).await;
    chunk(store, 2, 100, 0, false, &["a"], &[], false).await;
    assert_eq!(names().await, ["a", "b", "c"]);
    chunk(store, 3, 100, 1, false, &["d"], &[], false).await;
    assert_eq!(names().await, ["a", "c", "d"], "b is in no chunk");
    // A chunk sent again (a later seq) changes nothing.
    chunk(store, 5, 100, 0, false, &["a"], &[], false).await;
    assert_eq!(names().await, ["a", "c", "d"]);
    // Generation 200 loses its chunk 1 (a gap): nothing is removed, d stays.
    chunk(store, 6, 200, 0, false, &["a"], &[], false).await;
    chunk(store, 8, 200, 2, true, &["c"], &[], false).await;
    assert_eq!(names().await, ["a", "c", "d"]);
    // An older generation completing late removes nothing.
    chunk(store, 9, 50, 0, true, &["a"], &[], false).await;
    assert_eq!(names().await, ["a", "c", "d"]);
    // A generation that withheld files without naming them removes nothing; one that named
    // them keeps them.
    chunk(store, 10, 300, 0, true, &["a"], &[], true).await;
    assert_eq!(names().await, ["a", "c", "d"]);
    chunk(store, 11, 400, 0, true, &["a"], &["c", "d"], false).await;
    assert_eq!(names().await, ["a", "c", "d"]);
    // A file reported (as a change) after a generation's first chunk is kept by it.
    chunk(store, 12, 500, 0, false, &["a"], &[], false).await;
    inventory(store, "g", 13, false, vec![weight("/m/e", "e", "")], vec![]).await;
    chunk(store, 14, 500, 1, true, &["c"], &[], false).await;
    assert_eq!(
        names().await,
        ["a", "c", "e"],
        "d is gone, e came after the start"
    );
    // Complete generations leave no rows behind.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM weight_generation_paths WHERE generation <= 500")
            .await,
        0
    );
}

/// A flow of `pid` to `remote` ending at `end_ms`, placed in `country` / `asn`.
#[allow(clippy::too_many_arguments)]
fn flow(
    pid: u32,
    process: &str,
    remote: (&str, u32),
    verdict: (&str, u32, &str),
    sent: u64,
    received: u64,
    rtt_us: u32,
    end_ms: i64,
) -> FlowRecord {
    FlowRecord {
        flow: pb::Flow {
            protocol: pb::Protocol::Tcp as i32,
            remote_address: remote.0.into(),
            remote_port: remote.1,
            pid,
            bytes_sent: sent,
            bytes_received: received,
            direction: pb::Direction::Outbound as i32,
            min_rtt_us: rtt_us,
            connections: 1,
            start_unix_ms: end_ms - 10_000,
            end_unix_ms: end_ms,
            ..Default::default()
        },
        process: process.into(),
        country: verdict.0.into(),
        asn: verdict.1,
        org: verdict.2.into(),
        geo_source: "test-db".into(),
        verdict: crate::store::VerdictColumns::default(),
    }
}

const US_CLOUDFLARE: (&str, u32, &str) = ("US", 13335, "Cloudflare");
const US_GOOGLE: (&str, u32, &str) = ("US", 15169, "Google");
const FR_ORANGE: (&str, u32, &str) = ("FR", 3215, "Orange");
const MA_LOCAL: (&str, u32, &str) = ("MA", 0, "");
/// Inside the queried range (minute 2).
const T: i64 = 150_000;

/// Node a (vllm to Cloudflare twice and Google, curl inside MA, one inbound flow from FR),
/// node b (python to Google and Orange, and one flow long after the queried range).
/// `leave_out_inside` (the breach rules' read): the groups plainly inside the jurisdiction
/// are left out, before the limit, and only those that `policy::verdicts` counts inside;
/// contested, ruled-out, foreign and unplaced destinations stay.
pub(crate) async fn the_rules_read_leaves_out_only_what_is_plainly_inside(db: &dyn Backend) {
    let store = db.store();
    let answer = |country: &str, impossible: bool| {
        format!(
            r#"{{"source":"db:{country}","country":"{country}","kind":"database","impossible":{impossible},"distance_km":0}}"#
        )
    };
    let with = |last: u8, country: &str, answers: Vec<String>, contested: bool, physics: &str| {
        let mut f = flow(
            10,
            "vllm",
            (&format!("192.0.2.{last}"), 443),
            (country, 0, ""),
            u64::from(last) * 100,
            0,
            0,
            T,
        );
        f.verdict = crate::store::VerdictColumns {
            answers_json: if answers.is_empty() {
                "".into()
            } else {
                format!("[{}]", answers.join(",")).into()
            },
            contested,
            physics: physics.into(),
            ..Default::default()
        };
        f
    };
    let mut r = report("a", 1, 1);
    r.telemetry.flows = vec![
        // Plainly inside: left out.
        with(1, "MA", vec![answer("MA", false)], false, "possible"),
        with(2, "MA", vec![], false, ""),
        // Inside by its country, but contested, or an answer ruled out by physics: kept.
        with(
            3,
            "MA",
            vec![answer("MA", false), answer("FR", false)],
            true,
            "possible",
        ),
        with(4, "MA", vec![answer("MA", true)], false, "impossible"),
        with(
            5,
            "MA",
            vec![answer("MA", false), answer("MA", true)],
            false,
            "possible",
        ),
        // Abroad, or nowhere: kept.
        with(6, "FR", vec![answer("FR", false)], false, "possible"),
        with(7, "", vec![], false, ""),
    ];
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
    let read = |inside: &[&str], limit: u32| {
        store.egress(EgressQuery {
            since_unix_ms: 0,
            until_unix_ms: 600_000,
            by: "flow".into(),
            limit,
            leave_out_inside: inside.iter().map(|c| (*c).to_owned()).collect(),
        })
    };
    let last_bytes = |rows: &[pb::EgressRow]| -> Vec<String> {
        rows.iter().map(|r| r.remote_address.clone()).collect()
    };
    let (all, _) = read(&[], 100).await.unwrap();
    assert_eq!(all.len(), 7);
    let (rows, left) = read(&["ma"], 100).await.unwrap();
    let kept: Vec<String> = (3..=7).rev().map(|i| format!("192.0.2.{i}")).collect();
    assert_eq!((last_bytes(&rows), left), (kept.clone(), 0));
    // What is left out is counted inside under either reading of physics, and is all of it
    // under the default ("review").
    for impossible in ["review", "foreign"] {
        let policy = crate::policy::rules::testutil::policy(&format!(
            "[verdicts]\nimpossible = \"{impossible}\""
        ));
        for row in &all {
            let inside = policy.count(row) == crate::policy::Counted::Inside;
            assert_eq!(
                !kept.contains(&row.remote_address),
                inside && !row.answers.iter().any(|a| a.impossible) && row.physics != "impossible",
                "{} ({impossible})",
                row.remote_address
            );
            if !kept.contains(&row.remote_address) {
                assert!(
                    inside,
                    "{} left out but counted {:?}",
                    row.remote_address,
                    policy.count(row)
                );
            }
        }
    }
    // The limit applies to what is left: the largest three, two more counted.
    let (rows, left) = read(&["MA"], 3).await.unwrap();
    assert_eq!((last_bytes(&rows), left), (kept[..3].to_vec(), 2));
    // A code that is not plain letters leaves nothing out; groupings without a destination
    // ignore it.
    assert_eq!(read(&["M'A"], 100).await.unwrap().0.len(), 7);
    let (by_country, _) = store
        .egress(EgressQuery {
            since_unix_ms: 0,
            until_unix_ms: 600_000,
            by: "country".into(),
            limit: 10,
            leave_out_inside: vec!["MA".into()],
        })
        .await
        .unwrap();
    assert_eq!(
        by_country.len(),
        3,
        "MA, FR and the unplaced: {by_country:?}"
    );
}

async fn write_flows(store: &dyn Store) {
    let mut r = report("a", 1, 1);
    let mut inbound = flow(40, "sshd", ("9.9.9.9", 22), FR_ORANGE, 99_999, 1, 0, T);
    inbound.flow.direction = pb::Direction::Inbound as i32;
    r.telemetry.flows = vec![
        flow(
            10,
            "vllm",
            ("1.1.1.1", 443),
            US_CLOUDFLARE,
            1000,
            10,
            500,
            T,
        ),
        flow(10, "vllm", ("8.8.8.8", 443), US_GOOGLE, 3000, 20, 300, T),
        flow(20, "curl", ("10.0.0.1", 80), MA_LOCAL, 500, 5, 0, T),
        inbound,
    ];
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
    // The same flow again in the same minute: its bytes add up, the smaller RTT stays.
    let mut r = report("a", 1, 2);
    r.telemetry.flows = vec![flow(
        10,
        "vllm",
        ("1.1.1.1", 443),
        US_CLOUDFLARE,
        1000,
        10,
        400,
        T + 1000,
    )];
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
    let mut r = report("b", 1, 1);
    r.telemetry.flows = vec![
        flow(30, "python", ("8.8.8.8", 443), US_GOOGLE, 200, 2, 100, T),
        flow(30, "python", ("5.5.5.5", 443), FR_ORANGE, 2500, 25, 0, T),
        flow(
            30,
            "python",
            ("8.8.8.8", 443),
            US_GOOGLE,
            1_000_000,
            0,
            0,
            3_600_000,
        ),
    ];
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
}

async fn egress(store: &dyn Store, by: &str, limit: u32) -> (Vec<pb::EgressRow>, u64) {
    store
        .egress(EgressQuery {
            since_unix_ms: 60_000,
            until_unix_ms: 600_000,
            by: by.into(),
            limit,
            ..Default::default()
        })
        .await
        .unwrap()
}

pub(crate) async fn egress_is_grouped_ordered_by_bytes_sent_and_limited(db: &dyn Backend) {
    let store = db.store();
    write_flows(store).await;
    let sent = |rows: &[pb::EgressRow]| rows.iter().map(|r| r.bytes_sent).collect::<Vec<_>>();

    let (rows, truncated) = egress(store, "country", 10).await;
    let countries: Vec<_> = rows.iter().map(|r| r.country.as_str()).collect();
    assert_eq!((countries, truncated), (vec!["US", "FR", "MA"], 0));
    assert_eq!(sent(&rows), [5200, 2500, 500]);
    assert_eq!(
        (
            rows[0].bytes_received,
            rows[0].connections,
            rows[0].min_rtt_us
        ),
        (42, 4, 100)
    );
    assert_eq!((rows[0].node.as_str(), rows[0].asn), ("", 0));
    // The default grouping is by country.
    assert_eq!(egress(store, "", 10).await, (rows, 0));

    let (rows, _) = egress(store, "node", 10).await;
    let keys: Vec<_> = rows
        .iter()
        .map(|r| (r.country.as_str(), r.node.as_str(), r.bytes_sent))
        .collect();
    assert_eq!(
        keys,
        [
            ("US", "a", 5000),
            ("FR", "b", 2500),
            ("MA", "a", 500),
            ("US", "b", 200)
        ]
    );

    let (rows, _) = egress(store, "process", 10).await;
    let keys: Vec<_> = rows
        .iter()
        .map(|r| (r.node.as_str(), r.process.as_str(), r.pid, r.bytes_sent))
        .collect();
    assert_eq!(
        keys,
        [
            ("a", "vllm", 10, 5000),
            ("b", "python", 30, 2500),
            ("a", "curl", 20, 500),
            ("b", "python", 30, 200)
        ]
    );

    let (rows, _) = egress(store, "asn", 10).await;
    let keys: Vec<_> = rows
        .iter()
        .map(|r| (r.country.as_str(), r.asn, r.org.as_str(), r.bytes_sent))
        .collect();
    assert_eq!(
        keys,
        [
            ("US", 15169, "Google", 3200),
            ("FR", 3215, "Orange", 2500),
            ("US", 13335, "Cloudflare", 2000),
            ("MA", 0, "", 500)
        ]
    );

    let (rows, truncated) = egress(store, "destination", 2).await;
    let keys: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.remote_address.as_str(),
                r.remote_port,
                r.asn,
                r.bytes_sent,
            )
        })
        .collect();
    assert_eq!(
        keys,
        [("8.8.8.8", 443, 15169, 3200), ("5.5.5.5", 443, 3215, 2500)]
    );
    assert_eq!(truncated, 2);
    assert_eq!(
        (rows[0].geo_source.as_str(), rows[0].org.as_str()),
        ("test-db", "Google")
    );
    // A limit of 0 still says how many rows there were.
    assert_eq!(egress(store, "destination", 0).await, (vec![], 4));
}

pub(crate) async fn egress_adds_flows_within_a_minute_and_ignores_resends_and_inbound(
    db: &dyn Backend,
) {
    let store = db.store();
    write_flows(store).await;
    // A re-sent report adds nothing.
    let mut again = report("a", 1, 2);
    again.telemetry.flows = vec![flow(
        10,
        "vllm",
        ("1.1.1.1", 443),
        US_CLOUDFLARE,
        1000,
        10,
        400,
        T + 1000,
    )];
    assert_eq!(ingest(store, again).await, IngestOutcome::Duplicate);
    let (rows, _) = egress(store, "destination", 10).await;
    let cloudflare = rows.iter().find(|r| r.asn == 13335).unwrap();
    assert_eq!(
        (
            cloudflare.bytes_sent,
            cloudflare.bytes_received,
            cloudflare.connections,
            cloudflare.min_rtt_us
        ),
        (2000, 20, 2, 400)
    );
    // Inbound traffic is not egress; the flow outside the range is not counted.
    assert!(rows.iter().all(|r| r.remote_port != 22), "{rows:?}");
    assert_eq!(rows.iter().map(|r| r.bytes_sent).sum::<u64>(), 8200);
    // A range starting mid-minute includes that minute; one ending before it excludes it.
    let q = |since_unix_ms, until_unix_ms| EgressQuery {
        since_unix_ms,
        until_unix_ms,
        by: "country".into(),
        limit: 10,
        ..Default::default()
    };
    let (rows, _) = store.egress(q(T + 5_000, 600_000)).await.unwrap();
    assert_eq!(rows.len(), 3);
    let (rows, _) = store.egress(q(0, 120_000)).await.unwrap();
    assert!(rows.is_empty(), "{rows:?}");
    // One aggregate per (node, minute, process, destination); raw flows kept only for flows
    // leaving the node's country, one row per report.
    assert_eq!(db.count("SELECT COUNT(*) FROM flows_minute").await, 7);
    assert_eq!(db.count(RAW_FLOWS).await, 7);
    assert_eq!(db.count("SELECT COUNT(*) FROM flows_raw").await, 0);
}

/// Raw foreign flows kept (one `foreign_flows` row per report holds its count).
const RAW_FLOWS: &str = "SELECT CAST(COALESCE(SUM(flow_count), 0) AS BIGINT) FROM foreign_flows";

pub(crate) async fn egress_refuses_an_unknown_grouping(db: &dyn Backend) {
    let err = db
        .store()
        .egress(EgressQuery {
            since_unix_ms: 0,
            until_unix_ms: 1,
            by: "planet".into(),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Range(_)), "{err}");
    assert!(err.to_string().contains("planet"), "{err}");
}

pub(crate) async fn pruning_removes_old_flows(db: &dyn Backend) {
    let store = db.store();
    write_flows(store).await;
    // Everything but node b's late flow: six aggregates, and the raw rows of node a's two
    // reports (node b's report keeps its row until its latest flow is past retention).
    let pruned = store.prune(Retention::all_before(3_000_000)).await.unwrap();
    assert_eq!(pruned.flows, 8);
    assert_eq!(egress(store, "country", 10).await, (vec![], 0));
    assert_eq!(db.count("SELECT COUNT(*) FROM flows_minute").await, 1);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM foreign_flows WHERE node = 'b'")
            .await,
        1
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM foreign_flows").await, 1);
}

pub(crate) async fn raw_samples_fold_into_minute_aggregates_that_outlive_them(db: &dyn Backend) {
    let store = db.store();
    let at = |seq: u64, ms: i64, cpu: f32| {
        let mut r = report("m", 1, seq);
        r.observed_unix_ms = ms;
        r.received_unix_ms = ms + 5;
        r.telemetry = telemetry();
        if let Some(h) = r.telemetry.host.as_mut() {
            h.cpu_percent = cpu;
        }
        r
    };
    // Three samples in minute 1 (60 s to 120 s), one in minute 2.
    for (seq, ms, cpu) in [
        (1, 60_000, 10.0),
        (2, 70_000, 20.0),
        (3, 80_000, 30.0),
        (4, 130_000, 40.0),
    ] {
        assert_eq!(ingest(store, at(seq, ms, cpu)).await, IngestOutcome::Stored);
    }
    let keep_aggregates = |raw_before_unix_ms| Retention {
        raw_before_unix_ms,
        ..Retention::all_before(0)
    };
    let p = store.prune(keep_aggregates(125_000)).await.unwrap();
    // One host minute, two GPU minutes, one GPU-usage minute (vllm on GPU-0).
    assert_eq!((p.host_samples, p.gpu_samples, p.gpu_usage), (3, 6, 3));
    assert_eq!(p.downsampled, 4);
    assert_eq!(db.count("SELECT COUNT(*) FROM host_samples").await, 1);
    let host = |cond: &str| {
        format!(
            "SELECT COUNT(*) FROM host_minute WHERE node = 'm' AND minute_ms = 60000 AND {cond}"
        )
    };
    assert_eq!(
        db.count(&host(
            "samples = 3 AND cpu_percent_max = 30 AND cpu_percent_avg BETWEEN 19.99 AND 20.01"
        ))
        .await,
        1
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM gpu_minute WHERE samples = 3 AND utilization_max = 90")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM gpu_usage_minute WHERE pid = 4242 AND gpu_seconds BETWEEN 22.49 AND 22.51").await,
        1
    );
    // A late report for minute 1 is folded in by the next pass: counts add, averages weigh.
    ingest(store, at(5, 90_000, 60.0)).await;
    store.prune(keep_aggregates(125_000)).await.unwrap();
    assert_eq!(
        db.count(&host(
            "samples = 4 AND cpu_percent_max = 60 AND cpu_percent_avg BETWEEN 29.99 AND 30.01"
        ))
        .await,
        1
    );
    // Aggregates go at their own, later cut-off; the raw sample after the raw cut-off stays.
    let p = store
        .prune(Retention {
            raw_before_unix_ms: 0,
            ..Retention::all_before(120_000)
        })
        .await
        .unwrap();
    assert_eq!(p.aggregates, 4);
    assert_eq!(db.count("SELECT COUNT(*) FROM host_minute").await, 0);
    assert_eq!(db.count("SELECT COUNT(*) FROM host_samples").await, 1);
}

// Breaches and their log.

/// A critical observation of `rule` on `node` about `subject` at `at` ms.
pub(crate) fn observation(
    rule: &str,
    node: &str,
    subject: &str,
    at: i64,
    evidence: serde_json::Value,
) -> Observation {
    Observation {
        rule: rule.into(),
        node: node.into(),
        subject: subject.into(),
        severity: Severity::Critical,
        evidence,
        at_unix_ms: at,
    }
}

async fn observe(store: &dyn Store, obs: Observation) -> BreachChange {
    store.observe_breach(obs).await.unwrap()
}

/// The whole breach log.
pub(crate) async fn whole_log(store: &dyn Store) -> Vec<LogRecord> {
    store.breach_log(0, 100_000).await.unwrap()
}

fn all_breaches() -> BreachFilter {
    BreachFilter {
        limit: 100,
        ..Default::default()
    }
}

pub(crate) async fn a_breach_opens_updates_and_resolves_with_one_log_record_per_change(
    db: &dyn Backend,
) {
    let store = db.store();
    let ev = |bytes: u64| serde_json::json!({"destination": "US", "bytes": bytes});
    let opened = observe(store, observation("r", "gpu-1", "m", 1000, ev(10))).await;
    let BreachChange::Opened(b) = &opened else {
        panic!("{opened:?}")
    };
    assert_eq!(b.breach_id.len(), 32);
    assert_eq!(
        (b.state, b.count, b.opened_at_unix_ms, b.last_seen_unix_ms),
        (BreachState::Open, 1, 1000, 1000)
    );
    let id = b.breach_id.clone();
    let same = observe(store, observation("r", "gpu-1", "m", 2000, ev(10))).await;
    assert!(matches!(same, BreachChange::Unchanged(_)), "{same:?}");
    assert_eq!(
        (same.breach().count, same.breach().last_seen_unix_ms),
        (2, 2000)
    );
    let updated = observe(store, observation("r", "gpu-1", "m", 3000, ev(20))).await;
    let BreachChange::Updated(b) = &updated else {
        panic!("{updated:?}")
    };
    assert_eq!((b.breach_id.as_str(), b.count), (id.as_str(), 3));
    assert_eq!(b.evidence["bytes"], 20);
    let resolved = store
        .resolve_quiet_breaches("r", 3500, 10_000)
        .await
        .unwrap();
    assert_eq!(resolved.len(), 1);
    assert_eq!(
        (
            resolved[0].breach_id.as_str(),
            resolved[0].state,
            resolved[0].resolved_at_unix_ms,
            resolved[0].count
        ),
        (id.as_str(), BreachState::Resolved, Some(10_000), 3)
    );

    let log = whole_log(store).await;
    let events: Vec<_> = log
        .iter()
        .map(|r| (r.seq, r.event.as_str(), r.at_unix_ms, r.breach_id.as_str()))
        .collect();
    assert_eq!(
        events,
        [
            (1, "open", 1000, id.as_str()),
            (2, "updated", 3000, id.as_str()),
            (3, "resolved", 10_000, id.as_str())
        ]
    );
    assert_eq!(log[0].body["state"], "open");
    assert_eq!(log[0].body["evidence"]["bytes"], 10);
    assert_eq!(log[1].body["evidence"]["bytes"], 20);
    assert_eq!(log[1].body["count"], 3);
    assert_eq!(log[2].body["state"], "resolved");
    assert_eq!(log[2].body["resolved_at_unix_ms"], 10_000);
    assert_eq!(log[2].body["severity"], "critical");
    assert_eq!(verify_chain(log.into_iter()), Ok(3));

    // Seen again after resolution: a new breach with a new id.
    let again = observe(store, observation("r", "gpu-1", "m", 11_000, ev(20))).await;
    let BreachChange::Opened(b) = &again else {
        panic!("{again:?}")
    };
    assert_ne!(b.breach_id, id);
    assert_eq!(db.count("SELECT COUNT(*) FROM breaches").await, 2);
    let listed = store.list_breaches(all_breaches()).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0], *b);
    assert_eq!(listed[1], resolved[0]);
}

pub(crate) async fn breaches_are_deduplicated_by_rule_node_and_subject(db: &dyn Backend) {
    let store = db.store();
    let keys = [
        ("r", "n", "s"),
        ("r", "n", "t"),
        ("r", "o", "s"),
        ("q", "n", "s"),
        // Fields do not run together.
        ("r", "ns", ""),
    ];
    for (i, round) in [0, 1].into_iter().enumerate() {
        for (rule, node, subject) in keys {
            let at = 1000 * (i64::from(round) + 1);
            let change = observe(store, observation(rule, node, subject, at, "x".into())).await;
            if i == 0 {
                assert!(matches!(change, BreachChange::Opened(_)), "{change:?}");
            } else {
                assert!(matches!(change, BreachChange::Unchanged(_)), "{change:?}");
                assert_eq!(change.breach().count, 2);
            }
        }
    }
    let listed = store.list_breaches(all_breaches()).await.unwrap();
    assert_eq!(listed.len(), keys.len());
    let mut ids: Vec<_> = listed.iter().map(|b| b.breach_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), keys.len());
    assert_eq!(
        db.count("SELECT COUNT(*) FROM breaches WHERE state = 'open'")
            .await,
        5
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM breach_log").await, 5);
}

pub(crate) async fn an_unchanged_observation_appends_nothing_and_a_new_severity_does(
    db: &dyn Backend,
) {
    let store = db.store();
    let first: serde_json::Value =
        serde_json::from_str(r#"{"a": 1, "b": [1, 2], "c": {"y": 1.5, "x": null}}"#).unwrap();
    // The same evidence with its keys in another order.
    let reordered: serde_json::Value =
        serde_json::from_str(r#"{"c": {"x": null, "y": 1.5}, "b": [1, 2], "a": 1}"#).unwrap();
    observe(store, observation("r", "n", "s", 1000, first)).await;
    for at in 2..=5 {
        let change = observe(
            store,
            observation("r", "n", "s", at * 1000, reordered.clone()),
        )
        .await;
        assert!(matches!(change, BreachChange::Unchanged(_)), "{change:?}");
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM breach_log").await, 1);
    let b = &store.list_breaches(all_breaches()).await.unwrap()[0];
    assert_eq!((b.count, b.last_seen_unix_ms), (5, 5000));
    // Array order is significant.
    let mut o = observation(
        "r",
        "n",
        "s",
        6000,
        serde_json::json!({"a": 1, "b": [2, 1], "c": {"x": null, "y": 1.5}}),
    );
    assert!(matches!(
        observe(store, o.clone()).await,
        BreachChange::Updated(_)
    ));
    o.severity = Severity::Warning;
    o.at_unix_ms = 7000;
    let change = observe(store, o).await;
    assert!(matches!(change, BreachChange::Updated(_)), "{change:?}");
    assert_eq!(change.breach().severity, Severity::Warning);
    let log = whole_log(store).await;
    assert_eq!(log.len(), 3);
    assert_eq!(log[2].body["severity"], "warning");
    assert_eq!(log[2].body["count"], 7);
    assert_eq!(verify_chain(log.into_iter()), Ok(3));
}

/// `record_evaluation`: an evaluation's observations and its rules' quiet resolutions in one
/// take of the writer, with the outcome of the same calls one by one.
pub(crate) async fn an_evaluation_recorded_at_once_does_what_its_steps_do_one_by_one(
    db: &dyn Backend,
) {
    let store = db.store();
    let (changes, resolved) = store
        .record_evaluation(
            vec![
                observation("r", "a", "s", 1000, 1.into()),
                observation("r", "b", "s", 1000, 1.into()),
                observation("q", "a", "s", 1000, 1.into()),
            ],
            vec![("r".into(), 0), ("q".into(), 0)],
            1000,
        )
        .await
        .unwrap();
    assert!(
        matches!(
            changes[..],
            [
                BreachChange::Opened(_),
                BreachChange::Opened(_),
                BreachChange::Opened(_)
            ]
        ),
        "{changes:?}"
    );
    assert!(resolved.is_empty());
    // Seen again (same evidence), seen with new evidence, and quiet: b of rule r resolves,
    // q's breach is not quiet by q's own bound.
    let (changes, resolved) = store
        .record_evaluation(
            vec![
                observation("r", "a", "s", 5000, 1.into()),
                observation("q", "a", "s", 5000, 2.into()),
            ],
            vec![("r".into(), 3000), ("q".into(), 500)],
            5000,
        )
        .await
        .unwrap();
    assert!(
        matches!(
            changes[..],
            [BreachChange::Unchanged(_), BreachChange::Updated(_)]
        ),
        "{changes:?}"
    );
    let nodes: Vec<(&str, &str)> = resolved
        .iter()
        .map(|b| (b.rule.as_str(), b.node.as_str()))
        .collect();
    assert_eq!(nodes, [("r", "b")]);
    let log = whole_log(store).await;
    let events: Vec<_> = log.iter().map(|r| r.event.as_str()).collect();
    assert_eq!(events, ["open", "open", "open", "updated", "resolved"]);
    assert_eq!(verify_chain(log.into_iter()), Ok(5));
    // An observation without a rule is refused, as one by one.
    assert!(
        store
            .record_evaluation(
                vec![observation("", "a", "s", 6000, 1.into())],
                vec![],
                6000
            )
            .await
            .is_err()
    );
}

pub(crate) async fn only_quiet_open_breaches_of_the_rule_are_resolved(db: &dyn Backend) {
    let store = db.store();
    observe(store, observation("r", "a", "s", 1000, 1.into())).await;
    observe(store, observation("r", "b", "s", 1000, 1.into())).await;
    observe(store, observation("r", "b", "s", 5000, 1.into())).await;
    observe(store, observation("q", "a", "s", 1000, 1.into())).await;
    // Last seen exactly at the boundary is not quiet.
    observe(store, observation("r", "c", "s", 3000, 1.into())).await;
    let resolved = store.resolve_quiet_breaches("r", 3000, 6000).await.unwrap();
    let nodes: Vec<_> = resolved.iter().map(|b| b.node.as_str()).collect();
    assert_eq!(nodes, ["a"]);
    assert!(
        store
            .resolve_quiet_breaches("r", 3000, 7000)
            .await
            .unwrap()
            .is_empty()
    );
    let open = store
        .list_breaches(BreachFilter {
            state: Some(BreachState::Open),
            ..all_breaches()
        })
        .await
        .unwrap();
    let mut keys: Vec<_> = open
        .iter()
        .map(|b| (b.rule.as_str(), b.node.as_str()))
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, [("q", "a"), ("r", "b"), ("r", "c")]);
    let log = whole_log(store).await;
    let events: Vec<_> = log.iter().map(|r| r.event.as_str()).collect();
    assert_eq!(events, ["open", "open", "open", "open", "resolved"]);
    // Several at once: each gets its own record, in breach id order.
    let mut resolved = store
        .resolve_quiet_breaches("r", i64::MAX, 8000)
        .await
        .unwrap();
    assert_eq!(resolved.len(), 2);
    let log = whole_log(store).await;
    assert_eq!(log.len(), 7);
    resolved.sort_by(|a, b| a.breach_id.cmp(&b.breach_id));
    assert_eq!(log[5].breach_id, resolved[0].breach_id);
    assert_eq!(log[6].breach_id, resolved[1].breach_id);
    assert_eq!(verify_chain(log.into_iter()), Ok(7));
}

pub(crate) async fn breaches_are_listed_by_state_rule_and_time_newest_first(db: &dyn Backend) {
    let store = db.store();
    for (rule, node, at) in [("r", "a", 1000), ("r", "b", 2000), ("q", "c", 3000)] {
        observe(store, observation(rule, node, "s", at, 0.into())).await;
    }
    // a resolved at 4000, b at 9000; c stays open.
    store.resolve_quiet_breaches("r", 1500, 4000).await.unwrap();
    store.resolve_quiet_breaches("r", 2500, 9000).await.unwrap();
    let list = |f: BreachFilter| async move {
        store
            .list_breaches(f)
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.node)
            .collect::<Vec<_>>()
    };
    assert_eq!(list(all_breaches()).await, ["c", "b", "a"]);
    assert_eq!(
        list(BreachFilter {
            limit: 2,
            ..all_breaches()
        })
        .await,
        ["c", "b"]
    );
    assert_eq!(
        list(BreachFilter {
            state: Some(BreachState::Resolved),
            ..all_breaches()
        })
        .await,
        ["b", "a"]
    );
    assert_eq!(
        list(BreachFilter {
            rule: Some("r".into()),
            ..all_breaches()
        })
        .await,
        ["b", "a"]
    );
    assert_eq!(
        list(BreachFilter {
            rule: Some("nothing".into()),
            ..all_breaches()
        })
        .await,
        Vec::<String>::new()
    );
    // Open at some time since 5000: c (still open) and b (resolved at 9000).
    assert_eq!(
        list(BreachFilter {
            since_unix_ms: Some(5000),
            ..all_breaches()
        })
        .await,
        ["c", "b"]
    );
    assert_eq!(
        list(BreachFilter {
            since_unix_ms: Some(5000),
            state: Some(BreachState::Resolved),
            rule: Some("r".into()),
            limit: 10,
        })
        .await,
        ["b"]
    );
    let b = &store
        .list_breaches(BreachFilter {
            state: Some(BreachState::Resolved),
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()[0];
    assert_eq!(
        (b.resolved_at_unix_ms, b.opened_at_unix_ms, b.severity),
        (Some(9000), 2000, Severity::Critical)
    );
}

pub(crate) async fn the_breach_log_is_a_verifiable_chain_read_in_pages_and_never_pruned(
    db: &dyn Backend,
) {
    let store = db.store();
    ingest(store, report("n0", 1, 1)).await;
    for i in 0..5_i64 {
        let node = format!("n{i}");
        observe(store, observation("r", &node, "s", 1000 + i, i.into())).await;
        observe(
            store,
            observation("r", &node, "s", 2000 + i, (i + 1).into()),
        )
        .await;
    }
    store.resolve_quiet_breaches("r", 3000, 4000).await.unwrap();
    let mut v = ChainVerifier::new();
    let mut after = 0;
    loop {
        let page = store.breach_log(after, 4).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 4);
        for r in &page {
            v.push(r).unwrap();
        }
        after = page.last().unwrap().seq;
    }
    assert_eq!(v.checked(), 15);
    let log = whole_log(store).await;
    assert_eq!(v.last_hash(), log[14].hash);
    assert_eq!(store.breach_log(14, 10).await.unwrap().len(), 1);
    assert!(store.breach_log(15, 10).await.unwrap().is_empty());
    // Retention leaves breaches and their log alone.
    store.prune(Retention::all_before(i64::MAX)).await.unwrap();
    assert_eq!(db.count("SELECT COUNT(*) FROM breach_log").await, 15);
    assert_eq!(db.count("SELECT COUNT(*) FROM breaches").await, 5);
    assert_eq!(verify_chain(whole_log(store).await.into_iter()), Ok(15));
}

fn outbox_item(seq: u64) -> OutboxItem {
    OutboxItem {
        log_seq: seq,
        breach_id: format!("b{seq}"),
        event: "open".into(),
        payload: format!("{{\"seq\":{seq}}}"),
    }
}

pub(crate) async fn the_outbox_keeps_one_row_per_sink_and_record_delivered_in_order(
    db: &dyn Backend,
) {
    let store = db.store();
    assert_eq!(store.outbox_cursor("webhook:0").await.unwrap(), None);
    assert_eq!(store.breach_log_end().await.unwrap(), 0);
    store
        .outbox_enqueue("webhook:0", vec![outbox_item(1), outbox_item(2)], 2, 100)
        .await
        .unwrap();
    // Enqueueing again (a replica that read the same records) adds nothing and never moves
    // the cursor back.
    store
        .outbox_enqueue("webhook:0", vec![outbox_item(2), outbox_item(3)], 1, 200)
        .await
        .unwrap();
    store
        .outbox_enqueue("syslog:0", vec![outbox_item(2)], 2, 100)
        .await
        .unwrap();
    assert_eq!(store.outbox_cursor("webhook:0").await.unwrap(), Some(2));
    assert_eq!(
        db.count("SELECT COUNT(*) FROM alert_outbox").await,
        4,
        "3 rows of webhook:0, 1 of syslog:0"
    );
    let head = store.outbox_head("webhook:0").await.unwrap().unwrap();
    assert_eq!((head.item.log_seq, head.attempts), (1, 0));
    assert_eq!(head.item, outbox_item(1));
    assert_eq!(head.next_attempt_unix_ms, 100);
    store
        .outbox_settle(
            "webhook:0",
            1,
            Settle::Retry {
                attempts: 1,
                next_attempt_unix_ms: 5000,
                error: "connect refused".into(),
            },
        )
        .await
        .unwrap();
    let head = store.outbox_head("webhook:0").await.unwrap().unwrap();
    assert_eq!(
        (head.item.log_seq, head.attempts, head.next_attempt_unix_ms),
        (1, 1, 5000),
        "a retried row stays at the head"
    );
    store
        .outbox_settle("webhook:0", 1, Settle::Delivered { at_unix_ms: 6000 })
        .await
        .unwrap();
    // Settling twice changes nothing.
    store
        .outbox_settle("webhook:0", 1, Settle::Delivered { at_unix_ms: 7000 })
        .await
        .unwrap();
    assert_eq!(
        store
            .outbox_head("webhook:0")
            .await
            .unwrap()
            .unwrap()
            .item
            .log_seq,
        2
    );
    store
        .outbox_settle(
            "webhook:0",
            2,
            Settle::Failed {
                attempts: 1,
                at_unix_ms: 6000,
                error: "HTTP 400".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .outbox_head("webhook:0")
            .await
            .unwrap()
            .unwrap()
            .item
            .log_seq,
        3
    );
    assert_eq!(
        store.outbox_stats().await.unwrap(),
        vec![
            SinkStats {
                sink: "syslog:0".into(),
                pending: 1,
                delivered: 0,
                failed: 0,
                failed_attempts: 0,
            },
            SinkStats {
                sink: "webhook:0".into(),
                pending: 1,
                delivered: 1,
                failed: 1,
                failed_attempts: 2,
            },
        ]
    );
    store
        .outbox_settle("webhook:0", 3, Settle::Delivered { at_unix_ms: 8000 })
        .await
        .unwrap();
    assert!(store.outbox_head("webhook:0").await.unwrap().is_none());
    // The log end follows the log.
    observe(store, observation("r", "n", "s", 1000, 1.into())).await;
    assert_eq!(store.breach_log_end().await.unwrap(), 1);
}

pub(crate) async fn a_lease_belongs_to_one_holder_until_it_expires(db: &dyn Backend) {
    let store = db.store();
    assert!(store.take_lease("rules", "a", 1000, 500).await.unwrap());
    assert!(!store.take_lease("rules", "b", 1200, 500).await.unwrap());
    assert!(
        store.take_lease("rules", "a", 1400, 500).await.unwrap(),
        "renewed"
    );
    assert!(
        !store.take_lease("rules", "b", 1800, 500).await.unwrap(),
        "the renewal counts"
    );
    assert!(
        store.take_lease("alert:x", "b", 1800, 500).await.unwrap(),
        "leases are per name"
    );
    assert!(
        store.take_lease("rules", "b", 1901, 500).await.unwrap(),
        "expired: taken over"
    );
    assert!(!store.take_lease("rules", "a", 1950, 500).await.unwrap());
}

pub(crate) async fn a_nodes_peer_address_is_kept_latest_first(db: &dyn Backend) {
    let store = db.store();
    let peer = |node: &str, address: &str, country: &str, at: i64| NodePeer {
        node: node.into(),
        address: address.into(),
        country: country.into(),
        asn: 64_500,
        source: "override:192.0.2.0/24".into(),
        seen_unix_ms: at,
    };
    store
        .note_peer(peer("b", "192.0.2.2", "FR", 1000))
        .await
        .unwrap();
    store
        .note_peer(peer("a", "192.0.2.1", "MA", 1000))
        .await
        .unwrap();
    store
        .note_peer(peer("a", "192.0.2.9", "ES", 2000))
        .await
        .unwrap();
    // An older record arriving late does not win.
    store
        .note_peer(peer("a", "192.0.2.3", "DE", 1500))
        .await
        .unwrap();
    assert_eq!(
        store.node_peers().await.unwrap(),
        vec![
            peer("a", "192.0.2.9", "ES", 2000),
            peer("b", "192.0.2.2", "FR", 1000)
        ]
    );
}

pub(crate) async fn egress_by_flow_keeps_node_process_and_destination_apart(db: &dyn Backend) {
    let store = db.store();
    write_flows(store).await;
    let (by_flow, _) = egress(store, "flow", 1000).await;
    let (by_process, _) = egress(store, "process", 1000).await;
    let (by_destination, _) = egress(store, "destination", 1000).await;
    assert!(by_flow.len() >= by_process.len() && by_flow.len() >= by_destination.len());
    let total = |rows: &[pb::EgressRow]| rows.iter().map(|r| r.bytes_sent).sum::<u64>();
    assert_eq!(total(&by_flow), total(&by_process));
    for r in &by_flow {
        assert!(!r.node.is_empty() && !r.remote_address.is_empty(), "{r:?}");
        // Every flow row falls inside one process row and one destination row.
        assert!(by_process.iter().any(|p| p.node == r.node
            && p.pid == r.pid
            && p.country == r.country
            && p.bytes_sent >= r.bytes_sent));
        assert!(
            by_destination
                .iter()
                .any(|d| d.remote_address == r.remote_address
                    && d.remote_port == r.remote_port
                    && d.bytes_sent >= r.bytes_sent)
        );
    }
}

pub(crate) async fn flows_of_reports_derived_in_one_batch_merge_as_the_database_merges_them(
    db: &dyn Backend,
) {
    let store = db.store();
    let verdict = |physics: &str, limit_km: u32, operator: &str| {
        crate::store::VerdictColumns {
        answers_json: format!(
            r#"[{{"source":"s","country":"FR","kind":"geofeed","impossible":false,"distance_km":{limit_km}}}]"#
        ).into(),
        contested: operator.is_empty(),
        operator_country: operator.into(),
        physics: physics.into(),
        distance_km: 10,
        limit_km,
    }
    };
    let with = |seq: u64, sent: u64, rtt: u32, v: crate::store::VerdictColumns| {
        let mut r = report("m", 1, seq);
        let mut f = flow(
            7,
            if seq == 2 { "" } else { "curl" },
            ("198.18.0.9", 443),
            ("FR", 0, ""),
            sent,
            1,
            rtt,
            T,
        );
        f.verdict = v;
        r.telemetry.flows = vec![f.clone(), f];
        r
    };
    // Reports 1 and 2 derived in one batch (four flows with one key), report 3 later.
    let (r1, r2) = (
        with(1, 1000, 20_000, verdict("possible", 3000, "US")),
        with(2, 10, 60, verdict("impossible", 59, "")),
    );
    for r in [&r1, &r2] {
        assert_eq!(
            store.ingest(r.clone()).await.unwrap(),
            IngestOutcome::Stored
        );
    }
    let batch: Vec<Derivation> = store
        .underived(10)
        .await
        .unwrap()
        .into_iter()
        .map(|u| Derivation {
            queue_id: u.queue_id,
            report: if u.seq == 1 { r1.clone() } else { r2.clone() },
        })
        .collect();
    assert_eq!(store.derive(batch).await.unwrap(), 2);
    let (rows, _) = egress(store, "flow", 100).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!((row.bytes_sent, row.connections), (2020, 4));
    assert_eq!(row.min_rtt_us, 60);
    assert_eq!((row.physics.as_str(), row.limit_km), ("impossible", 59));
    assert_eq!(
        row.process, "curl",
        "an empty process name does not replace one"
    );
    assert!(row.contested, "a contested flow marks the row");
    assert_eq!(
        row.operator_country, "US",
        "an empty operator does not replace one"
    );
    // A later batch merges into the stored row the same way.
    assert_eq!(
        ingest(store, with(3, 5, 30, verdict("possible", 30, "FR"))).await,
        IngestOutcome::Stored
    );
    let (rows, _) = egress(store, "flow", 100).await;
    let row = &rows[0];
    assert_eq!(
        (row.bytes_sent, row.connections, row.min_rtt_us),
        (2030, 6, 30)
    );
    assert_eq!((row.physics.as_str(), row.limit_km), ("possible", 30));
    assert_eq!(row.operator_country, "FR");
}

pub(crate) async fn every_answer_and_how_bytes_were_measured_are_kept_with_the_flow(
    db: &dyn Backend,
) {
    let store = db.store();
    let verdict = |impossible: bool, rtt_limit: u32| {
        crate::store::VerdictColumns {
        answers_json: format!(
            r#"[{{"source":"geofeed:test@2026-11-01","country":"FR","kind":"geofeed","impossible":{impossible},"distance_km":1107}},{{"source":"embedded:iptocc-1.4.175","country":"MA","kind":"registry","impossible":false,"distance_km":0}}]"#
        ).into(),
        contested: true,
        operator_country: "US".into(),
        physics: if impossible { "impossible" } else { "possible" }.into(),
        distance_km: 1107,
        limit_km: rtt_limit,
    }
    };
    let mut r = report("v", 1, 1);
    // Seen first at 20 ms (France possible), then at 0.06 ms in the same minute: the tighter
    // RTT's reading stays.
    let mut slow = flow(
        7,
        "quic",
        ("198.18.0.2", 443),
        ("FR", 0, ""),
        1000,
        0,
        20_000,
        T,
    );
    slow.verdict = verdict(false, 3050);
    let mut fast = flow(
        7,
        "quic",
        ("198.18.0.2", 443),
        ("FR", 0, ""),
        2000,
        0,
        60,
        T,
    );
    fast.verdict = verdict(true, 59);
    let mut udp = flow(
        8,
        "dns",
        ("198.18.0.3", 53),
        ("FR", 0, ""),
        5_000,
        7_000,
        0,
        T,
    );
    udp.flow.protocol = pb::Protocol::Udp as i32;
    udp.flow.measurement = pb::Measurement::Conntrack as i32;
    let mut quiet = flow(8, "dns", ("198.18.0.3", 53), ("FR", 0, ""), 0, 0, 0, T);
    quiet.flow.protocol = pb::Protocol::Udp as i32;
    quiet.flow.measurement = pb::Measurement::Unmeasured as i32;
    r.telemetry.flows = vec![slow, fast];
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
    let mut r = report("v", 1, 2);
    r.telemetry.flows = vec![udp, quiet];
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
    let (rows, _) = egress(store, "flow", 100).await;
    let quic = rows.iter().find(|r| r.process == "quic").unwrap();
    assert_eq!(quic.bytes_sent, 3000);
    assert_eq!(quic.min_rtt_us, 60);
    assert_eq!(quic.physics, "impossible");
    assert_eq!((quic.distance_km, quic.limit_km), (1107, 59));
    assert!(quic.contested);
    assert_eq!(quic.operator_country, "US");
    assert_eq!(quic.answers.len(), 2);
    assert_eq!(
        (
            quic.answers[0].country.as_str(),
            quic.answers[0].kind.as_str()
        ),
        ("FR", "geofeed")
    );
    assert!(quic.answers[0].impossible && !quic.answers[1].impossible);
    assert_eq!(quic.answers[1].source, "embedded:iptocc-1.4.175");
    let dns = rows.iter().find(|r| r.process == "dns").unwrap();
    assert_eq!(dns.conntrack_bytes, 12_000);
    assert_eq!(dns.unmeasured_flows, 1);
    // Grouped by country, the measurement counts still add up; no answers there.
    let (by_country, _) = egress(store, "country", 100).await;
    let fr = by_country.iter().find(|r| r.country == "FR").unwrap();
    assert_eq!((fr.conntrack_bytes, fr.unmeasured_flows), (12_000, 1));
    assert!(fr.answers.is_empty());
}

// The dispatcher in `store::open`.

pub(crate) async fn reports_pushed_together_are_each_stored_once_whatever_batch_they_share(
    db: &dyn Backend,
) {
    let store = db.store();
    // Every report twice, and seq 21 twice with different contents, all at once: group
    // commit may put both copies in one transaction.
    let mut pushes: Vec<IncomingReport> = (1..=20)
        .flat_map(|seq| [report("g", 3, seq), report("g", 3, seq)])
        .collect();
    let mut reused = report("g", 3, 21);
    reused.observed_unix_ms += 1;
    pushes.push(report("g", 3, 21));
    pushes.push(reused);
    let outcomes = futures::future::join_all(pushes.into_iter().map(|r| store.ingest(r))).await;
    let count = |o: IngestOutcome| {
        outcomes
            .iter()
            .filter(|x| matches!(x, Ok(y) if *y == o))
            .count()
    };
    assert_eq!(
        (
            count(IngestOutcome::Stored),
            count(IngestOutcome::Duplicate),
            count(IngestOutcome::Conflict)
        ),
        (21, 20, 1),
        "{outcomes:?}"
    );
    let n = &store.list_nodes("", 10).await.unwrap()[0];
    assert_eq!(
        (n.reports, n.last_seq, n.missing, n.conflicts),
        (21, 21, 0, 1)
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM reports").await, 21);
}

pub(crate) async fn a_bad_report_pushed_with_others_fails_alone(db: &dyn Backend) {
    let store = db.store();
    // A sequence number beyond what the databases hold is refused by the store.
    let mut pushes: Vec<IncomingReport> = (1..=10).map(|seq| report("h", 1, seq)).collect();
    pushes.insert(5, report("h", 1, u64::MAX));
    let outcomes = futures::future::join_all(pushes.into_iter().map(|r| store.ingest(r))).await;
    for (i, o) in outcomes.iter().enumerate() {
        if i == 5 {
            assert!(matches!(o, Err(StoreError::Range(_))), "{o:?}");
        } else {
            assert!(matches!(o, Ok(IngestOutcome::Stored)), "push {i}: {o:?}");
        }
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM reports").await, 10);
}

pub(crate) async fn flows_with_one_key_in_one_report_become_one_aggregate_row(db: &dyn Backend) {
    let store = db.store();
    let mut r = report("f", 1, 1);
    r.telemetry.flows = vec![
        flow(10, "", ("8.8.8.8", 443), US_GOOGLE, 100, 1, 0, T),
        flow(
            10,
            "vllm",
            ("8.8.8.8", 443),
            US_GOOGLE,
            200,
            2,
            700,
            T + 1_000,
        ),
        flow(10, "", ("8.8.8.8", 443), US_GOOGLE, 300, 3, 500, T + 2_000),
    ];
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
    let (rows, _) = egress(store, "process", 10).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (
            rows[0].process.as_str(),
            rows[0].bytes_sent,
            rows[0].bytes_received,
            rows[0].connections,
            rows[0].min_rtt_us
        ),
        ("vllm", 600, 6, 3, 500)
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM flows_minute").await, 1);
    assert_eq!(db.count(RAW_FLOWS).await, 3);
}

fn token(hash: &str, expires_unix_ms: i64) -> NewEnrollToken {
    NewEnrollToken {
        hash: hash.to_owned(),
        created_unix_ms: 1_000,
        expires_unix_ms,
        replaces: None,
    }
}

pub(crate) async fn an_enrollment_token_is_spent_once_and_then_names_who_spent_it(
    db: &dyn Backend,
) {
    let s = db.store();
    s.add_enroll_tokens(&[token("aa", 10_000), token("bb", 10_000)])
        .await
        .unwrap();
    assert_eq!(
        s.spend_enroll_token("aa", "node-1", 5_000).await.unwrap(),
        TokenSpend::Spent
    );
    assert_eq!(
        s.spend_enroll_token("aa", "node-2", 6_000).await.unwrap(),
        TokenSpend::AlreadyUsed {
            node: "node-1".into(),
            at_unix_ms: 5_000
        }
    );
    // The other token is untouched by the first one's use.
    assert_eq!(
        s.spend_enroll_token("bb", "node-2", 6_000).await.unwrap(),
        TokenSpend::Spent
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM enroll_tokens WHERE used_ms IS NOT NULL")
            .await,
        2
    );
    // A duplicate hash is refused rather than silently renewing a spent token.
    assert!(s.add_enroll_tokens(&[token("aa", 99_000)]).await.is_err());
}

pub(crate) async fn an_expired_or_unknown_enrollment_token_is_refused_as_such(db: &dyn Backend) {
    let s = db.store();
    s.add_enroll_tokens(&[token("cc", 10_000)]).await.unwrap();
    assert_eq!(
        s.spend_enroll_token("cc", "node-1", 10_000).await.unwrap(),
        TokenSpend::Expired { at_unix_ms: 10_000 }
    );
    assert_eq!(
        s.spend_enroll_token("zz", "node-1", 1_000).await.unwrap(),
        TokenSpend::Unknown
    );
    // Refused attempts spend nothing.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM enroll_tokens WHERE used_ms IS NULL")
            .await,
        1
    );
}

#[tokio::test]
async fn open_with_an_empty_url_or_sqlite_opens_sqlite_under_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let store = super::open("", dir.path()).await.unwrap();
    ingest(store.as_ref(), report("a", 1, 1)).await;
    assert!(dir.path().join(super::sqlite::DB_FILE).exists());
    drop(super::open("sqlite:", dir.path()).await.unwrap());
    drop(super::open("sqlite:sub/db", dir.path()).await.unwrap());
    assert!(
        dir.path()
            .join("sub/db")
            .join(super::sqlite::DB_FILE)
            .exists()
    );
    let abs = dir.path().join("abs");
    let url = format!("sqlite:{}", abs.display());
    drop(
        super::open(&url, std::path::Path::new("/nonexistent"))
            .await
            .unwrap(),
    );
    assert!(abs.join(super::sqlite::DB_FILE).exists());
}

#[tokio::test]
async fn open_refuses_an_unknown_url_naming_it_and_the_accepted_forms() {
    let dir = tempfile::tempdir().unwrap();
    let err = super::open("mysql://root:secret@db/x", dir.path())
        .await
        .unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(text.contains("mysql://root:***@db/x"), "{text}");
    assert!(!text.contains("secret"), "{text}");
    assert!(
        text.contains("sqlite:PATH") && text.contains("postgres://"),
        "{text}"
    );
}

fn audit_entry(call: &str, rows: u64, at: i64) -> sov_evidence::audit::AuditEntry {
    sov_evidence::audit::AuditEntry {
        at_unix_ms: at,
        who: "analyst".into(),
        role: "regulator".into(),
        via: "https-cert".into(),
        call: call.into(),
        params: serde_json::json!({"since_unix_ms": 5, "by": "country"}),
        rows,
        outcome: "ok".into(),
    }
}

pub(crate) async fn audit_records_form_a_verifiable_chain_read_in_pages(db: &dyn Backend) {
    let store = db.store();
    for i in 0..5u64 {
        let r = store
            .append_audit(audit_entry("Egress", i, 1000 + i as i64))
            .await
            .unwrap();
        assert_eq!(r.seq, i + 1);
    }
    let first = store.audit_log(0, 2).await.unwrap();
    assert_eq!(first.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
    let rest = store.audit_log(2, 100).await.unwrap();
    assert_eq!(rest.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4, 5]);
    let all: Vec<LogRecord> = first
        .iter()
        .chain(&rest)
        .map(sov_evidence::audit::AuditRecord::as_log_record)
        .collect();
    assert_eq!(verify_chain(all.into_iter()), Ok(5));
    assert_eq!(
        crate::store::verify_store_audit(store).await.unwrap(),
        sov_evidence::chain::LogVerdict::Verified {
            records: 5,
            last_hash: rest[2].hash.clone()
        }
    );
    // Retention never touches it.
    store.prune(Retention::all_before(i64::MAX)).await.unwrap();
    assert_eq!(db.count("SELECT COUNT(*) FROM audit_log").await, 5);
}

pub(crate) async fn an_audit_record_keeps_who_what_parameters_and_result_size(db: &dyn Backend) {
    let store = db.store();
    store
        .append_audit(audit_entry("ListNodes", 42, 7000))
        .await
        .unwrap();
    let r = &store.audit_log(0, 10).await.unwrap()[0];
    assert_eq!(r.actor, "regulator/analyst");
    assert_eq!(r.call, "ListNodes");
    assert_eq!(r.at_unix_ms, 7000);
    let v = r.to_json();
    assert_eq!(v["who"], "analyst");
    assert_eq!(v["via"], "https-cert");
    assert_eq!(v["params"]["by"], "country");
    assert_eq!(v["rows"], 42);
    assert_eq!(v["outcome"], "ok");
}

pub(crate) async fn tokens_are_found_by_their_hash_only(db: &dyn Backend) {
    let store = db.store();
    let (token, rec) =
        crate::token::generate(crate::auth::Role::Regulator, "tool", 1000, 86_400_000).unwrap();
    store.insert_token(rec.clone()).await.unwrap();
    let found = store
        .token_by_hash(&crate::token::token_hash(&token))
        .await
        .unwrap();
    assert_eq!(found, Some(rec));
    assert_eq!(store.token_by_hash(&token).await.unwrap(), None);
    assert_eq!(
        db.count(&format!(
            "SELECT COUNT(*) FROM api_tokens WHERE hash LIKE '%{}%' OR name LIKE '%{}%'",
            &token[4..],
            &token[4..]
        ))
        .await,
        0
    );
}

pub(crate) async fn reports_are_counted_per_node_within_the_range(db: &dyn Backend) {
    let store = db.store();
    // Node a at 1, 2, 3 s; node b at 2 s; a resend of a's 2 s report counts once.
    for (node, seq) in [("a", 1), ("a", 2), ("a", 3), ("b", 2), ("a", 2)] {
        store.ingest(report(node, 1, seq)).await.unwrap();
    }
    assert_eq!(
        store.reports_by_node(0, 10_000, 100).await.unwrap(),
        vec![("a".to_owned(), 3), ("b".to_owned(), 1)]
    );
    // [2 s, 3 s): one report of each.
    assert_eq!(
        store.reports_by_node(2000, 3000, 100).await.unwrap(),
        vec![("a".to_owned(), 1), ("b".to_owned(), 1)]
    );
    assert_eq!(store.reports_by_node(0, 10_000, 1).await.unwrap().len(), 1);
    assert!(
        store
            .reports_by_node(5000, 9000, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

pub(crate) async fn gpu_seconds_are_summed_per_process_within_the_range(db: &dyn Backend) {
    let store = db.store();
    // Reports at 1 s, 2 s and 3 s: each charges 7.5 GPU-seconds to vllm (pid 4242) on node a.
    for seq in 1..=3 {
        let mut r = report("a", 1, seq);
        r.telemetry = telemetry();
        assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
    }
    let mut r = report("b", 1, 2);
    r.telemetry = telemetry();
    r.telemetry.gpus[0].processes[0].gpu_seconds = 100.0;
    assert_eq!(ingest(store, r).await, IngestOutcome::Stored);
    let rows = store.gpu_usage(1000, 3000, 10).await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].node, "b");
    assert!((rows[0].gpu_seconds - 100.0).abs() < 1e-9);
    assert_eq!((rows[1].node.as_str(), rows[1].pid), ("a", 4242));
    assert_eq!(rows[1].process, "vllm");
    // 1 s and 2 s are inside [1000, 3000); 3 s is not.
    assert!((rows[1].gpu_seconds - 15.0).abs() < 1e-9, "{rows:?}");
    assert_eq!(store.gpu_usage(1000, 3000, 1).await.unwrap().len(), 1);
}

pub(crate) async fn missing_ranges_name_every_hole_of_an_epoch(db: &dyn Backend) {
    let store = db.store();
    for seq in [3, 4, 7, 10] {
        assert_eq!(
            ingest(store, report("a", 1, seq)).await,
            IngestOutcome::Stored
        );
    }
    assert_eq!(
        ingest(store, report("a", 2, 1)).await,
        IngestOutcome::Stored
    );
    assert_eq!(
        store.missing_ranges("a", 1, 10).await.unwrap(),
        [(1, 2), (5, 6), (8, 9)]
    );
    assert_eq!(
        store.missing_ranges("a", 1, 2).await.unwrap(),
        [(1, 2), (5, 6)]
    );
    assert!(store.missing_ranges("a", 2, 10).await.unwrap().is_empty());
    assert!(
        store
            .missing_ranges("nobody", 1, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub(crate) async fn tokens_are_listed_and_a_deleted_token_is_gone(db: &dyn Backend) {
    use crate::auth::Role;
    let store = db.store();
    let (t1, r1) = crate::token::generate(Role::Regulator, "one", 1000, 86_400_000).unwrap();
    let (_, r2) = crate::token::generate(Role::Admin, "two", 2000, 86_400_000).unwrap();
    store.insert_token(r1.clone()).await.unwrap();
    store.insert_token(r2.clone()).await.unwrap();
    assert_eq!(store.list_tokens().await.unwrap(), [r1.clone(), r2.clone()]);
    assert!(store.delete_token(&r1.token_id).await.unwrap());
    assert!(!store.delete_token(&r1.token_id).await.unwrap());
    assert_eq!(
        store
            .token_by_hash(&crate::token::token_hash(&t1))
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.list_tokens().await.unwrap(), [r2]);
}
