"""Shared helpers for the models/ tests: one comparison, seeded tensors, numpy references.

Shape legend as in models/: b batch, s query length, s_kv key length, h heads, h_d head dim.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SEED = 1234


def to_numpy(x) -> np.ndarray:
    """A float64 (or the original integer/bool) numpy copy of a tensor, array or number."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.double() if x.is_floating_point() else x
        return x.numpy()
    arr = np.asarray(x)
    return arr.astype(np.float64) if np.issubdtype(arr.dtype, np.floating) else arr


def assert_close(actual, expected, *, atol: float = 1e-5, rtol: float = 1e-5, msg: str = ""):
    """The one comparison of this folder: equal shapes, no NaN/inf unless expected, and
    |actual - expected| <= atol + rtol * |expected| elementwise (computed in float64)."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{msg} shape {a.shape} != expected {e.shape}"
    if np.issubdtype(e.dtype, np.floating):
        assert np.array_equal(np.isfinite(a), np.isfinite(e)), f"{msg} non-finite mismatch"
    np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=msg)


def randn(*shape: int, seed: int = SEED) -> torch.Tensor:
    """Standard-normal float32 tensor from its own generator (independent of global state)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def build(factory, seed: int = SEED, **config):
    """factory(**config) with weights drawn after torch.manual_seed(seed), in eval mode.
    Biases and small parameters are re-drawn so that none is zero (a zero bias hides bugs)."""
    torch.manual_seed(seed)
    module = factory(**config)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" not in name:
                p.copy_(torch.randn_like(p) * 0.1)
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return module.eval()


# --- independent numpy references -------------------------------------------------------------


def np_softmax(scores: np.ndarray) -> np.ndarray:
    """Row softmax over the last axis; rows that are all -inf give zeros (the defined output)."""
    top = scores.max(axis=-1, keepdims=True)
    valid = np.isfinite(top)
    e = np.exp(scores - np.where(valid, top, 0.0))
    total = e.sum(axis=-1, keepdims=True)
    return np.where(valid, e / np.where(valid, total, 1.0), 0.0)


def np_linear(x: np.ndarray, linear: torch.nn.Linear) -> np.ndarray:
    w = to_numpy(linear.weight)
    b = 0.0 if linear.bias is None else to_numpy(linear.bias)
    return x @ w.T + b


def np_heads(x: np.ndarray, h: int) -> np.ndarray:
    """[b, s, h*h_d] -> [b, h, s, h_d]."""
    b, s, d = x.shape
    return x.reshape(b, s, h, d // h).transpose(0, 2, 1, 3)


def np_merge(x: np.ndarray) -> np.ndarray:
    """[b, h, s, h_d] -> [b, s, h*h_d]."""
    b, h, s, hd = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * hd)


def np_attention(q, k, v, bias=None) -> np.ndarray:
    """softmax(q k^T / sqrt(h_d) + bias) v with float64 arrays; bias may hold -inf."""
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    return np_softmax(scores) @ v


def np_sinusoid(positions: np.ndarray, dim: int, base: float = 10000.0) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / base^(2i/d)), PE[pos, 2i+1] = cos(pos / base^(2i/d)), float64,
    written element by element from Vaswani et al. section 3.5."""
    positions = np.asarray(positions, dtype=np.float64)
    out = np.zeros(positions.shape + (dim,))
    for i in range(dim // 2):
        angle = positions / base ** (2 * i / dim)
        out[..., 2 * i] = np.sin(angle)
        out[..., 2 * i + 1] = np.cos(angle)
    return out


def np_rope(x: np.ndarray, positions: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """Rotate-half RoPE on [..., s, h_d]: pair (t, t + h_d/2) is rotated by pos * base^(-2t/h_d)."""
    hd = x.shape[-1]
    half = hd // 2
    out = np.empty_like(x, dtype=np.float64)
    for t in range(half):
        angle = np.asarray(positions, dtype=np.float64) / base ** (2 * t / hd)  # [s]
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        a, b = x[..., t : t + 1], x[..., t + half : t + half + 1]
        out[..., t : t + 1] = a * c - b * s
        out[..., t + half : t + half + 1] = b * c + a * s
    return out


def paper_get_slopes(n: int) -> list[float]:
    """Transcribed from the ALiBi authors' reference code (ofirpress/attention_with_linear_biases,
    fairseq/models/transformer.py, get_slopes)."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (
        get_slopes_power_of_2(closest_power_of_2)
        + paper_get_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]
    )


