//! The agent's artifact cache, under `STATE_DIR/cache`:
//!
//! - `blobs/<sha256>`: single files (a model without external data, eval sets, input data);
//! - `sets/<set sha256>/…`: a model and its external-data files under their original relative names,
//!   so ONNX Runtime resolves them; `.complete` (the set's manifest) marks a set whose every file
//!   arrived and matched its hash.
//!
//! Files arrive in chunks straight to disk (never whole in memory) as `<name>.part`, hashed as they
//! come; a download cut in the middle (connection reset, agent killed) continues from the bytes the
//! `.part` holds, and a file is renamed into place only when its hash matched. A cached file is hashed
//! again before use. Before a download the cache makes room: it evicts the least recently used
//! entries (never one a running task holds, see [`Pins`]) until the files fit both the free disk and
//! the budget (`--cache-max-bytes`), and refuses the task, saying why, when they cannot.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fleetbench_common::artifact::{ArtifactFile, ArtifactSet, is_sha256};
use fleetbench_common::files::{fits, free_bytes, hash_into, reserve, sha256_file, sync_dir};
use fleetbench_proto::connect::Authed;
use fleetbench_proto::v1::model_service_client::ModelServiceClient;
use fleetbench_proto::v1::{DownloadBlobRequest, GetArtifactSetRequest};
use sha2::{Digest, Sha256};

use crate::error::{AgentError, Result};

/// Longest silence between two chunks of a download.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts at one file before the task fails (each resumes where the last stopped).
const ATTEMPTS: u32 = 4;

/// Marker of a complete set.
const COMPLETE: &str = ".complete";

/// Entries held by running tasks, which eviction leaves alone.
#[derive(Debug, Default, Clone)]
pub struct Pins(Arc<Mutex<HashMap<PathBuf, usize>>>);

/// Holds an entry for as long as it lives.
#[derive(Debug)]
pub struct Pin {
    pins: Pins,
    entry: PathBuf,
}

impl Pins {
    fn pin(&self, entry: &Path) -> Pin {
        *self
            .0
            .lock()
            .expect("pins")
            .entry(entry.to_path_buf())
            .or_default() += 1;
        Pin {
            pins: self.clone(),
            entry: entry.to_path_buf(),
        }
    }

    fn pinned(&self, entry: &Path) -> bool {
        self.0.lock().expect("pins").contains_key(entry)
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut m = self.pins.0.lock().expect("pins");
        if let Some(n) = m.get_mut(&self.entry) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.entry);
            }
        }
    }
}

/// A fetched model: the path ONNX Runtime opens, and the pin that keeps its files while a task runs.
#[derive(Debug)]
pub struct Fetched {
    /// The model file (or the single blob).
    pub path: PathBuf,
    /// Keeps the entry from eviction.
    pub pin: Pin,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
    pins: Pins,
}

/// One cached entry, for eviction.
#[derive(Debug)]
struct Entry {
    path: PathBuf,
    bytes: u64,
    used: SystemTime,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> AgentError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        AgentError::Task(format!(
            "the agent's disk is full while writing {}; free space in its state directory",
            path.display()
        ))
    } else {
        AgentError::Io(format!("{what} {}: {e}", path.display()))
    }
}

/// Runs blocking file work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Io(format!("a cache task failed: {e}")))?
}

