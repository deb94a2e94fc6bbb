//! Measurement through the whole system: every scenario runs on the digits model through a real
//! coordinator and agent, and reports the figures the method promises; bad scenario settings are
//! refused at submit with the field named.

use std::time::Duration;

use fleetbench_cli::commands::jobs::{self, RunJson};
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_proto::v1::{
    JobSpec, RankRequest, RunConfig, RunSummary, Scenario, SubmitJobRequest, Sweep,
};
use fleetbench_tests::*;

async fn run_one(client: &fleetbench_cli::client::Client, args: JobArgs) -> RunSummary {
    let id = jobs::submit(client, &args).await.unwrap();
    let s = wait_job(client, &id, Duration::from_secs(120)).await;
    let detail = job_detail(client, &id).await;
    assert_eq!(s.state, "succeeded", "{detail:?}");
    assert_eq!(detail.tasks.len(), 1);
    detail.tasks[0].run.clone().unwrap()
}

fn digits(scenario: &str) -> JobArgs {
    JobArgs {
        model: Some("digits".into()),
        variants: vec!["fp32".into()],
        scenario: Some(scenario.into()),
        warmup: Some(50),
        window_ms: Some(200),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_scenario_reports_its_figures_through_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let _agent =
        TestAgent::start(coord.agent("solo", &["tier=edge", "cost_per_hour=0.1"], dir.path()));
    wait_online(&client, 1).await;
    push_digits(&client).await;

    // Single-stream with early stopping: stops once VALID and stable, well before its planned 30 s.
    let mut a = digits("single-stream");
    a.duration_s = Some(30.0);
    a.min_duration_s = Some(1.0);
    a.min_queries = Some(500);
    a.early_stop = true;
    let run = run_one(&client, a).await;
    assert!(run.valid, "{}", run.invalid_reason);
    assert!(run.stable);
    assert!(
        run.duration_ms >= 1000.0 && run.duration_ms < 30_000.0,
        "{}",
        run.duration_ms
    );
    let l = run.latency.unwrap();
    assert!(
        l.p50_ci_low_ms <= l.p50_ms && l.p50_ms <= l.p50_ci_high_ms,
        "{l:?}"
    );
    assert!(
        l.p99_ci_low_ms <= l.p99_ms && l.p99_ms <= l.p99_ci_high_ms,
        "{l:?}"
    );
    assert!(
        l.p50_ms <= l.p90_ms
            && l.p90_ms <= l.p95_ms
            && l.p95_ms <= l.p97_ms
            && l.p97_ms <= l.p99_ms
            && l.p99_ms <= l.p999_ms
    );
    assert!(run.session_create_ms > 0.0 && run.first_inference_ms > 0.0);
    // Resource samples are present and plausible for a real run.
    let res = run.resources.clone().unwrap();
    assert!(res.cpu_user_pct > 5.0, "{res:?}");
    assert!(
        res.rss_peak_bytes > 10 << 20 && res.rss_mean_bytes > 0,
        "{res:?}"
    );
    assert!(res.system_memory_used_bytes > res.rss_mean_bytes, "{res:?}");
    // The reproducibility record.
    let json = RunJson::from(&run);
    let rec = &json.record;
    assert_eq!(rec["ort_version"], "1.31.1", "{rec}");
    assert_eq!(rec["execution_provider"], "cpu");
    let used = rec["providers_used"].as_object().unwrap();
    assert_eq!(
        used.keys().collect::<Vec<_>>(),
        vec!["CPUExecutionProvider"],
        "every node ran on the CPU: {rec}"
    );
    assert!(used["CPUExecutionProvider"].as_u64().unwrap() >= 3, "{rec}");
    assert_eq!(rec["fell_back_to_other_providers"], false);
    assert_eq!(rec["seed"], 42);
    assert!(rec["model_sha256"].as_str().unwrap().len() == 64);
    assert!(rec["session_options"]["intra_op_threads"].as_u64().unwrap() >= 1);
    assert!(rec["started_at_ms"].as_i64().unwrap() <= rec["ended_at_ms"].as_i64().unwrap());

    // Offline: two streams at batch 8; samples count the batch.
    let mut a = digits("offline");
    a.iterations = Some(1000);
    a.batch_size = vec![8];
    a.concurrency = vec![2];
    let run = run_one(&client, a).await;
    assert_eq!(run.queries, 1000);
    assert_eq!(run.samples, 8000);
    let details: serde_json::Value = serde_json::from_str(&run.scenario_json).unwrap();
    assert_eq!(details["concurrency"], 2);
    assert!(
        (run.throughput_per_s - 8000.0 / (run.duration_ms / 1e3)).abs()
            < 1e-6 * run.throughput_per_s
    );

    // Server: Poisson arrivals well under capacity; passes its bound, drops nothing.
    let mut a = digits("server");
    a.target_qps = Some(400.0);
    a.iterations = Some(800);
    a.latency_bound_ms = Some(50.0);
    let run = run_one(&client, a).await;
    let d: serde_json::Value = serde_json::from_str(&run.scenario_json).unwrap();
    assert_eq!(d["passed"], true, "{d}");
    assert_eq!(run.dropped_queries, 0);
    let (achieved, scheduled) = (
        d["achieved_qps"].as_f64().unwrap(),
        d["scheduled_qps"].as_f64().unwrap(),
    );
    assert!((achieved - scheduled).abs() / scheduled < 0.1, "{d}");
    assert!(run.valid, "{}", run.invalid_reason);

    // Max-QPS: a bisection over server runs, reported with its bound.
    let mut a = digits("max-qps");
    a.latency_bound_ms = Some(5.0);
    a.duration_s = Some(0.3);
    let run = run_one(&client, a).await;
    let d: serde_json::Value = serde_json::from_str(&run.scenario_json).unwrap();
    assert!(d["max_qps"].as_f64().unwrap() > 100.0, "{d}");
    assert_eq!(d["latency_bound_ms"], 5.0);
    assert!(d["search"].as_array().unwrap().len() >= 3, "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sweeps_expand_and_rank_keeps_the_best_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let _agent = TestAgent::start(coord.agent("solo", &["tier=edge"], dir.path()));
    wait_online(&client, 1).await;
    push_digits(&client).await;
    let mut a = digits("single-stream");
    a.variants = vec!["all".into()];
    // Long enough that the throughput of each configuration is measured, not its start-up noise.
    a.iterations = Some(3000);
    a.batch_size = vec![1, 4];
    a.threads = vec![1, 2];
    let id = jobs::submit(&client, &a).await.unwrap();
    assert_eq!(
        wait_job(&client, &id, Duration::from_secs(120)).await.state,
        "succeeded"
    );
    let detail = job_detail(&client, &id).await;
    assert_eq!(
        detail.tasks.len(),
        8,
        "2 variants x 2 batch sizes x 2 thread counts"
    );
    let mut configs: Vec<(u32, u32)> = detail
        .tasks
        .iter()
        .map(|t| {
            let c = t.run.as_ref().unwrap().config.clone().unwrap();
            (c.batch_size, c.intra_op_threads)
        })
        .collect();
    configs.sort();
    configs.dedup();
    assert_eq!(
        configs,
        vec![(1, 1), (1, 2), (4, 1), (4, 2)],
        "every result keeps its configuration"
    );
    let rank = |best: bool| {
        let client = client.clone();
        let id = id.clone();
        async move {
            client
                .rankings()
                .rank(RankRequest {
                    model: "digits".into(),
                    objective: "throughput".into(),
                    best_config_only: best,
                    job_id: id,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .rows
        }
    };
    assert_eq!(rank(false).await.len(), 8);
    let best = rank(true).await;
    assert_eq!(best.len(), 2, "one row per (platform, variant)");
    for row in &best {
        assert!(
            row.config.contains("b4"),
            "batching wins on throughput: {}",
            row.config
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_scenario_settings_are_refused_at_submit() {
    let fleet = SoloFleet::start().await;
    let client = fleet.client.clone();
    push_digits(&client).await;
    let submit = |config: RunConfig, sweep: Option<Sweep>| {
        let client = client.clone();
        async move {
            let spec = JobSpec {
                model: "digits".into(),
                config: Some(config),
                sweep,
                ..Default::default()
            };
            client
                .jobs()
                .submit_job(SubmitJobRequest { spec: Some(spec) })
                .await
                .unwrap_err()
        }
    };
    let base = RunConfig {
        iterations: 10,
        ..Default::default()
    };
    let cases = [
        (
            RunConfig {
                scenario: 99,
                ..base.clone()
            },
            "scenario",
        ),
        (
            RunConfig {
                scenario: Scenario::Server as i32,
                ..base.clone()
            },
            "target_qps",
        ),
        (
            RunConfig {
                scenario: Scenario::Server as i32,
                target_qps: -5.0,
                ..base.clone()
            },
            "target_qps",
        ),
        (
            RunConfig {
                scenario: Scenario::MaxQps as i32,
                ..base.clone()
            },
            "latency_bound_ms",
        ),
        (
            RunConfig {
                scenario: Scenario::MaxQps as i32,
                latency_bound_ms: -1.0,
                ..base.clone()
            },
            "latency_bound_ms",
        ),
    ];
    for (config, field) in cases {
        let status = submit(config, None).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{field}: {status:?}");
    }
    let huge = Sweep {
        batch_sizes: (1..=20).collect(),
        intra_op_threads: (0..14).collect(),
        ..Default::default()
    };
    let status = submit(base.clone(), Some(huge)).await;
    assert!(
        status.message().starts_with("sweep") && status.message().contains("280"),
        "{status:?}"
    );
    // The CLI names them too, before it sends anything.
    let mut a = digits("burst");
    a.iterations = Some(10);
    assert!(
        jobs::submit(&client, &a)
            .await
            .unwrap_err()
            .to_string()
            .starts_with("scenario")
    );
    let mut a = digits("server");
    a.iterations = Some(10);
    a.target_qps = Some(0.0);
    assert!(
        jobs::submit(&client, &a)
            .await
            .unwrap_err()
            .to_string()
            .starts_with("target_qps")
    );
    let mut a = digits("max-qps");
    a.latency_bound_ms = Some(0.0);
    assert!(
        jobs::submit(&client, &a)
            .await
            .unwrap_err()
            .to_string()
            .starts_with("latency_bound_ms")
    );
}
