//! Airflow task identity from `/proc/PID/cmdline` (NUL-separated arguments, which a process can rewrite: its
//! title) and `/proc/PID/environ`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer::procs::airflow;

fuzz_target!(|data: &[u8]| {
    // As the registry reads a command line: NUL-separated, each argument lossily UTF-8.
    let cmdline: Vec<String> = data
        .split(|&b| b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    let _ = airflow::from_cmdline(&cmdline);
    let _ = airflow::from_environ(data);
});
