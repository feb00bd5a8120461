"""Attention cores that an export can route to a runtime kernel.

In eager mode these are plain torch. Inside ``ort_kernels()`` the attention core becomes the
custom op ``attnx::attention``, which the exporter's ``fused`` variant lowers to onnxruntime
kernels that never materialize an s x s score, mask or bias tensor: GroupQueryAttention for
causal attention and MultiHeadAttention's flash path otherwise.
Key padding reaches those kernels as an extra head dimension, a score bias (ALiBi, T5,
Transformer-XL) as the kernel's bias input (export/rewrites/kernels.py).

The core works in the projections' layout, [b, s, heads, h_d], so neither the model nor the
lowering transposes q, k, v or the output: at long sequences each transpose is a copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models._encodings import relative_distances
from models._native import count_window, kernel_route, native, routed


def ort_kernels():
    """Within this context (this thread only), attention cores that have a kernel op emit it
    (for export). Yields the Route, whose ``calls`` counts the cores routed so far, so a
    caller can tell whether a module has any core that a kernel serves."""
    return routed("kernels")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, h_kv, s_kv, h_d] -> [b, h_kv * n_rep, s_kv, h_d]; head i uses kv head i // n_rep."""
    if n_rep == 1:
        return x
    b, h_kv, s_kv, h_d = x.shape
    x = x[:, :, None].expand(b, h_kv, n_rep, s_kv, h_d)  # [b, h_kv, n_rep, s_kv, h_d]
    return x.reshape(b, h_kv * n_rep, s_kv, h_d)  # [b, h, s_kv, h_d]


def allowed_mask(s, s_kv, key_padding_mask, causal: bool, window, device) -> torch.Tensor | None:
    """bool [b|1, 1, s, s_kv], True where query i (at position s_kv - s + i) may attend to key
    j under a causal mask, a window (keys less than ``window`` positions away) and key padding
    (True = padded); None when all may."""
    allowed = None
    if causal or window:
        dist = relative_distances(s, s_kv, device)  # [s, s_kv], j - (p + i)
        allowed = dist <= 0 if causal else torch.ones_like(dist, dtype=torch.bool)
        if window:
            allowed = allowed & (dist.abs() < window)
        allowed = allowed[None, None]  # [1, 1, s, s_kv]
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]  # [b, 1, 1, s_kv]
        allowed = keep if allowed is None else allowed & keep
    return allowed


def _has_valid_key(mask: torch.Tensor) -> torch.Tensor:
    """[..., s, s_kv] bool or float mask -> [..., s, 1], True where some key is allowed."""
    if mask.dtype == torch.bool:
        return mask.any(dim=-1, keepdim=True)
    return (mask > float("-inf")).any(dim=-1, keepdim=True)


def with_bias(allowed: torch.Tensor | None, score_bias: torch.Tensor | None):
    """The mask SDPA takes: ``allowed`` (bool, True = attend), or ``score_bias`` with -inf where
    ``allowed`` is False (float, added); None for none."""
    if score_bias is None or allowed is None:
        return allowed if score_bias is None else score_bias
    return score_bias.masked_fill(~allowed, float("-inf"))


