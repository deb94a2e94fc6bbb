//! `serve(config, listener, shutdown)`: the coordinator's gRPC server and its background tasks.

use std::future::Future;
use std::sync::Arc;

use fleetbench_proto::v1::agent_service_server::AgentServiceServer;
use fleetbench_proto::v1::fleet_service_server::FleetServiceServer;
use fleetbench_proto::v1::job_service_server::JobServiceServer;
use fleetbench_proto::v1::model_service_server::ModelServiceServer;
use fleetbench_proto::v1::ranking_service_server::RankingServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tracing::info;

use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};
use crate::grpc::{AgentApi, FleetApi, JobApi, ModelApi, RankingApi};
use crate::store::{self, Store};
use crate::{Coordinator, ingest, scheduler};

/// Largest gRPC message accepted (blob chunks are 1 MiB).
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Opens the database named in `config` and serves on `listener` until `shutdown` completes.
pub async fn serve(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let store = store::open(&config.database).await?;
    info!(database = %store::redact_url(&config.database), backend = store.backend(), "Database ready.");
    serve_with_store(config, store, listener, shutdown).await
}

/// Serves with a given store (tests use this to put a store double in).
pub async fn serve_with_store(
    config: CoordinatorConfig,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(format!("listener address: {e}")))?;
    let (ingest_tx, ingest_rx) = tokio::sync::mpsc::channel(16_384);
    let (hb_tx, hb_rx) = tokio::sync::mpsc::channel(16_384);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let coord = Arc::new(Coordinator {
        store,
        config: Arc::new(config),
        hub: Arc::new(scheduler::Hub::default()),
        ingest: ingest_tx,
        heartbeats: hb_tx,
        changes: tokio::sync::watch::channel(0).0,
        stopping: stop_rx.clone(),
        store_trouble_at: std::sync::atomic::AtomicI64::new(0),
    });
    let background = [
        tokio::spawn(scheduler::run(coord.clone(), stop_rx.clone())),
        tokio::spawn(ingest::run_writer(
            coord.clone(),
            ingest_rx,
            stop_rx.clone(),
        )),
        tokio::spawn(ingest::run_heartbeats(coord.clone(), hb_rx)),
    ];
    if !coord.config.addr_file.is_empty() {
        std::fs::write(&coord.config.addr_file, addr.to_string()).map_err(|e| {
            Error::Internal(format!(
                "cannot write addr_file {}: {e}",
                coord.config.addr_file
            ))
        })?;
    }
    info!(%addr, "Coordinator listening.");

    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    // Graceful shutdown waits for open streams, so agent sessions and job watches are ended first.
    let shutdown = {
        let stop_tx = stop_tx.clone();
        let hub = coord.hub.clone();
        async move {
            shutdown.await;
            info!("Coordinator stopping; closing agent sessions.");
            let _ = stop_tx.send(true);
            hub.close_all();
        }
    };
    let result = tonic::transport::Server::builder()
        .add_service(
            AgentServiceServer::new(AgentApi(coord.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ModelServiceServer::new(ModelApi(coord.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(JobServiceServer::new(JobApi(coord.clone())))
        .add_service(FleetServiceServer::new(FleetApi(coord.clone())))
        .add_service(RankingServiceServer::new(RankingApi(coord.clone())))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::Internal(format!("gRPC server: {e}")));
    let _ = stop_tx.send(true);
    for task in background {
        task.abort();
    }
    info!("Coordinator stopped.");
    result
}
