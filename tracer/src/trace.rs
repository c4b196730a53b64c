//! A tracing session: finds and attaches to the targets (pids, names, a command, and the children they fork,
//! held until attached), consumes the ring reader's records until the trace ends (duration, a stop signal, or
//! every target gone), takes the heap from the kernel's tables, and hands the ledger to the report builders.
//! The agent runs the same session in its watch tier ([`watch`]): no uprobes, sampled page faults into a
//! [`Resident`] ledger, until a stop signal; at each tick the agent may escalate processes to the allocator
//! uprobes, and relax them ([`Escalate`]).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    os::fd::OwnedFd,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use tokio::{
    io::unix::AsyncFd,
    sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel},
};
use tracer_common::{AllocFn, Loss, OomEvent, PyStatus, SiteKey, Tally};

use crate::{
    aggregate::{Ledger, Site, SiteId, Sites, resident::Resident},
    decode::{Event, PythonStack, StackWindow},
    model::{
        AllocatorReport, CacheEvictions, Exit, Losses, ProcessReport, Trace, history::History,
    },
    probes::{LoadOptions, Probes},
    procs::{
        Frame, ProcessInfo, Registry,
        airflow::TaskIdentity,
        allocator::{self, Allocator},
        container::{self, Container, Selector},
        maps::FileId,
        unwind::{self, UnwindEnd},
    },
    python::runtime::{self, Reader},
    report::oom::{self, Cgroups, OomInput, OomRecord, TopStack},
    ring::{Delivery, RingReader},
    sampling::Sampling,
    spawn::{self, ChildEvent},
    system,
};

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

/// What the session has learnt from the events so far.
#[derive(Default)]
struct State {
    registry: Registry,
    sites: Sites,
    ledger: Ledger,
    /// Every stack received, by id, named as it arrived (while its process was alive); at most `max_stacks`,
    /// in at most [`STACK_MEMORY`] bytes (`stack_bytes`).
    stacks: HashMap<u64, Arc<[Arc<Frame>]>>,
    max_stacks: usize,
    stack_bytes: usize,
    /// Every distinct frame, once: Python stacks share most of their frames.
    frames: HashSet<Arc<Frame>>,
    /// The watch tier's stacks that no sampled page held at the last tick, whose kernel mark was removed then:
    /// forgotten at the next tick unless a page or a new record of theirs came meanwhile (see
    /// [`State::forget_stacks`]).
    unheld_stacks: HashSet<u64>,
    /// The CPython processes among the targets, and what reads their frames.
    pythons: Pythons,
    /// The Python frames of stacks, named on the ring reader's thread as soon as their record was read: a
    /// module's code object is freed once its import is done, often before the event loop gets to the stack.
    python_stacks: PythonStacks,
    /// Site of each (pid, function, stack id) already seen.
    site_of_stack: HashMap<(u32, AllocFn, u64), SiteId>,
    /// Stack ids used by some site whose record never arrived, and how many.
    missing_stacks: HashSet<u64>,
    /// Per thread, the stack id its last stack window was unwound to, and the kernel's id it stands for: the
    /// allocation record that follows the window carries the kernel's.
    unwound_ids: HashMap<u32, (u64, u64)>,
    stackless: u64,
    /// OOM kills read and not yet reported.
    ooms: Vec<OomEvent>,
    /// Each process's live bytes, sampled every [`GROWTH_EVERY`] history samples over the last
    /// [`GROWTH_SAMPLES`].
    growth: HashMap<u32, VecDeque<(u64, u64)>>,
    history: History,
    /// Shared with the ring buffer's reader, which reads an OOM victim's cgroup as soon as the kill is seen.
    cgroups: Arc<Mutex<Cgroups>>,
    undecodable: u64,
    /// Processes that forked or exec'd, for the session to attach to.
    discovered: Vec<Discovery>,
    /// The watch tier's ledger (`None` when tracing allocations).
    resident: Option<Resident>,
    /// Watched processes that exited, forgotten once the OOM kills read with their exit are reported.
    gone: Vec<u32>,
    /// Watched processes escalated to the allocator uprobes, and when (`bpf_ktime_get_ns` time).
    escalated: HashMap<u32, u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Discovery {
    /// `held`: the child is stopped before its first instruction until it is attached to and continued.
    Forked { parent: u32, child: u32, held: bool },
    /// A process replaced its image at `ts_ns`; `held`: it is stopped until it is attached to and continued.
    Execed { pid: u32, ts_ns: u64, held: bool },
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
        let event = match event {
            Event::StackWindow(window) => return self.keep_unwound_stack(&window),
            Event::Alloc {
                header,
                func,
                addr,
                size,
                stack_id,
                by_allocator,
            } => Event::Alloc {
                stack_id: self.unwound_id(header.tid, stack_id),
                header,
                func,
                addr,
                size,
                by_allocator,
            },
            event => event,
        };
        // The watch tier keeps pages, not ranges: no site is made for what it only follows by the page.
        if let Some(resident) = &mut self.resident
            && follow_pages(resident, &event)
        {
            return;
        }
        match event {
            Event::Stack {
                header,
                stack_id,
                frames,
                guessed_caller,
                python,
            } => {
                // Its Python frames, named early on the reader's thread, are taken whether it is kept or not.
                let early = lock(&self.python_stacks).remove(&stack_id);
                // The kernel marked it as sent again: it is not to be forgotten at the next tick.
                self.unheld_stacks.remove(&stack_id);
                // A target that makes ever new stacks must not make the tracer grow without bound: past the
                // limit, a new stack is not kept, and what uses it is counted as allocated without a stack.
                let full = self.stacks.len() >= self.max_stacks || self.stack_bytes >= STACK_MEMORY;
                if full && !self.stacks.contains_key(&stack_id) {
                    return;
                }
                // Named now, while the process that sent it is alive: its blocks may outlive it.
                let pid = header.pid;
                let native = self.registry.symbolize(pid, &frames, guessed_caller);
                let python =
                    early.unwrap_or_else(|| name_python(&mut lock(&self.pythons), pid, &python));
                self.keep_stack(stack_id, native, python);
            }
            Event::Alloc {
                header,
                func,
                addr,
                size,
                stack_id,
                by_allocator,
            } => match func {
                AllocFn::Brk => {
                    let site = (!by_allocator).then(|| self.site(header.pid, func, stack_id));
                    self.ledger.break_moved(&header, addr, site);
                }
                AllocFn::Mremap => {
                    let site = self.site(header.pid, func, stack_id);
                    self.ledger.remapped(&header, addr, size, site);
                }
                AllocFn::Mmap => {
                    let site = self.site(header.pid, func, stack_id);
                    self.ledger.mapped(&header, addr, size, site);
                }
                // Heap blocks are counted in the kernel's tables, never sent.
                _ => self.undecodable += 1,
            },
            Event::Free {
                header,
                func,
                addr,
                size,
            } => {
                if func.maps_pages() {
                    self.ledger
                        .unmapped(header.pid, header.tid, func, addr, size);
                } else {
                    self.undecodable += 1;
                }
            }
            Event::Exec { header, held } => {
                self.ledger.exec(header.pid);
                if let Some(resident) = &mut self.resident {
                    resident.forget(header.pid);
                }
                self.site_of_stack.retain(|&(pid, ..), _| pid != header.pid);
                // Watched, every exec on the host comes here: only the chosen are read, once chosen.
                if self.resident.is_none() {
                    self.registry.refresh(header.pid);
                }
                self.discovered.push(Discovery::Execed {
                    pid: header.pid,
                    ts_ns: header.ts_ns,
                    held,
                });
            }
            Event::Fork {
                parent_pid,
                child_pid,
                held,
                ..
            } => {
                self.discovered.push(Discovery::Forked {
                    parent: parent_pid,
                    child: child_pid,
                    held,
                });
            }
            Event::Oom(kill) => self.ooms.push(kill),
            // Unwound above, before the allocation record it precedes.
            Event::StackWindow(_) => {}
            // Only the watch tier's programs send faults.
            Event::Fault { .. } => self.undecodable += 1,
        }
    }

