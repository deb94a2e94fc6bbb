//! Postgres, for teams and for several coordinator replicas on one database. Leases lock rows with
//! `FOR UPDATE SKIP LOCKED` and take a per-host advisory lock, so no task runs twice and two agents of
//! one host never run at once, whichever replica leases.

use std::time::Duration;

use sqlx::Connection;
use sqlx::any::AnyPoolOptions;

use super::redact_url;
use super::sql::migrate::migrate;
use super::sql::{Backend, EmbeddedMigrations, SqlStore};
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
    (
        4,
        "domain stored forms",
        include_str!("../../../migrations/postgres/0004_domain_stored_forms.sql"),
    ),
    (
        5,
        "drop protobuf columns",
        include_str!("../../../migrations/postgres/0005_drop_protobuf_columns.sql"),
    ),
    (
        6,
        "pool key",
        include_str!("../../../migrations/postgres/0006_pool_key.sql"),
    ),
    (
        7,
        "replicas",
        include_str!("../../../migrations/postgres/0007_replicas.sql"),
    ),
    (
        8,
        "artifact sets",
        include_str!("../../../migrations/postgres/0008_artifact_sets.sql"),
    ),
    (
        9,
        "tokens",
        include_str!("../../../migrations/postgres/0009_tokens.sql"),
    ),
    (
        10,
        "credential renewal",
        include_str!("../../../migrations/postgres/0010_credential_renewal.sql"),
    ),
    (
        11,
        "generation windows",
        include_str!("../../../migrations/postgres/0011_generation_windows.sql"),
    ),
    (
        12,
        "agent network",
        include_str!("../../../migrations/postgres/0012_agent_network.sql"),
    ),
];

/// Connects to a `postgres://` URL and migrates the database.
pub async fn open(url: &str) -> Result<SqlStore> {
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(16)
        // A connection still in a transaction (a COMMIT that failed) is closed, not reused.
        .after_release(|conn, _| Box::pin(async move { Ok(!conn.is_in_transaction()) }))
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .map_err(|e| {
            Error::Unavailable(format!(
                "cannot connect to database {}: {e}",
                redact_url(url)
            ))
        })?;
    let store = SqlStore {
        pool,
        backend: Backend::Postgres,
        write_lock: None,
        files: None,
    };
    migrate(&store, MIGRATIONS).await?;
    Ok(store)
}
