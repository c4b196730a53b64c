//! The watch tier's ledger: which stack made each sampled page of a process resident, and which of those
//! pages were released since. A sampled write fault stands for `weight` faults (the sampling period), so one
//! sampled page counts `weight` pages of its stack. `munmap`, `madvise` (DONTNEED, FREE, REMOVE), `mremap`
//! and a shrinking `brk` release the sampled pages in their range (a moving `mremap` carries them to the new
//! range); `exec` and exit drop the process. Pure bookkeeping, unit-tested with synthetic events; bounded by a
//! cap on sampled pages, past which new samples are refused and counted.

use std::collections::{BTreeMap, HashMap, HashSet};

/// Bytes of a page: x86-64's base page, the one a user page fault maps (transparent huge pages, which map
/// 2 MiB at a fault, are counted as one page: an underestimate, said in the README).
pub const PAGE_SIZE: u64 = 4096;

/// One sampled page: the stack that touched it first, and how many pages it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sample {
    stack_id: u64,
    weight: u64,
}

/// What a stack (or a process) made resident and what of it was released since, in pages (weighted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Residency {
    pub resident_pages: u64,
    pub released_pages: u64,
}

impl Residency {
    pub fn resident_bytes(&self) -> u64 {
        self.resident_pages * PAGE_SIZE
    }

    pub fn released_bytes(&self) -> u64 {
        self.released_pages * PAGE_SIZE
    }
}

/// One process's sampled pages.
#[derive(Default)]
struct Pages {
    /// Page number (address / [`PAGE_SIZE`]) → its sample.
    pages: BTreeMap<u64, Sample>,
    by_stack: HashMap<u64, Residency>,
    total: Residency,
    /// The program break, once a `brk` (or the start) said where it is.
    break_at: Option<u64>,
    /// Pages an `mremap` took from its old range on entry, per thread, until it returns: (old start page,
    /// the pages by page number).
    moving: HashMap<u32, (u64, Vec<(u64, Sample)>)>,
}

impl Pages {
    fn release(&mut self, sample: Sample) {
        let stack = self.by_stack.entry(sample.stack_id).or_default();
        for residency in [stack, &mut self.total] {
            residency.resident_pages -= sample.weight;
            residency.released_pages += sample.weight;
        }
    }

    fn add(&mut self, page: u64, sample: Sample) -> Option<Sample> {
        let replaced = self.pages.insert(page, sample);
        for residency in [
            self.by_stack.entry(sample.stack_id).or_default(),
            &mut self.total,
        ] {
            residency.resident_pages += sample.weight;
        }
        replaced
    }

    /// Takes the sampled pages of `[start, end)` (page numbers) out of the table.
    fn take(&mut self, start: u64, end: u64) -> Vec<(u64, Sample)> {
        if start >= end {
            return Vec::new();
        }
        let taken: Vec<(u64, Sample)> = self
            .pages
            .range(start..end)
            .map(|(&page, &sample)| (page, sample))
            .collect();
        for (page, _) in &taken {
            self.pages.remove(page);
        }
        taken
    }
}

/// Every watched process's sampled pages.
pub struct Resident {
    processes: HashMap<u32, Pages>,
    /// Sampled pages held over all processes, and the most allowed.
    held: usize,
    max_samples: usize,
    /// Samples refused because the table was full.
    refused: u64,
}

/// The page numbers `[addr, addr + len)` covers, whole pages (the kernel rounds a range out to pages).
fn page_range(addr: u64, len: u64) -> (u64, u64) {
    let start = addr / PAGE_SIZE;
    let end = addr.saturating_add(len).div_ceil(PAGE_SIZE);
    (start, end)
}

impl Resident {
    pub fn new(max_samples: usize) -> Self {
        Self {
            processes: HashMap::new(),
            held: 0,
            max_samples,
            refused: 0,
        }
    }

    /// A sampled write fault at `addr`, standing for `weight` faults, by stack `stack_id`. A page already held
    /// was released unseen in between (reclaimed after `MADV_FREE`, swapped out): its old sample is released.
    pub fn fault(&mut self, pid: u32, addr: u64, stack_id: u64, weight: u32) {
        let page = addr / PAGE_SIZE;
        let pages = self.processes.entry(pid).or_default();
        if !pages.pages.contains_key(&page) {
            if self.held >= self.max_samples {
                self.refused += 1;
                return;
            }
            self.held += 1;
        }
        let sample = Sample {
            stack_id,
            weight: u64::from(weight.max(1)),
        };
        if let Some(old) = pages.add(page, sample) {
            pages.release(old);
        }
    }

    /// `munmap`, `madvise` releasing pages, or a fresh mapping over `[addr, addr + len)`: its sampled pages are
    /// released.
    pub fn released(&mut self, pid: u32, addr: u64, len: u64) {
        let Some(pages) = self.processes.get_mut(&pid) else {
            return;
        };
        let (start, end) = page_range(addr, len);
        let taken = pages.take(start, end);
        self.held -= taken.len();
        for (_, sample) in taken {
            pages.release(sample);
        }
    }

