"""ONNX lowering of attnx's kernel op (models/_kernels.py) to onnxruntime contrib kernels.

``attnx::attention`` becomes
- com.microsoft.GroupQueryAttention when causal: it never builds an s x s mask (a causal window
  is its local_window_size; an ALiBi, T5 or Transformer-XL score bias its attention_bias
  input). Both its CUDA kernel and its CPU flash path skip the key blocks above the diagonal;
  the CPU path runs only when the present key/value outputs exist, so the lowering keeps them
  even where nothing reads them. The CPU path scores every key block before a causal window
  too and masks it afterwards (the ``tiled`` variant, export/rewrites/query_tiles.py, calls it
  per tile of queries where a window makes that pay);
- com.microsoft.MultiHeadAttention otherwise: without a mask or bias input it takes the flash
  path (MLAS flash attention on CPU), which keeps no s x s score tensor either. A score bias
  (bidirectional T5 or ALiBi) is its attention_bias input, [1, h, s, s_kv], broadcast over the
  batch: the unfused path, but no [b, h, s, s_kv] mask is built to carry the padding.

A key-padding mask would need an s x s mask input, which forces the unfused path. attnx passes
it as an extra head dimension instead: the score is a dot product, so a query column of ones
and a key column that is PADDED_KEY_LOGIT / scale at padded keys (0 elsewhere) give each padded
key the scaled score PADDED_KEY_LOGIT, once its own q/k part and its value row are zeroed. Its
weight exp(-60 - m), m the row's largest score, then multiplies a zero value row, and adds less
than half an ulp to the row's softmax sum while some key of the row scores above -35 (2048
keys x e^-25 < 2^-25). A score of -1e9 would mask just as well, but onnxruntime's exp kernels
clamp their argument at -104 and scale by 2^n, so every padded key would become a denormal in
the value product: MultiHeadAttention on BERT at batch 8, seq 512 took 2.2x as long (Xeon,
AVX-512), and scores between -104 and -87 took 20x. A score bias input (ALiBi, T5) can lift a
padded key by more than 60, so with one the padded keys' score is BIASED_PADDED_KEY_LOGIT,
-1e9: exact whatever the bias, at the slower rate. The value gets zero columns where the
kernel wants one head size for q, k and v (GQA, whose head size must also be a multiple of 8),
and the output drops them. Rows whose keys are all padded are set to zeros afterwards, as
attnx defines them.

(Causal ALiBi fits the same trick in principle, -slope_h * (i - j) being slope_h * j up to a
per-row constant, but that column reaches |slope_h * s| and float32 then rounds every score
of a long row: at seq 4096 the outputs left the tight tolerance. It takes the bias input.)

Both kernels take packed [b, s, heads * h_d] tensors; the op's [b, s, heads, h_d] layout
reshapes to that without a copy.
"""

from __future__ import annotations

import math

import onnx
import torch
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

PADDED_KEY_LOGIT = -60.0  # a padded key's scaled score (the module docstring says why -60)
BIASED_PADDED_KEY_LOGIT = -1e9  # the same, next to a score bias of any size
GQA_EXTRA = 8  # GroupQueryAttention wants a head size that is a multiple of 8
FLOAT = onnx.TensorProto.FLOAT
INT32 = onnx.TensorProto.INT32


# Inputs of integer type by name; every other input and output is float (T).
_INTEGER_INPUTS = {"seqlens_k": "M", "total_sequence_length": "M", "position_ids": "I"}
_TYPES = {
    "T": ["tensor(float)", "tensor(float16)"],
    "M": ["tensor(int32)"],
    "I": ["tensor(int64)"],
}


def _schema(name: str, inputs: list[str], outputs: list[str], attrs: dict) -> onnx.defs.OpSchema:
    """The part of an onnxruntime com.microsoft schema this lowering uses; onnx's schema registry
    does not know com.microsoft ops. Every input but the first is optional."""
    schema = onnx.defs.OpSchema
    optional = schema.FormalParameterOption.Optional
    types = [_INTEGER_INPUTS.get(n, "T") for n in inputs]
    formal = [schema.FormalParameter(inputs[0], types[0])] + [
        schema.FormalParameter(n, t, param_option=optional)
        for n, t in zip(inputs[1:], types[1:], strict=True)
    ]
    return schema(
        name,
        "com.microsoft",
        1,
        inputs=formal,
        outputs=[schema.FormalParameter(n, "T", param_option=optional) for n in outputs],
        type_constraints=[(t, _TYPES[t], "") for t in sorted({"T", *types})],
        attributes=[schema.Attribute(n, t, n) for n, t in attrs.items()],
    )


