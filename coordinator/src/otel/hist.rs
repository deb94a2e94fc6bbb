//! Latency histograms aggregated here rather than in the OpenTelemetry SDK.
//!
//! The SDK's histogram takes one value per call, so a window of N queries costs N calls (about 33 ns
//! each; at 1,500 queries a window that was 15 % of the coordinator's CPU per window). A window
//! arrives as an HDR histogram already, so its counts are added to cumulative 1-2-5 buckets here, one
//! step per distinct HDR value, and the buckets are exported next to the SDK's metrics: as OTLP
//! histogram data points in the same export request ([`super::export`]) and as Prometheus histograms
//! on `/metrics` ([`super::prom`]).
//!
//! Re-bucketing: each recorded HDR bucket's count is added at that bucket's midpoint. HDR buckets
//! here are at most 0.1 % wide (3 significant digits), so a count lands in a neighbouring 1-2-5 bucket
//! only when its latency was within 0.1 % of the edge between them; counts and sums are exact to that
//! precision.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::KeyValue;

/// Most series one histogram keeps; measurements of later attribute sets go to one series marked
/// `otel.metric.overflow=true`, as the SDK does at its cardinality limit.
pub const MAX_SERIES: usize = 2000;

/// Cumulative counts of one series.
#[derive(Debug, Clone)]
pub struct Buckets {
    /// When the series started counting.
    pub start: SystemTime,
    /// Counts per bucket: `counts[i]` holds values in (bounds[i-1], bounds[i]]; the last one holds
    /// values above the last bound.
    pub counts: Vec<u64>,
    /// Sum of the values, seconds.
    pub sum: f64,
    /// Number of values.
    pub count: u64,
    /// Smallest and largest value, seconds (meaningless while `count` is 0).
    pub min: f64,
    /// Largest value, seconds.
    pub max: f64,
}

