//! API tokens and one-time enrollment tokens (hashes only).

use super::*;
use crate::store::NameUse;

impl SqliteStore {
    pub(super) fn token_by_hash_blocking(
        conn: &Connection,
        hash: &str,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let row = conn
            .query_row(
                "SELECT token_id, hash, name, role, created_ms, expires_ms FROM api_tokens
                 WHERE hash = ?1",
                [hash],
                |r| Ok(rows::token(r)),
            )
            .optional()
            .map_err(sql("find token"))?;
        row.transpose()
    }

    pub(super) fn add_enroll_tokens_blocking(
        conn: &mut Connection,
        tokens: &[NewEnrollToken],
    ) -> Result<(), StoreError> {
        let tx = conn.transaction().map_err(sql("begin add tokens"))?;
        for t in tokens {
            tx.execute(
                "INSERT INTO enroll_tokens (hash, created_ms, expires_ms, replaces)
                 VALUES (?1, ?2, ?3, ?4)",
                params![t.hash, t.created_unix_ms, t.expires_unix_ms, t.replaces],
            )
            .map_err(sql("add enrollment token"))?;
        }
        tx.commit().map_err(sql("commit add tokens"))
    }

    pub(super) fn spend_enroll_token_blocking(
        conn: &mut Connection,
        hash: &str,
        node: &str,
        now: i64,
    ) -> Result<TokenSpend, StoreError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin spend token"))?;
        let spent = tx
            .execute(
                "UPDATE enroll_tokens SET used_ms = ?3, used_by = ?2
                 WHERE hash = ?1 AND used_ms IS NULL AND expires_ms > ?3",
                params![hash, node, now],
            )
            .map_err(sql("spend enrollment token"))?;
        let outcome = if spent == 1 {
            TokenSpend::Spent
        } else {
            let row: Option<(i64, Option<i64>, Option<String>)> = tx
                .query_row(
                    "SELECT expires_ms, used_ms, used_by FROM enroll_tokens WHERE hash = ?1",
                    params![hash],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(sql("read enrollment token"))?;
            match row {
                None => TokenSpend::Unknown,
                Some((_, Some(at), by)) => TokenSpend::AlreadyUsed {
                    node: by.unwrap_or_default(),
                    at_unix_ms: at,
                },
                Some((expires, None, _)) => TokenSpend::Expired {
                    at_unix_ms: expires,
                },
            }
        };
        tx.commit().map_err(sql("commit spend token"))?;
        Ok(outcome)
    }
}

pub(super) async fn insert_token(
    store: &SqliteStore,
    token: TokenRecord,
) -> Result<(), StoreError> {
    let writer = store.writer.clone();
    tokio::task::spawn_blocking(move || {
        lock(&writer)
            .execute(
                "INSERT INTO api_tokens (token_id, hash, name, role, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    token.token_id,
                    token.hash,
                    token.name,
                    token.role.as_str(),
                    token.created_unix_ms,
                    token.expires_unix_ms
                ],
            )
            .map(|_| ())
            .map_err(sql("insert token"))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn list_tokens(store: &SqliteStore) -> Result<Vec<TokenRecord>, StoreError> {
    let reader = store.reader.clone();
    tokio::task::spawn_blocking(move || {
        reader.with(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT token_id, hash, name, role, created_ms, expires_ms FROM api_tokens
                 ORDER BY created_ms, token_id",
                )
                .map_err(sql("prepare list tokens"))?;
            let mut rows = stmt.query([]).map_err(sql("list tokens"))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(sql("list tokens"))? {
                out.push(rows::token(r)?);
            }
            Ok(out)
        })
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn delete_token(store: &SqliteStore, token_id: &str) -> Result<bool, StoreError> {
    let writer = store.writer.clone();
    let token_id = token_id.to_owned();
    tokio::task::spawn_blocking(move || {
        lock(&writer)
            .execute("DELETE FROM api_tokens WHERE token_id = ?1", [token_id])
            .map(|n| n > 0)
            .map_err(sql("delete token"))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn token_by_hash(
    store: &SqliteStore,
    hash: &str,
) -> Result<Option<TokenRecord>, StoreError> {
    let reader = store.reader.clone();
    let hash = hash.to_owned();
    tokio::task::spawn_blocking(move || {
        reader.with(|conn| SqliteStore::token_by_hash_blocking(conn, &hash))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn add_enroll_tokens(
    store: &SqliteStore,
    tokens: &[NewEnrollToken],
) -> Result<(), StoreError> {
    let writer = store.writer.clone();
    let tokens = tokens.to_vec();
    tokio::task::spawn_blocking(move || {
        SqliteStore::add_enroll_tokens_blocking(&mut lock(&writer), &tokens)
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn spend_enroll_token(
    store: &SqliteStore,
    hash: &str,
    node: &str,
    now_unix_ms: i64,
) -> Result<TokenSpend, StoreError> {
    let writer = store.writer.clone();
    let (hash, node) = (hash.to_owned(), node.to_owned());
    tokio::task::spawn_blocking(move || {
        SqliteStore::spend_enroll_token_blocking(&mut lock(&writer), &hash, &node, now_unix_ms)
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

pub(super) async fn enroll_name_use(
    store: &SqliteStore,
    hash: &str,
    node: &str,
) -> Result<NameUse, StoreError> {
    let reader = store.reader.clone();
    let (hash, node) = (hash.to_owned(), node.to_owned());
    tokio::task::spawn_blocking(move || {
        reader.with(|conn| {
            let last: Option<i64> = conn
                .query_row(
                    "SELECT MAX(t) FROM (
                     SELECT last_seen_ms AS t FROM nodes WHERE node = ?1
                     UNION ALL
                     SELECT used_ms AS t FROM enroll_tokens WHERE used_by = ?1)",
                    [&node],
                    |r| r.get(0),
                )
                .map_err(sql("read name use"))?;
            let replaces: Option<String> = conn
                .query_row(
                    "SELECT replaces FROM enroll_tokens WHERE hash = ?1",
                    [&hash],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql("read token replaces"))?
                .flatten();
            Ok(NameUse {
                last_used_unix_ms: last,
                token_replaces: replaces,
            })
        })
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}
