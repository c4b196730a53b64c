//! Loads the eBPF programs and attaches them: allocator uprobes per traced process (with a pid filter, so no
//! other process on the host hits a breakpoint), and the tracepoints for mapped memory and for following
//! processes. Each tracepoint's kernel requirement is in [`TRACEPOINTS`] (and [`WATCH_TRACEPOINTS`] for the
//! agent's watch tier, which loads the uprobe programs only to escalate to them). Reads the kernel's tables of
//! live blocks and site counters, and its loss counters, and drops a process's share of them.

use std::{
    collections::HashMap,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues, RingBuf},
    programs::{TracePoint, UProbe, trace_point::TracePointLink},
};
use tracer_common::{
    AllocFn, FaultFields, HOLD_AT_EXEC, InFlight, LOSS_COUNTERS, LiveBlock, LiveKey, OomFields,
    PYTHON_PENDING, PyProcess, SiteCounters, SiteKey, SizeKey, TALLY_COUNTERS, program_names,
};

use crate::{
    aggregate::HeapTables,
    procs::allocator::Allocator,
    sampling::Sampling,
    system, tables,
    uprobe_events::{HeldMaps, UprobeEvents},
};

/// The entry program of an allocator function. Every function but `free` also gets `alloc_exit` on return.
fn entry_program(func: AllocFn) -> Option<&'static str> {
    Some(match func {
        AllocFn::Malloc => program_names::MALLOC_ENTER,
        AllocFn::Calloc => program_names::CALLOC_ENTER,
        AllocFn::Realloc => program_names::REALLOC_ENTER,
        AllocFn::Free => program_names::FREE_ENTER,
        AllocFn::Reallocarray => program_names::REALLOCARRAY_ENTER,
        AllocFn::PosixMemalign => program_names::POSIX_MEMALIGN_ENTER,
        AllocFn::AlignedAlloc => program_names::ALIGNED_ALLOC_ENTER,
        AllocFn::Memalign => program_names::MEMALIGN_ENTER,
        AllocFn::Valloc => program_names::VALLOC_ENTER,
        AllocFn::Pvalloc => program_names::PVALLOC_ENTER,
        AllocFn::Mmap | AllocFn::Munmap | AllocFn::Mremap | AllocFn::Brk | AllocFn::Madvise => {
            return None;
        }
    })
}

const EXIT_PROGRAM: &str = program_names::ALLOC_EXIT;

/// Tracepoints: (program, category, event). All exist since Linux 4.x wherever tracepoints are built in.
const TRACEPOINTS: [(&str, &str, &str); 13] = [
    (program_names::MMAP_ENTER, "syscalls", "sys_enter_mmap"),
    (program_names::MAP_EXIT, "syscalls", "sys_exit_mmap"),
    (program_names::MREMAP_ENTER, "syscalls", "sys_enter_mremap"),
    (program_names::MAP_EXIT, "syscalls", "sys_exit_mremap"),
    (program_names::MUNMAP_ENTER, "syscalls", "sys_enter_munmap"),
    (program_names::BRK_EXIT, "syscalls", "sys_exit_brk"),
    (
        program_names::SCHED_PROCESS_FORK,
        "sched",
        "sched_process_fork",
    ),
    (
        program_names::FORK_CHILD_START,
        "syscalls",
        "sys_exit_clone",
    ),
    (
        program_names::FORK_CHILD_START,
        "syscalls",
        "sys_exit_clone3",
    ),
    (program_names::FORK_CHILD_START, "syscalls", "sys_exit_fork"),
    (
        program_names::FORK_CHILD_START,
        "syscalls",
        "sys_exit_vfork",
    ),
    (
        program_names::SCHED_PROCESS_EXEC,
        "sched",
        "sched_process_exec",
    ),
    (
        program_names::SCHED_PROCESS_EXIT,
        "sched",
        "sched_process_exit",
    ),
];

/// The watch tier's tracepoints: (program, category, event). `exceptions:page_fault_user` is x86's (Linux 3.13+),
/// and so are the error code's bits the eBPF side tests: elsewhere write faults are not sampled.
#[cfg(target_arch = "x86_64")]
const WATCH_TRACEPOINTS: [(&str, &str, &str); 2] = [
    (
        program_names::PAGE_FAULT_USER,
        "exceptions",
        "page_fault_user",
    ),
    (
        program_names::MADVISE_ENTER,
        "syscalls",
        "sys_enter_madvise",
    ),
];
#[cfg(not(target_arch = "x86_64"))]
const WATCH_TRACEPOINTS: [(&str, &str, &str); 1] = [(
    program_names::MADVISE_ENTER,
    "syscalls",
    "sys_enter_madvise",
)];

