//! The agent protocol's version. Register carries the agent's version and the coordinator answers
//! with its own; each side refuses a peer it cannot serve, naming both versions, instead of failing
//! later on a missing field.
//!
//! Compatibility rule: a coordinator serves agents whose protocol lies in
//! [`OLDEST_AGENT_PROTOCOL`]..=[`PROTOCOL_VERSION`]; an agent works with coordinators whose protocol is
//! at least [`OLDEST_COORDINATOR_PROTOCOL`]. Upgrade coordinators first, then agents. Version 1 is the
//! protocol of agents that sent no version (fleetbench before the field existed).
//!
//! Versions: 2 added the version itself; 3 moves models as artifact sets (a model and its external
//! data, fetched with GetArtifactSet and resumable downloads). An agent of protocol 2 would fetch a
//! set's manifest as if it were the model, so a coordinator of protocol 3 refuses it (upgrade it), and
//! an agent of protocol 3 needs GetArtifactSet, which coordinators of protocol 2 lack. 4 adds tokens:
//! agents join with a join token and then call with a credential of their own (RegisterResponse's
//! `agent_credential`); an agent of protocol 3 sends no token, and a coordinator of protocol 4 tells
//! it to upgrade rather than only "unauthenticated"; an agent of protocol 4 refuses a coordinator of
//! protocol 3, which would let anyone register. 5 adds the generate scenario (decoder models: token
//! figures in every telemetry window); an agent of protocol 4 would fail a generate task on the
//! unknown scenario, so a coordinator of protocol 5 refuses it (upgrade it). An agent of protocol 5
//! still works with a coordinator of protocol 4, which never assigns it a generate task. 6 adds the
//! network path: the coordinator answers Probe calls and stores the agent's NetworkReport messages.
//! An agent of protocol 5 works with a coordinator of protocol 6 and reports no measurements (`agents
//! list` shows none for it, and `rank --client` leaves its rows unmeasured); an agent of protocol 6
//! measures only when the coordinator says it speaks 6, so it works with a coordinator of protocol 4
//! or 5 as before.

/// The protocol this build speaks.
pub const PROTOCOL_VERSION: u32 = 6;

/// The first protocol with network probes (Probe calls and NetworkReport messages).
pub const NETWORK_PROBES: u32 = 6;

/// The oldest agent protocol a coordinator of this build serves.
pub const OLDEST_AGENT_PROTOCOL: u32 = 5;

/// The oldest coordinator protocol an agent of this build works with.
pub const OLDEST_COORDINATOR_PROTOCOL: u32 = 4;

/// The version a peer stated; an absent (0) version is protocol 1.
pub fn stated(v: u32) -> u32 {
    v.max(1)
}

/// Why a coordinator of this build cannot serve an agent of protocol `agent`, or None when it can.
pub fn refuse_agent(agent: u32) -> Option<String> {
    let agent = stated(agent);
    if (OLDEST_AGENT_PROTOCOL..=PROTOCOL_VERSION).contains(&agent) {
        return None;
    }
    let advice = if agent < OLDEST_AGENT_PROTOCOL {
        "upgrade the agent"
    } else {
        "upgrade the coordinator first"
    };
    Some(format!(
        "protocol_version: the agent speaks fleetbench agent protocol {agent}; this coordinator speaks \
         {PROTOCOL_VERSION} and serves agents of protocol {OLDEST_AGENT_PROTOCOL} to {PROTOCOL_VERSION}; {advice}"
    ))
}

/// Why an agent of this build cannot work with a coordinator of protocol `coordinator`, or None.
pub fn refuse_coordinator(coordinator: u32) -> Option<String> {
    let coordinator = stated(coordinator);
    (coordinator < OLDEST_COORDINATOR_PROTOCOL).then(|| {
        format!(
            "protocol_version: the coordinator speaks fleetbench agent protocol {coordinator}; this agent \
             speaks {PROTOCOL_VERSION} and needs a coordinator of protocol {OLDEST_COORDINATOR_PROTOCOL} or \
             newer; upgrade the coordinator"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_outside_the_range_are_refused_naming_both() {
        assert_eq!(refuse_agent(PROTOCOL_VERSION), None);
        let old = refuse_agent(0).unwrap();
        assert!(
            old.contains("protocol 1") && old.contains(&format!("speaks {PROTOCOL_VERSION}")),
            "{old}"
        );
        let new = refuse_agent(PROTOCOL_VERSION + 1).unwrap();
        assert!(new.contains("upgrade the coordinator"), "{new}");
        assert!(refuse_coordinator(0).unwrap().contains("protocol 1"));
        assert_eq!(refuse_coordinator(PROTOCOL_VERSION), None);
    }
}
