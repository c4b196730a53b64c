//! The outstanding-allocation table and per-site totals, fed with decoded events: pure bookkeeping, no kernel,
//! so every rule (realloc's edge cases, exec, ages) is unit-tested with synthetic events.
//!
//! It lives in userspace: the kernel streams each allocation and free through the ring buffer and keeps no
//! per-block state, so the table's size is bounded by memory, not by a map's fixed capacity, and it can answer
//! questions about ages and growth that in-kernel counters cannot.

use std::collections::{HashMap, hash_map::Entry};

use tracer_common::{AllocFn, EventHeader};

use crate::procs::Frame;

/// Index of a site in a [`Sites`] table.
pub type SiteId = usize;

/// Where allocations come from: a process, the allocator function called, and the stack that called it.
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

/// Everything ever allocated from one site.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub bytes: u64,
    pub count: u64,
}

/// A site's outstanding blocks at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Live {
    pub bytes: u64,
    pub count: u64,
    /// Allocation time of the oldest outstanding block, in `bpf_ktime_get_ns` time.
    pub oldest_ns: u64,
}

/// A block's key: (pid, address).
type BlockKey = (u32, u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Block {
    size: u64,
    ts_ns: u64,
    site: SiteId,
}

/// Outstanding blocks by (pid, address), and per-site totals.
#[derive(Default)]
pub struct LiveTable {
    blocks: HashMap<BlockKey, Block>,
    totals: Vec<Totals>,
    /// Blocks a `realloc` released on entry, by thread, until it returns: restored if it fails.
    realloc_released: HashMap<u32, Option<(BlockKey, Block)>>,
    /// Frees of blocks the table never saw: allocated before tracing began, or whose record was lost.
    pub unknown_frees: u64,
}

impl LiveTable {
    /// An allocator call (`header` says which process and thread, and when) returned the block `addr` of `size`
    /// bytes.
    pub fn allocated(
        &mut self,
        header: &EventHeader,
        func: AllocFn,
        addr: u64,
        size: u64,
        site: SiteId,
    ) {
        if func.reallocates() {
            // The released block is gone for good: the call succeeded.
            self.realloc_released.remove(&header.tid);
        }
        if self.totals.len() <= site {
            self.totals.resize(site + 1, Totals::default());
        }
        self.totals[site].bytes += size;
        self.totals[site].count += 1;
        let block = Block {
            size,
            ts_ns: header.ts_ns,
            site,
        };
        self.blocks.insert((header.pid, addr), block);
    }

    /// `realloc(p, size)` returned NULL: with `size > 0` it failed and `p` is still allocated; with `size == 0`
    /// it freed `p`.
    pub fn realloc_returned_null(&mut self, tid: u32, size: u64) {
        if let Some(Some((key, block))) = self.realloc_released.remove(&tid)
            && size != 0
        {
            self.blocks.insert(key, block);
        }
    }

    /// `addr` is being released: by `free`, or by `realloc` on entry.
    pub fn freed(&mut self, pid: u32, tid: u32, func: AllocFn, addr: u64) {
        let block = self.blocks.remove(&(pid, addr));
        if block.is_none() {
            self.unknown_frees += 1;
        }
        if func.reallocates() {
            self.realloc_released
                .insert(tid, block.map(|block| ((pid, addr), block)));
        }
    }

    /// The process replaced its image: every block it had is gone with its address space.
    pub fn exec(&mut self, pid: u32) {
        self.blocks.retain(|&(block_pid, _), _| block_pid != pid);
    }

    pub fn totals(&self, site: SiteId) -> Totals {
        self.totals.get(site).copied().unwrap_or_default()
    }

    /// Outstanding blocks per site, counting only those allocated at or before `born_by_ns`.
    pub fn live_by_site(&self, born_by_ns: u64) -> HashMap<SiteId, Live> {
        let mut live: HashMap<SiteId, Live> = HashMap::new();
        for block in self.blocks.values().filter(|b| b.ts_ns <= born_by_ns) {
            let entry = live.entry(block.site).or_insert(Live {
                oldest_ns: u64::MAX,
                ..Live::default()
            });
            entry.bytes += block.size;
            entry.count += 1;
            entry.oldest_ns = entry.oldest_ns.min(block.ts_ns);
        }
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AllocFn::{Calloc, Free, Malloc, Realloc};

    const PID: u32 = 10;
    const TID: u32 = 11;

    fn at(pid: u32, tid: u32, ts_ns: u64) -> EventHeader {
        EventHeader {
            pid,
            tid,
            ts_ns,
            ..EventHeader::default()
        }
    }

    fn live(table: &LiveTable, site: SiteId) -> (u64, u64) {
        table
            .live_by_site(u64::MAX)
            .get(&site)
            .map_or((0, 0), |l| (l.bytes, l.count))
    }

    #[test]
    fn malloc_and_free_balance() {
        let mut t = LiveTable::default();
        t.allocated(&at(PID, TID, 1), Malloc, 0x1000, 100, 0);
        t.allocated(&at(PID, TID, 2), Calloc, 0x2000, 300, 0);
        t.allocated(&at(PID, TID, 3), Malloc, 0x3000, 50, 1);
        t.freed(PID, TID, Free, 0x1000);
        assert_eq!(live(&t, 0), (300, 1));
        assert_eq!(live(&t, 1), (50, 1));
        assert_eq!(
            t.totals(0),
            Totals {
                bytes: 400,
                count: 2
            }
        );
        t.freed(PID, TID, Free, 0x9999);
        assert_eq!(t.unknown_frees, 1);
    }

    #[test]
    fn same_address_in_two_processes_is_two_blocks() {
        let mut t = LiveTable::default();
        t.allocated(&at(1, 1, 1), Malloc, 0x1000, 10, 0);
        t.allocated(&at(2, 2, 1), Malloc, 0x1000, 20, 1);
        t.freed(1, 1, Free, 0x1000);
        assert_eq!((live(&t, 0), live(&t, 1)), ((0, 0), (20, 1)));
    }

    #[test]
    fn realloc_moves_the_block_to_its_own_site() {
        let mut t = LiveTable::default();
        t.allocated(&at(PID, TID, 1), Malloc, 0x1000, 100, 0);
        t.freed(PID, TID, Realloc, 0x1000);
        t.allocated(&at(PID, TID, 2), Realloc, 0x5000, 200, 1);
        assert_eq!((live(&t, 0), live(&t, 1)), ((0, 0), (200, 1)));
        // Grown in place: same address, new size.
        t.freed(PID, TID, Realloc, 0x5000);
        t.allocated(&at(PID, TID, 3), Realloc, 0x5000, 400, 1);
        assert_eq!(live(&t, 1), (400, 1));
        assert_eq!(
            t.totals(1),
            Totals {
                bytes: 600,
                count: 2
            }
        );
    }

    #[test]
    fn realloc_of_null_is_malloc() {
        let mut t = LiveTable::default();
        t.allocated(&at(PID, TID, 1), Realloc, 0x1000, 64, 0);
        assert_eq!(live(&t, 0), (64, 1));
    }

    #[test]
    fn failed_realloc_keeps_the_block_and_realloc_to_zero_frees_it() {
        let mut t = LiveTable::default();
        t.allocated(&at(PID, TID, 1), Malloc, 0x1000, 100, 0);
        t.freed(PID, TID, Realloc, 0x1000);
        t.realloc_returned_null(TID, 1 << 40);
        assert_eq!(live(&t, 0), (100, 1));
        t.freed(PID, TID, Realloc, 0x1000);
        t.realloc_returned_null(TID, 0);
        assert_eq!((live(&t, 0), live(&t, 1)), ((0, 0), (0, 0)));
        assert!(t.live_by_site(u64::MAX).is_empty());
    }

    #[test]
    fn exec_drops_the_old_image() {
        let mut t = LiveTable::default();
        t.allocated(&at(PID, TID, 1), Malloc, 0x1000, 100, 0);
        t.allocated(&at(PID + 1, TID, 1), Malloc, 0x1000, 100, 0);
        t.exec(PID);
        assert_eq!(live(&t, 0), (100, 1));
    }

    #[test]
    fn young_blocks_are_left_out_and_the_oldest_is_kept() {
        let mut t = LiveTable::default();
        t.allocated(&at(PID, TID, 100), Malloc, 0x1000, 1, 0);
        t.allocated(&at(PID, TID, 200), Malloc, 0x2000, 2, 0);
        t.allocated(&at(PID, TID, 300), Malloc, 0x3000, 4, 0);
        let by_250 = t.live_by_site(250);
        assert_eq!(
            by_250[&0],
            Live {
                bytes: 3,
                count: 2,
                oldest_ns: 100
            }
        );
        assert!(t.live_by_site(50).is_empty());
    }

    #[test]
    fn sites_are_interned() {
        let mut sites = Sites::default();
        let site = |pid| Site {
            pid,
            func: Malloc,
            frames: vec![],
        };
        let a = sites.intern(site(1));
        assert_eq!(sites.intern(site(1)), a);
        let b = sites.intern(site(2));
        assert_ne!(a, b);
        assert_eq!(sites.get(b).pid, 2);
    }
}
