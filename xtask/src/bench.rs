//! `cargo xtask bench [--runs N]`: what tracing costs a process. Two allocation loops (`xtask/bench/`: a C
//! `free(malloc(64))` loop and a CPython loop of objects over 512 bytes, 10 Python frames deep) run untraced,
//! under alloctrace, under a memleak-style bpftrace script (the peer, `xtask/bench/memleak.bt`), and under empty
//! bpftrace probes exactly where alloctrace puts its own, the floor any uprobe tracer pays there. The CPython
//! loop also runs under `alloctrace --no-python-frames`: the difference is what walking the Python frames costs
//! at each captured stack. Each configuration runs N times, in rounds so that drift spreads over all of them;
//! the table gives medians and ratios, and `target/bench/results.json` the same numbers.
//!
//! Every alloctrace run of the CPython loop is checked to have recorded what its configuration says: with
//! Python frames, every allocation of the loop with all its Python frames; without, no Python frame at all.
//!
//! The workloads time their own loops: the tracers differ in how long they take to start and to detach
//! (alloctrace's exit waits while the kernel removes its uprobes), and that is not the cost of tracing. Wall
//! time is recorded beside it, for information.
//!
//! Every configuration runs its workload on a copy of the allocator's library, reached through
//! `LD_LIBRARY_PATH`, because of two limits of Debian's bpftrace 0.17. Its uprobes are not scoped to a process,
//! even with `-c` or `-p`: on the system's libc they would fire in every process on the host, slowing the host
//! and the bench with it. And it refuses a probe inside a function, having no disassembler to check the
//! instruction boundary (`--unsafe` does not help), where alloctrace probes `free` past its NULL check. So the
//! copy gets a symbol at each of alloctrace's entry points, `alloctrace_<function>_entry`, which bpftrace can
//! probe by name. The copy's code is the library's, byte for byte, and every alloctrace run checks that it
//! probes the copy at the places it chose on the original.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use crate::{as_root, build, check, packages, root};

/// `free(malloc(64))` pairs in the C loop: about 3 s of loop under the peer, the slowest configuration.
const C_ITERATIONS: u64 = 200_000;
/// Iterations of the CPython loop, seven allocator calls each: about 1.5 s of loop under the peer.
const PYTHON_ITERATIONS: u64 = 30_000;
/// Python frames on the stack at each allocation of the CPython loop: the cost of walking them grows with their
/// number, and an application rarely allocates at the top of its stack.
const PYTHON_DEPTH: usize = 10;
/// Of the CPython loop's seven allocator calls per iteration, those that capture a stack: calloc, two mallocs
/// and a realloc; the three frees do not.
const PYTHON_STACKS_PER_ITERATION: u64 = 4;
/// The function of `alloc_loop.py` whose loop allocates: the innermost Python frame of the loop's stacks.
const PYTHON_LOOP_FUNCTION: &str = "allocate";
/// Iterations of the short run that finds where alloctrace puts its probes.
const PLACEMENT_ITERATIONS: u64 = 10;
/// The interpreter of the CPython workload: Debian's, present on every machine of this kind.
const PYTHON: &str = "/usr/bin/python3";
/// A run that takes longer than this is stuck, not slow.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// `--top` for alloctrace's timed runs: every site, so that the checks of Python frames see them all.
const ALL_SITES: &str = "1000000";
/// Keys each bpftrace map of the peer holds (bpftrace's default is 4,096): a full `@live` would drop blocks
/// silently and make the peer look cheaper. CPython holds about a thousand blocks from its start-up.
const PEER_MAP_KEYS: &str = "65536";

