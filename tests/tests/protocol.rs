//! The agent protocol's version: a coordinator refuses an agent it cannot serve, an agent refuses a
//! coordinator it cannot work with, and both name both versions (in the error, and in the agent's log).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fleetbench_common::protocol::{OLDEST_COORDINATOR_PROTOCOL, PROTOCOL_VERSION};
use fleetbench_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use fleetbench_proto::v1::{
    AgentMessage, CoordinatorMessage, Inventory, ListAgentsRequest, RegisterRequest,
    RegisterResponse,
};
use fleetbench_tests::{TestCoordinator, agent_client, ort_lib, unknown_join_token};
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
    coord.stop().await;
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

    type SessionStream =
        Pin<Box<dyn futures::Stream<Item = Result<CoordinatorMessage, Status>> + Send + 'static>>;

    async fn session(
        &self,
        _: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        Err(Status::unimplemented("old"))
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
