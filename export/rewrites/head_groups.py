"""Causal self-attention over head groups in an ONNX Loop, for long sequences (fused variant).

GroupQueryAttention's own footprint is about six [b, s, d] tensors (its output, the present
key and value it must return, and copies), on top of the q, k and v projections: at seq 8192
(d 512) that is about 145 MiB against torch eager's 85 MiB for the whole block. Heads are
independent, so the projections and the kernel can run a few heads at a time, in a Loop whose
iterations free what they allocate; ONNX Runtime would otherwise hoist every projection to the
front of an unrolled graph. Short sequences gain nothing from it, so an If takes the Loop only from
``min_seq`` tokens on and keeps the one-call path below.

For the int8 variant the projections of both paths become com.microsoft.DynamicQuantizeMatMul
on weights quantized here, per column and symmetric as onnxruntime's dynamic quantizer does per
channel: weights that a Loop gathers are no constant MatMul operand the quantizer could reach,
and without the Loop int8 lost the Loop's gain at batch 8, seq 512 (0.59-0.70x eager instead of
at most 0.5x).

The rewrite matches the GroupQueryAttention node that export/rewrites/kernels.py emits for causal
self-attention without padding or bias: no past, q, k and v each MatMul (+ bias Add) of one
tensor x with constant weights, reshaped, and the present outputs unused. Anything else is left
as it is, and so is a graph that the rewrite would leave with a dangling reference;
``group_heads_result`` says why for each node it left.
"""

from __future__ import annotations

import collections
import copy
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import Rejected, RewriteResult, node_attrs, node_name

logger = logging.getLogger(__name__)

HEAD_GROUPS = 4  # two heads per kernel call at 8 heads: both threads of a 2-core CPU stay busy
# From here the Loop is as fast or faster (fewer bytes in flight): measured at d 512, 8 heads,
# 2 threads, Loop / one call = 1.02 (b1) and 0.76 (b8) at seq 512; 1.03 and 1.00 at seq 256.
LOOP_MIN_SEQ = 512
GQA = ("com.microsoft", "GroupQueryAttention")
QUANTIZED_MATMUL = "DynamicQuantizeMatMul"  # com.microsoft: float A, int8 B, per-column scales
# 7-bit weights, as onnxruntime's quantizer writes them with reduce_range: on x86-64 without
# VNNI (AVX2, AVX-512 without VNNI) MLAS multiplies uint8 activations by int8 weights with
# VPMADDUBSW, whose sum of two products saturates at 32767. 2 * 255 * 64 = 32640 stays below it,
# so the product is exact on every x86-64 CPU; 2 * 255 * 127 halves a full-scale dot product.
WEIGHT_MAX = 64
FLOAT = onnx.TensorProto.FLOAT


def group_heads(
    model: onnx.ModelProto,
    *,
    groups: int = HEAD_GROUPS,
    min_seq: int = LOOP_MIN_SEQ,
    int8: bool = False,
) -> onnx.ModelProto:
    """A copy of model with each matching causal self-attention split over head groups from
    ``min_seq`` tokens on; model itself when nothing matches. ``int8`` quantizes the q/k/v
    projections it takes over, on both paths."""
    return group_heads_result(model, groups=groups, min_seq=min_seq, int8=int8).model


def group_heads_result(
    model: onnx.ModelProto,
    *,
    groups: int = HEAD_GROUPS,
    min_seq: int = LOOP_MIN_SEQ,
    int8: bool = False,
) -> RewriteResult:
    """group_heads, with the GroupQueryAttention nodes it rewrote and why it left the others."""
    out = copy.deepcopy(model)
    graph = out.graph
    rewritten, rejected = [], []
    candidates = [(i, n) for i, n in enumerate(graph.node) if (n.domain, n.op_type) == GQA]
    for index, node in candidates:
        name = node_name(node, index)
        match = _match(graph, node, groups)
        if isinstance(match, str):
            rejected.append(Rejected(name, match))
            continue
        prefix = f"attnx_heads{len(rewritten)}_"
        _rewrite(graph, node, match, groups, min_seq, prefix, int8)
        rewritten.append(name)
    if rewritten:
        remove_dead_nodes(graph)
        undefined = _undefined_reads(graph)
        if undefined:
            reason = (
                f"the rewritten graph would read {', '.join(map(repr, undefined))} before "
                f"anything defines it (another node reads what the rewrite moves into the If)"
            )
            rejected += [Rejected(name, reason) for name in rewritten]
            rewritten, out = [], model
    for r in rejected:
        logger.debug("group_heads left %s as it is: %s", r.node, r.reason)
    return RewriteResult(out if rewritten else model, tuple(rewritten), tuple(rejected))


