//! The `leaks` report: sites ranked by the memory they still hold, each with its size histogram, rates and
//! verdict.

use std::collections::HashMap;

use serde::Serialize;

use super::{
    Group, GroupBy, Header, group, kind, stack,
    verdict::{self, Evidence, Verdict},
};
use crate::{
    aggregate::{SiteId, SiteStats},
    model::Trace,
    procs::{Frame, container::Container, debuginfo},
    sampling,
};

#[derive(Clone, Debug, Serialize)]
pub struct LeaksReport {
    #[serde(flatten)]
    pub header: Header,
    /// Only blocks at least this old count as live.
    pub min_age_s: f64,
    /// Outstanding memory in all sites (before `--top`).
    pub live_bytes: u64,
    pub live_count: u64,
    /// Sites listed before `--top` cut the list.
    pub site_count: usize,
    /// Allocated during the trace at every site, listed or not (a site that holds nothing and does not churn
    /// is not listed): with the frees, what the program asked of its allocator.
    pub allocated_bytes: u64,
    pub allocated_count: u64,
    /// The sites summed by process or container (`--group-by`); empty when grouped by stack.
    pub groups: Vec<Group>,
    pub sites: Vec<SiteReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SiteReport {
    pub pid: u32,
    /// The container of the process, `null` on the host.
    pub container: Option<Container>,
    /// The allocator function or system call.
    pub kind: &'static str,
    pub live_bytes: u64,
    /// One standard error of `live_bytes` when the trace was sampled (`null` when exact): the true value is
    /// within it about two times in three, within twice it 19 times in 20.
    pub live_bytes_error: Option<u64>,
    pub live_count: u64,
    pub total_bytes: u64,
    pub total_count: u64,
    pub freed_bytes: u64,
    pub freed_count: u64,
    pub alloc_rate_per_s: f64,
    pub free_rate_per_s: f64,
    pub oldest_age_s: f64,
    pub size_histogram: SizeHistogram,
    pub verdict: Verdict,
    pub verdict_reason: String,
    /// Innermost first.
    pub stack: Vec<Frame>,
}

/// Sizes a site allocated: exact extremes, percentiles to 2 significant digits (the low end of the histogram
/// bucket, so that sizes allocated again and again read exactly), and counts per power-of-two bucket (`le` is
/// the bucket's upper bound).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SizeHistogram {
    pub count: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub buckets: Vec<Bucket>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub le: u64,
    pub count: u64,
}

impl SizeHistogram {
    pub fn new(stats: &SiteStats) -> Self {
        if stats.sizes.is_empty() {
            return Self::default();
        }
        let h = &stats.sizes.histogram();
        let percentile = |q| {
            h.lowest_equivalent(h.value_at_quantile(q))
                .clamp(stats.smallest, stats.largest)
        };
        let buckets = h
            .iter_log(1, 2.0)
            .filter(|v| v.count_since_last_iteration() > 0)
            .map(|v| Bucket {
                le: v.value_iterated_to(),
                count: v.count_since_last_iteration(),
            })
            .collect();
        Self {
            count: h.len(),
            min: stats.smallest,
            p50: percentile(0.5),
            p90: percentile(0.9),
            p99: percentile(0.99),
            max: stats.largest,
            buckets,
        }
    }
}

pub struct LeaksOptions {
    pub min_age_ns: u64,
    pub min_size: u64,
    pub top: usize,
    pub group_by: GroupBy,
}

