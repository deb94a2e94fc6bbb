//! Background upkeep, one replica at a time (each job is claimed in the database): raw telemetry
//! windows older than `window_retention_days` are dropped (run summaries and histograms stay, so
//! rankings do not change), and uploads left unfinished for `upload_expiry_hours` are collected.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::context::{Context, stopped};
use crate::error::Result;

/// How often upkeep runs.
const EVERY: Duration = Duration::from_secs(600);

/// How long one claim holds (longer than a round takes).
const CLAIM_MS: i64 = 15 * 60 * 1000;

/// Runs per batch of window retention (each run's windows go in one transaction).
const RUNS_PER_BATCH: u32 = 50;

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Upkeep {
    /// Windows dropped by retention (None: another replica holds the claim, or retention is off).
    pub windows_dropped: Option<u64>,
    /// Uploads collected (None: another replica holds the claim).
    pub uploads_collected: Option<usize>,
}

/// One round at time `now` (Unix ms).
pub async fn run_once(ctx: &Context, now: i64) -> Result<Upkeep> {
    let mut done = Upkeep::default();
    let days = ctx.config.window_retention_days;
    if days > 0
        && ctx
            .store
            .claim("window_retention", &ctx.replica_id, now, now + CLAIM_MS)
            .await?
    {
        let before = now - days as i64 * 86_400_000;
        let mut total = 0;
        loop {
            let n = ctx.store.drop_windows(before, RUNS_PER_BATCH).await?;
            if n == 0 {
                break;
            }
            total += n;
        }
        if total > 0 {
            tracing::info!(
                windows = total,
                days,
                "Dropped raw telemetry windows past retention."
            );
        }
        done.windows_dropped = Some(total);
    }
    if ctx
        .store
        .claim("upload_expiry", &ctx.replica_id, now, now + CLAIM_MS)
        .await?
    {
        done.uploads_collected = Some(crate::artifacts::expire(ctx, now).await?);
    }
    Ok(done)
}

/// Runs upkeep every [`EVERY`] until `stopping`.
pub async fn run(ctx: Arc<Context>, mut stopping: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(&mut stopping) => return,
        }
        if let Err(e) = run_once(&ctx, fleetbench_common::now_ms()).await {
            tracing::warn!(error = %e, "Upkeep failed; it runs again later.");
        }
    }
}