/// Live blocks held in the kernel's preallocated table (about 100 bytes of kernel memory each, taken at load);
/// the rest of `--max-live-blocks` goes to a table whose entries are allocated as they come, dearer per block.
const PREALLOCATED_LIVE_BLOCKS: u32 = 1 << 18;

/// The eBPF object `build.rs` built from `tracer-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// A map update's flag: only an element that exists is updated.
const BPF_EXIST: u64 = 2;

/// What the programs are loaded with.
pub struct LoadOptions {
    /// Bytes of the ring buffer (a power of two).
    pub buffer_size: u64,
    /// Every exec on the host is reported, for userspace to choose what to trace.
    pub watch_execs: bool,
    pub sampling: Sampling,
    /// Capacity of the kernel's table of live blocks.
    pub max_live_blocks: u32,
    /// The watch tier (the agent): one write fault in this many is sampled, with its stack.
    pub watch_faults: Option<u32>,
    /// The allocator uprobe programs are loaded: always to trace, and in the watch tier only to escalate to.
    pub uprobes: bool,
    /// A process that exec'd is stopped at each library its loader maps until its CPython is found (or given
    /// up on): see [`Probes::await_python`]. Never in the watch tier, which holds nothing.
    pub hold_for_python: bool,
}

pub struct Probes {
    ebpf: Ebpf,
    /// The live blocks: the preallocated table, then the one that takes what it has no room for.
    live: [Map; 2],
    sites: Map,
    sizes: Map,
    /// Possible CPUs: the number of values of a per-CPU map entry.
    cpus: usize,
    /// Each traced process's perf events on the shared allocator uprobes, closed when it exits.
    links: HashMap<u32, Vec<OwnedFd>>,
    /// The allocator uprobes, shared by every traced process. Dropped after `links`: its events close last.
    uprobes: UprobeEvents,
    tracepoint_links: Vec<TracePointLink>,
    /// Whether OOM kills reach the ring buffer.
    pub oom_watched: bool,
}

/// Where `oom:mark_victim` keeps its fields on this kernel; `None` without the tracepoint.
fn oom_fields() -> Option<OomFields> {
    let field = |name: &str| system::tracepoint_field_offset("oom", "mark_victim", name).ok();
    Some(OomFields {
        pid: field("pid")?,
        comm: field("comm")?,
        total_vm: field("total_vm")?,
        anon_rss: field("anon_rss")?,
        file_rss: field("file_rss")?,
        shmem_rss: field("shmem_rss")?,
    })
}

