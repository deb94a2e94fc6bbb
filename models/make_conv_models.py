#!/usr/bin/env python3
"""Materialises two convolutional ImageNet-shaped models for fleetbench's optimizer benchmarks (scripts/compare_quantizers.py).

The onnx package ships SqueezeNet 1.0 and ShuffleNet v1 as "light" backend test models
(onnx/backend/test/data/light/light_{squeezenet,shufflenet}.onnx): the real graphs, but nearly all of their weights
are ConstantOfShape nodes that fill every weight with 0.02, so every input gives the same, flat output. This script
turns them into runnable models with meaningful activations:

  - every ConstantOfShape that produces a weight becomes an initializer drawn from a seeded numpy RNG (seed 0, in
    node order): Conv and Gemm weights He-normal, N(0, 2 / fan_in), with fan_in = in_channels / group * kh * kw
    (Gemm: the reduced dimension); their biases N(0, 0.01); BatchNormalization scale U(0.5, 1.5), bias N(0, 0.1),
    mean N(0, 0.1), var U(0.5, 1.5). The few weights the test models do carry as real initializers are kept.
  - two data-dependent corrections, measured with onnxruntime on seeded calibration images (not the saved inputs):
    each BatchNormalization's running mean and variance become its input's per-channel statistics over 4 images,
    layer by layer (random ones let ShuffleNet's activations grow ~1e5x through its residual sums; now each layer's
    output std stays within ~1-7 on the saved inputs); and the classifier (SqueezeNet's conv10, ShuffleNet's Gemm)
    is standardised per class, then scaled so that the softmax's max probability has median TARGET_MAX_PROB over
    16 images: the softmax is neither uniform nor one-hot and its arg-max varies from input to input (checked on
    the saved inputs).
  - the model is converted to opset 13 (per-channel DequantizeLinear needs 13) with onnx.version_converter, set to
    IR version 8, weights are removed from graph.input (they stay initializers, i.e. constants the runtime may
    fold), then it is checked (onnx.checker full check, strict shape inference) and run with onnxruntime's CPU
    provider. Deterministic for a given machine and onnxruntime build (the calibration runs onnxruntime; another
    CPU's kernels may change the last bits).
  - the batch dimension stays as the test models fix it: 1.

models/conv/ (generated, git-ignored; scripts/compare_quantizers.py runs this when it is missing)
  squeezenet.onnx         SqueezeNet 1.0: input data_0 [1, 3, 224, 224], output softmaxout_1 [1, 1000, 1, 1]
  shufflenet.onnx         ShuffleNet v1:  input gpu_0/data_0 [1, 3, 224, 224], output gpu_0/softmax_1 [1, 1000]
  <name>-inputs.npy       16 calibration/eval inputs, float32 [16, 3, 224, 224] (feed them one row at a time): seeded
                          synthetic images (see synthetic_images: smooth random fields plus windowed oriented gratings,
                          random colour casts, scaled to mean 0 and std 1 like ImageNet-normalised pixels); the same
                          for both models.

Run: python models/make_conv_models.py [--out-dir DIR] [--verbose]   (idempotent; needs requirements.txt; ~5 s)
"""
import argparse
import collections
import io
import os

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference, version_converter

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "conv")
SOURCES = {"squeezenet": "light_squeezenet.onnx", "shufflenet": "light_shufflenet.onnx"}
SEED = 0
INPUT_SEED = 1
CALIBRATION_SEED = 2
BN_CALIBRATION_SAMPLES = 4
SAMPLES = 16
TARGET_OPSET = 13
IR_VERSION = 8
TARGET_MAX_PROB = 0.2


def source_path(file):
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", file)


def consumers(graph):
    """name -> [(node, input index)] over the graph's nodes."""
    uses = collections.defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            uses[name].append((node, i))
    return uses


def attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def draw_weight(rng, shape, uses):
    """A float32 tensor of the given shape for a weight used by `uses` (all uses must agree on its role)."""
    roles = {(node.op_type, i) for node, i in uses}
    if len(roles) != 1:
        raise SystemExit(f"weight used in more than one role: {sorted(roles)}")
    (op, index), node = roles.pop(), uses[0][0]
    if op == "Conv" and index == 1:
        # [out, in / group, kh, kw]: each output sums in / group * kh * kw products
        fan_in = int(np.prod(shape[1:]))
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    if op == "Gemm" and index == 1:
        fan_in = shape[1] if attr(node, "transB", 0) else shape[0]
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    if op in ("Conv", "Gemm") and index == 2:
        return rng.normal(0.0, 0.01, shape)
    if op == "BatchNormalization":
        if index in (1, 4):  # scale, running variance
            return rng.uniform(0.5, 1.5, shape)
        if index in (2, 3):  # bias, running mean
            return rng.normal(0.0, 0.1, shape)
    raise SystemExit(f"no initialisation rule for input {index} of {op}")


