"""Causal sliding-window attention over query tiles: the rewritten graph computes windowed
causal attention as a numpy closed form and torch compute it, at tile counts from one to many
and at lengths that are not a multiple of the tile, on plain, grouped and packed kernels and
inside subgraphs; it applies only to what it matches and says why it left the rest."""

import json
import logging
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from export import run_pipeline, spec_from_zoo
from export._variants import op_census
from export.rewrites import Rejected
from export.rewrites.query_tiles import tile_queries, tile_queries_result
from models import zoo

CPU = ["CPUExecutionProvider"]
FLOAT = onnx.TensorProto.FLOAT
GQA_KEYS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total")


def _const(name, value):
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.int64), name)
    )


def _lengths() -> list[onnx.NodeProto]:
    """seqlens_k = Cast(Expand(Sub(n, 1))) and total = Cast(Squeeze(n)) of q's length n, as
    export/rewrites/kernels.py builds them."""
    make = helper.make_node
    i32 = onnx.TensorProto.INT32
    return [
        _const("one", [1]),
        _const("zero", [0]),
        _const("two", [2]),
        make("Shape", ["q"], ["shape"]),
        make("Slice", ["shape", "zero", "one"], ["batch"]),
        make("Slice", ["shape", "one", "two"], ["n"]),
        make("Sub", ["n", "one"], ["last"]),
        make("Expand", ["last", "batch"], ["last_rows"]),
        make("Cast", ["last_rows"], ["seqlens"], to=i32),
        make("Squeeze", ["n", "zero"], ["n0"]),
        make("Cast", ["n0"], ["total"], to=i32),
    ]


