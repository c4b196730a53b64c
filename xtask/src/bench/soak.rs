//! `cargo xtask bench --only soak`: whether `alloctrace agent` stays bounded for days. The agent watches every
//! container while real Docker containers come and go for `--soak-minutes` (10 by default): Python tasks that
//! allocate in a few functions, churn, and fork a child that allocates too, and, one container in
//! [`HOG_EVERY`], a task that grows under a memory limit until the kernel kills it. Every [`SAMPLE_EVERY`] the
//! agent's resident memory is read (`VmRSS` and `VmHWM` of `/proc/PID/status`) with its own `/metrics` (the
//! RSS it exports, its series, events lost). Then [`AT_ONCE`] containers are started and kept alive together,
//! each a Python holding [`AT_ONCE_HOLD_MIB`] MiB, and the agent's resident memory is read while it watches
//! them all.
//!
//! The agent runs with `--series-ttl 30s`: a container's series outlive it by that long (10 minutes by
//! default, which would take the whole run to reach a steady state).
//!
//! Printed: first, peak and last RSS; the growth per 100 containers after the warm-up (the first quarter of
//! the run), the least-squares slope of RSS against containers ended; the verdict, "flat" when that growth is
//! under [`FLAT_GROWTH_PER_100`]; and the RSS with the containers at once beside the 256 MiB bound. The series
//! goes to `target/bench/soak.json`.

use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use alloctrace_tests::{
    agent::{Lines, get, resident_bytes},
    docker, pyenv_prefix,
};
use anyhow::{Context as _, bail};
use serde_json::json;

use super::report;

/// Containers running at once during the soak: enough to keep two cores busy.
const SLOTS: usize = 4;
/// One container in this many is an OOM victim.
const HOG_EVERY: u64 = 5;
/// How often the agent's memory is read.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// The agent's `--series-ttl`.
const SERIES_TTL: Duration = Duration::from_secs(30);
/// Containers alive together in the second measurement, and what each holds.
const AT_ONCE: usize = 100;
const AT_ONCE_HOLD_MIB: u32 = 16;
/// The most resident memory the agent may take with [`AT_ONCE`] containers (issue 10).
const MAX_AGENT_RSS: u64 = 256 << 20;
/// The verdict's bound: under this much growth per 100 containers after the warm-up, RSS is flat (a host that
/// runs 10,000 containers a day would see the agent grow by less than 100 MiB a day even at the bound).
const FLAT_GROWTH_PER_100: f64 = 1.0 * 1048576.0;
/// A container that takes longer than this is stuck.
const CONTAINER_TIMEOUT: Duration = Duration::from_secs(300);

/// Allocates `argv[1]` MiB in one function, churns in another, forks a child that allocates half as much, and
/// holds it all for two seconds, so that the agent sees it held.
const WORKER: &str = "import os, sys, time
def build(n):
    return [bytearray(1 << 20) for _ in range(n)]
def churn(n):
    for _ in range(n):
        kept = [bytes(4096) for _ in range(256)]
    return kept
