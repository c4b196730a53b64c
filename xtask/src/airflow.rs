//! `cargo xtask airflow`: the real Airflow task the exact trace must hold on, measured the way a user would run
//! it. Airflow 2.10.5 is installed from PyPI into a venv of pyenv's CPython 3.11 (a shared libpython, as
//! Airflow's own images have), with a DAG whose PythonOperator builds a 10,000,000-int list (line 11) and keeps
//! a module-level cache of 400 × 128 KiB bytearrays (line 13), says so in a file, then sleeps holding both. The
//! task runs once untraced and then under `alloctrace leaks` with default flags, which is stopped (SIGINT, as a
//! user's Ctrl-C) once the task says it holds everything; the table gives the time from the command's start to
//! that point in both runs, what was lost, the tracer's peak RSS and what the report puts on lines 11 and 13
//! (exactly 52,429,200 B in 400 blocks on line 13: each bytearray is one 131,073-byte malloc).

use std::{
    fs,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{as_root, build, check, root};

/// The interpreter Airflow's venv is made from: pyenv's 3.11 built with a shared libpython.
const PYTHON: &str = ".pyenv/versions/3.11.7/bin/python3.11";
const AIRFLOW: &str = "apache-airflow==2.10.5";
const DAG_ID: &str = "alloctrace_bench";
const TASK_ID: &str = "hold";

/// The DAG: line numbers matter, the report is read by them.
const DAG: &str = r#""""alloctrace's Airflow workload: a list of ten million ints, and a cache that keeps 50 MiB."""
import datetime
import os

from airflow import DAG
from airflow.operators.python import PythonOperator
_CACHE = []


def hold():
    numbers = list(range(10_000_000))
    for _ in range(400):
        _CACHE.append(bytearray(131_072))
    open(os.environ["ALLOCTRACE_AIRFLOW_HOLDING"], "w").close()
    os.read(os.open(os.environ["ALLOCTRACE_AIRFLOW_RELEASE"], os.O_RDONLY), 1)
    return len(numbers)


with DAG(DAG_ID, start_date=datetime.datetime(2024, 1, 1), schedule=None, catchup=False):
    PythonOperator(task_id=TASK_ID, python_callable=hold)
"#;

/// Lines of [`DAG`] the report must name.
const LIST_LINE: u64 = 11;
const CACHE_LINE: u64 = 13;
/// 400 bytearrays of 131,072 bytes, each one malloc of 131,073 (its NUL).
const CACHE_BYTES: u64 = 400 * 131_073;

/// How long the task may take to hold everything, on a loaded machine.
const HOLDING_WITHIN: Duration = Duration::from_secs(600);

pub fn run() -> anyhow::Result<()> {
    let alloctrace = build::run()?;
    let dir = root().join("target/airflow");
    let venv = install(&dir)?;
    let home = dir.join("home");
    fs::create_dir_all(home.join("dags"))?;
    let dag = home.join("dags/alloctrace_bench.py");
    fs::write(
        &dag,
        DAG.replace("DAG_ID", &format!("{DAG_ID:?}"))
            .replace("TASK_ID", &format!("{TASK_ID:?}")),
    )?;
    let airflow = venv.join("bin/airflow");
    let airflow_environment = |command: &mut Command| {
        command
            .env("AIRFLOW_HOME", &home)
            .env("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
            .env("AIRFLOW__CORE__DAGS_FOLDER", home.join("dags"));
    };
    if !home.join("airflow.db").exists() {
        let mut migrate = Command::new(&airflow);
        migrate.args(["db", "migrate"]);
        airflow_environment(&mut migrate);
        check(migrate.stdout(std::process::Stdio::null()))?;
    }
    let task = [
        airflow.as_os_str(),
        "tasks".as_ref(),
        "test".as_ref(),
        DAG_ID.as_ref(),
        TASK_ID.as_ref(),
        "2024-01-01".as_ref(),
    ];

    let holding = dir.join("holding");
    let release = dir.join("release");
    let environment = |command: &mut Command| {
        airflow_environment(command);
        command
            .env("ALLOCTRACE_AIRFLOW_HOLDING", &holding)
            .env("ALLOCTRACE_AIRFLOW_RELEASE", &release)
            .stdout(std::process::Stdio::null());
    };

    let mut untraced = Command::new(task[0]);
    untraced.args(&task[1..]);
    environment(&mut untraced);
    let (mut child, untraced_s) = run_until_holding(&mut untraced, &holding, &release)?;
    release_task(&release)?;
    let status = child.wait()?;
    if !status.success() {
        bail!("the Airflow task failed untraced: {status}");
    }

    let report_path = dir.join("report.json");
    let mut traced = as_root(&alloctrace)?;
    traced
        // Every site (--top 0): the lines' bytes are summed over all the sites through them.
        .args(["leaks", "--top", "0", "--format", "json", "-o"])
        .arg(&report_path)
        .arg("--")
        .args(task);
    environment(&mut traced);
    let (mut child, traced_s) = run_until_holding(&mut traced, &holding, &release)?;
    // Ctrl-C, as a user ends a trace of a task that holds its memory: the report, then the task is stopped.
    let stopped = Instant::now();
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait()?;
    let report_s = stopped.elapsed().as_secs_f64();
    // alloctrace stops the task it started (SIGTERM); were it still waiting, it is let go.
    let _ = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&release)
        .and_then(|mut fifo| std::io::Write::write_all(&mut fifo, b"x"));
    if !status.success() {
        bail!("alloctrace failed: {status}");
    }

    let report: Value = serde_json::from_slice(&fs::read(&report_path)?)
        .with_context(|| format!("{} is not a JSON report", report_path.display()))?;
    let dag_file = dag.to_string_lossy();
    let (list_bytes, _) = live_on_line(&report, &dag_file, LIST_LINE);
    let (line_bytes, _) = live_on_line(&report, &dag_file, CACHE_LINE);
    let (cache_bytes, cache_blocks) = biggest_site_on_line(&report, &dag_file, CACHE_LINE);
    let lost: u64 = report["lost"]
        .as_object()
        .context("the report has no lost counters")?
        .values()
        .filter_map(Value::as_u64)
        .sum();
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    println!("\n| Airflow 2.10.5 task, `alloctrace leaks` with defaults, Ctrl-C once it holds | |");
    println!("|---|---|");
    println!("| start to holding, untraced | {untraced_s:.2} s |");
    println!(
        "| start to holding, traced | {traced_s:.2} s ({:.2}x) |",
        traced_s / untraced_s
    );
    println!("| Ctrl-C to report written and alloctrace gone | {report_s:.2} s |");
    println!("| lost (all counters) | {lost} |");
    println!("| complete | {} |", report["complete"]);
    println!(
        "| tracer peak RSS | {:.1} MiB |",
        mib(report["tracer_max_rss_bytes"].as_u64().unwrap_or(0))
    );
    println!(
        "| unreadable Python frames | {} |",
        report["unreadable_python_frames"]
    );
    println!("| line {LIST_LINE} (the list and its ints) | {list_bytes} B |");
    println!(
        "| line {CACHE_LINE}, its biggest site (the bytearrays) | {cache_bytes} B in {cache_blocks} blocks (expected {CACHE_BYTES} B in 400) |"
    );
    println!(
        "| line {CACHE_LINE}, all its sites (with the cache list's own growth) | {line_bytes} B |"
    );
    println!("\nthe report: {}", report_path.display());
    if cache_bytes != CACHE_BYTES || cache_blocks != 400 {
        bail!(
            "line {CACHE_LINE} holds {cache_bytes} B in {cache_blocks} blocks, not {CACHE_BYTES} B in 400"
        );
    }
    Ok(())
}

/// Starts `command` and waits until the task says it holds everything (the file `holding`), the FIFO `release`
/// made first for it to wait on; returns the child and the seconds that took.
fn run_until_holding(
    command: &mut Command,
    holding: &Path,
    release: &Path,
) -> anyhow::Result<(std::process::Child, f64)> {
    let _ = fs::remove_file(holding);
    let _ = fs::remove_file(release);
    let fifo = std::ffi::CString::new(release.as_os_str().as_encoded_bytes())?;
    // SAFETY: mkfifo takes a NUL-terminated path and a mode.
    if unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) } != 0 {
        bail!(
            "cannot make the FIFO {}: {}",
            release.display(),
            std::io::Error::last_os_error()
        );
    }
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {command:?}"))?;
    while !holding.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("{command:?} ended ({status}) before the task held its memory");
        }
        if started.elapsed() > HOLDING_WITHIN {
            let _ = child.kill();
            bail!("the task did not hold its memory within {HOLDING_WITHIN:?}");
        }
        sleep(Duration::from_millis(50));
    }
    Ok((child, started.elapsed().as_secs_f64()))
}

