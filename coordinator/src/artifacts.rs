//! Uploads of artifact sets: resumable, streamed in fixed-size chunks, verified before anything is
//! registered.
//!
//! A client starts (or resumes) the upload of a set with [`start`]: the upload's id comes from the
//! client's identity and the set's hash, so the same client pushing the same set again finds the bytes
//! it sent before, and another client gets an upload of its own. Each file is sent with [`receive`]
//! from the offset the coordinator holds; it is staged chunk by chunk (never whole in memory) and
//! hashed as it arrives, and it becomes a blob only when its last byte arrived and its hash matched.
//! [`finish`] records the set once every file is stored. Uploads left alone for
//! `upload_expiry_hours` are collected by [`crate::maintenance`].

use std::collections::HashMap;
use std::sync::Mutex;

use fleetbench_common::artifact::{ArtifactFile, ArtifactSet};
use fleetbench_common::{now_ms, sha256_hex};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::store::{BLOB_CHUNK_BYTES, Upload};

/// Largest piece one upload message may carry.
pub const MAX_MESSAGE_DATA: usize = 4 << 20;

/// Hash states of files being received, by stage, with the offset they reached: a stream cut and
/// resumed in the same process does not hash the staged bytes again. Lost on restart (the staged bytes
/// are then hashed once more).
#[derive(Default)]
pub struct Hashers(
    Mutex<HashMap<String, (u64, Sha256)>>,
    Mutex<std::collections::HashSet<String>>,
);

/// A stage being received; while it lives, another stream for the same stage is refused.
struct Receiving<'a> {
    hashers: &'a Hashers,
    stage: String,
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        self.hashers
            .1
            .lock()
            .expect("receiving")
            .remove(&self.stage);
    }
}

/// Most hash states kept; past it, one is dropped (it can be recomputed).
const MAX_HASHERS: usize = 4096;

impl Hashers {
    fn take(&self, stage: &str, offset: u64) -> Option<Sha256> {
        let mut m = self.0.lock().expect("hashers");
        match m.remove(stage) {
            Some((at, h)) if at == offset => Some(h),
            _ => None,
        }
    }

    fn put(&self, stage: &str, offset: u64, h: Sha256) {
        let mut m = self.0.lock().expect("hashers");
        if m.len() >= MAX_HASHERS
            && let Some(k) = m.keys().next().cloned()
        {
            m.remove(&k);
        }
        m.insert(stage.to_string(), (offset, h));
    }

    fn forget(&self, stage: &str) {
        self.0.lock().expect("hashers").remove(stage);
    }

    /// Marks `stage` as being received by one stream; None when another stream has it (two writers
    /// of one stage would cut each other's bytes). Within one coordinator process.
    fn receiving(&self, stage: &str) -> Option<Receiving<'_>> {
        self.1
            .lock()
            .expect("receiving")
            .insert(stage.to_string())
            .then(|| Receiving {
                hashers: self,
                stage: stage.to_string(),
            })
    }
}

/// How far one file of an upload has come.
#[derive(Debug, Clone, PartialEq)]
pub struct FileProgress {
    /// The file's sha256.
    pub sha256: String,
    /// Bytes held.
    pub received_bytes: u64,
    /// Its size.
    pub size_bytes: u64,
    /// Whether it is stored (hash checked).
    pub stored: bool,
}

/// An upload's state.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadStatus {
    /// Upload id.
    pub upload_id: String,
    /// The set's hash.
    pub set_sha256: String,
    /// Per file, in the set's order.
    pub files: Vec<FileProgress>,
}

/// One piece of an upload stream.
#[derive(Debug, Clone, Default)]
pub struct Piece {
    /// Upload id (first piece).
    pub upload_id: String,
    /// File (first piece).
    pub file_sha256: String,
    /// Offset of the first byte (first piece).
    pub offset: u64,
    /// Bytes.
    pub data: Vec<u8>,
}

/// The id of `owner`'s upload of set `set_sha256`.
pub fn upload_id(owner: &str, set_sha256: &str) -> String {
    sha256_hex(format!("{owner}\n{set_sha256}").as_bytes())[..32].to_string()
}

fn stage_of(upload_id: &str, file_sha256: &str) -> String {
    format!("up-{upload_id}-{file_sha256}")
}

