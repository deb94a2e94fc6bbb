"""The greedy decoding measurement of scripts/ort_greedy.py with onnxruntime-genai instead of a
hand-written loop: genai owns the KV cache and the search, fed token ids directly (no tokenizer). The
script writes a genai_config.json for MODEL.onnx into a temporary folder beside a symlink to the model
(a decoder with the Optimum/genai input and output names; layers, heads, head size, hidden size, vocab
and context length read from the model's metadata and graph), runs greedy search (do_sample false,
min_length = max_length, so exactly --output new tokens), first checks that it reproduces the "greedy"
tokens of `<model>.json` for its "prompt" when that file exists, then prints TTFT, TPOT and tokens/s of
each run as the same JSON as ort_greedy.py. TTFT counts from creating the generator (its cache
buffers) through the prefill to the first token.

onnxruntime-genai pins its own onnxruntime, so it lives in its own venv:

    python3 -m venv .venv-genai && .venv-genai/bin/pip install onnxruntime-genai onnx
    .venv-genai/bin/python scripts/genai_greedy.py MODEL.onnx [--prompt 128] [--output 64] [--threads 1] [--runs 5]
    .venv-genai/bin/python scripts/genai_greedy.py MODEL.onnx --serve [...]

--serve works as in ort_greedy.py: one line naming the versions once loaded (and checked), then one run
per line read from stdin, its figures printed on one line.

Exits non-zero with one line saying why when onnxruntime-genai is missing, cannot load the model, or
does not reproduce the reference tokens.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time


def fail(why):
    sys.exit("genai_greedy: " + " ".join(str(why).split()))  # one line


try:
    import onnx
    import onnxruntime_genai as og
except ImportError as e:
    fail(f"cannot import ({e}); install into a separate venv: pip install onnxruntime-genai onnx")


def dims(path):
    """layers, heads, head_dim, hidden, vocab, context from the model's metadata (make_llm.py writes
    them), falling back to its input and output shapes."""
    m = onnx.load(path, load_external_data=False)
    meta = {p.key: int(p.value) for p in m.metadata_props if p.value.isdigit()}
    shape = {v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
             for v in list(m.graph.input) + list(m.graph.output)}
    layers = sum(n.startswith("past_key_values.") and n.endswith(".key") for n in shape)
    _, heads, _, head_dim = shape["past_key_values.0.key"]
    vocab = shape["logits"][-1]
    externals = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return dict(layers=meta.get("num_layers", layers), heads=meta.get("num_heads", heads),
                head_dim=meta.get("head_dim", head_dim),
                hidden=meta.get("hidden_size", heads * head_dim), vocab=meta.get("vocab_size", vocab),
                context=meta.get("max_position_embeddings", 2048)), externals


def genai_config(d, threads, max_length):
    return {"model": {
        "type": "llama", "context_length": d["context"], "vocab_size": d["vocab"],
        # No end-of-sequence token: an id outside the vocabulary, so min_length masks no real token.
        "bos_token_id": 0, "eos_token_id": [], "pad_token_id": 0,
        "decoder": {
            "filename": "model.onnx",
            "session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                                "provider_options": []},
            "hidden_size": d["hidden"], "head_size": d["head_dim"], "num_hidden_layers": d["layers"],
            "num_attention_heads": d["heads"], "num_key_value_heads": d["heads"],
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                       "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"}}},
        # The model concatenates past and new keys itself, so genai must not share one max-length
        # buffer between past and present.
        "search": {"do_sample": False, "num_beams": 1, "max_length": max_length,
                   "min_length": max_length, "past_present_share_buffer": False}}


def generate(model, prompt, n):
    """Greedy-decodes n tokens after prompt; returns them and the seconds at which each was ready."""
    start = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)  # the prefill
    tokens, ready = [], []
    while not gen.is_done():
        gen.generate_next_token()  # argmax of the last logits, then (after the first) one decode step
        tokens.append(int(gen.get_next_tokens()[0]))
        ready.append(time.perf_counter() - start)
    return tokens, ready


def figures(ready, output):
    """TTFT, TPOT (ms) and tokens/s of one run from the seconds at which each token was ready."""
    ttft, e2e = ready[0] * 1e3, ready[-1] * 1e3
    return {"ttft_ms": ttft, "tpot_ms": (e2e - ttft) / max(1, output - 1),
            "tokens_per_s": output / (e2e / 1e3)}


def measure(model, path, d, a):
    """Checks the reference tokens beside the model, if any, then prints the timed runs (or serves
    them one per stdin line)."""
    ref = os.path.splitext(path)[0] + ".json"
    if os.path.exists(ref):
        with open(ref) as f:
            want = json.load(f)
        got, _ = generate(model, want["prompt"], len(want["greedy"]))
        if got != want["greedy"]:
            fail(f"greedy tokens differ from {os.path.basename(ref)}: genai {got}, "
                 f"expected {want['greedy']}")
    prompt = [(i * 7919 + 13) % d["vocab"] for i in range(a.prompt)]
    import onnxruntime

    def run():
        tokens, ready = generate(model, prompt, a.output)
        if len(tokens) != a.output:
            fail(f"generated {len(tokens)} tokens, not {a.output}")
        return figures(ready, a.output)

    version = f"{og.__version__} (onnxruntime {onnxruntime.__version__})"
    if a.serve:
        print(json.dumps({"genai_version": version}), flush=True)
        for _ in sys.stdin:
            print(json.dumps(run()), flush=True)
        return
    result = {"genai_version": version, "ttft_ms": [], "tpot_ms": [], "tokens_per_s": []}
    for i in range(a.runs + 1):
        r = run()
        if i > 0:  # the first run warms up
            for k, v in r.items():
                result[k].append(v)
    print(json.dumps(result))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--serve", action="store_true")
    a = ap.parse_args()
    path = os.path.abspath(a.model)
    try:
        d, externals = dims(path)
    except Exception as e:  # not an ONNX file, or no past_key_values.0.key / logits
        fail(f"{a.model} is not a decoder with input_ids, past_key_values.%d.key/value and logits "
             f"({type(e).__name__}: {e})")
    folder = tempfile.mkdtemp(prefix="genai-", dir=os.path.dirname(path))
    try:
        os.symlink(path, os.path.join(folder, "model.onnx"))
        for f in externals:  # external data resolves relative to the (linked) model
            os.makedirs(os.path.dirname(os.path.join(folder, f)), exist_ok=True)
            os.symlink(os.path.join(os.path.dirname(path), f), os.path.join(folder, f))
        with open(os.path.join(folder, "genai_config.json"), "w") as f:
            json.dump(genai_config(d, a.threads, a.prompt + a.output), f, indent=1)
        try:
            model = og.Model(folder)
            measure(model, path, d, a)
        except RuntimeError as e:
            fail(f"onnxruntime-genai {og.__version__} cannot load or run {a.model}: {e}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
