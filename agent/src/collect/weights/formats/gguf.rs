//! GGUF (llama.cpp, Ollama), versions 2 and 3, little-endian: `GGUF`, version `u32`,
//! tensor count `u64`, key-value count `u64`, the key-value pairs, the tensor infos
//! (name, `u32` dimension count, `u64` dimensions, `u32` ggml type, `u64` data offset), then the
//! tensor data at the next multiple of `general.alignment` (default 32).
//!
//! Scalar string and integer values are kept as metadata (`general.*` keys have room reserved).
//! Arrays are skipped: fixed-size element arrays by one seek, string arrays (tokenizer
//! vocabularies) by their lengths, every byte looked at counted against [`MAX_METADATA_BYTES`].

use std::collections::BTreeSet;
use std::io::{Read, Seek};

use super::read::Src;
use super::{FormatError, Header, MAX_METADATA_ENTRIES, MAX_METADATA_VALUE_BYTES, utf8_prefix};

/// The file magic.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// The longest string value (and tensor name) accepted.
pub const MAX_STRING_BYTES: u64 = 1024 * 1024;
/// The longest key accepted (the GGUF specification caps keys at 65535 bytes).
pub const MAX_KEY_BYTES: u64 = 65_535;
/// The most elements one array may declare.
pub const MAX_ARRAY_ELEMENTS: u64 = 16 * 1024 * 1024;
/// The most bytes of keys, values, array headers and strings looked at in the metadata section.
pub const MAX_METADATA_BYTES: u64 = 64 * 1024 * 1024;
/// The most key-value pairs accepted.
pub const MAX_KV_COUNT: u64 = 1024 * 1024;
/// The deepest nesting of arrays inside arrays.
pub const MAX_ARRAY_DEPTH: u32 = 4;
/// The most tensors accepted.
pub const MAX_TENSOR_COUNT: u64 = 1024 * 1024;
/// The most dimensions one tensor may have.
pub const MAX_DIMS: u32 = 8;
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Metadata entries kept for keys outside `general.*`; the rest are reserved for `general.*`.
const OTHER_METADATA_CAP: usize = MAX_METADATA_ENTRIES * 3 / 4;
/// Smallest key-value pair: key length, value type, one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest tensor info: name length, dimension count, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// GGUF value type ids.
mod ty {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// Whether `prefix` starts with the GGUF magic.
pub fn sniff(prefix: &[u8]) -> bool {
    prefix.starts_with(MAGIC)
}

/// Parses the header of a GGUF file of `file_len` bytes.
pub fn parse<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<Header, FormatError> {
    let mut src = Src::start(r, file_len)?;
    let mut p = Parser {
        src: &mut src,
        budget: MAX_METADATA_BYTES,
    };
    p.header()
}

/// A scalar worth keeping as metadata.
enum Scalar {
    Text(String),
    Int(i128),
    Other,
}

struct Parser<'s, 'a, R> {
    src: &'s mut Src<'a, R>,
    /// Metadata bytes still allowed to be looked at.
    budget: u64,
}

impl<R: Read + Seek> Parser<'_, '_, R> {
    fn spend(&mut self, n: u64) -> Result<(), FormatError> {
        match self.budget.checked_sub(n) {
            Some(left) => {
                self.budget = left;
                Ok(())
            }
            None => Err(FormatError::TooLarge {
                what: "gguf metadata",
                len: (MAX_METADATA_BYTES - self.budget).saturating_add(n),
                limit: MAX_METADATA_BYTES,
            }),
        }
    }

