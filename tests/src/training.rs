//! Training-run fixtures: real files in real formats and a real trainer process.
//!
//! - [`parquet`]: a Parquet file written by hand (Thrift compact footer), one INT64 column;
//! - [`Trainer`]: a python3 process that maps a base weight file, reads a dataset file and
//!   writes safetensors checkpoints, as a fine-tuning job does.

use std::io::{BufRead, BufReader, Lines};
use std::path::Path;
use std::process::{ChildStdout, Command, Stdio};

use crate::KillOnDrop;

/// Thrift compact protocol, as much as a Parquet footer needs.
#[derive(Default)]
struct Thrift {
    buf: Vec<u8>,
    last: Vec<i16>,
}

impl Thrift {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }
    fn zigzag(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }
    fn field(&mut self, id: i16, ty: u8) {
        let Some(last) = self.last.last_mut() else {
            panic!("a field outside a struct");
        };
        let delta = id - *last;
        assert!((1..=15).contains(&delta));
        self.buf.push(((delta as u8) << 4) | ty);
        *last = id;
    }
    fn i32(&mut self, id: i16, v: i32) {
        self.field(id, 5);
        self.zigzag(i64::from(v));
    }
    fn i64(&mut self, id: i16, v: i64) {
        self.field(id, 6);
        self.zigzag(v);
    }
    fn string(&mut self, id: i16, s: &str) {
        self.field(id, 8);
        self.varint(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }
    fn begin(&mut self) {
        self.last.push(0);
    }
    fn end(&mut self) {
        self.buf.push(0);
        self.last.pop();
    }
    fn struct_field(&mut self, id: i16) {
        self.field(id, 12);
        self.begin();
    }
    fn list(&mut self, id: i16, elem: u8, n: usize) {
        self.field(id, 9);
        assert!(n < 15);
        self.buf.push(((n as u8) << 4) | elem);
    }
}

/// A real Parquet file: one required INT64 column `x` holding 0..rows, one row group, one
/// PLAIN, uncompressed data page.
pub fn parquet(rows: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..rows as i64).flat_map(i64::to_le_bytes).collect();
    let mut page = Thrift::default();
    page.begin();
    page.i32(1, 0); // DATA_PAGE
    page.i32(2, data.len() as i32);
    page.i32(3, data.len() as i32);
    page.struct_field(5); // DataPageHeader
    page.i32(1, rows as i32);
    page.i32(2, 0); // PLAIN
    page.i32(3, 3); // RLE
    page.i32(4, 3);
    page.end();
    page.end();
    let chunk_len = (page.buf.len() + data.len()) as i64;

    let mut m = Thrift::default();
    m.begin();
    m.i32(1, 1);
    m.list(2, 12, 2);
    m.begin();
    m.string(4, "schema");
    m.i32(5, 1);
    m.end();
    m.begin();
    m.i32(1, 2); // INT64
    m.i32(3, 0); // REQUIRED
    m.string(4, "x");
    m.end();
    m.i64(3, rows as i64);
    m.list(4, 12, 1);
    m.begin(); // RowGroup
    m.list(1, 12, 1);
    m.begin(); // ColumnChunk
    m.i64(2, 4);
    m.struct_field(3); // ColumnMetaData
    m.i32(1, 2);
    m.list(2, 5, 1);
    m.zigzag(0);
    m.list(3, 8, 1);
    m.varint(1);
    m.buf.push(b'x');
    m.i32(4, 0); // UNCOMPRESSED
    m.i64(5, rows as i64);
    m.i64(6, chunk_len);
    m.i64(7, chunk_len);
    m.i64(9, 4);
    m.end();
    m.end();
    m.i64(2, chunk_len);
    m.i64(3, rows as i64);
    m.end();
    m.end();

    let mut out = b"PAR1".to_vec();
    out.extend_from_slice(&page.buf);
    out.extend_from_slice(&data);
    out.extend_from_slice(&m.buf);
    out.extend_from_slice(&(m.buf.len() as u32).to_le_bytes());
    out.extend_from_slice(b"PAR1");
    out
}

/// The trainer: maps the base (and touches every page of it once), reads the whole dataset
/// file, prints `ready`, then writes `checkpoint-N.safetensors` into `out`, `count` times (0:
/// forever), one every `period` seconds: a valid safetensors file of `n` F32 values whose bytes
/// are written (no hole), in pieces spread over at least `spread` seconds (a real checkpoint
/// write takes time; the agent samples open descriptors). Before each checkpoint it reads the
/// dataset again (an epoch). After each it prints `wrote N SECONDS`; after the last, `done`,
/// and it keeps everything open until killed.
const TRAINER: &str = r#"
import json, mmap, os, struct, sys, time
base, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
n, count, period, spread = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7])
f = open(base, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
sum(m[i] for i in range(0, len(m), 4096))
d = open(data, 'rb')
def epoch():
    d.seek(0)
    while d.read(1 << 20):
        pass
epoch()
print('ready', flush=True)
header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
header += b' ' * (-len(header) % 8)
piece = 8 << 20
pieces = max(8, (4 * n + piece - 1) // piece)
i = 0
while count == 0 or i < count:
    i += 1
    t0 = time.monotonic()
    epoch()
    with open(os.path.join(out, 'checkpoint-%d.safetensors' % i), 'wb') as c:
        c.write(struct.pack('<Q', len(header)) + header)
        left = 4 * n
        for k in range(pieces):
            size = left // (pieces - k)
            c.write(bytes([i % 256]) * size)
            left -= size
            c.flush()
            if spread > 0:
                time.sleep(spread / pieces)
    print('wrote %d %.3f' % (i, time.monotonic() - t0), flush=True)
    if count == 0 or i < count:
        time.sleep(max(0.0, t0 + period - time.monotonic()))
print('done', flush=True)
time.sleep(86400)
"#;

/// What a [`Trainer`] does.
#[derive(Debug, Clone, Copy)]
pub struct TrainerPlan {
    /// F32 values per checkpoint (4 bytes each, plus a header of under 100 bytes).
    pub values: u64,
    /// Checkpoints to write; 0: forever.
    pub count: u32,
    /// Seconds from one checkpoint's start to the next.
    pub period_secs: f64,
    /// Each checkpoint's writes are spread over at least this many seconds.
    pub spread_secs: f64,
}

/// A running trainer process (killed when dropped) and its output lines.
#[derive(Debug)]
pub struct Trainer {
    /// The process.
    pub process: KillOnDrop,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Trainer {
    /// Start a trainer on `base` and `dataset`, writing into `out`; returns once it has mapped
    /// the base and read the dataset.
    pub fn start(base: &Path, dataset: &Path, out: &Path, plan: TrainerPlan) -> Trainer {
        std::fs::create_dir_all(out).expect("checkpoint directory");
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(TRAINER)
            .arg(base)
            .arg(dataset)
            .arg(out)
            .arg(plan.values.to_string())
            .arg(plan.count.to_string())
            .arg(plan.period_secs.to_string())
            .arg(plan.spread_secs.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdout = child.stdout.take().expect("stdout");
        let mut t = Trainer {
            process: KillOnDrop(child),
            lines: BufReader::new(stdout).lines(),
        };
        assert_eq!(t.next_line().as_deref(), Some("ready"));
        t
    }

    /// The next line the trainer prints (`wrote N SECONDS`, `done`); `None` once it exited.
    pub fn next_line(&mut self) -> Option<String> {
        self.lines.next()?.ok()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }
}
