//! Mergeable latency histograms (HdrHistogram, 3 significant digits, so any value read back is within
//! 0.1 % of what was recorded) and the statistics fleetbench reports from them.

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};

use crate::domain::LatencyStats;

/// A latency histogram in nanoseconds.
pub type LatencyHistogram = Histogram<u64>;

/// Largest latency a histogram holds without resizing: one hour in nanoseconds.
pub const HIGHEST_TRACKABLE_NS: u64 = 3_600_000_000_000;

/// Significant decimal digits kept: 3 gives a value error of at most 0.1 %.
pub const SIGNIFICANT_DIGITS: u8 = 3;

/// Errors reading a serialized histogram.
#[derive(Debug, thiserror::Error)]
pub enum HistError {
    /// The bytes are not a V2 HdrHistogram serialization.
    #[error("latency histogram is not a valid HdrHistogram V2 encoding: {0}")]
    Decode(String),
    /// Two histograms could not be added.
    #[error("latency histograms cannot be merged: {0}")]
    Merge(String),
}

/// A new, empty latency histogram (1 ns .. 1 h, 3 significant digits, grows beyond 1 h when needed).
pub fn new_histogram() -> LatencyHistogram {
    let mut h = Histogram::new_with_bounds(1, HIGHEST_TRACKABLE_NS, SIGNIFICANT_DIGITS)
        .expect("static histogram bounds are valid");
    h.auto(true);
    h
}

/// Records one latency in nanoseconds (0 is recorded as 1 ns).
pub fn record_ns(h: &mut LatencyHistogram, ns: u64) {
    h.saturating_record(ns.max(1));
}

/// Serializes a histogram (V2 format, no compression).
pub fn encode(h: &LatencyHistogram) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    V2Serializer::new()
        .serialize(h, &mut buf)
        .expect("serializing into a Vec cannot fail");
    buf
}

/// The V2 (uncompressed) serialization's cookie, as [`encode`] writes it.
const V2_COOKIE: u32 = 0x1c84_9303 | 0x10;

/// Size of the V2 header: cookie, payload length, normalizing offset, digits, lowest, highest, ratio.
const V2_HEADER: usize = 40;

/// Checks a V2 header before it is trusted: the deserializer allocates what the header says (a
/// payload buffer of its stated length, a counts array for its range and precision), so bytes from
/// outside must not be able to ask for gigabytes. Accepted: fleetbench's own encoding (uncompressed,
/// at most 3 significant digits, values up to 2^62 ns, a payload that is really there).
fn check_header(bytes: &[u8]) -> Result<(), HistError> {
    let bad = |why: &str| Err(HistError::Decode(why.to_string()));
    if bytes.len() < V2_HEADER {
        return bad("shorter than its header");
    }
    let u32_at = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    if u32_at(0) != V2_COOKIE {
        return bad("not an uncompressed V2 encoding (wrong cookie)");
    }
    if u32_at(4) as usize > bytes.len() - V2_HEADER {
        return bad("its payload is shorter than its header says");
    }
    let digits = u32_at(12);
    if !(1..=SIGNIFICANT_DIGITS as u32).contains(&digits) {
        return bad("more significant digits than fleetbench records");
    }
    let (low, high) = (u64_at(16), u64_at(24));
    if low == 0 || high > 1 << 62 || high / 2 < low {
        return bad("its value range is out of bounds");
    }
    if f64::from_be_bytes(bytes[32..40].try_into().expect("8 bytes")) != 1.0 {
        return bad("an integer-to-double ratio, which fleetbench never writes");
    }
    let layout = Layout::of(digits, low);
    if layout.unit_magnitude + layout.sub_bucket_count_magnitude > 63 {
        return bad("more precision than its lowest value allows");
    }
    Ok(())
}

/// HdrHistogram's bucket layout for a precision and lowest value, computed as the `hdrhistogram`
/// crate computes it (`Histogram::new_with_bounds`), so the direct reader refuses what it refuses.
struct Layout {
    unit_magnitude: u32,
    sub_bucket_count_magnitude: u32,
}

impl Layout {
    fn of(digits: u32, low: u64) -> Self {
        let largest = 2 * 10u32.pow(digits);
        Self {
            unit_magnitude: (low as f64).log2().floor() as u32,
            sub_bucket_count_magnitude: f64::from(largest).log2().ceil() as u32,
        }
    }