    fn header(&mut self) -> Result<Header, FormatError> {
        let magic = self.src.array::<4>("gguf magic")?;
        if &magic != MAGIC {
            return Err(FormatError::malformed(
                "gguf magic",
                format!("{magic:02x?}"),
            ));
        }
        let version = self.src.u32("gguf version")?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(FormatError::Unsupported {
                    what: "gguf version",
                    detail: "1 (32-bit lengths, before August 2023)".into(),
                });
            }
            v if (1..=3).contains(&v.swap_bytes()) => {
                return Err(FormatError::Unsupported {
                    what: "gguf byte order",
                    detail: format!("big-endian version {}", v.swap_bytes()),
                });
            }
            v => {
                return Err(FormatError::Unsupported {
                    what: "gguf version",
                    detail: v.to_string(),
                });
            }
        }
        let tensor_count = self.src.u64("gguf tensor count")?;
        let kv_count = self.src.u64("gguf metadata count")?;
        if kv_count > MAX_KV_COUNT {
            return Err(FormatError::TooLarge {
                what: "gguf metadata count",
                len: kv_count,
                limit: MAX_KV_COUNT,
            });
        }
        if tensor_count > MAX_TENSOR_COUNT {
            return Err(FormatError::TooLarge {
                what: "gguf tensor count",
                len: tensor_count,
                limit: MAX_TENSOR_COUNT,
            });
        }
        // Both counts are bounded above, so these products cannot overflow.
        self.src.need(
            kv_count * MIN_KV_BYTES + tensor_count * MIN_TENSOR_INFO_BYTES,
            "gguf header",
        )?;

        let mut header = Header::default();
        let mut alignment = DEFAULT_ALIGNMENT;
        for _ in 0..kv_count {
            let key = self.key()?;
            let value_type = self.src.u32("gguf value type")?;
            self.spend(4)?;
            let value = self.value(value_type, 0)?;
            if key == "general.alignment" {
                alignment = match value {
                    Scalar::Int(a) if a > 0 && (a as u64).is_power_of_two() && a <= 1 << 30 => {
                        a as u64
                    }
                    _ => {
                        return Err(FormatError::malformed(
                            "gguf general.alignment",
                            "not a power of two",
                        ));
                    }
                };
            }
            let cap = if key.starts_with("general.") {
                MAX_METADATA_ENTRIES
            } else {
                OTHER_METADATA_CAP
            };
            match value {
                Scalar::Text(s) => header.put_metadata(&key, &s, cap),
                Scalar::Int(i) => header.put_metadata(&key, &i.to_string(), cap),
                Scalar::Other => false,
            };
        }

