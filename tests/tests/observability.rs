//! Observability end to end: OTLP export to a receiver built on the official protobuf definitions
//! (http/protobuf and gRPC), a collector that is down or hangs, and a real Prometheus scraping
//! `/metrics` while real jobs run, with every dashboard query answered.

use std::collections::BTreeMap;
use std::time::Duration;

use fleetbench_cli::commands::jobs;
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_coordinator::otel::latency_bounds;
use fleetbench_proto::v1::JobDetail;
use fleetbench_tests::otlp::{self, OtlpReceiver, Point};
use fleetbench_tests::prometheus::{self, Prometheus};
use fleetbench_tests::*;

const WAIT: Duration = Duration::from_secs(60);

fn digits_job(iterations: i64) -> JobArgs {
    JobArgs {
        model: Some("digits".into()),
        variants: vec!["all".into()],
        iterations: Some(iterations),
        warmup: Some(10),
        window_ms: Some(50),
        ..Default::default()
    }
}

/// What the store holds for a finished job: per variant, (samples, queries, windows).
fn stored(detail: &JobDetail) -> BTreeMap<String, (u64, u64, u64)> {
    detail
        .tasks
        .iter()
        .map(|t| {
            let r = t.run.as_ref().expect("a finished task has a run");
            (t.variant.clone(), (r.samples, r.queries, r.windows))
        })
        .collect()
}

/// The data points of the receiver's latest metrics export (metrics are cumulative, so the latest
/// holds every series), with the resource's attributes.
fn latest(r: &otlp::Received) -> (BTreeMap<String, String>, Vec<Point>) {
    r.metrics.last().map(otlp::points).unwrap_or_default()
}

fn sum_of<'a>(points: impl IntoIterator<Item = &'a Point>) -> f64 {
    points.into_iter().map(|p| p.value).sum()
}

