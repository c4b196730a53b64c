//! Helpers for alloctrace's integration tests: the binary under test, workloads built from source by the
//! test, and reading reports. The tests load real eBPF programs, so they need root: each says so and fails
//! when it is missing, rather than pass without running.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::OnceLock,
};

use serde_json::Value;

pub mod agent;
pub mod docker;
pub mod ready;

/// The `alloctrace` binary: `ALLOCTRACE` (set by `cargo xtask test`), else the workspace's release build.
pub fn alloctrace() -> PathBuf {
    let path = std::env::var_os("ALLOCTRACE").map_or_else(
        || workspace().join("target/release/alloctrace"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} does not exist: run the integration tests with `cargo xtask test`",
        path.display()
    );
    path
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// pyenv's installation of CPython `3.X` (the newest patch release installed): its prefix, which holds
/// `bin/python3.X`.
pub fn pyenv_prefix(version: &str) -> PathBuf {
    let home = std::env::var("HOME").unwrap();
    let versions = Path::new(&home).join(".pyenv/versions");
    let found = std::fs::read_dir(&versions)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: the Python tests need pyenv's interpreters",
                versions.display()
            )
        })
        .filter_map(|e| e.ok())
        .find(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&format!("{version}."))
                && name[version.len() + 1..]
                    .chars()
                    .all(|c| c.is_ascii_digit())
        })
        .unwrap_or_else(|| panic!("no CPython {version} under {}", versions.display()));
    found.path()
}

/// Fails the test, saying why, when it does not run as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads eBPF programs and needs root: run `cargo xtask test` as root"
    );
}

/// `tests/workloads/NAME.c`, compiled once per test run with frame pointers (so stacks are complete), into
/// the target folder.
pub fn workload(name: &str) -> PathBuf {
    workload_built_by(name, "cc")
}

/// Serializes builds: tests run in parallel, and a linker writes its output before it is complete.
static COMPILING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Like [`workload`], with another C compiler (`musl-gcc` for a program on musl's allocator).
pub fn workload_built_by(name: &str, compiler: &str) -> PathBuf {
    build_workload(name, compiler, "-O0", &["-O0", "-fno-omit-frame-pointer"])
}

/// Like [`workload`], optimized (`-O1 -g`, with frame pointers): functions are laid out and inlined as in a
/// release build, and its DWARF still names every line.
pub fn optimized_workload(name: &str) -> PathBuf {
    build_workload(name, "cc", "-O1", &["-O1", "-fno-omit-frame-pointer"])
}

/// Like [`workload`], built as distributions build their packages: `-O2 -fomit-frame-pointer` (gcc's default
/// on x86-64), so that `rbp` is one more register and the frame-pointer walk finds noise past the first frame.
pub fn workload_without_frame_pointers(name: &str) -> PathBuf {
    build_workload(name, "cc", "-O2-nofp", &["-O2", "-fomit-frame-pointer"])
}

/// Builds `tests/workloads/NAME.c` with `compiler` and `flags` (and `-g -pthread`), once per test run, into
/// `NAME-COMPILERTAG-PID` (its first 15 bytes are the process's name).
fn build_workload(name: &str, compiler: &str, tag: &str, flags: &[&str]) -> PathBuf {
    let _building = COMPILING.lock().unwrap_or_else(|e| e.into_inner());
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let dir = workspace().join("target/workloads");
        std::fs::create_dir_all(&dir).expect("create target/workloads");
        dir
    });
    let source = workspace().join(format!("tests/workloads/{name}.c"));
    let binary = dir.join(format!("{name}-{compiler}{tag}-{}", std::process::id()));
    if !binary.exists() {
        let out = Command::new(compiler)
            .args(flags)
            .args(["-g", "-pthread", "-o"])
            .arg(&binary)
            .arg(&source)
            .output()
            .unwrap_or_else(|e| panic!("{compiler} is needed to build the test workloads: {e}"));
        assert!(
            out.status.success(),
            "{compiler} failed on {}: {}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    binary
}

/// Parses a JSON report, failing with the tracer's output when it is not one.
pub fn json_report(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "alloctrace failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not a JSON report ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The site of `kind` whose innermost frame is `function`.
pub fn site<'a>(report: &'a Value, kind: &str, function: &str) -> &'a Value {
    let sites = report["sites"].as_array().expect("sites is an array");
    let found: Vec<&Value> = sites
        .iter()
        .filter(|s| s["kind"] == kind && s["stack"][0]["function"] == function)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} site in {function}, found {}: {report:#}",
        found.len()
    );
    found[0]
}

/// The sites whose stack passes through `function`, of any kind: mapped memory's first frame is the libc
/// wrapper of the system call.
pub fn sites_through<'a>(report: &'a Value, function: &str) -> Vec<&'a Value> {
    report["sites"]
        .as_array()
        .expect("sites is an array")
        .iter()
        .filter(|s| {
            s["stack"]
                .as_array()
                .is_some_and(|frames| frames.iter().any(|f| f["function"] == function))
        })
        .collect()
}

