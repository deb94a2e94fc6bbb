#!/usr/bin/env python3
"""Times a bare onnxruntime loop in Python, for the harness-overhead benchmark.

usage: ort_python_loop.py MODEL [--threads 1] [--iterations 20000] [--warmup 1000]
Prints {"p50_ns": ..., "mean_ns": ...} as JSON.
"""
import argparse
import json
import time

import numpy as np
import onnxruntime as ort

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--iterations", type=int, default=20000)
p.add_argument("--warmup", type=int, default=1000)
a = p.parse_args()

so = ort.SessionOptions()
so.intra_op_num_threads = a.threads
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
x = np.full((1, 64), 0.5, dtype=np.float32)
for _ in range(a.warmup):
    sess.run(None, {name: x})
times = np.empty(a.iterations, dtype=np.int64)
for i in range(a.iterations):
    t = time.perf_counter_ns()
    sess.run(None, {name: x})
    times[i] = time.perf_counter_ns() - t
print(json.dumps({"p50_ns": float(np.median(times)), "mean_ns": float(times.mean())}))
