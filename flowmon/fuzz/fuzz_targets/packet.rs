//! Fuzz target: `flowmon::fuzz::packet`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flowmon::fuzz::packet(data));
