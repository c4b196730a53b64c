//! alloctrace's eBPF programs. Uprobes on the allocator family keep the traced processes' live heap blocks and
//! per-site counters in maps: a block that dies young costs a few map updates and never reaches userspace,
//! which reads the maps when it needs them. Only stack definitions, mappings and process events go through the
//! ring buffer. The uprobes are attached with a pid filter, so only the traced processes ever run them.
//! Tracepoints, which fire host-wide and so check `TARGETS` first, add what is not malloc'd (anonymous
//! `mmap`/`mremap`/`munmap` and `brk`, skipped inside an allocator call, whose blocks already account for
//! them), and follow processes: `fork` marks children, `exec` says an address space was replaced or a `--comm`
//! name started. With `--sample-every`, allocations are sampled by bytes and weighted. The agent's watch tier
//! attaches no uprobe: sampled write faults (`page_fault_user`) say which stack made pages resident, and
//! `madvise` beside the mapping calls says which were released.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_NO_PREALLOC,
    bindings::{
        BPF_F_USER_STACK, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, pt_regs,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_current_task_btf, bpf_get_prandom_u32, bpf_get_stack,
        bpf_jiffies64, bpf_ktime_get_ns, bpf_loop, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf, bpf_probe_read_user, bpf_probe_read_user_buf, bpf_send_signal,
        bpf_task_pt_regs,
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use tracer_common::{
    ALLOC_BY_ALLOCATOR, AllocEvent, AllocFn, CODE_HEADER_BYTES, CodeEvent, EventHeader, EventKind,
    ExecEvent, FAULT_INSTRUCTION, FAULT_WRITE, FORKED, FaultEvent, FaultFields, ForkEvent,
    FreeEvent, HOLD_AT_EXEC, InFlight, LIBRARY_MAPPING, LOSS_COUNTERS, LibraryMappedEvent,
    LiveBlock, LiveKey, Loss, MAX_PY_FRAMES, MAX_PY_THREADS, MAX_STACK_DEPTH, OomEvent, OomFields,
    PY_FRAME_READ_MAX, PY_NO_OFFSET, PYTHON_PENDING, PyFrame, PyProcess, PyStatus,
    SAMPLE_INTERVAL_ENTRIES, SAMPLE_WEIGHT_ENTRIES, STACK_WINDOW_BYTES, SiteCounters, SiteKey,
    SizeKey, StackEvent, StackWindowEvent, SyscallInFlight, TALLY_COUNTERS, Tally, UserRegs,
    sample_weight, size_class,
};

/// Every record for userspace, in the order the probes reserved them.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

/// Per-thread (pid_tgid) state between an allocator's entry and its return. A thread's entry is made by its
/// first call and then rewritten in place by each call (idle between calls, see `InFlight::entered_jiffies`) until
/// the thread exits: inserting and deleting it around every call was a tenth of what the probes cost.
#[map]
static IN_FLIGHT: HashMap<u64, InFlight> = HashMap::with_max_entries(65536, 0);

/// Stack ids already sent to userspace. LRU: an evicted id is simply sent again.
#[map]
static SENT_STACKS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65536, 0);

/// Per CPU, the id of the last stack this CPU took that is known to be sent: allocations come in runs from one
/// stack (a parser's), which then skip the look-up in `SENT_STACKS`.
#[map]
static LAST_SENT_STACK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch for building a stack record: too large for the 512-byte BPF stack.
#[map]
static STACK_SCRATCH: PerCpuArray<StackEvent> = PerCpuArray::with_max_entries(1, 0);

/// Code objects already sent to userspace (see `capture_code_objects`). LRU: one evicted is simply sent again.
#[map]
static SENT_CODES: LruHashMap<CodeKey, u8> = LruHashMap::with_max_entries(65536, 0);

/// Per-CPU scratch for building a code object's record: far too large for the BPF stack.
#[map]
static CODE_SCRATCH: PerCpuArray<CodeEvent> = PerCpuArray::with_max_entries(1, 0);

/// A code object as `SENT_CODES` knows it: its process, its address, and what tells it from another one later
/// made at the same address (its file name, its name and its first line).
#[repr(C)]
#[derive(Clone, Copy)]
struct CodeKey {
    code: u64,
    filename: u64,
    name: u64,
    tgid: u32,
    first_line: u32,
}

/// Per-CPU scratch into which Python frames are read. On the BPF stack the buffer was zeroed before every
/// frame, by a `memset` the compiler emits as a byte loop: a third of the frame walk's time.
#[map]
static FRAME_SCRATCH: PerCpuArray<FrameWindow> = PerCpuArray::with_max_entries(1, 0);

/// The frame walk's state: the next frame, the frames read so far, and the user memory read (`len` bytes from
/// `start`). Kept in a map rather than on the BPF stack: the verifier then knows nothing of them from one step
/// of the walk to the next, and checks the step a few times rather than once for each depth and window it
/// could reach (which doubled the time to load the programs).
#[repr(C)]
struct FrameWindow {
    frame: u64,
    depth: u64,
    start: u64,
    len: u64,
    words: [u64; FRAME_WINDOW / 8],
}

/// Most bytes of user memory read at once for Python frames. CPython 3.11+ keeps a thread's frames one after
/// another in its data stack, the callers below: one read that ends at a frame and starts up to this far
/// below it (never before its page, which is mapped since the frame is there) holds its callers too. Each read
/// costs about as much whatever its size (on the seed workload, a frame a read was a fifth of the return
/// probe's time).
const FRAME_WINDOW: usize = 2048;
const PAGE_SIZE: u64 = 4096;

/// Per-CPU counters, one per `tracer_common::Loss`.
#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_COUNTERS, 0);

/// Per-CPU counters, one per `tracer_common::Tally`.
#[map]
static TALLIES: PerCpuArray<u64> = PerCpuArray::with_max_entries(TALLY_COUNTERS, 0);

/// The traced processes' live heap blocks, up to a size set at load time. Preallocated: an element freed is
/// taken again at once, from a per-CPU free list. Allocated as they come (as `LIVE_SPILL` is), each insertion
/// and removal went through the kernel's BPF allocator and its RCU-deferred frees: on the seed workload that
/// was half of what `free`'s program cost, and an eighth of the return probe's.
#[map]
static LIVE: HashMap<LiveKey, LiveBlock> = HashMap::with_max_entries(1 << 18, 0);

/// The live blocks past `LIVE`'s size, up to `--max-live-blocks` in all. Entries are allocated as they come, so
/// that the bound can be large and cost nothing until a trace needs it.
#[map]
static LIVE_SPILL: HashMap<LiveKey, LiveBlock> =
    HashMap::with_max_entries(1 << 20, BPF_F_NO_PREALLOC);

/// Index 0: 1 once a block went to `LIVE_SPILL`. Until then, a block missing from `LIVE` is not looked for
/// there (a look-up in an empty table still touches a cold bucket).
#[map]
static SPILLED: Array<u32> = Array::with_max_entries(1, 0);

/// What each site allocated and released, per CPU (no two CPUs write one value).
#[map]
static SITES: PerCpuHashMap<SiteKey, SiteCounters> =
    PerCpuHashMap::with_max_entries(1 << 17, BPF_F_NO_PREALLOC);

/// Each site's size histogram: blocks per size class, per CPU.
#[map]
static SIZES: PerCpuHashMap<SizeKey, u64> =
    PerCpuHashMap::with_max_entries(1 << 18, BPF_F_NO_PREALLOC);

/// Per-CPU bytes still to allocate before the next sampled block (`--sample-every`); 0 before the first draw.
#[map]
static SAMPLE_COUNTDOWN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `--sample-every` in bytes; 0 for an exact trace, where every block is recorded.
#[unsafe(no_mangle)]
static SAMPLE_INTERVAL: u64 = 0;

/// Exponentially distributed intervals between samples (mean `SAMPLE_INTERVAL`), drawn by a random index.
#[unsafe(no_mangle)]
static SAMPLE_INTERVALS: [u64; SAMPLE_INTERVAL_ENTRIES] = [0; SAMPLE_INTERVAL_ENTRIES];

/// The weights of sampled blocks (`tracer_common::sample_weight`'s table), set at load time.
#[unsafe(no_mangle)]
static SAMPLE_WEIGHTS: [u64; SAMPLE_WEIGHT_ENTRIES] = [0; SAMPLE_WEIGHT_ENTRIES];

/// Processes being traced (tgid → unused): tracepoints fire for every process on the host.
#[map]
static TARGETS: HashMap<u32, u8> = HashMap::with_max_entries(65536, 0);