# --- matching -------------------------------------------------------------------------------


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def _match(graph, node, groups: int) -> dict | str:
    """{x, chains, weights, biases, heads, kv_heads, head_dim} for a node the rewrite serves,
    else the reason it does not serve it."""
    attrs = node_attrs(node)
    heads, kv_heads = attrs.get("num_heads", 0), attrs.get("kv_num_heads", 0)
    if heads % groups:
        return f"num_heads {heads} is not a multiple of {groups} groups"
    if kv_heads % groups:
        return f"kv_num_heads {kv_heads} is not a multiple of {groups} groups"
    if any(node.input[3:5]):
        return "the node has a past key/value input"
    outputs = {o.name for o in graph.output}
    users = _consumers(graph)
    used = [name for name in node.output[1:3] if users.get(name) or name in outputs]
    if used:
        return f"present key/value outputs are used ({', '.join(map(repr, used))})"
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    projections = [_projection(node.input[i], producers, inits) for i in range(3)]
    for which, p in zip("qkv", projections, strict=True):
        if isinstance(p, str):
            return f"{which} is not a MatMul projection with a constant weight: {p}"
    sources = [p[0] for p in projections]
    if len(set(sources)) != 1:
        return (
            f"q, k and v are not MatMul projections of one input: they project "
            f"{', '.join(map(repr, sources))}"
        )
    weights = [numpy_helper.to_array(inits[p[1]]) for p in projections]
    head_dim = weights[0].shape[1] // heads
    widths = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    if any(w.ndim != 2 or w.shape[1] != width for w, width in zip(weights, widths, strict=True)):
        shapes = ", ".join(str(list(w.shape)) for w in weights)
        return (
            f"weight shapes {shapes} do not match heads*head_dim columns "
            f"{', '.join(map(str, widths))} (num_heads {heads}, kv_num_heads {kv_heads}, "
            f"head_dim {head_dim})"
        )
    biases = [
        numpy_helper.to_array(inits[p[2]]) if p[2] else np.zeros(w.shape[1], w.dtype)
        for p, w in zip(projections, weights, strict=True)
    ]
    return {
        "x": projections[0][0],
        "chains": [p[3] for p in projections],
        "weights": weights,
        "biases": biases,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
    }


def _projection(name, producers, inits) -> tuple | str:
    """(x, weight, bias or "", chain nodes) when name is Reshape*(MatMul(x, W) [+ b]), else the
    reason it is not."""
    chain = []
    node = producers.get(name)
    while node is not None and node.op_type == "Reshape" and not node.domain:
        chain.append(node)
        node = producers.get(node.input[0])
    bias = ""
    if node is not None and node.op_type == "Add" and not node.domain:
        const = [i for i in node.input if i in inits]
        if len(const) != 1:
            return f"its bias Add {node.name!r} has {len(const)} constant inputs, not one"
        bias = const[0]
        chain.append(node)
        node = producers.get(next(i for i in node.input if i != bias))
    if node is None:
        return "it is a graph input or an initializer, not a MatMul output"
    if node.op_type != "MatMul" or node.domain:
        op = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        return f"it comes from {op} {node.name!r}, not a MatMul"
    if node.input[1] not in inits:
        return f"the weight {node.input[1]!r} of MatMul {node.name!r} is not an initializer"
    chain.append(node)
    return node.input[0], node.input[1], bias, chain


# --- rewriting ------------------------------------------------------------------------------