/// The set as a client sent it, checked and normalised; `claimed` is the hash the client computed.
pub fn check_set(set: ArtifactSet, claimed: &str) -> Result<(String, ArtifactSet)> {
    let set = set
        .normalised()
        .map_err(|e| Error::InvalidArgument(format!("artifact set: {e}")))?;
    let id = set.id();
    if !claimed.is_empty() && !claimed.eq_ignore_ascii_case(&id) {
        return Err(Error::InvalidArgument(format!(
            "artifact set: its sha256 is {id} by its files, not {claimed}"
        )));
    }
    Ok((id, set))
}

async fn progress(coord: &Context, upload: &Upload) -> Result<UploadStatus> {
    let mut files = Vec::new();
    for f in &upload.set.files {
        let stored = coord.store.blob_size(&f.sha256).await?.is_some();
        let received = if stored {
            f.size_bytes
        } else {
            coord
                .store
                .staged_len(&stage_of(&upload.id, &f.sha256))
                .await?
                .min(f.size_bytes)
        };
        files.push(FileProgress {
            sha256: f.sha256.clone(),
            received_bytes: received,
            size_bytes: f.size_bytes,
            stored,
        });
    }
    Ok(UploadStatus {
        upload_id: upload.id.clone(),
        set_sha256: upload.set_sha256.clone(),
        files,
    })
}

/// Starts or resumes `owner`'s upload of `set`.
pub async fn start(
    coord: &Context,
    owner: &str,
    set: ArtifactSet,
    claimed: &str,
) -> Result<UploadStatus> {
    let (set_sha, set) = check_set(set, claimed)?;
    let max = coord.config.max_upload_bytes;
    if set.total_bytes() > max {
        return Err(Error::InvalidArgument(format!(
            "artifact set: {} bytes in {} files is more than the coordinator accepts \
             (max_upload_bytes = {max})",
            set.total_bytes(),
            set.files.len()
        )));
    }
    let now = now_ms();
    let upload = coord
        .store
        .put_upload(&Upload {
            id: upload_id(owner, &set_sha),
            owner: owner.to_string(),
            set_sha256: set_sha,
            set,
            created_at: now,
            updated_at: now,
        })
        .await?;
    let status = progress(coord, &upload).await?;
    let missing: u64 = status
        .files
        .iter()
        .map(|f| f.size_bytes - f.received_bytes)
        .sum();
    if let Some(free) = coord.store.free_bytes()
        && !fleetbench_common::files::fits(missing, free)
    {
        return Err(Error::ResourceExhausted(format!(
            "the coordinator's data directory has {free} bytes free; this push needs {missing} more \
             (and {} to spare); nothing was stored",
            fleetbench_common::files::reserve(free)
        )));
    }
    Ok(status)
}

/// The upload `id`, if it is `owner`'s.
async fn owned(coord: &Context, owner: &str, id: &str) -> Result<Upload> {
    let upload = coord.store.get_upload(id).await?.ok_or_else(|| {
        Error::NotFound(format!(
            "no upload {id} (it finished, or expired after {} h without progress); start it again",
            coord.config.upload_expiry_hours
        ))
    })?;
    if upload.owner != owner {
        return Err(Error::FailedPrecondition(format!(
            "upload {id} belongs to another client"
        )));
    }
    Ok(upload)
}

/// Hashes the bytes already staged (a resume after a restart).
async fn rehash(coord: &Context, stage: &str, upto: u64) -> Result<Sha256> {
    let mut h = Sha256::new();
    let mut at = 0;
    while at < upto {
        let bytes = coord
            .store
            .read_staged(stage, at, BLOB_CHUNK_BYTES.min((upto - at) as usize))
            .await?;
        if bytes.is_empty() {
            return Err(Error::Internal(format!(
                "stage {stage} ends at {at} of {upto} bytes"
            )));
        }
        h.update(&bytes);
        at += bytes.len() as u64;
    }
    Ok(h)
}

