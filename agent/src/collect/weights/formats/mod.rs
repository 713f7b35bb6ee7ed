//! Weight file formats, recognised by content (never by extension) and read header-only.
//!
//! - [`sniff_and_parse`] / [`parse_path`]: the one dispatch point. A file that matches no format
//!   is `Ok(None)` after reading at most [`SNIFF_BYTES`] (a zip archive's end record and central
//!   directory are read too before a zip that is not a PyTorch archive is turned away);
//! - [`safetensors`]: 8-byte header length + JSON header (tensors, dtypes, `__metadata__`);
//! - [`gguf`]: GGUF v2/v3 key-value metadata and tensor infos;
//! - [`pytorch`]: PyTorch zip checkpoints and TorchScript archives (central directory only);
//! - [`pickle`]: legacy `torch.save` pickles, by a bounded opcode scan (nothing is executed);
//! - [`onnx`]: ONNX `ModelProto`, by a bounded protobuf walk that seeks over tensor data.
//!
//! Every parser treats the file as hostile: lengths are checked against a named limit and against
//! the file length before anything is allocated or skipped, arithmetic is checked, and a damaged
//! file is a [`FormatError`] for that file, never a panic. Each parser has a fuzz target in the
//! workspace's `fuzz/` crate.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

pub mod gguf;
pub mod onnx;
pub mod pickle;
pub mod pytorch;
mod read;
pub mod safetensors;
#[cfg(test)]
mod testutil;

/// How many bytes from the start of a file are read to recognise its format.
pub const SNIFF_BYTES: u64 = 4096;
/// Buffer size of the reader [`parse_path`] puts over the file.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;
/// At most this many metadata entries are kept per file.
pub const MAX_METADATA_ENTRIES: usize = 256;
/// Metadata keys longer than this are dropped.
pub const MAX_METADATA_KEY_BYTES: usize = 256;
/// Metadata values are cut (at a character boundary) to this many bytes.
pub const MAX_METADATA_VALUE_BYTES: usize = 4096;

/// A weight file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Hugging Face safetensors.
    Safetensors,
    /// GGUF (llama.cpp, Ollama), versions 2 and 3.
    Gguf,
    /// `torch.save` zip checkpoint (`<prefix>/data.pkl` + `<prefix>/data/<n>`).
    PytorchZip,
    /// `torch.jit.save` archive (a PyTorch zip with `code/` and `constants.pkl`).
    Torchscript,
    /// Legacy (pre-1.6) `torch.save` pickle, or a pickle of torch objects.
    Pickle,
    /// ONNX `ModelProto`.
    Onnx,
}

impl Format {
    /// The stable lowercase name used in reports and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Gguf => "gguf",
            Format::PytorchZip => "pytorch",
            Format::Torchscript => "torchscript",
            Format::Pickle => "pickle",
            Format::Onnx => "onnx",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a weight file's header says, the same shape for every format.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Header {
    /// Tensors described by the header (PyTorch zips: `data/<n>` storage records).
    pub tensor_count: u64,
    /// Sum over tensors of the product of their dimensions, where the header allows it.
    pub parameter_count: Option<u64>,
    /// Element types, sorted and unique, in safetensors spelling (`F32`, `BF16`, `Q4_K`, …).
    pub dtypes: Vec<String>,
    /// Descriptive strings: safetensors `__metadata__`, GGUF scalar keys (`general.*` first),
    /// ONNX model fields; at most [`MAX_METADATA_ENTRIES`], values cut to
    /// [`MAX_METADATA_VALUE_BYTES`].
    pub metadata: BTreeMap<String, String>,
    /// The file length the header declares (header and every tensor's data), where the format
    /// says (safetensors, GGUF). Longer than the file: the file is incomplete (a download in
    /// progress, one chunk of a file split for transfer) and is reported as such.
    pub declared_len: Option<u64>,
}

impl Header {
    /// Keeps `key = value` while fewer than `cap` (and [`MAX_METADATA_ENTRIES`]) entries are
    /// held; long keys are dropped, long values cut. Returns whether the entry was kept.
    pub(crate) fn put_metadata(&mut self, key: &str, value: &str, cap: usize) -> bool {
        if key.len() > MAX_METADATA_KEY_BYTES {
            return false;
        }
        let full = self.metadata.len() >= cap.min(MAX_METADATA_ENTRIES);
        if full && !self.metadata.contains_key(key) {
            return false;
        }
        let value = truncate_str(value, MAX_METADATA_VALUE_BYTES);
        self.metadata.insert(key.to_owned(), value.to_owned());
        true
    }
}