def _rewrite(graph, node, match, groups: int, min_seq: int, prefix: str, int8: bool) -> None:
    chain_nodes = [n for chain in match["chains"] for n in chain]
    position = list(graph.node).index(node)
    position -= sum(1 for n in chain_nodes if list(graph.node).index(n) < position)
    weight, bias = _stacked(match, groups)
    if int8:
        weight, scales = quantize_columns(weight)
        graph.initializer.extend(_quantized_inits(scales, prefix))
        one_call_chain = _quantized_chains(graph, match, prefix)
    else:
        one_call_chain = [copy.deepcopy(n) for n in chain_nodes]
    graph.initializer.extend(
        [
            numpy_helper.from_array(weight, prefix + "weights"),
            numpy_helper.from_array(bias, prefix + "biases"),
            numpy_helper.from_array(np.array(groups, np.int64), prefix + "groups"),
            numpy_helper.from_array(np.array([1], np.int64), prefix + "one"),
            numpy_helper.from_array(np.array([0], np.int64), prefix + "zero"),
            numpy_helper.from_array(np.array([2], np.int64), prefix + "two"),
            numpy_helper.from_array(np.array(min_seq, np.int64), prefix + "min_seq"),
        ]
    )
    lengths = _length_nodes(match["x"], prefix)
    seqlens, total = prefix + "seqlens", prefix + "total"
    then_branch = _loop_branch(node, match, groups, prefix, seqlens, total, int8)
    else_branch = _one_call_branch(node, one_call_chain, prefix, seqlens, total)
    choose = helper.make_node(
        "If",
        [prefix + "long"],
        [node.output[0]],
        name=prefix + "if",
        then_branch=then_branch,
        else_branch=else_branch,
    )
    for n in [*chain_nodes, node]:
        graph.node.remove(n)
    for offset, new in enumerate([*lengths, choose]):
        graph.node.insert(position + offset, new)


def _stacked(match, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the packed [q | k | v] projection columns of its heads: [G, d_in, n], [G, n]."""
    hd = match["head_dim"]
    q_cols, kv_cols = match["heads"] // groups * hd, match["kv_heads"] // groups * hd

    def cols(array, width, g):
        return array[..., g * width : (g + 1) * width]

    weight, bias = [], []
    for g in range(groups):
        widths = (q_cols, kv_cols, kv_cols)
        weight.append(
            np.concatenate(
                [cols(w, n, g) for w, n in zip(match["weights"], widths, strict=True)], axis=-1
            )
        )
        bias.append(
            np.concatenate(
                [cols(b, n, g) for b, n in zip(match["biases"], widths, strict=True)], axis=-1
            )
        )
    return np.stack(weight), np.stack(bias)


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., d_in, n] float -> (int8 weights in [-WEIGHT_MAX, WEIGHT_MAX], float32 scales
    [..., n]): symmetric per column (zero point 0), as onnxruntime's dynamic quantizer
    quantizes MatMul weights per channel with reduce_range."""
    scales = np.abs(weight).max(axis=-2) / float(WEIGHT_MAX)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    quantized = np.rint(weight / scales[..., None, :])
    quantized = np.clip(quantized, -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)
    return quantized, scales


def _quantized_inits(scales: np.ndarray, p: str) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(scales, p + "scales"),
        numpy_helper.from_array(np.zeros(scales.shape, np.int8), p + "zero_points"),
    ]


def _quantized_chains(graph, match, p: str) -> list[onnx.NodeProto]:
    """The one-call path's projection chains with each MatMul on int8 weights of its own."""
    nodes = []
    for i, (chain, weight) in enumerate(zip(match["chains"], match["weights"], strict=True)):
        quantized, scales = quantize_columns(weight)
        name = f"{p}w{i}_"
        graph.initializer.extend(
            [numpy_helper.from_array(quantized, name + "weights"), *_quantized_inits(scales, name)]
        )
        for n in chain:
            n = copy.deepcopy(n)
            if n.op_type == "MatMul":
                n = helper.make_node(
                    QUANTIZED_MATMUL,
                    [n.input[0], name + "weights", name + "scales", name + "zero_points"],
                    list(n.output),
                    domain=GQA[0],
                )
            nodes.append(n)
    return nodes


