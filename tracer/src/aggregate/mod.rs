//! The ledger of outstanding memory: mapped ranges by extent, fed with decoded events (mmap, munmap, mremap,
//! brk), and heap blocks with their sites' statistics (totals, frees, a size histogram) as the kernel's tables
//! hold them. Pure bookkeeping, no kernel, so every rule — mremap's edge cases, partial munmap, brk, exec, the
//! weighing of sampled blocks — is unit-tested with synthetic events and tables.
//!
//! Heap blocks are counted in the kernel (a block that lives microseconds costs a map update, never a record):
//! the ledger takes a snapshot of those tables when a report needs it. The agent's watch tier, which sees page
//! faults rather than allocations, keeps its own ledger in [`resident`].

pub mod regions;
pub mod resident;

use std::{
    collections::{BTreeMap, HashMap, hash_map::Entry},
    sync::Arc,
};

use hdrhistogram::Histogram;
use regions::{Piece, Regions, Removed};
use tracer_common::{
    AllocFn, COUNT_SCALE, EventHeader, LiveBlock, LiveKey, SiteCounters, SiteKey, SizeKey,
    size_class,
};

use crate::{procs::Frame, sampling::Sampling};

/// Index of a site in a [`Sites`] table.
pub type SiteId = usize;

/// Where memory comes from: a process, the function or system call that took it, and the stack that called it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Site {
    pub pid: u32,
    pub func: AllocFn,
    /// Innermost first; empty when the stack was lost. Shared with every site of the same stack, and each frame
    /// with every stack that has it.
    pub frames: Arc<[Arc<Frame>]>,
}

/// Interns sites, so that stacks that differ only in noise past their last real frame share one site.
#[derive(Default)]
pub struct Sites {
    ids: HashMap<Site, SiteId>,
    sites: Vec<Site>,
}

impl Sites {
    pub fn intern(&mut self, site: Site) -> SiteId {
        match self.ids.entry(site) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => {
                let id = self.sites.len();
                self.sites.push(e.key().clone());
                e.insert(id);
                id
            }
        }
    }

    pub fn get(&self, id: SiteId) -> &Site {
        &self.sites[id]
    }

    /// How many sites there are; their ids are `0..len()`.
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }
}

/// Bytes and how many blocks (or ranges) they came in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub bytes: u64,
    pub count: u64,
}

/// Sizes a site allocated, by size class (8 significant bits, the resolution of a 2-significant-digit
/// HdrHistogram): a few entries per site, where a histogram takes kilobytes. A histogram is made only for the
/// sites a report shows.
#[derive(Clone, Debug, Default)]
pub struct SizeClasses(BTreeMap<u64, u64>);

impl SizeClasses {
    pub fn record(&mut self, size: u64) {
        self.record_n(size, 1);
    }

    pub fn record_n(&mut self, size: u64, count: u64) {
        if count > 0 {
            *self.0.entry(size_class(size)).or_default() += count;
        }
    }

    /// How many sizes were recorded.
    pub fn len(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn histogram(&self) -> Histogram<u64> {
        let mut histogram = Histogram::new(2).expect("2 significant digits are valid");
        for (&class, &count) in &self.0 {
            // The histogram grows to any u64 value a size can take: recording cannot fail.
            let _ = histogram.record_n(class, count);
        }
        histogram
    }
}

/// Everything one site did during the trace.
#[derive(Clone, Debug)]
pub struct SiteStats {
    pub allocated: Totals,
    pub freed: Totals,
    pub sizes: SizeClasses,
    /// The exact extremes, which the histogram rounds.
    pub smallest: u64,
    pub largest: u64,
}

impl Default for SiteStats {
    fn default() -> Self {
        Self {
            allocated: Totals::default(),
            freed: Totals::default(),
            sizes: SizeClasses::default(),
            smallest: u64::MAX,
            largest: 0,
        }
    }
}

/// A site's outstanding memory at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Live {
    pub bytes: u64,
    pub count: u64,
    /// Allocation time of the oldest outstanding block, in `bpf_ktime_get_ns` time.
    pub oldest_ns: u64,
    /// Allocation times of the blocks, by quarter of the trace window they were born in: a site whose survivors
    /// were born all along the window has kept growing.
    pub born_by_quarter: [u64; 4],
}

/// One outstanding block or mapped piece.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LiveObject {
    pub pid: u32,
    pub addr: u64,
    pub size: u64,
    pub ts_ns: u64,
    pub site: SiteId,
    /// What it stands for, `(blocks, bytes)`: itself, unless it is a sampled block.
    pub weight: (f64, u64),
}

/// The kernel's heap tables at one moment: every site's counters and size classes (summed over CPUs), and the
/// live blocks.
#[derive(Clone, Debug, Default)]
pub struct HeapTables {
    pub sites: Vec<(SiteKey, SiteCounters)>,
    pub sizes: Vec<(SizeKey, u64)>,
    pub blocks: Vec<(LiveKey, LiveBlock)>,
}

/// The heap as the ledger last took it from the kernel's tables.
#[derive(Default)]
struct Heap {
    stats: HashMap<SiteId, SiteStats>,
    blocks: Vec<LiveObject>,
}

