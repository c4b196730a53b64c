//! The records alloctrace's eBPF programs write to the ring buffer, the loss counters they keep, and the
//! constants both sides of the kernel/user boundary must agree on. Every type is `#[repr(C)]` with explicit
//! padding; each size is pinned by a const assertion, and userspace decodes them in `tracer::decode`.
#![no_std]

/// Most user frames one stack record holds: the kernel's default `kernel.perf_event_max_stack`.
pub const MAX_STACK_DEPTH: usize = 127;

/// Bytes of a process name (`comm`) the kernel keeps: `TASK_COMM_LEN` (16) less its terminating NUL.
pub const COMM_LEN: usize = 15;

/// A process name as the kernel keeps it: its first [`COMM_LEN`] bytes, cut wherever that falls, inside a UTF-8
/// character or not. `/proc/PID/comm` and `bpf_get_current_comm` give this, so every `--comm` comparison, in
/// the kernel or in userspace, goes through it.
pub const fn comm_bytes(name: &[u8]) -> &[u8] {
    if name.len() <= COMM_LEN {
        name
    } else {
        name.split_at(COMM_LEN).0
    }
}

/// The key of a process name in the kernel's `COMMS` map: [`comm_bytes`], NUL-padded to 16 bytes as
/// `bpf_get_current_comm` writes it.
pub const fn comm_key(name: &[u8]) -> [u8; COMM_LEN + 1] {
    let name = comm_bytes(name);
    let mut key = [0; COMM_LEN + 1];
    let mut i = 0;
    while i < name.len() {
        key[i] = name[i];
        i += 1;
    }
    key
}

/// The names of alloctrace's eBPF programs, by which userspace finds them in the object: each is the name of a
/// function of `tracer-ebpf`, which cannot take a constant for it; a unit test of `tracer::probes` checks that
/// each name used is a program of the built object.
pub mod program_names {
    pub const MALLOC_ENTER: &str = "malloc_enter";
    pub const CALLOC_ENTER: &str = "calloc_enter";
    pub const REALLOC_ENTER: &str = "realloc_enter";
    pub const FREE_ENTER: &str = "free_enter";
    pub const REALLOCARRAY_ENTER: &str = "reallocarray_enter";
    pub const POSIX_MEMALIGN_ENTER: &str = "posix_memalign_enter";
    pub const ALIGNED_ALLOC_ENTER: &str = "aligned_alloc_enter";
    pub const MEMALIGN_ENTER: &str = "memalign_enter";
    pub const VALLOC_ENTER: &str = "valloc_enter";
    pub const PVALLOC_ENTER: &str = "pvalloc_enter";
    pub const ALLOC_EXIT: &str = "alloc_exit";
    pub const MMAP_ENTER: &str = "mmap_enter";
    pub const MAP_EXIT: &str = "map_exit";
    pub const MREMAP_ENTER: &str = "mremap_enter";
    pub const MUNMAP_ENTER: &str = "munmap_enter";
    pub const BRK_EXIT: &str = "brk_exit";
    pub const SCHED_PROCESS_FORK: &str = "sched_process_fork";
    pub const FORK_CHILD_START: &str = "fork_child_start";
    pub const SCHED_PROCESS_EXEC: &str = "sched_process_exec";
    pub const SCHED_PROCESS_EXIT: &str = "sched_process_exit";
    pub const PAGE_FAULT_USER: &str = "page_fault_user";
    pub const MADVISE_ENTER: &str = "madvise_enter";
    pub const OOM_MARK_VICTIM: &str = "oom_mark_victim";
}

/// Most Python frames one stack record holds, innermost first.
pub const MAX_PY_FRAMES: usize = 48;

/// Most thread states searched for the current thread's, per event.
pub const MAX_PY_THREADS: usize = 64;

/// An offset field of [`PyProcess`] that the version does not have.
pub const PY_NO_OFFSET: u32 = u32::MAX;

