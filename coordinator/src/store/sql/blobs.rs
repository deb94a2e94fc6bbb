//! Blobs, artifact sets, uploads and the variants that reference them.
//!
//! A blob's bytes are where its `location` says: `file`, a content-addressed file under the data
//! directory (SQLite: only metadata in the database, so a push never holds the database's writer lock
//! for its bytes), or `db`, chunks in `blob_chunks` (Postgres, so replicas share them; and SQLite rows
//! written before 0008, until [`SqlStore::move_inline_blobs`] moves them out). A stage (a resumable
//! partial blob) lives beside the blobs: a file under `staging/`, or chunks under a key that is not a
//! sha256.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use fleetbench_common::artifact::{ArtifactFile, ArtifactSet};
use sqlx::Row;

use super::{BLOB_CHUNK_BYTES, SqlStore, from_json, to_json};
use crate::domain::Variant;
use crate::error::{Error, Result};
use crate::store::{ArtifactStore, BlobStore, Deletion, Upload, VariantInsert, VariantStore};

/// Blob files under a data directory: `blobs/<sha[..2]>/<sha>` and `staging/<stage>`.
#[derive(Debug, Clone)]
pub struct BlobDir {
    root: PathBuf,
}

/// Stage names are ours: lower-case letters, digits and '-'; this keeps them safe as file names and
/// apart from sha256 keys in `blob_chunks`.
fn check_stage(stage: &str) -> Result<()> {
    let ok = !stage.is_empty()
        && stage.len() <= 160
        && stage.contains('-')
        && stage
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Internal(format!("'{stage}' is not a stage name")))
    }
}

fn check_sha(sha256: &str) -> Result<()> {
    if fleetbench_common::artifact::is_sha256(sha256) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "'{sha256}' is not a sha256 (64 lower-case hex digits)"
        )))
    }
}

/// Runs blocking file work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blob file task failed: {e}")))?
}

fn read_at(path: &Path, offset: u64, max_len: usize) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if offset >= len {
        return Ok(Vec::new());
    }
    let n = (len - offset).min(max_len as u64) as usize;
    let mut buf = vec![0u8; n];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut buf)?;
    Ok(buf)
}

use fleetbench_common::files::sync_dir;

impl BlobDir {
    /// Blob files under `root` (created when missing).
    pub fn new(root: PathBuf) -> Result<Self> {
        for d in ["blobs", "staging"] {
            std::fs::create_dir_all(root.join(d))
                .map_err(|e| Error::io(&format!("cannot create {}", root.join(d).display()), e))?;
        }
        Ok(BlobDir { root })
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(&sha256[..2]).join(sha256)
    }

    fn stage_path(&self, stage: &str) -> PathBuf {
        self.root.join("staging").join(stage)
    }

    /// Writes `data` (read by `read`) to the blob file `sha256`: a temporary name, fsync, rename,
    /// fsync of the folder. Returns its size.
    fn install(&self, from: &Path, sha256: &str) -> Result<()> {
        Self::sync_staged(from)?;
        self.place(from, sha256)
    }

    /// Syncs staged bytes to disk (the slow part of installing a blob, done before any lock).
    fn sync_staged(from: &Path) -> Result<()> {
        std::fs::File::open(from)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&format!("cannot sync {}", from.display()), e))
    }

    /// Renames synced bytes into place as blob `sha256` and syncs the folder.
    fn place(&self, from: &Path, sha256: &str) -> Result<()> {
        let to = self.blob_path(sha256);
        let dir = to.parent().expect("blob paths have a folder");
        let io = |what: &str, e| Error::io(&format!("{what} {}", to.display()), e);
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create the folder of", e))?;
        std::fs::rename(from, &to).map_err(|e| io("cannot move into place", e))?;
        sync_dir(dir).map_err(|e| io("cannot sync the folder of", e))?;
        Ok(())
    }

    /// Free bytes on the data directory's file system.
    fn free_bytes(&self) -> Option<u64> {
        free_bytes(&self.root)
    }

    /// Every blob file (sha256 and path), for the sweep of files the database does not know.
    fn blob_files(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        let Ok(dirs) = std::fs::read_dir(self.root.join("blobs")) else {
            return out;
        };
        for d in dirs.flatten() {
            if let Ok(files) = std::fs::read_dir(d.path()) {
                for f in files.flatten() {
                    let name = f.file_name().to_string_lossy().into_owned();
                    out.push((name, f.path()));
                }
            }
        }
        out
    }
}