/// Outstanding memory, and per-site statistics.
pub struct Ledger {
    heap: Heap,
    regions: Regions,
    /// Statistics of the sites that map memory (mmap, mremap, brk), by site; heap sites' are in `heap`.
    stats: Vec<SiteStats>,
    /// Pieces an `mremap` released on entry, by thread, until it returns: moved, or restored if it fails.
    remap_released: HashMap<u32, (u32, Vec<Piece>)>,
    /// The program break of each process, once known.
    breaks: HashMap<u32, u64>,
    page_size: u64,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::with_page_size(rustix::param::page_size() as u64)
    }
}

impl Ledger {
    pub fn with_page_size(page_size: u64) -> Self {
        Self {
            heap: Heap::default(),
            regions: Regions::default(),
            stats: Vec::new(),
            remap_released: HashMap::new(),
            breaks: HashMap::new(),
            page_size,
        }
    }

    /// Takes the heap from the kernel's tables, replacing what an earlier snapshot gave. `site_of` says which
    /// site a kernel site is (its process, function and stack); `sampling` weighs the blocks.
    pub fn set_heap(
        &mut self,
        tables: &HeapTables,
        sampling: &Sampling,
        mut site_of: impl FnMut(&SiteKey) -> SiteId,
    ) {
        let mut heap = Heap::default();
        let scale = COUNT_SCALE as f64;
        for (key, counters) in &tables.sites {
            let stats = heap.stats.entry(site_of(key)).or_default();
            stats.allocated.count += (counters.allocated_count as f64 / scale).round() as u64;
            stats.allocated.bytes += counters.allocated_bytes;
            stats.freed.count += (counters.freed_count as f64 / scale).round() as u64;
            stats.freed.bytes += counters.freed_bytes;
            stats.smallest = stats.smallest.min(counters.smallest);
            stats.largest = stats.largest.max(counters.largest);
        }
        for (key, blocks) in &tables.sizes {
            let stats = heap.stats.entry(site_of(&key.site)).or_default();
            let (weight, _) = sampling.weigh(key.size_class);
            stats
                .sizes
                .record_n(key.size_class, (*blocks as f64 * weight).round() as u64);
        }
        heap.blocks = tables
            .blocks
            .iter()
            .map(|(key, block)| LiveObject {
                pid: key.tgid,
                addr: key.addr,
                size: block.size,
                ts_ns: block.ts_ns,
                site: site_of(&block.site(key.tgid)),
                weight: sampling.weigh(block.size),
            })
            .collect();
        self.heap = heap;
    }

    fn stats_mut(&mut self, site: SiteId) -> &mut SiteStats {
        if self.stats.len() <= site {
            self.stats.resize_with(site + 1, SiteStats::default);
        }
        &mut self.stats[site]
    }

    fn count_allocation(&mut self, site: SiteId, size: u64) {
        let stats = self.stats_mut(site);
        stats.allocated.bytes += size;
        stats.allocated.count += 1;
        stats.sizes.record(size);
        stats.smallest = stats.smallest.min(size);
        stats.largest = stats.largest.max(size);
    }

    fn count_release(&mut self, site: SiteId, bytes: u64, whole: bool) {
        let stats = self.stats_mut(site);
        stats.freed.bytes += bytes;
        stats.freed.count += u64::from(whole);
    }

    fn page_end(&self, addr: u64, len: u64) -> u64 {
        addr.saturating_add(len.div_ceil(self.page_size) * self.page_size)
    }

    /// `mmap` (`header` says which process and thread, and when) mapped `size` bytes at `addr`.
    pub fn mapped(&mut self, header: &EventHeader, addr: u64, size: u64, site: SiteId) {
        let end = self.page_end(addr, size);
        self.count_allocation(site, end - addr);
        self.map(header, addr, end, site);
    }

    fn map(&mut self, header: &EventHeader, start: u64, end: u64, site: SiteId) {
        let piece = Piece {
            start,
            end,
            ts_ns: header.ts_ns,
            site,
        };
        let replaced = self.regions.insert(header.pid, piece);
        self.count_removed(&replaced);
    }

    fn count_removed(&mut self, removed: &Removed) {
        for piece in &removed.pieces {
            self.count_release(piece.site, piece.bytes(), false);
        }
        for &site in &removed.whole {
            self.stats_mut(site).freed.count += 1;
        }
    }

    /// `munmap(addr, len)`, or `mremap` releasing its old range on entry.
    pub fn unmapped(&mut self, pid: u32, tid: u32, func: AllocFn, addr: u64, len: u64) {
        let end = self.page_end(addr, len);
        let removed = self.regions.remove(pid, addr, end);
        if func == AllocFn::Mremap {
            self.remap_released.insert(tid, (pid, removed.pieces));
        } else {
            self.count_removed(&removed);
        }
    }