/// Index 0: 1 while new processes are held until attached (see `holding`).
#[map]
static HOLDING: Array<u32> = Array::with_max_entries(1, 0);

/// The process that forked each child marked in `TARGETS`, until the child first runs.
#[map]
static PARENTS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

/// Process names (`--comm`, NUL-padded to 16 bytes) whose processes are traced from their exec on.
#[map]
static COMMS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(64, 0);

/// Per-thread state between an `mmap`/`mremap` system call's entry and exit.
#[map]
static SYSCALLS: HashMap<u64, SyscallInFlight> = HashMap::with_max_entries(65536, 0);

/// Traced CPython processes (tgid → where their frames are): allocations there carry Python frames.
#[map]
static PY_PROCS: HashMap<u32, PyProcess> = HashMap::with_max_entries(4096, 0);

/// Offset of `thread.fsbase` in `struct task_struct`, from the kernel's BTF: the thread pointer, which is what
/// CPython records as a thread state's `thread_id` (`pthread_self()`).
#[unsafe(no_mangle)]
static TASK_FSBASE_OFFSET: u32 = 0;

/// `owner` of a frame that only marks where C called into the interpreter (3.12+).
const FRAME_OWNED_BY_CSTACK: u8 = 3;

/// 1 when userspace decides which new processes to trace itself (`--container`, `--cgroup`): every exec on the
/// host is then sent, and userspace marks the ones it takes.
#[unsafe(no_mangle)]
static WATCH_EXECS: u32 = 0;

/// Where `oom:mark_victim` keeps its fields on this kernel, set at load time from tracefs.
#[unsafe(no_mangle)]
static OOM_FIELDS: OomFields = OomFields {
    pid: 8,
    comm: 12,
    total_vm: 16,
    anon_rss: 24,
    file_rss: 32,
    shmem_rss: 40,
};

/// Where `exceptions:page_fault_user` keeps its fields on this kernel, set at load time from tracefs.
#[unsafe(no_mangle)]
static FAULT_FIELDS: FaultFields = FaultFields {
    address: 8,
    error_code: 24,
};

/// 1 in the agent's watch tier, whose page ledger must see every mapping: an allocator's own `mmap` and
/// `mremap` in a process escalated to the uprobes are still sent (marked as the allocator's, without a stack).
#[unsafe(no_mangle)]
static WATCH_TIER: u32 = 0;

/// 1 when a process that exec'd is stopped at each library its loader maps until userspace has looked for
/// CPython in it (see `PYTHON_PENDING`): tracing with Python frames. The watch tier never holds.
#[unsafe(no_mangle)]
static HOLD_FOR_PYTHON: u32 = 0;

/// One write fault in this many, drawn at random, is sent (the watch tier); each sample weighs this much.
#[unsafe(no_mangle)]
static FAULT_SAMPLE_EVERY: u32 = 16;

/// `madvise` advice that releases a range's pages.
const MADV_DONTNEED: u64 = 4;
const MADV_FREE: u64 = 8;
const MADV_REMOVE: u64 = 9;

/// Offset of `child_pid` in the `sched_process_fork` record: its layout changed across kernels, so userspace
/// reads it from tracefs and sets it at load time.
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 20;

/// Offsets in the `syscalls:*` records: the first argument of an entry, and the return value of an exit.
const SYSCALL_ARG0: usize = 16;
const SYSCALL_RET: usize = 16;
const MAP_PRIVATE: u64 = 0x02;
const MAP_ANONYMOUS: u64 = 0x20;
const PROT_READ: u64 = 0x1;
const PROT_WRITE: u64 = 0x2;
/// A map update's flags: any, or only a key not yet there; and the error of the latter when it is.
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = -17;
/// Returns from `-4095` to `-1` are error numbers.
const MAX_ERRNO: u64 = 4095;
/// Offsets of `ip` and `sp` in the kernel's `struct pt_regs`, which differs by architecture (x86-64's `ip`
/// and `sp`; aarch64's `pc` and `sp` after `regs[31]`). `build.rs` builds this object for the target's.
#[cfg(bpf_target_arch = "x86_64")]
const PT_REGS_IP: usize = 128;
#[cfg(bpf_target_arch = "x86_64")]
const PT_REGS_SP: usize = 152;
#[cfg(bpf_target_arch = "aarch64")]
const PT_REGS_IP: usize = 256;
#[cfg(bpf_target_arch = "aarch64")]
const PT_REGS_SP: usize = 248;
/// The frame pointer (x86-64's `bp`, aarch64's `regs[29]`) and the link register (aarch64's `regs[30]`; x86-64
/// has none, and reads 0): what CFI unwinding starts from besides `ip` and `sp`.
#[cfg(bpf_target_arch = "x86_64")]
const PT_REGS_FP: usize = 32;
#[cfg(bpf_target_arch = "x86_64")]
const PT_REGS_LR: Option<usize> = None;
#[cfg(bpf_target_arch = "aarch64")]
const PT_REGS_FP: usize = 232;
#[cfg(bpf_target_arch = "aarch64")]
const PT_REGS_LR: Option<usize> = Some(240);

/// The instruction pointer of a probe's saved user registers.
#[inline(always)]
fn user_ip(regs: &pt_regs) -> u64 {
    #[cfg(bpf_target_arch = "x86_64")]
    return regs.rip;
    #[cfg(bpf_target_arch = "aarch64")]
    return regs.pc;
}

/// Userspace is woken only once this much is waiting (it also drains the ring on a short timer): a wake-up
/// per record costs more than everything else a probe does.
const WAKEUP_BYTES: u64 = 1 << 20;

/// Writes a record to the ring buffer; false, and counted as lost, when there is no room.
#[inline(always)]
fn output<T>(record: &T) -> bool {
    write(record, wakeup_flags())
}

/// Wakes userspace only once [`WAKEUP_BYTES`] wait.
#[inline(always)]
fn wakeup_flags() -> u64 {
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    flags as u64
}

/// Writes a record userspace must act on at once (a new process to attach to), waking it.
#[inline(always)]
fn output_now<T>(record: &T) -> bool {
    write(record, BPF_RB_FORCE_WAKEUP as u64)
}

#[inline(always)]
fn write<T>(record: &T, flags: u64) -> bool {
    let written = EVENTS.output::<T>(record, flags).is_ok();
    if !written {
        count_loss(Loss::RingBufFull);
    }
    written
}

