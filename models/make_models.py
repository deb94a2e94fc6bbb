#!/usr/bin/env python3
"""Builds the models bundled with fleetbench. Outputs are committed, so building fleetbench needs no training.

models/digits/
  digits-fp32.onnx   MLP 64-512-512-10 trained on scikit-learn's handwritten digits (load_digits), fp32
  digits-int8.onnx   the same, dynamically quantized to int8 by onnxruntime.quantization.quantize_dynamic
  digits-student.onnx  MLP 64-64-10 distilled from digits-fp32: trained (numpy, Adam, fixed seed) only on the
                     teacher's soft labels, softmax(teacher logits / T) with T = 4, over the same training split;
                     same graph input and output as the teacher
  eval-inputs.npy    held-out eval set, float32 [n, 64], pixels scaled to [0, 1]
  eval-labels.npy    its labels, int64 [n]
  sample-inputs.npz  8 eval rows under the graph input name, for --input-data
  metadata.json      top-1 accuracy of each variant on the eval set as measured here with onnxruntime
                     (and the student's top-1 agreement with the fp32 teacher)
models/testdata/
  multi-input.onnx   one input of every element type ONNX Runtime takes and a symbolic non-batch dimension,
                     for the runner's input-building tests
  unsupported-op.onnx  a valid ONNX file whose only node is an op no runtime has, for failure-path tests

Run: python models/make_models.py   (deterministic: fixed seeds; needs requirements.txt)
"""
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
DIGITS = os.path.join(HERE, "digits")
TESTDATA = os.path.join(HERE, "testdata")
OPSET = 17
IR_VERSION = 8
INPUT = "input"
OUTPUT = "logits"