    /// Keeps a named stack under `stack_id`, its Python frames merged where the interpreter runs them.
    fn keep_stack(&mut self, stack_id: u64, native: Vec<Frame>, python: Vec<Frame>) {
        let named: Vec<Arc<Frame>> = runtime::merge(native, python)
            .into_iter()
            .map(|frame| self.intern(frame))
            .collect();
        self.stack_bytes += named.len() * size_of::<Arc<Frame>>();
        // Sent twice (two threads at once, or sent again after the kernel forgot it): the old copy goes.
        if let Some(old) = self.stacks.insert(stack_id, named.into()) {
            self.stack_bytes -= old.len() * size_of::<Arc<Frame>>();
        }
    }

    /// A stack window, unwound with the CFI of the process's objects (`procs::unwind`): its stack gets an id
    /// of its own (the same callers the same id), kept as the kernel's stacks are and within the same bounds,
    /// and the allocation record that follows on this thread is given that id. Past the bounds, or when the
    /// unwind found no caller at all, the allocation keeps the kernel's stack.
    fn keep_unwound_stack(&mut self, window: &StackWindow) {
        let (pid, tid) = (window.header.pid, window.header.tid);
        self.unwound_ids.remove(&tid);
        // Taken whatever becomes of the window, as the kernel's stacks' are.
        let early = lock(&self.python_stacks).remove(&window_python_key(window.stack_id));
        let unwound = self
            .registry
            .unwind(pid, &window.regs, &window.bytes, &window.frames);
        if unwound.frames.len() < 2 {
            return;
        }
        let id = unwind::unwound_stack_id(window.stack_id, &unwound.frames);
        if !self.stacks.contains_key(&id) {
            if self.stacks.len() >= self.max_stacks || self.stack_bytes >= STACK_MEMORY {
                return;
            }
            let mut native = self.registry.symbolize(pid, &unwound.frames, false);
            if unwound.end == UnwindEnd::WindowEnded {
                native.push(Frame::outer_frames_not_unwound());
            }
            let python =
                early.unwrap_or_else(|| name_python(&mut lock(&self.pythons), pid, &window.python));
            self.keep_stack(id, native, python);
        }
        // Threads are few; a window whose allocation record was lost leaves its entry until the thread's next.
        if self.unwound_ids.len() >= MAX_UNWOUND_THREADS {
            self.unwound_ids.clear();
        }
        self.unwound_ids.insert(tid, (window.stack_id, id));
    }

