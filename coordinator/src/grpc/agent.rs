use std::sync::Arc;

use fleetbench_common::network::MAX_PROBE_BYTES;
use fleetbench_proto::v1::agent_message::Body;
use fleetbench_proto::v1::agent_service_server::AgentService;
use fleetbench_proto::v1::{
    AgentMessage, CoordinatorMessage, ProbeRequest, ProbeResponse, RegisterRequest,
    RegisterResponse,
};
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{ResponseStream, allow, invalid};
use crate::auth::Need;
use crate::context::Context;
use crate::domain::Registration;
use crate::fleet;
use crate::registry::AgentLink;
use crate::session::{self, Queues};

/// The agent-facing service.
pub struct AgentApi {
    /// Shared state.
    pub ctx: Arc<Context>,
    /// Where sessions send what agents report.
    pub queues: Queues,
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        // An agent of an older protocol sends no token: tell it to upgrade, before asking for one.
        fleet::check_protocol(request.get_ref().protocol_version, &request.get_ref().name)?;
        let who = allow(&self.ctx, &request, Need::Register).await?;
        let reg = Registration::try_from(request.into_inner()).map_err(invalid)?;
        let registered = fleet::register(&self.ctx, &who, reg).await?;
        Ok(Response::new((&registered).into()))
    }

    type SessionStream = ResponseStream<CoordinatorMessage>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let who = allow(&self.ctx, &request, Need::Agent).await?;
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
        if hello.agent_id != who.agent_id {
            return Err(Status::permission_denied(format!(
                "this credential belongs to agent {}; it cannot open a session as agent {}",
                who.agent_id, hello.agent_id
            )));
        }
        let (link, outbound) = AgentLink::new();
        let opened = session::open(&self.ctx, hello, link).await?;
        tokio::spawn(session::serve(
            self.ctx.clone(),
            self.queues.clone(),
            opened,
            who.token_id,
            inbound,
        ));
        Ok(Response::new(Box::pin(outbound.into_stream().map(Ok))))
    }

    async fn probe(
        &self,
        request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        allow(&self.ctx, &request, Need::Agent).await?;
        let r = request.get_ref();
        for (what, n) in [
            ("payload", r.payload.len() as u64),
            ("response_bytes", r.response_bytes as u64),
        ] {
            if n > MAX_PROBE_BYTES {
                return Err(Status::invalid_argument(format!(
                    "{what}: a probe carries at most {MAX_PROBE_BYTES} bytes, not {n}"
                )));
            }
        }
        Ok(Response::new(ProbeResponse {
            payload: vec![0u8; r.response_bytes as usize],
        }))
    }
}
