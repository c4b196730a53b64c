//! The ledger of outstanding memory, fed with decoded events: heap blocks by address, mapped ranges by extent,
//! and per-site statistics (totals, frees, a size histogram). Pure bookkeeping, no kernel, so every rule —
//! realloc's and mremap's edge cases, partial munmap, brk, exec — is unit-tested with synthetic events.
//!
//! It lives in userspace: the kernel streams each allocation and release through the ring buffer and keeps no
//! per-block state, so the table's size is bounded by memory, not by a map's fixed capacity, and it answers
//! questions about ages and growth that in-kernel counters cannot.

pub mod regions;

use std::collections::{HashMap, hash_map::Entry};

use hdrhistogram::Histogram;
use regions::{Piece, Regions, Removed};
use tracer_common::{AllocFn, EventHeader};

use crate::procs::Frame;

/// Index of a site in a [`Sites`] table.
pub type SiteId = usize;

/// Where memory comes from: a process, the function or system call that took it, and the stack that called it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Site {
    pub pid: u32,
    pub func: AllocFn,
    /// Innermost first; empty when the stack was lost.
    pub frames: Vec<Frame>,
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
}

/// Bytes and how many blocks (or ranges) they came in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub bytes: u64,
    pub count: u64,
}

/// Everything one site did during the trace.
#[derive(Clone, Debug)]
pub struct SiteStats {
    pub allocated: Totals,
    pub freed: Totals,
    /// Sizes of what it allocated, to 2 significant digits: a site's histogram stays within a few KiB.
    pub sizes: Histogram<u64>,
    /// The exact extremes, which the histogram rounds.
    pub smallest: u64,
    pub largest: u64,
}