impl Probes {
    pub fn load(options: &LoadOptions) -> anyhow::Result<Self> {
        let watch_execs = u32::from(options.watch_execs);
        let buffer_size = options.buffer_size;
        let intervals = options.sampling.intervals();
        let child_pid_offset =
            system::tracepoint_field_offset("sched", "sched_process_fork", "child_pid")?;
        let buffer_size =
            u32::try_from(buffer_size).context("the ring buffer size is too large")?;
        #[cfg(target_arch = "x86_64")]
        let fsbase_offset = system::task_fsbase_offset()?;
        // No Python process is registered elsewhere (see `add_python`): the eBPF side never reads it.
        #[cfg(not(target_arch = "x86_64"))]
        let fsbase_offset = 0u32;
        // The OOM tracepoint is optional (an older kernel may lack it): its fields are read where it exists.
        let oom_fields = oom_fields();
        let fault_fields = match options.watch_faults {
            #[cfg(not(target_arch = "x86_64"))]
            Some(_) => {
                log::warn!(
                    "write faults are not sampled: the agent's resident memory by stack needs x86-64's exceptions:page_fault_user tracepoint"
                );
                FaultFields::default()
            }
            #[cfg(target_arch = "x86_64")]
            Some(_) => {
                let field = |name: &str| {
                    system::tracepoint_field_offset("exceptions", "page_fault_user", name)
                };
                FaultFields {
                    address: field("address")?,
                    error_code: field("error_code")?,
                }
            }
            None => FaultFields::default(),
        };
        let fault_every = options.watch_faults.unwrap_or(1);
        let watch_tier = u32::from(options.watch_faults.is_some());
        let hold_for_python = u32::from(options.hold_for_python);
        let preallocated = options.max_live_blocks.clamp(1, PREALLOCATED_LIVE_BLOCKS);
        let spilled = options.max_live_blocks.saturating_sub(preallocated);
        let mut ebpf = EbpfLoader::new()
            .override_global("FAULT_FIELDS", &fault_fields, true)
            .override_global("FAULT_SAMPLE_EVERY", &fault_every, true)
            .override_global("FORK_CHILD_PID_OFFSET", &child_pid_offset, true)
            .override_global("TASK_FSBASE_OFFSET", &fsbase_offset, true)
            .override_global("OOM_FIELDS", &oom_fields.unwrap_or_default(), true)
            .override_global("WATCH_EXECS", &watch_execs, true)
            .override_global("WATCH_TIER", &watch_tier, true)
            .override_global("HOLD_FOR_PYTHON", &hold_for_python, true)
            .override_global("SAMPLE_INTERVAL", &options.sampling.interval, true)
            .override_global("SAMPLE_INTERVALS", &intervals, true)
            .override_global("SAMPLE_WEIGHTS", &options.sampling.weights, true)
            .map_max_entries("EVENTS", buffer_size)
            .map_max_entries("LIVE", preallocated)
            .map_max_entries("LIVE_SPILL", spilled.max(1))
            .load(EBPF_OBJECT)
            .context("cannot load alloctrace's eBPF object")?;
        // Before any program is loaded or attached: the helper keeps only the two maps it is given.
        let uprobes = {
            let map_fd = |name: &str| match ebpf.map(name) {
                Some(Map::HashMap(data) | Map::Array(data)) => Ok(data.fd().as_fd()),
                _ => Err(anyhow::anyhow!("the eBPF object has no map {name}")),
            };
            let tracefs = system::tracefs().context("tracefs is not mounted")?;
            UprobeEvents::new(
                tracefs,
                &HeldMaps {
                    targets: map_fd("TARGETS")?,
                    holding: map_fd("HOLDING")?,
                },
            )?
        };
        let entries = AllocFn::ALLOCATOR.map(entry_program);
        let uprobe_programs = entries.into_iter().flatten().chain([EXIT_PROGRAM]);
        // A watch tier that never escalates does not even load them.
        let uprobe_programs = uprobe_programs.filter(|_| options.uprobes);
        for name in uprobe_programs {
            let program: &mut UProbe = program(&mut ebpf, name)?.try_into()?;
            program
                .load()
                .with_context(|| format!("the kernel refused the eBPF program {name}"))?;
        }
        let mut tracepoint_links = Vec::new();
        let watch_tracepoints = WATCH_TRACEPOINTS
            .into_iter()
            .filter(|_| options.watch_faults.is_some());
        for (name, category, event) in TRACEPOINTS.into_iter().chain(watch_tracepoints) {
            let program: &mut TracePoint = program(&mut ebpf, name)?.try_into()?;
            if program.fd().is_err() {
                program
                    .load()
                    .with_context(|| format!("the kernel refused the eBPF program {name}"))?;
            }
            let link = program
                .attach(category, event)
                .with_context(|| format!("cannot attach to the tracepoint {category}:{event}"))?;
            tracepoint_links.push(program.take_link(link)?);
        }
        let oom: &mut TracePoint =
            program(&mut ebpf, program_names::OOM_MARK_VICTIM)?.try_into()?;
        let oom_link = if oom_fields.is_some() && oom.load().is_ok() {
            match oom.attach("oom", "mark_victim") {
                Ok(link) => Some(oom.take_link(link)?),
                Err(_) => None,
            }
        } else {
            None
        };
        let oom_watched = oom_link.is_some();
        tracepoint_links.extend(oom_link);
        if !oom_watched {
            log::warn!(
                "this kernel has no usable oom:mark_victim tracepoint: OOM kills are not reported"
            );
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("the eBPF object has no map {name}"))
        };
        let live = [take("LIVE")?, take("LIVE_SPILL")?];
        let (sites, sizes) = (take("SITES")?, take("SIZES")?);
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, err)| err)
            .context("cannot count the possible CPUs")?;
        log::debug!(
            "eBPF programs loaded: {} tracepoints attached, {} possible CPUs",
            tracepoint_links.len(),
            cpus
        );
        Ok(Self {
            ebpf,
            live,
            sites,
            sizes,
            cpus,
            links: HashMap::new(),
            uprobes,
            tracepoint_links,
            oom_watched,
        })
    }

    /// Puts the allocator probes on `allocator` for process `pid` only, and marks `pid` as traced.
    pub fn attach(&mut self, pid: u32, allocator: &Allocator) -> anyhow::Result<()> {
        if pid == 0 || pid == self.uprobes.helper() {
            anyhow::bail!("pid {pid} is not a process alloctrace traces");
        }
        for point in &allocator.probes {
            let Some(entry) = entry_program(point.func) else {
                continue;
            };
            let entry = (entry, point.file_offset + point.entry_offset);
            let exit = (point.func != AllocFn::Free).then_some((EXIT_PROGRAM, point.file_offset));
            // The return probe goes first: a call whose entry is seen must have its return seen too. The other
            // order leaves, in a process that is allocating as the probes go on, a call entered between the two
            // attachments in flight forever, and every later call of that thread taken for a nested one.
            for (name, offset) in exit.into_iter().chain(std::iter::once(entry)) {
                let func = point.func;
                let program: &UProbe = self
                    .ebpf
                    .program(name)
                    .with_context(|| format!("the eBPF object has no program {name}"))?
                    .try_into()?;
                let event = self
                    .uprobes
                    .open(
                        &allocator.attach_path,
                        offset,
                        name == EXIT_PROGRAM,
                        program.fd()?.as_fd(),
                        pid,
                    )
                    .with_context(|| {
                        format!(
                            "cannot attach {name} to {} in {} for pid {pid}",
                            func.name(),
                            allocator.path
                        )
                    })?;
                log::debug!(
                    "pid {pid}: {name} on {} at {} + {offset:#x}",
                    func.name(),
                    allocator.path
                );
                self.links.entry(pid).or_default().push(event);
            }
        }
        self.add_target(pid)
    }

    /// Closes the perf events of a process that exited: the uprobes they share stay, so this waits for no
    /// grace period (see [`crate::uprobe_events`]).
    pub fn detach(&mut self, pid: u32) {
        self.links.remove(&pid);
    }

    /// Whether `pid` has the allocator uprobes now.
    pub fn attached(&self, pid: u32) -> bool {
        self.links.contains_key(&pid)
    }

    /// The live blocks the uprobes recorded in `pid`, oldest first.
    pub fn live_blocks(&self, pid: u32) -> anyhow::Result<Vec<LiveBlock>> {
        let mut blocks = Vec::new();
        for live in &self.live {
            tables::for_each(fd(live)?, None, |key: LiveKey, block: &[LiveBlock]| {
                if key.tgid == pid {
                    blocks.extend(block.first().copied());
                }
            })
            .context("cannot read the table of live blocks")?;
        }
        blocks.sort_by_key(|block| block.ts_ns);
        Ok(blocks)
    }

    /// Drops what the kernel's tables hold of `pid`: its live blocks, its sites' counters and sizes, and its
    /// threads' calls in flight (a call whose return will never be seen once its probes are off). For a process
    /// whose uprobes were closed ([`Self::detach`]), or that is gone.
    pub fn forget_heap(&self, pid: u32) -> anyhow::Result<()> {
        self.forget_blocks(pid, u64::MAX)?;
        let mut sites = Vec::new();
        tables::for_each(
            fd(&self.sites)?,
            Some(self.cpus),
            |key: SiteKey, _: &[SiteCounters]| {
                if key.tgid == pid {
                    sites.push(key);
                }
            },
        )
        .context("cannot read the table of sites")?;
        tables::delete(fd(&self.sites)?, &sites).context("cannot prune the table of sites")?;
        let mut sizes = Vec::new();
        tables::for_each(
            fd(&self.sizes)?,
            Some(self.cpus),
            |key: SizeKey, _: &[u64]| {
                if key.site.tgid == pid {
                    sizes.push(key);
                }
            },
        )
        .context("cannot read the table of sizes")?;
        tables::delete(fd(&self.sizes)?, &sizes).context("cannot prune the table of sizes")?;
        let in_flight = match self.ebpf.map("IN_FLIGHT") {
            Some(Map::HashMap(data)) => data.fd().as_fd(),
            _ => anyhow::bail!("the eBPF object has no map IN_FLIGHT"),
        };
        let mut threads = Vec::new();
        tables::for_each(
            in_flight,
            None,
            |pid_tgid: u64, _: &[[u8; size_of::<InFlight>()]]| {
                if (pid_tgid >> 32) as u32 == pid {
                    threads.push(pid_tgid);
                }
            },
        )
        .context("cannot read the table of calls in flight")?;
        tables::delete(in_flight, &threads).context("cannot prune the table of calls in flight")
    }

    /// Turns holding new processes until they are attached on or off: off as the trace ends, when nothing will
    /// attach to them or continue them.
    pub fn hold_new_processes(&mut self, on: bool) -> anyhow::Result<()> {
        let mut holding: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(self.ebpf.map_mut("HOLDING").context("no HOLDING map")?)?;
        holding
            .set(0, u32::from(on), 0)
            .context("cannot switch the holding of new processes")
    }

    /// Says that holding is off and every process held has been continued: were alloctrace to die from now
    /// on, there would be nothing to release (see [`crate::uprobe_events`]).
    pub fn all_held_released(&self) {
        self.uprobes.all_held_released();
    }

    /// Marks `pid` as traced for the tracepoints (its mappings, forks and execs).
    pub fn add_target(&mut self, pid: u32) -> anyhow::Result<()> {
        self.mark_target(pid, HOLD_AT_EXEC)
    }

    /// Lets a target exec without being held: a command alloctrace started, which its own start-up holds.
    pub fn do_not_hold_at_exec(&mut self, pid: u32) -> anyhow::Result<()> {
        self.mark_target(pid, 0)
    }

    /// Stops `pid` at each library its loader maps from now on, until [`Probes::python_settled`]: its CPython,
    /// if it has one, is found before any Python code runs. The kernel sets this at the exec of a target; a
    /// process chosen by userspace after its exec (a cgroup match) gets it here. Nothing for a process that is
    /// not a target.
    pub fn await_python(&mut self, pid: u32) {
        self.set_target_flag(pid, PYTHON_PENDING, true);
    }

    /// Lets `pid` map libraries without being stopped: its interpreter was found, or given up on.
    pub fn python_settled(&mut self, pid: u32) {
        self.set_target_flag(pid, PYTHON_PENDING, false);
    }

    fn set_target_flag(&mut self, pid: u32, flag: u8, on: bool) {
        let Some(map) = self.ebpf.map_mut("TARGETS") else {
            return;
        };
        let Ok(mut targets) = BpfHashMap::<_, u32, u8>::try_from(map) else {
            return;
        };
        // Gone, or no target: nothing to mark. The kernel removes a target's entry at its exit.
        let Ok(flags) = targets.get(&pid, 0) else {
            return;
        };
        let flags = if on { flags | flag } else { flags & !flag };
        // Only while it is there: an entry the kernel removed meanwhile (the process exited) must not come
        // back, to hold at its exec an unrelated process that reuses the pid.
        let _ = targets.insert(pid, flags, BPF_EXIST);
    }

    fn mark_target(&mut self, pid: u32, flags: u8) -> anyhow::Result<()> {
        let mut targets: BpfHashMap<_, u32, u8> =
            BpfHashMap::try_from(self.ebpf.map_mut("TARGETS").context("no TARGETS map")?)?;
        targets
            .insert(pid, flags, 0)
            .with_context(|| format!("cannot add pid {pid} to the traced set"))
    }

    /// Walks the Python frames of `pid` at every allocation from now on.
    #[cfg(target_arch = "x86_64")]
    pub fn add_python(&mut self, pid: u32, config: &PyProcess) -> anyhow::Result<()> {
        let mut pythons: BpfHashMap<_, u32, PyProcess> =
            BpfHashMap::try_from(self.ebpf.map_mut("PY_PROCS").context("no PY_PROCS map")?)?;
        pythons
            .insert(pid, *config, 0)
            .with_context(|| format!("cannot register pid {pid} as a Python process"))
    }

    /// The eBPF side finds a thread's Python state by its thread pointer, read from x86-64's `fsbase`: elsewhere
    /// Python frames are not walked, and the caller says so.
    #[cfg(not(target_arch = "x86_64"))]
    pub fn add_python(&mut self, _pid: u32, _config: &PyProcess) -> anyhow::Result<()> {
        anyhow::bail!(
            "they are read on x86-64 only (the thread state is found through the task's fsbase, a field only x86-64's kernel has)"
        )
    }

    /// Stops walking Python frames in `pid` (its image was replaced).
    pub fn remove_python(&mut self, pid: u32) -> anyhow::Result<()> {
        let mut pythons: BpfHashMap<_, u32, PyProcess> =
            BpfHashMap::try_from(self.ebpf.map_mut("PY_PROCS").context("no PY_PROCS map")?)?;
        pythons
            .remove(&pid)
            .with_context(|| format!("cannot forget pid {pid} as a Python process"))
    }

    /// Removes the kernel's marks of stacks sent to userspace, which forgets them: a probe that takes one of
    /// them again sends it again. Each CPU's memory of the last stack it sent is cleared too, or a CPU that
    /// last sent one of them would take it for sent still.
    pub fn forget_sent_stacks(
        &mut self,
        stack_ids: &std::collections::HashSet<u64>,
    ) -> anyhow::Result<()> {
        if stack_ids.is_empty() {
            return Ok(());
        }
        let map = match self.ebpf.map("SENT_STACKS") {
            Some(Map::LruHashMap(data)) => data.fd().as_fd(),
            _ => anyhow::bail!("the eBPF object has no map SENT_STACKS"),
        };
        let ids: Vec<u64> = stack_ids.iter().copied().collect();
        tables::delete(map, &ids).context("cannot remove stacks from the table of stacks sent")?;
        let mut last_sent: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map_mut("LAST_SENT_STACK")
                .context("no LAST_SENT_STACK map")?,
        )?;
        let forgotten = last_sent
            .get(&0, 0)?
            .iter()
            .map(|&id| if stack_ids.contains(&id) { 0 } else { id })
            .collect::<Vec<u64>>();
        last_sent
            .set(0, PerCpuValues::try_from(forgotten)?, 0)
            .context("cannot clear the stacks each CPU last sent")
    }

    /// Traces every process that execs with this name (its first 15 bytes, as the kernel keeps a `comm`).
    pub fn add_comm(&mut self, comm: &str) -> anyhow::Result<()> {
        let key = tracer_common::comm_key(comm.as_bytes());
        let mut comms: BpfHashMap<_, [u8; 16], u8> =
            BpfHashMap::try_from(self.ebpf.map_mut("COMMS").context("no COMMS map")?)?;
        comms
            .insert(key, 0, 0)
            .with_context(|| format!("cannot add the process name {comm:?}"))
    }

    pub fn take_ring_buffer(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("no EVENTS map")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// The kernel-side loss counters, summed over CPUs, indexed by `tracer_common::Loss`.
    pub fn losses(&self) -> anyhow::Result<[u64; LOSS_COUNTERS as usize]> {
        self.counters("LOSSES")
    }

    /// The kernel-side tallies, summed over CPUs, indexed by `tracer_common::Tally`.
    pub fn tallies(&self) -> anyhow::Result<[u64; TALLY_COUNTERS as usize]> {
        self.counters("TALLIES")
    }

    fn counters<const N: usize>(&self, name: &str) -> anyhow::Result<[u64; N]> {
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(name)
                .with_context(|| format!("no {name} map"))?,
        )?;
        let mut sums = [0; N];
        for (index, sum) in sums.iter_mut().enumerate() {
            *sum = counters.get(&(index as u32), 0)?.iter().sum();
        }
        Ok(sums)
    }

    /// Every site's counters, summed over CPUs.
    pub fn site_counters(&self) -> anyhow::Result<Vec<(SiteKey, SiteCounters)>> {
        let mut sites = Vec::new();
        tables::for_each(fd(&self.sites)?, Some(self.cpus), |key, per_cpu| {
            sites.push((key, sum_counters(per_cpu)));
        })
        .context("cannot read the table of sites")?;
        Ok(sites)
    }

    /// The heap tables as they are now.
    pub fn heap_tables(&self) -> anyhow::Result<HeapTables> {
        let mut sizes = Vec::new();
        tables::for_each(
            fd(&self.sizes)?,
            Some(self.cpus),
            |key: SizeKey, per_cpu: &[u64]| {
                sizes.push((key, per_cpu.iter().sum()));
            },
        )
        .context("cannot read the table of sizes")?;
        let mut blocks = Vec::new();
        for live in &self.live {
            tables::for_each(fd(live)?, None, |key: LiveKey, block: &[LiveBlock]| {
                blocks.extend(block.first().map(|block| (key, *block)));
            })
            .context("cannot read the table of live blocks")?;
        }
        Ok(HeapTables {
            sites: self.site_counters()?,
            sizes,
            blocks,
        })
    }

    /// Drops the blocks `pid` allocated before `before_ns`: its image was replaced, and its address space with
    /// it.
    pub fn forget_blocks(&self, pid: u32, before_ns: u64) -> anyhow::Result<()> {
        for live in &self.live {
            let live = fd(live)?;
            let mut stale = Vec::new();
            tables::for_each(live, None, |key: LiveKey, block: &[LiveBlock]| {
                if key.tgid == pid && block.first().is_some_and(|b| b.ts_ns < before_ns) {
                    stale.push(key);
                }
            })
            .context("cannot read the table of live blocks")?;
            tables::delete(live, &stale).context("cannot prune the table of live blocks")?;
        }
        Ok(())
    }
}

