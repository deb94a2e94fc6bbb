//! Administration: tokens and agents' credentials (`fleetbench admin ...`).

use fleetbench_common::now_ms;
use fleetbench_common::token::Secret;

use crate::auth::{self, Principal, Role};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::store::TokenRecord;

/// The CA fingerprint join tokens carry: that of `ca.pem` in the data directory, if there is one.
fn ca_sha256(ctx: &Context) -> String {
    crate::tls::data_dir_of(&ctx.config)
        .map(|d| crate::tls::TlsFiles::under(&d).ca_cert())
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|pem| crate::tls::fingerprint(&pem).ok())
        .unwrap_or_default()
}

/// Creates a token.
pub async fn create_token(
    ctx: &Context,
    who: &Principal,
    name: &str,
    role: &str,
    ttl_ms: u64,
    uses: u64,
) -> Result<(TokenRecord, Secret)> {
    let role = Role::parse(role)?;
    let made = auth::create_token(
        ctx.store.as_ref(),
        &ca_sha256(ctx),
        name,
        role,
        ttl_ms,
        uses,
    )
    .await?;
    who.audit("create token", &format!("{name} ({})", role.as_str()));
    Ok(made)
}

/// Tokens (not agents' credentials, which `agents list` stands for).
pub async fn list_tokens(ctx: &Context) -> Result<Vec<TokenRecord>> {
    Ok(ctx
        .store
        .list_tokens()
        .await?
        .into_iter()
        .filter(|t| t.role != Role::Agent.as_str())
        .collect())
}

/// Revokes a token; it fails from its next use.
pub async fn revoke_token(ctx: &Context, who: &Principal, name: &str) -> Result<TokenRecord> {
    let row = auth::token_named(ctx.store.as_ref(), name).await?;
    ctx.store.revoke_token(&row.id, now_ms()).await?;
    who.audit("revoke token", name);
    auth::token_named(ctx.store.as_ref(), name).await
}

/// Gives a token a new secret.
pub async fn rotate_token(
    ctx: &Context,
    who: &Principal,
    name: &str,
) -> Result<(TokenRecord, Secret)> {
    let made = auth::rotate_token(ctx.store.as_ref(), &ca_sha256(ctx), name).await?;
    who.audit("rotate token", name);
    Ok(made)
}

/// What revoking an agent did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedAgent {
    /// Its id.
    pub agent_id: String,
    /// Its name.
    pub name: String,
    /// The run that went back to the queue, if any.
    pub requeued_run_id: String,
}

/// Revokes an agent's credential (by name or id): its session on this replica closes now (on
/// another replica at its next heartbeat), and its running task goes back to the queue.
pub async fn revoke_agent(ctx: &Context, who: &Principal, agent: &str) -> Result<RevokedAgent> {
    let found = ctx
        .store
        .list_agents()
        .await?
        .into_iter()
        .find(|a| a.name == agent || a.id == agent)
        .ok_or_else(|| Error::NotFound(format!("no agent named or with id '{agent}'")))?;
    let now = now_ms();
    ctx.store.revoke_agent_credentials(&found.id, now).await?;
    ctx.registry.close(&found.id);
    let mut requeued_run_id = String::new();
    if let Some(run) = ctx.store.active_run_of_agent(&found.id).await? {
        let released = ctx
            .store
            .release_run(
                &run,
                &format!("agent '{}' was revoked", found.name),
                now,
                ctx.config.max_attempts,
                true,
            )
            .await?;
        if released.is_some() {
            requeued_run_id = run;
        }
    }
    ctx.changed();
    who.audit("revoke agent", &format!("{} ({})", found.name, found.id));
    Ok(RevokedAgent {
        agent_id: found.id,
        name: found.name,
        requeued_run_id,
    })
}