def mlp_graph(name, layers):
    """layers: list of (W [in, out], b [out]); Relu between layers, logits out."""
    nodes, inits = [], []
    x = INPUT
    for i, (w, b) in enumerate(layers):
        wn, bn = f"fc{i}.weight", f"fc{i}.bias"
        inits += [numpy_helper.from_array(w.astype(np.float32), wn), numpy_helper.from_array(b.astype(np.float32), bn)]
        mm, add = f"fc{i}.matmul", f"fc{i}.out"
        nodes.append(helper.make_node("MatMul", [x, wn], [mm], name=f"fc{i}/MatMul"))
        last = i == len(layers) - 1
        nodes.append(helper.make_node("Add", [mm, bn], [OUTPUT if last else add], name=f"fc{i}/Add"))
        if not last:
            nodes.append(helper.make_node("Relu", [add], [f"fc{i}.relu"], name=f"fc{i}/Relu"))
            x = f"fc{i}.relu"
    n_in = layers[0][0].shape[0]
    n_out = layers[-1][0].shape[1]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", n_out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fleetbench-models")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def predict(path, x):
    """Top-1 class of each row of x under the model at path, run by onnxruntime on one thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT: x})[0].argmax(axis=1)


def accuracy(path, x, y):
    return float((predict(path, x) == y).mean())


# Knowledge distillation of the student (Hinton et al., 2015): soft targets only.
STUDENT_HIDDEN = 64
STUDENT_TEMPERATURE = 4.0
STUDENT_EPOCHS = 300
STUDENT_BATCH = 64
STUDENT_LR = 3e-3
STUDENT_SEED = 0


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def mlp_forward(layers, x):
    """Logits of the MLP (Relu between layers) in float64, from the float32 weights the ONNX graph holds."""
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(layers):
        h = h @ w.astype(np.float32).astype(np.float64) + b.astype(np.float32).astype(np.float64)
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def distill_student(teacher_layers, x_train):
    """Trains a 64-H-10 MLP on the teacher's soft labels softmax(logits / T), minimising the cross-entropy to them
    (equivalently KL(teacher || student) at temperature T) with minibatch Adam. Deterministic: seeded init and
    shuffling, no labels used. Returns [(W1, b1), (W2, b2)]."""
    rng = np.random.default_rng(STUDENT_SEED)
    t = STUDENT_TEMPERATURE
    x = x_train.astype(np.float64)
    target = softmax(mlp_forward(teacher_layers, x_train) / t)
    n_in, n_out, hidden = x.shape[1], target.shape[1], STUDENT_HIDDEN
    params = [
        rng.normal(0.0, np.sqrt(2.0 / n_in), (n_in, hidden)),
        np.zeros(hidden),
        rng.normal(0.0, np.sqrt(2.0 / hidden), (hidden, n_out)),
        np.zeros(n_out),
    ]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps, step = 0.9, 0.999, 1e-8, 0
    for _ in range(STUDENT_EPOCHS):
        perm = rng.permutation(len(x))
        for start in range(0, len(x), STUDENT_BATCH):
            idx = perm[start : start + STUDENT_BATCH]
            w1, b1, w2, b2 = params
            xb = x[idx]
            h = np.maximum(xb @ w1 + b1, 0.0)
            z = h @ w2 + b2
            # d/dz of T^2 * CE(target, softmax(z / T)), averaged over the batch
            g = t * (softmax(z / t) - target[idx]) / len(idx)
            gh = (g @ w2.T) * (h > 0)
            grads = [xb.T @ gh, gh.sum(axis=0), h.T @ g, g.sum(axis=0)]
            step += 1
            for p, gr, mp, vp in zip(params, grads, m, v):
                mp *= beta1
                mp += (1 - beta1) * gr
                vp *= beta2
                vp += (1 - beta2) * gr * gr
                p -= STUDENT_LR * (mp / (1 - beta1**step)) / (np.sqrt(vp / (1 - beta2**step)) + eps)
    w1, b1, w2, b2 = params
    return [(w1, b1), (w2, b2)]


def make_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    os.makedirs(DIGITS, exist_ok=True)
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)

    clf = MLPClassifier(hidden_layer_sizes=(512, 512), max_iter=200, random_state=0)
    clf.fit(x_train, y_train)
    layers = list(zip(clf.coefs_, clf.intercepts_))

    fp32 = os.path.join(DIGITS, "digits-fp32.onnx")
    onnx.save(mlp_graph("digits_mlp", layers), fp32)

    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = os.path.join(DIGITS, "digits-int8.onnx")
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)

    student = os.path.join(DIGITS, "digits-student.onnx")
    onnx.save(mlp_graph("digits_student", distill_student(layers, x_train)), student)

    np.save(os.path.join(DIGITS, "eval-inputs.npy"), x_eval)
    np.save(os.path.join(DIGITS, "eval-labels.npy"), y_eval)
    np.savez(os.path.join(DIGITS, "sample-inputs.npz"), **{INPUT: x_eval[:8]})

    meta = {
        "dataset": "sklearn.datasets.load_digits, 20% stratified hold-out (random_state=0)",
        "eval_samples": int(len(y_eval)),
        "sklearn_accuracy": float(clf.score(x_eval, y_eval)),
        "variants": {
            "fp32": {"file": "digits-fp32.onnx", "accuracy": accuracy(fp32, x_eval, y_eval)},
            "int8": {"file": "digits-int8.onnx", "accuracy": accuracy(int8, x_eval, y_eval)},
            "student": {
                "file": "digits-student.onnx",
                "accuracy": accuracy(student, x_eval, y_eval),
                "agreement_with_fp32": float((predict(student, x_eval) == predict(fp32, x_eval)).mean()),
                "architecture": f"MLP {x.shape[1]}-{STUDENT_HIDDEN}-10",
                "distillation": f"soft labels only, softmax(teacher logits / {STUDENT_TEMPERATURE:g}), "
                f"{STUDENT_EPOCHS} epochs of Adam (lr {STUDENT_LR:g}, batch {STUDENT_BATCH}, seed {STUDENT_SEED})",
            },
        },
    }
    with open(os.path.join(DIGITS, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(json.dumps(meta, indent=2))


def make_multi_input():
    """Every element type ONNX Runtime takes as a graph input, each reduced to its shape; the shapes are summed."""
    os.makedirs(TESTDATA, exist_ok=True)
    types = [
        ("f32", TensorProto.FLOAT, ["batch", "seq"]),
        ("f64", TensorProto.DOUBLE, ["batch", 3]),
        ("f16", TensorProto.FLOAT16, ["batch", 3]),
        ("bf16", TensorProto.BFLOAT16, ["batch", 3]),
        ("i8", TensorProto.INT8, ["batch", 3]),
        ("u8", TensorProto.UINT8, ["batch", 3]),
        ("i16", TensorProto.INT16, ["batch", 3]),
        ("u16", TensorProto.UINT16, ["batch", 3]),
        ("i32", TensorProto.INT32, ["batch", 3]),
        ("u32", TensorProto.UINT32, ["batch", 3]),
        ("i64", TensorProto.INT64, ["batch", 3]),
        ("u64", TensorProto.UINT64, ["batch", 3]),
        ("flag", TensorProto.BOOL, ["batch", 3]),
        ("text", TensorProto.STRING, ["batch", 2]),
    ]
    nodes, inputs, shapes = [], [], []
    for name, ty, shape in types:
        inputs.append(helper.make_tensor_value_info(name, ty, shape))
        nodes.append(helper.make_node("Shape", [name], [f"{name}.shape"]))
        shapes.append(f"{name}.shape")
    nodes.append(helper.make_node("Concat", shapes, ["shapes"], axis=0))
    nodes.append(helper.make_node("ReduceSum", ["shapes"], ["total"], keepdims=0))
    graph = helper.make_graph(nodes, "multi_input", inputs, [helper.make_tensor_value_info("total", TensorProto.INT64, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fleetbench-models")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(TESTDATA, "multi-input.onnx"))


def make_unsupported_op():
    """Valid ONNX that no runtime can load: its node is an op of an unknown domain."""
    node = helper.make_node("NoSuchOp", ["input"], ["output"], domain="com.fleetbench.test")
    graph = helper.make_graph(
        [node],
        "unsupported_op",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.fleetbench.test", 1)],
        producer_name="fleetbench-models",
    )
    model.ir_version = IR_VERSION
    onnx.save(model, os.path.join(TESTDATA, "unsupported-op.onnx"))


if __name__ == "__main__":
    np.random.seed(0)
    make_digits()
    make_multi_input()
    make_unsupported_op()
