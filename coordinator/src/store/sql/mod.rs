//! The SQL shared by both backends, on sqlx's `Any` driver. Placeholders are `$N`, types are TEXT,
//! BIGINT, DOUBLE PRECISION and BLOB/BYTEA, and aggregates are cast to BIGINT, so each statement means
//! the same on SQLite and Postgres. Domain values are stored in forms the coordinator owns: plain
//! columns, and JSON of the domain types (serde) where a value is a whole structure.
//!
//! One file per aggregate: [`blobs`] (blobs and variants), [`agents`], [`jobs`] (jobs and tasks),
//! [`leases`], [`telemetry`] (windows and runs); [`migrate`] applies the schema and converts rows that
//! older versions stored as protobuf.

mod agents;
pub(crate) mod blobs;
mod jobs;
mod leases;
pub(crate) mod migrate;
mod telemetry;
mod tokens;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::AnyPool;
use sqlx::Row;
use sqlx::{Any, Transaction};

use super::Store;
use crate::error::{Error, Result};

pub use blobs::{BlobDir, free_bytes};
pub use migrate::EmbeddedMigrations;

/// Size of one stored blob chunk.
pub const BLOB_CHUNK_BYTES: usize = 1 << 20;

/// Most rows in one multi-row INSERT (SQLite allows 32766 bound values).
const ROWS_PER_INSERT: usize = 400;

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite: one writer at a time; statements are atomic on their own.
    Sqlite,
    /// Postgres: concurrent writers; leases use row locks and a per-host advisory lock.
    Postgres,
}

/// The store over either backend.
pub struct SqlStore {
    pub(crate) pool: AnyPool,
    pub(crate) backend: Backend,
    /// Serialises writers in this process (SQLite).
    pub(crate) write_lock: Option<tokio::sync::Mutex<()>>,
    /// Where blob files live (SQLite); None keeps blobs as chunks in the database (Postgres).
    pub(crate) files: Option<BlobDir>,
}

/// A domain value in its stored form (JSON).
fn to_json<T: Serialize>(what: &str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(format!("cannot encode {what}: {e}")))
}

/// A domain value read back from its stored form; a row that does not parse is named.
fn from_json<T: DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

impl Backend {
    /// A parenthesised list of `n` placeholders, the first being parameter `first`. SQLite gets
    /// positional `?` (its lookup of numbered parameters by name is linear, which makes binding a
    /// statement with thousands of `$N` quadratic); Postgres gets `$N`.
    fn placeholders(self, first: usize, n: usize) -> String {
        let items: Vec<String> = match self {
            Backend::Sqlite => vec!["?".to_string(); n],
            Backend::Postgres => (first..first + n).map(|i| format!("${i}")).collect(),
        };
        format!("({})", items.join(", "))
    }

    /// Parameter number `n` written as this backend takes it in a statement whose other parameters
    /// are all positional too.
    fn param(self, n: usize) -> String {
        match self {
            Backend::Sqlite => "?".to_string(),
            Backend::Postgres => format!("${n}"),
        }
    }
}

impl SqlStore {
    /// Takes the in-process writer lock (SQLite only): SQLite has one writer at a time, and queueing
    /// writers here, in order, beats its busy handler, which sleeps and polls with growing delays.
    pub(crate) async fn writer(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.write_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        }
    }

    /// Starts a write transaction, holding the writer lock until the returned guard drops. On SQLite
    /// it also takes the database's write lock up front (BEGIN IMMEDIATE), so a transaction that reads
    /// before it writes never fails with SQLITE_BUSY.
    async fn begin(
        &self,
    ) -> Result<(
        Option<tokio::sync::MutexGuard<'_, ()>>,
        Transaction<'static, Any>,
    )> {
        let guard = self.writer().await;
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok((guard, tx))
    }
}

impl SqlStore {
    /// ` FOR UPDATE` on Postgres (a row lock held to the end of the transaction); nothing on SQLite,
    /// whose write transactions are serialised whole.
    fn for_update(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// `column` ordered bytewise on both backends (Postgres would otherwise sort by the locale's
    /// collation, SQLite always sorts bytewise).
    fn bytewise(&self, column: &str) -> String {
        match self.backend {
            Backend::Sqlite => column.to_string(),
            Backend::Postgres => format!("{column} COLLATE \"C\""),
        }
    }

    /// Locks rows of `table` by id, in id order (Postgres; SQLite serialises writers anyway).
    ///
    /// Lock order, everywhere: agents, then tasks (by id), then runs, then jobs. A statement that
    /// updates several rows locks them in an order of its own choosing; taking them in id order first
    /// keeps two transactions from waiting on each other.
    async fn lock_rows(
        &self,
        tx: &mut Transaction<'static, Any>,
        table: &str,
        column: &str,
        keys: &[&str],
    ) -> Result<()> {
        if self.backend != Backend::Postgres || keys.is_empty() {
            return Ok(());
        }
        for chunk in keys.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "SELECT id FROM {table} WHERE {column} IN {} ORDER BY id FOR UPDATE",
                self.backend.placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for k in chunk {
                q = q.bind(*k);
            }
            q.fetch_all(&mut **tx).await?;
        }
        Ok(())
    }
}

impl SqlStore {
    /// This database's id (made on first use), which marks its data directory.
    pub(crate) async fn database_id(&self) -> Result<String> {
        sqlx::query(
            "INSERT INTO store_info (key, value) VALUES ('database_id', $1) ON CONFLICT DO NOTHING",
        )
        .bind(uuid::Uuid::new_v4().simple().to_string())
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query("SELECT value FROM store_info WHERE key = 'database_id'")
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?,
        )
    }
}

#[async_trait::async_trait]
impl Store for SqlStore {
    fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
