//! Schema migrations, and the data steps between them that SQL cannot do.
//!
//! Migrations are embedded SQL files (`migrations/sqlite`, `migrations/postgres`, same names) applied
//! by sqlx's migrator. A data step runs between two of them: the schema is brought up to the step's
//! version, the step converts rows in batches, then the remaining migrations run. A step only runs
//! while the migration after it is not applied yet, and it only touches rows it has not converted, so
//! a crash at any point is repaired by the next start.
//!
//! Data step after 0004: versions up to e762908 stored variants, inventories, job specs, task
//! configurations, run summaries and windows as protobuf bytes. 0004 adds columns for the stored forms
//! the coordinator owns (JSON of the domain types, plain window columns); the step decodes each old row
//! and fills them; 0005 drops the protobuf columns.

use fleetbench_proto::v1 as pb;
use prost::Message;
use sqlx::{AnyPool, Row};

use super::{Backend, SqlStore, to_json};
use crate::domain::{Inventory, JobSpec, ResourceSample, RunConfig, RunSummary, Variant, Window};
use crate::error::{Error, Result};

/// Migrations embedded in the binary: (version, description, SQL).
pub type EmbeddedMigrations = &'static [(i64, &'static str, &'static str)];

/// Rows converted per transaction by a data step.
const BATCH: i64 = 200;

#[derive(Debug)]
struct Embedded(EmbeddedMigrations);

