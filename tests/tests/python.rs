//! Python frames: the `file:function:line` of each allocation site of an unmodified CPython, for every version
//! installed here (pyenv's 3.8 to 3.13, and Debian's 3.11 with libpython linked into the executable), with live
//! bytes within CPython's per-object overhead.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use alloctrace_tests::{
    alloctrace, docker, interrupt, pyenv_prefix, ready::alloctrace_with_ready_fd, require_root,
    start_tracing_pid, workspace,
};
use serde_json::Value;

/// The most bytes CPython adds to an object's payload (object header, bytearray's trailing NUL, alignment).
const OVERHEAD: u64 = 128;

fn workload() -> PathBuf {
    workspace().join("tests/workloads/pysites.py")
}

/// The line of the workload that carries `# site: NAME`.
fn marker(name: &str) -> u64 {
    let source = std::fs::read_to_string(workload()).unwrap();
    let tag = format!("# site: {name}");
    let index = source
        .lines()
        .position(|l| l.trim_end().ends_with(&tag))
        .unwrap_or_else(|| panic!("no {tag} in the workload"));
    index as u64 + 1
}

/// pyenv's interpreter for `3.X`.
fn pyenv(version: &str) -> PathBuf {
    pyenv_prefix(version).join(format!("bin/python{version}"))
}

/// Runs the workload on `python` under `alloctrace leaks`, and stops the trace (as Ctrl-C does) once the
/// workload holds everything.
fn trace(python: &Path) -> Value {
    trace_script(python, &workload())
}

/// Like [`trace`], for any `script` that prints "ready" once it holds what it allocates.
fn trace_script(python: &Path, script: &Path) -> Value {
    require_root();
    assert!(python.exists(), "{} is missing", python.display());
    // Numbered: pyenv's 3.11 and Debian's are both `python3.11`, traced at once by tests running in parallel.
    static TRACES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let report = std::env::temp_dir().join(format!(
        "alloctrace-python-{}-{}-{}.json",
        std::process::id(),
        TRACES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        python.file_name().unwrap().to_string_lossy()
    ));
    let mut tracer = Command::new(alloctrace())
        .args(["leaks", "--format", "json", "--top", "0", "-o"])
        .arg(&report)
        .arg("--")
        .arg(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The workload writes through alloctrace's stdout, which it inherits.
    let mut out = BufReader::new(tracer.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "the workload did not get ready");
    // The workload holds everything until its input closes: keep it open until the report is written.
    let input = tracer.stdin.take();
    let mut errors = tracer.stderr.take().unwrap();
    // SAFETY: signalling the child we spawned and have not reaped.
    unsafe { libc::kill(tracer.id() as libc::pid_t, libc::SIGINT) };
    let status = tracer.wait().unwrap();
    // The workload's forked child shares these pipes and waits for its input to close: only then do they end.
    drop(input);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut errors, &mut stderr).unwrap();
    assert!(status.success(), "alloctrace failed: {}", stderr);
    let text = std::fs::read_to_string(&report).unwrap();
    std::fs::remove_file(&report).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The site of an allocator call whose innermost Python frame is `function` at `line` of the workload, and
/// that holds the most there (a line can allocate more than its object: `CACHE[key] = bytes(n)` also grows the
/// dict). A line can also grow the heap by `brk` or map a pymalloc arena by `mmap`: sites of their own, and
/// not the object's.
fn site<'a>(report: &'a Value, function: &str, line: u64) -> &'a Value {
    site_in(report, &workload(), function, line)
}

/// The kinds of sites that are allocator calls, as reports name them (not `brk`, `mmap` or `mremap`).
const ALLOCATOR_CALLS: [&str; 9] = [
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
];

/// Like [`site`], for the workload seen at `file` (inside a container, say).
fn site_in<'a>(report: &'a Value, file: &Path, function: &str, line: u64) -> &'a Value {
    let found: Vec<&Value> = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| ALLOCATOR_CALLS.iter().any(|kind| s["kind"] == *kind))
        .filter(|s| {
            s["stack"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["lang"] == "python")
                .is_some_and(|f| {
                    f["function"] == function
                        && f["line"] == line
                        && f["file"] == file.to_str().unwrap()
                })
        })
        .collect();
    found
        .into_iter()
        .max_by_key(|s| s["live_bytes"].as_u64())
        .unwrap_or_else(|| panic!("no allocator call at {function}:{line}: {report:#}"))
}

