//! `serve(config, listener, shutdown)`: the coordinator's gRPC server and its background tasks.

use std::future::Future;
use std::sync::Arc;

use fleetbench_proto::v1::admin_service_server::AdminServiceServer;
use fleetbench_proto::v1::agent_service_server::AgentServiceServer;
use fleetbench_proto::v1::fleet_service_server::FleetServiceServer;
use fleetbench_proto::v1::job_service_server::JobServiceServer;
use fleetbench_proto::v1::model_service_server::ModelServiceServer;
use fleetbench_proto::v1::ranking_service_server::RankingServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::config::CoordinatorConfig;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::grpc::{AdminApi, AgentApi, FleetApi, JobApi, ModelApi, RankingApi};
use crate::session::Queues;
use crate::store::{self, Store};
use crate::{auth, health, heartbeat, ingest, maintenance, scheduler, tls};

/// Largest gRPC message accepted (blob chunks are 1 MiB).
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Opens the database named in `config` and serves on `listener` until `shutdown` completes.
pub async fn serve(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let data_dir =
        (!config.data_dir.is_empty()).then(|| std::path::PathBuf::from(&config.data_dir));
    let store = store::open_with(&config.database, data_dir.as_deref()).await?;
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
    let certs = tls::ServerCerts::load(&config)?;
    if certs.is_none() && !addr.ip().is_loopback() && !config.insecure {
        return Err(Error::FailedPrecondition(format!(
            "refusing to serve on {addr}, which other machines can reach, without TLS: run \
             `fleetbench-coordinator init --data-dir DIR --san HOST` and start with --data-dir DIR \
             (or give --tls-cert and --tls-key), or pass --insecure on a network you trust"
        )));
    }
    // Reflection in both versions: grpcurl asks v1, grpcio's Python client v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(fleetbench_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| Error::Internal(format!("gRPC reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("gRPC reflection: {e}")))?;
    // The first admin and join tokens, unless the database has an admin token (`init` made them, or
    // an earlier start did).
    let data_dir = tls::data_dir_of(&config);
    let ca = data_dir
        .as_deref()
        .map(|d| tls::TlsFiles::under(d).ca_cert())
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|pem| tls::fingerprint(&pem))
        .transpose()?
        .unwrap_or_default();
    match &data_dir {
        Some(d) if auth::bootstrap(store.as_ref(), d, &ca).await?.is_some() => info!(
            admin = %d.join(auth::ADMIN_TOKEN_FILE).display(),
            join = %d.join(auth::JOIN_TOKEN_FILE).display(),
            "The database held no admin token: made an admin token and an agent join token, \
             written to these files (mode 0600)."
        ),
        Some(_) => {}
        None if !auth::has_admin(store.as_ref()).await? => warn!(
            "The database holds no admin token, and there is no data directory to write one to: \
             give --data-dir, or run `fleetbench-coordinator init` against this database."
        ),
        None => {}
    }
    let (ingest_tx, ingest_rx) = tokio::sync::mpsc::channel(16_384);
    let (hb_tx, hb_rx) = tokio::sync::mpsc::channel(16_384);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (health_reporter, health_service) = health::service(stop_rx.clone()).await;
    let stop_tx = Arc::new(stop_tx);
    let replica_id = crate::context::new_replica_id();
    let telemetry = Arc::new(crate::otel::Telemetry::new(&config, &replica_id)?);
    let metrics_listener = match config.metrics_listen.as_str() {
        "" => None,
        a => Some(TcpListener::bind(a).await.map_err(|e| {
            Error::InvalidArgument(format!("metrics_listen: cannot listen on {a}: {e}"))
        })?),
    };
    let (ctx, window_events) = Context::with_telemetry(
        store,
        config,
        stop_rx.clone(),
        replica_id,
        telemetry.clone(),
    );
    let ctx = Arc::new(ctx);
    let queues = Queues {
        ingest: ingest_tx,
        heartbeats: hb_tx,
    };
    let mut background = vec![
        tokio::spawn(scheduler::run(ctx.clone(), stop_rx.clone())),
        tokio::spawn(ingest::run_writer(ctx.clone(), ingest_rx, stop_rx.clone())),
        tokio::spawn(heartbeat::run(ctx.clone(), hb_rx)),
        tokio::spawn(maintenance::run(ctx.clone(), stop_rx.clone())),
        tokio::spawn(health::run(ctx.clone(), health_reporter)),
        tokio::spawn(crate::otel::windows::run(ctx.clone(), window_events)),
        tokio::spawn(crate::otel::refresh_fleet(ctx.clone(), stop_rx.clone())),
    ];
    if let Some(l) = metrics_listener {
        let maddr = l
            .local_addr()
            .map_err(|e| Error::Internal(format!("metrics listener address: {e}")))?;
        if !ctx.config.metrics_addr_file.is_empty() {
            std::fs::write(&ctx.config.metrics_addr_file, maddr.to_string()).map_err(|e| {
                Error::Internal(format!(
                    "cannot write metrics_addr_file {}: {e}",
                    ctx.config.metrics_addr_file
                ))
            })?;
        }
        info!(addr = %maddr, "Serving Prometheus metrics on /metrics.");
        background.push(tokio::spawn(crate::otel::prom::serve(
            telemetry.clone(),
            l,
            stop_rx.clone(),
        )));
    }
    if let Some(o) = &telemetry.otlp {
        info!(
            endpoint = o.endpoint.as_deref().unwrap_or("(from OTEL_EXPORTER_OTLP_* variables)"),
            protocol = ?o.protocol,
            interval_ms = o.interval_ms,
            "Exporting metrics over OTLP."
        );
    }
    if let Some(certs) = &certs {
        background.push(tokio::spawn(certs.clone().keep_fresh(
            std::time::Duration::from_millis(ctx.config.tls_reload_interval_ms.max(100)),
            stop_rx.clone(),
        )));
    }
    if !ctx.config.addr_file.is_empty() {
        std::fs::write(&ctx.config.addr_file, addr.to_string()).map_err(|e| {
            Error::Internal(format!(
                "cannot write addr_file {}: {e}",
                ctx.config.addr_file
            ))
        })?;
    }
    info!(%addr, tls = certs.is_some(), "Coordinator listening.");

    // Graceful shutdown waits for open streams, so agent sessions and job watches are ended first.
    let shutdown = {
        let stop_tx = stop_tx.clone();
        let ctx = ctx.clone();
        async move {
            shutdown.await;
            info!("Coordinator stopping; closing agent sessions.");
            let _ = stop_tx.send(true);
            ctx.registry.close_all();
        }
    };
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_millis(
            ctx.config.keepalive_interval_ms,
        )))
        .http2_keepalive_timeout(Some(std::time::Duration::from_millis(
            ctx.config.keepalive_timeout_ms,
        )))
        // Artifacts move in 1 MiB messages: HTTP/2's default 64 KiB windows would stall each one on
        // round trips. Windows that grow with the link keep transfers streaming.
        .http2_adaptive_window(Some(true))
        .add_service(
            AgentServiceServer::new(AgentApi {
                ctx: ctx.clone(),
                queues,
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ModelServiceServer::new(ModelApi(ctx.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(JobServiceServer::new(JobApi(ctx.clone())))
        .add_service(FleetServiceServer::new(FleetApi(ctx.clone())))
        .add_service(RankingServiceServer::new(RankingApi(ctx.clone())))
        .add_service(AdminServiceServer::new(AdminApi(ctx.clone())))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let result = match &certs {
        Some(certs) => {
            let (incoming, acceptor) = tls_incoming(listener, certs.server_config()?);
            background.push(acceptor);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    }
    .map_err(|e| Error::Internal(format!("gRPC server: {e}")));
    let _ = stop_tx.send(true);
    for task in background {
        task.abort();
    }
    telemetry.shutdown().await;
    info!("Coordinator stopped.");
    result
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// TLS connections accepted on `listener`, each handshake in a task of its own (a slow or silent client
/// holds up no one), served with `config`, whose certificate can change between connections. The
/// task accepting them is returned, to be stopped with the server.
fn tls_incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
) -> (
    tokio_stream::wrappers::ReceiverStream<
        std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    >,
    tokio::task::JoinHandle<()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    warn!(error = %e, "Could not accept a connection.");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed.");
                    }
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out."),
                }
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}