    /// The length of the counts array a histogram up to `high` has.
    fn counts_len(&self, high: u64) -> u64 {
        let mut smallest_untrackable =
            1u64 << (self.sub_bucket_count_magnitude + self.unit_magnitude);
        let mut buckets = 1u64;
        while smallest_untrackable <= high {
            if smallest_untrackable > u64::MAX / 2 {
                buckets += 1;
                break;
            }
            smallest_untrackable <<= 1;
            buckets += 1;
        }
        (buckets + 1) * (1u64 << (self.sub_bucket_count_magnitude - 1))
    }
}

/// Calls `f(midpoint_ns, count)` for every non-empty bucket of a histogram written by [`encode`],
/// reading the encoding directly: no counts array is allocated and empty buckets cost nothing, so this
/// is many times cheaper than [`decode`] followed by `iter_recorded` (which walks every bucket of the
/// 1 ns–1 h range). The midpoint is HdrHistogram's `median_equivalent` of the bucket (a property test
/// holds the two ways to the same answer). Empty input
/// calls nothing; damaged input is refused as [`decode`] refuses it.
pub fn for_each_recorded(bytes: &[u8], mut f: impl FnMut(u64, u64)) -> Result<(), HistError> {
    if bytes.is_empty() {
        return Ok(());
    }
    check_header(bytes)?;
    let bad = |why: &str| HistError::Decode(why.to_string());
    let u32_at = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    if u32_at(8) != 0 {
        return Err(bad("a normalizing offset, which fleetbench never writes"));
    }
    let layout = Layout::of(u32_at(12), u64_at(16));
    let counts_len = layout.counts_len(u64_at(24));
    // HdrHistogram's layout: buckets of sub_bucket_count slots, each bucket after the first using
    // its top half at twice the previous bucket's unit.
    let half_magnitude = layout.sub_bucket_count_magnitude - 1;
    let half_count = 1u64 << half_magnitude;
    let unit_magnitude = layout.unit_magnitude;
    let payload = &bytes[V2_HEADER..V2_HEADER + u32_at(4) as usize];
    let (mut at, mut index) = (0usize, 0u64);
    while at < payload.len() {
        // LEB128 of up to 9 bytes, the ninth taken whole, then ZigZag: a count, or minus a run of
        // empty slots.
        let mut raw = 0u64;
        for i in 0..9 {
            let b = *payload
                .get(at)
                .ok_or_else(|| bad("its payload ends inside a number"))?;
            at += 1;
            if i == 8 {
                raw |= (b as u64) << 56;
                break;
            }
            raw |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                break;
            }
        }
        let n = ((raw >> 1) as i64) ^ -((raw & 1) as i64);
        if n < 0 {
            // A run of empty slots (as the crate's reader does, a run that does not fit refuses).
            index = n
                .checked_neg()
                .and_then(|run| index.checked_add(run as u64))
                .ok_or_else(|| bad("a run of empty slots beyond any range"))?;
            continue;
        }
        if n > 0 {
            if index >= counts_len {
                return Err(bad("more slots than its value range holds"));
            }
            let mut bucket = (index >> half_magnitude) as i64 - 1;
            let mut sub = (index & (half_count - 1)) + half_count;
            if bucket < 0 {
                sub -= half_count;
                bucket = 0;
            }
            let shift = bucket as u32 + unit_magnitude;
            if shift >= 64 || (sub << shift) >> shift != sub {
                return Err(bad("a count beyond the largest value"));
            }
            // The slot's lowest value, plus half its width (HdrHistogram's median_equivalent).
            f((sub << shift) + ((1u64 << shift) >> 1), n as u64);
        }
        index = index
            .checked_add(1)
            .ok_or_else(|| bad("a run of empty slots beyond any range"))?;
    }
    Ok(())
}

/// Checks an encoded histogram as [`decode`] does, without building it, and returns how many values
/// it holds. Empty input holds none.
pub fn check_count(bytes: &[u8]) -> Result<u64, HistError> {
    let mut total = 0u64;
    for_each_recorded(bytes, |_, n| total = total.saturating_add(n))?;
    Ok(total)
}

/// Reads a histogram written by [`encode`]. Empty input gives an empty histogram. Bytes from outside
/// are checked first (see [`check_header`]).
pub fn decode(bytes: &[u8]) -> Result<LatencyHistogram, HistError> {
    if bytes.is_empty() {
        return Ok(new_histogram());
    }
    check_header(bytes)?;
    let h: LatencyHistogram = Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| HistError::Decode(format!("{e:?}")))?;
    let mut out = new_histogram();
    out.add(&h)
        .map_err(|e| HistError::Merge(format!("{e:?}")))?;
    Ok(out)
}

