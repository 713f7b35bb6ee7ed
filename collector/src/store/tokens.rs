//! Stored credentials: API tokens ([`crate::token`]) and one-time enrollment tokens
//! ([`crate::enroll`]), hashes only.

use crate::auth::Role;

/// A stored token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// First 12 hex digits of the hash: how logs and people refer to it.
    pub token_id: String,
    /// Lowercase hex SHA-256 of the token.
    pub hash: String,
    /// What it is for (free text, e.g. the tool's name).
    pub name: String,
    /// The role it acts with.
    pub role: Role,
    /// When it was made, Unix ms.
    pub created_unix_ms: i64,
    /// When it stops working, Unix ms.
    pub expires_unix_ms: i64,
}

/// One enrollment token to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEnrollToken {
    /// Lower-case hex sha256 of the token text.
    pub hash: String,
    /// When it was made, Unix ms.
    pub created_unix_ms: i64,
    /// After this instant it is refused, Unix ms.
    pub expires_unix_ms: i64,
    /// The node whose certificate this token may replace (and the only node it enrolls);
    /// `None` for an ordinary token, which never enrolls a name already in use.
    pub replaces: Option<String>,
}

/// What the store knows of a name asked for at enrollment ([`Store::enroll_name_use`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameUse {
    /// The last sign that a certificate for the name is in use: its last report, or the
    /// enrollment that issued one, Unix ms (`None`: never seen).
    pub last_used_unix_ms: Option<i64>,
    /// The node the presented token was made to replace, if it was.
    pub token_replaces: Option<String>,
}

/// What [`Store::spend_enroll_token`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSpend {
    /// The token was valid and is now spent.
    Spent,
    /// No token has this hash.
    Unknown,
    /// The token was spent before.
    AlreadyUsed {
        /// By which node.
        node: String,
        /// When, Unix ms.
        at_unix_ms: i64,
    },
    /// The token expired unused.
    Expired {
        /// When, Unix ms.
        at_unix_ms: i64,
    },
}
