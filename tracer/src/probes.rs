//! Loads the eBPF programs and attaches them: allocator uprobes per traced process (with a pid filter, so no
//! other process on the host hits a breakpoint), and the exec tracepoint. Reads the kernel-side loss counters.

use std::num::NonZeroU32;

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeScope},
    },
};
use tracer_common::{AllocFn, LOSS_COUNTERS, Loss};

use crate::procs::allocator::Allocator;

/// The entry program of an allocator function. Every function but `free` also gets `alloc_exit` on return.
fn entry_program(func: AllocFn) -> &'static str {
    match func {
        AllocFn::Malloc => "malloc_enter",
        AllocFn::Calloc => "calloc_enter",
        AllocFn::Realloc => "realloc_enter",
        AllocFn::Free => "free_enter",
        AllocFn::Reallocarray => "reallocarray_enter",
        AllocFn::PosixMemalign => "posix_memalign_enter",
        AllocFn::AlignedAlloc => "aligned_alloc_enter",
        AllocFn::Memalign => "memalign_enter",
        AllocFn::Valloc => "valloc_enter",
        AllocFn::Pvalloc => "pvalloc_enter",
    }
}

const EXIT_PROGRAM: &str = "alloc_exit";

pub struct Probes {
    ebpf: Ebpf,
}

impl Probes {
    pub fn load() -> anyhow::Result<Self> {
        let mut ebpf = Ebpf::load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/tracer"
        )))
        .context("cannot load alloctrace's eBPF object")?;
        let names = AllocFn::ALL.map(entry_program);
        for name in names.iter().copied().chain([EXIT_PROGRAM]) {
            let program: &mut UProbe = program(&mut ebpf, name)?.try_into()?;
            program
                .load()
                .with_context(|| format!("the kernel refused the eBPF program {name}"))?;
        }
        let exec: &mut TracePoint = program(&mut ebpf, "sched_process_exec")?.try_into()?;
        exec.load()
            .context("the kernel refused the eBPF program sched_process_exec")?;
        exec.attach("sched", "sched_process_exec")
            .context("cannot attach to the tracepoint sched:sched_process_exec")?;
        Ok(Self { ebpf })
    }

    /// Puts the allocator probes on `allocator` for process `pid` only, and marks `pid` as traced.
    pub fn attach(&mut self, pid: u32, allocator: &Allocator) -> anyhow::Result<()> {
        let scope =
            UProbeScope::OneProcess(NonZeroU32::new(pid).context("pid 0 is not a process")?);
        for point in &allocator.probes {
            let entry = (
                entry_program(point.func),
                point.file_offset + point.entry_offset,
            );
            let exit = (point.func != AllocFn::Free).then_some((EXIT_PROGRAM, point.file_offset));
            for (name, offset) in std::iter::once(entry).chain(exit) {
                let func = point.func;
                let program: &mut UProbe = program(&mut self.ebpf, name)?.try_into()?;
                program
                    .attach(
                        UProbeAttachLocation::AbsoluteOffset(offset),
                        &allocator.attach_path,
                        scope,
                    )
                    .with_context(|| {
                        format!(
                            "cannot attach {name} to {} in {} for pid {pid}",
                            func.name(),
                            allocator.path
                        )
                    })?;
            }
        }
        let mut targets: aya::maps::HashMap<_, u32, u8> =
            aya::maps::HashMap::try_from(self.ebpf.map_mut("TARGETS").context("no TARGETS map")?)?;
        targets
            .insert(pid, 0, 0)
            .with_context(|| format!("cannot add pid {pid} to the traced set"))?;
        Ok(())
    }

    pub fn take_ring_buffer(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("no EVENTS map")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// The kernel-side loss counters, summed over CPUs, indexed by [`Loss`].
    pub fn losses(&self) -> anyhow::Result<[u64; LOSS_COUNTERS as usize]> {
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("LOSSES").context("no LOSSES map")?)?;
        let mut sums = [0; LOSS_COUNTERS as usize];
        for loss in [
            Loss::RingBufFull,
            Loss::InFlightFull,
            Loss::StackUnavailable,
        ] {
            sums[loss as usize] = counters.get(&(loss as u32), 0)?.iter().sum();
        }
        Ok(sums)
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))
}
