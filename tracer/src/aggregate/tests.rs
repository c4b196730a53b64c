//! The ledger's rules, on synthetic events.

use super::*;
use AllocFn::{Calloc, Free, Malloc, Mmap, Mremap, Munmap, Realloc};

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

#[test]
fn malloc_and_free_balance() {
    let mut l = ledger();
    l.allocated(&at(PID, TID, 1), Malloc, 0x1000, 100, 0);
    l.allocated(&at(PID, TID, 2), Calloc, 0x2000, 300, 0);
    l.allocated(&at(PID, TID, 3), Malloc, 0x3000, 50, 1);
    l.freed(PID, TID, Free, 0x1000);
    assert_eq!(live(&l, 0), (300, 1));
    assert_eq!(live(&l, 1), (50, 1));
    assert_eq!(stats(&l, 0), (totals(400, 2), totals(100, 1)));
    l.freed(PID, TID, Free, 0x9999);
    assert_eq!(l.unknown_frees, 1);
    let s = l.stats(0).unwrap();
    assert_eq!((s.sizes.len(), s.smallest, s.largest), (2, 100, 300));
}

#[test]
fn same_address_in_two_processes_is_two_blocks() {
    let mut l = ledger();
    l.allocated(&at(1, 1, 1), Malloc, 0x1000, 10, 0);
    l.allocated(&at(2, 2, 1), Malloc, 0x1000, 20, 1);
    l.freed(1, 1, Free, 0x1000);
    assert_eq!((live(&l, 0), live(&l, 1)), ((0, 0), (20, 1)));
}

#[test]
fn realloc_moves_the_block_to_its_own_site() {
    let mut l = ledger();
    l.allocated(&at(PID, TID, 1), Malloc, 0x1000, 100, 0);
    l.freed(PID, TID, Realloc, 0x1000);
    l.allocated(&at(PID, TID, 2), Realloc, 0x5000, 200, 1);
    assert_eq!((live(&l, 0), live(&l, 1)), ((0, 0), (200, 1)));
    assert_eq!(stats(&l, 0).1, totals(100, 1));
    // Grown in place: same address, new size.
    l.freed(PID, TID, Realloc, 0x5000);
    l.allocated(&at(PID, TID, 3), Realloc, 0x5000, 400, 1);
    assert_eq!(live(&l, 1), (400, 1));
    assert_eq!(stats(&l, 1).0, totals(600, 2));
}

#[test]
fn realloc_of_null_is_malloc() {
    let mut l = ledger();
    l.allocated(&at(PID, TID, 1), Realloc, 0x1000, 64, 0);
    assert_eq!(live(&l, 0), (64, 1));
}

#[test]
fn failed_realloc_keeps_the_block_and_realloc_to_zero_frees_it() {
    let mut l = ledger();
    l.allocated(&at(PID, TID, 1), Malloc, 0x1000, 100, 0);
    l.freed(PID, TID, Realloc, 0x1000);
    l.realloc_returned_null(TID, 1 << 40);
    assert_eq!(live(&l, 0), (100, 1));
    assert_eq!(stats(&l, 0).1, totals(0, 0));
    l.freed(PID, TID, Realloc, 0x1000);
    l.realloc_returned_null(TID, 0);
    assert_eq!(live(&l, 0), (0, 0));
    assert_eq!(stats(&l, 0).1, totals(100, 1));
}

#[test]
fn exec_drops_the_old_image() {
    let mut l = ledger();
    l.allocated(&at(PID, TID, 1), Malloc, 0x1000, 100, 0);
    l.allocated(&at(PID, TID, 1), Mmap, 0x10000, PAGE, 1);
    l.allocated(&at(PID + 1, TID, 1), Malloc, 0x1000, 100, 0);
    l.exec(PID);
    assert_eq!((live(&l, 0), live(&l, 1)), ((100, 1), (0, 0)));
}

#[test]
fn young_blocks_are_left_out_and_birth_quarters_are_counted() {
    let mut l = ledger();
    l.allocated(&at(PID, TID, 10), Malloc, 0x1000, 1, 0);
    l.allocated(&at(PID, TID, 60), Malloc, 0x2000, 2, 0);
    l.allocated(&at(PID, TID, 90), Malloc, 0x3000, 4, 0);
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
    l.allocated(&at(PID, TID, 1), Mmap, 0x10000, 3 * PAGE + 1, 0);
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
    l.allocated(&at(PID, TID, 1), Mmap, 0x10000, 2 * PAGE, 0);
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
    l.allocated(&at(PID, TID, 1), Malloc, 0x1000, 100, 0);
    l.allocated(&at(PID, TID, 2), Mmap, 0x10000, PAGE, 1);
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
        frames: vec![],
    };
    let a = sites.intern(site(1));
    assert_eq!(sites.intern(site(1)), a);
    let b = sites.intern(site(2));
    assert_ne!(a, b);
    assert_eq!(sites.get(b).pid, 2);
}
