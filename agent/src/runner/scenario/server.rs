//! Server: Poisson arrivals at a target QPS from a seeded schedule, issued by a dedicated thread
//! (sleep, then spin) to the executors' worker threads. A query's latency runs from its scheduled time,
//! so a backlog cannot hide (no coordinated omission). The schedule is drawn as the run goes, from the
//! same seeded sequence every time: it takes no memory however long the run lasts.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fleetbench_common::domain::RunConfig;
use fleetbench_common::hist;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Exp};
use serde_json::json;

use super::collect::{Event, collect, execute, finish_or};
use super::{QueryExec, StopRule};
use crate::runner::RunError;
use crate::runner::recorder::Recorder;

/// The arrival offsets of a Poisson process at `qps`, drawn from `seed`: the same seed gives the same
/// sequence.
pub struct PoissonArrivals {
    exp: Exp<f64>,
    rng: StdRng,
    t: f64,
}

impl PoissonArrivals {
    /// Arrivals at `qps` (> 0) from `seed`.
    pub fn new(qps: f64, seed: u64) -> Self {
        Self {
            exp: Exp::new(qps).expect("qps > 0"),
            rng: StdRng::seed_from_u64(seed),
            t: 0.0,
        }
    }
}

impl Iterator for PoissonArrivals {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.t += self.exp.sample(&mut self.rng);
        Some(Duration::from_secs_f64(self.t))
    }
}

/// The first arrivals of [`PoissonArrivals`]: at most `max` (0: no limit) and none after `horizon`.
pub fn poisson_schedule(qps: f64, max: u64, horizon: Option<Duration>, seed: u64) -> Vec<Duration> {
    let horizon = horizon.unwrap_or(Duration::MAX);
    let limit = if max == 0 { u64::MAX } else { max };
    PoissonArrivals::new(qps, seed)
        .take_while(|t| *t <= horizon)
        .take(limit.min(usize::MAX as u64) as usize)
        .collect()
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
    /// Arrivals drawn divided by the span up to the last of them.
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
    pub(crate) fn to_json(&self, bound_ms: f64) -> serde_json::Value {
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
    let max_outstanding = c.max_outstanding.max(1) as usize;
    let stop = AtomicBool::new(false);
    let outstanding = AtomicUsize::new(0);
    let issued = AtomicU64::new(0);
    // Arrivals drawn so far and the offset of the last, for the achieved schedule.
    let scheduled = AtomicU64::new(0);
    let last_offset_ns = AtomicU64::new(0);
    let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<(Instant, Instant)>();
    let (tx, rx) = crossbeam_channel::unbounded::<Event>();
    let mut service = hist::new_histogram();
    rec.restart();
    let t0 = rec.t0;
    // A generate request takes many calls: once the phase is over, requests still queued are
    // dropped (and counted) rather than run for what could be minutes past its end.
    let drop_queued = c.scenario == fleetbench_common::domain::Scenario::Generate;
    let failure = std::thread::scope(|s| {
        for q in execs.iter_mut() {
            let (jobs_rx, tx, outstanding, stop) =
                (jobs_rx.clone(), tx.clone(), &outstanding, &stop);
            s.spawn(move || {
                for (scheduled, issued_at) in jobs_rx.iter() {
                    if cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    if drop_queued && stop.load(Ordering::Relaxed) {
                        outstanding.fetch_sub(1, Ordering::Relaxed);
                        if tx.send(Event::Dropped).is_err() {
                            break;
                        }
                        continue;
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
            let (tx, stop, outstanding, issued, scheduled, last_offset_ns) = (
                tx.clone(),
                &stop,
                &outstanding,
                &issued,
                &scheduled,
                &last_offset_ns,
            );
            let limit = if rule.iterations == 0 {
                usize::MAX
            } else {
                rule.iterations.min(usize::MAX as u64) as usize
            };
            std::thread::Builder::new()
                .name("fleetbench-issuer".into())
                .spawn_scoped(s, move || {
                    for offset in PoissonArrivals::new(qps, c.seed).take(limit) {
                        let target = t0 + offset;
                        wait_until(target, stop);
                        if stop.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed) {
                            break;
                        }
                        scheduled.fetch_add(1, Ordering::Relaxed);
                        last_offset_ns.store(offset.as_nanos() as u64, Ordering::Relaxed);
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
    let span = last_offset_ns.load(Ordering::Relaxed) as f64 / 1e9;
    let ms = |ns: u64| ns as f64 / 1e6;
    let delays = rec.issue_delays();
    Ok(ServerStats {
        target_qps: qps,
        scheduled_qps: if span > 0.0 {
            scheduled.load(Ordering::Relaxed) as f64 / span
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::scenario::testing::{Fixed, timing};
    use fleetbench_common::domain::Scenario;

    fn server_config(qps: f64, iterations: u64) -> RunConfig {
        fleetbench_common::config::with_defaults(RunConfig {
            scenario: Scenario::Server,
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
    fn a_server_that_keeps_up_issues_its_whole_schedule() {
        // Assertions on the schedule and the issue delays, which a busy machine does not change;
        // achieved rates belong to the server_scenario benchmark.
        let _t = timing();
        let c = server_config(500.0, 600);
        let (s, _) = run_server(Duration::from_micros(200), &c);
        assert_eq!(s.dropped, 0);
        assert_eq!(s.issued, 600, "every arrival of the schedule was issued");
        let schedule = poisson_schedule(500.0, 600, None, c.seed);
        let expected = schedule.len() as f64 / schedule.last().unwrap().as_secs_f64();
        assert!(
            (s.scheduled_qps - expected).abs() / expected < 1e-9,
            "the issuer drew the seeded schedule: {s:?}, expected {expected}"
        );
        assert!(
            s.issue_delay_p50_ms <= s.issue_delay_p99_ms
                && s.issue_delay_p99_ms <= s.issue_delay_max_ms,
            "{s:?}"
        );
    }

    #[test]
    fn latency_from_the_schedule_exposes_queueing_that_send_time_hides() {
        // 1000 arrivals/s into a model that needs 2 ms per query: the backlog grows all run long.
        let _t = timing();
        let c = server_config(1000.0, 300);
        let (s, windows) = run_server(Duration::from_millis(2), &c);
        assert!(
            s.p99_ms > 100.0,
            "measured from its schedule, the last query waited ~300 ms: {s:?}"
        );
        assert!(
            s.service_p99_ms * 3.0 < s.p99_ms,
            "a query takes ~2 ms once started; the rest of its latency is queueing: {s:?}"
        );
        assert!(windows.len() >= 3, "{windows:?}");
        assert!(
            windows.last().unwrap() > &(windows[0] * 3.0),
            "p99 grows with the backlog: {windows:?}"
        );
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
}
