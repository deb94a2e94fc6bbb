//! What every part of one coordinator process shares: the store, the settings, the registry of
//! connected agents, change notifications for watchers and the scheduler, the shutdown signal, and the
//! database's recent health.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use tokio::sync::{Notify, watch};

use crate::config::CoordinatorConfig;
use crate::registry::Registry;
use crate::store::Store;

/// Counters of what ingest refused, for operators and tests.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Windows refused on arrival (they failed [`crate::ingest::check_window`]).
    pub bad_windows: AtomicU64,
    /// Windows for a run leased to another agent, discarded.
    pub foreign_windows: AtomicU64,
    /// Windows the database refused for good.
    pub refused_windows: AtomicU64,
}

/// Shared state of one coordinator process.
pub struct Context {
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Settings.
    pub config: Arc<CoordinatorConfig>,
    /// Agent sessions connected to this process.
    pub registry: Registry,
    /// Becomes true when the server shuts down; long-lived streams (sessions, watches) end then.
    pub stopping: watch::Receiver<bool>,
    /// What ingest refused.
    pub stats: IngestStats,
    /// This coordinator process's id among replicas (leases it renews carry it).
    pub replica_id: String,
    /// Hash states of uploads in progress.
    pub uploads: crate::artifacts::Hashers,
    /// Limits per token.
    pub quotas: crate::quota::Quotas,
    /// Metrics.
    pub telemetry: Arc<crate::otel::Telemetry>,
    /// Takes stored windows to the metrics.
    pub recorder: crate::otel::windows::Recorder,
    /// Bumped when something changes that any watcher may care about (rare: sessions, expiries).
    changes: watch::Sender<u64>,
    /// Bumped when one job's tasks or runs change, for that job's watchers only.
    job_changes: std::sync::Mutex<std::collections::HashMap<String, watch::Sender<u64>>>,
    /// Wakes the scheduler.
    wake: Notify,
    /// When (Unix ms) a database call last failed.
    store_trouble_at: AtomicI64,
}

/// A new replica id.
pub fn new_replica_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Resolves once `rx` holds true (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        let done = *rx.borrow_and_update();
        if done || rx.changed().await.is_err() {
            return;
        }
    }
}

impl Context {
    /// A context over `store` with `config`, whose metrics go nowhere; `stopping` turns true at
    /// shutdown.
    pub fn new(
        store: Arc<dyn Store>,
        config: CoordinatorConfig,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        let telemetry = Arc::new(crate::otel::Telemetry::off());
        Self::with_telemetry(store, config, stopping, new_replica_id(), telemetry).0
    }

    /// A context whose metrics go to `telemetry`, for the replica `replica_id`; the receiver is the
    /// window recorder's, to run with [`crate::otel::windows::run`].
    pub fn with_telemetry(
        store: Arc<dyn Store>,
        config: CoordinatorConfig,
        stopping: watch::Receiver<bool>,
        replica_id: String,
        telemetry: Arc<crate::otel::Telemetry>,
    ) -> (
        Self,
        tokio::sync::mpsc::Receiver<crate::otel::windows::Event>,
    ) {
        let (recorder, events) = crate::otel::windows::Recorder::new(telemetry.enabled());
        let ctx = Self {
            store,
            quotas: crate::quota::Quotas::new(&config),
            config: Arc::new(config),
            registry: Registry::default(),
            stopping,
            stats: IngestStats::default(),
            replica_id,
            telemetry,
            recorder,
            uploads: Default::default(),
            changes: watch::channel(0).0,
            job_changes: Default::default(),
            wake: Notify::new(),
            store_trouble_at: AtomicI64::new(0),
        };
        (ctx, events)
    }

    /// Records that a database call failed just now. Leases do not expire until the database has
    /// been healthy for a whole lease timeout, so an outage does not requeue tasks whose agents kept
    /// working.
    pub fn store_trouble(&self) {
        self.store_trouble_at
            .store(fleetbench_common::now_ms(), Ordering::Relaxed);
    }

    /// When (Unix ms) a database call last failed for want of a connection; 0 when never.
    pub fn trouble_at(&self) -> i64 {
        self.store_trouble_at.load(Ordering::Relaxed)
    }

    /// True when the database has worked for at least a lease timeout.
    pub fn store_settled(&self, now: i64) -> bool {
        now - self.store_trouble_at.load(Ordering::Relaxed) > self.config.lease_timeout_ms as i64
    }

    /// Tells watchers that jobs or tasks changed.
    pub fn notify_watchers(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Tells watchers and the scheduler that something changed.
    pub fn changed(&self) {
        self.notify_watchers();
        self.kick();
    }

    /// Wakes the scheduler loop.
    pub fn kick(&self) {
        self.wake.notify_one();
    }

    /// Resolves at the next kick.
    pub async fn kicked(&self) {
        self.wake.notified().await
    }

    /// A receiver of change notifications.
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A receiver of the changes of one job.
    pub fn watch_job(&self, job_id: &str) -> watch::Receiver<u64> {
        self.job_changes
            .lock()
            .expect("job watchers")
            .entry(job_id.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Tells the watchers of these jobs (and only them) that they changed.
    pub fn jobs_changed<'a>(&self, job_ids: impl IntoIterator<Item = &'a str>) {
        let mut watchers = self.job_changes.lock().expect("job watchers");
        for id in job_ids {
            if let Some(tx) = watchers.get(id) {
                tx.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
        watchers.retain(|_, tx| tx.receiver_count() > 0);
    }

    /// An agent is no longer running `run_id`: its session is idle again and the scheduler looks
    /// for work for it.
    pub fn run_ended(&self, agent_id: &str, run_id: &str) {
        self.registry.run_ended(agent_id, run_id);
        self.kick();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_change_wakes_only_the_watchers_of_its_job() {
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("fleet.db").display());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = rt.block_on(crate::store::open(&url)).unwrap();
        let ctx = super::Context::new(store, Default::default(), stopping);
        let a = ctx.watch_job("a");
        let b = ctx.watch_job("b");
        ctx.jobs_changed(["b"]);
        assert!(
            !a.has_changed().unwrap(),
            "a's watcher slept through b's change"
        );
        assert!(b.has_changed().unwrap());
    }
}
