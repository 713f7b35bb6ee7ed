//! Legacy `torch.save` pickles (before PyTorch 1.6, or `_use_new_zipfile_serialization=False`):
//! the pickled magic number `0x1950a86a20f9469cfc6c`, the protocol version, a `sys_info` dict,
//! the object itself, the list of storage keys, then the raw storages. Also any protocol 2+
//! pickle that names `torch._utils`, a `torch` global or `collections.OrderedDict` in its first
//! [`super::SNIFF_BYTES`].
//!
//! Nothing is unpickled: a bounded opcode scanner walks the opcodes, keeping only a short
//! approximate stack and the memoised strings, and counts
//! - tensors: each time a `torch._utils._rebuild_*tensor*` function is pushed (by name or from
//!   the memo), one per tensor rebuilt;
//! - storages: each persistent id `('storage', torch.<Type>Storage, key, location, numel[, view])`
//!   with a new key, whose element counts sum to the parameter count and whose types give the
//!   dtypes.
//!
//! The same scanner reads the `data.pkl` record of PyTorch zip archives ([`super::pytorch`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Read, Seek};

use super::read::Src;
use super::{FormatError, Header};

/// The most pickle bytes one scan walks over.
pub const MAX_SCAN_BYTES: u64 = 64 * 1024 * 1024;
/// The most opcodes one scan executes.
pub const MAX_OPS: u64 = 10_000_000;
/// The longest text argument (`GLOBAL` module and name lines, `INT`, …).
pub const MAX_LINE_BYTES: u64 = 1024;
/// The most memo entries remembered (only strings, storage types and rebuild functions are).
pub const MAX_MEMO_ENTRIES: usize = 64 * 1024;
/// The most distinct storage keys remembered (as 64-bit hashes).
pub const MAX_STORAGES: usize = 1024 * 1024;
/// Strings longer than this are not remembered.
const MAX_KEPT_STRING: u64 = 128;
/// The approximate stack keeps this many values.
const STACK_DEPTH: usize = 16;
/// `torch.serialization.MAGIC_NUMBER` as the `LONG1` opcode pickles it.
const LEGACY_MAGIC: [u8; 12] = [
    0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];
/// Pickles in a legacy file: magic, protocol version, `sys_info`, the object, the storage keys.
const LEGACY_PICKLES: usize = 5;
/// Byte strings in the first bytes of a pickle that make it a torch pickle.
const TORCH_EVIDENCE: [&[u8]; 4] = [
    b"torch._utils",
    b"ctorch\n",
    b"\x8c\x05torch",
    b"OrderedDict",
];

/// Whether `prefix` is a protocol 2–5 pickle that is a legacy `torch.save` file or names torch
/// or `collections.OrderedDict` early on.
pub fn sniff(prefix: &[u8]) -> bool {
    let (Some(&0x80), Some(&proto)) = (prefix.first(), prefix.get(1)) else {
        return false;
    };
    if !(2..=5).contains(&proto) {
        return false;
    }
    if prefix.get(2..2 + LEGACY_MAGIC.len()) == Some(&LEGACY_MAGIC[..]) {
        return true;
    }
    TORCH_EVIDENCE.iter().any(|needle| {
        prefix.windows(needle.len()).any(|w| w == *needle)
            && (*needle != b"OrderedDict" || prefix.windows(11).any(|w| w == b"collections"))
    })
}

/// Parses a pickle file of `file_len` bytes: tensors, storages' elements and dtypes.
pub fn parse<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<Header, FormatError> {
    let mut src = Src::start(r, file_len)?;
    let facts = scan(&mut src, file_len)?;
    Ok(facts.header())
}

/// What a scan found.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Facts {
    /// The first pickle is the legacy `torch.save` magic number.
    pub legacy_magic: bool,
    /// Tensor rebuild functions pushed.
    pub tensors: u64,
    /// Distinct storages seen in persistent ids.
    pub storages: u64,
    /// Sum of the distinct storages' element counts.
    pub storage_elements: u64,
    /// Element types of the storages, in safetensors spelling.
    pub dtypes: BTreeSet<String>,
}

impl Facts {
    fn header(self) -> Header {
        Header {
            tensor_count: self.tensors,
            parameter_count: (self.storages > 0).then_some(self.storage_elements),
            dtypes: self.dtypes.into_iter().collect(),
            ..Default::default()
        }
    }
}

