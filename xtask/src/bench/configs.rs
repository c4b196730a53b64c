//! The configurations each workload runs under, the command of each, and the checks of what a traced run
//! recorded: untraced; empty bpftrace probes at alloctrace's places (the floor); alloctrace exact, sampled and
//! without Python frames; the memleak-style bpftrace peer; memray, with and without `--native`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use serde_json::json;

use super::{
    checks::check_python_frames,
    library::{Library, allocator},
    peers::{Memray, bpftrace},
    process::{read_report, remove_stale, run_captured},
    report::{Run, Totals},
    workloads::Workload,
};
use crate::{as_root, root};

/// `--top` for alloctrace's timed runs: every site, so that the checks of Python frames see them all.
const ALL_SITES: &str = "1000000";
/// The sampling period of the sampled column, the one the goal is set at.
pub const SAMPLE_EVERY: &str = "512KiB";

/// The configurations, in the order each round runs them and the table lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Config {
    Untraced,
    EmptyProbes,
    /// alloctrace as users run it: exact, with Python frames for a CPython process.
    Exact,
    /// `alloctrace leaks --sample-every SAMPLE_EVERY`.
    Sampled,
    /// `alloctrace leaks --no-python-frames`.
    NoPythonFrames,
    Peer,
    Memray,
    MemrayNative,
}

impl Config {
    pub const ALL: [Config; 8] = [
        Config::Untraced,
        Config::EmptyProbes,
        Config::Exact,
        Config::Sampled,
        Config::NoPythonFrames,
        Config::Peer,
        Config::Memray,
        Config::MemrayNative,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::EmptyProbes => "empty probes at alloctrace's places (floor)",
            Config::Exact => "alloctrace leaks (exact)",
            Config::Sampled => "alloctrace leaks --sample-every 512KiB",
            Config::NoPythonFrames => "alloctrace leaks --no-python-frames",
            Config::Peer => "bpftrace memleak-style peer",
            Config::Memray => "memray run",
            Config::MemrayNative => "memray run --native",
        }
    }

    /// Its name in `results.json`.
    pub fn key(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::EmptyProbes => "bpftrace_empty_probes",
            Config::Exact => "alloctrace",
            Config::Sampled => "alloctrace_sampled",
            Config::NoPythonFrames => "alloctrace_no_python_frames",
            Config::Peer => "bpftrace_memleak",
            Config::Memray => "memray",
            Config::MemrayNative => "memray_native",
        }
    }

    pub fn is_alloctrace(self) -> bool {
        matches!(
            self,
            Config::Exact | Config::Sampled | Config::NoPythonFrames
        )
    }

    fn is_memray(self) -> bool {
        matches!(self, Config::Memray | Config::MemrayNative)
    }

    /// Whether it applies to `workload`: Python frames and memray only mean something for CPython.
    pub fn applies(self, workload: &Workload) -> bool {
        workload.python.is_some() || !(self == Config::NoPythonFrames || self.is_memray())
    }
}

/// What one workload's runs share: the library copy, the generated empty-probes script, memray's venv.
pub struct Setup {
    pub alloctrace: PathBuf,
    pub workload: Workload,
    pub library: Library,
    pub empty_probes: PathBuf,
    pub memray: Option<Memray>,
    /// Where the runs' logs and reports go.
    pub work: PathBuf,
}

