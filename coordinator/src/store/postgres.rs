//! Postgres, for teams and for several coordinator replicas on one database. Leases lock rows with
//! `FOR UPDATE SKIP LOCKED` and take a per-host advisory lock, so no task runs twice and two agents of
//! one host never run at once, whichever replica leases.

use std::time::Duration;

use sqlx::any::AnyPoolOptions;

use super::redact_url;
use super::sql::{Backend, EmbeddedMigrations, SqlStore, migrate};
use crate::error::{Error, Result};

/// Schema migrations for Postgres (file names match migrations/sqlite).
pub const MIGRATIONS: EmbeddedMigrations = &[
    (
        1,
        "init",
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "window ingest batch",
        include_str!("../../../migrations/postgres/0002_window_ingest_batch.sql"),
    ),
    (
        3,
        "tasks run index",
        include_str!("../../../migrations/postgres/0003_tasks_run_index.sql"),
    ),
];

/// Connects to a `postgres://` URL and migrates the database.
pub async fn open(url: &str) -> Result<SqlStore> {
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .map_err(|e| {
            Error::Unavailable(format!(
                "cannot connect to database {}: {e}",
                redact_url(url)
            ))
        })?;
    migrate(&pool, MIGRATIONS).await?;
    Ok(SqlStore {
        pool,
        backend: Backend::Postgres,
        write_lock: None,
    })
}