#[inline(always)]
fn count_loss(loss: Loss) {
    if let Some(counter) = LOSSES.get_ptr_mut(loss as u32) {
        // SAFETY: a per-CPU slot, only touched by programs on this CPU, which do not preempt each other.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn tally(tally: Tally) {
    if let Some(counter) = TALLIES.get_ptr_mut(tally as u32) {
        // SAFETY: as in `count_loss`.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn sample_interval() -> u64 {
    // SAFETY: a plain global set at load time.
    unsafe { core::ptr::read_volatile(&SAMPLE_INTERVAL) }
}

/// `(count in units of 1 / COUNT_SCALE, bytes)` a block of `size` stands for.
#[inline(always)]
fn weight(size: u64) -> (u64, u64) {
    let interval = sample_interval();
    if interval == 0 {
        return sample_weight(size, 0, &[0; SAMPLE_WEIGHT_ENTRIES]);
    }
    // SAFETY: a global set at load time, read through a pointer the compiler cannot see through, so that
    // the loader's values are used rather than the zeros it was compiled with.
    let weights = unsafe { &*core::hint::black_box(core::ptr::addr_of!(SAMPLE_WEIGHTS)) };
    sample_weight(size, interval, weights)
}

/// Whether an allocation of `size` bytes is recorded: always in an exact trace; sampled by bytes otherwise,
/// the per-CPU countdown drawn again from an exponential distribution after each sample.
#[inline(always)]
fn sampled(size: u64) -> bool {
    let interval = sample_interval();
    if interval == 0 {
        return true;
    }
    let Some(left) = SAMPLE_COUNTDOWN.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's slot; no other program on this CPU runs until this one returns.
    let left = unsafe { &mut *left };
    if *left == 0 {
        *left = next_interval();
    }
    if *left > size {
        *left -= size;
        return false;
    }
    *left = next_interval();
    true
}

#[inline(always)]
fn next_interval() -> u64 {
    // SAFETY: a plain helper; the index is masked into the table, a global set at load time.
    unsafe {
        let index = bpf_get_prandom_u32() as usize & (SAMPLE_INTERVAL_ENTRIES - 1);
        let table = core::hint::black_box(core::ptr::addr_of!(SAMPLE_INTERVALS)).cast::<u64>();
        core::ptr::read_volatile(table.add(index)).max(1)
    }
}

/// Adds a block to its site's counters and size histogram.
#[inline(always)]
fn count_allocation(tgid: u32, block: &LiveBlock) {
    let site = block.site(tgid);
    let (count, bytes) = weight(block.size);
    if let Some(counters) = site_counters(&site) {
        counters.allocated_count += count;
        counters.allocated_bytes += bytes;
        if block.size < counters.smallest {
            counters.smallest = block.size;
        }
        if block.size > counters.largest {
            counters.largest = block.size;
        }
    }
    let key = SizeKey {
        site,
        size_class: size_class(block.size),
    };
    if let Some(blocks) = SIZES.get_ptr_mut(&key) {
        // SAFETY: this CPU's value.
        unsafe { *blocks += 1 };
    } else if SIZES.insert(&key, &1, 0).is_err() {
        count_loss(Loss::SizeTableFull);
    }
}

/// Adds a released block to its site's counters.
#[inline(always)]
fn count_release(tgid: u32, block: &LiveBlock) {
    let site = block.site(tgid);
    let (count, bytes) = weight(block.size);
    if let Some(counters) = site_counters(&site) {
        counters.freed_count += count;
        counters.freed_bytes += bytes;
    }
}

/// This CPU's counters of a site, made on first use; `None` (counted) when the table is full.
#[inline(always)]
fn site_counters(site: &SiteKey) -> Option<&'static mut SiteCounters> {
    // SAFETY (both look-ups): this CPU's value of an entry that exists; no other program on this CPU runs
    // meanwhile.
    if let Some(counters) = SITES.get_ptr_mut(site) {
        return Some(unsafe { &mut *counters });
    }
    let fresh = SiteCounters {
        smallest: u64::MAX,
        ..SiteCounters::default()
    };
    if SITES.insert(site, &fresh, 0).is_err() {
        count_loss(Loss::SiteTableFull);
        return None;
    }
    SITES
        .get_ptr_mut(site)
        .map(|counters| unsafe { &mut *counters })
}

/// A block the allocator returned: into the live tables, and counted at its site. An address still in a table
/// was released by a function alloctrace does not probe: that block is gone all the same.
#[inline(always)]
fn record_block(tgid: u32, addr: u64, block: &LiveBlock) {
    let key = LiveKey {
        tgid,
        _pad: 0,
        addr,
    };
    // The common case, a new address, costs one hash operation: the stale block is looked up only when the
    // insertion finds the address taken.
    let stored = match LIVE.insert(&key, block, BPF_NOEXIST) {
        Ok(()) => {
            if spilled()
                && let Some(stale) = take_from(&LIVE_SPILL, &key)
            {
                release_unseen(tgid, &stale);
            }
            Ok(())
        }
        Err(EEXIST) => {
            // SAFETY: copied out at once.
            if let Some(stale) = unsafe { LIVE.get(&key) }.copied() {
                release_unseen(tgid, &stale);
            }
            LIVE.insert(&key, block, BPF_ANY)
        }
        // `LIVE` is full, and so does not hold the address (an insertion looks for the key first).
        Err(_) => spill(tgid, &key, block),
    };
    if stored.is_err() {
        count_loss(Loss::LiveTableFull);
    }
    count_allocation(tgid, block);
}

/// Puts a block in `LIVE_SPILL`, releasing a stale one there at the same address.
#[inline(always)]
fn spill(tgid: u32, key: &LiveKey, block: &LiveBlock) -> Result<(), i32> {
    // Marked before the block is there: a thread that frees it learnt its address after this program ended.
    if let Some(spilled) = SPILLED.get_ptr_mut(0) {
        // SAFETY: a plain word that only ever goes from 0 to 1.
        unsafe { *spilled = 1 };
    }
    match LIVE_SPILL.insert(key, block, BPF_NOEXIST) {
        Err(EEXIST) => {
            // SAFETY: copied out at once.
            if let Some(stale) = unsafe { LIVE_SPILL.get(key) }.copied() {
                release_unseen(tgid, &stale);
            }
            LIVE_SPILL.insert(key, block, BPF_ANY)
        }
        other => other,
    }
}

#[inline(always)]
fn spilled() -> bool {
    SPILLED.get(0).is_some_and(|&on| on != 0)
}

/// A block still in a table when its address came back from the allocator: freed by an unprobed function.
#[inline(always)]
fn release_unseen(tgid: u32, stale: &LiveBlock) {
    count_release(tgid, stale);
    tally(Tally::UnseenFree);
}

/// Takes a block out of the live tables: `None` when they never held it.
#[inline(always)]
fn take_block(tgid: u32, addr: u64) -> Option<LiveBlock> {
    let key = LiveKey {
        tgid,
        _pad: 0,
        addr,
    };
    take_from(&LIVE, &key).or_else(|| {
        if spilled() {
            take_from(&LIVE_SPILL, &key)
        } else {
            None
        }
    })
}

/// Puts back a block taken out (by a `realloc` that then failed).
#[inline(always)]
fn put_back(tgid: u32, key: &LiveKey, block: &LiveBlock) {
    if LIVE.insert(key, block, BPF_ANY).is_err() && spill(tgid, key, block).is_err() {
        count_loss(Loss::LiveTableFull);
    }
}

#[inline(always)]
fn take_from(table: &HashMap<LiveKey, LiveBlock>, key: &LiveKey) -> Option<LiveBlock> {
    // SAFETY: copied out at once. A preallocated element is reused as soon as it is freed, but only the
    // thread that owns this address removes it.
    let block = unsafe { table.get(key) }.copied()?;
    let _ = table.remove(key);
    Some(block)
}

#[inline(always)]
fn header(kind: EventKind) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind: kind as u32,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        _pad: 0,
        // SAFETY: plain helpers without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    }
}

/// Records the entry of an allocator call. A call made while another allocator call of the same thread is in
/// flight (glibc's `realloc(NULL, n)` calls `malloc`) only deepens the nesting: the outer call is the one
/// recorded. A call that is not sampled is not recorded at all.
#[inline(always)]
fn enter(func: AllocFn, size: u64, result_ptr: u64) -> bool {
    enter_releasing(func, size, result_ptr, None)
}

/// [`enter`], for a call that releases a block the live table held (`realloc`): such a call is always
/// recorded, so that its block is put back if it fails.
#[inline(always)]
fn enter_releasing(
    func: AllocFn,
    size: u64,
    result_ptr: u64,
    released: Option<(u64, LiveBlock)>,
) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let now = in_flight_clock();
    let slot = IN_FLIGHT.get_ptr_mut(pid_tgid);
    if let Some(in_flight) = slot {
        // SAFETY: a value of this thread's own key: no other CPU runs this thread now.
        let in_flight = unsafe { &mut *in_flight };
        if in_flight.in_call(now) {
            in_flight.nested += 1;
            return false;
        }
        if in_flight.entered_jiffies != 0 {
            // A call that never returned: what it allocated was not recorded.
            count_loss(Loss::InFlightFull);
        }
    }
    let recorded = released.is_some() || sampled(size);
    let (released_addr, released) = released.unwrap_or_default();
    let state = InFlight {
        func: func as u32,
        nested: 0,
        size,
        result_ptr,
        entered_jiffies: now,
        released_addr,
        released,
        recorded: u32::from(recorded),
        _pad: 0,
    };
    match slot {
        // SAFETY: as above.
        Some(in_flight) => unsafe { *in_flight = state },
        None => {
            if IN_FLIGHT.insert(pid_tgid, state, 0).is_err() {
                count_loss(Loss::InFlightFull);
                return false;
            }
        }
    }
    recorded
}

/// The clock of calls in flight, never 0 (which marks an idle entry): jiffies, a plain read where the precise
/// clock is a clock source read (a fifth of the entry probe's time on a VM), and ample to tell a call of a
/// second ago.
#[inline(always)]
fn in_flight_clock() -> u64 {
    // SAFETY: a plain helper without arguments.
    unsafe { bpf_jiffies64() | 1 }
}

#[uprobe]
pub fn malloc_enter(ctx: ProbeContext) -> u32 {
    enter(AllocFn::Malloc, arg(&ctx, 0), 0);
    0
}

#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    // An overflowing product makes calloc fail, and a failed call records nothing: wrapping is harmless.
    enter(AllocFn::Calloc, arg(&ctx, 0).wrapping_mul(arg(&ctx, 1)), 0);
    0
}

