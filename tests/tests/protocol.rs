//! The agent protocol's version: a coordinator refuses an agent it cannot serve, an agent refuses a
//! coordinator it cannot work with, and both name both versions (in the error, and in the agent's log).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fleetbench_agent::AgentConfig;
use fleetbench_common::protocol::{NETWORK_PROBES, OLDEST_COORDINATOR_PROTOCOL, PROTOCOL_VERSION};
use fleetbench_proto::v1::agent_message::Body;
use fleetbench_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use fleetbench_proto::v1::{
    AgentMessage, CoordinatorMessage, Inventory, ListAgentsRequest, ProbeRequest, ProbeResponse,
    RegisterRequest, RegisterResponse,
};
use fleetbench_tests::{
    TestAgent, TestCoordinator, agent_client, agent_config, ort_lib, unknown_join_token,
};
use tonic::{Request, Response, Status, Streaming};

fn request(protocol_version: u32) -> RegisterRequest {
    RegisterRequest {
        name: "old-agent".into(),
        inventory: Some(Inventory {
            cpu_set: vec![0],
            host_id: "h".into(),
            ..Default::default()
        }),
        protocol_version,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_refuses_an_agent_of_another_protocol_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let mut agents = agent_client(&coord.url, &coord.tokens.join).await;
    // An agent from before the version field sends none: protocol 1.
    let old = agents.register(request(0)).await.unwrap_err();
    assert_eq!(old.code(), tonic::Code::FailedPrecondition, "{old:?}");
    assert!(
        old.message().contains("agent protocol 1")
            && old
                .message()
                .contains(&format!("speaks {PROTOCOL_VERSION}"))
            && old.message().contains("upgrade the agent"),
        "{old:?}"
    );
    // An agent of protocol 4 knows tokens but not the generate scenario: told to upgrade.
    let before_generate = agents.register(request(4)).await.unwrap_err();
    assert_eq!(before_generate.code(), tonic::Code::FailedPrecondition);
    assert!(
        before_generate.message().contains("agent protocol 4")
            && before_generate.message().contains("upgrade the agent"),
        "{before_generate:?}"
    );
    // An agent of protocol 3 knew no tokens and sends none: it is told to upgrade, not only that it
    // is unauthenticated.
    let mut tokenless = agent_client(&coord.url, "").await;
    let before_tokens = tokenless.register(request(3)).await.unwrap_err();
    assert_eq!(
        before_tokens.code(),
        tonic::Code::FailedPrecondition,
        "{before_tokens:?}"
    );
    assert!(
        before_tokens.message().contains("agent protocol 3")
            && before_tokens.message().contains("upgrade the agent"),
        "{before_tokens:?}"
    );
    let newer = agents
        .register(request(PROTOCOL_VERSION + 1))
        .await
        .unwrap_err();
    assert!(
        newer
            .message()
            .contains(&format!("agent protocol {}", PROTOCOL_VERSION + 1))
            && newer.message().contains("upgrade the coordinator first"),
        "{newer:?}"
    );
    let client = coord.client().await;
    let listed = client
        .fleet()
        .list_agents(ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(
        listed.is_empty(),
        "a refused agent is not stored: {listed:?}"
    );
    let ok = agents
        .register(request(PROTOCOL_VERSION))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.protocol_version, PROTOCOL_VERSION);
    // An agent of the protocol before network probes is still served (it reports no measurements).
    let older = agents
        .register(RegisterRequest {
            name: "older-agent".into(),
            ..request(NETWORK_PROBES - 1)
        })
        .await
        .expect("an agent of protocol 5 registers");
    assert_eq!(older.into_inner().protocol_version, PROTOCOL_VERSION);
    coord.stop().await;
}

/// What a fake coordinator's session sends.
type Outbound =
    Pin<Box<dyn futures::Stream<Item = Result<CoordinatorMessage, Status>> + Send + 'static>>;

/// A fake coordinator's answer to Register: agent "aa…a" of protocol `version`, heartbeats every
/// 50 ms.
fn registered(version: u32) -> RegisterResponse {
    RegisterResponse {
        agent_id: "a".repeat(32),
        platform_id: "p".into(),
        platform_name: "p".into(),
        heartbeat_interval_ms: 50,
        protocol_version: version,
        ..Default::default()
    }
}

/// A coordinator that answers Register with an old protocol version and counts sessions.
struct OldCoordinator {
    sessions: Arc<AtomicU32>,
}

#[tonic::async_trait]
impl AgentService for OldCoordinator {
    async fn register(
        &self,
        _: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(RegisterResponse {
            agent_id: "a".into(),
            platform_id: "p".into(),
            platform_name: "p".into(),
            heartbeat_interval_ms: 1000,
            protocol_version: OLDEST_COORDINATOR_PROTOCOL - 1,
            ..Default::default()
        }))
    }

    type SessionStream = Outbound;

    async fn session(
        &self,
        _: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        Err(Status::unimplemented("old"))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Err(Status::unimplemented("old"))
    }
}

