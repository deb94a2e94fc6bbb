//! What recording one telemetry window's latency histogram costs the coordinator: into the
//! OpenTelemetry SDK's histogram one value at a time (what fleetbench did first: the SDK has no way to
//! add counts), into fleetbench's own 1-2-5 buckets one step per distinct HDR value (`otel::hist`),
//! and (what it does now) into those buckets during the walk ingest's check makes anyway. The windows are those of the load harness
//! (`fleetbench-simulate`): HDR histograms of `--queries` latencies, log-normal around 2 ms, seeded.
//!
//!     cargo bench -p fleetbench-coordinator --bench window_recording -- [--queries 1000] [--windows 20000]

use std::time::Instant;

use fleetbench_coordinator::otel::{hist, latency_bounds};
use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider as _;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// `n` latencies (ns), log-normal with median 2 ms and sigma 0.5, from a seeded generator.
fn window(n: usize, seed: &mut u64) -> Vec<u8> {
    let mut uniform = || {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut h = fleetbench_common::hist::new_histogram();
    for _ in 0..n {
        let z = (-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos();
        fleetbench_common::hist::record_ns(&mut h, (2e6 * (0.5 * z).exp()) as u64);
    }
    fleetbench_common::hist::encode(&h)
}

fn main() {
    let queries = arg("--queries", 1000);
    let count = arg("--windows", 20_000);
    let mut seed = 42;
    let windows: Vec<Vec<u8>> = (0..64).map(|_| window(queries, &mut seed)).collect();
    let attrs = [
        KeyValue::new("model", "digits"),
        KeyValue::new("variant", "fp32"),
        KeyValue::new("platform", "cloud"),
    ];

    // The SDK: one record per value, each at its HDR bucket's midpoint, on a bound instrument.
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(opentelemetry_sdk::metrics::ManualReader::default())
        .build();
    let sdk = provider
        .meter("bench")
        .f64_histogram("latency")
        .with_unit("s")
        .with_boundaries(latency_bounds())
        .build()
        .bind(&attrs);
    let sdk_us = time(count, &windows, |w| {
        let _ = fleetbench_common::hist::for_each_recorded(w, |ns, n| {
            for _ in 0..n {
                sdk.record(ns as f64 / 1e9);
            }
        });
    });

    // fleetbench's buckets.
    let h = hist::Histogram::new("latency", "s", "", latency_bounds());
    let series = h.bind(&attrs);
    let own_us = time(count, &windows, |w| series.add_hdr(w));

    // What fleetbench does now: counting into the buckets while ingest's check walks the encoding
    // (the check walks it anyway), then adding the counts to the series in the recorder.
    let fused_us = time(count, &windows, |w| {
        let mut c = h.counts();
        let mut total = 0u64;
        let _ = fleetbench_common::hist::for_each_recorded(w, |ns, n| {
            total += n;
            c.add(ns, n);
        });
        std::hint::black_box(total);
        series.add(&c);
    });

    // The floor: walking the encoding alone (what ingest's check costs without metrics).
    let walk_us = time(count, &windows, |w| {
        let mut total = 0u64;
        let _ = fleetbench_common::hist::for_each_recorded(w, |_, n| total += n);
        std::hint::black_box(total);
    });

    let distinct = {
        let mut d = 0;
        let _ = fleetbench_common::hist::for_each_recorded(&windows[0], |_, _| d += 1);
        d
    };
    println!(
        "windows of {queries} latencies ({distinct} distinct HDR values), {count} windows, µs per window:"
    );
    println!("  SDK histogram, one record per value : {sdk_us:8.2}");
    println!("  1-2-5 buckets from the encoding     : {own_us:8.2}");
    println!("  walking the HDR encoding alone      : {walk_us:8.2}");
    println!(
        "  check's walk counting into buckets  : {fused_us:8.2}  (metrics' share: {:.2})",
        fused_us - walk_us
    );
}

/// Mean µs per window of `f` over `count` windows, after a warm-up pass.
fn time(count: usize, windows: &[Vec<u8>], mut f: impl FnMut(&[u8])) -> f64 {
    for w in windows {
        f(w);
    }
    let start = Instant::now();
    for i in 0..count {
        f(&windows[i % windows.len()]);
    }
    start.elapsed().as_secs_f64() * 1e6 / count as f64
}
