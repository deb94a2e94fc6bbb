//! Decoder-only language models through the real ONNX Runtime: the bundled Llama-style decoder
//! (models/make_llm.py) is detected, and fleetbench's decoding loop — prefill, then one call per token
//! with each call's present KV tensors fed back as the next call's past — produces exactly the tokens
//! that onnxruntime's Python API produced for the same prompt when the script made the model. Then the
//! generate scenario end to end: two agents, closed and open loop, token counts, TTFT/TPOT/ITL/E2E,
//! goodput and the SLO verdict, the ranking by tokens per second, and bad input refused at submit.

use std::time::Duration;

use fleetbench_cli::commands::{jobs, models as model_cmd};
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_proto::v1::{GenerationStats, RankRequest, RunSummary};
use fleetbench_runtime::decoder::{DecoderIo, Pick, generate, generate_batch};
use fleetbench_tests::*;

fn session(path: &std::path::Path) -> ort::session::Session {
    let rt = fleetbench_runtime::load(Some(&ort_lib())).expect("load ONNX Runtime");
    ort::session::Session::builder(&rt.env)
        .unwrap()
        .with_intra_threads(1)
        .unwrap()
        .commit_from_file(path)
        .unwrap()
}

#[test]
fn the_bundled_decoder_generates_what_onnxruntime_in_python_generated() {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(models("llm/tiny-llama.json")).unwrap())
            .unwrap();
    let ids = |k: &str| -> Vec<i64> {
        meta[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    };
    let (prompt, expected) = (ids("prompt"), ids("greedy"));
    let mut s = session(&models("llm/tiny-llama.onnx"));
    let io = DecoderIo::detect(&s).unwrap();
    assert_eq!(io.layers(), meta["layers"].as_u64().unwrap() as usize);
    assert_eq!(io.kv_heads, meta["heads"].as_i64().unwrap());
    assert_eq!(io.head_dim, meta["head_dim"].as_i64().unwrap());
    assert_eq!(io.vocab, meta["vocab"].as_i64());
    assert_eq!(io.max_positions, meta["max_positions"].as_i64());
    let g = generate(&mut s, &io, &prompt, expected.len()).unwrap();
    assert_eq!(g.tokens, expected);
    assert_eq!(g.token_ready_ns.len(), expected.len());
    assert!(g.token_ready_ns.windows(2).all(|w| w[0] < w[1]));
    // The decode steps' time inside Run: some, and less than the time from the first token to the last.
    let decoding = g.token_ready_ns.last().unwrap() - g.token_ready_ns[0];
    assert!(
        g.decode_run_ns > 0 && g.decode_run_ns < decoding,
        "{} of {decoding}",
        g.decode_run_ns
    );
    // Beyond the model's positions: refused, naming both lengths.
    let max = io.max_positions.unwrap() as usize;
    let e = generate(&mut s, &io, &prompt, max).unwrap_err().to_string();
    assert!(e.contains(&format!("{max} positions")), "{e}");
}

#[test]
fn a_static_batch_left_padded_under_the_mask_makes_each_request_s_own_tokens() {
    let mut s = session(&models("llm/tiny-llama.onnx"));
    let io = DecoderIo::detect(&s).unwrap();
    let prompts: Vec<Vec<i64>> = vec![
        (0..5).map(|i| (i * 37 + 11) % 512).collect(),
        (0..19).map(|i| (i * 53 + 7) % 512).collect(),
        (0..12).map(|i| (i * 101 + 3) % 512).collect(),
    ];
    let lengths = [6, 9, 3];
    let alone: Vec<Vec<i64>> = prompts
        .iter()
        .zip(lengths)
        .map(|(p, n)| generate(&mut s, &io, p, n).unwrap().tokens)
        .collect();
    let refs: Vec<&[i64]> = prompts.iter().map(Vec::as_slice).collect();
    let mut picks = vec![Pick::Greedy; 3];
    let batch = generate_batch(&mut s, &io, &refs, &lengths, &mut picks).unwrap();
    for (r, g) in batch.iter().enumerate() {
        assert_eq!(g.tokens, alone[r], "row {r}: the pads change nothing");
        assert_eq!(g.token_ready_ns.len(), lengths[r]);
    }
    // Rows that finish early stop counting; the batch's calls are shared: each row's token of a
    // step is ready between the previous step's and the next step's.
    assert!(batch[2].token_ready_ns[2] > batch[0].token_ready_ns[1]);
    assert!(batch[2].token_ready_ns[2] < batch[0].token_ready_ns[3]);
}

