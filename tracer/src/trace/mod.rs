//! A tracing session: finds and attaches to the targets (pids, names, a command, and the children they fork,
//! held until attached), consumes the ring reader's records until the trace ends (duration, a stop signal, or
//! every target gone), takes the heap from the kernel's tables, and hands the ledger to the report builders.
//! The agent runs the same session in its watch tier ([`watch`]): no uprobes, sampled page faults into a
//! [`Resident`] ledger, until a stop signal; at each tick the agent may escalate processes to the allocator
//! uprobes, and relax them ([`Escalate`]).
//!
//! Split along its seams: this file is the session and its event loop; `targets.rs` the target policy (which
//! processes, when their probes go on, their exits); `accounting.rs` what each record changes. The ring buffer is
//! drained on its own thread ([`crate::ring`]), and the OS helpers (pidfds) are in [`crate::os`].

use std::{
    collections::HashMap,
    os::fd::OwnedFd,
    os::unix::ffi::OsStrExt as _,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tracer_common::{Loss, Tally};

use crate::{
    aggregate::resident::Resident,
    decode::Event,
    model::{CacheEvictions, Exit, Losses, ProcessReport, Trace},
    os::pidfd,
    probes::{LoadOptions, Probes},
    procs::{
        ProcessInfo,
        airflow::TaskIdentity,
        allocator,
        container::{Container, Selector},
    },
    python::runtime::Reader,
    report::oom::{self, OomInput, OomRecord, TopStack},
    ring::{Delivery, RingReader},
    sampling::Sampling,
    spawn::{self, ChildEvent},
    system,
};

mod accounting;
mod targets;

use accounting::{Discovery, State, consume, flush, lock, name_python, window_python_key};
use targets::{HOLD_SETTLE, PENDING_INTERVAL, PENDING_WINDOW, Targets, attach_running};
/// How often each process's live memory is sampled for the trace's history (the charts of reports): often
/// enough to draw a trace of seconds.
const HISTORY_INTERVAL: Duration = Duration::from_millis(250);
/// One history sample in this many is also an OOM record's growth sample, and how many of those are kept: five
/// minutes of growth, every 5 s, before an OOM kill.
const GROWTH_EVERY: u64 = 20;
const GROWTH_SAMPLES: usize = 60;

/// How often the watch tier tells the agent what its processes hold.
const WATCH_TICK: Duration = Duration::from_secs(1);

/// The agent's watch tier, in place of tracing allocations: targets get no uprobe; their sampled write faults
/// and mapping calls feed a [`Resident`] ledger; the session runs until a stop signal; and an exited process's
/// pages are kept until the OOM kills read with its exit are reported.
pub struct Watch<'a> {
    /// One write fault in this many is sampled, and weighs this many.
    pub fault_every: u32,
    /// Most sampled pages held (see [`Resident::new`]).
    pub max_samples: usize,
    /// Every process in a container is watched: no `--container`, `--cgroup` or `--comm` narrows it.
    pub every_container: bool,
    /// The allocator uprobe programs are loaded, for the agent to escalate processes to (sampled as the
    /// session's `sample_every` says); without it none is even loaded, and [`Escalate::escalate`] refuses.
    pub escalation: bool,
    /// Called every [`WATCH_TICK`] with what the watched processes hold, and what escalates them.
    pub on_tick: &'a mut dyn FnMut(&WatchTick, &mut dyn Escalate),
}

/// What the agent asks of the watch tier's session at a tick: the exact tier for some processes, and back.
pub trait Escalate {
    /// Puts the allocator uprobes on a watched process: from now on its blocks are recorded in the kernel's
    /// tables (sampled as the session is).
    fn escalate(&mut self, pid: u32) -> anyhow::Result<()>;
    /// Takes them off (its perf events closed), and drops what the kernel's tables hold of it.
    fn relax(&mut self, pid: u32) -> anyhow::Result<()>;
}

/// What the watched processes hold, at one tick.
pub struct WatchTick {
    pub processes: Vec<WatchedProcess>,
    /// Records that never reached the ledger since the start: the ring buffer was full, a record could not be
    /// decoded, or the ledger was full.
    pub lost_events: u64,
}