/// What the eBPF side needs to walk one traced CPython process's frames: the address of the head of its
/// interpreter list, and the offsets of its version's structures (from `tracer::python::offsets`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProcess {
    /// Absolute address of `_PyRuntime.interpreters.head` in the process.
    pub interpreters_head: u64,
    pub interp_threads_head: u32,
    pub tstate_next: u32,
    pub tstate_thread_id: u32,
    /// The thread state's frame pointer (3.8–3.10 `frame`), `cframe` (3.11–3.12) or `current_frame` (3.13).
    pub tstate_frame: u32,
    /// `_PyCFrame.current_frame`, or [`PY_NO_OFFSET`] when `tstate_frame` leads to the frame itself.
    pub cframe_current_frame: u32,
    pub frame_back: u32,
    pub frame_code: u32,
    /// `f_globals`, or [`PY_NO_OFFSET`]: part of a frame's identity in the stack's id.
    pub frame_globals: u32,
    pub frame_instr: u32,
    /// 1 when `frame_instr` is a pointer (3.11+), 0 when it is a 32-bit `f_lasti`.
    pub frame_instr_is_pointer: u32,
    /// The frame's `owner` byte, or [`PY_NO_OFFSET`]; frames owned by the C stack (3) are interpreter shims.
    pub frame_owner: u32,
    /// Bytes from a frame's start that hold every field above (a multiple of 8, at most
    /// [`PY_FRAME_READ_MAX`]): each frame is read at once.
    pub frame_read_size: u32,
    /// In a code object: `co_filename`, `co_qualname` (`co_name` before 3.11), `co_linetable` (pointers) and
    /// `co_firstlineno` (an `int`); and the bytes from its start that hold them (at most [`CODE_HEADER_BYTES`]).
    pub code_filename: u32,
    pub code_name: u32,
    pub code_linetable: u32,
    pub code_firstlineno: u32,
    pub code_header_len: u32,
    pub _pad: u32,
}

/// The most bytes read of one Python frame.
pub const PY_FRAME_READ_MAX: usize = 128;

/// One Python frame as the eBPF side reads it: the code object, and where in it the frame is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PyFrame {
    pub code: u64,
    /// `f_lasti` (3.8–3.10) or the instruction pointer (3.11+).
    pub instr: u64,
    /// The frame's globals (its module's dict), 0 when unknown: hashed into the stack's id, so that a module's
    /// frame is not taken for another module's whose code object was later made at the same address.
    pub globals: u64,
}

/// What a ring-buffer record is. Values are part of the record format: never reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(num_enum::TryFromPrimitive))]
pub enum EventKind {
    /// An allocator call returned: [`AllocEvent`].
    Alloc = 1,
    /// A block is being released: [`FreeEvent`].
    Free = 2,
    /// The frames of a stack seen for the first time: [`StackEvent`].
    Stack = 3,
    /// A traced process replaced its image with `execve`: its address space, and every block in it, is gone.
    /// Also sent for a process whose new name matches a `--comm` filter: [`ExecEvent`].
    Exec = 4,
    /// A traced process forked: [`ForkEvent`].
    Fork = 5,
    /// The kernel chose a process to kill for memory, anywhere on the host: [`OomEvent`].
    Oom = 6,
    /// A watched process wrote to a page for the first time (a sampled user page fault): [`FaultEvent`].
    Fault = 7,
    /// A window of the user stack and the registers at a mapping system call, for userspace to unwind
    /// through code without frame pointers: [`StackWindowEvent`].
    StackWindow = 8,
    /// A process whose interpreter is still looked for mapped a file's writable segment (its loader loading a
    /// library): [`LibraryMappedEvent`].
    LibraryMapped = 9,
    /// A code object first seen in a new Python stack, copied as it was then: [`CodeEvent`].
    Code = 10,
}