#[test]
fn a_model_that_is_not_a_decoder_is_refused_naming_what_is_missing() {
    let s = session(&models("digits/digits-fp32.onnx"));
    let e = DecoderIo::detect(&s).unwrap_err().to_string();
    assert!(e.contains("no 'input_ids' input"), "{e}");
    assert!(e.contains("input 'input' is none of input_ids"), "{e}");
}

const OUTPUT_TOKENS: u64 = 16;

/// Why the coordinator refused to queue `j` (the submission must fail).
async fn refusal(client: &fleetbench_cli::client::Client, j: &JobArgs) -> String {
    jobs::submit(client, j).await.unwrap_err().to_string()
}

fn generate_job(requests: i64) -> JobArgs {
    JobArgs {
        model: Some("tiny-llama".into()),
        variants: vec!["all".into()],
        scenario: Some("generate".into()),
        prompt_tokens: Some("uniform:8-32".into()),
        output_tokens: Some(OUTPUT_TOKENS.to_string()),
        iterations: Some(requests),
        warmup: Some(2),
        window_ms: Some(50),
        ..Default::default()
    }
}

fn tokens(run: &RunSummary) -> GenerationStats {
    run.generation
        .unwrap_or_else(|| panic!("a generate run has token figures: {run:?}"))
}

