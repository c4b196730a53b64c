//! Names a process chooses are data: a comm and a command line that are not UTF-8 are reported, converted
//! lossily, beside an exact block.

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::ffi::OsStrExt as _,
    process::{Command, Stdio},
};

use alloctrace_tests::{
    alloctrace, assert_tracer_rss_bounded, json_report, live, require_root, site, workload,
};

#[test]
fn a_comm_and_argv_that_are_not_utf8_are_reported_lossily() {
    require_root();
    let program = workload("hostile_comm");
    let mut target = Command::new(&program)
        .arg(OsStr::from_bytes(b"\xc3\x28-argument"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut target_out = BufReader::new(target.stdout.take().unwrap());
    let mut line = String::new();
    target_out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let pid = target.id();
    assert_eq!(
        std::fs::read(format!("/proc/{pid}/comm")).unwrap(),
        b"\xff\xfe\n",
        "the workload renamed itself"
    );
    let mut tracer = Command::new(alloctrace())
        .args(["leaks", "--format", "json", "--pid"])
        .arg(pid.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Allocate only once the tracer says its probes are in place.
    let mut tracer_err = BufReader::new(tracer.stderr.take().unwrap());
    let mut notice = String::new();
    tracer_err.read_line(&mut notice).unwrap();
    assert!(
        notice.starts_with(&format!("alloctrace: tracing pid {pid} ")),
        "{notice}"
    );
    writeln!(target.stdin.as_mut().unwrap()).unwrap();
    // It exits once it holds its block, and the trace ends with its only target.
    target.wait().unwrap();
    let out = tracer.wait_with_output().unwrap();
    let report = json_report(&out);
    let process = &report["processes"][0];
    assert_eq!(process["pid"], pid, "{process:#}");
    assert_eq!(process["comm"], "\u{fffd}\u{fffd}", "{process:#}");
    assert_eq!(
        process["cmdline"],
        serde_json::json!([program.to_str().unwrap(), "\u{fffd}(-argument"]),
        "{process:#}"
    );
    let block = site(&report, "malloc", "hostile_block");
    assert_eq!(live(block), (123_457, 1), "{block:#}");
    assert_eq!(block["pid"], pid, "{block:#}");
    assert_eq!(report["complete"], true, "{report:#}");
    assert_tracer_rss_bounded(&report, "a comm and argv that are not UTF-8");
}
