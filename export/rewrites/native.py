"""ONNX lowering of attnx's kernel op (models/_kernels.py) to the native ONNX Attention op, for
the ``attention23`` variant (models/_native.py routes only what it lowers).

A causal sliding window has no Attention-23 form but an s x s mask, which onnxruntime then
materializes. Attention-25 takes the window as attributes: with ``is_causal`` query i attends
keys i - left_window_size .. i, and attnx's window w (keys less than w positions back) is
left_window_size = w - 1. Key padding is a bool mask broadcast over heads and queries, and
rows with no key left are zeros afterwards, as attnx defines them. q, k and v go in as packed
[b, s, heads * h_d] tensors with q_num_heads/kv_num_heads, the op's 3D form, so the
[b, s, heads, h_d] layout needs no transposes.
"""

from __future__ import annotations

import math

import onnx
import torch
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

from .kernels import packed, rows_with_a_key, static_heads

WINDOW_OPSET = 25  # Attention's left_window_size and right_window_size attributes


def _output_y_only(schema: onnx.defs.OpSchema) -> onnx.defs.OpSchema:
    """The schema with its first output alone: the exporter names every output a schema lists,
    and onnxruntime would then compute the qk_matmul_output (an s x s tensor) and the present
    cache nobody reads."""
    return onnx.defs.OpSchema(
        schema.name,
        schema.domain,
        schema.since_version,
        inputs=list(schema.inputs),
        outputs=[schema.outputs[0]],
        type_constraints=[
            (c.type_param_str, list(c.allowed_type_strs), c.description)
            for c in schema.type_constraints
        ],
        attributes=list(schema.attributes.values()),
    )


ATTENTION_25 = Op(
    Opset("", WINDOW_OPSET),
    "Attention",
    _output_y_only(onnx.defs.get_schema("Attention", WINDOW_OPSET)),
)


def attention(q, k, v, key_padding_mask=None, score_bias=None, causal=False, window=0):
    """Lowering of attnx::attention for a causal window, with or without key padding, without a
    score bias: q [b, s, h, h_d], k/v [b, s, h_kv, h_d] -> [b, s, h, h_d]."""
    heads, head_dim, kv_heads = static_heads(q, k, "attention")
    if not (causal and window) or score_bias is not None:
        raise ValueError(
            "the native lowering of attnx::attention takes a causal window without score bias"
        )
    mask = None
    if key_padding_mask is not None:  # bool [b, s_kv] -> [b, 1, 1, s_kv], True = attend
        mask = op.Unsqueeze(op.Not(key_padding_mask), op.Constant(value_ints=[1, 2]))
    out = ATTENTION_25(
        packed(q, heads, head_dim),
        packed(k, kv_heads, head_dim),
        packed(v, kv_heads, head_dim),
        mask,
        is_causal=1,
        left_window_size=window - 1,
        right_window_size=0,
        q_num_heads=heads,
        kv_num_heads=kv_heads,
        scale=1.0 / math.sqrt(head_dim),
    )
    out = op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head_dim]))
    if key_padding_mask is None:
        return out
    valid = rows_with_a_key(key_padding_mask, causal, window)  # attnx: such rows are zeros
    return op.Where(valid, out, op.Constant(value_float=0.0))


def translation_table() -> dict:
    import models._kernels  # noqa: F401  (registers the custom ops)

    return {torch.ops.attnx.attention.default: attention}
