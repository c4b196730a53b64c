//! `Maps::from_reader`: `/proc/PID/maps`, whose path column a process chooses (it names the files it maps).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer::procs::maps::Maps;

fuzz_target!(|data: &[u8]| {
    let Ok(maps) = Maps::from_reader(data) else {
        return;
    };
    for mapping in &maps.mappings {
        for addr in [mapping.start, mapping.end, mapping.start.wrapping_add(1)] {
            let _ = maps.find(addr);
        }
        let _ = mapping.map_file_path(1);
    }
    let _ = maps.files();
});