/// Scans from the current position (at most up to `end`) one pickle, or the five pickles of a
/// legacy file when the first is the legacy magic number; what follows them is not looked at.
pub(crate) fn scan<R: Read + Seek>(src: &mut Src<'_, R>, end: u64) -> Result<Facts, FormatError> {
    let start = src.pos();
    let mut s = Scanner {
        src,
        end,
        start,
        stack: Vec::with_capacity(STACK_DEPTH),
        memo: HashMap::new(),
        memo_len: 0,
        storage_keys: HashSet::new(),
        facts: Facts::default(),
    };
    s.run()?;
    Ok(s.facts)
}

/// A value on the approximate stack.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Mark,
    Str(String),
    Int(i64),
    None,
    /// A `torch.<X>Storage` class; the dtype.
    StorageType(String),
    /// A `torch._utils._rebuild_*tensor*` function.
    Rebuild,
    /// A storage persistent id: key, dtype, elements.
    StorageId(String, String, u64),
    Other,
}

impl Val {
    fn worth_memoising(&self) -> bool {
        matches!(self, Val::Str(_) | Val::StorageType(_) | Val::Rebuild)
    }
}

struct Scanner<'s, 'a, R> {
    src: &'s mut Src<'a, R>,
    end: u64,
    start: u64,
    stack: Vec<Val>,
    memo: HashMap<u64, Val>,
    memo_len: u64,
    /// Hashes of the storage keys seen.
    storage_keys: HashSet<u64>,
    facts: Facts,
}

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const STRING: u8 = b'S';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const UNICODE: u8 = b'V';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const INST: u8 = b'i';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const OBJ: u8 = b'o';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const EXT1: u8 = 0x82;
    pub const EXT2: u8 = 0x83;
    pub const EXT4: u8 = 0x84;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
    pub const NEXT_BUFFER: u8 = 0x97;
    pub const READONLY_BUFFER: u8 = 0x98;
}

impl<R: Read + Seek> Scanner<'_, '_, R> {
    fn push(&mut self, v: Val) {
        if v == Val::Rebuild {
            self.facts.tensors = self.facts.tensors.saturating_add(1);
        }
        if self.stack.len() >= STACK_DEPTH {
            self.stack.remove(0);
        }
        self.stack.push(v);
    }

    fn pop(&mut self) -> Val {
        self.stack.pop().unwrap_or(Val::Other)
    }

    fn pop_n(&mut self, n: usize) {
        let keep = self.stack.len().saturating_sub(n);
        self.stack.truncate(keep);
    }

    /// Pops everything above the topmost mark (and the mark); returns the popped values when the
    /// mark was still on the approximate stack.
    fn pop_mark(&mut self) -> Option<Vec<Val>> {
        match self.stack.iter().rposition(|v| *v == Val::Mark) {
            Some(i) => {
                let items = self.stack.split_off(i);
                Some(items.into_iter().skip(1).collect())
            }
            None => {
                self.stack.clear();
                None
            }
        }
    }

    fn memo_put(&mut self, idx: u64) {
        let top = self.stack.last().cloned().unwrap_or(Val::Other);
        self.memo_len = self.memo_len.max(idx.saturating_add(1));
        if top.worth_memoising()
            && (self.memo.len() < MAX_MEMO_ENTRIES || self.memo.contains_key(&idx))
        {
            self.memo.insert(idx, top);
        } else {
            self.memo.remove(&idx);
        }
    }

    fn memo_get(&mut self, idx: u64) {
        let v = self.memo.get(&idx).cloned().unwrap_or(Val::Other);
        self.push(v);
    }

    fn global(&mut self, module: &str, name: &str) -> Val {
        if module == "torch._utils" && name.starts_with("_rebuild_") && name.contains("tensor") {
            Val::Rebuild
        } else if module == "torch" && name.ends_with("Storage") {
            Val::StorageType(storage_dtype(name))
        } else {
            Val::Other
        }
    }

    fn storage(&mut self, key: &str, dtype: String, numel: u64) {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let key = hasher.finish();
        if self.storage_keys.len() >= MAX_STORAGES || !self.storage_keys.insert(key) {
            return;
        }
        self.facts.storages += 1;
        self.facts.storage_elements = self.facts.storage_elements.saturating_add(numel);
        self.facts.dtypes.insert(dtype);
    }

