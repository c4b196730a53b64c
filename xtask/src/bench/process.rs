//! Running one command of the bench: its output kept in a log file, a deadline, and the workload's own loop
//! time read back from what it printed; plus the JSON reports the traced runs leave.

use std::{
    fs::{self, File},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// A run that takes longer than this is stuck, not slow.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Outcome {
    pub status: ExitStatus,
    /// stdout and stderr together.
    pub output: String,
    pub wall: Duration,
}

impl Outcome {
    /// The workload's `elapsed_ns=N ops=N` line.
    pub fn loop_time(&self) -> Option<(u64, u64)> {
        self.output.lines().rev().find_map(|line| {
            let (ns, ops) = line.strip_prefix("elapsed_ns=")?.split_once(" ops=")?;
            Some((ns.parse().ok()?, ops.trim().parse().ok()?))
        })
    }

    pub fn tail(&self) -> String {
        let lines: Vec<&str> = self.output.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// Runs a command with its output in `log`, a file rather than a pipe, so that waiting with a deadline needs
/// no reader threads; the log of each configuration's last run stays there to read.
pub fn run_captured(command: &mut Command, log: &Path) -> anyhow::Result<Outcome> {
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

/// Removes a previous run's output file, so that a run that writes none is not read as having written it.
pub fn remove_stale(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

pub fn read_report(path: &Path) -> anyhow::Result<Value> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}
