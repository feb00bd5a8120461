"""Causal sliding-window attention over query tiles (the ``tiled`` variant).

onnxruntime's CPU GroupQueryAttention, called on a whole prompt, stops each block of queries
at the diagonal but scores every key block before a causal window and masks it afterwards: a
window of w keys saves none of the causal half's work (d 512, 8 heads, seq 4096: a window of 64
costs what plain causal attention costs). The same kernel
called with a past is bottom-right causal: its queries sit after the past. So this rewrite cuts
the prompt into tiles of queries and calls the kernel once per tile, in an ONNX Loop that
carries the keys and values seen so far (its present output) and hands it the last
``window - 1`` of them as its past: each tile scores t rows against t + w - 1 keys, so the work
grows with s * (t + w), not s * s.

Without a window the tiles score what the one call scores, and the Loop's calls over a past
take 1.5x its time (NO_WINDOW).

The kernel takes a prompt over a past for one batch row at a time, so an outer Loop runs the
rows. The sequence is cut into T = ceil(s / TILE) tiles of equal size (a multiple of
TILE_ALIGN); q, k and v get zero rows up to T tiles. A padded key sits after every real query,
so the causal mask hides it; padded query rows are sliced off the output.

Pattern: com.microsoft.GroupQueryAttention, in the graph or any subgraph. Check: a causal
window of at least 2 keys; no past key/value, rotary, softcap, smooth softmax or attention
bias; a nonzero scale; present key/value unused; seqlens_k is total_sequence_length - 1 for
every row (attnx's lowerings build both from one length, so no row is right-padded). Replace:
the Loops, whose output keeps the node's output name. Key padding that the lowering carries as
an extra head column (export/rewrites/kernels.py) stays in q, k and v, so it masks exactly as
before. The Loops are float32 (attnx's fp16 variant is made from ``fused``, not from these).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import Rejected, RewriteResult, node_attrs, node_name
from .head_groups import FLOAT, GQA, remove_dead_nodes, subgraphs, used_names

logger = logging.getLogger(__name__)

# Query rows per tile at most. On the zoo's sliding_window (window 256, seq 2048-4096, AVX2)
# tiles of 128 and 256 ran alike and 512 was slower; 256 keeps the call count down.
TILE = 256
TILE_ALIGN = 16  # tiles are a multiple of this many rows
INT64 = onnx.TensorProto.INT64
INT32 = onnx.TensorProto.INT32
# GroupQueryAttention's inputs (onnxruntime 1.32); the tiles pass on the first seven only.
GQA_INPUTS = (
    "query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
    "cos_cache", "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale",
    "v_scale", "q_norm_weight", "k_norm_weight", "query_seqlens",
)  # fmt: skip
PAST, FIRST_EXTRA_INPUT = (3, 4), 7
# Attributes the per-tile calls carry as they are (do_rotary, softcap and smooth_softmax only
# when off); any other (quantized caches, qk output) changes what the kernel computes.
KNOWN_ATTRS = {
    "num_heads", "kv_num_heads", "scale", "local_window_size", "do_rotary",
    "rotary_interleaved", "softcap", "smooth_softmax",
}  # fmt: skip
# Batch 1, 8 heads of 64, seq 2048 and 4096, 2 threads, AMD EPYC Zen 3 (AVX2): tiles of 256 over
# plain causal attention took 1.5x the one call, over a window of 256 0.38-0.67x
# (benchmarks/results/epyc-avx2/kernel_tiles.md).
NO_WINDOW = "the node has no causal window: the tiles would take about 1.5x the one call"


def tile_queries(model: onnx.ModelProto, *, tile: int = TILE) -> onnx.ModelProto:
    """A copy of model with every matching windowed GroupQueryAttention computed over query
    tiles; model itself when nothing matches."""
    return tile_queries_result(model, tile=tile).model


def tile_queries_result(model: onnx.ModelProto, *, tile: int = TILE) -> RewriteResult:
    """tile_queries, with the nodes it rewrote and why it left the others."""
    if tile < TILE_ALIGN or tile % TILE_ALIGN:
        raise ValueError(f"tile ({tile}) must be a positive multiple of {TILE_ALIGN}")
    out = copy.deepcopy(model)
    rewritten: list[str] = []
    rejected: list[Rejected] = []
    _visit(out.graph, {}, tile, rewritten, rejected)
    if rewritten:
        remove_dead_nodes(out.graph)  # the kernel's length computation, when nothing else reads it
    for r in rejected:
        logger.debug("tile_queries left %s as it is: %s", r.node, r.reason)
    return RewriteResult(out if rewritten else model, tuple(rewritten), tuple(rejected))


# --- matching -------------------------------------------------------------------------------


def _visit(graph, outer_producers, tile, rewritten, rejected) -> None:
    """Rewrite graph's matching nodes, then those of its other subgraphs (which see graph's
    names); the Loops a rewrite adds are not visited again."""
    producers = {**outer_producers, **_producers(graph)}
    used = used_names(graph) | {o.name for o in graph.output}
    others = [n for n in graph.node if (n.domain, n.op_type) != GQA]
    for index, node in list(enumerate(graph.node)):
        if (node.domain, node.op_type) != GQA:
            continue
        name = node_name(node, index)
        reason = _reason_to_leave(node, producers, used)
        if reason:
            rejected.append(Rejected(name, reason))
            continue
        _replace(graph, node, tile, f"attnx_tiles{len(rewritten)}_")
        rewritten.append(name)
    producers = {**outer_producers, **_producers(graph)}
    for node in others:
        for sub in subgraphs(node):
            _visit(sub, producers, tile, rewritten, rejected)


def _producers(graph: onnx.GraphProto) -> dict:
    """Name -> the node that makes it, or the TensorProto of an initializer."""
    made = {t.name: t for t in graph.initializer}
    made.update({o: n for n in graph.node for o in n.output})
    return made


def _reason_to_leave(node, producers, used) -> str:
    """Why the node is not windowed causal self-attention the tiles compute the same; "" when
    it is."""
    inputs = list(node.input) + [""] * (len(GQA_INPUTS) - len(node.input))
    attrs = node_attrs(node)
    if any(inputs[i] for i in PAST):
        return "the node has a past key/value input"
    extra = [GQA_INPUTS[i] for i in range(FIRST_EXTRA_INPUT, len(inputs)) if inputs[i]]
    if extra or attrs.get("do_rotary", 0):
        return f"the node has inputs or rotary the tiles do not pass on: {extra or 'do_rotary'}"
    if attrs.get("softcap", 0.0) or attrs.get("smooth_softmax", 0):
        return "the node uses softcap or smooth softmax"
    unknown = sorted(set(attrs) - KNOWN_ATTRS)
    if unknown:
        return f"the node sets attributes the tiles do not carry: {unknown}"
    window = attrs.get("local_window_size", -1)
    if window < 0:
        return NO_WINDOW
    if window < 2:
        return f"the node's window of {window} keys leaves no past to carry"
    if bool(inputs[1]) != bool(inputs[2]):
        return "the node has a key without a value, or a value without a key"
    read = [n for n in node.output[1:] if n and n in used]
    if read:
        return f"outputs besides the attention output are used ({', '.join(map(repr, read))})"
    if not _same_length(inputs[5], inputs[6], producers):
        return (
            "seqlens_k is not total_sequence_length - 1 for every row (Cast(Expand(Sub(n, 1))) "
            "and Cast(Squeeze(n)) of one length n)"
        )
    return ""


def _chain(name, producers, ops):
    """The input of the chain of single-input ``ops`` (last op first) ending at name, or None."""
    for op_type in ops:
        node = producers.get(name)
        if not isinstance(node, onnx.NodeProto) or node.op_type != op_type or node.domain:
            return None
        name = node.input[0]
    return name


def _same_length(seqlens, total, producers) -> bool:
    """Whether seqlens_k = Cast(Expand(Sub(n, 1), _)) and total = Cast(Squeeze(n)) share n."""
    minus_one = _chain(seqlens, producers, ("Cast", "Expand"))
    length = _chain(total, producers, ("Cast", "Squeeze"))
    sub = producers.get(minus_one) if minus_one else None
    if not isinstance(sub, onnx.NodeProto) or sub.op_type != "Sub" or sub.domain or not length:
        return False
    return sub.input[0] == length and _is_one(sub.input[1], producers)


def _is_one(name, producers) -> bool:
    node = producers.get(name)
    if isinstance(node, onnx.TensorProto):
        return numpy_helper.to_array(node).tolist() in (1, [1])
    if node is None or node.op_type != "Constant":
        return False
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t).tolist() in (1, [1])
        if attr.name in ("value_int", "value_ints"):
            return helper.get_attribute_value(attr) in (1, [1])
    return False


# --- the tiled graph ------------------------------------------------------------------------


class _Builder:
    """Nodes and constants under one name prefix (subgraph names must be unique in the model)."""

    def __init__(self, prefix: str):
        self.p = prefix
        self.nodes: list[onnx.NodeProto] = []

    def name(self, n: str) -> str:
        return self.p + n

    def const(self, n: str, value, dtype=np.int64) -> str:
        array = np.array(value, dtype)
        self.nodes.append(
            helper.make_node(
                "Constant", [], [self.name(n)], value=numpy_helper.from_array(array, self.name(n))
            )
        )
        return self.name(n)

    def __call__(self, op_type, inputs, output, domain="", **attrs) -> str:
        out = output if output.startswith(self.p) else self.name(output)
        self.nodes.append(helper.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out


def _replace(graph, node, tile: int, prefix: str) -> None:
    """Put the row and tile Loops where node was; the last one writes node's output name."""
    attrs = node_attrs(node)
    heads, kv_heads = attrs["num_heads"], attrs["kv_num_heads"]
    g = _Builder(prefix)
    q, k, v = _separate(g, node, heads, kv_heads)
    sizes = _tile_sizes(g, q, k, kv_heads, tile)
    q, k, v = (_pad_rows(g, x, label, sizes) for x, label in ((q, "q"), (k, "k"), (v, "v")))
    body = _row_body(g.p, sizes, q, k, v, attrs)
    # An explicit condition: onnxruntime 1.32 fails a condition-less Loop inside an If branch
    # ("vector::reserve").
    always = g.const("always", True, np.bool_)
    g("Loop", [sizes["batch"], always], "by_row", body=body)  # [b, T * t, h * h_d]
    g.nodes.append(
        helper.make_node(
            "Slice",
            [g.name("by_row"), g.const("zero1", [0]), sizes["seq"], g.const("axis1", [1])],
            [node.output[0]],
            name=g.name("out"),
        )
    )
    position = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new in enumerate(g.nodes):
        graph.node.insert(position + offset, new)


