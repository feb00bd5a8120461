"""benchmarks/hf_bench.py's timing rounds and its kernel-time shares: every graph gets a turn
at going first, a graph that fails is dropped with its reason, and the shares come from
onnxruntime's own profile of one call."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import hf_bench  # noqa: E402
import torch  # noqa: E402


def test_rounds_turn_the_order_and_drop_a_failing_graph():
    made = []

    def graph_call(name):
        made.append(name)
        if name == "bad":
            raise ort.capi.onnxruntime_pybind11_state.Fail("out of memory in the arena")
        return lambda: None

    failed = {}
    pairs = hf_bench.timed_rounds(lambda: None, graph_call, ["a", "b", "bad"], 3, 0.003, failed)
    assert made == ["a", "b", "bad", "b", "a", "a", "b"]  # round 2 would start with "bad"
    assert set(pairs) == {"a", "b"}
    assert all(len(rounds) == 3 for rounds in pairs.values())
    assert all(e > 0 and g > 0 for rounds in pairs.values() for e, g in rounds)
    assert failed == {"bad": "out of memory in the arena"}


def _embedding_matmul_relu():
    table = np.arange(32 * 16, dtype=np.float32).reshape(32, 16) / 512
    weight = np.eye(16, dtype=np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["e"]),
        helper.make_node("MatMul", ["e", "weight"], ["m"]),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weight, "weight")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_kernel_shares_come_from_the_profile_of_one_call():
    ids = torch.arange(64).reshape(2, 32) % 32
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    shares = hf_bench.kernel_shares(_embedding_matmul_relu(), feed, threads=1)
    assert shares["gemm"] > 0 and shares["other"] > 0  # MatMul; Gather and Relu
    assert shares["attention"] == 0
    assert sum(shares.values()) == pytest.approx(1.0)


def _node(op: str, ts: int, dur: int) -> dict:
    return {
        "cat": "Node",
        "name": f"{op}_kernel_time",
        "ts": ts,
        "dur": dur,
        "args": {"op_name": op},
    }


def test_only_the_last_run_counts():
    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
        _node("MatMul", 1, 90),  # the warm-up call
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
        _node("MatMul", 201, 30),
        _node("GroupQueryAttention", 240, 50),
        _node("Softmax", 290, 20),
    ]
    assert hf_bench.shares_of_last_run(events) == {"gemm": 0.3, "attention": 0.5, "other": 0.2}


def test_the_table_says_what_the_gemms_alone_take():
    row = {"best_shares": {"gemm": 0.8, "attention": 0.05, "other": 0.15}}
    row["ratios"] = {"attnx best": 0.9}
    assert hf_bench._bound(row) == "80% / 5% / 15% | 0.72x | "
    assert hf_bench._bound({"ratios": {}}) == "- | - | "


def _row(ms: dict, ratio: dict) -> dict:
    return {"ms": ms, "pair_ratio": ratio, "gflop": 1.0}


def test_the_best_is_the_fastest_and_must_beat_eager_and_every_peer():
    ms = {"attnx:base": 90.0, "attnx:fused": 80.0, "optimum": 85.0, "transformers": 95.0}
    ratio = {"attnx:base": 0.70, "attnx:fused": 0.75, "optimum": 0.8, "transformers": 0.9}
    row = hf_bench.summarize(_row(ms, ratio), ["attnx:base", "attnx:fused"], gemm=100.0)
    assert row["attnx_best_variant"] == "attnx:fused" and row["meets_target"]
    slower = hf_bench.summarize(_row(ms | {"optimum": 79.0}, ratio), ["attnx:fused"], gemm=100.0)
    assert not slower["meets_target"]  # a peer took less time
    over = hf_bench.summarize(_row(ms, ratio | {"attnx:fused": 0.81}), ["attnx:fused"], gemm=100.0)
    assert not over["meets_target"]  # above 0.8x eager


def test_alternated_calls_each_once_a_round_in_turned_order():
    order = []
    calls = {name: (lambda n=name: order.append(n)) for name in ("best", "optimum", "o2")}
    times = hf_bench.alternated(calls, rounds=3)
    assert order == ["best", "optimum", "o2", "optimum", "o2", "best", "o2", "best", "optimum"]
    assert {name: len(t) for name, t in times.items()} == {"best": 3, "optimum": 3, "o2": 3}


def test_paired_check_gives_quartiles_of_best_over_each_faster_peer():
    class Args:
        threads, check_rounds = 1, 8

    model = _embedding_matmul_relu()
    ids = torch.arange(64).reshape(2, 32) % 32
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    models = {"attnx:base": model, "transformers": model}
    checks = hf_bench.paired_check(feed, models, "attnx:base", ["transformers"], Args)
    q1, median, q3 = checks["transformers"]
    assert 0 < q1 <= median <= q3
    row = {"peer_check": {"transformers": [0.9, 1.01, 1.2]}}
    assert hf_bench._paired(row) == "transformers: 1.01 (0.90-1.20)"
    assert hf_bench._paired({}) == "-"


def test_a_rerun_replaces_only_its_points(tmp_path, monkeypatch):
    def row(family, batch, ms):
        return {"family": family, "point": {"batch": batch, "seq": 8}, "ms": {"attnx:base": ms}}

    path = tmp_path / "hf_bench.json"
    recorded = [row("bert", 1, 10.0), row("bert", 8, 80.0), row("llama", 8, 90.0)]
    path.write_text(json.dumps({"meta": {"command": "first"}, "rows": recorded}))
    rendered = []
    monkeypatch.setattr(hf_bench, "render", rendered.append)
    hf_bench.merge_into(path, [row("bert", 8, 70.0)], "python benchmarks/hf_bench.py --batch 8")
    record = json.loads(path.read_text())
    assert [r["ms"]["attnx:base"] for r in record["rows"]] == [10.0, 70.0, 90.0]
    assert record["meta"]["reruns"] == ["python benchmarks/hf_bench.py --batch 8"]
    assert rendered == [path]
