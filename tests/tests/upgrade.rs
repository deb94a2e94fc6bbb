//! Upgrades: a database that fleetbench e762908 wrote (its quickstart, committed under
//! tests/fixtures/e762908) is opened by today's coordinator, migrated, and must still hold every job,
//! task, run, variant, agent and ranking row, with the same figures that version's CLI printed about it.
//! On SQLite the file itself is migrated; on Postgres the same rows are loaded into a database made by
//! the old migrations (0001-0003, unchanged in the repository) and migrated from there.

use std::path::{Path, PathBuf};

use fleetbench_cli::commands::{jobs::JobJson, rank};
use fleetbench_cli::output::Format;
use fleetbench_proto::v1::{GetJobRequest, ListAgentsRequest, ListJobsRequest, ListModelsRequest};
use fleetbench_tests::{PgDb, TestCoordinator, repo, test_config};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/e762908").join(name)
}

fn expected(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).expect("fixture file"))
        .expect("fixture JSON")
}

/// Keys whose value depends on when the listing is made, not on what is stored.
const LIVE_KEYS: &[&str] = &["online"];

/// Every key of `old` is in `new` with the same value (recursively; new keys are fine).
fn contains(old: &Value, new: &Value, path: &str, diffs: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            for (k, v) in o {
                if LIVE_KEYS.contains(&k.as_str()) {
                    continue;
                }
                match n.get(k) {
                    Some(nv) => contains(v, nv, &format!("{path}.{k}"), diffs),
                    None => diffs.push(format!("{path}.{k}: missing (was {v})")),
                }
            }
        }
        (Value::Array(o), Value::Array(n)) => {
            if o.len() != n.len() {
                diffs.push(format!("{path}: {} items, was {}", n.len(), o.len()));
                return;
            }
            for (i, (a, b)) in o.iter().zip(n).enumerate() {
                contains(a, b, &format!("{path}[{i}]"), diffs);
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            let (x, y) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
            if (x - y).abs() > 1e-9 * x.abs().max(y.abs()).max(1e-300) {
                diffs.push(format!("{path}: {b}, was {a}"));
            }
        }
        (a, b) if a == b => {}
        (a, b) => diffs.push(format!("{path}: {b}, was {a}")),
    }
}

fn assert_contains(what: &str, old: &Value, new: &Value) {
    let mut diffs = Vec::new();
    contains(old, new, what, &mut diffs);
    for d in &mut diffs {
        if d.len() > 300 {
            d.truncate(300);
            d.push_str(" ...");
        }
    }
    assert!(
        diffs.is_empty(),
        "after the upgrade, {what} differs from what e762908 printed:\n{}",
        diffs.join("\n")
    );
}

