#!/usr/bin/env python3
"""Builds the models bundled with fleetbench. Outputs are committed, so building fleetbench needs no training.

models/digits/
  digits-fp32.onnx   MLP 64-512-512-10 trained on scikit-learn's handwritten digits (load_digits), fp32
  digits-int8.onnx   the same, dynamically quantized to int8 by onnxruntime.quantization.quantize_dynamic
  eval-inputs.npy    held-out eval set, float32 [n, 64], pixels scaled to [0, 1]
  eval-labels.npy    its labels, int64 [n]
  sample-inputs.npz  8 eval rows under the graph input name, for --input-data
  metadata.json      top-1 accuracy of each variant on the eval set as measured here with onnxruntime
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


def accuracy(path, x, y):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {INPUT: x})[0]
    return float((logits.argmax(axis=1) == y).mean())


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