fn assert_holds(site: &Value, count: u64, payload: u64) {
    let live = site["live_bytes"].as_u64().unwrap();
    assert_eq!(site["live_count"], count, "{site:#}");
    assert!(
        live >= count * payload && live <= count * (payload + OVERHEAD),
        "{count} objects of {payload} bytes each, within {OVERHEAD} bytes of overhead; got {live}: {site:#}"
    );
}

fn check(python: &Path, version: &str) {
    let report = trace(python);
    let info = &report["processes"][0]["python"];
    assert_eq!(info["version"], version, "{report:#}");
    assert!(info["unsupported"].is_null(), "{info:#}");
    assert_holds(site(&report, "cache_results", marker("cache")), 40, 100_000);
    assert_holds(
        site(&report, "keep_one_large_object", marker("large")),
        1,
        4_000_000,
    );
    assert_holds(
        site(&report, "thread_worker", marker("thread")),
        10,
        200_000,
    );
    // With the GIL released (a ctypes call), the frames are still the thread's.
    let no_gil = site(&report, "malloc_without_the_gil", marker("no-gil"));
    assert_eq!(
        (no_gil["live_count"].as_u64(), no_gil["live_bytes"].as_u64()),
        (Some(3), Some(2_100_000)),
        "{no_gil:#}"
    );
    // A forked child keeps its parent's interpreter: its site is its own, with its pid.
    let child = site(&report, "forked_child_site", marker("forked"));
    assert_holds(child, 5, 150_000);
    let parent = report["processes"][0]["pid"].as_u64();
    assert!(child["pid"].as_u64() != parent, "{child:#}");
    // Dropped at once, 2000 times: nothing held, and listed only as churn (at least 100 a second over the whole
    // trace, however long a loaded machine makes it).
    let dropped = site(&report, "drop_buffers", marker("dropped"));
    assert_eq!(
        (
            dropped["live_bytes"].as_u64(),
            dropped["total_count"].as_u64()
        ),
        (Some(0), Some(2000)),
        "{dropped:#}"
    );
    assert_eq!(dropped["verdict"], "churn", "{dropped:#}");
    assert_eq!(report["complete"], true, "{report:#}");
    // The outer frames follow, innermost first: cache_results is called from main.
    let stack = site(&report, "cache_results", marker("cache"))["stack"]
        .as_array()
        .unwrap();
    let python: Vec<&str> = stack
        .iter()
        .filter(|f| f["lang"] == "python")
        .map(|f| f["function"].as_str().unwrap())
        .collect();
    assert_eq!(python[..2], ["cache_results", "main"], "{stack:#?}");
    assert!(
        stack
            .iter()
            .all(|f| f["lang"] != "python" || f["file"].is_string()),
        "a whole stack has no missing-frames mark: {stack:#?}"
    );
    // Sixty calls deep, more than a record holds: the innermost frames are there, and the outermost are said
    // to be missing rather than silently dropped.
    let deep = site(&report, "recurse_then_allocate", marker("deep"));
    assert_holds(deep, 1, 120_000);
    let python: Vec<&Value> = deep["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["lang"] == "python")
        .collect();
    let (missing, captured) = python.split_last().unwrap();
    assert_eq!(
        (&missing["function"], &missing["file"]),
        (
            &Value::from("(outer frames not captured: deeper than 48)"),
            &Value::Null
        ),
        "{deep:#}"
    );
    assert!(
        captured.len() >= 40
            && captured
                .iter()
                .all(|f| f["function"] == "recurse_then_allocate"),
        "{deep:#}"
    );
}

/// A shared libpython is mapped by the loader after the exec: the process is stopped there until alloctrace has
/// found the interpreter, so that even the first line of the script has its Python frames, however slowly
/// alloctrace reads libpython (on a loaded machine, its symbols took longer than CPython's start-up).
#[test]
fn the_first_line_of_a_script_has_its_python_frames() {
    let script = workspace().join("tests/workloads/first_line.py");
    for version in ["3.10", "3.12"] {
        let report = trace_script(&pyenv(version), &script);
        assert_eq!(report["complete"], true, "{report:#}");
        let python = &report["processes"][0]["python"];
        assert_eq!(python["version"], version);
        // The interpreter a loader maps after the exec, which the hold is for.
        assert!(
            python["path"]
                .as_str()
                .is_some_and(|p| p.contains("/libpython")),
            "{python:#}"
        );
        assert_holds(site_in(&report, &script, "<module>", 1), 1, 3_000_000);
        // And it is the only block of its size: none went to a stack without Python frames.
        let blocks_of_its_size: u64 = report["sites"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| ALLOCATOR_CALLS.iter().any(|kind| s["kind"] == *kind))
            .filter(|s| {
                let max = s["size_histogram"]["max"].as_u64().unwrap_or(0);
                (3_000_000..3_000_000 + OVERHEAD).contains(&max)
            })
            .map(|s| s["total_count"].as_u64().unwrap())
            .sum();
        assert_eq!(blocks_of_its_size, 1, "{report:#}");
    }
}

/// A module's code object is freed once its import is done, often before alloctrace could read it from the
/// process: the kernel copies each new code object of a stack, with its names and line table, as the stack is
/// taken. Each of the 40 modules the workload writes and imports is named with its file, `<module>` and line 3,
/// where it allocates a block of its own size, and no frame is unreadable.
#[test]
fn imported_modules_keep_their_names_once_their_code_objects_are_freed() {
    let script = workspace().join("tests/workloads/imports.py");
    for version in ["3.8", "3.11", "3.13"] {
        let report = trace_script(&pyenv(version), &script);
        assert_eq!(report["complete"], true, "{report:#}");
        assert_eq!(report["unreadable_python_frames"], 0, "{report:#}");
        // The modules are written into a fresh temporary directory: found from the first one's frames.
        let first = report["sites"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["stack"].as_array().unwrap())
            .filter_map(|f| f["file"].as_str())
            .find(|file| file.ends_with("/generated_0.py"))
            .unwrap_or_else(|| panic!("Python {version}: no frame of generated_0.py: {report:#}"));
        let directory = Path::new(first).parent().unwrap();
        for index in 0..40u64 {
            let module = directory.join(format!("generated_{index}.py"));
            assert_holds(
                site_in(&report, &module, "<module>", 3),
                1,
                200_000 + 4096 * index,
            );
        }
    }
}

#[test]
fn cpython_3_8() {
    check(&pyenv("3.8"), "3.8");
}

#[test]
fn cpython_3_9() {
    check(&pyenv("3.9"), "3.9");
}

#[test]
fn cpython_3_10() {
    check(&pyenv("3.10"), "3.10");
}

#[test]
fn cpython_3_11_with_a_shared_libpython() {
    check(&pyenv("3.11"), "3.11");
}

#[test]
fn cpython_3_12() {
    check(&pyenv("3.12"), "3.12");
}

#[test]
fn cpython_3_13() {
    check(&pyenv("3.13"), "3.13");
}

#[test]
fn debian_cpython_3_11_linked_into_its_executable() {
    check(Path::new("/usr/bin/python3.11"), "3.11");
}

#[test]
fn cpython_in_a_container_with_its_own_libc_and_libpython() {
    require_root();
    docker::require_docker();
    let prefix = pyenv_prefix("3.12");
    let image = docker::python_image(&prefix, "3.12");
    let name = format!("alloctrace-test-{}", std::process::id());
    let interpreter = prefix.join("bin/python3.12");
    let mut container = Command::new("docker")
        .args([
            "run",
            "-i",
            "--rm",
            "--network",
            "none",
            "--name",
            &name,
            "-v",
        ])
        .arg(format!("{}:/w:ro", workload().parent().unwrap().display()))
        .arg(&image)
        .arg(&interpreter)
        .args(["/w/pysites.py", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(container.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "waiting\n");
    let pid = docker::container_pid(&name);
    let id = docker::container_id(&name);
    let report =
        std::env::temp_dir().join(format!("alloctrace-container-{}.json", std::process::id()));
    let mut tracing = start_tracing_pid(&["leaks", "--format", "json", "--top", "0"], pid, &report);
    // The trace says, as the agent does, whose Python frames it reads.
    assert_eq!(tracing.events.wait_python_frames(pid), "3.12");
    writeln!(container.stdin.as_mut().unwrap(), "go").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    interrupt(tracing);
    drop(container.stdin.take());
    container.wait().unwrap();
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    // The container's libc and libpython are files of the image, not the host's: probed and read through the
    // process's own mappings.
    let process = &report["processes"][0];
    let container = &process["container"];
    assert_eq!(container["runtime"], "docker", "{process:#}");
    assert_eq!(container["name"], name.as_str(), "{process:#}");
    assert_eq!(container["id"], id.as_str(), "{process:#}");
    assert_eq!(container["cgroup"], format!("/docker/{id}"));
    // The interpreter is the container's first process.
    assert_eq!(process["ns_pid"], 1, "{process:#}");
    let libpython = &report["processes"][0]["python"];
    assert_eq!(libpython["version"], "3.12", "{report:#}");
    assert!(libpython["unsupported"].is_null(), "{libpython:#}");
    let in_container = |path: &Path| Path::new("/w").join(path.file_name().unwrap());
    let file = in_container(&workload());
    assert_holds(
        site_in(&report, &file, "cache_results", marker("cache")),
        40,
        100_000,
    );
    assert_holds(
        site_in(&report, &file, "thread_worker", marker("thread")),
        10,
        200_000,
    );
}

#[test]
fn an_oom_kill_in_a_container_is_one_record_with_the_victims_stacks() {
    require_root();
    docker::require_docker();
    let prefix = pyenv_prefix("3.12");
    let image = docker::python_image(&prefix, "3.12");
    let name = format!("alloctrace-oom-{}", std::process::id());
    let records = std::env::temp_dir().join(format!("{name}.jsonl"));
    let (mut command, mut ready) = alloctrace_with_ready_fd();
    let mut tracer = command
        .args(["oom", "--comm", "python3.12", "--format", "json", "-o"])
        .arg(&records)
        .spawn()
        .unwrap();
    ready.wait_ready();
    // It waits for a line, sent once the tracer says it is tracing it, then allocates 1 MiB a step into a 64 MiB
    // limit, fast: a slow climb spends minutes thrashing the page cache before the kill.
    let workload = "import sys\nsys.stdin.readline()\nheld = []\nwhile True:\n    held.append(bytes(1 << 20))  # grows\n";
    let cidfile = std::env::temp_dir().join(format!("{name}.cid"));
    let mut container = Command::new("docker")
        .args(["run", "-i", "--cidfile"])
        .arg(&cidfile)
        .args([
            "--rm",
            "--network",
            "none",
            "--memory=64m",
            "--memory-swap=64m",
            "--name",
            &name,
        ])
        .arg(&image)
        .arg(prefix.join("bin/python3.12"))
        .args(["-c", workload])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = docker::started_container_pid(&name);
    ready.wait_attached(&[pid]);
    writeln!(container.stdin.as_mut().unwrap()).unwrap();
    let run = container.wait().unwrap();
    assert_eq!(run.code(), Some(137), "the container should be OOM-killed");
    // SAFETY: signalling the child we spawned and have not reaped.
    unsafe { libc::kill(tracer.id() as libc::pid_t, libc::SIGINT) };
    assert!(tracer.wait().unwrap().success());
    let text = std::fs::read_to_string(&records).unwrap();
    std::fs::remove_file(&records).unwrap();
    let ours: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["container"]["name"] == name.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "one record for the kill: {text}");
    let record = &ours[0];
    assert_eq!(record["event"], "oom_kill");
    assert_eq!(record["victim"]["comm"], "python3.12", "{record:#}");
    assert_eq!(record["victim"]["ns_pid"], 1, "{record:#}");
    assert!(
        record["victim"]["anon_rss_bytes"].as_u64().unwrap() > 32 << 20,
        "{record:#}"
    );
    assert_eq!(record["container"]["runtime"], "docker");
    let id = std::fs::read_to_string(&cidfile).unwrap();
    std::fs::remove_file(&cidfile).unwrap();
    assert_eq!(record["container"]["id"], id.trim(), "{record:#}");
    assert_eq!(record["memcg"]["limit_bytes"], 64 << 20, "{record:#}");
    assert_eq!(
        record["memcg"]["path"], record["container"]["cgroup"],
        "{record:#}"
    );
    assert_eq!(record["traced"], true, "{record:#}");
    // How it grew, up to the kill.
    let growth = record["growth"].as_array().unwrap();
    let last = growth.last().expect("a sample at the kill");
    assert_eq!(last["seconds_before"], 0.0, "{record:#}");
    assert!(
        last["live_bytes"].as_u64().unwrap() > 32 << 20,
        "{record:#}"
    );
    // What it held: the list of 1 MiB buffers, named by its line.
    let top = &record["top_stacks"][0];
    assert!(top["live_bytes"].as_u64().unwrap() > 32 << 20, "{record:#}");
    let python = top["stack"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["lang"] == "python")
        .unwrap_or_else(|| panic!("no Python frame in the top stack: {record:#}"));
    assert_eq!(
        (&python["function"], &python["line"]),
        (&serde_json::json!("<module>"), &serde_json::json!(5)),
        "{record:#}"
    );
}
