//! `fleetbench agents`: the fleet.

use anyhow::Result;
use clap::Subcommand;
use fleetbench_common::labels::COST_LABEL;
use fleetbench_proto::v1::ListAgentsRequest;

use crate::client::Client;
use crate::output::{self, Format};

/// Agent commands.
#[derive(Debug, Subcommand)]
pub enum AgentsCmd {
    /// List agents with inventory, labels, state and current task.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
}

/// Runs an agent command.
pub async fn run(client: &Client, cmd: AgentsCmd) -> Result<()> {
    let AgentsCmd::List { output } = cmd;
    let agents = client
        .fleet()
        .list_agents(ListAgentsRequest {})
        .await
        .map_err(|s| client.error(s, "listing agents"))?
        .into_inner()
        .agents;
    match output {
        Format::Json => output::print_json(&agents),
        Format::Table => {
            let mut t = output::table(&[
                "NAME",
                "STATE",
                "PLATFORM",
                "LABELS",
                "CPU",
                "CPUS",
                "MEMORY",
                "ONNX RUNTIME",
                "TASK",
            ]);
            for a in &agents {
                let inv = a.inventory.clone().unwrap_or_default();
                let mut labels: Vec<String> =
                    a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort_by_key(|l| l.starts_with(COST_LABEL));
                t.add_row(vec![
                    a.name.clone(),
                    if a.online {
                        "online".into()
                    } else {
                        "offline".into()
                    },
                    a.platform_name.clone(),
                    labels.join(", "),
                    inv.cpu_brand.clone(),
                    format!("{:?}", inv.cpu_set),
                    output::bytes(inv.memory_bytes),
                    format!(
                        "{} ({})",
                        inv.ort_version,
                        inv.execution_providers.join(", ")
                    ),
                    if a.current_task_id.is_empty() {
                        "-".into()
                    } else {
                        output::short(&a.current_task_id).to_string()
                    },
                ]);
            }
            outln!("{t}");
            if agents.iter().any(|a| !a.network.is_empty()) {
                outln!("\nnetwork paths (measured by each agent between tasks)");
                outln!("{}", network_table(&agents));
            }
            Ok(())
        }
    }
}

/// Each agent's measured paths: one line per (agent, target).
pub fn network_table(agents: &[fleetbench_proto::v1::AgentInfo]) -> comfy_table::Table {
    use fleetbench_common::network::format_rate;
    let mut t = output::table(&[
        "AGENT", "TARGET", "ADDRESS", "RTT", "MIN RTT", "DOWN", "UP", "MEASURED",
    ]);
    for a in agents {
        for p in &a.network {
            let measured = super::jobs::format_time(p.measured_at_ms);
            if p.error.is_empty() {
                t.add_row(vec![
                    a.name.clone(),
                    p.target.clone(),
                    p.address.clone(),
                    output::ms(p.rtt_ms),
                    output::ms(p.rtt_min_ms),
                    format_rate(p.down_bytes_per_s),
                    format_rate(p.up_bytes_per_s),
                    measured,
                ]);
            } else {
                t.add_row(vec![
                    a.name.clone(),
                    p.target.clone(),
                    p.address.clone(),
                    format!("failed: {}", p.error),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    measured,
                ]);
            }
        }
    }
    t
}
