"""The CPU attention kernels alone: torch's scaled_dot_product_attention against onnxruntime's
GroupQueryAttention and MultiHeadAttention, by the rate each reaches on the FLOPs it must do.

    python benchmarks/attention_kernels.py       # batch 1, 8 heads of 64, seq 2048 and 4096

Kernels, on the same q, k, v:
- torch causal / torch full: scaled_dot_product_attention with is_causal=True (torch's flash
  kernel, which stops each query block at the diagonal) and without a mask;
- GQA causal: one com.microsoft.GroupQueryAttention call over the prompt as attnx lowers it
  (benchmarks/kernel_tiles.kernel_graph). With its present key/value outputs it takes
  onnxruntime's flash path, which also stops at the diagonal;
- GQA causal, no present: the same node with those outputs left out, which sends
  onnxruntime 1.32 to its non-flash path (attnx's lowerings keep them for that reason);
- GQA causal, denormals kept: the first node in a session of onnxruntime's default
  options, which keeps denormals (the others run on the Runner's, which flush them to zero,
  runtime/_denormals.py). The kernel masks the pairs j > i of its diagonal key block as
  exp(lowest float), a denormal in the product with v;
- MHA full: com.microsoft.MultiHeadAttention without mask (MLAS's flash kernel).

Causal kernels must do the pairs j <= i, about half of the full square. Each cell is the median
over blocks of 3 calls, the kernels taken in turns; *GFLOP/s* is on the FLOPs a kernel must do,
*x torch* the time against torch's kernel of the same masking. Writes attention_kernels.md and
attention_kernels.json under benchmarks/results/<cpu kind>/.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import CPU, session  # noqa: E402
from kernel_tiles import (  # noqa: E402
    HEAD_DIM,
    HEADS,
    block_ms,
    kernel_graph,
    run_meta,
    write_results,
)

CAUSAL_KERNELS = (
    "torch causal",
    "GQA causal",
    "GQA causal, no present",
    "GQA causal, denormals kept",
)
FULL_KERNELS = ("torch full", "MHA full")


def without_present(model: onnx.ModelProto) -> onnx.ModelProto:
    """The GroupQueryAttention graph with its present key/value outputs left out."""
    model = copy.deepcopy(model)
    node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    del node.output[1:]
    return model


def default_session(model: onnx.ModelProto, threads: int):
    """A session on onnxruntime's default options but the threads: denormals kept."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=[CPU])


def mha_graph() -> onnx.ModelProto:
    width = HEADS * HEAD_DIM
    node = helper.make_node(
        "MultiHeadAttention",
        ["q", "k", "v"],
        ["y"],
        domain="com.microsoft",
        num_heads=HEADS,
        scale=HEAD_DIM**-0.5,
    )
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node],
        "mha",
        [value(n, onnx.TensorProto.FLOAT, ["b", "s", width]) for n in "qkv"],
        [value("y", onnx.TensorProto.FLOAT, ["b", "s", width])],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def flops(seq: int, causal: bool) -> float:
    """q k^T and p v, 2 FLOPs per multiply-add each, over the pairs the kernel must score."""
    pairs = seq * (seq + 1) / 2 if causal else seq * seq
    return 4.0 * pairs * HEAD_DIM * HEADS


def kernels(feed: dict[str, np.ndarray], threads: int) -> dict:
    """{name: call}: every kernel on the same q, k, v, checked against torch's output first."""
    torch.set_num_threads(threads)
    q, k, v = (
        torch.from_numpy(feed[n]).view(1, -1, HEADS, HEAD_DIM).transpose(1, 2) for n in "qkv"
    )
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = {
        "torch causal": lambda: sdpa(q, k, v, is_causal=True),
        "torch full": lambda: sdpa(q, k, v),
    }
    graphs = {
        "GQA causal": kernel_graph(-1),
        "GQA causal, no present": without_present(kernel_graph(-1)),
        "MHA full": mha_graph(),
    }
    for name, model in graphs.items():
        sess = session(model, threads)[0]
        calls[name] = lambda s=sess: s.run(None, feed)[0]
    kept = default_session(kernel_graph(-1), threads)
    calls["GQA causal, denormals kept"] = lambda: kept.run(None, feed)[0]
    check(calls)
    return calls


def check(calls: dict) -> None:
    """Refuse to time a kernel whose output is not torch's of the same masking."""
    with torch.no_grad():
        want = {
            causal: calls["torch causal" if causal else "torch full"]().transpose(1, 2).numpy()
            for causal in (True, False)
        }
    for name in (*CAUSAL_KERNELS[1:], *FULL_KERNELS[1:]):
        got = calls[name]().reshape(want[True].shape)
        reference = want[name in CAUSAL_KERNELS]
        if not np.allclose(got, reference, atol=1e-4, rtol=1e-3):
            worst = float(np.abs(got - reference).max())
            raise RuntimeError(f"'{name}' differs from torch's kernel by up to {worst:.3g}")


def measure(seq: int, blocks: int, threads: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((1, seq, HEADS * HEAD_DIM), dtype=np.float32) for n in "qkv"}
    calls = kernels(feed, threads)
    cells: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(blocks):
            for name, call in calls.items():
                cells[name].append(block_ms(call, 3))
    return {name: round(statistics.median(ms), 2) for name, ms in cells.items()}


def markdown(rows: dict[int, dict[str, float]], meta: dict) -> str:
    names = [*CAUSAL_KERNELS, *FULL_KERNELS]
    lines = [
        "# CPU attention kernels: torch against onnxruntime",
        "",
        f"Command: `{meta['command']}`  ",
        f"CPU kind: {meta['cpu_kind']} ({meta['cpu_features']}); {meta['threads']} threads; "
        f"batch 1, {HEADS} heads of {HEAD_DIM}.",
        "",
        "Cells: median ms over blocks of 3 calls, kernels taken in turns; GFLOP/s on the FLOPs "
        "the kernel must do (causal: the pairs j <= i); the time against torch's kernel of the "
        "same masking.",
        "",
        "| seq | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for seq, cells in rows.items():
        text = []
        for name in names:
            causal = name in CAUSAL_KERNELS
            torch_ms = cells["torch causal" if causal else "torch full"]
            rate = flops(seq, causal) / (cells[name] / 1e3) / 1e9
            text.append(f"{cells[name]:.1f} ms, {rate:.0f} GFLOP/s ({cells[name] / torch_ms:.2f}x)")
        lines.append(f"| {seq} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="2048,4096")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = {}
    for seq in (int(s) for s in args.seq.split(",")):
        rows[seq] = measure(seq, args.blocks, args.threads)
        print(seq, rows[seq], flush=True)
    meta = run_meta("attention_kernels.py", argv, args.threads)
    write_results("attention_kernels", rows, meta, markdown(rows, meta), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