/// Runs the workload once under `config` and checks what the tracer recorded.
pub fn run(config: Config, setup: &Setup) -> anyhow::Result<Run> {
    let workload = &setup.workload;
    let command_line = workload.command(workload.iterations);
    let report_path = setup.work.join(format!("{}.report", config.key()));
    remove_stale(&report_path)?;
    let mut command = match config {
        Config::Untraced => {
            let mut command = Command::new(&command_line[0]);
            command
                .args(&command_line[1..])
                .env("LD_LIBRARY_PATH", &setup.library.dir);
            command
        }
        Config::Exact | Config::Sampled | Config::NoPythonFrames => {
            // Through env, because sudo would drop LD_LIBRARY_PATH; alloctrace passes it on to the workload.
            let mut command = as_root("env")?;
            command
                .arg(setup.library.env_assignment())
                .arg(&setup.alloctrace)
                .args(["leaks", "--top", ALL_SITES, "--format", "json", "-o"])
                .arg(&report_path);
            match config {
                Config::Sampled => command.args(["--sample-every", SAMPLE_EVERY]),
                Config::NoPythonFrames => command.arg("--no-python-frames"),
                _ => &mut command,
            };
            command.arg("--").args(&command_line);
            command
        }
        Config::Peer => {
            let mut command = bpftrace(&command_line, &setup.library)?;
            command
                .env("BPFTRACE_MAP_KEYS_MAX", workload.peer_map_keys.to_string())
                .arg(root().join("xtask/bench/memleak.bt"))
                .arg(&setup.library.path);
            command
        }
        Config::EmptyProbes => {
            let mut command = bpftrace(&command_line, &setup.library)?;
            command.arg(&setup.empty_probes).arg(&setup.library.path);
            command
        }
        Config::Memray | Config::MemrayNative => {
            let memray = setup
                .memray
                .as_ref()
                .context("memray runs only Python workloads")?;
            // memray traces in-process: the script runs on the venv's python, the same interpreter.
            let mut command = Command::new(&memray.python);
            command
                .env("LD_LIBRARY_PATH", &setup.library.dir)
                .args(["-m", "memray", "run", "--quiet"]);
            if config == Config::MemrayNative {
                command.arg("--native");
            }
            command.arg("-o").arg(&report_path).args(&command_line[1..]);
            command
        }
    };
    let outcome = run_captured(
        &mut command,
        &setup.work.join(format!("{}.log", config.key())),
    )?;
    let loop_time = outcome.loop_time();
    let Some((loop_ns, ops)) = loop_time.filter(|_| outcome.status.success()) else {
        let what = match config {
            Config::Peer | Config::EmptyProbes => "bpftrace failed to attach its probes or to run",
            _ => "the run failed",
        };
        bail!(
            "{} workload, {}: {what} ({}):\n{}",
            workload.key,
            config.name(),
            outcome.status,
            outcome.tail()
        );
    };
    let mut run = Run {
        loop_ns,
        ops,
        wall: outcome.wall,
        lost: Vec::new(),
        totals: None,
    };
    if config.is_alloctrace() {
        check_alloctrace_report(config, setup, &report_path, &mut run)?;
    } else if config.is_memray() {
        let size = fs::metadata(&report_path).map(|m| m.len()).unwrap_or(0);
        ensure!(
            size > 0,
            "{} workload under {}: memray wrote no capture file at {}",
            workload.key,
            config.name(),
            report_path.display()
        );
    }
    Ok(run)
}

/// The run's report must be the workload's, exited cleanly, probed at the copy's places and have the Python
/// frames its configuration says; its `lost` counters and totals go into `run`.
fn check_alloctrace_report(
    config: Config,
    setup: &Setup,
    report_path: &Path,
    run: &mut Run,
) -> anyhow::Result<()> {
    let workload = &setup.workload;
    let library = &setup.library;
    let report = read_report(report_path)?;
    let exit = &report["processes"][0]["exit"];
    ensure!(
        *exit == json!({"code": 0}),
        "{} workload under {}: exit {exit}",
        workload.key,
        config.name()
    );
    let (path, placements) = allocator(&report)?;
    if path.canonicalize().ok() != library.path.canonicalize().ok()
        || placements != library.placements
    {
        bail!(
            "{} workload under {}: it probed {} at {placements:?}, not the bench's copy {} at {:?}: the \
             comparison with bpftrace would be meaningless",
            workload.key,
            config.name(),
            path.display(),
            library.path.display(),
            library.placements
        );
    }
    if let Some(python) = &workload.python {
        // Sampled counts are estimates: only the exact configuration can be held to the loop's exact count.
        let exact = python
            .exact
            .as_ref()
            .filter(|_| config == Config::Exact)
            .map(|python_loop| (python_loop, workload.iterations));
        check_python_frames(
            &report,
            config != Config::NoPythonFrames,
            &python.file,
            exact,
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
    run.lost = counters
        .iter()
        .map(|(name, n)| (name.clone(), n.as_u64().unwrap_or(0)))
        .collect();
    let allocated_bytes = report["sites"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|site| site["total_bytes"].as_u64().unwrap_or(0))
        .sum();
    run.totals = Some(Totals {
        allocated_bytes,
        live_bytes: report["live_bytes"]
            .as_u64()
            .context("alloctrace's report has no live_bytes")?,
    });
    Ok(())
}
