"""SkipLayerNormalization back into Add and LayerNormalization: the same numbers as the fused
node and as the closed form, the sum output kept, a node whose statistics are read left alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.rewrites.layer_norms import unfuse_result
from runtime._session import DISABLED_FUSIONS, new_session, session_options

D = 16
EPSILON = 1e-5
CPU = "CPUExecutionProvider"


def _graph(*, bias: bool, beta: bool, read_mean: bool = False, sum_out: bool = True):
    rng = np.random.default_rng(0)
    inits = {"gamma": rng.standard_normal(D), "beta": rng.standard_normal(D),
             "bias": rng.standard_normal(D)}
    inputs = ["x", "r", "gamma", "beta" if beta else "", "bias" if bias else ""]
    node = helper.make_node("SkipLayerNormalization", inputs,
                            ["y", "mean", "", "sum" if sum_out else ""],
                            domain="com.microsoft", epsilon=EPSILON)
    shapes = {"y": ["b", "s", D], "sum": ["b", "s", D], "mean": ["b", "s", 1]}
    outputs = ["y"] + (["sum"] if sum_out else []) + (["mean"] if read_mean else [])
    graph = helper.make_graph(
        [node],
        "skip_ln",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", D]) for n in "xr"],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in outputs],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def _closed_form(feed, model, *, bias: bool, beta: bool):
    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    total = feed["x"].astype(np.float64) + feed["r"] + (w["bias"] if bias else 0)
    mean = total.mean(-1, keepdims=True)
    var = ((total - mean) ** 2).mean(-1, keepdims=True)
    y = (total - mean) / np.sqrt(var + EPSILON) * w["gamma"] + (w["beta"] if beta else 0)
    return y, total


def _run(model, feed):
    session = new_session(model.SerializeToString(), session_options(Path('.'), threads=1), [CPU])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("beta", [True, False], ids=["beta", "no-beta"])
def test_unfused_graph_computes_the_fused_nodes_numbers(bias, beta):
    model = _graph(bias=bias, beta=beta)
    result = unfuse_result(model)
    assert len(result.rewritten) == 1 and not result.rejected
    census = [n.op_type for n in result.model.graph.node]
    assert census == ["Add"] * (2 if bias else 1) + ["LayerNormalization"]
    onnx.checker.check_model(result.model, full_check=True)
    rng = np.random.default_rng(1)
    feed = {n: rng.standard_normal((2, 3, D)).astype(np.float32) for n in "xr"}
    want_y, want_sum = _closed_form(feed, model, bias=bias, beta=beta)
    got, fused = _run(result.model, feed), _run(model, feed)
    np.testing.assert_allclose(got["y"], want_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got["sum"], want_sum, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(got["y"], fused["y"], atol=1e-5, rtol=1e-5)


def test_a_node_whose_mean_is_read_stays():
    model = _graph(bias=True, beta=True, read_mean=True)
    result = unfuse_result(model)
    assert result.model is model and not result.rewritten
    assert [r.reason for r in result.rejected] == ["its mean / inv_std_var output 'mean' is read"]


def test_a_node_whose_mean_a_subgraph_reads_stays():
    model = _graph(bias=True, beta=True)
    then = helper.make_graph(
        [helper.make_node("Identity", ["mean"], ["seen"])],
        "reads_mean",
        [],
        [helper.make_tensor_value_info("seen", TensorProto.FLOAT, None)],
    )
    otherwise = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["not_seen"])],
        "reads_y",
        [],
        [helper.make_tensor_value_info("not_seen", TensorProto.FLOAT, None)],
    )
    model.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    model.graph.node.append(
        helper.make_node("If", ["c"], ["picked"], then_branch=then, else_branch=otherwise)
    )
    model.graph.output.append(helper.make_tensor_value_info("picked", TensorProto.FLOAT, None))
    result = unfuse_result(model)
    assert result.model is model and not result.rewritten
    assert [r.reason for r in result.rejected] == ["its mean / inv_std_var output 'mean' is read"]


def _optimized_ops(model, tmp_path, disabled) -> list[str]:
    """The op types of the graph onnxruntime runs after its load-time fusions."""
    import onnxruntime as ort

    options = session_options(tmp_path, threads=1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=[CPU],
                         disabled_optimizers=disabled)
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


def test_sessions_leave_add_and_layer_norm_unfused(tmp_path):
    model = unfuse_result(_graph(bias=False, beta=True, sum_out=False)).model
    assert "SkipLayerNormalization" in _optimized_ops(model, tmp_path, [])  # onnxruntime's own
    ops = _optimized_ops(model, tmp_path, list(DISABLED_FUSIONS))
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops
