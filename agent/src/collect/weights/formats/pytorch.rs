//! PyTorch zip checkpoints (`torch.save` since 1.6) and TorchScript archives (`torch.jit.save`):
//! a zip archive whose records share one prefix directory, with `<prefix>/data.pkl` (the object
//! pickle) and `<prefix>/data/<n>` (one record per storage). TorchScript archives also hold
//! `<prefix>/code/…` and `<prefix>/constants.pkl`.
//!
//! Only the end record(s) and the central directory are read; nothing is decompressed. When
//! `data.pkl` is stored uncompressed (PyTorch never compresses it), the pickle scanner of
//! [`super::pickle`] reads it for dtypes and storage element counts. ZIP64 end records are
//! supported; multi-disk archives are refused.

use std::io::{Read, Seek};

use super::read::Src;
use super::{Format, FormatError, Header, Parsed, pickle};

/// The largest central directory read.
pub const MAX_CENTRAL_DIRECTORY_BYTES: u64 = 64 * 1024 * 1024;
/// The most central directory entries accepted.
pub const MAX_ENTRIES: u64 = 1024 * 1024;
/// The largest stored `data.pkl` scanned for dtypes and element counts.
pub const MAX_DATA_PKL_BYTES: u64 = pickle::MAX_SCAN_BYTES;
/// A zip archive starts with a local file header.
const LOCAL_MAGIC: &[u8; 4] = b"PK\x03\x04";
const LOCAL_SIG: u32 = 0x0403_4b50;
const LOCAL_LEN: u64 = 30;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const CENTRAL_LEN: usize = 46;
const END_SIG: u32 = 0x0605_4b50;
const END_LEN: u64 = 22;
const MAX_COMMENT: u64 = 65_535;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_LOCATOR_LEN: u64 = 20;
const ZIP64_END_SIG: u32 = 0x0606_4b50;
const ZIP64_END_LEN: u64 = 56;
const ZIP64_EXTRA_ID: u16 = 0x0001;
/// Compression method "stored".
const STORED: u16 = 0;

/// Whether `prefix` starts like a zip archive.
pub fn sniff(prefix: &[u8]) -> bool {
    prefix.starts_with(LOCAL_MAGIC)
}

/// Parses a zip archive of `file_len` bytes; `Ok(None)` when it is a zip but not a PyTorch one.
pub fn parse<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<Option<Parsed>, FormatError> {
    let mut src = Src::start(r, file_len)?;
    let dir = central_directory(&mut src)?;
    let archive = walk(&mut src, &dir)?;
    let Some(data_pkl) = archive.data_pkl else {
        return Ok(None);
    };
    let format = if archive.code || archive.constants {
        Format::Torchscript
    } else {
        Format::PytorchZip
    };
    let mut header = Header {
        tensor_count: archive.data_records,
        ..Header::default()
    };
    if data_pkl.method == STORED && data_pkl.flags & 1 == 0 && data_pkl.size <= MAX_DATA_PKL_BYTES {
        match scan_data_pkl(&mut src, &data_pkl, dir.offset) {
            Ok(facts) => {
                if facts.storages > 0 {
                    header.parameter_count = Some(facts.storage_elements);
                }
                header.dtypes = facts.dtypes.into_iter().collect();
            }
            Err(error) => tracing::debug!(%error, "pytorch data.pkl not scanned"),
        }
    }
    Ok(Some(Parsed { format, header }))
}

/// Where the central directory is.
#[derive(Debug)]
struct Directory {
    offset: u64,
    size: u64,
    entries: u64,
}

/// What the central directory says about the archive.
#[derive(Debug, Default)]
struct Archive {
    prefix: Option<String>,
    data_pkl: Option<Entry>,
    code: bool,
    constants: bool,
    data_records: u64,
}

#[derive(Debug)]
struct Entry {
    flags: u16,
    method: u16,
    size: u64,
    local_offset: u64,
}

fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Finds the end of central directory record (and the ZIP64 one when the classic record says
/// so) and checks the directory's place and size.
fn central_directory<R: Read + Seek>(src: &mut Src<'_, R>) -> Result<Directory, FormatError> {
    let file_len = src.len();
    if file_len < END_LEN {
        return Err(FormatError::Truncated {
            what: "zip end record",
        });
    }
    let tail_len = file_len.min(END_LEN + MAX_COMMENT);
    let tail_start = file_len - tail_len;
    src.seek_to(tail_start, "zip end record")?;
    let tail = src.bytes(tail_len, END_LEN + MAX_COMMENT, "zip end record")?;
    let end_at = (0..=tail.len() - END_LEN as usize)
        .rev()
        .find(|&i| {
            le32(&tail, i) == END_SIG
                && i + END_LEN as usize + usize::from(le16(&tail, i + 20)) == tail.len()
        })
        .ok_or_else(|| FormatError::malformed("zip", "no end of central directory record"))?;
    let end = tail.get(end_at..).unwrap_or_default();
    let end_pos = tail_start + end_at as u64;
    let (disk, cd_disk) = (le16(end, 4), le16(end, 6));
    let entries = le16(end, 10);
    let (size, offset) = (le32(end, 12), le32(end, 16));

    let zip64 = entries == u16::MAX || size == u32::MAX || offset == u32::MAX;
    let (dir, dir_end_limit) = if zip64 {
        zip64_directory(src, end_pos)?
    } else {
        if disk != 0 || cd_disk != 0 {
            return Err(FormatError::Unsupported {
                what: "zip",
                detail: format!("multi-disk archive (disk {disk})"),
            });
        }
        let dir = Directory {
            offset: offset.into(),
            size: size.into(),
            entries: entries.into(),
        };
        (dir, end_pos)
    };
    if dir.entries > MAX_ENTRIES {
        return Err(FormatError::TooLarge {
            what: "zip entries",
            len: dir.entries,
            limit: MAX_ENTRIES,
        });
    }
    if dir.size > MAX_CENTRAL_DIRECTORY_BYTES {
        return Err(FormatError::TooLarge {
            what: "zip central directory",
            len: dir.size,
            limit: MAX_CENTRAL_DIRECTORY_BYTES,
        });
    }
    match dir.offset.checked_add(dir.size) {
        Some(cd_end) if cd_end <= dir_end_limit => {}
        _ => {
            return Err(FormatError::malformed(
                "zip central directory",
                format!(
                    "{} bytes at offset {} lie beyond the end record at {dir_end_limit}",
                    dir.size, dir.offset
                ),
            ));
        }
    }
    if dir.entries.saturating_mul(CENTRAL_LEN as u64) > dir.size {
        return Err(FormatError::malformed(
            "zip central directory",
            format!("{} entries cannot fit in {} bytes", dir.entries, dir.size),
        ));
    }
    Ok(dir)
}

/// Reads the ZIP64 locator just before the end record at `end_pos`, then the ZIP64 end record.
/// Returns the directory and the offset it must end before.
fn zip64_directory<R: Read + Seek>(
    src: &mut Src<'_, R>,
    end_pos: u64,
) -> Result<(Directory, u64), FormatError> {
    let locator_pos = end_pos
        .checked_sub(ZIP64_LOCATOR_LEN)
        .ok_or_else(|| FormatError::malformed("zip64", "no room for the locator"))?;
    src.seek_to(locator_pos, "zip64 locator")?;
    let locator = src.array::<20>("zip64 locator")?;
    if le32(&locator, 0) != ZIP64_LOCATOR_SIG {
        return Err(FormatError::malformed(
            "zip64",
            "end record wants a locator that is absent",
        ));
    }
    let record_pos = le64(&locator, 8);
    let total_disks = le32(&locator, 16);
    if total_disks > 1 {
        return Err(FormatError::Unsupported {
            what: "zip",
            detail: format!("multi-disk archive ({total_disks} disks)"),
        });
    }
    match record_pos.checked_add(ZIP64_END_LEN) {
        Some(end) if end <= locator_pos => {}
        _ => {
            return Err(FormatError::malformed(
                "zip64",
                format!("end record offset {record_pos} is beyond the locator"),
            ));
        }
    }
    src.seek_to(record_pos, "zip64 end record")?;
    let record = src.array::<56>("zip64 end record")?;
    if le32(&record, 0) != ZIP64_END_SIG {
        return Err(FormatError::malformed("zip64", "bad end record signature"));
    }
    if le32(&record, 16) != 0 || le32(&record, 20) != 0 {
        return Err(FormatError::Unsupported {
            what: "zip",
            detail: "multi-disk archive".into(),
        });
    }
    let dir = Directory {
        entries: le64(&record, 32),
        size: le64(&record, 40),
        offset: le64(&record, 48),
    };
    Ok((dir, record_pos))
}

/// Walks the central directory entries, classifying the names.
fn walk<R: Read + Seek>(src: &mut Src<'_, R>, dir: &Directory) -> Result<Archive, FormatError> {
    let cd_end = dir.offset + dir.size; // checked in `central_directory`
    src.seek_to(dir.offset, "zip central directory")?;
    let mut archive = Archive::default();
    for _ in 0..dir.entries {
        let fixed = src.array::<CENTRAL_LEN>("zip central directory entry")?;
        if le32(&fixed, 0) != CENTRAL_SIG {
            return Err(FormatError::malformed(
                "zip central directory",
                format!(
                    "bad entry signature at offset {}",
                    src.pos() - CENTRAL_LEN as u64
                ),
            ));
        }
        let flags = le16(&fixed, 8);
        let method = le16(&fixed, 10);
        let name_len = u64::from(le16(&fixed, 28));
        let extra_len = u64::from(le16(&fixed, 30));
        let comment_len = u64::from(le16(&fixed, 32));
        if src.pos() + name_len + extra_len + comment_len > cd_end {
            return Err(FormatError::malformed(
                "zip central directory",
                "entry runs past the directory",
            ));
        }
        let name = src.bytes(name_len, u16::MAX.into(), "zip entry name")?;
        let extra = src.bytes(extra_len, u16::MAX.into(), "zip extra field")?;
        src.skip(comment_len, "zip entry comment")?;
        let Ok(name) = std::str::from_utf8(&name) else {
            continue;
        };
        let Some((prefix, rest)) = name.split_once('/') else {
            continue;
        };
        let kind = classify(rest);
        if kind == Kind::Other {
            continue;
        }
        match &archive.prefix {
            Some(p) if p != prefix => continue,
            Some(_) => {}
            None => archive.prefix = Some(prefix.to_owned()),
        }
        match kind {
            Kind::DataPkl if archive.data_pkl.is_none() => {
                let (size, local_offset) = sizes(&fixed, &extra)?;
                archive.data_pkl = Some(Entry {
                    flags,
                    method,
                    size,
                    local_offset,
                });
            }
            Kind::Data => archive.data_records += 1,
            Kind::Code => archive.code = true,
            Kind::Constants => archive.constants = true,
            Kind::DataPkl | Kind::Other => {}
        }
    }
    Ok(archive)
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    DataPkl,
    Data,
    Code,
    Constants,
    Other,
}

/// What a record is, from its name below the archive prefix.
fn classify(rest: &str) -> Kind {
    match rest {
        "data.pkl" => Kind::DataPkl,
        "constants.pkl" => Kind::Constants,
        _ if rest.starts_with("code/") => Kind::Code,
        _ => match rest.strip_prefix("data/") {
            Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => Kind::Data,
            _ => Kind::Other,
        },
    }
}

/// The compressed size and local header offset of an entry, from ZIP64 extra fields when the
/// 32-bit ones are saturated.
fn sizes(fixed: &[u8], extra: &[u8]) -> Result<(u64, u64), FormatError> {
    let uncompressed = le32(fixed, 24);
    let compressed = le32(fixed, 20);
    let offset = le32(fixed, 42);
    let mut size = u64::from(compressed);
    let mut local = u64::from(offset);
    if uncompressed != u32::MAX && compressed != u32::MAX && offset != u32::MAX {
        return Ok((size, local));
    }
    let mut at = 0usize;
    while at + 4 <= extra.len() {
        let id = le16(extra, at);
        let len = usize::from(le16(extra, at + 2));
        let body = extra
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| FormatError::malformed("zip extra field", "runs past its entry"))?;
        if id == ZIP64_EXTRA_ID {
            let mut fields = body
                .chunks_exact(8)
                .map(|c| c.try_into().map_or(0, u64::from_le_bytes));
            let mut next = || {
                fields
                    .next()
                    .ok_or_else(|| FormatError::malformed("zip64 extra field", "too short"))
            };
            if uncompressed == u32::MAX {
                next()?;
            }
            if compressed == u32::MAX {
                size = next()?;
            }
            if offset == u32::MAX {
                local = next()?;
            }
            return Ok((size, local));
        }
        at += 4 + len;
    }
    Err(FormatError::malformed("zip64 extra field", "missing"))
}

