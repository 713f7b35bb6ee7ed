//! A minimal MaxMind DB writer, for tests and the `bench_geo` example (there is no writer
//! crate). Not for production databases: no pointer sharing inside records, no aliases.
//!
//! The file is what the format specification describes: a binary search tree (record size 24,
//! or 32 when the tree is too large for 24 bits), 16 zero bytes, the data section, then the
//! metadata marker and the metadata map. In an IPv6 tree IPv4 networks live under `::/96`,
//! where readers look for them.

use std::collections::HashMap;
use std::net::IpAddr;

use super::detect::MMDB_MARKER;

/// A data-section value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// UTF-8 string.
    Str(String),
    /// uint16.
    U16(u16),
    /// uint32.
    U32(u32),
    /// uint64.
    U64(u64),
    /// Map from string keys, in this order.
    Map(Vec<(String, Value)>),
    /// Array.
    Array(Vec<Value>),
}

impl Value {
    /// A string value.
    pub fn str(s: &str) -> Value {
        Value::Str(s.to_owned())
    }

    /// A map value.
    pub fn map<const N: usize>(pairs: [(&str, Value); N]) -> Value {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::Str(s) => {
                control(out, 2, s.len());
                out.extend_from_slice(s.as_bytes());
            }
            Value::U16(n) => uint(out, 5, u64::from(*n)),
            Value::U32(n) => uint(out, 6, u64::from(*n)),
            Value::U64(n) => uint(out, 9, *n),
            Value::Map(pairs) => {
                control(out, 7, pairs.len());
                for (k, v) in pairs {
                    Value::Str(k.clone()).encode(out);
                    v.encode(out);
                }
            }
            Value::Array(items) => {
                control(out, 11, items.len());
                for v in items {
                    v.encode(out);
                }
            }
        }
    }
}

/// Control byte(s): type in the top 3 bits (extended types > 7 in a second byte), size in
/// the low 5 bits with 1–3 more bytes for large sizes.
fn control(out: &mut Vec<u8>, type_num: u8, size: usize) {
    let (bits, extra): (u8, Vec<u8>) = match size {
        0..29 => (size as u8, vec![]),
        29..285 => (29, vec![(size - 29) as u8]),
        285..65_821 => (30, ((size - 285) as u16).to_be_bytes().to_vec()),
        _ => (31, ((size - 65_821) as u32).to_be_bytes()[1..].to_vec()),
    };
    if type_num <= 7 {
        out.push((type_num << 5) | bits);
    } else {
        out.push(bits);
        out.push(type_num - 7);
    }
    out.extend_from_slice(&extra);
}

