#!/usr/bin/env python3
"""Compares fleetbench's own optimizer (Rust, `fleetbench models optimize-file`) with ONNX Runtime's Python quantizer.

What it measures, all in this one process with onnxruntime's CPU provider:

  digits (models/digits/digits-fp32.onnx, MLP 64-512-512-10; eval set models/digits/eval-{inputs,labels}.npy, 360 rows)
      ORT quantize_dynamic (defaults, weight_type QInt8)     vs  fleetbench int8-dynamic
      ORT quantize_static (QDQ, MinMax over the eval inputs)  vs  fleetbench int8-static --calibration eval-inputs.npy
      fleetbench int8-weight-only, fp16, prune --sparsity 0.5 --structured, prune --sparsity 0.5 (unstructured),
      and the distilled student models/digits/digits-student.onnx (MLP 64-64-10, from models/make_models.py)
    per model: top-1 accuracy, its change vs fp32 in points, file size, cosine similarity of the outputs (logits)
    vs fp32 flattened over the eval set, top-1 agreement with fp32, max abs error, and latency.
  conv (models/conv/{squeezenet,shufflenet}.onnx with <name>-inputs.npy, 16 inputs at batch 1; made by
        models/make_conv_models.py, which this script runs when they are missing)
      the same recipes less unstructured pruning and the student; the fp32 models are random-weight, so fidelity
      only: cosine vs fp32 of the softmax outputs, top-1 agreement, max abs error; size; latency.

Latency: single-stream p50 at batch 1, one session per model with intra_op_num_threads=1, inter_op_num_threads=1,
sequential execution, default graph optimizations, Python's sess.run overhead included (the same for every model).
After a warm-up the models are interleaved round-robin (the starting model rotating each round), each timed for
ITERATIONS consecutive runs per round; a model's figure is the median of its per-round p50s, so drifts in machine
load hit all models alike. Defaults: digits 5 rounds x 2000 runs, conv 3 rounds x 30 runs.

Targets, each printed as a `TARGET ... : yes/no (figures)` line (a "no" is a finding, not an error):
  int8-dynamic on digits: accuracy at most 1 point below fp32; at most 0.5 point below ORT's quantize_dynamic model;
    file size <= ORT's; latency p50 <= 1.05 x ORT's.
  structured pruning 50 %: speed-up (fp32 p50 / pruned p50) >= --prune-min-speedup and, on digits, accuracy drop
    <= --prune-max-drop points; the conv lines judge the speed-up only and print the fidelity.
  fp16: cosine vs fp32 >= 0.99, on digits and on each conv model.
Then one line of JSON with every figure.

Run (after `cargo build --release`; ORT_DYLIB_PATH is passed through, and set to this venv's onnxruntime library when
unset, for the fleetbench binary to load):
  .venv/bin/python scripts/compare_quantizers.py [--fleetbench target/release/fleetbench] [--repeats N]
      [--iterations N] [--conv-iterations N] [--only digits|conv] [--out-dir DIR] [--keep-going]
Exit status: 0 when everything was measured (whatever the verdicts), 1 when a fleetbench command failed
(with --keep-going: after reporting the rest), 2 on a usage or setup error (missing binary, models).
"""
import argparse
import glob
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "models", "digits")
CONV = os.path.join(ROOT, "models", "conv")
CONV_MODELS = ("squeezenet", "shufflenet")
MAKE_CONV = os.path.join(ROOT, "models", "make_conv_models.py")

FP32 = "fp32"
ORT_DYNAMIC = "ort quantize_dynamic"
ORT_STATIC = "ort quantize_static qdq"
OURS_DYNAMIC = "fleetbench int8-dynamic"
OURS_STATIC = "fleetbench int8-static"
OURS_WEIGHT_ONLY = "fleetbench int8-weight-only"
OURS_FP16 = "fleetbench fp16"
OURS_PRUNE_STRUCTURED = "fleetbench prune 0.5 structured"
OURS_PRUNE = "fleetbench prune 0.5"
STUDENT = "student (distilled)"


