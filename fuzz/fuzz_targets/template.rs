#![no_main]
//! See `tollgate::fuzz_entry::template`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate::fuzz_entry::template(data));
