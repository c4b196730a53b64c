//! `cargo xtask`: the development tasks, one module each. Every task that needs the eBPF build chain runs
//! `setup` first, so on a fresh machine one command does everything.

mod airflow;
mod bench;
mod build;
mod packages;
mod run;
mod setup;
mod test;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build needs: rust-src for nightly, and bpf-linker built against nightly's LLVM.
    Setup,
    /// Setup, then build `target/release/alloctrace` with its eBPF programs embedded.
    Build,
    /// Build, then run `alloctrace ARGS` as root; with no ARGS, trace the bundled demo task.
    Run {
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Setup, unit tests, then the integration tests that need root and a real kernel.
    Test {
        /// Only integration tests whose name contains this.
        filter: Option<String>,
    },
    /// Build, then measure what tracing costs the bench's workloads: untraced, under empty probes at
    /// alloctrace's places, alloctrace exact, sampled and without Python frames, the agent's watch tier, a
    /// memleak-style bpftrace script and memray; medians and ratios in one Markdown table.
    Bench {
        /// Only this workload (repeatable); all of them by default. `soak` (only when named) runs the agent
        /// while containers come and go, and with 100 at once, and reads its memory.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(bench::JOBS))]
        only: Vec<String>,
        /// Runs of each configuration, whose median is reported [default: 3 for seed, 5 for the others].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        runs: Option<u32>,
        /// How long the soak runs, in minutes (a shorter run for a quick look).
        #[arg(long, value_name = "MINUTES", default_value_t = 10.0)]
        soak_minutes: f64,
    },
    /// Build, install Airflow 2.10.5 into a venv (PyPI), then run a real Airflow task untraced and under
    /// `alloctrace leaks` with default flags: wall times, losses, the tracer's peak RSS, the DAG's lines.
    Airflow,
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => build::run().map(|_| ()),
        Task::Run { args } => run::run(args),
        Task::Test { filter } => test::run(filter),
        Task::Bench {
            only,
            runs,
            soak_minutes,
        } => bench::run(&bench::Options {
            only,
            runs,
            soak_minutes,
        }),
        Task::Airflow => airflow::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A command that runs as root: itself when we are root, else under sudo (keeping the environment).
fn as_root(program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
    if is_root() {
        return Ok(Command::new(program));
    }
    if Command::new("sudo").arg("--version").output().is_err() {
        bail!("this task needs root, and sudo is not installed: run it as root");
    }
    let mut command = Command::new("sudo");
    command.arg("-E").arg(program);
    Ok(command)
}

/// Runs a command to completion; a failure names it.
fn check(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}