/// Sums a site's per-CPU counters; the extremes are the extremes over CPUs.
fn sum_counters(per_cpu: &[SiteCounters]) -> SiteCounters {
    per_cpu.iter().fold(
        SiteCounters {
            smallest: u64::MAX,
            ..SiteCounters::default()
        },
        |sum, cpu| SiteCounters {
            allocated_count: sum.allocated_count + cpu.allocated_count,
            allocated_bytes: sum.allocated_bytes + cpu.allocated_bytes,
            freed_count: sum.freed_count + cpu.freed_count,
            freed_bytes: sum.freed_bytes + cpu.freed_bytes,
            smallest: sum.smallest.min(cpu.smallest),
            largest: sum.largest.max(cpu.largest),
        },
    )
}

/// The descriptor of a hash map taken out of the object.
fn fd(map: &Map) -> anyhow::Result<BorrowedFd<'_>> {
    match map {
        Map::HashMap(data) | Map::PerCpuHashMap(data) => Ok(data.fd().as_fd()),
        _ => anyhow::bail!("not a hash map"),
    }
}

impl Drop for Probes {
    /// The processes' perf events first (at once), then the shared uprobes (`uprobes`, dropped after this) and
    /// the tracepoints, whose removals each wait for a grace period.
    fn drop(&mut self) {
        self.links.clear();
        detach_all(std::mem::take(&mut self.tracepoint_links));
    }
}

