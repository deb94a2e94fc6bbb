//! Platforms and agents.

use async_trait::async_trait;
use fleetbench_common::labels::Labels;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{SqlStore, from_json, to_json};
use crate::domain::Inventory;
use crate::error::{Error, Result};
use crate::store::{AgentRecord, AgentRegistration, AgentStore};

pub(super) fn labels_from_json(s: &str) -> Result<Labels> {
    from_json("agent labels", s)
}

const AGENT_SELECT: &str = "SELECT a.id, a.name, a.platform_id, COALESCE(p.name, ''), a.host_id, a.labels_json, \
     a.inventory_json, a.connected, a.last_seen_at, \
     COALESCE((SELECT t.id FROM tasks t WHERE t.agent_id = a.id AND t.state = 'running' LIMIT 1), ''), \
     COALESCE(a.network_json, '[]') \
     FROM agents a LEFT JOIN platforms p ON p.id = a.platform_id";

fn agent_record(row: &AnyRow) -> Result<AgentRecord> {
    let current: String = row.try_get(9)?;
    Ok(AgentRecord {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        platform_id: row.try_get(2)?,
        platform_name: row.try_get(3)?,
        host_id: row.try_get(4)?,
        labels: labels_from_json(&row.try_get::<String, _>(5)?)?,
        inventory: from_json("agents.inventory_json", &row.try_get::<String, _>(6)?)?,
        connected: row.try_get::<i64, _>(7)? != 0,
        last_seen_at: row.try_get(8)?,
        current_task_id: (!current.is_empty()).then_some(current),
        network: from_json("agents.network_json", &row.try_get::<String, _>(10)?)?,
    })
}

#[async_trait]
impl AgentStore for SqlStore {
    async fn upsert_platform(&self, id: &str, name: &str, descriptor: &Inventory) -> Result<()> {
        let descriptor = to_json("platform descriptor", descriptor)?;
        let _writer = self.writer().await;
        sqlx::query(
            "INSERT INTO platforms (id, name, descriptor_json, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        )
        .bind(id)
        .bind(name)
        .bind(descriptor)
        .bind(fleetbench_common::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn register_agent(&self, reg: &AgentRegistration, now: i64) -> Result<String> {
        let (_writer, mut tx) = self.begin().await?;
        // The checks below read, then write: registrations take turns (on SQLite the write
        // transaction already does that; on Postgres an advisory lock across replicas).
        if self.backend == super::Backend::Postgres {
            sqlx::query(
                "SELECT pg_advisory_xact_lock(hashtext('fleetbench agent registration')::BIGINT)",
            )
            .execute(&mut *tx)
            .await?;
        }
        let by_name = sqlx::query("SELECT id, connected, last_seen_at FROM agents WHERE name = $1")
            .bind(&reg.name)
            .fetch_optional(&mut *tx)
            .await?;
        let by_id = match &reg.agent_id {
            Some(id) => {
                sqlx::query("SELECT id FROM agents WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?
            }
            None => None,
        };
        let mut id = match (&reg.agent_id, by_id.is_some()) {
            (Some(id), true) => Some(id.clone()),
            _ => None,
        };
        if let Some(row) = by_name {
            let holder: String = row.try_get(0)?;
            let online =
                row.try_get::<i64, _>(1)? != 0 && row.try_get::<i64, _>(2)? > reg.alive_since;
            if id.as_deref() != Some(holder.as_str()) {
                if online {
                    return Err(Error::AlreadyExists(format!(
                        "agent name '{}' is in use by an online agent (id {holder}); start this agent with another --name",
                        reg.name
                    )));
                }
                match &id {
                    // This agent has its own id: the stale holder of the name steps aside.
                    Some(_) => {
                        sqlx::query("UPDATE agents SET name = $1 WHERE id = $2")
                            .bind(format!("{}~{}", reg.name, &holder[..8.min(holder.len())]))
                            .bind(&holder)
                            .execute(&mut *tx)
                            .await?;
                    }
                    // A fresh state directory under a known name: take over the old identity.
                    None => id = Some(holder),
                }
            }
        }
        let labels_json =
            serde_json::to_string(&reg.labels).map_err(|e| Error::Internal(e.to_string()))?;
        let inventory = to_json("inventory", &reg.inventory)?;
        let id = match id {
            Some(id) => {
                sqlx::query(
                    "UPDATE agents SET name = $1, platform_id = $2, host_id = $3, labels_json = $4, inventory_json = $5, \
                     last_seen_at = $6 WHERE id = $7",
                )
                .bind(&reg.name)
                .bind(&reg.platform_id)
                .bind(&reg.inventory.host_id)
                .bind(&labels_json)
                .bind(inventory)
                .bind(now)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
                id
            }
            None => {
                let id = reg
                    .agent_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
                sqlx::query(
                    "INSERT INTO agents (id, name, platform_id, host_id, labels_json, inventory_json, connected, \
                     registered_at, last_seen_at) VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $7)",
                )
                .bind(&id)
                .bind(&reg.name)
                .bind(&reg.platform_id)
                .bind(&reg.inventory.host_id)
                .bind(&labels_json)
                .bind(inventory)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                id
            }
        };
        tx.commit().await?;
        Ok(id)
    }

    async fn get_agent(&self, agent_id: &str) -> Result<Option<AgentRecord>> {
        let sql = format!("{AGENT_SELECT} WHERE a.id = $1");
        let row = sqlx::query(&sql)
            .bind(agent_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(agent_record).transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        let sql = format!("{AGENT_SELECT} ORDER BY {}", self.bytewise("a.name"));
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(agent_record).collect()
    }

    async fn set_connected(&self, agent_id: &str, connected: bool, now: i64) -> Result<()> {
        let _writer = self.writer().await;
        sqlx::query("UPDATE agents SET connected = $1, last_seen_at = $2 WHERE id = $3")
            .bind(connected as i64)
            .bind(now)
            .bind(agent_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_network(
        &self,
        agent_id: &str,
        paths: &[fleetbench_common::network::NetworkPath],
    ) -> Result<()> {
        let json = to_json("network paths", &paths)?;
        let _writer = self.writer().await;
        sqlx::query("UPDATE agents SET network_json = $1 WHERE id = $2")
            .bind(json)
            .bind(agent_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