/// A coordinator of protocol `version` that keeps sessions open, counts heartbeats and answers
/// Probe calls, counting them.
struct Versioned {
    version: u32,
    probes: Arc<AtomicU32>,
    heartbeats: Arc<tokio::sync::watch::Sender<u32>>,
}

#[tonic::async_trait]
impl AgentService for Versioned {
    async fn register(
        &self,
        _: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(registered(self.version)))
    }

    type SessionStream = Outbound;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let beats = self.heartbeats.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if matches!(m.body, Some(Body::Heartbeat(_))) {
                    beats.send_modify(|n| *n += 1);
                }
            }
        });
        Ok(Response::new(Box::pin(futures::stream::pending())))
    }

    async fn probe(&self, r: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        self.probes.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(ProbeResponse {
            payload: vec![0; r.get_ref().response_bytes as usize],
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_probes_its_network_only_with_a_coordinator_of_the_network_protocol() {
    for (version, probes_expected) in [(NETWORK_PROBES - 1, false), (NETWORK_PROBES, true)] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let probes = Arc::new(AtomicU32::new(0));
        let (beats, mut heard) = tokio::sync::watch::channel(0u32);
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(Versioned {
                    version,
                    probes: probes.clone(),
                    heartbeats: Arc::new(beats),
                }))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let dir = tempfile::tempdir().unwrap();
        let agent = TestAgent::start(agent_config(
            &format!("http://{addr}"),
            &unknown_join_token(),
            "probing",
            &[],
            dir.path(),
        ));
        // One measurement: a warm-up, the round trips and two transfers.
        let calls = 1 + AgentConfig::default().network_probe_samples + 2;
        // An agent measures as soon as its session opens; twenty heartbeats later it has begun.
        tokio::time::timeout(Duration::from_secs(30), heard.wait_for(|n| *n >= 20))
            .await
            .expect("heartbeats")
            .unwrap();
        if probes_expected {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while probes.load(Ordering::Relaxed) < calls {
                assert!(tokio::time::Instant::now() < deadline, "no measurement");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(probes.load(Ordering::Relaxed), calls);
        } else {
            assert_eq!(
                probes.load(Ordering::Relaxed),
                0,
                "an agent called Probe on a coordinator of protocol {version}, which lacks it"
            );
        }
        agent.vanish();
        server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_an_older_coordinator_and_its_log_names_both_versions() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sessions = Arc::new(AtomicU32::new(0));
    let server = tonic::transport::Server::builder()
        .add_service(AgentServiceServer::new(OldCoordinator {
            sessions: sessions.clone(),
        }))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);

    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("agent.log");
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("fleetbench-agent"))
        .unwrap();
    let mut agent = std::process::Command::new(bin)
        .arg("--coordinator")
        .arg(format!("http://{addr}"))
        .args(["--name", "new-agent"])
        .env("FLEETBENCH_JOIN_TOKEN", unknown_join_token())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--ort-lib")
        .arg(ort_lib())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the agent");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("incompatible protocols") || tokio::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = agent.kill();
    let _ = agent.wait();
    let old = OLDEST_COORDINATOR_PROTOCOL - 1;
    assert!(
        log.contains("incompatible protocols")
            && log.contains(&format!(
                "coordinator speaks fleetbench agent protocol {}",
                old.max(1)
            ))
            && log.contains(&format!("this agent speaks {PROTOCOL_VERSION}")),
        "the agent's log does not name both versions:\n{log}"
    );
    assert_eq!(
        sessions.load(Ordering::Relaxed),
        0,
        "the agent opened a session with a coordinator it cannot work with"
    );
}

/// A coordinator that, when an agent says it is stopping with no run to hand back, offers it a task
/// first and acknowledges second (a task already on the wire when the agent stopped), then
/// acknowledges whatever the agent hands back. It keeps every result it receives.
struct OffersAsItStops {
    results: Arc<std::sync::Mutex<Vec<fleetbench_proto::v1::RunResult>>>,
    heartbeats: Arc<tokio::sync::watch::Sender<u32>>,
}

#[tonic::async_trait]
impl AgentService for OffersAsItStops {
    async fn register(
        &self,
        _: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Ok(Response::new(registered(PROTOCOL_VERSION)))
    }

    type SessionStream = Outbound;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        use fleetbench_proto::v1::coordinator_message::Body as Out;
        use fleetbench_proto::v1::{ResultAck, TaskAssignment};
        let mut inbound = request.into_inner();
        let (beats, results) = (self.heartbeats.clone(), self.results.clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<CoordinatorMessage, Status>>(16);
        let send = move |body: Out| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Ok(CoordinatorMessage { body: Some(body) })).await;
            }
        };
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                match m.body {
                    Some(Body::Heartbeat(_)) => beats.send_modify(|n| *n += 1),
                    Some(Body::Result(r)) => {
                        results.lock().unwrap().push(r.clone());
                        if r.run_id.is_empty() && r.agent_stopping {
                            send(Out::Assignment(TaskAssignment {
                                task_id: "7".repeat(32),
                                run_id: "8".repeat(32),
                                job_id: "9".repeat(32),
                                attempt: 1,
                                ..Default::default()
                            }))
                            .await;
                        }
                        send(Out::ResultAck(ResultAck {
                            run_id: r.run_id,
                            ..Default::default()
                        }))
                        .await;
                    }
                    _ => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Err(Status::unimplemented("not measured here"))
    }
}

/// An idle agent stopped says so; a task offered to it in that moment is handed back at once, marked
/// so that the coordinator re-queues it without counting the attempt, instead of waiting out a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopping_while_idle_says_so_and_hands_back_a_task_offered_meanwhile() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (beats, mut heard) = tokio::sync::watch::channel(0u32);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(OffersAsItStops {
                results: results.clone(),
                heartbeats: Arc::new(beats),
            }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = agent_config(
        &format!("http://{addr}"),
        &unknown_join_token(),
        "stopping",
        &[],
        dir.path(),
    );
    config.network_probe_interval_s = 0;
    let agent = TestAgent::start(config);
    tokio::time::timeout(Duration::from_secs(30), heard.wait_for(|n| *n >= 1))
        .await
        .expect("a session with heartbeats")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), agent.stop())
        .await
        .expect("the agent stops");
    let results = results.lock().unwrap().clone();
    let summary: Vec<(String, bool, bool)> = results
        .iter()
        .map(|r| (r.run_id.clone(), r.cancelled, r.agent_stopping))
        .collect();
    assert_eq!(
        summary,
        vec![(String::new(), false, true), ("8".repeat(32), true, true),],
        "the notice, then the offered task handed back"
    );
    server.abort();
}