    /// The stack id of an allocation record of thread `tid` carrying the kernel's `stack_id`: the unwound one
    /// when the window before it was unwound.
    fn unwound_id(&mut self, tid: u32, stack_id: u64) -> u64 {
        match self.unwound_ids.get(&tid) {
            Some(&(kernel, unwound)) if kernel == stack_id && stack_id != 0 => {
                self.unwound_ids.remove(&tid);
                unwound
            }
            _ => stack_id,
        }
    }

    /// The one shared copy of a frame, counted in `stack_bytes` the first time it is seen.
    fn intern(&mut self, frame: Frame) -> Arc<Frame> {
        if let Some(known) = self.frames.get(&frame) {
            return Arc::clone(known);
        }
        self.stack_bytes += frame.heap_bytes();
        let frame = Arc::new(frame);
        self.frames.insert(Arc::clone(&frame));
        frame
    }

    /// Takes the heap from the kernel's tables into the ledger.
    fn take_heap(&mut self, probes: &Probes, sampling: &Sampling) -> anyhow::Result<()> {
        let tables = probes.heap_tables()?;
        let mut ledger = std::mem::take(&mut self.ledger);
        ledger.set_heap(&tables, sampling, |key: &SiteKey| {
            let func = AllocFn::try_from(key.func).unwrap_or(AllocFn::Malloc);
            self.site(key.tgid, func, key.stack_id)
        });
        self.ledger = ledger;
        Ok(())
    }