pub struct WatchedProcess {
    pub pid: u32,
    pub comm: String,
    pub container: Option<Container>,
    pub task: Option<TaskIdentity>,
    /// The ledger's estimate of what its pages hold.
    pub resident_bytes: u64,
    /// It has the allocator uprobes ([`Escalate::escalate`]).
    pub escalated: bool,
    /// The stacks that made its pages resident, biggest first: at most [`WATCH_STACKS`], named.
    pub stacks: Vec<TopStack>,
}

/// How many of a watched process's stacks each tick names: the heap profile the agent serves is bounded by
/// this many stacks per process.
pub const WATCH_STACKS: usize = 64;

/// What the session takes: which processes to trace, for how long, and what the kernel side may hold. The
/// command line's arguments (or the agent's) converted; nothing here knows how they were spelled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceConfig {
    /// Running processes to trace.
    pub pids: Vec<u32>,
    /// Names (the kernel's comm) of processes to trace, running or started later.
    pub comms: Vec<String>,
    /// Containers (a name, or an id or its prefix) whose processes are traced, running or started later.
    pub containers: Vec<String>,
    /// Cgroup paths whose processes (and those below) are traced, running or started later.
    pub cgroups: Vec<String>,
    /// The trace ends after this long (or at a stop signal, or when every target is gone).
    pub duration: Option<Duration>,
    /// Size of the ring buffer that carries events to userspace, in bytes (a power of two).
    pub buffer_size: u64,
    /// CPython processes' frames are read and merged into their stacks.
    pub python_frames: bool,
    /// Allocations are sampled, one every this many bytes on average; `None`: each is recorded.
    pub sample_every: Option<u64>,
    /// Most live heap blocks the kernel keeps.
    pub max_live_blocks: u32,
    /// Most distinct stacks kept, named.
    pub max_stacks: usize,
    /// A command to start and trace from its first instruction (program, then its arguments).
    pub command: Vec<std::ffi::OsString>,
}

impl TraceConfig {
    /// Whether processes are chosen by their container or cgroup, which only userspace can tell.
    pub fn chooses_by_cgroup(&self) -> bool {
        !self.containers.is_empty() || !self.cgroups.is_empty()
    }
}

/// A finished trace, and what it still holds: the probes, and the command alloctrace started if it outlived
/// the trace. The report is built from [`Traced::trace`] before either is let go.
pub struct Traced {
    pub trace: Trace,
    /// The command alloctrace started (a pidfd), when it was still running as the trace ended.
    unfinished_command: Option<OwnedFd>,
    /// The probes stay attached until the trace is dropped, after its report: taking them down waits for the
    /// kernel (an RCU grace period each), and that wait is not the user's.
    _probes: Probes,
}

impl Traced {
    /// Takes the probes down off the user's path, once the report is out. The kernel removes each probe with an
    /// RCU grace period, serialized: two seconds for a few dozen probes, which alloctrace's exit would wait for.
    /// A child process inherits the descriptors, closes its standard streams (so that a reader of alloctrace's
    /// output sees its end when alloctrace exits), waits for this process to have exited, then closes the rest:
    /// the last references, and the wait, are its own. This process exits at once.
    pub fn finish(self) {
        // Everything is written: a reader of --ready-fd sees its end now, not when the probes are down (nor
        // when the child below, which would inherit the descriptor, exits).
        crate::os::close_ready_fd();
        // On libc: rustix has neither fork nor close_range.
        // SAFETY: fork in a process with threads: the child only calls getppid, close_range, nanosleep and
        // _exit, all async-signal-safe, and touches no memory but its stack.
        unsafe {
            let parent = libc::getpid();
            match libc::fork() {
                0 => {
                    libc::syscall(libc::SYS_close_range, 0u32, 2u32, 0u32);
                    let pause = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 10_000_000,
                    };
                    while libc::getppid() == parent {
                        libc::nanosleep(&pause, std::ptr::null_mut());
                    }
                    libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                    libc::_exit(0);
                }
                // No child: the probes come down here, as they would at exit.
                -1 => drop(self),
                // Its descriptors are the child's to close now: closing them here would be the last reference
                // whenever the child got to them first.
                _ => std::mem::forget(self),
            }
        }
    }

    /// A command alloctrace started lives as long as its trace: when the trace ended first (--duration,
    /// Ctrl-C), it is stopped, once the report shows what it held. Signalled through its pidfd, so that no
    /// other process can be hit, even if the command is gone.
    pub fn stop_unfinished_command(&self) {
        if let Some(pidfd) = &self.unfinished_command {
            // Best effort: a command gone already needs no signal.
            let _ = rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::TERM);
        }
    }
}

