//! safetensors: an 8-byte little-endian header length `N`, `N` bytes of JSON, then the tensor
//! data. The JSON maps each tensor name to `{dtype, shape, data_offsets}` (offsets relative to the
//! end of the header) plus an optional `__metadata__` string map.
//!
//! The header is streamed through a serde visitor that keeps only the totals, so memory is the
//! header bytes plus the metadata kept, whatever the tensor count.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{Read, Seek};

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, Visitor};

use super::read::Src;
use super::{FormatError, Header};

/// The largest JSON header read (the safetensors crate itself refuses more than 100 MB).
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;
/// The reserved key holding the free-form string map.
pub const METADATA_KEY: &str = "__metadata__";
/// Smallest possible header: `{}`.
const MIN_HEADER_BYTES: u64 = 2;
/// Bytes before the JSON header.
const LEN_BYTES: u64 = 8;

/// Whether `prefix` starts like a safetensors file: eight length bytes, then a JSON object that
/// is empty or opens with a quoted printable key followed by `:`. Checking the first key keeps
/// random binaries whose ninth byte happens to be `{` out.
pub fn sniff(prefix: &[u8]) -> bool {
    let Some(json) = prefix.get(LEN_BYTES as usize..) else {
        return false;
    };
    let mut rest = json.iter().copied();
    if rest.next() != Some(b'{') {
        return false;
    }
    let mut rest = rest.skip_while(|b| b.is_ascii_whitespace());
    match rest.next() {
        Some(b'}') => return true,
        Some(b'"') => {}
        _ => return false,
    }
    let mut key_len = 0usize;
    loop {
        match rest.next() {
            Some(b'"') => break,
            Some(b'\\') => {
                rest.next();
                key_len += 2;
            }
            Some(b) if b >= 0x20 && b != 0x7f => key_len += 1,
            // A key longer than the prefix is accepted on the strength of what was seen.
            None => return key_len >= 16,
            Some(_) => return false,
        }
    }
    let mut rest = rest.skip_while(|b| b.is_ascii_whitespace());
    matches!(rest.next(), Some(b':') | None)
}

