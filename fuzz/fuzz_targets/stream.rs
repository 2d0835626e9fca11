#![no_main]
//! See `tollgate::fuzz_entry::stream`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate::fuzz_entry::stream(data));
