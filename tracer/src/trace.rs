//! A tracing session: attaches to the targets, consumes the ring buffer until the trace ends (duration, Ctrl-C,
//! or every target gone), and turns what it gathered into a report.

use std::{
    collections::HashMap,
    fs::File,
    io::Write as _,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Instant,
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel},
};
use tracer_common::{AllocFn, Loss};

use crate::{
    aggregate::{LiveTable, Site, SiteId, Sites},
    cli::LeaksArgs,
    decode::Event,
    output,
    probes::Probes,
    procs::{ProcessInfo, Registry, allocator},
    report::{
        Exit, Losses,
        leaks::{self, AllocatorReport, LeaksInput, ProcessReport},
    },
    spawn::{self, ChildEvent},
    system,
};

/// How often the ring buffer is drained when the probes have not asked for it.
const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// What the session has learnt from the events so far.
#[derive(Default)]
struct State {
    registry: Registry,
    sites: Sites,
    table: LiveTable,
    /// Frames of every stack id received.
    stacks: HashMap<u64, Vec<u64>>,
    /// Site of each (pid, function, stack id) already seen.
    site_of_stack: HashMap<(u32, AllocFn, u64), SiteId>,
    stackless: u64,
    undecodable: u64,
}

impl State {
    fn handle(&mut self, bytes: &[u8]) {
        let event = match Event::try_from(bytes) {
            Ok(event) => event,
            Err(_) => {
                self.undecodable += 1;
                return;
            }
        };
        match event {
            Event::Stack {
                stack_id, frames, ..
            } => {
                self.stacks.insert(stack_id, frames);
            }
            Event::Alloc {
                header,
                func,
                addr,
                size,
                stack_id,
                ..
            } => {
                if addr == 0 {
                    self.table.realloc_returned_null(header.tid, size);
                    return;
                }
                let site = self.site(header.pid, func, stack_id);
                self.table.allocated(&header, func, addr, size, site);
            }
            Event::Free { header, func, addr } => {
                self.table.freed(header.pid, header.tid, func, addr);
            }
            Event::Exec { header } => {
                self.table.exec(header.pid);
                self.site_of_stack.retain(|&(pid, ..), _| pid != header.pid);
                self.registry.refresh(header.pid);
            }
        }
    }

    /// The site of an allocation, named the first time its stack is seen, while the process is alive.
    fn site(&mut self, pid: u32, func: AllocFn, stack_id: u64) -> SiteId {
        if let Some(&site) = self.site_of_stack.get(&(pid, func, stack_id)) {
            return site;
        }
        let Some(frames) = self.stacks.get(&stack_id) else {
            // No stack: the kernel could not take it, or its record was lost. Not cached, so that the stack is
            // used once it arrives.
            self.stackless += 1;
            return self.sites.intern(Site {
                pid,
                func,
                frames: Vec::new(),
            });
        };
        let frames = self.registry.symbolize(pid, frames);
        let site = self.sites.intern(Site { pid, func, frames });
        self.site_of_stack.insert((pid, func, stack_id), site);
        site
    }
}

/// Consumes every record in the ring buffer now.
fn drain(ring: &mut RingBuf<MapData>, state: &mut State) {
    while let Some(record) = ring.next() {
        state.handle(&record);
    }
}

fn pidfd(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// True once the process behind a pidfd has exited.
fn has_exited(fd: &OwnedFd) -> bool {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(&mut poll, 1, 0) == 1 }
}

/// Sends `pid` on `exits` when the process exits.
fn watch_exit(pid: u32, fd: OwnedFd, exits: UnboundedSender<u32>) -> anyhow::Result<()> {
    // SAFETY: the AsyncFd owns the pidfd, which stays open, and the same, for the AsyncFd's whole life.
    let fd = unsafe { AsyncFd::register(fd) }
        .map_err(std::io::Error::from)
        .context("cannot watch a pidfd")?;
    tokio::spawn(async move {
        let _ = fd.readable().await;
        let _ = exits.send(pid);
    });
    Ok(())
}

