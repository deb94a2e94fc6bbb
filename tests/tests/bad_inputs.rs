//! Bad input, table-driven: across the CLI's job flags, job files, model pushes, input data and raw
//! gRPC messages (missing fields, oversized values, unknown enums, malformed telemetry, a window for
//! another agent's run). Each must be answered with an error that names what is wrong; afterwards the
//! store holds what it held before, and a good job runs.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use fleetbench_cli::client::Client;
use fleetbench_cli::commands::{jobs, models};
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_proto::v1::agent_message::Body as Out;
use fleetbench_proto::v1::coordinator_message::Body as In;
use fleetbench_proto::v1::*;
use fleetbench_tests::*;

type Answer = Pin<Box<dyn Future<Output = String> + Send>>;

fn digits() -> JobArgs {
    JobArgs {
        model: Some("digits".into()),
        variants: vec!["fp32".into()],
        iterations: Some(50),
        skip_accuracy: true,
        ..Default::default()
    }
}

/// The error of a job submitted with `args`, or "accepted".
fn submit(client: &Client, args: JobArgs) -> Answer {
    let client = client.clone();
    Box::pin(async move {
        match jobs::submit(&client, &args).await {
            Ok(id) => format!("accepted job {id}"),
            Err(e) => format!("{e:#}"),
        }
    })
}

fn status<T>(r: Result<tonic::Response<T>, tonic::Status>) -> String {
    match r {
        Ok(_) => "accepted".into(),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    }
}

fn raw_spec(config: RunConfig) -> SubmitJobRequest {
    SubmitJobRequest {
        spec: Some(JobSpec {
            model: "digits".into(),
            config: Some(config),
            ..Default::default()
        }),
    }
}

fn raw_submit(client: &Client, req: SubmitJobRequest) -> Answer {
    let client = client.clone();
    Box::pin(async move { status(client.jobs().submit_job(req).await) })
}

fn push(client: &Client, file: std::path::PathBuf, name: &'static str) -> Answer {
    let client = client.clone();
    Box::pin(async move {
        match models::push(&client, &file, name, None, None, None, None).await {
            Ok(v) => format!("accepted {}/{}", v.model, v.variant),
            Err(e) => format!("{e:#}"),
        }
    })
}

