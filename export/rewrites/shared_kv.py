"""Grouped-query attention without repeated kv heads, for the ONNX Attention op.

Models that share kv heads among query heads (Llama's GQA, MQA) repeat each kv head over its
query heads before attention: transformers' and attnx's ``repeat_kv`` export as
Unsqueeze(k, 2) -> Expand [b, h_kv, n_rep, s_kv, h_d] -> Reshape [b, h_kv * n_rep, s_kv, h_d].
On a decode step that copies the whole cache twice over (n_rep = 2: 2.5 ms of a 9.9 ms Llama
step at past 2048 on a 2-core Xeon, onnxruntime's profile). ONNX Attention (opset 23) takes
4D k and v with fewer heads than q and shares them as repeat_kv does (query head i reads kv
head i // n_rep), so the repeat can go.

Pattern: the k and v inputs of an ai.onnx Attention node. Check: each is such a Reshape of an
Expand of an Unsqueeze on axis 2; by the graph's shapes (onnx shape inference) the tensor
before it is [b, h_kv, s_kv, h_d] and the repeat [b, h, s_kv, h_d] with the same b, s_kv and
h_d and static heads, h a multiple of h_kv (so only axis 2 was broadcast, and head i is kv head
i // n_rep); and the repeated tensor is read by nothing but Attention nodes. Replace: the
Attention reads the tensor before the repeat; the Unsqueeze/Expand/Reshape, now unread, are
removed.
"""

from __future__ import annotations

import copy
import logging

import onnx
from onnx import numpy_helper

from . import Rejected, RewriteResult, node_name

logger = logging.getLogger(__name__)


def share_kv_heads(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of model whose Attention nodes read k and v without repeated heads; model itself
    when none qualifies."""
    return share_kv_result(model).model


def share_kv_result(model: onnx.ModelProto) -> RewriteResult:
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    attentions = [(i, n) for i, n in enumerate(graph.node)
                  if n.domain in ("", "ai.onnx") and n.op_type == "Attention"]
    if not attentions:
        return RewriteResult(model)
    context = (producers, consumers, _Constants(graph), {o.name for o in graph.output},
               _shapes(model))
    plans, rejected = [], []
    for index, node in attentions:
        found = [_repeat_source(node.input[slot], *context) for slot in (1, 2)]
        reasons = [why for _, why in found if why]
        if reasons:
            rejected.append(Rejected(node_name(node, index), reasons[0]))
        else:
            plans.append((index, [source for source, _ in found]))
    _log(rejected)
    if not plans:
        return RewriteResult(model, (), tuple(rejected))
    out = copy.deepcopy(model)  # only a graph that changes is copied
    for index, (k, v) in plans:
        out.graph.node[index].input[1], out.graph.node[index].input[2] = k, v
    _drop_unread(out.graph)
    rewritten = tuple(node_name(graph.node[index], index) for index, _ in plans)
    return RewriteResult(out, rewritten, tuple(rejected))


class _Constants:
    """Constant values by name (initializers and Constant nodes), read only when asked: the
    weights are never converted."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._initializers = {t.name: t for t in graph.initializer}
        self._nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def get(self, name: str):
        if name in self._initializers:
            return numpy_helper.to_array(self._initializers[name])
        node = self._nodes.get(name)
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Every value's inferred shape: a dim is its int size, its symbol, or None."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else
                                  d.dim_param or None for d in t.shape.dim]
    return shapes


def _same(a, b) -> bool:
    return a is not None and a == b


def _repeat_source(name, producers, consumers, constants, outputs, shapes):
    """(the rank-4 tensor that ``name`` repeats over heads, None), or (None, why ``name`` is
    not such a repeat)."""
    reshape = producers.get(name)
    if reshape is None or reshape.op_type != "Reshape":
        return None, "k/v is not a Reshape (no repeated kv heads)"
    expand = producers.get(reshape.input[0])
    if expand is None or expand.op_type != "Expand":
        return None, "the Reshape does not read an Expand"
    unsqueeze = producers.get(expand.input[0])
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None, "the Expand does not read an Unsqueeze"
    axes = constants.get(unsqueeze.input[1]) if len(unsqueeze.input) > 1 else None
    if axes is None or [int(a) for a in axes.reshape(-1)] != [2]:
        return None, "the Unsqueeze is not on axis 2 (the repeat axis of [b, h_kv, n_rep, s, d])"
    before, after = shapes.get(unsqueeze.input[0]), shapes.get(name)
    if before is None or after is None or len(before) != 4 or len(after) != 4:
        return None, "the shapes before and after the repeat are not known rank-4 shapes"
    h_kv, h = before[1], after[1]
    if not (isinstance(h_kv, int) and isinstance(h, int) and h_kv and h % h_kv == 0):
        return None, f"head counts {h_kv} (kv) and {h} are not static, {h} a multiple of {h_kv}"
    if not all(_same(before[a], after[a]) for a in (0, 2, 3)):
        return None, f"the repeat changes more than the heads: {before} -> {after}"
    if name in outputs or any(c.op_type != "Attention" for c in consumers.get(name, [])):
        return None, "the repeated k/v is read by something other than Attention"
    return unsqueeze.input[0], None


def _drop_unread(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is read (repeatedly, from the end)."""
    while True:
        read = {o.name for o in graph.output}
        for n in graph.node:
            read.update(n.input)
            for attr in n.attribute:
                for sub in [attr.g, *attr.graphs] if attr.type in (5, 10) else []:
                    read.update(i for sn in sub.node for i in sn.input)
        dead = [n for n in graph.node if not any(o in read for o in n.output if o)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def _log(rejected) -> None:
    for r in rejected:
        logger.debug("share_kv_heads left %s as it is: %s", r.node, r.reason)