impl Default for SiteStats {
    fn default() -> Self {
        Self {
            allocated: Totals::default(),
            freed: Totals::default(),
            sizes: Histogram::new(2).expect("2 significant digits are valid"),
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveObject {
    pub pid: u32,
    pub addr: u64,
    pub size: u64,
    pub ts_ns: u64,
    pub site: SiteId,
}

/// A block's key: (pid, address).
type BlockKey = (u32, u64);

/// An outstanding heap block. Kept small: a million live blocks are a million of these. With the address as key
/// an entry takes 32 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Block {
    size: u64,
    ts_ns: u64,
    site: u32,
}

impl Block {
    fn site(&self) -> SiteId {
        self.site as SiteId
    }
}

/// Outstanding memory, and per-site statistics.
pub struct Ledger {
    /// Heap blocks by process, then address.
    blocks: HashMap<u32, HashMap<u64, Block>>,
    regions: Regions,
    stats: Vec<SiteStats>,
    /// Blocks a `realloc` released on entry, by thread, until it returns: restored if it fails.
    realloc_released: HashMap<u32, Option<(BlockKey, Block)>>,
    /// Pieces an `mremap` released on entry, by thread, until it returns: moved, or restored if it fails.
    remap_released: HashMap<u32, (u32, Vec<Piece>)>,
    /// The program break of each process, once known.
    breaks: HashMap<u32, u64>,
    page_size: u64,
    /// Frees of blocks the ledger never saw: allocated before tracing began, or whose record was lost.
    pub unknown_frees: u64,
    /// Blocks found released only because their address was handed out again.
    pub unseen_frees: u64,
}

impl Default for Ledger {
    fn default() -> Self {
        // SAFETY: sysconf has no preconditions.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Self::with_page_size(u64::try_from(page_size).unwrap_or(4096))
    }
}

impl Ledger {
    pub fn with_page_size(page_size: u64) -> Self {
        Self {
            blocks: HashMap::new(),
            regions: Regions::default(),
            stats: Vec::new(),
            realloc_released: HashMap::new(),
            remap_released: HashMap::new(),
            breaks: HashMap::new(),
            page_size,
            unknown_frees: 0,
            unseen_frees: 0,
        }
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
        // The histogram grows to any u64 value a size can take: recording cannot fail.
        let _ = stats.sizes.record(size);
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

    /// An allocator call (`header` says which process and thread, and when) returned the block `addr` of `size`
    /// bytes, or `mmap` mapped `size` bytes at `addr`.
    pub fn allocated(
        &mut self,
        header: &EventHeader,
        func: AllocFn,
        addr: u64,
        size: u64,
        site: SiteId,
    ) {
        if func == AllocFn::Mmap {
            let end = self.page_end(addr, size);
            self.count_allocation(site, end - addr);
            self.map(header, addr, end, site);
            return;
        }
        if func.reallocates()
            && let Some(Some((_, old))) = self.realloc_released.remove(&header.tid)
        {
            // The call succeeded: the block it released is gone for good.
            self.count_release(old.site(), old.size, true);
        }
        self.count_allocation(site, size);
        let block = Block {
            size,
            ts_ns: header.ts_ns,
            site: u32::try_from(site).expect("fewer than 4 billion sites"),
        };
        if let Some(stale) = self
            .blocks
            .entry(header.pid)
            .or_default()
            .insert(addr, block)
        {
            // The allocator handed out an address the ledger still held: its free was never seen (an
            // unprobed release function, or a lost record). The old block is gone all the same.
            self.count_release(stale.site(), stale.size, true);
            self.unseen_frees += 1;
        }
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

    /// `realloc(p, size)` returned NULL: with `size > 0` it failed and `p` is still allocated; with `size == 0`
    /// it freed `p`.
    pub fn realloc_returned_null(&mut self, tid: u32, size: u64) {
        match self.realloc_released.remove(&tid) {
            Some(Some(((pid, addr), block))) if size != 0 => {
                self.blocks.entry(pid).or_default().insert(addr, block);
            }
            Some(Some((_, block))) => self.count_release(block.site(), block.size, true),
            _ => {}
        }
    }

    /// The heap block `addr` is being released: by `free`, or by `realloc` on entry.
    pub fn freed(&mut self, pid: u32, tid: u32, func: AllocFn, addr: u64) {
        let block = self
            .blocks
            .get_mut(&pid)
            .and_then(|blocks| blocks.remove(&addr));
        if block.is_none() {
            self.unknown_frees += 1;
        }
        if func.reallocates() {
            // Counted as released when realloc returns: it may fail and keep the block.
            self.realloc_released
                .insert(tid, block.map(|block| ((pid, addr), block)));
        } else if let Some(block) = block {
            self.count_release(block.site(), block.size, true);
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

    /// The process replaced its image: everything it had is gone with its address space.
    pub fn exec(&mut self, pid: u32) {
        self.blocks.remove(&pid);
        self.regions.clear(pid);
        self.breaks.remove(&pid);
    }

    pub fn stats(&self, site: SiteId) -> Option<&SiteStats> {
        self.stats.get(site)
    }

    /// Every site that allocated anything, with its statistics.
    pub fn sites(&self) -> impl Iterator<Item = (SiteId, &SiteStats)> {
        self.stats
            .iter()
            .enumerate()
            .filter(|(_, s)| s.allocated.count > 0)
    }

    /// Every outstanding block and mapped piece.
    pub fn objects(&self) -> impl Iterator<Item = LiveObject> + '_ {
        let blocks = self.blocks.iter().flat_map(|(&pid, blocks)| {
            blocks.iter().map(move |(&addr, b)| LiveObject {
                pid,
                addr,
                size: b.size,
                ts_ns: b.ts_ns,
                site: b.site(),
            })
        });
        let pieces = self.regions.iter().map(|(pid, p)| LiveObject {
            pid,
            addr: p.start,
            size: p.bytes(),
            ts_ns: p.ts_ns,
            site: p.site,
        });
        blocks.chain(pieces)
    }

    /// Outstanding bytes per process.
    pub fn live_bytes_by_pid(&self) -> HashMap<u32, u64> {
        let mut live: HashMap<u32, u64> = HashMap::new();
        for object in self.objects() {
            *live.entry(object.pid).or_default() += object.size;
        }
        live
    }

    /// Outstanding memory per site, counting only what was allocated at or before `born_by_ns`; `window` is the
    /// trace's `[start, end]`, split in quarters for [`Live::born_by_quarter`].
    pub fn live_by_site(&self, born_by_ns: u64, window: (u64, u64)) -> HashMap<SiteId, Live> {
        let (start, end) = window;
        let quarter = (end.saturating_sub(start) / 4).max(1);
        let mut live: HashMap<SiteId, Live> = HashMap::new();
        for object in self.objects().filter(|o| o.ts_ns <= born_by_ns) {
            let entry = live.entry(object.site).or_insert(Live {
                oldest_ns: u64::MAX,
                ..Live::default()
            });
            entry.bytes += object.size;
            entry.count += 1;
            entry.oldest_ns = entry.oldest_ns.min(object.ts_ns);
            let q = (object.ts_ns.saturating_sub(start) / quarter).min(3) as usize;
            entry.born_by_quarter[q] += 1;
        }
        live
    }
}

#[cfg(test)]
mod tests;
