"""The head-group Loop for long causal self-attention: both branches of its If compute what the
one-call kernel computes, it applies only to what it matches, and never leaves a graph that
reads an undefined value."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import run_pipeline, spec_from_zoo
from export._head_groups import group_heads
from export._variants import op_census
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
    from export._head_groups import quantize_columns

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
