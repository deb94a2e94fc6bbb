use std::sync::Arc;

use fleetbench_proto::v1::agent_message::Body;
use fleetbench_proto::v1::agent_service_server::AgentService;
use fleetbench_proto::v1::{AgentMessage, CoordinatorMessage, RegisterRequest, RegisterResponse};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::ResponseStream;
use crate::{Coordinator, fleet, scheduler};

/// The agent-facing service.
pub struct AgentApi(pub Arc<Coordinator>);

#[tonic::async_trait]
impl AgentService for AgentApi {
    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(
            fleet::register(&self.0, request.into_inner()).await?,
        ))
    }

    type SessionStream = ResponseStream<CoordinatorMessage>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(AgentMessage {
                body: Some(Body::Hello(h)),
            }) if !h.agent_id.is_empty() => h,
            _ => {
                return Err(Status::invalid_argument(
                    "hello: the first session message must be a SessionHello with agent_id",
                ));
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(scheduler::serve_session(self.0.clone(), hello, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
