//! The `fleetbench` command-line client as a library: the gRPC client, the subcommands, job files and
//! output. The binary (`src/main.rs`) only parses arguments; tests drive the same code.

pub mod client;
pub mod commands;
pub mod jobspec;
pub mod optimize;
pub mod output;
pub mod testdata;
pub mod transfer;
