"""Writes a large model the way models over 2 GiB must be stored: an `.onnx` holding only the graph, and
its weights as ONNX external data in several files in a subfolder (one file per layer's weight, one
shared file of biases read at offsets), the layout `onnx.save(..., save_as_external_data=True)` and
exporters produce. Weights are seeded random numbers (scaled so activations stay finite), written one
layer at a time, so making a 4 GiB model never holds more than one layer in memory.

    python models/make_large_model.py OUT_DIR [--mib 256] [--hidden 2048] [--name model.onnx]

The model: x [N, hidden] -> (MatMul, Add, Relu) x layers -> y [N, hidden], opset 13. Layers are chosen so
the weights total about --mib MiB.
"""

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper


def external(name, dims, location, offset, length):
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--name", default="model.onnx")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()

    d = a.hidden
    layer_bytes = d * d * 4
    layers = max(1, round(a.mib * (1 << 20) / layer_bytes))
    os.makedirs(os.path.join(a.out_dir, "weights"), exist_ok=True)
    rng = np.random.default_rng(a.seed)
    nodes, inits = [], []
    prev = "x"
    bias_path = os.path.join(a.out_dir, "weights", "bias.bin")
    with open(bias_path, "wb") as biases:
        for i in range(layers):
            w = (rng.standard_normal((d, d), dtype=np.float32) * np.float32(1.0 / np.sqrt(d))).astype(np.float32)
            loc = f"weights/layer{i:03d}.bin"
            w.tofile(os.path.join(a.out_dir, loc))
            inits.append(external(f"w{i}", [d, d], loc, 0, w.nbytes))
            b = (rng.standard_normal(d, dtype=np.float32) * np.float32(0.01)).astype(np.float32)
            off = biases.tell()
            biases.write(b.tobytes())
            inits.append(external(f"b{i}", [d], "weights/bias.bin", off, b.nbytes))
            del w
            mm, add, out = f"mm{i}", f"add{i}", ("y" if i == layers - 1 else f"h{i}")
            nodes += [
                helper.make_node("MatMul", [prev, f"w{i}"], [mm], name=f"matmul{i}"),
                helper.make_node("Add", [mm, f"b{i}"], [add], name=f"add{i}"),
                helper.make_node("Relu", [add], [out], name=f"relu{i}"),
            ]
            prev = out
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="make_large_model.py")
    model.ir_version = 8
    path = os.path.join(a.out_dir, a.name)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    total = sum(os.path.getsize(os.path.join(r, n)) for r, _, fs in os.walk(a.out_dir) for n in fs)
    print(f"{path}: {layers} layers of {d}x{d}, {layers + 2} files, {total} bytes")


if __name__ == "__main__":
    main()