/// Receives each OOM kill as it is read.
pub type OomSink<'a> = &'a mut dyn FnMut(&OomRecord) -> anyhow::Result<()>;

/// Builds the records of the OOM kills read so far and hands them to `sink`.
fn report_ooms(
    state: &mut State,
    targets: &Targets,
    sampling: &Sampling,
    window: (u64, u64),
    sink: &mut Option<OomSink<'_>>,
) -> anyhow::Result<()> {
    let Some(sink) = sink else {
        state.ooms.clear();
        return Ok(());
    };
    if state.ooms.is_empty() {
        return Ok(());
    }
    // What the victims held: the kernel's tables as they are now (the watch tier has its own ledger).
    if state.resident.is_none() {
        state.take_heap(&targets.probes, sampling)?;
    }
    for kill in std::mem::take(&mut state.ooms) {
        let watched = state
            .resident
            .is_some()
            .then(|| state.resident_stacks(kill.victim_pid, usize::MAX));
        let escalation = state
            .escalated
            .get(&kill.victim_pid)
            .map(|&since| oom::Escalation {
                seconds_before: kill.header.ts_ns.saturating_sub(since) as f64 / 1e9,
                sample_every_bytes: (!sampling.is_exact()).then_some(sampling.interval),
                top_stacks: state.escalated_stacks(&targets.probes, sampling, kill.victim_pid),
            });
        let record = oom::build(OomInput {
            event: &kill,
            registry: &mut state.registry,
            ledger: &state.ledger,
            sites: &state.sites,
            traced: targets.order.contains(&kill.victim_pid),
            samples: state
                .growth
                .get(&kill.victim_pid)
                .map_or(&[][..], |samples| samples.as_slices().0),
            cgroups: &mut lock(&state.cgroups),
            window,
            watched,
            escalation,
        });
        sink(&record)?;
    }
    Ok(())
}

/// Runs a trace to its end. Without targets it only watches (OOM kills, with `oom_sink`) until `--duration`
/// or Ctrl-C.
pub async fn run(config: &TraceConfig, oom_sink: Option<OomSink<'_>>) -> anyhow::Result<Traced> {
    session(config, oom_sink, None).await
}

/// Runs the watch tier over the processes `config` chooses (every container's with [`Watch::every_container`])
/// until a stop signal (or its duration).
pub async fn watch(
    config: &TraceConfig,
    oom_sink: OomSink<'_>,
    watch: Watch<'_>,
) -> anyhow::Result<Traced> {
    session(config, Some(oom_sink), Some(watch)).await
}

