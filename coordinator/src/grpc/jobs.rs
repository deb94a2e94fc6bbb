use std::sync::Arc;

use fleetbench_proto::v1::job_service_server::JobService;
use fleetbench_proto::v1::{
    CancelJobRequest, GetJobRequest, JobDetail, JobProgress, JobSummary, ListJobsRequest,
    ListJobsResponse, SubmitJobRequest, SubmitJobResponse,
};
use futures::StreamExt;
use tonic::{Request, Response, Status};

use super::ResponseStream;
use crate::{Coordinator, jobs};

/// Jobs.
pub struct JobApi(pub Arc<Coordinator>);

#[tonic::async_trait]
impl JobService for JobApi {
    #[tracing::instrument(skip_all)]
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        let (job_id, task_count) = jobs::submit(&self.0, spec).await?;
        Ok(Response::new(SubmitJobResponse { job_id, task_count }))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Ok(Response::new(ListJobsResponse {
            jobs: jobs::list(&self.0, request.into_inner().limit).await?,
        }))
    }

    async fn get_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<JobDetail>, Status> {
        Ok(Response::new(
            jobs::detail(&self.0, &request.into_inner().job_id).await?,
        ))
    }

    type WatchJobStream = ResponseStream<JobProgress>;

    async fn watch_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let stream = jobs::watch(self.0.clone(), request.into_inner().job_id)
            .map(|r| r.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all)]
    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<JobSummary>, Status> {
        Ok(Response::new(
            jobs::cancel(&self.0, &request.into_inner().job_id).await?,
        ))
    }
}
