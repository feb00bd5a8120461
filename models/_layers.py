"""Pre-LN Transformer layers and two small models built from them.

Shape legend: see models/_encodings.py. L is the number of layers, V the vocabulary size.
"""

from __future__ import annotations

import torch
from torch import nn

from models._attention import MultiHeadAttention, _check_heads
from models._encodings import RotaryEmbedding, SinusoidalPositionalEncoding

__all__ = ["DecoderLM", "DecoderLayer", "Encoder", "EncoderLayer", "FeedForward"]


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear(d, f) -> GELU -> Linear(f, d)."""

    def __init__(self, *, embed_dim: int, ffn_dim: int) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("ffn_dim", ffn_dim)):
            if value <= 0:
                raise ValueError(f"{name} ({value}) must be positive")
        self.up = nn.Linear(embed_dim, ffn_dim)
        self.act = nn.GELU()
        self.down = nn.Linear(ffn_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, s, d] -> [b, s, d]."""
        return self.down(self.act(self.up(x)))


class EncoderLayer(nn.Module):
    """Pre-LN encoder layer: x + SelfAttn(LN(x)), then x + FFN(LN(x)).

    ``pos_embeddings`` and ``window`` go to the self-attention (see MultiHeadAttention).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        ffn_dim: int,
        num_kv_heads: int | None = None,
        window: int | None = None,
        pos_embeddings: nn.Module | None = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            window=window,
            pos_embeddings=pos_embeddings,
        )
        self.ffn_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.ffn = FeedForward(embed_dim=embed_dim, ffn_dim=ffn_dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        """x: [b, s, d], key_padding_mask: bool [b, s] (True = padding) -> [b, s, d]."""
        x = x + self.attn(self.attn_norm(x), key_padding_mask=key_padding_mask)
        return x + self.ffn(self.ffn_norm(x))


class DecoderLayer(nn.Module):
    """Pre-LN decoder layer: causal self-attention (with an optional KV cache), optional
    cross-attention over an encoder output, then the feed-forward block."""

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        ffn_dim: int,
        num_kv_heads: int | None = None,
        window: int | None = None,
        pos_embeddings: nn.Module | None = None,
        cross_attention: bool = False,
        context_dim: int | None = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            causal=True,
            window=window,
            pos_embeddings=pos_embeddings,
        )
        self.cross_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if cross_attention else None
        self.cross_attn = (
            MultiHeadAttention(
                embed_dim=embed_dim,
                num_heads=num_heads,
                kv_dim=context_dim,
                cross_attention=True,
            )
            if cross_attention
            else None
        )
        self.ffn_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.ffn = FeedForward(embed_dim=embed_dim, ffn_dim=ffn_dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_padding_mask: torch.Tensor | None = None,
        past_key: torch.Tensor | None = None,
        past_value: torch.Tensor | None = None,
        use_cache: bool = False,
    ):
        """
        Args:
            x (torch.Tensor): [b, s, d].
            context (torch.Tensor | None): encoder output [b, s_ctx, context_dim].
            context_padding_mask (torch.Tensor | None): bool [b, s_ctx], True = padding.
            past_key, past_value (torch.Tensor | None): [b, h_kv, p, h_d].

        Returns:
            [b, s, d], or (output, present_key, present_value) with a cache.
        """
        has_cross = self.cross_attn is not None
        if (context is not None) != has_cross:
            raise ValueError(
                "context must be given exactly when the layer has cross attention "
                f"(cross_attention={has_cross}, context given={context is not None})"
            )
        attn = self.attn(
            self.attn_norm(x), past_key=past_key, past_value=past_value, use_cache=use_cache
        )
        cached = isinstance(attn, tuple)
        x = x + (attn[0] if cached else attn)
        if self.cross_attn is not None:
            x = x + self.cross_attn(
                self.cross_norm(x), context, key_padding_mask=context_padding_mask
            )
        x = x + self.ffn(self.ffn_norm(x))
        return (x, attn[1], attn[2]) if cached else x


class Encoder(nn.Module):
    """A small encoder: token embedding + sinusoidal positions + L pre-LN encoder layers +
    final LayerNorm. Input ids [b, s] (int64), key_padding_mask bool [b, s] -> [b, s, d]."""

    def __init__(
        self,
        *,
        vocab_size: int,
        embed_dim: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("num_layers", num_layers)):
            if value <= 0:
                raise ValueError(f"{name} ({value}) must be positive")
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.positions = SinusoidalPositionalEncoding(dim=embed_dim)
        self.layers = nn.ModuleList(
            EncoderLayer(embed_dim=embed_dim, num_heads=num_heads, ffn_dim=ffn_dim)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, input_ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        x = self.positions(self.embed(input_ids))  # [b, s, d]
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        return self.norm(x)


class DecoderLM(nn.Module):
    """A small decoder-only language model: token embedding, L pre-LN decoder layers with RoPE
    and grouped-query attention, final LayerNorm, LM head.

    The cache of all layers travels as two stacked tensors, past_keys and past_values of shape
    [L, b, h_kv, p, h_d]; the presents have p + s positions.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None,
        ffn_dim: int,
        num_layers: int,
        window: int | None = None,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("num_layers", num_layers)):
            if value <= 0:
                raise ValueError(f"{name} ({value}) must be positive")
        # Check the heads before head_dim is derived (num_heads=0 would divide by zero).
        _check_heads(embed_dim, num_heads, num_heads if num_kv_heads is None else num_kv_heads)
        head_dim = embed_dim // num_heads
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.layers = nn.ModuleList(
            DecoderLayer(
                embed_dim=embed_dim,
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                ffn_dim=ffn_dim,
                window=window,
                pos_embeddings=RotaryEmbedding(head_dim=head_dim, base=rope_base),
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.lm_head = nn.Linear(embed_dim, vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        past_keys: torch.Tensor | None = None,
        past_values: torch.Tensor | None = None,
        use_cache: bool = False,
    ):
        """
        Args:
            input_ids (torch.Tensor): int64 [b, s].
            past_keys, past_values (torch.Tensor | None): [L, b, h_kv, p, h_d].

        Returns:
            logits [b, s, V], or (logits, present_keys, present_values) with a cache,
            presents [L, b, h_kv, p + s, h_d].
        """
        if (past_keys is None) != (past_values is None):
            raise ValueError("past_keys and past_values must be given together")
        cached = use_cache or past_keys is not None
        x = self.embed(input_ids)  # [b, s, d]
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            past = (None, None) if past_keys is None else (past_keys[i], past_values[i])
            out = layer(x, past_key=past[0], past_value=past[1], use_cache=cached)
            if cached:
                x, k, v = out
                keys.append(k)
                values.append(v)
            else:
                x = out
        logits = self.lm_head(self.norm(x))  # [b, s, V]
        if cached:
            return logits, torch.stack(keys), torch.stack(values)
        return logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with the KV cache: [b, s] -> [b, s + max_new_tokens]."""
        logits, keys, values = self(input_ids, use_cache=True)
        tokens = [input_ids]
        for step in range(max_new_tokens):
            next_id = logits[:, -1:].argmax(dim=-1)  # [b, 1]
            tokens.append(next_id)
            if step + 1 < max_new_tokens:
                logits, keys, values = self(next_id, keys, values)
        return torch.cat(tokens, dim=1)
