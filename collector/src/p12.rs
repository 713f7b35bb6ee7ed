//! A PKCS#12 (RFC 7292) bundle of a client certificate, its CA and its key, for a browser:
//! `sov-collector pki issue --p12`. Written here on `ring` (the tree's one crypto provider):
//! no crate on crates.io writes PKCS#12 without a second crypto implementation.
//!
//! The bundle: one unencrypted SafeContents holding the certificate and the CA certificate
//! (`certBag`) and the private key as a PKCS#8 `keyBag`, the leaf and the key tied by a
//! `localKeyId`; integrity by an HMAC-SHA-256 MAC whose key comes from the password through
//! the PKCS#12 key derivation (RFC 7292 appendix B, SHA-256, 2048 iterations), as OpenSSL 3
//! writes it. `ring` has no CBC block cipher, so the key is not encrypted inside the bundle:
//! the file is as secret as the `.key` PEM beside it (written 0600), and the password guards
//! its integrity. `openssl pkcs12 -info` reads it (`tests/tests/p12.rs`).

use ring::{digest, hmac, rand::SecureRandom as _};

/// MAC iterations (OpenSSL's default).
pub const MAC_ITERATIONS: u32 = 2048;

const OID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
const OID_KEY_BAG: &[u8] = &[
    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x01,
];
const OID_CERT_BAG: &[u8] = &[
    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x03,
];
const OID_X509_CERT: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x16, 0x01];
const OID_FRIENDLY_NAME: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x14];
const OID_LOCAL_KEY_ID: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x15];
const OID_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];

/// Why a bundle could not be written.
#[derive(Debug, thiserror::Error)]
pub enum P12Error {
    /// The system's random source failed.
    #[error("no random bytes for the MAC salt")]
    Random,
}

/// One DER TLV.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}
fn set(parts: &[Vec<u8>]) -> Vec<u8> {
    tlv(0x31, &parts.concat())
}
fn oid(o: &[u8]) -> Vec<u8> {
    tlv(0x06, o)
}
fn octets(b: &[u8]) -> Vec<u8> {
    tlv(0x04, b)
}
/// `[0] EXPLICIT`.
fn explicit0(inner: &[u8]) -> Vec<u8> {
    tlv(0xa0, inner)
}
fn integer(n: u32) -> Vec<u8> {
    let mut b: Vec<u8> = n
        .to_be_bytes()
        .iter()
        .copied()
        .skip_while(|x| *x == 0)
        .collect();
    if b.is_empty() || b[0] & 0x80 != 0 {
        b.insert(0, 0);
    }
    tlv(0x02, &b)
}
/// A BMPString: UTF-16 big-endian.
fn bmp(s: &str) -> Vec<u8> {
    tlv(
        0x1e,
        &s.encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect::<Vec<_>>(),
    )
}

fn attributes(name: &str, key_id: &[u8]) -> Vec<u8> {
    set(&[
        seq(&[oid(OID_FRIENDLY_NAME), set(&[bmp(name)])]),
        seq(&[oid(OID_LOCAL_KEY_ID), set(&[octets(key_id)])]),
    ])
}

fn cert_bag(der: &[u8], attrs: Option<Vec<u8>>) -> Vec<u8> {
    let value = seq(&[oid(OID_X509_CERT), explicit0(&octets(der))]);
    let mut parts = vec![oid(OID_CERT_BAG), explicit0(&value)];
    parts.extend(attrs);
    seq(&parts)
}

/// The PKCS#12 key derivation (RFC 7292 B.2) with SHA-256, for `n` ≤ 32 bytes of purpose `id`
/// (3: the MAC key).
pub fn kdf(password: &str, salt: &[u8], id: u8, iterations: u32, n: usize) -> Vec<u8> {
    const V: usize = 64;
    let mut pass: Vec<u8> = password.encode_utf16().flat_map(u16::to_be_bytes).collect();
    pass.extend_from_slice(&[0, 0]);
    let fill = |src: &[u8]| -> Vec<u8> {
        if src.is_empty() {
            return Vec::new();
        }
        let len = V * src.len().div_ceil(V);
        src.iter().copied().cycle().take(len).collect()
    };
    let mut input = vec![id; V];
    input.extend(fill(salt));
    input.extend(fill(&pass));
    let mut a = digest::digest(&digest::SHA256, &input);
    for _ in 1..iterations {
        a = digest::digest(&digest::SHA256, a.as_ref());
    }
    a.as_ref()[..n.min(32)].to_vec()
}

/// The bundle of `cert_der` (the leaf), `ca_der` and `key_pkcs8_der`, named `name`, with its
/// MAC under `password`.
pub fn bundle(
    name: &str,
    cert_der: &[u8],
    ca_der: &[u8],
    key_pkcs8_der: &[u8],
    password: &str,
) -> Result<Vec<u8>, P12Error> {
    let cert_hash = digest::digest(&digest::SHA256, cert_der);
    let key_id = &cert_hash.as_ref()[..20];
    let key_bag = seq(&[
        oid(OID_KEY_BAG),
        explicit0(key_pkcs8_der),
        attributes(name, key_id),
    ]);
    let safe_contents = seq(&[
        cert_bag(cert_der, Some(attributes(name, key_id))),
        cert_bag(ca_der, None),
        key_bag,
    ]);
    let data = |inner: &[u8]| seq(&[oid(OID_DATA), explicit0(&octets(inner))]);
    let auth_safe = seq(&[data(&safe_contents)]);
    let mut salt = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| P12Error::Random)?;
    let mac_key = kdf(password, &salt, 3, MAC_ITERATIONS, 32);
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &mac_key), &auth_safe);
    let mac_data = seq(&[
        seq(&[
            seq(&[oid(OID_SHA256), vec![0x05, 0x00]]),
            octets(tag.as_ref()),
        ]),
        octets(&salt),
        integer(MAC_ITERATIONS),
    ]);
    Ok(seq(&[integer(3), data(&auth_safe), mac_data]))
}

/// A password for a bundle: 20 characters from an alphabet without look-alikes.
pub fn generate_password() -> Result<String, P12Error> {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut bytes = [0u8; 20];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| P12Error::Random)?;
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lengths_are_der() {
        assert_eq!(tlv(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = tlv(0x04, &[0u8; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(integer(3), vec![0x02, 1, 3]);
        assert_eq!(integer(2048), vec![0x02, 2, 0x08, 0x00]);
        assert_eq!(integer(128), vec![0x02, 2, 0x00, 0x80]);
    }

    #[test]
    fn the_key_derivation_depends_on_password_salt_and_purpose() {
        let a = kdf("secret", b"salt", 3, 2, 32);
        assert_eq!(a.len(), 32);
        assert_ne!(a, kdf("secret", b"salt", 1, 2, 32));
        assert_ne!(a, kdf("Secret", b"salt", 3, 2, 32));
        assert_ne!(a, kdf("secret", b"salz", 3, 2, 32));
        assert_eq!(a, kdf("secret", b"salt", 3, 2, 32));
        assert_eq!(generate_password().unwrap().len(), 20);
    }
}
