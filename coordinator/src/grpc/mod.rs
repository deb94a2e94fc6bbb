//! tonic adapters: decode the request, call one domain function, map the error. No SQL and no business
//! rules here.

mod admin;
mod agent;
mod fleet;
mod jobs;
mod models;
mod rankings;

use std::pin::Pin;

pub use admin::AdminApi;
pub use agent::AgentApi;
pub use fleet::FleetApi;
pub use jobs::JobApi;
pub use models::ModelApi;
pub use rankings::RankingApi;

/// A request that does not convert to the domain: INVALID_ARGUMENT naming the field.
pub(crate) fn invalid(e: fleetbench_common::config::ConfigError) -> tonic::Status {
    tonic::Status::invalid_argument(e.to_string())
}

/// The caller of `request`, if it may do what `need` names (see [`crate::auth`]).
pub(crate) async fn allow<T>(
    ctx: &crate::context::Context,
    request: &tonic::Request<T>,
    need: crate::auth::Need,
) -> Result<crate::auth::Principal, tonic::Status> {
    crate::auth::authorize(ctx, crate::auth::bearer(request.metadata()), need)
        .await
        .map_err(tonic::Status::from)
}

/// A boxed response stream.
pub type ResponseStream<T> =
    Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;
