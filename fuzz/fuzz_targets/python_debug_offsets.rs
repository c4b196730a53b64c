//! `Offsets::from_debug_offsets`: CPython 3.13's `_Py_DebugOffsets`, read from the start of the target's
//! `_PyRuntime`. Offsets it accepts are used to read the target's memory, so they must stay in bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer::python::offsets::Offsets;

fuzz_target!(|data: &[u8]| {
    // Most of the structure is refused at the cookie and the version: give those the right bytes at will, so
    // that the fuzzer spends its time on the offsets themselves.
    let mut debug = data.to_vec();
    if debug.first().is_some_and(|&b| b & 1 == 1) && debug.len() >= 16 {
        debug[..8].copy_from_slice(b"xdebugpy");
        debug[8..16].copy_from_slice(&0x030d_00f0_u64.to_le_bytes());
    }
    if let Ok(offsets) = Offsets::from_debug_offsets(&debug) {
        let _ = tracer::python::runtime::Interpreter::for_fuzzing(13, offsets, 0).bpf_config();
    }
});