/// Scans the stored `data.pkl` record, which must lie before the central directory.
fn scan_data_pkl<R: Read + Seek>(
    src: &mut Src<'_, R>,
    entry: &Entry,
    cd_offset: u64,
) -> Result<pickle::Facts, FormatError> {
    src.seek_to(entry.local_offset, "zip local header")?;
    let local = src.array::<{ LOCAL_LEN as usize }>("zip local header")?;
    if le32(&local, 0) != LOCAL_SIG {
        return Err(FormatError::malformed("zip local header", "bad signature"));
    }
    let skip = u64::from(le16(&local, 26)) + u64::from(le16(&local, 28));
    let data_start = entry.local_offset.saturating_add(LOCAL_LEN + skip);
    let data_end = data_start
        .checked_add(entry.size)
        .filter(|&e| e <= cd_offset)
        .ok_or_else(|| FormatError::malformed("zip data.pkl", "runs into the central directory"))?;
    src.seek_to(data_start, "zip data.pkl")?;
    pickle::scan(src, data_end)
}

#[cfg(test)]
mod tests {
    use super::super::parse_path;
    use super::super::pickle::tests::ZIP_DATA_PKL;
    use super::super::testutil::{
        assert_prefixes_fail_cleanly, sniff_bytes, stored_zip, write_temp,
    };
    use super::*;