/// The allocator entry point a record comes from. Values are part of the record format: never reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(num_enum::TryFromPrimitive))]
pub enum AllocFn {
    Malloc = 1,
    Calloc = 2,
    Realloc = 3,
    Free = 4,
    Reallocarray = 5,
    PosixMemalign = 6,
    AlignedAlloc = 7,
    Memalign = 8,
    Valloc = 9,
    Pvalloc = 10,
    /// Anonymous memory from the `mmap` system call, made outside any allocator call.
    Mmap = 11,
    Munmap = 12,
    /// `mremap`: releases the old range on entry, maps the new one on return.
    Mremap = 13,
    /// The program break moved (`brk`); `addr` is the new break.
    Brk = 14,
    /// `madvise` with `MADV_DONTNEED`, `MADV_FREE` or `MADV_REMOVE`: the range's pages are released, the range
    /// stays mapped.
    Madvise = 15,
}

impl AllocFn {
    /// The allocator functions, in the order their probes are attached (and so the name kept where two share
    /// an address).
    pub const ALLOCATOR: [Self; 10] = [
        Self::Malloc,
        Self::Calloc,
        Self::Realloc,
        Self::Free,
        Self::Reallocarray,
        Self::PosixMemalign,
        Self::AlignedAlloc,
        Self::Memalign,
        Self::Valloc,
        Self::Pvalloc,
    ];

    /// The C name of the function, as reports show it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Malloc => "malloc",
            Self::Calloc => "calloc",
            Self::Realloc => "realloc",
            Self::Free => "free",
            Self::Reallocarray => "reallocarray",
            Self::PosixMemalign => "posix_memalign",
            Self::AlignedAlloc => "aligned_alloc",
            Self::Memalign => "memalign",
            Self::Valloc => "valloc",
            Self::Pvalloc => "pvalloc",
            Self::Mmap => "mmap",
            Self::Munmap => "munmap",
            Self::Mremap => "mremap",
            Self::Brk => "brk",
            Self::Madvise => "madvise",
        }
    }

    /// Functions that release their input block (`realloc`'s first argument).
    pub const fn reallocates(self) -> bool {
        matches!(self, Self::Realloc | Self::Reallocarray)
    }

    /// System calls that map and unmap address ranges rather than hand out heap blocks.
    pub const fn maps_pages(self) -> bool {
        matches!(self, Self::Mmap | Self::Munmap | Self::Mremap | Self::Brk)
    }
}

/// Ways the eBPF side can lose data, each an index into the per-CPU `LOSSES` array. Values are part of the
/// format: never reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// The ring buffer had no room for a record: that allocation, free or stack never reached userspace.
    RingBufFull = 0,
    /// The table of calls between entry and return was full: that allocation was not recorded.
    InFlightFull = 1,
    /// `bpf_get_stack` failed: the allocation was recorded without a stack.
    StackUnavailable = 2,
    /// The table of live blocks ([`LiveKey`] → [`LiveBlock`]) was full: that block was not recorded.
    LiveTableFull = 3,
    /// The table of sites ([`SiteKey`] → [`SiteCounters`]) was full: that allocation was not counted.
    SiteTableFull = 4,
    /// The table of sizes per site ([`SizeKey`]) was full: that size is missing from its site's histogram.
    SizeTableFull = 5,
}

/// How many [`Loss`] counters there are.
pub const LOSS_COUNTERS: u32 = 6;

/// Events the kernel side counts that are not losses, each an index into the per-CPU `TALLIES` array. Values
/// are part of the format: never reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tally {
    /// A free of a block the live table never held: allocated before the trace began (normal with `-p`).
    UnknownFree = 0,
    /// A block found released only because the allocator handed its address out again: its release went
    /// through a function alloctrace does not probe.
    UnseenFree = 1,
}

/// How many [`Tally`] counters there are.
pub const TALLY_COUNTERS: u32 = 2;

/// Counts in [`SiteCounters`] are kept in units of `1 / COUNT_SCALE`, so that a sampled block can count as the
/// fraction of blocks its weight says (exact traces add `COUNT_SCALE` per block).
pub const COUNT_SCALE: u64 = 1 << 16;

