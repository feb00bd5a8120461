"""The head-group Loop for long causal self-attention: both branches of its If compute what the
one-call kernel computes, it applies only to what it matches and says why it left the rest,
and never leaves a graph that reads an undefined value."""

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
from export.rewrites.head_groups import group_heads, group_heads_result
from models import zoo

CPU = ["CPUExecutionProvider"]


def _run(model: onnx.ModelProto, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=CPU).run(None, feed)[0]


@pytest.fixture(scope="module")
def fused_causal():
    spec = spec_from_zoo(zoo.get("causal_self"))
    result = run_pipeline(spec, out=None, grid=[dict(spec.example)], variants=("fused",))
    return spec, result.variants["fused"].model


@pytest.mark.parametrize("seq", [1, 3, 4, 9, 33])
@pytest.mark.parametrize("groups", [2, 4])
def test_both_branches_match_torch_and_the_one_call_kernel(fused_causal, groups, seq):
    spec, fused = fused_causal
    grouped = group_heads(fused, groups=groups, min_seq=4)  # seq >= 4 takes the Loop
    census = op_census(grouped)
    assert census["If"] == 1 and census["Loop"] == 1
    assert census["com.microsoft.GroupQueryAttention"] == 2  # one per branch
    feed = spec.make_inputs({"batch": 3, "seq": seq})
    with torch.no_grad():
        expected = spec.module(**feed).numpy()
    arrays = {k: v.numpy() for k, v in feed.items()}
    np.testing.assert_allclose(_run(grouped, arrays), expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(_run(grouped, arrays), _run(fused, arrays), atol=1e-6, rtol=1e-5)


def test_head_counts_the_groups_do_not_divide_are_left_alone(fused_causal):
    _, fused = fused_causal
    assert group_heads(fused, groups=3) is fused  # 4 heads in the small zoo


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _gqa(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")


def _producer(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if name in n.output)


def _projection_node(model: onnx.ModelProto, which: str, op_type: str) -> onnx.NodeProto:
    """The MatMul or bias Add of the q, k or v projection chain feeding the kernel."""
    node = _producer(model, _gqa(model).input["qkv".index(which)])
    while node.op_type != op_type:
        node = _producer(model, node.input[0])
    return node


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    next(a for a in node.attribute if a.name == name).i = value


def _kv_heads_2(model):
    _set_attr(_gqa(model), "kv_num_heads", 2)
    return 4, "kv_num_heads 2 is not a multiple of 4 groups"


def _past(model):
    _gqa(model).input[3] = "past_key"
    return 2, "the node has a past key/value input"


def _present_used(model):
    present = _gqa(model).output[1]
    model.graph.node.append(helper.make_node("Identity", [present], ["present_out"]))
    model.graph.output.append(helper.make_tensor_value_info("present_out", 1, None))
    return 2, f"present key/value outputs are used ({present!r})"


def _q_is_the_input(model):
    _gqa(model).input[0] = "x"
    return 2, (
        "q is not a MatMul projection with a constant weight: it is a graph input or an "
        "initializer, not a MatMul output"
    )


def _bias_add_of_two_constants(model):
    add = _projection_node(model, "q", "Add")
    add.input[0] = "k_proj.bias"
    return 2, (
        f"q is not a MatMul projection with a constant weight: its bias Add {add.name!r} has "
        f"2 constant inputs, not one"
    )


def _identity_before_the_bias(model):
    add = _projection_node(model, "k", "Add")
    model.graph.node.append(helper.make_node("Identity", [add.input[0]], ["k_copy"], name="cp"))
    add.input[0] = "k_copy"
    return 2, (
        "k is not a MatMul projection with a constant weight: it comes from Identity 'cp', "
        "not a MatMul"
    )


def _weight_not_constant(model):
    matmul = _projection_node(model, "v", "MatMul")
    matmul.input[1] = "x"
    return 2, (
        f"v is not a MatMul projection with a constant weight: the weight 'x' of MatMul "
        f"{matmul.name!r} is not an initializer"
    )


def _k_projects_another_input(model):
    model.graph.node.insert(0, helper.make_node("Identity", ["x"], ["x_copy"]))
    _projection_node(model, "k", "MatMul").input[0] = "x_copy"
    return 2, "q, k and v are not MatMul projections of one input: they project 'x', 'x_copy', 'x'"


def _kv_heads_8(model):
    _set_attr(_gqa(model), "kv_num_heads", 8)
    return 4, (
        "weight shapes [32, 32], [32, 32], [32, 32] do not match heads*head_dim columns "
        "32, 64, 64 (num_heads 4, kv_num_heads 8, head_dim 8)"
    )


REJECTIONS = {
    "heads": lambda model: (3, "num_heads 4 is not a multiple of 3 groups"),
    "kv-heads": _kv_heads_2,
    "past": _past,
    "present-used": _present_used,
    "q-not-projected": _q_is_the_input,
    "bias-add-two-constants": _bias_add_of_two_constants,
    "not-a-matmul": _identity_before_the_bias,
    "weight-not-constant": _weight_not_constant,
    "two-inputs": _k_projects_another_input,
    "weight-widths": _kv_heads_8,
}


@pytest.mark.parametrize("make", REJECTIONS.values(), ids=REJECTIONS.keys())
def test_each_rejection_says_why_and_leaves_the_graph(fused_causal, make):
    _, fused = fused_causal
    model = _copy(fused)
    groups, reason = make(model)
    result = group_heads_result(model, groups=groups)
    assert result.rejected == (Rejected(_gqa(model).name, reason),)
    assert result.model is model and result.rewritten == ()
    assert group_heads(model, groups=groups) is model


def _logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "export.rewrites.head_groups"]


def test_a_match_is_rewritten_with_nothing_rejected(fused_causal, caplog):
    _, fused = fused_causal
    with caplog.at_level(logging.DEBUG, logger="export.rewrites.head_groups"):
        result = group_heads_result(fused, groups=2)
    assert result.rewritten == (_gqa(fused).name,) and result.rejected == ()
    assert result.model.graph == group_heads(fused, groups=2).graph
    assert _logged(caplog) == []


def test_rejections_are_logged_at_debug(fused_causal, caplog):
    _, fused = fused_causal
    with caplog.at_level(logging.DEBUG, logger="export.rewrites.head_groups"):
        group_heads(fused, groups=3)
    assert _logged(caplog) == [
        f"group_heads left {_gqa(fused).name} as it is: num_heads 4 is not a multiple of 3 groups"
    ]


def test_graphs_without_the_pattern_are_returned_unchanged():
    spec = spec_from_zoo(zoo.get("mha_causal"))  # padding: extra head dims, not a plain chain
    result = run_pipeline(spec, out=None, grid=[dict(spec.example)], variants=("fused",))
    fused = result.variants["fused"].model
    assert group_heads(fused, groups=2) is fused


def test_a_rewrite_that_would_leave_a_dangling_read_is_refused(fused_causal):
    _, fused = fused_causal
    broken = onnx.ModelProto()
    broken.CopyFrom(fused)
    gqa = next(n for n in broken.graph.node if n.op_type == "GroupQueryAttention")
    q_input = gqa.input[0]
    # Something after the attention also reads the query projection: moving the projection
    # into a branch would leave that read undefined.
    broken.graph.node.append(onnx.helper.make_node("Identity", [q_input], ["also_q"]))
    broken.graph.output.append(onnx.helper.make_tensor_value_info("also_q", 1, None))
    assert group_heads(broken, groups=2) is broken
    result = group_heads_result(broken, groups=2)
    reason = (
        f"the rewritten graph would read {q_input!r} before anything defines it (another node "
        f"reads what the rewrite moves into the If)"
    )
    assert result.rejected == (Rejected(gqa.name, reason),) and result.rewritten == ()
    assert result.model is broken


def test_long_blocks_get_the_loop_and_short_ones_do_not():
    big = zoo.scaled(zoo.Size(d=64, heads=4, max_seq=1024, vocab=50, window=16))["causal_self"]
    small = zoo.get("causal_self")  # max seq 256: the Loop would be dead code
    census = {}
    for name, entry in (("big", big), ("small", small)):
        spec = spec_from_zoo(entry)
        result = run_pipeline(spec, out=None, grid=[dict(spec.example)], variants=("fused",))
        census[name] = op_census(result.variants["fused"].model)
    assert census["big"].get("Loop") == 1 and "Loop" not in census["small"]


@pytest.mark.parametrize("seq", [1, 9, 33])
def test_int8_loop_quantizes_the_projections_of_both_branches(fused_causal, seq):
    spec, fused = fused_causal
    grouped = group_heads(fused, groups=2, min_seq=4, int8=True)
    census = op_census(grouped)
    assert census["If"] == 1 and census["Loop"] == 1
    # q, k and v on the one-call path, the packed group projection in the Loop body
    assert census["com.microsoft.DynamicQuantizeMatMul"] == 4
    assert census["MatMul"] == op_census(fused)["MatMul"] - 3  # the output projection stays
    feed = spec.make_inputs({"batch": 3, "seq": seq})
    with torch.no_grad():
        expected = spec.module(**feed).numpy()
    arrays = {k: v.numpy() for k, v in feed.items()}
    np.testing.assert_allclose(_run(grouped, arrays), expected, atol=0.1, rtol=0.1)  # int8's


def test_columns_are_quantized_symmetrically_within_half_a_step():
    from export.rewrites.head_groups import quantize_columns

    weight = np.random.default_rng(0).standard_normal((2, 16, 6)).astype(np.float32)
    weight[1, :, 2] = 0.0  # an all-zero column keeps a usable scale
    quantized, scales = quantize_columns(weight)
    assert quantized.dtype == np.int8 and scales.shape == (2, 6)
    assert np.abs(quantized).max() == 64 and scales[1, 2] == 1.0
    error = np.abs(quantized * scales[:, None, :] - weight)
    assert np.all(error <= scales[:, None, :] / 2 + 1e-7)


def test_the_int8_variant_of_a_long_block_keeps_the_loop():
    big = zoo.scaled(zoo.Size(d=64, heads=4, max_seq=1024, vocab=50, window=16))["causal_self"]
    spec = spec_from_zoo(big)
    result = run_pipeline(spec, out=None, grid=[dict(spec.example)], variants=("int8",))
    census = op_census(result.variants["int8"].model)
    assert census.get("Loop") == 1 and census["com.microsoft.DynamicQuantizeMatMul"] == 4
    assert "MatMul" not in census  # the quantizer took the output projection