    /// The stacks that made a watched process's pages resident, biggest first, named.
    fn resident_stacks(&self, pid: u32, most: usize) -> Vec<TopStack> {
        let Some(resident) = &self.resident else {
            return Vec::new();
        };
        resident
            .top_stacks(pid)
            .into_iter()
            .take(most)
            .map(|(stack_id, residency)| TopStack {
                live_bytes: residency.resident_bytes(),
                live_count: residency.resident_pages,
                stack: self
                    .stacks
                    .get(&stack_id)
                    .map(|frames| frames.iter().map(|f| Frame::clone(f)).collect())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// What the watched processes hold now.
    fn watch_tick(&self, targets: &Targets) -> anyhow::Result<WatchTick> {
        let Some(resident) = &self.resident else {
            bail!("not watching");
        };
        let processes = targets
            .order
            .iter()
            .map(|&pid| {
                let info = self.registry.info(pid);
                let stacks = self.resident_stacks(pid, WATCH_STACKS);
                WatchedProcess {
                    pid,
                    comm: info.map(|i| i.comm.clone()).unwrap_or_default(),
                    container: info.and_then(|i| i.container.clone()),
                    task: info.and_then(|i| i.task.clone()),
                    resident_bytes: resident.process(pid).resident_bytes(),
                    escalated: self.escalated.contains_key(&pid),
                    stacks,
                }
            })
            .collect();
        let kernel = targets.probes.losses()?;
        Ok(WatchTick {
            processes,
            lost_events: kernel[Loss::RingBufFull as usize] + self.undecodable + resident.refused(),
        })
    }

    /// The stacks of the blocks the uprobes recorded in an escalated process and that are still live, biggest
    /// first, named: each block weighs what it stands for when sampled.
    fn escalated_stacks(&self, probes: &Probes, sampling: &Sampling, pid: u32) -> Vec<TopStack> {
        let blocks = match probes.live_blocks(pid) {
            Ok(blocks) => blocks,
            Err(err) => {
                warn(format_args!("no escalated stacks for pid {pid}: {err:#}"));
                return Vec::new();
            }
        };
        let mut by_stack: HashMap<(u32, u64), (u64, f64)> = HashMap::new();
        for block in blocks {
            let (count, bytes) = sampling.weigh(block.size);
            let sum = by_stack.entry((block.func, block.stack_id)).or_default();
            sum.0 += bytes;
            sum.1 += count;
        }
        let mut stacks: Vec<TopStack> = by_stack
            .into_iter()
            .map(|((_, stack_id), (bytes, count))| TopStack {
                live_bytes: bytes,
                live_count: count.round() as u64,
                stack: self
                    .stacks
                    .get(&stack_id)
                    .map(|frames| frames.iter().map(|f| Frame::clone(f)).collect())
                    .unwrap_or_default(),
            })
            .collect();
        stacks.sort_by_key(|s| std::cmp::Reverse(s.live_bytes));
        stacks.truncate(oom::TOP_STACKS);
        stacks
    }

    /// Forgets the watched processes that exited: their OOM kills, read with their exit, are reported.
    fn forget_gone(&mut self, targets: &mut Targets) {
        for pid in std::mem::take(&mut self.gone) {
            if self.escalated.remove(&pid).is_some()
                && let Err(err) = targets.probes.forget_heap(pid)
            {
                warn(format_args!("{err:#}"));
            }
            if let Some(resident) = &mut self.resident {
                resident.forget(pid);
            }
            targets.order.retain(|&p| p != pid);
            targets.exited.remove(&pid);
            self.growth.remove(&pid);
            self.history.forget(pid);
            lock(&self.pythons).remove(&pid);
            self.registry.forget(pid);
        }
    }

    /// The watch tier's stacks that no sampled page holds any more (their processes are gone, or released
    /// what they touched), forgotten with the frames only they named, in two phases: at one tick the kernel's
    /// marks of the stacks held by nobody are removed (a process that makes such a stack again sends it
    /// again); at the next, once every record written before that has been handled (`flushed`), those still
    /// held by nobody, and not sent again meanwhile, are forgotten. A stack is so never forgotten between its
    /// record and the first sample that names it, nor while the kernel takes it as sent. Returns whether
    /// stacks wait for the second phase (the caller flushes the ring buffer before the next call).
    fn forget_stacks(&mut self, probes: &mut Probes) -> bool {
        let Some(resident) = &self.resident else {
            return false;
        };
        let held = resident.held_stacks();
        let mut forgotten = 0;
        for id in std::mem::take(&mut self.unheld_stacks) {
            if held.contains(&id) {
                continue;
            }
            if let Some(frames) = self.stacks.remove(&id) {
                self.stack_bytes -= frames.len() * size_of::<Arc<Frame>>();
                forgotten += 1;
            }
        }
        // A frame only the interning set holds is named by no stack any more.
        if forgotten > 0 {
            let stack_bytes = &mut self.stack_bytes;
            self.frames.retain(|frame| {
                let named = Arc::strong_count(frame) > 1;
                if !named {
                    *stack_bytes -= frame.heap_bytes();
                }
                named
            });
        }
        self.unheld_stacks = self
            .stacks
            .keys()
            .filter(|id| !held.contains(id))
            .copied()
            .collect();
        if let Err(err) = probes.forget_sent_stacks(&self.unheld_stacks) {
            // Kept, then: a stack the kernel takes as sent must stay named.
            warn(format_args!("{err:#}"));
            self.unheld_stacks.clear();
        }
        !self.unheld_stacks.is_empty()
    }

    /// The site of an allocation, named the first time its stack is seen, while the process is alive.
    fn site(&mut self, pid: u32, func: AllocFn, stack_id: u64) -> SiteId {
        if let Some(&site) = self.site_of_stack.get(&(pid, func, stack_id)) {
            return site;
        }
        let Some(frames) = self.stacks.get(&stack_id) else {
            // No stack: the kernel could not take it (counted there), or its record was lost. Not cached, so
            // that the stack is used once it arrives.
            if stack_id != 0 && self.missing_stacks.insert(stack_id) {
                self.stackless += 1;
            }
            return self.sites.intern(Site {
                pid,
                func,
                frames: Arc::from([]),
            });
        };
        let site = self.sites.intern(Site {
            pid,
            func,
            frames: Arc::clone(frames),
        });
        self.site_of_stack.insert((pid, func, stack_id), site);
        site
    }
}

/// The watch tier's share of the records: sampled faults, and the calls that release or move pages. False for
/// the others.
fn follow_pages(resident: &mut Resident, event: &Event) -> bool {
    match *event {
        Event::Fault {
            header,
            addr,
            stack_id,
            weight,
        } => resident.fault(header.pid, addr, stack_id, weight),
        Event::Alloc {
            header,
            func,
            addr,
            size,
            ..
        } => match func {
            AllocFn::Brk => resident.break_moved(header.pid, addr),
            AllocFn::Mremap => resident.remapped(header.pid, header.tid, addr, size),
            // A fresh mapping replaces whatever was mapped there.
            AllocFn::Mmap => resident.released(header.pid, addr, size),
            _ => return false,
        },
        Event::Free {
            header,
            func,
            addr,
            size,
        } => match func {
            AllocFn::Mremap => resident.remap_started(header.pid, header.tid, addr, size),
            AllocFn::Munmap | AllocFn::Madvise => resident.released(header.pid, addr, size),
            _ => return false,
        },
        _ => return false,
    }
    true
}

/// Handles records in order; a process a record reveals (a fork, an exec) is attached to before the records
/// behind it are handled, since naming them may need its new image.
fn consume(records: Vec<Vec<u8>>, targets: &mut Targets, state: &mut State) {
    for record in records {
        state.handle(&record);
        if !state.discovered.is_empty() {
            follow_discoveries(targets, state);
        }
    }
}

/// Handles every record the probes wrote up to now.
async fn flush(reader: &mut RingReader, targets: &mut Targets, state: &mut State) {
    reader.request_flush();
    while let Some(delivery) = reader.next().await {
        match delivery {
            Delivery::Records(records) => consume(records, targets, state),
            Delivery::Flushed => return,
        }
    }
}

fn pidfd(pid: u32) -> std::io::Result<OwnedFd> {
    use rustix::process::{Pid, PidfdFlags, pidfd_open};
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(std::io::ErrorKind::InvalidInput)?;
    Ok(pidfd_open(pid, PidfdFlags::empty())?)
}

/// True once the process behind a pidfd has exited.
fn has_exited(fd: &OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut [PollFd::new(fd, PollFlags::IN)], Some(&now)) == Ok(1)
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

/// The session's targets and how they are doing.
struct Targets {
    probes: Probes,
    exits_tx: UnboundedSender<u32>,
    /// Every process traced, in the order it was found.
    order: Vec<u32>,
    /// The allocator files probed for each process.
    probed: HashMap<u32, HashSet<Option<FileId>>>,
    exited: HashMap<u32, Exit>,
    allocators: Vec<AllocatorReport>,
    /// The command alloctrace started, until its exec is seen.
    spawned_exec: Option<u32>,
    /// `--comm` names, as the kernel keeps them (their first 15 bytes, which need not be UTF-8).
    comms: Vec<Vec<u8>>,
    /// `--container` and `--cgroup`.
    selector: Selector,
    /// Whether CPython processes get their Python frames read (`--no-python-frames`).
    python_frames: bool,
    /// Processes that may yet map an interpreter (a shared libpython is mapped by the loader after exec), and
    /// until when to look.
    python_pending: HashMap<u32, Instant>,
    /// Processes that exec'd, until their allocator is mapped (or the window passes).
    allocator_pending: HashMap<u32, Instant>,
    /// Processes chosen for the trace that could not be attached to (gone at once, no allocator found).
    untraced: u64,
    /// The watch tier: targets are marked for the tracepoints only, never given uprobes.
    watching: bool,
    /// Every process in a container is chosen (the agent, unless a selector narrows it).
    every_container: bool,
}

/// How long a probe that read "holding" just before it was turned off may take to announce what it held.
const HOLD_SETTLE: Duration = Duration::from_millis(20);

/// Most bytes the named stacks may take (`--max-stacks` bounds their number): a target that makes ever new deep
/// stacks stays within it.
const STACK_MEMORY: usize = 64 << 20;

/// Most threads whose unwound stack waits for its allocation record (see `State::unwound_ids`).
const MAX_UNWOUND_THREADS: usize = 65536;

/// How long after its exec a process is watched for its allocator and interpreter to be mapped, and how often.
const PENDING_WINDOW: Duration = Duration::from_secs(5);
const PENDING_INTERVAL: Duration = Duration::from_millis(5);

impl Targets {
    /// Whether a process that is not a target yet is chosen by name (`--comm`), container or cgroup.
    fn chosen(&mut self, registry: &mut Registry, pid: u32) -> bool {
        // Bytes: a name the kernel cut inside a UTF-8 character is no string.
        let named = std::fs::read(format!("/proc/{pid}/comm")).is_ok_and(|comm| {
            let comm = comm.strip_suffix(b"\n").unwrap_or(&comm);
            self.comms.iter().any(|c| c == comm)
        });
        if named {
            return true;
        }
        if self.every_container {
            return container::of_pid(pid).is_some();
        }
        if self.selector.is_empty() {
            return false;
        }
        let mut container = container::of_pid(pid);
        if let Some(container) = container.as_mut() {
            registry.name_container(container);
        }
        self.selector
            .matches(container.as_ref(), container::path_of_pid(pid).as_deref())
    }

    /// Running processes chosen by name, container or cgroup.
    fn running_chosen(&mut self, registry: &mut Registry) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let own = std::process::id();
        let pids: Vec<u32> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != own)
            .collect();
        pids.into_iter()
            .filter(|&pid| self.chosen(registry, pid))
            .collect()
    }

    /// Looks for CPython in `pid`; when found, its frames are walked from now on. Not found in a process that
    /// just exec'd (`loading`: its loader may map libpython any moment): looked for again until
    /// [`PENDING_WINDOW`] has passed.
    fn detect_python(&mut self, state: &mut State, pid: u32, loading: bool) {
        if !self.python_frames {
            return;
        }
        // Watched, a process is not held at exec: its frames are read the sooner the better, and what else is
        // known of it (its container's name) is read after.
        if self.watching {
            state.registry.refresh_maps(pid);
        } else {
            state.registry.refresh(pid);
        }
        match runtime::detect(&mut state.registry, pid) {
            Some(interpreter) => {
                self.python_pending.remove(&pid);
                let config = interpreter.bpf_config();
                let info = interpreter.info.clone();
                // The reader before the kernel walks the frames: the first stack walked is named with it, on
                // the ring reader's thread, however soon it comes.
                lock(&state.pythons).insert(pid, Reader::new(pid, interpreter));
                match config {
                    Some(config) => match self.probes.add_python(pid, &config) {
                        Err(err) => warn(format_args!("no Python frames for pid {pid}: {err:#}")),
                        // The agent says so (the trace says which processes it traces): its Python
                        // frames are read from now on.
                        Ok(()) if self.watching => {
                            log::info!("watching Python {} in pid {pid}", info.version);
                        }
                        Ok(()) => {}
                    },
                    None => warn(format_args!(
                        "no Python frames for pid {pid}: {}",
                        info.unsupported.as_deref().unwrap_or("unsupported")
                    )),
                }
            }
            None if loading => {
                self.python_pending
                    .entry(pid)
                    .or_insert_with(|| Instant::now() + PENDING_WINDOW);
            }
            None => {}
        }
    }

    /// Retries detection for the processes still pending, and gives up on those whose window has passed: after
    /// this last look, so that a process is never given up on without a look once its window is over (the
    /// event loop may have been busy through the whole window, on a loaded machine).
    fn detect_pending_pythons(&mut self, state: &mut State) {
        let now = Instant::now();
        let pending: Vec<(u32, Instant)> =
            self.python_pending.iter().map(|(&p, &t)| (p, t)).collect();
        for (pid, until) in pending {
            self.detect_python(state, pid, true);
            if until <= now {
                self.python_pending.remove(&pid);
            }
        }
    }

    fn running(&self) -> usize {
        self.order.len() - self.exited.len()
    }

    /// Attaches the allocator probes for `pid` (once per allocator file) and records it as a target.
    fn attach(&mut self, pid: u32, allocator: Allocator) -> anyhow::Result<()> {
        let probed = self.probed.entry(pid).or_default();
        if !probed.insert(allocator.file) {
            return Ok(());
        }
        self.probes.attach(pid, &allocator)?;
        log::info!("tracing pid {pid} through {}", allocator.path);
        if let Err(err) = crate::os::say_attached(pid) {
            warn(format_args!("cannot write to --ready-fd: {err}"));
        }
        self.allocators.push(AllocatorReport { pid, allocator });
        Ok(())
    }

    /// Starts watching a new target's exit.
    fn track(&mut self, pid: u32) -> anyhow::Result<()> {
        if self.order.contains(&pid) {
            return Ok(());
        }
        self.order.push(pid);
        match pidfd(pid) {
            Ok(fd) if !has_exited(&fd) => watch_exit(pid, fd, self.exits_tx.clone()),
            // Gone already: it still counts, with what it did while traced.
            _ => {
                self.exited.insert(pid, Exit::Exited);
                Ok(())
            }
        }
    }

    /// A process found after the start (a fork of a target, an exec, or a `--comm` match): trace it, or say why
    /// not. A fork has its parent's interpreter at the same addresses; an exec starts a new image.
    fn follow(&mut self, state: &mut State, discovery: Discovery) {
        match discovery {
            // A child forked once holding was off (the trace is ending) is left alone: traced from its first
            // instruction, or not at all, never from some point in its life. The watch tier holds nothing and
            // follows every child (a task runner forks the task, a prefork worker its workers).
            Discovery::Forked {
                parent,
                child,
                held,
            } => {
                if held || self.watching {
                    self.follow_fork(state, parent, child);
                }
                if held {
                    resume(child);
                }
            }
            Discovery::Execed { pid, ts_ns, held } => {
                // Its old address space is gone, and the blocks in it.
                if !self.watching
                    && let Err(err) = self.probes.forget_blocks(pid, ts_ns)
                {
                    warn(format_args!("{err:#}"));
                }
                lock(&state.pythons).remove(&pid);
                let _ = self.probes.remove_python(pid);
                // Before anything slow: a shared libpython is mapped within milliseconds, and looked for
                // from then on.
                self.detect_python(state, pid, true);
                // Watched, it needs nothing more than its exit followed. An escalated one's uprobes were on its
                // old image's allocator: off, until the agent escalates it again.
                if self.watching {
                    if state.escalated.remove(&pid).is_some() {
                        self.probes.detach(pid);
                        if let Err(err) = self.probes.forget_heap(pid) {
                            warn(format_args!("{err:#}"));
                        }
                        warn(format_args!(
                            "pid {pid} replaced its image: its allocator uprobes are off"
                        ));
                    }
                    self.watch(state, pid);
                    return;
                }
                if self.spawned_exec == Some(pid) {
                    // The command alloctrace started, whose allocator was found from this very executable.
                    self.spawned_exec = None;
                    return;
                }
                if held {
                    let attached = self.attach_held(state, pid);
                    resume(pid);
                    match attached {
                        Ok(()) => return,
                        Err(err) => warn(format_args!(
                            "pid {pid} is attached to once its loader has run: {err:#}"
                        )),
                    }
                }
                // Its allocator is the one it maps, through its own mount namespace (a container's): found
                // once its loader has mapped it.
                self.allocator_pending
                    .entry(pid)
                    .or_insert_with(|| Instant::now() + PENDING_WINDOW);
                self.attach_pending_allocators(state);
            }
        }
    }

    /// Attaches to a process stopped at its exec, before its new image has run: its allocator is the one its
    /// loader will bind (`ld.so --list`), and its executable's symbols are read now, so that its stacks are
    /// named even if it exits at once. Only for a process that sees the files alloctrace sees.
    fn attach_held(&mut self, state: &mut State, pid: u32) -> anyhow::Result<()> {
        let namespace =
            |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/mnt")).map(|m| m.ino());
        if namespace(&pid.to_string())? != namespace("self")? {
            bail!("it runs in another mount namespace");
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
        let allocator = allocator::for_command(&mut state.registry, &exe)?;
        state.registry.refresh(pid);
        if let Some(maps) = state.registry.maps(pid).cloned() {
            for mapping in maps.mappings.iter().filter(|m| m.executable) {
                let _ = state.registry.module(pid, mapping);
            }
        }
        self.attach(pid, allocator)?;
        self.track(pid)
    }

    /// A fork has its parent's address space: its allocator, its interpreter, its task.
    fn follow_fork(&mut self, state: &mut State, parent: u32, child: u32) {
        if !std::path::Path::new(&format!("/proc/{child}")).exists() {
            // Gone before its record was read: what it did while traced is already counted. Watched, the pages
            // it touched meanwhile go with it.
            if self.watching {
                state.gone.push(child);
            }
            return;
        }
        let interpreter = lock(&state.pythons)
            .get(&parent)
            .map(|reader| reader.interpreter().clone());
        if let Some(interpreter) = interpreter {
            let config = interpreter.bpf_config();
            let version = interpreter.info.version.clone();
            // The reader before the kernel walks the frames, as for an exec'd interpreter.
            lock(&state.pythons).insert(child, Reader::new(child, interpreter));
            if let Some(config) = config
                && self.probes.add_python(child, &config).is_ok()
                && self.watching
            {
                // As for an exec'd interpreter: the agent says whose frames it reads from now on.
                log::info!("watching Python {version} in pid {child}, forked by pid {parent}");
            }
        }
        if self.watching {
            self.watch(state, child);
            state.registry.inherit_task(child, parent);
            return;
        }
        let allocator = self
            .allocators
            .iter()
            .rev()
            .find(|a| a.pid == parent)
            .map(|a| Ok(a.allocator.clone()))
            .unwrap_or_else(|| allocator::for_pid(&mut state.registry, child));
        state.registry.refresh(child);
        state.registry.inherit_task(child, parent);
        let result = allocator
            .and_then(|allocator| self.attach(child, allocator))
            .and_then(|()| self.track(child));
        if let Err(err) = result {
            // It may have exited already; the trace goes on for the others.
            self.untraced += 1;
            warn(format_args!("not tracing pid {child}: {err:#}"));
        }
    }

    /// Watches `pid` (the watch tier): marked for the tracepoints, its identity read, its exit followed.
    fn watch(&mut self, state: &mut State, pid: u32) {
        let _ = self.probes.add_target(pid);
        state.registry.refresh(pid);
        if let (Some(resident), Some(heap_end)) =
            (&mut state.resident, state.registry.heap_end(pid))
        {
            resident.set_break(pid, heap_end);
        }
        if let Err(err) = self.track(pid) {
            self.untraced += 1;
            warn(format_args!("not watching pid {pid}: {err:#}"));
        }
        if self.exited.contains_key(&pid) {
            state.gone.push(pid);
        }
    }

    /// Attaches to the processes whose allocator has been mapped since their exec; gives up on those that
    /// map none within [`PENDING_WINDOW`].
    fn attach_pending_allocators(&mut self, state: &mut State) {
        let now = Instant::now();
        let pending: Vec<(u32, Instant)> = self
            .allocator_pending
            .iter()
            .map(|(&p, &t)| (p, t))
            .collect();
        for (pid, until) in pending {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                self.allocator_pending.remove(&pid);
                continue;
            }
            match allocator::for_pid(&mut state.registry, pid) {
                Ok(allocator) => {
                    self.allocator_pending.remove(&pid);
                    // Its allocator is mapped, and so is a shared libpython (the loader maps it first): the
                    // interpreter is found before the process is announced as traced.
                    if self.python_pending.contains_key(&pid) {
                        self.detect_python(state, pid, true);
                    }
                    let result = self.attach(pid, allocator).and_then(|()| self.track(pid));
                    if let Err(err) = result {
                        self.untraced += 1;
                        warn(format_args!("not tracing pid {pid}: {err:#}"));
                    }
                }
                Err(err) if until <= now => {
                    self.allocator_pending.remove(&pid);
                    self.untraced += 1;
                    warn(format_args!("not tracing pid {pid}: {err:#}"));
                }
                // Its loader has not mapped the allocator yet.
                Err(_) => {}
            }
        }
    }
}

/// Attaches to a process that is already running.
fn attach_running(targets: &mut Targets, state: &mut State, pid: u32) -> anyhow::Result<()> {
    let fd = pidfd(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => anyhow!("no process with pid {pid}"),
        _ => anyhow!("cannot watch pid {pid}: {e}"),
    })?;
    let allocator = allocator::for_pid(&mut state.registry, pid)
        .with_context(|| format!("cannot find the allocator of pid {pid}"))?;
    // Python frames first: attaching announces the process as traced.
    targets.detect_python(state, pid, false);
    if let Err(err) = targets.attach(pid, allocator) {
        if has_exited(&fd) {
            bail!("process {pid} exited before probes were attached");
        }
        return Err(err);
    }
    if let Some(heap_end) = state.registry.heap_end(pid) {
        state.ledger.set_break(pid, heap_end);
    }
    targets.order.push(pid);
    // Gone right after its probes went on: it is reported with what it did meanwhile.
    if has_exited(&fd) {
        targets.exited.insert(pid, Exit::Exited);
        return Ok(());
    }
    watch_exit(pid, fd, targets.exits_tx.clone())?;
    Ok(())
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
    // code objects of a Python stack (a module's, once its import is done).
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
                    // Held at its exit with its memory still mapped: name what it allocated last.
                    flush(&mut reader, &mut targets, &mut state).await;
                    if let Some(pid) = child_pid {
                        state.registry.refresh(pid);
                    }
                    drop(release);
                }
                ChildEvent::Exited(exit) => {
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
    // The trace has ended: a reader of --ready-fd sees its end now, not when the probes are down.
    crate::os::close_ready_fd();
    // Nothing is attached to from here on: new processes are no longer held. A process held just before that is
    // announced within microseconds (the record goes out before the stop): the flush after the pause handles it.
    targets.probes.hold_new_processes(false)?;
    tokio::time::sleep(HOLD_SETTLE).await;
    flush(&mut reader, &mut targets, &mut state).await;
    targets.probes.all_held_released();
    drop(reader);
    let end_ns = system::monotonic_ns().max(start_ns);
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
            Discovery::Forked { .. } => targets.follow(state, discovery),
        }
    }
}