    /// `mremap` returned: the range it released now lives at `addr` with `len` bytes, keeping the site and age
    /// of what it moved; a range alloctrace never saw mapped becomes the mremap's own. `addr` 0: it failed, and
    /// the old range is restored.
    pub fn remapped(&mut self, header: &EventHeader, addr: u64, len: u64, site: SiteId) {
        let (pid, released) = self.remap_released.remove(&header.tid).unwrap_or_default();
        if addr == 0 {
            for piece in released {
                self.regions.insert(pid, piece);
            }
            return;
        }
        let end = self.page_end(addr, len);
        let old_len: u64 = released.iter().map(Piece::bytes).sum();
        let new_len = end - addr;
        let Some(first) = released.first().copied() else {
            self.count_allocation(site, new_len);
            self.map(header, addr, end, site);
            return;
        };
        let stats = self.stats_mut(first.site);
        if new_len > old_len {
            stats.allocated.bytes += new_len - old_len;
        } else {
            stats.freed.bytes += old_len - new_len;
        }
        let piece = Piece {
            start: addr,
            end,
            ts_ns: released
                .iter()
                .map(|p| p.ts_ns)
                .min()
                .unwrap_or(first.ts_ns),
            site: first.site,
        };
        let replaced = self.regions.insert(header.pid, piece);
        self.count_removed(&replaced);
    }

    /// The program break moved to `new_break`. Growth made outside the allocator is a range of `site` (`None`:
    /// the allocator moved it, for blocks already counted); shrinking releases what lay above the new break.
    pub fn break_moved(&mut self, header: &EventHeader, new_break: u64, site: Option<SiteId>) {
        let Some(old) = self.breaks.insert(header.pid, new_break) else {
            return;
        };
        if let Some(site) = site.filter(|_| new_break > old) {
            self.count_allocation(site, new_break - old);
            self.map(header, old, new_break, site);
        } else if new_break < old {
            let removed = self.regions.remove(header.pid, new_break, old);
            self.count_removed(&removed);
        }
    }

    /// Where the break is, when alloctrace attaches to a running process.
    pub fn set_break(&mut self, pid: u32, at: u64) {
        self.breaks.insert(pid, at);
    }

    /// The process replaced its image: everything it mapped is gone with its address space (its heap blocks
    /// leave the kernel's table).
    pub fn exec(&mut self, pid: u32) {
        self.regions.clear(pid);
        self.breaks.remove(&pid);
    }

    pub fn stats(&self, site: SiteId) -> Option<&SiteStats> {
        self.heap.stats.get(&site).or_else(|| self.stats.get(site))
    }

    /// Every site that allocated anything, with its statistics.
    pub fn sites(&self) -> impl Iterator<Item = (SiteId, &SiteStats)> {
        let mapping = self.stats.iter().enumerate();
        self.heap
            .stats
            .iter()
            .map(|(&site, stats)| (site, stats))
            .chain(mapping)
            .filter(|(_, s)| s.allocated.count > 0)
    }

    /// Every outstanding block and mapped piece.
    pub fn objects(&self) -> impl Iterator<Item = LiveObject> + '_ {
        let pieces = self.regions.iter().map(|(pid, p)| LiveObject {
            pid,
            addr: p.start,
            size: p.bytes(),
            ts_ns: p.ts_ns,
            site: p.site,
            weight: (1.0, p.bytes()),
        });
        self.heap.blocks.iter().copied().chain(pieces)
    }

    /// Outstanding bytes per process: mapped pieces, and heap blocks as `heap` (the kernel's site counters)
    /// gives them.
    pub fn live_bytes_by_pid(&self, heap: &[(SiteKey, SiteCounters)]) -> HashMap<u32, u64> {
        let mut live: HashMap<u32, u64> = HashMap::new();
        for (pid, piece) in self.regions.iter() {
            *live.entry(pid).or_default() += piece.bytes();
        }
        for (key, counters) in heap {
            *live.entry(key.tgid).or_default() += counters
                .allocated_bytes
                .saturating_sub(counters.freed_bytes);
        }
        live
    }

    /// Outstanding memory per site, counting only what was allocated at or before `born_by_ns`; `window` is the
    /// trace's `[start, end]`, split in quarters for [`Live::born_by_quarter`].
    pub fn live_by_site(&self, born_by_ns: u64, window: (u64, u64)) -> HashMap<SiteId, Live> {
        let (start, end) = window;
        let quarter = (end.saturating_sub(start) / 4).max(1);
        let mut live: HashMap<SiteId, Live> = HashMap::new();
        let mut blocks: HashMap<SiteId, f64> = HashMap::new();
        for object in self.objects().filter(|o| o.ts_ns <= born_by_ns) {
            let entry = live.entry(object.site).or_insert(Live {
                oldest_ns: u64::MAX,
                ..Live::default()
            });
            entry.bytes += object.weight.1;
            *blocks.entry(object.site).or_default() += object.weight.0;
            entry.oldest_ns = entry.oldest_ns.min(object.ts_ns);
            let q = (object.ts_ns.saturating_sub(start) / quarter).min(3) as usize;
            entry.born_by_quarter[q] += 1;
        }
        for (site, blocks) in blocks {
            if let Some(entry) = live.get_mut(&site) {
                entry.count = blocks.round() as u64;
            }
        }
        live
    }
}

#[cfg(test)]
mod tests;
