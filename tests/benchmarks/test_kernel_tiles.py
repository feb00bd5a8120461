"""benchmarks/kernel_tiles.py times what it says: its tiled graphs compute the one call's
numbers (the benchmark refuses to time them otherwise), and its table names every cell."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import kernel_tiles  # noqa: E402

CPU = ["CPUExecutionProvider"]


def _run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=CPU).run(None, feed)[0]


def test_each_tiled_graph_computes_its_one_call():
    rng = np.random.default_rng(0)
    width = kernel_tiles.HEADS * kernel_tiles.HEAD_DIM
    feed = {n: rng.standard_normal((1, 300, width), dtype=np.float32) for n in "qkv"}
    graphs = kernel_tiles.graphs(tile=64)
    pairs = [
        ("one call, causal", "tiles, causal"),
        ("one call, window 64", "tiles, window 64"),
        ("one call, window 256", "tiles, window 256"),
    ]
    for one, tiles in pairs:
        np.testing.assert_allclose(
            _run(graphs[tiles], feed), _run(graphs[one], feed), atol=1e-5, rtol=1e-4
        )


def test_the_table_has_a_ratio_for_every_cell():
    rows = kernel_tiles.measure(seq=96, tile=32, blocks=1, threads=1)
    text = kernel_tiles.markdown(
        {96: rows}, {"command": "c", "cpu_kind": "k", "cpu_features": "f", "threads": 1, "tile": 32}
    )
    line = next(x for x in text.splitlines() if x.startswith("| 96 |"))
    assert line.count("x)") == len(kernel_tiles.graphs(32)) and "(1.00x)" in line
