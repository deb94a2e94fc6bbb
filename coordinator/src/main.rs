//! `fleetbench-coordinator`: the daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use fleetbench_coordinator::CoordinatorConfig;
use serde::Serialize;

/// Accepts models and jobs, leases tasks to agents, stores telemetry, ranks platforms.
///
/// Settings come from defaults, then --config FILE (TOML), then FLEETBENCH_* variables, then flags.
#[derive(Debug, Parser, Serialize)]
#[command(name = "fleetbench-coordinator", version)]
struct Args {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7700 (port 0 picks a free one).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    /// Database URL: sqlite://PATH or postgres://USER@HOST/DB.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<String>,
    /// Folder for blob files and uploads in progress (SQLite; default: the database file's folder).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<String>,
    /// Largest upload (a whole artifact set), bytes.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_upload_bytes: Option<u64>,
    /// Drop raw telemetry windows of runs finished this many days ago (0 keeps them).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    window_retention_days: Option<u64>,
    /// Heartbeat interval agents must keep, milliseconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_interval_ms: Option<u32>,
    /// Silence after which a running task returns to the queue, milliseconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_timeout_ms: Option<u64>,
    /// Attempts per task before it fails.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    /// Most tasks one job may expand into.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tasks_per_job: Option<usize>,
    /// Export metrics over OTLP to this collector, e.g. http://collector:4318 (default: the
    /// OTEL_EXPORTER_OTLP_ENDPOINT variable; unset: no export).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_endpoint: Option<String>,
    /// OTLP transport: http/protobuf (the default) or grpc.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_protocol: Option<String>,
    /// How often metrics (and queued spans) are exported over OTLP, milliseconds (default 10000).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_interval_ms: Option<u64>,
    /// How long one OTLP export may take before it is abandoned, milliseconds (default 10000).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_timeout_ms: Option<u64>,
    /// Serve Prometheus /metrics on this address, e.g. 127.0.0.1:9464.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<String>,
    /// Write the bound /metrics address to this file once listening.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_addr_file: Option<String>,
    /// Log lines as text (the default) or json (one object per line, with the span fields).
    #[arg(long, env = "FLEETBENCH_LOG_FORMAT", default_value = "text")]
    #[serde(skip)]
    log_format: fleetbench_common::logging::LogFormat,
    /// Write the bound address to this file once listening.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    addr_file: Option<String>,
    /// Server certificate (PEM) from a CA of your own (default: the one `init` made in the data
    /// directory).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<String>,
    /// The server certificate's key (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<String>,
    /// Serve without TLS on an address other machines can reach (only on a network you trust).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    insecure: bool,
    #[command(subcommand)]
    #[serde(skip)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Makes a certificate authority and a server certificate in DATA_DIR/tls (keeps an existing CA
    /// and issues a new server certificate), and prints the CA's fingerprint.
    Init {
        /// Folder for the TLS files (and, on SQLite, blobs): the coordinator's --data-dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// A name or IP address clients reach the coordinator by (repeat); localhost, 127.0.0.1 and
        /// ::1 are always included.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// The coordinator's database: the first admin token and agent join token are made in it
        /// now and printed. Without it, the coordinator's first start makes them and writes them to
        /// DATA_DIR/admin.token and DATA_DIR/join.token (mode 0600).
        #[arg(long)]
        database: Option<String>,
    },
}

async fn init(
    data_dir: &std::path::Path,
    sans: &[String],
    database: Option<&str>,
) -> anyhow::Result<()> {
    use fleetbench_coordinator::{auth, store, tls};
    let done = tls::init(&tls::TlsFiles::under(data_dir), sans)?;
    let f = &done.files;
    println!(
        "{} {}",
        if done.new_ca {
            "Made a certificate authority:"
        } else {
            "Kept the certificate authority:"
        },
        f.ca_cert().display()
    );
    println!(
        "  CA fingerprint (SHA-256 of its DER): {}",
        done.ca_fingerprint
    );
    println!(
        "Server certificate for {}: {} (valid {} days; run init again to renew)",
        done.names.join(", "),
        f.server_cert().display(),
        tls::SERVER_VALID_DAYS
    );
    println!(
        "Start the coordinator with --data-dir {}; give clients and agents {} (--ca-cert, or \
         FLEETBENCH_CA_CERT) and https:// addresses.",
        data_dir.display(),
        f.ca_cert().display()
    );
    let Some(database) = database else {
        println!(
            "Tokens: the coordinator's first start makes an admin token and an agent join token and \
             writes them to {} and {} (mode 0600).",
            data_dir.join(auth::ADMIN_TOKEN_FILE).display(),
            data_dir.join(auth::JOIN_TOKEN_FILE).display()
        );
        return Ok(());
    };
    let store = store::open_with(database, Some(data_dir)).await?;
    match auth::bootstrap(store.as_ref(), data_dir, &done.ca_fingerprint).await? {
        Some(t) => {
            println!(
                "Admin token (also in {}; keep it secret):\n  {}",
                data_dir.join(auth::ADMIN_TOKEN_FILE).display(),
                t.admin.expose()
            );
            println!(
                "Agent join token (also in {}; agents take it as --join-token):\n  {}",
                data_dir.join(auth::JOIN_TOKEN_FILE).display(),
                t.join.expose()
            );
        }
        None => println!(
            "Tokens: the database already holds an admin token; manage tokens with `fleetbench admin \
             tokens`."
        ),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fleetbench_common::logging::init(args.log_format, "info,sqlx=warn,h2=warn");
    if let Some(Command::Init {
        data_dir,
        sans,
        database,
    }) = &args.command
    {
        return init(data_dir, sans, database.as_deref()).await;
    }
    let config = CoordinatorConfig::load(args.config.as_deref(), &args)?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    fleetbench_coordinator::serve(config, listener, shutdown).await?;
    Ok(())
}
