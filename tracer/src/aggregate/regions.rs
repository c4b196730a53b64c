//! Address ranges mapped outside any allocator call — anonymous `mmap`, `mremap`, and growth of the program
//! break — per process, split exactly as `munmap` and `mremap` cut them.

use std::collections::{BTreeMap, HashMap};

use super::SiteId;

/// A mapped piece: `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub end: u64,
    pub ts_ns: u64,
    pub site: SiteId,
}

impl Piece {
    pub fn bytes(&self) -> u64 {
        self.end - self.start
    }
}

/// What removing a range took away.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// The pieces (or parts of pieces) inside the range.
    pub pieces: Vec<Piece>,
    /// Sites and how many of their pieces disappeared entirely (not just shrank).
    pub whole: Vec<SiteId>,
}

/// Mapped pieces per process, keyed by start address.
#[derive(Default)]
pub struct Regions {
    pieces: HashMap<u32, BTreeMap<u64, Piece>>,
}

impl Regions {
    /// Maps `[start, end)`, replacing whatever was recorded there (`MAP_FIXED` over an old mapping).
    pub fn insert(&mut self, pid: u32, piece: Piece) -> Removed {
        let removed = self.remove(pid, piece.start, piece.end);
        self.pieces
            .entry(pid)
            .or_default()
            .insert(piece.start, piece);
        removed
    }

    /// Unmaps `[start, end)`: pieces inside it go, pieces across its edges are cut.
    pub fn remove(&mut self, pid: u32, start: u64, end: u64) -> Removed {
        let mut removed = Removed::default();
        let Some(map) = self.pieces.get_mut(&pid) else {
            return removed;
        };
        // A piece starting before `start` may reach into the range.
        let first = map
            .range(..start)
            .next_back()
            .filter(|(_, p)| p.end > start)
            .map(|(&k, _)| k);
        let keys: Vec<u64> = first
            .into_iter()
            .chain(map.range(start..end).map(|(&k, _)| k))
            .collect();
        for key in keys {
            let piece = map.remove(&key).expect("key just listed");
            let cut_start = piece.start.max(start);
            let cut_end = piece.end.min(end);
            if piece.start < cut_start {
                map.insert(
                    piece.start,
                    Piece {
                        end: cut_start,
                        ..piece
                    },
                );
            }
            if cut_end < piece.end {
                map.insert(
                    cut_end,
                    Piece {
                        start: cut_end,
                        ..piece
                    },
                );
            }
            if piece.start >= start && piece.end <= end {
                removed.whole.push(piece.site);
            }
            removed.pieces.push(Piece {
                start: cut_start,
                end: cut_end,
                ..piece
            });
        }
        removed
    }

    /// The process's address space is gone (exec).
    pub fn clear(&mut self, pid: u32) {
        self.pieces.remove(&pid);
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &Piece)> {
        self.pieces
            .iter()
            .flat_map(|(&pid, map)| map.values().map(move |p| (pid, p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(start: u64, end: u64, site: SiteId) -> Piece {
        Piece {
            start,
            end,
            ts_ns: 7,
            site,
        }
    }

    fn pieces(r: &Regions) -> Vec<(u64, u64, SiteId)> {
        let mut all: Vec<_> = r.iter().map(|(_, p)| (p.start, p.end, p.site)).collect();
        all.sort();
        all
    }

    #[test]
    fn a_hole_in_the_middle_splits_a_mapping() {
        let mut r = Regions::default();
        r.insert(1, piece(0x1000, 0x5000, 0));
        let removed = r.remove(1, 0x2000, 0x3000);
        assert_eq!(pieces(&r), [(0x1000, 0x2000, 0), (0x3000, 0x5000, 0)]);
        assert_eq!(removed.pieces, [piece(0x2000, 0x3000, 0)]);
        assert!(removed.whole.is_empty());
    }

    #[test]
    fn a_range_across_several_mappings_trims_and_removes() {
        let mut r = Regions::default();
        r.insert(1, piece(0x1000, 0x3000, 0));
        r.insert(1, piece(0x3000, 0x4000, 1));
        r.insert(1, piece(0x4000, 0x6000, 2));
        let removed = r.remove(1, 0x2000, 0x5000);
        assert_eq!(pieces(&r), [(0x1000, 0x2000, 0), (0x5000, 0x6000, 2)]);
        assert_eq!(removed.whole, [1]);
        let bytes: u64 = removed.pieces.iter().map(Piece::bytes).sum();
        assert_eq!(bytes, 0x3000);
    }

    #[test]
    fn other_processes_and_unmapped_ranges_are_untouched() {
        let mut r = Regions::default();
        r.insert(1, piece(0x1000, 0x2000, 0));
        r.insert(2, piece(0x1000, 0x2000, 1));
        assert_eq!(r.remove(1, 0x8000, 0x9000), Removed::default());
        r.remove(2, 0, u64::MAX);
        assert_eq!(pieces(&r), [(0x1000, 0x2000, 0)]);
        r.clear(1);
        assert!(pieces(&r).is_empty());
    }

    #[test]
    fn mapping_over_a_mapping_replaces_it() {
        let mut r = Regions::default();
        r.insert(1, piece(0x1000, 0x4000, 0));
        let replaced = r.insert(1, piece(0x2000, 0x3000, 1));
        assert_eq!(
            pieces(&r),
            [
                (0x1000, 0x2000, 0),
                (0x2000, 0x3000, 1),
                (0x3000, 0x4000, 0)
            ]
        );
        assert_eq!(replaced.pieces, [piece(0x2000, 0x3000, 0)]);
    }
}
