//! Fuzz target: `flowmon::fuzz::filter`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flowmon::fuzz::filter(data));