        let mut types = BTreeSet::new();
        let mut params: u64 = 0;
        // End of the furthest tensor's data, relative to the data section.
        let mut data_end: u64 = 0;
        for _ in 0..tensor_count {
            let name_len = self.src.u64("gguf tensor name length")?;
            if name_len > MAX_STRING_BYTES {
                return Err(FormatError::TooLarge {
                    what: "gguf tensor name",
                    len: name_len,
                    limit: MAX_STRING_BYTES,
                });
            }
            self.spend(name_len)?;
            self.src.skip(name_len, "gguf tensor name")?;
            let n_dims = self.src.u32("gguf tensor dimensions")?;
            if n_dims > MAX_DIMS {
                return Err(FormatError::TooLarge {
                    what: "gguf tensor dimensions",
                    len: n_dims.into(),
                    limit: MAX_DIMS.into(),
                });
            }
            let mut numel: u64 = 1;
            for _ in 0..n_dims {
                let d = self.src.u64("gguf tensor dimension")?;
                numel = numel.checked_mul(d).ok_or_else(|| {
                    FormatError::malformed("gguf tensor", "element count overflows")
                })?;
            }
            let ggml_type = self.src.u32("gguf tensor type")?;
            let offset = self.src.u64("gguf tensor offset")?;
            let size = tensor_bytes(ggml_type, numel)
                .ok_or_else(|| FormatError::malformed("gguf tensor", "byte size overflows"))?;
            let end = offset
                .checked_add(size)
                .ok_or_else(|| FormatError::malformed("gguf tensor", "offset overflows"))?;
            data_end = data_end.max(end);
            params = params.checked_add(numel).ok_or_else(|| {
                FormatError::malformed("gguf tensors", "parameter count overflows")
            })?;
            types.insert(ggml_type);
        }
        if tensor_count > 0 {
            let file_end = self
                .src
                .pos()
                .checked_next_multiple_of(alignment)
                .and_then(|start| start.checked_add(data_end));
            // Tensor data past the end of the file: an incomplete file (its header is whole),
            // reported with its declared length.
            let Some(file_end) = file_end else {
                return Err(FormatError::malformed(
                    "gguf tensor data",
                    format!("{data_end} bytes from offset {} overflow", self.src.pos()),
                ));
            };
            header.declared_len = Some(file_end);
        }
        header.tensor_count = tensor_count;
        header.parameter_count = Some(params);
        header.dtypes = types
            .into_iter()
            .map(type_name)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        Ok(header)
    }

    fn key(&mut self) -> Result<String, FormatError> {
        let len = self.src.u64("gguf key length")?;
        if len > MAX_KEY_BYTES {
            return Err(FormatError::TooLarge {
                what: "gguf key",
                len,
                limit: MAX_KEY_BYTES,
            });
        }
        self.spend(8u64.saturating_add(len))?;
        let bytes = self.src.bytes(len, MAX_KEY_BYTES, "gguf key")?;
        String::from_utf8(bytes).map_err(|e| FormatError::malformed("gguf key", e.to_string()))
    }

    /// Reads a string value, keeping at most [`MAX_METADATA_VALUE_BYTES`] of it.
    fn string(&mut self) -> Result<String, FormatError> {
        let len = self.string_len()?;
        let keep = len.min(MAX_METADATA_VALUE_BYTES as u64);
        let bytes = self
            .src
            .bytes(keep, MAX_METADATA_VALUE_BYTES as u64, "gguf string")?;
        self.src.skip(len - keep, "gguf string")?;
        let s = utf8_prefix(&bytes)
            .map_err(|e| FormatError::malformed("gguf string", e.to_string()))?;
        Ok(s.to_owned())
    }

    /// Reads a string length and charges it (and the length field) to the budget.
    fn string_len(&mut self) -> Result<u64, FormatError> {
        let len = self.src.u64("gguf string length")?;
        if len > MAX_STRING_BYTES {
            return Err(FormatError::TooLarge {
                what: "gguf string",
                len,
                limit: MAX_STRING_BYTES,
            });
        }
        self.spend(8 + len)?;
        self.src.need(len, "gguf string")?;
        Ok(len)
    }

    fn value(&mut self, value_type: u32, depth: u32) -> Result<Scalar, FormatError> {
        if let Some(size) = fixed_size(value_type) {
            self.spend(size)?;
            let mut buf = [0u8; 8];
            let bytes = buf.get_mut(..size as usize).unwrap_or_default();
            self.src.read_exact(bytes, "gguf value")?;
            let int = match value_type {
                ty::U8 => i128::from(buf[0]),
                ty::I8 => i128::from(buf[0] as i8),
                ty::U16 => i128::from(u16::from_le_bytes([buf[0], buf[1]])),
                ty::I16 => i128::from(i16::from_le_bytes([buf[0], buf[1]])),
                ty::U32 => i128::from(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]])),
                ty::I32 => i128::from(i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]])),
                ty::U64 => i128::from(u64::from_le_bytes(buf)),
                ty::I64 => i128::from(i64::from_le_bytes(buf)),
                _ => return Ok(Scalar::Other),
            };
            return Ok(Scalar::Int(int));
        }
        match value_type {
            ty::STRING => Ok(Scalar::Text(self.string()?)),
            ty::ARRAY => {
                self.array(depth + 1)?;
                Ok(Scalar::Other)
            }
            other => Err(FormatError::malformed(
                "gguf value type",
                format!("unknown type {other}"),
            )),
        }
    }

    /// Skips an array (element type, count, elements) at nesting `depth`.
    fn array(&mut self, depth: u32) -> Result<(), FormatError> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(FormatError::TooLarge {
                what: "gguf array nesting",
                len: depth.into(),
                limit: MAX_ARRAY_DEPTH.into(),
            });
        }
        let elem_type = self.src.u32("gguf array type")?;
        let count = self.src.u64("gguf array length")?;
        self.spend(12)?;
        if count > MAX_ARRAY_ELEMENTS {
            return Err(FormatError::TooLarge {
                what: "gguf array",
                len: count,
                limit: MAX_ARRAY_ELEMENTS,
            });
        }
        if let Some(size) = fixed_size(elem_type) {
            // count ≤ 2^24 and size ≤ 8: no overflow.
            return self.src.skip(count * size, "gguf array");
        }
        match elem_type {
            ty::STRING => {
                self.src.need(count * 8, "gguf string array")?;
                for _ in 0..count {
                    let len = self.string_len()?;
                    self.src.skip(len, "gguf string")?;
                }
                Ok(())
            }
            ty::ARRAY => {
                self.src.need(count * 12, "gguf nested array")?;
                for _ in 0..count {
                    self.array(depth + 1)?;
                }
                Ok(())
            }
            other => Err(FormatError::malformed(
                "gguf array type",
                format!("unknown type {other}"),
            )),
        }
    }
}

