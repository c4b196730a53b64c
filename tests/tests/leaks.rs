//! `alloctrace leaks` on real processes, with real probes: a C program whose allocations are known to the
//! byte, traced from its start and by pid; a target that exits mid-trace; errors; the JSON contract; and the
//! bundled Python demo.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
};

use alloctrace_tests::{
    alloctrace, assert_sites_exact, json_report, live, optimized_workload,
    ready::alloctrace_with_ready_fd, require_root, site, workload, workspace,
};

#[test]
fn spawned_command_is_reported_to_the_byte() {
    require_root();
    let sites = workload("sites");
    let out = Command::new(alloctrace())
        .args(["leaks", "--format", "json", "--top", "100", "--"])
        .arg(&sites)
        .output()
        .unwrap();
    let report = json_report(&out);
    let pid = report["processes"][0]["pid"].as_u64().unwrap();
    assert_sites_exact(&report, pid);
    assert_eq!(
        report["processes"][0]["exit"],
        serde_json::json!({"code": 0})
    );
}

/// What alloctrace says on stderr besides its report: by default the one line that says what it traces, worded
/// as it always was; nothing with `-q` or `RUST_LOG=off`; that line and the probes it attached with `-v`, and
/// only what `RUST_LOG` asks for when it is set. The report is the same each time.
#[test]
fn stderr_says_what_it_traces_and_q_v_and_rust_log_choose_how_much() {
    require_root();
    let sites = workload("sites");
    let run = |flags: &[&str], rust_log: Option<&str>| {
        let mut command = Command::new(alloctrace());
        command
            .arg("leaks")
            .args(flags)
            .args(["--format", "json", "--top", "100", "--"])
            .arg(&sites)
            .env_remove("RUST_LOG");
        if let Some(spec) = rust_log {
            command.env("RUST_LOG", spec);
        }
        let out = command.output().unwrap();
        let report = json_report(&out);
        let pid = report["processes"][0]["pid"].as_u64().unwrap();
        assert_sites_exact(&report, pid);
        let said = String::from_utf8(out.stderr).unwrap();
        (said, format!("alloctrace: tracing pid {pid} through "))
    };
    let (said, tracing) = run(&[], None);
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.starts_with(&tracing), "{said}");
    for (flags, rust_log) in [(&["-q"][..], None), (&[][..], Some("off"))] {
        let (said, _) = run(flags, rust_log);
        assert_eq!(said, "", "{flags:?} RUST_LOG={rust_log:?}");
    }
    let (said, tracing) = run(&["-v"], None);
    assert!(said.lines().any(|l| l.starts_with(&tracing)), "{said}");
    let attached = |l: &str| {
        l.starts_with("alloctrace: debug tracer::probes: pid ")
            && l.contains(": malloc_enter on malloc at ")
    };
    assert!(said.lines().any(attached), "{said}");
    let (said, _) = run(&[], Some("tracer::probes=debug"));
    assert!(said.lines().any(attached), "{said}");
    assert!(
        said.lines()
            .all(|l| l.starts_with("alloctrace: debug tracer::probes: ")),
        "{said}"
    );
}

/// Starts the `sites` workload waiting on stdin, attaches by pid, then lets it allocate.
fn traced_by_pid(extra: &[&str], linger: bool) -> (serde_json::Value, std::process::Child) {
    require_root();
    let mut args = vec!["--wait"];
    if linger {
        args.push("--linger");
    }
    let mut target = Command::new(workload("sites"))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut target_out = BufReader::new(target.stdout.take().unwrap());
    let mut line = String::new();
    target_out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let (mut command, mut ready) = alloctrace_with_ready_fd();
    let tracer = command
        .args(["leaks", "--format", "json", "--top", "100", "--pid"])
        .arg(target.id().to_string())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Allocate only once the tracer says its probes are in place.
    ready.wait_ready();
    writeln!(target.stdin.as_mut().unwrap()).unwrap();
    if linger {
        line.clear();
        target_out.read_line(&mut line).unwrap();
        assert_eq!(line, "allocated\n");
    }
    let out = tracer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "alloctrace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (json_report(&out), target)
}