    fn arg<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        self.src.array::<N>("pickle opcode argument")
    }

    /// Reads a newline-terminated text argument.
    fn line(&mut self) -> Result<String, FormatError> {
        let mut bytes = Vec::new();
        loop {
            let b = self.src.u8("pickle text argument")?;
            if b == b'\n' {
                break;
            }
            if bytes.len() as u64 >= MAX_LINE_BYTES {
                return Err(FormatError::TooLarge {
                    what: "pickle text argument",
                    len: bytes.len() as u64 + 1,
                    limit: MAX_LINE_BYTES,
                });
            }
            bytes.push(b);
        }
        String::from_utf8(bytes)
            .map_err(|e| FormatError::malformed("pickle text argument", e.to_string()))
    }

    /// Reads `len` bytes as a remembered string when short and UTF-8, else skips them.
    fn string(&mut self, len: u64) -> Result<Val, FormatError> {
        if len > MAX_KEPT_STRING {
            self.src.skip(len, "pickle string")?;
            return Ok(Val::Other);
        }
        let bytes = self.src.bytes(len, MAX_KEPT_STRING, "pickle string")?;
        Ok(String::from_utf8(bytes).map_or(Val::Other, Val::Str))
    }

    fn run(&mut self) -> Result<(), FormatError> {
        let mut ops: u64 = 0;
        let mut pickles: usize = 0;
        let mut first_op_of_pickle = true;
        loop {
            if self.src.pos() >= self.end {
                return Err(FormatError::Truncated { what: "pickle" });
            }
            if self.src.pos() - self.start > MAX_SCAN_BYTES {
                return Err(FormatError::TooLarge {
                    what: "pickle",
                    len: self.src.pos() - self.start,
                    limit: MAX_SCAN_BYTES,
                });
            }
            ops += 1;
            if ops > MAX_OPS {
                return Err(FormatError::TooLarge {
                    what: "pickle opcodes",
                    len: ops,
                    limit: MAX_OPS,
                });
            }
            let at = self.src.pos();
            let code = self.src.u8("pickle opcode")?;
            if first_op_of_pickle && code != op::PROTO && pickles > 0 {
                return Err(FormatError::malformed(
                    "legacy torch pickle",
                    format!(
                        "pickle {} does not start with a protocol opcode",
                        pickles + 1
                    ),
                ));
            }
            first_op_of_pickle = false;
            match code {
                op::STOP => {
                    pickles += 1;
                    first_op_of_pickle = true;
                    self.stack.clear();
                    self.memo.clear();
                    self.memo_len = 0;
                    if !self.facts.legacy_magic || pickles >= LEGACY_PICKLES {
                        return Ok(());
                    }
                }
                op::PROTO => {
                    let [p] = self.arg::<1>()?;
                    if p > 5 {
                        return Err(FormatError::malformed(
                            "pickle",
                            format!("protocol {p} at offset {at}"),
                        ));
                    }
                }
                op::FRAME => {
                    self.arg::<8>()?;
                }
                op::MARK => self.push(Val::Mark),
                op::POP => {
                    self.pop();
                }
                op::POP_MARK | op::APPENDS | op::SETITEMS | op::ADDITEMS => {
                    self.pop_mark();
                }
                op::DUP => {
                    let top = self.stack.last().cloned().unwrap_or(Val::Other);
                    self.push(top);
                }
                op::NONE => self.push(Val::None),
                op::NEWTRUE
                | op::NEWFALSE
                | op::EMPTY_DICT
                | op::EMPTY_LIST
                | op::EMPTY_TUPLE
                | op::EMPTY_SET
                | op::NEXT_BUFFER => self.push(Val::Other),
                op::READONLY_BUFFER => {}
                op::BININT1 => {
                    let [b] = self.arg::<1>()?;
                    self.push(Val::Int(b.into()));
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.arg()?);
                    self.push(Val::Int(v.into()));
                }
                op::BININT => {
                    let v = i32::from_le_bytes(self.arg()?);
                    self.push(Val::Int(v.into()));
                }
                op::LONG1 => {
                    let [n] = self.arg::<1>()?;
                    let bytes = self.src.bytes(n.into(), 255, "pickle long")?;
                    if pickles == 0 && bytes.len() == 10 {
                        let mut magic = vec![op::LONG1, 10];
                        magic.extend(&bytes);
                        self.facts.legacy_magic |= magic == LEGACY_MAGIC;
                    }
                    self.push(long1(&bytes).map_or(Val::Other, Val::Int));
                }
                op::LONG4 => {
                    let n = u32::from_le_bytes(self.arg()?);
                    self.src.skip(n.into(), "pickle long")?;
                    self.push(Val::Other);
                }
                op::INT | op::LONG => {
                    let text = self.line()?;
                    let v = text
                        .trim_end_matches('L')
                        .parse::<i64>()
                        .map_or(Val::Other, Val::Int);
                    self.push(v);
                }
                op::FLOAT => {
                    self.line()?;
                    self.push(Val::Other);
                }
                op::BINFLOAT => {
                    self.arg::<8>()?;
                    self.push(Val::Other);
                }
                op::SHORT_BINUNICODE | op::SHORT_BINSTRING => {
                    let [n] = self.arg::<1>()?;
                    let v = self.string(n.into())?;
                    self.push(v);
                }
                op::BINUNICODE | op::BINSTRING => {
                    let n = u32::from_le_bytes(self.arg()?);
                    let v = self.string(n.into())?;
                    self.push(v);
                }
                op::BINUNICODE8 => {
                    let n = u64::from_le_bytes(self.arg()?);
                    let v = self.string(n)?;
                    self.push(v);
                }
                op::STRING | op::UNICODE => {
                    let text = self.line()?;
                    let text = if code == op::STRING {
                        text.trim_matches(|c| c == '\'' || c == '"').to_owned()
                    } else {
                        text
                    };
                    self.push(Val::Str(text));
                }
                op::SHORT_BINBYTES => {
                    let [n] = self.arg::<1>()?;
                    self.src.skip(n.into(), "pickle bytes")?;
                    self.push(Val::Other);
                }
                op::BINBYTES => {
                    let n = u32::from_le_bytes(self.arg()?);
                    self.src.skip(n.into(), "pickle bytes")?;
                    self.push(Val::Other);
                }
                op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = u64::from_le_bytes(self.arg()?);
                    self.src.skip(n, "pickle bytes")?;
                    self.push(Val::Other);
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let v = self.global(&module, &name);
                    self.push(v);
                }
                op::INST => {
                    self.line()?;
                    self.line()?;
                    self.pop_mark();
                    self.push(Val::Other);
                }
                op::STACK_GLOBAL => {
                    let name = self.pop();
                    let module = self.pop();
                    let v = match (module, name) {
                        (Val::Str(m), Val::Str(n)) => self.global(&m, &n),
                        _ => Val::Other,
                    };
                    self.push(v);
                }
                op::PERSID => {
                    self.line()?;
                    self.push(Val::Other);
                }
                op::BINPERSID => {
                    if let Val::StorageId(key, dtype, numel) = self.pop() {
                        self.storage(&key, dtype, numel);
                    }
                    self.push(Val::Other);
                }
                op::TUPLE => {
                    let v = self.pop_mark().map_or(Val::Other, storage_id);
                    self.push(v);
                }
                op::LIST | op::DICT | op::FROZENSET | op::OBJ => {
                    self.pop_mark();
                    self.push(Val::Other);
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    self.pop_n(usize::from(code - op::TUPLE1 + 1));
                    self.push(Val::Other);
                }
                op::REDUCE | op::NEWOBJ => {
                    self.pop_n(2);
                    self.push(Val::Other);
                }
                op::NEWOBJ_EX => {
                    self.pop_n(3);
                    self.push(Val::Other);
                }
                op::APPEND | op::BUILD => {
                    self.pop();
                }
                op::SETITEM => self.pop_n(2),
                op::EXT1 => {
                    self.arg::<1>()?;
                    self.push(Val::Other);
                }
                op::EXT2 => {
                    self.arg::<2>()?;
                    self.push(Val::Other);
                }
                op::EXT4 => {
                    self.arg::<4>()?;
                    self.push(Val::Other);
                }
                op::BINPUT => {
                    let [i] = self.arg::<1>()?;
                    self.memo_put(i.into());
                }
                op::LONG_BINPUT => {
                    let i = u32::from_le_bytes(self.arg()?);
                    self.memo_put(i.into());
                }
                op::PUT => {
                    let i = self
                        .line()?
                        .parse::<u64>()
                        .map_err(|e| FormatError::malformed("pickle memo index", e.to_string()))?;
                    self.memo_put(i);
                }
                op::MEMOIZE => {
                    let i = self.memo_len;
                    self.memo_put(i);
                }
                op::BINGET => {
                    let [i] = self.arg::<1>()?;
                    self.memo_get(i.into());
                }
                op::LONG_BINGET => {
                    let i = u32::from_le_bytes(self.arg()?);
                    self.memo_get(i.into());
                }
                op::GET => {
                    let i = self
                        .line()?
                        .parse::<u64>()
                        .map_err(|e| FormatError::malformed("pickle memo index", e.to_string()))?;
                    self.memo_get(i);
                }
                other => {
                    return Err(FormatError::malformed(
                        "pickle",
                        format!("unknown opcode 0x{other:02x} at offset {at}"),
                    ));
                }
            }
        }
    }
}