/// Adds `other` into `into`.
pub fn merge(into: &mut LatencyHistogram, other: &LatencyHistogram) -> Result<(), HistError> {
    into.add(other)
        .map_err(|e| HistError::Merge(format!("{e:?}")))
}

/// Summary statistics of a histogram, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Number of recorded values.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 97th percentile.
    pub p97: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub stddev: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// 95 % confidence interval of the median.
    pub p50_ci: (f64, f64),
    /// 95 % confidence interval of the 99th percentile.
    pub p99_ci: (f64, f64),
    /// 95 % confidence interval of the 90th percentile.
    pub p90_ci: (f64, f64),
    /// 95 % confidence interval of the 95th percentile.
    pub p95_ci: (f64, f64),
}

/// z for a two-sided 95 % interval.
const Z95: f64 = 1.959_963_984_540_054;

/// Distribution-free confidence interval of quantile `q` (order statistics with the normal
/// approximation of the binomial): the values at ranks `nq ± z·sqrt(nq(1-q))`, clamped to the data.
pub fn quantile_ci(h: &LatencyHistogram, q: f64, z: f64) -> (f64, f64) {
    let n = h.len() as f64;
    if n == 0.0 {
        return (0.0, 0.0);
    }
    let half_width = z * (n * q * (1.0 - q)).sqrt();
    let lo_rank = (n * q - half_width).floor().max(1.0);
    let hi_rank = (n * q + half_width).ceil().min(n);
    (
        h.value_at_quantile(lo_rank / n) as f64,
        h.value_at_quantile(hi_rank / n) as f64,
    )
}

/// Statistics of a histogram; all zero when it is empty.
pub fn stats(h: &LatencyHistogram) -> Stats {
    if h.is_empty() {
        return Stats::default();
    }
    let q = |x: f64| h.value_at_quantile(x) as f64;
    Stats {
        count: h.len(),
        p50: q(0.50),
        p90: q(0.90),
        p95: q(0.95),
        p97: q(0.97),
        p99: q(0.99),
        p999: q(0.999),
        mean: h.mean(),
        stddev: h.stdev(),
        min: h.min() as f64,
        max: h.max() as f64,
        p50_ci: quantile_ci(h, 0.50, Z95),
        p99_ci: quantile_ci(h, 0.99, Z95),
        p90_ci: quantile_ci(h, 0.90, Z95),
        p95_ci: quantile_ci(h, 0.95, Z95),
    }
}

impl Stats {
    /// The statistics in milliseconds, as runs and rankings report them.
    pub fn to_ms(&self) -> LatencyStats {
        let ms = |ns: f64| ns / 1e6;
        LatencyStats {
            p50_ms: ms(self.p50),
            p90_ms: ms(self.p90),
            p95_ms: ms(self.p95),
            p97_ms: ms(self.p97),
            p99_ms: ms(self.p99),
            p999_ms: ms(self.p999),
            mean_ms: ms(self.mean),
            stddev_ms: ms(self.stddev),
            min_ms: ms(self.min),
            max_ms: ms(self.max),
            p50_ci_low_ms: ms(self.p50_ci.0),
            p50_ci_high_ms: ms(self.p50_ci.1),
            p99_ci_low_ms: ms(self.p99_ci.0),
            p99_ci_high_ms: ms(self.p99_ci.1),
            p90_ci_low_ms: ms(self.p90_ci.0),
            p90_ci_high_ms: ms(self.p90_ci.1),
            p95_ci_low_ms: ms(self.p95_ci.0),
            p95_ci_high_ms: ms(self.p95_ci.1),
        }
    }
}

