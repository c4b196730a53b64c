//! Sampling allocations by bytes (`--sample-every`), as tcmalloc, jemalloc and the OpenTelemetry profiler do:
//! the gap between samples is drawn from an exponential distribution with the interval as its mean, so a block
//! of `s` bytes is sampled with probability `p = 1 - e^(-s/interval)` whatever the sizes around it, and counts
//! for `1/p` blocks and `s/p` bytes. The estimates are then unbiased, with a variance this module computes.

use tracer_common::{
    COUNT_SCALE, SAMPLE_INTERVAL_ENTRIES, SAMPLE_WEIGHT_ENTRIES, SAMPLE_WEIGHT_STEPS, sample_weight,
};

/// How allocations are recorded: every one (`interval` 0), or sampled every `interval` bytes on average.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub interval: u64,
    /// `x / (1 - e^-x)` at `x = i / SAMPLE_WEIGHT_STEPS`, in units of `1 / COUNT_SCALE`.
    pub weights: [u64; SAMPLE_WEIGHT_ENTRIES],
}

impl Sampling {
    pub fn exact() -> Self {
        Self::every(0)
    }

    pub fn every(interval: u64) -> Self {
        let weights = std::array::from_fn(|i| {
            let x = i as f64 / SAMPLE_WEIGHT_STEPS as f64;
            let factor = if i == 0 { 1.0 } else { x / -(-x).exp_m1() };
            (factor * COUNT_SCALE as f64).round() as u64
        });
        Self { interval, weights }
    }

    pub fn is_exact(&self) -> bool {
        self.interval == 0
    }

    /// The gaps between samples the kernel draws from, one per equal slice of the exponential distribution:
    /// the mean of the slice, so that the table's mean is the interval.
    pub fn intervals(&self) -> [u64; SAMPLE_INTERVAL_ENTRIES] {
        // The integral of the exponential's quantile function -ln(1-q), up to q.
        let integral = |q: f64| {
            if q >= 1.0 {
                1.0
            } else {
                (1.0 - q) * (1.0 - q).ln() + q
            }
        };
        let slices = SAMPLE_INTERVAL_ENTRIES as f64;
        std::array::from_fn(|i| {
            let (low, high) = (i as f64 / slices, (i + 1) as f64 / slices);
            let mean = (integral(high) - integral(low)) * slices;
            (mean * self.interval as f64).round().max(1.0) as u64
        })
    }

    /// `(blocks, bytes)` a recorded block of `size` bytes stands for (1 block of `size` bytes when exact).
    pub fn weigh(&self, size: u64) -> (f64, u64) {
        let (count, bytes) = sample_weight(size, self.interval, &self.weights);
        (count as f64 / COUNT_SCALE as f64, bytes)
    }
}

/// The variance a recorded block of `size` bytes that stands for `weight` bytes adds to an estimate of live
/// bytes: `s²(1-p)/p²` with `p = size / weight`; 0 for a block that stands for itself.
pub fn variance(size: u64, weight: u64) -> f64 {
    if weight <= size {
        return 0.0;
    }
    let p = size as f64 / weight as f64;
    (weight as f64).powi(2) * (1.0 - p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_traces_weigh_each_block_as_itself() {
        let exact = Sampling::exact();
        assert_eq!(exact.weigh(1000), (1.0, 1000));
        assert_eq!(variance(1000, 1000), 0.0);
    }

    #[test]
    fn sampled_blocks_stand_for_one_over_their_probability() {
        let sampling = Sampling::every(512 * 1024);
        for size in [16u64, 1000, 64 * 1024, 512 * 1024, 3 << 20] {
            let p = 1.0 - (-(size as f64) / sampling.interval as f64).exp();
            let (blocks, bytes) = sampling.weigh(size);
            let want = size as f64 / p;
            assert!(
                (bytes as f64 - want).abs() / want < 0.002,
                "{size}: {bytes} vs {want}"
            );
            assert!(
                (blocks - 1.0 / p).abs() / (1.0 / p) < 0.002,
                "{size}: {blocks}"
            );
        }
        // Far past the interval a block is sampled with certainty and weighs itself.
        assert_eq!(sampling.weigh(64 << 20), (1.0, 64 << 20));
    }

    #[test]
    fn intervals_average_the_interval() {
        let sampling = Sampling::every(512 * 1024);
        let intervals = sampling.intervals();
        let mean = intervals.iter().sum::<u64>() as f64 / intervals.len() as f64;
        assert!(
            (mean / sampling.interval as f64 - 1.0).abs() < 1e-4,
            "{mean}"
        );
    }
}