/// Size in bytes of a fixed-size value type.
fn fixed_size(value_type: u32) -> Option<u64> {
    Some(match value_type {
        ty::U8 | ty::I8 | ty::BOOL => 1,
        ty::U16 | ty::I16 => 2,
        ty::U32 | ty::I32 | ty::F32 => 4,
        ty::U64 | ty::I64 | ty::F64 => 8,
        _ => return None,
    })
}

/// ggml tensor type names by id (`ggml.h`); removed ids are `None`.
const TYPE_NAMES: [Option<&str>; 40] = [
    Some("F32"),
    Some("F16"),
    Some("Q4_0"),
    Some("Q4_1"),
    None, // Q4_2, removed
    None, // Q4_3, removed
    Some("Q5_0"),
    Some("Q5_1"),
    Some("Q8_0"),
    Some("Q8_1"),
    Some("Q2_K"),
    Some("Q3_K"),
    Some("Q4_K"),
    Some("Q5_K"),
    Some("Q6_K"),
    Some("Q8_K"),
    Some("IQ2_XXS"),
    Some("IQ2_XS"),
    Some("IQ3_XXS"),
    Some("IQ1_S"),
    Some("IQ4_NL"),
    Some("IQ3_S"),
    Some("IQ2_S"),
    Some("IQ4_XS"),
    Some("I8"),
    Some("I16"),
    Some("I32"),
    Some("I64"),
    Some("F64"),
    Some("IQ1_M"),
    Some("BF16"),
    None, // Q4_0_4_4, removed
    None, // Q4_0_4_8, removed
    None, // Q4_0_8_8, removed
    Some("TQ1_0"),
    Some("TQ2_0"),
    None, // IQ4_NL_4_4, removed
    None, // IQ4_NL_4_8, removed
    None, // IQ4_NL_8_8, removed
    Some("MXFP4"),
];

/// The name of a ggml type id, `type<N>` when unknown.
pub fn type_name(id: u32) -> String {
    match TYPE_NAMES.get(id as usize).copied().flatten() {
        Some(name) => name.to_owned(),
        None => format!("type{id}"),
    }
}

