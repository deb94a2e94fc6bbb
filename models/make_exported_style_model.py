"""Writes a small convolutional classifier the way TensorFlow and Paddle exporters often write models:
weights held in `Constant` nodes rather than initializers (or, with --initializers-as-inputs, as
initializers also listed as graph inputs, as IR versions before 4 required), opset 11, and an input with
symbolic height and width (`x: [N, 3, H, W]`). Weights are seeded random numbers: the model exists to be
quantized and run, not to classify anything.

    python models/make_exported_style_model.py OUT.onnx [--initializers-as-inputs] [--convs N]
"""

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(convs: int, as_inputs: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    nodes, inits, inputs = [], [], []
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    inputs.append(x)

    def weight(name, array):
        t = numpy_helper.from_array(array.astype(np.float32), name)
        if as_inputs:
            inits.append(t)
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(array.shape)))
        else:
            nodes.append(helper.make_node("Constant", [], [name], value=t, name=f"const_{name}"))
        return name

    prev, channels = "x", 3
    for i in range(convs):
        out_c = 8 if i < convs - 1 else 16
        w = weight(f"conv{i}.w", rng.normal(0, np.sqrt(2.0 / (channels * 9)), (out_c, channels, 3, 3)))
        b = weight(f"conv{i}.b", rng.normal(0, 0.01, (out_c,)))
        nodes.append(helper.make_node("Conv", [prev, w, b], [f"conv{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        prev, channels = f"relu{i}", out_c
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["pooled"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"))
    fw = weight("fc.w", rng.normal(0, 0.25, (channels, 10)))
    fb = weight("fc.b", rng.normal(0, 0.01, (10,)))
    nodes.append(helper.make_node("Gemm", ["flat", fw, fb], ["logits"], name="fc"))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    graph = helper.make_graph(nodes, "exported_style", inputs, [out], initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 11)],
        producer_name="fleetbench make_exported_style_model.py",
    )
    model.ir_version = 3 if as_inputs else 6
    onnx.checker.check_model(model)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--initializers-as-inputs", action="store_true")
    ap.add_argument("--convs", type=int, default=6)
    a = ap.parse_args()
    onnx.save(build(a.convs, a.initializers_as_inputs), a.out)
    print(a.out)


if __name__ == "__main__":
    main()