def materialise(model, rng):
    """Replaces the ConstantOfShape weight generators with seeded initializers (listed in graph.input too, as IR
    version 3, which the test models have and the version converter reads, wants)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = consumers(graph)
    keep, new_inits = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            keep.append(node)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
        w = draw_weight(rng, shape, uses[node.output[0]]).astype(np.float32)
        new_inits.append(numpy_helper.from_array(w, node.output[0]))
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    # the shape tensors the generators read are now unused
    used = {name for node in graph.node for name in node.input}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    listed = {i.name for i in graph.input}
    for t in new_inits:
        if t.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    return model


def drop_initializer_inputs(model):
    """Initializers leave graph.input: they are constants, not overridable inputs (IR version >= 4)."""
    names = {t.name for t in model.graph.initializer}
    used = {name for node in model.graph.node for name in node.input}
    data_inputs = [i for i in model.graph.input if i.name not in names and i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(data_inputs)


def classifier(graph):
    """The Conv or Gemm that feeds the (single) Softmax, followed back through Relu, pooling and reshapes."""
    producers = {out: node for node in graph.node for out in node.output}
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    if len(softmax) != 1:
        raise SystemExit("expected exactly one Softmax")
    node = producers[softmax[0].input[0]]
    while node.op_type not in ("Conv", "Gemm"):
        node = producers[node.input[0]]
    return node


def synthetic_images(rng, n, size=224, channels=3):
    """Image-like inputs, already "normalised": smooth random fields (bilinearly upsampled Gaussian noise at 4x4,
    16x16 and 56x56) plus three windowed oriented gratings per image (random orientation, frequency 2-40 cycles per
    image, phase, position, width, colour), then a random per-image colour gain and offset, the whole set scaled to
    mean 0 and std 1. The gratings and colour casts make images differ globally, not only pixel by pixel: a random
    network's pooled features then depend on the input enough for its arg-max, and quantization errors, to mean
    something."""

    def upsample_matrix(src, dst):
        pos = (np.arange(dst) + 0.5) * src / dst - 0.5
        lo = np.clip(np.floor(pos).astype(int), 0, src - 1)
        hi = np.clip(lo + 1, 0, src - 1)
        frac = np.clip(pos - lo, 0.0, 1.0)
        m = np.zeros((dst, src))
        m[np.arange(dst), lo] += 1.0 - frac
        m[np.arange(dst), hi] += frac
        return m

    smooth = np.zeros((n, channels, size, size))
    for grid, weight in ((4, 1.0), (16, 0.6), (56, 0.3)):
        up = upsample_matrix(grid, size)
        smooth += weight * (up @ rng.normal(0.0, 1.0, (n, channels, grid, grid)) @ up.T)
    smooth += 0.05 * rng.normal(0.0, 1.0, smooth.shape)
    smooth /= smooth.std()

    yy, xx = np.mgrid[0:size, 0:size] / size
    gratings = np.zeros_like(smooth)
    for k in range(n):
        for _ in range(3):
            theta, phase = rng.uniform(0.0, np.pi), rng.uniform(0.0, 2 * np.pi)
            freq = np.exp(rng.uniform(np.log(2.0), np.log(40.0)))
            cx, cy, width = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.5)
            wave = np.cos(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
            window = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))
            gratings[k] += rng.normal(0.0, 1.0, channels)[:, None, None] * (wave * window)[None]
    img = 0.5 * smooth + 2.0 * gratings / gratings.std()
    img = img * np.exp(rng.normal(0.0, 0.3, (n, channels, 1, 1))) + rng.normal(0.0, 0.5, (n, channels, 1, 1))
    img = (img - img.mean()) / img.std()
    return img.astype(np.float32)


def session(model_bytes, optimize=True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def probe(model, names, inputs):
    """Values of the named tensors for each input (run one at a time, batch 1), stacked: {name: [n, ...]}."""
    p = onnx.ModelProto()
    p.CopyFrom(model)
    listed = {o.name for o in p.graph.output}
    p.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in listed)
    sess = session(p.SerializeToString(), optimize=False)
    feed = model.graph.input[0].name
    runs = [sess.run(names, {feed: x[None]}) for x in inputs]
    return {n: np.concatenate([r[i] for r in runs]) for i, n in enumerate(names)}


def set_initializer(graph, name, array):
    for t in graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
            return
    raise SystemExit(f"no initializer {name}")


def calibrate_batchnorm(model, inputs):
    """BatchNormalization's running statistics are what training measures, not free parameters: random ones let
    activations compound through the residual blocks (ShuffleNet's grow ~1e5x). So, layer by layer in graph order,
    each BatchNormalization's mean and variance are set to its input's per-channel mean and variance over the
    calibration images; its random scale and bias stay. Its output's std per channel is then its scale."""
    graph = model.graph
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            continue
        x = probe(model, [node.input[0]], inputs)[node.input[0]].astype(np.float64)
        axes = tuple(i for i in range(x.ndim) if i != 1)
        set_initializer(graph, node.input[3], x.mean(axis=axes))
        set_initializer(graph, node.input[4], x.var(axis=axes))


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibrate_classifier(model, inputs):
    """Random deep ReLU networks map every input to nearly the same feature direction, so the raw classifier's
    arg-max is the same class for every input. Two data-dependent fixes on the classifier only, measured on
    calibration images that are not the saved inputs:
      1. per output channel, shift and scale weight and bias so its output has mean 0 and std 1 over the images
         (and positions);
      2. one global factor on weight and bias (exact through Relu and pooling, which are positively homogeneous),
         found by bisection, so that the median over the images of the softmax's max probability is TARGET_MAX_PROB."""
    graph = model.graph
    node = classifier(graph)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    w, b = inits[node.input[1]].astype(np.float64), inits[node.input[2]].astype(np.float64)
    out = probe(model, [node.output[0]], inputs)[node.output[0]]
    axes = tuple(i for i in range(out.ndim) if i != 1)  # every axis but the class/channel one
    mean, std = out.mean(axis=axes), out.std(axis=axes)
    w = w / std.reshape((-1,) + (1,) * (w.ndim - 1)) if node.op_type == "Conv" or attr(node, "transB", 0) else w / std
    b = (b - mean) / std
    set_initializer(graph, node.input[1], w)
    set_initializer(graph, node.input[2], b)

    sm = next(n for n in graph.node if n.op_type == "Softmax")
    z = probe(model, [sm.input[0]], inputs)[sm.input[0]]
    z = z.reshape(len(inputs), -1).astype(np.float64)
    median_max_prob = lambda f: float(np.median(softmax(f * z).max(axis=1)))  # noqa: E731
    lo, hi = 1e-3, 1e3
    for _ in range(60):  # median_max_prob increases with the factor
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if median_max_prob(mid) < TARGET_MAX_PROB else (lo, mid)
    factor = np.sqrt(lo * hi)
    set_initializer(graph, node.input[1], w * factor)
    set_initializer(graph, node.input[2], b * factor)


def build(name, out_dir, inputs, calibration, verbose=False):
    model = onnx.load(source_path(SOURCES[name]))
    model = materialise(model, np.random.default_rng(SEED))
    model = version_converter.convert_version(model, TARGET_OPSET)
    model.ir_version = IR_VERSION
    drop_initializer_inputs(model)
    model.producer_name = "fleetbench-models"
    model.graph.name = name

    calibrate_batchnorm(model, calibration[:BN_CALIBRATION_SAMPLES])
    calibrate_classifier(model, calibration)

    onnx.checker.check_model(model, full_check=True)
    model = shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    data = model.SerializeToString()
    check_outputs(name, model, session(data), inputs, verbose)

    path = os.path.join(out_dir, f"{name}.onnx")
    write_if_changed(path, data)
    inputs_path = os.path.join(out_dir, f"{name}-inputs.npy")
    buf = io.BytesIO()
    np.save(buf, inputs)
    write_if_changed(inputs_path, buf.getvalue())

    (inp,), (out,) = model.graph.input, model.graph.output
    dims = lambda v: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]  # noqa: E731
    print(
        f"{os.path.relpath(path)}: {len(data)} bytes, input {inp.name} {dims(inp)}, output {out.name} {dims(out)}, "
        f"{len(model.graph.node)} ops (opset {TARGET_OPSET}), inputs {os.path.relpath(inputs_path)} {list(inputs.shape)}"
    )