#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    reallocate(AllocFn::Realloc, arg(&ctx, 0), arg(&ctx, 1));
    0
}

#[uprobe]
pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
    // Overflow makes reallocarray fail with the block kept, which a failed call records correctly.
    reallocate(
        AllocFn::Reallocarray,
        arg(&ctx, 0),
        arg(&ctx, 1).wrapping_mul(arg(&ctx, 2)),
    );
    0
}

#[uprobe]
pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
    // The block comes back through the pointer in the first argument: kept to be read at return.
    enter(AllocFn::PosixMemalign, arg(&ctx, 2), arg(&ctx, 0));
    0
}

#[uprobe]
pub fn aligned_alloc_enter(ctx: ProbeContext) -> u32 {
    enter(AllocFn::AlignedAlloc, arg(&ctx, 1), 0);
    0
}

#[uprobe]
pub fn memalign_enter(ctx: ProbeContext) -> u32 {
    enter(AllocFn::Memalign, arg(&ctx, 1), 0);
    0
}

#[uprobe]
pub fn valloc_enter(ctx: ProbeContext) -> u32 {
    enter(AllocFn::Valloc, arg(&ctx, 0), 0);
    0
}

#[uprobe]
pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
    enter(AllocFn::Pvalloc, arg(&ctx, 0), 0);
    0
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg(n).unwrap_or(0)
}

/// realloc and reallocarray release their input block before they return, and another thread may be handed
/// the same address by then: the block leaves the live table now, and is put back if the call fails.
#[inline(always)]
fn reallocate(func: AllocFn, old_addr: u64, size: u64) {
    // Which functions release their input is said once, in `tracer_common` (a constant once inlined). A call
    // nested in another allocator call is the allocator's own business.
    if !func.reallocates() || in_allocator() || old_addr == 0 {
        let _ = enter(func, size, 0);
        return;
    }
    let tgid = current_tgid();
    let Some(block) = take_block(tgid, old_addr) else {
        if sample_interval() == 0 {
            tally(Tally::UnknownFree);
        }
        let _ = enter(func, size, 0);
        return;
    };
    if !enter_releasing(func, size, 0, Some((old_addr, block))) {
        // Not recorded (the in-flight table is full, counted): the block is released all the same.
        count_release(tgid, &block);
    }
}

#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(in_flight) = IN_FLIGHT.get_ptr_mut(pid_tgid) else {
        return 0;
    };
    // SAFETY: this thread's own entry.
    let state = unsafe { *in_flight };
    if state.entered_jiffies == 0 {
        // Idle: this return's entry was not seen.
        return 0;
    }
    if state.nested > 0 {
        // SAFETY: as above.
        unsafe { (*in_flight).nested -= 1 };
        return 0;
    }
    // SAFETY: as above. The entry stays, idle, for the thread's next call.
    unsafe { (*in_flight).entered_jiffies = 0 };
    if state.recorded == 0 {
        // Passed over by sampling: it only marked the allocator's own mappings as such.
        return 0;
    }
    let returned: u64 = ctx.ret();
    let addr = if state.func == AllocFn::PosixMemalign as u32 {
        // posix_memalign returns an error number, and stores the block only on success.
        if returned != 0 {
            return 0;
        }
        // SAFETY: reading the caller's result pointer, which posix_memalign has just written.
        unsafe { bpf_probe_read_user(state.result_ptr as *const u64) }.unwrap_or(0)
    } else {
        returned
    };
    let tgid = current_tgid();
    if state.released_addr != 0 {
        if addr == 0 && state.size != 0 {
            // realloc failed and kept its block.
            let key = LiveKey {
                tgid,
                _pad: 0,
                addr: state.released_addr,
            };
            put_back(tgid, &key, &state.released);
            return 0;
        }
        // It moved, grew in place, or (size 0) freed the block: the old one is gone for good.
        count_release(tgid, &state.released);
    }
    // A failed allocation changes nothing.
    if addr == 0 {
        return 0;
    }
    let block = LiveBlock {
        size: state.size,
        // SAFETY: a return probe's context is the user registers, whose ip the kernel has set to the return
        // address into the caller.
        stack_id: capture_stack(ctx.as_ptr(), user_ip(unsafe { &*ctx.regs }), None),
        // SAFETY: a plain helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        func: state.func,
        _pad: 0,
    };
    record_block(tgid, addr, &block);
    0
}

#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let addr: u64 = ctx.arg(0).unwrap_or(0);
    if addr == 0 {
        return 0;
    }
    // A free made by the allocator itself while one of its calls is in flight (realloc(p, 0) frees p) was
    // already recorded by that call.
    if in_allocator() {
        return 0;
    }
    let tgid = current_tgid();
    match take_block(tgid, addr) {
        Some(block) => count_release(tgid, &block),
        // Sampled, most blocks were never recorded: only an exact trace knows this one predates it.
        None if sample_interval() == 0 => tally(Tally::UnknownFree),
        None => {}
    }
    0
}

#[inline(always)]
fn emit_release(func: AllocFn, addr: u64, size: u64) {
    let event = FreeEvent {
        header: header(EventKind::Free),
        func: func as u32,
        _pad: 0,
        addr,
        size,
    };
    let _ = output(&event);
}

/// Takes the user stack, returns its id (a hash of its frames), and sends the frames the first time an id is
/// seen. Returns 0 when no stack could be taken. `first_frame` is the user instruction pointer, the innermost
/// frame: at a return probe the exact return address into the caller, so the allocator's own frames never
/// appear. At a system call it is inside the libc wrapper, which keeps no frame pointer: `guessed_caller`, the
/// word on top of the user stack, is put second (userspace drops it when it is not a return address).
///
/// In a Python process the Python frames are walked first: when they name the caller, the native stack is only
/// `first_frame` (and a system call's guessed caller), so the frame-pointer walk, the dearest part of a stack
/// on this hot path, is not made at all.
#[inline(always)]
fn capture_stack(ctx: *mut c_void, first_frame: u64, guessed_caller: Option<u64>) -> u64 {
    let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch slot; no other program on this CPU runs until this one returns.
    let scratch = unsafe { &mut *scratch };
    let skip = usize::from(guessed_caller.is_some());
    scratch.py_depth = 0;
    scratch.py_status = PyStatus::NotPython as u32;
    // SAFETY: read-only look-up of a plain value.
    if let Some(py) = unsafe { PY_PROCS.get(current_tgid()) } {
        walk_python(py, scratch);
    }
    // Where Python frames name the caller, the native frames past the exact first one (and a system call's
    // guessed caller) come from the frame-pointer chain of an interpreter built without frame pointers: noise
    // that would make every call from one Python line a stack of its own.
    let depth = if scratch.py_depth > 0 {
        scratch.frames[0] = first_frame;
        if let Some(caller) = guessed_caller {
            scratch.frames[1] = caller;
        }
        1 + skip
    } else {
        match native_stack(ctx, scratch, guessed_caller) {
            Some(depth) => depth,
            None => return 0,
        }
    };
    // Two Python lines calling the same C code are two sites: the Python frames are part of the identity.
    // Hashed under bpf_loop, like the Python walk: unrolled, the two loops were most of what the verifier
    // checked in each of the three programs that take stacks, at every start.
    let mut hash = StackHash {
        id: 0xcbf2_9ce4_8422_2325,
        native_depth: depth as u64,
        stack: scratch,
    };
    // SAFETY: the callback is a BPF function taking (index, ctx); ctx points at `hash` on this stack.
    unsafe {
        bpf_loop(
            (MAX_STACK_DEPTH + MAX_PY_FRAMES) as u32,
            hash_frame as *mut c_void,
            (&mut hash as *mut StackHash).cast(),
            0,
        )
    };
    let scratch = hash.stack;
    // 0 means "no stack" in records.
    let id = hash.id | 1;
    // Kept in the scratch whether sent or not: a stack window sent next copies the stack from there.
    scratch.stack_id = id;
    scratch.depth = depth as u32;
    scratch.guessed_caller = skip as u32;
    // The record goes out before the id is marked as sent: a thread on another CPU that sees the mark then
    // writes its allocation after the stack in the ring. Two threads may both send it; userspace keeps one.
    let last_sent = LAST_SENT_STACK.get_ptr_mut(0);
    // SAFETY (both): this CPU's slot; no other program on this CPU runs until this one returns.
    if last_sent.is_some_and(|last| unsafe { *last } == id) {
        return id;
    }
    let mut sent = true;
    // SAFETY: read-only look-up of a plain value.
    if unsafe { SENT_STACKS.get(id) }.is_none() {
        scratch.header = header(EventKind::Stack);
        if scratch.py_depth > 0 {
            capture_code_objects(scratch);
        }
        // A Python stack wakes userspace at once: its code objects must be read before they are freed (a
        // module's, once its import is done). A new stack is rare beside the allocations it names.
        sent = if scratch.py_depth > 0 {
            output_now(&*scratch)
        } else {
            output(&*scratch)
        };
        if sent {
            let _ = SENT_STACKS.insert(id, 0, 0);
        }
    }
    if let Some(last) = last_sent.filter(|_| sent) {
        // SAFETY: as above.
        unsafe { *last = id };
    }
    id
}