/// Runs the digits job on one agent of a coordinator exporting to `receiver` over `protocol`, and
/// checks what arrived against what was stored.
async fn export_carries_the_stored_figures(receiver: OtlpReceiver, protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |c| {
        c.otlp_endpoint = receiver.url();
        c.otlp_protocol = protocol.into();
        c.otlp_interval_ms = 200;
        c.metrics_refresh_ms = 100;
    })
    .await;
    let client = coord.client().await;
    let _agent = TestAgent::start(coord.agent("otel-1", &["cost_per_hour=0.1"], dir.path()));
    wait_online(&client, 1).await;
    push_digits(&client).await;
    let id = jobs::submit(&client, &digits_job(300)).await.unwrap();
    let summary = wait_job(&client, &id, Duration::from_secs(120)).await;
    assert_eq!(summary.state, "succeeded", "{summary:?}");
    let detail = job_detail(&client, &id).await;
    let want = stored(&detail);
    let total_samples: u64 = want.values().map(|v| v.0).sum();
    let total_windows: u64 = want.values().map(|v| v.2).sum();

    // Export is periodic: wait for one that holds the whole run.
    let arrived = receiver
        .wait_for(WAIT, |r| {
            let (_, p) = latest(r);
            let samples = sum_of(
                p.iter()
                    .filter(|p| p.name == "fleetbench.inference.samples"),
            );
            let succeeded = p.iter().any(|p| {
                p.name == "fleetbench.tasks" && p.attrs["state"] == "succeeded" && p.value == 2.0
            });
            samples == total_samples as f64 && succeeded
        })
        .await;
    let (resource, points) = receiver.with(latest);
    assert!(
        arrived,
        "over {protocol}, the exported samples never reached the stored {total_samples}: {:?}",
        points
            .iter()
            .filter(|p| p.name.starts_with("fleetbench.inference") || p.name == "fleetbench.tasks")
            .collect::<Vec<_>>()
    );
    assert_eq!(resource["service.name"], "fleetbench-coordinator");
    assert!(!resource["service.instance.id"].is_empty(), "{resource:?}");

    let named = |n: &str| -> Vec<&Point> { points.iter().filter(|p| p.name == n).collect() };
    let platform = &detail.tasks[0].platform_name;
    // Window metrics: one series per variant, labelled with what a dashboard filters by and nothing
    // that grows with every run.
    for (variant, (samples, queries, _)) in &want {
        let of = |n: &str| -> Vec<&Point> {
            named(n)
                .into_iter()
                .filter(|p| p.attrs.get("variant") == Some(variant))
                .collect()
        };
        let latency = of("fleetbench.inference.latency");
        assert_eq!(latency.len(), 1, "{variant}: {latency:?}");
        let l = latency[0];
        assert_eq!(l.unit, "s");
        assert_eq!(
            l.bounds,
            latency_bounds(),
            "1-2-5 buckets from 1 µs to 10 s"
        );
        assert_eq!(l.count, Some(*queries), "one latency per stored query");
        let keys: Vec<&str> = l.attrs.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "agent", "config", "model", "platform", "scenario", "variant"
            ],
            "{:?}",
            l.attrs
        );
        assert_eq!(
            (
                l.attrs["model"].as_str(),
                l.attrs["agent"].as_str(),
                &l.attrs["platform"]
            ),
            ("digits", "otel-1", platform)
        );
        assert_eq!(l.attrs["scenario"], "single-stream");
        // The histogram's mean is the stored mean (HDR's precision, 0.1 %).
        let run = detail
            .tasks
            .iter()
            .find(|t| &t.variant == variant)
            .and_then(|t| t.run.as_ref())
            .unwrap();
        let stored_mean = run.latency.unwrap().mean_ms / 1e3;
        let exported_mean = l.value / *queries as f64;
        assert!(
            (exported_mean - stored_mean).abs() <= stored_mean * 0.01,
            "{variant}: exported mean {exported_mean} s vs stored {stored_mean} s"
        );
        assert_eq!(sum_of(of("fleetbench.inference.samples")), *samples as f64);
        assert_eq!(sum_of(of("fleetbench.inference.queries")), *queries as f64);
        let samples = of("fleetbench.inference.samples");
        assert!(samples[0].counter && samples[0].unit == "{sample}");
        let cpu = of("process.cpu.utilization");
        assert!(
            cpu.iter()
                .any(|p| p.attrs["cpu.mode"] == "user" && p.value > 0.0),
            "{cpu:?}"
        );
        let rss = of("process.memory.usage");
        assert!(
            rss.len() == 1 && rss[0].unit == "By" && rss[0].value > 1e6,
            "{rss:?}"
        );
    }
    let accuracy = named("fleetbench.run.accuracy");
    let fp32 = accuracy
        .iter()
        .find(|p| p.attrs["variant"] == "fp32")
        .expect("the fp32 run's accuracy");
    assert!(
        (fp32.value - python_accuracy("fp32")).abs() <= 0.01,
        "{fp32:?}"
    );

    // The coordinator's own figures.
    let stored_windows = named("fleetbench.ingest.windows")
        .into_iter()
        .filter(|p| p.attrs["outcome"] == "stored");
    assert_eq!(sum_of(stored_windows), total_windows as f64);
    let online = named("fleetbench.agents.online");
    assert!(
        online
            .iter()
            .any(|p| &p.attrs["platform"] == platform && p.value == 1.0),
        "{online:?}"
    );
    let ack = named("fleetbench.ingest.ack.duration");
    assert_eq!(
        ack.iter().filter_map(|p| p.count).sum::<u64>(),
        total_windows
    );
    let db = named("db.client.operation.duration");
    assert!(
        db.iter()
            .any(|p| p.attrs["db.operation.name"] == "store_windows" && p.attrs["outcome"] == "ok"),
        "{db:?}"
    );
    let sent = named("fleetbench.transfer.bytes")
        .into_iter()
        .filter(|p| p.attrs["direction"] == "sent");
    assert!(sum_of(sent) > 0.0, "the agent downloaded the models");
    // One trace for the job: its id is the job's, and the coordinator's spans and the agent's (sent
    // back over the session) share it, the agent's under their task's span.
    let trace_id = summary.trace_id.clone();
    assert_eq!(trace_id, id, "jobs show prints the trace id");
    let complete = |r: &otlp::Received| {
        let spans = otlp::spans(r);
        let of = |n: &str| {
            spans
                .iter()
                .filter(|s| s.name == n && s.trace_id == trace_id)
                .count()
        };
        of("fleetbench.job.submit") == 1
            && of("fleetbench.task") == 2
            && of("fleetbench.agent.fetch") == 2
            && of("fleetbench.agent.run") == 2
            && of("fleetbench.agent.session_create") == 2
            && of("fleetbench.summary") == 2
    };
    let arrived = receiver.wait_for(WAIT, complete).await;
    let spans = receiver.with(otlp::spans);
    assert!(arrived, "over {protocol}, the job's spans: {spans:#?}");
    let by_id: BTreeMap<&str, &otlp::SpanRecord> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    for s in spans
        .iter()
        .filter(|s| s.name.starts_with("fleetbench.agent."))
    {
        assert_eq!(s.trace_id, trace_id);
        let mut up = by_id[s.parent_span_id.as_str()];
        while up.name != "fleetbench.task" {
            up = by_id[up.parent_span_id.as_str()];
        }
        assert_eq!(up.attrs["fleetbench.agent"], "otel-1");
        let root = by_id[up.parent_span_id.as_str()];
        assert_eq!(root.name, "fleetbench.job.submit");
        assert!(root.parent_span_id.is_empty());
    }
    // No metric carries a run or job id (they belong on traces).
    for p in &points {
        assert!(
            !p.attrs
                .keys()
                .any(|k| k.contains("run") || k.contains("job")),
            "{p:?}"
        );
    }
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn otlp_over_http_protobuf_carries_the_stored_figures() {
    export_carries_the_stored_figures(OtlpReceiver::http().await, "http/protobuf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn otlp_over_grpc_carries_the_stored_figures() {
    export_carries_the_stored_figures(OtlpReceiver::grpc().await, "grpc").await;
}

/// The value of one Prometheus sample line `name{labels} value` whose labels include `having`.
fn sample(text: &str, name: &str, having: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| l.contains(having))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .reduce(|a, b| a + b)
}

