//! API tokens for the HTTPS API, for tools that cannot hold a client certificate.
//!
//! `sov-collector token create --role regulator --expires 30d` makes a token of 32 random bytes
//! (`sov_` + 64 hex digits), prints it once and stores only its SHA-256 ([`token_hash`]),
//! with its role, name and expiry. A request carrying `Authorization: Bearer TOKEN` acts with
//! the token's role until it expires; the audit log names it `token:<id>` (the first 12 hex
//! digits of its hash, which `token create` prints too). 256 random bits need no salt or slow
//! hash: the stored hash cannot be reversed or guessed.

use ring::rand::SecureRandom as _;

use crate::auth::Role;
pub use crate::store::TokenRecord;

/// Prefix of every token (recognisable in logs and secret scanners).
pub const TOKEN_PREFIX: &str = "sov_";
/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;
/// Hex digits of the hash that identify a token.
const ID_LEN: usize = 12;
/// Longest lifetime a token may be given: 2 years.
pub const MAX_TOKEN_LIFETIME_MS: i64 = 2 * 366 * 86_400_000;

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The system's random source failed.
    #[error("no randomness available for a token")]
    Random,
    /// The lifetime is not in (0, 2 years].
    #[error("expiry must be more than 0 and at most 732 days")]
    Lifetime,
    /// The name is too long or has control characters.
    #[error("name must be at most 128 printable characters")]
    Name,
}

/// Lowercase hex SHA-256 of `token`.
pub fn token_hash(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A new token and its record; store the record, show the token once.
pub fn generate(
    role: Role,
    name: &str,
    now_unix_ms: i64,
    lifetime_ms: i64,
) -> Result<(String, TokenRecord), TokenError> {
    if lifetime_ms <= 0 || lifetime_ms > MAX_TOKEN_LIFETIME_MS {
        return Err(TokenError::Lifetime);
    }
    if name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(TokenError::Name);
    }
    let mut bytes = [0u8; TOKEN_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TokenError::Random)?;
    let token: String = std::iter::once(TOKEN_PREFIX.to_owned())
        .chain(bytes.iter().map(|b| format!("{b:02x}")))
        .collect();
    let hash = token_hash(&token);
    let record = TokenRecord {
        token_id: hash[..ID_LEN].to_owned(),
        hash,
        name: name.to_owned(),
        role,
        created_unix_ms: now_unix_ms,
        expires_unix_ms: now_unix_ms.saturating_add(lifetime_ms),
    };
    Ok((token, record))
}

/// Whether `text` has the shape of a token (checked before any store lookup).
pub fn well_formed(text: &str) -> bool {
    text.strip_prefix(TOKEN_PREFIX).is_some_and(|hex| {
        hex.len() == TOKEN_BYTES * 2 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_is_well_formed_and_its_record_holds_only_its_hash() {
        let (token, rec) = generate(Role::Regulator, "tool", 1000, 86_400_000).unwrap();
        assert!(well_formed(&token), "{token}");
        assert_eq!(rec.hash, token_hash(&token));
        assert!(!rec.hash.contains(&token[TOKEN_PREFIX.len()..]));
        assert_eq!(rec.token_id, &rec.hash[..12]);
        assert_eq!(rec.expires_unix_ms, 1000 + 86_400_000);
        let (other, _) = generate(Role::Regulator, "tool", 1000, 86_400_000).unwrap();
        assert_ne!(token, other);
    }

    #[test]
    fn lifetimes_out_of_range_and_bad_names_are_refused() {
        assert!(generate(Role::Admin, "x", 0, 0).is_err());
        assert!(generate(Role::Admin, "x", 0, MAX_TOKEN_LIFETIME_MS + 1).is_err());
        assert!(generate(Role::Admin, "a\nb", 0, 1000).is_err());
    }

    #[test]
    fn malformed_tokens_are_recognised_without_a_lookup() {
        for bad in [
            "",
            "sov_",
            "sov_xyz",
            "Bearer",
            &format!("sov_{}", "g".repeat(64)),
        ] {
            assert!(!well_formed(bad), "{bad:?}");
        }
        assert!(well_formed(&format!("sov_{}", "a".repeat(64))));
    }
}
