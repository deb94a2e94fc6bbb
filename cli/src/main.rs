//! `fleetbench`: the command-line client of a fleetbench coordinator.

#![deny(clippy::print_stdout)]

use anyhow::Result;
use clap::{Parser, Subcommand};
use fleetbench_cli::{client, commands};

/// Benchmark ML models across a fleet: where to deploy, what to deploy, how it behaves there.
#[derive(Debug, Parser)]
#[command(name = "fleetbench", version)]
struct Cli {
    /// Coordinator address.
    #[arg(
        long,
        global = true,
        env = "FLEETBENCH_COORDINATOR",
        default_value = "http://127.0.0.1:7700"
    )]
    coordinator: String,
    /// The coordinator's CA certificate (PEM), for https:// addresses: ca.pem in its data directory.
    #[arg(long, global = true, env = "FLEETBENCH_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    /// API token (`fleetbench-coordinator init` prints the first admin token; `fleetbench admin
    /// tokens create` makes more). Prefer the environment variable: a flag shows in `ps`.
    #[arg(long, global = true, env = "FLEETBENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Push and list models and their variants.
    #[command(subcommand)]
    Models(commands::models::ModelsCmd),
    /// Submit, list, show, watch and cancel benchmark jobs.
    #[command(subcommand)]
    Jobs(commands::jobs::JobsCmd),
    /// List the fleet's agents.
    #[command(subcommand)]
    Agents(commands::agents::AgentsCmd),
    /// Rank platforms and variants for a model.
    Rank(commands::rank::RankArgs),
    /// One answer for a model: the variant and platform to deploy, why, and the alternatives.
    Recommend(commands::recommend::RecommendArgs),
    /// Write a self-contained HTML report (or md, csv, json): recommendation, ranking with ties,
    /// charts, and every run's validity and reproducibility record.
    Report(commands::report::ReportArgs),
    /// Gate a release: compare two jobs (or two saved rankings) row by row; exit 0 when nothing
    /// regressed beyond threshold and noise, 1 on a regression, 2 on errors.
    Compare(commands::compare::CompareArgs),
    /// Tokens and agents' credentials (needs an admin token).
    #[command(subcommand)]
    Admin(commands::admin::AdminCmd),
    /// Run the whole path locally: coordinator on SQLite, two agents, the bundled model, a ranking.
    Quickstart(commands::quickstart::QuickstartArgs),
}

/// `compare`'s exit status on errors, apart from 1 (a regression) so a pipeline can tell them apart.
const COMPARE_ERROR: i32 = 2;

#[tokio::main]
async fn main() {
    // SIGPIPE stays ignored (Rust's default): a write to a socket whose peer has gone must come back
    // as EPIPE, not end the process. Output into a closed pipe ends it by SIGPIPE all the same, in
    // `output::write_stdout`.
    let cli = Cli::parse();
    let is_compare = matches!(cli.command, Command::Compare(_));
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(if is_compare { COMPARE_ERROR } else { 1 });
        }
    }
}

/// Runs the command; returns the exit status.
async fn run(cli: Cli) -> Result<i32> {
    if let Command::Quickstart(a) = cli.command {
        return commands::quickstart::run(a).await.map(|()| 0);
    }
    let client = client::Client::connect_with(
        &cli.coordinator,
        cli.ca_cert.as_deref(),
        cli.token.as_deref(),
    )
    .await?;
    if let Command::Compare(a) = cli.command {
        return Ok(i32::from(commands::compare::run(&client, a).await?));
    }
    match cli.command {
        Command::Models(c) => commands::models::run(&client, c).await,
        Command::Jobs(c) => commands::jobs::run(&client, c).await,
        Command::Agents(c) => commands::agents::run(&client, c).await,
        Command::Rank(a) => commands::rank::run(&client, a).await,
        Command::Recommend(a) => commands::recommend::run(&client, a).await,
        Command::Report(a) => commands::report::run(&client, a).await,
        Command::Admin(c) => commands::admin::run(&client, c).await,
        Command::Quickstart(_) | Command::Compare(_) => unreachable!("handled above"),
    }
    .map(|()| 0)
}