/// Receives one file of `owner`'s upload from `pieces`. Returns the upload's state after it: the file
/// is stored when all its bytes arrived and their hash matched; a stream that ends early leaves what
/// arrived (in whole chunks) to be continued.
pub async fn receive(
    coord: &Context,
    owner: &str,
    pieces: impl Stream<Item = Result<Piece>> + Unpin,
) -> Result<UploadStatus> {
    let mut pieces = pieces;
    let first = pieces
        .next()
        .await
        .ok_or_else(|| Error::InvalidArgument("upload: the stream carried nothing".into()))??;
    let upload = owned(coord, owner, &first.upload_id).await?;
    let file = upload
        .set
        .files
        .iter()
        .find(|f| f.sha256 == first.file_sha256)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "upload {}: '{}' is not one of its files",
                upload.id, first.file_sha256
            ))
        })?
        .clone();
    let stage = stage_of(&upload.id, &file.sha256);
    let Some(_receiving) = coord.uploads.receiving(&stage) else {
        return Err(Error::Unavailable(format!(
            "file '{}' is being received by another stream of upload {}; retry",
            file.path, upload.id
        )));
    };
    if coord.store.blob_size(&file.sha256).await?.is_some() {
        // Stored meanwhile (by another upload of the same bytes): what this one staged goes.
        coord.uploads.forget(&stage);
        coord.store.discard_staged(&stage).await?;
        return progress(coord, &upload).await;
    }
    let held = coord.store.staged_len(&stage).await?.min(file.size_bytes);
    if first.offset != held {
        return Err(Error::FailedPrecondition(format!(
            "file '{}': the coordinator holds {held} bytes of it; send from there, not from {}",
            file.path, first.offset
        )));
    }
    let hasher = match coord.uploads.take(&stage, held) {
        Some(h) => h,
        None => rehash(coord, &stage, held).await?,
    };
    let outcome = receive_file(coord, &stage, &file, held, hasher, first.data, &mut pieces).await;
    match outcome {
        Ok(()) => {}
        Err(e @ Error::ResourceExhausted(_)) | Err(e @ Error::InvalidArgument(_)) => {
            // A full disk or bad bytes: what was staged goes, so the space comes back and nothing
            // half-made stays.
            coord.uploads.forget(&stage);
            coord.store.discard_staged(&stage).await?;
            return Err(e);
        }
        Err(e) => return Err(e),
    }
    coord
        .store
        .put_upload(&Upload {
            updated_at: now_ms(),
            ..upload.clone()
        })
        .await?;
    progress(coord, &upload).await
}

/// Hashes `chunk` into `hasher` on a blocking thread (1 MiB takes about a millisecond).
async fn hash_chunk(mut hasher: Sha256, chunk: Vec<u8>) -> Result<(Sha256, Vec<u8>)> {
    tokio::task::spawn_blocking(move || {
        hasher.update(&chunk);
        (hasher, chunk)
    })
    .await
    .map_err(|e| Error::Internal(format!("hashing an upload failed: {e}")))
}

/// Receives the bytes of one file from `held` on: whole chunks are staged and hashed while the next
/// ones arrive (a reader and a writer joined in one task, a few chunks apart), so the network, the disk
/// and the hash overlap.
async fn receive_file(
    coord: &Context,
    stage: &str,
    file: &ArtifactFile,
    held: u64,
    hasher: Sha256,
    first: Vec<u8>,
    rest: &mut (impl Stream<Item = Result<Piece>> + Unpin),
) -> Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    // Reads messages into whole chunks; returns the short tail and how the stream ended.
    let reader = async move {
        let mut at = held;
        let mut buf: Vec<u8> = Vec::with_capacity(BLOB_CHUNK_BYTES);
        let mut next = Some(Ok(Piece {
            data: first,
            ..Default::default()
        }));
        loop {
            let piece = match next.take() {
                Some(p) => p,
                None => match rest.next().await {
                    Some(p) => p,
                    None => return Ok((buf, None)),
                },
            };
            let piece = match piece {
                Ok(p) => p,
                // The client went away: the whole chunks sent so far stay for the resume.
                Err(e) => return Ok((Vec::new(), Some(e))),
            };
            if piece.data.len() > MAX_MESSAGE_DATA {
                return Err(Error::InvalidArgument(format!(
                    "file '{}': a message of {} bytes is larger than {MAX_MESSAGE_DATA}",
                    file.path,
                    piece.data.len()
                )));
            }
            if at + (buf.len() + piece.data.len()) as u64 > file.size_bytes {
                return Err(Error::InvalidArgument(format!(
                    "file '{}': more bytes arrived than its size ({}); the upload of this file was \
                     discarded",
                    file.path, file.size_bytes
                )));
            }
            if buf.is_empty() && piece.data.len() == BLOB_CHUNK_BYTES {
                // A message of exactly one chunk (what the CLI sends) goes on without a copy.
                at += BLOB_CHUNK_BYTES as u64;
                if tx.send(piece.data).await.is_err() {
                    return Ok((Vec::new(), None));
                }
                continue;
            }
            let mut bytes = &piece.data[..];
            while !bytes.is_empty() {
                let take = (BLOB_CHUNK_BYTES - buf.len()).min(bytes.len());
                buf.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if buf.len() == BLOB_CHUNK_BYTES {
                    at += buf.len() as u64;
                    let full = std::mem::replace(&mut buf, Vec::with_capacity(BLOB_CHUNK_BYTES));
                    if tx.send(full).await.is_err() {
                        // The writer failed; its error is the one reported.
                        return Ok((Vec::new(), None));
                    }
                }
            }
        }
    };
    // Stages and hashes whole chunks; returns where it got to. It owns the receiver, so when it stops
    // on an error the reader's next send fails instead of waiting for room for ever.
    let writer = async move {
        let (mut at, mut hasher) = (held, hasher);
        let mut since_touch = 0u32;
        while let Some(chunk) = rx.recv().await {
            coord.store.stage_chunk(stage, at, &chunk).await?;
            received(coord, chunk.len());
            at += chunk.len() as u64;
            hasher = hash_chunk(hasher, chunk).await?.0;
            since_touch += 1;
            if since_touch >= 256 {
                // A long transfer keeps its upload from expiring.
                since_touch = 0;
                if let Some(u) = coord.store.get_upload(stage_upload(stage)).await? {
                    coord
                        .store
                        .put_upload(&Upload {
                            updated_at: now_ms(),
                            ..u
                        })
                        .await?;
                }
            }
        }
        Ok::<_, Error>((at, hasher))
    };
    let (read, written) = futures::future::join(reader, writer).await;
    let (at, hasher) = written?;
    let (tail, broken) = read?;
    if let Some(e) = broken
        && at < file.size_bytes
    {
        coord.uploads.put(stage, at, hasher);
        return Err(e);
    }
    let end = at + tail.len() as u64;
    if end < file.size_bytes {
        coord.uploads.put(stage, at, hasher);
        return Ok(());
    }
    let mut hasher = hasher;
    if !tail.is_empty() || file.size_bytes == 0 {
        coord.store.stage_chunk(stage, at, &tail).await?;
        received(coord, tail.len());
        hasher = hash_chunk(hasher, tail).await?.0;
    }
    let got = hex::encode(hasher.finalize());
    if got != file.sha256 {
        return Err(Error::InvalidArgument(format!(
            "file '{}' arrived corrupted: its bytes hash to {got}, not {}; the upload of this file \
             was discarded, push again",
            file.path, file.sha256
        )));
    }
    coord
        .store
        .commit_staged(stage, &file.sha256, file.size_bytes)
        .await?;
    coord.uploads.forget(stage);
    Ok(())
}

