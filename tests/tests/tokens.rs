//! Tokens and roles through the real server: no token, the wrong role, expired, revoked and rotated
//! tokens are refused on the next call; an agent id copied from the fleet list opens nothing; a
//! revoked agent is cut off and its task runs on a peer.

use std::time::Duration;

use fleetbench_cli::client::Client;
use fleetbench_cli::commands::jobs;
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_proto::v1::{
    AgentMessage, CancelJobRequest, CreateTokenRequest, DeleteJobRequest, DownloadBlobRequest,
    GetArtifactSetRequest, ListAgentsRequest, ListJobsRequest, ListModelsRequest,
    ListTokensRequest, RankRequest, RevokeAgentRequest, SessionHello, SubmitJobRequest, TokenName,
    agent_message,
};
use fleetbench_tests::*;
use tonic::Code;

/// The code of a call's outcome (Ok when it succeeded).
fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// A client of `coord` carrying `token` (none: no token at all).
async fn as_token(coord: &TestCoordinator, token: Option<&str>) -> Client {
    Client::connect(&coord.url, token).await.unwrap()
}

/// The codes of one call of each kind: view, download, push, submit, cancel, delete, admin.
async fn answers(c: &Client) -> Vec<(&'static str, Code)> {
    let stream = futures::stream::iter(vec![fleetbench_proto::v1::BlobChunk {
        data: b"x".to_vec(),
        expected_sha256: String::new(),
    }]);
    vec![
        (
            "list agents",
            code(c.fleet().list_agents(ListAgentsRequest {}).await),
        ),
        (
            "list jobs",
            code(c.jobs().list_jobs(ListJobsRequest { limit: 1 }).await),
        ),
        (
            "list models",
            code(c.models().list_models(ListModelsRequest::default()).await),
        ),
        (
            "rank",
            code(
                c.rankings()
                    .rank(RankRequest {
                        model: "none".into(),
                        ..Default::default()
                    })
                    .await,
            ),
        ),
        (
            "download",
            code(
                c.models()
                    .download_blob(DownloadBlobRequest {
                        sha256: "ab".repeat(32),
                        offset: 0,
                    })
                    .await,
            ),
        ),
        ("push", code(c.models().upload_blob(stream).await)),
        (
            "submit",
            code(c.jobs().submit_job(SubmitJobRequest { spec: None }).await),
        ),
        (
            "cancel",
            code(
                c.jobs()
                    .cancel_job(CancelJobRequest {
                        job_id: "nope".into(),
                    })
                    .await,
            ),
        ),
        (
            "delete",
            code(
                c.jobs()
                    .delete_job(DeleteJobRequest {
                        job_id: "nope".into(),
                    })
                    .await,
            ),
        ),
        (
            "admin",
            code(c.admin().list_tokens(ListTokensRequest {}).await),
        ),
    ]
}

