//! Test support shared by the format parsers: a fixed-seed generator, temp files, a reader that
//! counts what it hands out, and a minimal stored (uncompressed) zip writer.

use std::cell::Cell;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::rc::Rc;

use super::{FormatError, Parsed, sniff_and_parse};

/// A fixed-seed linear congruential generator (Knuth's MMIX constants).
#[derive(Debug)]
pub(crate) struct Lcg(u64);

impl Lcg {
    pub(crate) fn new(seed: u64) -> Self {
        Lcg(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

pub(crate) fn write_temp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

pub(crate) fn sniff_bytes(bytes: &[u8]) -> Result<Option<Parsed>, FormatError> {
    sniff_and_parse(&mut io::Cursor::new(bytes), bytes.len() as u64)
}

/// Every strict prefix of a valid file is an error or "not a weight file", never a panic, and
/// the whole file parses.
pub(crate) fn assert_prefixes_fail_cleanly(bytes: &[u8]) {
    for n in 0..bytes.len() {
        let prefix = bytes.get(..n).expect("prefix");
        match sniff_bytes(prefix) {
            Err(_) | Ok(None) => {}
            // A whole header over partial data: an incomplete file, which says so.
            Ok(Some(p)) if p.header.declared_len.is_some_and(|d| d > n as u64) => {}
            Ok(Some(p)) => panic!("prefix of {n} bytes parsed as {p:?}"),
        }
    }
    assert!(sniff_bytes(bytes).expect("whole file").is_some());
}

/// Wraps a reader and counts the bytes read through it.
#[derive(Debug)]
pub(crate) struct CountingReader<R> {
    inner: R,
    read: Rc<Cell<u64>>,
}

impl<R> CountingReader<R> {
    pub(crate) fn new(inner: R) -> (Self, Rc<Cell<u64>>) {
        let read = Rc::new(Cell::new(0));
        (
            CountingReader {
                inner,
                read: Rc::clone(&read),
            },
            read,
        )
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

impl<R: Seek> Seek for CountingReader<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Writes a zip archive whose entries are stored (method 0), with CRCs left at zero (the
/// parsers never check them).
pub(crate) fn stored_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let name = name.as_bytes();
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend(20u16.to_le_bytes()); // version needed
        out.extend(0u16.to_le_bytes()); // flags
        out.extend(0u16.to_le_bytes()); // method: stored
        out.extend([0u8; 4]); // time, date
        out.extend(0u32.to_le_bytes()); // crc
        out.extend((data.len() as u32).to_le_bytes());
        out.extend((data.len() as u32).to_le_bytes());
        out.extend((name.len() as u16).to_le_bytes());
        out.extend(0u16.to_le_bytes()); // extra
        out.extend(name);
        out.extend(*data);

        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend(20u16.to_le_bytes()); // made by
        central.extend(20u16.to_le_bytes()); // needed
        central.extend(0u16.to_le_bytes()); // flags
        central.extend(0u16.to_le_bytes()); // method
        central.extend([0u8; 4]); // time, date
        central.extend(0u32.to_le_bytes()); // crc
        central.extend((data.len() as u32).to_le_bytes());
        central.extend((data.len() as u32).to_le_bytes());
        central.extend((name.len() as u16).to_le_bytes());
        central.extend(0u16.to_le_bytes()); // extra
        central.extend(0u16.to_le_bytes()); // comment
        central.extend(0u16.to_le_bytes()); // disk
        central.extend(0u16.to_le_bytes()); // internal attributes
        central.extend(0u32.to_le_bytes()); // external attributes
        central.extend(offset.to_le_bytes());
        central.extend(name);
    }
    let cd_offset = out.len() as u32;
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend(0u16.to_le_bytes()); // this disk
    out.extend(0u16.to_le_bytes()); // cd disk
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(cd_offset.to_le_bytes());
    out.extend(0u16.to_le_bytes()); // comment
    out
}
