//! A hostile target and a careless user against the command line: a process whose comm, arguments,
//! executable path and symbols carry terminal escapes; the stop signals `timeout`, systemd and kubectl send;
//! and arguments that would lose a trace, panic, or choose every process on the host.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::PathBuf,
    process::{Child, ChildStderr, Command, Output, Stdio},
    sync::OnceLock,
};

use alloctrace_tests::{
    alloctrace, assert_tracer_rss_bounded, json_report, live, pyenv_prefix,
    ready::alloctrace_with_ready_fd, require_root, workload, workspace,
};

/// The comm `hostile_names` gives itself, as the kernel reports it.
const COMM: &str = "\x1b[2J\n\x1b]0;x\x07";
const COMM_SHOWN: &str = r"\x1b[2J\n\x1b]0;x\x07";
/// The symbol of the function that allocates.
const SYMBOL: &str = "hostile\x1b[2J\x1b]0;owned\x07\u{9b}31m_site";
const SYMBOL_SHOWN: &str = r"hostile\x1b[2J\x1b]0;owned\x07\x9b31m_site";
/// Arguments that forge a traceback line and carry a C1 control.
const ARGS: [&str; 2] = ["a\n  File \"/etc/shadow\", line 1", "\u{9b}2J"];
const ARGS_SHOWN: &str = r#"a\n  File "/etc/shadow", line 1 \x9b2J"#;

