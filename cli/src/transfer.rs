//! Moving files to and from the coordinator in chunks, never whole in memory.
//!
//! A model is pushed as an *artifact set*: the `.onnx` and every external-data file its initializers
//! reference (their `location`, relative to the model's folder). [`collect`] finds and hashes the
//! files; [`push_set`] starts an upload under the set's hash, sends each file from the offset the
//! coordinator already holds, and finishes it. A push cut in the middle (connection reset, the CLI
//! killed) continues from the stored bytes when it is retried, by this process or by the next
//! `models push` of the same set from the same client ([`client_id`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use fleetbench_common::artifact::{ArtifactFile, ArtifactSet};
use fleetbench_common::files::sha256_file;
use fleetbench_common::onnx;
use fleetbench_proto::v1 as pb;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::client::Client;

pub use fleetbench_common::artifact::CLIENT_KEY;

/// Bytes per message.
const CHUNK: usize = 1 << 20;

/// Files of a set sent at once.
const PARALLEL_FILES: usize = 3;

/// Attempts at a transfer that breaks (each continues where the last stopped).
const ATTEMPTS: u32 = 5;

/// The id this client gives the coordinator for its uploads: `FLEETBENCH_CLIENT_ID`, else one made on
/// first use and kept in `$XDG_STATE_HOME/fleetbench/client-id` (or `~/.local/state/…`), so a push
/// the CLI did not finish is resumed by the next one.
pub fn client_id() -> String {
    if let Ok(id) = std::env::var("FLEETBENCH_CLIENT_ID")
        && !id.trim().is_empty()
    {
        return id.trim().to_string();
    }
    let dir = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .map(|d| d.join("fleetbench"));
    if let Some(dir) = dir {
        let file = dir.join("client-id");
        if let Ok(id) = std::fs::read_to_string(&file)
            && !id.trim().is_empty()
        {
            return id.trim().to_string();
        }
        let id = format!("cli-{:032x}", rand::random::<u128>());
        if std::fs::create_dir_all(&dir).is_ok() && std::fs::write(&file, &id).is_ok() {
            return id;
        }
    }
    // Nowhere to keep one: an id that stays the same for this user on this host.
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    format!(
        "cli-{}",
        &fleetbench_common::sha256_hex(format!("{}:{uid}", host.trim()).as_bytes())[..32]
    )
}

fn with_client<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Ok(v) = client_id().parse() {
        r.metadata_mut().insert(CLIENT_KEY, v);
    }
    r
}

/// A model on disk and the files of its artifact set.
#[derive(Debug, Clone)]
pub struct LocalSet {
    /// The set (canonical form).
    pub set: ArtifactSet,
    /// Its identity.
    pub sha256: String,
    /// Each file of the set (by its path in the set) on disk.
    pub paths: BTreeMap<String, PathBuf>,
}

/// Finds the files of the model at `model`: the model and every external-data file its
/// initializers reference, relative to its folder, each hashed. The error names the initializer and
/// the file when a reference leaves the model's folder, is missing or is shorter than it reads.
pub fn collect(model: &Path) -> Result<LocalSet> {
    let name = model
        .file_name()
        .ok_or_else(|| anyhow!("{} names no file", model.display()))?
        .to_string_lossy()
        .into_owned();
    let dir = model.parent().unwrap_or(Path::new(".")).to_path_buf();
    let file =
        std::fs::File::open(model).with_context(|| format!("cannot read {}", model.display()))?;
    let mut paths = BTreeMap::from([(name.clone(), model.to_path_buf())]);
    // A file that is not ONNX goes alone; the coordinator says what is wrong with it.
    if let Ok(scanned) = fleetbench_common::onnx_scan::scan(file) {
        let graph = scanned.model.graph.unwrap_or_default();
        for r in onnx::external_data(&graph) {
            let rel = onnx::check_location(&r.location).map_err(|e| {
                anyhow!(
                    "{}: initializer '{}' keeps its data at {e}",
                    model.display(),
                    r.tensor
                )
            })?;
            let path = dir.join(&rel);
            let size = std::fs::metadata(&path)
                .map_err(|e| {
                    anyhow!(
                        "{}: initializer '{}' keeps its data in '{}', which is missing ({}: {e}); \
                         push the model from the folder that holds its external data",
                        model.display(),
                        r.tensor,
                        r.location,
                        path.display()
                    )
                })?
                .len();
            if let Some(end) = r.end()
                && end > size
            {
                bail!(
                    "{}: initializer '{}' reads bytes up to {end} of '{rel}', which has {size}",
                    model.display(),
                    r.tensor
                );
            }
            paths.entry(rel).or_insert(path);
        }
    }
    // Hashed on every core: a large set is many files.
    let work: Vec<(&String, &PathBuf)> = paths.iter().collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(work.len());
    let hashed: Vec<Result<ArtifactFile>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((rel, path)) = work.get(i) else {
                            return out;
                        };
                        out.push((
                            i,
                            sha256_file(path)
                                .with_context(|| format!("cannot read {}", path.display()))
                                .map(|(sha256, size_bytes)| ArtifactFile {
                                    path: rel.to_string(),
                                    size_bytes,
                                    sha256,
                                }),
                        ));
                    }
                })
            })
            .collect();
        let mut all: Vec<(usize, Result<ArtifactFile>)> = workers
            .into_iter()
            .flat_map(|w| w.join().expect("a hashing thread"))
            .collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, r)| r).collect()
    });
    let files = hashed.into_iter().collect::<Result<Vec<_>>>()?;
    let set = ArtifactSet {
        model_path: name,
        files,
    }
    .normalised()
    .map_err(|e| anyhow!("{}: {e}", model.display()))?;
    // A single file's path in the set is fixed; map it back to the file on disk.
    let paths = if set.files.len() == 1 {
        BTreeMap::from([(set.files[0].path.clone(), model.to_path_buf())])
    } else {
        paths
    };
    Ok(LocalSet {
        sha256: set.id(),
        set,
        paths,
    })
}