class FleetbenchError(Exception):
    """A fleetbench command failed; the message carries its command line and stderr, `short` one line of it."""

    def __init__(self, message, short):
        super().__init__(message)
        self.short = short


def last_line(text):
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no stderr)"


class Variant:
    """One model file to measure, or the error that kept it from being made."""

    def __init__(self, label, path=None, error=None, report=None):
        self.label, self.path, self.error, self.report = label, path, error, report
        self.metrics = {}

    def notes(self):
        if self.error:
            return "ERROR: " + self.error.splitlines()[0][:100]
        r = self.report or {}
        inner = r.get("report", r)
        parts = []
        for key in ("rewritten", "skipped"):
            v = inner.get(key, r.get(key))
            if v is not None:
                parts.append(f"{len(v) if isinstance(v, list) else v} {key}")
        return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Making the variants


def fleetbench_command(binary, src, dst, recipe, extra, env):
    """Runs `fleetbench models optimize-file` and returns its JSON report; raises FleetbenchError on failure."""
    cmd = [binary, "models", "optimize-file", src, dst, "--recipe", recipe, *extra, "--output", "json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FleetbenchError(f"`{' '.join(cmd)}` could not run: {e}", f"fleetbench could not run: {e}") from e
    if proc.returncode != 0:
        raise FleetbenchError(
            f"`{' '.join(cmd)}` failed with exit status {proc.returncode}\n--- its stderr ---\n{proc.stderr.strip()}",
            f"fleetbench exit {proc.returncode}: {last_line(proc.stderr)}",
        )
    if not os.path.isfile(dst):
        raise FleetbenchError(
            f"`{' '.join(cmd)}` exited 0 but wrote no {dst}\n--- its stderr ---\n{proc.stderr.strip()}",
            f"fleetbench wrote no {os.path.basename(dst)}",
        )
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("{")]
        try:
            return json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            return {"unparsed_stdout": proc.stdout.strip()[:500]}


class RowReader(CalibrationDataReader):
    """Feeds the calibration set to ORT's calibrator one row at a time (batch 1 suits fixed and symbolic batches)."""

    def __init__(self, input_name, rows):
        self.input_name, self.rows, self.i = input_name, rows, 0

    def get_next(self):
        if self.i >= len(self.rows):
            return None
        self.i += 1
        return {self.input_name: self.rows[self.i - 1 : self.i]}

    def rewind(self):
        self.i = 0


def ort_dynamic(fp32, dst, input_name, rows):
    quantize_dynamic(fp32, dst, weight_type=QuantType.QInt8)


def ort_static(fp32, dst, input_name, rows):
    quantize_static(fp32, dst, RowReader(input_name, rows), quant_format=QuantFormat.QDQ,
                    calibrate_method=CalibrationMethod.MinMax)


# label -> (file tag, maker) for ORT's quantizers; label -> (file tag, recipe, extra arguments) for fleetbench's,
# where CALIBRATION stands for the calibration set's path.
CALIBRATION = object()
ORT_MAKERS = {ORT_DYNAMIC: ("ort-dynamic", ort_dynamic), ORT_STATIC: ("ort-static", ort_static)}
FLEETBENCH_RECIPES = {
    OURS_DYNAMIC: ("int8-dynamic", "int8-dynamic", []),
    OURS_STATIC: ("int8-static", "int8-static", ["--calibration", CALIBRATION]),
    OURS_WEIGHT_ONLY: ("int8-weight-only", "int8-weight-only", []),
    OURS_FP16: ("fp16", "fp16", []),
    OURS_PRUNE_STRUCTURED: ("prune-structured", "prune", ["--sparsity", "0.5", "--structured"]),
    OURS_PRUNE: ("prune", "prune", ["--sparsity", "0.5"]),
}


