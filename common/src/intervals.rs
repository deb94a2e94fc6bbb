//! 95 % confidence intervals of the figures fleetbench ranks, one stated method each, and the spread
//! of repeated runs:
//!
//! - percentiles: order statistics of the merged histogram ([`crate::hist::quantile_ci`]);
//! - throughput: a circular block bootstrap over a run's telemetry windows ([`bootstrap_throughput`];
//!   blocks of consecutive windows keep the drift between neighbours), computed when the run finishes
//!   and stored with its summary, so window retention changes nothing; runs pooled into one row
//!   combine as a weighted mean with a between-run term ([`pool_throughput`]);
//! - cost per million: the throughput interval carried through `cost / throughput`;
//! - accuracy: the Wilson score interval over the rows evaluated ([`wilson`]);
//! - run-to-run spread: the coefficient of variation of per-run figures ([`cv`]).

use rand::{Rng, SeedableRng};

/// z for a two-sided 95 % interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// Resamples drawn by [`bootstrap_throughput`].
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// Seed of [`bootstrap_throughput`]: the same windows always give the same interval.
const BOOTSTRAP_SEED: u64 = 0x666c_6565_7462_6e63;

/// 95 % percentile-bootstrap interval of a run's throughput, `Σ samples / Σ seconds`, resampling its
/// windows (`(samples, seconds)`) with replacement in circular blocks of `round(n^⅓)` consecutive
/// windows, so windows that drift together are drawn together. `None` with fewer than two windows
/// that have time.
pub fn bootstrap_throughput(windows: &[(u64, f64)]) -> Option<(f64, f64)> {
    let w: Vec<(f64, f64)> = windows
        .iter()
        .filter(|(_, s)| *s > 0.0)
        .map(|&(n, s)| (n as f64, s))
        .collect();
    if w.len() < 2 {
        return None;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(BOOTSTRAP_SEED);
    let len = w.len();
    let block = ((len as f64).cbrt().round() as usize).max(1);
    let mut draws: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            let (mut n, mut s) = (0.0, 0.0);
            let mut taken = 0;
            while taken < len {
                let start = rng.random_range(0..len);
                for k in 0..block.min(len - taken) {
                    let (wn, ws) = w[(start + k) % len];
                    n += wn;
                    s += ws;
                }
                taken += block;
            }
            n / s
        })
        .collect();
    draws.sort_by(f64::total_cmp);
    let last = (draws.len() - 1) as f64;
    let at = |q: f64| draws[(q * last).round() as usize];
    Some((at(0.025), at(0.975)))
}

/// One run of a pooled row: throughput, its interval, seconds timed.
pub type PooledRun = (f64, Option<(f64, f64)>, f64);

/// Interval of the throughput of pooled runs, `Σ samples / Σ seconds = Σ wᵢ·thrᵢ` with
/// `wᵢ = secondsᵢ / Σ seconds`: each run's interval read as a normal one (half-width / z is its
/// standard error `seᵢ`), plus a between-run variance `τ²` for runs that disagree by more than their
/// own errors explain (`τ² = max(0, k/(k−1)·Σ wᵢ(thrᵢ − mean)² − Σ wᵢ·seᵢ²)`, a random-effects
/// estimate), so `var = Σ wᵢ²(seᵢ² + τ²)`. Parts are `(throughput, interval, seconds)`; `None` when any
/// part has no interval.
pub fn pool_throughput(parts: &[PooledRun]) -> Option<(f64, f64)> {
    let total: f64 = parts.iter().map(|p| p.2).sum();
    if parts.is_empty() || total <= 0.0 {
        return None;
    }
    if parts.len() == 1 {
        return parts[0].1;
    }
    // (weight, throughput, squared standard error)
    let mut runs = Vec::with_capacity(parts.len());
    for &(thr, ci, secs) in parts {
        let (lo, hi) = ci?;
        runs.push((secs / total, thr, ((hi - lo) / (2.0 * Z95)).powi(2)));
    }
    let mean: f64 = runs.iter().map(|(w, t, _)| w * t).sum();
    let k = runs.len() as f64;
    let spread: f64 = runs
        .iter()
        .map(|(w, t, _)| w * (t - mean).powi(2))
        .sum::<f64>()
        * k
        / (k - 1.0);
    let within: f64 = runs.iter().map(|(w, _, se2)| w * se2).sum();
    let tau2 = (spread - within).max(0.0);
    let var: f64 = runs.iter().map(|(w, _, se2)| w * w * (se2 + tau2)).sum();
    let half = Z95 * var.sqrt();
    Some(((mean - half).max(0.0), mean + half))
}

