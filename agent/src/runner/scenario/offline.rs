//! Offline: every executor on its own thread, issuing queries back to back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fleetbench_common::domain::RunConfig;
use serde_json::json;

use super::collect::{Event, collect, execute, finish_or};
use super::{QueryExec, StopRule};
use crate::runner::RunError;
use crate::runner::recorder::Recorder;

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
                        && tickets.fetch_add(rule.per_call, Ordering::Relaxed) >= rule.iterations
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::runner::scenario::testing::Fixed;
    use fleetbench_common::domain::Scenario;

    #[test]
    fn offline_runs_exactly_the_iterations_asked_across_streams() {
        let c = fleetbench_common::config::with_defaults(RunConfig {
            scenario: Scenario::Offline,
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
}
