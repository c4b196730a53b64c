//! What kind of problem a site is. The rules, in order (the first that holds wins):
//! - `leak`: the site keeps allocating and does not free. Its live blocks were born in at least three of the
//!   trace's four quarters, the last included (so its live count grew across the window), it still holds at
//!   least half of the blocks it allocated, and at least [`LEAK_MIN_BLOCKS`] of them.
//! - `lingering`: it holds a block of at least `--min-size` that is at least `--min-age` old.
//! - `churn`: it allocated at least [`CHURN_MIN_BLOCKS`] blocks, at least [`CHURN_MIN_RATE`] a second, and
//!   freed at least [`CHURN_MIN_FREED`] of them: flat live memory, busy allocator.
//! - `steady`: the rest.

use serde::Serialize;

use crate::aggregate::{Live, SiteStats};

/// Fewer live blocks than this are never called a leak: two or three survivors prove no trend.
pub const LEAK_MIN_BLOCKS: u64 = 4;
/// Blocks a site must allocate to be churn: one malloc and free in a short trace is no trend.
pub const CHURN_MIN_BLOCKS: u64 = 100;
/// Blocks a second a site must allocate to be churn.
pub const CHURN_MIN_RATE: f64 = 100.0;
/// Share of its blocks a churning site frees.
pub const CHURN_MIN_FREED: f64 = 0.9;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Leak,
    Lingering,
    Churn,
    Steady,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Self::Leak => "leak",
            Self::Lingering => "lingering",
            Self::Churn => "churn",
            Self::Steady => "steady",
        }
    }
}

/// What the rules look at for one site.
pub struct Evidence<'a> {
    pub live: &'a Live,
    pub stats: &'a SiteStats,
    pub duration_s: f64,
    /// The largest live block at least `--min-size` large and `--min-age` old: (size, age in seconds).
    pub lingering: Option<(u64, f64)>,
}

/// The verdict, and a one-line reason in plain words.
pub fn judge(e: &Evidence<'_>) -> (Verdict, String) {
    let allocated = e.stats.allocated.count;
    let quarters_with_survivors = e.live.born_by_quarter.iter().filter(|&&n| n > 0).count();
    let survives_to_the_end = e.live.born_by_quarter[3] > 0;
    if e.live.count >= LEAK_MIN_BLOCKS
        && quarters_with_survivors >= 3
        && survives_to_the_end
        && e.live.count * 2 >= allocated
    {
        let kept = e.live.count as f64 * 100.0 / allocated.max(1) as f64;
        return (
            Verdict::Leak,
            format!(
                "{} blocks allocated all through the trace are still live ({kept:.0}% of {allocated} never freed)",
                e.live.count
            ),
        );
    }
    if let Some((size, age)) = e.lingering {
        return (
            Verdict::Lingering,
            format!("a block of {size} bytes has been alive for {age:.1} s"),
        );
    }
    let rate = allocated as f64 / e.duration_s.max(1e-9);
    let freed = e.stats.freed.count as f64 / allocated.max(1) as f64;
    if allocated >= CHURN_MIN_BLOCKS && rate >= CHURN_MIN_RATE && freed >= CHURN_MIN_FREED {
        return (
            Verdict::Churn,
            format!(
                "allocates {rate:.0} blocks/s and frees {:.0}% of them",
                freed * 100.0
            ),
        );
    }
    (
        Verdict::Steady,
        "no growth, no large old block, no churn".to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Totals;

    fn stats(allocated: u64, freed: u64) -> SiteStats {
        SiteStats {
            allocated: Totals {
                bytes: allocated * 100,
                count: allocated,
            },
            freed: Totals {
                bytes: freed * 100,
                count: freed,
            },
            ..SiteStats::default()
        }
    }

    fn live(count: u64, born_by_quarter: [u64; 4]) -> Live {
        Live {
            bytes: count * 100,
            count,
            oldest_ns: 0,
            born_by_quarter,
        }
    }

    fn verdict(live: &Live, stats: &SiteStats, lingering: Option<(u64, f64)>) -> Verdict {
        judge(&Evidence {
            live,
            stats,
            duration_s: 10.0,
            lingering,
        })
        .0
    }

    #[test]
    fn growth_across_the_window_is_a_leak() {
        let s = stats(40, 0);
        assert_eq!(
            verdict(&live(40, [10, 10, 10, 10]), &s, None),
            Verdict::Leak
        );
        // A burst at the start that stays is not growth.
        assert_eq!(verdict(&live(40, [40, 0, 0, 0]), &s, None), Verdict::Steady);
        // Growth that stopped before the end is not growing now.
        assert_eq!(
            verdict(&live(40, [10, 15, 15, 0]), &s, None),
            Verdict::Steady
        );
        // Most of it freed: a cache at its bound, not a leak.
        assert_eq!(
            verdict(&live(8, [2, 2, 2, 2]), &stats(40, 32), None),
            Verdict::Steady
        );
        // Too few blocks to call.
        assert_eq!(
            verdict(&live(3, [1, 1, 0, 1]), &stats(3, 0), None),
            Verdict::Steady
        );
    }

    #[test]
    fn an_old_large_block_lingers() {
        let (v, reason) = judge(&Evidence {
            live: &live(1, [1, 0, 0, 0]),
            stats: &stats(1, 0),
            duration_s: 10.0,
            lingering: Some((8 << 20, 9.5)),
        });
        assert_eq!(v, Verdict::Lingering);
        assert_eq!(reason, "a block of 8388608 bytes has been alive for 9.5 s");
    }

    #[test]
    fn busy_and_flat_is_churn() {
        let (v, reason) = judge(&Evidence {
            live: &live(1, [0, 0, 0, 1]),
            stats: &stats(10_000, 9_999),
            duration_s: 10.0,
            lingering: None,
        });
        assert_eq!(v, Verdict::Churn);
        assert_eq!(reason, "allocates 1000 blocks/s and frees 100% of them");
        // A handful of blocks in a short trace is no churn, whatever the rate.
        assert_eq!(
            verdict(&live(0, [0; 4]), &stats(10, 10), None),
            Verdict::Steady
        );
        // Slow and flat is steady.
        assert_eq!(
            verdict(&live(1, [0, 0, 0, 1]), &stats(50, 49), None),
            Verdict::Steady
        );
    }
}