async fn create(client: &Client, name: &str, role: &str, ttl_ms: u64) -> String {
    client
        .admin()
        .create_token(CreateTokenRequest {
            name: name.into(),
            role: role.into(),
            ttl_ms,
            uses: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .secret
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_need_a_token_and_a_role_that_allows_them() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let admin = coord.client().await;
    let viewer = create(&admin, "dashboards", "viewer", 0).await;
    let submitter = create(&admin, "ci", "submitter", 0).await;

    let denied =
        |what: &str| -> bool { matches!(what, "push" | "submit" | "cancel" | "delete" | "admin") };
    // No token, a malformed one, one nobody issued: UNAUTHENTICATED on every call.
    let forged = fleetbench_common::token::Token::mint()
        .to_secret_string()
        .expose()
        .to_string();
    for token in [None, Some("let me in"), Some(forged.as_str())] {
        for (what, c) in answers(&as_token(&coord, token).await).await {
            assert_eq!(c, Code::Unauthenticated, "{what} with {token:?}");
        }
    }
    // A viewer reads; pushing, submitting, cancelling, deleting and administering are denied.
    for (what, c) in answers(&as_token(&coord, Some(&viewer)).await).await {
        if denied(what) {
            assert_eq!(c, Code::PermissionDenied, "viewer: {what}");
        } else {
            assert!(
                !matches!(c, Code::PermissionDenied | Code::Unauthenticated),
                "viewer: {what}: {c:?}"
            );
        }
    }
    // A submitter also pushes, submits and cancels; deletes and administration stay the admin's.
    for (what, c) in answers(&as_token(&coord, Some(&submitter)).await).await {
        if matches!(what, "delete" | "admin") {
            assert_eq!(c, Code::PermissionDenied, "submitter: {what}");
        } else {
            assert!(
                !matches!(c, Code::PermissionDenied | Code::Unauthenticated),
                "submitter: {what}: {c:?}"
            );
        }
    }
    // The admin does everything.
    for (what, c) in answers(&admin).await {
        assert!(
            !matches!(c, Code::PermissionDenied | Code::Unauthenticated),
            "admin: {what}: {c:?}"
        );
    }
    // A viewer's refusal names the token, its role and what it may not do.
    let e = as_token(&coord, Some(&viewer))
        .await
        .jobs()
        .submit_job(SubmitJobRequest { spec: None })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("'dashboards'") && e.message().contains("viewer"),
        "{e:?}"
    );

    // Revoked: refused on the next call.
    let v = as_token(&coord, Some(&viewer)).await;
    assert_eq!(
        code(v.fleet().list_agents(ListAgentsRequest {}).await),
        Code::Ok
    );
    admin
        .admin()
        .revoke_token(TokenName {
            name: "dashboards".into(),
        })
        .await
        .unwrap();
    let e = v
        .fleet()
        .list_agents(ListAgentsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("revoked"), "{e:?}");

    // Rotated: the old secret fails on its next call, the new one works.
    let s = as_token(&coord, Some(&submitter)).await;
    let rotated = admin
        .admin()
        .rotate_token(TokenName { name: "ci".into() })
        .await
        .unwrap()
        .into_inner()
        .secret;
    assert_ne!(rotated, submitter);
    assert_eq!(
        code(s.fleet().list_agents(ListAgentsRequest {}).await),
        Code::Unauthenticated
    );
    let s = as_token(&coord, Some(&rotated)).await;
    assert_eq!(
        code(s.fleet().list_agents(ListAgentsRequest {}).await),
        Code::Ok
    );

    // Expired: refused once its time is up.
    let brief = create(&admin, "brief", "viewer", 50).await;
    let b = as_token(&coord, Some(&brief)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let e = loop {
        match b.fleet().list_agents(ListAgentsRequest {}).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "never expired");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{e:?}");

    // The list shows names, roles and states, never a secret.
    let listed = admin
        .admin()
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let text = format!("{listed:?}");
    for secret in [&viewer, &submitter, &rotated, &brief, &coord.tokens.admin] {
        let part = secret.rsplit('.').next().unwrap();
        assert!(!text.contains(part), "a secret in the token list: {text}");
    }
    let by_name = |n: &str| listed.iter().find(|t| t.name == n).unwrap().clone();
    assert!(by_name("dashboards").revoked_at_ms > 0);
    assert_eq!(by_name("ci").role, "submitter");
    assert!(by_name("brief").expires_at_ms > 0);
    // Bad requests are named.
    let e = admin
        .admin()
        .create_token(CreateTokenRequest {
            name: "ci".into(),
            role: "viewer".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = admin
        .admin()
        .create_token(CreateTokenRequest {
            name: "root".into(),
            role: "root".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("role"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_id_copied_from_the_fleet_list_opens_nothing() {
    let fleet = SoloFleet::start().await;
    let coord = &fleet.coord;
    let victim = list_agents(&fleet.client).await.remove(0);
    // Without a token: nothing.
    let mut anon = agent_client(&coord.url, "").await;
    assert_eq!(
        code(
            anon.register(fake_registration("solo", &victim.agent_id))
                .await
        ),
        Code::Unauthenticated
    );
    // With a join token, under the victim's name: refused, the name belongs to an agent with a
    // credential.
    let mut joining = agent_client(&coord.url, &coord.tokens.join).await;
    let e = joining
        .register(fake_registration("solo", &victim.agent_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    // Under another name: a new agent with an id of its own, whatever id it asked for.
    let mine = joining
        .register(fake_registration("intruder", &victim.agent_id))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(mine.agent_id, victim.agent_id);
    assert!(!mine.agent_credential.is_empty());
    // Its own credential opens neither a registration nor a session as the victim.
    let mut intruder = agent_client(&coord.url, &mine.agent_credential).await;
    let e = intruder
        .register(fake_registration("solo", &victim.agent_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(AgentMessage {
        body: Some(agent_message::Body::Hello(SessionHello {
            agent_id: victim.agent_id.clone(),
            current_run_id: String::new(),
        })),
    })
    .await
    .unwrap();
    let e = intruder
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A join token does not open a session at all; an admin token is not an agent's credential.
    let mut admin_as_agent = agent_client(&coord.url, &coord.tokens.admin).await;
    assert_eq!(
        code(admin_as_agent.register(fake_registration("x", "")).await),
        Code::PermissionDenied
    );
    // The victim is still the one online agent named solo.
    let agents = list_agents(&fleet.client).await;
    let solo: Vec<_> = agents.iter().filter(|a| a.name == "solo").collect();
    assert_eq!(solo.len(), 1);
    assert_eq!(solo[0].agent_id, victim.agent_id);
    assert!(solo[0].online);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_agent_is_cut_off_and_its_task_runs_on_a_peer() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |c| c.lease_timeout_ms = 60_000).await;
    let client = coord.client().await;
    let mut agents = Vec::new();
    for name in ["first", "second"] {
        let mut c = coord.agent(name, &["pool=shared"], dir.path());
        c.host_id = format!("host-{name}");
        agents.push(TestAgent::start(c));
    }
    wait_online(&client, 2).await;
    push_digits(&client).await;
    let id = jobs::submit(
        &client,
        &JobArgs {
            model: Some("digits".into()),
            variants: vec!["fp32".into()],
            duration_s: Some(3.0),
            min_duration_s: Some(3.0),
            warmup: Some(5),
            skip_accuracy: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // The agent holding the task.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let holder = loop {
        let detail = job_detail(&client, &id).await;
        if let Some(t) = detail.tasks.iter().find(|t| t.state == "running") {
            break t.agent.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{detail:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let revoked = client
        .admin()
        .revoke_agent(RevokeAgentRequest {
            agent: holder.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.name, holder);
    assert!(!revoked.requeued_run_id.is_empty(), "{revoked:?}");
    let s = wait_job(&client, &id, Duration::from_secs(60)).await;
    assert_eq!(s.state, "succeeded");
    let detail = job_detail(&client, &id).await;
    let run = detail.tasks[0].run.clone().unwrap();
    assert_ne!(run.agent, holder, "the peer ran the task");
    // The revoked agent stays out: its credential no longer opens a session.
    let listed = list_agents(&client).await;
    let gone = listed.iter().find(|a| a.name == holder).unwrap();
    assert!(!gone.online, "{gone:?}");
    let credential = std::fs::read_to_string(dir.path().join(&holder).join("credential")).unwrap();
    let mut as_revoked = agent_client(&coord.url, credential.trim()).await;
    let e = as_revoked
        .register(fake_registration(&holder, &gone.agent_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked"), "{e:?}");
}

/// Waits for a file to hold something (a process writes it once it is up).
fn wait_for(path: &std::path::Path, child: &mut std::process::Child) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.trim().is_empty()
        {
            return s.trim().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_reaches_any_log_even_at_debug_level() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let debug = "debug,h2=trace,tonic=trace,hyper=trace,sqlx=debug";
    let init = std::process::Command::new(built_bin("fleetbench-coordinator"))
        .args(["init", "--data-dir"])
        .arg(d)
        .arg("--database")
        .arg(format!("sqlite://{}", d.join("fleet.db").display()))
        .env("RUST_LOG", debug)
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let init_out = String::from_utf8_lossy(&init.stdout).to_string();
    let admin = std::fs::read_to_string(d.join("admin.token")).unwrap();
    let join = std::fs::read_to_string(d.join("join.token")).unwrap();
    assert!(
        init_out.contains(admin.trim()),
        "init prints the admin token"
    );
    let mut coordinator = std::process::Command::new(built_bin("fleetbench-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(d)
        .arg("--database")
        .arg(format!("sqlite://{}", d.join("fleet.db").display()))
        .arg("--addr-file")
        .arg(d.join("addr"))
        .env("RUST_LOG", debug)
        .stderr(std::fs::File::create(d.join("coordinator.log")).unwrap())
        .spawn()
        .unwrap();
    let addr = wait_for(&d.join("addr"), &mut coordinator);
    let url = format!("https://{addr}");
    let ca = d.join("tls").join("ca.pem");
    let mut agent = std::process::Command::new(built_bin("fleetbench-agent"))
        .args(["--coordinator", &url, "--name", "logged"])
        .arg("--ca-cert")
        .arg(&ca)
        .arg("--state-dir")
        .arg(d.join("agent"))
        .arg("--ort-lib")
        .arg(ort_lib())
        .env("FLEETBENCH_JOIN_TOKEN", join.trim())
        .env("RUST_LOG", debug)
        .stderr(std::fs::File::create(d.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let credential = wait_for(&d.join("agent").join("credential"), &mut agent);
    let client = Client::connect_with(&url, Some(&ca), Some(admin.trim()))
        .await
        .unwrap();
    wait_online(&client, 1).await;
    // The CLI at debug level too: a push, a token made and listed.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(built_bin("fleetbench"))
            .args(["--coordinator", &url])
            .args(args)
            .env("FLEETBENCH_CA_CERT", &ca)
            .env("FLEETBENCH_TOKEN", admin.trim())
            .env("RUST_LOG", debug)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        out
    };
    let made = cli(&[
        "admin", "tokens", "create", "--role", "viewer", "--name", "v",
    ]);
    let viewer = String::from_utf8_lossy(&made.stdout).trim().to_string();
    assert!(viewer.starts_with("fbt1."), "{viewer}");
    let listed = cli(&["admin", "tokens", "list"]);
    let help = std::process::Command::new(built_bin("fleetbench"))
        .arg("--help")
        .env("FLEETBENCH_TOKEN", admin.trim())
        .output()
        .unwrap();
    let mut seen = vec![
        (
            "fleetbench admin tokens list",
            String::from_utf8_lossy(&listed.stdout).to_string()
                + &String::from_utf8_lossy(&listed.stderr),
        ),
        (
            "fleetbench --help",
            String::from_utf8_lossy(&help.stdout).to_string(),
        ),
        (
            "fleetbench admin tokens create (stderr)",
            String::from_utf8_lossy(&made.stderr).to_string(),
        ),
    ];
    let _ = agent.kill();
    let _ = agent.wait();
    unsafe { libc::kill(coordinator.id() as i32, libc::SIGTERM) };
    let _ = coordinator.wait();
    for f in ["coordinator.log", "agent.log"] {
        seen.push((f, std::fs::read_to_string(d.join(f)).unwrap()));
    }
    let logged: usize = seen.iter().map(|(_, t)| t.len()).sum();
    assert!(logged > 10_000, "debug logs were written: {logged} bytes");
    for (name, secret) in [
        ("admin", admin.trim()),
        ("join", join.trim()),
        ("credential", credential.as_str()),
        ("viewer", viewer.as_str()),
    ] {
        // The secret part: what follows the token's last '.'.
        let part = secret.rsplit('.').next().unwrap();
        assert_eq!(part.len(), 64, "{name}");
        for (what, text) in &seen {
            assert!(!text.contains(part), "the {name} secret appears in {what}");
        }
    }
    for f in [
        "admin.token",
        "join.token",
        "agent/credential",
        "tls/ca.key",
        "tls/server.key",
    ] {
        let mode = std::fs::metadata(d.join(f)).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "{f}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_revoked_through_another_replica_loses_its_session_there_too() {
    let dir = tempfile::tempdir().unwrap();
    let db = PgDb::create().await;
    let listen = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let a = TestCoordinator::serve(test_config(&db.url), listen().await.unwrap()).await;
    let b = TestCoordinator::serve(test_config(&db.url), listen().await.unwrap()).await;
    // The agent knows replica A only.
    let _agent = TestAgent::start(a.agent("only-a", &[], dir.path()));
    let via_b = b.client().await;
    wait_online(&via_b, 1).await;
    via_b
        .admin()
        .revoke_agent(RevokeAgentRequest {
            agent: "only-a".into(),
        })
        .await
        .unwrap();
    // A closes the session on its next check of the credential; the agent, refused, stays out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let agents = list_agents(&via_b).await;
        if agents.iter().all(|x| !x.online) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica A kept the revoked agent's session: {agents:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_per_token_refuse_clearly_and_count_each_token_apart() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |c| {
        c.max_requests_per_second_per_token = 2;
    })
    .await;
    let admin = coord.client().await;
    let ci = as_token(&coord, Some(&create(&admin, "ci", "submitter", 0).await)).await;
    let other = as_token(&coord, Some(&create(&admin, "other", "submitter", 0).await)).await;
    // A burst of twice the rate passes the limit (the submits fail for what they are), then the
    // limit answers, naming itself.
    let submit = |c: Client| async move {
        c.jobs()
            .submit_job(SubmitJobRequest { spec: None })
            .await
            .unwrap_err()
    };
    let mut codes = Vec::new();
    // (20 requests at 2 a second after a burst of 4 would take over 8 s; a loaded machine is not
    // that slow.)
    for _ in 0..20 {
        codes.push(submit(ci.clone()).await);
    }
    let limited: Vec<_> = codes
        .iter()
        .filter(|s| s.code() == Code::ResourceExhausted)
        .collect();
    assert!(!limited.is_empty(), "{codes:?}");
    assert!(
        limited[0].message().contains("'ci'")
            && limited[0]
                .message()
                .contains("max_requests_per_second_per_token"),
        "{:?}",
        limited[0]
    );
    assert_eq!(codes[0].code(), Code::InvalidArgument, "{codes:?}");
    // Another token has its own allowance.
    assert_eq!(submit(other.clone()).await.code(), Code::InvalidArgument);

    // One upload at a time per token (on a coordinator without a request rate limit, so that the
    // polling below counts against nothing): a second stream is refused while the first is open.
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |c| c.max_uploads_per_token = 1).await;
    let other = as_token(
        &coord,
        Some(&create(&coord.client().await, "other", "submitter", 0).await),
    )
    .await;
    // A stream that stays open until its sender is dropped.
    let hold = || {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.try_send(fleetbench_proto::v1::BlobChunk {
            data: vec![1; 1024],
            expected_sha256: String::new(),
        })
        .unwrap();
        let mut models = other.models();
        let open = tokio::spawn(async move {
            models
                .upload_blob(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        (tx, open)
    };
    let (mut tx, mut open) = hold();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let refused = loop {
        assert!(tokio::time::Instant::now() < deadline, "never refused");
        // The held stream itself may have been refused while a probe below held the slot: hold
        // again.
        if open.is_finished() {
            (tx, open) = hold();
        }
        let one = futures::stream::iter(vec![fleetbench_proto::v1::BlobChunk {
            data: vec![2; 16],
            expected_sha256: String::new(),
        }]);
        match other.models().upload_blob(one).await {
            Err(e) if e.message().contains("max_uploads_per_token") => break e,
            // The held stream has not reached the coordinator yet.
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert!(
        refused.message().contains("max_uploads_per_token"),
        "{refused:?}"
    );
    // The first upload finishes; the slot is free again.
    drop(tx);
    open.await.unwrap().unwrap();
    let one = futures::stream::iter(vec![fleetbench_proto::v1::BlobChunk {
        data: vec![3; 16],
        expected_sha256: String::new(),
    }]);
    other.models().upload_blob(one).await.unwrap();
}

#[test]
fn an_agent_whose_join_token_pins_another_ca_refuses_to_start_and_says_why() {
    use fleetbench_coordinator::tls;
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
    let ours = tls::init(&tls::TlsFiles::under(&ours), &[]).unwrap();
    let theirs = tls::init(&tls::TlsFiles::under(&theirs), &[]).unwrap();
    let token = |ca: &str| {
        fleetbench_common::token::JoinToken {
            ca_sha256: ca.to_string(),
            token: fleetbench_common::token::Token::mint(),
        }
        .to_secret_string()
        .expose()
        .to_string()
    };
    let run = |join: &str| {
        std::process::Command::new(built_bin("fleetbench-agent"))
            .args(["--coordinator", "https://127.0.0.1:9", "--name", "pinned"])
            .arg("--ca-cert")
            .arg(ours.files.ca_cert())
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("FLEETBENCH_JOIN_TOKEN", join)
            .output()
            .unwrap()
    };
    let out = run(&token(&theirs.ca_fingerprint));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("pins the CA certificate") && stderr.contains(&theirs.ca_fingerprint),
        "{stderr}"
    );
    // The right pin passes the check (the agent then fails to reach the closed port, later).
    let mut config = fleetbench_agent::AgentConfig {
        coordinator: vec!["https://127.0.0.1:9".into()],
        ca_cert: ours.files.ca_cert(),
        join_token: fleetbench_common::token::Secret::new(token(&ours.ca_fingerprint)),
        ..Default::default()
    };
    config.validate().unwrap();
    config.join_token = fleetbench_common::token::Secret::new("fbjoin1:zz:nope");
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("join_token"), "{e}");
}

/// Reads a whole blob, or says why not.
async fn read_blob(c: &Client, sha256: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = c
        .models()
        .download_blob(DownloadBlobRequest {
            sha256: sha256.to_string(),
            offset: 0,
        })
        .await?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await? {
        data.extend(chunk.data);
    }
    Ok(data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_downloads_the_artifacts_of_its_own_task_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |c| c.lease_timeout_ms = 60_000).await;
    let client = coord.client().await;
    push_digits(&client).await;
    let mut busy =
        FakeAgent::connect(&coord.url, &coord.tokens.join, "busy", &[("pool", "a")]).await;
    let idle = FakeAgent::connect(&coord.url, &coord.tokens.join, "idle", &[("pool", "b")]).await;
    jobs::submit(
        &client,
        &JobArgs {
            model: Some("digits".into()),
            variants: vec!["fp32".into()],
            selector: vec!["pool=a".into()],
            iterations: Some(10),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let task = busy.assignment().await;
    let _lease = busy.keep_lease(&task.run_id);
    let fp32 = task.variant.clone().unwrap();
    let variants = list_variants(&client, "digits").await;
    let int8 = variants.iter().find(|v| v.variant == "int8").unwrap();
    assert_ne!(int8.artifact_sha256, fp32.artifact_sha256);

    let as_busy = Client::connect(&coord.url, Some(&busy.credential))
        .await
        .unwrap();
    let as_idle = Client::connect(&coord.url, Some(&idle.credential))
        .await
        .unwrap();
    // Its own task: the artifact set, each of its files and the eval set.
    let set = as_busy
        .models()
        .get_artifact_set(GetArtifactSetRequest {
            sha256: fp32.artifact_sha256.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!set.files.is_empty());
    for f in &set.files {
        let data = read_blob(&as_busy, &f.sha256).await.unwrap();
        assert_eq!(data.len() as u64, f.size_bytes, "{}", f.path);
    }
    for eval in [&fp32.eval_inputs_sha256, &fp32.eval_labels_sha256] {
        assert!(!eval.is_empty());
        read_blob(&as_busy, eval).await.unwrap();
    }
    // Another variant's artifact: refused, naming why.
    let e = as_busy
        .models()
        .get_artifact_set(GetArtifactSetRequest {
            sha256: int8.artifact_sha256.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("task it runs"), "{e:?}");
    let e = read_blob(&as_busy, &int8.artifact_sha256)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // An agent with no task reads nothing, not even what its peer may.
    for sha in [
        &fp32.artifact_sha256,
        &set.files[0].sha256,
        &fp32.eval_inputs_sha256,
    ] {
        let e = read_blob(&as_idle, sha).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    // People's tokens still read everything.
    read_blob(&client, &int8.artifact_sha256).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_renews_its_credential_before_it_expires_without_a_new_join_even_mid_run() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |c| {
        c.lease_timeout_ms = 60_000;
        c.agent_credential_ttl_ms = 10_000;
    })
    .await;
    let client = coord.client().await;
    let config = coord.agent("renewing", &[], dir.path());
    let file = config.state_dir.join("credential");
    let _agent = TestAgent::start(config);
    wait_online(&client, 1).await;
    let joined = list_agents(&client).await.remove(0);
    push_digits(&client).await;
    // A run longer than the credential's validity.
    let id = jobs::submit(
        &client,
        &JobArgs {
            model: Some("digits".into()),
            variants: vec!["fp32".into()],
            duration_s: Some(12.0),
            min_duration_s: Some(12.0),
            warmup: Some(5),
            skip_accuracy: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // Three credentials in turn: when the third is offered, the agent had used the second, so the
    // first is gone for good.
    let read = || std::fs::read_to_string(&file).unwrap_or_default();
    let mut seen = vec![read()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while seen.len() < 3 {
        let now = read();
        if !now.is_empty() && !seen.contains(&now) {
            seen.push(now);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "renewed {} times",
            seen.len() - 1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut with_first = agent_client(&coord.url, seen[0].trim()).await;
    let e = with_first
        .register(fake_registration("renewing", &joined.agent_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // The run went through the renewals; the agent is the same one, never re-joined.
    let s = wait_job(&client, &id, Duration::from_secs(60)).await;
    assert_eq!(s.state, "succeeded", "{s:?}");
    let agents = list_agents(&client).await;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].agent_id, joined.agent_id);
    let run = job_detail(&client, &id).await.tasks[0].run.clone().unwrap();
    assert_eq!(run.agent, "renewing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_credential_is_refused_closes_its_session_and_frees_the_name_for_a_new_join() {
    let dir = tempfile::tempdir().unwrap();
    let coord =
        TestCoordinator::sqlite(dir.path(), |c| c.agent_credential_ttl_ms = 3_600_000).await;
    let mut agent = FakeAgent::connect(&coord.url, &coord.tokens.join, "shelved", &[]).await;
    // Its credential runs out (as if the agent had been away past its validity).
    let pool = sqlx::AnyPool::connect(&coord.database).await.unwrap();
    sqlx::query("UPDATE tokens SET expires_at = 1 WHERE agent_id = $1")
        .bind(&agent.id)
        .execute(&pool)
        .await
        .unwrap();
    // The open session closes (within its credential check), and the credential opens nothing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, agent.inbound.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(_) => break,
            Err(_) => panic!("the session stayed open"),
        }
    }
    let mut expired = agent_client(&coord.url, &agent.credential).await;
    let e = expired
        .register(fake_registration("shelved", &agent.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("expired"), "{e:?}");
    // The join token takes the name back (before the fix: ALREADY_EXISTS until an admin revoked it).
    let mut joining = agent_client(&coord.url, &coord.tokens.join).await;
    let again = joining
        .register(fake_registration("shelved", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.agent_credential.is_empty());
}
