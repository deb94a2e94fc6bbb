use std::sync::Arc;

use fleetbench_common::artifact::ArtifactSet;
use fleetbench_proto::v1::model_service_server::ModelService;
use fleetbench_proto::v1::{
    self as pb, BlobChunk, BlobRef, DownloadBlobRequest, ListModelsRequest, ListModelsResponse,
    ModelVariant, RegisterVariantRequest,
};
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{ResponseStream, allow};
use crate::artifacts::{self, Piece};
use crate::auth::{Need, Principal, Role};
use crate::context::Context;
use crate::error::Error;
use crate::models;
use crate::store::BLOB_CHUNK_BYTES;

use fleetbench_common::artifact::CLIENT_KEY;

/// Who is calling: the client id it sends (clients without one share "anonymous").
fn owner<T>(request: &Request<T>, who: &Principal) -> String {
    // An upload belongs to the token that started it (and the client's key within it): no other
    // token can continue or finish it.
    let key = request
        .metadata()
        .get(CLIENT_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .unwrap_or("anonymous");
    format!("{}/{key}", who.token_id)
}

/// For an agent's credential, PERMISSION_DENIED unless `sha256` belongs to the task it runs.
async fn agent_may_read(ctx: &Context, who: &Principal, sha256: &str) -> Result<(), Status> {
    if who.role != Role::Agent || artifacts::agent_may_read(ctx, &who.agent_id, sha256).await? {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "agent {} may download only the artifacts of the task it runs, and {sha256} is not one of them",
        who.agent_id
    )))
}

fn status_of(s: artifacts::UploadStatus) -> pb::UploadStatus {
    pb::UploadStatus {
        upload_id: s.upload_id,
        set_sha256: s.set_sha256,
        files: s
            .files
            .into_iter()
            .map(|f| pb::FileProgress {
                sha256: f.sha256,
                received_bytes: f.received_bytes,
                size_bytes: f.size_bytes,
                stored: f.stored,
            })
            .collect(),
    }
}

fn broken(s: Status) -> Error {
    Error::Unavailable(format!("the upload stream broke: {}", s.message()))
}

/// Models and blobs.
pub struct ModelApi(pub Arc<Context>);

#[tonic::async_trait]
impl ModelService for ModelApi {
    #[tracing::instrument(skip_all)]
    async fn upload_blob(
        &self,
        request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<BlobRef>, Status> {
        let who = allow(&self.0, &request, Need::Submit).await?;
        self.0.quotas.request(&who)?;
        let _slot = self.0.quotas.upload(&who)?;
        let stream = request
            .into_inner()
            .map(|c| c.map(|c| (c.data, c.expected_sha256)).map_err(broken));
        let (sha256, size_bytes) = artifacts::store_blob(&self.0, stream).await?;
        who.audit("push blob", &sha256);
        Ok(Response::new(BlobRef { sha256, size_bytes }))
    }

    type DownloadBlobStream = ResponseStream<BlobChunk>;

    async fn download_blob(
        &self,
        request: Request<DownloadBlobRequest>,
    ) -> Result<Response<Self::DownloadBlobStream>, Status> {
        let who = allow(&self.0, &request, Need::Download).await?;
        let DownloadBlobRequest { sha256, offset } = request.into_inner();
        agent_may_read(&self.0, &who, &sha256).await?;
        let size = self
            .0
            .store
            .blob_size(&sha256)
            .await
            .map_err(Status::from)?
            .ok_or_else(|| Status::not_found(format!("no blob with sha256 {sha256}")))?;
        if offset > size {
            return Err(Status::out_of_range(format!(
                "offset {offset} is past the end of blob {sha256} ({size} bytes)"
            )));
        }
        let coord = self.0.clone();
        // Chunks are read a few ahead of the client (the transport's flow control bounds the rest), so
        // the disk and the network overlap; at most READ_AHEAD chunks are in memory per download.
        const READ_AHEAD: usize = 4;
        let chunk = BLOB_CHUNK_BYTES as u64;
        // The first piece runs to a chunk boundary (a resumed download starts anywhere), the rest are
        // whole chunks, so each read stays inside one stored chunk.
        let first_end = ((offset / chunk + 1) * chunk).min(size);
        let offsets = std::iter::once(offset)
            .filter(move |&at| at < size || size == 0)
            .chain((first_end..size).step_by(BLOB_CHUNK_BYTES));
        let stream = futures::stream::iter(offsets)
            .map(move |at| {
                let (coord, sha) = (coord.clone(), sha256.clone());
                async move {
                    let want = ((at / chunk + 1) * chunk).min(size).saturating_sub(at) as usize;
                    match coord.store.read_blob(&sha, at, want).await {
                        Ok(data) if data.len() != want => Err(Status::data_loss(format!(
                            "blob {sha} holds {} bytes at {at}, not {want}",
                            data.len()
                        ))),
                        Ok(data) => {
                            coord.telemetry.inst.transfer.add(
                                data.len() as u64,
                                &[opentelemetry::KeyValue::new("direction", "sent")],
                            );
                            Ok(BlobChunk {
                                data,
                                expected_sha256: if at == offset { sha } else { String::new() },
                            })
                        }
                        Err(e) => Err(Status::from(e)),
                    }
                }
            })
            .buffered(READ_AHEAD);
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all)]
    async fn start_upload(
        &self,
        request: Request<pb::StartUploadRequest>,
    ) -> Result<Response<pb::UploadStatus>, Status> {
        let who = allow(&self.0, &request, Need::Submit).await?;
        self.0.quotas.request(&who)?;
        let owner = owner(&request, &who);
        let set = request
            .into_inner()
            .set
            .ok_or_else(|| Status::invalid_argument("set: missing"))?;
        let claimed = set.sha256.clone();
        let status = artifacts::start(&self.0, &owner, ArtifactSet::from(set), &claimed).await?;
        Ok(Response::new(status_of(status)))
    }

