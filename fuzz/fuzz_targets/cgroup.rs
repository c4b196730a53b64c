//! `/proc/PID/cgroup` lines (`cgroup_path`) and the container a cgroup path names (`from_cgroup_path`): a
//! process in a container can create and enter cgroups of its own, whose names it chooses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer::procs::container;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(path)) = container::cgroup_path(data) {
        let _ = container::from_cgroup_path(&path);
    }
    if let Ok(path) = std::str::from_utf8(data) {
        let _ = container::from_cgroup_path(path);
    }
});
