//! `alloctrace agent`: the host's always-on process. It runs the session's watch tier (no uprobes: sampled page
//! faults and the mapping calls, see [`crate::trace::watch`]) over every container's processes, or those a
//! selector names, until SIGTERM or SIGINT; writes a post-mortem file (and its flame graph) for each OOM kill of
//! a watched process; and serves `/metrics`, `/debug/pprof/heap` and `/healthz` over HTTP. It says one line on stderr per notable event: ready, a
//! container seen, an OOM kill, events lost.

pub mod heap;
pub mod http;
pub mod metrics;

use std::{
    fs,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    cli::TargetArgs,
    output::{escape::Escaped, flamegraph, profile::Profile},
    report::oom::OomRecord,
    trace::{self, Watch, WatchTick},
};
use metrics::Metrics;

/// What the agent runs with, besides the processes it watches.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Where post-mortem files go.
    pub dir: PathBuf,
    pub listen: SocketAddr,
    /// One write fault in this many is sampled.
    pub fault_every: u32,
    /// Most sampled pages held at once.
    pub max_samples: usize,
    /// How long a container's series stay exported after its last process is gone.
    pub series_ttl: Duration,
}

/// Runs the agent until a stop signal.
pub async fn run(targets: &TargetArgs, options: &AgentOptions) -> anyhow::Result<()> {
    fs::create_dir_all(&options.dir)
        .with_context(|| format!("cannot create {}", options.dir.display()))?;
    let metrics = Arc::new(Mutex::new(Metrics::new(options.series_ttl)));
    let heap_profile = Arc::new(Mutex::new(Profile::default()));
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let listening = listener.local_addr()?;
    tokio::spawn(http::serve(
        listener,
        Arc::clone(&metrics),
        Arc::clone(&heap_profile),
    ));

    let every_container =
        targets.comms.is_empty() && targets.containers.is_empty() && targets.cgroups.is_empty();
    let mut ready = false;
    let mut lost_said = 0;
    let mut on_tick = |tick: &WatchTick| {
        let seen = lock(&metrics).update(tick, Instant::now());
        *lock(&heap_profile) = heap::profile(tick, options.fault_every);
        if !ready {
            ready = true;
            // Said once the probes are on and the running processes marked: what starts from now is watched.
            eprintln!(
                "alloctrace: agent ready: watching {} processes, serving http://{listening}, post-mortems in {}",
                tick.processes.len(),
                options.dir.display()
            );
        }
        for container in seen {
            say(format_args!("container {container} seen"));
        }
        if tick.lost_events > lost_said {
            say(format_args!(
                "{} events lost ({} since the start): memory is underestimated",
                tick.lost_events - lost_said,
                tick.lost_events
            ));
            lost_said = tick.lost_events;
        }
    };
    let dir = options.dir.clone();
    let mut on_oom = |record: &OomRecord| -> anyhow::Result<()> {
        // Every kill on the host reaches the sink; only a watched victim's has what the agent saw.
        if !record.traced {
            return Ok(());
        }
        lock(&metrics).oom_kill(record, Instant::now());
        match write_post_mortem(&dir, record) {
            Ok(path) => say(format_args!(
                "OOM kill of pid {} ({}) in {}: {}",
                record.victim.pid,
                record.victim.comm,
                container_label(record),
                path.display()
            )),
            // The agent goes on: the next kill may be written.
            Err(err) => say(format_args!(
                "OOM kill of pid {}: {err:#}",
                record.victim.pid
            )),
        }
        Ok(())
    };
    let trace = trace::watch(
        targets,
        &mut on_oom,
        Watch {
            fault_every: options.fault_every,
            max_samples: options.max_samples,
            every_container,
            on_tick: &mut on_tick,
        },
    )
    .await?;
    trace.finish();
    Ok(())
}

/// The container's name (or id) a record names, or `host`.
fn container_label(record: &OomRecord) -> String {
    match &record.container {
        Some(container) => container
            .name
            .clone()
            .unwrap_or_else(|| container.id.chars().take(12).collect()),
        None => "host".to_owned(),
    }
}

/// Writes `DIR/oom-<UTC time>-<container or host>-<pid>.json`, and beside it the flame graph of what the victim
/// held (the same name, `.svg`), each whole or not at all (through a temporary file renamed into place), and
/// returns the record's path. The flame graph goes first: whoever sees the record finds its picture there.
fn write_post_mortem(dir: &Path, record: &OomRecord) -> anyhow::Result<PathBuf> {
    let time: String = record.time.chars().filter(|c| *c != ':').collect();
    let container: String = container_label(record)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("oom-{time}-{container}-{}", record.victim.pid);
    write_whole(&dir.join(format!("{name}.svg")), |file| {
        flamegraph::write_svg(&Profile::from_oom(record), file)?;
        Ok(())
    })?;
    let path = dir.join(format!("{name}.json"));
    write_whole(&path, |file| {
        serde_json::to_writer_pretty(&mut *file, record)?;
        file.write_all(b"\n")?;
        Ok(())
    })?;
    Ok(path)
}

/// Writes `path` through a temporary file beside it, renamed into place once `write` is done and synced.
fn write_whole(
    path: &Path,
    write: impl FnOnce(&mut fs::File) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let partial = path.with_file_name(format!(".{name}.partial"));
    let mut file = fs::File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    write(&mut file)?;
    file.sync_all()?;
    fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))
}

/// One line on stderr; what comes from a target (names, paths) is escaped.
fn say(message: std::fmt::Arguments<'_>) {
    eprintln!("alloctrace: {}", Escaped(&message.to_string()));
}

/// Locks what the session's callbacks share with the HTTP server. Neither panics while holding it.
fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}