_ATTR = onnx.defs.OpSchema.AttrType
GROUP_QUERY_ATTENTION = Op(
    Opset("com.microsoft", 1),
    "GroupQueryAttention",
    _schema(
        "GroupQueryAttention",
        [
            "query",
            "key",
            "value",
            "past_key",
            "past_value",
            "seqlens_k",
            "total_sequence_length",
            "cos_cache",
            "sin_cache",
            "position_ids",
            "attention_bias",
        ],
        ["output", "present_key", "present_value"],
        {
            "num_heads": _ATTR.INT,
            "kv_num_heads": _ATTR.INT,
            "scale": _ATTR.FLOAT,
            "local_window_size": _ATTR.INT,
        },
    ),
)
MULTI_HEAD_ATTENTION = Op(
    Opset("com.microsoft", 1),
    "MultiHeadAttention",
    _schema(
        "MultiHeadAttention",
        ["query", "key", "value", "bias", "key_padding_mask", "attention_bias"],
        ["output"],
        {"num_heads": _ATTR.INT, "scale": _ATTR.FLOAT},
    ),
)

ROTARY_EMBEDDING = Op(
    Opset("com.microsoft", 1),
    "RotaryEmbedding",
    _schema(
        "RotaryEmbedding",
        ["input", "position_ids", "cos_cache", "sin_cache"],
        ["output"],
        {"interleaved": _ATTR.INT},
    ),
)


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _dims(shape, start: int, end: int):
    return op.Slice(shape, _ints(start), _ints(end))


def _expand_to(x, *parts):
    """Expand x to the shape that concatenates parts (1-D int64 tensors or python ints)."""
    dims = [_ints(p) if isinstance(p, int) else p for p in parts]
    return op.Expand(x, op.Concat(*dims, axis=0))


def static_heads(q, k, op_name: str) -> tuple[int, int, int]:
    """(heads, head size, kv heads) of q [b, s, h, h_d] and k [b, s_kv, h_kv, h_d]: the kernels
    take them as attributes, so they must be known at export."""
    heads, head_dim, kv_heads = q.shape[2], q.shape[3], k.shape[2]
    if not all(isinstance(d, int) for d in (heads, head_dim, kv_heads)):
        raise ValueError(
            f"attnx::{op_name} needs static head counts and head size, got q {q.shape}, k {k.shape}"
        )
    return heads, head_dim, kv_heads


def packed(x, heads: int, size: int):
    """[b, s, heads, size] -> [b, s, heads * size], the kernels' layout (a reshape, no copy)."""
    return op.Reshape(x, _ints(0, 0, heads * size))


def _lengths(total_len, k_shape):
    """GroupQueryAttention's seqlens_k (index of each row's last key: total - 1, int32, one per
    batch row) and total_sequence_length (a scalar) from a [1] total key count."""
    seqlens_k = op.Cast(_expand_to(op.Sub(total_len, _ints(1)), _dims(k_shape, 0, 1)), to=INT32)
    return seqlens_k, op.Cast(op.Squeeze(total_len, _ints(0)), to=INT32)


def _padded_keys(k, v, key_padding_mask, scale: float, biased: bool):
    """k, v [b, s_kv, h_kv, h_d] with padded keys' rows zeroed, and the key column that gives
    them their scaled score (PADDED_KEY_LOGIT, or BIASED_PADDED_KEY_LOGIT next to a score bias):
    float [b, s_kv, 1, 1], 0 at unpadded keys."""
    padded = op.Unsqueeze(key_padding_mask, _ints(2, 3))  # [b, s_kv, 1, 1]
    logit = BIASED_PADDED_KEY_LOGIT if biased else PADDED_KEY_LOGIT
    column = op.Where(padded, op.Constant(value_float=logit / scale), op.Constant(value_float=0.0))
    # A product, not a Where: onnxruntime's Where broadcasts the [b, s_kv, 1, 1] condition
    # element by element, 3.5-4.5x the time of Mul, which scales each row of h_kv * h_d at once.
    keep = op.Cast(op.Not(padded), to=FLOAT)
    return op.Mul(k, keep), op.Mul(v, keep), column