def gqa_model(heads=4, kv_heads=2, head_dim=8, window=6, packed=False, **attrs) -> onnx.ModelProto:
    """q [b, s, h * h_d], k and v [b, s, h_kv * h_d] -> y through one GroupQueryAttention."""
    nodes = _lengths()
    inputs = ["q", "k", "v"]
    if packed:
        nodes.append(helper.make_node("Concat", ["q", "k", "v"], ["qkv"], axis=2))
        inputs = ["qkv", "", ""]
    gqa_attrs = {
        "num_heads": heads,
        "kv_num_heads": kv_heads,
        "scale": 1.0 / np.sqrt(head_dim),
        "local_window_size": window,
        **attrs,
    }
    nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            [*inputs, "", "", "seqlens", "total"],
            ["y", "present_key", "present_value"],
            domain="com.microsoft",
            name="gqa",
            **gqa_attrs,
        )
    )
    graph = helper.make_graph(
        nodes,
        "gqa",
        [
            helper.make_tensor_value_info("q", FLOAT, ["b", "s", heads * head_dim]),
            helper.make_tensor_value_info("k", FLOAT, ["b", "s", kv_heads * head_dim]),
            helper.make_tensor_value_info("v", FLOAT, ["b", "s", kv_heads * head_dim]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, ["b", "s", heads * head_dim])],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def causal_attention(q, k, v, heads, kv_heads, window=-1):
    """Closed form in float64: softmax over keys j <= i (and i - j < window) of q k^T / sqrt(h_d),
    times v; query head i reads kv head i // (heads / kv_heads)."""
    b, s, _ = q.shape

    def split(x, n):
        return x.reshape(b, s, n, -1).transpose(0, 2, 1, 3).astype(np.float64)

    q, k, v = split(q, heads), split(k, kv_heads), split(v, kv_heads)
    k, v = (np.repeat(x, heads // kv_heads, axis=1) for x in (k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    i, j = np.arange(s)[:, None], np.arange(s)[None]
    allowed = (j <= i) & ((window < 0) | (i - j < window))
    scores = np.where(allowed, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return (weights @ v).transpose(0, 2, 1, 3).reshape(b, s, -1)


def _feed(batch, seq, heads, kv_heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    widths = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
    return {n: rng.standard_normal((batch, seq, w), dtype=np.float32) for n, w in widths.items()}


def _run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=CPU).run(None, feed)[0]


CASES = {
    "mha": dict(heads=4, kv_heads=4, head_dim=8, window=2),
    "gqa": dict(heads=4, kv_heads=2, head_dim=8, window=40),  # wider than a tile
    "mqa": dict(heads=4, kv_heads=1, head_dim=16, window=5),
    "packed": dict(heads=4, kv_heads=2, head_dim=8, window=3, packed=True),
    "packed-wide": dict(heads=2, kv_heads=2, head_dim=8, window=100, packed=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize(
    "batch, seq", [(1, 1), (2, 7), (3, 16), (3, 33), (1, 100), (2, 129)], ids=str
)
def test_tiles_compute_causal_attention_as_the_closed_form(case, batch, seq):
    model = gqa_model(**case)
    tiled = tile_queries(model, tile=32)  # 1 to 5 tiles, with and without padded rows
    onnx.checker.check_model(tiled, full_check=True)
    heads, kv_heads = case["heads"], case["kv_heads"]
    feed = _feed(batch, seq, heads, kv_heads, case["head_dim"])
    expected = causal_attention(
        **feed, heads=heads, kv_heads=kv_heads, window=case.get("window", -1)
    )
    np.testing.assert_allclose(_run(tiled, feed), expected, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(_run(tiled, feed), _run(model, feed), atol=1e-6, rtol=1e-5)


def test_the_kernel_is_called_per_tile_with_its_past_and_no_score_tensor():
    census = op_census(tile_queries(gqa_model(), tile=32))
    assert census["Loop"] == 2  # batch rows, then tiles
    assert census["com.microsoft.GroupQueryAttention"] == 1
    assert "Softmax" not in census and "MatMul" not in census
    tile_body = _tile_body(tile_queries(gqa_model(), tile=32))
    gqa = next(n for n in tile_body.node if n.op_type == "GroupQueryAttention")
    assert gqa.input[3] and gqa.input[4]  # the keys and values before the tile


def _tile_body(model):
    row_loop = next(n for n in model.graph.node if n.op_type == "Loop")
    body = row_loop.attribute[0].g
    return next(n for n in body.node if n.op_type == "Loop").attribute[0].g


@pytest.mark.parametrize("window", [2, 5, 300])
def test_a_window_hands_the_kernel_only_the_last_window_minus_one_keys(window):
    body = _tile_body(tile_queries(gqa_model(window=window), tile=32))
    gqa = next(n for n in body.node if n.op_type == "GroupQueryAttention")
    producers = {o: n for n in body.node for o in n.output}
    for past in gqa.input[3:5]:
        cut = producers[past]
        assert cut.op_type == "Slice" and cut.input[0] in [i.name for i in body.input]
        start = producers[cut.input[1]]
        assert numpy_helper.to_array(start.attribute[0].t).tolist() == [1 - window]


def test_the_tile_size_is_checked():
    with pytest.raises(ValueError, match=r"tile \(24\) must be a positive multiple of 16"):
        tile_queries(gqa_model(), tile=24)


def _wired(side: str, index: int, name: str):
    """A change that connects the kernel's input or output ``index`` to a graph input or
    output ``name`` ("input" or "output" side)."""

    def change(model):
        gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
        names = getattr(gqa, side)
        names.extend([""] * (index + 1 - len(names)))
        names[index] = name
        getattr(model.graph, side).append(helper.make_tensor_value_info(name, FLOAT, None))

    return change


def _with_input(index, name):
    return _wired("input", index, name)


def _with_attr(name, value):
    def change(model):
        gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
        kept = [a for a in gqa.attribute if a.name != name]
        del gqa.attribute[:]
        gqa.attribute.extend([*kept, helper.make_attribute(name, value)])

    return change


def _output_used(index, name):
    return _wired("output", index, name)


def _producer(model, name):
    return next(n for n in model.graph.node if name in n.output)


def _minus_two(model):
    sub = _producer(model, "last")
    model.graph.node.append(_const("two_again", [2]))
    sub.input[1] = "two_again"


def _total_of_another_length(model):
    squeeze = _producer(model, "n0")
    squeeze.input[0] = "batch"


def _seqlens_from_elsewhere(model):
    cast = next(n for n in model.graph.node if n.output[0] == "seqlens")
    cast.input[0] = "last"  # Cast(Sub(n, 1)) without the Expand


def _key_without_value(model):
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    gqa.input[2] = ""


REJECTIONS = {
    "past": (_with_input(3, "past_key"), "the node has a past key/value input"),
    "cos cache": (_with_input(7, "cos"), r"do not pass on: \['cos_cache'\]"),
    "do_rotary": (_with_attr("do_rotary", 1), "do not pass on: do_rotary"),
    "bias": (_with_input(10, "bias"), r"do not pass on: \['attention_bias'\]"),
    "head sink": (_with_input(11, "sink"), r"do not pass on: \['head_sink'\]"),
    "softcap": (_with_attr("softcap", 30.0), "the node uses softcap or smooth softmax"),
    "smooth": (_with_attr("smooth_softmax", 1), "the node uses softcap or smooth softmax"),
    "qk output": (
        _with_attr("qk_output", 1),
        r"attributes the tiles do not carry: \['qk_output'\]",
    ),
    "no window": (_with_attr("local_window_size", -1), "the node has no causal window"),
    "window 1": (_with_attr("local_window_size", 1), "window of 1 keys leaves no past to carry"),
    "no value": (_key_without_value, "a key without a value, or a value without a key"),
    "present used": (_output_used(1, "present_key"), r"outputs besides .* \('present_key'\)"),
    "qk used": (_output_used(3, "output_qk"), r"outputs besides .* \('output_qk'\)"),
    "no Expand": (_seqlens_from_elsewhere, "seqlens_k is not total_sequence_length - 1"),
    "minus two": (_minus_two, "seqlens_k is not total_sequence_length - 1"),
    "two lengths": (_total_of_another_length, "seqlens_k is not total_sequence_length - 1"),
}


@pytest.mark.parametrize("change, reason", REJECTIONS.values(), ids=REJECTIONS.keys())
def test_each_rejection_says_why_and_leaves_the_graph(change, reason):
    model = gqa_model()
    change(model)
    result = tile_queries_result(model)
    assert result.model is model and result.rewritten == ()
    assert len(result.rejected) == 1 and isinstance(result.rejected[0], Rejected)
    assert result.rejected[0].node == "gqa"
    assert re.search(reason, result.rejected[0].reason), result.rejected[0].reason


def test_a_match_is_rewritten_with_nothing_rejected():
    result = tile_queries_result(gqa_model())
    assert result.rewritten == ("gqa",) and result.rejected == ()


def test_rejections_are_logged_at_debug(caplog):
    model = gqa_model()
    _with_input(3, "past_key")(model)
    with caplog.at_level(logging.DEBUG, logger="export.rewrites.query_tiles"):
        tile_queries(model)
    assert "tile_queries left gqa as it is: the node has a past key/value input" in caplog.text


def test_graphs_without_the_pattern_are_returned_unchanged():
    node = helper.make_node("Relu", ["x"], ["y"])
    value = helper.make_tensor_value_info
    graph = helper.make_graph([node], "g", [value("x", FLOAT, [2])], [value("y", FLOAT, [2])])
    model = helper.make_model(graph)
    assert tile_queries(model) is model


def test_the_one_may_be_an_initializer_or_value_ints():
    model = gqa_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "one_init"))
    _producer(model, "last").input[1] = "one_init"
    assert tile_queries_result(model).rewritten == ("gqa",)
    model = gqa_model()
    ints = helper.make_node("Constant", [], ["one_ints"], value_ints=[1])
    model.graph.node.insert(0, ints)
    _producer(model, "last").input[1] = "one_ints"
    assert tile_queries_result(model).rewritten == ("gqa",)


def test_two_kernels_in_one_graph_are_both_rewritten():
    model = gqa_model()
    first = model.graph.node[-1]
    second = onnx.NodeProto()
    second.CopyFrom(first)
    second.name, second.input[0] = "gqa2", "y"  # attends over the first one's output as queries
    second.output[:] = ["y2", "", ""]
    first.output[1:] = ["", ""]
    model.graph.node.append(second)
    model.graph.output[0].name = "y2"
    result = tile_queries_result(model, tile=16)
    assert result.rewritten == ("gqa", "gqa2")
    feed = _feed(2, 40, 4, 2, 8)
    inner = causal_attention(**feed, heads=4, kv_heads=2, window=6)
    expected = causal_attention(inner.astype(np.float32), feed["k"], feed["v"], 4, 2, window=6)
    np.testing.assert_allclose(_run(result.model, feed), expected, atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("branch_taken", [True, False], ids=["then", "else"])
def test_a_kernel_inside_a_subgraph_is_rewritten(branch_taken):
    inner = gqa_model()
    lengths, gqa = list(inner.graph.node[:-1]), inner.graph.node[-1]
    gqa.output[0] = "branch_y"
    branch = helper.make_graph(
        [gqa], "branch", [], [helper.make_tensor_value_info("branch_y", FLOAT, None)]
    )
    choose = helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch)
    flag = helper.make_node(
        "Constant",
        [],
        ["flag"],
        value=helper.make_tensor("flag", onnx.TensorProto.BOOL, [], [branch_taken]),
    )
    del inner.graph.node[:]
    inner.graph.node.extend([*lengths, flag, choose])
    result = tile_queries_result(inner, tile=16)
    assert result.rewritten == ("gqa", "gqa")  # both branches
    feed = _feed(2, 40, 4, 2, 8)
    expected = causal_attention(**feed, heads=4, kv_heads=2, window=6)
    np.testing.assert_allclose(_run(result.model, feed), expected, atol=2e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def sliding_fused():
    spec = spec_from_zoo(zoo.get("sliding_window"))
    result = run_pipeline(spec, out=None, grid=[dict(spec.example)], variants=("fused",))
    return spec, result.variants["fused"].model


@pytest.mark.parametrize("seq", [5, 16, 40, 97])
def test_the_zoo_window_over_many_tiles_matches_torch(sliding_fused, seq):
    """Key padding (an extra head column), RoPE and a window of 4 keys, through tiles of 16
    rows: against the block's torch forward."""
    spec, fused = sliding_fused
    tiled = tile_queries(fused, tile=16)
    assert tiled is not fused
    feed = spec.make_inputs({"batch": 3, "seq": seq})
    with torch.no_grad():
        expected = spec.module(**feed, **spec.forward_kwargs).numpy()
    arrays = {k: v.numpy() for k, v in feed.items()}
    np.testing.assert_allclose(_run(tiled, arrays), expected, atol=1e-5, rtol=1e-4)


def test_tiled_alone_is_built_from_the_fused_graph_it_does_not_keep():
    spec = spec_from_zoo(zoo.get("sliding_window"))
    result = run_pipeline(spec, out=None, grid=[dict(spec.example)], variants=("tiled",))
    assert set(result.variants) == {"base", "tiled"}


def test_only_windowed_zoo_bundles_carry_a_tiled_variant(zoo_bundles):
    def variants(name):
        manifest = json.loads((zoo_bundles[name] / "manifest.json").read_text())
        return {v["name"]: v for v in manifest["variants"]}, manifest["extra"]["variants"]

    found, notes = variants("sliding_window")
    assert found["tiled"]["providers"] == ["CPUExecutionProvider"]
    assert notes["tiled"]["census"]["Loop"] == 2
    for name in ("causal_self", "mha_causal", "mha_self"):  # no window, or no causal kernel
        assert "tiled" not in variants(name)[0]
