//! The fleetbench coordinator: accepts models and jobs, leases tasks to agents, stores their telemetry,
//! and ranks platforms per model.
//!
//! Layout, dependencies pointing down:
//! - [`server`] builds everything and serves [`grpc`], the thin tonic adapters (decode, convert with
//!   [`convert`], call one domain function, map the error).
//! - [`session`] is the agent session protocol: it routes an agent's messages to [`ingest`] (windows
//!   and results) and [`heartbeat`] (liveness and lease renewal).
//! - [`scheduler`] (leasing, assignment, lease expiry), [`jobs`], [`models`], [`artifacts`] (resumable
//!   uploads of artifact sets), [`maintenance`] (retention, upload expiry), [`fleet`] and [`ranking`]
//!   are the domain; [`summary`] turns a finished run's windows into its figures.
//! - [`context`] is what they share; [`registry`] holds the connected agents and the messages sent to
//!   them; [`store`] is durable state behind the `Store` traits, speaking [`domain`] types.

pub mod admin;
pub mod artifacts;
pub mod auth;
pub mod batch;
pub mod config;
pub mod context;
pub mod convert;
pub mod domain;
pub mod error;
pub mod fleet;
pub mod generation;
pub mod grpc;
pub mod health;
pub mod heartbeat;
pub mod ingest;
pub mod jobs;
pub mod limits;
pub mod maintenance;
pub mod models;
pub mod otel;
pub mod pooling;
pub mod quota;
pub mod ranking;
pub mod registry;
pub mod scheduler;
mod server;
pub mod session;
pub mod store;
pub mod summary;
pub mod tls;

pub use config::CoordinatorConfig;
pub use error::{Error, Result};
pub use server::{serve, serve_with_store};
