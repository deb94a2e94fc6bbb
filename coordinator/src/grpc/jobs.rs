use std::sync::Arc;

use fleetbench_common::convert::required;
use fleetbench_proto::v1::job_service_server::JobService;
use fleetbench_proto::v1::{
    CancelJobRequest, DeleteJobRequest, DeleteJobResponse, GetJobRequest, JobDetail, JobProgress,
    JobSummary, ListJobsRequest, ListJobsResponse, SubmitJobRequest, SubmitJobResponse,
};
use futures::StreamExt;
use tonic::{Request, Response, Status};

use super::{ResponseStream, allow, invalid};
use crate::auth::Need;
use crate::context::Context;
use crate::domain::JobSpec;
use crate::jobs;

/// Jobs.
pub struct JobApi(pub Arc<Context>);

#[tonic::async_trait]
impl JobService for JobApi {
    #[tracing::instrument(skip_all)]
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let who = allow(&self.0, &request, Need::Submit).await?;
        self.0.quotas.request(&who)?;
        let spec = required("spec", request.into_inner().spec).map_err(invalid)?;
        let spec = JobSpec::try_from(spec).map_err(invalid)?;
        let (job_id, task_count) = jobs::submit(&self.0, spec).await?;
        who.audit("submit", &job_id);
        Ok(Response::new(SubmitJobResponse { job_id, task_count }))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        allow(&self.0, &request, Need::View).await?;
        let list = jobs::list(&self.0, request.into_inner().limit).await?;
        Ok(Response::new(ListJobsResponse {
            jobs: list.iter().map(Into::into).collect(),
        }))
    }

    async fn get_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<JobDetail>, Status> {
        allow(&self.0, &request, Need::View).await?;
        let detail = jobs::detail(&self.0, &request.into_inner().job_id).await?;
        Ok(Response::new((&detail).into()))
    }

    type WatchJobStream = ResponseStream<JobProgress>;

    async fn watch_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        allow(&self.0, &request, Need::View).await?;
        let stream = jobs::watch(self.0.clone(), request.into_inner().job_id)
            .map(|r| r.map(|d| JobProgress::from(&d)).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all)]
    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<JobSummary>, Status> {
        let who = allow(&self.0, &request, Need::Submit).await?;
        let summary = jobs::cancel(&self.0, &request.into_inner().job_id).await?;
        who.audit("cancel", &summary.job_id);
        Ok(Response::new((&summary).into()))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_job(
        &self,
        request: Request<DeleteJobRequest>,
    ) -> Result<Response<DeleteJobResponse>, Status> {
        let who = allow(&self.0, &request, Need::Admin).await?;
        let (job_id, runs) = jobs::delete(&self.0, &request.into_inner().job_id).await?;
        who.audit("delete job", &job_id);
        Ok(Response::new(DeleteJobResponse { job_id, runs }))
    }
}