/// Stability rule after perf_analyzer: over the last `windows` values, max/min must not exceed
/// `ratio`. Fewer values than `windows`, or a non-positive value, is not stable.
pub fn is_stable(values: &[f64], windows: usize, ratio: f64) -> bool {
    if windows == 0 || values.len() < windows {
        return false;
    }
    let tail = &values[values.len() - windows..];
    let min = tail.iter().copied().fold(f64::INFINITY, f64::min);
    let max = tail.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    min > 0.0 && max / min <= ratio
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use rand_distr::{Distribution, Exp, LogNormal};

    fn exact_quantile(sorted: &[u64], q: f64) -> f64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1] as f64
    }

    #[test]
    fn percentiles_are_within_a_tenth_of_a_percent_of_exact_values() {
        let mut rng = StdRng::seed_from_u64(7);
        let dist = LogNormal::new(11.0, 0.6).unwrap(); // ~60 us median, long tail
        let mut values: Vec<u64> = (0..200_000)
            .map(|_| dist.sample(&mut rng) as u64 + 1)
            .collect();
        let mut h = new_histogram();
        for v in &values {
            record_ns(&mut h, *v);
        }
        values.sort_unstable();
        let s = stats(&h);
        for (got, q) in [(s.p50, 0.5), (s.p90, 0.9), (s.p99, 0.99), (s.p999, 0.999)] {
            let want = exact_quantile(&values, q);
            assert!(
                (got - want).abs() / want <= 0.001,
                "q={q}: got {got}, exact {want}"
            );
        }
        assert!(
            s.p50 <= s.p90 && s.p90 <= s.p95 && s.p95 <= s.p97 && s.p97 <= s.p99 && s.p99 <= s.p999
        );
        let exact_mean = values.iter().map(|v| *v as f64).sum::<f64>() / values.len() as f64;
        assert!((s.mean - exact_mean).abs() / exact_mean < 0.001);
    }

    #[test]
    fn exponential_median_matches_theory() {
        // Exp(rate) has median ln2/rate; with 100k samples the CI must contain it.
        let mut rng = StdRng::seed_from_u64(11);
        let rate = 1.0 / 50_000.0; // mean 50 us
        let dist = Exp::new(rate).unwrap();
        let mut h = new_histogram();
        for _ in 0..100_000 {
            record_ns(&mut h, dist.sample(&mut rng) as u64);
        }
        let s = stats(&h);
        let median = std::f64::consts::LN_2 / rate;
        assert!(
            s.p50_ci.0 <= median * 1.001 && median <= s.p50_ci.1 * 1.001,
            "{:?} vs {median}",
            s.p50_ci
        );
        let p99 = -(0.01f64).ln() / rate;
        assert!(
            s.p99_ci.0 <= p99 * 1.001 && p99 <= s.p99_ci.1 * 1.001,
            "{:?} vs {p99}",
            s.p99_ci
        );
        // CI of the median is narrow with this many samples: about +-1 %.
        assert!((s.p50_ci.1 - s.p50_ci.0) / median < 0.03);
    }

    #[test]
    fn ci_covers_the_true_median_about_95_percent_of_the_time() {
        let mut rng = StdRng::seed_from_u64(3);
        let dist = LogNormal::new(10.0, 0.5).unwrap();
        let true_median = 10.0f64.exp();
        let trials = 400;
        let mut covered = 0;
        for _ in 0..trials {
            let mut h = new_histogram();
            for _ in 0..500 {
                record_ns(&mut h, dist.sample(&mut rng) as u64);
            }
            let (lo, hi) = quantile_ci(&h, 0.5, Z95);
            if lo <= true_median * 1.001 && true_median <= hi * 1.001 {
                covered += 1;
            }
        }
        let coverage = covered as f64 / trials as f64;
        assert!((0.91..=0.99).contains(&coverage), "coverage {coverage}");
    }

    #[test]
    fn merged_windows_equal_one_histogram_of_everything() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut all = new_histogram();
        let mut merged = new_histogram();
        for _ in 0..10 {
            let mut w = new_histogram();
            for _ in 0..1000 {
                let v = rng.random_range(10_000..2_000_000);
                record_ns(&mut w, v);
                record_ns(&mut all, v);
            }
            let decoded = decode(&encode(&w)).unwrap();
            merge(&mut merged, &decoded).unwrap();
        }
        assert_eq!(merged.len(), 10_000);
        assert_eq!(stats(&merged), stats(&all));
    }

    #[test]
    fn garbage_is_rejected_with_a_clear_error() {
        let err = decode(b"definitely not a histogram").unwrap_err();
        assert!(
            err.to_string().contains("not a valid HdrHistogram"),
            "{err}"
        );
    }

    #[test]
    fn stability_rule() {
        assert!(is_stable(&[100.0, 104.0, 109.0], 3, 1.10));
        assert!(!is_stable(&[100.0, 104.0, 111.0], 3, 1.10));
        assert!(
            is_stable(&[500.0, 100.0, 104.0, 109.0], 3, 1.10),
            "only the last windows count"
        );
        assert!(!is_stable(&[100.0, 100.0], 3, 1.10), "too few windows");
        assert!(
            !is_stable(&[0.0, 0.0, 0.0], 3, 1.10),
            "zero throughput is not stable"
        );
    }
}

