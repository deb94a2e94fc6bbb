#!/usr/bin/env python3
"""Measures, for each ONNX Runtime release, the newest ONNX IR version and default-domain opset it loads.

This is where the table in runtime/src/compat.rs comes from. For each version it installs the PyPI wheel
into a scratch folder and asks that runtime to load a one-node model (Identity) stamped with each IR
version and opset in turn; the highest that loads is the release's limit. Run it again when a release is
added to the table:

    python3 scripts/ort_compat_probe.py 1.17.3 1.18.1 ... > /tmp/compat.txt
"""
import json
import os
import subprocess
import sys
import tempfile

PROBE = r"""
import json, warnings
warnings.filterwarnings("ignore")
import onnxruntime as ort

# The one-node model is written by hand (protobuf wire format), so the probe needs no `onnx` package:
# releases before 1.19 want NumPy 1, which today's `onnx` cannot import.
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)
def field(num, payload):
    if isinstance(payload, int):
        return varint(num << 3) + varint(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(num << 3 | 2) + varint(len(payload)) + payload
def value_info(name):
    dim = field(1, field(1, 1))                      # TensorShapeProto.dim { dim_value: 1 }
    tensor = field(1, 1) + field(2, dim)             # elem_type FLOAT, shape
    return field(1, name) + field(2, field(1, tensor))
def model(ir, op):
    node = field(1, "x") + field(2, "y") + field(4, "Identity")
    graph = field(1, node) + field(2, "g") + field(11, value_info("x")) + field(12, value_info("y"))
    return field(1, ir) + field(7, graph) + field(8, field(1, "") + field(2, op))
def loads(ir, op):
    try:
        ort.InferenceSession(model(ir, op), providers=["CPUExecutionProvider"])
        return True
    except Exception:
        return False
ir = max(i for i in range(3, 30) if loads(i, 13))
op = max(o for o in range(7, 40) if loads(7, o))
print(json.dumps({"version": ort.__version__, "max_ir": ir, "max_opset": op}))
"""

def main(versions):
    for v in versions:
        with tempfile.TemporaryDirectory() as target:
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                 f"onnxruntime=={v}", "flatbuffers", "coloredlogs", "humanfriendly", "sympy", "mpmath", "packaging",
                 # Releases before 1.19 were built against NumPy 1.
                 "numpy<2" if tuple(int(x) for x in v.split(".")[:2]) < (1, 19) else "numpy"],
                check=True,
            )
            env = dict(os.environ, PYTHONPATH=target)
            out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else json.dumps({"version": v, "error": out.stderr[-300:]})
            print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
