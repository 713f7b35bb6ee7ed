//! ONNX: a protobuf `ModelProto`, walked field by field over the reader without decoding it
//! whole. Tensor bytes (`raw_data`, packed `float_data`, …) are skipped by seeking, never read.
//!
//! Recognition: the first field must be `ir_version` (field 1, varint, 1..=[`MAX_IR_VERSION`])
//! and a `graph` (7) or `opset_import` (8) field must follow within the first
//! [`SNIFF_FIELDS`] known `ModelProto` fields. Until then any surprise means "not ONNX"; after,
//! it is an error.
//!
//! Tensors counted: the initializers (and sparse initializers) of the main graph and of every
//! subgraph (`If`/`Loop`/`Scan` bodies), and the tensors of `Constant` nodes, which is where
//! exporters such as spox put the weights. The parameter count sums their element counts.

use std::collections::BTreeSet;
use std::io::{Read, Seek};

use super::read::Src;
use super::{FormatError, Header, MAX_METADATA_VALUE_BYTES, utf8_prefix};

/// The highest `ir_version` accepted when recognising a file (IR version 11 is current).
pub const MAX_IR_VERSION: u64 = 20;
/// The deepest nesting of messages walked (model → graph → node → attribute → graph …).
pub const MAX_DEPTH: u32 = 16;
/// The most protobuf fields looked at in one file.
pub const MAX_FIELDS: u64 = 10_000_000;
/// The most dimensions one tensor may have.
pub const MAX_DIMS: usize = 64;
/// How many top-level fields may come before `graph` or `opset_import` confirms the format.
pub const SNIFF_FIELDS: u32 = 8;

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// Whether `prefix` starts with an `ir_version` field of a plausible value.
pub fn sniff(prefix: &[u8]) -> bool {
    if prefix.first() != Some(&0x08) {
        return false;
    }
    let mut value: u64 = 0;
    for (i, b) in prefix.iter().skip(1).take(3).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (1..=MAX_IR_VERSION).contains(&value);
        }
    }
    false
}

/// Parses an ONNX model of `file_len` bytes; `Ok(None)` when it turns out not to be one.
pub fn parse<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<Option<Header>, FormatError> {
    let mut src = Src::start(r, file_len)?;
    let mut w = Walker {
        src: &mut src,
        fields: 0,
        confirmed: false,
    };
    match w.model() {
        Ok(header) => Ok(header.filter(|_| w.confirmed)),
        Err(_) if !w.confirmed => Ok(None),
        Err(e) => Err(e),
    }
}

/// Tensors found so far.
#[derive(Debug, Default)]
struct Tensors {
    count: u64,
    elements: u64,
    types: BTreeSet<u64>,
}

impl Tensors {
    fn add(&mut self, numel: u64, data_type: u64) -> Result<(), FormatError> {
        self.count += 1;
        self.elements = self
            .elements
            .checked_add(numel)
            .ok_or_else(|| FormatError::malformed("onnx tensors", "parameter count overflows"))?;
        self.types.insert(data_type);
        Ok(())
    }

    fn absorb(&mut self, other: Tensors) -> Result<(), FormatError> {
        self.count += other.count;
        self.elements = self
            .elements
            .checked_add(other.elements)
            .ok_or_else(|| FormatError::malformed("onnx tensors", "parameter count overflows"))?;
        self.types.extend(other.types);
        Ok(())
    }
}

struct Walker<'s, 'a, R> {
    src: &'s mut Src<'a, R>,
    fields: u64,
    confirmed: bool,
}

