"""Compares fleetbench's int4 variant of a decoder with onnxruntime's own int4 quantization of the same
base: BASE.onnx is quantized with onnxruntime's MatMulNBitsQuantizer (4 bits, the given block size,
symmetry and accuracy level, QOperator format: MatMul -> com.microsoft MatMulNBits) into a temporary
file, and each int4 model ("fleetbench", "ort") gets

  - its size in bytes (with any external data files) and its count of MatMulNBits nodes;
  - its fidelity to BASE with teacher forcing, as fleetbench's agent measures it: both read one seeded
    random sequence of --tokens tokens in one call with an empty past, and every position's next-token
    logits are compared (top-1 agreement, cosine of the flattened logits, largest absolute difference);
  - the median TTFT, TPOT and tokens/s over --runs greedy runs of scripts/ort_greedy.py (which runs its
    own warm-up first).

BASE gets its size and the same speed figures for reference. Prints one JSON object.

    python scripts/int4_compare.py BASE.onnx FLEETBENCH_INT4.onnx [--block-size 32] [--symmetric]
        [--accuracy-level 0] [--prompt 128] [--output 64] [--threads 1] [--runs 5] [--tokens 128] [--seed 7]

Needs onnx-ir beside onnxruntime (its quantizer imports it): pip install onnx-ir.
"""
import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

ORT_GREEDY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ort_greedy.py")


def size_and_nbits(path):
    """Bytes on disk (the .onnx and its external data files) and the count of MatMulNBits nodes."""
    m = onnx.load(path, load_external_data=False)
    files = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    size = os.path.getsize(path) + sum(os.path.getsize(os.path.join(os.path.dirname(path), f))
                                       for f in files)
    return size, sum(n.op_type == "MatMulNBits" for n in m.graph.node)


def session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def all_logits(sess, tokens):
    """Logits at every position of one call over tokens with an empty past: [len(tokens), vocab]."""
    n = len(tokens)
    feed = {"input_ids": np.array([tokens], np.int64), "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None, :]}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    return sess.run(["logits"], feed)[0][0].astype(np.float64)


def fidelity(logits, base):
    cos = float((logits * base).sum() / (np.linalg.norm(logits) * np.linalg.norm(base)))
    return {"samples": len(base), "top1_agreement": float(np.mean(logits.argmax(-1) == base.argmax(-1))),
            "cosine": cos, "max_abs_error": float(np.abs(logits - base).max())}


def speed(path, a):
    """Medians of scripts/ort_greedy.py's runs of path."""
    out = subprocess.run([sys.executable, ORT_GREEDY, path, "--prompt", str(a.prompt), "--output",
                          str(a.output), "--threads", str(a.threads), "--runs", str(a.runs)],
                         check=True, capture_output=True, text=True).stdout
    return {k: statistics.median(v) for k, v in json.loads(out).items() if isinstance(v, list)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("fleetbench_int4")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--accuracy-level", type=int, default=0)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="int4-compare-") as tmp:
        ort_int4 = os.path.join(tmp, "ort-int4.onnx")
        q = MatMulNBitsQuantizer(onnx.load(a.base), bits=4, block_size=a.block_size,
                                 is_symmetric=a.symmetric, accuracy_level=a.accuracy_level,
                                 quant_format=QuantFormat.QOperator)
        q.process()
        q.model.save_model_to_file(ort_int4, use_external_data_format=False)

        base = session(a.base, a.threads)
        meta = {p.key: p.value for p in onnx.load(a.base, load_external_data=False).metadata_props}
        vocab = base.get_outputs()[0].shape[-1]
        n = min(a.tokens, int(meta.get("max_position_embeddings", a.tokens)))
        tokens = [int(t) for t in np.random.default_rng(a.seed).integers(0, vocab, n)]
        base_logits = all_logits(base, tokens)
        del base
        size, _ = size_and_nbits(a.base)
        result = {"config": {"block_size": a.block_size, "symmetric": a.symmetric,
                             "accuracy_level": a.accuracy_level, "threads": a.threads, "prompt": a.prompt,
                             "output": a.output, "runs": a.runs, "tokens": n, "seed": a.seed,
                             "onnxruntime": ort.__version__},
                  "base": {"path": a.base, "bytes": size, **speed(a.base, a)}}
        for name, path in (("fleetbench", a.fleetbench_int4), ("ort", ort_int4)):
            size, nbits = size_and_nbits(path)
            fid = fidelity(all_logits(session(path, a.threads), tokens), base_logits)
            result[name] = {"path": path if name != "ort" else "(temporary)", "bytes": size,
                            "matmulnbits_nodes": nbits, "fidelity": fid, **speed(path, a)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