def _separate(g: _Builder, node, heads: int, kv_heads: int) -> tuple[str, str, str]:
    """q [b, s, h * h_d], k and v [b, s, h_kv * h_d] from the node's packed or separate inputs."""
    if node.input[1]:
        return tuple(node.input[:3])
    shape = g.const("qkv_shape", [0, 0, heads + 2 * kv_heads, -1])
    by_head = g("Reshape", [node.input[0], shape], "qkv4")  # [b, s, h + 2 h_kv, h_d]
    parts = [g.name(f"{n}4") for n in "qkv"]
    split = g.const("split", [heads, kv_heads, kv_heads])
    g.nodes.append(helper.make_node("Split", [by_head, split], parts, axis=2))
    packed = g.const("packed", [0, 0, -1])
    return tuple(g("Reshape", [part, packed], n) for part, n in zip(parts, "qkv", strict=True))


def _tile_sizes(g: _Builder, q: str, k: str, kv_heads: int, tile: int) -> dict[str, str]:
    """int64 sizes from q [b, s, h * h_d] and k: [1]-shaped seq s, rows t (ceil(s / T) rounded
    up to TILE_ALIGN, T = ceil(s / tile)), pad (T * t - s) and the empty past's shape
    [1, h_kv, 0, h_d]; scalars batch and count T (the Loops' trip counts)."""
    align = g.const("align", [TILE_ALIGN])
    seq = g("Shape", [q], "seq", start=1, end=2)
    seq_up = g("Add", [seq, g.const("tile_m1", [tile - 1])], "seq_up")
    count = g("Div", [seq_up, g.const("tile", [tile])], "count1")  # ceil(s / tile)
    seq_plus = g("Add", [seq, g("Sub", [count, g.const("one1", [1])], "count_m1")], "seq_plus")
    per_tile = g("Div", [seq_plus, count], "per_tile")  # ceil(s / T)
    rows_up = g("Add", [per_tile, g.const("align_m1", [TILE_ALIGN - 1])], "rows_up")
    rows = g("Mul", [g("Div", [rows_up, align], "aligned"), align], "rows")
    k_width = g("Shape", [k], "k_width", start=2, end=3)
    head = g("Div", [k_width, g.const("kv_heads", [kv_heads])], "head")
    zero = g.const("zero", [0])
    empty = g("Concat", [g.const("empty_lead", [1, kv_heads, 0]), head], "empty_shape", axis=0)
    return {
        "seq": seq,
        "rows": rows,
        "pad": g("Sub", [g("Mul", [count, rows], "padded"), seq], "pad"),
        "empty": empty,
        "batch": g("Squeeze", [g("Shape", [q], "batch1", start=0, end=1), zero], "batch"),
        "count": g("Squeeze", [count, zero], "count"),
    }