impl<R: Read + Seek> Walker<'_, '_, R> {
    fn varint(&mut self, what: &'static str) -> Result<u64, FormatError> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let b = self.src.u8(what)?;
            if i == 9 && b > 1 {
                return Err(FormatError::malformed(what, "varint overflows 64 bits"));
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(FormatError::malformed(what, "varint longer than 10 bytes"))
    }

    /// Reads a field key: field number and wire type.
    fn key(&mut self) -> Result<(u64, u8), FormatError> {
        self.fields += 1;
        if self.fields > MAX_FIELDS {
            return Err(FormatError::TooLarge {
                what: "onnx fields",
                len: self.fields,
                limit: MAX_FIELDS,
            });
        }
        let key = self.varint("onnx field key")?;
        let (field, wire) = (key >> 3, (key & 7) as u8);
        if field == 0 || !matches!(wire, VARINT | FIXED64 | LEN | FIXED32) {
            return Err(FormatError::malformed(
                "onnx field key",
                format!(
                    "field {field} wire type {wire} at offset {}",
                    self.src.pos()
                ),
            ));
        }
        Ok((field, wire))
    }

    /// Reads a length prefix and returns where the value ends, within `end`.
    fn sub_end(&mut self, end: u64) -> Result<u64, FormatError> {
        let len = self.varint("onnx field length")?;
        match self.src.pos().checked_add(len) {
            Some(sub) if sub <= end => Ok(sub),
            _ if end == self.src.len() => Err(FormatError::Truncated { what: "onnx field" }),
            _ => Err(FormatError::malformed(
                "onnx field",
                format!("length {len} runs past its message"),
            )),
        }
    }

    fn skip(&mut self, wire: u8, end: u64) -> Result<(), FormatError> {
        let n = match wire {
            VARINT => {
                self.varint("onnx varint")?;
                return Ok(());
            }
            FIXED64 => 8,
            FIXED32 => 4,
            _ => {
                let sub = self.sub_end(end)?;
                sub - self.src.pos()
            }
        };
        if self.src.pos().saturating_add(n) > end {
            return Err(FormatError::malformed(
                "onnx field",
                "runs past its message",
            ));
        }
        self.src.skip(n, "onnx field")
    }

    /// Reads a string field, keeping at most [`MAX_METADATA_VALUE_BYTES`].
    fn string(&mut self, end: u64) -> Result<String, FormatError> {
        let sub = self.sub_end(end)?;
        let len = sub - self.src.pos();
        let keep = len.min(MAX_METADATA_VALUE_BYTES as u64);
        let bytes = self
            .src
            .bytes(keep, MAX_METADATA_VALUE_BYTES as u64, "onnx string")?;
        self.src.skip(len - keep, "onnx string")?;
        let s = utf8_prefix(&bytes)
            .map_err(|e| FormatError::malformed("onnx string", e.to_string()))?;
        Ok(s.to_owned())
    }

    /// Walks the `ModelProto`; `None` when it is not ONNX after all.
    fn model(&mut self) -> Result<Option<Header>, FormatError> {
        let end = self.src.len();
        let mut header = Header::default();
        let mut tensors = Tensors::default();
        if self.key()? != (1, VARINT) {
            return Ok(None);
        }
        let ir_version = self.varint("onnx ir_version")?;
        if !(1..=MAX_IR_VERSION).contains(&ir_version) {
            return Ok(None);
        }
        header.put_metadata("ir_version", &ir_version.to_string(), usize::MAX);
        let mut seen: u32 = 1;
        while self.src.pos() < end {
            let (field, wire) = self.key()?;
            seen = seen.saturating_add(1);
            if !self.confirmed && seen > SNIFF_FIELDS {
                return Ok(None);
            }
            match (field, wire) {
                (2 | 3 | 4 | 6, LEN) => {
                    let s = self.string(end)?;
                    let key = match field {
                        2 => "producer_name",
                        3 => "producer_version",
                        4 => "domain",
                        _ => "doc_string",
                    };
                    if !s.is_empty() {
                        header.put_metadata(key, &s, usize::MAX);
                    }
                }
                (5, VARINT) => {
                    let v = self.varint("onnx model_version")? as i64;
                    header.put_metadata("model_version", &v.to_string(), usize::MAX);
                }
                (7, LEN) => {
                    self.confirmed = true;
                    let sub = self.sub_end(end)?;
                    self.graph(sub, 1, &mut tensors)?;
                }
                (8, LEN) => {
                    self.confirmed = true;
                    let sub = self.sub_end(end)?;
                    let (domain, version) = self.opset(sub)?;
                    let key = match domain.as_str() {
                        "" | "ai.onnx" => "opset".to_owned(),
                        d => format!("opset.{d}"),
                    };
                    header.put_metadata(&key, &version.to_string(), usize::MAX);
                }
                (14, LEN) => {
                    let sub = self.sub_end(end)?;
                    let (k, v) = self.string_pair(sub)?;
                    if !header.metadata.contains_key(&k) {
                        header.put_metadata(&k, &v, usize::MAX);
                    }
                }
                (20 | 25, LEN) => self.skip(wire, end)?,
                _ if !self.confirmed => return Ok(None),
                _ => self.skip(wire, end)?,
            }
        }
        header.tensor_count = tensors.count;
        header.parameter_count = Some(tensors.elements);
        header.dtypes = tensors
            .types
            .into_iter()
            .map(type_name)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        Ok(Some(header))
    }

    /// `OperatorSetIdProto`: domain (1), version (2).
    fn opset(&mut self, end: u64) -> Result<(String, i64), FormatError> {
        let (mut domain, mut version) = (String::new(), 0i64);
        while self.src.pos() < end {
            match self.key()? {
                (1, LEN) => domain = self.string(end)?,
                (2, VARINT) => version = self.varint("onnx opset version")? as i64,
                (_, wire) => self.skip(wire, end)?,
            }
        }
        Ok((domain, version))
    }

    /// `StringStringEntryProto`: key (1), value (2).
    fn string_pair(&mut self, end: u64) -> Result<(String, String), FormatError> {
        let (mut k, mut v) = (String::new(), String::new());
        while self.src.pos() < end {
            match self.key()? {
                (1, LEN) => k = self.string(end)?,
                (2, LEN) => v = self.string(end)?,
                (_, wire) => self.skip(wire, end)?,
            }
        }
        Ok((k, v))
    }

    fn enter(depth: u32) -> Result<(), FormatError> {
        if depth > MAX_DEPTH {
            return Err(FormatError::TooLarge {
                what: "onnx nesting",
                len: depth.into(),
                limit: MAX_DEPTH.into(),
            });
        }
        Ok(())
    }

    /// `GraphProto`: node (1), initializer (5), sparse_initializer (15).
    fn graph(&mut self, end: u64, depth: u32, out: &mut Tensors) -> Result<(), FormatError> {
        Self::enter(depth)?;
        while self.src.pos() < end {
            match self.key()? {
                (1, LEN) => {
                    let sub = self.sub_end(end)?;
                    self.node(sub, depth + 1, out)?;
                }
                (5, LEN) => {
                    let sub = self.sub_end(end)?;
                    let (numel, data_type) = self.tensor(sub)?;
                    out.add(numel, data_type)?;
                }
                (15, LEN) => {
                    let sub = self.sub_end(end)?;
                    let (numel, data_type) = self.sparse_tensor(sub)?;
                    out.add(numel, data_type)?;
                }
                (_, wire) => self.skip(wire, end)?,
            }
        }
        Ok(())
    }

    /// `NodeProto`: op_type (4), attribute (5), domain (7). Tensor attributes count only for
    /// `Constant` nodes; subgraph attributes are always walked.
    fn node(&mut self, end: u64, depth: u32, out: &mut Tensors) -> Result<(), FormatError> {
        Self::enter(depth)?;
        let mut op_type = String::new();
        let mut domain = String::new();
        let mut constants = Tensors::default();
        while self.src.pos() < end {
            match self.key()? {
                (4, LEN) => op_type = self.string(end)?,
                (7, LEN) => domain = self.string(end)?,
                (5, LEN) => {
                    let sub = self.sub_end(end)?;
                    self.attribute(sub, depth + 1, out, &mut constants)?;
                }
                (_, wire) => self.skip(wire, end)?,
            }
        }
        if op_type == "Constant" && matches!(domain.as_str(), "" | "ai.onnx") {
            out.absorb(constants)?;
        }
        Ok(())
    }

    /// `AttributeProto`: t (5), g (6), tensors (10), graphs (11), sparse_tensor (22).
    fn attribute(
        &mut self,
        end: u64,
        depth: u32,
        out: &mut Tensors,
        constants: &mut Tensors,
    ) -> Result<(), FormatError> {
        Self::enter(depth)?;
        while self.src.pos() < end {
            match self.key()? {
                (5 | 10, LEN) => {
                    let sub = self.sub_end(end)?;
                    let (numel, data_type) = self.tensor(sub)?;
                    constants.add(numel, data_type)?;
                }
                (22, LEN) => {
                    let sub = self.sub_end(end)?;
                    let (numel, data_type) = self.sparse_tensor(sub)?;
                    constants.add(numel, data_type)?;
                }
                (6 | 11, LEN) => {
                    let sub = self.sub_end(end)?;
                    self.graph(sub, depth + 1, out)?;
                }
                (_, wire) => self.skip(wire, end)?,
            }
        }
        Ok(())
    }

    /// Adds one dimension to a running element count.
    fn dim(dims: &mut usize, numel: &mut u64, d: u64) -> Result<(), FormatError> {
        *dims += 1;
        if *dims > MAX_DIMS {
            return Err(FormatError::TooLarge {
                what: "onnx tensor dimensions",
                len: *dims as u64,
                limit: MAX_DIMS as u64,
            });
        }
        if (d as i64) < 0 {
            return Err(FormatError::malformed("onnx tensor", "negative dimension"));
        }
        *numel = numel
            .checked_mul(d)
            .ok_or_else(|| FormatError::malformed("onnx tensor", "element count overflows"))?;
        Ok(())
    }

    /// Reads `dims` given as one varint or as a packed run up to the value's end.
    fn dims_field(
        &mut self,
        wire: u8,
        end: u64,
        dims: &mut usize,
        numel: &mut u64,
    ) -> Result<(), FormatError> {
        match wire {
            VARINT => {
                let d = self.varint("onnx tensor dimension")?;
                Self::dim(dims, numel, d)
            }
            LEN => {
                let sub = self.sub_end(end)?;
                while self.src.pos() < sub {
                    let d = self.varint("onnx tensor dimension")?;
                    Self::dim(dims, numel, d)?;
                }
                if self.src.pos() > sub {
                    return Err(FormatError::malformed(
                        "onnx tensor",
                        "packed dimensions overrun",
                    ));
                }
                Ok(())
            }
            _ => self.skip(wire, end),
        }
    }

    /// `TensorProto`: dims (1), data_type (2); everything else, `raw_data` (9) included, is
    /// skipped. Returns the element count and the data type.
    fn tensor(&mut self, end: u64) -> Result<(u64, u64), FormatError> {
        let (mut dims, mut numel, mut data_type) = (0usize, 1u64, 0u64);
        while self.src.pos() < end {
            match self.key()? {
                (1, wire) => self.dims_field(wire, end, &mut dims, &mut numel)?,
                (2, VARINT) => data_type = self.varint("onnx tensor data_type")?,
                (_, wire) => self.skip(wire, end)?,
            }
        }
        Ok((numel, data_type))
    }

    /// `SparseTensorProto`: values (1, a `TensorProto`), dims (3) of the dense tensor.
    fn sparse_tensor(&mut self, end: u64) -> Result<(u64, u64), FormatError> {
        let (mut dims, mut numel, mut data_type) = (0usize, 1u64, 0u64);
        while self.src.pos() < end {
            match self.key()? {
                (1, LEN) => {
                    let sub = self.sub_end(end)?;
                    data_type = self.tensor(sub)?.1;
                }
                (3, wire) => self.dims_field(wire, end, &mut dims, &mut numel)?,
                (_, wire) => self.skip(wire, end)?,
            }
        }
        Ok((numel, data_type))
    }
}

/// ONNX `TensorProto.DataType` names, in safetensors spelling, by id.
const TYPE_NAMES: [&str; 26] = [
    "UNDEFINED",
    "F32",
    "U8",
    "I8",
    "U16",
    "I16",
    "I32",
    "I64",
    "STRING",
    "BOOL",
    "F16",
    "F64",
    "U32",
    "U64",
    "C64",
    "C128",
    "BF16",
    "F8_E4M3",
    "F8_E4M3FNUZ",
    "F8_E5M2",
    "F8_E5M2FNUZ",
    "U4",
    "I4",
    "F4",
    "F8_E8M0",
    "U2",
];

/// The name of an ONNX data type id, `type<N>` when unknown.
pub fn type_name(id: u64) -> String {
    match usize::try_from(id).ok().and_then(|i| TYPE_NAMES.get(i)) {
        Some(name) => (*name).to_owned(),
        None => format!("type{id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{CountingReader, sniff_bytes, write_temp};
    use super::super::{Format, sniff_and_parse};
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn field_varint(field: u64, v: u64, out: &mut Vec<u8>) {
        varint(field << 3, out);
        varint(v, out);
    }

    fn field_bytes(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
        varint((field << 3) | 2, out);
        varint(bytes.len() as u64, out);
        out.extend(bytes);
    }

    /// A `TensorProto` with packed dims, FLOAT data type, a name and `raw_data`.
    fn initializer(name: &str, dims: &[u64], raw: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        let mut packed = Vec::new();
        for d in dims {
            varint(*d, &mut packed);
        }
        field_bytes(1, &packed, &mut t);
        field_varint(2, 1, &mut t);
        field_bytes(8, name.as_bytes(), &mut t);
        field_bytes(9, raw, &mut t);
        t
    }

    fn opset(version: u64) -> Vec<u8> {
        let mut o = Vec::new();
        field_bytes(1, b"", &mut o);
        field_varint(2, version, &mut o);
        o
    }

    /// ir_version 8, producer, opset 16, a graph with two FLOAT initializers [256, 1024] and
    /// [1024] whose raw data (1 MiB + 4 KiB) is really there.
    fn model() -> Vec<u8> {
        let mut graph = Vec::new();
        let mut node = Vec::new();
        field_bytes(1, b"x", &mut node);
        field_bytes(1, b"w", &mut node);
        field_bytes(2, b"y", &mut node);
        field_bytes(4, b"MatMul", &mut node);
        field_bytes(1, &node, &mut graph);
        field_bytes(2, b"tiny", &mut graph);
        field_bytes(
            5,
            &initializer("w", &[256, 1024], &vec![7u8; 256 * 1024 * 4]),
            &mut graph,
        );
        field_bytes(
            5,
            &initializer("b", &[1024], &vec![9u8; 1024 * 4]),
            &mut graph,
        );
        let mut m = Vec::new();
        field_varint(1, 8, &mut m);
        field_bytes(2, b"pytorch", &mut m);
        field_bytes(3, b"2.3.0", &mut m);
        field_bytes(4, b"ai.example", &mut m);
        field_varint(5, 3, &mut m);
        field_bytes(6, b"a tiny test model", &mut m);
        field_bytes(7, &graph, &mut m);
        field_bytes(8, &opset(16), &mut m);
        m
    }

    #[test]
    fn a_hand_encoded_model_reports_params_and_metadata_without_reading_tensor_data() {
        let bytes = model();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_temp(&dir, "model.bin", &bytes);
        let file = std::fs::File::open(&path).expect("open");
        let (mut reader, read) = CountingReader::new(file);
        let parsed = sniff_and_parse(&mut reader, bytes.len() as u64)
            .expect("parse")
            .expect("recognised");
        assert_eq!(parsed.format, Format::Onnx);
        let h = parsed.header;
        assert_eq!(h.tensor_count, 2);
        assert_eq!(h.parameter_count, Some(256 * 1024 + 1024));
        assert_eq!(h.parameter_count, Some(263_168));
        assert_eq!(h.dtypes, ["F32"]);
        let get = |k: &str| h.metadata.get(k).map(String::as_str);
        assert_eq!(get("ir_version"), Some("8"));
        assert_eq!(get("opset"), Some("16"));
        assert_eq!(get("producer_name"), Some("pytorch"));
        assert_eq!(get("producer_version"), Some("2.3.0"));
        assert_eq!(get("domain"), Some("ai.example"));
        assert_eq!(get("model_version"), Some("3"));
        assert_eq!(get("doc_string"), Some("a tiny test model"));
        assert!(bytes.len() > 1_000_000);
        assert!(
            read.get() < 16 * 1024,
            "read {} of {} bytes",
            read.get(),
            bytes.len()
        );
    }

    #[test]
    fn constant_nodes_and_subgraph_initializers_are_counted() {
        // Graph: a Constant node with a [3, 4] tensor, a Relu node whose (made up) tensor
        // attribute does not count, and an If node whose then-branch has a [5] initializer.
        let constant_tensor = initializer("c", &[3, 4], &[0u8; 48]);
        let mut attr = Vec::new();
        field_bytes(1, b"value", &mut attr);
        field_bytes(5, &constant_tensor, &mut attr);
        let mut constant = Vec::new();
        field_bytes(4, b"Constant", &mut constant);
        field_bytes(5, &attr, &mut constant);
        let mut relu = Vec::new();
        field_bytes(5, &attr, &mut relu);
        field_bytes(4, b"Relu", &mut relu);
        let mut branch = Vec::new();
        field_bytes(5, &initializer("k", &[5], &[0u8; 20]), &mut branch);
        let mut branch_attr = Vec::new();
        field_bytes(1, b"then_branch", &mut branch_attr);
        field_bytes(6, &branch, &mut branch_attr);
        let mut if_node = Vec::new();
        field_bytes(4, b"If", &mut if_node);
        field_bytes(5, &branch_attr, &mut if_node);
        let mut graph = Vec::new();
        field_bytes(1, &constant, &mut graph);
        field_bytes(1, &relu, &mut graph);
        field_bytes(1, &if_node, &mut graph);
        let mut m = Vec::new();
        field_varint(1, 8, &mut m);
        field_bytes(7, &graph, &mut m);
        field_bytes(8, &opset(16), &mut m);
        let h = sniff_bytes(&m).expect("parse").expect("recognised").header;
        assert_eq!(h.tensor_count, 2);
        assert_eq!(h.parameter_count, Some(12 + 5));
    }

    #[test]
    fn a_field_claiming_two_to_the_forty_bytes_is_an_error() {
        let mut m = Vec::new();
        field_varint(1, 8, &mut m);
        field_bytes(8, &opset(16), &mut m);
        varint((7 << 3) | 2, &mut m);
        varint(1 << 40, &mut m);
        m.extend([0u8; 64]);
        let err = sniff_bytes(&m).expect_err("huge graph");
        assert!(matches!(err, FormatError::Truncated { .. }), "{err}");

        // Inside the graph: an initializer longer than the graph itself.
        let mut graph = Vec::new();
        varint((5 << 3) | 2, &mut graph);
        varint(1 << 40, &mut graph);
        let mut m = Vec::new();
        field_varint(1, 8, &mut m);
        field_bytes(7, &graph, &mut m);
        field_bytes(8, &opset(16), &mut m);
        let err = sniff_bytes(&m).expect_err("huge initializer");
        assert!(matches!(err, FormatError::Malformed { .. }), "{err}");
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_refused() {
        // graph → node → attribute → graph → … well past MAX_DEPTH.
        let mut graph = Vec::new();
        for _ in 0..MAX_DEPTH {
            let mut attr = Vec::new();
            field_bytes(6, &graph, &mut attr);
            let mut node = Vec::new();
            field_bytes(5, &attr, &mut node);
            graph.clear();
            field_bytes(1, &node, &mut graph);
        }
        let mut m = Vec::new();
        field_varint(1, 8, &mut m);
        field_bytes(7, &graph, &mut m);
        let err = sniff_bytes(&m).expect_err("too deep");
        assert!(matches!(err, FormatError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn negative_or_overflowing_dimensions_are_malformed() {
        for dims in [&[u64::MAX][..], &[1 << 40, 1 << 40]] {
            let mut graph = Vec::new();
            field_bytes(5, &initializer("w", dims, b""), &mut graph);
            let mut m = Vec::new();
            field_varint(1, 8, &mut m);
            field_bytes(7, &graph, &mut m);
            let err = sniff_bytes(&m).expect_err("bad dims");
            assert!(matches!(err, FormatError::Malformed { .. }), "{err}");
        }
    }

    #[test]
    fn protobufs_that_are_not_onnx_are_not_recognised() {
        // A plausible ir_version followed by fields that ModelProto does not have.
        let mut other = Vec::new();
        field_varint(1, 3, &mut other);
        field_bytes(9, b"something else", &mut other);
        field_bytes(7, b"", &mut other);
        assert!(sniff_bytes(&other).expect("not an error").is_none());

        // Only string fields, never a graph or an opset.
        let mut strings = Vec::new();
        field_varint(1, 3, &mut strings);
        for _ in 0..20 {
            field_bytes(2, b"name", &mut strings);
        }
        assert!(sniff_bytes(&strings).expect("not an error").is_none());

        // ir_version out of range; a first field that is not ir_version.
        assert!(
            sniff_bytes(b"\x08\x63\x3a\x00")
                .expect("not an error")
                .is_none()
        );
        assert!(
            sniff_bytes(b"\x10\x08\x3a\x00")
                .expect("not an error")
                .is_none()
        );
    }

    #[test]
    fn every_truncation_of_a_small_model_is_an_error_or_not_recognised_or_a_smaller_model() {
        let mut graph = Vec::new();
        field_bytes(5, &initializer("w", &[2, 3], &[0u8; 24]), &mut graph);
        let mut m = Vec::new();
        field_varint(1, 8, &mut m);
        field_bytes(2, b"spox", &mut m);
        field_bytes(7, &graph, &mut m);
        field_bytes(8, &opset(16), &mut m);
        let whole = sniff_bytes(&m).expect("parse").expect("recognised").header;
        assert_eq!(whole.parameter_count, Some(6));
        for n in 0..m.len() {
            // A cut at a field boundary is a valid smaller model; anything else must not panic.
            if let Ok(Some(p)) = sniff_bytes(m.get(..n).expect("prefix")) {
                assert!(p.header.tensor_count <= 1, "{p:?}");
            }
        }
    }

    #[test]
    fn data_type_names_follow_safetensors_spelling() {
        assert_eq!(type_name(1), "F32");
        assert_eq!(type_name(16), "BF16");
        assert_eq!(type_name(7), "I64");
        assert_eq!(type_name(99), "type99");
    }
}
