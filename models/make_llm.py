"""Writes a Llama-style decoder-only language model in ONNX, from standard ops, with seeded random
weights (its text is gibberish; its shapes, ops and cost per token are those of a real decoder):
token embedding, RMSNorm, rotary positions, multi-head causal attention with a KV cache, a SwiGLU MLP,
a final norm and an LM head. Its inputs and outputs follow the convention that Hugging Face Optimum and
onnxruntime-genai export:

    in:  input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64,
         position_ids [batch, seq] int64, past_key_values.{i}.key / .value [batch, heads, past, head_dim]
    out: logits [batch, seq, vocab], present.{i}.key / .value [batch, heads, past + seq, head_dim]

    python models/make_llm.py                      # models/llm/tiny-llama.onnx (committed, ~2 MB)
    python models/make_llm.py --size gpt2-small    # models/llm-large/ (git-ignored, ~500 MB)

The script checks what it wrote with onnxruntime: logits of one call over a whole sequence equal those
of a prompt call followed by one call per token that feeds each call's present tensors back as the next
call's past (the KV cache is right), and it writes the greedy continuation of a fixed prompt to
`<name>.json` beside the model, which the Rust tests compare fleetbench's own decoding loop against.
"""

import argparse
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZES = {
    # name: (layers, hidden, heads, intermediate, vocab, max_positions). gpt2-small has GPT-2 small's
    # depth, width, heads, vocabulary and context, and about its 124 M parameters: the LM head shares
    # the embedding's weights as GPT-2's does, and SwiGLU's three matrices of 2048 hold what GPT-2's two
    # of 3072 do.
    "tiny": (2, 128, 4, 352, 512, 512),
    "gpt2-small": (12, 768, 12, 2048, 50257, 1024),
}
TIED = {"tiny": False, "gpt2-small": True}


