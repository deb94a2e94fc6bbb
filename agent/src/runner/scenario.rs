//! Load patterns, after MLPerf LoadGen's scenarios. Each drives queries through one or more
//! [`QueryExec`]s (an ONNX Runtime session with its inputs, or a test double) and records every
//! query's latency in the [`Recorder`].
//!
//! - single-stream: one query at a time; the next is issued when the previous completes.
//! - offline: `concurrency` sessions on their own threads, each issuing as fast as it can.
//! - server: Poisson arrivals at a target QPS from a schedule generated in advance from a seed, issued
//!   by a dedicated thread with sub-millisecond precision; a query's latency runs from its *scheduled*
//!   time, so a model that falls behind cannot hide its queueing (no coordinated omission). Queries that
//!   would exceed `max_outstanding` are dropped and counted.
//! - max-qps: bisection over short server runs for the highest QPS whose p99 meets the latency bound,
//!   then a server run at that QPS whose windows are the run's telemetry.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fleetbench_common::hist::{self, is_stable};
use fleetbench_proto::v1::RunConfig;
use ort::session::{Session, SessionInputValue};
use ort::value::DynValue;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Exp};
use serde_json::json;

use super::RunError;
use super::recorder::Recorder;

/// One query's worth of work.
pub trait QueryExec: Send {
    /// Runs one query to completion.
    fn run(&mut self) -> Result<(), RunError>;
}

/// An ONNX Runtime session with the inputs of one query.
pub struct OrtQuery<'a> {
    /// The session.
    pub session: &'a mut Session,
    /// Its inputs, in the session's input order.
    pub values: &'a [DynValue],
}

impl QueryExec for OrtQuery<'_> {
    #[inline]
    fn run(&mut self) -> Result<(), RunError> {
        let views: Vec<SessionInputValue<'_>> = self.values.iter().map(Into::into).collect();
        drop(self.session.run(views.as_slice())?);
        Ok(())
    }
}

/// When a timed phase ends.
#[derive(Debug, Clone, Copy)]
pub struct StopRule {
    /// Exact number of queries (0: bounded by time instead).
    pub iterations: u64,
    /// Planned duration (0: none).
    pub duration: Duration,
    /// Hard limit (0: none).
    pub max_duration: Duration,
    /// Stop once valid and stable.
    pub early_stop: bool,
    /// Minimum queries for validity.
    pub min_queries: u64,
    /// Minimum duration for validity.
    pub min_duration: Duration,
    /// Stability window count.
    pub stability_windows: usize,
    /// Stability max/min ratio.
    pub stability_ratio: f64,
}

impl StopRule {
    /// From a configuration.
    pub fn from_config(c: &RunConfig) -> Self {
        Self {
            iterations: c.iterations,
            duration: Duration::from_millis(c.duration_ms),
            max_duration: Duration::from_millis(c.max_duration_ms),
            early_stop: c.early_stop,
            min_queries: c.min_queries,
            min_duration: Duration::from_millis(c.min_duration_ms),
            stability_windows: c.stability_windows as usize,
            stability_ratio: c.stability_ratio,
        }
    }

    /// True when the run should stop after `queries` at `elapsed`, given the windows so far.
    pub fn done(
        &self,
        queries: u64,
        elapsed: Duration,
        window_throughput: &[f64],
        window_p99: &[f64],
    ) -> bool {
        if !self.max_duration.is_zero() && elapsed >= self.max_duration {
            return true;
        }
        if self.iterations > 0 {
            return queries >= self.iterations;
        }
        if self.early_stop
            && queries >= self.min_queries
            && elapsed >= self.min_duration
            && is_stable(
                window_throughput,
                self.stability_windows,
                self.stability_ratio,
            )
            && is_stable(window_p99, self.stability_windows, self.stability_ratio)
        {
            return true;
        }
        !self.duration.is_zero() && elapsed >= self.duration
    }

