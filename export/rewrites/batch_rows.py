"""Cached GroupQueryAttention for every batch, sequence and past length (fused variant).

onnxruntime's CPU GroupQueryAttention refuses a prompt over a past when the batch has more
than one row ("batch_size must be 1 when sequence_length > 1 and past context is given"). It
serves one row, or one token per row (decoding), and a batch of prompts without a past only
when the kernel can tell the past is empty, which a graph for every past length cannot promise.
So each cached kernel call becomes an If: one call when the batch has one row or the step one
token, else a Loop over the rows, one kernel call each (it parallelizes over heads within one).
A kernel call without a past key/value input is left as it is (``rows_result`` says so).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import Rejected, RewriteResult, node_name
from .head_groups import FLOAT, GQA

logger = logging.getLogger(__name__)
NO_PAST = "the node has no past key/value input: one kernel call serves any batch"


def rows_for_cached_prompts(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of model whose cached GroupQueryAttention calls serve any batch; model itself
    when it has none."""
    return rows_result(model).model


def rows_result(model: onnx.ModelProto) -> RewriteResult:
    """rows_for_cached_prompts, with the GroupQueryAttention nodes it wrapped and why it left
    the others."""
    out = copy.deepcopy(model)
    graph = out.graph
    calls, rejected = [], []
    for index, node in enumerate(graph.node):
        if (node.domain, node.op_type) != GQA:
            continue
        if any(node.input[3:5]):
            calls.append((node_name(node, index), node))
        else:
            rejected.append(Rejected(node_name(node, index), NO_PAST))
    for index, (_, node) in enumerate(calls):
        _wrap(graph, node, f"attnx_rows{index}_")
    for r in rejected:
        logger.debug("rows_for_cached_prompts left %s as it is: %s", r.node, r.reason)
    rewritten = tuple(name for name, _ in calls)
    return RewriteResult(out if calls else model, rewritten, tuple(rejected))


def _wrap(graph: onnx.GraphProto, node: onnx.NodeProto, p: str) -> None:
    position = list(graph.node).index(node)
    outputs = [name or f"{p}unused{i}" for i, name in enumerate(node.output)]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), p + "zero"),
            numpy_helper.from_array(np.array([1], np.int64), p + "one"),
            numpy_helper.from_array(np.array([2], np.int64), p + "two"),
        ]
    )
    make = helper.make_node
    query = node.input[0]
    decide = [
        make("Shape", [query], [p + "shape"]),
        make("Slice", [p + "shape", p + "zero", p + "one"], [p + "batch"]),
        make("Slice", [p + "shape", p + "one", p + "two"], [p + "seq"]),
        make("Equal", [p + "batch", p + "one"], [p + "one_row"]),
        make("Equal", [p + "seq", p + "one"], [p + "one_token"]),
        make("Or", [p + "one_row", p + "one_token"], [p + "either"]),
        make("Squeeze", [p + "either", p + "zero"], [p + "one_call"]),
        make("Squeeze", [p + "batch", p + "zero"], [p + "rows"]),
    ]
    choose = make(
        "If",
        [p + "one_call"],
        outputs,
        name=p + "if",
        then_branch=_one_call(node, p),
        else_branch=_by_row(node, p),
    )
    graph.node.remove(node)
    for offset, new in enumerate([*decide, choose]):
        graph.node.insert(position + offset, new)


def _value(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, FLOAT, None)


def _one_call(node: onnx.NodeProto, p: str) -> onnx.GraphProto:
    call = copy.deepcopy(node)
    call.output[:] = ["call_out", "call_key", "call_value"]
    return helper.make_graph([call], p + "one_call", [], [_value(n) for n in call.output])


def _by_row(node: onnx.NodeProto, p: str) -> onnx.GraphProto:
    """Loop over the batch rows: slice each per-row input, one kernel call, stack the outputs."""
    make = helper.make_node
    per_row = [i for i in (0, 1, 2, 3, 4, 5) if node.input[i]]  # q, k, v, pasts, seqlens_k
    body_nodes = [
        make("Unsqueeze", ["row", p + "zero"], ["start"]),
        make("Add", ["start", p + "one"], ["stop"]),
    ]
    call = copy.deepcopy(node)
    for i in per_row:
        body_nodes.append(make("Slice", [node.input[i], "start", "stop", p + "zero"], [f"in{i}"]))
        call.input[i] = f"in{i}"
    call.output[:] = ["row_out", "row_key", "row_value"]
    body_nodes += [call, make("Identity", ["cond"], ["cond_out"])]
    body = helper.make_graph(
        body_nodes,
        p + "row_body",
        [
            helper.make_tensor_value_info("row", onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
            *[_value(n) for n in call.output],
        ],
    )
    stacked = ["stacked_out", "stacked_key", "stacked_value"]  # [b, 1, ...] each
    finals = ["rows_out", "rows_key", "rows_value"]
    nodes = [make("Loop", [p + "rows", ""], stacked, body=body)]
    nodes += [make("Squeeze", [s, p + "one"], [f]) for s, f in zip(stacked, finals, strict=True)]
    return helper.make_graph(nodes, p + "by_row", [], [_value(n) for n in finals])
