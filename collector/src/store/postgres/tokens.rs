//! API tokens and one-time enrollment tokens (hashes only); a token is spent by one
//! conditional update, so two replicas cannot both spend it.

use super::*;
use crate::store::NameUse;

pub(super) async fn insert_token(
    store: &PostgresStore,
    token: TokenRecord,
) -> Result<(), StoreError> {
    let w = store.writer().await?;
    w.client
        .execute(
            "INSERT INTO api_tokens (token_id, hash, name, role, created_ms, expires_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &token.token_id,
                &token.hash,
                &token.name,
                &token.role.as_str(),
                &token.created_unix_ms,
                &token.expires_unix_ms,
            ],
        )
        .await
        .map_err(pg("insert token"))?;
    Ok(())
}

pub(super) async fn list_tokens(store: &PostgresStore) -> Result<Vec<TokenRecord>, StoreError> {
    let client = store.reader().await?;
    let rows = client
        .query(
            "SELECT token_id, hash, name, role, created_ms, expires_ms FROM api_tokens
             ORDER BY created_ms, token_id COLLATE \"C\"",
            &[],
        )
        .await
        .map_err(pg("list tokens"))?;
    rows.iter().map(rows::token).collect()
}

pub(super) async fn delete_token(
    store: &PostgresStore,
    token_id: &str,
) -> Result<bool, StoreError> {
    let w = store.writer().await?;
    let n = w
        .client
        .execute("DELETE FROM api_tokens WHERE token_id = $1", &[&token_id])
        .await
        .map_err(pg("delete token"))?;
    Ok(n > 0)
}

pub(super) async fn token_by_hash(
    store: &PostgresStore,
    hash: &str,
) -> Result<Option<TokenRecord>, StoreError> {
    let client = store.reader().await?;
    let row = client
        .query_opt(
            "SELECT token_id, hash, name, role, created_ms, expires_ms FROM api_tokens
             WHERE hash = $1",
            &[&hash],
        )
        .await
        .map_err(pg("find token"))?;
    row.as_ref().map(rows::token).transpose()
}

pub(super) async fn add_enroll_tokens(
    store: &PostgresStore,
    tokens: &[NewEnrollToken],
) -> Result<(), StoreError> {
    let mut w = store.writer().await?;
    let tx = w
        .client
        .transaction()
        .await
        .map_err(pg("begin add tokens"))?;
    for t in tokens {
        tx.execute(
            "INSERT INTO enroll_tokens (hash, created_ms, expires_ms, replaces)
             VALUES ($1, $2, $3, $4)",
            &[&t.hash, &t.created_unix_ms, &t.expires_unix_ms, &t.replaces],
        )
        .await
        .map_err(pg("add enrollment token"))?;
    }
    tx.commit().await.map_err(pg("commit add tokens"))
}

pub(super) async fn spend_enroll_token(
    store: &PostgresStore,
    hash: &str,
    node: &str,
    now_unix_ms: i64,
) -> Result<TokenSpend, StoreError> {
    let w = store.writer().await?;
    // One statement: of two replicas spending the same token, the second waits for the
    // first one's row lock, re-checks `used_ms IS NULL` and updates nothing.
    let spent = w
        .client
        .execute(
            "UPDATE enroll_tokens SET used_ms = $3, used_by = $2
             WHERE hash = $1 AND used_ms IS NULL AND expires_ms > $3",
            &[&hash, &node, &now_unix_ms],
        )
        .await
        .map_err(pg("spend enrollment token"))?;
    if spent == 1 {
        return Ok(TokenSpend::Spent);
    }
    let row = w
        .client
        .query_opt(
            "SELECT expires_ms, used_ms, used_by FROM enroll_tokens WHERE hash = $1",
            &[&hash],
        )
        .await
        .map_err(pg("read enrollment token"))?;
    let Some(row) = row else {
        return Ok(TokenSpend::Unknown);
    };
    let expires: i64 = row.try_get(0).map_err(pg("read enrollment token"))?;
    let used: Option<i64> = row.try_get(1).map_err(pg("read enrollment token"))?;
    let by: Option<String> = row.try_get(2).map_err(pg("read enrollment token"))?;
    Ok(match used {
        Some(at) => TokenSpend::AlreadyUsed {
            node: by.unwrap_or_default(),
            at_unix_ms: at,
        },
        None => TokenSpend::Expired {
            at_unix_ms: expires,
        },
    })
}

pub(super) async fn enroll_name_use(
    store: &PostgresStore,
    hash: &str,
    node: &str,
) -> Result<NameUse, StoreError> {
    let client = store.reader().await?;
    let row = client
        .query_one(
            "SELECT (SELECT MAX(t) FROM (
                         SELECT last_seen_ms AS t FROM nodes WHERE node = $2::TEXT
                         UNION ALL
                         SELECT used_ms AS t FROM enroll_tokens WHERE used_by = $2::TEXT) u),
                    (SELECT replaces FROM enroll_tokens WHERE hash = $1::TEXT)",
            &[&hash, &node],
        )
        .await
        .map_err(pg("read name use"))?;
    Ok(NameUse {
        last_used_unix_ms: row.try_get(0).map_err(pg("read name use"))?,
        token_replaces: row.try_get(1).map_err(pg("read name use"))?,
    })
}
