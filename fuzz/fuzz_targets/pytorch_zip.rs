//! Fuzzes the PyTorch zip / TorchScript parser directly (no sniffing in front) and through the format dispatch.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use sov_agent::collect::weights::formats::{self, pytorch};

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let _ = pytorch::parse(&mut Cursor::new(data), len);
    let _ = formats::sniff_and_parse(&mut Cursor::new(data), len);
    // A length the stream does not have, as when a file shrinks under the reader.
    let _ = formats::sniff_and_parse(&mut Cursor::new(data), len.saturating_mul(2) + 1);
});
