//! Recognise a database file by its content, whatever its name.
//!
//! - MaxMind DB: the metadata marker `\xAB\xCD\xEFMaxMind.com` in the last 128 KiB;
//! - delegated: a version line such as `2|ripencc|20261101|…`, or records with `|ipv4|`,
//!   `|ipv6|` or `|asn|`;
//! - geofeed (RFC 8805): the first data line is `prefix/len,country,…`;
//! - CSV: the first data line (after an optional header) starts with two addresses.

use super::csv::{parse_address, split_fields};

/// The MaxMind DB metadata marker.
pub const MMDB_MARKER: &[u8] = b"\xAB\xCD\xEFMaxMind.com";
/// The metadata section is at most this far from the end of a MaxMind DB.
const MMDB_METADATA_MAX_BYTES: usize = 128 * 1024;
/// How much of a text file is looked at.
const TEXT_PEEK_BYTES: usize = 64 * 1024;
/// Data lines of a text file looked at for delegated records.
const TEXT_PEEK_LINES: usize = 16;
/// Bytes shown in an "unrecognised format" error.
const HEAD_BYTES: usize = 16;

/// A recognised database format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// MaxMind DB (`.mmdb`).
    Mmdb,
    /// A registry's `delegated-*-extended` (or plain `delegated-*`) statistics file.
    Delegated,
    /// CSV ranges: `start,end,CC` or `start,end,asn,organisation`.
    Csv,
    /// An RFC 8805 geofeed: `prefix,CC,region,city,postal`.
    Geofeed,
}

/// The format of a file's content, if it is one of ours.
pub fn detect(bytes: &[u8]) -> Option<Format> {
    let tail = &bytes[bytes.len().saturating_sub(MMDB_METADATA_MAX_BYTES)..];
    if tail.windows(MMDB_MARKER.len()).any(|w| w == MMDB_MARKER) {
        return Some(Format::Mmdb);
    }
    let peek = &bytes[..bytes.len().min(TEXT_PEEK_BYTES)];
    let text = String::from_utf8_lossy(peek);
    let mut data_lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let first = data_lines.next()?;
    if is_version_line(first) {
        return Some(Format::Delegated);
    }
    if super::geofeed::is_geofeed_line(first) {
        return Some(Format::Geofeed);
    }
    let rest: Vec<&str> = data_lines.take(TEXT_PEEK_LINES).collect();
    if std::iter::once(first)
        .chain(rest.iter().copied())
        .any(|l| ["|ipv4|", "|ipv6|", "|asn|"].iter().any(|t| l.contains(t)))
    {
        return Some(Format::Delegated);
    }
    // CSV: the first line, or the second after a header.
    for line in std::iter::once(first).chain(rest.first().copied()) {
        let fields = split_fields(line);
        if fields.len() >= 3
            && parse_address(&fields[0]).is_some()
            && parse_address(&fields[1]).is_some()
        {
            return Some(Format::Csv);
        }
    }
    None
}

/// `2|ripencc|20261101|…` or `2.3|apnic|…`: a version number, then `|`.
pub(crate) fn is_version_line(line: &str) -> bool {
    let Some((version, _)) = line.split_once('|') else {
        return false;
    };
    let mut parts = version.splitn(2, '.');
    parts.all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) && !version.is_empty()
}

/// The first bytes of a file, escaped, for error messages: `"\x1f\x8b\x08\x00…"`.
pub fn head(bytes: &[u8]) -> String {
    let shown: String = bytes[..bytes.len().min(HEAD_BYTES)]
        .iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    if bytes.len() > HEAD_BYTES {
        format!("\"{shown}…\"")
    } else {
        format!("\"{shown}\"")
    }
}

/// A hint for common wrong files (compressed, empty), appended to the error; "" otherwise.
pub fn hint(bytes: &[u8]) -> &'static str {
    if bytes.is_empty() {
        "; it is empty"
    } else if bytes.starts_with(b"\x1f\x8b") {
        "; it is gzip-compressed: decompress it first"
    } else if bytes.starts_with(b"PK\x03\x04") {
        "; it is a zip archive: extract it first"
    } else if bytes.starts_with(b"\xfd7zXZ\x00") {
        "; it is xz-compressed: decompress it first"
    } else if bytes.starts_with(b"BZh") {
        "; it is bzip2-compressed: decompress it first"
    } else if bytes.len() > 262 && &bytes[257..262] == b"ustar" {
        "; it is a tar archive: extract it first"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format_is_recognised_by_content() {
        let mut mmdb = vec![0u8; 100];
        mmdb.extend_from_slice(MMDB_MARKER);
        mmdb.extend_from_slice(&[0xe0; 40]);
        assert_eq!(detect(&mmdb), Some(Format::Mmdb));
        assert_eq!(
            detect(b"# comment\n2|ripencc|20261101|3|19830705|20261101|+0100\n"),
            Some(Format::Delegated)
        );
        assert_eq!(
            detect(b"arin|US|ipv4|8.8.8.0|256|19921201|allocated\n"),
            Some(Format::Delegated)
        );
        assert_eq!(
            detect(b"ip_range_start,ip_range_end,country_code\n1.0.0.0,1.0.0.255,AU\n"),
            Some(Format::Csv)
        );
        assert_eq!(
            detect(b"\"16777216\",\"16777471\",\"AU\",\"Australia\"\n"),
            Some(Format::Csv)
        );
        assert_eq!(
            detect(b"# geofeed\n192.0.2.0/24,FR,FR-IDF,Paris,\n"),
            Some(Format::Geofeed)
        );
        assert_eq!(detect(b"hello world\nsecond line\n"), None);
        assert_eq!(detect(b""), None);
    }

    #[test]
    fn an_unknown_file_is_described_by_its_first_bytes_and_a_hint() {
        let gz = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03abcdefghijkl";
        assert_eq!(detect(gz), None);
        assert_eq!(
            head(gz),
            "\"\\x1f\\x8b\\x08\\x00\\x00\\x00\\x00\\x00\\x00\\x03abcdef…\""
        );
        assert!(hint(gz).contains("gzip"));
        assert_eq!(hint(b"plain"), "");
    }

    #[test]
    fn version_lines_are_numbers_then_a_bar() {
        assert!(is_version_line("2|ripencc|20261101|1|2|3|+0100"));
        assert!(is_version_line("2.3|apnic|20261101"));
        assert!(!is_version_line(
            "ripencc|FR|ipv4|1.2.3.0|256|20100101|allocated"
        ));
        assert!(!is_version_line("2.|x"));
        assert!(!is_version_line("|x"));
    }
}
