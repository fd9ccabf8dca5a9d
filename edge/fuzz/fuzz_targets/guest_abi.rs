#![no_main]

libfuzzer_sys::fuzz_target!(
    init: {
        let guest = std::env::var_os("TIERVEC_FUZZ_GUEST")
            .expect("TIERVEC_FUZZ_GUEST names the guest module (tiervec_wasm.wasm)");
        tiervec_edge::fuzzing::use_guest_module(guest.into());
    },
    |data: &[u8]| tiervec_edge::fuzzing::guest_abi(data)
);
