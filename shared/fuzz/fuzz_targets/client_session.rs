#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tiervec_shared::fuzzing::client_session(data));