#[test]
fn target_that_exits_mid_trace_is_reported_to_the_byte() {
    let (report, mut target) = traced_by_pid(&[], false);
    target.wait().unwrap();
    assert_sites_exact(&report, target.id().into());
    assert_eq!(report["processes"][0]["exit"], "exited");
}

#[test]
fn running_target_is_reported_when_the_duration_ends() {
    let (report, mut target) = traced_by_pid(&["--duration", "2s"], true);
    assert_sites_exact(&report, target.id().into());
    assert!(report["processes"][0]["exit"].is_null(), "{report:#}");
    // The kernel keeps 15 bytes of a process name.
    let comm: String = workload("sites")
        .file_name()
        .unwrap()
        .to_string_lossy()
        .chars()
        .take(15)
        .collect();
    assert_eq!(report["processes"][0]["comm"], comm);
    drop(target.stdin.take());
    target.wait().unwrap();
}

#[test]
fn json_report_keeps_its_contract() {
    require_root();
    let sites = workload("sites");
    let out = Command::new(alloctrace())
        .args(["leaks", "--format", "json", "--"])
        .arg(&sites)
        .output()
        .unwrap();
    let report = json_report(&out);
    assert_eq!(report["schema"], 1);
    assert_eq!(report["command"], "leaks");
    assert!(report["duration_s"].as_f64().unwrap() > 0.0);
    for counter in ["events", "untracked_calls", "stacks", "undecodable"] {
        assert!(
            report["lost"][counter].is_u64(),
            "lost.{counter}: {report:#}"
        );
    }
    let process = &report["processes"][0];
    assert!(process["pid"].is_u64());
    assert_eq!(process["cmdline"][0], sites.to_str().unwrap());
    assert!(process["comm"].is_string());
    assert!(process["container"].is_null());
    let listed = report["sites"].as_array().unwrap();
    // The workload's six sites and the dynamic loader's own mappings, within the default --top of 10.
    let site_count = report["site_count"].as_u64().unwrap() as usize;
    assert!(site_count >= 6, "{report:#}");
    assert_eq!(listed.len(), site_count.min(10), "{report:#}");
    let live: Vec<u64> = listed
        .iter()
        .map(|s| s["live_bytes"].as_u64().unwrap())
        .collect();
    assert!(
        live.windows(2).all(|w| w[0] >= w[1]),
        "sorted by live_bytes: {live:?}"
    );
    for s in listed {
        for key in [
            "pid",
            "live_bytes",
            "live_count",
            "total_bytes",
            "total_count",
        ] {
            assert!(s[key].is_u64(), "{key}: {s:#}");
        }
        assert!(s["kind"].is_string() && s["oldest_age_s"].is_f64());
    }
    // What was allocated in all counts every site, those listed and the rest.
    let listed_total: u64 = listed
        .iter()
        .map(|s| s["total_bytes"].as_u64().unwrap())
        .sum();
    let allocated = report["allocated_bytes"].as_u64().unwrap();
    assert!(allocated >= listed_total, "{allocated} < {listed_total}");
    assert!(report["allocated_count"].as_u64().unwrap() >= listed.len() as u64);
    let frame = &site(&report, "malloc", "leak_site")["stack"][0];
    assert_eq!(frame["module"], sites.to_str().unwrap());
    assert!(frame["offset"].as_str().unwrap().starts_with("0x"));
    // Built with -g: the DWARF names the file and the line of the malloc call.
    assert_eq!(
        (frame["file"].as_str(), frame["line"].as_u64()),
        (
            workspace().join("tests/workloads/sites.c").to_str(),
            Some(source_line("sites.c", "void leak_site"))
        ),
        "{frame:#}"
    );
    assert_eq!(frame["lang"], "native");
    assert!(frame.get("inlined").is_none(), "{frame:#}");
}