    /// `mremap` entered on thread `tid`: the old range's pages go with it until it returns.
    pub fn remap_started(&mut self, pid: u32, tid: u32, old_addr: u64, old_len: u64) {
        let Some(pages) = self.processes.get_mut(&pid) else {
            return;
        };
        let (start, end) = page_range(old_addr, old_len);
        let taken = pages.take(start, end);
        pages.moving.insert(tid, (start, taken));
    }

    /// `mremap` returned `new_addr` (0: it failed, and the old range stays) with `new_len` bytes: the pages it
    /// carried keep their stacks at their offsets in the new range; those past its end are released.
    pub fn remapped(&mut self, pid: u32, tid: u32, new_addr: u64, new_len: u64) {
        let Some(pages) = self.processes.get_mut(&pid) else {
            return;
        };
        let Some((old_start, moved)) = pages.moving.remove(&tid) else {
            return;
        };
        let (new_start, new_end) = if new_addr == 0 {
            (old_start, u64::MAX)
        } else {
            page_range(new_addr, new_len)
        };
        for (page, sample) in moved {
            let at = new_start + (page - old_start);
            if at < new_end {
                // Still counted for its stack: it only left the page table. A page it lands on is replaced.
                if let Some(old) = pages.pages.insert(at, sample) {
                    self.held -= 1;
                    pages.release(old);
                }
            } else {
                self.held -= 1;
                pages.release(sample);
            }
        }
    }

    /// The program break moved to `new_break`: the sampled pages above it, if it shrank, are released.
    pub fn break_moved(&mut self, pid: u32, new_break: u64) {
        let pages = self.processes.entry(pid).or_default();
        let old = pages.break_at.replace(new_break);
        if let Some(old) = old.filter(|&old| new_break < old) {
            self.released(pid, new_break, old - new_break);
        }
    }

    /// Where the break is when watching starts.
    pub fn set_break(&mut self, pid: u32, at: u64) {
        self.processes.entry(pid).or_default().break_at = Some(at);
    }

    /// The process replaced its image or exited: its address space, and every page in it, is gone.
    pub fn forget(&mut self, pid: u32) {
        if let Some(pages) = self.processes.remove(&pid) {
            self.held -=
                pages.pages.len() + pages.moving.values().map(|m| m.1.len()).sum::<usize>();
        }
    }

    /// What process `pid` holds now, and released since it was first seen.
    pub fn process(&self, pid: u32) -> Residency {
        self.processes
            .get(&pid)
            .map(|p| p.total)
            .unwrap_or_default()
    }