def make_variants(name, fp32, calibration, labels, work, args, env, failures):
    """fp32 first, then the variants named by `labels`, in that order. An ORT quantizer's exception becomes the
    variant's error; a fleetbench failure raises FleetbenchError, or with --keep-going becomes the variant's error
    and is appended to `failures`."""
    input_name = session_for(fp32).get_inputs()[0].name
    rows = np.load(calibration)
    variants = [Variant(FP32, fp32)]
    for label in labels:
        print(f"  {name}: {label} ...", file=sys.stderr, flush=True)
        if label in ORT_MAKERS:
            tag, maker = ORT_MAKERS[label]
            dst = os.path.join(work, f"{name}-{tag}.onnx")
            try:
                maker(fp32, dst, input_name, rows)
                variants.append(Variant(label, dst))
            except Exception as e:  # noqa: BLE001 - any quantizer failure is a finding to report
                variants.append(Variant(label, error=f"onnxruntime.quantization: {type(e).__name__}: {e}"))
            continue
        tag, recipe, extra = FLEETBENCH_RECIPES[label]
        dst = os.path.join(work, f"{name}-{tag}.onnx")
        extra = [calibration if a is CALIBRATION else a for a in extra]
        try:
            report = fleetbench_command(args.fleetbench, fp32, dst, recipe, extra, env)
            variants.append(Variant(label, dst, report=report))
        except FleetbenchError as e:
            if not args.keep_going:
                raise
            failures.append(str(e))
            variants.append(Variant(label, error=e.short))
    return variants


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def session_for(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def feed_dtype(sess):
    """numpy dtype of the session's (single) input: fp16 variants may take float16."""
    return np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32


def outputs(sess, x, batch_whole):
    """The first output for every row of x, float32, stacked [n, ...]: one run when the batch dim is free."""
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0].name
    x = x.astype(feed_dtype(sess))
    if batch_whole:
        return sess.run([out], {inp.name: x})[0].astype(np.float32)
    return np.concatenate([sess.run([out], {inp.name: x[i : i + 1]})[0] for i in range(len(x))]).astype(np.float32)


def fidelity(ref, y, labels=None):
    """Figures of outputs y against the fp32 outputs ref (and the labels when there are any)."""
    a, b = ref.reshape(len(ref), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
    m = {
        "cosine": float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))),
        "agreement": float((a.argmax(axis=1) == b.argmax(axis=1)).mean()),
        "max_abs_error": float(np.abs(a - b).max()),
    }
    if labels is not None:
        m["accuracy"] = float((b.argmax(axis=1) == labels).mean())
    return m


def latency_p50s(sessions, rows, rounds, iterations, warmup):
    """{label: median over rounds of the p50 (µs) of `iterations` batch-1 runs}, models interleaved round-robin."""
    feeds = {}
    for label, sess in sessions.items():
        name, dtype = sess.get_inputs()[0].name, feed_dtype(sess)
        feeds[label] = [{name: rows[i : i + 1].astype(dtype)} for i in range(len(rows))]
    outs = {label: [sess.get_outputs()[0].name] for label, sess in sessions.items()}
    for label, sess in sessions.items():
        for i in range(warmup):
            sess.run(outs[label], feeds[label][i % len(rows)])
    per_round = {label: [] for label in sessions}
    labels = list(sessions)
    clock = time.perf_counter_ns
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            run, out, fs = sessions[label].run, outs[label], feeds[label]
            times = np.empty(iterations)
            for i in range(iterations):
                f = fs[i % len(fs)]
                t0 = clock()
                run(out, f)
                times[i] = clock() - t0
            per_round[label].append(float(np.percentile(times, 50)) / 1000.0)
    return {label: float(np.median(p)) for label, p in per_round.items()}