#[cfg(test)]
mod hostile_headers {
    #[test]
    fn a_lowest_value_whose_double_overflows_is_refused_not_multiplied() {
        let mut h = super::new_histogram();
        super::record_ns(&mut h, 1000);
        let mut bytes = super::encode(&h);
        // lowest = 2^63: twice it does not fit in 64 bits.
        bytes[16..24].copy_from_slice(&(1u64 << 63).to_be_bytes());
        assert!(super::for_each_recorded(&bytes, |_, _| {}).is_err());
        assert!(super::decode(&bytes).is_err());
    }

    #[test]
    fn a_header_that_asks_for_gigabytes_is_refused_before_anything_is_allocated() {
        let mut h = super::new_histogram();
        super::record_ns(&mut h, 1000);
        let good = super::encode(&h);
        // A payload length of 4 GiB.
        let mut huge_payload = good.clone();
        huge_payload[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = super::decode(&huge_payload).unwrap_err().to_string();
        assert!(e.contains("payload"), "{e}");
        // Five significant digits over the widest range: a counts array of tens of megabytes.
        let mut precise = good.clone();
        precise[12..16].copy_from_slice(&5u32.to_be_bytes());
        precise[24..32].copy_from_slice(&(1u64 << 63).to_be_bytes());
        assert!(super::decode(&precise).is_err());
        assert!(super::decode(&good).is_ok());
    }
}

#[cfg(test)]
mod decoding_outside_bytes {
    use proptest::prelude::*;

    /// Encodes `values`, changes the bytes `flips` name (positions modulo the length), and holds the
    /// direct reader to decoding: both refuse or neither does, with the same count.
    fn damaged_alike(values: &[u64], flips: Vec<(usize, u8)>) -> Result<(), TestCaseError> {
        let mut h = super::new_histogram();
        for v in values {
            super::record_ns(&mut h, *v);
        }
        let mut bytes = super::encode(&h);
        for (at, b) in flips {
            let n = bytes.len();
            bytes[at % n] = b;
        }
        let decoded = super::decode(&bytes);
        let direct = super::for_each_recorded(&bytes, |_, _| {});
        prop_assert_eq!(
            decoded.is_ok(),
            direct.is_ok(),
            "{:?} vs {:?}",
            decoded.as_ref().err(),
            direct.err()
        );
        if let Ok(h) = decoded {
            prop_assert_eq!(super::check_count(&bytes).unwrap(), h.len());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any bytes: an error or a histogram, never a panic.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = super::decode(&bytes);
        }

        /// A real encoding with bytes changed: no panic, and the direct reader refuses exactly what
        /// decoding refuses and counts what it counts.
        #[test]
        fn damaged_encodings_decode_or_fail_cleanly(
            values in proptest::collection::vec(1u64..10_000_000_000, 1..200),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            damaged_alike(&values, flips)?;
        }

        /// The same with only header bytes changed (where the range and precision are).
        #[test]
        fn damaged_headers_are_refused_alike(
            values in proptest::collection::vec(1u64..10_000_000_000, 1..50),
            flips in proptest::collection::vec((0usize..40, any::<u8>()), 1..3),
        ) {
            damaged_alike(&values, flips)?;
        }

        /// Any bytes: the direct reader fails cleanly too.
        #[test]
        fn any_bytes_read_directly_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = super::for_each_recorded(&bytes, |_, _| {});
        }

        /// Reading the encoding directly gives what decoding and iterating give: every non-empty
        /// bucket, its count, and its midpoint.
        #[test]
        fn the_direct_reader_agrees_with_decoding(
            values in proptest::collection::vec((1u64..3_600_000_000_000, 1u64..5), 0..300),
        ) {
            let mut h = super::new_histogram();
            for (v, n) in &values {
                h.record_n(*v, *n).unwrap();
            }
            let bytes = super::encode(&h);
            let decoded = super::decode(&bytes).unwrap();
            let want: Vec<(u64, u64)> = decoded
                .iter_recorded()
                .map(|v| (decoded.median_equivalent(v.value_iterated_to()), v.count_at_value()))
                .collect();
            let mut got = Vec::new();
            super::for_each_recorded(&bytes, |v, n| got.push((v, n))).unwrap();
            prop_assert_eq!(got, want);
        }
    }
}