def hf_relative_position_bucket(
    relative_position: int, bidirectional: bool, num_buckets: int, max_distance: int
) -> int:
    """Plain-python transcription of T5's `_relative_position_bucket` (Mesh TensorFlow,
    transformers/models/t5/modeling_t5.py), for one relative_position = key - query."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0) * num_buckets
        relative_position = abs(relative_position)
    else:
        relative_position = -min(relative_position, 0)
    max_exact = num_buckets // 2
    if relative_position < max_exact:
        return relative_buckets + relative_position
    large = max_exact + int(
        math.log(relative_position / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    )
    return relative_buckets + min(large, num_buckets - 1)


def np_xl_terms(q, k, w_r, u, v, num_heads) -> np.ndarray:
    """Dai et al. 2019 eq. in section 3.3, terms (b) + (c) + (d) for every head, divided by
    sqrt(h_d) like the content term (a): q [b, h, s, h_d], k [b, h, s_kv, h_d], W_R [d, d]."""
    b, h, s, hd = q.shape
    s_kv = k.shape[2]
    out = np.zeros((b, h, s, s_kv))
    for i in range(s):
        pos_i = i + s_kv - s
        for j in range(s_kv):
            r = np_sinusoid(np.array(pos_i - j), h * hd)  # R_{i-j}, [d]
            wr = (w_r @ r).reshape(h, hd)  # W_{k,R} R_{i-j}, per head
            for head in range(h):
                term_b = q[:, head, i] @ wr[head]
                term_c = k[:, head, j] @ u[head]
                term_d = v[head] @ wr[head]
                out[:, head, i, j] = (term_b + term_c + term_d) / math.sqrt(hd)
    return out


def np_mha(mha, x, *, context=None, key_padding_mask=None, past_key=None, past_value=None):
    """An independent float64 numpy multi-head attention, written from the papers.

    Reads only the module's configuration and parameters; every positional term is recomputed
    here: RoPE (rotate half), ALiBi (-slope_h |i - j|, the authors' slopes), T5 (the Mesh
    TensorFlow bucket function), Shaw (eq. 3-4, loops), Transformer-XL ((a) + (b) + (c) + (d)).
    Query i sits at position p + i (bottom-right alignment).

    Returns (y [b, s, d], present_key, present_value [b, h_kv, p + s, h_d]).
    """
    from models import (
        ALiBiBias,
        RotaryEmbedding,
        ShawRelativePosition,
        T5RelativeBias,
        TransformerXLRelativeBias,
    )

    h, h_kv = mha.num_heads, mha.num_kv_heads
    xn = to_numpy(x)
    src = xn if context is None else to_numpy(context)
    q = np_heads(np_linear(xn, mha.q_proj), h)  # [b, h, s, h_d]
    k = np_heads(np_linear(src, mha.k_proj), h_kv)  # [b, h_kv, s_src, h_d]
    v = np_heads(np_linear(src, mha.v_proj), h_kv)
    b, _, s, hd = q.shape
    p = 0 if past_key is None else past_key.shape[2]
    pos = mha.pos_embeddings
    if isinstance(pos, RotaryEmbedding):
        q = np_rope(q, np.arange(p, p + s))
        k = np_rope(k, np.arange(p, p + s))
    if past_key is not None:
        k = np.concatenate([to_numpy(past_key), k], axis=2)
        v = np.concatenate([to_numpy(past_value), v], axis=2)
    present = (k, v)
    s_kv = k.shape[2]
    k = np.repeat(k, h // h_kv, axis=1)  # head i reads kv head i // (h / h_kv)
    v = np.repeat(v, h // h_kv, axis=1)
    dist = np.arange(s_kv)[None, :] - (np.arange(s)[:, None] + s_kv - s)  # [s, s_kv], j - i
    allowed = np.ones((b, 1, s, s_kv), dtype=bool)
    if mha.causal:
        allowed &= dist <= 0
    if mha.window is not None:
        allowed &= np.abs(dist) < mha.window
    if key_padding_mask is not None:
        allowed &= ~to_numpy(key_padding_mask)[:, None, None, :]

    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(hd)  # (a), [b, h, s, s_kv]
    if isinstance(pos, ALiBiBias):
        slopes = np.array(paper_get_slopes(h))
        scores = scores - slopes[None, :, None, None] * np.abs(dist)[None, None]
    elif isinstance(pos, T5RelativeBias):
        table = to_numpy(pos.embedding.weight)  # [buckets, h]
        bucket = np.vectorize(
            lambda d: hf_relative_position_bucket(
                int(d), pos.bidirectional, pos.num_buckets, pos.max_distance
            )
        )(dist)
        scores = scores + table[bucket].transpose(2, 0, 1)[None]
    elif isinstance(pos, TransformerXLRelativeBias):
        scores = scores + np_xl_terms(
            q, k, to_numpy(pos.r_proj.weight), to_numpy(pos.u), to_numpy(pos.v), h
        )
    shaw = isinstance(pos, ShawRelativePosition)
    if shaw:
        a_k, a_v = to_numpy(pos.key_table.weight), to_numpy(pos.value_table.weight)
        kmax = pos.max_distance
        clip = np.clip(dist, -kmax, kmax) + kmax
        for i in range(s):  # eq. (4): e_ij = q_i (k_j + a^K_ij)^T / sqrt(d_z)
            for j in range(s_kv):
                scores[:, :, i, j] += q[:, :, i] @ a_k[clip[i, j]] / math.sqrt(hd)
    scores = np.where(allowed, scores, -np.inf)
    probs = np_softmax(scores)
    out = probs @ v
    if shaw:
        for i in range(s):  # eq. (3): z_i = sum_j alpha_ij (v_j + a^V_ij)
            for j in range(s_kv):
                out[:, :, i] += probs[:, :, i, j, None] * a_v[clip[i, j]]
    y = np_linear(np_merge(out), mha.out_proj)
    return y, present[0], present[1]
