"""Layers and small models against torch's Transformer layers, and cached decoding against full
causal passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models import (
    ALiBiBias,
    DecoderLayer,
    DecoderLM,
    Encoder,
    EncoderLayer,
    FeedForward,
    MultiHeadAttention,
    RotaryEmbedding,
    ShawRelativePosition,
    T5RelativeBias,
    TransformerXLRelativeBias,
)
from tests.models._helpers import assert_close, build, np_sinusoid, randn

B, D, H, HD, F = 2, 32, 4, 8, 64
VOCAB = 53


def copy_attention(ref: nn.MultiheadAttention, mha: MultiHeadAttention) -> None:
    ref.in_proj_weight.copy_(torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight]))
    ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
    ref.out_proj.weight.copy_(mha.out_proj.weight)
    ref.out_proj.bias.copy_(mha.out_proj.bias)


def copy_ffn(ref, ffn: FeedForward) -> None:
    ref.linear1.load_state_dict(ffn.up.state_dict())
    ref.linear2.load_state_dict(ffn.down.state_dict())


def torch_encoder_layer(layer: EncoderLayer) -> nn.TransformerEncoderLayer:
    ref = nn.TransformerEncoderLayer(
        D, H, F, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    with torch.no_grad():
        copy_attention(ref.self_attn, layer.attn)
        copy_ffn(ref, layer.ffn)
        ref.norm1.load_state_dict(layer.attn_norm.state_dict())
        ref.norm2.load_state_dict(layer.ffn_norm.state_dict())
    return ref.train()  # dropout is 0; train mode keeps torch off its fused fast path


@pytest.mark.parametrize(
    ("s", "pads"), [(6, None), (6, (0, 2)), (1, None)], ids=["s6", "s6-padding", "s1"]
)
def test_encoder_layer_matches_torch(s, pads):
    layer = build(EncoderLayer, embed_dim=D, num_heads=H, ffn_dim=F)
    ref = torch_encoder_layer(layer)
    x = randn(B, s, D)
    padding = None
    if pads:
        padding = torch.zeros(B, s, dtype=torch.bool)
        for r, pad in enumerate(pads):
            padding[r, s - pad :] = pad > 0
    with torch.no_grad():
        assert_close(layer(x, padding), ref(x, src_key_padding_mask=padding), atol=1e-5)


def test_encoder_matches_torch_layers():
    enc = build(Encoder, vocab_size=VOCAB, embed_dim=D, num_heads=H, ffn_dim=F, num_layers=2)
    ids = torch.randint(0, VOCAB, (B, 6), generator=torch.Generator().manual_seed(3))
    padding = torch.zeros(B, 6, dtype=torch.bool)
    padding[1, 4:] = True
    refs = [torch_encoder_layer(layer) for layer in enc.layers]
    with torch.no_grad():
        x = enc.embed.weight[ids] + torch.from_numpy(np_sinusoid(np.arange(6), D)).float()
        for ref in refs:
            x = ref(x, src_key_padding_mask=padding)
        expected = enc.norm(x)
        assert_close(enc(ids, padding), expected, atol=1e-5)


@pytest.mark.parametrize("pads", [None, (0, 3)], ids=["no-padding", "context-padding"])
def test_decoder_layer_matches_torch_decoder_layer(pads):
    layer = build(DecoderLayer, embed_dim=D, num_heads=H, ffn_dim=F, cross_attention=True)
    ref = nn.TransformerDecoderLayer(
        D, H, F, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    with torch.no_grad():
        copy_attention(ref.self_attn, layer.attn)
        copy_attention(ref.multihead_attn, layer.cross_attn)
        copy_ffn(ref, layer.ffn)
        ref.norm1.load_state_dict(layer.attn_norm.state_dict())
        ref.norm2.load_state_dict(layer.cross_norm.state_dict())
        ref.norm3.load_state_dict(layer.ffn_norm.state_dict())
    ref.train()
    x, context = randn(B, 5, D, seed=1), randn(B, 8, D, seed=2)
    padding = None
    if pads:
        padding = torch.zeros(B, 8, dtype=torch.bool)
        padding[1, 8 - pads[1] :] = True
    causal_block = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        expected = ref(x, context, tgt_mask=causal_block, memory_key_padding_mask=padding)
        assert_close(layer(x, context, context_padding_mask=padding), expected, atol=1e-5)


# --- cached decoding equals a full causal pass -------------------------------------------------

S = 7  # total length decoded
CHUNKS = {"token-by-token": (1,) * S, "prefill3-2-1-1": (3, 2, 1, 1), "prefill-all": (S,)}


def split(x: torch.Tensor, chunks: tuple[int, ...], dim: int = 1) -> list[torch.Tensor]:
    assert sum(chunks) == x.shape[dim]
    return list(torch.split(x, list(chunks), dim=dim))


def mha_pos(kind):
    return {
        None: lambda: None,
        "rope": lambda: RotaryEmbedding(head_dim=HD),
        "alibi": lambda: ALiBiBias(num_heads=H),
        "t5": lambda: T5RelativeBias(
            num_heads=H, num_buckets=8, max_distance=6, bidirectional=False
        ),
        "shaw": lambda: ShawRelativePosition(head_dim=HD, max_distance=2),
        "xl": lambda: TransformerXLRelativeBias(num_heads=H, head_dim=HD),
    }[kind]()


CACHE_CASES = {
    "causal": (None, {}),
    "rope-gqa": ("rope", {"num_kv_heads": 2}),
    "rope-mqa-window": ("rope", {"num_kv_heads": 1, "window": 3}),
    "alibi": ("alibi", {}),
    "alibi-mqa": ("alibi", {"num_kv_heads": 1}),
    "t5-causal": ("t5", {}),
    "shaw": ("shaw", {}),
    "xl": ("xl", {"num_kv_heads": 2}),
}


@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize(("pos", "config"), CACHE_CASES.values(), ids=CACHE_CASES.keys())
def test_mha_cached_decoding_equals_full_pass(pos, config, chunks):
    def factory(**kw):
        return MultiHeadAttention(pos_embeddings=mha_pos(pos), **kw)

    mha = build(factory, embed_dim=D, num_heads=H, causal=True, **config)
    x = randn(B, S, D)
    with torch.no_grad():
        full, full_key, full_value = mha(x, use_cache=True)
        outs, key, value = [], None, None
        for piece in split(x, chunks):
            if key is None:
                out, key, value = mha(piece, use_cache=True)
            else:
                out, key, value = mha(piece, past_key=key, past_value=value)
            outs.append(out)
    assert_close(torch.cat(outs, dim=1), full, atol=1e-5)
    assert_close(key, full_key, atol=1e-6)
    assert_close(value, full_value, atol=1e-6)
    assert key.shape == (B, mha.num_kv_heads, S, HD)


def test_mha_cached_decoding_with_key_padding_and_empty_past():
    """key_padding_mask covers past and new keys; an empty past (p = 0) is a valid start."""
    mha = build(
        lambda **kw: MultiHeadAttention(pos_embeddings=RotaryEmbedding(head_dim=HD), **kw),
        embed_dim=D,
        num_heads=H,
        num_kv_heads=2,
        causal=True,
    )
    x = randn(B, S, D)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, 1:3] = True  # batch row 1 ignores keys 1 and 2
    with torch.no_grad():
        full = mha(x, key_padding_mask=padding)
        key = value = torch.zeros(B, 2, 0, HD)
        outs, p = [], 0
        for piece in split(x, (2, 1, 3, 1)):
            p += piece.shape[1]
            out, key, value = mha(
                piece, key_padding_mask=padding[:, :p], past_key=key, past_value=value
            )
            outs.append(out)
    assert_close(torch.cat(outs, dim=1), full, atol=1e-5)


LAYER_CASES = {
    "rope-gqa": {"pos_embeddings": "rope", "num_kv_heads": 2},
    "rope-window": {"pos_embeddings": "rope", "window": 3},
    "alibi-cross": {"pos_embeddings": "alibi", "cross_attention": True, "context_dim": 24},
}


@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("config", LAYER_CASES.values(), ids=LAYER_CASES.keys())
def test_decoder_layer_cached_decoding_equals_full_pass(config, chunks):
    def factory(*, pos_embeddings, **kw):
        return DecoderLayer(pos_embeddings=mha_pos(pos_embeddings), **kw)

    layer = build(factory, embed_dim=D, num_heads=H, ffn_dim=F, **config)
    x = randn(B, S, D)
    context = randn(B, 4, 24, seed=2) if config.get("cross_attention") else None
    with torch.no_grad():
        full = layer(x, context)
        outs, key, value = [], None, None
        for piece in split(x, chunks):
            out, key, value = layer(piece, context, past_key=key, past_value=value, use_cache=True)
            outs.append(out)
    assert_close(torch.cat(outs, dim=1), full, atol=1e-5)


def make_lm(**overrides) -> DecoderLM:
    config = {
        "vocab_size": VOCAB,
        "embed_dim": D,
        "num_heads": H,
        "num_kv_heads": 2,
        "ffn_dim": F,
        "num_layers": 2,
        **overrides,
    }
    return build(DecoderLM, **config)


@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
def test_decoder_lm_cached_decoding_equals_full_pass(window, chunks):
    lm = make_lm(window=window)
    ids = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = lm(ids)
        outs, keys, values = [], None, None
        for piece in split(ids, chunks):
            if keys is None:
                logits, keys, values = lm(piece, use_cache=True)
            else:
                logits, keys, values = lm(piece, keys, values)
            outs.append(logits)
        empty = torch.zeros(2, B, 2, 0, HD)
        from_empty, _, _ = lm(ids, empty, empty)
    assert_close(torch.cat(outs, dim=1), full, atol=1e-4)
    assert_close(from_empty, full, atol=1e-5)
    assert keys.shape == (2, B, 2, S, HD)


@pytest.mark.parametrize(
    ("prompt", "new"),
    [(4, 6), (1, 5), (3, 1), (2, 0)],
    ids=["prompt4-new6", "prompt1-new5", "prompt3-new1", "prompt2-new0"],
)
def test_generate_equals_uncached_greedy_decoding(prompt, new):
    lm = make_lm()
    ids = torch.randint(0, VOCAB, (B, prompt), generator=torch.Generator().manual_seed(5))
    expected = ids
    with torch.no_grad():
        for _ in range(new):  # recompute the whole sequence every step, no cache
            next_id = lm(expected)[:, -1].argmax(dim=-1, keepdim=True)
            expected = torch.cat([expected, next_id], dim=1)
    got = lm.generate(ids, new)
    assert got.shape == (B, prompt + new)
    assert torch.equal(got, expected)