def check_outputs(name, model, sess, inputs, verbose=False):
    """The outputs must be finite probabilities that differ from input to input, neither uniform nor one-hot."""
    in_name, out_name = model.graph.input[0].name, model.graph.output[0].name
    probs = np.stack([sess.run([out_name], {in_name: x[None]})[0].reshape(-1) for x in inputs])
    if not np.all(np.isfinite(probs)):
        raise SystemExit(f"{name}: non-finite outputs")
    top1, pmax = probs.argmax(axis=1), probs.max(axis=1)
    if verbose:
        print(f"  {name}: top-1 {top1.tolist()}, max probability {[round(float(p), 3) for p in pmax]}")
    n_classes = probs.shape[1]
    if len(set(top1.tolist())) < 4:
        raise SystemExit(f"{name}: top-1 class barely varies across inputs: {top1.tolist()}")
    if not (pmax.min() > 2.0 / n_classes and np.median(pmax) < 0.9 and pmax.std() > 1e-3):
        raise SystemExit(f"{name}: degenerate softmax, max probabilities {pmax.round(4).tolist()}")


def write_if_changed(path, data):
    """Idempotent output: an identical file is left untouched (mtime included)."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return
    with open(path, "wb") as f:
        f.write(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=OUT_DIR, help="where to write the models and inputs (default models/conv)")
    parser.add_argument("--verbose", action="store_true", help="also print each model's top-1 classes and max probabilities")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    inputs = synthetic_images(np.random.default_rng(INPUT_SEED), SAMPLES)
    calibration = synthetic_images(np.random.default_rng(CALIBRATION_SEED), SAMPLES)
    for name in SOURCES:
        build(name, args.out_dir, inputs, calibration, args.verbose)


if __name__ == "__main__":
    main()