    /// Every process's residency.
    pub fn processes(&self) -> impl Iterator<Item = (u32, Residency)> + '_ {
        self.processes
            .iter()
            .map(|(&pid, pages)| (pid, pages.total))
    }

    /// The stacks of process `pid` that hold pages, most first (ties by stack id, so the order is stable).
    pub fn top_stacks(&self, pid: u32) -> Vec<(u64, Residency)> {
        let Some(pages) = self.processes.get(&pid) else {
            return Vec::new();
        };
        let mut stacks: Vec<(u64, Residency)> = pages
            .by_stack
            .iter()
            .filter(|(_, r)| r.resident_pages > 0)
            .map(|(&id, &r)| (id, r))
            .collect();
        stacks.sort_by_key(|&(id, r)| (std::cmp::Reverse(r.resident_pages), id));
        stacks
    }

    /// The stacks that hold sampled pages in some process (pages an `mremap` is moving included).
    pub fn held_stacks(&self) -> HashSet<u64> {
        self.processes
            .values()
            .flat_map(|pages| pages.by_stack.iter())
            .filter(|(_, residency)| residency.resident_pages > 0)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Samples refused because [`Resident::new`]'s cap was reached.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Sampled pages held now, over all processes.
    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 0x7f00_0000_0000;

    /// Samples every page of `[addr, addr + len)` once in `weight`, as if the kernel had sampled evenly.
    fn touch(resident: &mut Resident, pid: u32, addr: u64, len: u64, stack: u64, weight: u32) {
        let mut page = addr;
        while page < addr + len {
            resident.fault(pid, page, stack, weight);
            page += PAGE_SIZE * u64::from(weight);
        }
    }

    #[test]
    fn a_sample_counts_its_weight_in_pages() {
        let mut resident = Resident::new(1 << 20);
        touch(&mut resident, 1, BASE, 64 * MIB, 7, 16);
        touch(&mut resident, 1, BASE + 64 * MIB, 16 * MIB, 8, 16);
        assert_eq!(resident.process(1).resident_bytes(), 80 * MIB);
        assert_eq!(
            resident.top_stacks(1),
            [
                (
                    7,
                    Residency {
                        resident_pages: 64 * MIB / PAGE_SIZE,
                        released_pages: 0
                    }
                ),
                (
                    8,
                    Residency {
                        resident_pages: 16 * MIB / PAGE_SIZE,
                        released_pages: 0
                    }
                ),
            ]
        );
        assert_eq!(resident.held(), (80 * MIB / PAGE_SIZE / 16) as usize);
    }

    #[test]
    fn munmap_and_madvise_release_the_pages_of_their_range() {
        let mut resident = Resident::new(1 << 20);
        touch(&mut resident, 1, BASE, 8 * MIB, 7, 1);
        // Half a page past the end still covers the whole page.
        resident.released(1, BASE, 2 * MIB - 100);
        resident.released(1, BASE + 6 * MIB, 2 * MIB);
        let stack = resident.top_stacks(1)[0].1;
        assert_eq!(stack.resident_bytes(), 4 * MIB);
        assert_eq!(stack.released_bytes(), 4 * MIB);
        assert_eq!(resident.process(1).released_bytes(), 4 * MIB);
        // Another process's range is no business of this one's.
        resident.released(2, BASE, 8 * MIB);
        assert_eq!(resident.process(1).resident_bytes(), 4 * MIB);
    }

    #[test]
    fn mremap_moves_pages_and_releases_what_it_cut() {
        let mut resident = Resident::new(1 << 20);
        touch(&mut resident, 1, BASE, 4 * MIB, 7, 1);
        // Moved and shrunk to 3 MiB: the last MiB is released, the rest keeps its stack at the new place.
        resident.remap_started(1, 11, BASE, 4 * MIB);
        assert_eq!(resident.process(1).resident_bytes(), 4 * MIB, "in flight");
        resident.remapped(1, 11, BASE + 100 * MIB, 3 * MIB);
        assert_eq!(resident.process(1).resident_bytes(), 3 * MIB);
        resident.released(1, BASE, 4 * MIB);
        assert_eq!(resident.process(1).resident_bytes(), 3 * MIB, "moved away");
        resident.released(1, BASE + 100 * MIB, MIB);
        assert_eq!(resident.process(1).resident_bytes(), 2 * MIB);
        // A failed mremap leaves the pages where they were.
        resident.remap_started(1, 11, BASE + 101 * MIB, 2 * MIB);
        resident.remapped(1, 11, 0, 8 * MIB);
        resident.released(1, BASE + 101 * MIB, 2 * MIB);
        assert_eq!(resident.process(1).resident_bytes(), 0);
        assert_eq!(resident.held(), 0);
    }

    #[test]
    fn a_shrinking_break_releases_the_pages_above_it() {
        let mut resident = Resident::new(1 << 20);
        resident.set_break(1, BASE + 4 * MIB);
        touch(&mut resident, 1, BASE, 4 * MIB, 7, 1);
        resident.break_moved(1, BASE + 8 * MIB);
        assert_eq!(resident.process(1).resident_bytes(), 4 * MIB, "growth");
        resident.break_moved(1, BASE + MIB);
        assert_eq!(resident.process(1).resident_bytes(), MIB);
    }

    #[test]
    fn a_page_faulted_again_changes_hands() {
        let mut resident = Resident::new(1 << 20);
        resident.fault(1, BASE, 7, 16);
        resident.fault(1, BASE + 10, 8, 16);
        assert_eq!(resident.process(1).resident_pages, 16);
        assert_eq!(
            resident.top_stacks(1),
            [(
                8,
                Residency {
                    resident_pages: 16,
                    released_pages: 0
                }
            )]
        );
        assert_eq!(resident.held(), 1);
    }

    #[test]
    fn exec_and_exit_drop_the_process() {
        let mut resident = Resident::new(1 << 20);
        touch(&mut resident, 1, BASE, MIB, 7, 1);
        touch(&mut resident, 2, BASE, MIB, 7, 1);
        resident.remap_started(2, 3, BASE, MIB / 2);
        resident.forget(1);
        resident.forget(2);
        assert_eq!(resident.process(1), Residency::default());
        assert!(resident.top_stacks(2).is_empty());
        assert_eq!((resident.held(), resident.processes().count()), (0, 0));
    }

    #[test]
    fn past_the_cap_new_samples_are_refused_and_counted() {
        let mut resident = Resident::new(4);
        touch(&mut resident, 1, BASE, 6 * PAGE_SIZE, 7, 1);
        assert_eq!((resident.held(), resident.refused()), (4, 2));
        // A page already held is still re-sampled: it takes no new room.
        resident.fault(1, BASE, 8, 1);
        assert_eq!(resident.refused(), 2);
        resident.released(1, BASE, PAGE_SIZE);
        resident.fault(1, BASE + 5 * PAGE_SIZE, 9, 1);
        assert_eq!((resident.held(), resident.refused()), (4, 2));
    }
}
