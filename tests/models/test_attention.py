"""Attention against torch's own modules (F.scaled_dot_product_attention, nn.MultiheadAttention)
and an independent numpy multi-head attention; masks, alignment and fully masked rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import (
    ALiBiBias,
    MultiHeadAttention,
    RotaryEmbedding,
    ScaledDotProductAttention,
    ShawRelativePosition,
    T5RelativeBias,
    TransformerXLRelativeBias,
    scaled_dot_product_attention,
)
from tests.models._helpers import (
    assert_close,
    build,
    np_attention,
    np_mha,
    randn,
    to_numpy,
)

B, D, H, HD = 2, 32, 4, 8
LONG = 600


def random_bool_mask(shape, seed) -> torch.Tensor:
    """True = attend; every row keeps at least its first key so no row is fully masked."""
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[..., 0] = True
    return mask


def trailing_padding(b: int, s_kv: int, pads: tuple[int, ...]) -> torch.Tensor:
    """bool [b, s_kv], True at the last pads[r] keys of row r (True = padded)."""
    mask = torch.zeros(b, s_kv, dtype=torch.bool)
    for r, pad in enumerate(pads):
        if pad:
            mask[r, s_kv - pad :] = True
    return mask


def pos_module(kind: str | None, heads: int = H, causal: bool = False):
    if kind is None:
        return None
    return {
        "rope": lambda: RotaryEmbedding(head_dim=HD),
        "alibi": lambda: ALiBiBias(num_heads=heads),
        "t5": lambda: T5RelativeBias(
            num_heads=heads, num_buckets=16, max_distance=32, bidirectional=not causal
        ),
        "shaw": lambda: ShawRelativePosition(head_dim=HD, max_distance=3),
        "xl": lambda: TransformerXLRelativeBias(num_heads=heads, head_dim=HD),
    }[kind]()


def make_mha(pos=None, *, heads=H, seed=7, **config) -> MultiHeadAttention:
    def factory(**kw):
        return MultiHeadAttention(
            pos_embeddings=pos_module(pos, heads, kw.get("causal", False)), **kw
        )

    mha = build(factory, seed=seed, embed_dim=HD * heads, num_heads=heads, **config)
    if pos == "xl":  # u and v start near zero; make terms (c) and (d) visible
        with torch.no_grad():
            mha.pos_embeddings.u.copy_(randn(heads, HD, seed=31))
            mha.pos_embeddings.v.copy_(randn(heads, HD, seed=32))
    return mha


# --- scaled dot-product attention vs torch ------------------------------------------------------

SDPA_CASES = {
    "no-mask": (5, 5, None),
    "bool-b1ss": (5, 7, "bool4d"),
    "bool-ss": (4, 6, "bool2d"),
    "float-b1ss": (6, 3, "float4d"),
    "float-neg-inf": (5, 5, "float-inf"),
    "s1": (1, 1, "bool4d"),
    "q1-kv9": (1, 9, "float4d"),
}


def sdpa_mask(kind, s, s_kv):
    if kind is None:
        return None
    if kind == "bool4d":
        return random_bool_mask((B, 1, s, s_kv), seed=3)
    if kind == "bool2d":
        return random_bool_mask((s, s_kv), seed=4)
    if kind == "float4d":
        return randn(B, H, s, s_kv, seed=5)
    allowed = random_bool_mask((B, 1, s, s_kv), seed=6)
    return torch.zeros(B, 1, s, s_kv).masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize(("s", "s_kv", "kind"), SDPA_CASES.values(), ids=SDPA_CASES.keys())
def test_sdpa_matches_torch(s, s_kv, kind):
    q, k, v = randn(B, H, s, HD, seed=1), randn(B, H, s_kv, HD, seed=2), randn(B, H, s_kv, HD)
    mask = sdpa_mask(kind, s, s_kv)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(scaled_dot_product_attention(q, k, v, mask), expected, atol=1e-6)
    assert_close(ScaledDotProductAttention()(q, k, v, mask), expected, atol=1e-6)
    # and an explicit scale
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2)
    assert_close(scaled_dot_product_attention(q, k, v, mask, scale=0.2), expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["bool", "float-neg-inf"])
def test_sdpa_fully_masked_rows_are_zero(kind):
    s, s_kv = 4, 5
    q, k, v = randn(B, H, s, HD, seed=1), randn(B, H, s_kv, HD, seed=2), randn(B, H, s_kv, HD)
    allowed = random_bool_mask((B, 1, s, s_kv), seed=3)
    allowed[1, :, 2] = False  # batch 1, query 2: every key masked
    allowed[0, :, 0] = False  # batch 0, query 0
    mask = (
        allowed
        if kind == "bool"
        else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    )
    out = scaled_dot_product_attention(q, k, v, mask)
    assert torch.equal(out[1, :, 2], torch.zeros(H, HD))
    assert torch.equal(out[0, :, 0], torch.zeros(H, HD))
    assert torch.isfinite(out).all()
    # the other rows are untouched: compare with numpy attention row by row
    bias = np.where(to_numpy(allowed), 0.0, -np.inf)
    assert_close(out, np_attention(to_numpy(q), to_numpy(k), to_numpy(v), bias), atol=1e-6)


def naive_sdpa(query, key, value, attn_mask=None, scale=None):
    """softmax(q k^T * scale + mask) v with no special case: NaN for fully masked rows, which is
    what a plain decomposition (and an exported graph without a guard) computes."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = query @ key.transpose(-2, -1) * scale
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(dim=-1) @ value


