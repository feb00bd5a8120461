"""benchmarks/attention_kernels.py times what it says: every onnxruntime kernel computes torch's
numbers for its masking before it is timed, a kernel that does not is refused, and its
GroupQueryAttention without present outputs still computes the same attention."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import attention_kernels  # noqa: E402
from bench import session  # noqa: E402
from kernel_tiles import HEAD_DIM, HEADS, kernel_graph  # noqa: E402


def _feed(seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((1, seq, HEADS * HEAD_DIM), dtype=np.float32) for n in "qkv"}


def test_every_kernel_matches_torch_before_it_is_timed():
    calls = attention_kernels.kernels(_feed(80), threads=1)  # raises where one differs
    assert set(calls) == {*attention_kernels.CAUSAL_KERNELS, *attention_kernels.FULL_KERNELS}


def test_a_kernel_that_differs_is_refused():
    calls = attention_kernels.kernels(_feed(80), threads=1)
    calls["GQA causal"] = calls["MHA full"]  # no causal mask
    with pytest.raises(RuntimeError, match="'GQA causal' differs from torch's kernel by up to"):
        attention_kernels.check(calls)


def test_without_present_only_the_outputs_change():
    model = attention_kernels.without_present(kernel_graph(-1))
    node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    assert list(node.output) == ["y"]
    feed = _feed(50)
    got = session(model, 1)[0].run(None, feed)[0]
    want = session(kernel_graph(-1), 1)[0].run(None, feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_causal_flops_count_the_pairs_j_le_i():
    assert attention_kernels.flops(3, causal=True) == 4 * 6 * HEAD_DIM * HEADS
    assert attention_kernels.flops(3, causal=False) == 4 * 9 * HEAD_DIM * HEADS


def test_the_table_has_a_rate_and_a_ratio_in_every_cell():
    rows = {64: attention_kernels.measure(64, blocks=1, threads=1)}
    meta = {"command": "c", "cpu_kind": "k", "cpu_features": "f", "threads": 1}
    line = attention_kernels.markdown(rows, meta).splitlines()[-1]
    cells = line.strip("|").split("|")[1:]
    assert len(cells) == 6 and all("GFLOP/s" in c and c.strip().endswith("x)") for c in cells)
