//! tonic adapters: decode the request, call one domain function, map the error. No SQL and no business
//! rules here.

mod agent;
mod fleet;
mod jobs;
mod models;
mod rankings;

use std::pin::Pin;

pub use agent::AgentApi;
pub use fleet::FleetApi;
pub use jobs::JobApi;
pub use models::ModelApi;
pub use rankings::RankingApi;

/// A request that does not convert to the domain: INVALID_ARGUMENT naming the field.
pub(crate) fn invalid(e: fleetbench_common::config::ConfigError) -> tonic::Status {
    tonic::Status::invalid_argument(e.to_string())
}

/// A boxed response stream.
pub type ResponseStream<T> =
    Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;
