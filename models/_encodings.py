"""Positional encodings.

Shape legend for the whole package: b batch, s query length, s_kv key/value length,
p past (cached) length, d model dim, h query heads, h_kv key/value heads, h_d head dim.

Every table that depends on a position is computed in the graph from positions (or kept as a
non-persistent buffer of per-frequency constants), so no export bakes in the example length.
Positions of queries are absolute: query i sits at ``offset + i`` where ``offset`` is the past
length; keys sit at 0..s_kv-1. With ``offset = s_kv - s`` this is the bottom-right alignment
that ONNX Attention and cached decoding use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models._native import kernel_route, native

__all__ = [
    "ALiBiBias",
    "LearnedPositionalEncoding",
    "RotaryEmbedding",
    "ShawRelativePosition",
    "SinusoidalPositionalEncoding",
    "T5RelativeBias",
    "TransformerXLRelativeBias",
    "alibi_slopes",
    "relative_distances",
    "t5_bucket",
]


def relative_distances(s: int, s_kv: int, device=None) -> torch.Tensor:
    """Key position minus query position, bottom-right aligned.

    Returns:
        torch.Tensor: int64 tensor with shape [s, s_kv], entry (i, j) = j - (i + s_kv - s).
    """
    q_pos = torch.arange(s, device=device) + (s_kv - s)  # [s]
    k_pos = torch.arange(s_kv, device=device)  # [s_kv]
    return k_pos[None, :] - q_pos[:, None]  # [s, s_kv]


def skew_distances(s: int, s_kv: int, device=None) -> torch.Tensor:
    """The s + s_kv - 1 relative distances j - (p + i) a query block meets, plus one spare, in
    the column order that :func:`skew` and :func:`unskew` use: column m is distance
    m - (s_kv - 1). The spare last column sets the row stride of the skew, so that neither
    direction pads the s x s tensor."""
    return torch.arange(s + s_kv, device=device) - (s_kv - 1)


def skew(per_distance: torch.Tensor, s_kv: int) -> torch.Tensor:
    """[..., s, s + s_kv] (a value per query and relative distance, columns as in
    :func:`skew_distances`; the spare last column is never read) -> [..., s, s_kv] (the value
    per query and key).

    Entry (i, j) is column j + s - 1 - i of row i. Transformer-XL's relative shift: reading the
    rows of width w + 1 with a stride of w moves each row one column left, so a relative term
    costs one matmul against the distances and two slices, rather than an [s, s_kv, h_d] table.
    """
    s, width = per_distance.shape[-2], per_distance.shape[-1] - 1
    flat = per_distance.flatten(-2)  # rows of width + 1
    flat = flat[..., s - 1 : s - 1 + s * width]  # row i now starts at its column s - 1 - i
    return flat.unflatten(-1, (s, width))[..., :s_kv]


def unskew(per_key: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`skew`: [..., s, s_kv] -> [..., s, s + s_kv], zeros elsewhere (the spare
    column included)."""
    s, s_kv = per_key.shape[-2], per_key.shape[-1]
    width = s + s_kv
    # Shift every row right by s - 1 and add a zero row, then read with a stride one wider: row
    # i moves i more columns right. One pad and one slice; the spill lands in zeros.
    flat = F.pad(per_key, (s - 1, 0, 0, 1)).flatten(-2)  # [..., (s + 1) * (width - 1)]
    return flat[..., : s * width].unflatten(-1, (s, width))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} ({value}) must be positive")


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoidal absolute encoding (Vaswani et al. 2017), added to the input.

    PE[pos, 2i] = sin(pos / base^(2i/d)), PE[pos, 2i+1] = cos(pos / base^(2i/d)).
    Computed from positions in the graph, so it works at any length.
    """

    def __init__(self, *, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        _check_positive(dim=dim)
        if dim % 2:
            raise ValueError(f"dim ({dim}) must be even for sinusoidal encodings")
        self.dim = dim
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [d/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def table(self, s: int, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """Returns the encoding rows for positions offset..offset+s-1, shape [s, d]."""
        pos = torch.arange(s, device=self.inv_freq.device, dtype=torch.float32) + offset  # [s]
        angles = pos[:, None] * self.inv_freq[None, :]  # [s, d/2]
        # Interleave sin/cos so that column 2i is sin and 2i+1 is cos.
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)  # [s, d]

    def forward(self, x: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """x: [b, s, d] -> [b, s, d]."""
        return x + self.table(x.shape[1], offset).to(x.dtype)


class LearnedPositionalEncoding(nn.Module):
    """Learned absolute positions (BERT/GPT-2), an embedding of ``max_len`` rows added to x.

    A learned table has no rows beyond ``max_len``: longer inputs raise a ValueError naming it,
    and exports declare ``max_len`` as the sequence maximum so the runtime refuses them too.
    """

    def __init__(self, *, dim: int, max_len: int) -> None:
        super().__init__()
        _check_positive(dim=dim, max_len=max_len)
        self.max_len = max_len
        self.embedding = nn.Embedding(max_len, dim)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: [b, s, d] -> [b, s, d]."""
        s = x.shape[1]
        if not isinstance(offset, torch.Tensor) and s + offset > self.max_len:
            raise ValueError(
                f"positions up to {s + offset} exceed the learned table's max_len ({self.max_len})"
            )
        pos = torch.arange(s, device=x.device) + offset  # [s]
        return x + self.embedding(pos)[None].to(x.dtype)  # [b, s, d]