/// The upload id inside a stage name.
fn stage_upload(stage: &str) -> &str {
    stage
        .strip_prefix("up-")
        .and_then(|s| s.split('-').next())
        .unwrap_or("")
}

/// Completes `owner`'s upload: every file must be stored. Records the set (for several files, its
/// manifest too, as a blob) and forgets the upload. Returns the set's hash and the set.
pub async fn finish(coord: &Context, owner: &str, id: &str) -> Result<(String, ArtifactSet)> {
    let upload = owned(coord, owner, id).await?;
    let status = progress(coord, &upload).await?;
    let missing: Vec<String> = upload
        .set
        .files
        .iter()
        .zip(&status.files)
        .filter(|(_, p)| p.received_bytes < p.size_bytes)
        .map(|(f, p)| {
            format!(
                "'{}' ({} of {} bytes)",
                f.path, p.received_bytes, p.size_bytes
            )
        })
        .collect();
    if !missing.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "upload {id} is not complete: {} still to send",
            missing.join(", ")
        )));
    }
    for f in &upload.set.files {
        if coord.store.blob_size(&f.sha256).await? != Some(f.size_bytes) {
            return Err(Error::FailedPrecondition(format!(
                "upload {id}: file '{}' is not stored",
                f.path
            )));
        }
    }
    // Stages of files another upload stored first hold bytes nobody needs.
    for f in &upload.set.files {
        let stage = stage_of(&upload.id, &f.sha256);
        coord.uploads.forget(&stage);
        coord.store.discard_staged(&stage).await?;
    }
    let set = upload.set.clone();
    if set.files.len() > 1 {
        coord
            .store
            .put_blob(&upload.set_sha256, set.manifest().as_bytes())
            .await?;
    }
    coord
        .store
        .put_set(&upload.set_sha256, &set, now_ms())
        .await?;
    coord.store.delete_upload(id).await?;
    Ok((upload.set_sha256, set))
}

/// A stored set; a lone blob (an artifact uploaded whole, an eval set) reads as a set of one file.
pub async fn get_set(coord: &Context, sha256: &str) -> Result<ArtifactSet> {
    if let Some(set) = coord.store.get_set(sha256).await? {
        return Ok(set);
    }
    match coord.store.blob_size(sha256).await? {
        Some(size) => Ok(ArtifactSet::single(sha256, size)),
        None => Err(Error::NotFound(format!(
            "no artifact set or blob with sha256 {sha256}"
        ))),
    }
}