/// The checks every generate run must pass, whatever its loop.
fn check_generate_run(run: &RunSummary, requests: u64) -> GenerationStats {
    let g = tokens(run);
    assert_eq!(run.queries, requests, "one query per request");
    assert_eq!(g.requests, requests);
    assert_eq!(
        g.output_tokens,
        requests * OUTPUT_TOKENS,
        "every request made exactly the asked tokens"
    );
    assert!(
        (requests * 8..=requests * 32).contains(&g.prompt_tokens),
        "prompts drawn from 8-32 tokens: {}",
        g.prompt_tokens
    );
    let (ttft, tpot, itl, e2e) = (
        g.ttft.unwrap(),
        g.tpot.unwrap(),
        g.itl.unwrap(),
        run.latency.unwrap(),
    );
    for l in [&ttft, &tpot, &itl, &e2e] {
        assert!(
            l.p50_ms > 0.0 && l.p50_ms <= l.p90_ms && l.p90_ms <= l.p99_ms && l.p99_ms <= l.max_ms,
            "{l:?}"
        );
    }
    assert!(
        ttft.max_ms < e2e.max_ms && ttft.mean_ms < e2e.mean_ms,
        "TTFT < E2E: {ttft:?} {e2e:?}"
    );
    // E2E = TTFT + (tokens - 1) x TPOT, request by request, so also on average (histogram precision).
    let rebuilt = ttft.mean_ms + (OUTPUT_TOKENS - 1) as f64 * tpot.mean_ms;
    assert!(
        (rebuilt - e2e.mean_ms).abs() <= 0.02 * e2e.mean_ms + 0.05,
        "TTFT {} + 15 x TPOT {} = {rebuilt} vs E2E {}",
        ttft.mean_ms,
        tpot.mean_ms,
        e2e.mean_ms
    );
    // Every gap between tokens is an ITL sample; their mean is TPOT's (less the waiting, none here).
    assert!(
        (itl.mean_ms - tpot.mean_ms).abs() <= 0.25 * tpot.mean_ms + 0.05,
        "ITL {itl:?} vs TPOT {tpot:?}"
    );
    let secs = run.duration_ms / 1e3;
    assert!(
        (g.output_tokens_per_s - g.output_tokens as f64 / secs).abs()
            < 1e-6 * g.output_tokens_per_s.max(1.0)
    );
    assert!((g.requests_per_s - requests as f64 / secs).abs() < 1e-6 * g.requests_per_s.max(1.0));
    assert!(g.goodput_per_s <= g.requests_per_s + 1e-9);
    // Rates carry their bootstrap intervals over the run's windows, around the figure (the
    // bootstrap times the windows, the figure the run: close, not equal); a run of one window has
    // nothing to resample.
    for (what, v, ci) in [
        ("tokens/s", g.output_tokens_per_s, g.output_tokens_ci_per_s),
        ("goodput", g.goodput_per_s, g.goodput_ci_per_s),
    ] {
        if run.windows < 2 {
            assert_eq!(ci, None, "{what} of one window");
            continue;
        }
        let ci = ci.unwrap_or_else(|| panic!("no {what} interval: {g:?}"));
        assert!(
            ci.low <= ci.high && ci.low <= v * 1.05 && ci.high >= v * 0.95,
            "{what} {v} vs {ci:?}"
        );
    }
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(models("llm/tiny-llama.json")).unwrap())
            .unwrap();
    let kv = 2
        * meta["layers"].as_u64().unwrap()
        * meta["heads"].as_u64().unwrap()
        * meta["head_dim"].as_u64().unwrap()
        * 4;
    assert_eq!(g.kv_bytes_per_token, kv, "float32 K and V of every layer");
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_generate_tokens_closed_and_open_loop_judged_by_slo_and_ranked_by_tokens_per_s()
{
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let mut edge = coord.agent("edge-1", &["tier=edge", "cost_per_hour=0.05"], dir.path());
    edge.cpus = "0".into();
    let _edge = TestAgent::start(edge);
    let _cloud =
        TestAgent::start(coord.agent("cloud-1", &["tier=cloud", "cost_per_hour=0.2"], dir.path()));
    wait_online(&client, 2).await;
    push_tiny_llama(&client, None).await;
    let store = fleetbench_coordinator::store::open(&coord.database)
        .await
        .unwrap();

    // Closed loop, one and two streams, on both agents.
    let requests = 12;
    let mut closed = generate_job(requests);
    closed.concurrency = vec![1, 2];
    closed.batch_size = vec![1, 3];
    let id = jobs::submit(&client, &closed).await.unwrap();
    let summary = wait_job(&client, &id, Duration::from_secs(180)).await;
    assert_eq!(summary.state, "succeeded", "{summary:?}");
    assert_eq!(
        summary.tasks_total, 8,
        "(1, 2 streams) x (batch 1, 3) x 2 agents"
    );
    let detail = job_detail(&client, &id).await;
    for t in &detail.tasks {
        let run = t.run.as_ref().unwrap();
        assert!(run.valid, "{run:?}");
        let batch = run.config.as_ref().unwrap().batch_size;
        assert_eq!(
            run.samples, requests as u64,
            "batch {batch}: samples count requests"
        );
        let g = check_generate_run(run, requests as u64);
        assert_eq!(
            g.good_requests, requests as u64,
            "without an SLO every request is good"
        );
        // What was stored: the windows' tokens add up to the run's.
        let ctx = store.run_context(&run.run_id).await.unwrap().unwrap();
        let stored: u64 = ctx
            .windows
            .iter()
            .map(|w| {
                w.generation
                    .as_ref()
                    .expect("token figures in every window")
                    .output_tokens
            })
            .sum();
        assert_eq!(stored, g.output_tokens);
        let scenario: serde_json::Value = serde_json::from_str(&run.scenario_json).unwrap();
        assert_eq!(scenario["loop"], "closed", "{scenario}");
        assert_eq!(scenario["batch_size"], batch, "{scenario}");
        let cph = if t.agent == "edge-1" { 0.05 } else { 0.2 };
        let cpm = g.cost_per_million_tokens.unwrap();
        assert!((cpm - cph / (g.output_tokens_per_s * 3600.0) * 1e6).abs() < 1e-9 * cpm.max(1.0));
    }

    // Open loop at a rate the model keeps up with: TTFT and E2E from each request's scheduled
    // arrival, how late requests were issued reported; an SLO every request meets, and one none can.
    for (slo, valid) in [
        ("ttft_ms=60000,tpot_ms=60000", true),
        ("tpot_ms=0.001", false),
    ] {
        let mut open = generate_job(10);
        open.request_rate = Some("40".into());
        open.slo = Some(slo.into());
        open.selector = vec!["tier=cloud".into()];
        let id = jobs::submit(&client, &open).await.unwrap();
        let summary = wait_job(&client, &id, Duration::from_secs(120)).await;
        assert_eq!(summary.state, "succeeded", "{summary:?}");
        let detail = job_detail(&client, &id).await;
        let run = detail.tasks[0].run.as_ref().unwrap();
        let g = check_generate_run(run, 10);
        let scenario: serde_json::Value = serde_json::from_str(&run.scenario_json).unwrap();
        assert_eq!(scenario["loop"], "open", "{scenario}");
        assert_eq!(scenario["issued"], 10, "{scenario}");
        let late = scenario["issue_delay_ms"]["max"].as_f64().unwrap();
        assert!(
            (0.0..1000.0).contains(&late),
            "issue delay bounded and reported: {scenario}"
        );
        assert_eq!(run.valid, valid, "{slo}: {run:?}");
        if valid {
            assert_eq!(g.good_requests, 10);
            assert!((g.goodput_per_s - g.requests_per_s).abs() < 1e-9);
        } else {
            assert_eq!(g.good_requests, 0, "no request meets a TPOT of 1 µs");
            assert_eq!(g.goodput_per_s, 0.0);
            assert!(
                run.invalid_reason.contains("p99 tpot"),
                "{}",
                run.invalid_reason
            );
            assert!(
                run.invalid_reason.contains("> SLO 0.001 ms"),
                "{}",
                run.invalid_reason
            );
        }
    }

    // max-rate: the highest open-loop rate whose p99 TTFT meets the SLO, found by bisection; the
    // final run at that rate is the run's telemetry and is VALID by the same SLO.
    let mut search = generate_job(10);
    search.request_rate = Some("max".into());
    search.slo = Some("ttft_ms=20".into());
    search.selector = vec!["tier=cloud".into()];
    let id = jobs::submit(&client, &search).await.unwrap();
    let summary = wait_job(&client, &id, Duration::from_secs(180)).await;
    assert_eq!(summary.state, "succeeded", "{summary:?}");
    let detail = job_detail(&client, &id).await;
    let run = detail.tasks[0].run.as_ref().unwrap();
    let g = check_generate_run(run, 10);
    let scenario: serde_json::Value = serde_json::from_str(&run.scenario_json).unwrap();
    let rate = scenario["max_rate"].as_f64().expect("the rate found");
    let steps = scenario["search"].as_array().unwrap();
    assert!(steps.len() >= 3, "{scenario}");
    assert!(
        steps.iter().any(|s| s["pass"] == true) && steps.iter().any(|s| s["pass"] == false),
        "the search brackets the knee: {scenario}"
    );
    for s in steps.iter().filter(|s| s["pass"] == true) {
        assert!(s["ttft_p99_ms"].as_f64().unwrap() <= 20.0, "{s}");
        assert_eq!(s["keeps_up"], true, "{s}");
        assert!(
            s["rate"].as_f64().unwrap() <= rate * 1.0001,
            "the highest passing rate: {scenario}"
        );
    }
    assert!(rate > 0.0 && g.requests_per_s > 0.0);
    // An SLO that requests miss even alone fails at once, saying so, instead of searching down.
    let mut impossible = generate_job(10);
    impossible.request_rate = Some("max".into());
    impossible.slo = Some("ttft_ms=0.001".into());
    impossible.selector = vec!["tier=cloud".into()];
    let id = jobs::submit(&client, &impossible).await.unwrap();
    let summary = wait_job(&client, &id, Duration::from_secs(120)).await;
    assert_eq!(summary.state, "failed", "{summary:?}");
    let detail = job_detail(&client, &id).await;
    assert!(
        detail.tasks[0]
            .error
            .contains("requests alone, without load, miss the SLO: ttft"),
        "{:?}",
        detail.tasks[0]
    );
    // An open loop far beyond what the model serves: requests still queued when the phase ends are
    // dropped and counted, not run for seconds past it, and the run is INVALID.
    let mut flood = generate_job(1);
    flood.iterations = None;
    flood.duration_s = Some(1.0);
    flood.request_rate = Some("20000".into());
    flood.selector = vec!["tier=cloud".into()];
    let id = jobs::submit(&client, &flood).await.unwrap();
    let summary = wait_job(&client, &id, Duration::from_secs(120)).await;
    assert_eq!(summary.state, "succeeded", "{summary:?}");
    let detail = job_detail(&client, &id).await;
    let run = detail.tasks[0].run.as_ref().unwrap();
    assert!(
        !run.valid && run.invalid_reason.contains("requests dropped"),
        "{run:?}"
    );
    assert!(run.dropped_queries > 0, "{run:?}");
    // Draining the 1024 requests the queue holds would take seconds more.
    assert!(run.duration_ms < 2500.0, "{run:?}");

    // Ranked by output tokens per second, each row's figures pooled from its runs.
    let ranking = client
        .rankings()
        .rank(RankRequest {
            model: "tiny-llama".into(),
            objective: "tokens-per-s".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ranking.rows.len() >= 9, "{ranking:?}");
    assert_eq!(ranking.objective, "tokens-per-s");
    // Groups of tied rows (intervals that overlap their leader's) go by cost inside, and a row with
    // a wide interval may join a group past a row that does not: the groups' leaders, the best row
    // of each rank, are in order.
    fn leaders(
        rows: &[fleetbench_proto::v1::RankRow],
        key: fn(&GenerationStats) -> f64,
    ) -> Vec<f64> {
        let mut best: Vec<(u32, f64)> = Vec::new();
        for r in rows {
            let k = key(&tokens_of(r));
            match best.last_mut() {
                Some((rank, b)) if *rank == r.rank => *b = b.min(k),
                _ => best.push((r.rank, k)),
            }
        }
        best.into_iter().map(|(_, k)| k).collect()
    }
    let by_tokens = leaders(&ranking.rows, |g| -g.output_tokens_per_s);
    assert!(
        by_tokens.windows(2).all(|w| w[0] <= w[1]),
        "sorted by tokens/s: {ranking:#?}"
    );
    for r in &ranking.rows {
        let g = tokens_of(r);
        assert_eq!(g.output_tokens, g.requests * OUTPUT_TOKENS);
    }
    let by_ttft = client
        .rankings()
        .rank(RankRequest {
            model: "tiny-llama".into(),
            objective: "ttft-p99".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ttft = leaders(&by_ttft.rows, |g| g.ttft.unwrap().p99_ms);
    assert!(
        ttft.windows(2).all(|w| w[0] <= w[1]),
        "sorted by TTFT p99: {by_ttft:#?}"
    );
    // TTFT p99 has an interval (order statistics), so rows it cannot tell apart tie.
    assert!(
        by_ttft.rows.iter().all(|r| {
            let t = tokens_of(r).ttft.unwrap();
            t.p99_ci_low_ms <= t.p99_ms && t.p99_ms <= t.p99_ci_high_ms
        }),
        "{by_ttft:#?}"
    );
}

fn tokens_of(r: &fleetbench_proto::v1::RankRow) -> GenerationStats {
    r.generation
        .unwrap_or_else(|| panic!("a generate row: {r:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_generate_job_the_model_cannot_run_is_refused_at_submit_naming_why() {
    let fleet = SoloFleet::start().await;
    let client = &fleet.client;
    push_digits(client).await;
    push_tiny_llama(client, None).await;
    // Not a decoder: no input_ids (its output happens to be called logits).
    let mut j = generate_job(4);
    j.model = Some("digits".into());
    let e = refusal(client, &j).await;
    assert!(
        e.contains("digits/fp32: not a decoder")
            && e.contains("no input 'input_ids' (inputs: input)"),
        "{e}"
    );
    // Longer than the model's 512 positions.
    let mut j = generate_job(4);
    j.prompt_tokens = Some("uniform:100-500".into());
    j.output_tokens = Some("64".into());
    let e = refusal(client, &j).await;
    assert!(
        e.contains("500 + 64 = 564 tokens exceed the model's 512 positions"),
        "{e}"
    );
    // Past the coordinator's limits, whatever the model states: refused before an agent allocates it.
    let mut j = generate_job(4);
    j.prompt_tokens = Some("4000000000".into());
    let e = refusal(client, &j).await;
    assert!(
        e.contains("prompt_tokens + output_tokens: 4000000016 is above the coordinator's limit"),
        "{e}"
    );
    let mut j = generate_job(4);
    j.request_rate = Some("1e12".into());
    let e = refusal(client, &j).await;
    assert!(
        e.contains("request_rate") && e.contains("max_target_qps"),
        "{e}"
    );
    // Nothing was queued by the refusals.
    let listed = client
        .jobs()
        .list_jobs(fleetbench_proto::v1::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty(), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_int4_weight_only_decoder_generates_and_reports_its_fidelity_to_the_base() {
    let fleet = SoloFleet::start().await;
    let client = &fleet.client;
    push_tiny_llama(client, None).await;
    let args = fleetbench_cli::optimize::RecipeArgs {
        block_size: Some(32),
        ..fleetbench_cli::optimize::RecipeArgs::named("int4-weight-only")
    };
    let int4 = model_cmd::optimize(client, "tiny-llama", &args, None, None)
        .await
        .expect("int4-weight-only on the decoder");
    assert_eq!(int4.variant.variant, "int4-b32");
    assert!(
        !int4.report.rewritten.is_empty(),
        "MatMul nodes rewritten: {:?}",
        int4.report
    );
    let base = std::fs::metadata(models("llm/tiny-llama.onnx"))
        .unwrap()
        .len();
    assert!(
        (int4.variant.size_bytes as f64) < 0.4 * base as f64,
        "4-bit weights: {} vs {base} bytes",
        int4.variant.size_bytes
    );
    // The other weight recipes work on decoders too.
    for recipe in ["int8-weight-only", "fp16"] {
        let v = model_cmd::optimize(
            client,
            "tiny-llama",
            &fleetbench_cli::optimize::RecipeArgs::named(recipe),
            None,
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{recipe} on the decoder: {e:#}"));
        assert!(v.variant.size_bytes < base, "{recipe}: {:?}", v.variant);
    }
    let id = jobs::submit(client, &generate_job(6)).await.unwrap();
    let summary = wait_job(client, &id, Duration::from_secs(120)).await;
    assert_eq!(summary.state, "succeeded", "{summary:?}");
    let detail = job_detail(client, &id).await;
    assert_eq!(detail.tasks.len(), 4, "fp32, int4, int8 weight-only, fp16");
    for t in &detail.tasks {
        let run = t.run.as_ref().unwrap();
        check_generate_run(run, 6);
        let quality: serde_json::Value = if run.quality_json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&run.quality_json).unwrap()
        };
        if t.variant != "fp32" {
            let f = &quality["fidelity"];
            eprintln!("{} fidelity to fp32: {f}", t.variant);
            assert!(f["cosine"].as_f64().unwrap() > 0.9, "{}: {f}", t.variant);
        }
        if t.variant == "int4-b32" {
            let f = &quality["fidelity"];
            let agreement = f["top1_agreement"].as_f64().expect("next-token agreement");
            let cosine = f["cosine"].as_f64().unwrap();
            assert!(f["samples"].as_u64().unwrap() >= 100, "{f}");
            // Random weights make near-ties common, so agreement is far from perfect; it is
            // far above chance (1/512) all the same, and the logits stay close.
            assert!(agreement > 0.3 && agreement <= 1.0, "{f}");
            assert!(cosine > 0.9 && cosine < 1.0, "{f}");
        } else if t.variant == "fp32" {
            assert!(
                quality["fidelity"].is_null(),
                "the base has nothing to compare with"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_eval_set_gives_the_perplexity_onnxruntime_in_python_gives() {
    let fleet = SoloFleet::start().await;
    let client = &fleet.client;
    // Four seeded sequences of 40 token ids; for a causal LM the labels are the sequence itself.
    let tokens =
        ndarray::Array2::from_shape_fn((4, 40), |(r, t)| ((r * 131 + t * 29 + 7) % 512) as i64);
    let path = fleet.dir.path().join("tokens.npy");
    ndarray_npy::write_npy(&path, &tokens).unwrap();
    push_tiny_llama(client, Some((&path, &path))).await;
    let id = jobs::submit(client, &generate_job(3)).await.unwrap();
    let summary = wait_job(client, &id, Duration::from_secs(120)).await;
    assert_eq!(summary.state, "succeeded", "{summary:?}");
    let detail = job_detail(client, &id).await;
    let run = detail.tasks[0].run.as_ref().unwrap();
    let quality: serde_json::Value = serde_json::from_str(&run.quality_json).unwrap();
    let lm = &quality["language"];
    assert_eq!(lm["sequences"], 4, "{quality}");
    assert_eq!(lm["tokens"], 4 * 39, "{quality}");
    let ours = lm["perplexity"].as_f64().unwrap();
    assert_eq!(run.accuracy, lm["next_token_accuracy"].as_f64());
    let script = r#"
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2]); nll = []
for row in x:
    feed = {"input_ids": row[None, :], "attention_mask": np.ones((1, len(row)), np.int64),
            "position_ids": np.arange(len(row), dtype=np.int64)[None, :]}
    for i in s.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    z = s.run(["logits"], feed)[0][0].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll += [-logp[t, row[t + 1]] for t in range(len(row) - 1)]
print(float(np.exp(np.mean(nll))))
"#;
    let out = std::process::Command::new(python())
        .args(["-c", script])
        .arg(models("llm/tiny-llama.onnx"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(
        (ours - python).abs() <= 1e-4 * python,
        "perplexity {ours} vs onnxruntime in Python {python}"
    );
}