/// Polls `/metrics` until `done` holds of its text; the last text.
async fn scrape_until(addr: &str, done: impl Fn(&str) -> bool) -> (bool, String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        every.tick().await;
        let (status, text) = prometheus::get(&format!("http://{addr}/metrics"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{text}");
        if done(&text) {
            return (true, text);
        }
        if tokio::time::Instant::now() > deadline {
            return (false, text);
        }
    }
}

/// A job against a coordinator whose collector is unusable: every window is stored, the job ends as
/// it would without export, and the failed exports are counted.
async fn an_unusable_collector_loses_nothing(endpoint: String, protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("metrics.addr");
    let coord = TestCoordinator::sqlite(dir.path(), |c| {
        c.otlp_endpoint = endpoint;
        c.otlp_protocol = protocol.into();
        c.otlp_interval_ms = 100;
        c.otlp_timeout_ms = 300;
        c.metrics_listen = "127.0.0.1:0".into();
        c.metrics_addr_file = addr_file.display().to_string();
    })
    .await;
    let client = coord.client().await;
    let _agent = TestAgent::start(coord.agent("otel-down", &[], dir.path()));
    wait_online(&client, 1).await;
    push_digits(&client).await;
    let iterations = 300;
    let id = jobs::submit(&client, &digits_job(iterations))
        .await
        .unwrap();
    let summary = wait_job(&client, &id, Duration::from_secs(120)).await;
    assert_eq!(summary.state, "succeeded", "{summary:?}");
    let detail = job_detail(&client, &id).await;
    let store = fleetbench_coordinator::store::open(&coord.database)
        .await
        .unwrap();
    for t in &detail.tasks {
        let run = t.run.as_ref().unwrap();
        assert_eq!(run.queries, iterations as u64);
        let ctx = store.run_context(&run.run_id).await.unwrap().unwrap();
        let seqs: Vec<u64> = ctx.windows.iter().map(|w| w.seq).collect();
        assert_eq!(
            seqs,
            (0..run.windows).collect::<Vec<_>>(),
            "every window stored, without gaps"
        );
    }
    let total: u64 = stored(&detail).values().map(|v| v.0).sum();
    let addr = std::fs::read_to_string(&addr_file).unwrap();
    let (ok, text) = scrape_until(&addr, |t| {
        sample(
            t,
            "fleetbench_otlp_export_failures_total",
            "signal=\"metrics\"",
        )
        .unwrap_or(0.0)
            >= 1.0
            && sample(t, "fleetbench_inference_samples_total", "model=\"digits\"")
                == Some(total as f64)
    })
    .await;
    assert!(
        ok,
        "failed exports counted and every sample measured on /metrics: {text}"
    );
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_that_is_down_loses_no_window() {
    let addr = otlp::down_address().await;
    an_unusable_collector_loses_nothing(format!("http://{addr}"), "http/protobuf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_that_hangs_loses_no_window() {
    let hung = otlp::HungCollector::start().await;
    an_unusable_collector_loses_nothing(format!("http://{}", hung.addr), "grpc").await;
    let hung_http = otlp::HungCollector::start().await;
    an_unusable_collector_loses_nothing(format!("http://{}", hung_http.addr), "http/protobuf")
        .await;
}

/// Every PromQL expression in a dashboard's panels (rows' panels included).
fn expressions(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.clone(), e.to_string()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A dashboard query as Grafana would send it with "All" selected: template variables become `.*`
/// (the dashboards match them with `=~`) and `$__rate_interval` a range that holds the whole test.
fn substitute(expr: &str, variables: &[String]) -> String {
    let mut e = expr.replace("$__rate_interval", "5m");
    let mut vars = variables.to_vec();
    // Longest first, so $model does not eat the start of $model_family.
    vars.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for v in vars {
        e = e
            .replace(&format!("${{{v}}}"), ".*")
            .replace(&format!("${v}"), ".*");
    }
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_scrapes_a_real_job_and_every_dashboard_query_returns_data() {
    assert!(
        prometheus::installed(),
        "{} is missing: scripts/ensure-prometheus.sh installs Debian's prometheus package",
        prometheus::BINARY
    );
    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("metrics.addr");
    let coord = TestCoordinator::sqlite(dir.path(), |c| {
        c.metrics_listen = "127.0.0.1:0".into();
        c.metrics_addr_file = addr_file.display().to_string();
        c.metrics_refresh_ms = 100;
    })
    .await;
    let client = coord.client().await;
    let _agent = TestAgent::start(coord.agent("prom-1", &["cost_per_hour=0.1"], dir.path()));
    wait_online(&client, 1).await;
    // Answered calls mean the server is up, and it writes the /metrics address before it serves.
    let metrics_addr: std::net::SocketAddr = std::fs::read_to_string(&addr_file)
        .unwrap()
        .parse()
        .unwrap();
    let prom = Prometheus::start(&[metrics_addr], Duration::from_millis(500))
        .await
        .unwrap();
    push_digits(&client).await;
    push_tiny_llama(&client, None).await;
    let digits = jobs::submit(&client, &digits_job(300)).await.unwrap();
    let generate = JobArgs {
        model: Some("tiny-llama".into()),
        variants: vec!["all".into()],
        scenario: Some("generate".into()),
        prompt_tokens: Some("16".into()),
        output_tokens: Some("8".into()),
        iterations: Some(20),
        warmup: Some(2),
        window_ms: Some(50),
        ..Default::default()
    };
    let generate = jobs::submit(&client, &generate).await.unwrap();
    let mut total = 0;
    for id in [&digits, &generate] {
        let s = wait_job(&client, id, Duration::from_secs(180)).await;
        assert_eq!(s.state, "succeeded", "{s:?}");
        total += stored(&job_detail(&client, id).await)
            .values()
            .map(|v| v.0)
            .sum::<u64>();
    }

    // Prometheus has scraped everything once its sum of samples is the stored one.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut every = tokio::time::interval(Duration::from_millis(250));
    loop {
        every.tick().await;
        let r = prom
            .query("sum(fleetbench_inference_samples_total)")
            .await
            .unwrap();
        let got = r
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok());
        if got == Some(total as f64) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus never saw {total} samples (last {got:?}); targets up: {:?}; log: {}",
            prom.targets_up().await,
            prom.log()
        );
    }
    assert!(prom.targets_up().await.unwrap());
    // Rates need two samples of a series: every series is in every scrape, so one more scrape after
    // the one that held the finished jobs gives each at least two.
    let scrapes = || async {
        let r = prom
            .query(r#"count_over_time(up{job="fleetbench"}[10m])"#)
            .await
            .unwrap();
        r.first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let seen = scrapes().await;
    while scrapes().await < seen + 1.0 {
        every.tick().await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus stopped scraping"
        );
    }

    let mut dashboards: Vec<_> = std::fs::read_dir(repo().join("dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    dashboards.sort();
    assert!(dashboards.len() >= 3, "{dashboards:?}");
    let mut empty = Vec::new();
    let mut asked = 0;
    for path in &dashboards {
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let variables: Vec<String> = d["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str().map(str::to_string))
            .collect();
        let exprs = expressions(&d);
        assert!(!exprs.is_empty(), "{} has no queries", path.display());
        for (title, expr) in exprs {
            let q = substitute(&expr, &variables);
            asked += 1;
            match prom.query(&q).await {
                Ok(r) if !r.is_empty() => {}
                Ok(_) => empty.push(format!(
                    "{}: '{title}': {q} returned nothing",
                    path.display()
                )),
                Err(e) => empty.push(format!("{}: '{title}': {e}", path.display())),
            }
        }
        // Template variables are filled from label values that exist.
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            if let Some(q) = v["query"]["query"].as_str().or(v["query"].as_str())
                && let Some(metric) = q
                    .strip_prefix("label_values(")
                    .and_then(|r| r.split(',').next())
            {
                let r = prom
                    .query(&substitute(metric.trim(), &variables))
                    .await
                    .unwrap();
                assert!(
                    !r.is_empty(),
                    "{}: variable query {q} has no series",
                    path.display()
                );
            }
        }
    }
    assert!(
        empty.is_empty(),
        "{} of {asked} queries failed:\n{}",
        empty.len(),
        empty.join("\n")
    );
    coord.stop().await;
}

#[test]
fn the_dashboards_folder_is_generated_parses_and_holds_together() {
    let dir = repo().join("dashboards");
    // The committed dashboards are what the script writes.
    let before: Vec<(std::path::PathBuf, String)> = ["fleet.json", "model.json", "generative.json"]
        .iter()
        .map(|f| (dir.join(f), std::fs::read_to_string(dir.join(f)).unwrap()))
        .collect();
    let out = std::process::Command::new(python())
        .arg(dir.join("make_dashboards.py"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (path, text) in &before {
        assert_eq!(
            &std::fs::read_to_string(path).unwrap(),
            text,
            "{} differs from what make_dashboards.py writes",
            path.display()
        );
    }
    let mut uids = std::collections::BTreeSet::new();
    for (path, text) in &before {
        let d: serde_json::Value = serde_json::from_str(text).unwrap();
        assert!(
            uids.insert(d["uid"].as_str().unwrap().to_string()),
            "{}",
            path.display()
        );
        let vars: Vec<&str> = d["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        for (title, expr) in expressions(&d) {
            // Every $variable a query uses is defined (Grafana's own ones start with $__).
            for word in expr.split('$').skip(1) {
                let name: String = word
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    name.starts_with("__") || vars.contains(&name.as_str()),
                    "{}: '{title}' uses ${name}, which is not a variable",
                    path.display()
                );
            }
        }
    }
    // Prometheus configurations, checked by Prometheus's own tool.
    for f in ["prometheus.yml", "prometheus-collector.yml"] {
        let out = std::process::Command::new("promtool")
            .args(["check", "config"])
            .arg(dir.join(f))
            .output()
            .expect("promtool (Debian's prometheus package; scripts/ensure-prometheus.sh)");
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The collector: OTLP in over both protocols, every pipeline naming defined components, metrics
    // out to Prometheus.
    let c: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("otel-collector.yaml")).unwrap())
            .unwrap();
    for p in ["http", "grpc"] {
        assert!(
            !c["receivers"]["otlp"]["protocols"][p].is_null(),
            "otlp {p}"
        );
    }
    let pipelines = c["service"]["pipelines"].as_mapping().unwrap();
    assert!(pipelines.contains_key("metrics") && pipelines.contains_key("traces"));
    for (name, p) in pipelines {
        for (kind, section) in [
            ("receivers", "receivers"),
            ("processors", "processors"),
            ("exporters", "exporters"),
        ] {
            for comp in p[kind].as_sequence().into_iter().flatten() {
                let comp = comp.as_str().unwrap();
                assert!(
                    !c[section][comp].is_null() || c[section].get(comp).is_some(),
                    "pipeline {name:?} names {kind} {comp}, which is not defined"
                );
            }
        }
    }
    assert!(
        c["service"]["pipelines"]["metrics"]["exporters"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|e| e.as_str() == Some("prometheus"))
    );
    // Compose: the services, and every file it mounts exists here.
    let compose: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("compose.yaml")).unwrap())
            .unwrap();
    let services = compose["services"].as_mapping().unwrap();
    for s in ["collector", "prometheus", "grafana"] {
        assert!(services.contains_key(s), "compose service {s}");
    }
    for (_, svc) in services {
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let src = v.as_str().unwrap().split(':').next().unwrap();
            assert!(
                dir.join(src).exists(),
                "compose mounts {src}, which is not in dashboards/"
            );
        }
    }
}
