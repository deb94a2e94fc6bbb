//! What the coordinator does with an agent's network measurements, on a real coordinator with a
//! hand-driven agent: a report is stored and listed; a malformed one is refused and the stored one
//! kept; Probe answers an agent with the bytes asked for, refuses more than its limit naming the
//! field, and refuses callers that are not agents.

use std::time::Duration;

use fleetbench_common::network::MAX_PROBE_BYTES;
use fleetbench_proto::v1::agent_message::Body as Out;
use fleetbench_proto::v1::coordinator_message::Body as In;
use fleetbench_proto::v1::*;
use fleetbench_tests::*;

fn path(target: &str, rtt_ms: f64) -> NetworkPath {
    NetworkPath {
        target: target.into(),
        address: "10.0.0.5:7701".into(),
        rtt_ms,
        rtt_min_ms: rtt_ms / 2.0,
        up_bytes_per_s: 1e6,
        down_bytes_per_s: 2e6,
        probe_bytes: 32768,
        samples: 5,
        measured_at_ms: 1,
        error: String::new(),
    }
}

/// Waits until the session has handled everything sent before: a malformed window is answered at
/// once with a discarded acknowledgement, after the messages ahead of it.
async fn settle(agent: &mut FakeAgent) {
    let mut bad = fake_window(&"0".repeat(32), 0, 1);
    bad.latency_histogram = vec![1, 2, 3];
    agent.send(Out::Window(bad)).await;
    loop {
        match agent.next(Duration::from_secs(10)).await {
            Some(In::WindowAck(a)) if a.discarded => return,
            Some(_) => continue,
            None => panic!("the session did not answer"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_stored_malformed_ones_refused_and_probes_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let mut fake = FakeAgent::connect(&coord.url, &coord.tokens.join, "measured", &[]).await;

    fake.send(Out::Network(NetworkReport {
        paths: vec![path("coordinator", 3.0), path("hq", 40.0)],
    }))
    .await;
    settle(&mut fake).await;
    let stored = |agents: Vec<AgentInfo>| {
        agents
            .into_iter()
            .find(|a| a.name == "measured")
            .expect("listed")
            .network
    };
    let first = stored(list_agents(&client).await);
    assert_eq!(first, vec![path("coordinator", 3.0), path("hq", 40.0)]);

    // Malformed reports change nothing.
    for bad in [
        vec![path("hq", f64::NAN)],
        vec![path("hq", 1.0), path("hq", 2.0)],
        vec![path("not a name", 1.0)],
        vec![NetworkPath {
            rtt_min_ms: 9.0,
            ..path("hq", 1.0)
        }],
    ] {
        fake.send(Out::Network(NetworkReport { paths: bad })).await;
    }
    settle(&mut fake).await;
    assert_eq!(stored(list_agents(&client).await), first);

    // A later report replaces the earlier one.
    fake.send(Out::Network(NetworkReport {
        paths: vec![path("coordinator", 5.0)],
    }))
    .await;
    settle(&mut fake).await;
    assert_eq!(
        stored(list_agents(&client).await),
        vec![path("coordinator", 5.0)]
    );

    // Probe.
    let mut agent = agent_client(&coord.url, &fake.credential).await;
    let reply = agent
        .probe(ProbeRequest {
            payload: vec![1; 1000],
            response_bytes: 4096,
        })
        .await
        .expect("an agent may probe");
    assert_eq!(reply.into_inner().payload.len(), 4096);
    for (req, field) in [
        (
            ProbeRequest {
                payload: vec![0; MAX_PROBE_BYTES as usize + 1],
                response_bytes: 0,
            },
            "payload",
        ),
        (
            ProbeRequest {
                payload: vec![],
                response_bytes: MAX_PROBE_BYTES as u32 + 1,
            },
            "response_bytes",
        ),
    ] {
        let e = agent.probe(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(field), "{e:?}");
    }
    // Only agents may: not a join token, not an admin.
    for token in [coord.tokens.join.as_str(), coord.tokens.admin.as_str()] {
        let e = agent_client(&coord.url, token)
            .await
            .probe(ProbeRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    }
    coord.stop().await;
}