/// Bytes of a tensor of `numel` elements of ggml type `id`, for the types whose block layout is
/// certain; `Some(0)` (offset checked only) for the others, `None` on overflow.
fn tensor_bytes(id: u32, numel: u64) -> Option<u64> {
    // (elements per block, bytes per block)
    let (block, bytes) = match id {
        0 => (1, 4),           // F32
        1 | 25 | 30 => (1, 2), // F16, I16, BF16
        2 => (32, 18),         // Q4_0
        3 => (32, 20),         // Q4_1
        6 => (32, 22),         // Q5_0
        7 => (32, 24),         // Q5_1
        8 => (32, 34),         // Q8_0
        10 => (256, 84),       // Q2_K
        11 => (256, 110),      // Q3_K
        12 => (256, 144),      // Q4_K
        13 => (256, 176),      // Q5_K
        14 => (256, 210),      // Q6_K
        24 => (1, 1),          // I8
        26 => (1, 4),          // I32
        27 | 28 => (1, 8),     // I64, F64
        _ => return Some(0),
    };
    numel.div_ceil(block).checked_mul(bytes)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_prefixes_fail_cleanly, sniff_bytes, write_temp};
    use super::super::{Format, parse_path};
    use super::*;

    /// A tiny GGUF writer for tests.
    #[derive(Debug)]
    pub(crate) struct Writer {
        version: u32,
        kv: Vec<u8>,
        kv_count: u64,
        infos: Vec<u8>,
        tensors: Vec<(u64, u32)>,
    }

    impl Writer {
        pub(crate) fn new(version: u32) -> Self {
            Writer {
                version,
                kv: Vec::new(),
                kv_count: 0,
                infos: Vec::new(),
                tensors: Vec::new(),
            }
        }

        fn raw_string(buf: &mut Vec<u8>, s: &[u8]) {
            buf.extend((s.len() as u64).to_le_bytes());
            buf.extend(s);
        }

        fn key(&mut self, key: &[u8], value_type: u32) -> &mut Vec<u8> {
            self.kv_count += 1;
            Self::raw_string(&mut self.kv, key);
            self.kv.extend(value_type.to_le_bytes());
            &mut self.kv
        }

        pub(crate) fn string(&mut self, key: &str, value: &str) -> &mut Self {
            let buf = self.key(key.as_bytes(), ty::STRING);
            Self::raw_string(buf, value.as_bytes());
            self
        }

        pub(crate) fn u32(&mut self, key: &str, value: u32) -> &mut Self {
            self.key(key.as_bytes(), ty::U32)
                .extend(value.to_le_bytes());
            self
        }

        pub(crate) fn f32(&mut self, key: &str, value: f32) -> &mut Self {
            self.key(key.as_bytes(), ty::F32)
                .extend(value.to_le_bytes());
            self
        }

        pub(crate) fn i64(&mut self, key: &str, value: i64) -> &mut Self {
            self.key(key.as_bytes(), ty::I64)
                .extend(value.to_le_bytes());
            self
        }

        pub(crate) fn strings(&mut self, key: &str, values: &[&str]) -> &mut Self {
            let buf = self.key(key.as_bytes(), ty::ARRAY);
            buf.extend(ty::STRING.to_le_bytes());
            buf.extend((values.len() as u64).to_le_bytes());
            for v in values {
                Self::raw_string(buf, v.as_bytes());
            }
            self
        }

        pub(crate) fn i32s(&mut self, key: &str, values: &[i32]) -> &mut Self {
            let buf = self.key(key.as_bytes(), ty::ARRAY);
            buf.extend(ty::I32.to_le_bytes());
            buf.extend((values.len() as u64).to_le_bytes());
            for v in values {
                buf.extend(v.to_le_bytes());
            }
            self
        }

        /// Appends raw bytes as one key-value pair's key and value (for hostile inputs).
        pub(crate) fn raw_kv(&mut self, bytes: &[u8]) -> &mut Self {
            self.kv_count += 1;
            self.kv.extend(bytes);
            self
        }

        pub(crate) fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32) -> &mut Self {
            let size = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .and_then(|numel| tensor_bytes(ggml_type, numel))
                .unwrap_or(0);
            let offset = self
                .tensors
                .iter()
                .map(|(s, _)| s.next_multiple_of(DEFAULT_ALIGNMENT))
                .sum::<u64>();
            Self::raw_string(&mut self.infos, name.as_bytes());
            self.infos.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.infos.extend(d.to_le_bytes());
            }
            self.infos.extend(ggml_type.to_le_bytes());
            self.infos.extend(offset.to_le_bytes());
            self.tensors.push((size, ggml_type));
            self
        }

        pub(crate) fn finish(&self) -> Vec<u8> {
            self.finish_with_counts(self.tensors.len() as u64, self.kv_count)
        }

        pub(crate) fn finish_with_counts(&self, tensor_count: u64, kv_count: u64) -> Vec<u8> {
            let mut out = MAGIC.to_vec();
            out.extend(self.version.to_le_bytes());
            out.extend(tensor_count.to_le_bytes());
            out.extend(kv_count.to_le_bytes());
            out.extend(&self.kv);
            out.extend(&self.infos);
            if !self.tensors.is_empty() {
                out.resize(out.len().next_multiple_of(DEFAULT_ALIGNMENT as usize), 0);
                for (size, _) in &self.tensors {
                    let padded = (*size).next_multiple_of(DEFAULT_ALIGNMENT) as usize;
                    out.extend(std::iter::repeat_n(0x5a, padded));
                }
            }
            out
        }
    }

    fn sample() -> Vec<u8> {
        Writer::new(3)
            .string("general.architecture", "llama")
            .string("general.name", "Tiny Llama")
            .string("general.organization", "Example Org")
            .string("general.size_label", "1K")
            .string("general.license", "apache-2.0")
            .string("general.source.url", "https://example.invalid/tiny")
            .u32("general.file_type", 7)
            .u32("llama.context_length", 2048)
            .f32("llama.rope.freq_base", 10000.0)
            .i64("general.quantization_version", -2)
            .strings("tokenizer.ggml.tokens", &["<s>", "</s>", "hello", "world"])
            .i32s("tokenizer.ggml.token_type", &[3, 3, 1, 1])
            .tensor("token_embd.weight", &[64, 4], 8)
            .tensor("output_norm.weight", &[64], 0)
            .finish()
    }

    #[test]
    fn a_v3_file_reports_general_metadata_params_and_ggml_types() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_temp(&dir, "sha256-0123", &sample());
        let parsed = parse_path(&path).expect("parse").expect("recognised");
        assert_eq!(parsed.format, Format::Gguf);
        let h = parsed.header;
        assert_eq!(h.tensor_count, 2);
        assert_eq!(h.parameter_count, Some(64 * 4 + 64));
        assert_eq!(h.dtypes, ["F32", "Q8_0"]);
        let get = |k: &str| h.metadata.get(k).map(String::as_str);
        assert_eq!(get("general.name"), Some("Tiny Llama"));
        assert_eq!(get("general.organization"), Some("Example Org"));
        assert_eq!(get("general.architecture"), Some("llama"));
        assert_eq!(get("general.size_label"), Some("1K"));
        assert_eq!(get("general.license"), Some("apache-2.0"));
        assert_eq!(
            get("general.source.url"),
            Some("https://example.invalid/tiny")
        );
        assert_eq!(get("general.file_type"), Some("7"));
        assert_eq!(get("general.quantization_version"), Some("-2"));
        assert_eq!(get("llama.context_length"), Some("2048"));
        assert_eq!(get("llama.rope.freq_base"), None, "floats are not kept");
        assert_eq!(get("tokenizer.ggml.tokens"), None, "arrays are not kept");
    }

    #[test]
    fn a_v2_file_parses_and_a_v1_file_is_refused_cleanly() {
        let v2 = Writer::new(2).string("general.name", "two").finish();
        let parsed = sniff_bytes(&v2).expect("v2").expect("recognised");
        assert_eq!(
            parsed
                .header
                .metadata
                .get("general.name")
                .map(String::as_str),
            Some("two")
        );
        assert_eq!(parsed.header.parameter_count, Some(0));

        let v1 = Writer::new(1).string("general.name", "one").finish();
        let err = sniff_bytes(&v1).expect_err("v1");
        assert!(matches!(err, FormatError::Unsupported { .. }), "{err}");

        let big_endian = Writer::new(3u32.swap_bytes()).finish();
        let err = sniff_bytes(&big_endian).expect_err("big-endian");
        assert!(matches!(err, FormatError::Unsupported { .. }), "{err}");
    }

    #[test]
    fn a_kv_count_of_two_to_the_sixty_three_is_refused() {
        let bytes = Writer::new(3)
            .string("general.name", "x")
            .finish_with_counts(0, 1 << 63);
        let err = sniff_bytes(&bytes).expect_err("huge kv count");
        assert!(matches!(err, FormatError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn a_kv_count_below_the_limit_but_beyond_the_file_is_truncation() {
        let bytes = Writer::new(3)
            .string("general.name", "x")
            .finish_with_counts(0, 1000);
        let err = sniff_bytes(&bytes).expect_err("kv count past the end");
        assert!(matches!(err, FormatError::Truncated { .. }), "{err}");
    }

    #[test]
    fn a_string_length_of_two_to_the_sixty_two_is_refused() {
        let mut kv = Vec::new();
        kv.extend(4u64.to_le_bytes());
        kv.extend(b"name");
        kv.extend(ty::STRING.to_le_bytes());
        kv.extend((1u64 << 62).to_le_bytes());
        kv.extend(b"abc");
        let bytes = Writer::new(3).raw_kv(&kv).finish();
        let err = sniff_bytes(&bytes).expect_err("huge string");
        assert!(matches!(err, FormatError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn an_array_of_two_to_the_sixty_elements_is_refused() {
        let mut kv = Vec::new();
        kv.extend(3u64.to_le_bytes());
        kv.extend(b"arr");
        kv.extend(ty::ARRAY.to_le_bytes());
        kv.extend(ty::U8.to_le_bytes());
        kv.extend((1u64 << 60).to_le_bytes());
        let bytes = Writer::new(3).raw_kv(&kv).finish();
        let err = sniff_bytes(&bytes).expect_err("huge array");
        assert!(matches!(err, FormatError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn a_large_string_array_is_skipped_within_the_budget() {
        let words: Vec<String> = (0..20_000).map(|i| format!("token{i}")).collect();
        let refs: Vec<&str> = words.iter().map(String::as_str).collect();
        let bytes = Writer::new(3)
            .strings("tokenizer.ggml.tokens", &refs)
            .string("general.name", "after the vocabulary")
            .finish();
        let h = sniff_bytes(&bytes)
            .expect("parse")
            .expect("recognised")
            .header;
        assert_eq!(
            h.metadata.get("general.name").map(String::as_str),
            Some("after the vocabulary")
        );
    }

    #[test]
    fn arrays_nested_deeper_than_the_limit_are_refused() {
        let nest = |depth: u32| {
            let mut kv = Vec::new();
            kv.extend(4u64.to_le_bytes());
            kv.extend(b"deep");
            kv.extend(ty::ARRAY.to_le_bytes());
            for _ in 1..depth {
                kv.extend(ty::ARRAY.to_le_bytes());
                kv.extend(1u64.to_le_bytes());
            }
            kv.extend(ty::U8.to_le_bytes());
            kv.extend(1u64.to_le_bytes());
            kv.push(7);
            Writer::new(3).raw_kv(&kv).finish()
        };
        assert!(
            sniff_bytes(&nest(MAX_ARRAY_DEPTH))
                .expect("at the limit")
                .is_some()
        );
        let err = sniff_bytes(&nest(MAX_ARRAY_DEPTH + 1)).expect_err("too deep");
        assert!(matches!(err, FormatError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn a_key_that_is_not_utf8_is_malformed() {
        let mut kv = Vec::new();
        kv.extend(4u64.to_le_bytes());
        kv.extend(b"k\xff\xfey");
        kv.extend(ty::U8.to_le_bytes());
        kv.push(1);
        let bytes = Writer::new(3).raw_kv(&kv).finish();
        let err = sniff_bytes(&bytes).expect_err("bad key");
        assert!(matches!(err, FormatError::Malformed { .. }), "{err}");
    }

    #[test]
    fn tensor_dimensions_whose_product_overflows_are_malformed() {
        let bytes = Writer::new(3)
            .tensor("a", &[1 << 32, 1 << 32], 0)
            .finish_with_counts(1, 0);
        let err = sniff_bytes(&bytes).expect_err("overflow");
        assert!(matches!(err, FormatError::Malformed { .. }), "{err}");
    }

    #[test]
    fn general_keys_keep_room_when_many_other_keys_come_first() {
        let mut w = Writer::new(3);
        for i in 0..MAX_METADATA_ENTRIES {
            w.u32(&format!("vendor.key{i}"), 1);
        }
        w.string("general.name", "late but kept");
        let h = sniff_bytes(&w.finish())
            .expect("parse")
            .expect("recognised")
            .header;
        assert_eq!(
            h.metadata.get("general.name").map(String::as_str),
            Some("late but kept")
        );
        assert!(h.metadata.len() <= MAX_METADATA_ENTRIES);
    }

    #[test]
    fn an_unknown_ggml_type_is_named_by_its_number() {
        assert_eq!(type_name(4), "type4");
        assert_eq!(type_name(1000), "type1000");
        assert_eq!(type_name(30), "BF16");
        assert_eq!(type_name(14), "Q6_K");
    }

    #[test]
    fn every_truncation_of_a_valid_file_is_an_error_not_recognised_or_incomplete() {
        assert_prefixes_fail_cleanly(&sample());
    }

    #[test]
    fn a_file_cut_in_its_tensor_data_keeps_its_name_and_declares_its_whole_length() {
        let whole = sample();
        let cut = &whole[..whole.len() - 1];
        let p = sniff_bytes(cut).expect("parses").expect("recognised");
        assert_eq!(p.header.declared_len, Some(whole.len() as u64));
        assert!(p.header.metadata.contains_key("general.name"));
        let p = sniff_bytes(&whole).expect("parses").expect("recognised");
        assert_eq!(p.header.declared_len, Some(whole.len() as u64));
    }
}