impl<'s> sqlx::migrate::MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> futures::future::BoxFuture<
        's,
        Result<Vec<sqlx::migrate::Migration>, sqlx::error::BoxDynError>,
    > {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, description, sql)| {
                    sqlx::migrate::Migration::new(
                        *version,
                        std::borrow::Cow::Borrowed(*description),
                        sqlx::migrate::MigrationType::Simple,
                        std::borrow::Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Applies `migrations` up to and including `through` (all of them when None).
async fn apply(pool: &AnyPool, migrations: EmbeddedMigrations, through: Option<i64>) -> Result<()> {
    let count = match through {
        Some(v) => migrations.iter().take_while(|(n, _, _)| *n <= v).count(),
        None => migrations.len(),
    };
    let mut migrator = sqlx::migrate::Migrator::new(Embedded(&migrations[..count])).await?;
    // A database migrated further than this subset is fine: the full run follows.
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

/// Versions already applied (none on a new database).
async fn applied(store: &SqlStore) -> Result<Vec<i64>> {
    let exists_sql = match store.backend {
        Backend::Sqlite => {
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'"
        }
        Backend::Postgres => {
            "SELECT CAST(COUNT(*) AS BIGINT) FROM information_schema.tables WHERE table_name = '_sqlx_migrations' \
             AND table_schema = current_schema()"
        }
    };
    let exists: i64 = sqlx::query(exists_sql)
        .fetch_one(&store.pool)
        .await?
        .try_get(0)?;
    if exists == 0 {
        return Ok(Vec::new());
    }
    // A failed (dirty) migration is refused by the migrator itself; its version counts as not applied.
    let rows = sqlx::query("SELECT version FROM _sqlx_migrations")
        .fetch_all(&store.pool)
        .await?;
    rows.iter().map(|r| Ok(r.try_get::<i64, _>(0)?)).collect()
}

/// Brings the database to the newest schema, running data steps on the way.
pub(crate) async fn migrate(store: &SqlStore, migrations: EmbeddedMigrations) -> Result<()> {
    const LEGACY_STEP_AFTER: i64 = 4;
    if !applied(store).await?.contains(&(LEGACY_STEP_AFTER + 1)) {
        apply(&store.pool, migrations, Some(LEGACY_STEP_AFTER)).await?;
        convert_protobuf_rows(store).await?;
    }
    apply(&store.pool, migrations, None).await
}

fn corrupt(what: &str, key: &str, e: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!(
        "{what} {key} stored by an older version cannot be read: {e}"
    ))
}

fn decode<M: Message + Default>(what: &str, key: &str, bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|e| corrupt(what, key, e))
}

/// A job spec as older versions wrote it: a missing config meant "all defaults".
fn legacy_job_spec(key: &str, bytes: &[u8]) -> Result<JobSpec> {
    let mut spec: pb::JobSpec = decode("job spec", key, bytes)?;
    spec.config.get_or_insert_with(Default::default);
    JobSpec::try_from(spec).map_err(|e| corrupt("job spec", key, e))
}

/// Converts every row of one table that still lacks its new stored form, in batches. `select` returns
/// (key columns..., old bytes) for up to BATCH unconverted rows; `update` writes one row.
macro_rules! convert_table {
    ($store:expr, $select:expr, |$row:ident, $tx:ident| $body:block) => {{
        loop {
            let (_writer, mut $tx) = $store.begin().await?;
            let rows = sqlx::query($select)
                .bind(BATCH)
                .fetch_all(&mut *$tx)
                .await?;
            if rows.is_empty() {
                break;
            }
            for $row in &rows {
                $body
            }
            $tx.commit().await?;
        }
    }};
}

async fn convert_protobuf_rows(store: &SqlStore) -> Result<()> {
    convert_table!(
        store,
        "SELECT model, variant, info FROM model_variants WHERE info_json IS NULL LIMIT $1",
        |row, tx| {
            let (model, variant): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            let key = format!("{model}/{variant}");
            let v: Variant =
                decode::<pb::ModelVariant>("variant", &key, &row.try_get::<Vec<u8>, _>(2)?)?.into();
            sqlx::query(
                "UPDATE model_variants SET info_json = $1 WHERE model = $2 AND variant = $3",
            )
            .bind(to_json("variant", &v)?)
            .bind(&model)
            .bind(&variant)
            .execute(&mut *tx)
            .await?;
        }
    );
    convert_table!(
        store,
        "SELECT id, descriptor FROM platforms WHERE descriptor_json IS NULL LIMIT $1",
        |row, tx| {
            let id: String = row.try_get(0)?;
            let inv: Inventory =
                decode::<pb::Inventory>("platform", &id, &row.try_get::<Vec<u8>, _>(1)?)?.into();
            sqlx::query("UPDATE platforms SET descriptor_json = $1 WHERE id = $2")
                .bind(to_json("platform descriptor", &inv)?)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
    );
    convert_table!(
        store,
        "SELECT id, inventory FROM agents WHERE inventory_json IS NULL LIMIT $1",
        |row, tx| {
            let id: String = row.try_get(0)?;
            let inv: Inventory =
                decode::<pb::Inventory>("agent", &id, &row.try_get::<Vec<u8>, _>(1)?)?.into();
            sqlx::query("UPDATE agents SET inventory_json = $1 WHERE id = $2")
                .bind(to_json("inventory", &inv)?)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
    );
    convert_table!(
        store,
        "SELECT id, spec FROM jobs WHERE spec_json IS NULL LIMIT $1",
        |row, tx| {
            let id: String = row.try_get(0)?;
            let spec = legacy_job_spec(&id, &row.try_get::<Vec<u8>, _>(1)?)?;
            sqlx::query("UPDATE jobs SET spec_json = $1 WHERE id = $2")
                .bind(to_json("job spec", &spec)?)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
    );
    convert_table!(
        store,
        "SELECT id, config FROM tasks WHERE config_json IS NULL LIMIT $1",
        |row, tx| {
            let id: String = row.try_get(0)?;
            let config: RunConfig =
                decode::<pb::RunConfig>("task config", &id, &row.try_get::<Vec<u8>, _>(1)?)?
                    .try_into()
                    .map_err(|e| corrupt("task config", &id, e))?;
            sqlx::query("UPDATE tasks SET config_json = $1 WHERE id = $2")
                .bind(to_json("task config", &config)?)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
    );
    convert_table!(
        store,
        "SELECT id, summary FROM runs WHERE summary IS NOT NULL AND summary_json IS NULL LIMIT $1",
        |row, tx| {
            let id: String = row.try_get(0)?;
            let summary: RunSummary =
                decode::<pb::RunSummary>("run summary", &id, &row.try_get::<Vec<u8>, _>(1)?)?
                    .try_into()
                    .map_err(|e| corrupt("run summary", &id, e))?;
            sqlx::query("UPDATE runs SET summary_json = $1 WHERE id = $2")
                .bind(to_json("run summary", &summary)?)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
    );
    convert_table!(
        store,
        "SELECT run_id, seq, body FROM windows WHERE histogram IS NULL LIMIT $1",
        |row, tx| {
            let (run_id, seq): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
            let key = format!("{run_id}#{seq}");
            let w: Window = decode::<pb::TelemetryWindow>(
                "telemetry window",
                &key,
                &row.try_get::<Vec<u8>, _>(2)?,
            )?
            .into();
            let resources = w
                .resources
                .as_ref()
                .map(|r: &ResourceSample| to_json("window resources", r))
                .transpose()?;
            sqlx::query(
                "UPDATE windows SET start_offset_ns = $1, histogram = $2, issue_delay_histogram = $3, \
                 resources_json = $4, late_queries = $5, dropped_queries = $6, closed_at = $7 \
                 WHERE run_id = $8 AND seq = $9",
            )
            .bind(w.start_offset_ns as i64)
            .bind(w.latency_histogram)
            .bind(w.issue_delay_histogram)
            .bind(resources)
            .bind(w.late_queries as i64)
            .bind(w.dropped_queries as i64)
            .bind(w.closed_at_ms)
            .bind(&run_id)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        }
    );
    Ok(())
}
