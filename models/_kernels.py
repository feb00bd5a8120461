"""Attention cores that an export can route to a runtime kernel.

In eager mode these are plain torch. Inside ``ort_kernels()`` the pure causal self-attention
core becomes the custom op ``attnx::causal_attention``, which the exporter's ``fused`` variant
lowers to onnxruntime's GroupQueryAttention: a kernel that skips the masked half and never
materializes an s x s mask, unlike any decomposed or ONNX Attention graph.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

_ROUTE_TO_KERNELS = False
_ROUTED_CALLS = [0]


@contextlib.contextmanager
def ort_kernels():
    """Within this context, attention cores that have a kernel op emit it (for export).

    Yields a one-item list counting the calls routed so far, so a caller can tell whether a
    module has any core that a kernel serves.
    """
    global _ROUTE_TO_KERNELS
    previous, _ROUTE_TO_KERNELS = _ROUTE_TO_KERNELS, True
    _ROUTED_CALLS[0] = 0
    try:
        yield _ROUTED_CALLS
    finally:
        _ROUTE_TO_KERNELS = previous


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, h_kv, s_kv, h_d] -> [b, h_kv * n_rep, s_kv, h_d]; head i uses kv head i // n_rep."""
    if n_rep == 1:
        return x
    b, h_kv, s_kv, h_d = x.shape
    x = x[:, :, None].expand(b, h_kv, n_rep, s_kv, h_d)  # [b, h_kv, n_rep, s_kv, h_d]
    return x.reshape(b, h_kv * n_rep, s_kv, h_d)  # [b, h, s_kv, h_d]


def _causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    # With s == s_kv (no cache) top-left and bottom-right causal alignment coincide, so torch's
    # is_causal fast path (which skips the masked half) computes the bottom-right semantics.
    return F.scaled_dot_product_attention(
        q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True
    )


@torch.library.custom_op("attnx::causal_attention", mutates_args=())
def _causal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _causal_reference(q, k, v)


@_causal_attention_op.register_fake
def _(q, k, v):
    return torch.empty_like(q)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention without cache, mask or bias.

    q [b, h, s, h_d], k/v [b, h_kv, s, h_d] (h a multiple of h_kv) -> [b, h, s, h_d].
    """
    if _ROUTE_TO_KERNELS:
        _ROUTED_CALLS[0] += 1
        return torch.ops.attnx.causal_attention(q, k, v)
    return _causal_reference(q, k, v)