def _length_nodes(x: str, p: str) -> list[onnx.NodeProto]:
    """seqlens_k (s - 1 per batch row), total (s) and long (s >= min_seq) from x [b, s, d]."""
    make = helper.make_node
    return [
        make("Shape", [x], [p + "shape"]),
        make("Slice", [p + "shape", p + "zero", p + "one"], [p + "batch"]),
        make("Slice", [p + "shape", p + "one", p + "two"], [p + "seq"]),
        make("Sub", [p + "seq", p + "one"], [p + "last"]),
        make("Expand", [p + "last", p + "batch"], [p + "last_per_row"]),
        make("Cast", [p + "last_per_row"], [p + "seqlens"], to=onnx.TensorProto.INT32),
        make("Squeeze", [p + "seq", p + "zero"], [p + "seq_scalar"]),
        make("Cast", [p + "seq_scalar"], [p + "total"], to=onnx.TensorProto.INT32),
        make("GreaterOrEqual", [p + "seq_scalar", p + "min_seq"], [p + "long"]),
    ]


def _gqa_attrs(node, heads: int, kv_heads: int) -> dict:
    attrs = node_attrs(node)
    attrs.update(num_heads=heads, kv_num_heads=kv_heads)
    return attrs


def _group_projection(x: str, p: str, int8: bool) -> list[onnx.NodeProto]:
    """Loop-body nodes: the group's packed [q | k | v] projection of x, as "qkv"."""
    make = helper.make_node
    gathered = ["weights", "biases", *(("scales", "zero_points") if int8 else ())]
    nodes = [make("Gather", [p + name, "group"], [name]) for name in gathered]
    if int8:
        inputs = [x, "weights", "scales", "zero_points", "biases"]
        return nodes + [make(QUANTIZED_MATMUL, inputs, ["qkv"], domain=GQA[0])]
    return nodes + [
        make("MatMul", [x, "weights"], ["projected"]),
        make("Add", ["projected", "biases"], ["qkv"]),
    ]


def _loop_branch(node, match, groups: int, p: str, seqlens: str, total: str, int8: bool):
    make = helper.make_node
    heads, kv_heads = match["heads"] // groups, match["kv_heads"] // groups
    body = helper.make_graph(
        [
            *_group_projection(match["x"], p, int8),
            make(
                "GroupQueryAttention",
                ["qkv", "", "", "", "", seqlens, total],
                ["group_out", "group_key", "group_value"],
                domain=GQA[0],
                **_gqa_attrs(node, heads, kv_heads),
            ),
            make("Identity", ["cond"], ["cond_out"]),
        ],
        p + "group_body",
        [
            helper.make_tensor_value_info("group", onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info("group_out", FLOAT, None),
        ],
    )
    width = match["heads"] * match["head_dim"]
    return helper.make_graph(
        [
            make("Loop", [p + "groups", ""], ["by_group"], body=body),  # [G, b, s, d / G]
            make("Transpose", ["by_group"], ["grouped"], perm=[1, 2, 0, 3]),
            make("Constant", [], ["packed_shape"], value_ints=[0, 0, width]),
            make("Reshape", ["grouped", "packed_shape"], ["loop_out"]),  # [b, s, d]
        ],
        p + "long_sequence",
        [],
        [helper.make_tensor_value_info("loop_out", FLOAT, None)],
    )


def _one_call_branch(node, chain_nodes, p: str, seqlens: str, total: str):
    call = copy.deepcopy(node)
    call.input[5], call.input[6] = seqlens, total
    call.output[:] = ["one_call_out", p + "unused_key", p + "unused_value"]
    return helper.make_graph(
        list(reversed(chain_nodes)) + [call],
        p + "short_sequence",
        [],
        [helper.make_tensor_value_info("one_call_out", FLOAT, None)],
    )


# --- clean-up -------------------------------------------------------------------------------


def remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is used (the old kernel's length computation)."""
    while True:
        used = {o.name for o in graph.output} | used_names(graph)
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        yield from [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every name read by a node of graph or of its subgraphs (outer-scope reads included)."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for sub in subgraphs(node):
            names |= used_names(sub)
    return names


def _undefined_reads(graph: onnx.GraphProto) -> list[str]:
    """The names the first node reading an undefined name reads before they are produced (not
    earlier, an initializer or a graph input); [] when the graph is closed."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        reads = set(node.input)
        for sub in subgraphs(node):
            reads |= used_names(sub) - _defined(sub)
        if not reads <= known:
            return sorted(reads - known)
        known.update(node.output)
    return []


def _defined(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.output)
        for sub in subgraphs(node):
            names |= _defined(sub)
    return names