    fn checkpoint() -> Vec<u8> {
        stored_zip(&[
            ("archive/data.pkl", ZIP_DATA_PKL),
            ("archive/byteorder", b"little"),
            ("archive/data/0", &[0u8; 48]),
            ("archive/data/1", &[0u8; 10]),
            ("archive/version", b"3\n"),
        ])
    }

    #[test]
    fn a_pytorch_zip_checkpoint_counts_its_data_records_and_reads_the_stored_pickle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_temp(&dir, "model.pt", &checkpoint());
        let parsed = parse_path(&path).expect("parse").expect("recognised");
        assert_eq!(parsed.format, Format::PytorchZip);
        assert_eq!(parsed.header.tensor_count, 2);
        assert_eq!(parsed.header.parameter_count, Some(12 + 5));
        assert_eq!(parsed.header.dtypes, ["F16", "F32"]);
    }

    #[test]
    fn a_torchscript_archive_is_told_apart_by_code_and_constants() {
        let bytes = stored_zip(&[
            ("model/data.pkl", ZIP_DATA_PKL),
            ("model/code/__torch__.py", b"class Model(Module):\n  pass\n"),
            ("model/constants.pkl", b"\x80\x02).".as_slice()),
            ("model/data/0", &[0u8; 48]),
            ("model/data/1", &[0u8; 10]),
            ("model/data/1.bak", &[0u8; 4]),
            ("other/data/7", &[0u8; 4]),
            ("model/version", b"1\n"),
        ]);
        let parsed = sniff_bytes(&bytes).expect("parse").expect("recognised");
        assert_eq!(parsed.format, Format::Torchscript);
        assert_eq!(
            parsed.header.tensor_count, 2,
            "only model/data/<n> records count"
        );
    }

    #[test]
    fn a_compressed_data_pkl_leaves_dtypes_unknown() {
        let mut bytes = checkpoint();
        // Method "deflate" in the central directory entry of the first record.
        let cd = le32(&bytes, bytes.len() - 6) as usize;
        bytes[cd + 10] = 8;
        let h = sniff_bytes(&bytes)
            .expect("parse")
            .expect("recognised")
            .header;
        assert_eq!(h.tensor_count, 2);
        assert_eq!(h.parameter_count, None);
        assert!(h.dtypes.is_empty());
    }

    #[test]
    fn a_zip_that_is_not_a_pytorch_archive_is_not_a_weight_file() {
        let bytes = stored_zip(&[
            ("docs/readme.txt", b"hello"),
            ("[Content_Types].xml", b"<x/>"),
        ]);
        assert!(sniff_bytes(&bytes).expect("not an error").is_none());
    }

    #[test]
    fn a_central_directory_offset_beyond_the_end_of_file_is_malformed() {
        let mut bytes = checkpoint();
        let at = bytes.len() - 6;
        bytes[at..at + 4].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
        let err = sniff_bytes(&bytes).expect_err("offset past the end");
        assert!(matches!(err, FormatError::Malformed { .. }), "{err}");
    }

    #[test]
    fn an_entry_count_too_large_for_the_directory_is_malformed() {
        let mut bytes = checkpoint();
        let at = bytes.len() - 12;
        bytes[at..at + 2].copy_from_slice(&60_000u16.to_le_bytes());
        let err = sniff_bytes(&bytes).expect_err("entries");
        assert!(matches!(err, FormatError::Malformed { .. }), "{err}");
    }

    #[test]
    fn a_saturated_end_record_without_a_zip64_locator_is_malformed() {
        let mut bytes = checkpoint();
        let at = bytes.len() - 6;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = sniff_bytes(&bytes).expect_err("zip64 without locator");
        assert!(matches!(err, FormatError::Malformed { .. }), "{err}");
    }

    /// Rewrites a classic archive's end into ZIP64 end record + locator + saturated end record.
    fn to_zip64(mut bytes: Vec<u8>) -> Vec<u8> {
        let end = bytes.split_off(bytes.len() - END_LEN as usize);
        let entries = u64::from(le16(&end, 10));
        let (size, offset) = (u64::from(le32(&end, 12)), u64::from(le32(&end, 16)));
        let record_pos = bytes.len() as u64;
        bytes.extend(ZIP64_END_SIG.to_le_bytes());
        bytes.extend((ZIP64_END_LEN - 12).to_le_bytes());
        bytes.extend(45u16.to_le_bytes());
        bytes.extend(45u16.to_le_bytes());
        bytes.extend(0u32.to_le_bytes());
        bytes.extend(0u32.to_le_bytes());
        bytes.extend(entries.to_le_bytes());
        bytes.extend(entries.to_le_bytes());
        bytes.extend(size.to_le_bytes());
        bytes.extend(offset.to_le_bytes());
        bytes.extend(ZIP64_LOCATOR_SIG.to_le_bytes());
        bytes.extend(0u32.to_le_bytes());
        bytes.extend(record_pos.to_le_bytes());
        bytes.extend(1u32.to_le_bytes());
        bytes.extend(END_SIG.to_le_bytes());
        bytes.extend([0u8; 4]);
        bytes.extend([0xff; 4]);
        bytes.extend([0xff; 8]);
        bytes.extend(0u16.to_le_bytes());
        bytes
    }

    #[test]
    fn a_zip64_end_record_is_followed() {
        let parsed = sniff_bytes(&to_zip64(checkpoint()))
            .expect("parse")
            .expect("recognised");
        assert_eq!(parsed.format, Format::PytorchZip);
        assert_eq!(parsed.header.tensor_count, 2);
        assert_eq!(parsed.header.parameter_count, Some(17));
    }

    #[test]
    fn a_zip64_record_offset_beyond_the_locator_is_malformed() {
        let mut bytes = to_zip64(checkpoint());
        let at = bytes.len() - END_LEN as usize - 12;
        bytes[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = sniff_bytes(&bytes).expect_err("record offset");
        assert!(matches!(err, FormatError::Malformed { .. }), "{err}");
    }

    #[test]
    fn every_truncation_of_a_valid_archive_is_an_error_or_not_recognised() {
        assert_prefixes_fail_cleanly(&checkpoint());
    }
}
