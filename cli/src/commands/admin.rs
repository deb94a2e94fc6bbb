//! `fleetbench admin`: tokens and agents' credentials (needs an admin token).

use anyhow::{Context as _, Result};
use clap::Subcommand;
use fleetbench_proto::v1::{
    CreateTokenRequest, ListTokensRequest, RevokeAgentRequest, TokenInfo, TokenName,
};

use crate::client::Client;
use crate::output::{self, Format};

/// Administration commands.
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// API tokens and agent join tokens.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Agents' credentials.
    #[command(subcommand)]
    Agents(AgentsCmd),
}

/// Token commands.
#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Creates a token and prints its secret (shown this once).
    Create {
        /// Unique name, e.g. ci.
        #[arg(long)]
        name: String,
        /// viewer (list, show, watch, rank), submitter (viewer, plus push, submit, cancel), admin
        /// (everything), or agent-join (for `fleetbench-agent --join-token`).
        #[arg(long)]
        role: String,
        /// Validity, e.g. 30d, 12h (default: no expiry).
        #[arg(long)]
        ttl: Option<String>,
        /// For agent-join: how many agents may join with it (default: no limit).
        #[arg(long)]
        uses: Option<u64>,
    },
    /// Lists tokens: name, role, created, expires, last used; never the secrets.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
    /// Revokes a token: it stops working on its next use.
    Revoke {
        /// The token's name.
        name: String,
    },
    /// Gives a token a new secret and prints it; the old secret stops working on its next use.
    Rotate {
        /// The token's name.
        name: String,
    },
}

/// Agent credential commands.
#[derive(Debug, Subcommand)]
pub enum AgentsCmd {
    /// Revokes an agent's credential: its session closes and its running task goes back to the
    /// queue. The agent can join again only with a join token.
    Revoke {
        /// The agent's name or id.
        agent: String,
    },
}

fn when(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn print_secret(what: &str, info: Option<&TokenInfo>, secret: &str) {
    let name = info.map(|i| i.name.as_str()).unwrap_or_default();
    let role = info.map(|i| i.role.as_str()).unwrap_or_default();
    eprintln!("{what} token '{name}' (role {role}); its secret is shown this once:");
    outln!("{secret}");
}

/// Runs an admin command.
pub async fn run(client: &Client, cmd: AdminCmd) -> Result<()> {
    let mut admin = client.admin();
    match cmd {
        AdminCmd::Tokens(TokensCmd::Create {
            name,
            role,
            ttl,
            uses,
        }) => {
            let ttl_ms = ttl
                .map(|t| {
                    humantime::parse_duration(&t)
                        .with_context(|| format!("--ttl '{t}': not a duration (e.g. 30d, 12h)"))
                })
                .transpose()?
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let made = admin
                .create_token(CreateTokenRequest {
                    name,
                    role,
                    ttl_ms,
                    uses: uses.unwrap_or(0),
                })
                .await
                .map_err(|s| client.error(s, "creating a token"))?
                .into_inner();
            print_secret("Created", made.info.as_ref(), &made.secret);
        }
        AdminCmd::Tokens(TokensCmd::List { output }) => {
            let tokens = admin
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(|s| client.error(s, "listing tokens"))?
                .into_inner()
                .tokens;
            match output {
                Format::Json => output::print_json(&tokens)?,
                Format::Table => {
                    let mut t = output::table(&[
                        "NAME",
                        "ROLE",
                        "STATE",
                        "CREATED",
                        "EXPIRES",
                        "LAST USED",
                        "USES LEFT",
                    ]);
                    let now = fleetbench_common::now_ms();
                    for k in &tokens {
                        let state = if k.revoked_at_ms > 0 {
                            "revoked"
                        } else if k.expires_at_ms > 0 && k.expires_at_ms <= now {
                            "expired"
                        } else {
                            "active"
                        };
                        t.add_row(vec![
                            k.name.clone(),
                            k.role.clone(),
                            state.into(),
                            when(k.created_at_ms),
                            if k.expires_at_ms > 0 {
                                when(k.expires_at_ms)
                            } else {
                                "never".into()
                            },
                            when(k.last_used_at_ms),
                            if k.uses_left < 0 {
                                "-".into()
                            } else {
                                k.uses_left.to_string()
                            },
                        ]);
                    }
                    outln!("{t}");
                }
            }
        }
        AdminCmd::Tokens(TokensCmd::Revoke { name }) => {
            let info = admin
                .revoke_token(TokenName { name })
                .await
                .map_err(|s| client.error(s, "revoking a token"))?
                .into_inner();
            outln!("Revoked token '{}' (role {}).", info.name, info.role);
        }
        AdminCmd::Tokens(TokensCmd::Rotate { name }) => {
            let made = admin
                .rotate_token(TokenName { name })
                .await
                .map_err(|s| client.error(s, "rotating a token"))?
                .into_inner();
            print_secret("Rotated", made.info.as_ref(), &made.secret);
        }
        AdminCmd::Agents(AgentsCmd::Revoke { agent }) => {
            let done = admin
                .revoke_agent(RevokeAgentRequest { agent })
                .await
                .map_err(|s| client.error(s, "revoking an agent"))?
                .into_inner();
            outln!("Revoked agent '{}' ({}).", done.name, done.agent_id);
            if !done.requeued_run_id.is_empty() {
                outln!(
                    "Its run {} went back to the queue.",
                    output::short(&done.requeued_run_id)
                );
            }
        }
    }
    Ok(())
}
