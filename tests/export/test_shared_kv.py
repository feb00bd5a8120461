"""export/rewrites/shared_kv.py: ONNX Attention reads grouped kv heads as they are, without the
repeat_kv copy, and computes what the repeated graph computed (numpy's attention as judge)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.rewrites.shared_kv import share_kv_result

B, H, H_KV, S, S_KV, D = 2, 4, 2, 3, 5, 8
FLOAT = TensorProto.FLOAT


def _graph(*, axis=2, head_rows=H, extra_reader=False, expand_shape=None, repeat="unsqueeze"):
    """q [b, h, s, d], k/v [b, h_kv, s_kv, d] -> Attention over k/v repeated to h heads."""
    inputs = [
        helper.make_tensor_value_info("q", FLOAT, ["b", H, S, D]),
        helper.make_tensor_value_info("k", FLOAT, ["b", H_KV, "s_kv", D]),
        helper.make_tensor_value_info("v", FLOAT, ["b", H_KV, "s_kv", D]),
    ]
    inits = [numpy_helper.from_array(np.array([axis], np.int64), "axes")]
    nodes = []
    for t in ("k", "v"):
        nodes += [
            helper.make_node("Shape", [t], [f"{t}_shape"]),
            helper.make_node("Gather", [f"{t}_shape", "zero"], [f"{t}_b"], axis=0),
            helper.make_node("Gather", [f"{t}_shape", "two"], [f"{t}_s"], axis=0),
            helper.make_node("Concat", [f"{t}_b", "hkv", "rep", f"{t}_s", "d"],
                             [f"{t}_expand_to"], axis=0),
            helper.make_node("Concat", [f"{t}_b", "heads", f"{t}_s", "d"], [f"{t}_to"], axis=0),
        ]
        if repeat == "unsqueeze":
            nodes.append(helper.make_node("Unsqueeze", [t, "axes"], [f"{t}_u"]))
        else:
            nodes.append(helper.make_node("Identity", [t], [f"{t}_u"]))
        nodes += [
            helper.make_node("Expand", [f"{t}_u", expand_shape or f"{t}_expand_to"], [f"{t}_e"]),
            helper.make_node("Reshape", [f"{t}_e", f"{t}_to"], [f"{t}_r"]),
        ]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("zero", [0]), ("two", [2]), ("hkv", [H_KV]), ("rep", [H // H_KV]), ("d", [D]),
               ("heads", [head_rows]))]
    nodes.append(helper.make_node("Attention", ["q", "k_r", "v_r"], ["y"]))
    outputs = [helper.make_tensor_value_info("y", FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["k_r"], ["k_seen"]))
        outputs.append(helper.make_tensor_value_info("k_seen", FLOAT, None))
    # The exporter writes each value's shape; the repeated k/v are [b, h, s_kv, d].
    infos = [helper.make_tensor_value_info(f"{t}_r", FLOAT, ["b", head_rows, "s_kv", D])
             for t in ("k", "v")]
    graph = helper.make_graph(nodes, "gqa", inputs, outputs, inits, value_info=infos)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


def _feed():
    rng = np.random.default_rng(0)
    return {"q": rng.standard_normal((B, H, S, D), np.float32),
            "k": rng.standard_normal((B, H_KV, S_KV, D), np.float32),
            "v": rng.standard_normal((B, H_KV, S_KV, D), np.float32)}


def _numpy_gqa(q, k, v):
    k, v = (np.repeat(t, H // H_KV, axis=1) for t in (k, v))  # head i reads kv head i // 2
    scores = q.astype(np.float64) @ k.transpose(0, 1, 3, 2) / np.sqrt(D)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _run(model):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], _feed())[0]


def test_the_repeat_goes_and_the_numbers_stay():
    model = _graph()
    result = share_kv_result(model)
    assert len(result.rewritten) == 1 and result.rejected == ()
    ops = [n.op_type for n in result.model.graph.node]
    assert "Expand" not in ops and "Unsqueeze" not in ops
    attention = next(n for n in result.model.graph.node if n.op_type == "Attention")
    assert list(attention.input) == ["q", "k", "v"]
    want = _numpy_gqa(**_feed())
    np.testing.assert_allclose(_run(result.model), want, atol=1e-5)
    np.testing.assert_allclose(_run(model), want, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"axis": 1}, "the Unsqueeze is not on axis 2"),
        ({"repeat": "identity"}, "the Expand does not read an Unsqueeze"),
        ({"extra_reader": True}, "the repeated k/v is read by something other than Attention"),
        ({"head_rows": 3}, "head counts 2 (kv) and 3 are not static, 3 a multiple of 2"),
    ],
    ids=["axis", "no-unsqueeze", "other-reader", "heads"],
)
def test_what_is_not_a_kv_repeat_is_left_with_its_reason(kwargs, reason):
    model = _graph(**kwargs)
    result = share_kv_result(model)
    assert result.model is model and result.rewritten == ()
    assert result.rejected[0].reason.startswith(reason)


def test_plain_attention_is_left_alone():
    q = helper.make_tensor_value_info("q", FLOAT, ["b", H, S, D])
    graph = helper.make_graph([helper.make_node("Attention", ["q", "q", "q"], ["y"])], "plain",
                              [q], [helper.make_tensor_value_info("y", FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    result = share_kv_result(model)
    assert result.model is model
    assert result.rejected[0].reason == "k/v is not a Reshape (no repeated kv heads)"


def test_unknown_shapes_and_other_repeats_are_refused():
    from export.rewrites.shared_kv import _repeat_source

    model = _graph()
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = {"k_r": [next(n for n in model.graph.node if n.op_type == "Attention")]}
    constants = {"axes": np.array([2])}
    args = (producers, consumers, constants, set())
    assert _repeat_source("k_r", *args, {})[1] == (
        "the shapes before and after the repeat are not known rank-4 shapes")
    shapes = {"k": ["b", H_KV, "s_kv", D], "k_r": ["b", H, "other", D]}
    assert _repeat_source("k_r", *args, shapes)[1].startswith(
        "the repeat changes more than the heads")
    producers["k_r"] = helper.make_node("Reshape", ["k", "to"], ["k_r"])
    assert _repeat_source("k_r", *args, shapes)[1] == "the Reshape does not read an Expand"
