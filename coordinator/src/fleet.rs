//! The fleet: agent registration (platform fingerprint and name) and listing.

use fleetbench_common::labels::Labels;
use fleetbench_common::now_ms;
use fleetbench_common::platform::{platform_id, platform_name};
use fleetbench_common::protocol;

use crate::context::Context;
use crate::domain::{AgentInfo, Registered, Registration};
use crate::error::{Error, Result};
use crate::store::{AgentRecord, AgentRegistration};

/// True when the agent has an open session and was heard from within the lease timeout.
pub fn is_online(coord: &Context, a: &AgentRecord, now: i64) -> bool {
    a.connected && a.last_seen_at > now - coord.config.lease_timeout_ms as i64
}

/// Registers an agent and pools it into its platform. An agent whose protocol this coordinator
/// cannot serve is refused, with both versions named.
pub async fn register(coord: &Context, req: Registration) -> Result<Registered> {
    if let Some(why) = protocol::refuse_agent(req.protocol_version) {
        tracing::warn!(name = %req.name, agent_protocol = req.protocol_version, "Refused an agent of another protocol.");
        return Err(Error::FailedPrecondition(why));
    }
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
    Ok(Registered {
        agent_id,
        platform_id: pid,
        platform_name: pname,
        heartbeat_interval_ms: coord.config.heartbeat_interval_ms,
        protocol_version: protocol::PROTOCOL_VERSION,
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
        })
        .collect())
}
