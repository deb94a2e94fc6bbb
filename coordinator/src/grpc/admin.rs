use std::sync::Arc;

use fleetbench_proto::v1::admin_service_server::AdminService;
use fleetbench_proto::v1::{
    CreateTokenRequest, CreatedToken, ListTokensRequest, ListTokensResponse, RevokeAgentRequest,
    RevokeAgentResponse, TokenInfo, TokenName,
};
use tonic::{Request, Response, Status};

use super::allow;
use crate::admin;
use crate::auth::Need;
use crate::context::Context;
use crate::store::TokenRecord;

/// Administration.
pub struct AdminApi(pub Arc<Context>);

fn info(t: &TokenRecord) -> TokenInfo {
    TokenInfo {
        name: t.name.clone(),
        role: t.role.clone(),
        created_at_ms: t.created_at,
        expires_at_ms: t.expires_at,
        revoked_at_ms: t.revoked_at,
        last_used_at_ms: t.last_used_at,
        uses_left: t.uses_left,
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreatedToken>, Status> {
        let who = allow(&self.0, &request, Need::Admin).await?;
        let r = request.into_inner();
        let (row, secret) =
            admin::create_token(&self.0, &who, &r.name, &r.role, r.ttl_ms, r.uses).await?;
        Ok(Response::new(CreatedToken {
            info: Some(info(&row)),
            secret: secret.expose().to_string(),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        allow(&self.0, &request, Need::Admin).await?;
        let tokens = admin::list_tokens(&self.0).await?;
        Ok(Response::new(ListTokensResponse {
            tokens: tokens.iter().map(info).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<TokenName>,
    ) -> Result<Response<TokenInfo>, Status> {
        let who = allow(&self.0, &request, Need::Admin).await?;
        let row = admin::revoke_token(&self.0, &who, &request.into_inner().name).await?;
        Ok(Response::new(info(&row)))
    }

    async fn rotate_token(
        &self,
        request: Request<TokenName>,
    ) -> Result<Response<CreatedToken>, Status> {
        let who = allow(&self.0, &request, Need::Admin).await?;
        let (row, secret) = admin::rotate_token(&self.0, &who, &request.into_inner().name).await?;
        Ok(Response::new(CreatedToken {
            info: Some(info(&row)),
            secret: secret.expose().to_string(),
        }))
    }

    async fn revoke_agent(
        &self,
        request: Request<RevokeAgentRequest>,
    ) -> Result<Response<RevokeAgentResponse>, Status> {
        let who = allow(&self.0, &request, Need::Admin).await?;
        let done = admin::revoke_agent(&self.0, &who, &request.into_inner().agent).await?;
        Ok(Response::new(RevokeAgentResponse {
            agent_id: done.agent_id,
            name: done.name,
            requeued_run_id: done.requeued_run_id,
        }))
    }
}
