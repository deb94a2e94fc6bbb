use std::sync::Arc;

use fleetbench_proto::v1::fleet_service_server::FleetService;
use fleetbench_proto::v1::{ListAgentsRequest, ListAgentsResponse};
use tonic::{Request, Response, Status};

use crate::{Coordinator, fleet};

/// The fleet view.
pub struct FleetApi(pub Arc<Coordinator>);

#[tonic::async_trait]
impl FleetService for FleetApi {
    async fn list_agents(
        &self,
        _: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        Ok(Response::new(ListAgentsResponse {
            agents: fleet::list(&self.0).await?,
        }))
    }
}