def _causal(q, k, v, key_padding_mask, score_bias, window: int, heads, kv_heads, head_dim):
    scale = 1.0 / math.sqrt(head_dim)
    q_shape, k_shape = op.Shape(q), op.Shape(k)
    size = head_dim
    if key_padding_mask is not None:
        size = head_dim + GQA_EXTRA
        q = _extend(q, op.Constant(value_floats=[1.0]), _dims(q_shape, 0, 2), heads)
        b_skv = _dims(k_shape, 0, 2)
        k, v, column = _padded_keys(k, v, key_padding_mask, scale, score_bias is not None)
        k = _extend(k, column, b_skv, kv_heads)
        v = _extend(v, op.Constant(value_floats=[0.0]), b_skv, kv_heads)
    seqlens_k, total = _lengths(_dims(k_shape, 1, 2), k_shape)
    out, _, _ = GROUP_QUERY_ATTENTION(
        packed(q, heads, size),
        packed(k, kv_heads, size),
        packed(v, kv_heads, size),
        None,
        None,
        seqlens_k,
        total,
        None,
        None,
        None,
        score_bias,  # [b|1, h, s, s_kv], added to the scaled scores
        num_heads=heads,
        kv_num_heads=kv_heads,
        scale=scale,
        local_window_size=window if window else -1,  # keys j with i - j < window, as attnx
        _outputs=3,
    )
    out = op.Reshape(out, _ints(0, 0, heads, size))  # [b, s, h, size]
    if size != head_dim:
        out = op.Slice(out, _ints(0), _ints(head_dim), _ints(3))
    return out


def _extend(x, column, lead, heads: int):
    """x [b, s, heads, h_d] ++ column (broadcast to [b, s, heads, 1]) ++ zeros to 8 columns
    -> [b, s, heads, h_d + 8]."""
    zeros = _expand_to(op.Constant(value_floats=[0.0]), lead, heads, GQA_EXTRA - 1)
    return op.Concat(x, _expand_to(column, lead, heads, 1), zeros, axis=3)


