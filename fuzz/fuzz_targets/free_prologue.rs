//! `free_probe_offset`: the first bytes of an allocator's `free`, read from a library the target may have
//! built itself; the offset it returns is where a uprobe goes, so it must land on an instruction boundary.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer::procs::prologue::{WINDOW, free_probe_offset};

fuzz_target!(|data: &[u8]| {
    let code = &data[..data.len().min(WINDOW)];
    let offset = free_probe_offset(code);
    assert!(
        offset < code.len().max(1) as u64,
        "offset {offset} past {} bytes",
        code.len()
    );
});
