//! The fleet: agent registration (platform fingerprint and name) and listing.

use fleetbench_common::labels::Labels;
use fleetbench_common::now_ms;
use fleetbench_common::platform::{platform_id, platform_name};
use fleetbench_common::protocol;

use crate::auth::{self, Principal, Role};
use crate::context::Context;
use crate::domain::{AgentInfo, Registered, Registration};
use crate::error::{Error, Result};
use crate::store::{AgentRecord, AgentRegistration};

/// True when the agent has an open session and was heard from within the lease timeout.
pub fn is_online(coord: &Context, a: &AgentRecord, now: i64) -> bool {
    a.connected && a.last_seen_at > now - coord.config.lease_timeout_ms as i64
}

/// Refuses an agent whose protocol this coordinator cannot serve, naming both versions.
pub fn check_protocol(version: u32, name: &str) -> Result<()> {
    match protocol::refuse_agent(version) {
        Some(why) => {
            tracing::warn!(name = %name, agent_protocol = version, "Refused an agent of another protocol.");
            Err(Error::FailedPrecondition(why))
        }
        None => Ok(()),
    }
}

/// Registers an agent and pools it into its platform. An agent whose protocol this coordinator
/// cannot serve is refused, with both versions named.
///
/// `who` is a join token (a new agent, which gets a credential of its own; a use of the token is
/// taken) or an agent's credential (that agent registering again, under its own id only).
pub async fn register(
    coord: &Context,
    who: &Principal,
    mut req: Registration,
) -> Result<Registered> {
    check_protocol(req.protocol_version, &req.name)?;
    let name = req.name.trim().to_string();
    if name.is_empty() || name.len() > 64 {
        return Err(Error::InvalidArgument(
            "name: an agent needs a name of 1 to 64 characters".into(),
        ));
    }
    let inventory = req.inventory;
    if inventory.cpu_set.is_empty() {
        return Err(Error::InvalidArgument(
            "inventory.cpu_set: the agent reports no usable CPU".into(),
        ));
    }
    let mut labels = Labels::new();
    for (k, v) in &req.labels {
        let (k, v) = fleetbench_common::labels::parse_label(&format!("{k}={v}"))
            .map_err(|e| Error::InvalidArgument(format!("labels: {e}")))?;
        labels.insert(k, v);
    }
    let pid = platform_id(&inventory, &labels);
    let pname = platform_name(&inventory, &labels);
    coord
        .store
        .upsert_platform(&pid, &pname, &inventory)
        .await?;
    let now = now_ms();
    let joining = who.role == Role::AgentJoin;
    if joining {
        // A join token registers a new agent, or takes over the name of one that has no credential
        // (an agent of an open coordinator, upgraded): never an agent that has one.
        req.agent_id = None;
        let holder = coord
            .store
            .list_agents()
            .await?
            .into_iter()
            .find(|a| a.name == name);
        if let Some(a) = holder {
            let cred = coord
                .store
                .token_by_name(&auth::agent_token_name(&a.id))
                .await?;
            // An expired credential holds nothing: its agent must join again anyway.
            if cred.is_some_and(|c| c.revoked_at == 0 && (c.expires_at == 0 || c.expires_at > now))
            {
                return Err(Error::AlreadyExists(format!(
                    "agent name '{name}' belongs to agent {} which has a credential; give this agent \
                     another --name, or revoke that agent first (`fleetbench admin agents revoke {name}`)",
                    a.id
                )));
            }
        }
        if !coord.store.use_token(&who.token_id, now, true).await? {
            return Err(Error::Unauthenticated(format!(
                "join token '{}' has no uses left",
                who.name
            )));
        }
    } else {
        match &req.agent_id {
            Some(id) if id != &who.agent_id => {
                return Err(Error::PermissionDenied(format!(
                    "this credential belongs to agent {}; it cannot register as agent {id}",
                    who.agent_id
                )));
            }
            _ => req.agent_id = Some(who.agent_id.clone()),
        }
    }
    let reg = AgentRegistration {
        agent_id: req.agent_id,
        name,
        labels,
        inventory,
        platform_id: pid.clone(),
        platform_name: pname.clone(),
        alive_since: now - coord.config.lease_timeout_ms as i64,
    };
    let agent_id = coord.store.register_agent(&reg, now).await?;
    tracing::info!(agent = %agent_id, name = %reg.name, platform = %pname, "Agent registered.");
    let ttl = coord.config.agent_credential_ttl_ms;
    let agent_credential = if joining {
        who.audit("agent joined", &format!("{} ({agent_id})", reg.name));
        auth::issue_agent_credential(coord.store.as_ref(), &agent_id, ttl).await?
    } else {
        match coord.store.get_token(&who.token_id).await? {
            Some(row) if auth::renewal_due(&row, ttl, now) => {
                tracing::info!(agent = %agent_id, name = %reg.name, "Renewing the agent's credential.");
                auth::renew_agent_credential(coord.store.as_ref(), &row).await?
            }
            _ => Default::default(),
        }
    };
    Ok(Registered {
        agent_id,
        platform_id: pid,
        platform_name: pname,
        heartbeat_interval_ms: coord.config.heartbeat_interval_ms,
        protocol_version: protocol::PROTOCOL_VERSION,
        agent_credential,
    })
}

/// All agents with their state.
pub async fn list(coord: &Context) -> Result<Vec<AgentInfo>> {
    let now = now_ms();
    Ok(coord
        .store
        .list_agents()
        .await?
        .into_iter()
        .map(|a| AgentInfo {
            online: is_online(coord, &a, now),
            agent_id: a.id,
            name: a.name,
            labels: a.labels,
            inventory: a.inventory,
            platform_id: a.platform_id,
            platform_name: a.platform_name,
            current_task_id: a.current_task_id.unwrap_or_default(),
            last_seen_ms: a.last_seen_at,
            network: a.network,
        })
        .collect())
}
