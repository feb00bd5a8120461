"""ONNX lowering of attnx's kernel op (models/_kernels.py) to onnxruntime contrib kernels.

``attnx::attention`` becomes
- com.microsoft.GroupQueryAttention when causal: onnxruntime's CPU and CUDA kernels skip the
  masked half and never build an s x s mask (a causal window is its local_window_size; a T5 or
  Transformer-XL score bias its attention_bias input);
- com.microsoft.MultiHeadAttention otherwise: without a mask or bias input it takes the flash
  path (MLAS flash attention on CPU), which keeps no s x s score tensor either.

Neither kernel would take padding or ALiBi without an s x s mask or bias input, which forces
the unfused path. attnx passes them as extra head dimensions instead: the score is a dot
product, so a query column c_q and a key column c_k add c_q * c_k to every score.
- key padding: c_q = 1, c_k = -1e9 at padded keys, 0 elsewhere;
- causal ALiBi: -slope_h * (i - j) equals slope_h * j up to a per-row constant, which softmax
  ignores, so c_q = slope_h / scale and c_k = j - (s_kv - 1) (kept <= 0).
The value gets zero columns where the kernel wants one head size for q, k and v (GQA, whose
head size must also be a multiple of 8), and the output drops them. Rows whose keys are all
padded are set to zeros afterwards, as attnx defines them.

Both kernels take packed [b, s, heads * h_d] tensors; the op's [b, s, heads, h_d] layout
reshapes to that without a copy.
"""

from __future__ import annotations

import math

import onnx
import torch
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

PADDED_KEY_SCORE = -1e9  # exp() of this, relative to any real score, is exactly 0 in float32
GQA_EXTRA = 8  # GroupQueryAttention wants a head size that is a multiple of 8
FLOAT = onnx.TensorProto.FLOAT
INT32 = onnx.TensorProto.INT32


def _schema(name: str, inputs: list[str], outputs: list[str], attrs: dict) -> onnx.defs.OpSchema:
    """The part of an onnxruntime com.microsoft schema this lowering uses; onnx's schema registry
    does not know com.microsoft ops. Every input but the first is optional."""
    schema = onnx.defs.OpSchema
    optional = schema.FormalParameterOption.Optional
    formal = [schema.FormalParameter(inputs[0], "T")] + [
        schema.FormalParameter(
            n, "M" if n in ("seqlens_k", "total_sequence_length") else "T", param_option=optional
        )
        for n in inputs[1:]
    ]
    return schema(
        name,
        "com.microsoft",
        1,
        inputs=formal,
        outputs=[schema.FormalParameter(n, "T", param_option=optional) for n in outputs],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)"], ""),
            ("M", ["tensor(int32)"], ""),
        ],
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
        ["query", "key", "value"],
        ["output"],
        {"num_heads": _ATTR.INT, "scale": _ATTR.FLOAT},
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


def _padded_key_scores(key_padding_mask):
    """bool [b, s_kv] -> float [b, s_kv, 1, 1]: -1e9 at padded keys, 0 elsewhere."""
    scores = op.Where(
        key_padding_mask,
        op.Constant(value_float=PADDED_KEY_SCORE),
        op.Constant(value_float=0.0),
    )
    return op.Unsqueeze(scores, _ints(2, 3))


