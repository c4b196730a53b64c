//! The workloads the bench times, each a program that times its own loop and prints `elapsed_ns=N ops=N`
//! (`xtask/bench/`): a C `free(malloc(64))` loop; a CPython loop of objects over 512 bytes, 10 Python frames
//! deep; the seed workload (`json.load` of a 225 MB document, then a 10M-int list) on pyenv's CPython 3.11 with
//! a shared libpython; and an import storm like Airflow's start-up on the same interpreter. Preparing one builds
//! or generates what it needs under `target/bench/`.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{checks::PythonLoop, document};
use crate::{check, root};

/// The workloads `--only` takes, in the order the bench runs them.
pub const NAMES: [&str; 4] = ["c", "python", "seed", "imports"];

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
/// Iterations of the loops' short run that finds where alloctrace puts its probes.
const PLACEMENT_ITERATIONS: u64 = 10;
/// The interpreter of the CPython loop: Debian's, present on every machine of this kind.
const DEBIAN_PYTHON: &str = "/usr/bin/python3";
/// The interpreter of the seed workload and the import storm, under `$HOME`: pyenv's 3.11.7, built with a
/// shared libpython, as the seed's service and Airflow's venvs run.
const PYENV_PYTHON: &str = ".pyenv/versions/3.11.7/bin/python3.11";
/// Loads of the document (each followed by the 10M-int list) per run: about 5 s untraced.
const SEED_LOOPS: u64 = 3;
/// Imports of the synthetic package per run, after the standard library's: about 1.3 s untraced.
const IMPORT_ROUNDS: u64 = 3;
/// Keys each bpftrace map of the peer holds (bpftrace's default is 4,096): a full `@live` would drop blocks
/// silently and make the peer look cheaper. CPython holds about a thousand blocks from its start-up.
const PEER_MAP_KEYS: u64 = 65_536;
/// The same for the seed workload, whose parsed document holds a malloc'd description string for most of its
/// 200,000 records at once: alloctrace counts about 160,000 mallocs a load.
const SEED_PEER_MAP_KEYS: u64 = 1 << 19;
/// The same for the import storm: alloctrace counts about 112,000 allocations a run in all, so that no more
/// can be live at once.
const IMPORTS_PEER_MAP_KEYS: u64 = 1 << 17;

pub struct Workload {
    pub key: &'static str,
    pub title: String,
    /// The command without its last argument, the iteration count.
    pub program: Vec<OsString>,
    pub iterations: u64,
    /// Iterations of the short run that finds where alloctrace puts its probes.
    pub placement_iterations: u64,
    /// Runs of each configuration when `--runs` does not say.
    pub default_runs: u32,
    /// What one of the ops the workload reports is.
    pub op: &'static str,
    /// `BPFTRACE_MAP_KEYS_MAX` for the peer.
    pub peer_map_keys: u64,
    pub python: Option<Python>,
}

/// A CPython workload.
pub struct Python {
    pub interpreter: PathBuf,
    /// memray's venv of this interpreter, under `target/bench/memray/`.
    pub venv: &'static str,
    /// The script, as its code objects name it (the path it was started with).
    pub file: String,
    /// The loop's exact Python stack, where the workload makes it known.
    pub exact: Option<PythonLoop>,
}

impl Workload {
    pub fn command(&self, iterations: u64) -> Vec<OsString> {
        let mut command = self.program.clone();
        command.push(iterations.to_string().into());
        command
    }
}