/// Whether agent `agent_id` may read artifact set or blob `sha256`: only what the task it is running
/// needs (its variant's artifact set and files, the base variant's for fidelity, the eval set in
/// effect and the job's input data). A stolen or curious agent credential reads nothing else.
pub async fn agent_may_read(coord: &Context, agent_id: &str, sha256: &str) -> Result<bool> {
    let Some(lease) = coord.store.active_lease_of_agent(agent_id).await? else {
        return Ok(false);
    };
    if lease.config.input_data_sha256 == sha256 {
        return Ok(true);
    }
    let variants = coord.store.list_variants(Some(&lease.model)).await?;
    let Some(variant) = variants.iter().find(|v| v.variant == lease.variant) else {
        return Ok(false);
    };
    if variant.eval_inputs_sha256 == sha256 || variant.eval_labels_sha256 == sha256 {
        return Ok(true);
    }
    let mut sets = vec![variant.artifact_sha256.clone()];
    if let Some(root) = crate::scheduler::lineage_root(&variants, variant) {
        sets.push(root.artifact_sha256.clone());
    }
    for set in sets {
        if set == sha256 {
            return Ok(true);
        }
        if let Some(stored) = coord.store.get_set(&set).await?
            && stored.files.iter().any(|f| f.sha256 == sha256)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Stores one small blob from a stream (eval sets, input data), verified against `expected` when
/// given; returns its hash and size. The upload limit applies.
pub async fn store_blob(
    coord: &Context,
    chunks: impl Stream<Item = Result<(Vec<u8>, String)>> + Unpin,
) -> Result<(String, u64)> {
    let mut chunks = chunks;
    let stage = format!("blob-{}", uuid::Uuid::new_v4().simple());
    let result = async {
        let max = coord.config.max_upload_bytes;
        let mut hasher = Sha256::new();
        let (mut at, mut expected) = (0u64, String::new());
        let mut buf: Vec<u8> = Vec::with_capacity(BLOB_CHUNK_BYTES);
        while let Some(next) = chunks.next().await {
            let (data, exp) = next?;
            if expected.is_empty() {
                expected = exp;
            }
            if at + (buf.len() + data.len()) as u64 > max {
                return Err(Error::InvalidArgument(format!(
                    "blob: larger than max_upload_bytes ({max} bytes)"
                )));
            }
            let mut bytes = &data[..];
            while !bytes.is_empty() {
                let take = (BLOB_CHUNK_BYTES - buf.len()).min(bytes.len());
                buf.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if buf.len() == BLOB_CHUNK_BYTES {
                    coord.store.stage_chunk(&stage, at, &buf).await?;
                    received(coord, buf.len());
                    hasher.update(&buf);
                    at += buf.len() as u64;
                    buf.clear();
                }
            }
        }
        coord.store.stage_chunk(&stage, at, &buf).await?;
        received(coord, buf.len());
        hasher.update(&buf);
        at += buf.len() as u64;
        let sha = hex::encode(hasher.finalize());
        if !expected.is_empty() && !expected.eq_ignore_ascii_case(&sha) {
            return Err(Error::InvalidArgument(format!(
                "upload corrupted in transit: expected sha256 {expected}, received {sha}"
            )));
        }
        coord.store.commit_staged(&stage, &sha, at).await?;
        Ok((sha, at))
    }
    .await;
    if result.is_err() {
        let _ = coord.store.discard_staged(&stage).await;
    }
    result
}

/// Drops uploads not continued for `upload_expiry_hours`, with their staged bytes. Returns how many.
pub async fn expire(coord: &Context, now: i64) -> Result<usize> {
    let before = now - coord.config.upload_expiry_hours as i64 * 3_600_000;
    let stale = coord.store.stale_uploads(before).await?;
    for u in &stale {
        for f in &u.set.files {
            let stage = stage_of(&u.id, &f.sha256);
            coord.uploads.forget(&stage);
            coord.store.discard_staged(&stage).await?;
        }
        coord.store.delete_upload(&u.id).await?;
        tracing::info!(upload = %u.id, set = %u.set_sha256, "Collected an upload left unfinished.");
    }
    Ok(stale.len())
}

/// Counts artifact bytes received from a client.
fn received(coord: &Context, n: usize) {
    coord.telemetry.inst.transfer.add(
        n as u64,
        &[opentelemetry::KeyValue::new("direction", "received")],
    );
}
