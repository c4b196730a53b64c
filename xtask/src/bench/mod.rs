//! `cargo xtask bench [--only WORKLOAD]... [--runs N]`: what tracing costs a process. Each workload
//! (`workloads`) runs untraced, under empty bpftrace probes exactly where alloctrace puts its own (the floor any
//! uprobe tracer pays there), under alloctrace exact, sampled and without Python frames, under a memleak-style
//! bpftrace script (the peer) and, for CPython, under memray with and without `--native` (`configs`, `peers`).
//! Each configuration runs N times, in rounds so that drift spreads over all of them; one Markdown table gives
//! medians and ratios (`report`), and `target/bench/results.json` the same numbers.
//!
//! The workloads time their own loops: the tracers differ in how long they take to start and to detach
//! (alloctrace's exit waits while the kernel removes its uprobes), and that is not the cost of tracing. Wall
//! time is recorded beside it, for information. Every configuration runs its workload on a private copy of the
//! allocator's library (`library`), and every alloctrace run checks its own report (`checks`).
//!
//! `--only soak` runs another job (`soak`): the agent watching containers that come and go for ten minutes,
//! its resident memory over time, and with 100 containers at once. It runs only when named.

mod checks;
mod configs;
mod document;
mod library;
mod peers;
mod process;
mod report;
mod soak;
mod workloads;

use std::{fs, path::Path, process::Command, time::Instant};

use anyhow::Context as _;
use serde_json::json;

pub use workloads::NAMES;

/// What `--only` takes: the workloads, and the soak, which runs only when named.
pub const JOBS: [&str; NAMES.len() + 1] = {
    let mut jobs = [SOAK; NAMES.len() + 1];
    let mut i = 0;
    while i < NAMES.len() {
        jobs[i] = NAMES[i];
        i += 1;
    }
    jobs
};
const SOAK: &str = "soak";

use configs::{Config, Setup};
use report::{Measured, Run};

use crate::{build, root};

/// What `cargo xtask bench` was asked for.
pub struct Options {
    /// Only these workloads (of `NAMES`); all when empty.
    pub only: Vec<String>,
    /// Runs of each configuration; each workload's default when `None`.
    pub runs: Option<u32>,
    /// How long the soak runs.
    pub soak_minutes: f64,
}

/// What the table says in place of the sampled column's numbers when alloctrace has no `--sample-every`.
const NO_SAMPLE_EVERY: &str = "n/a (no --sample-every)";

pub fn run(options: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let keys: Vec<&str> = NAMES
        .into_iter()
        .filter(|name| options.only.is_empty() || options.only.iter().any(|only| only == name))
        .collect();
    let alloctrace = build::run()?;
    if options.only.iter().any(|only| only == SOAK) {
        let dir = root().join("target/bench");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // Another build's agent (`ALLOCTRACE=PATH`) can be soaked the same way, to compare.
        let agent = std::env::var_os("ALLOCTRACE").map_or_else(|| alloctrace.clone(), Into::into);
        soak::run(&agent, &dir, options.soak_minutes)?;
        if keys.is_empty() {
            return Ok(());
        }
    }
    let bpftrace = peers::bpftrace_version()?;
    let sample_every = supports_sample_every(&alloctrace)?;
    let dir = root().join("target/bench");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut measured = Vec::new();
    for key in keys {
        let workload = workloads::prepare(key, &dir)?;
        let runs = options.runs.unwrap_or(workload.default_runs);
        let setup = setup(&alloctrace, workload, &dir)?;
        measured.push(measure(setup, runs, sample_every)?);
    }
    let context = report::Context {
        bpftrace,
        memray: peers::MEMRAY_VERSION,
    };
    report::print(&measured, &context);
    let results = dir.join("results.json");
    let json = json!({
        "machine": report::machine(),
        "bpftrace": context.bpftrace,
        "memray": context.memray,
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

/// Whether this alloctrace takes `--sample-every`: the sampled column shows `NO_SAMPLE_EVERY` rather than fail
/// the bench on a build that predates the flag.
fn supports_sample_every(alloctrace: &Path) -> anyhow::Result<bool> {
    let out = Command::new(alloctrace)
        .args(["leaks", "--help"])
        .output()
        .with_context(|| format!("cannot run {} leaks --help", alloctrace.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("--sample-every"))
}

/// What the workload's runs share: the library copy with alloctrace's probe places, the empty probes at those
/// places, and memray's venv for a CPython workload.
fn setup(alloctrace: &Path, workload: workloads::Workload, dir: &Path) -> anyhow::Result<Setup> {
    let work = dir.join(workload.key);
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let library = library::library(alloctrace, &workload, &work)?;
    let empty_probes = work.join("empty_probes.bt");
    fs::write(
        &empty_probes,
        peers::empty_probes_script(&library.placements),
    )
    .with_context(|| format!("cannot write {}", empty_probes.display()))?;
    let memray = workload
        .python
        .as_ref()
        .map(|python| {
            peers::Memray::install(&python.interpreter, &dir.join("memray").join(python.venv))
        })
        .transpose()?;
    Ok(Setup {
        alloctrace: alloctrace.to_owned(),
        workload,
        library,
        empty_probes,
        memray,
        work,
    })
}

/// Runs every configuration that applies `runs` times, a round of all of them at a time.
fn measure(setup: Setup, runs: u32, sample_every: bool) -> anyhow::Result<Measured> {
    let workload = &setup.workload;
    let mut unavailable = Vec::new();
    let configs: Vec<Config> = Config::ALL
        .into_iter()
        .filter(|config| config.applies(workload))
        .filter(|&config| {
            let available = config != Config::Sampled || sample_every;
            if !available {
                unavailable.push((config, NO_SAMPLE_EVERY));
            }
            available
        })
        .collect();
    let mut by_config: std::collections::BTreeMap<Config, Vec<Run>> = Default::default();
    for round in 1..=runs {
        eprint!("xtask: bench: {} run {round}/{runs}:", workload.key);
        for &config in &configs {
            // A failure ends the progress line first, so that its message starts a line of its own.
            let run = configs::run(config, &setup).inspect_err(|_| eprintln!())?;
            eprint!("  {} {:.0} ms", config.key(), run.loop_ns as f64 / 1e6);
            by_config.entry(config).or_default().push(run);
        }
        eprintln!();
    }
    Ok(Measured {
        key: workload.key,
        title: workload.title.clone(),
        op: workload.op,
        iterations: workload.iterations,
        python_loop: workload.python.as_ref().and_then(|p| p.exact.clone()),
        library: setup.library.path,
        placements: setup.library.placements,
        runs: by_config,
        unavailable,
    })
}