/// Sampling by bytes (`--sample-every`) picks a block of `size` bytes with probability `p = 1 - e^-x`,
/// `x = size / interval`, and weighs it by `1 / p`: it stands for `interval * x / (1 - e^-x)` bytes. That
/// factor is tabulated for `x` in steps of `1 / SAMPLE_WEIGHT_STEPS` up to `SAMPLE_WEIGHT_SPAN` and
/// interpolated; past the span the block is sampled with certainty (`p > 1 - 1e-7`) and weighs its size.
pub const SAMPLE_WEIGHT_STEPS: u64 = 16;
pub const SAMPLE_WEIGHT_SPAN: u64 = 16;
/// Entries of the table of `x / (1 - e^-x)`, in units of `1 / COUNT_SCALE`.
pub const SAMPLE_WEIGHT_ENTRIES: usize = (SAMPLE_WEIGHT_STEPS * SAMPLE_WEIGHT_SPAN) as usize + 1;
/// Entries of the table of exponentially distributed intervals between samples, drawn by a random index.
pub const SAMPLE_INTERVAL_ENTRIES: usize = 256;
/// The largest sampling interval: keeps `size * SAMPLE_WEIGHT_STEPS * COUNT_SCALE` within 64 bits below the span.
pub const SAMPLE_INTERVAL_MAX: u64 = 1 << 36;

/// What a block of `size` bytes stands for: `(count in units of 1 / COUNT_SCALE, bytes)`. With `interval` 0
/// (an exact trace) that is one block of `size` bytes; sampled, it is the block's weight, from `weights` (the
/// table above). The kernel counts with it and userspace weighs the live blocks with it: one definition, so
/// that what a site allocated and freed and what it holds agree.
#[inline(always)]
pub fn sample_weight(
    size: u64,
    interval: u64,
    weights: &[u64; SAMPLE_WEIGHT_ENTRIES],
) -> (u64, u64) {
    if interval == 0 || size == 0 || interval > SAMPLE_INTERVAL_MAX {
        return (COUNT_SCALE, size);
    }
    if size >= interval * SAMPLE_WEIGHT_SPAN {
        return (COUNT_SCALE, size);
    }
    // x in units of 1 / (STEPS * COUNT_SCALE): an index into the table, and the fraction past it.
    let scaled = size * SAMPLE_WEIGHT_STEPS * COUNT_SCALE / interval;
    let index = ((scaled / COUNT_SCALE) as usize) & (SAMPLE_WEIGHT_ENTRIES - 2);
    let fraction = scaled % COUNT_SCALE;
    let low = weights[index];
    let high = weights[index + 1];
    let factor = low + (high.saturating_sub(low) * fraction) / COUNT_SCALE;
    // Within 64 bits: interval ≤ 2^36 and factor ≤ SPAN * COUNT_SCALE = 2^20; bytes < 2^41.
    let bytes = interval * factor / COUNT_SCALE;
    let bytes = if bytes < size { size } else { bytes };
    (bytes * COUNT_SCALE / size, bytes)
}

/// A heap block in the kernel's table of live blocks: the process, and the address the allocator returned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LiveKey {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// What the kernel keeps of a live heap block: blocks that die young cost a table update, never a record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LiveBlock {
    pub size: u64,
    /// The allocation's stack ([`StackEvent::stack_id`]); 0 when none could be taken.
    pub stack_id: u64,
    /// `bpf_ktime_get_ns()` at the allocation.
    pub ts_ns: u64,
    /// The [`AllocFn`] that allocated it.
    pub func: u32,
    pub _pad: u32,
}

impl LiveBlock {
    /// The site that allocated this block in process `tgid`.
    #[inline(always)]
    pub const fn site(&self, tgid: u32) -> SiteKey {
        SiteKey {
            tgid,
            func: self.func,
            stack_id: self.stack_id,
        }
    }
}

/// A site as the kernel counts it: a process, an allocator function, and a stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SiteKey {
    pub tgid: u32,
    /// An [`AllocFn`] value.
    pub func: u32,
    pub stack_id: u64,
}

/// What a site allocated and released, per CPU. Counts are in units of `1 / COUNT_SCALE`; bytes are bytes
/// (weighted estimates when sampling).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SiteCounters {
    pub allocated_count: u64,
    pub allocated_bytes: u64,
    pub freed_count: u64,
    pub freed_bytes: u64,
    /// The smallest and largest size allocated (`u64::MAX` and 0 before the first).
    pub smallest: u64,
    pub largest: u64,
}

