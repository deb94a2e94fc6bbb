//! The standard gRPC health service (`grpc.health.v1.Health`): every fleetbench service and the whole
//! server (`""`) report SERVING while the database answers and NOT_SERVING while it does not, so load
//! balancers and orchestrators send traffic to a replica that can serve it. It needs no credentials.

use std::sync::Arc;
use std::time::Duration;

use fleetbench_proto::v1::agent_service_server::AgentServiceServer;
use fleetbench_proto::v1::fleet_service_server::FleetServiceServer;
use fleetbench_proto::v1::job_service_server::JobServiceServer;
use fleetbench_proto::v1::model_service_server::ModelServiceServer;
use fleetbench_proto::v1::ranking_service_server::RankingServiceServer;
use futures::StreamExt;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};
use tracing::{info, warn};

use crate::context::{Context, stopped};
use crate::grpc::{AgentApi, FleetApi, JobApi, ModelApi, RankingApi};

/// How often the database is asked, and how long it may take to answer.
const CHECK_EVERY: Duration = Duration::from_secs(1);
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// The names the health service answers for: the server as a whole and each service.
pub fn service_names() -> [&'static str; 6] {
    [
        "",
        AgentServiceServer::<AgentApi>::NAME,
        ModelServiceServer::<ModelApi>::NAME,
        JobServiceServer::<JobApi>::NAME,
        FleetServiceServer::<FleetApi>::NAME,
        RankingServiceServer::<RankingApi>::NAME,
    ]
}

/// tonic-health's service, with watch streams that end when the coordinator stops: an open watch
/// would otherwise hold the server's graceful shutdown for ever.
pub struct StoppingHealth {
    inner: HealthService,
    stopping: tokio::sync::watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Health for StoppingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = futures::stream::BoxStream<'static, Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let mut stopping = self.stopping.clone();
        let stopped = async move {
            let _ = stopping.wait_for(|s| *s).await;
        };
        // Watchers see NOT_SERVING last, then the end of the stream.
        let last = futures::stream::once(async {
            Ok(HealthCheckResponse {
                status: tonic_health::pb::health_check_response::ServingStatus::NotServing as i32,
            })
        });
        Ok(Response::new(
            statuses.take_until(stopped).chain(last).boxed(),
        ))
    }
}

/// The health service and its reporter. Every name starts NOT_SERVING (tonic-health starts the server
/// as a whole SERVING) until the first database check says otherwise.
pub async fn service(
    stopping: tokio::sync::watch::Receiver<bool>,
) -> (HealthReporter, HealthServer<StoppingHealth>) {
    let reporter = HealthReporter::new();
    set(&reporter, ServingStatus::NotServing).await;
    let inner = HealthService::from_health_reporter(reporter.clone());
    (
        reporter,
        HealthServer::new(StoppingHealth { inner, stopping }),
    )
}

async fn set(reporter: &HealthReporter, status: ServingStatus) {
    for name in service_names() {
        reporter.set_service_status(name, status).await;
    }
}

/// Checks the database every second until the coordinator stops, and reports what it finds.
pub async fn run(ctx: Arc<Context>, reporter: HealthReporter) {
    let mut stopping = ctx.stopping.clone();
    let mut last = None;
    loop {
        let ok = matches!(
            tokio::time::timeout(ANSWER_WITHIN, ctx.store.ping()).await,
            Ok(Ok(()))
        );
        if last != Some(ok) {
            if ok {
                if last.is_some() {
                    info!("The database answers again; health: SERVING.");
                }
                set(&reporter, ServingStatus::Serving).await;
            } else {
                warn!("The database does not answer; health: NOT_SERVING.");
                set(&reporter, ServingStatus::NotServing).await;
            }
            last = Some(ok);
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stopped(&mut stopping) => {
                set(&reporter, ServingStatus::NotServing).await;
                return;
            }
        }
    }
}
