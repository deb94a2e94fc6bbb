//! Decoder-only language models through the real ONNX Runtime: the bundled Llama-style decoder
//! (models/make_llm.py) is detected, and fleetbench's decoding loop — prefill, then one call per token
//! with each call's present KV tensors fed back as the next call's past — produces exactly the tokens
//! that onnxruntime's Python API produced for the same prompt when the script made the model.

use fleetbench_runtime::decoder::{DecoderIo, generate};
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
    // Beyond the model's positions: refused, naming both lengths.
    let max = io.max_positions.unwrap() as usize;
    let e = generate(&mut s, &io, &prompt, max).unwrap_err().to_string();
    assert!(e.contains(&format!("{max} positions")), "{e}");
}

#[test]
fn a_model_that_is_not_a_decoder_is_refused_naming_what_is_missing() {
    let s = session(&models("digits/digits-fp32.onnx"));
    let e = DecoderIo::detect(&s).unwrap_err().to_string();
    assert!(e.contains("no 'input_ids' input"), "{e}");
    assert!(e.contains("input 'input' is none of input_ids"), "{e}");
}
