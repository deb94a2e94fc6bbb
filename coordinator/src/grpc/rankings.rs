use std::sync::Arc;

use fleetbench_proto::v1::ranking_service_server::RankingService;
use fleetbench_proto::v1::{RankRequest, RankResponse};
use tonic::{Request, Response, Status};

use crate::context::Context;
use crate::ranking;

/// Rankings.
pub struct RankingApi(pub Arc<Context>);

#[tonic::async_trait]
impl RankingService for RankingApi {
    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn rank(&self, request: Request<RankRequest>) -> Result<Response<RankResponse>, Status> {
        super::allow(&self.0, &request, crate::auth::Need::View).await?;
        let ranking = ranking::rank(&self.0, request.into_inner().into()).await?;
        Ok(Response::new((&ranking).into()))
    }
}