async fn session(
    config: &TraceConfig,
    mut oom_sink: Option<OomSink<'_>>,
    mut watch: Option<Watch<'_>>,
) -> anyhow::Result<Traced> {
    let watching = watch.is_some();
    let uprobes = watch.as_ref().is_none_or(|w| w.escalation);
    system::require_root()?;
    if uprobes {
        system::require_uprobes()?;
    }
    system::ensure_tracefs()?;
    // Every traced process holds a descriptor per uprobe: a task that forks many children needs more than
    // the usual soft limit of 1024.
    system::raise_open_files_limit();
    let (exits_tx, mut exits) = unbounded_channel();
    let sampling = config
        .sample_every
        .map_or_else(Sampling::exact, Sampling::every);
    let mut targets = Targets {
        probes: Probes::load(&LoadOptions {
            buffer_size: config.buffer_size,
            watch_execs: config.chooses_by_cgroup()
                || watch.as_ref().is_some_and(|w| w.every_container),
            sampling: sampling.clone(),
            max_live_blocks: config.max_live_blocks,
            watch_faults: watch.as_ref().map(|w| w.fault_every),
            hold_for_python: config.python_frames && watch.is_none(),
            uprobes,
        })?,
        comms: config
            .comms
            .iter()
            .map(|c| tracer_common::comm_bytes(c.as_bytes()).to_vec())
            .collect(),
        selector: Selector {
            containers: config.containers.clone(),
            cgroups: config.cgroups.clone(),
        },
        exits_tx,
        order: Vec::new(),
        probed: HashMap::new(),
        exited: HashMap::new(),
        allocators: Vec::new(),
        python_pending: HashMap::new(),
        allocator_pending: HashMap::new(),
        spawned_exec: None,
        python_frames: config.python_frames,
        untraced: 0,
        watching,
        every_container: watch.as_ref().is_some_and(|w| w.every_container),
    };
    let mut state = State {
        max_stacks: config.max_stacks,
        resident: watch.as_ref().map(|w| Resident::new(w.max_samples)),
        ..State::default()
    };
    // Watched processes get no uprobe: there is nothing to attach before they run.
    targets.probes.hold_new_processes(!watching)?;
    // The trace's window opens before the first block can be recorded, so that no age exceeds the trace's
    // duration: before the first probe goes on a running process, or else as the command is released.
    let now = || (Instant::now(), system::monotonic_ns());
    let attaches_running =
        !config.pids.is_empty() || !targets.comms.is_empty() || !targets.selector.is_empty();
    let mut window_start = attaches_running.then(now);

    for comm in &config.comms {
        targets.probes.add_comm(comm)?;
    }
    for &pid in &config.pids {
        if pid == std::process::id() {
            bail!("alloctrace cannot trace itself (pid {pid})");
        }
        attach_running(&mut targets, &mut state, pid)?;
    }
    // Processes found by name, container or cgroup come and go, and one may have just exec'd: each is attached
    // once its allocator is mapped, and one that cannot be traced is said, not fatal.
    if !targets.comms.is_empty() || !targets.selector.is_empty() || targets.every_container {
        for pid in targets.running_chosen(&mut state.registry) {
            let _ = targets.probes.add_target(pid);
            targets.detect_python(&mut state, pid, true);
            if watching {
                targets.watch(&mut state, pid);
                continue;
            }
            targets
                .allocator_pending
                .insert(pid, Instant::now() + PENDING_WINDOW);
        }
        targets.attach_pending_allocators(&mut state);
    }
    let verb = if watching { "watching" } else { "tracing" };
    for comm in &config.comms {
        log::info!("{verb} processes named {comm}, running or started from now on");
    }
    for container in &config.containers {
        log::info!("{verb} the processes of container {container}, running or started from now on");
    }
    for cgroup in &config.cgroups {
        log::info!("{verb} the processes of cgroup {cgroup}, running or started from now on");
    }

    let mut child_events: Option<UnboundedReceiver<ChildEvent>> = None;
    let mut child_pid: Option<u32> = None;
    let mut command_pidfd: Option<OwnedFd> = None;
    if !config.command.is_empty() {
        let program = spawn::resolve_program(&config.command[0])?;
        let image = spawn::executable_image(&program)?;
        let allocator = allocator::for_command(&mut state.registry, &image)?;
        let child = spawn::spawn(&program, &config.command)?;
        let pid = child.pid;
        targets.attach(pid, allocator)?;
        targets.probes.do_not_hold_at_exec(pid)?;
        let comm: String = program
            .file_name()
            .map(|n| String::from_utf8_lossy(tracer_common::comm_bytes(n.as_bytes())).into_owned())
            .unwrap_or_default();
        state.registry.set_info(ProcessInfo {
            pid,
            comm,
            cmdline: config
                .command
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            ..Default::default()
        });
        targets.order.push(pid);
        targets.spawned_exec = Some(pid);
        window_start.get_or_insert_with(now);
        child_events = Some(child.release());
        child_pid = Some(pid);
        // Opened while it is certainly alive and ours: its pid may be reused once it is reaped.
        command_pidfd = pidfd(pid).ok();
    }

    let (cgroups, pythons, python_stacks) = (
        Arc::clone(&state.cgroups),
        Arc::clone(&state.pythons),
        Arc::clone(&state.python_stacks),
    );
    // What goes away within milliseconds is read on the reader thread, at once: an OOM victim's cgroup, and the
    // code objects of a Python stack (a module's, once its import is done), with the kernel's copies of them.
    let first_look = move |record: &[u8]| match Event::try_from(record) {
        Ok(Event::Oom(kill)) => lock(&cgroups).remember(kill.header.cgroup_id),
        Ok(Event::Stack {
            header,
            stack_id,
            python,
            ..
        }) if !python.frames.is_empty() => {
            let named = name_python(&mut lock(&pythons), header.pid, &python);
            lock(&python_stacks).insert(stack_id, named);
        }
        Ok(Event::Code(copy)) => {
            if let Some(reader) = lock(&pythons).get_mut(&copy.header.pid) {
                reader.remember(&copy);
            }
        }
        Ok(Event::StackWindow(window)) if !window.python.frames.is_empty() => {
            let named = name_python(&mut lock(&pythons), window.header.pid, &window.python);
            lock(&python_stacks).insert(window_python_key(window.stack_id), named);
        }
        _ => {}
    };
    let mut reader = RingReader::start(targets.probes.take_ring_buffer()?, first_look)
        .context("cannot start the ring buffer's reader")?;
    let (started, start_ns) = window_start.unwrap_or_else(now);
    let deadline = config.duration.map(|d| tokio::time::Instant::now() + d);
    let mut pending_timer = tokio::time::interval(PENDING_INTERVAL);
    let mut history_timer = tokio::time::interval(HISTORY_INTERVAL);
    let mut history_ticks = 0u64;
    let mut watch_timer = tokio::time::interval(WATCH_TICK);
    let mut stacks_unheld = false;
    // When the last target seen to end ended: the window ends there once none is left, not when alloctrace
    // is done reading what they did (which a loaded machine can make seconds later: a leak whose blocks were
    // born up to the exit would look as if it had stopped growing a quarter of the window before the end).
    let mut last_exit_ns = None;
    let mut child_held_at_exit = false;
    // With --comm, processes may still come, and without targets alloctrace only watches: only the duration
    // or Ctrl-C end the trace then.
    let waits_for_more = !config.comms.is_empty()
        || config.chooses_by_cgroup()
        || targets.order.is_empty()
        || watching;
    if oom_sink.is_some() && !targets.probes.oom_watched {
        bail!("this kernel has no usable oom:mark_victim tracepoint: OOM kills cannot be reported");
    }
    let ctrl_c = crate::os::stop_requested();
    tokio::pin!(ctrl_c);
    // The agent says it is ready at its first tick, with where it serves.
    if !watching && let Err(err) = crate::os::say_ready(&crate::os::Ready::tracing(&targets.order))
    {
        warn(format_args!("cannot write to --ready-fd: {err}"));
    }

    while waits_for_more || targets.running() > 0 {
        tokio::select! {
            delivery = reader.next() => match delivery {
                Some(Delivery::Records(records)) => consume(records, &mut targets, &mut state),
                Some(Delivery::Flushed) => {}
                None => bail!("the ring buffer's reader stopped"),
            },
            _ = history_timer.tick() => {
                let now = system::monotonic_ns();
                let live: HashMap<u32, u64> = match &state.resident {
                    Some(resident) => resident
                        .processes()
                        .map(|(pid, r)| (pid, r.resident_bytes()))
                        .collect(),
                    None => state.ledger.live_bytes_by_pid(&targets.probes.site_counters()?),
                };
                let growth_tick = history_ticks.is_multiple_of(GROWTH_EVERY);
                history_ticks += 1;
                for (pid, bytes) in live {
                    state.history.record(now, pid, bytes);
                    if !growth_tick {
                        continue;
                    }
                    let samples = state.growth.entry(pid).or_default();
                    if samples.len() == GROWTH_SAMPLES {
                        samples.pop_front();
                    }
                    samples.push_back((now, bytes));
                    samples.make_contiguous();
                }
            }
            // A loader maps an allocator and a shared libpython milliseconds after exec; allocations follow.
            // The interpreter first: attaching the allocator announces the process as traced, and a process
            // said to be traced must have its Python frames read (the loader maps libpython before libc).
            _ = pending_timer.tick(), if !targets.python_pending.is_empty() || !targets.allocator_pending.is_empty() => {
                targets.detect_pending_pythons(&mut state);
                targets.attach_pending_allocators(&mut state);
            }
            Some(pid) = exits.recv() => {
                last_exit_ns = Some(system::monotonic_ns());
                flush(&mut reader, &mut targets, &mut state).await;
                targets.exited.entry(pid).or_insert(Exit::Exited);
                targets.probes.detach(pid);
                if watching {
                    state.gone.push(pid);
                }
            }
            _ = watch_timer.tick(), if watching => {
                let tick = state.watch_tick(&targets)?;
                if let Some(watch) = &mut watch {
                    let mut escalation = Escalation {
                        targets: &mut targets,
                        state: &mut state,
                        on: uprobes,
                    };
                    (watch.on_tick)(&tick, &mut escalation);
                }
                // The second phase of forgetting stacks needs every record written before the first handled.
                if stacks_unheld {
                    flush(&mut reader, &mut targets, &mut state).await;
                }
                stacks_unheld = state.forget_stacks(&mut targets.probes);
            }
            Some(event) = recv(&mut child_events) => match event {
                ChildEvent::ExecFailed(err) => {
                    bail!("cannot run {}: {err}", config.command[0].to_string_lossy());
                }
                ChildEvent::Exiting(release) => {
                    last_exit_ns = Some(system::monotonic_ns());
                    child_held_at_exit = true;
                    // Held at its exit with its memory still mapped: name what it allocated last.
                    flush(&mut reader, &mut targets, &mut state).await;
                    if let Some(pid) = child_pid {
                        state.registry.refresh(pid);
                    }
                    drop(release);
                }
                ChildEvent::Exited(exit) => {
                    // Not held at its exit (killed before it could stop there): it ended now.
                    if !child_held_at_exit {
                        last_exit_ns = Some(system::monotonic_ns());
                    }
                    flush(&mut reader, &mut targets, &mut state).await;
                    if let Some(pid) = child_pid {
                        targets.exited.insert(pid, exit);
                        targets.probes.detach(pid);
                    }
                }
            },
            _ = sleep_until(deadline) => break,
            _ = &mut ctrl_c => break,
        }
        follow_discoveries(&mut targets, &mut state);
        let window = (start_ns, system::monotonic_ns());
        report_ooms(&mut state, &targets, &sampling, window, &mut oom_sink)?;
        state.forget_gone(&mut targets);
    }
    // Ended by the last target's exit, or else now (the duration, a stop signal).
    let ended_ns = match last_exit_ns {
        Some(exit_ns) if !waits_for_more && targets.running() == 0 => exit_ns,
        _ => system::monotonic_ns(),
    };
    // Nothing is attached to from here on: new processes are no longer held. A process held just before that is
    // announced within microseconds (the record goes out before the stop): the flush after the pause handles it.
    targets.probes.hold_new_processes(false)?;
    tokio::time::sleep(HOLD_SETTLE).await;
    flush(&mut reader, &mut targets, &mut state).await;
    targets.probes.all_held_released();
    drop(reader);
    let end_ns = ended_ns.max(start_ns);
    report_ooms(
        &mut state,
        &targets,
        &sampling,
        (start_ns, end_ns),
        &mut oom_sink,
    )?;
    let heap = targets.probes.site_counters()?;
    for (pid, bytes) in state.ledger.live_bytes_by_pid(&heap) {
        state.history.record_last(end_ns, pid, bytes);
    }
    state.take_heap(&targets.probes, &sampling)?;

    let kernel = targets.probes.losses()?;
    let tallies = targets.probes.tallies()?;
    let lost = Losses {
        events: kernel[Loss::RingBufFull as usize],
        untracked_calls: kernel[Loss::InFlightFull as usize],
        untracked_blocks: kernel[Loss::LiveTableFull as usize],
        untracked_sites: kernel[Loss::SiteTableFull as usize],
        histogram_sizes: kernel[Loss::SizeTableFull as usize],
        stacks: kernel[Loss::StackUnavailable as usize] + state.stackless,
        undecodable: state.undecodable,
        untraced_processes: targets.untraced,
    };
    // Selectors that chose nothing in the whole trace are said: a misspelt name must not look like a quiet
    // process. (The watch tier forgets the processes that exit: it cannot tell.)
    if !watching
        && targets.order.is_empty()
        && !(config.comms.is_empty() && config.containers.is_empty() && config.cgroups.is_empty())
    {
        warn(format_args!(
            "no process matched --comm, --container or --cgroup during the trace"
        ));
    }
    // Every process a site names is listed, even one the trace only saw through the kernel's tables.
    let mut listed: Vec<u32> = targets.order.clone();
    for pid in (0..state.sites.len()).map(|site| state.sites.get(site).pid) {
        if !listed.contains(&pid) {
            listed.push(pid);
        }
    }
    let processes = listed
        .iter()
        .map(|&pid| ProcessReport {
            info: state.registry.info(pid).cloned().unwrap_or(ProcessInfo {
                pid,
                ..Default::default()
            }),
            exit: targets.exited.get(&pid).copied(),
            python: lock(&state.pythons).get(&pid).map(|r| r.info().clone()),
        })
        .collect();
    // Apart from the struct below: a guard taken inside it would live to its end, and a second one deadlock.
    let (unreadable_python_frames, cache_evictions) = {
        let pythons = lock(&state.pythons);
        (
            pythons.values().map(Reader::unreadable_frames).sum(),
            CacheEvictions {
                modules: state.registry.evicted_modules(),
                python_code_objects: pythons.values().map(Reader::evicted_codes).sum(),
            },
        )
    };
    Ok(Traced {
        unfinished_command: command_pidfd
            .filter(|_| child_pid.is_some_and(|pid| !targets.exited.contains_key(&pid))),
        _probes: targets.probes,
        trace: Trace {
            ledger: state.ledger,
            sites: state.sites,
            processes,
            allocators: targets.allocators,
            lost,
            duration_s: started.elapsed().as_secs_f64(),
            window: (start_ns, end_ns),
            sampling,
            unknown_frees: tallies[Tally::UnknownFree as usize],
            unseen_frees: tallies[Tally::UnseenFree as usize],
            unreadable_python_frames,
            cache_evictions,
            history: state.history,
        },
    })
}