pub fn run(runs: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    let alloctrace = build::run()?;
    let bpftrace = bpftrace_version()?;
    let dir = root().join("target/bench");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut measured = Vec::new();
    for workload in workloads(&dir)? {
        measured.push(measure(&alloctrace, &workload, runs, &dir)?);
    }
    print_table(&measured, runs, &bpftrace);
    let results = dir.join("results.json");
    let json = json!({
        "runs": runs,
        "bpftrace": bpftrace,
        "workloads": measured.iter().map(Measured::to_json).collect::<Vec<_>>(),
    });
    fs::write(&results, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("cannot write {}", results.display()))?;
    println!(
        "\nsame numbers in {}; the bench took {:.0} s",
        results.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// bpftrace's version, installing Debian's package when it is missing: the peer columns are not optional.
fn bpftrace_version() -> anyhow::Result<String> {
    let version = || {
        let out = Command::new("bpftrace").arg("--version").output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    if let Some(version) = version() {
        return Ok(version);
    }
    packages::ensure(&["bpftrace"], "the peer the bench compares alloctrace with")?;
    version().context("bpftrace was installed but `bpftrace --version` fails")
}

struct Workload {
    key: &'static str,
    title: String,
    /// The command without its last argument, the iteration count.
    program: Vec<OsString>,
    iterations: u64,
    /// For the CPython workload, its loop's Python stack.
    python: Option<PythonLoop>,
}

/// What alloctrace must find in the CPython loop's allocations when it reads Python frames.
#[derive(Clone)]
struct PythonLoop {
    /// The script, as its code objects name it (the path it was started with).
    file: String,
    /// Python frames at each allocation.
    depth: usize,
    /// Allocations (captured stacks) per iteration.
    stacks_per_iteration: u64,
}

impl Workload {
    fn command(&self, iterations: u64) -> Vec<OsString> {
        let mut command = self.program.clone();
        command.push(iterations.to_string().into());
        command
    }

    /// The configurations that apply, in the order each round runs them: without Python frames only for the
    /// CPython workload, which is the only one that has any.
    fn configs(&self) -> Vec<Config> {
        Config::ALL
            .into_iter()
            .filter(|&config| config != Config::NoPythonFrames || self.python.is_some())
            .collect()
    }
}

fn workloads(dir: &Path) -> anyhow::Result<Vec<Workload>> {
    if !Path::new(PYTHON).exists() {
        bail!("the CPython workload runs on {PYTHON}, which is missing: apt-get install python3");
    }
    let bench = root().join("xtask/bench");
    let c_loop = dir.join("alloc_loop");
    // With frame pointers the user stacks both tracers take are whole (loop, main, libc's start), so walking
    // them costs what it does in code built for profiling.
    check(
        Command::new("cc")
            .args(["-O2", "-fno-omit-frame-pointer", "-o"])
            .arg(&c_loop)
            .arg(bench.join("alloc_loop.c")),
    )?;
    let script = bench.join("alloc_loop.py");
    let file = script
        .to_str()
        .with_context(|| format!("{} is not UTF-8", script.display()))?
        .to_owned();
    Ok(vec![
        Workload {
            key: "c",
            title: format!("C loop: {C_ITERATIONS} x free(malloc(64))"),
            program: vec![c_loop.into()],
            iterations: C_ITERATIONS,
            python: None,
        },
        Workload {
            key: "python",
            title: format!(
                "CPython loop ({PYTHON}), {PYTHON_DEPTH} Python frames deep: {PYTHON_ITERATIONS} x bytes(1000), \
                 bytearray(4096), list of 200 doubled"
            ),
            program: vec![
                PYTHON.into(),
                script.into(),
                PYTHON_DEPTH.to_string().into(),
            ],
            iterations: PYTHON_ITERATIONS,
            python: Some(PythonLoop {
                file,
                depth: PYTHON_DEPTH,
                stacks_per_iteration: PYTHON_STACKS_PER_ITERATION,
            }),
        },
    ])
}

/// The configurations, in the order each round runs them; their values index `Measured::runs`.
#[derive(Clone, Copy, PartialEq)]
enum Config {
    Untraced,
    /// alloctrace as users run it: with Python frames, for a CPython process.
    Alloctrace,
    /// `alloctrace --no-python-frames`.
    NoPythonFrames,
    Peer,
    EmptyProbes,
}

impl Config {
    const ALL: [Config; 5] = [
        Config::Untraced,
        Config::Alloctrace,
        Config::NoPythonFrames,
        Config::Peer,
        Config::EmptyProbes,
    ];

    fn name(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::Alloctrace => "alloctrace",
            Config::NoPythonFrames => "alloctrace, no Python frames",
            Config::Peer => "bpftrace memleak-style",
            Config::EmptyProbes => "bpftrace empty probes",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::Alloctrace => "alloctrace",
            Config::NoPythonFrames => "alloctrace_no_python_frames",
            Config::Peer => "bpftrace_memleak",
            Config::EmptyProbes => "bpftrace_empty_probes",
        }
    }

    fn is_alloctrace(self) -> bool {
        matches!(self, Config::Alloctrace | Config::NoPythonFrames)
    }
}

/// Where alloctrace puts one function's probes, from its JSON report.
#[derive(Debug, PartialEq)]
struct Placement {
    function: String,
    /// ELF virtual address of the function's start, where its return probe goes.
    address: u64,
    file_offset: u64,
    /// Bytes past the start where its entry probe goes.
    entry_offset: u64,
}

impl Placement {
    /// The symbol the bench adds to its copy of the library at the entry probe.
    fn entry_symbol(&self) -> String {
        format!("alloctrace_{}_entry", self.function)
    }
}

/// The copy of the allocator's library that the workload runs on in every configuration.
struct Library {
    dir: PathBuf,
    path: PathBuf,
    placements: Vec<Placement>,
}

/// One run of one configuration.
struct Run {
    loop_ns: u64,
    ops: u64,
    wall: Duration,
    /// alloctrace's `lost` counters, by name; empty for the other configurations.
    lost: Vec<(String, u64)>,
}

impl Run {
    fn ns_per_call(&self) -> f64 {
        self.loop_ns as f64 / self.ops as f64
    }

    fn lost_any(&self) -> bool {
        self.lost.iter().any(|&(_, n)| n > 0)
    }
}

struct Measured {
    key: &'static str,
    title: String,
    ops: u64,
    iterations: u64,
    python: Option<PythonLoop>,
    library: PathBuf,
    placements: Vec<Placement>,
    /// The configurations run, in order.
    configs: Vec<Config>,
    /// Runs by configuration; empty for those not run.
    runs: [Vec<Run>; 5],
}

fn measure(
    alloctrace: &Path,
    workload: &Workload,
    runs: u32,
    dir: &Path,
) -> anyhow::Result<Measured> {
    let work = dir.join(workload.key);
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let library = library(alloctrace, workload, &work)?;
    let empty_probes = work.join("empty_probes.bt");
    fs::write(&empty_probes, empty_probes_script(&library.placements))
        .with_context(|| format!("cannot write {}", empty_probes.display()))?;
    let configs = workload.configs();
    let mut by_config: [Vec<Run>; 5] = Default::default();
    for round in 1..=runs {
        eprint!("xtask: bench: {} run {round}/{runs}:", workload.key);
        for &config in &configs {
            // A failure ends the progress line first, so that its message starts a line of its own.
            let run = run_config(config, alloctrace, workload, &library, &empty_probes, &work)
                .inspect_err(|_| eprintln!())?;
            eprint!("  {} {:.1} ns/call", config.name(), run.ns_per_call());
            by_config[config as usize].push(run);
        }
        eprintln!();
    }
    Ok(Measured {
        key: workload.key,
        title: workload.title.clone(),
        ops: by_config[Config::Untraced as usize][0].ops,
        iterations: workload.iterations,
        python: workload.python.clone(),
        library: library.path,
        placements: library.placements,
        configs,
        runs: by_config,
    })
}

/// Finds where alloctrace probes the workload's allocator with a short run, then makes the copy of that
/// library, with a symbol at each entry probe.
fn library(alloctrace: &Path, workload: &Workload, work: &Path) -> anyhow::Result<Library> {
    let report_path = work.join("placements.json");
    remove_stale(&report_path)?;
    let mut command = as_root(alloctrace)?;
    command
        .args(["leaks", "--format", "json", "-o"])
        .arg(&report_path)
        .arg("--")
        .args(workload.command(PLACEMENT_ITERATIONS));
    let outcome = run_captured(&mut command, &work.join("placements.log"))?;
    if !outcome.status.success() {
        bail!(
            "alloctrace's short run of the {} workload failed ({}):\n{}",
            workload.key,
            outcome.status,
            outcome.tail()
        );
    }
    let (original, placements) = allocator(&read_report(&report_path)?)?;
    let dir = work.join("lib");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(
        original
            .file_name()
            .with_context(|| format!("{} has no file name", original.display()))?,
    );
    let mut objcopy = Command::new("objcopy");
    for placement in &placements {
        objcopy.arg("--add-symbol").arg(format!(
            "{}={:#x},global,function",
            placement.entry_symbol(),
            placement.address + placement.entry_offset
        ));
    }
    check(objcopy.arg(&original).arg(&path))?;
    let names: Vec<String> = placements.iter().map(Placement::entry_symbol).collect();
    size_added_symbols(&path, &names)?;
    Ok(Library {
        dir,
        path,
        placements,
    })
}

/// objcopy adds symbols of size 0, where bpftrace 0.17 refuses any probe ("Offset outside the function
/// bounds"): this gives the named ones a size of one byte, in the copy's `.symtab`.
fn size_added_symbols(path: &Path, names: &[String]) -> anyhow::Result<()> {
    const SHT_SYMTAB: u64 = 2;
    let mut elf = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let shoff = field(&elf, 0x28, 8)?;
    let shentsize = field(&elf, 0x3a, 2)?;
    let header = |index: u64| shoff + index * shentsize;
    let mut symtab = None;
    for index in 0..field(&elf, 0x3c, 2)? {
        if field(&elf, header(index) + 4, 4)? == SHT_SYMTAB {
            symtab = Some(header(index));
        }
    }
    let symtab =
        symtab.with_context(|| format!("objcopy left no .symtab in {}", path.display()))?;
    let (start, size) = (
        field(&elf, symtab + 0x18, 8)?,
        field(&elf, symtab + 0x20, 8)?,
    );
    let entry_size = field(&elf, symtab + 0x38, 8)?;
    ensure!(entry_size >= 24, "{}: odd .symtab entries", path.display());
    let strtab = field(&elf, header(field(&elf, symtab + 0x28, 4)?) + 0x18, 8)?;
    let mut missing: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    for entry in (start..start + size).step_by(entry_size as usize) {
        let name_at = (strtab + field(&elf, entry, 4)?) as usize;
        let name = elf
            .get(name_at..)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        if missing.remove(name.as_ref()) {
            let st_size = (entry + 16) as usize;
            elf.get_mut(st_size..st_size + 8)
                .context("truncated ELF file")?
                .copy_from_slice(&1u64.to_le_bytes());
        }
    }
    ensure!(
        missing.is_empty(),
        "objcopy did not add {missing:?} to {}",
        path.display()
    );
    fs::write(path, elf).with_context(|| format!("cannot write {}", path.display()))
}

/// A little-endian field of `len` bytes at `at`.
fn field(elf: &[u8], at: u64, len: usize) -> anyhow::Result<u64> {
    let bytes = usize::try_from(at)
        .ok()
        .and_then(|at| elf.get(at..at + len))
        .context("truncated ELF file")?;
    Ok(bytes
        .iter()
        .rev()
        .fold(0, |value, &byte| value << 8 | u64::from(byte)))
}

/// Empty probes where alloctrace puts its own: at each function's entry point (by the symbol added to the copy)
/// and, for every function but `free`, a return probe at its start, named by its ELF virtual address, which is
/// what bpftrace takes (it converts it to a file offset through the program headers).
fn empty_probes_script(placements: &[Placement]) -> String {
    let mut script = String::from(
        "// Generated by `cargo xtask bench`: empty probes at alloctrace's places. $1 is the library.\n",
    );
    for placement in placements {
        script += &format!("uprobe:$1:{} {{}}\n", placement.entry_symbol());
        if placement.function != "free" {
            script += &format!("uretprobe:$1:{:#x} {{}}\n", placement.address);
        }
    }
    script
}

fn run_config(
    config: Config,
    alloctrace: &Path,
    workload: &Workload,
    library: &Library,
    empty_probes: &Path,
    work: &Path,
) -> anyhow::Result<Run> {
    let command_line = workload.command(workload.iterations);
    let report_path = work.join("report.json");
    remove_stale(&report_path)?;
    let mut command = match config {
        Config::Untraced => {
            let mut command = Command::new(&command_line[0]);
            command
                .args(&command_line[1..])
                .env("LD_LIBRARY_PATH", &library.dir);
            command
        }
        Config::Alloctrace | Config::NoPythonFrames => {
            // Through env, because sudo would drop LD_LIBRARY_PATH; alloctrace passes it on to the workload.
            let mut command = as_root("env")?;
            command
                .arg(env_assignment(&library.dir))
                .arg(alloctrace)
                .args(["leaks", "--top", ALL_SITES, "--format", "json", "-o"])
                .arg(&report_path);
            if config == Config::NoPythonFrames {
                command.arg("--no-python-frames");
            }
            command.arg("--").args(&command_line);
            command
        }
        Config::Peer => {
            let mut command = bpftrace(&command_line, library)?;
            command
                .env("BPFTRACE_MAP_KEYS_MAX", PEER_MAP_KEYS)
                .arg(root().join("xtask/bench/memleak.bt"))
                .arg(&library.path);
            command
        }
        Config::EmptyProbes => {
            let mut command = bpftrace(&command_line, library)?;
            command.arg(empty_probes).arg(&library.path);
            command
        }
    };
    let outcome = run_captured(&mut command, &work.join(format!("{}.log", config.key())))?;
    let loop_time = outcome.loop_time();
    let Some((loop_ns, ops)) = loop_time.filter(|_| outcome.status.success()) else {
        let what = match config {
            Config::Peer | Config::EmptyProbes => "bpftrace failed to attach its probes or to run",
            Config::Untraced | Config::Alloctrace | Config::NoPythonFrames => "the run failed",
        };
        bail!(
            "{} workload, {}: {what} ({}):\n{}",
            workload.key,
            config.name(),
            outcome.status,
            outcome.tail()
        );
    };
    let mut lost = Vec::new();
    if config.is_alloctrace() {
        let report = read_report(&report_path)?;
        let exit = &report["processes"][0]["exit"];
        ensure!(
            *exit == json!({"code": 0}),
            "{} workload under alloctrace: exit {exit}",
            workload.key
        );
        let (path, placements) = allocator(&report)?;
        if path.canonicalize().ok() != library.path.canonicalize().ok()
            || placements != library.placements
        {
            bail!(
                "{} workload under alloctrace: it probed {} at {placements:?}, not the bench's copy {} at \
                 {:?}: the comparison with bpftrace would be meaningless",
                workload.key,
                path.display(),
                library.path.display(),
                library.placements
            );
        }
        if let Some(python) = &workload.python {
            check_python_frames(
                &report,
                config == Config::Alloctrace,
                workload.iterations,
                python,
            )
            .with_context(|| {
                format!(
                    "{} workload under {}: its report ({}) has not the Python frames it should",
                    workload.key,
                    config.name(),
                    report_path.display()
                )
            })?;
        }
        let counters = report["lost"]
            .as_object()
            .context("alloctrace's report has no `lost` counters")?;
        lost = counters
            .iter()
            .map(|(name, n)| (name.clone(), n.as_u64().unwrap_or(0)))
            .collect();
    }
    Ok(Run {
        loop_ns,
        ops,
        wall: outcome.wall,
        lost,
    })
}

/// With Python frames (`expected`), every allocation of the CPython loop must have been recorded with all its
/// Python frames, the innermost in the loop's function: the loop's sites, those whose innermost Python frame is
/// that, each have exactly `depth` Python frames and together all the loop's allocations. Without, no frame of
/// any site may be Python.
fn check_python_frames(
    report: &Value,
    expected: bool,
    iterations: u64,
    python: &PythonLoop,
) -> anyhow::Result<()> {
    let sites = report["sites"]
        .as_array()
        .context("the report has no sites")?;
    ensure!(
        report["site_count"].as_u64() == Some(sites.len() as u64),
        "the report lists {} of its {} sites",
        sites.len(),
        report["site_count"]
    );
    let python_frames = |site: &Value| -> Vec<Value> {
        site["stack"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|frame| frame["lang"] == "python")
            .cloned()
            .collect()
    };
    if !expected {
        if let Some(site) = sites.iter().find(|site| !python_frames(site).is_empty()) {
            bail!(
                "--no-python-frames, yet a site has Python frames: {}",
                site["stack"]
            );
        }
        return Ok(());
    }
    let interpreter = &report["processes"][0]["python"];
    ensure!(
        interpreter.is_object() && interpreter["unsupported"].is_null(),
        "alloctrace did not read the interpreter's frames: `python` is {interpreter}"
    );
    let mut allocations = 0;
    let mut loop_sites = 0;
    for site in sites {
        let frames = python_frames(site);
        let Some(innermost) = frames.first() else {
            continue;
        };
        if innermost["function"] != PYTHON_LOOP_FUNCTION || innermost["file"] != *python.file {
            continue;
        }
        let names: Vec<String> = frames
            .iter()
            .map(|f| format!("{}:{}", f["function"], f["line"]))
            .collect();
        ensure!(
            frames.len() == python.depth,
            "a site of the loop has {} Python frames, not {}: {}",
            frames.len(),
            python.depth,
            names.join(" < ")
        );
        loop_sites += 1;
        allocations += site["total_count"]
            .as_u64()
            .context("a site without a total_count")?;
    }
    let expected_allocations = iterations * python.stacks_per_iteration;
    // Lost records (shown in the table) leave fewer allocations, but never none.
    let lost = report["lost"]
        .as_object()
        .is_some_and(|lost| lost.values().any(|n| n.as_u64() != Some(0)));
    ensure!(
        allocations == expected_allocations
            || lost && (1..expected_allocations).contains(&allocations),
        "{allocations} allocations in {loop_sites} sites of the loop with Python frames ({}:{}), not {}: the \
         others were recorded without them, or the loop allocates differently",
        python.file,
        PYTHON_LOOP_FUNCTION,
        expected_allocations
    );
    Ok(())
}

/// bpftrace starting the workload itself, held until the probes are attached, on the bench's copy of the
/// library. The caller adds the script and its argument, the library.
fn bpftrace(command_line: &[OsString], library: &Library) -> anyhow::Result<Command> {
    let mut child = vec![OsString::from("/usr/bin/env"), env_assignment(&library.dir)];
    child.extend(command_line.iter().cloned());
    let child: Vec<String> = child
        .into_iter()
        .map(|arg| {
            arg.into_string()
                .map_err(|arg| anyhow::anyhow!("{arg:?} is not UTF-8"))
        })
        .collect::<anyhow::Result<_>>()?;
    // bpftrace splits -c's command at spaces, with no quoting.
    if let Some(arg) = child.iter().find(|arg| arg.contains(char::is_whitespace)) {
        bail!(
            "bpftrace -c cannot pass {arg:?}, which has a space: move the workspace to a path without one"
        );
    }
    let mut command = as_root("bpftrace")?;
    command.arg("-c").arg(child.join(" "));
    Ok(command)
}

fn env_assignment(dir: &Path) -> OsString {
    let mut assignment = OsString::from("LD_LIBRARY_PATH=");
    assignment.push(dir);
    assignment
}

/// Removes a previous run's report, so that a run that writes none is not read as having written it.
fn remove_stale(report: &Path) -> anyhow::Result<()> {
    match fs::remove_file(report) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", report.display()))
        }
        _ => Ok(()),
    }
}

