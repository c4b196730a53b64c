//! Which processes are traced: the children a traced process forks, the program a child execs, and processes
//! found by name, including ones started after the tracer.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
};

use alloctrace_tests::{
    alloctrace, assert_sites_exact, assert_tracer_rss_bounded, json_report, live,
    ready::alloctrace_with_ready_fd, require_root, site, trace_json, workload,
};

#[test]
fn forked_children_are_followed_and_attributed() {
    require_root();
    let forker = workload("forker");
    let report = trace_json(&["leaks", "--top", "100"], &[forker.as_os_str()]);
    let processes = report["processes"].as_array().unwrap();
    assert_eq!(processes.len(), 2, "{report:#}");
    let (parent, child) = (processes[0]["pid"].as_u64(), processes[1]["pid"].as_u64());
    let parent_site = site(&report, "malloc", "parent_site");
    assert_eq!(
        (parent_site["pid"].as_u64(), live(parent_site)),
        (parent, (10_000, 10))
    );
    let child_site = site(&report, "malloc", "child_site");
    assert_eq!(
        (child_site["pid"].as_u64(), live(child_site)),
        (child, (100_000, 50))
    );
}

#[test]
fn a_child_that_execs_is_traced_in_its_new_image() {
    require_root();
    let forker = workload("forker");
    let sites = workload("sites");
    let report = trace_json(
        &["leaks", "--top", "100"],
        &[forker.as_os_str(), sites.as_os_str()],
    );
    let child = report["processes"][1]["pid"].as_u64().unwrap();
    assert_eq!(
        report["processes"][1]["cmdline"][0],
        sites.to_str().unwrap()
    );
    assert_sites_exact(&report, child);
}

#[test]
fn processes_are_found_by_name_even_when_they_start_later() {
    require_root();
    // A name of its own: other tests run the sites workload at the same time.
    let name = format!("named-{}", std::process::id());
    let sites = workload("sites").with_file_name(&name);
    std::fs::copy(workload("sites"), &sites).unwrap();
    let (mut command, mut ready) = alloctrace_with_ready_fd();
    let mut tracer = command
        .args([
            "leaks",
            "--format",
            "json",
            "--top",
            "100",
            "--duration",
            "4s",
            "--comm",
            &name,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ready.wait_ready();
    // Started after the tracer, by name only; it allocates once the tracer has attached to it.
    let mut target = Command::new(&sites)
        .arg("--wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    ready.wait_attached(&[target.id()]);
    // Said to the user: the libc path as the process maps it (/usr/lib/… or /lib/…: the same file on
    // merged-/usr Debian).
    let announced = format!("alloctrace: tracing pid {} through ", target.id());
    let mut tracer_err = BufReader::new(tracer.stderr.take().unwrap());
    let mut line = String::new();
    while !line.starts_with(&announced) {
        line.clear();
        assert_ne!(tracer_err.read_line(&mut line).unwrap(), 0, "not said");
    }
    assert!(
        line.trim_end().ends_with("/x86_64-linux-gnu/libc.so.6"),
        "{line}"
    );
    writeln!(target.stdin.as_mut().unwrap()).unwrap();
    target.wait().unwrap();
    let out = tracer.wait_with_output().unwrap();
    let report = json_report(&out);
    assert_sites_exact(&report, target.id().into());
}

/// Children forked while the trace ends, and after it, are never left stopped: holding new processes stops
/// before the last records are read, and every process held is continued.
#[test]
fn no_child_is_left_stopped_when_the_trace_ends() {
    require_root();
    let mut parent = Command::new(workload("fork_loop"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(parent.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    // It forks all through the trace, and after it until its input closes.
    let out = Command::new(alloctrace())
        .args(["leaks", "--format", "json", "--duration", "1s", "--pid"])
        .arg(parent.id().to_string())
        .output()
        .unwrap();
    let report = json_report(&out);
    assert!(
        report["processes"].as_array().unwrap().len() > 1,
        "children were followed: {:#}",
        report["processes"]
    );
    drop(parent.stdin.take());
    // A child left stopped would keep the parent waiting for ever.
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = parent.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the parent never finished: a child was left stopped"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// An exec storm: twenty children, each exec'ing a static binary that allocates at once and exits. Every one is
/// held at its exec until attached, so each is traced, exactly, and every pid a site names is listed.
#[test]
fn every_child_of_an_exec_storm_is_traced() {
    require_root();
    let source = alloctrace_tests::workspace().join("tests/workloads/static_alloc.c");
    let binary = std::env::temp_dir().join(format!("static_alloc-{}", std::process::id()));
    let built = Command::new("cc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-static", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("cc is needed to build the test workloads");
    assert!(
        built.status.success(),
        "cc -static failed (libc6-dev has the static libc): {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let storm = workload("exec_storm");
    let report = trace_json(
        &["leaks", "--top", "0"],
        &[storm.as_os_str(), binary.as_os_str(), "20".as_ref()],
    );
    std::fs::remove_file(&binary).unwrap();
    let listed: Vec<u64> = report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(listed.len(), 21, "{:#}", report["processes"]);
    let sites: Vec<&serde_json::Value> = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["stack"][0]["function"] == "static_site")
        .collect();
    assert_eq!(sites.len(), 20, "one site per child");
    for site in &sites {
        assert_eq!(live(site), (4096, 1), "{site:#}");
    }
    for site in report["sites"].as_array().unwrap() {
        assert!(listed.contains(&site["pid"].as_u64().unwrap()), "{site:#}");
    }
    assert_eq!(
        report["lost"]["untraced_processes"], 0,
        "{:#}",
        report["lost"]
    );
    assert_eq!(report["complete"], true, "{:#}", report["lost"]);
    assert_tracer_rss_bounded(&report, "an exec storm of a static binary");
}

/// A name that matches nothing in the whole trace is said, not taken for a quiet process.
#[test]
fn a_selector_that_matches_nothing_is_said() {
    require_root();
    let out = Command::new(alloctrace())
        .args(["leaks", "--duration", "1s", "--comm", "no-such-comm-7"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no process matched --comm, --container or --cgroup"),
        "{stderr}"
    );
}
