//! Model optimization end to end: recipes of the Rust optimizer make variants of the digits model that
//! run in ONNX Runtime, are stored with their lineage, take part in jobs, and are ranked with their
//! accuracy, its delta to the base and their fidelity to it; bad input is refused and nothing is stored.

use std::time::Duration;

use fleetbench_cli::commands::{jobs, models};
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_cli::optimize::RecipeArgs;
use fleetbench_common::proto::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TypeProto,
    ValueInfoProto, type_proto,
};
use fleetbench_proto::v1::RankRequest;
use fleetbench_tests::*;

fn recipe(name: &str) -> RecipeArgs {
    RecipeArgs::named(name)
}

fn prune(sparsity: f64, structured: bool) -> RecipeArgs {
    RecipeArgs {
        sparsity: Some(sparsity),
        structured,
        ..recipe("prune")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn optimized_variants_are_stored_with_lineage_benchmarked_and_ranked() {
    let fleet = SoloFleet::start().await;
    let client = fleet.client.clone();
    push_digits(&client).await;
    let fp32_size = list_variants(&client, "digits").await[0].size_bytes;

    let dynamic = models::optimize(&client, "digits", &recipe("int8-dynamic"), None, None)
        .await
        .unwrap();
    assert_eq!(dynamic.variant.variant, "int8-dynamic");
    assert_eq!(dynamic.variant.variant_of, "fp32");
    assert_eq!(dynamic.variant.technique, "quantized");
    assert_eq!(dynamic.report.rewritten.len(), 3, "three MatMuls");
    assert!(
        dynamic.variant.size_bytes * 3 < fp32_size,
        "int8 weights are a quarter of fp32"
    );
    let lineage: serde_json::Value = serde_json::from_str(&dynamic.variant.recipe_json).unwrap();
    assert_eq!(lineage["recipe"]["recipe"], "int8-dynamic");
    assert!(
        lineage["tool"]
            .as_str()
            .unwrap()
            .starts_with("fleetbench-optimizer")
    );

    // int8-static calibrates on the model's own eval inputs when no set is given.
    let stat = models::optimize(&client, "digits", &recipe("int8-static"), None, None)
        .await
        .unwrap();
    assert_eq!(stat.report.rewritten.len(), 3);

    let pruned = models::optimize(&client, "digits", &prune(0.5, true), None, None)
        .await
        .unwrap();
    assert_eq!(pruned.variant.variant, "pruned-s50");
    assert_eq!(pruned.variant.technique, "pruned");
    // Two hidden layers shrink; the last one feeds the graph output and is skipped with the reason.
    assert_eq!(pruned.report.rewritten.len(), 2);
    assert!(pruned.report.skipped[0].reason.contains("graph output"));
    let hidden: Vec<i64> = pruned.variant.inputs.iter().map(|i| i.dims[1]).collect();
    assert_eq!(hidden, vec![64], "the input is unchanged");
    assert!(
        pruned.variant.size_bytes * 3 < fp32_size,
        "half the neurons of two 512-wide layers"
    );

    // Chained: prune, then quantize.
    let chained = models::optimize(
        &client,
        "digits",
        &recipe("int8-dynamic"),
        Some("pruned-s50"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(chained.variant.variant, "pruned-s50-int8-dynamic");
    assert_eq!(chained.variant.variant_of, "pruned-s50");
    let table = models::variant_table(&list_variants(&client, "digits").await).to_string();
    assert!(table.contains("└ pruned-s50-int8-dynamic"), "{table}");

    let job = JobArgs {
        model: Some("digits".into()),
        variants: vec![
            "fp32".into(),
            "int8-dynamic".into(),
            "pruned-s50".into(),
            "pruned-s50-int8-dynamic".into(),
        ],
        iterations: Some(300),
        warmup: Some(20),
        ..Default::default()
    };
    let id = jobs::submit(&client, &job).await.unwrap();
    let s = wait_job(&client, &id, Duration::from_secs(180)).await;
    assert_eq!(s.state, "succeeded", "{s:?}");

    let detail = job_detail(&client, &id).await;
    for t in &detail.tasks {
        let run = t.run.as_ref().unwrap();
        let q: fleetbench_common::quality::Quality =
            serde_json::from_str(&run.quality_json).unwrap();
        let c = q.classification.expect("the eval set has labels");
        assert_eq!(c.per_class.len(), 10, "ten digits");
        assert_eq!(c.samples, 360);
        assert!(c.topk.unwrap() >= c.top1 && c.k == 5);
        assert!(c.macro_f1 > 0.8 && c.macro_f1 <= 1.0);
        assert!((run.accuracy.unwrap() - c.top1).abs() < 1e-12);
        match (run.variant.as_str(), q.fidelity) {
            ("fp32", f) => assert!(f.is_none(), "the base has nothing to be faithful to"),
            (_, Some(f)) => {
                assert!(f.eval_set && f.samples == 360);
                assert!(f.top1_agreement.unwrap() > 0.8 && f.cosine > 0.8, "{f:?}");
            }
            (v, None) => panic!("{v} has no fidelity"),
        }
    }

    let rank = |drop: Option<f64>| {
        let client = client.clone();
        async move {
            client
                .rankings()
                .rank(RankRequest {
                    model: "digits".into(),
                    objective: "p50".into(),
                    max_accuracy_drop: drop,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .rows
        }
    };
    let rows = rank(None).await;
    assert_eq!(rows.len(), 4);
    let row = |v: &str| rows.iter().find(|r| r.variant == v).unwrap().clone();
    let d = row("int8-dynamic");
    assert!(
        d.accuracy_delta_pts.unwrap().abs() <= 1.0,
        "int8 dynamic within a point: {d:?}"
    );
    assert!(
        d.agreement.unwrap() > 0.97 && d.fidelity_cosine.unwrap() > 0.99,
        "{d:?}"
    );
    assert!(row("fp32").agreement.is_none());
    let p = row("pruned-s50");
    let p_drop = -p.accuracy_delta_pts.unwrap();
    assert!(
        p_drop > 0.0,
        "pruning half the neurons without fine-tuning costs accuracy: {p:?}"
    );
    // --max-accuracy-drop leaves out what costs more than it allows.
    let kept = rank(Some(p_drop / 2.0)).await;
    assert!(kept.iter().any(|r| r.variant == "int8-dynamic"));
    assert!(!kept.iter().any(|r| r.variant == "pruned-s50"), "{kept:?}");
}

fn float_info(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(1),
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A model whose only node is an If with subgraphs.
fn control_flow_model() -> Vec<u8> {
    let branch = |name: &str| GraphProto {
        name: Some(name.into()),
        node: vec![NodeProto {
            op_type: Some("Identity".into()),
            input: vec!["x".into()],
            output: vec![format!("{name}_out")],
            ..Default::default()
        }],
        output: vec![float_info(&format!("{name}_out"))],
        ..Default::default()
    };
    let graph_attr = |name: &str| AttributeProto {
        name: Some(name.into()),
        r#type: Some(5),
        g: Some(branch(name)),
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(13),
        }],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: vec![NodeProto {
                op_type: Some("If".into()),
                name: Some("choose".into()),
                input: vec!["cond".into()],
                output: vec!["y".into()],
                attribute: vec![graph_attr("then_branch"), graph_attr("else_branch")],
                ..Default::default()
            }],
            input: vec![
                ValueInfoProto {
                    name: Some("cond".into()),
                    r#type: Some(TypeProto {
                        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                            elem_type: Some(9),
                            shape: None,
                        })),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                float_info("x"),
            ],
            output: vec![float_info("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    prost::Message::encode_to_vec(&model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_the_reason_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    push_digits(&client).await;
    let before = list_variants(&client, "digits").await;
    let err = |r: anyhow::Result<models::Optimized>| format!("{:#}", r.expect_err("refused"));

    for s in [1.0, -0.1, 1.5] {
        let e = err(models::optimize(&client, "digits", &prune(s, true), None, None).await);
        assert!(
            e.contains("--sparsity") && e.contains("outside [0, 1)"),
            "{e}"
        );
    }
    let e = err(models::optimize(&client, "digits", &recipe("int4"), None, None).await);
    assert!(e.contains("unknown recipe 'int4'"), "{e}");
    let e = err(models::optimize(&client, "digits", &recipe("fp16"), Some("nope"), None).await);
    assert!(e.contains("--from") && e.contains("'nope'"), "{e}");

    // A calibration set whose rows do not match the model's input [batch, 64].
    let wrong = dir.path().join("wrong.npy");
    ndarray_npy::write_npy(&wrong, &ndarray::Array2::<f32>::zeros((8, 10))).unwrap();
    let args = RecipeArgs {
        calibration: Some(wrong.clone()),
        ..recipe("int8-static")
    };
    let e = err(models::optimize(&client, "digits", &args, None, None).await);
    assert!(
        e.contains("input 'input'") && e.contains("[10]") && e.contains("[64]"),
        "{e}"
    );
    let args = RecipeArgs {
        calibration: Some(wrong),
        ..recipe("int8-dynamic")
    };
    let e = err(models::optimize(&client, "digits", &args, None, None).await);
    assert!(
        e.contains("--calibration") && e.contains("does not apply"),
        "{e}"
    );

    // Not ONNX; a custom op no recipe applies to; control flow fp16 does not rewrite.
    let text = dir.path().join("notes.onnx");
    std::fs::write(&text, "not a model").unwrap();
    let bytes = std::fs::read(&text).unwrap();
    let e = format!(
        "{:#}",
        fleetbench_cli::optimize::optimize(&bytes, &recipe("int8-dynamic"), None).unwrap_err()
    );
    assert!(e.contains("not an ONNX model"), "{e}");
    let custom = std::fs::read(models("testdata/unsupported-op.onnx")).unwrap();
    let e = format!(
        "{:#}",
        fleetbench_cli::optimize::optimize(&custom, &recipe("fp16"), None).unwrap_err()
    );
    assert!(
        e.contains("NoSuchOp") && e.contains("found nothing to rewrite"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        fleetbench_cli::optimize::optimize(&control_flow_model(), &recipe("fp16"), None)
            .unwrap_err()
    );
    assert!(
        e.contains("node 'choose' (op If)") && e.contains("subgraphs"),
        "{e}"
    );

    let after = list_variants(&client, "digits").await;
    assert_eq!(before, after, "nothing was stored");
}

/// The onnx package's own test data as an eval set: a Conv model with its test_data_set folder. The
/// agent compares each variant's outputs with the reference outputs of output_0.pb.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn onnx_test_data_sets_are_eval_sets_with_reference_outputs() {
    let case = onnx_test_case("pytorch-converted/test_Conv2d");
    let fleet = SoloFleet::start().await;
    let client = fleet.client.clone();
    let dir = &fleet.dir;

    // The folder brings its own reference outputs: labels beside it are refused.
    let e = format!(
        "{:#}",
        models::push(
            &client,
            &case.join("model.onnx"),
            "conv2d",
            None,
            None,
            None,
            Some((dir.path(), dir.path())),
        )
        .await
        .expect_err("a folder without test data")
    );
    assert!(e.contains("no input_0.pb"), "{e}");
    models::push(
        &client,
        &case.join("model.onnx"),
        "conv2d",
        Some("fp32"),
        None,
        None,
        Some((&case, &case)),
    )
    .await
    .unwrap();
    assert!(
        !list_variants(&client, "conv2d").await[0]
            .eval_labels_sha256
            .is_empty()
    );
    // An opset-6 model: the quantized recipes' ops do not exist there; pruning adds no op.
    let e = format!(
        "{:#}",
        models::optimize(&client, "conv2d", &recipe("int8-dynamic"), None, None)
            .await
            .expect_err("opset 6")
    );
    assert!(e.contains("opset 11") && e.contains("opset 6"), "{e}");
    models::optimize(&client, "conv2d", &prune(0.3, false), None, None)
        .await
        .unwrap();
    let job = JobArgs {
        model: Some("conv2d".into()),
        variants: vec!["all".into()],
        iterations: Some(50),
        warmup: Some(5),
        ..Default::default()
    };
    let id = jobs::submit(&client, &job).await.unwrap();
    let s = wait_job(&client, &id, Duration::from_secs(120)).await;
    assert_eq!(s.state, "succeeded", "{s:?}");
    for t in &job_detail(&client, &id).await.tasks {
        let run = t.run.as_ref().unwrap();
        let q: fleetbench_common::quality::Quality =
            serde_json::from_str(&run.quality_json).unwrap();
        let r = q.reference.expect("reference outputs compared");
        assert!(q.classification.is_none() && run.accuracy.is_none());
        match run.variant.as_str() {
            "fp32" => assert!(
                r.cosine > 0.99999 && r.max_abs_error < 1e-4,
                "the runtime reproduces the reference: {r:?}"
            ),
            _ => {
                assert!(r.cosine > 0.9 && r.max_abs_error > 0.0, "{r:?}");
                assert!(q.fidelity.is_some(), "and is compared with fp32 too");
            }
        }
    }
}

/// The recipes on a convolutional model (materialised by models/make_conv_models.py): each result runs
/// in ONNX Runtime and stays close to the fp32 outputs; structured pruning shrinks channels.
#[test]
fn recipes_apply_to_a_convolutional_model() {
    let path = conv_model("squeezenet");
    let bytes = std::fs::read(&path).unwrap();
    let inputs = models("conv/squeezenet-inputs.npy");
    for (name, args) in [
        ("int8-dynamic", recipe("int8-dynamic")),
        ("int8-weight-only", recipe("int8-weight-only")),
        ("fp16", recipe("fp16")),
        (
            "int8-static",
            RecipeArgs {
                calibration: Some(inputs.clone()),
                ..recipe("int8-static")
            },
        ),
        ("prune", prune(0.5, true)),
    ] {
        let out = fleetbench_cli::optimize::optimize(&bytes, &args, None)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(!out.report.rewritten.is_empty(), "{name} rewrote nothing");
        if name == "prune" {
            assert!(
                out.report.notes.iter().any(|n| n.contains("→")),
                "channels shrunk: {:?}",
                out.report
            );
            assert!(out.report.size_after < out.report.size_before);
        }
    }
}

fn ops(model: &ModelProto, op: &str) -> usize {
    model
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some(op))
        .count()
}

#[test]
fn recipes_fold_constant_weights_of_exported_models_and_check_symbolic_inputs_at_size_one() {
    let dir = tempfile::tempdir().unwrap();
    for as_inputs in [false, true] {
        let bytes = std::fs::read(exported_style_model(dir.path(), as_inputs)).unwrap();
        let what = if as_inputs {
            "initializers listed as inputs"
        } else {
            "Constant-node weights"
        };
        // Every Conv and the Gemm, as ONNX Runtime's quantize_dynamic does (6 ConvInteger, 1 MatMulInteger).
        let dynamic = fleetbench_cli::optimize::optimize(&bytes, &recipe("int8-dynamic"), None)
            .unwrap_or_else(|e| panic!("int8-dynamic on {what}: {e:#}"));
        assert_eq!(
            dynamic.report.rewritten.len(),
            7,
            "{what}: {:?}",
            dynamic.report
        );
        assert_eq!(ops(&dynamic.model, "ConvInteger"), 6, "{what}");
        assert_eq!(ops(&dynamic.model, "MatMulInteger"), 1, "{what}");
        assert!(
            dynamic
                .report
                .notes
                .iter()
                .any(|n| n.contains(if as_inputs {
                    "listed as graph inputs"
                } else {
                    "Constant nodes held weights"
                })),
            "{what}: the report says what was folded: {:?}",
            dynamic.report.notes
        );
        assert!(
            dynamic
                .report
                .notes
                .iter()
                .any(|n| n.contains("input 'x' dimension 'H' (axis 2), 'W' (axis 3) to 1")),
            "{what}: the check run says it set H and W to 1: {:?}",
            dynamic.report.notes
        );
        let weight_only =
            fleetbench_cli::optimize::optimize(&bytes, &recipe("int8-weight-only"), None)
                .unwrap_or_else(|e| panic!("int8-weight-only on {what}: {e:#}"));
        assert_eq!(weight_only.report.rewritten.len(), 7, "{what}");
        // fp16 with a shape given: checked at that size, no note about defaults.
        let shaped = RecipeArgs {
            shape: vec!["x=2x3x24x32".into()],
            ..recipe("fp16")
        };
        let fp16 = fleetbench_cli::optimize::optimize(&bytes, &shaped, None)
            .unwrap_or_else(|e| panic!("fp16 on {what}: {e:#}"));
        assert!(
            !fp16.report.notes.iter().any(|n| n.contains("to 1")),
            "{:?}",
            fp16.report.notes
        );
    }
}
