//! The CLI's gRPC connection to a coordinator.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use fleetbench_proto::connect::{Authed, Bearer};
use fleetbench_proto::v1::BlobRef;
use fleetbench_proto::v1::admin_service_client::AdminServiceClient;
use fleetbench_proto::v1::fleet_service_client::FleetServiceClient;
use fleetbench_proto::v1::job_service_client::JobServiceClient;
use fleetbench_proto::v1::model_service_client::ModelServiceClient;
use fleetbench_proto::v1::ranking_service_client::RankingServiceClient;
use tonic::transport::Channel;

/// Clients of every coordinator service over one connection.
#[derive(Clone)]
pub struct Client {
    url: String,
    channel: Channel,
    bearer: Bearer,
}

impl Client {
    /// A client of the coordinator at `url` (plain `http://`). It connects on first use, so commands
    /// check their arguments before any network trouble shows.
    pub async fn connect(url: &str, token: Option<&str>) -> Result<Self> {
        Self::connect_with(url, None, token).await
    }

    /// A client of the coordinator at `url`; an `https://` address is verified against the CA
    /// certificate in `ca_cert`; calls carry `token`.
    pub async fn connect_with(
        url: &str,
        ca_cert: Option<&Path>,
        token: Option<&str>,
    ) -> Result<Self> {
        let bearer = Bearer::new(token).map_err(anyhow::Error::msg)?;
        let ca = ca_cert
            .map(fleetbench_proto::connect::read_ca)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let channel = fleetbench_proto::connect::endpoint(url, ca.as_deref())
            .map_err(anyhow::Error::msg)?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_adaptive_window(true)
            .connect_lazy();
        Ok(Self {
            url: url.to_string(),
            channel,
            bearer,
        })
    }

    /// Turns a gRPC status into an error that reads well on a terminal.
    pub fn error(&self, s: tonic::Status, doing: &str) -> anyhow::Error {
        let msg = s.message();
        // Transport failures keep their cause (a refused connection, a certificate not trusted) in
        // the status's source chain.
        let mut cause = String::new();
        let mut next = std::error::Error::source(&s);
        while let Some(e) = next {
            cause.push_str(": ");
            cause.push_str(&e.to_string());
            next = e.source();
        }
        // Only statuses the client's transport makes (not a coordinator's own error about, say, its
        // database connection).
        let transport = matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Cancelled
        ) && (msg.contains("transport error")
            // (what a plaintext client may see when the server speaks TLS)
            || msg.contains("operation was canceled")
            || msg.contains("connect error")
            || msg.contains("error trying to connect")
            || msg.contains("h2 protocol error"));
        match s.code() {
            _ if transport => {
                let hint = if self.url.starts_with("http://") {
                    "; is fleetbench-coordinator running there, and without TLS? (a coordinator with \
                     TLS needs an https:// address and --ca-cert)"
                } else {
                    "; is fleetbench-coordinator running there, and is --ca-cert the CA that signed its \
                     certificate?"
                };
                anyhow::anyhow!(
                    "{doing}: cannot reach the coordinator at {} ({msg}{cause}){hint}",
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
    pub fn models(&self) -> ModelServiceClient<Authed> {
        ModelServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(16 << 20)
    }

    /// Job service.
    pub fn jobs(&self) -> JobServiceClient<Authed> {
        JobServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(64 << 20)
    }

    /// Fleet service.
    pub fn fleet(&self) -> FleetServiceClient<Authed> {
        FleetServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// Ranking service.
    pub fn rankings(&self) -> RankingServiceClient<Authed> {
        RankingServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(64 << 20)
    }

    /// Administration.
    pub fn admin(&self) -> AdminServiceClient<Authed> {
        AdminServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// Uploads a small file (an eval set, input data) as a blob, in chunks; returns its reference.
    pub async fn upload(&self, path: &Path) -> Result<BlobRef> {
        crate::transfer::upload_blob(self, path).await
    }
}