/// The CPython processes among the targets, and what reads their frames; shared with the ring reader's thread.
type Pythons = Arc<Mutex<HashMap<u32, Reader>>>;

/// Python frames of stacks named on the ring reader's thread, by stack id, until the event loop takes them.
type PythonStacks = Arc<Mutex<HashMap<u64, Vec<Frame>>>>;

/// Where the ring reader's thread leaves the Python frames of a stack window (in `PythonStacks`): the window's
/// kernel stack id, inverted. Stack ids are odd, so this is never one, and the kernel's own stack record of the
/// same id keeps its entry.
fn window_python_key(kernel_stack_id: u64) -> u64 {
    !kernel_stack_id
}

/// Locks what the event loop shares with the ring reader's thread. Neither panics while holding it; a poisoned
/// lock still holds consistent data.
fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Names a stack's Python frames with its process's reader (none when it is not a traced CPython).
fn name_python(pythons: &mut HashMap<u32, Reader>, pid: u32, python: &PythonStack) -> Vec<Frame> {
    let Some(reader) = pythons.get_mut(&pid) else {
        return Vec::new();
    };
    let mut named: Vec<Frame> = python
        .frames
        .iter()
        .filter_map(|f| reader.frame(f))
        .collect();
    if python.status == PyStatus::Truncated {
        named.push(Frame::outer_python_frames_missing());
    }
    named
}