/// Sends, ahead of a new stack, each of its code objects this process has not sent yet, copied with the
/// strings and line table that name it. Userspace reads code objects lazily from the process's memory, but a
/// module's is freed as soon as its import is done: on an import storm, a third of the bytes had a frame it
/// could no longer read. The copy is taken while the frame runs, so the object is certainly there.
#[inline(always)]
fn capture_code_objects(stack: &StackEvent) {
    let tgid = current_tgid();
    // SAFETY: read-only look-up of a plain value, copied out.
    let Some(py) = (unsafe { PY_PROCS.get(tgid) }).copied() else {
        return;
    };
    let mut capture = CodeCapture { py, stack, tgid };
    // SAFETY: the callback is a BPF function taking (index, ctx); ctx points at `capture` on this stack.
    unsafe {
        bpf_loop(
            MAX_PY_FRAMES as u32,
            capture_code as *mut c_void,
            (&mut capture as *mut CodeCapture).cast(),
            0,
        )
    };
}

/// What `capture_code` needs: the process's offsets and the stack whose frames it looks at.
#[repr(C)]
struct CodeCapture<'a> {
    py: PyProcess,
    stack: &'a StackEvent,
    tgid: u32,
}

/// One step of `capture_code_objects`: sends the code object of Python frame `index` if it is new; 1 stops.
extern "C" fn capture_code(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `CodeCapture` `capture_code_objects` passed to bpf_loop.
    let capture = unsafe { &*ctx.cast::<CodeCapture>() };
    if index >= u64::from(capture.stack.py_depth) {
        return 1;
    }
    let Some(&frame) = capture.stack.py_frames.get(index as usize) else {
        return 1;
    };
    // A shim frame.
    if frame.code == 0 {
        return 0;
    }
    let Some(event) = CODE_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch slot; no other program on this CPU runs until this one returns.
    let event = unsafe { &mut *event };
    let py = &capture.py;
    let len = (py.code_header_len as usize).min(CODE_HEADER_BYTES);
    let Some(code_bytes) = event.code_bytes.get_mut(..len) else {
        return 1;
    };
    // SAFETY: bpf_probe_read_user checks the address; a fault is an error, not a crash.
    if len == 0 || unsafe { bpf_probe_read_user_buf(frame.code as *const u8, code_bytes) }.is_err()
    {
        return 0;
    }
    let key = CodeKey {
        code: frame.code,
        filename: word_at(&event.code_bytes, py.code_filename),
        name: word_at(&event.code_bytes, py.code_name),
        tgid: capture.tgid,
        first_line: word_at(&event.code_bytes, py.code_firstlineno) as u32,
    };
    // SAFETY: read-only look-up of a plain value.
    if unsafe { SENT_CODES.get(&key) }.is_some() {
        return 0;
    }
    event.header = header(EventKind::Code);
    event.code = frame.code;
    event.code_len = len as u32;
    event.filename = key.filename;
    event.filename_len = read_object(key.filename, &mut event.filename_bytes);
    event.name = key.name;
    event.name_len = read_object(key.name, &mut event.name_bytes);
    event.line_table = word_at(&event.code_bytes, py.code_linetable);
    event.line_table_len = read_object(event.line_table, &mut event.line_table_bytes);
    // Written before the stack that names it, which wakes userspace.
    if output(&*event) {
        let _ = SENT_CODES.insert(&key, &0, 0);
    }
    0
}

/// The 8 bytes at `offset` of a copied object, native-endian; 0 past its end.
#[inline(always)]
fn word_at<const N: usize>(bytes: &[u8; N], offset: u32) -> u64 {
    let offset = offset as usize;
    match bytes.get(offset..offset + 8) {
        Some(word) => {
            let mut value = [0u8; 8];
            value.copy_from_slice(word);
            u64::from_ne_bytes(value)
        }
        None => 0,
    }
}

/// Copies up to `N` bytes of the object at `addr` into `out`; the bytes copied. An object near the end of its
/// mapping is copied up to the end of its page, which is mapped since the object starts there.
#[inline(always)]
fn read_object<const N: usize>(addr: u64, out: &mut [u8; N]) -> u32 {
    if addr == 0 {
        return 0;
    }
    // SAFETY (both): bpf_probe_read_user checks the address; a fault is an error, not a crash.
    if unsafe { bpf_probe_read_user_buf(addr as *const u8, out) }.is_ok() {
        return N as u32;
    }
    let to_page_end = (PAGE_SIZE - (addr & (PAGE_SIZE - 1))) as usize;
    let Some(part) = out.get_mut(..to_page_end.min(N)) else {
        return 0;
    };
    match unsafe { bpf_probe_read_user_buf(addr as *const u8, part) } {
        Ok(()) => part.len() as u32,
        Err(_) => 0,
    }
}

/// A stack's id being computed: the native frames (`native_depth` of them), then the Python frames.
#[repr(C)]
struct StackHash<'a> {
    id: u64,
    native_depth: u64,
    stack: &'a mut StackEvent,
}