/// Whether a transfer error may heal by trying again.
fn transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

/// Streams one file of an upload from `offset`, read a chunk at a time on a blocking thread.
async fn upload_file(
    client: &Client,
    upload_id: &str,
    file: &ArtifactFile,
    path: &Path,
    offset: u64,
    progress: &indicatif::ProgressBar,
) -> Result<(), tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadChunk>(4);
    let (id, sha, p) = (
        upload_id.to_string(),
        file.sha256.clone(),
        path.to_path_buf(),
    );
    let size = file.size_bytes;
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Seek;
        let mut f = std::fs::File::open(&p)?;
        f.seek(std::io::SeekFrom::Start(offset))?;
        let mut at = offset;
        let mut first = true;
        loop {
            let mut buf = vec![0u8; CHUNK.min((size - at) as usize)];
            if buf.is_empty() && !first {
                return Ok(());
            }
            f.read_exact(&mut buf)?;
            let n = buf.len() as u64;
            let msg = pb::UploadChunk {
                upload_id: if first { id.clone() } else { String::new() },
                file_sha256: if first { sha.clone() } else { String::new() },
                offset: if first { at } else { 0 },
                data: buf,
            };
            first = false;
            if tx.blocking_send(msg).is_err() {
                return Ok(()); // the call ended; its status says why
            }
            at += n;
            if at >= size {
                return Ok(());
            }
        }
    });
    let pb_ = progress.clone();
    let stream = futures::StreamExt::inspect(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        move |c: &pb::UploadChunk| pb_.inc(c.data.len() as u64),
    );
    let result = client.models().upload_file(with_client(stream)).await;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(tonic::Status::failed_precondition(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
        Err(e) => return Err(tonic::Status::internal(format!("reader failed: {e}"))),
    }
    result.map(|_| ())
}

/// One attempt at pushing a set: start (or resume), send what the coordinator lacks, finish.
async fn try_push(
    client: &Client,
    local: &LocalSet,
    progress: &indicatif::ProgressBar,
) -> Result<pb::ArtifactSet, tonic::Status> {
    let mut wire = pb::ArtifactSet::from(&local.set);
    wire.sha256 = local.sha256.clone();
    let status = client
        .models()
        .start_upload(with_client(pb::StartUploadRequest { set: Some(wire) }))
        .await?
        .into_inner();
    let held: u64 = status.files.iter().map(|f| f.received_bytes).sum();
    if held > 0 && progress.position() == 0 {
        let total = local.set.total_bytes();
        progress.suspend(|| {
            eprintln!(
                "{}: resuming; the coordinator already holds {held} of {total} bytes ({:.0} %)",
                local.set.model_path,
                100.0 * held as f64 / total.max(1) as f64
            )
        });
    }
    progress.set_position(held);
    // A few files at once: while the coordinator syncs one to disk, the next ones stream. (A plain
    // list of boxed futures: a closure over borrowed files would make the push future not Send.)
    type Upload<'a> =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send + 'a>>;
    let mut pending: Vec<Upload<'_>> = Vec::new();
    let mut sending = std::collections::HashSet::new();
    for (file, st) in local.set.files.iter().zip(&status.files) {
        // A file is sent until it is stored (an empty one, or one whose bytes all arrived before a
        // cut, is sent as nothing from its end, which makes the coordinator check and store it);
        // files with the same bytes are sent once.
        if !st.stored && sending.insert(file.sha256.as_str()) {
            let path = &local.paths[&file.path];
            pending.push(Box::pin(upload_file(
                client,
                &status.upload_id,
                file,
                path,
                st.received_bytes,
                progress,
            )));
        }
    }
    let mut uploads = futures::stream::iter(pending).buffer_unordered(PARALLEL_FILES);
    while let Some(done) = uploads.next().await {
        done?;
    }
    drop(uploads);
    Ok(client
        .models()
        .finish_upload(with_client(pb::FinishUploadRequest {
            upload_id: status.upload_id.clone(),
        }))
        .await?
        .into_inner())
}

