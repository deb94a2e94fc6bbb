//! SQLite, the embedded default: one file, WAL journal, `synchronous = FULL` (a window acknowledged as
//! stored survives a power failure: each commit is synced to disk), a busy timeout so that writers
//! queue instead of failing. Leases are single atomic statements, since SQLite has one writer at a
//! time.

use sqlx::any::AnyPoolOptions;
use sqlx::{Connection, Executor};

use super::redact_url;
use super::sql::migrate::migrate;
use super::sql::{Backend, EmbeddedMigrations, SqlStore};
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
    (
        4,
        "domain stored forms",
        include_str!("../../../migrations/sqlite/0004_domain_stored_forms.sql"),
    ),
    (
        5,
        "drop protobuf columns",
        include_str!("../../../migrations/sqlite/0005_drop_protobuf_columns.sql"),
    ),
    (
        6,
        "pool key",
        include_str!("../../../migrations/sqlite/0006_pool_key.sql"),
    ),
    (
        7,
        "replicas",
        include_str!("../../../migrations/sqlite/0007_replicas.sql"),
    ),
    (
        8,
        "artifact sets",
        include_str!("../../../migrations/sqlite/0008_artifact_sets.sql"),
    ),
    (
        9,
        "tokens",
        include_str!("../../../migrations/sqlite/0009_tokens.sql"),
    ),
    (
        10,
        "credential renewal",
        include_str!("../../../migrations/sqlite/0010_credential_renewal.sql"),
    ),
    (
        11,
        "generation windows",
        include_str!("../../../migrations/sqlite/0011_generation_windows.sql"),
    ),
    (
        12,
        "agent network",
        include_str!("../../../migrations/sqlite/0012_agent_network.sql"),
    ),
];

/// Opens (creating when missing) a SQLite database from a `sqlite://PATH` URL and migrates it. Blob
/// files live under `data_dir`, by default the database file's folder.
pub async fn open(url: &str, data_dir: Option<&std::path::Path>) -> Result<SqlStore> {
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
        // A COMMIT that fails (a full disk) leaves SQLite's transaction open on its connection, and
        // sqlx's count of it too; such a connection is closed (which rolls the transaction back)
        // instead of going back to the pool, where it would fail every transaction after.
        .after_release(|conn, _| Box::pin(async move { Ok(!conn.is_in_transaction()) }))
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 30000; \
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
    let file = std::path::PathBuf::from(path.split('?').next().unwrap_or(path));
    let data_dir = match data_dir {
        Some(d) => d.to_path_buf(),
        None => match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        },
    };
    let mut store = SqlStore {
        pool: pool.clone(),
        backend: Backend::Sqlite,
        write_lock: Some(tokio::sync::Mutex::new(())),
        files: None,
    };
    migrate(&store, MIGRATIONS).await?;
    store.files = Some(super::sql::BlobDir::new(data_dir.clone())?);
    claim_data_dir(&store, &data_dir).await?;
    store.sweep_blob_files().await?;
    store.move_inline_blobs().await?;
    let wal = std::path::PathBuf::from(format!("{}-wal", path.split('?').next().unwrap_or(path)));
    spawn_checkpointer(pool, wal);
    Ok(store)
}

/// Marks the data directory as this database's, refusing one that holds another database's blobs
/// (two databases sharing a folder would each collect the other's files as unreferenced).
async fn claim_data_dir(store: &SqlStore, dir: &std::path::Path) -> Result<()> {
    let id = store.database_id().await?;
    let marker = dir.join("blobs").join("DATABASE");
    match std::fs::read_to_string(&marker) {
        Ok(found) if found.trim() == id => Ok(()),
        Ok(found) => Err(Error::FailedPrecondition(format!(
            "data directory {} holds the blobs of another database (id {}, this one is {id}); give \
             this database its own --data-dir",
            dir.display(),
            found.trim()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::write(&marker, &id)
            .map_err(|e| Error::io(&format!("cannot write {}", marker.display()), e)),
        Err(e) => Err(Error::io(&format!("cannot read {}", marker.display()), e)),
    }
}

/// A WAL larger than this is checkpointed with TRUNCATE, which waits for readers.
const WAL_BOUND_BYTES: u64 = 64 << 20;

/// Checkpoints the WAL in the background. Automatic checkpoints are off: they run inside the commit that
/// crosses the threshold and stall it (and every acknowledgement waiting on it) for hundreds of
/// milliseconds. A PASSIVE checkpoint never blocks writers, but it cannot pass a reader that is still
/// active, so with readers always busy the WAL would grow without bound: past [`WAL_BOUND_BYTES`] a
/// TRUNCATE checkpoint waits for them (through the busy timeout) and empties the file.
fn spawn_checkpointer(pool: sqlx::AnyPool, wal: std::path::PathBuf) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if pool.is_closed() {
                return;
            }
            let big = std::fs::metadata(&wal).is_ok_and(|m| m.len() > WAL_BOUND_BYTES);
            let mode = if big { "TRUNCATE" } else { "PASSIVE" };
            if let Err(e) = sqlx::query(&format!("PRAGMA wal_checkpoint({mode})"))
                .execute(&pool)
                .await
            {
                tracing::debug!(error = %e, mode, "WAL checkpoint skipped.");
            }
        }
    });
}