/// An unsigned integer in as few big-endian bytes as it needs.
fn uint(out: &mut Vec<u8>, type_num: u8, n: u64) {
    let bytes = n.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    control(out, type_num, 8 - skip);
    out.extend_from_slice(&bytes[skip..]);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Child {
    Empty,
    Node(usize),
    Data(usize),
}

/// Builds one database in memory.
#[derive(Debug)]
pub struct MmdbWriter {
    ip_version: u16,
    database_type: String,
    build_epoch: u64,
    nodes: Vec<[Child; 2]>,
    /// Encoded records, each stored once.
    data: Vec<u8>,
    offsets: HashMap<Vec<u8>, usize>,
}

impl MmdbWriter {
    /// An empty database: `ip_version` 4 or 6, `database_type` as in the metadata
    /// (e.g. "GeoLite2-Country"), `build_epoch` in seconds since 1970.
    pub fn new(ip_version: u16, database_type: &str, build_epoch: u64) -> Self {
        Self {
            ip_version,
            database_type: database_type.to_owned(),
            build_epoch,
            nodes: vec![[Child::Empty, Child::Empty]],
            data: Vec::new(),
            offsets: HashMap::new(),
        }
    }

    /// Put `value` at `network/prefix_len`; a later insert replaces what it covers.
    pub fn insert(&mut self, network: IpAddr, prefix_len: u8, value: Value) -> Result<(), String> {
        let (bits, len) = match (network, self.ip_version) {
            (IpAddr::V4(v4), 4) if prefix_len <= 32 => (u128::from(v4.to_bits()) << 96, prefix_len),
            (IpAddr::V4(v4), 6) if prefix_len <= 32 => (u128::from(v4.to_bits()), prefix_len + 96),
            (IpAddr::V6(v6), 6) if prefix_len <= 128 => (v6.to_bits(), prefix_len),
            _ => {
                return Err(format!(
                    "{network}/{prefix_len} does not fit an IPv{} tree",
                    self.ip_version
                ));
            }
        };
        let mut encoded = Vec::new();
        value.encode(&mut encoded);
        let offset = match self.offsets.get(&encoded) {
            Some(o) => *o,
            None => {
                let o = self.data.len();
                self.data.extend_from_slice(&encoded);
                self.offsets.insert(encoded, o);
                o
            }
        };
        if len == 0 {
            self.nodes[0] = [Child::Data(offset), Child::Data(offset)];
            return Ok(());
        }
        let mut node = 0;
        for depth in 0..usize::from(len) {
            let bit = usize::from((bits >> (127 - depth)) & 1 == 1);
            if depth + 1 == usize::from(len) {
                self.nodes[node][bit] = Child::Data(offset);
                break;
            }
            node = match self.nodes[node][bit] {
                Child::Node(n) => n,
                other => {
                    // Empty, or a wider network being split: both halves keep what was there.
                    let n = self.nodes.len();
                    self.nodes.push([other, other]);
                    self.nodes[node][bit] = Child::Node(n);
                    n
                }
            };
        }
        Ok(())
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let node_count = self.nodes.len();
        let largest = node_count + 16 + self.data.len();
        let record_size: u16 = if largest < 1 << 24 { 24 } else { 32 };
        let record = |c: Child| -> u32 {
            let v = match c {
                Child::Empty => node_count,
                Child::Node(n) => n,
                Child::Data(o) => node_count + 16 + o,
            };
            u32::try_from(v).unwrap_or(u32::MAX)
        };
        let mut out =
            Vec::with_capacity(node_count * usize::from(record_size) / 4 + self.data.len() + 256);
        for [l, r] in &self.nodes {
            for c in [*l, *r] {
                let b = record(c).to_be_bytes();
                if record_size == 24 {
                    out.extend_from_slice(&b[1..]);
                } else {
                    out.extend_from_slice(&b);
                }
            }
        }
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(&self.data);
        out.extend_from_slice(MMDB_MARKER);
        Value::Map(vec![
            ("binary_format_major_version".into(), Value::U16(2)),
            ("binary_format_minor_version".into(), Value::U16(0)),
            ("build_epoch".into(), Value::U64(self.build_epoch)),
            (
                "database_type".into(),
                Value::Str(self.database_type.clone()),
            ),
            (
                "description".into(),
                Value::map([("en", Value::str("written by sov-collector's test writer"))]),
            ),
            ("ip_version".into(), Value::U16(self.ip_version)),
            ("languages".into(), Value::Array(vec![Value::str("en")])),
            (
                "node_count".into(),
                Value::U32(u32::try_from(node_count).unwrap_or(u32::MAX)),
            ),
            ("record_size".into(), Value::U16(record_size)),
        ])
        .encode(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_the_extension_bytes_of_the_specification() {
        for (size, want) in [
            (28usize, vec![0x40 | 28]),
            (29, vec![0x40 | 29, 0]),
            (284, vec![0x40 | 29, 255]),
            (285, vec![0x40 | 30, 0, 0]),
            (65_821, vec![0x40 | 31, 0, 0, 0]),
        ] {
            let mut out = Vec::new();
            control(&mut out, 2, size);
            assert_eq!(out, want, "size {size}");
        }
        let mut out = Vec::new();
        control(&mut out, 11, 1);
        assert_eq!(out, [0x01, 0x04]);
    }

    #[test]
    fn long_strings_and_big_trees_round_trip_through_the_real_reader() {
        let long = "x".repeat(70_000);
        let mut w = MmdbWriter::new(4, "Big", 0);
        for i in 0..3000u32 {
            let net = IpAddr::from((i << 12).to_be_bytes());
            w.insert(
                net,
                20,
                Value::map([
                    ("i", Value::U32(i)),
                    ("s", Value::str(&long[..(i as usize % 300)])),
                ]),
            )
            .unwrap();
        }
        w.insert(
            "10.0.0.0".parse().unwrap(),
            8,
            Value::map([("s", Value::Str(long.clone()))]),
        )
        .unwrap();
        let reader = maxminddb::Reader::from_source(w.to_bytes()).unwrap();
        reader.verify().unwrap();
        let i: Option<u32> = reader
            .lookup("0.0.0.7".parse().unwrap())
            .unwrap()
            .decode_path(&[maxminddb::PathElement::Key("i")])
            .unwrap();
        assert_eq!(i, Some(0));
        let i: Option<u32> = reader
            .lookup(IpAddr::from(((2999u32 << 12) + 5).to_be_bytes()))
            .unwrap()
            .decode_path(&[maxminddb::PathElement::Key("i")])
            .unwrap();
        assert_eq!(i, Some(2999));
        let s: Option<String> = reader
            .lookup("10.1.2.3".parse().unwrap())
            .unwrap()
            .decode_path(&[maxminddb::PathElement::Key("s")])
            .unwrap();
        assert_eq!(s.map(|s| s.len()), Some(70_000));
    }
}
