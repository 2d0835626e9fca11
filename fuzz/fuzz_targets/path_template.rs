#![no_main]
//! See `tollgate::fuzz_entry::path_template`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate::fuzz_entry::path_template(data));