/// A recognised weight file: its format and what its header says.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The format recognised from the content.
    pub format: Format,
    /// The header facts.
    pub header: Header,
}

/// Why a file that looks like a weight format could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading the file failed.
    #[error("i/o error")]
    Io(#[source] io::Error),
    /// The file ends before `what` does.
    #[error("truncated {what}")]
    Truncated {
        /// The structure that was cut short.
        what: &'static str,
    },
    /// A declared length or count is over its limit.
    #[error("{what} too large: {len} > {limit}")]
    TooLarge {
        /// The structure whose size is refused.
        what: &'static str,
        /// The declared size.
        len: u64,
        /// The limit it exceeded.
        limit: u64,
    },
    /// The bytes contradict the format.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// The structure that is wrong.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A valid but unsupported variant (GGUF v1, big-endian GGUF, multi-disk zip).
    #[error("unsupported {what}: {detail}")]
    Unsupported {
        /// The feature that is not supported.
        what: &'static str,
        /// Which variant was found.
        detail: String,
    },
}

impl FormatError {
    pub(crate) fn malformed(what: &'static str, detail: impl Into<String>) -> Self {
        FormatError::Malformed {
            what,
            detail: detail.into(),
        }
    }
}

/// Recognises a weight file by its content and parses its header.
///
/// `Ok(None)`: not a weight file (at most [`SNIFF_BYTES`] read for most files). `Err`: the file
/// looks like a weight format but is damaged or hostile. The reader's position afterwards is
/// unspecified.
pub fn sniff_and_parse<R: Read + Seek>(
    r: &mut R,
    file_len: u64,
) -> Result<Option<Parsed>, FormatError> {
    r.seek(SeekFrom::Start(0)).map_err(FormatError::Io)?;
    let mut prefix = Vec::new();
    r.by_ref()
        .take(file_len.min(SNIFF_BYTES))
        .read_to_end(&mut prefix)
        .map_err(FormatError::Io)?;
    let prefix = prefix.as_slice();
    let parsed = |format, header| Some(Parsed { format, header });
    if safetensors::sniff(prefix) {
        return Ok(parsed(
            Format::Safetensors,
            safetensors::parse(r, file_len)?,
        ));
    }
    if gguf::sniff(prefix) {
        return Ok(parsed(Format::Gguf, gguf::parse(r, file_len)?));
    }
    if pytorch::sniff(prefix) {
        return pytorch::parse(r, file_len);
    }
    if pickle::sniff(prefix) {
        return Ok(parsed(Format::Pickle, pickle::parse(r, file_len)?));
    }
    if onnx::sniff(prefix) {
        return Ok(onnx::parse(r, file_len)?.and_then(|h| parsed(Format::Onnx, h)));
    }
    Ok(None)
}

/// Opens `path`, takes its length and calls [`sniff_and_parse`] over a buffered reader.
pub fn parse_path(path: &Path) -> Result<Option<Parsed>, FormatError> {
    let file = File::open(path).map_err(FormatError::Io)?;
    let len = file.metadata().map_err(FormatError::Io)?.len();
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, file);
    sniff_and_parse(&mut reader, len)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// Decodes a possibly cut UTF-8 prefix: a character split at the end is dropped, any other
