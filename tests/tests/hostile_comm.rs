//! Names a process chooses are data: a comm and a command line that are not UTF-8 are reported, converted
//! lossily, beside an exact block; a `--comm` name the kernel cuts inside a UTF-8 character still matches.

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::ffi::OsStrExt as _,
    process::{Command, Stdio},
};

use alloctrace_tests::{
    assert_sites_exact, assert_tracer_rss_bounded, json_report, live,
    ready::alloctrace_with_ready_fd, require_root, site, workload,
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
    let (mut command, mut ready) = alloctrace_with_ready_fd();
    let tracer = command
        .args(["leaks", "--format", "json", "--pid"])
        .arg(pid.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Allocate only once the tracer says its probes are in place.
    let said = ready.wait_ready();
    assert_eq!(said["pids"], serde_json::json!([pid]), "{said}");
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

/// The kernel keeps a process name's first 15 bytes: a `--comm` given in full, whose 15th byte is the first of
/// "é", matches the process whose kernel name ends in half a character (no longer UTF-8).
#[test]
fn a_comm_cut_inside_a_character_is_found_by_its_full_name() {
    require_root();
    // 14 bytes of its own (other tests run at the same time), then "é" across bytes 15 and 16.
    let name = format!("mb-{:011}\u{e9}-multibyte", std::process::id());
    assert_eq!(&name.as_bytes()[14..16], "\u{e9}".as_bytes());
    let sites = workload("sites").with_file_name(&name);
    std::fs::copy(workload("sites"), &sites).unwrap();
    let (mut command, mut ready) = alloctrace_with_ready_fd();
    let tracer = command
        .args([
            "leaks",
            "--format",
            "json",
            "--top",
            "100",
            "--duration",
            "10s",
            "--comm",
            &name,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ready.wait_ready();
    // Started after the tracer, found by name only; it allocates once the tracer has attached to it.
    let mut target = Command::new(&sites)
        .arg("--wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = target.id();
    // The kernel holds it at its exec until userspace has attached: a name userspace does not recognise
    // leaves it stopped until the trace ends, and it is never attached.
    ready.wait_attached(&[pid]);
    let mut target_out = BufReader::new(target.stdout.take().unwrap());
    let mut line = String::new();
    target_out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let mut comm = name.as_bytes()[..15].to_vec();
    comm.push(b'\n');
    assert_eq!(
        std::fs::read(format!("/proc/{pid}/comm")).unwrap(),
        comm,
        "the kernel cut the name inside \"\u{e9}\""
    );
    writeln!(target.stdin.as_mut().unwrap()).unwrap();
    target.wait().unwrap();
    let out = tracer.wait_with_output().unwrap();
    std::fs::remove_file(&sites).unwrap();
    let report = json_report(&out);
    assert_eq!(
        report["processes"][0]["comm"],
        format!("{}\u{fffd}", &name[..14]),
        "{:#}",
        report["processes"]
    );
    assert_sites_exact(&report, pid.into());
}
