#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tiervec_shared::fuzzing::log_round_trip(data));