/// Detaches probes all at once: the kernel waits for an RCU grace period per probe it removes (about 0.1 s
/// here), and one by one thirty probes held the report back by seconds. The periods overlap when each probe
/// goes on a thread of its own.
fn detach_all<L: Send>(links: Vec<L>) {
    std::thread::scope(|scope| {
        for link in links {
            scope.spawn(move || drop(link));
        }
    });
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};

    use super::*;

    /// The program names userspace loads by: the names of `tracer-ebpf`'s functions, which cannot share the
    /// constants, so a rename on either side must fail here rather than at load time on a real kernel.
    #[test]
    fn every_program_name_used_is_a_program_of_the_object() {
        let object = object::File::parse(EBPF_OBJECT).unwrap();
        // A program is a global function in a section of its own (`uprobe`, `tracepoint`…), not in `.text`.
        let programs: Vec<&str> = object
            .symbols()
            .filter(|symbol| symbol.kind() == SymbolKind::Text && symbol.is_global())
            .filter(|symbol| {
                symbol
                    .section_index()
                    .and_then(|index| object.section_by_index(index).ok())
                    .is_some_and(|section| section.name() != Ok(".text"))
            })
            .filter_map(|symbol| symbol.name().ok())
            .collect();
        let used = AllocFn::ALLOCATOR
            .into_iter()
            .filter_map(entry_program)
            .chain([EXIT_PROGRAM, program_names::OOM_MARK_VICTIM])
            .chain(
                TRACEPOINTS
                    .iter()
                    .chain(&WATCH_TRACEPOINTS)
                    .map(|(name, ..)| *name),
            );
        for name in used {
            assert!(
                programs.contains(&name),
                "no eBPF program {name} in the object, whose programs are {programs:?}"
            );
        }
    }
}
