//! SQLite, the embedded default: one file, WAL journal, a busy timeout so that writers queue instead of
//! failing. Leases are single atomic statements, since SQLite has one writer at a time.

use sqlx::Executor;
use sqlx::any::AnyPoolOptions;

use super::redact_url;
use super::sql::{Backend, EmbeddedMigrations, SqlStore, migrate};
use crate::error::{Error, Result};

/// Schema migrations for SQLite (file names match migrations/postgres).
pub const MIGRATIONS: EmbeddedMigrations = &[
    (
        1,
        "init",
        include_str!("../../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "window ingest batch",
        include_str!("../../../migrations/sqlite/0002_window_ingest_batch.sql"),
    ),
    (
        3,
        "tasks run index",
        include_str!("../../../migrations/sqlite/0003_tasks_run_index.sql"),
    ),
];

/// Opens (creating when missing) a SQLite database from a `sqlite://PATH` URL and migrates it.
pub async fn open(url: &str) -> Result<SqlStore> {
    sqlx::any::install_default_drivers();
    let path = url.trim_start_matches("sqlite://");
    if path.is_empty() || path.starts_with(':') {
        return Err(Error::InvalidArgument(format!(
            "database URL '{url}' names no file; use sqlite://PATH (in-memory databases are not shared across connections)"
        )));
    }
    let url = if url.contains('?') {
        url.to_string()
    } else {
        format!("{url}?mode=rwc")
    };
    let pool = AnyPoolOptions::new()
        .max_connections(8)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 30000; \
                     PRAGMA foreign_keys = ON; PRAGMA cache_size = -4096; PRAGMA wal_autocheckpoint = 0; \
                     PRAGMA journal_size_limit = 67108864;",
                )
                .await?;
                Ok(())
            })
        })
        .connect(&url)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot open database {}: {e}", redact_url(&url))))?;
    migrate(&pool, MIGRATIONS).await?;
    spawn_checkpointer(pool.clone());
    Ok(SqlStore {
        pool,
        backend: Backend::Sqlite,
        write_lock: Some(tokio::sync::Mutex::new(())),
    })
}

/// Checkpoints the WAL in the background. Automatic checkpoints are off: they run inside the commit that
/// crosses the threshold and stall it (and every acknowledgement waiting on it) for hundreds of
/// milliseconds. A PASSIVE checkpoint never blocks writers, and the WAL is truncated back to its limit
/// once it has been copied.
fn spawn_checkpointer(pool: sqlx::AnyPool) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if pool.is_closed() {
                return;
            }
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                tracing::debug!(error = %e, "WAL checkpoint skipped.");
            }
        }
    });
}