/// One step of the stack hash: mixes frame `index` (native frames first, then Python ones) into the id; 1
/// stops the loop.
extern "C" fn hash_frame(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `StackHash` `capture_stack` passed to bpf_loop.
    let hash = unsafe { &mut *ctx.cast::<StackHash>() };
    let mix = |id: u64, word: u64| (id.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    if index < hash.native_depth {
        let Some(&frame) = hash.stack.frames.get(index as usize) else {
            return 1;
        };
        hash.id = mix(hash.id, frame);
        return 0;
    }
    let python = (index - hash.native_depth) as usize;
    if python >= hash.stack.py_depth as usize {
        return 1;
    }
    let Some(&frame) = hash.stack.py_frames.get(python) else {
        return 1;
    };
    hash.id = mix(mix(mix(hash.id, frame.code), frame.instr), frame.globals);
    0
}

/// The frame-pointer walk of the user stack into `scratch.frames`, with a system call's `guessed_caller` put
/// second; its depth, or `None` (counted) when the kernel could not take it.
#[inline(always)]
fn native_stack(
    ctx: *mut c_void,
    scratch: &mut StackEvent,
    guessed_caller: Option<u64>,
) -> Option<usize> {
    let skip = usize::from(guessed_caller.is_some());
    // SAFETY: the buffer is `frames` past the first `skip` entries, and its remaining size is passed.
    let bytes = unsafe {
        bpf_get_stack(
            ctx,
            scratch.frames.as_mut_ptr().add(skip).cast(),
            ((MAX_STACK_DEPTH - skip) * 8) as u32,
            BPF_F_USER_STACK as u64,
        )
    };
    if bytes <= 0 {
        count_loss(Loss::StackUnavailable);
        return None;
    }
    let mut depth = (bytes as usize / 8).min(MAX_STACK_DEPTH - skip);
    if let Some(caller) = guessed_caller {
        scratch.frames[0] = scratch.frames[1];
        scratch.frames[1] = caller;
        depth += 1;
    }
    Some(depth)
}

#[inline(always)]
fn read_user<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user checks the address; a fault is an error, not a crash.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// Finds the current thread's Python thread state (the one whose `thread_id` is this thread's pointer) and
/// reads its frames into `out`: code object and position, innermost first. Both walks run under `bpf_loop`,
/// so the verifier checks one step of each, not every unrolled iteration (which took seconds at load). A shim
/// frame takes a slot with code 0, which userspace skips.
#[inline(always)]
fn walk_python(py: &PyProcess, out: &mut StackEvent) {
    // SAFETY: a plain global set at load time, and the current task's own thread pointer.
    let thread_pointer = unsafe {
        let offset = core::ptr::read_volatile(&TASK_FSBASE_OFFSET) as usize;
        let task = bpf_get_current_task() as *const u8;
        bpf_probe_read_kernel(task.add(offset) as *const u64).unwrap_or(0)
    };
    out.py_status = PyStatus::NoThreadState as u32;
    let interp = read_user::<u64>(py.interpreters_head).unwrap_or(0);
    let mut search = ThreadSearch {
        tstate: read_user::<u64>(interp + py.interp_threads_head as u64).unwrap_or(0),
        thread_pointer,
        tstate_next: py.tstate_next as u64,
        tstate_thread_id: py.tstate_thread_id as u64,
        found: 0,
    };
    // SAFETY: the callback is a BPF function taking (index, ctx); ctx points at `search` on this stack.
    unsafe {
        bpf_loop(
            MAX_PY_THREADS as u32,
            find_thread_state as *mut c_void,
            (&mut search as *mut ThreadSearch).cast(),
            0,
        )
    };
    // Past the search limit, another thread's state must not stand in for this one's.
    if search.found == 0 {
        return;
    }
    out.py_status = PyStatus::Read as u32;
    let mut frame = read_user::<u64>(search.tstate + py.tstate_frame as u64).unwrap_or(0);
    if py.cframe_current_frame != PY_NO_OFFSET && frame != 0 {
        frame = read_user::<u64>(frame + py.cframe_current_frame as u64).unwrap_or(0);
    }
    let Some(window) = FRAME_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; no other program on this CPU runs until this one returns.
    let window = unsafe { &mut *window };
    window.frame = frame;
    window.depth = 0;
    // Empty: what it held was read for another stack.
    window.len = 0;
    let mut walk = FrameWalk {
        py: *py,
        out,
        window,
    };
    // SAFETY: as above, with `walk`.
    unsafe {
        bpf_loop(
            MAX_PY_FRAMES as u32,
            read_frame as *mut c_void,
            (&mut walk as *mut FrameWalk).cast(),
            0,
        )
    };
    if walk.window.frame != 0 {
        walk.out.py_status = PyStatus::Truncated as u32;
    }
    walk.out.py_depth = walk.window.depth.min(MAX_PY_FRAMES as u64) as u32;
}

/// The state of the search for the current thread's Python thread state.
#[repr(C)]
struct ThreadSearch {
    tstate: u64,
    thread_pointer: u64,
    tstate_next: u64,
    tstate_thread_id: u64,
    found: u64,
}

/// One step of the thread-state search: 1 stops the loop.
extern "C" fn find_thread_state(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `ThreadSearch` `walk_python` passed to bpf_loop.
    let search = unsafe { &mut *ctx.cast::<ThreadSearch>() };
    if search.tstate == 0 {
        return 1;
    }
    if read_user::<u64>(search.tstate + search.tstate_thread_id).unwrap_or(0)
        == search.thread_pointer
    {
        search.found = 1;
        return 1;
    }
    search.tstate = read_user::<u64>(search.tstate + search.tstate_next).unwrap_or(0);
    0
}

/// The state of the walk up a thread's Python frames.
#[repr(C)]
struct FrameWalk<'a> {
    py: PyProcess,
    out: &'a mut StackEvent,
    /// The walk's state, and where frames are read: a map's memory, which needs no zeroing (see
    /// `FRAME_SCRATCH`).
    window: &'a mut FrameWindow,
}

/// One step of the frame walk: reads the frame at `frame` into the next slot; 1 stops the loop.
extern "C" fn read_frame(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `FrameWalk` `walk_python` passed to bpf_loop.
    let walk = unsafe { &mut *ctx.cast::<FrameWalk>() };
    let window = &mut *walk.window;
    let depth = window.depth as usize;
    let frame = window.frame;
    if frame == 0 || depth >= MAX_PY_FRAMES {
        return 1;
    }
    let py = &walk.py;
    let end = frame.wrapping_add((py.frame_read_size as u64).min(PY_FRAME_READ_MAX as u64));
    // A frame that the last read holds costs no read of its own: one read per frame, even of only the four
    // fields needed, cost four times as much.
    if frame < window.start || end > window.start.wrapping_add(window.len) {
        // Frames of 3.10 and before are objects of their own, in no particular order: read alone.
        let start = if py.frame_instr_is_pointer != 0 && frame % 8 == 0 {
            (frame & !(PAGE_SIZE - 1)).max(end.saturating_sub(FRAME_WINDOW as u64))
        } else {
            frame
        };
        let len = (end.wrapping_sub(start) as usize).min(FRAME_WINDOW);
        // SAFETY: reading at most `FRAME_WINDOW` bytes of user memory into a buffer of that size.
        let read = unsafe {
            bpf_probe_read_user_buf(
                start as *const u8,
                &mut words_as_bytes(&mut window.words)[..len],
            )
        };
        if read.is_err() {
            window.len = 0;
            return 1;
        }
        window.start = start;
        window.len = len as u64;
    }
    // The window starts at the frame or at a page's start, so that frames at 8-byte boundaries (all of
    // them) are whole words into it.
    let base = (frame.wrapping_sub(window.start) / 8) as usize;
    let words = &window.words;
    let word = |offset: u32| -> u64 { words.get(base + offset as usize / 8).copied().unwrap_or(0) };
    let owner = if py.frame_owner == PY_NO_OFFSET {
        0
    } else {
        (word(py.frame_owner) >> ((py.frame_owner % 8) * 8)) as u8
    };
    let raw = word(py.frame_instr);
    // f_lasti (3.8–3.10) is a C int: the low half of its word.
    let instr = if py.frame_instr_is_pointer != 0 {
        raw
    } else {
        raw & 0xffff_ffff
    };
    let code = word(py.frame_code);
    let next = word(py.frame_back);
    if let Some(slot) = walk.out.py_frames.get_mut(depth) {
        // A shim's other fields are not valid: as a slot of its own, it is all zeros.
        *slot = if owner == FRAME_OWNED_BY_CSTACK {
            PyFrame {
                code: 0,
                instr,
                globals: 0,
            }
        } else {
            PyFrame {
                code,
                instr,
                globals: if py.frame_globals == PY_NO_OFFSET {
                    0
                } else {
                    word(py.frame_globals)
                },
            }
        };
    }
    window.depth += 1;
    window.frame = next;
    0
}

#[inline(always)]
fn words_as_bytes(words: &mut [u64; FRAME_WINDOW / 8]) -> &mut [u8; FRAME_WINDOW] {
    // SAFETY: same size, u8 has no alignment or validity requirements.
    unsafe { &mut *(words as *mut [u64; FRAME_WINDOW / 8]).cast::<[u8; FRAME_WINDOW]>() }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn is_target() -> bool {
    // SAFETY: read-only look-up of a plain value.
    unsafe { TARGETS.get(current_tgid()) }.is_some()
}

/// True while one of the allocator's own calls runs on this thread: what it maps is its blocks' memory.
#[inline(always)]
fn in_allocator() -> bool {
    // SAFETY: this thread's own entry, copied out; and a plain helper.
    match unsafe { IN_FLIGHT.get(bpf_get_current_pid_tgid()) } {
        Some(state) => state.in_call(in_flight_clock()),
        None => false,
    }
}

#[inline(always)]
fn field(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: reading a field of the tracepoint record at an offset its format file gives.
    unsafe { ctx.read_at::<u64>(offset) }.unwrap_or(0)
}

/// At a system call or fault: the current task's saved user registers (0 where one cannot be read).
#[inline(always)]
fn user_regs() -> UserRegs {
    // SAFETY: bpf_task_pt_regs of the current task gives its saved user registers; every read is checked.
    unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const u8;
        let at = |offset: usize| bpf_probe_read_kernel(regs.add(offset) as *const u64).unwrap_or(0);
        UserRegs {
            ip: at(PT_REGS_IP),
            sp: at(PT_REGS_SP),
            fp: at(PT_REGS_FP),
            lr: PT_REGS_LR.map_or(0, at),
        }
    }
}

/// The word on top of the user stack: at a leaf wrapper's `syscall`, the return address into its caller.
#[inline(always)]
fn top_word(regs: &UserRegs) -> u64 {
    read_user::<u64>(regs.sp).unwrap_or(0)
}

