use std::sync::Arc;

use fleetbench_proto::v1::fleet_service_server::FleetService;
use fleetbench_proto::v1::{ListAgentsRequest, ListAgentsResponse};
use tonic::{Request, Response, Status};

use crate::context::Context;
use crate::fleet;

/// The fleet view.
pub struct FleetApi(pub Arc<Context>);

#[tonic::async_trait]
impl FleetService for FleetApi {
    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        super::allow(&self.0, &request, crate::auth::Need::View).await?;
        let agents = fleet::list(&self.0).await?;
        Ok(Response::new(ListAgentsResponse {
            agents: agents.iter().map(Into::into).collect(),
        }))
    }
}