pub async fn leaks(args: LeaksArgs) -> anyhow::Result<()> {
    system::require_root()?;
    system::require_uprobes()?;
    system::ensure_tracefs()?;
    let mut probes = Probes::load()?;
    let mut state = State::default();
    let (exits_tx, mut exits) = unbounded_channel();
    let mut targets: Vec<u32> = Vec::new();
    let mut exit_status: HashMap<u32, Exit> = HashMap::new();
    let mut allocators: Vec<AllocatorReport> = Vec::new();

    for &pid in &args.pids {
        if pid == std::process::id() {
            bail!("alloctrace cannot trace itself (pid {pid})");
        }
        let fd = pidfd(pid).map_err(|e| match e.raw_os_error() {
            Some(libc::ESRCH) => anyhow::anyhow!("no process with pid {pid}"),
            _ => anyhow::anyhow!("cannot watch pid {pid}: {e}"),
        })?;
        let allocator = allocator::for_pid(&mut state.registry, pid)
            .with_context(|| format!("cannot find the allocator of pid {pid}"))?;
        probes.attach(pid, &allocator)?;
        if has_exited(&fd) {
            bail!("process {pid} exited before probes were attached");
        }
        watch_exit(pid, fd, exits_tx.clone())?;
        eprintln!("alloctrace: tracing pid {pid} through {}", allocator.path);
        allocators.push(AllocatorReport { pid, allocator });
        targets.push(pid);
    }

    let mut child_events: Option<UnboundedReceiver<ChildEvent>> = None;
    let mut child_pid: Option<u32> = None;
    if !args.command.is_empty() {
        let program = spawn::resolve_program(&args.command[0])?;
        let image = spawn::executable_image(&program)?;
        let allocator = allocator::for_command(&image)?;
        let child = spawn::spawn(&program, &args.command)?;
        let pid = child.pid;
        probes.attach(pid, &allocator)?;
        let comm: String = program
            .file_name()
            .map(|n| n.to_string_lossy().chars().take(15).collect())
            .unwrap_or_default();
        state.registry.set_info(ProcessInfo {
            pid,
            comm,
            cmdline: args
                .command
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            container: None,
        });
        eprintln!("alloctrace: tracing pid {pid} through {}", allocator.path);
        allocators.push(AllocatorReport { pid, allocator });
        child_events = Some(child.release());
        child_pid = Some(pid);
        targets.push(pid);
    }

    // SAFETY: the AsyncFd owns the ring buffer, whose map descriptor stays open, and the same, while it lives.
    let mut ring = unsafe { AsyncFd::register(probes.take_ring_buffer()?) }
        .map_err(std::io::Error::from)
        .context("cannot poll the ring buffer")?;
    let started = Instant::now();
    let start_ns = system::monotonic_ns();
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    // The probes wake this loop only when a lot is waiting; the timer bounds how stale the table gets.
    let mut drain_timer = tokio::time::interval(DRAIN_INTERVAL);
    let mut running = targets.len();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    while running > 0 {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("cannot poll the ring buffer")?;
                drain(guard.get_inner_mut(), &mut state);
                guard.clear_ready();
            }
            _ = drain_timer.tick() => drain(ring.get_mut(), &mut state),
            Some(pid) = exits.recv() => {
                drain(ring.get_mut(), &mut state);
                exit_status.entry(pid).or_insert(Exit::Exited);
                running -= 1;
            }
            Some(event) = recv(&mut child_events) => match event {
                ChildEvent::ExecFailed(err) => {
                    bail!("cannot run {}: {err}", args.command[0].to_string_lossy());
                }
                ChildEvent::Exiting(release) => {
                    // Held at its exit with its memory still mapped: name what it allocated last.
                    drain(ring.get_mut(), &mut state);
                    if let Some(pid) = child_pid {
                        state.registry.refresh(pid);
                    }
                    drop(release);
                }
                ChildEvent::Exited(exit) => {
                    drain(ring.get_mut(), &mut state);
                    if let Some(pid) = child_pid {
                        exit_status.insert(pid, exit);
                    }
                    running -= 1;
                }
            },
            _ = sleep_until(deadline) => break,
            _ = &mut ctrl_c => break,
        }
    }
    drain(ring.get_mut(), &mut state);
    let now_ns = system::monotonic_ns();

    let kernel = probes.losses()?;
    let lost = Losses {
        events: kernel[Loss::RingBufFull as usize],
        untracked_calls: kernel[Loss::InFlightFull as usize],
        stacks: kernel[Loss::StackUnavailable as usize] + state.stackless,
        undecodable: state.undecodable,
    };
    let processes = targets
        .iter()
        .map(|&pid| ProcessReport {
            info: state.registry.info(pid).cloned().unwrap_or(ProcessInfo {
                pid,
                ..Default::default()
            }),
            exit: exit_status.get(&pid).copied(),
        })
        .collect();
    let report = leaks::build(LeaksInput {
        table: &state.table,
        sites: &state.sites,
        processes,
        allocators,
        lost,
        duration_s: started.elapsed().as_secs_f64(),
        now_ns: now_ns.max(start_ns),
        min_age_ns: args.min_age.as_nanos() as u64,
        top: args.top,
    });
    let mut out: Box<dyn std::io::Write> = match &args.output {
        Some(path) => Box::new(
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    output::write_leaks(&report, args.format, &mut out)?;
    out.flush()?;
    // A command alloctrace started lives as long as its trace: ended first (--duration, Ctrl-C), it is stopped
    // now that the report shows what it held.
    if let Some(pid) = child_pid.filter(|pid| !exit_status.contains_key(pid)) {
        // SAFETY: signalling our own child, not yet reaped, so its pid cannot have been reused.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    Ok(())
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