def zero_rows_without_keys(out: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """out [b, h, s, h_d] with zeros in the rows where ``allowed`` admits no key.

    Score biases are finite, so only ``allowed`` puts -inf in a mask: asking it, a bool of at
    most [b, 1, s, s_kv] (often [b, 1, 1, s_kv]), is as exact as asking the float mask and
    reads far less than the [b, h, s, s_kv] biased scores.
    """
    return out if allowed is None else out.masked_fill(~_has_valid_key(allowed), 0.0)


def masked_attention(q, k, v, allowed, score_bias) -> torch.Tensor:
    """SDPA of q [b, h, s, h_d] over k/v [b, h, s_kv, h_d] under ``allowed`` (bool, True =
    attend) and an additive ``score_bias``, with zeros in rows that have no key."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=with_bias(allowed, score_bias))
    return zero_rows_without_keys(out, allowed)


def _reference(q, k, v, key_padding_mask, score_bias, causal: bool, window: int):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, h_d]
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    if key_padding_mask is None and score_bias is None and not window:
        # Without a cache s == s_kv, so top-left and bottom-right causal alignment coincide and
        # torch's is_causal fast path (which skips the masked half) has attnx's semantics.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        allowed = allowed_mask(q.shape[2], k.shape[2], key_padding_mask, causal, window, q.device)
        out = masked_attention(q, k, v, allowed, score_bias)
    return out.transpose(1, 2)  # [b, s, h, h_d]


@torch.library.custom_op("attnx::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    score_bias: torch.Tensor | None,
    causal: bool,
    window: int,
) -> torch.Tensor:
    return _reference(q, k, v, key_padding_mask, score_bias, causal, window)


@_attention_op.register_fake
def _(q, k, v, key_padding_mask, score_bias, causal, window):
    return torch.empty_like(q)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    score_bias: torch.Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
) -> torch.Tensor:
    """Attention without cache whose masks and bias a kernel can take without an s x s tensor.

    Args:
        q (torch.Tensor): [b, s, h, h_d].
        k, v (torch.Tensor): [b, s_kv, h_kv, h_d], h a multiple of h_kv.
        key_padding_mask (torch.Tensor | None): bool [b, s_kv], True at padded keys.
        score_bias (torch.Tensor | None): [b|1, h, s, s_kv] added to the scaled scores (ALiBi,
            T5, Transformer-XL); both kernels take it as is.
        causal (bool): query i attends to keys j <= i (self-attention, s == s_kv).
        window (int | None): with causal, keys less than ``window`` positions back.

    Returns:
        torch.Tensor: [b, s, h, h_d]; rows whose keys are all masked are zeros.
    """
    if not causal and window is not None:
        raise ValueError("the attention kernel takes a window only when causal")
    window = window or 0
    route = kernel_route()
    if route is not None:
        route.calls += 1
        return torch.ops.attnx.attention(q, k, v, key_padding_mask, score_bias, causal, window)
    if native() and window and score_bias is None:
        count_window()  # ONNX Attention-25 takes the causal window as attributes
        return torch.ops.attnx.attention(q, k, v, key_padding_mask, None, causal, window)
    return _reference(q, k, v, key_padding_mask, score_bias, causal, window)


def routing() -> bool:
    """Whether attention cores are being routed to kernel ops (inside ``ort_kernels()``)."""
    return kernel_route() is not None


def _cached_reference(q, k, v, past_key, past_value):
    present_key = torch.cat((past_key, k.transpose(1, 2)), dim=2)  # [b, h_kv, p + s, h_d]
    present_value = torch.cat((past_value, v.transpose(1, 2)), dim=2)
    n_rep = q.shape[2] // k.shape[2]
    keys, values = repeat_kv(present_key, n_rep), repeat_kv(present_value, n_rep)
    q = q.transpose(1, 2)  # [b, h, s, h_d]
    # Bottom-right causal: query i sits at position p + i, so every row has a key.
    allowed = allowed_mask(q.shape[2], keys.shape[2], None, True, None, q.device)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
    return out.transpose(1, 2).contiguous(), present_key, present_value


@torch.library.custom_op("attnx::cached_attention", mutates_args=())
def _cached_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cached_reference(q, k, v, past_key, past_value)


@_cached_attention_op.register_fake
def _(q, k, v, past_key, past_value):
    b, h_kv, p, h_d = past_key.shape
    present = past_key.new_empty(b, h_kv, p + k.shape[1], h_d)
    return torch.empty_like(q), present, torch.empty_like(present)


def cached_attention(q, k, v, past_key, past_value):
    """Causal attention of new tokens over a KV cache, as a kernel op (export routing only).

    Args:
        q (torch.Tensor): [b, s, h, h_d].
        k, v (torch.Tensor): the new keys and values [b, s, h_kv, h_d] (after RoPE).
        past_key, past_value (torch.Tensor): [b, h_kv, p, h_d].

    Returns:
        (out [b, s, h, h_d], present_key, present_value [b, h_kv, p + s, h_d]); query i sits at
        position p + i (bottom-right causal).
    """
    route = kernel_route()
    if route is None:
        raise RuntimeError("cached_attention is a kernel op: call it inside ort_kernels()")
    route.calls += 1
    return torch.ops.attnx.cached_attention(q, k, v, past_key, past_value)