/// Lets the task, blocked reading the FIFO `release`, return.
fn release_task(release: &Path) -> anyhow::Result<()> {
    use std::io::Write as _;
    fs::OpenOptions::new()
        .write(true)
        .open(release)
        .and_then(|mut fifo| fifo.write_all(b"x"))
        .with_context(|| format!("cannot release the task through {}", release.display()))
}

/// The venv with Airflow, installed once under `dir`.
fn install(dir: &Path) -> anyhow::Result<PathBuf> {
    let venv = dir.join("venv");
    if venv.join("bin/airflow").exists() {
        return Ok(venv);
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let python = Path::new(&home).join(PYTHON);
    if !python.exists() {
        bail!(
            "Airflow runs here on pyenv's CPython 3.11.7 with a shared libpython: {} is missing",
            python.display()
        );
    }
    fs::create_dir_all(dir)?;
    check(Command::new(&python).arg("-m").arg("venv").arg(&venv))?;
    eprintln!(
        "xtask: installing {AIRFLOW} from PyPI into {}",
        venv.display()
    );
    check(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", AIRFLOW])
            .stdout(std::process::Stdio::null()),
    )?;
    Ok(venv)
}

/// The sites whose stack passes through `file`'s `line`, as (live bytes, live blocks).
fn sites_on_line<'a>(
    report: &'a Value,
    file: &'a str,
    line: u64,
) -> impl Iterator<Item = (u64, u64)> + 'a {
    let sites = report["sites"].as_array().map_or(&[][..], Vec::as_slice);
    sites
        .iter()
        .filter(move |site| {
            site["stack"].as_array().is_some_and(|stack| {
                stack
                    .iter()
                    .any(|f| f["lang"] == "python" && f["file"] == file && f["line"] == line)
            })
        })
        .map(|site| {
            (
                site["live_bytes"].as_u64().unwrap_or(0),
                site["live_count"].as_u64().unwrap_or(0),
            )
        })
}

/// Live bytes and blocks of all the sites through `file`'s `line`.
fn live_on_line(report: &Value, file: &str, line: u64) -> (u64, u64) {
    sites_on_line(report, file, line)
        .fold((0, 0), |(bytes, blocks), (b, n)| (bytes + b, blocks + n))
}

/// The live bytes and blocks of the biggest site through `file`'s `line`.
fn biggest_site_on_line(report: &Value, file: &str, line: u64) -> (u64, u64) {
    sites_on_line(report, file, line).max().unwrap_or((0, 0))
}
