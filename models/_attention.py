"""Attention: scaled dot-product attention and multi-head attention.

Shape legend: see models/_encodings.py (b, s, s_kv, p, d, h, h_kv, h_d).

Masks follow torch's conventions: an ``attn_mask`` of dtype bool is True where a query may attend
to a key (F.scaled_dot_product_attention); a ``key_padding_mask`` is True at padded keys, which
are ignored (nn.MultiheadAttention). A float mask is added to the scores.

Rows whose keys are all masked return zeros, in torch and in every exported graph: softmax over
only -inf would be NaN, and runtimes disagree about it (microsoft/onnxscript#2479).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models._encodings import (
    ALiBiBias,
    RotaryEmbedding,
    ShawRelativePosition,
    T5RelativeBias,
    TransformerXLRelativeBias,
    _ScoreBias,
)
from models._kernels import (
    _has_valid_key,
    allowed_mask,
    cached_attention,
    masked_attention,
    repeat_kv,
    routing,
    with_bias,
    zero_rows_without_keys,
)
from models._kernels import attention as kernel_attention

__all__ = ["MultiHeadAttention", "ScaledDotProductAttention", "scaled_dot_product_attention"]


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) V, with zeros for rows where every key is masked.

    Args:
        query (torch.Tensor): [b, h, s, h_d]
        key (torch.Tensor): [b, h, s_kv, h_d]
        value (torch.Tensor): [b, h, s_kv, h_d]
        attn_mask (torch.Tensor | None): bool (True = attend) or float (added to the scores),
            broadcastable to [b, h, s, s_kv].
        scale (float | None): defaults to 1 / sqrt(h_d).

    Returns:
        torch.Tensor: [b, h, s, h_d]
    """
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    if attn_mask is None:
        return out
    return out.masked_fill(~_has_valid_key(attn_mask), 0.0)