/// The 1-based line of `tests/workloads/FILE` that contains `text`.
fn source_line(file: &str, text: &str) -> u64 {
    let path = workspace().join("tests/workloads").join(file);
    let source = std::fs::read_to_string(&path).unwrap();
    let index = source
        .lines()
        .position(|l| l.contains(text))
        .unwrap_or_else(|| panic!("no line of {} contains {text:?}", path.display()));
    index as u64 + 1
}

#[test]
fn native_frames_of_an_optimized_program_get_their_file_and_line() {
    require_root();
    let sites = optimized_workload("sites");
    let out = Command::new(alloctrace())
        .args(["leaks", "--format", "json", "--top", "0", "--"])
        .arg(&sites)
        .output()
        .unwrap();
    let report = json_report(&out);
    let pid = report["processes"][0]["pid"].as_u64().unwrap();
    assert_sites_exact(&report, pid);
    let source = workspace().join("tests/workloads/sites.c");
    for (kind, function, text) in [
        ("malloc", "leak_site", "void leak_site"),
        ("malloc", "large_site", "void large_site"),
        ("calloc", "calloc_site", "void calloc_site"),
    ] {
        let frame = &site(&report, kind, function)["stack"][0];
        assert_eq!(
            (frame["file"].as_str(), frame["line"].as_u64()),
            (source.to_str(), Some(source_line("sites.c", text))),
            "{function}: {frame:#}"
        );
    }
    // The loader's own mappings are made in glibc's mmap wrapper, stripped of its DWARF: named from the
    // separate debug file Debian's libc6-dbg installs under /usr/lib/debug/.build-id.
    let mmap_frames: Vec<&serde_json::Value> = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "mmap")
        .map(|s| &s["stack"][0])
        .collect();
    assert!(
        mmap_frames.iter().any(|f| f["file"]
            .as_str()
            .is_some_and(|file| file.ends_with("sysv/linux/mmap64.c"))
            && f["line"].is_u64()),
        "{mmap_frames:#?}"
    );
    // The text report says where, after the symbol.
    let out = Command::new(alloctrace())
        .args(["leaks", "--top", "0", "--"])
        .arg(&sites)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let expected = format!(
        " at {}:{}  (",
        source.display(),
        source_line("sites.c", "void leak_site")
    );
    assert!(
        text.lines()
            .any(|l| l.contains("leak_site+0x") && l.contains(&expected)),
        "{text}"
    );
}

#[test]
fn text_report_shows_sites_in_human_units() {
    require_root();
    let out = Command::new(alloctrace())
        .args(["leaks", "--top", "2", "--"])
        .arg(workload("sites"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("#1 malloc [lingering]: 8.0 MiB live in 1 blocks"),
        "{text}"
    );
    assert!(
        text.contains("#2 malloc [steady]: 97.7 KiB live in 100 blocks"),
        "{text}"
    );
    assert!(text.contains("    leak_site+0x"), "{text}");
    assert!(text.contains("lost: none"), "{text}");
    assert!(text.contains("more sites not shown"), "{text}");
}

/// Runs alloctrace expecting an error: exit status 2 and one line on stderr.
fn expect_error(command: &mut Command, message: &str) {
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(message),
        "expected {message:?} in: {stderr}"
    );
}

#[test]
fn missing_pid_is_one_clear_error() {
    require_root();
    // A pid that existed and is gone: reaped just now.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let pid = gone.id().to_string();
    expect_error(
        Command::new(alloctrace()).args(["leaks", "-p", &pid]),
        &format!("no process with pid {pid}"),
    );
}

#[test]
fn missing_command_is_one_clear_error() {
    require_root();
    expect_error(
        Command::new(alloctrace()).args(["leaks", "--", "no-such-command-anywhere"]),
        "command not found: no-such-command-anywhere",
    );
}

/// `--ready-fd` naming a descriptor alloctrace did not inherit is refused before anything is attached: it could
/// otherwise be one alloctrace opened itself.
#[test]
fn a_ready_fd_that_is_not_open_is_one_clear_error() {
    require_root();
    expect_error(
        Command::new(alloctrace()).args(["--ready-fd", "99", "leaks", "--", "true"]),
        "--ready-fd 99: not an open file descriptor",
    );
}