/// One size class of a site's size histogram: sizes keep their 8 most significant bits, which is the
/// resolution of a 2-significant-digit HdrHistogram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SizeKey {
    pub site: SiteKey,
    pub size_class: u64,
}

/// The size class of `size`: its 8 most significant bits, the rest zeroed.
#[inline(always)]
pub const fn size_class(size: u64) -> u64 {
    let bits = 64 - size.leading_zeros();
    if bits <= 8 {
        size
    } else {
        let shift = bits - 8;
        (size >> shift) << shift
    }
}

/// First field of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct EventHeader {
    /// An [`EventKind`] value.
    pub kind: u32,
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC.
    pub ts_ns: u64,
    /// The cgroup v2 id of the task.
    pub cgroup_id: u64,
}

/// An allocator call returned `addr` for `size` bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AllocEvent {
    pub header: EventHeader,
    /// An [`AllocFn`] value.
    pub func: u32,
    /// [`ALLOC_BY_ALLOCATOR`] and future bits.
    pub flags: u32,
    /// The returned pointer: 0 when the call failed (reported for `realloc` and `mremap` only, which then keep
    /// their block). For `brk`, the new break.
    pub addr: u64,
    /// Bytes requested (`nmemb * size` for calloc).
    pub size: u64,
    /// Key of the user stack in [`StackEvent`]s; 0 when no stack could be taken.
    pub stack_id: u64,
}

/// Set in [`AllocEvent::flags`] when a `brk` was made by the allocator itself (inside one of its calls): the
/// break moved, but the memory belongs to the allocator's blocks, already counted.
pub const ALLOC_BY_ALLOCATOR: u32 = 1;

/// A block or range is being released: `free(addr)`, `realloc(addr, …)` on entry, `munmap`, `mremap` on entry,
/// `madvise` releasing pages.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FreeEvent {
    pub header: EventHeader,
    /// An [`AllocFn`] value.
    pub func: u32,
    pub _pad: u32,
    pub addr: u64,
    /// Length of the range, for `munmap`, `mremap` and `madvise`; 0 for heap blocks.
    pub size: u64,
}

/// A sampled write fault of a watched process (`exceptions:page_fault_user`): a page made resident and private,
/// with the stack that touched it. One in [`FaultEvent::weight`] faults is sent, at random.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FaultEvent {
    pub header: EventHeader,
    /// The faulting address.
    pub addr: u64,
    /// Key of the user stack in [`StackEvent`]s (its first frame the faulting instruction); 0 when none.
    pub stack_id: u64,
    /// How many faults the sample stands for: the sampling period.
    pub weight: u32,
    pub _pad: u32,
}

/// Offsets of the `exceptions:page_fault_user` record's fields, read from tracefs at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultFields {
    pub address: u32,
    pub error_code: u32,
}

/// Bits of x86's page-fault error code: the access was a write, the access was an instruction fetch. A write
/// fault gives the process a private page of its own (a fresh one, or a copy of the zero page or of a page shared
/// since a fork); read faults map file pages or the shared zero page, which are no growth of its own memory.
pub const FAULT_WRITE: u64 = 1 << 1;
pub const FAULT_INSTRUCTION: u64 = 1 << 4;

/// A process replaced its image with `execve`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ExecEvent {
    pub header: EventHeader,
    /// 1 when the process was stopped (`SIGSTOP`) before its new image ran its first instruction: userspace
    /// attaches to it, then sends `SIGCONT`.
    pub held: u32,
    pub _pad: u32,
}

/// A value of the `TARGETS` map: a target with this bit is stopped at its next exec until userspace has read
/// its new image and attached to it. Children forked by targets get it; a command alloctrace started, which it
/// holds at exec by itself, does not.
pub const HOLD_AT_EXEC: u8 = 1;

/// A value bit of the `TARGETS` map: a process a target forked, until it first returns to user mode.
pub const FORKED: u8 = 2;