/// `hostile_names`, linked to a path that itself carries a window-title change, a C1 control and a forged
/// line (the kernel shows a newline in `/proc/PID/maps` as `\012`). A link, not a copy: a copy's descriptor,
/// open for writing while another test forks, would make its exec fail with ETXTBSY.
fn hostile_executable() -> PathBuf {
    static LINKED: OnceLock<PathBuf> = OnceLock::new();
    LINKED
        .get_or_init(|| {
            let built = workload("hostile_names");
            let dir = workspace().join(format!(
                "target/workloads/exe\x1b]0;t\x07\u{9b}2J\n  File \"/etc/shadow\", line 1-{}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).expect("create the hostile executable's folder");
            let exe = dir.join("hostile");
            std::fs::hard_link(&built, &exe).expect("link hostile_names");
            exe
        })
        .clone()
}

/// Whether `bytes` hold anything a terminal acts on: a control character (C0 but the newline, DEL, C1).
fn controls(bytes: &[u8]) -> Vec<char> {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|&c| c != '\n' && c.is_control())
        .collect()
}

/// A running `hostile_names` and a tracer attached to it by pid, with the target allocating once the tracer
/// says its probes are in place, then waiting until its stdin closes: it runs until the tracer is stopped.
struct Traced {
    target: Child,
    tracer: Child,
    tracer_err: BufReader<ChildStderr>,
    notice: String,
}

fn trace_hostile(args: &[&str]) -> Traced {
    require_root();
    let mut target = Command::new(hostile_executable())
        .args(ARGS)
        .args(["--wait", "--linger"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut target_out = BufReader::new(target.stdout.take().unwrap());
    let mut line = String::new();
    target_out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let (mut command, mut ready) = alloctrace_with_ready_fd();
    let mut tracer = command
        .args(["leaks", "--pid"])
        .arg(target.id().to_string())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ready.wait_ready();
    // Its first line, said before it was ready: the one that quotes the target's path.
    let mut tracer_err = BufReader::new(tracer.stderr.take().unwrap());
    let mut notice = String::new();
    tracer_err.read_line(&mut notice).unwrap();
    writeln!(target.stdin.as_mut().unwrap()).unwrap();
    let mut line = String::new();
    target_out.read_line(&mut line).unwrap();
    assert_eq!(line, "allocated\n");
    Traced {
        target,
        tracer,
        tracer_err,
        notice,
    }
}

impl Traced {
    /// Stops the tracer with `signal` and waits for its end: its output, with all it wrote to stderr. The
    /// target exits then.
    fn stop(mut self, signal: libc::c_int) -> Output {
        // SAFETY: the tracer is our child, not yet waited for, so its pid is still its own.
        assert_eq!(
            unsafe { libc::kill(self.tracer.id() as libc::pid_t, signal) },
            0
        );
        let mut out = self.tracer.wait_with_output().unwrap();
        let mut rest = Vec::new();
        self.tracer_err.read_to_end(&mut rest).unwrap();
        out.stderr = [self.notice.as_bytes(), &rest].concat();
        drop(self.target.stdin.take());
        self.target.wait().unwrap();
        out
    }
}

#[test]
fn a_target_named_with_terminal_escapes_cannot_drive_the_terminal() {
    let out = trace_hostile(&[]).stop(libc::SIGINT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "alloctrace failed: {stderr}");
    assert_eq!(controls(&out.stdout), [], "in the report:\n{stdout}");
    assert_eq!(controls(&out.stderr), [], "on stderr:\n{stderr}");
    // The process line, and the site: its comm, its arguments and its symbol, each shown escaped.
    let process = stdout
        .lines()
        .find(|l| l.starts_with("process "))
        .unwrap_or_else(|| panic!("no process line:\n{stdout}"));
    assert!(process.contains(COMM_SHOWN), "{process}");
    assert!(process.contains(ARGS_SHOWN), "{process}");
    let site = stdout
        .lines()
        .find(|l| l.starts_with("#1 "))
        .unwrap_or_else(|| panic!("no site:\n{stdout}"));
    assert!(
        site.contains("9.8 KiB live in 10 blocks") && site.ends_with(COMM_SHOWN),
        "{site}"
    );
    let frame = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(SYMBOL_SHOWN))
        .unwrap_or_else(|| panic!("no frame in {SYMBOL_SHOWN}:\n{stdout}"));
    assert!(frame.contains(r"(/"), "{frame}");
    assert!(
        frame.contains(r"exe\x1b]0;t\x07\x9b2J\\012  File"),
        "{frame}"
    );
    assert!(
        !stdout
            .lines()
            .any(|l| l.trim_start().starts_with("File \"/etc/shadow\"")),
        "a forged line:\n{stdout}"
    );
}

#[test]
fn json_carries_a_targets_names_exactly_and_no_control_character() {
    require_root();
    // Started by alloctrace: its comm, as it sets it, is read at its exit.
    let out = Command::new(alloctrace())
        .args(["leaks", "--format", "json", "--"])
        .arg(hostile_executable())
        .args(ARGS)
        .output()
        .unwrap();
    assert_eq!(
        controls(&out.stdout),
        [],
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report = json_report(&out);
    let process = &report["processes"][0];
    assert_eq!(process["comm"], COMM);
    assert_eq!(process["cmdline"][1], ARGS[0]);
    assert_eq!(process["cmdline"][2], ARGS[1]);
    let site = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stack"][0]["function"] == SYMBOL)
        .unwrap_or_else(|| panic!("no site in {SYMBOL:?}: {report:#}"));
    assert_eq!(live(site), (10_000, 10), "{site:#}");
    assert_tracer_rss_bounded(&report, "terminal escapes in comm, argv, path and symbols");
}

#[test]
fn python_file_and_function_names_cannot_forge_a_traceback() {
    require_root();
    let python = pyenv_prefix("3.12").join("bin/python3.12");
    let mut tracer = Command::new(alloctrace())
        .args(["leaks", "--top", "0", "--"])
        .arg(&python)
        .arg(workspace().join("tests/workloads/hostile_pynames.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The workload writes through alloctrace's stdout, which it inherits, and holds its bytearray until its
    // input closes.
    let mut out = BufReader::new(tracer.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "the workload did not get ready");
    let input = tracer.stdin.take();
    let mut errors = tracer.stderr.take().unwrap();
    // SAFETY: signalling the child we spawned and have not reaped.
    assert_eq!(
        unsafe { libc::kill(tracer.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let mut stdout = Vec::new();
    out.read_to_end(&mut stdout).unwrap();
    let status = tracer.wait().unwrap();
    drop(input);
    let mut stderr = Vec::new();
    errors.read_to_end(&mut stderr).unwrap();
    let (stdout, shown_err) = (
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr),
    );
    assert!(status.success(), "alloctrace failed: {shown_err}");
    assert_eq!(controls(stdout.as_bytes()), [], "in the report:\n{stdout}");
    assert_eq!(controls(&stderr), [], "on stderr:\n{shown_err}");
    let frame = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(r#"File "/app/x\x1b[2J.py""#))
        .unwrap_or_else(|| panic!("no frame in the hostile file:\n{stdout}"));
    assert_eq!(
        frame.trim_start(),
        r#"File "/app/x\x1b[2J.py", line 9, in f\n  File "/etc/shadow", line 1", line 2, in hold\x1b]0;owned\x07\x9b31m"#
    );
    assert!(
        !stdout
            .lines()
            .any(|l| l.trim_start().starts_with("File \"/etc/shadow\"")),
        "a forged line:\n{stdout}"
    );
}

/// Ends a trace of a target that still runs with `signal`: the report is written, the exit is 0.
fn stop_signal_writes_the_report(signal: libc::c_int) {
    let out = trace_hostile(&["--format", "json"]).stop(signal);
    let report = json_report(&out);
    let site = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stack"][0]["function"] == SYMBOL)
        .unwrap_or_else(|| panic!("no site in {SYMBOL:?}: {report:#}"));
    assert_eq!(live(site), (10_000, 10), "{site:#}");
    assert!(report["processes"][0]["exit"].is_null(), "{report:#}");
    assert_tracer_rss_bounded(&report, &format!("a trace stopped by signal {signal}"));
}

#[test]
fn sigterm_writes_the_report_and_exits_0() {
    stop_signal_writes_the_report(libc::SIGTERM);
}

#[test]
fn sighup_writes_the_report_and_exits_0() {
    stop_signal_writes_the_report(libc::SIGHUP);
}

/// Runs alloctrace with `args`, which must fail before tracing anything.
fn refused(args: &[&str]) -> Output {
    let out = Command::new(alloctrace()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.starts_with("alloctrace: error: "),
        "{args:?}: the first line should say the error: {stderr}"
    );
    assert!(!stderr.contains("tracing"), "{args:?} traced: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}");
    out
}

/// The command's own file, which a `-- touch FILE` the check missed would create.
fn untouched() -> PathBuf {
    let path = std::env::temp_dir().join(format!("alloctrace-untouched-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

#[test]
fn unwritable_output_fails_before_the_trace() {
    require_root();
    let witness = untouched();
    for command in ["leaks", "large", "oom"] {
        let out = refused(&[
            command,
            "-o",
            "/proc/nonexistent/x",
            "--",
            "touch",
            witness.to_str().unwrap(),
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "alloctrace: error: cannot create /proc/nonexistent/x: No such file or directory (os error 2)\n"
        );
        assert!(!witness.exists(), "{command} started the command");
    }
}

#[test]
fn a_duration_too_long_for_the_clock_is_a_usage_error() {
    let witness = untouched();
    for (option, value) in [
        ("--duration", "1e19"),
        ("--duration", "inf"),
        ("--duration", "NaN"),
        ("--duration", "-1"),
        ("--duration", "31d"),
        ("--min-age", "1e19"),
    ] {
        let out = refused(&[
            "leaks",
            &format!("{option}={value}"),
            "--",
            "touch",
            witness.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap();
        assert_eq!(
            first,
            format!(
                "alloctrace: error: invalid value '{value}' for '{option} <DUR>': a duration is from 0 to 30 days"
            )
        );
        assert_eq!(stderr.matches("error").count(), 1, "one error: {stderr}");
        assert!(!witness.exists(), "{option} {value} started the command");
    }
}

#[test]
fn selectors_that_name_nothing_or_everything_are_refused() {
    for (option, value, why) in [
        ("--cgroup", "", "a cgroup is an absolute path"),
        ("--cgroup", "/", "the root cgroup holds every process"),
        ("--cgroup", "system.slice", "a cgroup is an absolute path"),
        ("--cgroup", "/system.slice/../..", "no . or .."),
        ("--container", "", "a container name or id is not empty"),
        ("--comm", "", "a process name is not empty"),
    ] {
        let out = refused(&["leaks", option, value, "--duration", "1"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.lines().next().unwrap().contains(why),
            "{option} {value:?}: {stderr}"
        );
    }
}

#[test]
fn a_usage_error_says_what_is_wrong_first() {
    for args in [
        &["leaks", "--no-such-option"][..],
        &["frobnicate"],
        &[],
        &["leaks", "--top", "many"],
        &["leaks", "-p", "-3"],
    ] {
        let out = refused(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines = stderr.lines().count();
        assert!((1..=8).contains(&lines), "{args:?}: {stderr}");
    }
    for args in [["--help"], ["--version"]] {
        let out = Command::new(alloctrace()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(out.stdout.starts_with(b"alloctrace") || out.stdout.starts_with(b"Traces"));
        assert!(out.stderr.is_empty());
    }
}

#[test]
fn top_zero_lists_every_site() {
    require_root();
    let sites = workload("sites");
    let report = |top: &str| {
        json_report(
            &Command::new(alloctrace())
                .args(["leaks", "--format", "json", "--top", top, "--"])
                .arg(&sites)
                .output()
                .unwrap(),
        )
    };
    let all = report("0");
    let site_count = all["site_count"].as_u64().unwrap() as usize;
    assert!(site_count >= 6, "{all:#}");
    assert_eq!(all["sites"].as_array().unwrap().len(), site_count);
    assert_eq!(report("2")["sites"].as_array().unwrap().len(), 2);
}