def _pad_rows(g: _Builder, x: str, label: str, sizes) -> str:
    """x [b, s, width] with sizes["pad"] zero rows appended to s."""
    before, after = g.const(f"{label}_pads_before", [0] * 4), g.const(f"{label}_pads_after", [0])
    pads = g("Concat", [before, sizes["pad"], after], f"{label}_pads", axis=0)
    return g("Pad", [x, pads], f"{label}_padded")


def _row_body(p: str, sizes, q, k, v, attrs) -> onnx.GraphProto:
    """The outer Loop's body for batch row r: the tile Loop over that row, [T * t, h * h_d]."""
    r = _Builder(p + "r_")
    row = r("Unsqueeze", [r.name("row"), r.const("zero", [0])], "row1")
    after = r("Add", [row, r.const("one", [1])], "row_end")
    axis0 = r.const("axis0", [0])
    rows = [
        r("Slice", [x, row, after, axis0], f"{n}_row") for x, n in ((q, "q"), (k, "k"), (v, "v"))
    ]
    zeros = r("Expand", [r.const("fzero", 0.0, np.float32), sizes["empty"]], "empty")
    body = _tile_body(p + "t_", sizes, rows, attrs)
    r.nodes.append(
        helper.make_node(
            "Loop",
            [sizes["count"], r.const("always", True, np.bool_), zeros, zeros],
            [r.name("keys"), r.name("values"), r.name("by_tile")],
            body=body,
        )
    )  # by_tile [T, 1, t, h * h_d]
    width = r("Shape", [q], "width", start=2, end=3)
    flat = r("Concat", [r.const("lead", [-1]), width], "flat_shape", axis=0)
    out = r("Reshape", [r.name("by_tile"), flat], "row_out")  # [T * t, h * h_d]
    r("Identity", [r.name("cond")], "cond_out")
    return helper.make_graph(
        r.nodes,
        p + "row_body",
        [
            helper.make_tensor_value_info(r.name("row"), INT64, []),
            helper.make_tensor_value_info(r.name("cond"), onnx.TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info(r.name("cond_out"), onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info(out, FLOAT, None),
        ],
    )


def _tile_body(p: str, sizes, row_inputs, attrs) -> onnx.GraphProto:
    """The tile Loop's body for tile i of one row: the kernel over the tile's queries, with the
    keys and values before the tile (the last window - 1 of them with a window) as its past."""
    b = _Builder(p)
    i = b("Unsqueeze", [b.name("i"), b.const("zero", [0])], "i1")
    start = b("Mul", [i, sizes["rows"]], "start")
    stop = b("Add", [start, sizes["rows"]], "stop")
    axis1 = b.const("axis1", [1])
    q, k, v = (
        b("Slice", [x, start, stop, axis1], f"{n}_tile")
        for x, n in zip(row_inputs, "qkv", strict=True)
    )
    # The kernel sees keys i - window < j <= i: the last window - 1 before the tile suffice.
    reach = b.const("reach", [1 - attrs["local_window_size"]])
    end, axis2 = b.const("end", [2**62]), b.const("axis2", [2])
    keys = b("Slice", [b.name("past_keys"), reach, end, axis2], "window_keys")
    values = b("Slice", [b.name("past_values"), reach, end, axis2], "window_values")
    past = b("Shape", [keys], "past", start=2, end=3)
    total = b("Add", [past, sizes["rows"]], "total")
    last = b("Cast", [b("Sub", [total, b.const("one", [1])], "last")], "seqlens", to=INT32)
    total = b("Cast", [b("Squeeze", [total, b.const("axes", [0])], "total_s")], "total32", to=INT32)
    b.nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            [q, k, v, keys, values, last, total],
            [b.name("out"), b.name("keys_out"), b.name("values_out")],
            domain=GQA[0],
            **attrs,
        )
    )
    b("Identity", [b.name("cond")], "cond_out")
    return helper.make_graph(
        b.nodes,
        p + "body",
        [
            helper.make_tensor_value_info(b.name("i"), INT64, []),
            helper.make_tensor_value_info(b.name("cond"), onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info(b.name("past_keys"), FLOAT, None),
            helper.make_tensor_value_info(b.name("past_values"), FLOAT, None),
        ],
        [
            helper.make_tensor_value_info(b.name("cond_out"), onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info(b.name("keys_out"), FLOAT, None),
            helper.make_tensor_value_info(b.name("values_out"), FLOAT, None),
            helper.make_tensor_value_info(b.name("out"), FLOAT, None),
        ],
    )