/// A value bit of the `TARGETS` map: a process that exec'd and whose CPython has not been found yet. Each
/// library its loader maps stops it (see [`LibraryMappedEvent`]) until userspace has looked for the interpreter
/// in it: a shared libpython is found before any Python code runs, not some milliseconds later.
pub const PYTHON_PENDING: u8 = 4;

/// A process with [`PYTHON_PENDING`] mapped the writable segment of a file: its loader has mapped a library's
/// code and constants. Stopped there (`held`) until userspace has looked for CPython in it, then continued.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LibraryMappedEvent {
    pub header: EventHeader,
    /// 1 when the process was stopped (`SIGSTOP`): userspace sends `SIGCONT` once it has looked.
    pub held: u32,
    pub _pad: u32,
}

/// A traced process forked `child_pid`, which is traced from then on. Sent from the child as it first returns
/// to user mode, stopped there (`held`) until userspace has attached to it, so that it is traced from its first
/// instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ForkEvent {
    pub header: EventHeader,
    pub child_pid: u32,
    pub parent_pid: u32,
    /// 1 when the child was stopped (`SIGSTOP`): userspace continues it once attached.
    pub held: u32,
    pub _pad: u32,
}

/// The frames behind a stack id, sent once per id (again if the kernel's table of sent ids evicted it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct StackEvent {
    pub header: EventHeader,
    pub stack_id: u64,
    /// How many entries of `frames` are valid.
    pub depth: u32,
    /// 1 when `frames[1]` is the word on top of the user stack at a system call: the caller's return address
    /// if the libc wrapper is a leaf (as `mmap` and `munmap` are), else noise for userspace to drop.
    pub guessed_caller: u32,
    /// User instruction pointers, innermost first.
    pub frames: [u64; MAX_STACK_DEPTH],
    /// How many entries of `py_frames` are valid.
    pub py_depth: u32,
    /// A [`PyStatus`] value.
    pub py_status: u32,
    /// The Python frames of the thread, innermost first.
    pub py_frames: [PyFrame; MAX_PY_FRAMES],
}

/// The most bytes of a code object's start copied with it: its fields up to `co_linetable` (144 on 3.13).
pub const CODE_HEADER_BYTES: usize = 256;
/// The most bytes of a `str` object (its header, then its characters) copied for a code object's file name and
/// function name: a longer name is read from the process's memory, while it is still there.
pub const CODE_NAME_BYTES: usize = 512;
/// The most bytes of a code object's line table (a `bytes` object, header included) copied with it: a module of
/// a few hundred lines. The rest is read from the process's memory, while it is still there.
pub const CODE_LINE_TABLE_BYTES: usize = 4096;

/// A code object of a new Python stack, seen for the first time (by address and identity) in its process, and
/// the objects that name it, each copied from its start: sent before the [`StackEvent`] that uses it. A module's
/// code object is freed once its import is done, often before userspace could read it; this copy names the
/// frames of the stacks sent after it. The `*_len` fields say how many bytes of each array were copied (0: none).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CodeEvent {
    pub header: EventHeader,
    pub code: u64,
    pub filename: u64,
    pub name: u64,
    pub line_table: u64,
    pub code_len: u32,
    pub filename_len: u32,
    pub name_len: u32,
    pub line_table_len: u32,
    pub code_bytes: [u8; CODE_HEADER_BYTES],
    pub filename_bytes: [u8; CODE_NAME_BYTES],
    pub name_bytes: [u8; CODE_NAME_BYTES],
    pub line_table_bytes: [u8; CODE_LINE_TABLE_BYTES],
}

/// Bytes of user stack, from the stack pointer up, copied at a mapping system call made outside the allocator
/// (`mmap`, `mremap`, `brk`) for userspace to unwind with the modules' `.eh_frame`. perf's `--call-graph dwarf`
/// copies as much by default: libc's wrappers and `sbrk` use a few dozen bytes, and 8 KiB holds the callers of
/// ordinary C code and a dozen of CPython's C frames, while a record stays small beside the system call and
/// the page faults of the memory it maps. What lies past the window is taken from the frame-pointer walk.
pub const STACK_WINDOW_BYTES: usize = 8192;