/// The watch tier's session, as the agent escalates it.
struct Escalation<'a> {
    targets: &'a mut Targets,
    state: &'a mut State,
    /// The uprobe programs are loaded.
    on: bool,
}

impl Escalate for Escalation<'_> {
    fn escalate(&mut self, pid: u32) -> anyhow::Result<()> {
        if !self.on {
            bail!("escalation is off");
        }
        if self.state.escalated.contains_key(&pid) {
            return Ok(());
        }
        let allocator = allocator::for_pid(&mut self.state.registry, pid)
            .with_context(|| format!("cannot find the allocator of pid {pid}"))?;
        // Before the first probe goes on: no block it records is older than its escalation.
        let since = system::monotonic_ns();
        if let Err(err) = self.targets.probes.attach(pid, &allocator) {
            // The probes that went on come off, and what they recorded meanwhile with them.
            self.targets.probes.detach(pid);
            let _ = self.targets.probes.forget_heap(pid);
            return Err(err);
        }
        self.state.escalated.insert(pid, since);
        Ok(())
    }

    fn relax(&mut self, pid: u32) -> anyhow::Result<()> {
        self.targets.probes.detach(pid);
        if self.state.escalated.remove(&pid).is_none() {
            return Ok(());
        }
        self.targets.probes.forget_heap(pid)
    }
}

/// Attaches to the processes the last records revealed.
fn follow_discoveries(targets: &mut Targets, state: &mut State) {
    for discovery in std::mem::take(&mut state.discovered) {
        match discovery {
            // A target's new image may use another allocator; a --comm, --container or --cgroup match is new.
            Discovery::Execed { pid, .. } => {
                let known =
                    targets.order.contains(&pid) || targets.allocator_pending.contains_key(&pid);
                if known || targets.chosen(&mut state.registry, pid) {
                    if !known {
                        // A --comm match is marked by the kernel already; a cgroup match is marked here.
                        let _ = targets.probes.add_target(pid);
                    }
                    targets.follow(state, discovery);
                }
            }
            Discovery::Forked { .. } | Discovery::LibraryMapped { .. } => {
                targets.follow(state, discovery)
            }
        }
    }
}

/// Warns the user of what the trace cannot do: one line on stderr, which the binary's logger escapes whole.
fn warn(message: std::fmt::Arguments<'_>) {
    log::warn!("{message}");
}

async fn recv<T>(receiver: &mut Option<UnboundedReceiver<T>>) -> Option<T> {
    match receiver {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