pub use fleetbench_common::files::free_bytes;

/// Key under which a stage's chunks live in `blob_chunks` (not a sha256, so never a blob's).
fn stage_key(stage: &str) -> String {
    format!("~{stage}")
}

impl SqlStore {
    /// Size and location of a stored blob.
    async fn blob_row(&self, sha256: &str) -> Result<Option<(u64, String)>> {
        let row = sqlx::query("SELECT size_bytes, location FROM blobs WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some((r.try_get::<i64, _>(0)? as u64, r.try_get(1)?)),
            None => None,
        })
    }

    async fn chunk(&self, key: &str, idx: u64) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT data FROM blob_chunks WHERE sha256 = $1 AND idx = $2")
            .bind(key)
            .bind(idx as i64)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }

    /// Bytes of chunks `key` from `offset` (chunks are [`BLOB_CHUNK_BYTES`] long but the last).
    async fn read_chunks(&self, key: &str, offset: u64, max_len: usize) -> Result<Vec<u8>> {
        let chunk = BLOB_CHUNK_BYTES as u64;
        let Some(data) = self.chunk(key, offset / chunk).await? else {
            return Ok(Vec::new());
        };
        let start = ((offset % chunk) as usize).min(data.len());
        let end = (start + max_len).min(data.len());
        Ok(data[start..end].to_vec())
    }

    /// Moves blobs that older versions stored inline (chunks in SQLite) out to files, a few at a time:
    /// each is written to a temporary name, synced and renamed into place, then its row is switched
    /// to `file` and its chunks deleted in one transaction. A crash anywhere leaves every blob readable
    /// (its chunks, or its file), and the next start carries on. Returns how many moved.
    pub(crate) async fn move_inline_blobs(&self) -> Result<u64> {
        let Some(dir) = self.files.clone() else {
            return Ok(0);
        };
        let mut moved = 0;
        loop {
            let rows = sqlx::query(
                "SELECT sha256, size_bytes FROM blobs WHERE location = 'db' ORDER BY sha256 LIMIT 16",
            )
            .fetch_all(&self.pool)
            .await?;
            if rows.is_empty() {
                break;
            }
            let mut batch = Vec::new();
            for r in &rows {
                let sha: String = r.try_get(0)?;
                let size = r.try_get::<i64, _>(1)? as u64;
                let tmp = dir.stage_path(&format!("move-{sha}"));
                let mut f = std::fs::File::create(&tmp)
                    .map_err(|e| Error::io(&format!("cannot create {}", tmp.display()), e))?;
                let mut offset = 0u64;
                while offset < size {
                    let bytes = self.read_chunks(&sha, offset, BLOB_CHUNK_BYTES).await?;
                    if bytes.is_empty() {
                        return Err(Error::Corrupt(format!(
                            "blob {sha} holds {offset} of its {size} bytes"
                        )));
                    }
                    f.write_all(&bytes)
                        .map_err(|e| Error::io(&format!("cannot write {}", tmp.display()), e))?;
                    offset += bytes.len() as u64;
                }
                drop(f);
                let (d, s, t) = (dir.clone(), sha.clone(), tmp.clone());
                blocking(move || d.install(&t, &s)).await?;
                batch.push(sha);
            }
            let (_writer, mut tx) = self.begin().await?;
            for sha in &batch {
                sqlx::query("UPDATE blobs SET location = 'file' WHERE sha256 = $1")
                    .bind(sha)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM blob_chunks WHERE sha256 = $1")
                    .bind(sha)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            moved += batch.len() as u64;
        }
        if moved > 0 {
            // Give the space the chunks held back to the file system.
            sqlx::query("VACUUM").execute(&self.pool).await?;
            tracing::info!(moved, dir = %dir.root().display(), "Moved inline blobs out to files.");
        }
        Ok(moved)
    }

    /// Removes what a crash can leave in the data directory: stages of uploads that cannot be resumed
    /// (single-blob uploads, moves) and blob files the database does not know (a crash between a
    /// file's rename and its row's insert, or between a deletion's commit and its unlink). Run at
    /// start, before serving.
    pub(crate) async fn sweep_blob_files(&self) -> Result<()> {
        let Some(dir) = self.files.clone() else {
            return Ok(());
        };
        if let Ok(stages) = std::fs::read_dir(dir.root().join("staging")) {
            for s in stages.flatten() {
                let name = s.file_name().to_string_lossy().into_owned();
                if name.starts_with("blob-")
                    || name.starts_with("put-")
                    || name.starts_with("move-")
                {
                    let _ = std::fs::remove_file(s.path());
                }
            }
        }
        for (sha, path) in dir.blob_files() {
            let known = fleetbench_common::artifact::is_sha256(&sha)
                && sqlx::query("SELECT location FROM blobs WHERE sha256 = $1")
                    .bind(&sha)
                    .fetch_optional(&self.pool)
                    .await?
                    .is_some();
            if !known {
                tracing::info!(path = %path.display(), "Removing a blob file the database does not know.");
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(())
    }

    /// Blobs no variant, recorded set (registered or about to be) or task references any more, among
    /// `candidates`.
    async fn unreferenced(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        candidates: &[String],
    ) -> Result<Vec<(String, u64, String)>> {
        let mut out = Vec::new();
        for sha in candidates {
            let row = sqlx::query(
                "SELECT b.size_bytes, b.location, \
                 CAST((SELECT COUNT(*) FROM model_variants v WHERE v.artifact_sha256 = b.sha256 \
                    OR v.eval_inputs_sha256 = b.sha256 OR v.eval_labels_sha256 = b.sha256) AS BIGINT), \
                 CAST((SELECT COUNT(*) FROM artifact_files f WHERE f.sha256 = b.sha256) AS BIGINT), \
                 CAST((SELECT COUNT(*) FROM tasks t WHERE t.config_json LIKE $2) AS BIGINT) \
                 FROM blobs b WHERE b.sha256 = $1",
            )
            .bind(sha)
            .bind(format!("%{sha}%"))
            .fetch_optional(&mut **tx)
            .await?;
            let Some(r) = row else { continue };
            let refs: i64 =
                r.try_get::<i64, _>(2)? + r.try_get::<i64, _>(3)? + r.try_get::<i64, _>(4)?;
            if refs == 0 {
                out.push((sha.clone(), r.try_get::<i64, _>(0)? as u64, r.try_get(1)?));
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl BlobStore for SqlStore {
    async fn blob_size(&self, sha256: &str) -> Result<Option<u64>> {
        Ok(self.blob_row(sha256).await?.map(|(size, _)| size))
    }

    async fn read_blob(&self, sha256: &str, offset: u64, max_len: usize) -> Result<Vec<u8>> {
        let (_, location) = self
            .blob_row(sha256)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no blob with sha256 {sha256}")))?;
        match (location.as_str(), &self.files) {
            ("file", Some(dir)) => {
                let path = dir.blob_path(sha256);
                blocking(move || {
                    read_at(&path, offset, max_len)
                        .map_err(|e| Error::io(&format!("cannot read {}", path.display()), e))
                })
                .await
            }
            ("file", None) => Err(Error::Storage(format!(
                "blob {sha256} is a file, but this store has no data directory"
            ))),
            _ => self.read_chunks(sha256, offset, max_len).await,
        }
    }

    async fn staged_len(&self, stage: &str) -> Result<u64> {
        check_stage(stage)?;
        let chunk = BLOB_CHUNK_BYTES as u64;
        match &self.files {
            Some(dir) => {
                let len = std::fs::metadata(dir.stage_path(stage)).map_or(0, |m| m.len());
                Ok(len / chunk * chunk)
            }
            None => {
                let row = sqlx::query(
                    "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(MIN(LENGTH(data)), 0) AS BIGINT) \
                     FROM blob_chunks WHERE sha256 = $1",
                )
                .bind(stage_key(stage))
                .fetch_one(&self.pool)
                .await?;
                let (n, shortest): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
                // Only whole chunks count: a short one is a file's end, sent again on resume.
                let whole = if shortest < chunk as i64 && n > 0 {
                    n - 1
                } else {
                    n
                };
                Ok(whole.max(0) as u64 * chunk)
            }
        }
    }

    async fn read_staged(&self, stage: &str, offset: u64, max_len: usize) -> Result<Vec<u8>> {
        check_stage(stage)?;
        match &self.files {
            Some(dir) => {
                let path = dir.stage_path(stage);
                blocking(move || {
                    read_at(&path, offset, max_len)
                        .map_err(|e| Error::io(&format!("cannot read {}", path.display()), e))
                })
                .await
            }
            None => self.read_chunks(&stage_key(stage), offset, max_len).await,
        }
    }

    async fn stage_chunk(&self, stage: &str, offset: u64, data: &[u8]) -> Result<()> {
        check_stage(stage)?;
        let chunk = BLOB_CHUNK_BYTES as u64;
        if !offset.is_multiple_of(chunk) || data.len() > BLOB_CHUNK_BYTES {
            return Err(Error::Internal(format!(
                "stage {stage}: a chunk of {} bytes at offset {offset} is not aligned",
                data.len()
            )));
        }
        match &self.files {
            Some(dir) => {
                let path = dir.stage_path(stage);
                let data = data.to_vec();
                blocking(move || {
                    let io = |e| Error::io(&format!("cannot write {}", path.display()), e);
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&path)
                        .map_err(io)?;
                    let len = f.metadata().map_err(io)?.len();
                    if len < offset {
                        return Err(Error::FailedPrecondition(format!(
                            "the coordinator holds {len} bytes of this file, not {offset}; start the \
                             upload again"
                        )));
                    }
                    if len > offset {
                        f.set_len(offset).map_err(io)?;
                    }
                    f.seek(SeekFrom::Start(offset)).map_err(io)?;
                    if let Err(e) = f.write_all(&data) {
                        // A full disk: what this chunk wrote goes, so the space comes back.
                        let _ = f.set_len(offset);
                        return Err(io(e));
                    }
                    Ok(())
                })
                .await
            }
            None => {
                let key = stage_key(stage);
                let idx = (offset / chunk) as i64;
                let mut tx = self.pool.begin().await?;
                sqlx::query("DELETE FROM blob_chunks WHERE sha256 = $1 AND idx >= $2")
                    .bind(&key)
                    .bind(idx)
                    .execute(&mut *tx)
                    .await?;
                // Chunks run 0..idx without a gap when the one before this is there (each write
                // checks the same), so one lookup is enough, whatever the file's length.
                let before_ok = idx == 0
                    || sqlx::query("SELECT idx FROM blob_chunks WHERE sha256 = $1 AND idx = $2")
                        .bind(&key)
                        .bind(idx - 1)
                        .fetch_optional(&mut *tx)
                        .await?
                        .is_some();
                if !before_ok {
                    let held = self.staged_len(stage).await?;
                    return Err(Error::FailedPrecondition(format!(
                        "the coordinator holds {held} bytes of this file, not {offset}; send from there"
                    )));
                }
                sqlx::query("INSERT INTO blob_chunks (sha256, idx, data) VALUES ($1, $2, $3)")
                    .bind(&key)
                    .bind(idx)
                    .bind(data.to_vec())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    async fn commit_staged(&self, stage: &str, sha256: &str, size: u64) -> Result<()> {
        check_stage(stage)?;
        check_sha(sha256)?;
        let chunks = size.div_ceil(BLOB_CHUNK_BYTES as u64).max(1) as i64;
        match self.files.clone() {
            Some(dir) => {
                let from = dir.stage_path(stage);
                let staged = std::fs::metadata(&from).map_or(0, |m| m.len());
                if staged != size {
                    return Err(Error::Internal(format!(
                        "stage {stage} holds {staged} bytes, not {size}"
                    )));
                }
                let f = from.clone();
                blocking(move || BlobDir::sync_staged(&f)).await?;
                // Under the writer lock from the check to the insert: a deletion (which unlinks its
                // files under the same lock) cannot remove the file between its row check and ours.
                let _writer = self.writer().await;
                if self.blob_row(sha256).await?.is_some() {
                    return self.discard_staged(stage).await;
                }
                let (d, sha) = (dir.clone(), sha256.to_string());
                blocking(move || d.place(&from, &sha)).await?;
                sqlx::query(
                    "INSERT INTO blobs (sha256, size_bytes, chunk_count, created_at, location) \
                     VALUES ($1, $2, $3, $4, 'file') ON CONFLICT DO NOTHING",
                )
                .bind(sha256)
                .bind(size as i64)
                .bind(chunks)
                .bind(fleetbench_common::now_ms())
                .execute(&self.pool)
                .await?;
                Ok(())
            }
            None => {
                let key = stage_key(stage);
                let (_writer, mut tx) = self.begin().await?;
                // The row first: of two commits of the same bytes at once, one inserts it (and its
                // chunks become the blob's), the other finds it there and drops its own chunks.
                let inserted = sqlx::query(
                    "INSERT INTO blobs (sha256, size_bytes, chunk_count, created_at, location) \
                     VALUES ($1, $2, $3, $4, 'db') ON CONFLICT DO NOTHING",
                )
                .bind(sha256)
                .bind(size as i64)
                .bind(chunks)
                .bind(fleetbench_common::now_ms())
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if inserted {
                    sqlx::query("UPDATE blob_chunks SET sha256 = $1 WHERE sha256 = $2")
                        .bind(sha256)
                        .bind(&key)
                        .execute(&mut *tx)
                        .await?;
                } else {
                    sqlx::query("DELETE FROM blob_chunks WHERE sha256 = $1")
                        .bind(&key)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(())
            }
        }
    }

    async fn discard_staged(&self, stage: &str) -> Result<()> {
        check_stage(stage)?;
        match &self.files {
            Some(dir) => match std::fs::remove_file(dir.stage_path(stage)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io("cannot remove a staged upload", e)),
            },
            None => {
                sqlx::query("DELETE FROM blob_chunks WHERE sha256 = $1")
                    .bind(stage_key(stage))
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }
        }
    }

    fn free_bytes(&self) -> Option<u64> {
        self.files.as_ref().and_then(BlobDir::free_bytes)
    }
}

#[async_trait]
impl ArtifactStore for SqlStore {
    async fn put_set(&self, sha256: &str, set: &ArtifactSet, now: i64) -> Result<()> {
        let (_writer, mut tx) = self.begin().await?;
        // Of two records of one set at once, the second finds the row and stops.
        let inserted = sqlx::query(
            "INSERT INTO artifact_sets (sha256, model_path, total_bytes, file_count, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(sha256)
        .bind(&set.model_path)
        .bind(set.total_bytes() as i64)
        .bind(set.files.len() as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !inserted {
            return Ok(());
        }
        for f in &set.files {
            sqlx::query(
                "INSERT INTO artifact_files (set_sha256, path, sha256, size_bytes) VALUES ($1, $2, $3, $4)",
            )
            .bind(sha256)
            .bind(&f.path)
            .bind(&f.sha256)
            .bind(f.size_bytes as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_set(&self, sha256: &str) -> Result<Option<ArtifactSet>> {
        let Some(row) = sqlx::query("SELECT model_path FROM artifact_sets WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let sql = format!(
            "SELECT path, size_bytes, sha256 FROM artifact_files WHERE set_sha256 = $1 ORDER BY {}",
            self.bytewise("path")
        );
        let files = sqlx::query(&sql)
            .bind(sha256)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(ArtifactFile {
                    path: r.try_get(0)?,
                    size_bytes: r.try_get::<i64, _>(1)? as u64,
                    sha256: r.try_get(2)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(ArtifactSet {
            model_path: row.try_get(0)?,
            files,
        }))
    }

    async fn put_upload(&self, u: &Upload) -> Result<Upload> {
        let _writer = self.writer().await;
        sqlx::query(
            "INSERT INTO uploads (id, owner, set_sha256, manifest_json, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET updated_at = $6",
        )
        .bind(&u.id)
        .bind(&u.owner)
        .bind(&u.set_sha256)
        .bind(to_json("upload", &u.set)?)
        .bind(u.created_at)
        .bind(u.updated_at)
        .execute(&self.pool)
        .await?;
        self.get_upload(&u.id)
            .await?
            .ok_or_else(|| Error::Internal(format!("upload {} vanished", u.id)))
    }

    async fn get_upload(&self, id: &str) -> Result<Option<Upload>> {
        let row = sqlx::query(
            "SELECT id, owner, set_sha256, manifest_json, created_at, updated_at FROM uploads WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| upload_row(&r)).transpose()
    }

    async fn delete_upload(&self, id: &str) -> Result<()> {
        let _writer = self.writer().await;
        sqlx::query("DELETE FROM uploads WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn stale_uploads(&self, before: i64) -> Result<Vec<Upload>> {
        sqlx::query(
            "SELECT id, owner, set_sha256, manifest_json, created_at, updated_at FROM uploads \
             WHERE updated_at < $1 ORDER BY updated_at",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(upload_row)
        .collect()
    }
}

fn upload_row(r: &sqlx::any::AnyRow) -> Result<Upload> {
    Ok(Upload {
        id: r.try_get(0)?,
        owner: r.try_get(1)?,
        set_sha256: r.try_get(2)?,
        set: from_json("uploads.manifest_json", &r.try_get::<String, _>(3)?)?,
        created_at: r.try_get(4)?,
        updated_at: r.try_get(5)?,
    })
}

#[async_trait]
impl VariantStore for SqlStore {
    async fn insert_variant(&self, v: &Variant) -> Result<VariantInsert> {
        let _writer = self.writer().await;
        let existing = sqlx::query(
            "SELECT artifact_sha256 FROM model_variants WHERE model = $1 AND variant = $2",
        )
        .bind(&v.model)
        .bind(&v.variant)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = existing {
            let sha: String = row.try_get(0)?;
            if sha == v.artifact_sha256 {
                return Ok(VariantInsert::Unchanged);
            }
            return Err(Error::AlreadyExists(format!(
                "variant '{}' of model '{}' already exists with another artifact (sha256 {}); \
                 push this file under a different --variant",
                v.variant,
                v.model,
                &sha[..12.min(sha.len())]
            )));
        }
        sqlx::query(
            "INSERT INTO model_variants (model, variant, artifact_sha256, size_bytes, variant_of, technique, \
             recipe_json, eval_inputs_sha256, eval_labels_sha256, info_json, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&v.model)
        .bind(&v.variant)
        .bind(&v.artifact_sha256)
        .bind(v.size_bytes as i64)
        .bind(&v.variant_of)
        .bind(&v.technique)
        .bind(&v.recipe_json)
        .bind(&v.eval_inputs_sha256)
        .bind(&v.eval_labels_sha256)
        .bind(to_json("variant", v)?)
        .bind(v.created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => Error::AlreadyExists(format!(
                "variant '{}' of model '{}' was registered concurrently; retry",
                v.variant, v.model
            )),
            _ => Error::Database(e),
        })?;
        Ok(VariantInsert::Created)
    }

    async fn list_variants(&self, model: Option<&str>) -> Result<Vec<Variant>> {
        let rows = match model {
            Some(m) => {
                let sql = format!(
                    "SELECT info_json FROM model_variants WHERE model = $1 ORDER BY created_at, {}",
                    self.bytewise("variant")
                );
                sqlx::query(&sql).bind(m).fetch_all(&self.pool).await?
            }
            None => {
                let sql = format!(
                    "SELECT info_json FROM model_variants ORDER BY {}, created_at, {}",
                    self.bytewise("model"),
                    self.bytewise("variant")
                );
                sqlx::query(&sql).fetch_all(&self.pool).await?
            }
        };
        rows.iter()
            .map(|r| from_json("model_variants.info_json", &r.try_get::<String, _>(0)?))
            .collect()
    }

    async fn delete_variants(
        &self,
        model: &str,
        variants: &[String],
        dry_run: bool,
    ) -> Result<Deletion> {
        let (_writer, mut tx) = self.begin().await?;
        let mut deletion = Deletion::default();
        let mut candidates = Vec::new();
        let mut runs = Vec::new();
        let mut jobs = Vec::new();
        for variant in variants {
            let row = sqlx::query(
                "SELECT artifact_sha256, eval_inputs_sha256, eval_labels_sha256 FROM model_variants \
                 WHERE model = $1 AND variant = $2",
            )
            .bind(model)
            .bind(variant)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!("model '{model}' has no variant '{variant}'"))
            })?;
            // A cancelled job's task still runs until its agent stops it.
            let active = sqlx::query(
                "SELECT DISTINCT j.id FROM jobs j JOIN tasks t ON t.job_id = j.id \
                 WHERE t.model = $1 AND t.variant = $2 \
                 AND (j.state IN ('queued', 'running') OR t.state IN ('pending', 'running')) ORDER BY j.id",
            )
            .bind(model)
            .bind(variant)
            .fetch_all(&mut *tx)
            .await?;
            if let Some(j) = active.first() {
                let job: String = j.try_get(0)?;
                return Err(Error::FailedPrecondition(format!(
                    "{model}/{variant} is in use by job {job}, which is still queued or running; \
                     wait for it or cancel it (fleetbench jobs cancel {job}), then delete"
                )));
            }
            let set: String = row.try_get(0)?;
            candidates.push(set.clone());
            for f in sqlx::query("SELECT sha256 FROM artifact_files WHERE set_sha256 = $1")
                .bind(&set)
                .fetch_all(&mut *tx)
                .await?
            {
                candidates.push(f.try_get(0)?);
            }
            for i in [1, 2] {
                let sha: String = row.try_get(i)?;
                if !sha.is_empty() {
                    candidates.push(sha);
                }
            }
            for r in sqlx::query("SELECT id, job_id FROM runs WHERE model = $1 AND variant = $2")
                .bind(model)
                .bind(variant)
                .fetch_all(&mut *tx)
                .await?
            {
                runs.push(r.try_get::<String, _>(0)?);
                jobs.push(r.try_get::<String, _>(1)?);
            }
            for r in
                sqlx::query("SELECT DISTINCT job_id FROM tasks WHERE model = $1 AND variant = $2")
                    .bind(model)
                    .bind(variant)
                    .fetch_all(&mut *tx)
                    .await?
            {
                jobs.push(r.try_get::<String, _>(0)?);
            }
            deletion.variants.push(format!("{model}/{variant}"));
        }
        deletion.runs = runs.len() as u64;
        jobs.sort();
        jobs.dedup();
        candidates.sort();
        candidates.dedup();
        for run in &runs {
            sqlx::query("DELETE FROM windows WHERE run_id = $1")
                .bind(run)
                .execute(&mut *tx)
                .await?;
        }
        for variant in variants {
            sqlx::query("DELETE FROM runs WHERE model = $1 AND variant = $2")
                .bind(model)
                .bind(variant)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM tasks WHERE model = $1 AND variant = $2")
                .bind(model)
                .bind(variant)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM model_variants WHERE model = $1 AND variant = $2")
                .bind(model)
                .bind(variant)
                .execute(&mut *tx)
                .await?;
        }
        for job in &jobs {
            let left: i64 =
                sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) FROM tasks WHERE job_id = $1")
                    .bind(job)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get(0)?;
            if left == 0 {
                sqlx::query("DELETE FROM jobs WHERE id = $1")
                    .bind(job)
                    .execute(&mut *tx)
                    .await?;
                deletion.jobs += 1;
            }
        }
        // Sets no variant uses any more, then the blobs nothing references.
        for sha in &candidates {
            let used: i64 = sqlx::query(
                "SELECT CAST(COUNT(*) AS BIGINT) FROM model_variants WHERE artifact_sha256 = $1",
            )
            .bind(sha)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
            if used == 0 {
                sqlx::query("DELETE FROM artifact_files WHERE set_sha256 = $1")
                    .bind(sha)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM artifact_sets WHERE sha256 = $1")
                    .bind(sha)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let gone = self.unreferenced(&mut tx, &candidates).await?;
        for (sha, size, _) in &gone {
            sqlx::query("DELETE FROM blob_chunks WHERE sha256 = $1")
                .bind(sha)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM blobs WHERE sha256 = $1")
                .bind(sha)
                .execute(&mut *tx)
                .await?;
            deletion.bytes_freed += size;
        }
        if dry_run {
            tx.rollback().await?;
            return Ok(deletion);
        }
        tx.commit().await?;
        // The rows are gone for good; their files follow (a crash here leaves files the start-up
        // sweep removes).
        if let Some(dir) = &self.files {
            for (sha, _, location) in &gone {
                if location == "file" {
                    let path = dir.blob_path(sha);
                    let _ = std::fs::remove_file(&path);
                    // Its prefix folder goes too once empty (remove_dir refuses one that is not).
                    if let Some(parent) = path.parent() {
                        let _ = std::fs::remove_dir(parent);
                    }
                }
            }
        }
        Ok(deletion)
    }
}
