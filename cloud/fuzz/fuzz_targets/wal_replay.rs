#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tiervec_cloud::fuzzing::wal_replay(data));
