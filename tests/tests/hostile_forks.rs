//! Fork-heavy targets and a tracer that dies. A fork storm (tens of children alive at once, forking across the
//! end of the trace) ended by SIGINT or by `--duration`: the report is written, every child the tracer held is in
//! it or counted as untraced, no site names a process the report does not list, no child is left stopped, and
//! alloctrace exits. And alloctrace killed mid-trace (SIGKILL: no unwinding, no cleanup, what a panic can
//! come to) never leaves the command it started running.
//!
//! The test process makes itself a child subreaper, so that the storm's children, orphaned when alloctrace and
//! the command it started are gone, become its own: it waits for each by pid, and sees a child left stopped.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use alloctrace_tests::{
    alloctrace, assert_tracer_rss_bounded, ready::alloctrace_with_ready_fd, require_root, workload,
};
use serde_json::Value;

/// Children the storm keeps alive at once, and how long each lives: a storm for a 2-core machine.
const ALIVE: usize = 40;
const LIFETIME_US: u64 = 300_000;

/// How long anything here may take before the test calls it a hang: far more than it needs.
const HANG: Duration = Duration::from_secs(120);

/// Orphans of this process's descendants become its children, to be waited for by pid.
fn become_subreaper() {
    // SAFETY: a prctl with integer arguments.
    let set = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(set, 0, "cannot become a child subreaper");
}

/// A file for one test, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("alloctrace-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What a process is doing, from `/proc/PID/stat` (`R`, `S`, `D`, `T`, …) and `/proc/PID/wchan`.
fn state(pid: u32) -> String {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat
        .iter()
        .rposition(|&b| b == b')')
        .map_or(&[][..], |i| &stat[i + 1..]);
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    format!(
        "state {} in {wchan:?}",
        String::from_utf8_lossy(after_comm)
            .split_whitespace()
            .next()
            .unwrap_or("gone")
    )
}

/// How a wait for one process by pid ended.
#[derive(Debug, PartialEq, Eq)]
enum Waited {
    /// Reaped here; its raw wait status.
    Reaped(i32),
    /// Not (or no longer) a child of this process: reaped by its own parent before it was orphaned.
    NotAChild,
}