def _bidirectional(q, k, v, key_padding_mask, score_bias, heads, kv_heads, head_dim):
    scale = 1.0 / math.sqrt(head_dim)
    if key_padding_mask is not None:  # zeroed before the repeat: h_kv heads, not h
        k, v, column = _padded_keys(k, v, key_padding_mask, scale, score_bias is not None)
    if kv_heads != heads:
        k, v = (_repeat_heads(t, heads // kv_heads, kv_heads, head_dim) for t in (k, v))
    qk_size = head_dim
    if key_padding_mask is not None:
        qk_size = head_dim + 1  # MultiHeadAttention lets q/k and v head sizes differ
        ones = _expand_to(op.Constant(value_floats=[1.0]), _dims(op.Shape(q), 0, 3), 1)
        q = op.Concat(q, ones, axis=3)
        k = op.Concat(k, _expand_to(column, _dims(op.Shape(k), 0, 2), heads, 1), axis=3)
    out = MULTI_HEAD_ATTENTION(
        packed(q, heads, qk_size),
        packed(k, heads, qk_size),
        packed(v, heads, head_dim),
        None,
        None,
        score_bias,  # [b|1, h, s, s_kv], added to the scaled scores
        num_heads=heads,
        scale=scale,
    )
    return op.Reshape(out, _ints(0, 0, heads, head_dim))


def _repeat_heads(x, n_rep: int, kv_heads: int, head_dim: int):
    """[b, s_kv, h_kv, h_d] -> [b, s_kv, h_kv * n_rep, h_d]; head i uses kv head i // n_rep."""
    lead = _dims(op.Shape(x), 0, 2)
    x = _expand_to(op.Unsqueeze(x, _ints(3)), lead, kv_heads, n_rep, head_dim)
    return op.Reshape(x, _ints(0, 0, kv_heads * n_rep, head_dim))


def rows_with_a_key(key_padding_mask, causal: bool, window: int):
    """bool, True where a query row has at least one unpadded key it may attend to:
    [b, 1, 1, 1] for bidirectional attention, [b, s, 1, 1] for causal (s == s_kv)."""
    keep = op.Cast(op.Not(key_padding_mask), to=FLOAT)  # [b, s_kv]
    if not causal:
        any_key = op.ReduceMax(keep, _ints(1), keepdims=1)  # [b, 1]
        return op.Unsqueeze(op.Greater(any_key, op.Constant(value_float=0.0)), _ints(2, 3))
    seen = op.CumSum(keep, op.Constant(value_int=1))  # [b, s]: unpadded keys j <= i
    if window:
        batch = _dims(op.Shape(keep), 0, 1)
        zeros = _expand_to(op.Constant(value_floats=[0.0]), batch, window)
        before = op.Concat(zeros, seen, axis=1)  # [b, window + s]; entry i + window is seen[i]
        seen = op.Sub(seen, op.Slice(before, _ints(0), op.Shape(seen, start=1), _ints(1)))
    return op.Unsqueeze(op.Greater(seen, op.Constant(value_float=0.0)), _ints(2, 3))


def attention(q, k, v, key_padding_mask=None, score_bias=None, causal=False, window=0):
    """Lowering of attnx::attention: q [b, s, h, h_d], k/v [b, s_kv, h_kv, h_d]."""
    heads, head_dim, kv_heads = static_heads(q, k, "attention")
    if not causal and window:
        raise ValueError("attnx::attention lowers a window only when causal")
    if causal:
        out = _causal(q, k, v, key_padding_mask, score_bias, window, heads, kv_heads, head_dim)
    else:
        out = _bidirectional(q, k, v, key_padding_mask, score_bias, heads, kv_heads, head_dim)
    if key_padding_mask is None:
        return out
    # The kernels' output is finite on rows without a key (their keys score PADDED_KEY_LOGIT
    # or BIASED_PADDED_KEY_LOGIT, and their value rows are zeros), so a product zeroes them.
    valid = op.Cast(rows_with_a_key(key_padding_mask, causal, window), to=FLOAT)
    return op.Mul(out, valid)


def cached_attention(q, k, v, past_key, past_value):
    """Lowering of attnx::cached_attention: q [b, s, h, h_d], k/v [b, s, h_kv, h_d], past
    [b, h_kv, p, h_d] -> (out [b, s, h, h_d], present key, present value [b, h_kv, p + s, h_d]).
    GroupQueryAttention keeps the cache in attnx's layout; export/rewrites/batch_rows.py then
    runs the prompts it refuses (batch > 1, s > 1 and a past) row by row."""
    heads, head_dim, kv_heads = static_heads(q, k, "cached_attention")
    k_shape = op.Shape(k)
    seqlens_k, total = _lengths(
        op.Add(_dims(op.Shape(past_key), 2, 3), _dims(k_shape, 1, 2)), k_shape
    )
    out, present_key, present_value = GROUP_QUERY_ATTENTION(
        packed(q, heads, head_dim),
        packed(k, kv_heads, head_dim),
        packed(v, kv_heads, head_dim),
        past_key,
        past_value,
        seqlens_k,
        total,
        num_heads=heads,
        kv_num_heads=kv_heads,
        scale=1.0 / math.sqrt(head_dim),
        local_window_size=-1,
        _outputs=3,
    )
    return op.Reshape(out, _ints(0, 0, heads, head_dim)), present_key, present_value


def rotary(x, cos, sin, seq_dim: int):
    """Lowering of attnx::rotary: x [b, s, h, h_d] (seq_dim 1) or [b, h, s, h_d] (seq_dim 2)
    rotated "rotate half" by cos/sin, the table of x's own positions: [s, h_d/2] (the graph
    computes it from the past length) or [b, s, h_d/2] (positions per row, as transformers
    computes them). The kernel reads row position_ids[b, j] of its cache for x's position j:
    the offset 0 for a shared table, b * s + j for the table flattened to [b * s, h_d/2]."""
    if len(cos.shape) == 3:
        rows = _dims(op.Shape(cos), 0, 2)  # [b, s]
        count = op.ReduceProd(rows, keepdims=0)
        positions = op.Reshape(op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1)),
                               rows)  # [b, s]: row b * s + j
        table = op.Concat(_ints(-1), _dims(op.Shape(cos), 2, 3), axis=0)
        cos, sin = (op.Reshape(t, table) for t in (cos, sin))  # [b * s, h_d/2]
    else:
        positions = op.Constant(value_ints=[0])  # [1]: position j of x reads row j
    if seq_dim == 2:  # the kernel's 4D layout, [b, h, s, h_d]
        return ROTARY_EMBEDDING(x, positions, cos, sin, interleaved=0)
    flat = op.Reshape(x, _ints(0, 0, -1))  # [b, s, h * h_d]: the head size is 2 x the table's
    out = ROTARY_EMBEDDING(flat, positions, cos, sin, interleaved=0)
    return op.Reshape(out, op.Shape(x))  # [b, s, h, h_d]


def translation_table() -> dict:
    import models._kernels  # noqa: F401  (registers the custom ops)

    return {
        torch.ops.attnx.attention.default: attention,
        torch.ops.attnx.cached_attention.default: cached_attention,
        torch.ops.attnx.rotary.default: rotary,
    }
