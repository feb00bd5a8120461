"""Cached GroupQueryAttention serves every batch, step and past length: one kernel call for one
row or one token, a Loop over rows for a batch of prompts over a past (which the CPU kernel
refuses in one call)."""

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from export import run_pipeline, spec_from_zoo
from export._variants import op_census
from export.rewrites import Rejected
from export.rewrites.batch_rows import rows_for_cached_prompts, rows_result
from export.rewrites.kernels import cached_attention as lowering
from models import zoo


@pytest.fixture(scope="module")
def kv_cache_fused():
    spec = spec_from_zoo(zoo.get("kv_cache"))
    result = run_pipeline(spec, out=None, grid=[dict(spec.example)], variants=("fused",))
    return spec, result.variants["fused"].model


def test_the_cached_kernel_sits_in_both_branches(kv_cache_fused):
    census = op_census(kv_cache_fused[1])
    assert census["If"] == 1 and census["Loop"] == 1
    assert census["com.microsoft.GroupQueryAttention"] == 2
    assert "Softmax" not in census


@pytest.mark.parametrize(
    ("batch", "seq", "past"),
    [(1, 5, 3), (3, 5, 3), (3, 1, 4), (3, 6, 0), (2, 1, 0), (4, 2, 9)],
    ids=["one-row", "rows-prompt-over-past", "decode", "prompt-no-past", "first-token", "4x2+9"],
)
def test_every_batch_step_and_past_matches_torch(kv_cache_fused, batch, seq, past):
    spec, fused = kv_cache_fused
    feed = spec.make_inputs({"batch": batch, "seq": seq, "past": past})
    with torch.no_grad():
        expected = [t.numpy() for t in spec.module(**feed)]
    sess = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in feed.items()})
    for name, g, e in zip(("y", "present_key", "present_value"), got, expected, strict=True):
        assert g.shape == e.shape, name
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-4, err_msg=name)


def test_graphs_without_a_cached_kernel_are_returned_unchanged(caplog):
    spec = spec_from_zoo(zoo.get("causal_self"))
    fused = run_pipeline(spec, out=None, grid=[dict(spec.example)], variants=("fused",))
    model = fused.variants["fused"].model
    assert rows_for_cached_prompts(model) is model
    (gqa,) = [n.name for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    with caplog.at_level(logging.DEBUG, logger="export.rewrites.batch_rows"):
        result = rows_result(model)
    assert result.model is model and result.rewritten == ()
    reason = "the node has no past key/value input: one kernel call serves any batch"
    assert result.rejected == (Rejected(gqa, reason),)
    logged = [r.getMessage() for r in caplog.records if r.name == "export.rewrites.batch_rows"]
    assert logged == [f"rows_for_cached_prompts left {gqa} as it is: {reason}"]


def test_a_cached_kernel_is_wrapped_and_one_without_a_past_is_not():
    inputs = ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total"]
    cached = helper.make_node("GroupQueryAttention", inputs, ["y", "pk", "pv"], name="cached")
    plain = helper.make_node(
        "GroupQueryAttention", ["y", "k", "v", "", "", "seqlens_k", "total"], ["z"], name=""
    )
    for node in (cached, plain):
        node.domain = "com.microsoft"
    graph = helper.make_graph(
        [cached, plain],
        "two_calls",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in inputs],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph)
    result = rows_result(model)
    assert result.rewritten == ("cached",)
    reason = "the node has no past key/value input: one kernel call serves any batch"
    assert result.rejected == (Rejected("GroupQueryAttention #1", reason),)  # unnamed: position
    ops = [n.op_type for n in result.model.graph.node]
    assert ops[-2:] == ["If", "GroupQueryAttention"] and ops.count("GroupQueryAttention") == 1
    assert rows_for_cached_prompts(model).graph.node == result.model.graph.node


def test_cached_lowering_refuses_dynamic_heads():
    class Shape:
        def __init__(self, shape):
            self.shape = shape

    q, k = Shape(("b", "s", "h", 8)), Shape(("b", "s", 2, 8))
    with pytest.raises(ValueError, match=r"cached_attention needs static head counts"):
        lowering(q, k, k, None, None)