/// The user registers an unwind starts from, as the system call found them. `fp` is x86-64's `rbp` or
/// aarch64's `x29`; `lr` is aarch64's link register (`x30`), 0 on x86-64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub fp: u64,
    pub lr: u64,
}

/// The user stack at a mapping system call made outside the allocator: sent before the [`AllocEvent`] of that
/// call (same thread, in ring order), whose `stack_id` is `stack.stack_id`. `stack` is the stack as the kernel
/// took it (frame-pointer walk, Python frames); userspace unwinds `bytes` from `regs` with the modules' CFI,
/// names that stack, and gives the allocation its id instead. Sent for every such call (its callers are what
/// the frame-pointer id cannot tell apart), never deduplicated by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct StackWindowEvent {
    /// Its header's kind is [`EventKind::StackWindow`].
    pub stack: StackEvent,
    pub regs: UserRegs,
    /// How many bytes of `bytes` were read, from `regs.sp` up: less than the window near the top of a stack.
    pub len: u32,
    pub _pad: u32,
    pub bytes: [u8; STACK_WINDOW_BYTES],
}

/// What became of a stack's Python frames. Values are part of the record format: never reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(num_enum::TryFromPrimitive))]
pub enum PyStatus {
    /// Not a traced Python process.
    NotPython = 0,
    /// Frames read (possibly none: a thread running no Python code).
    Read = 1,
    /// The thread has no Python thread state (a thread Python does not know, or the search limit was hit).
    NoThreadState = 2,
    /// More frames than a record holds: the outermost are missing.
    Truncated = 3,
}

/// `oom:mark_victim`: the kernel is killing `victim_pid` for memory. The header is the task in whose context
/// it happens (for a cgroup's limit, the one whose allocation hit it), with that task's cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct OomEvent {
    pub header: EventHeader,
    pub victim_pid: u32,
    pub _pad: u32,
    /// The victim's memory at the kill, in KiB, as the tracepoint gives it.
    pub total_vm_kib: u64,
    pub anon_rss_kib: u64,
    pub file_rss_kib: u64,
    pub shmem_rss_kib: u64,
    /// The victim's name, NUL-padded.
    pub comm: [u8; 16],
}

/// Offsets of the `oom:mark_victim` record's fields, read from tracefs at load time: the layout changed
/// across kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OomFields {
    pub pid: u32,
    /// The `__data_loc` word of `comm`: offset in the low 16 bits, length in the high 16.
    pub comm: u32,
    pub total_vm: u32,
    pub anon_rss: u32,
    pub file_rss: u32,
    pub shmem_rss: u32,
}

/// Per-thread state between a system call's entry and its exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallInFlight {
    /// An [`AllocFn`] value: `Mmap` or `Mremap`; or [`LIBRARY_MAPPING`].
    pub func: u32,
    pub _pad: u32,
    pub len: u64,
}

/// The `func` of a [`SyscallInFlight`] that maps a file's writable segment in a [`PYTHON_PENDING`] process: no
/// memory of its blocks, only a [`LibraryMappedEvent`] at its exit.
pub const LIBRARY_MAPPING: u32 = u32::MAX;

/// Per-thread state between an allocator's entry and its return.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    /// An [`AllocFn`] value.
    pub func: u32,
    /// Allocator calls nested inside this one (glibc's `realloc(NULL, n)` calls `malloc`): they are not
    /// recorded on their own.
    pub nested: u32,
    pub size: u64,
    /// Where `posix_memalign` stores its result; 0 for the other functions.
    pub result_ptr: u64,
    /// When the call entered, in jiffies (`bpf_jiffies64() | 1`, never 0); 0 while the thread has no call in
    /// flight (its entry is kept between calls). An entry older than [`IN_FLIGHT_STALE_JIFFIES`] never returned
    /// (its return probe was not hit: the kernel's limit of nested return probes, or a `longjmp` out of a
    /// signal handler), and must not make the thread's later calls look nested.
    pub entered_jiffies: u64,
    /// The block a `realloc` released on entry (`released.size` 0 when none): restored if the call fails.
    pub released_addr: u64,
    pub released: LiveBlock,
    /// 1 when the call's block is recorded; 0 for a call sampling passed over, kept in flight all the same so
    /// that the mappings the allocator makes during it are known to be its own.
    pub recorded: u32,
    pub _pad: u32,
}