    fn done_for(&self, rec: &Recorder<'_>, now: Instant) -> bool {
        self.done(
            rec.queries,
            now.saturating_duration_since(rec.t0),
            &rec.window_throughput,
            &rec.window_p99,
        )
    }

    /// How far ahead a time-bounded run may go (for generating a server schedule).
    pub fn horizon(&self) -> Option<Duration> {
        match (self.duration.is_zero(), self.max_duration.is_zero()) {
            (false, true) => Some(self.duration),
            (true, false) => Some(self.max_duration),
            (false, false) => Some(self.duration.min(self.max_duration)),
            (true, true) => None,
        }
    }
}

fn check(cancel: &AtomicBool) -> Result<(), RunError> {
    if cancel.load(Ordering::Relaxed) {
        Err(RunError::Cancelled)
    } else {
        Ok(())
    }
}

/// Runs `n` untimed queries on each executor.
pub fn warm_up(
    execs: &mut [Box<dyn QueryExec + '_>],
    n: u64,
    cancel: &AtomicBool,
) -> Result<(), RunError> {
    for q in execs.iter_mut() {
        for _ in 0..n {
            check(cancel)?;
            q.run()?;
        }
    }
    Ok(())
}

/// Single-stream: one query at a time.
pub fn single_stream(
    q: &mut dyn QueryExec,
    c: &RunConfig,
    rec: &mut Recorder<'_>,
    cancel: &AtomicBool,
) -> Result<serde_json::Value, RunError> {
    let rule = StopRule::from_config(c);
    rec.restart();
    loop {
        check(cancel)?;
        let start = Instant::now();
        q.run()?;
        let end = Instant::now();
        rec.record(end.duration_since(start).as_nanos() as u64, end);
        if rule.done_for(rec, end) {
            break;
        }
    }
    Ok(json!({ "scenario": "single-stream" }))
}

/// A finished query, as workers report it to the recording thread.
enum Event {
    Done {
        /// Latency from the query's reference time (its start, or its scheduled time).
        latency: Duration,
        /// Server: how late the query was issued.
        issue_delay: Option<Duration>,
        /// Time spent executing, from the moment a worker started it.
        service: Duration,
        end: Instant,
    },
    Dropped,
    Failed(RunError),
}

/// Runs one query on a worker. Its latency counts from `scheduled` (server: no coordinated
/// omission) or, without one, from its start.
fn execute(
    q: &mut (dyn QueryExec + '_),
    scheduled: Option<Instant>,
    issue_delay: Option<Duration>,
) -> Event {
    let start = Instant::now();
    match q.run() {
        Ok(()) => {
            let end = Instant::now();
            Event::Done {
                latency: end - scheduled.unwrap_or(start),
                issue_delay,
                service: end - start,
                end,
            }
        }
        Err(e) => Event::Failed(e),
    }
}

/// Offline: every executor on its own thread, issuing back to back.
pub fn offline(
    execs: &mut [Box<dyn QueryExec + '_>],
    c: &RunConfig,
    rec: &mut Recorder<'_>,
    cancel: &AtomicBool,
) -> Result<serde_json::Value, RunError> {
    let rule = StopRule::from_config(c);
    let stop = AtomicBool::new(false);
    let tickets = AtomicU64::new(0);
    let (tx, rx) = crossbeam_channel::unbounded::<Event>();
    rec.restart();
    let streams = execs.len();
    let failure = std::thread::scope(|s| {
        for q in execs.iter_mut() {
            let (tx, stop, tickets) = (tx.clone(), &stop, &tickets);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) && !cancel.load(Ordering::Relaxed) {
                    if rule.iterations > 0
                        && tickets.fetch_add(1, Ordering::Relaxed) >= rule.iterations
                    {
                        break;
                    }
                    let event = execute(q.as_mut(), None, None);
                    let failed = matches!(event, Event::Failed(_));
                    if tx.send(event).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(tx);
        collect(&rx, rec, &rule, &stop, cancel, None)
    });
    finish_or(failure, cancel)?;
    Ok(json!({ "scenario": "offline", "concurrency": streams }))
}

/// Receives worker events until every worker is done; sets `stop` when the rule says so. It wakes
/// every couple of milliseconds and drains what arrived, rather than waking per query, so that the
/// recording thread does not compete with the workers and the issuer for CPU.
fn collect(
    rx: &crossbeam_channel::Receiver<Event>,
    rec: &mut Recorder<'_>,
    rule: &StopRule,
    stop: &AtomicBool,
    cancel: &AtomicBool,
    mut service: Option<&mut hist::LatencyHistogram>,
) -> Option<RunError> {
    let mut failure = None;
    let tick = Duration::from_millis(2);
    loop {
        std::thread::sleep(tick);
        let disconnected = loop {
            match rx.try_recv() {
                Ok(Event::Done {
                    latency,
                    issue_delay,
                    service: s,
                    end,
                }) => {
                    if let Some(d) = issue_delay {
                        rec.record_issue_delay(d.as_nanos() as u64);
                    }
                    if let Some(h) = service.as_deref_mut() {
                        hist::record_ns(h, s.as_nanos() as u64);
                    }
                    rec.record(latency.as_nanos() as u64, end);
                    if !stop.load(Ordering::Relaxed) && rule.done_for(rec, end) {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                Ok(Event::Dropped) => rec.record_drop(),
                Ok(Event::Failed(e)) => {
                    failure.get_or_insert(e);
                    stop.store(true, Ordering::Relaxed);
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break false,
                Err(crossbeam_channel::TryRecvError::Disconnected) => break true,
            }
        };
        if disconnected {
            return failure;
        }
        let now = Instant::now();
        rec.maybe_close(now);
        if cancel.load(Ordering::Relaxed) || rule.done_for(rec, now) {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

fn finish_or(failure: Option<RunError>, cancel: &AtomicBool) -> Result<(), RunError> {
    check(cancel)?;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Arrival offsets of a Poisson process at `qps`, from `seed`: at most `max` arrivals, none after
/// `horizon`. The same seed gives the same schedule.
pub fn poisson_schedule(qps: f64, max: u64, horizon: Option<Duration>, seed: u64) -> Vec<Duration> {
    const CAP: u64 = 20_000_000;
    let exp = Exp::new(qps).expect("qps > 0");
    let mut rng = StdRng::seed_from_u64(seed);
    let limit = if max == 0 { CAP } else { max.min(CAP) };
    let horizon = horizon.map(|h| h.as_secs_f64()).unwrap_or(f64::INFINITY);
    let mut t = 0.0f64;
    let mut out = Vec::with_capacity(limit.min(1 << 20) as usize);
    while (out.len() as u64) < limit {
        t += exp.sample(&mut rng);
        if t > horizon {
            break;
        }
        out.push(Duration::from_secs_f64(t));
    }
    out
}

/// Sleeps most of the way to `target`, then spins, for sub-millisecond precision; returns early when
/// `stop` is set.
fn wait_until(target: Instant, stop: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= target || stop.load(Ordering::Relaxed) {
            return;
        }
        let left = target - now;
        if left > Duration::from_micros(300) {
            std::thread::sleep((left - Duration::from_micros(200)).min(Duration::from_millis(20)));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Figures of a server run beyond the recorder's.
#[derive(Debug, Clone, Default)]
pub struct ServerStats {
    /// Target QPS.
    pub target_qps: f64,
    /// Arrivals in the schedule divided by the schedule's span.
    pub scheduled_qps: f64,
    /// Completed queries per second over the run.
    pub achieved_qps: f64,
    /// Queries issued.
    pub issued: u64,
    /// Queries dropped.
    pub dropped: u64,
    /// Issue delay (issued minus scheduled) percentiles, ms.
    pub issue_delay_p50_ms: f64,
    /// 99th percentile issue delay, ms.
    pub issue_delay_p99_ms: f64,
    /// Largest issue delay, ms.
    pub issue_delay_max_ms: f64,
    /// p99 latency measured from the scheduled time, ms.
    pub p99_ms: f64,
    /// p99 of service time (from when a worker started the query), ms; the figure a closed-loop
    /// generator would report.
    pub service_p99_ms: f64,
}

impl ServerStats {
    fn to_json(&self, bound_ms: f64) -> serde_json::Value {
        json!({
            "scenario": "server",
            "target_qps": self.target_qps,
            "scheduled_qps": self.scheduled_qps,
            "achieved_qps": self.achieved_qps,
            "issued": self.issued,
            "dropped": self.dropped,
            "issue_delay_ms": { "p50": self.issue_delay_p50_ms, "p99": self.issue_delay_p99_ms, "max": self.issue_delay_max_ms },
            "p99_ms": self.p99_ms,
            "service_p99_ms": self.service_p99_ms,
            "latency_bound_ms": bound_ms,
            "passed": if bound_ms > 0.0 { json!(self.p99_ms <= bound_ms && self.dropped == 0) } else { serde_json::Value::Null },
        })
    }
}

/// Server: Poisson arrivals at `qps`, queries queued to the executors' worker threads.
pub fn server(
    execs: &mut [Box<dyn QueryExec + '_>],
    c: &RunConfig,
    qps: f64,
    rec: &mut Recorder<'_>,
    cancel: &AtomicBool,
) -> Result<ServerStats, RunError> {
    let rule = StopRule::from_config(c);
    let schedule = poisson_schedule(qps, rule.iterations, rule.horizon(), c.seed);
    let max_outstanding = c.max_outstanding.max(1) as usize;
    let stop = AtomicBool::new(false);
    let outstanding = AtomicUsize::new(0);
    let issued = AtomicU64::new(0);
    let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<(Instant, Instant)>();
    let (tx, rx) = crossbeam_channel::unbounded::<Event>();
    let mut service = hist::new_histogram();
    rec.restart();
    let t0 = rec.t0;
    let failure = std::thread::scope(|s| {
        for q in execs.iter_mut() {
            let (jobs_rx, tx, outstanding) = (jobs_rx.clone(), tx.clone(), &outstanding);
            s.spawn(move || {
                for (scheduled, issued_at) in jobs_rx.iter() {
                    if cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    let event = execute(
                        q.as_mut(),
                        Some(scheduled),
                        Some(issued_at.saturating_duration_since(scheduled)),
                    );
                    outstanding.fetch_sub(1, Ordering::Relaxed);
                    if tx.send(event).is_err() {
                        break;
                    }
                }
            });
        }
        drop(jobs_rx);
        {
            let (tx, stop, outstanding, issued, schedule) =
                (tx.clone(), &stop, &outstanding, &issued, &schedule);
            std::thread::Builder::new()
                .name("fleetbench-issuer".into())
                .spawn_scoped(s, move || {
                    for offset in schedule {
                        let target = t0 + *offset;
                        wait_until(target, stop);
                        if stop.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed) {
                            break;
                        }
                        if outstanding.load(Ordering::Relaxed) >= max_outstanding {
                            let _ = tx.send(Event::Dropped);
                            continue;
                        }
                        outstanding.fetch_add(1, Ordering::Relaxed);
                        issued.fetch_add(1, Ordering::Relaxed);
                        if jobs_tx.send((target, Instant::now())).is_err() {
                            break;
                        }
                    }
                    drop(jobs_tx);
                })
                .expect("spawn the issuer thread");
        }
        drop(tx);
        collect(&rx, rec, &rule, &stop, cancel, Some(&mut service))
    });
    finish_or(failure, cancel)?;
    let elapsed = rec.t0.elapsed().as_secs_f64();
    let span = schedule.last().map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let ms = |ns: u64| ns as f64 / 1e6;
    let delays = rec.issue_delays();
    Ok(ServerStats {
        target_qps: qps,
        scheduled_qps: if span > 0.0 {
            schedule.len() as f64 / span
        } else {
            0.0
        },
        achieved_qps: if elapsed > 0.0 {
            rec.queries as f64 / elapsed
        } else {
            0.0
        },
        issued: issued.load(Ordering::Relaxed),
        dropped: rec.dropped,
        issue_delay_p50_ms: ms(delays.value_at_quantile(0.5)),
        issue_delay_p99_ms: ms(delays.value_at_quantile(0.99)),
        issue_delay_max_ms: ms(delays.max()),
        p99_ms: ms(rec.total.value_at_quantile(0.99)),
        service_p99_ms: ms(service.value_at_quantile(0.99)),
    })
}

/// Server scenario with its report.
pub fn server_run(
    execs: &mut [Box<dyn QueryExec + '_>],
    c: &RunConfig,
    rec: &mut Recorder<'_>,
    cancel: &AtomicBool,
) -> Result<serde_json::Value, RunError> {
    let stats = server(execs, c, c.target_qps, rec, cancel)?;
    Ok(stats.to_json(c.latency_bound_ms))
}

/// Max-QPS search: the highest server QPS whose p99 meets the latency bound without drops.
pub fn max_qps(
    execs: &mut [Box<dyn QueryExec + '_>],
    c: &RunConfig,
    rec: &mut Recorder<'_>,
    cancel: &AtomicBool,
) -> Result<serde_json::Value, RunError> {
    let bound_ms = c.latency_bound_ms;
    let probe_ms = if c.duration_ms > 0 {
        c.duration_ms
    } else {
        1000
    };
    // Capacity estimate from back-to-back queries.
    let n = 50u64;
    let t = Instant::now();
    for _ in 0..n {
        check(cancel)?;
        execs[0].run()?;
    }
    let mean = t.elapsed().as_secs_f64() / n as f64;
    let capacity = execs.len() as f64 / mean.max(1e-9);
    let mut probe_cfg = c.clone();
    probe_cfg.iterations = 0;
    probe_cfg.duration_ms = probe_ms;
    probe_cfg.max_duration_ms = 0;
    probe_cfg.early_stop = false;
    let mut steps = Vec::new();
    let mut probe = |qps: f64| -> Result<bool, RunError> {
        let mut sink = |_: fleetbench_proto::v1::TelemetryWindow| {};
        let mut scratch = Recorder::new(
            "probe",
            Duration::from_millis(probe_ms),
            0,
            1,
            None,
            &mut sink,
        );
        let s = server(execs, &probe_cfg, qps, &mut scratch, cancel)?;
        let pass = s.p99_ms <= bound_ms && s.dropped == 0;
        steps.push(json!({ "qps": qps, "p99_ms": s.p99_ms, "dropped": s.dropped, "achieved_qps": s.achieved_qps, "pass": pass }));
        Ok(pass)
    };
    let mut lo = capacity * 0.25;
    while !probe(lo)? {
        lo /= 2.0;
        if lo < 1.0 {
            return Err(RunError::Failed(format!(
                "max-qps: even {lo:.2} QPS misses the latency bound of {bound_ms} ms"
            )));
        }
    }
    let mut hi = capacity * 1.25;
    while probe(hi)? {
        lo = hi;
        hi *= 2.0;
    }
    for _ in 0..8 {
        if hi / lo <= 1.03 {
            break;
        }
        let mid = (lo * hi).sqrt();
        if probe(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut final_cfg = c.clone();
    final_cfg.target_qps = lo;
    if final_cfg.iterations == 0 && final_cfg.duration_ms == 0 && final_cfg.max_duration_ms == 0 {
        final_cfg.duration_ms = probe_ms;
    }
    let stats = server(execs, &final_cfg, lo, rec, cancel)?;
    let mut report = stats.to_json(bound_ms);
    report["scenario"] = json!("max-qps");
    report["max_qps"] = json!(lo);
    report["capacity_estimate_qps"] = json!(capacity);
    report["search"] = json!(steps);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model that takes a fixed time per query. It sleeps rather than spins, so that timing tests
    /// running side by side on a small machine do not starve each other.
    struct Fixed(Duration);

    impl QueryExec for Fixed {
        fn run(&mut self) -> Result<(), RunError> {
            std::thread::sleep(self.0);
            Ok(())
        }
    }

    /// Timing tests take turns.
    static TIMING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn timing() -> std::sync::MutexGuard<'static, ()> {
        TIMING.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn server_config(qps: f64, iterations: u64) -> RunConfig {
        fleetbench_common::config::with_defaults(RunConfig {
            scenario: fleetbench_proto::v1::Scenario::Server as i32,
            target_qps: qps,
            iterations,
            window_ms: 50,
            seed: 3,
            ..Default::default()
        })
    }

    fn run_server(exec: Duration, c: &RunConfig) -> (ServerStats, Vec<f64>) {
        let mut windows = Vec::new();
        let mut emit = |w: fleetbench_proto::v1::TelemetryWindow| {
            let h = hist::decode(&w.latency_histogram).unwrap();
            windows.push(h.value_at_quantile(0.99) as f64 / 1e6);
        };
        let mut rec = Recorder::new(
            "t",
            Duration::from_millis(c.window_ms as u64),
            0,
            1,
            None,
            &mut emit,
        );
        let mut execs: Vec<Box<dyn QueryExec>> = vec![Box::new(Fixed(exec))];
        let stats = server(
            &mut execs,
            c,
            c.target_qps,
            &mut rec,
            &AtomicBool::new(false),
        )
        .unwrap();
        rec.finish();
        drop(rec);
        (stats, windows)
    }

    #[test]
    fn a_server_that_keeps_up_achieves_its_schedule() {
        let _t = timing();
        let c = server_config(500.0, 600);
        let (s, _) = run_server(Duration::from_micros(200), &c);
        assert_eq!(s.dropped, 0);
        assert_eq!(s.issued, 600);
        assert!(
            (s.achieved_qps - s.scheduled_qps).abs() / s.scheduled_qps < 0.05,
            "{s:?}"
        );
        assert!(s.p99_ms < 25.0, "{s:?}");
        assert!(
            s.issue_delay_p50_ms < 1.0,
            "the issuer keeps its schedule: {s:?}"
        );
    }

    #[test]
    fn latency_from_the_schedule_exposes_queueing_that_send_time_hides() {
        // 1000 arrivals/s into a model that needs 2 ms per query: the backlog grows all run long.
        let _t = timing();
        let c = server_config(1000.0, 300);
        let (s, windows) = run_server(Duration::from_millis(2), &c);
        assert!(
            s.service_p99_ms < 25.0,
            "each query still takes ~2 ms once started: {s:?}"
        );
        assert!(
            s.p99_ms > 100.0,
            "measured from its schedule, the last query waited ~300 ms: {s:?}"
        );
        assert!(windows.len() >= 3, "{windows:?}");
        assert!(
            windows.last().unwrap() > &(windows[0] * 3.0),
            "p99 grows with the backlog: {windows:?}"
        );
        assert!(s.achieved_qps < 600.0, "{s:?}");
    }

    #[test]
    fn queries_beyond_the_outstanding_cap_are_dropped_and_counted() {
        let _t = timing();
        let mut c = server_config(2000.0, 400);
        c.max_outstanding = 4;
        let (s, _) = run_server(Duration::from_millis(2), &c);
        assert!(s.dropped > 100, "{s:?}");
        assert_eq!(s.dropped + s.issued, 400);
    }

    #[test]
    fn offline_runs_exactly_the_iterations_asked_across_streams() {
        let c = fleetbench_common::config::with_defaults(RunConfig {
            scenario: fleetbench_proto::v1::Scenario::Offline as i32,
            iterations: 1000,
            concurrency: 2,
            ..Default::default()
        });
        let mut sink = |_: fleetbench_proto::v1::TelemetryWindow| {};
        let mut rec = Recorder::new("t", Duration::from_millis(50), 0, 1, None, &mut sink);
        let mut execs: Vec<Box<dyn QueryExec>> = vec![
            Box::new(Fixed(Duration::from_micros(50))),
            Box::new(Fixed(Duration::from_micros(50))),
        ];
        offline(&mut execs, &c, &mut rec, &AtomicBool::new(false)).unwrap();
        assert_eq!(rec.queries, 1000);
    }

    #[test]
    fn max_qps_finds_the_knee() {
        let _t = timing();
        // One stream at 1 ms per query: capacity 1000/s; a 20 ms p99 bound allows most of it.
        let c = fleetbench_common::config::with_defaults(RunConfig {
            scenario: fleetbench_proto::v1::Scenario::MaxQps as i32,
            latency_bound_ms: 20.0,
            duration_ms: 400,
            window_ms: 100,
            ..Default::default()
        });
        let mut sink = |_: fleetbench_proto::v1::TelemetryWindow| {};
        let mut rec = Recorder::new("t", Duration::from_millis(100), 0, 1, None, &mut sink);
        let mut execs: Vec<Box<dyn QueryExec>> = vec![Box::new(Fixed(Duration::from_millis(1)))];
        let report = max_qps(&mut execs, &c, &mut rec, &AtomicBool::new(false)).unwrap();
        let max = report["max_qps"].as_f64().unwrap();
        assert!((200.0..=1100.0).contains(&max), "{report}");
        assert!(report["search"].as_array().unwrap().len() >= 3, "{report}");
    }

    #[test]
    fn schedules_are_seeded_poisson() {
        let a = poisson_schedule(1000.0, 20_000, None, 7);
        let b = poisson_schedule(1000.0, 20_000, None, 7);
        assert_eq!(a, b, "same seed, same schedule");
        assert_ne!(a, poisson_schedule(1000.0, 20_000, None, 8));
        let gaps: Vec<f64> = std::iter::once(a[0].as_secs_f64())
            .chain(a.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()))
            .collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!(
            (mean - 1e-3).abs() / 1e-3 < 0.03,
            "mean inter-arrival {mean}"
        );
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        let cv = var.sqrt() / mean;
        assert!(
            (cv - 1.0).abs() < 0.05,
            "exponential gaps have CV 1, got {cv}"
        );
        let h = poisson_schedule(1000.0, 0, Some(Duration::from_secs(2)), 1);
        assert!(h.last().unwrap() <= &Duration::from_secs(2));
        assert!((h.len() as f64 - 2000.0).abs() < 200.0, "{}", h.len());
    }

    #[test]
    fn stop_rules() {
        let c = RunConfig {
            iterations: 10,
            ..Default::default()
        };
        let r = StopRule::from_config(&c);
        assert!(!r.done(9, Duration::from_secs(100), &[], &[]));
        assert!(r.done(10, Duration::ZERO, &[], &[]));
        let c = RunConfig {
            duration_ms: 10_000,
            early_stop: true,
            min_queries: 100,
            min_duration_ms: 1000,
            stability_windows: 3,
            stability_ratio: 1.1,
            ..Default::default()
        };
        let r = StopRule::from_config(&c);
        let stable = [100.0, 101.0, 102.0];
        assert!(
            !r.done(50, Duration::from_secs(2), &stable, &stable),
            "too few queries"
        );
        assert!(
            !r.done(500, Duration::from_millis(500), &stable, &stable),
            "too short"
        );
        assert!(
            !r.done(500, Duration::from_secs(2), &[100.0, 150.0, 100.0], &stable),
            "unstable"
        );
        assert!(
            r.done(500, Duration::from_secs(2), &stable, &stable),
            "valid and stable"
        );
        assert!(
            r.done(1, Duration::from_secs(10), &[], &[]),
            "planned duration reached"
        );
        let hard = StopRule::from_config(&RunConfig {
            iterations: 1_000_000,
            max_duration_ms: 100,
            ..Default::default()
        });
        assert!(
            hard.done(5, Duration::from_millis(150), &[], &[]),
            "max duration caps iterations"
        );
    }
}