/// Parses the header of a safetensors file of `file_len` bytes.
pub fn parse<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<Header, FormatError> {
    let mut src = Src::start(r, file_len)?;
    let n = src.u64("safetensors header length")?;
    if n > MAX_HEADER_BYTES {
        return Err(FormatError::TooLarge {
            what: "safetensors header",
            len: n,
            limit: MAX_HEADER_BYTES,
        });
    }
    if n < MIN_HEADER_BYTES {
        return Err(FormatError::malformed(
            "safetensors header",
            format!("length {n} is too short"),
        ));
    }
    let json = src.bytes(n, MAX_HEADER_BYTES, "safetensors header")?;
    if json.first() != Some(&b'{') {
        return Err(FormatError::malformed(
            "safetensors header",
            "does not start with '{'",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(&json);
    let mut header = HeaderSeed
        .deserialize(&mut de)
        .and_then(|h| de.end().map(|()| h))
        .map_err(|e| FormatError::malformed("safetensors header", e.to_string()))?;
    // The visitor left the end of the furthest tensor's data, relative to the data section.
    header.declared_len = header
        .declared_len
        .map(|end| end.saturating_add(LEN_BYTES + n));
    Ok(header)
}

/// One tensor entry of the header.
#[derive(Debug, Deserialize)]
struct TensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Deserializes the header map into totals and the end of the furthest tensor's data.
#[derive(Debug)]
struct HeaderSeed;

impl<'de> DeserializeSeed<'de> for HeaderSeed {
    type Value = Header;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Header, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeaderSeed {
    type Value = Header;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of tensor names to tensor entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
        let mut header = Header::default();
        let mut dtypes = BTreeSet::new();
        let mut params: u64 = 0;
        let mut data_end: u64 = 0;
        while let Some(name) = map.next_key::<String>()? {
            if name == METADATA_KEY {
                let metadata: BTreeMap<String, String> = map.next_value()?;
                for (k, v) in &metadata {
                    header.put_metadata(k, v, usize::MAX);
                }
                continue;
            }
            let info: TensorInfo = map.next_value()?;
            let numel = info
                .shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    A::Error::custom(format!("tensor {name:?}: element count overflows"))
                })?;
            let (begin, end) = info.data_offsets;
            if begin > end {
                return Err(A::Error::custom(format!(
                    "tensor {name:?}: data offsets [{begin}, {end}] are reversed"
                )));
            }
            // Past the file's data (an incomplete file) is reported, not refused.
            data_end = data_end.max(end);
            if let Some(bits) = dtype_bits(&info.dtype) {
                let expected = numel
                    .checked_mul(bits)
                    .map(|b| b.div_ceil(8))
                    .ok_or_else(|| A::Error::custom(format!("tensor {name:?}: size overflows")))?;
                if expected != end - begin {
                    return Err(A::Error::custom(format!(
                        "tensor {name:?}: {} data bytes for {numel} {} elements",
                        end - begin,
                        info.dtype
                    )));
                }
            }
            params = params
                .checked_add(numel)
                .ok_or_else(|| A::Error::custom("parameter count overflows"))?;
            header.tensor_count += 1;
            dtypes.insert(info.dtype);
        }
        header.parameter_count = Some(params);
        header.dtypes = dtypes.into_iter().collect();
        header.declared_len = Some(data_end);
        Ok(header)
    }
}

/// Bits per element of the dtypes the safetensors crate knows; `None` for others.
fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" => 64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_prefixes_fail_cleanly, sniff_bytes, write_temp};
    use super::super::{Format, parse_path};
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};
    use std::collections::HashMap;

    /// Three tensors of three dtypes (F32 [2, 3], BF16 [4], I64 [2, 2, 2]) and two metadata keys.
    fn sample() -> Vec<u8> {
        let f32_data = vec![0u8; 2 * 3 * 4];
        let bf16_data = vec![1u8; 4 * 2];
        let i64_data = vec![2u8; 8 * 8];
        let tensors = vec![
            (
                "model.embed.weight",
                TensorView::new(Dtype::F32, vec![2, 3], &f32_data).expect("f32 view"),
            ),
            (
                "model.norm.weight",
                TensorView::new(Dtype::BF16, vec![4], &bf16_data).expect("bf16 view"),
            ),
            (
                "model.positions",
                TensorView::new(Dtype::I64, vec![2, 2, 2], &i64_data).expect("i64 view"),
            ),
        ];
        let metadata = HashMap::from([
            ("format".to_owned(), "pt".to_owned()),
            ("model".to_owned(), "tiny-test".to_owned()),
        ]);
        safetensors::serialize(tensors, Some(metadata)).expect("serialize")
    }

    fn with_header_len(len: u64, rest: &[u8]) -> Vec<u8> {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend(rest);
        bytes
    }

    #[test]
    fn a_file_written_by_the_safetensors_crate_reports_tensors_params_dtypes_and_metadata() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_temp(&dir, "blob-without-extension", &sample());
        let parsed = parse_path(&path).expect("parse").expect("recognised");
        assert_eq!(parsed.format, Format::Safetensors);
        let h = parsed.header;
        assert_eq!(h.tensor_count, 3);
        assert_eq!(h.parameter_count, Some(6 + 4 + 8));
        assert_eq!(h.dtypes, ["BF16", "F32", "I64"]);
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
        assert_eq!(
            h.metadata.get("model").map(String::as_str),
            Some("tiny-test")
        );
        assert_eq!(h.metadata.len(), 2);
    }

    #[test]
    fn an_empty_safetensors_file_has_no_tensors() {
        let bytes =
            safetensors::serialize(Vec::<(&str, TensorView<'_>)>::new(), None).expect("serialize");
        let parsed = sniff_bytes(&bytes).expect("parse").expect("recognised");
        assert_eq!(parsed.header.tensor_count, 0);
        assert_eq!(parsed.header.parameter_count, Some(0));
    }

    #[test]
    fn a_header_length_near_two_to_the_sixty_four_is_refused() {
        let bytes = with_header_len(u64::MAX, b"{\"a\":{\"dtype\":\"F32\"}}");
        let err = sniff_bytes(&bytes).expect_err("hostile length");
        assert!(matches!(err, FormatError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn a_header_length_beyond_the_file_is_truncation() {
        let bytes = with_header_len(1000, b"{\"weight\":{\"dtype\":\"F32\"}}");
        let err = sniff_bytes(&bytes).expect_err("short file");
        assert!(matches!(err, FormatError::Truncated { .. }), "{err}");
    }

    #[test]
    fn data_offsets_beyond_the_file_make_an_incomplete_file_and_reversed_ones_are_malformed() {
        let json = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let mut bytes = with_header_len(json.len() as u64, json);
        bytes.extend([0u8; 8]); // only half of the data
        let p = sniff_bytes(&bytes).expect("parses").expect("recognised");
        assert_eq!(p.header.declared_len, Some(8 + json.len() as u64 + 16));
        assert!(p.header.declared_len > Some(bytes.len() as u64));
        let json = br#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}}"#;
        let err = sniff_bytes(&with_header_len(json.len() as u64, json)).expect_err("reversed");
        assert!(matches!(err, FormatError::Malformed { .. }), "{err}");
    }

    #[test]
    fn a_shape_whose_product_overflows_is_malformed() {
        let json = br#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#;
        let err = sniff_bytes(&with_header_len(json.len() as u64, json)).expect_err("overflow");
        assert!(matches!(err, FormatError::Malformed { .. }), "{err}");
    }

    #[test]
    fn deeply_nested_json_and_bad_utf8_are_errors() {
        let mut deep = b"{\"w\":".to_vec();
        deep.extend(std::iter::repeat_n(b'[', 100_000));
        let err = sniff_bytes(&with_header_len(deep.len() as u64, &deep)).expect_err("deep");
        assert!(matches!(err, FormatError::Malformed { .. }), "{err}");

        let bad = b"{\"w\xff\xfe\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}    ";
        let err = sniff_bytes(&with_header_len(bad.len() as u64, bad)).expect_err("utf-8");
        assert!(matches!(err, FormatError::Malformed { .. }), "{err}");
    }

    #[test]
    fn every_truncation_of_a_valid_file_is_an_error_not_recognised_or_incomplete() {
        assert_prefixes_fail_cleanly(&sample());
    }

    #[test]
    fn a_file_cut_in_its_data_parses_and_declares_its_whole_length() {
        let whole = sample();
        let cut = &whole[..whole.len() - 10];
        let p = sniff_bytes(cut).expect("parses").expect("recognised");
        assert_eq!(p.header.declared_len, Some(whole.len() as u64));
        assert_eq!(p.header.tensor_count, 3);
        let p = sniff_bytes(&whole).expect("parses").expect("recognised");
        assert_eq!(
            p.header.declared_len,
            Some(whole.len() as u64),
            "whole: not incomplete"
        );
    }

    #[test]
    fn sniffing_wants_a_json_object_with_a_quoted_key() {
        assert!(sniff(b"\x02\0\0\0\0\0\0\0{}"));
        assert!(sniff(b"\x40\0\0\0\0\0\0\0{\"__metadata__\":{"));
        assert!(!sniff(b"\x40\0\0\0\0\0\0\0{\x01\x02"));
        assert!(!sniff(b"\x40\0\0\0\0\0\0\0[1,2]"));
        assert!(!sniff(b"{}"));
    }
}