/// Sends the user stack from `regs.sp` up (at most [`STACK_WINDOW_BYTES`]) with the registers and the stack
/// `capture_stack` just took (its record is still in `STACK_SCRATCH`), reserved in the ring buffer itself: far
/// too large for the BPF stack, and copied once.
#[inline(always)]
fn send_stack_window(regs: &UserRegs) {
    let Some(scratch) = STACK_SCRATCH.get_ptr(0) else {
        return;
    };
    let Some(mut entry) = EVENTS.reserve::<StackWindowEvent>(0) else {
        count_loss(Loss::RingBufFull);
        return;
    };
    let window = entry.as_mut_ptr();
    // SAFETY: `window` is the reserved record, written here before it is submitted; `scratch` is this CPU's
    // stack record, which no other program on this CPU touches meanwhile.
    unsafe {
        // A helper copy: as plain loads and stores, 1,840 bytes cost the verifier an instruction each.
        let stack = core::slice::from_raw_parts_mut(
            core::ptr::addr_of_mut!((*window).stack).cast::<u8>(),
            size_of::<StackEvent>(),
        );
        if bpf_probe_read_kernel_buf(scratch.cast::<u8>(), stack).is_err() {
            entry.discard(0);
            return;
        }
        (*window).stack.header = header(EventKind::StackWindow);
        (*window).regs = *regs;
        (*window).len = read_window(regs.sp, &mut (*window).bytes);
        (*window)._pad = 0;
    }
    entry.submit(wakeup_flags());
}

/// Reads the user stack from `sp` up into `bytes`; the bytes read. A read that crosses the top of the stack
/// fails whole, so shorter ones follow, ending at page boundaries (the page of `sp` is mapped: the system call's
/// return address is there).
#[inline(always)]
fn read_window(sp: u64, bytes: &mut [u8; STACK_WINDOW_BYTES]) -> u32 {
    let to_page_end = PAGE_SIZE - (sp & (PAGE_SIZE - 1));
    for len in [
        STACK_WINDOW_BYTES as u64,
        to_page_end + PAGE_SIZE,
        to_page_end,
    ] {
        let len = len.min(STACK_WINDOW_BYTES as u64) as usize;
        // SAFETY: at most `STACK_WINDOW_BYTES` bytes of user memory into a buffer of that size; a fault is an
        // error, not a crash.
        if unsafe { bpf_probe_read_user_buf(sp as *const u8, &mut bytes[..len]) }.is_ok() {
            return len as u32;
        }
    }
    0
}

/// Sends a range being mapped (or the break having moved) with its stack. A mapping made outside the allocator
/// comes from a libc wrapper (`mmap`, `sbrk`) without frame pointers, where the frame-pointer walk loses the
/// caller: it also sends the stack window that userspace unwinds (`send_stack_window`).
#[inline(always)]
fn emit_mapping(ctx: &TracePointContext, func: AllocFn, addr: u64, size: u64, flags: u32) {
    let stack_id = if flags & ALLOC_BY_ALLOCATOR == 0 {
        let regs = user_regs();
        let id = capture_stack(ctx.as_ptr(), regs.ip, Some(top_word(&regs)));
        // The watch tier follows mappings by the page and never names their stacks.
        // SAFETY: a plain global set at load time.
        if id != 0 && unsafe { core::ptr::read_volatile(&WATCH_TIER) } == 0 {
            send_stack_window(&regs);
        }
        id
    } else {
        0
    };
    let event = AllocEvent {
        header: header(EventKind::Alloc),
        func: func as u32,
        flags,
        addr,
        size,
        stack_id,
    };
    let _ = output(&event);
}

/// Whether a mapping the allocator makes inside one of its calls is skipped: its blocks account for it, except
/// in the watch tier (see `WATCH_TIER`).
#[inline(always)]
fn skipped_in_allocator() -> bool {
    // SAFETY: a plain global set at load time.
    let watch_tier = unsafe { core::ptr::read_volatile(&WATCH_TIER) };
    watch_tier == 0 && in_allocator()
}

#[tracepoint]
pub fn mmap_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: read-only look-up of a plain value, copied out.
    let Some(target) = (unsafe { TARGETS.get(current_tgid()) }).copied() else {
        return 0;
    };
    if skipped_in_allocator() {
        return 0;
    }
    // mmap(addr, len, prot, flags, fd, off): only anonymous memory that can be used; files are page cache,
    // and a PROT_NONE mapping is an address-space reservation (guard pages, a runtime's heap reserve).
    let len = field(&ctx, SYSCALL_ARG0 + 8);
    let prot = field(&ctx, SYSCALL_ARG0 + 16);
    let flags = field(&ctx, SYSCALL_ARG0 + 24);
    let func = if flags & MAP_ANONYMOUS == 0 {
        // A loader maps a library's writable segment last, after its code and constants: where a shared
        // libpython is first complete enough to be recognised, and before any of its code has run.
        if target & PYTHON_PENDING == 0
            || prot & PROT_WRITE == 0
            || flags & MAP_PRIVATE == 0
            || !holding_for_python()
        {
            return 0;
        }
        LIBRARY_MAPPING
    } else if prot & (PROT_READ | PROT_WRITE) == 0 {
        return 0;
    } else {
        AllocFn::Mmap as u32
    };
    let state = SyscallInFlight { func, _pad: 0, len };
    if SYSCALLS
        .insert(bpf_get_current_pid_tgid(), state, 0)
        .is_err()
    {
        count_loss(Loss::InFlightFull);
    }
    0
}

#[tracepoint]
pub fn mremap_enter(ctx: TracePointContext) -> u32 {
    if !is_target() || skipped_in_allocator() {
        return 0;
    }
    // mremap(old, old_len, new_len, flags, new_addr): the old range goes now, in order with other threads.
    let old_addr = field(&ctx, SYSCALL_ARG0);
    let old_len = field(&ctx, SYSCALL_ARG0 + 8);
    let state = SyscallInFlight {
        func: AllocFn::Mremap as u32,
        _pad: 0,
        len: field(&ctx, SYSCALL_ARG0 + 16),
    };
    if SYSCALLS
        .insert(bpf_get_current_pid_tgid(), state, 0)
        .is_err()
    {
        count_loss(Loss::InFlightFull);
        return 0;
    }
    emit_release(AllocFn::Mremap, old_addr, old_len);
    0
}

/// The exit of `mmap` and `mremap`.
#[tracepoint]
pub fn map_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: this thread's own entry, copied out.
    let Some(state) = (unsafe { SYSCALLS.get(pid_tgid) }).copied() else {
        return 0;
    };
    let _ = SYSCALLS.remove(pid_tgid);
    let ret = field(&ctx, SYSCALL_RET);
    let failed = ret > u64::MAX - MAX_ERRNO;
    if state.func == LIBRARY_MAPPING {
        if !failed {
            hold_for_python();
        }
        return 0;
    }
    // One call of emit_mapping, so that the verifier checks the stack capture once in this program.
    let func = if state.func == AllocFn::Mremap as u32 {
        AllocFn::Mremap
    } else if failed {
        return 0;
    } else {
        AllocFn::Mmap
    };
    // A failed mremap keeps the old range, which userspace restores on a 0 address.
    let addr = if failed { 0 } else { ret };
    // Only the watch tier gets here inside an allocator call: its ledger needs no stack for the allocator's own.
    let flags = if in_allocator() {
        ALLOC_BY_ALLOCATOR
    } else {
        0
    };
    emit_mapping(&ctx, func, addr, state.len, flags);
    0
}

#[tracepoint]
pub fn munmap_enter(ctx: TracePointContext) -> u32 {
    if !is_target() {
        return 0;
    }
    // Sent even from inside the allocator: userspace removes only ranges it recorded as mapped.
    emit_release(
        AllocFn::Munmap,
        field(&ctx, SYSCALL_ARG0),
        field(&ctx, SYSCALL_ARG0 + 8),
    );
    0
}

#[tracepoint]
pub fn brk_exit(ctx: TracePointContext) -> u32 {
    if !is_target() {
        return 0;
    }
    // Every move of the break is sent, so userspace always knows where it is; moves made by the allocator
    // are marked, their memory being its blocks'.
    let flags = if in_allocator() {
        ALLOC_BY_ALLOCATOR
    } else {
        0
    };
    emit_mapping(&ctx, AllocFn::Brk, field(&ctx, SYSCALL_RET), 0, flags);
    0
}

