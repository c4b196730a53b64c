//! The ledger's rules, on synthetic events.

use super::*;
use AllocFn::{Calloc, Malloc, Mremap, Munmap};

const PID: u32 = 10;
const TID: u32 = 11;
const PAGE: u64 = 4096;

fn at(pid: u32, tid: u32, ts_ns: u64) -> EventHeader {
    EventHeader {
        pid,
        tid,
        ts_ns,
        ..EventHeader::default()
    }
}

fn ledger() -> Ledger {
    Ledger::with_page_size(PAGE)
}

fn live(l: &Ledger, site: SiteId) -> (u64, u64) {
    l.live_by_site(u64::MAX, (0, 100))
        .get(&site)
        .map_or((0, 0), |l| (l.bytes, l.count))
}

fn stats(l: &Ledger, site: SiteId) -> (Totals, Totals) {
    let s = l.stats(site).unwrap();
    (s.allocated, s.freed)
}

fn totals(bytes: u64, count: u64) -> Totals {
    Totals { bytes, count }
}

/// Kernel tables holding `blocks` of one process, as `(func, stack, addr, size, ts)`, with each site's
/// counters: everything it allocated (`allocated`, as `(stack, count, bytes)`) and freed.
fn tables(blocks: &[(AllocFn, u64, u64, u64, u64)], allocated: &[(u64, u64, u64)]) -> HeapTables {
    let key = |func: AllocFn, stack_id| SiteKey {
        tgid: PID,
        func: func as u32,
        stack_id,
    };
    let mut tables = HeapTables {
        blocks: blocks
            .iter()
            .map(|&(func, stack_id, addr, size, ts_ns)| {
                let block = LiveBlock {
                    size,
                    stack_id,
                    ts_ns,
                    func: func as u32,
                    _pad: 0,
                };
                let key = LiveKey {
                    tgid: PID,
                    _pad: 0,
                    addr,
                };
                (key, block)
            })
            .collect(),
        ..HeapTables::default()
    };
    for &(stack_id, count, bytes) in allocated {
        let live: Vec<_> = blocks.iter().filter(|b| b.1 == stack_id).collect();
        let live_bytes: u64 = live.iter().map(|b| b.3).sum();
        let counters = SiteCounters {
            allocated_count: count * COUNT_SCALE,
            allocated_bytes: bytes,
            freed_count: (count - live.len() as u64) * COUNT_SCALE,
            freed_bytes: bytes - live_bytes,
            smallest: 1,
            largest: bytes,
        };
        tables.sites.push((key(Malloc, stack_id), counters));
        let size_key = SizeKey {
            site: key(Malloc, stack_id),
            size_class: 100,
        };
        tables.sizes.push((size_key, count));
    }
    tables
}

/// Sites numbered by their stack id.
fn by_stack(key: &SiteKey) -> SiteId {
    key.stack_id as SiteId
}

#[test]
fn the_heap_comes_from_the_kernel_tables_and_replaces_the_last_snapshot() {
    let mut l = ledger();
    let exact = Sampling::exact();
    let blocks = [(Malloc, 0, 0x1000, 100, 1), (Calloc, 1, 0x2000, 300, 2)];
    l.set_heap(&tables(&blocks, &[(0, 3, 500)]), &exact, by_stack);
    assert_eq!(live(&l, 0), (100, 1));
    assert_eq!(live(&l, 1), (300, 1));
    assert_eq!(stats(&l, 0), (totals(500, 3), totals(400, 2)));
    let s = l.stats(0).unwrap();
    assert_eq!((s.sizes.len(), s.smallest, s.largest), (3, 1, 500));
    l.set_heap(&tables(&blocks[..1], &[]), &exact, by_stack);
    assert_eq!((live(&l, 0), live(&l, 1)), ((100, 1), (0, 0)));
    assert!(l.stats(1).is_none());
}

#[test]
fn sampled_blocks_count_for_what_they_stand_for() {
    let mut l = ledger();
    let sampling = Sampling::every(1 << 20);
    let blocks = [
        (Malloc, 0, 0x1000, 1 << 10, 1),
        (Malloc, 0, 0x2000, 64 << 20, 2),
    ];
    l.set_heap(&tables(&blocks, &[]), &sampling, by_stack);
    let small = sampling.weigh(1 << 10);
    let (bytes, count) = live(&l, 0);
    assert_eq!(bytes, small.1 + (64 << 20));
    assert_eq!(count, (small.0 + 1.0).round() as u64);
    // A kibibyte sampled every mebibyte stands for about a mebibyte.
    assert!(
        (1 << 20..(1 << 20) + (1 << 10)).contains(&small.1),
        "{small:?}"
    );
}

#[test]
fn exec_drops_the_old_image() {
    let mut l = ledger();
    l.mapped(&at(PID, TID, 1), 0x10000, PAGE, 1);
    l.mapped(&at(PID + 1, TID, 1), 0x10000, PAGE, 0);
    l.exec(PID);
    assert_eq!((live(&l, 0), live(&l, 1)), ((PAGE, 1), (0, 0)));
}