class Graph:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def op(self, op_type, inputs, base=None, **attrs):
        out = self.name(base or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name


def build(size, seed):
    layers, hidden, heads, inter, vocab, max_pos = SIZES[size]
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)
    g = Graph()

    def weight(name, shape, fan_in):
        return g.const(name, (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32))

    # Shared constants.
    eps = g.const("eps", np.array(1e-5, np.float32))
    one_axis = g.const("axis_last", np.array([-1], np.int64))
    axis0 = g.const("axis_0", np.array([0], np.int64))
    axis1 = g.const("axis_1", np.array([1], np.int64))
    axes12 = g.const("axes_1_2", np.array([1, 2], np.int64))
    neg_big = g.const("neg_big", np.array(-1e9, np.float32))
    scale = g.const("attn_scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    zero = g.const("zero", np.array(0, np.int64))
    one = g.const("one", np.array(1, np.int64))
    half = head_dim // 2
    inv_freq = 1.0 / (10000 ** (np.arange(half, dtype=np.float64) / half))
    angles = np.outer(np.arange(max_pos, dtype=np.float64), inv_freq)
    cos_table = g.const("rope_cos", np.cos(angles).astype(np.float32))
    sin_table = g.const("rope_sin", np.sin(angles).astype(np.float32))
    split_half = g.const("split_half", np.array([half, half], np.int64))
    bshd = g.const("shape_bshd", np.array([0, 0, heads, head_dim], np.int64))
    bsh = g.const("shape_bsh", np.array([0, 0, hidden], np.int64))

    def rmsnorm(x, w_name):
        w = g.const(w_name, np.ones(hidden, np.float32))
        sq = g.op("Mul", [x, x])
        mean = g.op("ReduceMean", [sq, one_axis], keepdims=1)
        rms = g.op("Sqrt", [g.op("Add", [mean, eps])])
        return g.op("Mul", [g.op("Div", [x, rms]), w])

    # Rotary tables for these positions: [batch, 1, seq, half].
    cos = g.op("Unsqueeze", [g.op("Gather", [cos_table, "position_ids"], axis=0), axis1])
    sin = g.op("Unsqueeze", [g.op("Gather", [sin_table, "position_ids"], axis=0), axis1])

    def rotate(x):  # x [batch, heads, seq, head_dim]
        x1, x2 = g.name("rot_a"), g.name("rot_b")
        g.nodes.append(helper.make_node("Split", [x, split_half], [x1, x2], axis=-1))
        a = g.op("Sub", [g.op("Mul", [x1, cos]), g.op("Mul", [x2, sin])])
        b = g.op("Add", [g.op("Mul", [x1, sin]), g.op("Mul", [x2, cos])])
        return g.op("Concat", [a, b], axis=-1)

    # Causal mask over [past + seq] keys for the seq new queries, and the padding mask.
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), one], axis=0)
    total = g.op("Gather", [g.op("Shape", ["attention_mask"]), one], axis=0)
    past_len = g.op("Sub", [total, seq_len])
    key_pos = g.op("Range", [zero, total, one])
    query_pos = g.op("Range", [past_len, total, one])
    causal = g.op(
        "LessOrEqual", [g.op("Unsqueeze", [key_pos, axis0]), g.op("Unsqueeze", [query_pos, one_axis])]
    )  # [seq, total]
    padding = g.op(
        "Cast", [g.op("Unsqueeze", ["attention_mask", axes12])], to=TensorProto.BOOL
    )  # [batch, 1, 1, total]
    allowed = g.op("And", [causal, padding])  # [batch, 1, seq, total]

    embed = weight("embed_tokens", (vocab, hidden), 1.0)
    x = g.op("Gather", [embed, "input_ids"], axis=0)
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    outputs = []
    present = []
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch", heads, "past", head_dim]
                )
            )
        h = rmsnorm(x, f"layers.{i}.input_norm")

        def heads_of(t):
            return g.op("Transpose", [g.op("Reshape", [t, bshd])], perm=[0, 2, 1, 3])

        q = rotate(heads_of(g.op("MatMul", [h, weight(f"layers.{i}.q", (hidden, hidden), hidden)])))
        k = rotate(heads_of(g.op("MatMul", [h, weight(f"layers.{i}.k", (hidden, hidden), hidden)])))
        v = heads_of(g.op("MatMul", [h, weight(f"layers.{i}.v", (hidden, hidden), hidden)]))
        k_all, v_all = f"present.{i}.key", f"present.{i}.value"
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.key", k], [k_all], axis=2))
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.value", v], [v_all], axis=2))
        present += [k_all, v_all]
        scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k_all], perm=[0, 1, 3, 2])]), scale])
        probs = g.op("Softmax", [g.op("Where", [allowed, scores, neg_big])], axis=-1)
        attn = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v_all])], perm=[0, 2, 1, 3]), bsh])
        x = g.op("Add", [x, g.op("MatMul", [attn, weight(f"layers.{i}.o", (hidden, hidden), hidden)])])
        h = rmsnorm(x, f"layers.{i}.post_norm")
        gate = g.op("MatMul", [h, weight(f"layers.{i}.gate", (hidden, inter), hidden)])
        up = g.op("MatMul", [h, weight(f"layers.{i}.up", (hidden, inter), hidden)])
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = g.op("Add", [x, g.op("MatMul", [act, weight(f"layers.{i}.down", (inter, hidden), inter)])])
    h = rmsnorm(x, "final_norm")
    if TIED[size]:
        # The embedding read as [hidden, vocab], scaled as a fresh head would be.
        head = g.op("Mul", [g.op("Transpose", [embed], perm=[1, 0]),
                            g.const("head_scale", np.array(1.0 / np.sqrt(hidden), np.float32))])
    else:
        head = weight("lm_head", (hidden, vocab), hidden)
    g.nodes.append(helper.make_node("MatMul", [h, head], ["logits"]))
    outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab]))
    for name in present:
        outputs.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", heads, "total", head_dim])
        )
    graph = helper.make_graph(g.nodes, f"{size}-llama", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    model.producer_name = "fleetbench models/make_llm.py"
    for k, v in {"max_position_embeddings": max_pos, "vocab_size": vocab, "num_layers": layers,
                 "num_heads": heads, "head_dim": head_dim, "hidden_size": hidden}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
    onnx.checker.check_model(model, full_check=True)
    return model, dict(layers=layers, hidden=hidden, heads=heads, head_dim=head_dim,
                       intermediate=inter, vocab=vocab, max_positions=max_pos)


def feeds(ids, past, heads, head_dim, layers):
    b, s = ids.shape
    p = 0 if past is None else past[0].shape[2]
    f = {
        "input_ids": ids,
        "attention_mask": np.ones((b, p + s), np.int64),
        "position_ids": np.tile(np.arange(p, p + s, dtype=np.int64), (b, 1)),
    }
    for i in range(layers):
        for j, kind in enumerate(("key", "value")):
            f[f"past_key_values.{i}.{kind}"] = (
                np.zeros((b, heads, 0, head_dim), np.float32) if past is None else past[2 * i + j]
            )
    return f


def check(path, cfg, prompt, new_tokens):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    L, H, D = cfg["layers"], cfg["heads"], cfg["head_dim"]
    # Greedy decoding with the cache.
    ids = np.array([prompt], np.int64)
    out = sess.run(None, feeds(ids, None, H, D, L))
    generated, step_logits = [], []
    for _ in range(new_tokens):
        logits, past = out[0], out[1:]
        step_logits.append(logits[0, -1])
        nxt = int(np.argmax(logits[0, -1]))
        generated.append(nxt)
        out = sess.run(None, feeds(np.array([[nxt]], np.int64), past, H, D, L))
    # The same sequence in one call, without a cache: the same logits at every generated position.
    whole = np.array([prompt + generated[:-1]], np.int64)
    full = sess.run(None, feeds(whole, None, H, D, L))[0][0]
    for t, logits in enumerate(step_logits):
        ref = full[len(prompt) - 1 + t]
        if not np.allclose(logits, ref, atol=1e-3, rtol=1e-3):
            raise SystemExit(f"cached and uncached logits differ at step {t}: max |d| "
                             f"{np.abs(logits - ref).max()}")
    return generated


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--out", help="output .onnx (default by size)")
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    default = {"tiny": os.path.join(here, "llm", "tiny-llama.onnx"),
               "gpt2-small": os.path.join(here, "llm-large", "gpt2-small-llama.onnx")}[a.size]
    path = a.out or default
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model, cfg = build(a.size, a.seed)
    onnx.save(model, path)
    prompt = [int(t) for t in np.random.default_rng(a.seed + 1).integers(0, cfg["vocab"], 16)]
    new_tokens = 24
    generated = check(path, cfg, prompt, new_tokens)
    meta = dict(cfg, seed=a.seed, prompt=prompt, greedy=generated,
                note="random weights: for speed and correctness of the decoding loop, not for text")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"{path}: {os.path.getsize(path)} bytes, {params} parameters, {cfg['layers']} layers, "
          f"hidden {cfg['hidden']}, vocab {cfg['vocab']}; cached == uncached logits over "
          f"{new_tokens} greedy steps")


if __name__ == "__main__":
    main()