#[test]
fn not_root_is_one_clear_error() {
    require_root();
    // A copy the unprivileged user can reach: the checkout may sit under a folder only root can enter.
    let copy = std::env::temp_dir().join(format!("alloctrace-not-root-{}", std::process::id()));
    std::fs::copy(alloctrace(), &copy).unwrap();
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    expect_error(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&copy)
            .args(["leaks", "--", "true"]),
        "alloctrace needs root",
    );
    std::fs::remove_file(&copy).unwrap();
}

#[test]
fn demo_leak_comes_first() {
    require_root();
    let demo = workspace().join("tracer/demo/etl_task.py");
    let out = Command::new(alloctrace())
        .args([
            "leaks",
            "--format",
            "json",
            "--duration",
            "3s",
            "--",
            "/usr/bin/python3",
        ])
        .arg(&demo)
        .output()
        .unwrap();
    let report = json_report(&out);
    let first = &report["sites"][0];
    // Each cached partition is one bytes object: 64 KiB of payload plus CPython's 33-byte header.
    let (bytes, count) = (
        first["live_bytes"].as_u64().unwrap(),
        first["live_count"].as_u64().unwrap(),
    );
    assert!(
        count >= 100,
        "the cache should hold hundreds of partitions after 3 s: {first:#}"
    );
    assert_eq!(
        bytes,
        count * (65_536 + 33),
        "every block of the first site is a cached partition: {first:#}"
    );
    assert!(
        report["processes"][0]["exit"].is_null(),
        "the demo is still running when the trace ends"
    );
    // Named by the line of the task that leaks, and judged a leak.
    let source = std::fs::read_to_string(&demo).unwrap();
    let line = source
        .lines()
        .position(|l| l.trim_start().starts_with("payload = "))
        .expect("the demo builds its payload") as u64
        + 1;
    let python = first["stack"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["lang"] == "python")
        .expect("Python frames on the demo's site");
    assert_eq!(
        (&python["function"], &python["line"], &python["file"]),
        (
            &serde_json::json!("load_partition"),
            &serde_json::json!(line),
            &serde_json::json!(demo.to_str().unwrap())
        ),
        "{first:#}"
    );
    assert_eq!(first["verdict"], "leak", "{first:#}");
}

/// A process that is already allocating at full speed when the probes go on: every call from then on is seen,
/// and none is taken for a call nested in one the probes caught half-way.
#[test]
fn a_process_already_busy_allocating_is_traced_by_pid() {
    require_root();
    let mut target = Command::new(workload("busy"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut target_out = BufReader::new(target.stdout.take().unwrap());
    let mut line = String::new();
    target_out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let (mut command, mut ready) = alloctrace_with_ready_fd();
    let tracer = command
        .args(["leaks", "--format", "json", "--top", "100", "--pid"])
        .arg(target.id().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ready.wait_ready();
    writeln!(target.stdin.as_mut().unwrap()).unwrap();
    line.clear();
    target_out.read_line(&mut line).unwrap();
    assert_eq!(line, "kept\n");
    // SAFETY: signalling a child of this test, not yet reaped.
    unsafe { libc::kill(tracer.id() as libc::pid_t, libc::SIGINT) };
    let out = tracer.wait_with_output().unwrap();
    target.kill().unwrap();
    target.wait().unwrap();
    let report = json_report(&out);
    let kept = site(&report, "malloc", "keep_site");
    assert_eq!(live(kept), (100_000, 100), "{kept:#}");
    let churn = site(&report, "malloc", "churn_site");
    assert!(
        churn["total_count"].as_u64().unwrap() >= 99 * 10_000,
        "every churned block from the attach on is seen: {churn:#}"
    );
    assert!(live(churn).1 <= 1, "{churn:#}");
    assert_eq!(report["lost"]["events"], 0, "{report:#}");
}