/// Pushes a set, resuming after transfers that break. Shows progress on a terminal.
pub async fn push_set(client: &Client, local: &LocalSet) -> Result<()> {
    let progress = indicatif::ProgressBar::new(local.set.total_bytes());
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.set_message(format!("pushing {}", local.set.model_path));
    let what = format!(
        "pushing {} ({} files, {} bytes)",
        local.set.model_path,
        local.set.files.len(),
        local.set.total_bytes()
    );
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_push(client, local, &progress).await {
            Ok(_) => {
                progress.finish_and_clear();
                return Ok(());
            }
            Err(s) if attempt < ATTEMPTS && transient(&s) => {
                progress.suspend(|| {
                    eprintln!(
                        "{what}: the transfer broke ({}); resuming from what the coordinator holds",
                        s.message()
                    )
                });
                tokio::time::sleep(Duration::from_millis(300 << attempt)).await;
            }
            Err(s) => {
                progress.abandon();
                return Err(client.error(s, &what));
            }
        }
    }
}

/// Uploads one small file (an eval set, input data) as a blob, read in chunks; returns its reference.
pub async fn upload_blob(client: &Client, path: &Path) -> Result<pb::BlobRef> {
    let (sha, size) =
        sha256_file(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::BlobChunk>(4);
    let p = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut f = std::fs::File::open(&p)?;
        let mut first = Some(sha);
        let mut left = size;
        loop {
            let mut buf = vec![0u8; CHUNK.min(left as usize)];
            f.read_exact(&mut buf)?;
            left -= buf.len() as u64;
            let msg = pb::BlobChunk {
                expected_sha256: first.take().unwrap_or_default(),
                data: buf,
            };
            if tx.blocking_send(msg).is_err() || left == 0 {
                return Ok(());
            }
        }
    });
    let result = client
        .models()
        .upload_blob(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    reader
        .await
        .map_err(|e| anyhow!("reading {} failed: {e}", path.display()))?
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(result
        .map_err(|s| client.error(s, &format!("uploading {}", path.display())))?
        .into_inner())
}

/// Downloads blob `sha256` to `dest` in chunks and checks its hash; returns its size.
pub async fn download_to(client: &Client, sha256: &str, dest: &Path) -> Result<u64> {
    let what = format!("downloading blob {sha256}");
    let mut stream = client
        .models()
        .download_blob(pb::DownloadBlobRequest {
            sha256: sha256.to_string(),
            offset: 0,
        })
        .await
        .map_err(|s| client.error(s, &what))?
        .into_inner();
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut f = tokio::fs::File::create(dest)
        .await
        .with_context(|| format!("cannot create {}", dest.display()))?;
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = stream.message().await.map_err(|s| client.error(s, &what))? {
        h.update(&chunk.data);
        n += chunk.data.len() as u64;
        f.write_all(&chunk.data)
            .await
            .with_context(|| format!("cannot write {}", dest.display()))?;
    }
    f.flush().await?;
    let got = hex::encode(h.finalize());
    if got != sha256 {
        let _ = std::fs::remove_file(dest);
        bail!("blob {sha256} arrived with sha256 {got}");
    }
    Ok(n)
}

/// Downloads the artifact set `sha256` into `dir`, each file under its path in the set; returns the
/// model's path and the set.
pub async fn fetch_set(
    client: &Client,
    sha256: &str,
    dir: &Path,
) -> Result<(PathBuf, ArtifactSet)> {
    let wire = client
        .models()
        .get_artifact_set(pb::GetArtifactSetRequest {
            sha256: sha256.to_string(),
        })
        .await
        .map_err(|s| client.error(s, &format!("reading artifact set {sha256}")))?
        .into_inner();
    let set = ArtifactSet::from(wire)
        .normalised()
        .map_err(|e| anyhow!("artifact set {sha256}: {e}"))?;
    for f in &set.files {
        download_to(client, &f.sha256, &dir.join(&f.path)).await?;
    }
    Ok((dir.join(&set.model_path), set))
}