/// Runs `alloctrace ARGS -- COMMAND…` with JSON output and returns the report.
pub fn trace_json(args: &[&str], command: &[&std::ffi::OsStr]) -> Value {
    let out = Command::new(alloctrace())
        .args(args)
        .args(["--format", "json", "--"])
        .args(command)
        .output()
        .expect("run alloctrace");
    json_report(&out)
}

/// `(live_bytes, live_count)` of a site.
pub fn live(site: &Value) -> (u64, u64) {
    (
        site["live_bytes"].as_u64().expect("live_bytes"),
        site["live_count"].as_u64().expect("live_count"),
    )
}

/// The sites of the `sites` workload with live memory, and what each must hold: (kind, function, bytes, count).
pub const SITES_EXPECTED: [(&str, &str, u64, u64); 5] = [
    ("malloc", "large_site", 8 << 20, 1),
    ("malloc", "leak_site", 100_000, 100),
    ("malloc", "half_freed_site", 51_200, 25),
    ("calloc", "calloc_site", 10_000, 10),
    ("realloc", "realloc_site", 5_000, 1),
];

/// Checks every site of the `sites` workload to the byte.
pub fn assert_sites_exact(report: &Value, pid: u64) {
    for (kind, function, bytes, count) in SITES_EXPECTED {
        let s = site(report, kind, function);
        assert_eq!(live(s), (bytes, count), "{kind} site in {function}: {s:#}");
        assert_eq!(s["pid"], pid);
        let stack: Vec<&str> = s["stack"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f["function"].as_str())
            .collect();
        assert!(
            stack.starts_with(&[function, "main"]),
            "{function}'s stack should be {function} < main: {stack:?}"
        );
    }
    let half = site(report, "malloc", "half_freed_site");
    assert_eq!(
        (half["total_bytes"].as_u64(), half["total_count"].as_u64()),
        (Some(102_400), Some(50))
    );
    let sites = report["sites"].as_array().unwrap();
    for freed in sites
        .iter()
        .filter(|s| s["stack"][0]["function"] == "freed_site")
    {
        // It holds nothing: listed only as churn.
        assert_eq!(live(freed), (0, 0), "{freed:#}");
        assert_eq!(freed["verdict"], "churn", "{freed:#}");
        assert_eq!(freed["freed_count"], 1000, "{freed:#}");
    }
    assert_eq!(report["lost"]["events"], 0, "{report:#}");
    assert_eq!(report["complete"], true, "{report:#}");
}

/// The most memory the tracer may hold, by default, whatever a target does (issue 9).
pub const MAX_TRACER_RSS: u64 = 256 << 20;

/// Checks that the tracer's peak resident memory in `report` stayed within [`MAX_TRACER_RSS`] while tracing
/// `what`, prints it (the figure the issue asks for), and returns it.
pub fn assert_tracer_rss_bounded(report: &Value, what: &str) -> u64 {
    let rss = report["tracer_max_rss_bytes"]
        .as_u64()
        .expect("tracer_max_rss_bytes");
    println!("tracer RSS under {what}: {} MiB", rss >> 20);
    assert!(
        rss <= MAX_TRACER_RSS,
        "under {what} the tracer grew to {rss} bytes, more than {MAX_TRACER_RSS}"
    );
    rss
}

/// `go tool pprof ARGS FILE`'s output.
pub fn go_pprof(args: &[&str], profile: &Path) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(profile)
        .env("HOME", std::env::temp_dir())
        .output()
        .unwrap_or_else(|e| panic!("go (Debian's golang-go) is needed to read pprof files: {e}"));
    assert!(
        out.status.success(),
        "go tool pprof failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A trace started by [`start_tracing_pid`].
pub struct Tracing {
    pub tracer: Child,
    /// Its `--ready-fd`, read up to its ready line.
    pub events: ready::ReadyPipe,
    report: PathBuf,
}

/// Starts `alloctrace ARGS -p PID -o REPORT` on a running process and returns it once it says, on
/// `--ready-fd`, that it traces that process: what the process does from then on is seen.
pub fn start_tracing_pid(args: &[&str], pid: u32, report: &Path) -> Tracing {
    let (mut command, mut events) = ready::alloctrace_with_ready_fd();
    let tracer = command
        .args(args)
        .arg("-p")
        .arg(pid.to_string())
        .arg("-o")
        .arg(report)
        .spawn()
        .unwrap();
    let said = events.wait_ready();
    assert_eq!(said["pids"], serde_json::json!([pid]), "{said}");
    Tracing {
        tracer,
        events,
        report: report.to_owned(),
    }
}

/// Ends a trace as Ctrl-C does, and checks that alloctrace said on `--ready-fd` that it wrote its report, then
/// closed it, and exited 0.
pub fn interrupt(mut tracing: Tracing) {
    // SAFETY: signalling a child the test spawned and has not reaped.
    unsafe { libc::kill(tracing.tracer.id() as libc::pid_t, libc::SIGINT) };
    let wrote = tracing
        .events
        .wait_event("it wrote its report", |line| line["kind"] == "report");
    assert_eq!(
        wrote["wrote"].as_str().map(Path::new),
        Some(std::path::absolute(&tracing.report).unwrap().as_path()),
        "{wrote}"
    );
    tracing.events.wait_closed();
    assert!(tracing.tracer.wait().unwrap().success());
}
