//! `lines::line_at`: the three CPython line-table formats (`co_lnotab` for 3.8/3.9, 3.10's `co_linetable`,
//! 3.11+'s location table), read from the target's memory. The first offsets, each side of the table's end, and
//! the largest are asked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer::python::lines::{Format, line_at};

fuzz_target!(|data: &[u8]| {
    let Some((&[format, l0, l1, l2, l3], table)) = data.split_first_chunk::<5>() else {
        return;
    };
    let format = match format % 3 {
        0 => Format::Lnotab,
        1 => Format::Linetable310,
        _ => Format::Locations,
    };
    let first_line = u32::from_le_bytes([l0, l1, l2, l3]);
    // The decoders are linear in the table: asking every offset of a long table would make each run quadratic.
    let len = u32::try_from(table.len()).unwrap_or(u32::MAX);
    let far = [
        len,
        len.saturating_mul(16),
        len.saturating_mul(128),
        u32::MAX - 1,
        u32::MAX,
    ];
    for offset in (0..256).chain(far) {
        let _ = line_at(format, first_line, table, offset);
    }
});
