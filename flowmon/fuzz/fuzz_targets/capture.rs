//! Fuzz target: `flowmon::fuzz::capture`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flowmon::fuzz::capture(data));