def _causal(
    q, k, v, key_padding_mask, alibi_slopes, score_bias, window: int, heads, kv_heads, head_dim
):
    scale = 1.0 / math.sqrt(head_dim)
    q_shape, k_shape = op.Shape(q), op.Shape(k)
    size = head_dim
    if key_padding_mask is not None or alibi_slopes is not None:
        size = head_dim + GQA_EXTRA
        q_cols = [op.Constant(value_floats=[float(key_padding_mask is not None)] * heads)]
        if alibi_slopes is not None:
            q_cols.append(op.Mul(alibi_slopes, op.Constant(value_float=1.0 / scale)))
        width = len(q_cols)
        q_cols = op.Unsqueeze(
            op.Concat(*(op.Unsqueeze(c, _ints(1)) for c in q_cols), axis=1), _ints(0, 1)
        )  # [1, 1, h, width]
        q = _extend(q, q_cols, width, _dims(q_shape, 0, 2), heads)
        b_skv = _dims(k_shape, 0, 2)
        k_cols = [
            _expand_to(_padded_key_scores(key_padding_mask), b_skv, 1, 1)
            if key_padding_mask is not None
            else _expand_to(op.Constant(value_floats=[0.0]), b_skv, 1, 1)
        ]
        if alibi_slopes is not None:
            k_cols.append(_expand_to(_key_positions(k_shape), b_skv, 1, 1))
        k = _extend(k, op.Concat(*k_cols, axis=3), width, b_skv, kv_heads)
        v = _extend(v, None, 0, b_skv, kv_heads)
    s_kv = _dims(k_shape, 1, 2)
    seqlens_k = op.Cast(_expand_to(op.Sub(s_kv, _ints(1)), _dims(k_shape, 0, 1)), to=INT32)
    total = op.Cast(op.Squeeze(s_kv, _ints(0)), to=INT32)
    out, _, _ = GROUP_QUERY_ATTENTION(
        op.Reshape(q, _ints(0, 0, heads * size)),
        op.Reshape(k, _ints(0, 0, kv_heads * size)),
        op.Reshape(v, _ints(0, 0, kv_heads * size)),
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


def _extend(x, cols, width: int, lead, heads: int):
    """x [b, s, heads, h_d] ++ cols broadcast to [b, s, heads, width] ++ zeros up to 8 columns
    -> [b, s, heads, h_d + 8]."""
    zeros = _expand_to(op.Constant(value_floats=[0.0]), lead, heads, GQA_EXTRA - width)
    if not width:
        return op.Concat(x, zeros, axis=3)
    return op.Concat(x, _expand_to(cols, lead, heads, width), zeros, axis=3)


def _key_positions(k_shape):
    """[1, s_kv, 1, 1] float: j - (s_kv - 1) for key j, so the largest is 0."""
    s_kv = op.Squeeze(_dims(k_shape, 1, 2), _ints(0))
    positions = op.Range(op.Constant(value_int=0), s_kv, op.Constant(value_int=1))
    last = op.Sub(s_kv, op.Constant(value_int=1))
    return op.Unsqueeze(op.Cast(op.Sub(positions, last), to=FLOAT), _ints(0, 2, 3))


def _bidirectional(q, k, v, key_padding_mask, heads, kv_heads, head_dim):
    scale = 1.0 / math.sqrt(head_dim)
    if kv_heads != heads:
        k, v = (_repeat_heads(t, heads // kv_heads, kv_heads, head_dim) for t in (k, v))
    qk_size = head_dim
    if key_padding_mask is not None:
        qk_size = head_dim + 1  # MultiHeadAttention lets q/k and v head sizes differ
        ones = _expand_to(op.Constant(value_floats=[1.0]), _dims(op.Shape(q), 0, 3), 1)
        q = op.Concat(q, ones, axis=3)
        k_col = _expand_to(_padded_key_scores(key_padding_mask), _dims(op.Shape(k), 0, 2), heads, 1)
        k = op.Concat(k, k_col, axis=3)
    out = MULTI_HEAD_ATTENTION(
        op.Reshape(q, _ints(0, 0, heads * qk_size)),
        op.Reshape(k, _ints(0, 0, heads * qk_size)),
        op.Reshape(v, _ints(0, 0, heads * head_dim)),
        num_heads=heads,
        scale=scale,
    )
    return op.Reshape(out, _ints(0, 0, heads, head_dim))


def _repeat_heads(x, n_rep: int, kv_heads: int, head_dim: int):
    """[b, s_kv, h_kv, h_d] -> [b, s_kv, h_kv * n_rep, h_d]; head i uses kv head i // n_rep."""
    lead = _dims(op.Shape(x), 0, 2)
    x = _expand_to(op.Unsqueeze(x, _ints(3)), lead, kv_heads, n_rep, head_dim)
    return op.Reshape(x, _ints(0, 0, kv_heads * n_rep, head_dim))


def _rows_with_a_key(key_padding_mask, causal: bool, window: int):
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


def attention(
    q, k, v, key_padding_mask=None, alibi_slopes=None, score_bias=None, causal=False, window=0
):
    """Lowering of attnx::attention: q [b, s, h, h_d], k/v [b, s_kv, h_kv, h_d]."""
    heads, head_dim, kv_heads = q.shape[2], q.shape[3], k.shape[2]
    if not all(isinstance(d, int) for d in (heads, head_dim, kv_heads)):
        raise ValueError(
            f"attnx::attention needs static head counts and head size, got q {q.shape}, k {k.shape}"
        )
    if not causal and (alibi_slopes is not None or score_bias is not None or window):
        raise ValueError(
            "attnx::attention lowers ALiBi slopes, a score bias and a window only when causal"
        )
    if causal:
        out = _causal(
            q, k, v, key_padding_mask, alibi_slopes, score_bias, window, heads, kv_heads, head_dim
        )
    else:
        out = _bidirectional(q, k, v, key_padding_mask, heads, kv_heads, head_dim)
    if key_padding_mask is None:
        return out
    valid = _rows_with_a_key(key_padding_mask, causal, window)
    return op.Where(valid, out, op.Constant(value_float=0.0))


def cached_attention(q, k, v, past_key, past_value):
    """Lowering of attnx::cached_attention: q [b, s, h, h_d], k/v [b, s, h_kv, h_d], past
    [b, h_kv, p, h_d] -> (out [b, s, h, h_d], present key, present value [b, h_kv, p + s, h_d]).
    GroupQueryAttention keeps the cache in attnx's layout; export/_batch_rows.py then runs the
    prompts it refuses (batch > 1, s > 1 and a past) row by row."""
    heads, head_dim, kv_heads = q.shape[2], q.shape[3], k.shape[2]
    if not all(isinstance(d, int) for d in (heads, head_dim, kv_heads)):
        raise ValueError(
            f"attnx::cached_attention needs static head counts and head size, got q {q.shape}, "
            f"k {k.shape}"
        )
    k_shape = op.Shape(k)
    total_len = op.Add(_dims(op.Shape(past_key), 2, 3), _dims(k_shape, 1, 2))  # [p + s]
    seqlens_k = op.Cast(_expand_to(op.Sub(total_len, _ints(1)), _dims(k_shape, 0, 1)), to=INT32)
    out, present_key, present_value = GROUP_QUERY_ATTENTION(
        op.Reshape(q, _ints(0, 0, heads * head_dim)),
        op.Reshape(k, _ints(0, 0, kv_heads * head_dim)),
        op.Reshape(v, _ints(0, 0, kv_heads * head_dim)),
        past_key,
        past_value,
        seqlens_k,
        op.Cast(op.Squeeze(total_len, _ints(0)), to=INT32),
        num_heads=heads,
        kv_num_heads=kv_heads,
        scale=1.0 / math.sqrt(head_dim),
        local_window_size=-1,
        _outputs=3,
    )
    return op.Reshape(out, _ints(0, 0, heads, head_dim)), present_key, present_value


def translation_table() -> dict:
    import models._kernels  # noqa: F401  (registers the custom ops)

    return {
        torch.ops.attnx.attention.default: attention,
        torch.ops.attnx.cached_attention.default: cached_attention,
    }
