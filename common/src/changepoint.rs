//! Change points in a series of run figures (e.g. the medians of one row's runs over time), and hosts
//! whose figures sit apart from their peers'.
//!
//! Change points: CUSUM with a bootstrap (Taylor's change-point analysis) and binary segmentation.
//! For a segment, `Sᵢ = Σ_{j≤i} (xⱼ − x̄)`; its range `max S − min S` is compared with the ranges of
//! [`SHUFFLES`] seeded shuffles of the same values. When at least 95 % of the shuffles have a smaller
//! range, the change is placed after the point of largest `|Sᵢ|`, kept if the two sides' means differ
//! by at least `min_shift` (relative), and both sides are searched again.
//!
//! Outliers among hosts: a host is noisy when its figure is more than 3 scaled MADs (median absolute
//! deviation × 1.4826) **and** more than 20 % away from the median of its peers: the platform's other
//! hosts, so the host judged does not pull the yardstick towards itself (with three hosts, a median
//! and MAD that include it would need it 4.4 times as far out as its two peers are apart).

use rand::SeedableRng;
use rand::seq::SliceRandom;

/// Shuffles per significance test.
pub const SHUFFLES: usize = 1000;

/// Confidence a change needs.
pub const CONFIDENCE: f64 = 0.95;

/// Fewest points a segment needs on each side of a change.
const MIN_SEGMENT: usize = 2;

fn range_of_cusum(x: &[f64]) -> (f64, usize) {
    let mean = x.iter().sum::<f64>() / x.len() as f64;
    let (mut s, mut lo, mut hi) = (0.0, 0.0f64, 0.0f64);
    let (mut best, mut at) = (0.0f64, 0);
    for (i, v) in x.iter().enumerate() {
        s += v - mean;
        lo = lo.min(s);
        hi = hi.max(s);
        if s.abs() > best {
            best = s.abs();
            at = i;
        }
    }
    (hi - lo, at)
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

fn search(
    x: &[f64],
    offset: usize,
    min_shift: f64,
    rng: &mut rand::rngs::StdRng,
    out: &mut Vec<usize>,
) {
    if x.len() < 2 * MIN_SEGMENT {
        return;
    }
    let (range, at) = range_of_cusum(x);
    if range <= 0.0 {
        return;
    }
    let mut shuffled = x.to_vec();
    let below = (0..SHUFFLES)
        .filter(|_| {
            shuffled.shuffle(rng);
            range_of_cusum(&shuffled).0 < range
        })
        .count();
    if (below as f64) / (SHUFFLES as f64) < CONFIDENCE {
        return;
    }
    // The change comes after the point of largest |S|: the new level starts at at + 1.
    let split = (at + 1).clamp(MIN_SEGMENT, x.len() - MIN_SEGMENT);
    let (left, right) = x.split_at(split);
    let (a, b) = (mean(left), mean(right));
    if a == 0.0 || ((b - a) / a).abs() < min_shift {
        return;
    }
    search(left, offset, min_shift, rng, out);
    out.push(offset + split);
    search(right, offset + split, min_shift, rng, out);
}

/// Indices where a new level starts in `x` (sorted), by CUSUM with a seeded bootstrap and binary
/// segmentation; changes smaller than `min_shift` (relative to the earlier level) are not reported.
pub fn change_points(x: &[f64], min_shift: f64) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6368_616e_6765);
    let mut out = Vec::new();
    search(x, 0, min_shift, &mut rng, &mut out);
    out.sort_unstable();
    out
}

/// Median of `v` (not empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Scale that makes the MAD estimate a normal distribution's standard deviation.
pub const MAD_SCALE: f64 = 1.4826;

/// How far a host must sit from its peers' median, in scaled MADs.
pub const OUTLIER_MADS: f64 = 3.0;

/// ... and relatively.
pub const OUTLIER_RATIO: f64 = 0.20;

/// The median and scaled MAD of every value but the `i`th.
fn peers(values: &[f64], i: usize) -> (f64, f64) {
    let others: Vec<f64> = values
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != i)
        .map(|(_, v)| *v)
        .collect();
    let m = median(&others);
    let deviations: Vec<f64> = others.iter().map(|v| (v - m).abs()).collect();
    (m, median(&deviations) * MAD_SCALE)
}

/// Each value over the median of the others (1 with fewer than two values).
pub fn peer_ratios(values: &[f64]) -> Vec<f64> {
    if values.len() < 2 {
        return vec![1.0; values.len()];
    }
    (0..values.len())
        .map(|i| {
            let (m, _) = peers(values, i);
            if m > 0.0 { values[i] / m } else { 1.0 }
        })
        .collect()
}

/// For each value, `Some(ratio to its peers' median)` when it sits more than [`OUTLIER_MADS`] scaled
/// MADs and [`OUTLIER_RATIO`] from the median of the others; needs three values or more.
pub fn outliers(values: &[f64]) -> Vec<Option<f64>> {
    if values.len() < 3 {
        return vec![None; values.len()];
    }
    (0..values.len())
        .map(|i| {
            let (m, mad) = peers(values, i);
            let d = (values[i] - m).abs();
            (m > 0.0 && d > OUTLIER_MADS * mad && d / m > OUTLIER_RATIO).then(|| values[i] / m)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    fn noisy(levels: &[(usize, f64)], sd: f64, seed: u64) -> Vec<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut out = Vec::new();
        for &(n, level) in levels {
            let d = Normal::new(level, sd * level).unwrap();
            out.extend((0..n).map(|_| d.sample(&mut rng)));
        }
        out
    }

    #[test]
    fn a_step_is_found_where_it_happened_and_a_flat_series_has_none() {
        for seed in 0..20 {
            let step = noisy(&[(12, 1.0), (12, 1.3)], 0.03, seed);
            assert_eq!(change_points(&step, 0.10), [12], "seed {seed}: {step:?}");
            let flat = noisy(&[(24, 1.0)], 0.03, seed);
            let found = change_points(&flat, 0.10);
            assert!(found.is_empty(), "seed {seed}: {found:?} in {flat:?}");
        }
        // Two steps, both found.
        let two = noisy(&[(10, 1.0), (10, 1.5), (10, 0.8)], 0.02, 7);
        assert_eq!(change_points(&two, 0.10), [10, 20]);
        // Too short to say anything.
        assert!(change_points(&[1.0, 2.0, 3.0], 0.05).is_empty());
    }

    #[test]
    fn one_slow_host_of_three_is_an_outlier_and_a_spread_fleet_has_none() {
        let got = outliers(&[1.0, 1.02, 2.0]);
        assert_eq!(got[..2], [None, None]);
        assert!((got[2].unwrap() - 2.0 / 1.01).abs() < 1e-9, "{got:?}");
        // Peers 20 % apart, one host at half their level: flagged (a median and MAD that included it
        // would not flag it).
        let got = outliers(&[30_000.0, 25_000.0, 15_000.0]);
        assert_eq!(got[..2], [None, None]);
        assert!((got[2].unwrap() - 15.0 / 27.5).abs() < 1e-9, "{got:?}");
        assert!((peer_ratios(&[1.0, 2.0])[1] - 2.0).abs() < 1e-12);
        // 15 % away: beyond 3 MAD but not 20 %.
        assert!(outliers(&[1.0, 1.0, 1.0, 1.15]).iter().all(Option::is_none));
        // Spread evenly: nobody stands out.
        assert!(outliers(&[1.0, 1.3, 1.6, 1.9]).iter().all(Option::is_none));
        assert!(
            outliers(&[1.0, 5.0]).iter().all(Option::is_none),
            "two hosts have no majority"
        );
    }
}