@pytest.mark.parametrize("kind", ["bool", "float-neg-inf"])
def test_fully_masked_rows_are_zero_whatever_the_backend_returns(kind, monkeypatch):
    """torch 2.13's own kernels already return zeros for such rows; the guard must not rely on
    it. With a NaN-producing kernel underneath, the rows are still exactly zero."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_sdpa)
    s, s_kv = 3, 4
    q, k, v = randn(B, H, s, HD, seed=1), randn(B, H, s_kv, HD, seed=2), randn(B, H, s_kv, HD)
    allowed = random_bool_mask((B, 1, s, s_kv), seed=3)
    allowed[1, :, 2] = False
    mask = (
        allowed
        if kind == "bool"
        else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    )
    assert torch.isnan(naive_sdpa(q, k, v, mask)[1, :, 2]).all()  # the kernel underneath
    out = scaled_dot_product_attention(q, k, v, mask)
    assert torch.equal(out[1, :, 2], torch.zeros(H, HD))
    bias = np.where(to_numpy(allowed), 0.0, -np.inf)
    assert_close(out, np_attention(to_numpy(q), to_numpy(k), to_numpy(v), bias), atol=1e-6)
    # and through MultiHeadAttention, with and without a score bias
    for pos in (None, "alibi"):
        mha = make_mha(pos)
        padding = trailing_padding(2, 5, (0, 5))
        with torch.no_grad():
            y = mha(randn(2, 5, D), key_padding_mask=padding)
        assert torch.equal(y[1], mha.out_proj.bias.expand(5, D))


# --- MultiHeadAttention vs nn.MultiheadAttention ------------------------------------------------


def torch_mha_from(mha: MultiHeadAttention, kv_dim: int = D) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(
        D, H, batch_first=True, bias=True, kdim=kv_dim, vdim=kv_dim, dropout=0.0
    )
    with torch.no_grad():
        if kv_dim == D:  # packed in_proj: rows [q; k; v]
            ref.in_proj_weight.copy_(
                torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight])
            )
        else:
            ref.q_proj_weight.copy_(mha.q_proj.weight)
            ref.k_proj_weight.copy_(mha.k_proj.weight)
            ref.v_proj_weight.copy_(mha.v_proj.weight)
        ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
        ref.out_proj.weight.copy_(mha.out_proj.weight)
        ref.out_proj.bias.copy_(mha.out_proj.bias)
    return ref.eval()


TORCH_MHA_CASES = {
    "self": ({}, 6, None, None),
    "self-padding": ({}, 6, None, (0, 2)),
    "causal": ({"causal": True}, 6, None, None),
    "causal-padding": ({"causal": True}, 7, None, (3, 1)),
    "self-s1": ({"causal": True}, 1, None, None),
    "cross-same-width": ({"cross_attention": True}, 5, (9, D), (0, 4)),
    "cross-kdim48": ({"cross_attention": True, "kv_dim": 48}, 4, (3, 48), (1, 0)),
}


@pytest.mark.parametrize(
    ("config", "s", "ctx", "pads"), TORCH_MHA_CASES.values(), ids=TORCH_MHA_CASES.keys()
)
def test_mha_matches_torch_multihead_attention(config, s, ctx, pads):
    mha = make_mha(**config)
    ref = torch_mha_from(mha, config.get("kv_dim", D))
    x = randn(B, s, D, seed=1)
    context = None if ctx is None else randn(B, *ctx, seed=2)
    src = x if context is None else context
    padding = None if pads is None else trailing_padding(B, src.shape[1], pads)
    causal_block = None
    if config.get("causal"):  # torch: True = blocked, the strict upper triangle
        causal_block = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        expected, _ = ref(
            x, src, src, key_padding_mask=padding, attn_mask=causal_block, need_weights=False
        )
        got = mha(x, context, key_padding_mask=padding)
    assert_close(got, expected, atol=1e-5)


# --- grouped-query attention vs multi-head attention with repeated kv heads ----------------------


def repeat_kv_rows(linear: nn.Linear, h_kv: int, n_rep: int, out: nn.Linear) -> None:
    """Copy a [h_kv*h_d, in] projection into [h*h_d, in], kv head g repeated for heads
    g*n_rep .. g*n_rep + n_rep - 1."""
    w = linear.weight.unflatten(0, (h_kv, HD))  # [h_kv, h_d, in]
    out.weight.copy_(w.repeat_interleave(n_rep, dim=0).flatten(0, 1))
    out.bias.copy_(linear.bias.unflatten(0, (h_kv, HD)).repeat_interleave(n_rep, 0).flatten())


@pytest.mark.parametrize("h_kv", [2, 1], ids=["gqa2", "mqa1"])
@pytest.mark.parametrize(
    "config",
    [{}, {"causal": True, "pos": "rope"}, {"causal": True, "window": 3, "pos": "alibi"}],
    ids=["plain", "causal-rope", "window-alibi"],
)
def test_gqa_matches_mha_with_repeated_kv_heads(h_kv, config):
    gqa = make_mha(num_kv_heads=h_kv, **config)
    mha = make_mha(**config)
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        repeat_kv_rows(gqa.k_proj, h_kv, H // h_kv, mha.k_proj)
        repeat_kv_rows(gqa.v_proj, h_kv, H // h_kv, mha.v_proj)
    x = randn(B, 6, D)
    padding = trailing_padding(B, 6, (0, 2))
    with torch.no_grad():
        assert_close(gqa(x, key_padding_mask=padding), mha(x, key_padding_mask=padding))
    assert gqa.k_proj.weight.shape == (h_kv * HD, D)


# --- the independent numpy reference, every positional encoding --------------------------------

NUMPY_CASES = {
    "plain": (None, {}),
    "causal": (None, {"causal": True}),
    "rope-gqa": ("rope", {"causal": True, "num_kv_heads": 2}),
    "alibi-causal": ("alibi", {"causal": True}),
    "alibi-bidirectional": ("alibi", {}),
    "t5-bidirectional": ("t5", {}),
    "t5-causal": ("t5", {"causal": True}),
    "shaw": ("shaw", {}),
    "shaw-causal-mqa": ("shaw", {"causal": True, "num_kv_heads": 1}),
    "xl-causal": ("xl", {"causal": True}),
    "window-bidirectional": (None, {"window": 2}),
    "window-causal-rope": ("rope", {"causal": True, "window": 3}),
}


@pytest.mark.parametrize(("pos", "config"), NUMPY_CASES.values(), ids=NUMPY_CASES.keys())
def test_mha_matches_numpy_reference(pos, config):
    mha = make_mha(pos, **config)
    x = randn(B, 7, D)
    padding = trailing_padding(B, 7, (0, 3))
    with torch.no_grad():
        got = mha(x, key_padding_mask=padding)
    expected, _, _ = np_mha(mha, x, key_padding_mask=padding)
    assert_close(got, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("pos", "config"),
    [
        NUMPY_CASES[k]
        for k in (
            "rope-gqa",
            "alibi-causal",
            "t5-causal",
            "shaw",
            "xl-causal",
            "window-causal-rope",
        )
    ],
    ids=["rope-gqa", "alibi-causal", "t5-causal", "shaw", "xl-causal", "window-causal-rope"],
)
def test_mha_with_past_matches_numpy_reference(pos, config):
    """q_len < kv_len: queries sit at p..p+s-1 (bottom-right) for masks and every encoding."""
    mha = make_mha(pos, **config)
    h_kv = mha.num_kv_heads
    x, pk, pv = randn(B, 3, D), randn(B, h_kv, 4, HD, seed=8), randn(B, h_kv, 4, HD, seed=9)
    with torch.no_grad():
        got, key, value = mha(x, past_key=pk, past_value=pv)
    expected, exp_key, exp_value = np_mha(mha, x, past_key=pk, past_value=pv)
    assert_close(got, expected, atol=1e-5)
    assert_close(key, exp_key, atol=1e-5)
    assert_close(value, exp_value, atol=1e-5)


# --- sliding window vs an explicit band mask ----------------------------------------------------


def band_mask(s: int, window: int, causal: bool) -> torch.Tensor:
    """bool [s, s], True = attend, written out element by element."""
    return torch.tensor(
        [[abs(i - j) < window and (j <= i or not causal) for j in range(s)] for i in range(s)]
    )


@pytest.mark.parametrize(
    ("window", "causal"),
    [(1, True), (3, True), (3, False), (20, True), (1, False)],
    ids=["w1-causal", "w3-causal", "w3-bidirectional", "w20-wider-than-seq", "w1-bidirectional"],
)
def test_sliding_window_equals_sdpa_with_band_mask(window, causal):
    s = 8
    mha = make_mha(causal=causal, window=window)
    x = randn(B, s, D)
    with torch.no_grad():
        q = mha.q_proj(x).unflatten(-1, (H, HD)).transpose(1, 2)
        k = mha.k_proj(x).unflatten(-1, (H, HD)).transpose(1, 2)
        v = mha.v_proj(x).unflatten(-1, (H, HD)).transpose(1, 2)
        mask = band_mask(s, window, causal)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        expected = mha.out_proj(ref.transpose(1, 2).flatten(2))
        got = mha(x)
    assert_close(got, expected, atol=1e-6)
    if window < s:  # the window changed something compared with no window at all
        plain = make_mha(causal=causal)
        with torch.no_grad():
            assert not torch.allclose(plain(x), got, atol=1e-4)


# --- bottom-right causal alignment --------------------------------------------------------------


def test_causal_with_past_is_bottom_right_aligned():
    mha = make_mha(causal=True)
    p, s = 5, 3
    x, pk, pv = randn(B, s, D), randn(B, H, p, HD, seed=8), randn(B, H, p, HD, seed=9)
    with torch.no_grad():
        got, key, value = mha(x, past_key=pk, past_value=pv)
        q = mha.q_proj(x).unflatten(-1, (H, HD)).transpose(1, 2)

    def attend(mask):
        out = np_attention(to_numpy(q), to_numpy(key), to_numpy(value), mask)
        b, h, s_, hd = out.shape
        return out.transpose(0, 2, 1, 3).reshape(b, s_, h * hd) @ to_numpy(
            mha.out_proj.weight
        ).T + to_numpy(mha.out_proj.bias)

    # query i may see keys 0 .. p + i: np.tril with offset kv_len - q_len
    bottom_right = np.where(np.tril(np.ones((s, p + s)), k=p) > 0, 0.0, -np.inf)
    top_left = np.where(np.tril(np.ones((s, p + s)), k=0) > 0, 0.0, -np.inf)
    assert_close(got, attend(bottom_right), atol=1e-5)
    assert not np.allclose(to_numpy(got), attend(top_left), atol=1e-3)
    # torch's is_causal=True is top-left aligned when q_len != kv_len: we differ from it
    with torch.no_grad():
        torch_top_left = F.scaled_dot_product_attention(q, key, value, is_causal=True)
    assert_close(
        mha.out_proj(torch_top_left.transpose(1, 2).flatten(2)), attend(top_left), atol=1e-5
    )


# --- fully masked rows in MultiHeadAttention ----------------------------------------------------


@pytest.mark.parametrize(
    ("pos", "config"),
    [
        (None, {}),
        (None, {"causal": True, "window": 2}),
        ("rope", {"num_kv_heads": 2}),
        ("alibi", {"causal": True}),
        ("t5", {}),
        ("shaw", {}),
        ("xl", {"causal": True}),
    ],
    ids=["plain", "causal-window", "rope-gqa", "alibi", "t5", "shaw", "xl"],
)
def test_mha_fully_padded_row_outputs_out_proj_bias(pos, config):
    mha = make_mha(pos, **config)
    x = randn(3, 5, D)
    padding = trailing_padding(3, 5, (0, 5, 2))  # batch row 1: every key padded
    with torch.no_grad():
        y = mha(x, key_padding_mask=padding)
    assert torch.equal(y[1], mha.out_proj.bias.expand(5, D))
    assert torch.isfinite(y).all()
    expected, _, _ = np_mha(mha, x, key_padding_mask=padding)
    assert_close(y, expected, atol=1e-5)


# --- long sequences -----------------------------------------------------------------------------


@pytest.mark.parametrize("pos", ["rope", "alibi", "t5"])
def test_mha_long_sequence(pos):
    """600 positions: no table limit; checked against numpy on a sample of queries."""
    mha = make_mha(pos, causal=True, heads=2)
    x = randn(1, LONG, 2 * HD)
    with torch.no_grad():
        y = mha(x)
    assert y.shape == (1, LONG, 2 * HD) and torch.isfinite(y).all()
    expected, _, _ = np_mha(mha, x)
    assert_close(y[:, -50:], expected[:, -50:], atol=2e-5)
