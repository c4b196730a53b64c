//! `Event::try_from`: ring-buffer records. The eBPF side writes them, but their content (sizes, stacks, Python
//! frames, depths) comes from the traced process, and a record may be shorter than its kind's layout.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer::decode::Event;

fuzz_target!(|data: &[u8]| {
    let _ = Event::try_from(data);
});