fn read_report(path: &Path) -> anyhow::Result<Value> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// The traced process's allocator library and the places alloctrace probed in it.
fn allocator(report: &Value) -> anyhow::Result<(PathBuf, Vec<Placement>)> {
    let pid = &report["processes"][0]["pid"];
    let allocator = report["allocators"]
        .as_array()
        .and_then(|all| all.iter().find(|a| a["pid"] == *pid))
        .context("alloctrace's report names no allocator for the workload")?;
    let path = allocator["path"]
        .as_str()
        .context("allocator without a path")?;
    let hex = |probe: &Value, key: &str| {
        probe[key]
            .as_str()
            .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            .with_context(|| format!("probe without a hex {key}: {probe}"))
    };
    let placements = allocator["probes"]
        .as_array()
        .context("allocator without probes")?
        .iter()
        .map(|probe| {
            Ok(Placement {
                function: probe["function"]
                    .as_str()
                    .with_context(|| format!("probe without a function: {probe}"))?
                    .to_owned(),
                address: hex(probe, "address")?,
                file_offset: hex(probe, "file_offset")?,
                entry_offset: probe["entry_offset"]
                    .as_u64()
                    .with_context(|| format!("probe without an entry_offset: {probe}"))?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((PathBuf::from(path), placements))
}

struct Outcome {
    status: ExitStatus,
    /// stdout and stderr together.
    output: String,
    wall: Duration,
}

impl Outcome {
    /// The workload's `elapsed_ns=N ops=N` line.
    fn loop_time(&self) -> Option<(u64, u64)> {
        self.output.lines().rev().find_map(|line| {
            let (ns, ops) = line.strip_prefix("elapsed_ns=")?.split_once(" ops=")?;
            Some((ns.parse().ok()?, ops.trim().parse().ok()?))
        })
    }

    fn tail(&self) -> String {
        let lines: Vec<&str> = self.output.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// Runs a command with its output in `log`, a file rather than a pipe, so that waiting with a deadline needs
/// no reader threads; the log of each configuration's last run stays there to read.
fn run_captured(command: &mut Command, log: &Path) -> anyhow::Result<Outcome> {
    let file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let start = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {command:?}"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{command:?} was still running after {} s; its output is in {}",
                RUN_TIMEOUT.as_secs(),
                log.display()
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    let wall = start.elapsed();
    let output = fs::read(log).with_context(|| format!("cannot read {}", log.display()))?;
    Ok(Outcome {
        status,
        output: String::from_utf8_lossy(&output).into_owned(),
        wall,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

impl Measured {
    fn runs_of(&self, config: Config) -> &[Run] {
        &self.runs[config as usize]
    }

    fn ns_per_call(&self, config: Config) -> f64 {
        median(self.runs_of(config).iter().map(Run::ns_per_call).collect())
    }

    fn loop_ms(&self, config: Config) -> f64 {
        median(
            self.runs_of(config)
                .iter()
                .map(|r| r.loop_ns as f64 / 1e6)
                .collect(),
        )
    }

    fn wall_s(&self, config: Config) -> f64 {
        median(
            self.runs_of(config)
                .iter()
                .map(|r| r.wall.as_secs_f64())
                .collect(),
        )
    }

    /// "none", or which alloctrace runs lost what: their numbers are for less work than the others'.
    fn lost(&self, config: Config) -> String {
        if !config.is_alloctrace() {
            return "-".into();
        }
        let runs = self.runs_of(config);
        let lossy: Vec<String> = runs
            .iter()
            .enumerate()
            .filter(|(_, run)| run.lost_any())
            .map(|(i, run)| {
                let counts: Vec<String> = run
                    .lost
                    .iter()
                    .filter(|&&(_, n)| n > 0)
                    .map(|(name, n)| format!("{name} {n}"))
                    .collect();
                format!("run {}: {}", i + 1, counts.join(", "))
            })
            .collect();
        if lossy.is_empty() {
            "none".into()
        } else {
            format!(
                "LOST in {}/{} runs ({})",
                lossy.len(),
                runs.len(),
                lossy.join("; ")
            )
        }
    }

    fn to_json(&self) -> Value {
        let untraced = self.ns_per_call(Config::Untraced);
        let configs: Vec<Value> = self
            .configs
            .iter()
            .map(|&config| {
                let runs = self.runs_of(config);
                json!({
                    "name": config.key(),
                    "median_ns_per_call": self.ns_per_call(config),
                    "slowdown": self.ns_per_call(config) / untraced,
                    "median_loop_ms": self.loop_ms(config),
                    "median_wall_s": self.wall_s(config),
                    "loop_ns": runs.iter().map(|r| r.loop_ns).collect::<Vec<_>>(),
                    "wall_s": runs.iter().map(|r| r.wall.as_secs_f64()).collect::<Vec<_>>(),
                    "lost": config.is_alloctrace().then(|| {
                        runs.iter()
                            .map(|r| r.lost.iter().cloned().collect::<BTreeMap<_, _>>())
                            .collect::<Vec<_>>()
                    }),
                })
            })
            .collect();
        json!({
            "name": self.key,
            "title": self.title,
            "allocator_calls": self.ops,
            "library": self.library,
            "probes": self.placements.iter().map(|p| json!({
                "function": p.function,
                "address": format!("{:#x}", p.address),
                "file_offset": format!("{:#x}", p.file_offset),
                "entry_offset": p.entry_offset,
            })).collect::<Vec<_>>(),
            "configs": configs,
            "alloctrace_vs_bpftrace_memleak": self.ratio(Config::Alloctrace, Config::Peer),
            "alloctrace_vs_empty_probes": self.ratio(Config::Alloctrace, Config::EmptyProbes),
            "python_frames": self.python_frames().map(|cost| json!({
                "depth": cost.depth,
                "captured_stacks": cost.stacks,
                "ns_per_allocator_call": cost.per_call,
                "ns_per_captured_stack": cost.per_stack,
                "ns_per_captured_stack_by_round": cost.by_round,
                "alloctrace_no_python_frames_vs_bpftrace_memleak":
                    self.ratio(Config::NoPythonFrames, Config::Peer),
                "alloctrace_no_python_frames_vs_empty_probes":
                    self.ratio(Config::NoPythonFrames, Config::EmptyProbes),
            })),
        })
    }

    /// One configuration's median cost per call over another's.
    fn ratio(&self, config: Config, other: Config) -> f64 {
        self.ns_per_call(config) / self.ns_per_call(other)
    }

    /// What walking the Python frames costs, per allocator call and per captured stack (every allocation
    /// captures one, frees none): the median over the rounds of alloctrace's loop time less that without Python
    /// frames in the same round, so that drift between rounds does not count.
    fn python_frames(&self) -> Option<PythonFramesCost> {
        let python = self.python.as_ref()?;
        let stacks = self.iterations * python.stacks_per_iteration;
        let by_round: Vec<f64> = self
            .runs_of(Config::Alloctrace)
            .iter()
            .zip(self.runs_of(Config::NoPythonFrames))
            .map(|(with, without)| (with.loop_ns as f64 - without.loop_ns as f64) / stacks as f64)
            .collect();
        let per_stack = median(by_round.clone());
        Some(PythonFramesCost {
            depth: python.depth,
            stacks,
            per_call: per_stack * stacks as f64 / self.ops as f64,
            per_stack,
            by_round,
        })
    }
}

struct PythonFramesCost {
    depth: usize,
    /// Stacks the loop captures.
    stacks: u64,
    per_call: f64,
    per_stack: f64,
    /// ns per captured stack in each round.
    by_round: Vec<f64>,
}

fn print_table(measured: &[Measured], runs: u32, bpftrace: &str) {
    println!(
        "\nalloctrace bench: medians of {runs} run{} per configuration; ns/call is the workload's own loop \
         time over its allocator calls ({bpftrace})",
        if runs == 1 { "" } else { "s" }
    );
    for m in measured {
        println!("\n{} ({} allocator calls)", m.title, m.ops);
        println!(
            "  {:<28} {:>10} {:>11} {:>10} {:>8}  alloctrace lost",
            "configuration", "ns/call", "x untraced", "loop ms", "wall s"
        );
        let untraced = m.ns_per_call(Config::Untraced);
        for &config in &m.configs {
            println!(
                "  {:<28} {:>10.1} {:>11.1} {:>10.1} {:>8.2}  {}",
                config.name(),
                m.ns_per_call(config),
                m.ns_per_call(config) / untraced,
                m.loop_ms(config),
                m.wall_s(config),
                m.lost(config)
            );
        }
        println!(
            "  alloctrace / bpftrace memleak-style: {:.2}    alloctrace / empty probes: {:.2}",
            m.ratio(Config::Alloctrace, Config::Peer),
            m.ratio(Config::Alloctrace, Config::EmptyProbes)
        );
        if let Some(cost) = m.python_frames() {
            println!(
                "  without Python frames: / bpftrace memleak-style: {:.2}    / empty probes: {:.2}",
                m.ratio(Config::NoPythonFrames, Config::Peer),
                m.ratio(Config::NoPythonFrames, Config::EmptyProbes)
            );
            println!(
                "  Python frames, {} deep: {:.0} ns per captured stack, {:.1} ns per allocator call (alloctrace \
                 less alloctrace without Python frames, median over the rounds; the loop captures {} stacks, \
                 one per allocation, none per free)",
                cost.depth, cost.per_stack, cost.per_call, cost.stacks
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/bench/alloc_loop.py";

    fn python_loop() -> PythonLoop {
        PythonLoop {
            file: FILE.into(),
            depth: 3,
            stacks_per_iteration: 2,
        }
    }

    /// A report with a native-only site, and the loop's two sites with these Python frames (innermost first).
    fn report(loop_frames: &[&str], counts: [u64; 2], lost: u64) -> Value {
        let python: Vec<Value> = loop_frames
            .iter()
            .map(|f| json!({"lang": "python", "function": f, "file": FILE, "line": 1}))
            .collect();
        let site = |count: u64| {
            let mut stack = vec![json!({"lang": "native", "function": "malloc"})];
            stack.extend(python.iter().cloned());
            json!({"total_count": count, "stack": stack})
        };
        json!({
            "lost": {"events": lost, "stacks": 0},
            "processes": [{"python": {"version": "3.11", "unsupported": null}}],
            "site_count": 3,
            "sites": [
                {"total_count": 7, "stack": [{"lang": "native", "function": "calloc"}]},
                site(counts[0]),
                site(counts[1]),
            ],
        })
    }

    #[test]
    fn python_frames_of_every_allocation_pass() {
        let frames = ["allocate", "main", "<module>"];
        check_python_frames(&report(&frames, [10, 10], 0), true, 10, &python_loop()).unwrap();
        // Lost records leave fewer allocations.
        check_python_frames(&report(&frames, [10, 9], 1), true, 10, &python_loop()).unwrap();
    }

    #[test]
    fn missing_or_shallow_python_frames_fail() {
        let check = |frames: &[&str], counts, lost| {
            check_python_frames(&report(frames, counts, lost), true, 10, &python_loop())
        };
        // No loop site: none has Python frames.
        assert!(check(&[], [10, 10], 0).is_err());
        assert!(check(&["allocate", "main"], [10, 10], 0).is_err());
        // Some allocations recorded without their Python frames.
        assert!(check(&["allocate", "main", "<module>"], [10, 9], 0).is_err());
    }

    #[test]
    fn python_frames_fail_without_python_frames() {
        let check = |frames: &[&str]| {
            check_python_frames(&report(frames, [10, 10], 0), false, 10, &python_loop())
        };
        check(&[]).unwrap();
        assert!(check(&["allocate", "main", "<module>"]).is_err());
    }

    #[test]
    fn a_cut_report_fails() {
        let mut cut = report(&["allocate", "main", "<module>"], [10, 10], 0);
        cut["site_count"] = json!(4);
        assert!(check_python_frames(&cut, true, 10, &python_loop()).is_err());
    }
}