/// Age, in jiffies, past which a call in flight is taken as one that will never return: 1 s at `HZ=1000`, 10 s
/// at `HZ=100`. No allocator call takes a second.
pub const IN_FLIGHT_STALE_JIFFIES: u64 = 1000;

impl InFlight {
    /// Whether this thread is inside an allocator call at `now` (in jiffies).
    #[inline(always)]
    pub const fn in_call(&self, now: u64) -> bool {
        self.entered_jiffies != 0
            && now.wrapping_sub(self.entered_jiffies) < IN_FLIGHT_STALE_JIFFIES
    }
}

const _: () = assert!(size_of::<EventHeader>() == 32);
const _: () = assert!(size_of::<AllocEvent>() == 64);
const _: () = assert!(size_of::<FreeEvent>() == 56);
const _: () = assert!(size_of::<ForkEvent>() == 48);
const _: () = assert!(size_of::<ExecEvent>() == 40);
const _: () = assert!(size_of::<LibraryMappedEvent>() == 40);
const _: () = assert!(size_of::<OomEvent>() == 88);
const _: () = assert!(size_of::<FaultEvent>() == 56);
const _: () = assert!(size_of::<FaultFields>() == 8);
const _: () = assert!(size_of::<OomFields>() == 24);
const _: () = assert!(size_of::<StackEvent>() == 48 + 8 * MAX_STACK_DEPTH + 8 + 24 * MAX_PY_FRAMES);
const _: () = assert!(size_of::<PyProcess>() == 80);
const _: () = assert!(
    size_of::<CodeEvent>()
        == 32 + 32 + 16 + CODE_HEADER_BYTES + 2 * CODE_NAME_BYTES + CODE_LINE_TABLE_BYTES
);
const _: () = assert!(size_of::<UserRegs>() == 32);
const _: () =
    assert!(size_of::<StackWindowEvent>() == size_of::<StackEvent>() + 32 + 8 + STACK_WINDOW_BYTES);
const _: () = assert!(size_of::<PyFrame>() == 24);
const _: () = assert!(size_of::<InFlight>() == 80);
const _: () = assert!(size_of::<LiveKey>() == 16);
const _: () = assert!(size_of::<LiveBlock>() == 32);
const _: () = assert!(size_of::<SiteKey>() == 16);
const _: () = assert!(size_of::<SiteCounters>() == 48);
const _: () = assert!(size_of::<SizeKey>() == 24);
const _: () = assert!(size_of::<SyscallInFlight>() == 16);

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, made only of integers, no implicit padding (its size is asserted above).
unsafe impl aya::Pod for PyProcess {}

#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for OomFields {}

#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for FaultFields {}

#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for LiveKey {}

#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for LiveBlock {}

#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SiteKey {}

#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SiteCounters {}

#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SizeKey {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comm_is_cut_at_15_bytes_even_inside_a_character() {
        // "é" is two bytes, 0xC3 0xA9: the 15th byte of this name is its first.
        let name = "aaaaaaaaaaaaaaé_x".as_bytes();
        assert_eq!(comm_bytes(name), &name[..15]);
        assert_eq!(comm_bytes(name).last(), Some(&0xC3));
        let mut key = [0; 16];
        key[..15].copy_from_slice(&name[..15]);
        assert_eq!(comm_key(name), key);
    }

    #[test]
    fn a_short_comm_is_kept_whole_and_nul_padded() {
        assert_eq!(comm_bytes(b"python3"), b"python3");
        assert_eq!(&comm_key(b"python3"), b"python3\0\0\0\0\0\0\0\0\0");
    }
}