/// The report of `trace`, a pure function of it; `tracer_max_rss_bytes` is alloctrace's peak resident memory,
/// as the caller measured it. The stacks' source lines are named afterwards
/// ([`LeaksReport::name_source_lines`]): that reads the binaries' debug information.
pub fn build(trace: &Trace, options: &LeaksOptions, tracer_max_rss_bytes: u64) -> LeaksReport {
    let header = Header::new("leaks", trace, tracer_max_rss_bytes);
    let end = trace.window.1;
    let ns_to_s = |ns: u64| ns as f64 / 1e9;
    let live = trace
        .ledger
        .live_by_site(end.saturating_sub(options.min_age_ns), trace.window);
    // Verdicts look at every live block: --min-age only filters what the numbers count, or no survivor of the
    // window's last quarter could ever show growth.
    let all_live = trace.ledger.live_by_site(u64::MAX, trace.window);
    let mut lingering: HashMap<SiteId, (u64, f64)> = HashMap::new();
    let mut variance: HashMap<SiteId, f64> = HashMap::new();
    for object in trace.ledger.objects() {
        if object.ts_ns <= end.saturating_sub(options.min_age_ns) {
            *variance.entry(object.site).or_default() +=
                sampling::variance(object.size, object.weight.1);
        }
        let age = end.saturating_sub(object.ts_ns);
        if object.size >= options.min_size && age >= options.min_age_ns {
            let entry = lingering.entry(object.site).or_insert((0, 0.0));
            if object.size > entry.0 {
                *entry = (object.size, ns_to_s(age));
            }
        }
    }
    let duration = trace.duration_s.max(1e-9);
    let (allocated_bytes, allocated_count) = trace
        .ledger
        .sites()
        .fold((0, 0), |(bytes, count), (_, stats)| {
            (bytes + stats.allocated.bytes, count + stats.allocated.count)
        });
    let mut sites: Vec<SiteReport> = Vec::new();
    for (site, stats) in trace.ledger.sites() {
        let site_live = live.get(&site).copied().unwrap_or_default();
        let (verdict, verdict_reason) = verdict::judge(&Evidence {
            live: &all_live.get(&site).copied().unwrap_or_default(),
            stats,
            duration_s: trace.duration_s,
            lingering: lingering.get(&site).copied(),
        });
        // Sites that hold nothing matter only when they churn.
        if site_live.count == 0 && verdict != Verdict::Churn {
            continue;
        }
        let named = trace.sites.get(site);
        sites.push(SiteReport {
            pid: named.pid,
            container: header.container(named.pid),
            kind: kind(named),
            live_bytes: site_live.bytes,
            live_bytes_error: (!trace.sampling.is_exact())
                .then(|| variance.get(&site).map_or(0, |v| v.sqrt().round() as u64)),
            live_count: site_live.count,
            total_bytes: stats.allocated.bytes,
            total_count: stats.allocated.count,
            freed_bytes: stats.freed.bytes,
            freed_count: stats.freed.count,
            alloc_rate_per_s: stats.allocated.count as f64 / duration,
            free_rate_per_s: stats.freed.count as f64 / duration,
            oldest_age_s: if site_live.count == 0 {
                0.0
            } else {
                ns_to_s(end.saturating_sub(site_live.oldest_ns))
            },
            size_histogram: SizeHistogram::new(stats),
            verdict,
            verdict_reason,
            stack: stack(trace, site),
        });
    }
    // Most live bytes first; ties broken so that the order never depends on hashing.
    sites.sort_by(|a, b| {
        (
            b.live_bytes,
            b.live_count,
            b.total_count,
            a.pid,
            a.kind,
            &a.stack,
        )
            .cmp(&(
                a.live_bytes,
                a.live_count,
                a.total_count,
                b.pid,
                b.kind,
                &b.stack,
            ))
    });
    let live_bytes = sites.iter().map(|s| s.live_bytes).sum();
    let live_count = sites.iter().map(|s| s.live_count).sum();
    let site_count = sites.len();
    let groups = group(
        &header,
        options.group_by,
        sites.iter().map(|s| (s.pid, s.live_bytes, s.live_count)),
    );
    sites.truncate(options.top);
    LeaksReport {
        groups,
        header,
        min_age_s: ns_to_s(options.min_age_ns),
        live_bytes,
        live_count,
        site_count,
        allocated_bytes,
        allocated_count,
        sites,
    }
}

impl LeaksReport {
    /// Gives the listed stacks' native frames their file and line, from the debug information of their
    /// binaries (read from disk, through the processes' roots).
    pub fn name_source_lines(&mut self) {
        debuginfo::resolve(self.sites.iter_mut().map(|s| &mut s.stack));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_summarizes_sizes_in_power_of_two_buckets() {
        let mut stats = SiteStats::default();
        for size in [1000, 1000, 1000, 64, 8 << 20] {
            stats.sizes.record(size);
            stats.smallest = stats.smallest.min(size);
            stats.largest = stats.largest.max(size);
        }
        let s = SizeHistogram::new(&stats);
        assert_eq!(
            (s.count, s.min, s.p50, s.p90, s.max),
            (5, 64, 1000, 8 << 20, 8 << 20)
        );
        let counts: Vec<(u64, u64)> = s.buckets.iter().map(|b| (b.le, b.count)).collect();
        assert_eq!(counts.iter().map(|c| c.1).sum::<u64>(), 5);
        assert!(counts.contains(&(1023, 3)), "{counts:?}");
        assert_eq!(
            SizeHistogram::new(&SiteStats::default()),
            SizeHistogram::default()
        );
    }
}
