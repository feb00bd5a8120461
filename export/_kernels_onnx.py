"""ONNX lowerings of attnx's kernel ops (models/_kernels.py) to onnxruntime contrib kernels.

``attnx::causal_attention`` becomes com.microsoft.GroupQueryAttention: onnxruntime's CPU and
CUDA kernels run causal attention without building an s x s mask and skip the masked half,
which no decomposed graph and no ONNX Attention-23 graph does (they materialize the scores and
a Trilu/Where mask). GQA takes packed [b, s, heads * h_d] tensors, so the lowering transposes
in and out of attnx's [b, h, s, h_d] layout.
"""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset


def _gqa_schema() -> onnx.defs.OpSchema:
    """The part of onnxruntime's GroupQueryAttention schema this lowering uses; onnx's schema
    registry does not know com.microsoft ops."""
    schema = onnx.defs.OpSchema
    optional = schema.FormalParameterOption.Optional
    inputs = [
        schema.FormalParameter("query", "T"),
        schema.FormalParameter("key", "T", param_option=optional),
        schema.FormalParameter("value", "T", param_option=optional),
        schema.FormalParameter("past_key", "T", param_option=optional),
        schema.FormalParameter("past_value", "T", param_option=optional),
        schema.FormalParameter("seqlens_k", "M"),
        schema.FormalParameter("total_sequence_length", "M"),
    ]
    outputs = [
        schema.FormalParameter("output", "T"),
        schema.FormalParameter("present_key", "T"),
        schema.FormalParameter("present_value", "T"),
    ]
    attrs = [
        schema.Attribute("num_heads", schema.AttrType.INT, "query heads"),
        schema.Attribute("kv_num_heads", schema.AttrType.INT, "key/value heads"),
    ]
    return schema(
        "GroupQueryAttention",
        "com.microsoft",
        1,
        inputs=inputs,
        outputs=outputs,
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)"], ""),
            ("M", ["tensor(int32)"], ""),
        ],
        attributes=attrs,
    )


GROUP_QUERY_ATTENTION = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())


def _packed(x, heads: int, head_dim: int):
    """[b, heads, s, h_d] -> [b, s, heads * h_d]."""
    x = op.Transpose(x, perm=[0, 2, 1, 3])
    return op.Reshape(x, op.Constant(value_ints=[0, 0, heads * head_dim]))


def causal_attention(q, k, v):
    heads, head_dim = q.shape[1], q.shape[3]
    kv_heads = k.shape[1]
    if not all(isinstance(d, int) for d in (heads, head_dim, kv_heads)):
        raise ValueError(
            f"causal_attention needs static head counts and head size, got q {q.shape}, k {k.shape}"
        )
    shape = op.Shape(q)
    batch = op.Slice(shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
    seq = op.Slice(shape, op.Constant(value_ints=[2]), op.Constant(value_ints=[3]))
    # Every row holds its full s keys: seqlens_k is the index of the last key, s - 1 (int32,
    # as GQA wants), and the total sequence length is s.
    last = op.Sub(seq, op.Constant(value_ints=[1]))
    seqlens_k = op.Cast(op.Expand(last, batch), to=onnx.TensorProto.INT32)
    total = op.Cast(op.Squeeze(seq, op.Constant(value_ints=[0])), to=onnx.TensorProto.INT32)
    out, _, _ = GROUP_QUERY_ATTENTION(
        _packed(q, heads, head_dim),
        _packed(k, kv_heads, head_dim),
        _packed(v, kv_heads, head_dim),
        None,
        None,
        seqlens_k,
        total,
        num_heads=heads,
        kv_num_heads=kv_heads,
        _outputs=3,
    )
    out = op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head_dim]))  # [b, s, h, h_d]
    return op.Transpose(out, perm=[0, 2, 1, 3])  # [b, h, s, h_d]


def translation_table() -> dict:
    import models._kernels  # noqa: F401  (registers the custom ops)

    return {torch.ops.attnx.causal_attention.default: causal_attention}
