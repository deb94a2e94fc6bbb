use std::sync::Arc;

use fleetbench_proto::v1::model_service_server::ModelService;
use fleetbench_proto::v1::{
    BlobChunk, BlobRef, DownloadBlobRequest, ListModelsRequest, ListModelsResponse, ModelVariant,
    RegisterVariantRequest,
};
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::ResponseStream;
use crate::{Coordinator, models};

/// Models and blobs.
pub struct ModelApi(pub Arc<Coordinator>);

#[tonic::async_trait]
impl ModelService for ModelApi {
    #[tracing::instrument(skip_all)]
    async fn upload_blob(
        &self,
        request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<BlobRef>, Status> {
        let mut stream = request.into_inner();
        let mut data = Vec::new();
        let mut expected = String::new();
        let max = self.0.config.max_blob_bytes;
        while let Some(chunk) = stream.message().await? {
            if expected.is_empty() {
                expected = chunk.expected_sha256;
            }
            data.extend_from_slice(&chunk.data);
            if data.len() as u64 > max {
                return Err(Status::invalid_argument(format!(
                    "blob: larger than max_blob_bytes ({max} bytes)"
                )));
            }
        }
        let (sha256, size_bytes) = models::store_blob(&self.0, data, &expected).await?;
        Ok(Response::new(BlobRef { sha256, size_bytes }))
    }

    type DownloadBlobStream = ResponseStream<BlobChunk>;

    async fn download_blob(
        &self,
        request: Request<DownloadBlobRequest>,
    ) -> Result<Response<Self::DownloadBlobStream>, Status> {
        let sha = request.into_inner().sha256;
        let (_, chunks) = self
            .0
            .store
            .blob_meta(&sha)
            .await
            .map_err(Status::from)?
            .ok_or_else(|| Status::not_found(format!("no blob with sha256 {sha}")))?;
        let coord = self.0.clone();
        let stream = futures::stream::iter(0..chunks).then(move |i| {
            let coord = coord.clone();
            let sha = sha.clone();
            async move {
                let data = coord
                    .store
                    .blob_chunk(&sha, i)
                    .await
                    .map_err(Status::from)?;
                Ok(BlobChunk {
                    data,
                    expected_sha256: if i == 0 { sha } else { String::new() },
                })
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn register_variant(
        &self,
        request: Request<RegisterVariantRequest>,
    ) -> Result<Response<ModelVariant>, Status> {
        Ok(Response::new(
            models::register_variant(&self.0, request.into_inner()).await?,
        ))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let model = request.into_inner().model;
        let variants = self
            .0
            .store
            .list_variants((!model.is_empty()).then_some(model.as_str()))
            .await?;
        Ok(Response::new(ListModelsResponse { variants }))
    }
}