def work(n):
    held = build(n)
    churn(n)
    pid = os.fork()
    if pid == 0:
        build(n // 2)
        time.sleep(1)
        os._exit(0)
    time.sleep(2)
    os.waitpid(pid, 0)
    return held
held = work(int(sys.argv[1]))
";

/// Appends 1 MiB bytearrays until the kernel kills it.
const HOG: &str = "def hog():
    held = []
    while True:
        held.append(bytearray(1 << 20))
hog()
";

/// Holds `argv[1]` MiB and waits to be removed. It starts to allocate after five seconds, as a real task
/// does after its imports: the agent watches a process from its exec on, but not from its first instruction
/// (it holds nothing), and with a hundred containers starting its first look at one may take seconds.
const HOLDER: &str = "import sys, time
def hold(n):
    return [bytearray(1 << 20) for _ in range(n)]
time.sleep(5)
held = hold(int(sys.argv[1]))
time.sleep(100000)
";

/// One reading of the agent.
#[derive(Clone, Copy, Debug)]
struct Sample {
    seconds: f64,
    containers_started: u64,
    containers_ended: u64,
    oom_killed: u64,
    rss: u64,
    hwm: u64,
    /// `alloctrace_agent_resident_bytes`, as the agent exports it.
    exported_rss: f64,
    /// Series of `alloctrace_live_bytes`.
    live_series: usize,
    lost_events: f64,
}

/// What the container generators have done so far.
#[derive(Default)]
struct Counts {
    started: AtomicU64,
    ended: AtomicU64,
    oom_killed: AtomicU64,
    failed: AtomicU64,
}

pub fn run(alloctrace: &Path, dir: &Path, minutes: f64) -> anyhow::Result<()> {
    let started = Instant::now();
    let run_for = Duration::from_secs_f64(minutes * 60.0);
    let work = dir.join("soak");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    docker::require_docker();
    let prefix = pyenv_prefix("3.12");
    let python = prefix.join("bin/python3.12");
    let image = docker::python_image(&prefix, "3.12");
    let (agent, listen) = start_agent(alloctrace, &work)?;
    let mut agent = Agent(agent);
    let pid = agent.0.id();
    eprintln!(
        "xtask: bench: soak: agent pid {pid} serving {listen}; containers for {minutes} minutes, {SLOTS} at a time"
    );

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let generators: Vec<_> = (0..SLOTS)
        .map(|_| {
            let (counts, stop) = (Arc::clone(&counts), Arc::clone(&stop));
            let (image, python) = (image.clone(), python.clone());
            thread::spawn(move || generate(&image, &python, &counts, &stop))
        })
        .collect();
    let sample = |at: Instant| -> Sample {
        let (rss, hwm) = resident_bytes(pid);
        let metrics = get(&listen, "/metrics");
        Sample {
            seconds: at.duration_since(started).as_secs_f64(),
            containers_started: counts.started.load(Ordering::Relaxed),
            containers_ended: counts.ended.load(Ordering::Relaxed),
            oom_killed: counts.oom_killed.load(Ordering::Relaxed),
            rss,
            hwm,
            exported_rss: metric(&metrics, "alloctrace_agent_resident_bytes").unwrap_or(0.0),
            live_series: metrics
                .lines()
                .filter(|l| l.starts_with("alloctrace_live_bytes{"))
                .count(),
            lost_events: metric(&metrics, "alloctrace_lost_events_total").unwrap_or(0.0),
        }
    };
    let soak_start = Instant::now();
    let mut samples = vec![sample(Instant::now())];
    while soak_start.elapsed() < run_for {
        thread::sleep(SAMPLE_EVERY.min(run_for.saturating_sub(soak_start.elapsed())));
        let s = sample(Instant::now());
        eprintln!(
            "xtask: bench: soak: {:>4.0} s  {:>4} containers ended ({} OOM-killed)  agent RSS {:.1} MiB (peak {:.1})  {} series",
            s.seconds,
            s.containers_ended,
            s.oom_killed,
            mib(s.rss),
            mib(s.hwm),
            s.live_series
        );
        samples.push(s);
        if counts.failed.load(Ordering::Relaxed) > 10 {
            break;
        }
        if let Some(status) = agent.0.try_wait()? {
            bail!(
                "the agent exited during the soak: {status}; its log is in {}",
                work.display()
            );
        }
    }
    let soaked = soak_start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for generator in generators {
        let _ = generator.join();
    }
    let failed = counts.failed.load(Ordering::Relaxed);
    if failed > 10 {
        bail!("{failed} containers failed to run: is dockerd healthy?");
    }
    // Once every series of the containers has outlived its time, what the agent keeps is what it keeps for good.
    thread::sleep(SERIES_TTL + 2 * SAMPLE_EVERY);
    let settled = sample(Instant::now());
    samples.push(settled);

    let at_once = at_once(&image, &python, pid, &listen)?;
    // SAFETY: signalling the agent this bench started and has not reaped.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let status = agent.0.wait()?;
    if !status.success() {
        bail!(
            "the agent ended with {status}; its log is in {}",
            work.display()
        );
    }

    let summary = Summary::of(&samples);
    let post_mortems = fs::read_dir(work.join("post-mortems"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
        .unwrap_or(0);
    println!("\n## The agent's soak\n");
    println!("{}", report::machine());
    println!(
        "\n{:.1} minutes, {} containers ({} OOM-killed; {post_mortems} post-mortems written, of any container on the host), {SLOTS} at a time; --series-ttl {}s",
        soaked.as_secs_f64() / 60.0,
        settled.containers_ended,
        settled.oom_killed,
        SERIES_TTL.as_secs()
    );
    println!(
        "agent RSS: first {:.1} MiB, peak {:.1} MiB (VmHWM), last {:.1} MiB (every series gone)",
        mib(summary.first),
        mib(summary.peak),
        mib(summary.last)
    );
    println!(
        "growth after the warm-up (the first quarter, {} containers): {:+.2} MiB per 100 containers (least squares over {} samples)",
        summary.warm_up_containers,
        summary.growth_per_100 / 1048576.0,
        summary.fitted
    );
    println!(
        "verdict: {} (flat: under {:.1} MiB per 100 containers after the warm-up)",
        if summary.growth_per_100 < FLAT_GROWTH_PER_100 {
            "flat"
        } else {
            "growing"
        },
        FLAT_GROWTH_PER_100 / 1048576.0
    );
    println!(
        "{AT_ONCE} containers at once, each a Python holding {AT_ONCE_HOLD_MIB} MiB, all watched: agent RSS {:.1} MiB ({} the {} MiB bound)",
        mib(at_once),
        if at_once <= MAX_AGENT_RSS {
            "within"
        } else {
            "OVER"
        },
        MAX_AGENT_RSS >> 20
    );
    let results = dir.join("soak.json");
    let json = json!({
        "machine": report::machine(),
        "minutes": soaked.as_secs_f64() / 60.0,
        "series_ttl_s": SERIES_TTL.as_secs(),
        "containers": settled.containers_ended,
        "oom_killed": settled.oom_killed,
        "post_mortems": post_mortems,
        "first_rss_bytes": summary.first,
        "peak_rss_bytes": summary.peak,
        "last_rss_bytes": summary.last,
        "growth_per_100_containers_bytes": summary.growth_per_100,
        "flat": summary.growth_per_100 < FLAT_GROWTH_PER_100,
        "at_once": { "containers": AT_ONCE, "hold_mib": AT_ONCE_HOLD_MIB, "rss_bytes": at_once },
        "samples": samples.iter().map(|s| json!({
            "seconds": s.seconds,
            "containers_started": s.containers_started,
            "containers_ended": s.containers_ended,
            "oom_killed": s.oom_killed,
            "rss_bytes": s.rss,
            "hwm_bytes": s.hwm,
            "exported_rss_bytes": s.exported_rss,
            "live_series": s.live_series,
            "lost_events": s.lost_events,
        })).collect::<Vec<_>>(),
    });
    fs::write(&results, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("cannot write {}", results.display()))?;
    println!(
        "\nthe series is in {}; the soak took {:.0} s",
        results.display(),
        started.elapsed().as_secs_f64()
    );
    if at_once > MAX_AGENT_RSS {
        bail!(
            "the agent took more than {} MiB with {AT_ONCE} containers",
            MAX_AGENT_RSS >> 20
        );
    }
    Ok(())
}

/// The agent, killed if the bench ends before it stops it.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        if self.0.try_wait().is_ok_and(|status| status.is_none()) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the agent on every container, once it says it is ready; its log goes to `agent.log` in `work`.
fn start_agent(alloctrace: &Path, work: &Path) -> anyhow::Result<(Child, String)> {
    let post_mortems = work.join("post-mortems");
    let mut agent = Command::new(alloctrace)
        .arg("agent")
        .args(["--listen", "127.0.0.1:0", "--series-ttl"])
        .arg(format!("{}s", SERIES_TTL.as_secs()))
        .arg("--dir")
        .arg(&post_mortems)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {} agent", alloctrace.display()))?;
    let mut log = Lines::new(agent.stderr.take().unwrap(), "the agent");
    let ready = log.wait_for(Duration::from_secs(180), |l| {
        l.starts_with("alloctrace: agent ready:")
    });
    let listen = ready
        .split("serving http://")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .context("the agent does not say where it serves")?
        .to_owned();
    let log_path = work.join("agent.log");
    let mut file = fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    thread::spawn(move || {
        use std::io::Write as _;
        for line in log.seen.iter().cloned().chain(log.receiver.iter()) {
            let _ = writeln!(file, "{line}");
        }
    });
    Ok((agent, listen))
}

/// Runs containers one after another until told to stop.
fn generate(image: &str, python: &Path, counts: &Counts, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let index = counts.started.fetch_add(1, Ordering::Relaxed);
        let hog = index % HOG_EVERY == HOG_EVERY - 1;
        let (memory, script, argument) = if hog {
            (48, HOG, String::new())
        } else {
            // 4 to 19 MiB, so that containers differ.
            (128, WORKER, (4 + index % 16).to_string())
        };
        let name = format!("alloctrace-soak-{}-{index}", std::process::id());
        let status = run_container(&name, image, python, memory, script, &argument, false)
            .and_then(|mut child| wait_for(&mut child, &name));
        match status.map(|s| s.code()) {
            Ok(Some(0)) => {}
            // SIGKILL'd by the kernel: `docker run` says 137.
            Ok(Some(137)) if hog => {
                counts.oom_killed.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                eprintln!("xtask: bench: soak: container {name} ended with {other:?}");
                counts.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        counts.ended.fetch_add(1, Ordering::Relaxed);
    }
}

/// `docker run` of `python -c script argument` in a container of its own with a memory limit; `detached`
/// returns once it runs, else the child is the container's whole life.
fn run_container(
    name: &str,
    image: &str,
    python: &Path,
    memory_mib: u32,
    script: &str,
    argument: &str,
    detached: bool,
) -> anyhow::Result<Child> {
    let mut docker = Command::new("docker");
    docker.args(["run", "--rm", "--network", "none", "--name", name]);
    if detached {
        docker.arg("-d");
    }
    docker
        .arg(format!("--memory={memory_mib}m"))
        .arg(format!("--memory-swap={memory_mib}m"))
        .arg(image)
        .arg(python)
        .args(["-c", script])
        .args((!argument.is_empty()).then_some(argument))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run docker")
}

/// Waits for `docker run`, at most [`CONTAINER_TIMEOUT`], removing a container that takes longer.
fn wait_for(child: &mut Child, name: &str) -> anyhow::Result<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() > CONTAINER_TIMEOUT {
            remove(name);
            let _ = child.kill();
            let _ = child.wait();
            bail!("container {name} still ran after {CONTAINER_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn remove(name: &str) {
    let _ = Command::new("docker")
        .args(["rm", "-f", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Starts [`AT_ONCE`] holders, waits until the agent exports what each holds, and returns the agent's largest
/// RSS over a few ticks then; the holders are removed after.
fn at_once(image: &str, python: &Path, pid: u32, listen: &str) -> anyhow::Result<u64> {
    let names: Vec<String> = (0..AT_ONCE)
        .map(|index| format!("alloctrace-soak-at-once-{}-{index}", std::process::id()))
        .collect();
    let result = (|| {
        // A few `docker run -d` at a time: each returns once its container runs.
        for chunk in names.chunks(SLOTS) {
            let mut starting = Vec::new();
            for name in chunk {
                let argument = AT_ONCE_HOLD_MIB.to_string();
                let child = run_container(name, image, python, 64, HOLDER, &argument, true)?;
                starting.push((child, name));
            }
            for (mut child, name) in starting {
                let status = wait_for(&mut child, name)?;
                if !status.success() {
                    bail!("docker run -d {name} failed: {status}");
                }
            }
        }
        eprintln!("xtask: bench: soak: {AT_ONCE} holders started");
        // Each holder's series shows what it holds once the agent has seen it (sampled: within 25%).
        let wanted = f64::from(AT_ONCE_HOLD_MIB << 20) * 0.75;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let metrics = get(listen, "/metrics");
            let seen = metrics
                .lines()
                .filter(|l| {
                    l.starts_with("alloctrace_live_bytes{container=\"alloctrace-soak-at-once-")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .filter(|&bytes| bytes >= wanted)
                .count();
            if seen >= AT_ONCE {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent exported what {seen} of the {AT_ONCE} holders hold, not all of them"
                );
            }
            thread::sleep(Duration::from_secs(1));
        }
        let mut most = 0;
        for _ in 0..5 {
            most = most.max(resident_bytes(pid).0);
            thread::sleep(Duration::from_secs(1));
        }
        Ok(most)
    })();
    let removers: Vec<_> = names
        .chunks(AT_ONCE.div_ceil(SLOTS))
        .map(|chunk| {
            let chunk = chunk.to_vec();
            thread::spawn(move || chunk.iter().for_each(|name| remove(name)))
        })
        .collect();
    for remover in removers {
        let _ = remover.join();
    }
    result
}

/// The value of an unlabelled series in a text exposition.
fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// The figures of a soak.
struct Summary {
    first: u64,
    peak: u64,
    last: u64,
    warm_up_containers: u64,
    /// Bytes of RSS per 100 containers ended, after the warm-up.
    growth_per_100: f64,
    /// Samples the slope was fitted on.
    fitted: usize,
}

impl Summary {
    fn of(samples: &[Sample]) -> Self {
        let first = samples.first().map_or(0, |s| s.rss);
        let last = samples.last().map_or(0, |s| s.rss);
        let peak = samples.iter().map(|s| s.hwm).max().unwrap_or(0);
        let end = samples.last().map_or(0.0, |s| s.seconds);
        let warm_up = samples.first().map_or(0.0, |s| s.seconds) + (end - samples[0].seconds) / 4.0;
        let after: Vec<&Sample> = samples.iter().filter(|s| s.seconds >= warm_up).collect();
        let warm_up_containers = after.first().map_or(0, |s| s.containers_ended);
        let points: Vec<(f64, f64)> = after
            .iter()
            .map(|s| (s.containers_ended as f64, s.rss as f64))
            .collect();
        Self {
            first,
            peak,
            last,
            warm_up_containers,
            growth_per_100: slope(&points) * 100.0,
            fitted: points.len(),
        }
    }
}

/// The least-squares slope of `y` over `x`; 0 with fewer than two distinct `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
    let (mx, my) = (sx / n, sy / n);
    let (sxy, sxx) = points.iter().fold((0.0, 0.0), |(sxy, sxx), (x, y)| {
        (sxy + (x - mx) * (y - my), sxx + (x - mx) * (x - mx))
    });
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_is_the_least_squares_one() {
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), 2.0);
        assert_eq!(
            slope(&[(0.0, 2.0), (1.0, 4.0), (2.0, 2.0), (3.0, 4.0)]),
            0.4
        );
        assert_eq!(slope(&[(5.0, 1.0), (5.0, 9.0)]), 0.0);
    }
}
