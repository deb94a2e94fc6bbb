//! Right answers through the whole system: rankings pool only runs that did the same work, the
//! minimums decide how long a run lasts, and a model with external data travels with it.

use std::time::Duration;

use fleetbench_cli::commands::{jobs, models, rank};
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_cli::output::Format;
use fleetbench_proto::v1::{RegisterVariantRequest, RunSummary};
use fleetbench_tests::*;

async fn run_one(client: &fleetbench_cli::client::Client, args: JobArgs) -> RunSummary {
    let id = jobs::submit(client, &args).await.unwrap();
    let s = wait_job(client, &id, Duration::from_secs(120)).await;
    let detail = job_detail(client, &id).await;
    assert_eq!(s.state, "succeeded", "{detail:?}");
    detail.tasks[0].run.clone().expect("a run summary")
}

fn rank_args(model: &str) -> rank::RankArgs {
    rank::RankArgs {
        include_invalid: true,
        output: Format::Json,
        ..rank::RankArgs::for_model(model)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_of_different_input_shapes_are_ranked_apart_and_labelled_by_their_shape() {
    let fleet = SoloFleet::start().await;
    let model = exported_style_model(fleet.dir.path(), false);
    models::push(&fleet.client, &model, "exported", None, None, None, None)
        .await
        .expect("push a model with symbolic height and width");
    for side in [16, 48] {
        run_one(
            &fleet.client,
            JobArgs {
                model: Some("exported".into()),
                iterations: Some(200),
                warmup: Some(10),
                shape: vec![format!("x=1x3x{side}x{side}")],
                skip_accuracy: true,
                ..Default::default()
            },
        )
        .await;
    }
    let rows = rank::fetch(&fleet.client, &rank_args("exported"))
        .await
        .unwrap()
        .rows;
    assert_eq!(
        rows.len(),
        2,
        "two shapes are two workloads, not one row of two runs: {rows:?}"
    );
    assert!(rows.iter().all(|r| r.runs == 1), "{rows:?}");
    let mut labels: Vec<&str> = rows.iter().map(|r| r.config.as_str()).collect();
    labels.sort();
    assert!(
        labels[0].ends_with("shape=x=1x3x16x16") && labels[1].ends_with("shape=x=1x3x48x48"),
        "each label says what differs: {labels:?}"
    );
    let small = rows.iter().find(|r| r.config.contains("16x16")).unwrap();
    let big = rows.iter().find(|r| r.config.contains("48x48")).unwrap();
    assert!(
        big.latency.unwrap().p50_ms > small.latency.unwrap().p50_ms,
        "nine times the pixels take longer: {small:?} {big:?}"
    );
    assert!(!small.legacy && !small.pool_key.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_minimums_decide_how_long_a_run_lasts() {
    let fleet = SoloFleet::start().await;
    push_digits(&fleet.client).await;
    // Server at 200 QPS: without the rule it ran the default 1,000 queries; the minimums make it last
    // at least 2 s and 500 queries.
    let server = run_one(
        &fleet.client,
        JobArgs {
            model: Some("digits".into()),
            variants: vec!["fp32".into()],
            scenario: Some("server".into()),
            target_qps: Some(200.0),
            min_duration_s: Some(2.0),
            min_queries: Some(500),
            window_ms: Some(250),
            skip_accuracy: true,
            ..Default::default()
        },
    )
    .await;
    assert!(
        server.duration_ms >= 2000.0 && server.queries >= 500,
        "{} ms, {} queries",
        server.duration_ms,
        server.queries
    );
    assert!(server.valid, "{}", server.invalid_reason);
    // Offline with a minimum duration alone: it ran 14 ms before.
    let offline = run_one(
        &fleet.client,
        JobArgs {
            model: Some("digits".into()),
            variants: vec!["fp32".into()],
            scenario: Some("offline".into()),
            concurrency: vec![1],
            min_duration_s: Some(1.0),
            window_ms: Some(250),
            skip_accuracy: true,
            ..Default::default()
        },
    )
    .await;
    assert!(offline.duration_ms >= 1000.0, "{}", offline.duration_ms);
    assert!(offline.valid, "{}", offline.invalid_reason);
    // A conflict visible at submit is refused naming both settings.
    let conflict = JobArgs {
        model: Some("digits".into()),
        iterations: Some(100),
        min_queries: Some(500),
        ..Default::default()
    };
    let e = jobs::submit(&fleet.client, &conflict)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("min_queries") && e.contains("iterations 100"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_with_external_data_is_pushed_with_its_data_and_runs() {
    let fleet = SoloFleet::start().await;
    let dir = fleet.dir.path().join("big");
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        "import onnx, sys\nm = onnx.load({:?})\nonnx.save(m, {:?}, save_as_external_data=True, all_tensors_to_one_file=True, location='big.data', size_threshold=0)\n",
        models("digits/digits-fp32.onnx").display().to_string(),
        dir.join("big.onnx").display().to_string()
    );
    let status = std::process::Command::new(python())
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(status.success());
    // A model whose data file is not beside it is refused, naming the file; nothing is stored.
    std::fs::rename(dir.join("big.data"), dir.join("elsewhere.data")).unwrap();
    let e = models::push(
        &fleet.client,
        &dir.join("big.onnx"),
        "big",
        None,
        None,
        None,
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("'big.data'") && e.contains("missing"),
        "the error names the external file: {e}"
    );
    assert!(list_variants(&fleet.client, "").await.is_empty());
    std::fs::rename(dir.join("elsewhere.data"), dir.join("big.data")).unwrap();
    // The coordinator refuses the model file alone, whoever uploads it.
    let blob = fleet.client.upload(&dir.join("big.onnx")).await.unwrap();
    let refused = fleet
        .client
        .models()
        .register_variant(RegisterVariantRequest {
            model: "big".into(),
            artifact_sha256: blob.sha256,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("'big.data'"), "{refused:?}");
    assert!(list_variants(&fleet.client, "").await.is_empty());
    // Pushed with the CLI, the model travels with its data and runs with the accuracy it has.
    let eval = (
        models("digits/eval-inputs.npy"),
        models("digits/eval-labels.npy"),
    );
    let v = models::push(
        &fleet.client,
        &dir.join("big.onnx"),
        "big",
        None,
        None,
        None,
        Some((eval.0.as_path(), eval.1.as_path())),
    )
    .await
    .unwrap();
    assert_eq!(v.file_count, 2, "{v:?}");
    let data = std::fs::metadata(dir.join("big.data")).unwrap().len();
    assert_eq!(
        v.size_bytes,
        data + std::fs::metadata(dir.join("big.onnx")).unwrap().len()
    );
    let run = run_one(
        &fleet.client,
        JobArgs {
            model: Some("big".into()),
            iterations: Some(200),
            ..Default::default()
        },
    )
    .await;
    let accuracy = run.accuracy.expect("an accuracy");
    assert!(
        (accuracy - python_accuracy("fp32")).abs() < 1e-9,
        "the external-data copy classifies as the original: {accuracy}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recommend_passes_over_a_faster_row_below_the_accuracy_floor() {
    use fleetbench_cli::commands::recommend::{self, RecommendArgs};
    let fleet = SoloFleet::start().await;
    push_digits(&fleet.client).await;
    // A structurally pruned variant: much faster, and a few points less accurate.
    let pruned = models::optimize(
        &fleet.client,
        "digits",
        &fleetbench_cli::optimize::RecipeArgs {
            sparsity: Some(0.5),
            structured: true,
            ..fleetbench_cli::optimize::RecipeArgs::named("prune")
        },
        None,
        None,
    )
    .await
    .expect("prune digits");
    let pruned = pruned.variant.variant;
    let id = jobs::submit(
        &fleet.client,
        &JobArgs {
            model: Some("digits".into()),
            variants: vec!["all".into()],
            iterations: Some(2000),
            warmup: Some(100),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let s = wait_job(&fleet.client, &id, Duration::from_secs(180)).await;
    assert_eq!(
        s.state,
        "succeeded",
        "{:?}",
        job_detail(&fleet.client, &id).await
    );
    let rows = rank::fetch(&fleet.client, &rank_args("digits"))
        .await
        .unwrap()
        .rows;
    // By the median: the pruned variant is about twice as fast there, while the p99 of a 10 µs model
    // over 2000 queries moves with whatever else the machine runs (a full-suite run once read
    // 0.19 ms for the pruned row's p99 against fp32's 0.058 ms, at medians of 6 and 12 µs).
    let p50 = |v: &str| {
        let r = rows.iter().find(|r| r.variant == v).unwrap();
        (r.latency.unwrap().p50_ms, r.accuracy.unwrap())
    };
    let (pruned_p50, pruned_acc) = p50(&pruned);
    let (fp32_p50, fp32_acc) = p50("fp32");
    assert!(
        pruned_p50 < fp32_p50 && pruned_acc < 0.95 && fp32_acc >= 0.95,
        "the setting this test needs: {rows:?}"
    );
    let args = |min_accuracy: f64| RecommendArgs {
        model: "digits".into(),
        objective: "p50".into(),
        max_p99_ms: None,
        min_accuracy: Some(min_accuracy),
        max_accuracy_drop: None,
        min_throughput: None,
        job: Some(id.clone()),
        output: Format::Json,
    };
    let r = recommend::fetch(&fleet.client, &args(0.95)).await.unwrap();
    let eligible_best = rows
        .iter()
        .filter(|r| r.accuracy.unwrap() >= 0.95)
        .min_by(|a, b| {
            a.latency
                .unwrap()
                .p50_ms
                .total_cmp(&b.latency.unwrap().p50_ms)
        })
        .unwrap();
    assert_ne!(r.recommendation.variant, pruned, "{}", r.reason);
    assert!(
        r.recommendation.p50_ms <= eligible_best.latency.unwrap().p50_ms || r.recommendation.tied,
        "the fastest row that is accurate enough (or one tied with it): {r:?}"
    );
    assert!(r.pareto.iter().all(|p| p.variant != pruned), "{r:?}");
    assert!(
        r.reason.starts_with("Deploy ") && r.reason.contains("accuracy ≥ 95.00 %"),
        "{}",
        r.reason
    );
    // A floor nothing meets: an error that names it and what was measured.
    let e = recommend::fetch(&fleet.client, &args(0.9999))
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("no row of 'digits' meets accuracy ≥ 99.99 %"),
        "{e:#}"
    );
}