def _attention_with_value_term(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    pos: _ScoreBias,
) -> torch.Tensor:
    """Explicit attention for encodings that also add a term to the values (Shaw)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [b, h, s, s_kv]
    scores = scores + with_bias(allowed, pos.score_bias(q, k))
    probs = scores.softmax(dim=-1)  # [b, h, s, s_kv]
    # Both terms are linear in a row of probs: zeroing the output row equals zeroing the probs.
    return zero_rows_without_keys(probs @ v + pos.value_term(probs), allowed)  # [b, h, s, h_d]


class ScaledDotProductAttention(nn.Module):
    """Module form of :func:`scaled_dot_product_attention` (no weights), for export."""

    def __init__(self, *, scale: float | None = None) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, query, key, value, attn_mask=None):
        """query [b, h, s, h_d], key/value [b, h, s_kv, h_d], attn_mask [b|1, h|1, s, s_kv]."""
        return scaled_dot_product_attention(query, key, value, attn_mask, scale=self.scale)


class MultiHeadAttention(nn.Module):
    """Multi-head attention: self or cross, grouped-query, causal, sliding window, key padding,
    an injected positional encoding, and an optional KV cache.

    Args:
        embed_dim (int): d, the model dim of the queries and of the output.
        num_heads (int): h.
        num_kv_heads (int | None): h_kv for grouped-query attention; h must be a multiple of it.
            Defaults to h (plain multi-head attention); 1 is multi-query attention.
        kv_dim (int | None): model dim of the cross-attention context (defaults to d).
        cross_attention (bool): keys and values come from ``context`` instead of ``x``.
        causal (bool): query i (absolute position p + i) attends to keys j <= p + i.
        window (int | None): sliding window; a query attends to keys less than ``window``
            positions away (only to earlier ones when causal).
        pos_embeddings: None, a RotaryEmbedding, or a score-bias encoding (ALiBiBias,
            T5RelativeBias, ShawRelativePosition, TransformerXLRelativeBias).
        bias (bool): biases on the projections.

    Cache layout: past and present keys/values are [b, h_kv, p, h_d], keys stored after RoPE.
    The position offset is p, so a cached step is bottom-right aligned.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        kv_dim: int | None = None,
        cross_attention: bool = False,
        causal: bool = False,
        window: int | None = None,
        pos_embeddings: nn.Module | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_heads(embed_dim, num_heads, num_kv_heads)
        if window is not None and window <= 0:
            raise ValueError(f"window ({window}) must be positive")
        if cross_attention and (causal or window is not None or pos_embeddings is not None):
            raise ValueError(
                "cross attention takes no causal mask, window or positional encoding "
                f"(got causal={causal}, window={window}, "
                f"pos_embeddings={type(pos_embeddings).__name__})"
            )
        if pos_embeddings is not None and not isinstance(
            pos_embeddings, RotaryEmbedding | _ScoreBias
        ):
            raise ValueError(
                f"pos_embeddings ({type(pos_embeddings).__name__}) must be a RotaryEmbedding "
                "or a score-bias encoding"
            )
        if kv_dim is not None and kv_dim <= 0:
            raise ValueError(f"kv_dim ({kv_dim}) must be positive")
        if kv_dim is not None and kv_dim != embed_dim and not cross_attention:
            raise ValueError(
                f"kv_dim ({kv_dim}) differs from embed_dim ({embed_dim}), but self attention "
                "reads its keys and values from x; build with cross_attention=True"
            )
        _check_pos_embeddings(pos_embeddings, num_heads, embed_dim // num_heads)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.cross_attention = cross_attention
        self.causal = causal
        self.window = window
        self.pos_embeddings = pos_embeddings
        kv_dim = embed_dim if kv_dim is None else kv_dim
        kv_out = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, kv_out, bias=bias)
        self.v_proj = nn.Linear(kv_dim, kv_out, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        past_key: torch.Tensor | None = None,
        past_value: torch.Tensor | None = None,
        use_cache: bool = False,
    ):
        """
        Args:
            x (torch.Tensor): queries' input [b, s, d].
            context (torch.Tensor | None): [b, s_kv, kv_dim], required for cross attention.
            key_padding_mask (torch.Tensor | None): bool [b, s_kv], True at padded keys; with a
                cache it covers past and new keys (s_kv = p + s).
            past_key, past_value (torch.Tensor | None): [b, h_kv, p, h_d].
            use_cache (bool): also return the present cache (implied by a past).

        Returns:
            torch.Tensor [b, s, d], or (output, present_key, present_value) with the present
            cache [b, h_kv, p + s, h_d] when a past is given or ``use_cache`` is set.
        """
        src = self._source(x, context, past_key, past_value)
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))  # [b, s, h, h_d]
        k = self.k_proj(src).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(src).unflatten(-1, (self.num_kv_heads, self.head_dim))
        core = self._core(past_key, key_padding_mask)
        out, present_key, present_value = core(q, k, v, past_key, past_value, key_padding_mask)
        out = self.out_proj(out.flatten(2))  # [b, s, d]
        if use_cache or past_key is not None:
            return out, present_key, present_value
        return out

    def _core(self, past_key, key_padding_mask):
        """The attention core for this call: each takes q [b, s, h, h_d], k/v [b, s_src, h_kv,
        h_d] before RoPE, the past and the key padding, and returns (out [b, s, h, h_d],
        present_key, present_value [b, h_kv, p + s, h_d]).

        A kernel core is chosen wherever models._kernels has this attention's semantics; in
        eager and in the plain exports it runs torch's SDPA in the projections' layout, and
        inside ``ort_kernels()`` it becomes a kernel op. Everything else takes the plain core.
        """
        if past_key is None:
            return self._kernel_core if self._kernel_serves() else self._plain_core
        if key_padding_mask is None and self._kernel_serves_cache():
            return self._cached_kernel_core
        return self._plain_core

    def _cached_kernel_core(self, q, k, v, past_key, past_value, key_padding_mask):
        offset = past_key.shape[2]
        if isinstance(self.pos_embeddings, RotaryEmbedding):
            q = self.pos_embeddings(q, offset, seq_dim=1)
            k = self.pos_embeddings(k, offset, seq_dim=1)
        return cached_attention(q, k, v, past_key, past_value)

    def _kernel_core(self, q, k, v, past_key, past_value, key_padding_mask):
        if isinstance(self.pos_embeddings, RotaryEmbedding):
            q = self.pos_embeddings(q, seq_dim=1)
            k = self.pos_embeddings(k, seq_dim=1)
        out = self._attend_kernel(q, k, v, key_padding_mask)  # [b, s, h, h_d]
        return out, k.transpose(1, 2), v.transpose(1, 2)  # presents [b, h_kv, s, h_d]

    def _plain_core(self, q, k, v, past_key, past_value, key_padding_mask):
        q = q.transpose(1, 2)  # [b, h, s, h_d]
        k = k.transpose(1, 2)  # [b, h_kv, s_src, h_d]
        v = v.transpose(1, 2)  # [b, h_kv, s_src, h_d]
        offset = 0 if past_key is None else past_key.shape[2]
        if isinstance(self.pos_embeddings, RotaryEmbedding):
            q = self.pos_embeddings(q, offset)
            k = self.pos_embeddings(k, offset)
        if past_key is not None:
            k = torch.cat((past_key, k), dim=2)  # [b, h_kv, p + s, h_d]
            v = torch.cat((past_value, v), dim=2)  # [b, h_kv, p + s, h_d]
        out = self._attend(q, k, v, key_padding_mask)  # [b, h, s, h_d]
        return out.transpose(1, 2), k, v  # [b, s, h, h_d]

    def _kernel_serves(self) -> bool:
        """Whether models._kernels.attention has this attention's semantics (without a cache):
        any mask is causal, a causal window or key padding; any score bias adds nothing to the
        values (Shaw's value term has no kernel input)."""
        pos = self.pos_embeddings  # None, RoPE or a score bias: the constructor checks it
        if isinstance(pos, _ScoreBias) and pos.has_value_term:
            return False
        return self.window is None or self.causal

    def _kernel_serves_cache(self) -> bool:
        """Whether models._kernels.cached_attention serves this attention's cached step; only
        while routing to kernels: eager and the other exports keep the path below."""
        pos = self.pos_embeddings
        plain = pos is None or isinstance(pos, RotaryEmbedding)
        return routing() and self.causal and self.window is None and plain

    def _attend_kernel(self, q, k, v, key_padding_mask) -> torch.Tensor:
        """q [b, s, h, h_d], k/v [b, s_kv, h_kv, h_d] -> [b, s, h, h_d]."""
        pos = self.pos_embeddings
        score_bias = None
        if isinstance(pos, _ScoreBias):
            keys = repeat_kv(k.transpose(1, 2), self.num_heads // self.num_kv_heads)
            score_bias = pos.score_bias(q.transpose(1, 2), keys)  # [b|1, h, s, s_kv]
        return kernel_attention(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            score_bias=score_bias,
            causal=self.causal,
            window=self.window,
        )

    def _source(self, x, context, past_key, past_value) -> torch.Tensor:
        if self.cross_attention:
            if context is None:
                raise ValueError("cross attention needs a context tensor")
            if past_key is not None or past_value is not None:
                raise ValueError("cross attention takes no KV cache; pass the context instead")
            return context
        if context is not None:
            raise ValueError("self attention takes no context; build with cross_attention=True")
        if (past_key is None) != (past_value is None):
            raise ValueError("past_key and past_value must be given together")
        return x

    def _attend(self, q, k, v, key_padding_mask) -> torch.Tensor:
        """q [b, h, s, h_d], k/v [b, h_kv, s_kv, h_d] -> [b, h, s, h_d]."""
        pos = self.pos_embeddings
        n_rep = self.num_heads // self.num_kv_heads
        k = repeat_kv(k, n_rep)  # [b, h, s_kv, h_d]
        v = repeat_kv(v, n_rep)  # [b, h, s_kv, h_d]
        allowed = self._allowed(q.shape[2], k.shape[2], key_padding_mask, q.device)
        if not isinstance(pos, _ScoreBias):
            return masked_attention(q, k, v, allowed, None)
        if pos.has_value_term:
            return _attention_with_value_term(q, k, v, allowed, pos)
        # The bias is [b|1, h, s, s_kv], on the scale of the scaled scores.
        return masked_attention(q, k, v, allowed, pos.score_bias(q, k))

    def _allowed(self, s, s_kv, key_padding_mask, device) -> torch.Tensor | None:
        """bool [b|1, 1, s, s_kv], True where query i may attend to key j; None for all."""
        return allowed_mask(s, s_kv, key_padding_mask, self.causal, self.window, device)


def _check_heads(embed_dim: int, num_heads: int, num_kv_heads: int) -> None:
    for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
        if value <= 0:
            raise ValueError(f"{name} ({value}) must be positive")
    if num_kv_heads <= 0:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must be positive")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
        )


def _check_pos_embeddings(pos: nn.Module | None, num_heads: int, head_dim: int) -> None:
    """The encoding must have been built for this attention's heads and head dim."""
    if isinstance(pos, RotaryEmbedding):
        built = {"head_dim": 2 * pos.inv_freq.numel()}
    elif isinstance(pos, ALiBiBias):
        built = {"num_heads": pos.num_heads}
    elif isinstance(pos, T5RelativeBias):
        built = {"num_heads": pos.embedding.embedding_dim}
    elif isinstance(pos, ShawRelativePosition):
        built = {"head_dim": pos.key_table.embedding_dim}
    elif isinstance(pos, TransformerXLRelativeBias):
        built = {"num_heads": pos.num_heads, "head_dim": pos.head_dim}
    else:
        return
    expected = {"num_heads": num_heads, "head_dim": head_dim}
    if any(value != expected[name] for name, value in built.items()):
        wanted = {name: expected[name] for name in built}
        raise ValueError(
            f"pos_embeddings ({type(pos).__name__}) was built for {built}, "
            f"but the attention has {wanted}"
        )
