//! Subcommands.

pub mod admin;
pub mod agents;
pub mod compare;
pub mod jobs;
pub mod models;
pub mod quickstart;
pub mod rank;
pub mod recommend;
pub mod report;