/// Rows of a ranking keyed by (platform, variant), for comparison whatever their order.
fn by_row(v: &Value) -> Vec<(String, Value)> {
    let mut rows: Vec<(String, Value)> = v
        .as_array()
        .expect("ranking rows")
        .iter()
        .map(|r| {
            (
                format!("{} / {}", r["platform_id"], r["variant"]),
                r.clone(),
            )
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// What the ranking of a row must keep: its identity, its pooled runs and every figure.
const RANK_KEYS: &[&str] = &[
    "platform",
    "platform_id",
    "variant",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "p999_ms",
    "p50_ci_ms",
    "p99_ci_ms",
    "throughput_per_s",
    "accuracy",
    "accuracy_delta_pts",
    "agreement",
    "fidelity_cosine",
    "cost_per_million",
    "runs",
    "run_ids",
    "rss_peak_bytes",
    "size_bytes",
];

async fn check_everything_is_there(coord: &TestCoordinator) {
    let client = coord.client().await;
    let jobs = client
        .jobs()
        .list_jobs(ListJobsRequest { limit: 0 })
        .await
        .expect("list jobs")
        .into_inner()
        .jobs;
    assert_contains(
        "jobs list",
        &expected("jobs-list.json"),
        &serde_json::to_value(&jobs).unwrap(),
    );
    let old_show = expected("jobs-show.json");
    let detail = client
        .jobs()
        .get_job(GetJobRequest {
            job_id: old_show["job_id"].as_str().unwrap().to_string(),
        })
        .await
        .expect("get the old job")
        .into_inner();
    assert_contains(
        "jobs show",
        &old_show,
        &serde_json::to_value(JobJson::from(&detail)).unwrap(),
    );
    let variants = client
        .models()
        .list_models(ListModelsRequest::default())
        .await
        .expect("list models")
        .into_inner()
        .variants;
    assert_contains(
        "models list",
        &expected("models-list.json"),
        &serde_json::to_value(&variants).unwrap(),
    );
    // Every artifact and eval set still downloads whole, under its hash (moved out to files on SQLite).
    let scratch = tempfile::tempdir().unwrap();
    for v in &variants {
        fleetbench_cli::transfer::fetch_set(&client, &v.artifact_sha256, scratch.path())
            .await
            .unwrap_or_else(|e| panic!("{}/{}: {e:#}", v.model, v.variant));
        for sha in [&v.eval_inputs_sha256, &v.eval_labels_sha256] {
            if !sha.is_empty() {
                fleetbench_cli::transfer::download_to(&client, sha, &scratch.path().join(sha))
                    .await
                    .unwrap();
            }
        }
    }
    let agents = client
        .fleet()
        .list_agents(ListAgentsRequest {})
        .await
        .expect("list agents")
        .into_inner()
        .agents;
    assert_contains(
        "agents list",
        &expected("agents-list.json"),
        &serde_json::to_value(&agents).unwrap(),
    );
    for (file, objective, include_invalid) in [
        ("rank.json", "p99", false),
        ("rank-throughput.json", "throughput", true),
    ] {
        let args = rank::RankArgs {
            objective: objective.into(),
            include_invalid,
            output: Format::Json,
            ..rank::RankArgs::for_model("digits")
        };
        let rows = rank::fetch(&client, &args).await.expect("rank").rows;
        let new: Vec<rank::RankJson> = rows.iter().map(rank::RankJson::from).collect();
        let (old, new) = (
            by_row(&expected(file)),
            by_row(&serde_json::to_value(&new).unwrap()),
        );
        assert_eq!(
            old.iter().map(|r| &r.0).collect::<Vec<_>>(),
            new.iter().map(|r| &r.0).collect::<Vec<_>>(),
            "{file}: the ranking has other rows after the upgrade"
        );
        for ((key, o), (_, n)) in old.iter().zip(&new) {
            for k in RANK_KEYS {
                assert_contains(&format!("{file} {key} {k}"), &o[k], &n[k]);
            }
        }
    }
}

fn copy_fixture(dir: &Path) -> String {
    let db = dir.join("fleet.db");
    std::fs::copy(fixture("quickstart.db"), &db).expect("copy the fixture");
    format!("sqlite://{}", db.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_database_of_e762908_migrates_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let url = copy_fixture(dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord = TestCoordinator::serve(test_config(&url), listener).await;
    check_everything_is_there(&coord).await;
    coord.stop().await;
    // Opening it again (migrations already applied) changes nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord = TestCoordinator::serve(test_config(&url), listener).await;
    check_everything_is_there(&coord).await;
    coord.stop().await;
}

/// (sha256, location, chunk rows) of every blob, read straight from the SQLite file (before
/// migration 0008 every blob is inline: location 'db').
async fn blob_rows(url: &str) -> Vec<(String, String, i64)> {
    use sqlx::Row;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    let has_location =
        sqlx::query("SELECT name FROM pragma_table_info('blobs') WHERE name = 'location'")
            .fetch_optional(&pool)
            .await
            .unwrap()
            .is_some();
    let sql = format!(
        "SELECT b.sha256, {}, (SELECT COUNT(*) FROM blob_chunks c WHERE c.sha256 = b.sha256) \
         FROM blobs b ORDER BY b.sha256",
        if has_location { "b.location" } else { "'db'" }
    );
    let rows = sqlx::query(&sql)
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    pool.close().await;
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_blobs_move_out_to_files_and_a_move_cut_by_a_crash_is_done_again() {
    use sqlx::Row;
    let dir = tempfile::tempdir().unwrap();
    let url = copy_fixture(dir.path());
    let before = blob_rows(&url).await;
    assert!(
        before.len() >= 4 && before.iter().all(|(_, _, n)| *n > 0),
        "{before:?}"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord = TestCoordinator::serve(test_config(&url), listener).await;
    coord.client().await;
    coord.stop().await;
    let after = blob_rows(&url).await;
    assert_eq!(after.len(), before.len());
    for (sha, location, chunks) in &after {
        assert_eq!((location.as_str(), *chunks), ("file", 0), "{sha}");
        let file = dir.path().join("blobs").join(&sha[..2]).join(sha);
        let (got, _) = fleetbench_common::files::sha256_file(&file).unwrap();
        assert_eq!(&got, sha, "{} holds its blob", file.display());
    }
    // A crash between writing a file and switching its row leaves the row inline with its chunks and
    // the file in place: the next start moves it again, and its bytes are the same.
    let (sha, _, _) = after[0].clone();
    let file = dir.path().join("blobs").join(&sha[..2]).join(&sha);
    let bytes = std::fs::read(&file).unwrap();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let chunk = fleetbench_coordinator::store::BLOB_CHUNK_BYTES;
    for (i, c) in bytes.chunks(chunk).enumerate() {
        sqlx::query("INSERT INTO blob_chunks (sha256, idx, data) VALUES ($1, $2, $3)")
            .bind(&sha)
            .bind(i as i64)
            .bind(c.to_vec())
            .execute(&pool)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE blobs SET location = 'db' WHERE sha256 = $1")
        .bind(&sha)
        .execute(&pool)
        .await
        .unwrap();
    let inline: i64 = sqlx::query("SELECT COUNT(*) FROM blobs WHERE location = 'db'")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(inline, 1);
    pool.close().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord = TestCoordinator::serve(test_config(&url), listener).await;
    check_everything_is_there(&coord).await;
    coord.stop().await;
    assert_eq!(blob_rows(&url).await, after);
    assert_eq!(std::fs::read(&file).unwrap(), bytes);
}

/// The tables of the schema of migrations 0001-0003, in an order that satisfies their references,
/// with their columns and whether each is a blob.
const OLD_SCHEMA: &[(&str, &[(&str, bool)])] = &[
    (
        "blobs",
        &[
            ("sha256", false),
            ("size_bytes", false),
            ("chunk_count", false),
            ("created_at", false),
        ],
    ),
    (
        "blob_chunks",
        &[("sha256", false), ("idx", false), ("data", true)],
    ),
    (
        "model_variants",
        &[
            ("model", false),
            ("variant", false),
            ("artifact_sha256", false),
            ("size_bytes", false),
            ("variant_of", false),
            ("technique", false),
            ("recipe_json", false),
            ("eval_inputs_sha256", false),
            ("eval_labels_sha256", false),
            ("info", true),
            ("created_at", false),
        ],
    ),
    (
        "platforms",
        &[
            ("id", false),
            ("name", false),
            ("descriptor", true),
            ("created_at", false),
        ],
    ),
    (
        "agents",
        &[
            ("id", false),
            ("name", false),
            ("platform_id", false),
            ("host_id", false),
            ("labels_json", false),
            ("inventory", true),
            ("connected", false),
            ("registered_at", false),
            ("last_seen_at", false),
        ],
    ),
    (
        "jobs",
        &[
            ("id", false),
            ("model", false),
            ("name", false),
            ("spec", true),
            ("state", false),
            ("created_at", false),
            ("finished_at", false),
        ],
    ),
    (
        "tasks",
        &[
            ("id", false),
            ("job_id", false),
            ("seq", false),
            ("model", false),
            ("variant", false),
            ("platform_id", false),
            ("host_id", false),
            ("target_agent_id", false),
            ("config", true),
            ("state", false),
            ("attempt", false),
            ("agent_id", false),
            ("run_id", false),
            ("lease_expires_at", false),
            ("error", false),
            ("created_at", false),
            ("finished_at", false),
        ],
    ),
    (
        "runs",
        &[
            ("id", false),
            ("task_id", false),
            ("job_id", false),
            ("agent_id", false),
            ("platform_id", false),
            ("model", false),
            ("variant", false),
            ("attempt", false),
            ("state", false),
            ("progress_queries", false),
            ("windows", false),
            ("valid", false),
            ("config_key", false),
            ("summary", true),
            ("histogram", true),
            ("error", false),
            ("started_at", false),
            ("finished_at", false),
        ],
    ),
    (
        "windows",
        &[
            ("run_id", false),
            ("seq", false),
            ("queries", false),
            ("samples", false),
            ("end_offset_ns", false),
            ("body", true),
            ("stored_at", false),
            ("ingest_batch", false),
        ],
    ),
];

/// Copies every row of the fixture into a Postgres database that has the old schema only: the
/// repository's migrations 0001-0003, applied by sqlx's migrator from a folder as e762908 applied them.
async fn load_fixture_into_old_postgres(pg: &PgDb, sqlite_url: &str) {
    use sqlx::{Connection, Row};
    sqlx::any::install_default_drivers();
    let old_migrations = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo().join("migrations/postgres")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if ["0001_", "0002_", "0003_"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            std::fs::copy(&path, old_migrations.path().join(&name)).unwrap();
        }
    }
    let mut conn = sqlx::AnyConnection::connect(&pg.url)
        .await
        .expect("connect to Postgres");
    sqlx::migrate::Migrator::new(old_migrations.path())
        .await
        .expect("old migrations")
        .run_direct(&mut conn)
        .await
        .expect("apply the old migrations");
    let mut old = sqlx::AnyConnection::connect(sqlite_url)
        .await
        .expect("open the fixture");
    for (table, columns) in OLD_SCHEMA {
        let names: Vec<&str> = columns.iter().map(|c| c.0).collect();
        let select = format!("SELECT {} FROM {table}", names.join(", "));
        let rows = sqlx::query(&select)
            .fetch_all(&mut old)
            .await
            .unwrap_or_else(|e| panic!("read {table}: {e}"));
        for row in rows {
            let params: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
            let insert = format!(
                "INSERT INTO {table} ({}) VALUES ({})",
                names.join(", "),
                params.join(", ")
            );
            let mut q = sqlx::query(&insert);
            for (i, (name, blob)) in columns.iter().enumerate() {
                q = if *blob {
                    q.bind(row.try_get::<Option<Vec<u8>>, _>(i).unwrap())
                } else if let Ok(v) = row.try_get::<i64, _>(i) {
                    q.bind(v)
                } else {
                    q.bind(
                        row.try_get::<String, _>(i)
                            .unwrap_or_else(|e| panic!("{table}.{name}: {e}")),
                    )
                };
            }
            q.execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("insert into {table}: {e}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_database_of_the_old_schema_migrates_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!(
        "sqlite://{}?mode=ro",
        dir.path().join("fixture.db").display()
    );
    std::fs::copy(fixture("quickstart.db"), dir.path().join("fixture.db")).unwrap();
    let pg = PgDb::create().await;
    load_fixture_into_old_postgres(&pg, &sqlite_url).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord = TestCoordinator::serve(test_config(&pg.url), listener).await;
    check_everything_is_there(&coord).await;
    coord.stop().await;
}
