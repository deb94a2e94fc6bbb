//! Huge pages, through the real agent binary: by default the agent moves ONNX Runtime's memory (the
//! weights, the KV cache) onto transparent huge pages once a task's sessions are loaded;
//! `--huge-pages false` leaves it on small pages. Each run's record says which, and how much of the
//! agent's memory was on huge pages while the model was loaded.

use std::process::Command;
use std::time::Duration;

use fleetbench_cli::commands::jobs::{self, RunJson};
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_runtime::memory::{kernel_has_huge_pages, thp_mode};
use fleetbench_tests::*;

fn agent(coord: &TestCoordinator, name: &str, huge: bool, dir: &std::path::Path) -> Killed {
    let program = Command::new(built_bin("fleetbench-agent"));
    Killed(
        agent_command(program, &coord.url, name, coord, dir)
            .args(["--label", &format!("pages={name}")])
            .args(["--huge-pages", &huge.to_string()])
            .spawn()
            .expect("start the agent"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_puts_the_runtimes_memory_on_huge_pages_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let _huge = agent(&coord, "huge", true, dir.path());
    let _small = agent(&coord, "small", false, dir.path());
    wait_online(&client, 2).await;
    push_tiny_llama(&client, None).await;
    let id = jobs::submit(
        &client,
        &JobArgs {
            model: Some("tiny-llama".into()),
            variants: vec!["all".into()],
            scenario: Some("generate".into()),
            prompt_tokens: Some("32".into()),
            output_tokens: Some("8".into()),
            iterations: Some(8),
            warmup: Some(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let summary = wait_job(&client, &id, Duration::from_secs(180)).await;
    let detail = job_detail(&client, &id).await;
    assert_eq!(summary.state, "succeeded", "{detail:?}");
    assert_eq!(detail.tasks.len(), 2, "one task per platform: {detail:?}");

    let mode = thp_mode();
    let kernel_has_them = kernel_has_huge_pages(mode.as_deref());
    println!("transparent_hugepage: {mode:?}");
    for (name, asked) in [("huge", true), ("small", false)] {
        let task = detail
            .tasks
            .iter()
            .find(|t| t.platform_name.contains(&format!("pages={name}")) || t.agent == name)
            .unwrap_or_else(|| panic!("a task ran on {name}: {detail:?}"));
        let run = task.run.clone().unwrap();
        let record = RunJson::from(&run).record;
        let memory = &record["memory"];
        println!("{name}: {memory}");
        let on = asked && kernel_has_them;
        assert_eq!(
            memory["transparent_huge_pages"],
            mode.clone().unwrap_or_default(),
            "{record}"
        );
        assert_eq!(
            memory["huge_pages_collapsed_bytes"].as_u64().is_some(),
            asked,
            "{name}: {record}"
        );
        let bytes = memory["anon_huge_pages_bytes"].as_u64();
        if on {
            // MADV_COLLAPSE (Linux 6.1 on) moves the loaded model at once; an older kernel says
            // so in the note and leaves it to khugepaged.
            let collapsed = memory["huge_pages_collapsed_bytes"].as_u64().unwrap();
            let note = memory["huge_pages_note"].as_str().unwrap_or("");
            assert!(
                collapsed > 0 || note.contains("MADV_COLLAPSE"),
                "{name}: {record}"
            );
            // The record says what happened, not what was asked for.
            assert_eq!(memory["huge_pages"], collapsed > 0, "{name}: {record}");
            if collapsed > 0 {
                assert!(
                    bytes.unwrap() > 0,
                    "{name}: nothing on huge pages: {record}"
                );
            }
        } else {
            assert_eq!(memory["huge_pages"], false, "{name}: {record}");
        }
        if !asked && mode.as_deref() == Some("madvise") {
            // Only memory that asks gets huge pages in this mode (with `always`, the agent turns them
            // off for itself before it loads anything).
            assert_eq!(bytes, Some(0), "{name}: {record}");
        }
    }
}