#[test]
fn young_blocks_are_left_out_and_birth_quarters_are_counted() {
    let mut l = ledger();
    let blocks = [
        (Malloc, 0, 0x1000, 1, 10),
        (Malloc, 0, 0x2000, 2, 60),
        (Malloc, 0, 0x3000, 4, 90),
    ];
    l.set_heap(&tables(&blocks, &[(0, 3, 7)]), &Sampling::exact(), by_stack);
    let by_70 = l.live_by_site(70, (0, 100));
    assert_eq!(by_70[&0].bytes, 3);
    assert_eq!(by_70[&0].count, 2);
    assert_eq!(by_70[&0].oldest_ns, 10);
    assert_eq!(
        l.live_by_site(u64::MAX, (0, 100))[&0].born_by_quarter,
        [1, 0, 1, 1]
    );
    assert!(l.live_by_site(5, (0, 100)).is_empty());
}

#[test]
fn mmap_is_counted_in_pages_and_partial_munmap_is_exact() {
    let mut l = ledger();
    // 3 pages and a bit: 4 pages mapped.
    l.mapped(&at(PID, TID, 1), 0x10000, 3 * PAGE + 1, 0);
    assert_eq!(live(&l, 0), (4 * PAGE, 1));
    // A page out of the middle: two pieces remain.
    l.unmapped(PID, TID, Munmap, 0x10000 + PAGE, PAGE);
    assert_eq!(live(&l, 0), (3 * PAGE, 2));
    // The first page, with a length that is not a page multiple.
    l.unmapped(PID, TID, Munmap, 0x10000, 10);
    assert_eq!(live(&l, 0), (2 * PAGE, 1));
    assert_eq!(stats(&l, 0), (totals(4 * PAGE, 1), totals(2 * PAGE, 1)));
    // A munmap of memory alloctrace never saw mapped (an allocator's) changes nothing.
    l.unmapped(PID, TID, Munmap, 0x90000, PAGE);
    assert_eq!(live(&l, 0), (2 * PAGE, 1));
}

#[test]
fn mremap_moves_grows_and_restores() {
    let mut l = ledger();
    l.mapped(&at(PID, TID, 1), 0x10000, 2 * PAGE, 0);
    // Grown and moved: the range keeps its site and its age.
    l.unmapped(PID, TID, Mremap, 0x10000, 2 * PAGE);
    l.remapped(&at(PID, TID, 5), 0x40000, 5 * PAGE, 9);
    assert_eq!(live(&l, 0), (5 * PAGE, 1));
    assert_eq!(l.live_by_site(u64::MAX, (0, 100))[&0].oldest_ns, 1);
    assert_eq!(stats(&l, 0).0, totals(5 * PAGE, 1));
    // Failed: the old range is restored.
    l.unmapped(PID, TID, Mremap, 0x40000, 5 * PAGE);
    l.remapped(&at(PID, TID, 6), 0, 9 * PAGE, 9);
    assert_eq!(live(&l, 0), (5 * PAGE, 1));
    // Shrunk in place.
    l.unmapped(PID, TID, Mremap, 0x40000, 5 * PAGE);
    l.remapped(&at(PID, TID, 7), 0x40000, PAGE, 9);
    assert_eq!(live(&l, 0), (PAGE, 1));
    assert_eq!(stats(&l, 0).1, totals(4 * PAGE, 0));
    // A range never seen mapped becomes the mremap's own.
    l.unmapped(PID, TID, Mremap, 0x80000, PAGE);
    l.remapped(&at(PID, TID, 8), 0x90000, 2 * PAGE, 9);
    assert_eq!(live(&l, 9), (2 * PAGE, 1));
}

#[test]
fn brk_growth_outside_the_allocator_is_a_range_and_shrinking_releases_it() {
    let mut l = ledger();
    // The first move only says where the break is.
    l.break_moved(&at(PID, TID, 1), 0x5000, Some(0));
    // The allocator's growth belongs to its blocks.
    l.break_moved(&at(PID, TID, 2), 0x25000, None);
    assert_eq!(live(&l, 0), (0, 0));
    // sbrk(1000) by the program itself.
    l.break_moved(&at(PID, TID, 3), 0x25000 + 1000, Some(1));
    assert_eq!(live(&l, 1), (1000, 1));
    // sbrk(-400).
    l.break_moved(&at(PID, TID, 4), 0x25000 + 600, Some(1));
    assert_eq!(live(&l, 1), (600, 1));
    assert_eq!(stats(&l, 1), (totals(1000, 1), totals(400, 0)));
    // The program break of an attached process, from its maps.
    l.set_break(PID + 1, 0x9000);
    l.break_moved(&at(PID + 1, TID, 5), 0xa000, Some(2));
    assert_eq!(live(&l, 2), (0x1000, 1));
}

#[test]
fn objects_list_blocks_and_pieces() {
    let mut l = ledger();
    let blocks = [(Malloc, 0, 0x1000, 100, 1)];
    l.set_heap(
        &tables(&blocks, &[(0, 1, 100)]),
        &Sampling::exact(),
        by_stack,
    );
    l.mapped(&at(PID, TID, 2), 0x10000, PAGE, 1);
    let mut objects: Vec<_> = l.objects().map(|o| (o.addr, o.size, o.site)).collect();
    objects.sort();
    assert_eq!(objects, [(0x1000, 100, 0), (0x10000, PAGE, 1)]);
}

#[test]
fn sites_are_interned() {
    let mut sites = Sites::default();
    let site = |pid| Site {
        pid,
        func: Malloc,
        frames: Arc::from([]),
    };
    let a = sites.intern(site(1));
    assert_eq!(sites.intern(site(1)), a);
    let b = sites.intern(site(2));
    assert_ne!(a, b);
    assert_eq!(sites.get(b).pid, 2);
}
