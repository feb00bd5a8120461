"""One com.microsoft.GroupQueryAttention node at seq 2048, batch 1, by head size: what the
padding column (head size 64 + 1, padded to a multiple of 8) costs the causal kernel.

    python benchmarks/gqa_head_size.py [--seq 2048] [--threads 2]

Prints the median of 5 runs per (heads, kv heads, head size), after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

SHAPES = [(8, 8, 64), (8, 4, 64), (8, 4, 72), (8, 8, 72), (8, 4, 80)]


def graph(heads: int, kv_heads: int, head_size: int):
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "", "", "seqlens_k", "total"],
        ["out"],
        domain="com.microsoft",
        num_heads=heads,
        kv_num_heads=kv_heads,
        scale=head_size**-0.5,
    )

    def value(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    inputs = [
        value("q", TensorProto.FLOAT, ["b", "s", heads * head_size]),
        value("k", TensorProto.FLOAT, ["b", "s", kv_heads * head_size]),
        value("v", TensorProto.FLOAT, ["b", "s", kv_heads * head_size]),
        value("seqlens_k", TensorProto.INT32, ["b"]),
        value("total", TensorProto.INT32, []),
    ]
    g = helper.make_graph([node], "gqa", inputs, [value("out", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(g, opset_imports=opsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    rng = np.random.default_rng(0)
    s = args.seq
    for heads, kv_heads, size in SHAPES:
        model = graph(heads, kv_heads, size).SerializeToString()
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        feed = {
            "q": rng.standard_normal((1, s, heads * size), dtype=np.float32),
            "k": rng.standard_normal((1, s, kv_heads * size), dtype=np.float32),
            "v": rng.standard_normal((1, s, kv_heads * size), dtype=np.float32),
            "seqlens_k": np.array([s - 1], np.int32),
            "total": np.array(s, np.int32),
        }
        session.run(None, feed)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3
        print(f"heads {heads}, kv heads {kv_heads}, head size {size}: {ms:.1f} ms")


if __name__ == "__main__":
    main()
