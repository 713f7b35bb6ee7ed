//! Fuzzes `sov_e2e::hostile::report` (the same call `tests/tests/hostile_input.rs` makes on the
//! stable toolchain).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sov_e2e::hostile::report(data);
});
