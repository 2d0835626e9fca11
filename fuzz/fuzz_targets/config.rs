#![no_main]
//! See `tollgate::fuzz_entry::config`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate::fuzz_entry::config(data));