class _ScoreBias(nn.Module):
    """A positional encoding that adds a term to the attention scores.

    Subclasses implement ``score_bias(q, k)``, returning a bias broadcastable to
    [b, h, s, s_kv]; encodings with a value term (Shaw) also implement ``value_term``.
    """

    has_value_term = False

    def score_bias(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value_term(self, probs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def alibi_slopes(num_heads: int) -> list[float]:
    """Per-head ALiBi slopes (Press et al. 2022).

    For a power of two n, slope_i = 2^(-8 i / n), i = 1..n. Otherwise take the slopes of the
    closest lower power of two m, then every other slope of the 2m sequence, as the paper's
    reference code does.
    """
    _check_positive(num_heads=num_heads)

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    if num_heads & (num_heads - 1) == 0:
        return power_of_two(num_heads)
    m = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(m) + power_of_two(2 * m)[0::2][: num_heads - m]


class ALiBiBias(_ScoreBias):
    """ALiBi: bias -slope_h * |i - j| on the scores of head h (Press et al. 2022).

    The paper defines it for causal attention, where |i - j| = i - j; the absolute distance
    extends it symmetrically to bidirectional attention.
    """

    def __init__(self, *, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32)  # [h]
        self.register_buffer("slopes", slopes, persistent=False)

    def score_bias(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q: [b, h, s, h_d], k: [b, h_kv, s_kv, h_d] -> bias [1, h, s, s_kv]."""
        dist = relative_distances(q.shape[2], k.shape[2], q.device).abs().to(q.dtype)  # [s, s_kv]
        return -self.slopes.to(q.dtype)[None, :, None, None] * dist[None, None]  # [1, h, s, s_kv]


def t5_bucket(
    distance: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5 relative position buckets for ``distance = key_pos - query_pos``.

    Half the buckets (of the half per direction when bidirectional) hold exact distances
    0..max_exact-1; the rest are log-spaced up to ``max_distance``, beyond which all distances
    share the last bucket. Causal mode maps future keys (distance > 0) to bucket 0.
    """
    buckets = torch.zeros_like(distance)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (distance > 0).to(distance.dtype) * num_buckets
        n = distance.abs()
    else:
        n = (-distance).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # clamp(min=1) keeps log() finite for n == 0; those entries take the exact branch anyway.
    scaled = torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).to(distance.dtype)
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


class T5RelativeBias(_ScoreBias):
    """T5 bucketed relative position bias (Raffel et al. 2020): one learned scalar per bucket
    and head, added to the scores. Distances beyond ``max_distance`` share the last bucket, so
    any length works."""

    def __init__(
        self,
        *,
        num_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
    ) -> None:
        super().__init__()
        _check_positive(num_heads=num_heads, num_buckets=num_buckets, max_distance=max_distance)
        min_buckets = 4 if bidirectional else 2
        if num_buckets < min_buckets:
            raise ValueError(
                f"num_buckets ({num_buckets}) must be at least {min_buckets} "
                f"(bidirectional={bidirectional})"
            )
        max_exact = num_buckets // (4 if bidirectional else 2)
        if max_distance <= max_exact:
            raise ValueError(
                f"max_distance ({max_distance}) must exceed the exact range ({max_exact})"
            )
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def score_bias(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q: [b, h, s, h_d], k: [b, h_kv, s_kv, h_d] -> bias [1, h, s, s_kv]."""
        s, s_kv = q.shape[2], k.shape[2]
        # The bias depends on the distance alone: bucket the s + s_kv distances, not the s x s
        # pairs, then gather each pair's row of per-distance values.
        bucket = t5_bucket(
            skew_distances(s, s_kv, q.device),
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )  # [s + s_kv]
        per_distance = self.embedding(bucket)  # [s + s_kv, h]
        column = relative_distances(s, s_kv, q.device) + (s_kv - 1)  # [s, s_kv], skew order
        values = F.embedding(column, per_distance)  # [s, s_kv, h]
        return values.permute(2, 0, 1)[None].to(q.dtype)  # [1, h, s, s_kv]


class ShawRelativePosition(_ScoreBias):
    """Relative position representations (Shaw et al. 2018).

    Distances are clipped to [-k, k] and shifted by k before the lookup, so the 2k+1 learned
    rows cover every distance (the widely copied sketch feeds negative distances straight into
    the embedding). Scores get q_i . a^K_ij / sqrt(h_d); outputs get sum_j alpha_ij a^V_ij.
    """

    has_value_term = True

    def __init__(self, *, head_dim: int, max_distance: int) -> None:
        super().__init__()
        _check_positive(head_dim=head_dim, max_distance=max_distance)
        self.max_distance = max_distance
        self.key_table = nn.Embedding(2 * max_distance + 1, head_dim)
        self.value_table = nn.Embedding(2 * max_distance + 1, head_dim)

    def index(self, s: int, s_kv: int, device=None) -> torch.Tensor:
        """Clipped, shifted distance ids [s, s_kv] in 0..2k: the row each (query, key) uses."""
        dist = relative_distances(s, s_kv, device)  # [s, s_kv]
        return dist.clamp(-self.max_distance, self.max_distance) + self.max_distance

    def _rows(self, table: nn.Embedding, s: int, s_kv: int, device) -> torch.Tensor:
        """[s + s_kv, h_d]: the table row of each relative distance, in skew order."""
        dist = skew_distances(s, s_kv, device).clamp(-self.max_distance, self.max_distance)
        return table(dist + self.max_distance)

    def score_bias(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q: [b, h, s, h_d], k: [b, h_kv, s_kv, h_d] -> bias [b, h, s, s_kv] (scaled)."""
        s, s_kv = q.shape[2], k.shape[2]
        a_k = self._rows(self.key_table, s, s_kv, q.device).to(q.dtype)  # [s + s_kv, h_d]
        return skew(q @ a_k.T, s_kv) / math.sqrt(q.shape[-1])  # [b, h, s, s_kv]

    def value_term(self, probs: torch.Tensor) -> torch.Tensor:
        """probs: [b, h, s, s_kv] -> [b, h, s, h_d]."""
        s, s_kv = probs.shape[2], probs.shape[3]
        a_v = self._rows(self.value_table, s, s_kv, probs.device).to(probs.dtype)
        return unskew(probs) @ a_v  # [b, h, s, s + s_kv] @ [s + s_kv, h_d]


class TransformerXLRelativeBias(_ScoreBias):
    """Transformer-XL relative attention terms (Dai et al. 2019), as a score bias.

    Adds (b) q_i . W_R R_{i-j}, (c) u . k_j and (d) v . W_R R_{i-j} to the content score
    q_i . k_j, where R is the sinusoidal encoding of the distance i - j. R is computed in the
    graph, so any length works.
    """

    def __init__(self, *, num_heads: int, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        _check_positive(num_heads=num_heads, head_dim=head_dim)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.sinusoid = SinusoidalPositionalEncoding(dim=num_heads * head_dim, base=base)
        self.r_proj = nn.Linear(num_heads * head_dim, num_heads * head_dim, bias=False)
        self.u = nn.Parameter(torch.randn(num_heads, head_dim) * 0.02)
        self.v = nn.Parameter(torch.randn(num_heads, head_dim) * 0.02)

    def score_bias(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q: [b, h, s, h_d], k: [b, h, s_kv, h_d] -> bias [b, h, s, s_kv] (scaled)."""
        s, s_kv = q.shape[2], k.shape[2]
        dist = -skew_distances(s, s_kv, q.device).to(q.dtype)  # [s + s_kv], i - j
        angles = dist[:, None] * self.sinusoid.inv_freq.to(q.dtype)  # [s + s_kv, d/2]
        r = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)  # [s + s_kv, d]
        r = self.r_proj(r).unflatten(-1, (self.num_heads, self.head_dim))  # [L, h, h_d]
        position = skew((q + self.v[None, :, None]) @ r.permute(1, 2, 0), s_kv)  # [b, h, s, s_kv]
        content_bias = torch.einsum("hd,bhjd->bhj", self.u, k)[:, :, None, :]  # [b, h, 1, s_kv]
        return (position + content_bias) / math.sqrt(self.head_dim)


def _onnx_rotary(x: torch.Tensor, angles: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """ONNX RotaryEmbedding-23 (interleaved=0, "rotate half") of x with angles [s, h_d/2]:
    x [b, h, s, h_d] as its 4D input, x [b, s, h, h_d] as its 3D [b, s, h * h_d] input."""
    b = x.shape[0]
    cos = angles.cos().to(x.dtype).expand(b, -1, -1)  # [b, s, h_d/2]
    sin = angles.sin().to(x.dtype).expand(b, -1, -1)
    if seq_dim == 2:
        return torch.onnx.ops.rotary_embedding(x, cos, sin)
    heads = x.shape[2]
    flat = torch.onnx.ops.rotary_embedding(x.flatten(2), cos, sin, num_heads=heads)
    return flat.unflatten(-1, (heads, x.shape[3]))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """x [b, h, s, h_d] (seq_dim 2) or [b, s, h, h_d] (seq_dim 1) rotated "rotate half" by
    cos/sin of its positions: [s, h_d/2], or [b, s, h_d/2] where the rows' positions differ."""
    if seq_dim == 1:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [.., s, 1, h_d/2]: the heads after s
    elif cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # [b, 1, s, h_d/2]: the heads before s
    x1, x2 = x.chunk(2, dim=-1)  # [..., h_d/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@torch.library.custom_op("attnx::rotary", mutates_args=())
def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_dim: int) -> torch.Tensor:
    return _rotate(x, cos, sin, seq_dim)


@_rotary_op.register_fake
def _(x, cos, sin, seq_dim):
    return torch.empty_like(x)


def rotary_kernel(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_dim: int):
    """x rotated as ``_rotate`` does; inside ``models._kernels.ort_kernels()`` as the kernel op
    ``attnx::rotary`` (onnxruntime's RotaryEmbedding, export/rewrites/kernels.py)."""
    route = kernel_route()
    if route is None:
        return _rotate(x, cos, sin, seq_dim)
    route.calls += 1
    return torch.ops.attnx.rotary(x, cos, sin, seq_dim)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), "rotate half" layout (GPT-NeoX, Llama,
    ONNX RotaryEmbedding with interleaved=0).

    cos/sin are computed in the graph from positions ``offset..offset+s-1``, so cached decoding
    continues from the past length and any length works.
    """

    def __init__(self, *, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        _check_positive(head_dim=head_dim)
        if head_dim % 2:
            raise ValueError(f"head_dim ({head_dim}) must be even for rotary embeddings")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [h_d/2]

    def forward(
        self, x: torch.Tensor, offset: int | torch.Tensor = 0, *, seq_dim: int = 2
    ) -> torch.Tensor:
        """x: [b, h, s, h_d], or [b, s, h, h_d] with seq_dim=1 -> rotated x, same shape."""
        if seq_dim not in (1, 2):
            raise ValueError(
                f"seq_dim ({seq_dim}) must be 1 ([b, s, h, h_d]) or 2 ([b, h, s, h_d])"
            )
        s = x.shape[seq_dim]
        pos = torch.arange(s, device=x.device, dtype=torch.float32) + offset  # [s]
        angles = pos[:, None] * self.inv_freq[None, :]  # [s, h_d/2]
        if native():
            return _onnx_rotary(x, angles, seq_dim)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # [s, h_d/2]
        return rotary_kernel(x, cos, sin, seq_dim)
