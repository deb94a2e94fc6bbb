//! The fleetbench coordinator: accepts models and jobs, leases tasks to agents, stores their telemetry,
//! and ranks platforms per model.
//!
//! Layout: [`grpc`] holds thin tonic adapters; the domain lives in [`models`], [`jobs`], [`fleet`],
//! [`scheduler`] (sessions, leasing, lease expiry), [`ingest`] (windows, heartbeats, results),
//! [`summary`] (run figures and validity) and [`ranking`]; durable state is behind [`store::Store`].

pub mod config;
pub mod error;
pub mod fleet;
pub mod grpc;
pub mod ingest;
pub mod jobs;
pub mod models;
pub mod ranking;
pub mod scheduler;
mod server;
pub mod store;
pub mod summary;

use std::sync::Arc;

pub use config::CoordinatorConfig;
pub use error::{Error, Result};
pub use server::{serve, serve_with_store};

/// Shared state of one coordinator process.
pub struct Coordinator {
    /// Durable state.
    pub store: Arc<dyn store::Store>,
    /// Settings.
    pub config: Arc<CoordinatorConfig>,
    /// Agent sessions connected to this process.
    pub hub: Arc<scheduler::Hub>,
    /// Ordered writer of windows and results.
    pub ingest: ingest::IngestHandle,
    /// Batched writer of heartbeats.
    pub heartbeats: ingest::HeartbeatHandle,
    /// Bumped whenever jobs or tasks change here, for watchers.
    pub changes: tokio::sync::watch::Sender<u64>,
    /// Becomes true when the server shuts down; long-lived streams (sessions, watches) end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// When (Unix ms) a database call last failed. Leases do not expire until the database has been
    /// healthy for a whole lease timeout, so an outage does not requeue tasks whose agents kept working.
    pub store_trouble_at: std::sync::atomic::AtomicI64,
}

/// Resolves once `rx` holds true (or its sender is gone).
pub async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        let done = *rx.borrow_and_update();
        if done || rx.changed().await.is_err() {
            return;
        }
    }
}

impl Coordinator {
    /// Records that a database call failed just now.
    pub fn store_trouble(&self) {
        self.store_trouble_at.store(
            fleetbench_common::now_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// True when the database has worked for at least a lease timeout.
    pub fn store_settled(&self, now: i64) -> bool {
        now - self
            .store_trouble_at
            .load(std::sync::atomic::Ordering::Relaxed)
            > self.config.lease_timeout_ms as i64
    }

    /// Tells watchers and the scheduler that something changed.
    pub fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
        self.hub.kick();
    }
}