/// invalid byte is an error.
pub(crate) fn utf8_prefix(bytes: &[u8]) -> Result<&str, std::str::Utf8Error> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) if e.error_len().is_none() => Ok(std::str::from_utf8(
            bytes.get(..e.valid_up_to()).unwrap_or_default(),
        )
        .unwrap_or_default()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{Lcg, write_temp};
    use super::*;
    use std::io::Cursor;

    fn sniff(bytes: &[u8]) -> Result<Option<Parsed>, FormatError> {
        sniff_and_parse(&mut Cursor::new(bytes), bytes.len() as u64)
    }

    #[test]
    fn format_names_are_stable() {
        let names: Vec<_> = [
            Format::Safetensors,
            Format::Gguf,
            Format::PytorchZip,
            Format::Torchscript,
            Format::Pickle,
            Format::Onnx,
        ]
        .iter()
        .map(|f| f.as_str())
        .collect();
        assert_eq!(
            names,
            [
                "safetensors",
                "gguf",
                "pytorch",
                "torchscript",
                "pickle",
                "onnx"
            ]
        );
    }

    #[test]
    fn non_weight_files_are_not_recognised() {
        let mut elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
        elf.resize(4096, 0);
        let inputs: [&[u8]; 6] = [
            b"",
            b"hello, this is a plain text file\nwith two lines\n",
            b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x06\0\0\0",
            &elf,
            b"{\"json\": \"but no length prefix\"}",
            b"PK\x05\x06\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        ];
        for input in inputs {
            assert!(sniff(input).expect("not an error").is_none(), "{input:?}");
        }
    }

    #[test]
    fn parse_path_reads_a_file_from_disk_and_refuses_a_missing_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = write_temp(&dir, "notes.txt", b"just words\n");
        assert!(parse_path(&text).expect("readable").is_none());
        let err = parse_path(&dir.path().join("absent")).expect_err("missing file");
        assert!(matches!(err, FormatError::Io(_)), "{err}");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Lcg::new(0x5eed_1234);
        for i in 0..2000 {
            let len = rng.below(4096) as usize;
            let mut bytes = rng.bytes(len);
            // Give a share of the inputs a real magic so the deeper parsers run too.
            let magics: [&[u8]; 6] = [
                b"GGUF\x03\0\0\0",
                b"PK\x03\x04",
                b"\x80\x02",
                b"\x08\x08",
                b"\x10\0\0\0\0\0\0\0{\"",
                b"",
            ];
            let magic = magics[i % magics.len()];
            if bytes.len() >= magic.len() {
                bytes[..magic.len()].copy_from_slice(magic);
            }
            let _ = sniff(&bytes);
            let _ = safetensors::parse(&mut Cursor::new(&bytes), bytes.len() as u64);
            let _ = gguf::parse(&mut Cursor::new(&bytes), bytes.len() as u64);
            let _ = pytorch::parse(&mut Cursor::new(&bytes), bytes.len() as u64);
            let _ = pickle::parse(&mut Cursor::new(&bytes), bytes.len() as u64);
            let _ = onnx::parse(&mut Cursor::new(&bytes), bytes.len() as u64);
        }
    }

    #[test]
    fn a_declared_length_longer_than_the_stream_is_an_error_not_a_hang() {
        // The caller's length may be stale (a file shrinking under us): reads past the real end
        // are truncation errors.
        let mut gguf = b"GGUF\x03\0\0\0".to_vec();
        gguf.extend(0u64.to_le_bytes());
        gguf.extend(1u64.to_le_bytes());
        let err = sniff_and_parse(&mut Cursor::new(&gguf), 1 << 20).expect_err("short stream");
        assert!(matches!(err, FormatError::Truncated { .. }), "{err}");
    }

    #[test]
    fn metadata_is_capped_in_entries_key_length_and_value_length() {
        let mut h = Header::default();
        for i in 0..MAX_METADATA_ENTRIES + 10 {
            h.put_metadata(&format!("k{i}"), "v", usize::MAX);
        }
        assert_eq!(h.metadata.len(), MAX_METADATA_ENTRIES);
        assert!(
            h.put_metadata("k0", "replaced", usize::MAX),
            "existing keys are updated"
        );
        assert!(!h.put_metadata(&"k".repeat(MAX_METADATA_KEY_BYTES + 1), "v", usize::MAX));
        let mut h = Header::default();
        h.put_metadata("long", &"é".repeat(MAX_METADATA_VALUE_BYTES), usize::MAX);
        let kept = h.metadata.get("long").map_or(0, String::len);
        assert_eq!(kept, MAX_METADATA_VALUE_BYTES);
    }

    #[test]
    fn truncate_str_cuts_at_a_character_boundary() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("héllo", 3), "hé");
        assert_eq!(truncate_str("abc", 10), "abc");
    }

    #[test]
    fn utf8_prefix_drops_a_split_character_but_refuses_invalid_bytes() {
        assert_eq!(
            utf8_prefix("hé".as_bytes().get(..2).expect("2 bytes")).ok(),
            Some("h")
        );
        assert!(utf8_prefix(b"a\xffb").is_err());
    }
}
