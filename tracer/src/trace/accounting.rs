//! The session's accounting: what each record changes (the ledger, sites, stacks, processes, losses), the
//! Python frames named on the ring reader's thread, and the watch tier's pages.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
};

use anyhow::bail;
use tracer_common::{AllocFn, Loss, OomEvent, PyStatus, SiteKey};

use crate::{
    aggregate::{Ledger, Site, SiteId, Sites, resident::Resident},
    decode::{Event, PythonStack, StackWindow},
    model::history::History,
    probes::Probes,
    procs::{
        Frame, Registry, Walk,
        unwind::{self, UnwindEnd},
    },
    python::runtime::{self, Reader},
    report::oom::{self, Cgroups, TopStack},
    ring::{Delivery, RingReader},
    sampling::Sampling,
};

use super::{
    WATCH_STACKS, WatchTick, WatchedProcess, follow_discoveries,
    targets::{MAX_UNWOUND_THREADS, STACK_MEMORY, Targets},
    warn,
};

/// What the session has learnt from the events so far.
#[derive(Default)]
pub(super) struct State {
    pub(super) registry: Registry,
    pub(super) sites: Sites,
    pub(super) ledger: Ledger,
    /// Every stack received, by id, named as it arrived (while its process was alive); at most `max_stacks`,
    /// in at most [`STACK_MEMORY`] bytes (`stack_bytes`).
    pub(super) stacks: HashMap<u64, Arc<[Arc<Frame>]>>,
    pub(super) max_stacks: usize,
    pub(super) stack_bytes: usize,
    /// Every distinct frame, once: Python stacks share most of their frames.
    pub(super) frames: HashSet<Arc<Frame>>,
    /// The watch tier's stacks that no sampled page held at the last tick, whose kernel mark was removed then:
    /// forgotten at the next tick unless a page or a new record of theirs came meanwhile (see
    /// [`State::forget_stacks`]).
    pub(super) unheld_stacks: HashSet<u64>,
    /// The CPython processes among the targets, and what reads their frames.
    pub(super) pythons: Pythons,
    /// The Python frames of stacks, named on the ring reader's thread as soon as their record was read: a
    /// module's code object is freed once its import is done, often before the event loop gets to the stack.
    pub(super) python_stacks: PythonStacks,
    /// Site of each (pid, function, stack id) already seen.
    pub(super) site_of_stack: HashMap<(u32, AllocFn, u64), SiteId>,
    /// Stack ids used by some site whose record never arrived, and how many.
    pub(super) missing_stacks: HashSet<u64>,
    /// Per thread, the stack id its last stack window was unwound to, and the kernel's id it stands for: the
    /// allocation record that follows the window carries the kernel's.
    pub(super) unwound_ids: HashMap<u32, (u64, u64)>,
    pub(super) stackless: u64,
    /// OOM kills read and not yet reported.
    pub(super) ooms: Vec<OomEvent>,
    /// Each process's live bytes, sampled every [`GROWTH_EVERY`] history samples over the last
    /// [`GROWTH_SAMPLES`].
    pub(super) growth: HashMap<u32, VecDeque<(u64, u64)>>,
    pub(super) history: History,
    /// Shared with the ring buffer's reader, which reads an OOM victim's cgroup as soon as the kill is seen.
    pub(super) cgroups: Arc<Mutex<Cgroups>>,
    pub(super) undecodable: u64,
    /// Processes that forked or exec'd, for the session to attach to.
    pub(super) discovered: Vec<Discovery>,
    /// The watch tier's ledger (`None` when tracing allocations).
    pub(super) resident: Option<Resident>,
    /// Watched processes that exited, forgotten once the OOM kills read with their exit are reported.
    pub(super) gone: Vec<u32>,
    /// Watched processes escalated to the allocator uprobes, and when (`bpf_ktime_get_ns` time).
    pub(super) escalated: HashMap<u32, u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Discovery {
    /// `held`: the child is stopped before its first instruction until it is attached to and continued.
    Forked { parent: u32, child: u32, held: bool },
    /// A process replaced its image at `ts_ns`; `held`: it is stopped until it is attached to and continued.
    Execed { pid: u32, ts_ns: u64, held: bool },
    /// A process whose interpreter is looked for mapped a library; `held`: it is stopped until looked at.
    LibraryMapped { pid: u32, held: bool },
}

impl State {
    pub(super) fn handle(&mut self, bytes: &[u8]) {
        let mut event = match Event::try_from(bytes) {
            Ok(event) => event,
            Err(_) => {
                self.undecodable += 1;
                return;
            }
        };
        match &mut event {
            Event::StackWindow(window) => return self.keep_unwound_stack(window),
            Event::Alloc {
                header, stack_id, ..
            } => *stack_id = self.unwound_id(header.tid, *stack_id),
            _ => {}
        }
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
                // Where Python frames name the callers, the kernel sent the first frame alone.
                let walk = if python.frames.is_empty() {
                    Walk::FramePointer
                } else {
                    Walk::None
                };
                let native = self.registry.symbolize(pid, &frames, guessed_caller, walk);
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
            Event::LibraryMapped { header, held } => {
                self.discovered.push(Discovery::LibraryMapped {
                    pid: header.pid,
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
            // Kept by the ring reader's thread, which names Python frames.
            Event::Code(_) => {}
            // Only the watch tier's programs send faults.
            Event::Fault { .. } => self.undecodable += 1,
        }
    }

    /// Keeps a named stack under `stack_id`, its Python frames merged where the interpreter runs them.
    pub(super) fn keep_stack(&mut self, stack_id: u64, native: Vec<Frame>, python: Vec<Frame>) {
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
    pub(super) fn keep_unwound_stack(&mut self, window: &StackWindow) {
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
            let walk = unwound.walked_from.map_or(Walk::None, Walk::From);
            let mut native = self.registry.symbolize(pid, &unwound.frames, false, walk);
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
    pub(super) fn unwound_id(&mut self, tid: u32, stack_id: u64) -> u64 {
        match self.unwound_ids.get(&tid) {
            Some(&(kernel, unwound)) if kernel == stack_id && stack_id != 0 => {
                self.unwound_ids.remove(&tid);
                unwound
            }
            _ => stack_id,
        }
    }

    /// The one shared copy of a frame, counted in `stack_bytes` the first time it is seen.
    pub(super) fn intern(&mut self, frame: Frame) -> Arc<Frame> {
        if let Some(known) = self.frames.get(&frame) {
            return Arc::clone(known);
        }
        self.stack_bytes += frame.heap_bytes();
        let frame = Arc::new(frame);
        self.frames.insert(Arc::clone(&frame));
        frame
    }

    /// Takes the heap from the kernel's tables into the ledger.
    pub(super) fn take_heap(&mut self, probes: &Probes, sampling: &Sampling) -> anyhow::Result<()> {
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
    pub(super) fn resident_stacks(&self, pid: u32, most: usize) -> Vec<TopStack> {
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
    pub(super) fn watch_tick(&self, targets: &Targets) -> anyhow::Result<WatchTick> {
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
    pub(super) fn escalated_stacks(
        &self,
        probes: &Probes,
        sampling: &Sampling,
        pid: u32,
    ) -> Vec<TopStack> {
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
    pub(super) fn forget_gone(&mut self, targets: &mut Targets) {
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
    pub(super) fn forget_stacks(&mut self, probes: &mut Probes) -> bool {
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
    pub(super) fn site(&mut self, pid: u32, func: AllocFn, stack_id: u64) -> SiteId {
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
pub(super) fn follow_pages(resident: &mut Resident, event: &Event) -> bool {
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
pub(super) fn consume(records: Vec<Vec<u8>>, targets: &mut Targets, state: &mut State) {
    for record in records {
        state.handle(&record);
        if !state.discovered.is_empty() {
            follow_discoveries(targets, state);
        }
    }
}

/// Handles every record the probes wrote up to now.
pub(super) async fn flush(reader: &mut RingReader, targets: &mut Targets, state: &mut State) {
    reader.request_flush();
    while let Some(delivery) = reader.next().await {
        match delivery {
            Delivery::Records(records) => consume(records, targets, state),
            Delivery::Flushed => return,
        }
    }
}

/// The CPython processes among the targets, and what reads their frames; shared with the ring reader's thread.
pub(super) type Pythons = Arc<Mutex<HashMap<u32, Reader>>>;

/// Python frames of stacks named on the ring reader's thread, by stack id, until the event loop takes them.
pub(super) type PythonStacks = Arc<Mutex<HashMap<u64, Vec<Frame>>>>;

/// Where the ring reader's thread leaves the Python frames of a stack window (in `PythonStacks`): the window's
/// kernel stack id, inverted. Stack ids are odd, so this is never one, and the kernel's own stack record of the
/// same id keeps its entry.
pub(super) fn window_python_key(kernel_stack_id: u64) -> u64 {
    !kernel_stack_id
}

/// Locks what the event loop shares with the ring reader's thread. Neither panics while holding it; a poisoned
/// lock still holds consistent data.
pub(super) fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Names a stack's Python frames with its process's reader (none when it is not a traced CPython).
pub(super) fn name_python(
    pythons: &mut HashMap<u32, Reader>,
    pid: u32,
    python: &PythonStack,
) -> Vec<Frame> {
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