/// Wilson score interval (95 %) of a proportion `p` observed over `n` trials; `None` when `n` is 0.
pub fn wilson(p: f64, n: u64) -> Option<(f64, f64)> {
    if n == 0 || !(0.0..=1.0).contains(&p) {
        return None;
    }
    let n = n as f64;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    Some(((centre - half).max(0.0), (centre + half).min(1.0)))
}

/// Coefficient of variation (sample standard deviation over mean) of `values`; `None` with fewer
/// than two values or a mean of zero.
pub fn cv(values: &[f64]) -> Option<f64> {
    if values.len() < 2 {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if mean == 0.0 {
        return None;
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some(var.sqrt() / mean.abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_a_published_value_and_stays_inside_zero_one() {
        // Wilson (1927) / Newcombe (1998), table I: 81 of 263 gives 0.2553 – 0.3662.
        let (lo, hi) = wilson(81.0 / 263.0, 263).unwrap();
        assert!(
            (lo - 0.2553).abs() < 5e-4 && (hi - 0.3662).abs() < 5e-4,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson(1.0, 30).unwrap();
        assert!(
            (hi - 1.0).abs() < 1e-12 && lo > 0.85 && lo < 0.9,
            "{lo} {hi}"
        );
        assert!(wilson(0.5, 0).is_none());
    }

    #[test]
    fn blocks_keep_drift_so_a_drifting_run_gets_a_wider_interval() {
        // The same window values, drifting up steadily or shuffled: resampling blocks of neighbours
        // sees the drift as less independent evidence than scattered windows are.
        let drifting: Vec<(u64, f64)> = (0..64).map(|i| (1000 + i * 10, 1.0)).collect();
        let mut scattered = drifting.clone();
        scattered.sort_by_key(|w| (w.0 * 7919) % 641);
        let (dl, dh) = bootstrap_throughput(&drifting).unwrap();
        let (sl, sh) = bootstrap_throughput(&scattered).unwrap();
        assert!(dh - dl > (sh - sl) * 1.2, "{dl}..{dh} vs {sl}..{sh}");
    }

    #[test]
    fn bootstrap_brackets_the_throughput_and_narrows_with_steady_windows() {
        let noisy: Vec<(u64, f64)> = (0..20).map(|i| (1000 + (i % 5) * 100, 1.0)).collect();
        let steady: Vec<(u64, f64)> = (0..20).map(|i| (1200 + (i % 5), 1.0)).collect();
        let (lo, hi) = bootstrap_throughput(&noisy).unwrap();
        let mean = noisy.iter().map(|w| w.0 as f64).sum::<f64>() / 20.0;
        assert!(lo < mean && mean < hi, "{lo} {mean} {hi}");
        let (slo, shi) = bootstrap_throughput(&steady).unwrap();
        assert!(shi - slo < (hi - lo) / 10.0, "{slo}..{shi} vs {lo}..{hi}");
        assert_eq!(bootstrap_throughput(&noisy), Some((lo, hi)), "seeded");
        assert!(bootstrap_throughput(&noisy[..1]).is_none());
    }

    #[test]
    fn pooled_intervals_narrow_and_need_every_part() {
        let one = (100.0, Some((90.0, 110.0)), 10.0);
        assert_eq!(pool_throughput(&[one]), Some((90.0, 110.0)));
        let (lo, hi) = pool_throughput(&[one, one, one, one]).unwrap();
        assert!(
            (lo - 95.0).abs() < 1e-9 && (hi - 105.0).abs() < 1e-9,
            "{lo} {hi}"
        );
        assert!(pool_throughput(&[one, (100.0, None, 10.0)]).is_none());
        // Runs that disagree far beyond their own intervals: the interval covers their spread, not
        // ±1 around the mean.
        let apart: Vec<PooledRun> = [80.0, 90.0, 110.0, 120.0]
            .iter()
            .map(|&t| (t, Some((t - 2.0, t + 2.0)), 10.0))
            .collect();
        let (lo, hi) = pool_throughput(&apart).unwrap();
        assert!(lo < 85.0 && hi > 115.0, "{lo} {hi}");
    }

    #[test]
    fn cv_of_repeated_runs() {
        assert!(cv(&[1.0]).is_none());
        assert!((cv(&[9.0, 11.0]).unwrap() - (2f64).sqrt() / 10.0).abs() < 1e-12);
    }
}
