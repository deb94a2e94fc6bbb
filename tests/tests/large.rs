//! Large models: artifact sets with external data, pushed and downloaded in chunks, resumed after a
//! cut, quantized in the same form, deleted; bad sets refused; window retention; the agent's cache
//! budget and runtime limits. The models are made by `models/make_large_model.py` with seeded random
//! weights, `FLEETBENCH_TEST_LARGE_MIB` MiB of them (256 by default), in 16 MiB files in a subfolder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetbench_cli::client::Client;
use fleetbench_cli::commands::{jobs, models, rank};
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_cli::output::Format;
use fleetbench_cli::transfer::{self, CLIENT_KEY};
use fleetbench_proto::v1 as pb;
use fleetbench_tests::*;

/// Size of the test models, MiB.
fn large_mib() -> u64 {
    std::env::var("FLEETBENCH_TEST_LARGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// Writes a large model with external data into `dir`; returns the `.onnx`'s path.
fn large_model(dir: &Path, mib: u64) -> PathBuf {
    let status = std::process::Command::new(python())
        .arg(models("make_large_model.py"))
        .arg(dir)
        .args(["--mib", &mib.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run make_large_model.py");
    assert!(status.success(), "models/make_large_model.py failed");
    dir.join("model.onnx")
}

/// Files under `dir` (recursively), with their sizes.
fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else if let Ok(m) = p.metadata() {
                out.push((p, m.len()));
            }
        }
    }
    out
}

/// Blob files the coordinator keeps under its data directory (the marker file aside).
fn blob_files(data_dir: &Path) -> Vec<(PathBuf, u64)> {
    files_under(&data_dir.join("blobs"))
        .into_iter()
        .filter(|(p, _)| p.file_name().is_some_and(|n| n != "DATABASE"))
        .collect()
}

fn recipe(name: &str) -> fleetbench_cli::optimize::RecipeArgs {
    fleetbench_cli::optimize::RecipeArgs::named(name)
}

async fn run_job(client: &Client, model: &str, variants: &str) -> pb::JobDetail {
    let id = jobs::submit(
        client,
        &JobArgs {
            model: Some(model.into()),
            variants: vec![variants.into()],
            iterations: Some(10),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    wait_job(client, &id, Duration::from_secs(300)).await;
    job_detail(client, &id).await
}

/// An in-process agent on a host of its own (so two run at once).
fn agent(coord: &TestCoordinator, name: &str, dir: &Path) -> fleetbench_agent::AgentConfig {
    let mut c = coord.agent(name, &[], dir);
    c.host_id = format!("host-{name}");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_model_with_external_data_is_pushed_run_by_two_agents_quantized_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let model = large_model(&dir.path().join("model"), large_mib());
    let local = transfer::collect(&model).unwrap();
    assert!(local.set.files.len() > 2, "{:?}", local.set.files);
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let _a = TestAgent::start(agent(&coord, "a", dir.path()));
    let _b = TestAgent::start(agent(&coord, "b", dir.path()));
    wait_online(&client, 2).await;

    let v = models::push(&client, &model, "large", None, None, None, None)
        .await
        .unwrap();
    assert_eq!(
        (
            v.artifact_sha256.as_str(),
            v.file_count as usize,
            v.size_bytes
        ),
        (
            local.sha256.as_str(),
            local.set.files.len(),
            local.set.total_bytes()
        )
    );
    // SQLite keeps the bytes as files beside the database, each under its own hash.
    let stored = blob_files(dir.path());
    for f in &local.set.files {
        assert!(
            stored
                .iter()
                .any(|(p, n)| p.ends_with(&f.sha256) && *n == f.size_bytes),
            "{} is stored as a file",
            f.path
        );
    }

    let detail = run_job(&client, "large", "fp32").await;
    assert_eq!(
        detail.summary.as_ref().unwrap().state,
        "succeeded",
        "{detail:?}"
    );
    assert_eq!(detail.tasks.len(), 2);
    for name in ["a", "b"] {
        // Each agent laid the set out with its original names, where ONNX Runtime found them.
        let set_dir = dir.path().join(name).join("cache/sets").join(&local.sha256);
        assert!(set_dir.join("weights/layer000.bin").exists(), "{name}");
        assert!(set_dir.join(".complete").exists(), "{name}");
    }

    // Quantized, it stays in the same form: a model and its data file.
    let q = models::optimize(&client, "large", &recipe("int8-dynamic"), None, None)
        .await
        .unwrap();
    assert_eq!(q.variant.file_count, 2, "{:?}", q.variant);
    assert!(
        q.variant.size_bytes < v.size_bytes / 3,
        "int8 weights: {} of {}",
        q.variant.size_bytes,
        v.size_bytes
    );
    let detail = run_job(&client, "large", "int8-dynamic").await;
    assert_eq!(
        detail.summary.as_ref().unwrap().state,
        "succeeded",
        "{detail:?}"
    );
    let run = detail.tasks[0].run.as_ref().unwrap();
    assert!(run.queries >= 10);

    // Deleting the base needs --recursive while a variant derives from it; a dry run deletes nothing.
    let refused = client
        .models()
        .delete_variant(pb::DeleteVariantRequest {
            model: "large".into(),
            variant: "fp32".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("int8-dynamic"), "{refused:?}");
    let dry = client
        .models()
        .delete_variant(pb::DeleteVariantRequest {
            model: "large".into(),
            variant: "fp32".into(),
            recursive: true,
            dry_run: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((dry.variants.len(), dry.runs), (2, 4));
    assert_eq!(list_variants(&client, "large").await.len(), 2);
    let done = client
        .models()
        .delete_variant(pb::DeleteVariantRequest {
            model: "large".into(),
            variant: "fp32".into(),
            recursive: true,
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((done.runs, done.jobs), (4, 2), "{done:?}");
    assert!(done.bytes_freed >= v.size_bytes + q.variant.size_bytes);
    assert!(list_variants(&client, "large").await.is_empty());
    assert!(
        blob_files(dir.path()).is_empty(),
        "every blob went: {:?}",
        blob_files(dir.path())
    );
    let rank = rank::run(
        &client,
        rank::RankArgs {
            include_invalid: true,
            output: Format::Json,
            ..rank::RankArgs::for_model("large")
        },
    )
    .await;
    assert!(rank.is_err(), "no runs are left to rank");
}

/// Polls until a file under `dir` whose name ends with `suffix` holds at least `bytes`.
fn wait_for_file(dir: &Path, suffix: &str, bytes: u64, what: &str) -> PathBuf {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((p, _)) = files_under(dir)
            .into_iter()
            .find(|(p, n)| p.to_string_lossy().ends_with(suffix) && *n >= bytes)
        {
            return p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} under {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_killed_mid_transfer_resumes_from_the_bytes_the_coordinator_holds() {
    let dir = tempfile::tempdir().unwrap();
    let model = large_model(&dir.path().join("model"), large_mib());
    let local = transfer::collect(&model).unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let push = || {
        let mut cmd = std::process::Command::new(built_bin("fleetbench"));
        cmd.args(["--coordinator", &coord.url, "models", "push"])
            .env("FLEETBENCH_TOKEN", &coord.tokens.admin)
            .arg(&model)
            .args(["--name", "large"])
            .env("FLEETBENCH_CLIENT_ID", "cli-resume-test")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    let mut first = push().spawn().unwrap();
    // Killed once the coordinator holds a few whole chunks of some file.
    wait_for_file(&dir.path().join("staging"), "", 4 << 20, "staged upload");
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        list_variants(&client, "large").await.is_empty(),
        "nothing registered yet"
    );

    // The same client finds the bytes it sent; another client gets an upload of its own.
    let start = |who: &str| {
        let mut wire = pb::ArtifactSet::from(&local.set);
        wire.sha256 = local.sha256.clone();
        let mut r = tonic::Request::new(pb::StartUploadRequest { set: Some(wire) });
        r.metadata_mut().insert(CLIENT_KEY, who.parse().unwrap());
        r
    };
    let mine = client
        .models()
        .start_upload(start("cli-resume-test"))
        .await
        .unwrap()
        .into_inner();
    let held: u64 = mine.files.iter().map(|f| f.received_bytes).sum();
    assert!(
        held > 0 && held < local.set.total_bytes(),
        "held {held} of {}",
        local.set.total_bytes()
    );
    let theirs = client
        .models()
        .start_upload(start("someone-else"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(theirs.upload_id, mine.upload_id);
    let mut finish = tonic::Request::new(pb::FinishUploadRequest {
        upload_id: mine.upload_id.clone(),
    });
    finish
        .metadata_mut()
        .insert(CLIENT_KEY, "someone-else".parse().unwrap());
    let e = client.models().finish_upload(finish).await.unwrap_err();
    assert!(e.message().contains("belongs to another client"), "{e:?}");

    // Pushed again, it continues from there and the set is whole.
    let out = push().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("resuming") && stderr.contains("already holds"),
        "the second push says it resumed: {stderr}"
    );
    let v = &list_variants(&client, "large").await[0];
    assert_eq!(v.artifact_sha256, local.sha256);
    // Every file stored once under its hash (and the set's manifest), nothing staged left over.
    let stored: u64 = blob_files(dir.path()).iter().map(|(_, n)| n).sum();
    assert_eq!(
        stored,
        local.set.total_bytes() + local.set.manifest().len() as u64
    );
    assert!(files_under(&dir.path().join("staging")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_killed_mid_transfer_resumes_and_the_run_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let model = large_model(&dir.path().join("model"), large_mib());
    let coord = TestCoordinator::sqlite(dir.path(), |c| c.lease_timeout_ms = 1500).await;
    let client = coord.client().await;
    let log = dir.path().join("agent.log");
    let spawn = |log: &Path| {
        std::process::Command::new(built_bin("fleetbench-agent"))
            .args(["--coordinator", &coord.url, "--name", "dl"])
            .env("FLEETBENCH_JOIN_TOKEN", &coord.tokens.join)
            .arg("--state-dir")
            .arg(dir.path().join("dl"))
            .arg("--ort-lib")
            .arg(ort_lib())
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    };
    let mut first = spawn(&log);
    wait_online(&client, 1).await;
    models::push(&client, &model, "large", None, None, None, None)
        .await
        .unwrap();
    let id = jobs::submit(
        &client,
        &JobArgs {
            model: Some("large".into()),
            iterations: Some(10),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let part = wait_for_file(
        &dir.path().join("dl/cache"),
        ".part",
        2 << 20,
        "partial download",
    );
    first.kill().unwrap();
    first.wait().unwrap();
    let kept = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    assert!(kept > 0, "the partial download stays for the resume");

    let log2 = dir.path().join("agent2.log");
    let mut second = spawn(&log2);
    let s = wait_job(&client, &id, Duration::from_secs(300)).await;
    let _ = second.kill();
    let _ = second.wait();
    let text = std::fs::read_to_string(&log2).unwrap();
    assert_eq!(s.state, "succeeded", "{text}");
    assert!(
        text.contains("Resuming a download."),
        "the restarted agent resumed the file it had: {text}"
    );
    assert!(
        files_under(&dir.path().join("dl/cache"))
            .iter()
            .all(|(p, _)| !p.to_string_lossy().ends_with(".part")),
        "no partial file is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_sets_are_refused_naming_the_problem_and_nothing_is_half_stored() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |c| c.max_upload_bytes = 64 << 20).await;
    let client = coord.client().await;
    // Models whose external data lies outside their folder, named by the CLI before anything is sent.
    let script = "import onnx, sys\n\
from onnx import helper, TensorProto\n\
out, loc = sys.argv[1], sys.argv[2]\n\
t = TensorProto(); t.name = 'w'; t.data_type = TensorProto.FLOAT; t.dims.extend([4])\n\
t.data_location = TensorProto.EXTERNAL\n\
e = t.external_data.add(); e.key, e.value = 'location', loc\n\
g = helper.make_graph([helper.make_node('Add', ['x', 'w'], ['y'])], 'g',\n\
    [helper.make_tensor_value_info('x', TensorProto.FLOAT, [4])],\n\
    [helper.make_tensor_value_info('y', TensorProto.FLOAT, [4])], [t])\n\
m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 13)]); m.ir_version = 8\n\
open(out, 'wb').write(m.SerializeToString())\n";
    for (loc, want) in [
        ("../../etc/passwd", "leaves the model's folder"),
        ("/etc/passwd", "absolute path"),
        ("weights/missing.bin", "missing"),
    ] {
        let path = dir.path().join("escape.onnx");
        let status = std::process::Command::new(python())
            .args(["-c", script])
            .arg(&path)
            .arg(loc)
            .status()
            .unwrap();
        assert!(status.success());
        let e = models::push(&client, &path, "bad", None, None, None, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("initializer 'w'") && e.contains(want),
            "{loc}: {e}"
        );
    }

    // Sets sent by other clients are checked by the coordinator.
    let file = |path: &str, data: &[u8]| pb::ArtifactFile {
        path: path.into(),
        size_bytes: data.len() as u64,
        sha256: fleetbench_common::sha256_hex(data),
    };
    let set = |files: Vec<pb::ArtifactFile>, sha: &str| pb::StartUploadRequest {
        set: Some(pb::ArtifactSet {
            sha256: sha.into(),
            model_path: "m.onnx".into(),
            files,
            total_bytes: 0,
        }),
    };
    let refused = |r: Result<tonic::Response<pb::UploadStatus>, tonic::Status>| {
        r.expect_err("refused").message().to_string()
    };
    let m = file("m.onnx", b"model");
    let e = refused(
        client
            .models()
            .start_upload(set(vec![m.clone(), file("../x.bin", b"x")], ""))
            .await,
    );
    assert!(e.contains("leaves the model's folder"), "{e}");
    let e = refused(
        client
            .models()
            .start_upload(set(vec![m.clone()], &"0".repeat(64)))
            .await,
    );
    assert!(e.contains("by its files, not"), "{e}");
    let mut huge = file("w.bin", b"w");
    huge.size_bytes = 1 << 40;
    let e = refused(
        client
            .models()
            .start_upload(set(vec![m.clone(), huge], ""))
            .await,
    );
    assert!(e.contains("max_upload_bytes"), "{e}");

    // An empty file is not stored until it is sent (as nothing); then the upload finishes.
    // (Its model is another file than `m`, which the corrupt-bytes checks below need unstored.)
    let m0 = file("m.onnx", b"model 0");
    let empty = file("empty.bin", b"");
    let with_empty = client
        .models()
        .start_upload(set(vec![m0.clone(), empty.clone()], ""))
        .await
        .unwrap()
        .into_inner();
    assert!(with_empty.files.iter().all(|f| !f.stored), "{with_empty:?}");
    for (f, data) in [(&m0, &b"model 0"[..]), (&empty, &b""[..])] {
        client
            .models()
            .upload_file(futures::stream::iter(vec![pb::UploadChunk {
                upload_id: with_empty.upload_id.clone(),
                file_sha256: f.sha256.clone(),
                offset: 0,
                data: data.to_vec(),
            }]))
            .await
            .unwrap();
    }
    let done = client
        .models()
        .finish_upload(pb::FinishUploadRequest {
            upload_id: with_empty.upload_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.files.len(), 2);
    // Sizes that overflow are refused, not wrapped past the limit.
    let mut a = file("a.bin", b"a");
    let mut b = file("b.bin", b"b");
    a.size_bytes = u64::MAX / 2 + 1;
    b.size_bytes = u64::MAX / 2 + 1;
    let e = refused(
        client
            .models()
            .start_upload(set(vec![m.clone(), a, b], ""))
            .await,
    );
    assert!(e.contains("more than 2^64"), "{e}");

    // Corrupt, oversized and truncated bytes.
    let status = client
        .models()
        .start_upload(set(vec![m.clone()], ""))
        .await
        .unwrap()
        .into_inner();
    let send = |data: &[u8]| {
        futures::stream::iter(vec![pb::UploadChunk {
            upload_id: status.upload_id.clone(),
            file_sha256: m.sha256.clone(),
            offset: 0,
            data: data.to_vec(),
        }])
    };
    let e = client
        .models()
        .upload_file(send(b"MODEL"))
        .await
        .unwrap_err();
    assert!(e.message().contains("arrived corrupted"), "{e:?}");
    let e = client
        .models()
        .upload_file(send(b"model and more"))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("more bytes arrived than its size"),
        "{e:?}"
    );
    let partial = client
        .models()
        .upload_file(send(b"mod"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        partial.files[0].received_bytes, 0,
        "a short piece is not kept"
    );
    let e = client
        .models()
        .finish_upload(pb::FinishUploadRequest {
            upload_id: status.upload_id.clone(),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("is not complete"), "{e:?}");

    // An upload left alone is collected after upload_expiry_hours.
    let store = fleetbench_coordinator::store::open(&coord.database)
        .await
        .unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let ctx =
        fleetbench_coordinator::context::Context::new(store, test_config(&coord.database), rx);
    let later = fleetbench_common::now_ms() + 25 * 3_600_000;
    let upkeep = fleetbench_coordinator::maintenance::run_once(&ctx, later)
        .await
        .unwrap();
    assert!(upkeep.uploads_collected.unwrap() >= 1, "{upkeep:?}");
    let e = client
        .models()
        .finish_upload(pb::FinishUploadRequest {
            upload_id: status.upload_id.clone(),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("expired after 24 h"), "{e:?}");

    // Nothing half-stored: no variant, no blob but the finished upload's, nothing staged.
    assert!(list_variants(&client, "").await.is_empty());
    let mut kept: Vec<String> = blob_files(dir.path())
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    let mut finished = vec![m0.sha256.clone(), empty.sha256.clone(), done.sha256.clone()];
    finished.sort();
    assert_eq!(
        kept, finished,
        "only the finished set's files and its manifest"
    );
    assert!(
        files_under(&dir.path().join("staging"))
            .iter()
            .all(|(_, n)| *n == 0),
        "{:?}",
        files_under(&dir.path().join("staging"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_drops_raw_windows_and_leaves_rankings_unchanged() {
    use fleetbench_coordinator::context::Context;
    use fleetbench_coordinator::maintenance;
    let fleet = SoloFleet::start().await;
    push_digits(&fleet.client).await;
    let detail = run_job(&fleet.client, "digits", "fp32").await;
    let run_id = detail.tasks[0].run.as_ref().unwrap().run_id.clone();
    let ranking = || async {
        fleet
            .client
            .rankings()
            .rank(pb::RankRequest {
                model: "digits".into(),
                include_invalid: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    };
    let before = ranking().await;
    let store = fleetbench_coordinator::store::open(&fleet.coord.database)
        .await
        .unwrap();
    assert!(store.window_count(&run_id).await.unwrap() > 0);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let config = fleetbench_coordinator::CoordinatorConfig {
        window_retention_days: 1,
        ..test_config(&fleet.coord.database)
    };
    let ctx = Context::new(store.clone(), config.clone(), rx.clone());
    // Today the run is fresh: nothing goes.
    let now = fleetbench_common::now_ms();
    let kept = maintenance::run_once(&ctx, now).await.unwrap();
    assert_eq!(kept.windows_dropped, Some(0));
    // Two days on, its windows go; another replica finds the work claimed.
    let later = now + 2 * 86_400_000;
    let done = maintenance::run_once(&ctx, later).await.unwrap();
    assert!(done.windows_dropped.unwrap() > 0, "{done:?}");
    assert_eq!(store.window_count(&run_id).await.unwrap(), 0);
    let other = Context::new(store.clone(), config, rx);
    assert_eq!(
        maintenance::run_once(&other, later)
            .await
            .unwrap()
            .windows_dropped,
        None
    );
    assert_eq!(
        ranking().await,
        before,
        "rankings read summaries, not windows"
    );
    let still = job_detail(&fleet.client, &detail.summary.unwrap().job_id).await;
    assert_eq!(still.tasks[0].run, detail.tasks[0].run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_refuses_what_its_cache_budget_or_its_runtime_cannot_take() {
    let dir = tempfile::tempdir().unwrap();
    let model = large_model(&dir.path().join("model"), 64);
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let mut small = agent(&coord, "small", dir.path());
    small.cache_max_bytes = 16 << 20;
    let _agent = TestAgent::start(small);
    wait_online(&client, 1).await;
    models::push(&client, &model, "large", None, None, None, None)
        .await
        .unwrap();
    let detail = run_job(&client, "large", "fp32").await;
    let task = &detail.tasks[0];
    assert_eq!(task.state, "failed", "{detail:?}");
    assert!(
        task.error
            .contains("more than its budget (--cache-max-bytes 16777216)"),
        "{}",
        task.error
    );

    // A model of an opset newer than the agent's ONNX Runtime is refused before the run.
    let newer = dir.path().join("newer.onnx");
    let status = std::process::Command::new(python())
        .args([
            "-c",
            "import onnx, sys\n\
from onnx import helper, TensorProto\n\
g = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], 'g',\n\
    [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1])],\n\
    [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1])])\n\
m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 13)]); m.ir_version = 8\n\
m.opset_import[0].version = 99\n\
open(sys.argv[1], 'wb').write(m.SerializeToString())\n",
        ])
        .arg(&newer)
        .status()
        .unwrap();
    assert!(status.success());
    models::push(&client, &newer, "newer", None, None, None, None)
        .await
        .unwrap();
    let detail = run_job(&client, "newer", "fp32").await;
    let task = &detail.tasks[0];
    assert_eq!(task.state, "failed", "{detail:?}");
    let version = fleetbench_runtime::load(Some(&ort_lib()))
        .unwrap()
        .version
        .clone();
    assert!(
        task.error.contains("opset 99") && task.error.contains(&version),
        "names both versions: {}",
        task.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_that_fills_the_coordinators_disk_fails_clearly_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = large_model(&dir.path().join("model"), 16);
    let local = transfer::collect(&model).unwrap();
    // The coordinator in a mount namespace of its own, its data directory on a 32 MiB tmpfs.
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let (addr_file, pid_file) = (dir.path().join("addr"), dir.path().join("pid"));
    let log = dir.path().join("coordinator.log");
    let script = format!(
        "mount -t tmpfs -o size=32m tmpfs {small} || exit 1; \
         {bin} --listen 127.0.0.1:0 --database sqlite://{db} --data-dir {small} --addr-file {addr} & \
         echo $! > {pid}; wait",
        small = small.display(),
        bin = built_bin("fleetbench-coordinator").display(),
        db = dir.path().join("fleet.db").display(),
        addr = addr_file.display(),
        pid = pid_file.display(),
    );
    let ns = NamespacedCoordinator::start(&script, &addr_file, &pid_file, &log);
    let inside = ns.inside(&small);
    let database = format!("sqlite://{}", dir.path().join("fleet.db").display());
    let client = Tokens::made_in(&database).await.client(&ns.url).await;

    // The push starts while there is room; then the disk fills up under it.
    let mut wire = pb::ArtifactSet::from(&local.set);
    wire.sha256 = local.sha256.clone();
    let status = client
        .models()
        .start_upload(pb::StartUploadRequest { set: Some(wire) })
        .await
        .unwrap()
        .into_inner();
    let free = fleetbench_common::files::free_bytes(&inside).unwrap();
    std::fs::write(
        inside.join("filler"),
        vec![1u8; (free - (2 << 20)) as usize],
    )
    .unwrap();
    let file = local.set.files.iter().max_by_key(|f| f.size_bytes).unwrap();
    let bytes = std::fs::read(&local.paths[&file.path]).unwrap();
    let chunks: Vec<pb::UploadChunk> = bytes
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| pb::UploadChunk {
            upload_id: if i == 0 {
                status.upload_id.clone()
            } else {
                String::new()
            },
            file_sha256: if i == 0 {
                file.sha256.clone()
            } else {
                String::new()
            },
            offset: 0,
            data: c.to_vec(),
        })
        .collect();
    let e = client
        .models()
        .upload_file(futures::stream::iter(chunks))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("disk is full"), "{e:?}");
    // It stays up, stores nothing half-made, and gives the space back.
    assert!(list_variants(&client, "").await.is_empty());
    let staged: u64 = files_under(&inside.join("staging"))
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert_eq!(staged, 0, "the partial file was discarded");
    // A push now is refused before it sends anything, saying how much room it needs.
    let e = models::push(&client, &model, "large", None, None, None, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("bytes free; this push needs"), "{e}");
    // Space back: the same push goes through.
    std::fs::remove_file(inside.join("filler")).unwrap();
    let v = models::push(&client, &model, "large", None, None, None, None)
        .await
        .unwrap();
    assert_eq!(v.artifact_sha256, local.sha256);
    ns.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn downloads_resume_from_any_offset_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..(3 << 20) + 12_345u32)
        .map(|i| (i % 241) as u8)
        .collect();
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, &bytes).unwrap();
    let pg = PgDb::create().await;
    for database in [
        format!("sqlite://{}", dir.path().join("fleet.db").display()),
        pg.url.clone(),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let coord = TestCoordinator::serve(test_config(&database), listener).await;
        let client = coord.client().await;
        let blob = client.upload(&file).await.unwrap();
        for offset in [
            0u64,
            1,
            (1 << 20) - 1,
            1 << 20,
            2_500_000,
            bytes.len() as u64,
        ] {
            let mut stream = client
                .models()
                .download_blob(pb::DownloadBlobRequest {
                    sha256: blob.sha256.clone(),
                    offset,
                })
                .await
                .unwrap()
                .into_inner();
            let mut got = Vec::new();
            while let Some(c) = stream.message().await.unwrap() {
                got.extend(c.data);
            }
            assert!(
                got == bytes[offset as usize..],
                "{database}: from {offset}, {} bytes came",
                got.len()
            );
        }
        let past = client
            .models()
            .download_blob(pb::DownloadBlobRequest {
                sha256: blob.sha256.clone(),
                offset: bytes.len() as u64 + 1,
            })
            .await;
        let e = match past {
            Err(e) => e,
            Ok(s) => s.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
        coord.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_the_store_fails_under_ends_with_its_error_instead_of_hanging() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("fleet.db").display());
    let (coord, store) = TestCoordinator::faulty(test_config(&database)).await;
    let client = coord.client().await;
    // A file of many chunks, more than the receiver keeps in flight.
    let bytes: Vec<u8> = (0..(16u32 << 20)).map(|i| (i % 253) as u8).collect();
    let file = pb::ArtifactFile {
        path: "m.onnx".into(),
        size_bytes: bytes.len() as u64,
        sha256: fleetbench_common::sha256_hex(&bytes),
    };
    let status = client
        .models()
        .start_upload(pb::StartUploadRequest {
            set: Some(pb::ArtifactSet {
                model_path: "m.onnx".into(),
                files: vec![file.clone()],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    store.fail_staging.store(true, Ordering::SeqCst);
    let chunks: Vec<pb::UploadChunk> = bytes
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| pb::UploadChunk {
            upload_id: if i == 0 {
                status.upload_id.clone()
            } else {
                String::new()
            },
            file_sha256: if i == 0 {
                file.sha256.clone()
            } else {
                String::new()
            },
            offset: 0,
            data: c.to_vec(),
        })
        .collect();
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        client.models().upload_file(futures::stream::iter(chunks)),
    )
    .await
    .expect("the upload ends instead of hanging");
    let e = answer.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(store.failed_calls.load(Ordering::SeqCst) >= 1);
}

/// A model whose initializers read `files` (name, bytes) beside it: y = x + w_0 + w_1 + …, each w a
/// float32 vector of the file's length / 4 (0 for an empty file, which reads nothing).
fn model_reading(dir: &Path, name: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for (f, bytes) in files {
        std::fs::write(dir.join(f), bytes).unwrap();
    }
    let spec: Vec<String> = files
        .iter()
        .map(|(f, b)| format!("('{f}', {})", b.len() / 4))
        .collect();
    let script = format!(
        r#"import sys
from onnx import helper, TensorProto
files = [{}]
n = max([k for _, k in files] + [1])
inits, nodes, prev = [], [], 'x'
for i, (f, k) in enumerate(files):
    t = TensorProto(); t.name = f'w{{i}}'; t.data_type = TensorProto.FLOAT; t.dims.extend([k])
    t.data_location = TensorProto.EXTERNAL
    for key, v in (('location', f), ('offset', '0'), ('length', str(4 * k))):
        e = t.external_data.add(); e.key, e.value = key, v
    inits.append(t)
    if k == n:
        out = f'y{{i}}'; nodes.append(helper.make_node('Add', [prev, f'w{{i}}'], [out])); prev = out
nodes.append(helper.make_node('Identity', [prev], ['y']))
g = helper.make_graph(nodes, sys.argv[2], [helper.make_tensor_value_info('x', TensorProto.FLOAT, [n])],
    [helper.make_tensor_value_info('y', TensorProto.FLOAT, [n])], inits)
m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 13)]); m.ir_version = 8
open(sys.argv[1], 'wb').write(m.SerializeToString())
"#,
        spec.join(", ")
    );
    let path = dir.join(name);
    let status = std::process::Command::new(python())
        .args(["-c", &script])
        .arg(&path)
        .arg(name)
        .status()
        .unwrap();
    assert!(status.success());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_and_empty_files_and_shared_files_travel_and_stay() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let _agent = TestAgent::start(agent(&coord, "solo", dir.path()));
    wait_online(&client, 1).await;

    // Two files with the same bytes (sent once, not by two racing streams) and an empty one.
    let same: Vec<u8> = (0..(3u32 << 20) / 4)
        .flat_map(|i| ((i % 7) as f32).to_le_bytes())
        .collect();
    let twins = model_reading(
        &dir.path().join("twins"),
        "twins.onnx",
        &[
            ("a.bin", same.clone()),
            ("b.bin", same),
            ("empty.bin", Vec::new()),
        ],
    );
    let v = models::push(&client, &twins, "twins", None, None, None, None)
        .await
        .unwrap();
    assert_eq!(v.file_count, 4, "{v:?}");
    let detail = run_job(&client, "twins", "fp32").await;
    assert_eq!(detail.tasks[0].state, "succeeded", "{detail:?}");

    // A set recorded but not yet registered keeps the files it shares with a variant deleted
    // meanwhile.
    let w: Vec<u8> = (0..64u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let first = model_reading(
        &dir.path().join("shared"),
        "first.onnx",
        &[("w.bin", w.clone())],
    );
    let second = model_reading(&dir.path().join("shared"), "second.onnx", &[("w.bin", w)]);
    models::push(&client, &first, "first", None, None, None, None)
        .await
        .unwrap();
    let pending = transfer::collect(&second).unwrap();
    transfer::push_set(&client, &pending).await.unwrap();
    client
        .models()
        .delete_variant(pb::DeleteVariantRequest {
            model: "first".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let v = client
        .models()
        .register_variant(pb::RegisterVariantRequest {
            model: "second".into(),
            artifact_sha256: pending.sha256.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.file_count, 2);
    let out = dir.path().join("fetched");
    transfer::fetch_set(&client, &pending.sha256, &out)
        .await
        .unwrap();
    assert!(out.join("w.bin").exists());
}