impl Buckets {
    fn new(bounds: usize) -> Self {
        Self {
            start: SystemTime::now(),
            counts: vec![0; bounds + 1],
            sum: 0.0,
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

/// One window's values in 1-2-5 buckets, filled one HDR bucket at a time in ascending order (as
/// the encoding lists them), so the bucket index only moves up: one comparison or two per distinct
/// value, in integer nanoseconds.
#[derive(Debug, Clone)]
pub struct Counts {
    bounds_ns: Arc<[u64]>,
    at: usize,
    counts: Vec<u64>,
    count: u64,
    sum_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

impl Counts {
    /// Adds `n` values at `ns` (each HDR bucket's midpoint, in ascending order).
    pub fn add(&mut self, ns: u64, n: u64) {
        if ns < self.max_ns {
            // Out of order (never from an encoding): start the search again.
            self.at = 0;
        }
        // OTLP buckets are closed above: the first bound at or above the value.
        while self.at < self.bounds_ns.len() && self.bounds_ns[self.at] < ns {
            self.at += 1;
        }
        self.counts[self.at] += n;
        self.count += n;
        self.sum_ns += ns as u128 * n as u128;
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }
}

/// One series: its buckets and the bounds they use.
#[derive(Clone)]
pub struct Series {
    bounds_ns: Arc<[u64]>,
    buckets: Arc<Mutex<Buckets>>,
}

impl Series {
    /// Adds one window's counts.
    pub fn add(&self, c: &Counts) {
        if c.count == 0 {
            return;
        }
        let mut b = self.buckets.lock().expect("histogram buckets");
        for (into, n) in b.counts.iter_mut().zip(&c.counts) {
            *into += n;
        }
        b.count += c.count;
        b.sum += c.sum_ns as f64 / 1e9;
        b.min = b.min.min(c.min_ns as f64 / 1e9);
        b.max = b.max.max(c.max_ns as f64 / 1e9);
    }

    /// Adds every value of an encoded HDR histogram (ns), each at its HDR bucket's midpoint; an
    /// encoding that does not parse adds nothing (ingest checked it before storing).
    pub fn add_hdr(&self, hdr: &[u8]) {
        let mut c = counts(&self.bounds_ns);
        if fleetbench_common::hist::for_each_recorded(hdr, |ns, n| c.add(ns, n)).is_ok() {
            self.add(&c);
        }
    }
}

fn counts(bounds_ns: &Arc<[u64]>) -> Counts {
    Counts {
        bounds_ns: bounds_ns.clone(),
        at: 0,
        counts: vec![0; bounds_ns.len() + 1],
        count: 0,
        sum_ns: 0,
        min_ns: u64::MAX,
        max_ns: 0,
    }
}

/// An attribute set as a map key: (key, value) pairs, sorted.
type SeriesKey = Vec<(String, String)>;

/// A histogram instrument: name, unit, description, bounds and its series by attribute set.
pub struct Histogram {
    /// The metric's name.
    pub name: &'static str,
    /// Its unit (UCUM).
    pub unit: &'static str,
    /// Its description.
    pub description: &'static str,
    bounds: Arc<[f64]>,
    bounds_ns: Arc<[u64]>,
    series: Mutex<HashMap<SeriesKey, (Vec<KeyValue>, Series)>>,
}

impl Histogram {
    /// A histogram with bucket `bounds` (seconds, ascending, each a whole number of nanoseconds).
    pub fn new(
        name: &'static str,
        unit: &'static str,
        description: &'static str,
        bounds: Vec<f64>,
    ) -> Self {
        Self {
            name,
            unit,
            description,
            bounds_ns: bounds.iter().map(|s| (s * 1e9).round() as u64).collect(),
            bounds: bounds.into(),
            series: Mutex::new(HashMap::new()),
        }
    }

    /// The series of attribute set `attrs` (the same one for equal sets, in any order).
    pub fn bind(&self, attrs: &[KeyValue]) -> Series {
        let mut key: Vec<(String, String)> = attrs
            .iter()
            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
            .collect();
        key.sort();
        let mut series = self.series.lock().expect("histogram series");
        if !series.contains_key(&key) && series.len() >= MAX_SERIES {
            key = vec![("otel.metric.overflow".into(), "true".into())];
        }
        let (_, s) = series.entry(key).or_insert_with_key(|key| {
            let attrs = if key.len() == 1 && key[0].0 == "otel.metric.overflow" {
                vec![KeyValue::new("otel.metric.overflow", true)]
            } else {
                attrs.to_vec()
            };
            let s = Series {
                bounds_ns: self.bounds_ns.clone(),
                buckets: Arc::new(Mutex::new(Buckets::new(self.bounds.len()))),
            };
            (attrs, s)
        });
        s.clone()
    }

    /// Empty counts in this histogram's buckets, for one window.
    pub fn counts(&self) -> Counts {
        counts(&self.bounds_ns)
    }

    /// The bucket bounds.
    pub fn bounds(&self) -> &[f64] {
        &self.bounds
    }

    /// Every series with values: its attributes and a copy of its buckets.
    pub fn snapshot(&self) -> Vec<(Vec<KeyValue>, Buckets)> {
        let series = self.series.lock().expect("histogram series");
        series
            .values()
            .filter_map(|(attrs, s)| {
                let b = s.buckets.lock().expect("histogram buckets").clone();
                (b.count > 0).then(|| (attrs.clone(), b))
            })
            .collect()
    }

    /// The histogram as an OTLP metric (cumulative), None while no series has values.
    pub fn to_otlp(&self) -> Option<opentelemetry_proto::tonic::metrics::v1::Metric> {
        use opentelemetry_proto::tonic::metrics::v1 as pb;
        let points: Vec<pb::HistogramDataPoint> = self
            .snapshot()
            .into_iter()
            .map(|(attrs, b)| pb::HistogramDataPoint {
                attributes: attrs.iter().map(Into::into).collect(),
                start_time_unix_nano: unix_nanos(b.start),
                time_unix_nano: unix_nanos(SystemTime::now()),
                count: b.count,
                sum: Some(b.sum),
                bucket_counts: b.counts,
                explicit_bounds: self.bounds.to_vec(),
                exemplars: Vec::new(),
                flags: 0,
                min: Some(b.min),
                max: Some(b.max),
            })
            .collect();
        (!points.is_empty()).then(|| pb::Metric {
            name: self.name.to_string(),
            description: self.description.to_string(),
            unit: self.unit.to_string(),
            metadata: Vec::new(),
            data: Some(pb::metric::Data::Histogram(pb::Histogram {
                data_points: points,
                aggregation_temporality: pb::AggregationTemporality::Cumulative as i32,
            })),
        })
    }
}

/// The histograms fed from windows.
pub struct Histograms {
    /// Latency of one query.
    pub latency: Histogram,
    /// Time to first token.
    pub ttft: Histogram,
    /// Time per output token.
    pub tpot: Histogram,
}

impl Default for Histograms {
    fn default() -> Self {
        let seconds =
            |name, description| Histogram::new(name, "s", description, super::latency_bounds());
        Self {
            latency: seconds(
                "fleetbench.inference.latency",
                "Latency of one query (one call of the model, or one request of a generate run from \
                 arrival to last token).",
            ),
            ttft: seconds(
                "gen_ai.server.time_to_first_token",
                "Time to first token of a generate request.",
            ),
            tpot: seconds(
                "gen_ai.server.time_per_output_token",
                "Time per output token after the first, of a generate request.",
            ),
        }
    }
}

impl Histograms {
    /// Every histogram.
    pub fn all(&self) -> [&Histogram; 3] {
        [&self.latency, &self.ttft, &self.tpot]
    }

    /// Those with values, as OTLP metrics.
    pub fn to_otlp(&self) -> Vec<opentelemetry_proto::tonic::metrics::v1::Metric> {
        self.all().iter().filter_map(|h| h.to_otlp()).collect()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(values: &[(u64, u64)]) -> Vec<u8> {
        let mut h = fleetbench_common::hist::new_histogram();
        for &(v, n) in values {
            h.record_n(v, n).unwrap();
        }
        fleetbench_common::hist::encode(&h)
    }

    #[test]
    fn hdr_counts_land_in_the_1_2_5_buckets_with_every_count_and_the_sum_kept() {
        let h = Histogram::new("t", "s", "", super::super::latency_bounds());
        let s = h.bind(&[KeyValue::new("model", "m")]);
        let values = [
            (1_000u64, 3u64),
            (1_999, 3),
            (2_000, 3),
            (2_001, 3),
            (4_999_000, 3),
            (5_000_000, 3),
            (7_777_777, 3),
            (20_000_000_000, 1),
        ];
        s.add_hdr(&hdr(&values));
        let snap = h.snapshot();
        assert_eq!(snap.len(), 1);
        let b = &snap[0].1;
        let n: u64 = values.iter().map(|v| v.1).sum();
        assert_eq!(b.count, n);
        assert_eq!(b.counts.iter().sum::<u64>(), n);
        let want: f64 = values.iter().map(|&(v, n)| v as f64 * n as f64 / 1e9).sum();
        assert!((b.sum - want).abs() / want < 1e-3, "{} vs {want}", b.sum);
        // Values below 2048 ns are exact in HDR, so the edges at 1 and 2 µs are kept: (.., 1 µs]
        // holds the three at 1 µs, (1, 2] the six at 1.999 and 2 µs, (2, 5] the three at 2.001.
        assert_eq!(&b.counts[..3], &[3, 6, 3]);
        // 4.999 ms and 5 ms share one HDR bucket (4.997 to 5.001 ms) whose midpoint is below 5 ms,
        // so both land in (2, 5] ms; 7.8 ms lands in (5, 10].
        let ms = |x: f64| {
            h.bounds()
                .iter()
                .position(|&e| (e - x * 1e-3).abs() < 1e-12)
                .unwrap()
        };
        assert_eq!(b.counts[ms(5.0)], 6);
        assert_eq!(b.counts[ms(10.0)], 3);
        // 20 s is above the last bound.
        assert_eq!(*b.counts.last().unwrap(), 1);
        assert!(
            (b.min - 1e-6).abs() < 1e-12 && b.max > 19.9,
            "{} {}",
            b.min,
            b.max
        );
    }

    #[test]
    fn equal_attribute_sets_share_a_series_and_the_cap_overflows() {
        let h = Histogram::new("t", "s", "", vec![1.0]);
        let a = h.bind(&[KeyValue::new("a", "1"), KeyValue::new("b", "2")]);
        let b = h.bind(&[KeyValue::new("b", "2"), KeyValue::new("a", "1")]);
        a.add_hdr(&hdr(&[(1000, 1)]));
        b.add_hdr(&hdr(&[(1000, 1)]));
        assert_eq!(h.snapshot().len(), 1);
        assert_eq!(h.snapshot()[0].1.count, 2);
        for i in 1..MAX_SERIES + 10 {
            h.bind(&[KeyValue::new("i", i.to_string())])
                .add_hdr(&hdr(&[(1000, 1)]));
        }
        let snap = h.snapshot();
        assert_eq!(snap.len(), MAX_SERIES + 1);
        let overflow = snap
            .iter()
            .find(|(a, _)| a.iter().any(|kv| kv.key.as_str() == "otel.metric.overflow"))
            .expect("an overflow series");
        assert_eq!(overflow.1.count, 10);
    }
}
