"""benchmarks/kernel_tiles.py times what it says: its tiled graphs compute their one call's
numbers, it refuses to time tiles that do not, and its table has a ratio in every cell."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import kernel_tiles  # noqa: E402
from bench import session  # noqa: E402


def _feed(seq):
    rng = np.random.default_rng(0)
    width = kernel_tiles.HEADS * kernel_tiles.HEAD_DIM
    return {n: rng.standard_normal((1, seq, width), dtype=np.float32) for n in "qkv"}


def test_each_tiled_graph_computes_its_one_call():
    sessions = {n: session(m, 1)[0] for n, m in kernel_tiles.graphs(tile=64).items()}
    kernel_tiles.check_tiles(sessions, _feed(300))  # raises where a pair differs


def test_tiles_that_differ_are_refused():
    graphs = kernel_tiles.graphs(tile=64)
    graphs["tiles, window 64"] = graphs["one call, causal"]  # a window's tiles without the window
    sessions = {n: session(m, 1)[0] for n, m in graphs.items()}
    with pytest.raises(RuntimeError, match="'tiles, window 64' differs from 'one call, window 64'"):
        kernel_tiles.check_tiles(sessions, _feed(300))


def test_the_table_has_a_ratio_for_every_cell():
    rows = kernel_tiles.measure(seq=96, tile=32, blocks=1, threads=1)
    meta = {"command": "c", "cpu_kind": "k", "cpu_features": "f", "threads": 1, "tile": 32}
    line = next(
        x for x in kernel_tiles.markdown({96: rows}, meta).splitlines() if x.startswith("| 96 |")
    )
    ratios = [float(cell.split("(")[1].rstrip("x) ")) for cell in line.split("|")[2:-1]]
    assert len(ratios) == len(rows)
    for ratio, name in zip(ratios, rows, strict=True):
        assert ratio == pytest.approx(rows[name] / rows["one call, causal"], abs=0.01)