/// Waits for `pid` to end, without blocking for ever: fails saying so when it is stopped, or runs past [`HANG`].
fn wait_for(pid: u32, what: &str) -> Waited {
    let started = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waiting for one pid, with a valid status pointer.
        let waited = unsafe {
            libc::waitpid(
                pid as libc::pid_t,
                &mut status,
                libc::WNOHANG | libc::WUNTRACED | libc::__WALL,
            )
        };
        match waited {
            -1 => return Waited::NotAChild,
            0 => {}
            _ if libc::WIFSTOPPED(status) => panic!(
                "{what} {pid} was left stopped (by signal {})",
                libc::WSTOPSIG(status)
            ),
            _ => return Waited::Reaped(status),
        }
        assert!(
            started.elapsed() < HANG,
            "{what} {pid} has not exited after {HANG:?}: {}",
            state(pid)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for alloctrace to exit, or fails saying where it hangs (and kills it).
fn wait_for_tracer(tracer: &mut Child) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = tracer.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > HANG {
            let pid = tracer.id();
            let where_ = state(pid);
            let stack = std::fs::read_to_string(format!("/proc/{pid}/stack")).unwrap_or_default();
            let _ = tracer.kill();
            panic!("alloctrace did not exit within {HANG:?}: {where_}\n{stack}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a stream to its end on a thread of its own: alloctrace says a line per child it traces, and must
/// never block on a full pipe.
fn drain(mut stream: impl std::io::Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stream.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    })
}

/// What the storm's log says: every pid forked, and each child's own word on whether it was held.
struct StormLog {
    forked: BTreeSet<u32>,
    held: BTreeMap<u32, bool>,
}

fn read_log(log: &Scratch) -> StormLog {
    let text = std::fs::read_to_string(&log.0).unwrap();
    let mut forked = BTreeSet::new();
    let mut held = BTreeMap::new();
    // A line being written as the storm runs may not be complete yet.
    for line in text
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
    {
        let words: Vec<&str> = line.split(' ').collect();
        match words[..] {
            ["forked", pid] => {
                forked.insert(pid.parse().unwrap());
            }
            ["child", pid, how] => {
                held.insert(pid.parse().unwrap(), how == "held");
            }
            _ => panic!("not a line of the storm's log: {line:?}"),
        }
    }
    StormLog { forked, held }
}

/// How a trace of the storm ends.
#[derive(Clone, Copy)]
enum End {
    Interrupt,
    Duration,
}

/// Runs the storm under `alloctrace leaks -- fork_storm`, ends it as `end` says, and checks the report against
/// the storm's own log.
fn fork_storm(end: End) {
    require_root();
    become_subreaper();
    let name = match end {
        End::Interrupt => "storm-int",
        End::Duration => "storm-duration",
    };
    let log = Scratch::new(&format!("{name}.log"));
    let report_path = Scratch::new(&format!("{name}.json"));
    let (mut tracer, mut ready) = alloctrace_with_ready_fd();
    tracer.args(["leaks", "--format", "json", "--top", "0", "-o"]);
    tracer.arg(&report_path.0);
    if let End::Duration = end {
        tracer.args(["--duration", "3s"]);
    }
    let mut tracer = tracer
        .arg("--")
        .arg(workload("fork_storm"))
        .args([&ALIVE.to_string(), &LIFETIME_US.to_string()])
        .arg(&log.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = drain(tracer.stderr.take().unwrap());
    // The storm writes through alloctrace's stdout, which it inherits.
    let mut out = BufReader::new(tracer.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "the storm did not start");
    let stdout = drain(out);
    // The storm's parent, the command: traced from the start.
    let parent = ready.wait_ready()["pids"][0].clone();
    if let End::Interrupt = end {
        // Interrupted in full storm: once alloctrace has said a few rounds of children attached.
        for _ in 0..3 * ALIVE {
            ready.wait_event("a child of the storm attached", |line| {
                line["attached"].is_u64() && line["attached"] != parent
            });
        }
        // SAFETY: alloctrace is our child, not yet waited for.
        assert_eq!(
            unsafe { libc::kill(tracer.id() as libc::pid_t, libc::SIGINT) },
            0
        );
    }
    let status = wait_for_tracer(&mut tracer);
    let stderr = stderr.join().unwrap();
    assert!(status.success(), "alloctrace failed ({status}): {stderr}");
    let text = std::fs::read_to_string(&report_path.0)
        .unwrap_or_else(|e| panic!("no report ({e}): {stderr}"));
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let processes = report["processes"].as_array().unwrap();
    let parent = processes[0]["pid"].as_u64().unwrap() as u32;
    // alloctrace sent the command SIGTERM after the report and reaped it, or exited first, and then the kernel
    // killed it (PTRACE_O_EXITKILL) and it was orphaned here. Either way it is gone once waited for, and every
    // child of the storm still running is ours.
    wait_for(parent, "the storm's parent");
    drop(stdout);
    let storm = read_log(&log);
    for &pid in storm.forked.iter().chain(storm.held.keys()) {
        wait_for(pid, "a child of the storm");
    }
    // Every child forked said how it started: none was stopped before its first instruction for good.
    let storm = read_log(&log);
    let unheard: Vec<&u32> = storm
        .forked
        .iter()
        .filter(|pid| !storm.held.contains_key(pid))
        .collect();
    assert_eq!(unheard, Vec::<&u32>::new(), "children that never ran");

    let listed: BTreeMap<u32, &Value> = processes
        .iter()
        .map(|p| (p["pid"].as_u64().unwrap() as u32, p))
        .collect();
    let held: BTreeSet<u32> = storm
        .held
        .iter()
        .filter(|&(_, &h)| h)
        .map(|(&pid, _)| pid)
        .collect();
    let untraced = report["lost"]["untraced_processes"].as_u64().unwrap();
    let missing: Vec<u32> = held
        .iter()
        .copied()
        .filter(|pid| !listed.contains_key(pid))
        .collect();
    println!(
        "{name}: {} children forked, {} held by the tracer, {} listed, {} untraced, tracer RSS {} MiB",
        storm.forked.len(),
        held.len(),
        listed.len() - 1,
        untraced,
        report["tracer_max_rss_bytes"].as_u64().unwrap() >> 20
    );
    // A storm: children replaced as they exit, all through the trace. The storm forks on past the end; whether
    // a fork lands between the end and the command's stop is the machine's timing, so the children forked after
    // the end ("free") are checked below when there are any, not required.
    assert!(held.len() > ALIVE, "a storm: {} children held", held.len());
    // Each child the tracer held is in the report, or counted as a process it could not trace.
    assert!(
        missing.len() as u64 <= untraced && untraced <= held.len() as u64,
        "held children missing from processes[]: {missing:?}; untraced_processes: {untraced}"
    );
    for &pid in listed.keys() {
        assert!(
            pid == parent || storm.forked.contains(&pid),
            "pid {pid} is no process of the storm"
        );
    }
    let sites = report["sites"].as_array().unwrap();
    let mut child_sites: BTreeMap<u32, &Value> = BTreeMap::new();
    for site in sites {
        let pid = site["pid"].as_u64().unwrap() as u32;
        assert!(
            listed.contains_key(&pid),
            "a site names pid {pid}, missing from processes[]: {site:#}"
        );
        if site["stack"][0]["function"] == "storm_child_site" {
            assert_eq!(site["kind"], "malloc", "{site:#}");
            assert!(
                child_sites.insert(pid, site).is_none(),
                "two sites for {pid}"
            );
        }
    }
    // Children are traced from their first instruction or not at all: one forked once holding was off (the
    // trace had ended) has no allocator site, never a part of its allocations.
    for (pid, site) in &child_sites {
        assert!(
            held.contains(pid),
            "child {pid} was not held, yet its allocations were traced: {site:#}"
        );
    }
    // A child that exited during the trace had made its ten blocks: all are there. One still running at the
    // end may have been continued only just before.
    for (&pid, process) in &listed {
        if pid == parent {
            continue;
        }
        let blocks = child_sites
            .get(&pid)
            .map_or(0, |s| s["live_count"].as_u64().unwrap());
        if process["exit"].is_null() {
            assert!(blocks <= 10, "child {pid}: {process:#}");
        } else {
            let site = child_sites
                .get(&pid)
                .unwrap_or_else(|| panic!("child {pid} exited with no site: {process:#}"));
            assert_eq!(
                (site["live_bytes"].as_u64(), site["live_count"].as_u64()),
                (Some(10_000), Some(10)),
                "{site:#}"
            );
        }
    }
    assert_tracer_rss_bounded(&report, &format!("a fork storm ({name})"));
}

#[test]
fn a_fork_storm_interrupted_by_sigint_is_reported_and_leaves_no_child_stopped() {
    fork_storm(End::Interrupt);
}

#[test]
fn a_fork_storm_ended_by_its_duration_is_reported_and_leaves_no_child_stopped() {
    fork_storm(End::Duration);
}

/// alloctrace killed mid-trace, with no chance to clean up (what a panic comes to: the release profile aborts):
/// the command it started is killed with it, by the kernel (`PTRACE_O_EXITKILL`), and a child of the command
/// that alloctrace held at that moment, stopped before its first instruction, is continued.
#[test]
fn killing_alloctrace_kills_its_command_and_continues_what_it_held() {
    require_root();
    become_subreaper();
    let mut tracer = Command::new(alloctrace())
        .args(["leaks", "--format", "json", "--"])
        .arg(workload("fork_on_input"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = drain(tracer.stderr.take().unwrap());
    let mut out = BufReader::new(tracer.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let command: u32 = line
        .strip_prefix("ready ")
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("the command did not start: {line:?}"));
    // alloctrace stopped, so that it cannot continue what it holds: the next child is held for certain.
    // SAFETY: alloctrace is our child, not yet waited for.
    assert_eq!(
        unsafe { libc::kill(tracer.id() as libc::pid_t, libc::SIGSTOP) },
        0
    );
    use std::io::Write as _;
    writeln!(tracer.stdin.as_mut().unwrap(), "fork").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let held: u32 = line
        .strip_prefix("forked ")
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("the command did not fork: {line:?}"));
    let started = Instant::now();
    while !state(held).starts_with("state T") {
        assert!(
            started.elapsed() < HANG,
            "the child was not held: {}",
            state(held)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    tracer.kill().unwrap();
    let status = wait_for_tracer(&mut tracer);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    drop(stderr);
    // The command, orphaned here, was killed by the kernel as its tracer died.
    match wait_for(command, "the command") {
        Waited::Reaped(status) => assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
            "the command ended with status {status:#x}, not killed"
        ),
        Waited::NotAChild => panic!("the command was not orphaned to this process"),
    }
    assert_held_child_after_the_tracer_died(held);
}

/// A process alloctrace held as it was killed is continued by alloctrace's helper process, which outlives it:
/// it then runs on (the workload's child sleeps), never left stopped.
fn assert_held_child_after_the_tracer_died(held: u32) {
    let started = Instant::now();
    while state(held).starts_with("state T") {
        assert!(
            started.elapsed() < HANG,
            "the held child was left stopped: {}",
            state(held)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: our child now (orphaned here), not yet reaped, so its pid is still its own.
    let reaped = unsafe {
        libc::kill(held as libc::pid_t, libc::SIGKILL);
        libc::waitpid(held as libc::pid_t, std::ptr::null_mut(), libc::__WALL)
    };
    assert_eq!(
        reaped, held as libc::pid_t,
        "the held child is not ours to reap"
    );
}