/// A `LONG1` argument (little-endian two's complement) as an `i64` when it fits.
fn long1(bytes: &[u8]) -> Option<i64> {
    if bytes.len() > 8 {
        return None;
    }
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let mut buf = if negative { [0xff; 8] } else { [0; 8] };
    buf.get_mut(..bytes.len())?.copy_from_slice(bytes);
    Some(i64::from_le_bytes(buf))
}

/// The storage persistent id `('storage', type, key, location, numel[, view_metadata])` built by
/// a `TUPLE` from `items`, or [`Val::Other`].
fn storage_id(items: Vec<Val>) -> Val {
    if items.len() != 5 && items.len() != 6 {
        return Val::Other;
    }
    let mut it = items.into_iter();
    match (it.next(), it.next(), it.next(), it.next(), it.next()) {
        (
            Some(Val::Str(tag)),
            Some(Val::StorageType(dtype)),
            Some(Val::Str(key)),
            Some(Val::Str(_location)),
            Some(Val::Int(numel)),
        ) if tag == "storage" && numel >= 0 => Val::StorageId(key, dtype, numel.unsigned_abs()),
        _ => Val::Other,
    }
}

/// The dtype of a `torch.<X>Storage` class name, in safetensors spelling.
fn storage_dtype(name: &str) -> String {
    let dtype = match name {
        "DoubleStorage" => "F64",
        "FloatStorage" => "F32",
        "HalfStorage" => "F16",
        "BFloat16Storage" => "BF16",
        "LongStorage" => "I64",
        "IntStorage" => "I32",
        "ShortStorage" => "I16",
        "CharStorage" => "I8",
        "ByteStorage" => "U8",
        "BoolStorage" => "BOOL",
        "UInt16Storage" => "U16",
        "UInt32Storage" => "U32",
        "UInt64Storage" => "U64",
        "ComplexFloatStorage" => "C64",
        "ComplexDoubleStorage" => "C128",
        "Float8_e4m3fnStorage" => "F8_E4M3",
        "Float8_e5m2Storage" => "F8_E5M2",
        "QInt8Storage" => "QI8",
        "QUInt8Storage" => "QU8",
        "QInt32Storage" => "QI32",
        other => return other.trim_end_matches("Storage").to_owned(),
    };
    dtype.to_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::testutil::{assert_prefixes_fail_cleanly, sniff_bytes, write_temp};
    use super::super::{Format, parse_path};
    use super::*;

    /// A legacy `torch.save` file as Python's pickle writes it (stand-in torch classes): an
    /// `OrderedDict` with a parameter `fc.weight` (F32 storage of 12 elements), `fc.bias` (F16
    /// storage of 5) and a view `fc.weight_view` of the first storage; protocol 2 throughout,
    /// then the storage key list and the raw storage bytes.
    pub(crate) const LEGACY_PROTO2: &[u8] = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.\x80\x02}q\x00(X\x10\x00\x00\x00protocol_versionq\x01M\xe9\x03X\x0d\x00\x00\x00little_endianq\x02\x88X\x0a\x00\x00\x00type_sizesq\x03}q\x04(X\x05\x00\x00\x00shortq\x05K\x02X\x03\x00\x00\x00intq\x06K\x04X\x04\x00\x00\x00longq\x07K\x04uu.\x80\x02ccollections\x0aOrderedDict\x0aq\x00)Rq\x01(X\x09\x00\x00\x00fc.weightq\x02ctorch._utils\x0a_rebuild_parameter\x0aq\x03ctorch._utils\x0a_rebuild_tensor_v2\x0aq\x04((X\x07\x00\x00\x00storageq\x05ctorch\x0aFloatStorage\x0aq\x06X\x05\x00\x00\x0094001q\x07X\x03\x00\x00\x00cpuq\x08K\x0cNtq\x09QK\x00K\x03K\x04\x86q\x0aK\x01K\x01\x86q\x0b\x89h\x00)Rq\x0ctq\x0dRq\x0e\x88h\x00)Rq\x0f\x87q\x10Rq\x11X\x07\x00\x00\x00fc.biasq\x12h\x04((h\x05ctorch\x0aHalfStorage\x0aq\x13X\x05\x00\x00\x0094002q\x14h\x08K\x05Ntq\x15QK\x00K\x05\x85q\x16K\x01\x85q\x17\x89h\x00)Rq\x18tq\x19Rq\x1aX\x0e\x00\x00\x00fc.weight_viewq\x1bh\x04((h\x05h\x06h\x07h\x08K\x0cNtq\x1cQK\x00K\x0c\x85q\x1dK\x01\x85q\x1e\x89h\x00)Rq\x1ftq Rq!u.\x80\x02]q\x00(X\x05\x00\x00\x0094001q\x01X\x05\x00\x00\x0094002q\x02e.\x0c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

    /// The same file with the object pickled at protocol 4 (`STACK_GLOBAL`, `MEMOIZE`, `FRAME`).
    const LEGACY_PROTO4: &[u8] = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.\x80\x02}q\x00(X\x10\x00\x00\x00protocol_versionq\x01M\xe9\x03X\x0d\x00\x00\x00little_endianq\x02\x88X\x0a\x00\x00\x00type_sizesq\x03}q\x04(X\x05\x00\x00\x00shortq\x05K\x02X\x03\x00\x00\x00intq\x06K\x04X\x04\x00\x00\x00longq\x07K\x04uu.\x80\x04\x95G\x01\x00\x00\x00\x00\x00\x00\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94(\x8c\x09fc.weight\x94\x8c\x0ctorch._utils\x94\x8c\x12_rebuild_parameter\x94\x93\x94h\x05\x8c\x12_rebuild_tensor_v2\x94\x93\x94((\x8c\x07storage\x94\x8c\x05torch\x94\x8c\x0cFloatStorage\x94\x93\x94\x8c\x0594001\x94\x8c\x03cpu\x94K\x0cNt\x94QK\x00K\x03K\x04\x86\x94K\x01K\x01\x86\x94\x89h\x02)R\x94t\x94R\x94\x88h\x02)R\x94\x87\x94R\x94\x8c\x07fc.bias\x94h\x09((h\x0ah\x0b\x8c\x0bHalfStorage\x94\x93\x94\x8c\x0594002\x94h\x0fK\x05Nt\x94QK\x00K\x05\x85\x94K\x01\x85\x94\x89h\x02)R\x94t\x94R\x94\x8c\x0efc.weight_view\x94h\x09((h\x0ah\x0dh\x0eh\x0fK\x0cNt\x94QK\x00K\x0c\x85\x94K\x01\x85\x94\x89h\x02)R\x94t\x94R\x94u.\x80\x02]q\x00(X\x05\x00\x00\x0094001q\x01X\x05\x00\x00\x0094002q\x02e.\x0c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

    /// The object pickle alone as `torch.save` writes `data.pkl` in a zip archive (5-tuple ids).
    pub(crate) const ZIP_DATA_PKL: &[u8] = b"\x80\x02ccollections\x0aOrderedDict\x0aq\x00)Rq\x01(X\x09\x00\x00\x00fc.weightq\x02ctorch._utils\x0a_rebuild_parameter\x0aq\x03ctorch._utils\x0a_rebuild_tensor_v2\x0aq\x04((X\x07\x00\x00\x00storageq\x05ctorch\x0aFloatStorage\x0aq\x06X\x05\x00\x00\x0094001q\x07X\x03\x00\x00\x00cpuq\x08K\x0ctq\x09QK\x00K\x03K\x04\x86q\x0aK\x01K\x01\x86q\x0b\x89h\x00)Rq\x0ctq\x0dRq\x0e\x88h\x00)Rq\x0f\x87q\x10Rq\x11X\x07\x00\x00\x00fc.biasq\x12h\x04((h\x05ctorch\x0aHalfStorage\x0aq\x13X\x05\x00\x00\x0094002q\x14h\x08K\x05tq\x15QK\x00K\x05\x85q\x16K\x01\x85q\x17\x89h\x00)Rq\x18tq\x19Rq\x1aX\x0e\x00\x00\x00fc.weight_viewq\x1bh\x04((h\x05h\x06h\x07h\x08K\x0ctq\x1cQK\x00K\x0c\x85q\x1dK\x01\x85q\x1e\x89h\x00)Rq\x1ftq Rq!u.";

    fn expect_sample(bytes: &[u8]) {
        let parsed = sniff_bytes(bytes).expect("parse").expect("recognised");
        assert_eq!(parsed.format, Format::Pickle);
        let h = parsed.header;
        assert_eq!(h.tensor_count, 3, "three tensors rebuilt");
        assert_eq!(h.parameter_count, Some(12 + 5), "two distinct storages");
        assert_eq!(h.dtypes, ["F16", "F32"]);
    }

    #[test]
    fn a_legacy_torch_save_file_reports_tensors_storages_and_dtypes() {
        expect_sample(LEGACY_PROTO2);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_temp(&dir, "pytorch_model.bin", LEGACY_PROTO2);
        assert_eq!(
            parse_path(&path)
                .expect("parse")
                .expect("recognised")
                .format,
            Format::Pickle
        );
    }

    #[test]
    fn a_legacy_file_whose_object_uses_protocol_4_reports_the_same() {
        expect_sample(LEGACY_PROTO4);
    }

    #[test]
    fn a_bare_pickled_state_dict_is_recognised_by_its_torch_globals() {
        expect_sample(ZIP_DATA_PKL);
    }

    #[test]
    fn the_legacy_magic_without_the_following_pickles_is_truncation() {
        let bytes = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.";
        let err = sniff_bytes(bytes).expect_err("magic only");
        assert!(matches!(err, FormatError::Truncated { .. }), "{err}");
        let mut raw_after_magic = bytes.to_vec();
        raw_after_magic.extend(b"raw bytes, not a pickle");
        let err = sniff_bytes(&raw_after_magic).expect_err("not a pickle after the magic");
        assert!(matches!(err, FormatError::Malformed { .. }), "{err}");
    }

    #[test]
    fn a_pickle_without_torch_is_not_a_weight_file() {
        let plain = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01]q\x02(K\x01K\x02K\x03es.";
        assert!(sniff_bytes(plain).expect("not an error").is_none());
    }

    #[test]
    fn every_truncation_of_a_legacy_file_is_an_error_or_not_recognised() {
        // The raw storage bytes after the five pickles are not read, so only cuts inside the
        // pickles are errors.
        let pickles_end = LEGACY_PROTO2.len() - (8 + 48 + 8 + 10);
        assert_prefixes_fail_cleanly(LEGACY_PROTO2.get(..pickles_end).expect("pickles"));
        assert_prefixes_fail_cleanly(ZIP_DATA_PKL);
    }

    #[test]
    fn hostile_lengths_and_opcodes_are_errors() {
        let mut huge = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n".to_vec();
        huge.push(0x8e); // BINBYTES8
        huge.extend((1u64 << 62).to_le_bytes());
        let err = sniff_bytes(&huge).expect_err("huge bytes");
        assert!(matches!(err, FormatError::Truncated { .. }), "{err}");

        let mut long_line = b"\x80\x02ctorch._utils\n".to_vec();
        long_line.extend(std::iter::repeat_n(b'a', 5000));
        let err = sniff_bytes(&long_line).expect_err("long line");
        assert!(matches!(err, FormatError::TooLarge { .. }), "{err}");

        let bad = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n\xff.";
        let err = sniff_bytes(bad).expect_err("bad opcode");
        assert!(matches!(err, FormatError::Malformed { .. }), "{err}");
    }

    #[test]
    fn long1_decodes_little_endian_twos_complement() {
        assert_eq!(long1(&[]), Some(0));
        assert_eq!(long1(&[0xff]), Some(-1));
        assert_eq!(long1(&[0x00, 0x01]), Some(256));
        assert_eq!(long1(&[0; 9]), None);
    }
}
