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
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
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
