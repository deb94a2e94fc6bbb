"""The plain onnxruntime greedy decoding loop that tests/benches/generate.rs compares fleetbench's
against: prefill, then one call per token feeding each call's present KV tensors back as the next
call's past (as numpy arrays, the way Python users write it). Prints TTFT, TPOT and tokens/s of each
run as JSON.

    python scripts/ort_greedy.py MODEL.onnx [--prompt 128] [--output 64] [--threads 1] [--runs 5]
    python scripts/ort_greedy.py MODEL.onnx --serve [--prompt 128] [--output 64] [--threads 1]

With --serve it loads the model, prints {"onnxruntime_version": ...} on one line, then runs once per
line read from stdin and prints that run's {"ttft_ms", "tpot_ms", "tokens_per_s"} on one line, so a
benchmark can interleave its runs with other implementations' (machine drift then hits all alike).
"""
import argparse
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def figures(ready, output):
    """TTFT, TPOT (ms) and tokens/s of one run from the seconds at which each token was ready."""
    ttft, e2e = ready[0] * 1e3, ready[-1] * 1e3
    return {"ttft_ms": ttft, "tpot_ms": (e2e - ttft) / max(1, output - 1),
            "tokens_per_s": output / (e2e / 1e3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--serve", action="store_true")
    a = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    past_inputs = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    outputs = [o.name for o in sess.get_outputs()]
    vocab = sess.get_outputs()[0].shape[-1]
    prompt = [(i * 7919 + 13) % vocab for i in range(a.prompt)]

    def run():
        start = time.perf_counter()
        ready = []
        ids = list(prompt)
        past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
        fresh = ids
        for _ in range(a.output):
            done = len(ids) - len(fresh)
            feed = {
                "input_ids": np.array([fresh], np.int64),
                "attention_mask": np.ones((1, len(ids)), np.int64),
                "position_ids": np.arange(done, len(ids), dtype=np.int64)[None, :],
            }
            feed.update(past)
            out = dict(zip(outputs, sess.run(None, feed)))
            token = int(np.argmax(out["logits"][0, -1]))
            ready.append(time.perf_counter() - start)
            ids.append(token)
            fresh = [token]
            past = {n: out[n.replace("past_key_values.", "present.")] for n in past}
        return figures(ready, a.output)

    if a.serve:
        print(json.dumps({"onnxruntime_version": ort.__version__}), flush=True)
        for _ in sys.stdin:
            print(json.dumps(run()), flush=True)
        return
    result = {"onnxruntime_version": ort.__version__, "ttft_ms": [], "tpot_ms": [], "tokens_per_s": []}
    for i in range(a.runs + 1):
        r = run()
        if i > 0:  # the first run warms up
            for k, v in r.items():
                result[k].append(v)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