/// Continues a process the kernel stopped at its exec.
fn resume(pid: u32) {
    use rustix::process::{Pid, Signal, kill_process};
    // The process is stopped, so its pid cannot have been reused; one gone needs no signal.
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, Signal::CONT);
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

#[cfg(test)]
mod tests {
    use tracer_common::{EventHeader, EventKind};

    use super::*;

    const PAGE: u64 = 4096;

    fn header(kind: EventKind, tid: u32) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            pid: 7,
            tid,
            ..Default::default()
        }
    }

    fn fault(addr: u64) -> Event {
        Event::Fault {
            header: header(EventKind::Fault, 7),
            addr,
            stack_id: 3,
            weight: 1,
        }
    }

    fn release(func: AllocFn, addr: u64, size: u64) -> Event {
        Event::Free {
            header: header(EventKind::Free, 8),
            func,
            addr,
            size,
        }
    }

    fn map(func: AllocFn, addr: u64, size: u64) -> Event {
        Event::Alloc {
            header: header(EventKind::Alloc, 8),
            func,
            addr,
            size,
            stack_id: 0,
            by_allocator: false,
        }
    }

    /// Each record the watch tier sees reaches the ledger rule it stands for; the others are left to the session.
    #[test]
    fn the_watch_tier_takes_faults_and_the_calls_that_release_or_move_pages() {
        let mut resident = Resident::new(1 << 10);
        let held = |resident: &Resident| resident.process(7).resident_pages;
        for page in 0..8 {
            assert!(follow_pages(
                &mut resident,
                &fault(0x1000_0000 + page * PAGE)
            ));
        }
        assert_eq!(held(&resident), 8);
        assert!(follow_pages(
            &mut resident,
            &release(AllocFn::Madvise, 0x1000_0000, PAGE)
        ));
        assert!(follow_pages(
            &mut resident,
            &release(AllocFn::Munmap, 0x1000_0000 + PAGE, PAGE)
        ));
        // A fresh mapping over a page replaces it.
        assert!(follow_pages(
            &mut resident,
            &map(AllocFn::Mmap, 0x1000_0000 + 2 * PAGE, PAGE)
        ));
        assert_eq!(held(&resident), 5);
        // mremap moves the last two pages away and keeps one: its entry and its return, on one thread.
        assert!(follow_pages(
            &mut resident,
            &release(AllocFn::Mremap, 0x1000_0000 + 6 * PAGE, 2 * PAGE)
        ));
        assert!(follow_pages(
            &mut resident,
            &map(AllocFn::Mremap, 0x2000_0000, PAGE)
        ));
        assert_eq!(held(&resident), 4);
        // The break falls below the pages left at 3–5.
        resident.set_break(7, 0x1000_0000 + 8 * PAGE);
        assert!(follow_pages(
            &mut resident,
            &map(AllocFn::Brk, 0x1000_0000 + 3 * PAGE, 0)
        ));
        assert_eq!(held(&resident), 1, "the moved page");
        // Heap blocks, stacks and process events are the session's.
        assert!(!follow_pages(
            &mut resident,
            &map(AllocFn::Malloc, 0x3000_0000, 64)
        ));
        assert!(!follow_pages(
            &mut resident,
            &Event::Exec {
                header: header(EventKind::Exec, 7),
                held: false
            }
        ));
    }
}
