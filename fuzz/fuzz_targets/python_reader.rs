//! `runtime::Reader::frame`: a code object and the `str` and `bytes` objects it points to, read out of a
//! target's memory with `process_vm_readv`. Here the "target" is this process: the input is laid out in a
//! buffer of its own, as a code object followed by whatever objects the fuzzer makes, and the code object's
//! pointer fields are made to point into that buffer. Every length the objects give is bounded by the reader
//! (4 KiB names, 1 MiB line tables), so its reads stay inside the buffer, and runs are deterministic.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use tracer::python::{
    offsets::Offsets,
    runtime::{Interpreter, MAX_READ, Reader},
};
use tracer_common::PyFrame;

/// Where the input goes; room past it for the longest read the reader makes.
const INPUT_BYTES: usize = 64 << 10;
const ARENA_WORDS: usize = (INPUT_BYTES + 2 * MAX_READ) / 8;

thread_local! {
    static ARENA: RefCell<Vec<u64>> = RefCell::new(vec![0; ARENA_WORDS]);
}

fn offsets(minor: u8) -> Offsets {
    Offsets::for_version(3, minor).unwrap_or_else(|| {
        Offsets::from_debug_offsets(include_bytes!(
            "../../tracer/test_data/python/offsets-debug-3.13.bin"
        ))
        .expect("the 3.13 fixture parses")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&[version, i0, i1, i2, i3], image)) = data.split_first_chunk::<5>() else {
        return;
    };
    if image.len() > INPUT_BYTES {
        return;
    }
    let minor = 8 + version % 6;
    let o = offsets(minor);
    ARENA.with_borrow_mut(|arena| {
        arena[..INPUT_BYTES / 8].fill(0);
        // SAFETY: the arena's own words viewed as bytes, within their length.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(arena.as_mut_ptr().cast::<u8>(), arena.len() * 8)
        };
        bytes[..image.len()].copy_from_slice(image);
        let base = bytes.as_ptr() as u64;
        let span = image.len().max(1) as u64;
        // The pointer fields hold offsets into the image: make them addresses.
        let pointers = [
            Some(o.code_filename),
            Some(o.code_name),
            o.code_qualname,
            Some(o.code_linetable),
        ];
        for field in pointers.into_iter().flatten() {
            let at = field as usize;
            let relative = u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap());
            bytes[at..at + 8].copy_from_slice(&(base + relative % span).to_ne_bytes());
        }
        // The type check passes unless the version byte's top bit asks for a wrong type.
        let ob_type = u64::from_ne_bytes(bytes[8..16].try_into().unwrap());
        let code_type = if version & 0x80 == 0 {
            ob_type
        } else {
            !ob_type
        };
        let mut reader = Reader::new(
            std::process::id(),
            Interpreter::for_fuzzing(minor, o, code_type),
        );
        let position = u64::from(u32::from_le_bytes([i0, i1, i2, i3]));
        let instr = match o.code_code_adaptive {
            // 3.11+: a pointer into the code object's bytecode, or anywhere near it.
            Some(start) => (base + start).wrapping_add(position).wrapping_sub(1 << 16),
            // 3.8-3.10: f_lasti, with its -1.
            None => position.wrapping_sub(1),
        };
        let recorded = PyFrame {
            code: base,
            instr,
            globals: 0,
        };
        let first = reader.frame(&recorded);
        // Read again from the cache: the same frame.
        assert_eq!(first, reader.frame(&recorded));
        let _ = (
            reader.truncated_names(),
            reader.truncated_line_tables(),
            reader.unreadable_frames(),
        );
    });
});