/// A watched process touched a page: a write fault gives it a private page of its own. One in
/// `FAULT_SAMPLE_EVERY`, at random, is sent with its stack, whose first frame is the faulting instruction.
#[tracepoint]
pub fn page_fault_user(ctx: TracePointContext) -> u32 {
    if !is_target() {
        return 0;
    }
    // SAFETY: plain globals set at load time.
    let (fields, every) = unsafe {
        (
            core::ptr::read_volatile(&FAULT_FIELDS),
            core::ptr::read_volatile(&FAULT_SAMPLE_EVERY),
        )
    };
    let error_code = field(&ctx, fields.error_code as usize);
    if error_code & FAULT_WRITE == 0 || error_code & FAULT_INSTRUCTION != 0 {
        return 0;
    }
    // SAFETY: a plain helper without arguments.
    if every > 1 && unsafe { bpf_get_prandom_u32() } % every != 0 {
        return 0;
    }
    let event = FaultEvent {
        header: header(EventKind::Fault),
        addr: field(&ctx, fields.address as usize),
        // The user registers' ip is the faulting instruction.
        stack_id: capture_stack(ctx.as_ptr(), user_regs().ip, None),
        weight: every.max(1),
        _pad: 0,
    };
    let _ = output(&event);
    0
}

#[tracepoint]
pub fn madvise_enter(ctx: TracePointContext) -> u32 {
    if !is_target() {
        return 0;
    }
    // madvise(start, len, behavior): only the advice that drops the pages of the range.
    let advice = field(&ctx, SYSCALL_ARG0 + 16) & 0xffff_ffff;
    if matches!(advice, MADV_DONTNEED | MADV_FREE | MADV_REMOVE) {
        emit_release(
            AllocFn::Madvise,
            field(&ctx, SYSCALL_ARG0),
            field(&ctx, SYSCALL_ARG0 + 8),
        );
    }
    0
}

/// Every OOM kill on the host, traced process or not: the evidence dies with the victim.
#[tracepoint]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    // SAFETY: a plain global set at load time.
    let fields = unsafe { core::ptr::read_volatile(&OOM_FIELDS) };
    let at = |offset: u32| -> u64 {
        // SAFETY: reading a field of the tracepoint record at an offset its format file gives.
        unsafe { ctx.read_at::<u64>(offset as usize) }.unwrap_or(0)
    };
    let mut event = OomEvent {
        header: header(EventKind::Oom),
        // SAFETY: as above.
        victim_pid: unsafe { ctx.read_at::<u32>(fields.pid as usize) }.unwrap_or(0),
        _pad: 0,
        total_vm_kib: at(fields.total_vm),
        anon_rss_kib: at(fields.anon_rss),
        file_rss_kib: at(fields.file_rss),
        shmem_rss_kib: at(fields.shmem_rss),
        comm: [0; 16],
    };
    // SAFETY: the __data_loc word, then at most 16 bytes of the name it points to, inside the record.
    unsafe {
        let location = ctx.read_at::<u32>(fields.comm as usize).unwrap_or(0);
        let name = ctx.as_ptr().cast::<u8>().add((location & 0xffff) as usize);
        let _ = bpf_probe_read_kernel_buf(name, &mut event.comm);
    }
    let _ = output_now(&event);
    0
}

/// A task of a traced process exits: what it had in flight will never return, and an exiting process leaves
/// the traced set (its pid may be reused by a process nobody asked to trace).
#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    if !is_target() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let _ = IN_FLIGHT.remove(pid_tgid);
    let _ = SYSCALLS.remove(pid_tgid);
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tid == tgid {
        let _ = TARGETS.remove(tgid);
        let _ = PY_PROCS.remove(tgid);
    }
    0
}

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    if !is_target() {
        return 0;
    }
    // SAFETY: a plain global, set at load time.
    let offset = unsafe { core::ptr::read_volatile(&FORK_CHILD_PID_OFFSET) } as usize;
    // SAFETY: reading a field of the tracepoint record at the offset its format file gives.
    let child_pid = unsafe { ctx.read_at::<u32>(offset) }.unwrap_or(0);
    if child_pid == 0 {
        return 0;
    }
    // Threads come through here too, and are told apart when they first run. Marking the child now means its
    // own system calls and forks are seen from its first instruction, and that an exec of its is held.
    let _ = TARGETS.insert(child_pid, HOLD_AT_EXEC | FORKED, 0);
    let _ = PARENTS.insert(child_pid, current_tgid(), 0);
    0
}

/// The return of `clone`, `clone3`, `fork` and `vfork`, in the new task as it first returns to user mode. A
/// process a target forked is stopped there, before its first instruction, and announced: userspace attaches
/// its allocator probes, then continues it, so that none of its allocations can be missed. A new thread is no
/// process of its own: it leaves the traced set.
#[tracepoint]
pub fn fork_child_start(ctx: TracePointContext) -> u32 {
    if field(&ctx, SYSCALL_RET) != 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // SAFETY: read-only look-ups of plain values, copied out.
    let Some(flags) = (unsafe { TARGETS.get(tid) }).copied() else {
        return 0;
    };
    if flags & FORKED == 0 {
        return 0;
    }
    if tid != tgid {
        let _ = TARGETS.remove(tid);
        let _ = PARENTS.remove(tid);
        return 0;
    }
    let _ = TARGETS.insert(tgid, flags & !FORKED, 0);
    // SAFETY: as above.
    let parent_pid = unsafe { PARENTS.get(tgid) }.copied().unwrap_or(0);
    let _ = PARENTS.remove(tgid);
    let hold = holding();
    let event = ForkEvent {
        header: header(EventKind::Fork),
        child_pid: tgid,
        parent_pid,
        held: u32::from(hold),
        _pad: 0,
    };
    announce(&event, hold);
    0
}

/// A process replaced its image. A target that userspace must attach to again (a child of a target, a `--comm`
/// match) is stopped before the new image runs its first instruction: userspace reads the image, attaches,
/// then continues it, so that none of its allocations, nor its names, can be missed however fast it exits.
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let tgid = current_tgid();
    // SAFETY: read-only look-up of a plain value, copied out.
    let hold = match unsafe { TARGETS.get(tgid) }.copied() {
        Some(flags) => flags & HOLD_AT_EXEC != 0,
        None => {
            let Ok(comm) = bpf_get_current_comm() else {
                return 0;
            };
            // SAFETY: read-only look-up of a plain value.
            if unsafe { COMMS.get(comm) }.is_some() {
                let _ = TARGETS.insert(tgid, HOLD_AT_EXEC, 0);
                true
            // SAFETY: a plain global set at load time.
            } else if unsafe { core::ptr::read_volatile(&WATCH_EXECS) } != 0 {
                false
            } else {
                return 0;
            }
        }
    };
    let hold = hold && holding();
    // Its new image may map a shared libpython: each library it maps stops it until userspace has looked.
    if holding_for_python() {
        // SAFETY: read-only look-up of a plain value, copied out.
        if let Some(flags) = unsafe { TARGETS.get(tgid) }.copied() {
            let _ = TARGETS.insert(tgid, flags | PYTHON_PENDING, 0);
        }
    }
    let event = ExecEvent {
        header: header(EventKind::Exec),
        held: u32::from(hold),
        _pad: 0,
    };
    announce(&event, hold);
    0
}

/// Whether new processes are held until attached: userspace turns it off as the trace ends, when it will no
/// longer attach to anything.
#[inline(always)]
fn holding() -> bool {
    HOLDING.get(0).is_some_and(|&on| on != 0)
}

/// Whether processes are stopped at the libraries they map until their interpreter is found.
#[inline(always)]
fn holding_for_python() -> bool {
    // SAFETY: a plain global set at load time.
    let on = unsafe { core::ptr::read_volatile(&HOLD_FOR_PYTHON) };
    on != 0 && holding()
}

/// Stops a process whose interpreter is looked for, which has mapped a library, and announces it: userspace
/// looks, then continues it.
#[inline(always)]
fn hold_for_python() {
    let event = LibraryMappedEvent {
        header: header(EventKind::LibraryMapped),
        held: 1,
        _pad: 0,
    };
    announce(&event, true);
}

/// Writes a record userspace must act on at once, and with `hold` stops the current process until userspace
/// continues it. The stop is sent first, so that userspace's `SIGCONT`, however soon it comes, follows it; when
/// the record cannot be written (userspace would never hear of it, and the process would stay stopped for good),
/// a `SIGCONT` discards the pending stop.
#[inline(always)]
fn announce<T>(event: &T, hold: bool) {
    if hold {
        // SAFETY (both): a plain helper; the signal reaches the current process on its way back to user mode.
        unsafe { bpf_send_signal(SIGSTOP) };
    }
    if !output_now(event) && hold {
        unsafe { bpf_send_signal(SIGCONT) };
    }
}

const SIGSTOP: u32 = 19;
const SIGCONT: u32 = 18;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