/// The workload named `key` (one of `NAMES`), with what it needs built or generated under `dir`.
pub fn prepare(key: &str, dir: &Path) -> anyhow::Result<Workload> {
    let bench = root().join("xtask/bench");
    match key {
        "c" => {
            let c_loop = dir.join("alloc_loop");
            // With frame pointers the user stacks both tracers take are whole (loop, main, libc's start), so
            // walking them costs what it does in code built for profiling.
            check(
                Command::new("cc")
                    .args(["-O2", "-fno-omit-frame-pointer", "-o"])
                    .arg(&c_loop)
                    .arg(bench.join("alloc_loop.c")),
            )?;
            Ok(Workload {
                key: "c",
                title: format!("C loop: {C_ITERATIONS} x free(malloc(64))"),
                program: vec![c_loop.into()],
                iterations: C_ITERATIONS,
                placement_iterations: PLACEMENT_ITERATIONS,
                default_runs: 5,
                op: "allocator call",
                peer_map_keys: PEER_MAP_KEYS,
                python: None,
            })
        }
        "python" => {
            let interpreter = interpreter(PathBuf::from(DEBIAN_PYTHON), "apt-get install python3")?;
            let (script, file) = script(&bench, "alloc_loop.py")?;
            Ok(Workload {
                key: "python",
                title: format!(
                    "CPython loop ({DEBIAN_PYTHON}), {PYTHON_DEPTH} Python frames deep: {PYTHON_ITERATIONS} x \
                     bytes(1000), bytearray(4096), list of 200 doubled"
                ),
                program: vec![
                    interpreter.clone().into(),
                    script,
                    PYTHON_DEPTH.to_string().into(),
                ],
                iterations: PYTHON_ITERATIONS,
                placement_iterations: PLACEMENT_ITERATIONS,
                default_runs: 5,
                op: "allocator call",
                peer_map_keys: PEER_MAP_KEYS,
                python: Some(Python {
                    interpreter,
                    venv: "debian-python3",
                    file,
                    exact: Some(PythonLoop {
                        function: "allocate",
                        depth: PYTHON_DEPTH,
                        stacks_per_iteration: PYTHON_STACKS_PER_ITERATION,
                    }),
                }),
            })
        }
        "seed" => {
            let interpreter = pyenv_python()?;
            let document = document::ensure(&dir.join("seed"))?;
            let (script, file) = script(&bench, "seed_workload.py")?;
            Ok(Workload {
                key: "seed",
                title: format!(
                    "seed workload (pyenv CPython 3.11.7, shared libpython): {SEED_LOOPS} x (json.load of {} \
                     records, {} MB; [x for x in range(10_000_000)])",
                    document::RECORDS,
                    file_mb(&document)?
                ),
                program: vec![interpreter.clone().into(), script, document.into()],
                iterations: SEED_LOOPS,
                // The interpreter's start allocates enough to find the probes: no load needed.
                placement_iterations: 0,
                default_runs: 3,
                op: "loop",
                peer_map_keys: SEED_PEER_MAP_KEYS,
                python: Some(Python {
                    interpreter,
                    venv: "pyenv-3.11.7",
                    file,
                    exact: None,
                }),
            })
        }
        "imports" => {
            let interpreter = pyenv_python()?;
            let (script, file) = script(&bench, "import_storm.py")?;
            let modules = dir.join("imports");
            check(
                Command::new(&interpreter)
                    .arg(&script)
                    .arg("--prepare")
                    .arg(&modules),
            )?;
            Ok(Workload {
                key: "imports",
                title: format!(
                    "import storm (pyenv CPython 3.11.7): ~100 stdlib modules, then {IMPORT_ROUNDS} x a package \
                     of 300 synthetic modules (classes, enums, dataclasses, functions) from .pyc"
                ),
                program: vec![interpreter.clone().into(), script, modules.into()],
                iterations: IMPORT_ROUNDS,
                placement_iterations: 0,
                default_runs: 5,
                op: "module",
                peer_map_keys: IMPORTS_PEER_MAP_KEYS,
                python: Some(Python {
                    interpreter,
                    venv: "pyenv-3.11.7",
                    file,
                    exact: None,
                }),
            })
        }
        _ => bail!(
            "no workload {key:?}: the workloads are {}",
            NAMES.join(", ")
        ),
    }
}

fn interpreter(path: PathBuf, fix: &str) -> anyhow::Result<PathBuf> {
    if !path.exists() {
        bail!(
            "the bench runs Python workloads on {}, which is missing: {fix}",
            path.display()
        );
    }
    Ok(path)
}

fn pyenv_python() -> anyhow::Result<PathBuf> {
    let home = env::var_os("HOME")
        .context("HOME is not set: the bench looks for pyenv's CPython there")?;
    interpreter(
        Path::new(&home).join(PYENV_PYTHON),
        "install it with `pyenv install 3.11.7` built with --enable-shared",
    )
}

/// A script of `xtask/bench/`: its path as an argument, and as the code objects will name it.
fn script(bench: &Path, name: &str) -> anyhow::Result<(OsString, String)> {
    let path = bench.join(name);
    let file = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?
        .to_owned();
    Ok((path.into(), file))
}

fn file_mb(path: &Path) -> anyhow::Result<u64> {
    let len = path
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    Ok(len / 1_000_000)
}