fn job_file(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    match JobArgs::from_file(&path).and_then(|a| a.to_spec(256)) {
        Ok(_) => "accepted".into(),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_and_more_bad_inputs_are_answered_clearly_and_change_nothing() {
    let fleet = SoloFleet::start().await;
    let client = fleet.client.clone();
    let dir = fleet.dir.path().to_path_buf();
    push_digits(&client).await;
    let models_before = list_variants(&client, "").await;
    let jobs_before = client
        .jobs()
        .list_jobs(ListJobsRequest { limit: 0 })
        .await
        .unwrap()
        .into_inner()
        .jobs;

    let garbage = dir.join("garbage.onnx");
    std::fs::write(&garbage, b"this is not a model").unwrap();
    let not_npz = dir.join("inputs.npz");
    std::fs::write(&not_npz, b"PK\x03\x04 but not really a zip").unwrap();
    let agent_url = fleet.coord.url.clone();
    let join = fleet.coord.tokens.join.clone();
    let mut agents = agent_client(&agent_url, &join).await;
    let mut fake = FakeAgent::connect(&agent_url, &join, "fake-bad", &[("who", "fake")]).await;

    let mut answers: Vec<(&str, &str, String)> = Vec::new();
    let mut ask = |what: &'static str, needle: &'static str, answer: String| {
        answers.push((what, needle, answer));
    };

    // The CLI's job flags.
    for (what, needle, args) in [
        (
            "negative iterations",
            "iterations",
            JobArgs {
                iterations: Some(-5),
                ..digits()
            },
        ),
        (
            "unknown scenario",
            "scenario",
            JobArgs {
                scenario: Some("burst".into()),
                ..digits()
            },
        ),
        (
            "batch size 0",
            "batch_size",
            JobArgs {
                batch_size: vec![0],
                ..digits()
            },
        ),
        (
            "shape without dims",
            "shape",
            JobArgs {
                shape: vec!["x".into()],
                ..digits()
            },
        ),
        (
            "unknown provider",
            "execution_provider",
            JobArgs {
                ep: vec!["tpu".into()],
                ..digits()
            },
        ),
        (
            "malformed selector",
            "selector",
            JobArgs {
                selector: vec!["tier".into()],
                ..digits()
            },
        ),
        (
            "server without QPS",
            "target_qps",
            JobArgs {
                scenario: Some("server".into()),
                target_qps: Some(0.0),
                ..digits()
            },
        ),
        (
            "min over max duration",
            "min_duration_s",
            JobArgs {
                iterations: None,
                min_duration_s: Some(5.0),
                max_duration_s: Some(1.0),
                ..digits()
            },
        ),
        (
            "minimum above the count",
            "min_queries",
            JobArgs {
                min_queries: Some(500),
                ..digits()
            },
        ),
        (
            "concurrency 100000",
            "max_concurrency",
            JobArgs {
                scenario: Some("offline".into()),
                concurrency: vec![100_000],
                ..digits()
            },
        ),
        (
            "iterations 10^15",
            "max_iterations",
            JobArgs {
                iterations: Some(1_000_000_000_000_000),
                ..digits()
            },
        ),
        (
            "huge input shape",
            "max_input_elements",
            JobArgs {
                shape: vec!["input=10000000x64".into()],
                ..digits()
            },
        ),
        (
            "unknown model",
            "unknown model 'nope'",
            JobArgs {
                model: Some("nope".into()),
                ..digits()
            },
        ),
        (
            "unknown variant",
            "no variant 'int4'",
            JobArgs {
                variants: vec!["int4".into()],
                ..digits()
            },
        ),
        (
            "selector matching nobody",
            "matches no online agent",
            JobArgs {
                selector: vec!["tier=moon".into()],
                ..digits()
            },
        ),
        (
            "input data that is not .npz",
            "input_data",
            JobArgs {
                input_data: Some(not_npz.clone()),
                ..digits()
            },
        ),
        (
            "shape of a missing input",
            "has no input 'pixels'",
            JobArgs {
                shape: vec!["pixels=1x3".into()],
                ..digits()
            },
        ),
    ] {
        ask(what, needle, submit(&client, args).await);
    }
    // Job files.
    ask(
        "job file with an unknown key",
        "modle",
        job_file(&dir, "a.toml", "modle = \"digits\"\n"),
    );
    ask(
        "job file with a wrong type",
        "iterations",
        job_file(
            &dir,
            "b.toml",
            "model = \"digits\"\niterations = \"many\"\n",
        ),
    );
    ask(
        "job file that is not TOML",
        "job file",
        job_file(&dir, "c.toml", "model = \n[[[\n"),
    );
    // Model pushes.
    ask(
        "a push of a file that is not ONNX",
        "not an ONNX model",
        push(&client, garbage.clone(), "junk").await,
    );
    ask(
        "a push of a missing file",
        "cannot read",
        push(&client, dir.join("missing.onnx"), "junk").await,
    );
    ask(
        "a model name with spaces",
        "model name",
        push(&client, models("digits/digits-fp32.onnx"), "two words").await,
    );
    // Raw gRPC: missing fields, unknown enums, bad ids and hashes.
    ask(
        "a job without a spec",
        "spec: missing",
        raw_submit(&client, SubmitJobRequest { spec: None }).await,
    );
    ask(
        "a spec without a config",
        "config: missing",
        raw_submit(
            &client,
            SubmitJobRequest {
                spec: Some(JobSpec {
                    model: "digits".into(),
                    ..Default::default()
                }),
            },
        )
        .await,
    );
    ask(
        "an unknown scenario value",
        "scenario",
        raw_submit(
            &client,
            raw_spec(RunConfig {
                iterations: 10,
                scenario: 99,
                ..Default::default()
            }),
        )
        .await,
    );
    ask(
        "an unknown optimization level",
        "graph_optimization",
        raw_submit(
            &client,
            raw_spec(RunConfig {
                iterations: 10,
                graph_optimization: 42,
                ..Default::default()
            }),
        )
        .await,
    );
    ask(
        "input data never uploaded",
        "input_data_sha256",
        raw_submit(
            &client,
            raw_spec(RunConfig {
                iterations: 10,
                input_data_sha256: "ab".repeat(32),
                ..Default::default()
            }),
        )
        .await,
    );
    ask(
        "a registration without inventory",
        "inventory: missing",
        status(
            agents
                .register(RegisterRequest {
                    name: "x".into(),
                    protocol_version: fleetbench_common::protocol::PROTOCOL_VERSION,
                    ..Default::default()
                })
                .await,
        ),
    );
    ask(
        "a registration without CPUs",
        "inventory.cpu_set",
        status(
            agents
                .register(RegisterRequest {
                    name: "x".into(),
                    inventory: Some(Inventory::default()),
                    protocol_version: fleetbench_common::protocol::PROTOCOL_VERSION,
                    ..Default::default()
                })
                .await,
        ),
    );
    ask(
        "a variant with a malformed hash",
        "artifact_sha256",
        status(
            client
                .models()
                .register_variant(RegisterVariantRequest {
                    model: "digits".into(),
                    artifact_sha256: "xyz".into(),
                    ..Default::default()
                })
                .await,
        ),
    );
    ask(
        "a variant of an artifact never uploaded",
        "was not uploaded",
        status(
            client
                .models()
                .register_variant(RegisterVariantRequest {
                    model: "digits".into(),
                    artifact_sha256: "cd".repeat(32),
                    ..Default::default()
                })
                .await,
        ),
    );
    ask(
        "a job id that is not hex",
        "not a job id",
        status(
            client
                .jobs()
                .get_job(GetJobRequest {
                    job_id: "zzz".into(),
                })
                .await,
        ),
    );
    ask("an unknown blob", "no blob", {
        let mut s = client
            .models()
            .download_blob(DownloadBlobRequest {
                sha256: "ef".repeat(32),
                offset: 0,
            })
            .await;
        match &mut s {
            Ok(stream) => match stream.get_mut().message().await {
                Err(e) => format!("{e}"),
                Ok(_) => "accepted".into(),
            },
            Err(e) => format!("{e}"),
        }
    });
    ask(
        "an unknown objective",
        "objective",
        status(
            client
                .rankings()
                .rank(RankRequest {
                    model: "digits".into(),
                    objective: "vibes".into(),
                    ..Default::default()
                })
                .await,
        ),
    );
    ask(
        "an upload corrupted in transit",
        "corrupted in transit",
        status(
            client
                .models()
                .upload_blob(futures::stream::iter(vec![BlobChunk {
                    data: b"some bytes".to_vec(),
                    expected_sha256: "00".repeat(32),
                }]))
                .await,
        ),
    );
    // Telemetry a real agent would never send: a malformed window, and one for another agent's run.
    let id = jobs::submit(
        &client,
        &JobArgs {
            selector: vec!["who=fake".into()],
            ..digits()
        },
    )
    .await
    .unwrap();
    let task = fake.assignment().await;
    assert_eq!(task.job_id, id, "no bad job reached the fake agent");
    let _lease = fake.keep_lease(&task.run_id);
    let mut bad = fake_window(&task.run_id, 0, 3);
    bad.latency_histogram = vec![1, 2, 3];
    fake.send(Out::Window(bad)).await;
    let mut other = FakeAgent::connect(&agent_url, &join, "fake-other", &[("who", "other")]).await;
    other
        .send(Out::Window(fake_window(&task.run_id, 1, 3)))
        .await;
    async fn ack(agent: &mut FakeAgent) -> String {
        loop {
            match agent.next(Duration::from_secs(10)).await {
                Some(In::WindowAck(a)) if a.discarded => return "refused: window discarded".into(),
                Some(In::WindowAck(a)) => return format!("accepted: {a:?}"),
                Some(_) => continue,
                None => return "accepted: no answer".into(),
            }
        }
    }
    ask(
        "a window with a malformed histogram",
        "discarded",
        ack(&mut fake).await,
    );
    ask(
        "a window for another agent's run",
        "discarded",
        ack(&mut other).await,
    );
    fake.send(Out::Result(RunResult {
        run_id: task.run_id.clone(),
        error: "gave up".into(),
        ..Default::default()
    }))
    .await;
    wait_job(&client, &id, Duration::from_secs(30)).await;

    let mut clear = 0;
    for (what, needle, answer) in &answers {
        let ok = !answer.starts_with("accepted") && answer.contains(needle);
        if ok {
            clear += 1;
        } else {
            println!("NOT CLEAR: {what}: expected an error naming '{needle}', got: {answer}");
        }
    }
    println!(
        "bad inputs answered clearly: {clear} of {} tried",
        answers.len()
    );
    assert!(answers.len() >= 30);
    assert_eq!(clear, answers.len(), "every bad input gets a clear error");

    // Nothing stored was changed; a good job runs.
    assert_eq!(list_variants(&client, "").await, models_before);
    let jobs_after = client
        .jobs()
        .list_jobs(ListJobsRequest { limit: 0 })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(
        jobs_after.len(),
        jobs_before.len() + 1,
        "only the fake agent's job was added"
    );
    // The fake agents leave; the good job runs on the real one.
    drop(_lease);
    drop(fake);
    drop(other);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let online = client
            .fleet()
            .list_agents(ListAgentsRequest {})
            .await
            .unwrap()
            .into_inner()
            .agents
            .into_iter()
            .filter(|a| a.online)
            .count();
        if online == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fake agents stay online"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let good = jobs::submit(&client, &digits()).await.unwrap();
    assert_eq!(
        wait_job(&client, &good, Duration::from_secs(60))
            .await
            .state,
        "succeeded"
    );
}