    #[tracing::instrument(skip_all)]
    async fn upload_file(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadStatus>, Status> {
        let who = allow(&self.0, &request, Need::Submit).await?;
        let _slot = self.0.quotas.upload(&who)?;
        let owner = owner(&request, &who);
        let pieces = request.into_inner().map(|c| {
            c.map(|c| Piece {
                upload_id: c.upload_id,
                file_sha256: c.file_sha256,
                offset: c.offset,
                data: c.data,
            })
            .map_err(broken)
        });
        let status = artifacts::receive(&self.0, &owner, pieces).await?;
        Ok(Response::new(status_of(status)))
    }

    #[tracing::instrument(skip_all)]
    async fn finish_upload(
        &self,
        request: Request<pb::FinishUploadRequest>,
    ) -> Result<Response<pb::ArtifactSet>, Status> {
        let who = allow(&self.0, &request, Need::Submit).await?;
        let owner = owner(&request, &who);
        let id = request.into_inner().upload_id;
        let (sha, set) = artifacts::finish(&self.0, &owner, &id).await?;
        who.audit("push artifact set", &sha);
        Ok(Response::new((&set).into()))
    }

    async fn get_artifact_set(
        &self,
        request: Request<pb::GetArtifactSetRequest>,
    ) -> Result<Response<pb::ArtifactSet>, Status> {
        let who = allow(&self.0, &request, Need::Download).await?;
        let sha = request.into_inner().sha256;
        agent_may_read(&self.0, &who, &sha).await?;
        let set = artifacts::get_set(&self.0, &sha).await?;
        let mut wire = pb::ArtifactSet::from(&set);
        wire.sha256 = sha;
        Ok(Response::new(wire))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn register_variant(
        &self,
        request: Request<RegisterVariantRequest>,
    ) -> Result<Response<ModelVariant>, Status> {
        let who = allow(&self.0, &request, Need::Submit).await?;
        self.0.quotas.request(&who)?;
        let variant = models::register_variant(&self.0, request.into_inner().into()).await?;
        who.audit(
            "push variant",
            &format!("{}/{}", variant.model, variant.variant),
        );
        Ok(Response::new((&variant).into()))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        allow(&self.0, &request, Need::View).await?;
        let model = request.into_inner().model;
        let variants = self
            .0
            .store
            .list_variants((!model.is_empty()).then_some(model.as_str()))
            .await?;
        Ok(Response::new(ListModelsResponse {
            variants: variants.iter().map(Into::into).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn delete_variant(
        &self,
        request: Request<pb::DeleteVariantRequest>,
    ) -> Result<Response<pb::DeleteVariantResponse>, Status> {
        let who = allow(&self.0, &request, Need::Admin).await?;
        let r = request.into_inner();
        if !r.dry_run {
            who.audit("delete variant", &format!("{}/{}", r.model, r.variant));
        }
        let d = models::delete(
            &self.0,
            &r.model,
            (!r.variant.is_empty()).then_some(r.variant.as_str()),
            r.recursive,
            r.dry_run,
        )
        .await?;
        Ok(Response::new(pb::DeleteVariantResponse {
            variants: d.variants,
            runs: d.runs,
            jobs: d.jobs,
            bytes_freed: d.bytes_freed,
        }))
    }
}