/// Marks an entry as just used (its modification time orders eviction).
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Size of what is on disk under `path` (a file, or a folder's files).
fn disk_bytes(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|rd| rd.flatten().map(|e| disk_bytes(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// Whether a transfer error may heal by trying again (a cut connection, a stall).
fn transient(e: &AgentError) -> bool {
    match e {
        AgentError::Transport(_) => true,
        AgentError::Coordinator(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Internal
        ),
        AgentError::Io(m) => m.contains("stalled"),
        _ => false,
    }
}

impl Cache {
    /// A cache in `dir` (created when missing) of at most `max_bytes` (0: no budget but the disk).
    pub fn new(dir: PathBuf, max_bytes: u64) -> Result<Self> {
        for d in ["blobs", "sets"] {
            std::fs::create_dir_all(dir.join(d))
                .map_err(|e| io("cannot create cache", &dir.join(d), e))?;
        }
        // Agents before artifact sets kept files right under the cache folder; nothing finds them now,
        // and what is needed again is fetched again.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let stem = name.split('.').next().unwrap_or_default();
                if e.path().is_file() && is_sha256(stem) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Self {
            dir,
            max_bytes,
            pins: Pins::default(),
        })
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("blobs").join(sha256)
    }

    fn set_dir(&self, sha256: &str) -> PathBuf {
        self.dir.join("sets").join(sha256)
    }

    /// Every entry with its size and last use.
    fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        for kind in ["blobs", "sets"] {
            let Ok(rd) = std::fs::read_dir(self.dir.join(kind)) else {
                continue;
            };
            for e in rd.flatten() {
                let path = e.path();
                let used_by = if kind == "sets" {
                    path.join(COMPLETE)
                } else {
                    path.clone()
                };
                let used = std::fs::metadata(&used_by)
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.push(Entry {
                    bytes: disk_bytes(&path),
                    path,
                    used,
                });
            }
        }
        out
    }

    /// Makes room for `need` more bytes: evicts the least recently used entries that no task holds
    /// (never `keep`) until they fit the budget and the free disk. The error says what does not fit.
    fn make_room(&self, need: u64, keep: &Path, what: &str) -> Result<()> {
        if self.max_bytes > 0 && need > self.max_bytes {
            return Err(AgentError::Task(format!(
                "{what} needs {need} bytes in the cache, more than its budget (--cache-max-bytes {})",
                self.max_bytes
            )));
        }
        let mut entries = self.entries();
        entries.sort_by_key(|e| e.used);
        let mut used: u64 = entries.iter().map(|e| e.bytes).sum();
        let fits = |used: u64| {
            let budget_ok = self.max_bytes == 0 || used + need <= self.max_bytes;
            let disk_ok = free_bytes(&self.dir).is_none_or(|free| fits(need, free));
            budget_ok && disk_ok
        };
        for e in &entries {
            if fits(used) {
                return Ok(());
            }
            // Never the entry being fetched, its partial download, or what a running task holds.
            if e.path == keep || e.path == part_of(keep) || self.pins.pinned(&e.path) {
                continue;
            }
            tracing::info!(entry = %e.path.display(), bytes = e.bytes, "Evicting a cached artifact to make room.");
            let removed = if e.path.is_dir() {
                std::fs::remove_dir_all(&e.path)
            } else {
                std::fs::remove_file(&e.path)
            };
            if removed.is_ok() {
                used = used.saturating_sub(e.bytes);
            }
        }
        if fits(used) {
            return Ok(());
        }
        let free = free_bytes(&self.dir).unwrap_or(0);
        if self.max_bytes > 0 && used + need > self.max_bytes {
            Err(AgentError::Task(format!(
                "{what} needs {need} bytes in the cache; running tasks hold {used} of its budget \
                 (--cache-max-bytes {})",
                self.max_bytes
            )))
        } else {
            Err(AgentError::Task(format!(
                "{what} needs {need} bytes and the agent's disk has {free} free (with {} kept \
                 spare) after evicting what it could; free space in {}",
                reserve(free),
                self.dir.display()
            )))
        }
    }

    /// Path of a verified local copy of the single blob `sha256` (an eval set, input data), pinned.
    pub async fn fetch_blob(
        &self,
        client: &mut ModelServiceClient<Authed>,
        sha256: &str,
    ) -> Result<Fetched> {
        if !is_sha256(sha256) {
            return Err(AgentError::Task(format!("'{sha256}' is not a sha256")));
        }
        let path = self.blob_path(sha256);
        let pin = self.pins.pin(&path);
        let size = if path.exists() {
            None
        } else {
            Some(self.remote_set(client, sha256).await?.total_bytes())
        };
        self.fetch_file(
            client,
            sha256,
            size,
            &path,
            &path,
            &format!("blob {sha256}"),
        )
        .await?;
        touch(&path);
        Ok(Fetched { path, pin })
    }

    async fn remote_set(
        &self,
        client: &mut ModelServiceClient<Authed>,
        sha256: &str,
    ) -> Result<ArtifactSet> {
        let wire = client
            .get_artifact_set(GetArtifactSetRequest {
                sha256: sha256.to_string(),
            })
            .await?
            .into_inner();
        ArtifactSet::from(wire)
            .normalised()
            .map_err(|e| AgentError::Task(format!("artifact set {sha256}: {e}")))
    }

    /// The model of artifact set `sha256`, with every file it references laid out beside it, verified
    /// and pinned. A set of one file is a blob.
    pub async fn fetch_set(
        &self,
        client: &mut ModelServiceClient<Authed>,
        sha256: &str,
    ) -> Result<Fetched> {
        if !is_sha256(sha256) {
            return Err(AgentError::Task(format!("'{sha256}' is not a sha256")));
        }
        // A single file already here needs no word from the coordinator.
        if self.blob_path(sha256).exists() {
            return self.fetch_blob(client, sha256).await;
        }
        let dir = self.set_dir(sha256);
        let pin = self.pins.pin(&dir);
        let set = match std::fs::read_to_string(dir.join(COMPLETE)) {
            Ok(text) => ArtifactSet::parse_manifest(&text)
                .map_err(|e| AgentError::Io(format!("{}: {e}", dir.join(COMPLETE).display())))?,
            Err(_) => self.remote_set(client, sha256).await?,
        };
        if set.id() != sha256 {
            return Err(AgentError::Task(format!(
                "artifact set {sha256}: its files hash to set {}",
                set.id()
            )));
        }
        if set.files.len() == 1 {
            drop(pin);
            return self.fetch_blob(client, &set.files[0].sha256).await;
        }
        let missing: u64 = set
            .files
            .iter()
            .map(|f| {
                let have = std::fs::metadata(dir.join(&f.path))
                    .map(|m| m.len())
                    .or_else(|_| std::fs::metadata(part_of(&dir.join(&f.path))).map(|m| m.len()))
                    .unwrap_or(0);
                f.size_bytes.saturating_sub(have)
            })
            .sum();
        if missing > 0 {
            let what = format!("artifact set {} ({} files)", &sha256[..12], set.files.len());
            let (cache, keep) = (self.clone(), dir.clone());
            blocking(move || cache.make_room(missing, &keep, &what)).await?;
        }
        let started = std::time::Instant::now();
        for f in &set.files {
            let ArtifactFile {
                path, sha256: fsha, ..
            } = f;
            let dest = dir.join(path);
            let what = format!("file '{path}' of set {}", &sha256[..12]);
            self.fetch_file(client, fsha, Some(f.size_bytes), &dest, &dir, &what)
                .await?;
        }
        if missing > 0 {
            let s = started.elapsed().as_secs_f64();
            tracing::info!(
                set = %sha256,
                files = set.files.len(),
                bytes = missing,
                seconds = s,
                mb_per_s = missing as f64 / 1e6 / s.max(1e-9),
                "Artifact set fetched."
            );
        }
        let marker = dir.join(COMPLETE);
        let manifest = set.manifest();
        let d = dir.clone();
        blocking(move || {
            std::fs::write(&marker, manifest).map_err(|e| io("cannot write", &marker, e))?;
            sync_dir(&d).map_err(|e| io("cannot sync", &d, e))
        })
        .await?;
        touch(&dir.join(COMPLETE));
        Ok(Fetched {
            path: dir.join(&set.model_path),
            pin,
        })
    }

    /// Makes `dest` a verified copy of blob `sha256`: checks a copy already there, else downloads it
    /// (resuming a `.part`), retrying transfers that broke. `size` (when known) sizes the room to make;
    /// `entry` is the cache entry the file belongs to.
    async fn fetch_file(
        &self,
        client: &mut ModelServiceClient<Authed>,
        sha256: &str,
        size: Option<u64>,
        dest: &Path,
        entry: &Path,
        what: &str,
    ) -> Result<()> {
        if dest.exists() {
            let (p, want) = (dest.to_path_buf(), sha256.to_string());
            let ok = blocking(move || Ok(sha256_file(&p).map(|(h, _)| h == want).unwrap_or(false)))
                .await?;
            if ok {
                return Ok(());
            }
            tracing::warn!(path = %dest.display(), "A cached file is corrupt; fetching it again.");
            let _ = std::fs::remove_file(dest);
        }
        if entry == dest
            && let Some(size) = size
        {
            let held = std::fs::metadata(part_of(dest)).map_or(0, |m| m.len());
            let (cache, keep, what) = (self.clone(), entry.to_path_buf(), what.to_string());
            blocking(move || cache.make_room(size.saturating_sub(held), &keep, &what)).await?;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match download(client, sha256, dest).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < ATTEMPTS && transient(&e) => {
                    let wait = Duration::from_millis(250 << attempt);
                    tracing::warn!(%what, error = %e, attempt, "A download broke; resuming it.");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(AgentError::Task(format!("cannot fetch {what}: {e}"))),
            }
        }
    }
}

/// The partial download of `dest`.
fn part_of(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// Downloads blob `sha256` to `dest`, continuing a `.part` left by an earlier attempt: what it holds
/// is hashed first, the rest is asked for from its end, written chunk by chunk and hashed as it
/// arrives. A wrong hash drops the `.part`; a write error (a full disk) drops it too, so the space
/// comes back; a broken stream keeps it for the next attempt.
async fn download(
    client: &mut ModelServiceClient<Authed>,
    sha256: &str,
    dest: &Path,
) -> Result<()> {
    let part = part_of(dest);
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("cannot create", parent, e))?;
    }
    let p = part.clone();
    let (hasher, held) = blocking(move || {
        let mut h = Sha256::new();
        let n = match std::fs::metadata(&p) {
            Ok(_) => hash_into(&p, None, &mut h).map_err(|e| io("cannot read", &p, e))?,
            Err(_) => 0,
        };
        Ok((h, n))
    })
    .await?;
    if held > 0 {
        tracing::info!(file = %dest.display(), bytes = held, "Resuming a download.");
    }
    let mut stream = client
        .download_blob(DownloadBlobRequest {
            sha256: sha256.to_string(),
            offset: held,
        })
        .await?
        .into_inner();
    // A writer thread owns the file; chunks reach it through a small channel, so the async workers
    // never block on the disk and at most a few chunks are in memory.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let p = part.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<(Sha256, u64)> {
        let mut hasher = hasher;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| io("cannot open", &p, e))?;
        let mut n = held;
        while let Some(chunk) = rx.blocking_recv() {
            if let Err(e) = f.write_all(&chunk) {
                drop(f);
                let _ = std::fs::remove_file(&p);
                return Err(io("cannot write", &p, e));
            }
            hasher.update(&chunk);
            n += chunk.len() as u64;
        }
        f.sync_all().map_err(|e| io("cannot sync", &p, e))?;
        Ok((hasher, n))
    });
    let mut broken = None;
    loop {
        let next = match tokio::time::timeout(IDLE_TIMEOUT, stream.message()).await {
            Err(_) => {
                broken = Some(AgentError::Io(format!(
                    "the download stalled for {} s",
                    IDLE_TIMEOUT.as_secs()
                )));
                break;
            }
            Ok(Err(s)) => {
                broken = Some(AgentError::Coordinator(s));
                break;
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        if next.data.is_empty() {
            continue;
        }
        if tx.send(next.data).await.is_err() {
            break; // the writer failed; its error follows
        }
    }
    drop(tx);
    let (hasher, n) = writer
        .await
        .map_err(|e| AgentError::Io(format!("the cache writer failed: {e}")))??;
    if let Some(e) = broken {
        return Err(e);
    }
    let got = hex::encode(hasher.finalize());
    if got != sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(AgentError::Task(format!(
            "blob {sha256} arrived corrupted ({n} bytes hashing to {got}); it was discarded"
        )));
    }
    let (p, d) = (part.clone(), dest.to_path_buf());
    blocking(move || {
        std::fs::rename(&p, &d).map_err(|e| io("cannot move into place", &d, e))?;
        if let Some(parent) = d.parent() {
            sync_dir(parent).map_err(|e| io("cannot sync", parent, e))?;
        }
        Ok(())
    })
    .await?;
    tracing::debug!(sha256, bytes = n, "Artifact cached.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cache: &Cache, name: &str, bytes: usize, age_s: u64) -> PathBuf {
        let p = cache.blob_path(name);
        std::fs::write(&p, vec![0u8; bytes]).unwrap();
        let f = std::fs::File::options().append(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
        p
    }

    #[test]
    fn eviction_takes_the_least_recently_used_first_and_never_a_pinned_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf(), 3000).unwrap();
        let oldest = entry(&cache, "a", 1000, 300);
        let pinned = entry(&cache, "b", 1000, 200);
        let newest = entry(&cache, "c", 1000, 100);
        let _pin = cache.pins.pin(&pinned);
        // 1000 more bytes: one entry must go, the oldest unpinned one.
        cache.make_room(1000, Path::new("/none"), "test").unwrap();
        assert!(!oldest.exists() && pinned.exists() && newest.exists());
        // 2500 more: only `c` can go, and that is not enough beside the pinned 1000.
        let err = cache
            .make_room(2500, Path::new("/none"), "set X")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("set X needs 2500 bytes") && err.contains("--cache-max-bytes 3000"),
            "{err}"
        );
        assert!(pinned.exists());
        let err = cache
            .make_room(5000, Path::new("/none"), "set Y")
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than its budget"), "{err}");
    }

    #[test]
    fn the_partial_download_of_the_entry_being_fetched_is_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf(), 2500).unwrap();
        let target = cache.blob_path(&"a".repeat(64));
        let part = part_of(&target);
        std::fs::write(&part, vec![0u8; 1000]).unwrap();
        let old = entry(&cache, "old", 1000, 500);
        // 1500 more for `target`: the old entry goes, its own .part stays.
        cache.make_room(1500, &target, "blob a").unwrap();
        assert!(part.exists() && !old.exists());
    }

    #[test]
    fn files_of_the_old_flat_layout_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let sha = "b".repeat(64);
        std::fs::write(dir.path().join(&sha), b"old").unwrap();
        std::fs::write(dir.path().join(format!("{sha}.1234.part")), b"old").unwrap();
        std::fs::write(dir.path().join("keep.txt"), b"not ours").unwrap();
        let _cache = Cache::new(dir.path().to_path_buf(), 0).unwrap();
        assert!(!dir.path().join(&sha).exists());
        assert!(!dir.path().join(format!("{sha}.1234.part")).exists());
        assert!(dir.path().join("keep.txt").exists());
    }

    #[test]
    fn a_part_file_is_named_beside_its_destination() {
        assert_eq!(
            part_of(Path::new("/c/sets/s/weights/w.bin")),
            PathBuf::from("/c/sets/s/weights/w.bin.part")
        );
    }
}
