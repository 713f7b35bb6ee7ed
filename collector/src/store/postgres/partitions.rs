//! One deriver per partition of nodes (issue 14): the derive queue is split into
//! [`PARTITIONS`] by a hash of the node's name (`derive_queue.part`, migration 0019), and the
//! replicas present share the partitions out, each holding its share under session advisory
//! locks on its deriver's connection. A deriver takes queued reports only from the partitions
//! it holds, so replicas derive in parallel without waiting on each other's queue rows, and a
//! node's reports are derived by one deriver at a time, in queue order.
//!
//! Who is present: each deriver holds one member slot (another advisory lock) for as long as
//! its connection lives; every [`BALANCE_EVERY`] it reads the member slots held (`pg_locks`),
//! and the member of rank `r` among `n` takes the partitions `p` with `p % n == r`, giving
//! back any others it holds. A replica that dies loses its connection and with it its locks,
//! and the others take its partitions at their next balance. While shares move, a partition
//! can be held by nobody for a moment (its reports wait one balance longer), never by two.
//!
//! Exactly once does not rest on this: the derive transaction still deletes each report's
//! queue row and derives only what it deleted.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{StoreError, get, pg};

/// Partitions of the derive queue (`hashtext(node) & 63`, migration 0019).
pub(super) const PARTITIONS: i32 = 64;
/// Most replicas that take a share (one member slot each); a replica beyond them derives
/// nothing until a slot frees.
const MEMBER_SLOTS: i32 = 64;
/// Second keys of the advisory locks (the first is `hashtext(current_schema())`, so that
/// schemas sharing a database share nothing): partition `p` is `PART_KEY + p`, member slot `s`
/// is `MEMBER_KEY + s`.
const PART_KEY: i32 = 0x5344_0000;
const MEMBER_KEY: i32 = 0x5344_1000;
/// How often a deriver looks at who else is present and takes or gives back partitions.
pub(super) const BALANCE_EVERY: Duration = Duration::from_secs(1);

/// The member slots held now, on this database and schema.
const MEMBERS: &str = "SELECT objid::INT8 - $1::INT8 FROM pg_locks
     WHERE locktype = 'advisory' AND objsubid = 2 AND granted
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND classid = hashtext(current_schema())::OID
       AND objid::INT8 BETWEEN $1::INT8 AND $1::INT8 + $2::INT8 - 1
     ORDER BY 1";

/// What one deriver connection holds.
#[derive(Debug, Default)]
pub(super) struct Partitions {
    /// Its member slot, once it took one.
    slot: Option<i32>,
    /// The partitions it holds, sorted.
    pub(super) held: Vec<i32>,
    /// When it last balanced.
    balanced_at: Option<Instant>,
    /// The newest flow minute it wrote per node (cleared when it takes partitions).
    pub(super) newest_minutes: super::ingest::NewestMinutes,
}

impl Partitions {
    /// Whether it holds every partition (then the queue is read without a filter).
    pub(super) fn holds_all(&self) -> bool {
        self.held.len() == usize::try_from(PARTITIONS).unwrap_or(usize::MAX)
    }
}

/// The partitions of member `rank` among `members`.
fn share(rank: usize, members: usize) -> Vec<i32> {
    let members = members.max(1);
    (0..PARTITIONS)
        .filter(|&p| usize::try_from(p).unwrap_or(0) % members == rank)
        .collect()
}

/// Take a member slot if this connection has none, then take this member's share of the
/// partitions and give back the rest; at most every [`BALANCE_EVERY`] (`force`: now).
pub(super) async fn balance(
    client: &Client,
    parts: &mut Partitions,
    force: bool,
) -> Result<(), StoreError> {
    if !force
        && parts
            .balanced_at
            .is_some_and(|t| t.elapsed() < BALANCE_EVERY)
    {
        return Ok(());
    }
    parts.balanced_at = Some(Instant::now());
    if parts.slot.is_none() {
        for s in 0..MEMBER_SLOTS {
            let row = client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtext(current_schema()), $1::INT4)",
                    &[&(MEMBER_KEY + s)],
                )
                .await
                .map_err(pg("take a deriver slot"))?;
            if get::<bool>(&row, 0, "take a deriver slot")? {
                parts.slot = Some(s);
                break;
            }
        }
    }
    let Some(slot) = parts.slot else {
        tracing::warn!(
            slots = MEMBER_SLOTS,
            "every deriver slot is taken; this replica derives nothing"
        );
        return Ok(());
    };
    let members: Vec<i64> = client
        .query(MEMBERS, &[&i64::from(MEMBER_KEY), &i64::from(MEMBER_SLOTS)])
        .await
        .map_err(pg("read deriver slots"))?
        .iter()
        .map(|r| get::<i64>(r, 0, "read deriver slots"))
        .collect::<Result<_, _>>()?;
    let rank = members
        .iter()
        .position(|&m| m == i64::from(slot))
        .unwrap_or(0);
    let mine = share(rank, members.len());
    let give_back: Vec<i32> = parts
        .held
        .iter()
        .copied()
        .filter(|p| !mine.contains(p))
        .collect();
    if !give_back.is_empty() {
        client
            .execute(
                "SELECT pg_advisory_unlock(hashtext(current_schema()), $1::INT4 + p)
                 FROM unnest($2::INT4[]) p",
                &[&PART_KEY, &give_back],
            )
            .await
            .map_err(pg("give back derive partitions"))?;
        parts.held.retain(|p| mine.contains(p));
    }
    let want: Vec<i32> = mine
        .iter()
        .copied()
        .filter(|p| !parts.held.contains(p))
        .collect();
    if !want.is_empty() {
        let got = client
            .query(
                "SELECT p FROM unnest($2::INT4[]) p
                 WHERE pg_try_advisory_lock(hashtext(current_schema()), $1::INT4 + p)",
                &[&PART_KEY, &want],
            )
            .await
            .map_err(pg("take derive partitions"))?;
        if !got.is_empty() {
            // Their nodes' minutes may have been written by the deriver that held them.
            parts.newest_minutes.clear();
        }
        for row in &got {
            parts
                .held
                .push(get::<i32>(row, 0, "take derive partitions")?);
        }
        parts.held.sort_unstable();
    }
    if !give_back.is_empty() || !want.is_empty() {
        tracing::debug!(
            slot,
            members = members.len(),
            held = parts.held.len(),
            "derive partitions balanced"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_partition_once() {
        for members in 1..=5 {
            let mut all: Vec<i32> = (0..members).flat_map(|r| share(r, members)).collect();
            all.sort_unstable();
            assert_eq!(
                all,
                (0..PARTITIONS).collect::<Vec<_>>(),
                "{members} members"
            );
        }
        assert_eq!(share(0, 2).len(), 32);
    }
}
