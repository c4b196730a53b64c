//! The configurations each workload runs under, the command of each, and the checks of what a traced run
//! recorded: untraced; empty bpftrace probes at alloctrace's places (the floor); alloctrace exact, sampled and
//! without Python frames; the agent's watch tier (no uprobes) watching the workload by name; the memleak-style
//! bpftrace peer; memray, with and without `--native`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
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
    /// `alloctrace agent --comm NAME`, started before the workload: the watch tier, no uprobes.
    Agent,
    Peer,
    Memray,
    MemrayNative,
}

impl Config {
    pub const ALL: [Config; 9] = [
        Config::Untraced,
        Config::EmptyProbes,
        Config::Exact,
        Config::Sampled,
        Config::NoPythonFrames,
        Config::Agent,
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
            Config::Agent => "alloctrace agent (watch tier)",
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
            Config::Agent => "alloctrace_agent",
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
    let agent = match config {
        Config::Agent => Some(Agent::start(setup)?),
        _ => None,
    };
    let mut command = match config {
        Config::Untraced | Config::Agent => {
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
    let agent_lost = agent.map(|agent| agent.stop(setup)).transpose()?;
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
    if let Some(lost) = agent_lost {
        run.lost = vec![("events".to_owned(), lost)];
    }
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
    run.totals = Some(Totals {
        // Over every site, listed or not: the listed sites depend on what each run happens to hold at its end.
        allocated_bytes: report["allocated_bytes"]
            .as_u64()
            .context("alloctrace's report has no allocated_bytes")?,
        live_bytes: report["live_bytes"]
            .as_u64()
            .context("alloctrace's report has no live_bytes")?,
    });
    Ok(())
}

/// How long the agent may take to load its programs and say it is ready, and to stop.
const AGENT_START: Duration = Duration::from_secs(120);
const AGENT_STOP: Duration = Duration::from_secs(60);

/// `alloctrace agent --comm NAME` around one run of the workload, its stderr in a log file.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// Starts the agent watching the workload's executable by name, and waits until it says it is ready.
    fn start(setup: &Setup) -> anyhow::Result<Self> {
        let program = Path::new(&setup.workload.program[0]);
        let name = program
            .file_name()
            .context("the workload has no program name")?
            .to_string_lossy();
        // The kernel's comm: 15 bytes.
        let comm: String = name.chars().take(15).collect();
        let log = setup.work.join("alloctrace_agent.agent.log");
        let file =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = as_root(&setup.alloctrace)?
            .args(["agent", "--listen", "127.0.0.1:0", "--comm", &comm, "--dir"])
            .arg(setup.work.join("agent"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("cannot start alloctrace agent")?;
        let mut agent = Self { child, log };
        let started = Instant::now();
        while !agent.said("alloctrace: agent ready:") {
            if let Some(status) = agent.child.try_wait()? {
                bail!("alloctrace agent ended ({status}):\n{}", agent.text());
            }
            if started.elapsed() > AGENT_START {
                bail!(
                    "alloctrace agent was not ready after {AGENT_START:?}:\n{}",
                    agent.text()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(agent)
    }

    fn text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn said(&self, what: &str) -> bool {
        self.text().lines().any(|line| line.starts_with(what))
    }

    /// Stops the agent once the workload is done; it must have read a CPython workload's frames. Returns the
    /// events it said it lost.
    fn stop(mut self, setup: &Setup) -> anyhow::Result<u64> {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let stopping = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if stopping.elapsed() > AGENT_STOP {
                let _ = self.child.kill();
                bail!("alloctrace agent did not stop within {AGENT_STOP:?}");
            }
            thread::sleep(Duration::from_millis(10));
        };
        let text = self.text();
        ensure!(
            status.success(),
            "alloctrace agent failed ({status}):\n{text}"
        );
        ensure!(
            setup.workload.python.is_none() || text.contains("alloctrace: watching Python "),
            "{} workload: the agent never read its Python frames:\n{text}",
            setup.workload.key
        );
        // `N events lost (M since the start): …`: the last says them all.
        let lost = text
            .lines()
            .filter_map(|line| line.split_once(" events lost (")?.1.split_once(' '))
            .filter_map(|(total, _)| total.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        Ok(lost)
    }
}
