//! The CLI's gRPC connection to a coordinator.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use fleetbench_proto::v1::fleet_service_client::FleetServiceClient;
use fleetbench_proto::v1::job_service_client::JobServiceClient;
use fleetbench_proto::v1::model_service_client::ModelServiceClient;
use fleetbench_proto::v1::ranking_service_client::RankingServiceClient;
use fleetbench_proto::v1::{BlobChunk, BlobRef, DownloadBlobRequest};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint};

/// Bytes per uploaded chunk.
const CHUNK: usize = 1 << 20;

/// Clients of every coordinator service over one connection.
#[derive(Clone)]
pub struct Client {
    url: String,
    channel: Channel,
}

impl Client {
    /// A client of the coordinator at `url`. It connects on first use, so commands check their
    /// arguments before any network trouble shows.
    pub async fn connect(url: &str) -> Result<Self> {
        let channel = Endpoint::from_shared(url.to_string())
            .with_context(|| {
                format!(
                    "coordinator address '{url}' is not a valid URL (expected http://HOST:PORT)"
                )
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            url: url.to_string(),
            channel,
        })
    }

    /// Turns a gRPC status into an error that reads well on a terminal.
    pub fn error(&self, s: tonic::Status, doing: &str) -> anyhow::Error {
        let msg = s.message();
        match s.code() {
            tonic::Code::Unavailable if msg.contains("transport") || msg.contains("connect") => {
                anyhow::anyhow!(
                    "{doing}: cannot reach the coordinator at {} ({msg}); is fleetbench-coordinator running?",
                    self.url
                )
            }
            tonic::Code::Unavailable => {
                anyhow::anyhow!("{doing}: the coordinator is unavailable: {msg}")
            }
            tonic::Code::Internal | tonic::Code::Unknown => {
                anyhow::anyhow!("{doing}: coordinator error: {msg}")
            }
            _ => anyhow::anyhow!("{doing}: {msg}"),
        }
    }

    /// Model service.
    pub fn models(&self) -> ModelServiceClient<Channel> {
        ModelServiceClient::new(self.channel.clone()).max_decoding_message_size(16 << 20)
    }

    /// Job service.
    pub fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }

    /// Fleet service.
    pub fn fleet(&self) -> FleetServiceClient<Channel> {
        FleetServiceClient::new(self.channel.clone())
    }

    /// Ranking service.
    pub fn rankings(&self) -> RankingServiceClient<Channel> {
        RankingServiceClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }

    /// Downloads a blob and checks its sha256.
    pub async fn download(&self, sha256: &str) -> Result<Vec<u8>> {
        let mut stream = self
            .models()
            .download_blob(DownloadBlobRequest {
                sha256: sha256.to_string(),
            })
            .await
            .map_err(|s| self.error(s, &format!("downloading blob {sha256}")))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| self.error(s, &format!("downloading blob {sha256}")))?
        {
            out.extend_from_slice(&chunk.data);
        }
        let got = hex::encode(Sha256::digest(&out));
        if got != sha256 {
            anyhow::bail!("blob {sha256} arrived with sha256 {got}");
        }
        Ok(out)
    }

    /// Uploads a file as a blob in chunks; returns its reference.
    pub async fn upload(&self, path: &Path) -> Result<BlobRef> {
        let data =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        self.upload_bytes(&data, &path.display().to_string()).await
    }

    /// Uploads bytes as a blob in chunks; `what` names them in errors.
    pub async fn upload_bytes(&self, data: &[u8], what: &str) -> Result<BlobRef> {
        let sha = hex::encode(Sha256::digest(data));
        let mut chunks: Vec<BlobChunk> = data
            .chunks(CHUNK)
            .map(|c| BlobChunk {
                data: c.to_vec(),
                expected_sha256: String::new(),
            })
            .collect();
        if chunks.is_empty() {
            chunks.push(BlobChunk::default());
        }
        chunks[0].expected_sha256 = sha;
        let blob = self
            .models()
            .upload_blob(futures::stream::iter(chunks))
            .await
            .map_err(|s| self.error(s, &format!("uploading {what}")))?
            .into_inner();
        Ok(blob)
    }
}