def measure(variants, x, labels, batch_whole, rounds, iterations, warmup):
    """Fills each variant's metrics: fidelity vs the first (fp32) variant, size, latency p50."""
    sessions, ref = {}, None
    for v in variants:
        if v.error:
            continue
        try:
            sess = session_for(v.path)
            y = outputs(sess, x, batch_whole)
        except Exception as e:  # noqa: BLE001 - a variant ORT cannot load or run is reported, not fatal
            v.error = f"onnxruntime cannot run it: {type(e).__name__}: {e}"
            continue
        if ref is None:
            ref = y
        sessions[v.label] = sess
        v.metrics = {"size_bytes": os.path.getsize(v.path), **fidelity(ref, y, labels)}
    print(f"  timing {len(sessions)} models: {rounds} rounds x {iterations} runs ...", file=sys.stderr, flush=True)
    for label, p50 in latency_p50s(sessions, x, rounds, iterations, warmup).items():
        next(v for v in variants if v.label == label).metrics["p50_us"] = p50
    base = variants[0].metrics
    for v in variants:
        if v.metrics and "accuracy" in v.metrics:
            v.metrics["accuracy_delta_pt"] = 100.0 * (v.metrics["accuracy"] - base["accuracy"])
        if v.metrics.get("p50_us") and base.get("p50_us"):
            v.metrics["speedup"] = base["p50_us"] / v.metrics["p50_us"]


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def table(title, variants, with_accuracy):
    cols = [("model", 32, lambda m, v: v.label), ("size B", 10, lambda m, v: f"{m['size_bytes']:,}")]
    if with_accuracy:
        cols += [
            ("acc %", 7, lambda m, v: f"{100 * m['accuracy']:.2f}"),
            ("Δ pt", 6, lambda m, v: f"{m['accuracy_delta_pt']:+.2f}"),
        ]
    cols += [
        ("cosine", 8, lambda m, v: f"{m['cosine']:.5f}"),
        ("agree %", 7, lambda m, v: f"{100 * m['agreement']:.1f}"),
        ("max|err|", 9, lambda m, v: f"{m['max_abs_error']:.3g}"),
        ("p50 µs", 9, lambda m, v: f"{m['p50_us']:.1f}" if "p50_us" in m else "-"),
        ("speed-up", 8, lambda m, v: f"{m['speedup']:.2f}x" if "speedup" in m else "-"),
    ]
    lines = [f"\n== {title}", "  ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w, _) in enumerate(cols)) + "  notes"]
    for v in variants:
        if v.error or not v.metrics:
            lines.append(f"{v.label:<32}  {v.notes() if v.error else 'ERROR: not measured'}")
            continue
        cells = [f(v.metrics, v) for _, _, f in cols]
        lines.append(
            "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, (_, w, _)) in enumerate(zip(cells, cols)))
            + "  "
            + v.notes()
        )
    print("\n".join(lines))


def metrics_of(variants, label):
    v = next((v for v in variants if v.label == label), None)
    return v.metrics if v is not None and not v.error and v.metrics else None


def verdict(results, name, ok, figures):
    line = f"TARGET {name} : {'yes' if ok else 'no'} ({figures})"
    print(line)
    results.append({"target": name, "met": bool(ok), "figures": figures})


def unavailable(results, name, why):
    line = f"TARGET {name} : no (not measured: {why})"
    print(line)
    results.append({"target": name, "met": False, "figures": f"not measured: {why}"})


def targets(digits, conv, args):
    """Prints the verdict lines; returns them as dicts."""
    out = []
    if digits is not None:
        fp32, ours, theirs = (metrics_of(digits, x) for x in (FP32, OURS_DYNAMIC, ORT_DYNAMIC))
        if ours and fp32:
            drop = -ours["accuracy_delta_pt"] + 0.0
            verdict(out, "int8-dynamic digits accuracy within 1 pt of fp32", drop <= 1.0,
                    f"{100 * ours['accuracy']:.2f}% vs fp32 {100 * fp32['accuracy']:.2f}%, drop {drop:.2f} pt")
        else:
            unavailable(out, "int8-dynamic digits accuracy within 1 pt of fp32", "fleetbench int8-dynamic failed")
        if ours and theirs:
            gap = 100 * (theirs["accuracy"] - ours["accuracy"]) + 0.0
            verdict(out, "int8-dynamic digits accuracy within 0.5 pt of ORT quantize_dynamic", gap <= 0.5,
                    f"{100 * ours['accuracy']:.2f}% vs ORT {100 * theirs['accuracy']:.2f}%, ORT ahead by {gap:+.2f} pt")
            verdict(out, "int8-dynamic digits size <= ORT quantize_dynamic", ours["size_bytes"] <= theirs["size_bytes"],
                    f"{ours['size_bytes']} B vs ORT {theirs['size_bytes']} B")
            ratio = ours["p50_us"] / theirs["p50_us"]
            verdict(out, "int8-dynamic digits latency p50 <= 1.05 x ORT quantize_dynamic", ratio <= 1.05,
                    f"{ours['p50_us']:.1f} µs vs ORT {theirs['p50_us']:.1f} µs, {ratio:.3f}x")
        else:
            for t in ("accuracy within 0.5 pt of", "size <=", "latency p50 <= 1.05 x"):
                unavailable(out, f"int8-dynamic digits {t} ORT quantize_dynamic",
                            "fleetbench int8-dynamic failed" if not ours else "ORT quantize_dynamic failed")
        pruned = metrics_of(digits, OURS_PRUNE_STRUCTURED)
        name = f"structured prune 50% digits speed-up >= {args.prune_min_speedup:g}x and drop <= {args.prune_max_drop:g} pt"
        if pruned:
            drop = -pruned["accuracy_delta_pt"] + 0.0
            verdict(out, name, pruned["speedup"] >= args.prune_min_speedup and drop <= args.prune_max_drop,
                    f"speed-up {pruned['speedup']:.2f}x, accuracy {100 * pruned['accuracy']:.2f}%, drop {drop:.2f} pt")
        else:
            unavailable(out, name, "fleetbench prune failed")
    for model, variants in (conv or {}).items():
        pruned = metrics_of(variants, OURS_PRUNE_STRUCTURED)
        name = f"structured prune 50% {model} speed-up >= {args.prune_min_speedup:g}x"
        if pruned:
            verdict(out, name, pruned["speedup"] >= args.prune_min_speedup,
                    f"speed-up {pruned['speedup']:.2f}x; fidelity, not judged: cosine {pruned['cosine']:.4f}, "
                    f"top-1 agreement {100 * pruned['agreement']:.1f}%")
        else:
            unavailable(out, name, "fleetbench prune failed")
    for model, variants in [("digits", digits)] * (digits is not None) + list((conv or {}).items()):
        fp16 = metrics_of(variants, OURS_FP16)
        name = f"fp16 {model} cosine >= 0.99"
        if fp16:
            verdict(out, name, fp16["cosine"] >= 0.99,
                    f"cosine {fp16['cosine']:.5f}, top-1 agreement {100 * fp16['agreement']:.1f}%")
        else:
            unavailable(out, name, "fleetbench fp16 failed")
    return out


# ---------------------------------------------------------------------------------------------------------------


def run_digits(work, args, env, failures):
    fp32 = os.path.join(DIGITS, "digits-fp32.onnx")
    x = np.load(os.path.join(DIGITS, "eval-inputs.npy"))
    y = np.load(os.path.join(DIGITS, "eval-labels.npy"))
    labels = [ORT_DYNAMIC, OURS_DYNAMIC, ORT_STATIC, OURS_STATIC, OURS_WEIGHT_ONLY, OURS_FP16,
              OURS_PRUNE_STRUCTURED, OURS_PRUNE]
    variants = make_variants("digits", fp32, os.path.join(DIGITS, "eval-inputs.npy"), labels, work, args, env, failures)
    variants.append(Variant(STUDENT, os.path.join(DIGITS, "digits-student.onnx")))
    measure(variants, x, y, True, args.repeats or 5, args.iterations, warmup=200)
    table(f"digits: {len(x)} eval rows; latency batch 1, 1 thread", variants, with_accuracy=True)
    return variants


def ensure_conv_models():
    wanted = [os.path.join(CONV, f) for n in CONV_MODELS for f in (f"{n}.onnx", f"{n}-inputs.npy")]
    if all(os.path.isfile(p) for p in wanted):
        return
    print(f"making the conv models: {MAKE_CONV}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, MAKE_CONV], capture_output=True, text=True)
    if proc.returncode != 0 or not all(os.path.isfile(p) for p in wanted):
        sys.exit(f"error: {MAKE_CONV} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")


def run_conv(work, args, env, failures):
    ensure_conv_models()
    results = {}
    labels = [ORT_DYNAMIC, OURS_DYNAMIC, ORT_STATIC, OURS_STATIC, OURS_WEIGHT_ONLY, OURS_FP16, OURS_PRUNE_STRUCTURED]
    for name in CONV_MODELS:
        fp32 = os.path.join(CONV, f"{name}.onnx")
        inputs = os.path.join(CONV, f"{name}-inputs.npy")
        x = np.load(inputs)
        variants = make_variants(name, fp32, inputs, labels, work, args, env, failures)
        measure(variants, x, None, False, args.repeats or 3, args.conv_iterations, warmup=3)
        table(f"{name}: fidelity over {len(x)} inputs (softmax outputs); latency batch 1, 1 thread", variants,
              with_accuracy=False)
        results[name] = variants
    return results


def fleetbench_env():
    """The caller's environment, with ORT_DYLIB_PATH pointing at this venv's onnxruntime library if it is unset."""
    env = dict(os.environ)
    if not env.get("ORT_DYLIB_PATH"):
        libs = sorted(glob.glob(os.path.join(os.path.dirname(ort.__file__), "capi", "libonnxruntime.so.*")))
        if libs:
            env["ORT_DYLIB_PATH"] = libs[-1]
    return env


def main():
    parser = argparse.ArgumentParser(
        description="Compare fleetbench's optimizer with ONNX Runtime's quantizer (see the module docstring).")
    parser.add_argument("--fleetbench", default=os.path.join(ROOT, "target", "release", "fleetbench"),
                        help="fleetbench binary (default target/release/fleetbench)")
    parser.add_argument("--repeats", type=int, help="latency rounds per model (default 5 on digits, 3 on conv)")
    parser.add_argument("--iterations", type=int, default=2000, help="timed runs per round on digits (default 2000)")
    parser.add_argument("--conv-iterations", type=int, default=30, help="timed runs per round on conv (default 30)")
    parser.add_argument("--only", choices=("digits", "conv"), help="run one part only")
    parser.add_argument("--out-dir", help="keep the variant models here (default: a temporary directory, removed)")
    parser.add_argument("--keep-going", action="store_true",
                        help="record a failed fleetbench command in the tables and go on (exit status 1 at the end)")
    parser.add_argument("--prune-min-speedup", type=float, default=1.2,
                        help="structured-prune target: fp32 p50 / pruned p50 at least this (default 1.2)")
    parser.add_argument("--prune-max-drop", type=float, default=2.0,
                        help="structured-prune target on digits: accuracy drop at most this many points (default 2)")
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1 or args.iterations < 1 or args.conv_iterations < 1:
        parser.error("--repeats and --iterations must be positive")

    args.fleetbench = os.path.abspath(args.fleetbench)
    if not (os.path.isfile(args.fleetbench) and os.access(args.fleetbench, os.X_OK)):
        print(f"error: no fleetbench binary at {args.fleetbench}: build it with `cargo build --release` "
              "or pass --fleetbench PATH", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer warns about pre-processing on every call
    env = fleetbench_env()
    failures = []
    with tempfile.TemporaryDirectory(prefix="fleetbench-compare-") as tmp:
        work = os.path.abspath(args.out_dir) if args.out_dir else tmp
        os.makedirs(work, exist_ok=True)
        try:
            digits = run_digits(work, args, env, failures) if args.only in (None, "digits") else None
            conv = run_conv(work, args, env, failures) if args.only in (None, "conv") else None
        except FleetbenchError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
    print()
    verdicts = targets(digits, conv, args)
    figures = lambda vs: {v.label: (v.metrics if not v.error else {"error": v.error}) for v in vs}  # noqa: E731
    print(json.dumps({
        "digits": figures(digits) if digits is not None else None,
        "conv": {name: figures(vs) for name, vs in conv.items()} if conv is not None else None,
        "targets": verdicts,
        "onnxruntime": ort.__version__,
        "fleetbench": args.fleetbench,
    }, sort_keys=False))
    if failures:
        print(f"\nerror: {len(failures)} fleetbench command(s) failed:", file=sys.stderr)
        for f in failures:
            print(f, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
