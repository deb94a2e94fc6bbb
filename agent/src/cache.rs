//! Local artifact cache: blobs are fetched from the coordinator by sha256, verified, and kept under
//! `STATE_DIR/cache/<sha256>`; a cached file is verified again before use.

use std::path::{Path, PathBuf};

use fleetbench_proto::v1::DownloadBlobRequest;
use fleetbench_proto::v1::model_service_client::ModelServiceClient;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use crate::error::{AgentError, Result};

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

impl Cache {
    /// A cache in `dir` (created when missing).
    pub fn new(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::Io(format!("cannot create cache {}: {e}", dir.display())))?;
        Ok(Self { dir })
    }

    /// Path of a verified local copy of blob `sha256`, downloading it when missing or corrupt.
    pub async fn fetch(
        &self,
        client: &mut ModelServiceClient<Channel>,
        sha256: &str,
    ) -> Result<PathBuf> {
        if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(AgentError::Task(format!("'{sha256}' is not a sha256")));
        }
        let path = self.dir.join(sha256);
        if path.exists() {
            if sha256_file(&path).map(|h| h == sha256).unwrap_or(false) {
                return Ok(path);
            }
            tracing::warn!(path = %path.display(), "Cached artifact is corrupt; fetching it again.");
        }
        let mut stream = client
            .download_blob(DownloadBlobRequest {
                sha256: sha256.to_string(),
            })
            .await?
            .into_inner();
        let mut hasher = Sha256::new();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            hasher.update(&chunk.data);
            data.extend_from_slice(&chunk.data);
        }
        let got = hex::encode(hasher.finalize());
        if got != sha256 {
            return Err(AgentError::Task(format!(
                "artifact {sha256} arrived corrupted (sha256 {got})"
            )));
        }
        let tmp = self
            .dir
            .join(format!("{sha256}.{}.part", uuid::Uuid::new_v4().simple()));
        std::fs::write(&tmp, &data)
            .map_err(|e| AgentError::Io(format!("cannot write {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| AgentError::Io(format!("cannot write {}: {e}", path.display())))?;
        tracing::debug!(sha256, bytes = data.len(), "Artifact cached.");
        Ok(path)
    }
}
