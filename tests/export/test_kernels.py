"""attnx::attention lowered to onnxruntime's kernels: every configuration the model routes to
the kernel passes parity in the fused variant at shapes beyond the window and with padded,
half-padded and fully padded rows, and the census shows the kernel and no s x s tensor."""

import dataclasses

import numpy as np

import pytest
import torch

from export import run_pipeline, spec_from_module
from export.rewrites.kernels import attention as lowering
from models import (
    ALiBiBias,
    MultiHeadAttention,
    RotaryEmbedding,
    T5RelativeBias,
    TransformerXLRelativeBias,
)
from models._encodings import rotary_kernel
from models._kernels import attention, ort_kernels

D, H = 32, 4


class Padded(torch.nn.Module):
    def __init__(self, mha: MultiHeadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x, key_padding_mask):
        return self.mha(x, key_padding_mask=key_padding_mask)


def _padding(batch: int, seq: int) -> torch.Tensor:
    """Row r pads its last 0, seq // 2 or seq keys, or (r = 3) its first seq // 2 keys."""
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for r in range(batch):
        if r % 4 == 3:
            mask[r, : seq // 2] = True
        else:
            mask[r, seq - (0, seq // 2, seq)[r % 4] :] = True
    return mask


CONFIGS = {
    "causal-padding-gqa-rope": (
        dict(num_kv_heads=2, causal=True, pos_embeddings=RotaryEmbedding(head_dim=D // H)),
        "GroupQueryAttention",
    ),
    "causal-window-padding": (dict(causal=True, window=5), "GroupQueryAttention"),
    "causal-alibi-mqa-padding": (
        dict(num_kv_heads=1, causal=True, pos_embeddings=ALiBiBias(num_heads=H)),
        "GroupQueryAttention",
    ),
    "bidirectional-gqa-padding": (dict(num_kv_heads=2), "MultiHeadAttention"),
    "bidirectional-t5-bias-padding": (
        dict(pos_embeddings=T5RelativeBias(num_heads=H, num_buckets=8, max_distance=12)),
        "MultiHeadAttention",
    ),
    "bidirectional-alibi-gqa-padding": (
        dict(num_kv_heads=2, pos_embeddings=ALiBiBias(num_heads=H)),
        "MultiHeadAttention",
    ),
    "causal-t5-bias-padding": (
        dict(causal=True, pos_embeddings=T5RelativeBias(num_heads=H, bidirectional=False)),
        "GroupQueryAttention",
    ),
    "causal-xl-bias-gqa-padding": (
        dict(
            num_kv_heads=2,
            causal=True,
            pos_embeddings=TransformerXLRelativeBias(num_heads=H, head_dim=D // H),
        ),
        "GroupQueryAttention",
    ),
}


XL = TransformerXLRelativeBias
BIAS_INPUT = {"GroupQueryAttention": 10, "MultiHeadAttention": 5}  # attention_bias's index


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_kernel_matches_torch_beyond_the_window_and_with_padded_rows(name):
    config, kernel = CONFIGS[name]
    torch.manual_seed(0)
    module = Padded(MultiHeadAttention(embed_dim=D, num_heads=H, **config))
    x = torch.randn(2, 7, D)
    spec = spec_from_module(
        module,
        {"x": x, "key_padding_mask": _padding(2, 7)},
        dynamic={
            "x": {0: ("batch", 1, 4), 1: ("seq", 1, 24)},
            "key_padding_mask": {0: "batch", 1: "seq"},
        },
        name=name,
    )
    spec = dataclasses.replace(spec, make_inputs=_inputs)
    result = run_pipeline(
        spec, out=None, grid=[{"batch": 4, "seq": 24}, {"batch": 4, "seq": 1}], variants=("fused",)
    )
    assert "fused" in result.variants, result.status.dropped
    records = [r for r in result.records if r.variant == "fused"]
    assert len(records) == 2 and all(r.passed for r in records)
    census = [n.op_type for n in result.variants["fused"].model.graph.node]
    assert census.count(kernel) == 1
    assert "Softmax" not in census and "MatMul" in census
    rope = isinstance(config.get("pos_embeddings"), RotaryEmbedding)
    assert census.count("RotaryEmbedding") == (2 if rope else 0)  # q and k
    assert not rope or "Neg" not in census  # no rotate-half left beside the kernel
    node = next(n for n in result.variants["fused"].model.graph.node if n.op_type == kernel)
    bias_at = BIAS_INPUT[kernel]
    has_bias = isinstance(config.get("pos_embeddings"), (ALiBiBias, T5RelativeBias, XL))
    assert (len(node.input) > bias_at and bool(node.input[bias_at])) == has_bias


def _inputs(point, seed=0):
    gen = torch.Generator().manual_seed(seed + point["batch"] * 100 + point["seq"])
    return {
        "x": torch.randn(point["batch"], point["seq"], D, generator=gen),
        "key_padding_mask": _padding(point["batch"], point["seq"]),
    }


def test_the_kernel_op_is_what_export_sees_and_eager_is_unchanged():
    q, k, v = (torch.randn(3, 5, H, 8) for _ in range(3))
    pad = _padding(3, 5)
    eager = attention(q, k, v, key_padding_mask=pad, causal=True)
    with ort_kernels() as route:
        inside = attention(q, k, v, key_padding_mask=pad, causal=True)
    assert route.calls == 1
    torch.testing.assert_close(inside, eager)
    assert torch.all(eager[2] == 0)  # every key padded: zeros
    assert torch.all(eager[:2].abs().sum(-1) > 0)  # every query row has a key


class Shape:
    """Stands in for an exporter tensor: the lowerings read only .shape before emitting ops."""

    def __init__(self, shape):
        self.shape = shape


def test_lowering_refuses_dynamic_heads_and_a_bidirectional_window():
    with pytest.raises(ValueError, match=r"needs static head counts and head size"):
        lowering(Shape(("b", "s", "h", 8)), Shape(("b", "s", 2, 8)), None)
    with pytest.raises(ValueError, match=r"lowers a window only when causal"):
        lowering(Shape(("b", "s", 4, 8)), Shape(("b", "s", 4, 8)), None, window=3)


class Scaled(Padded):
    """Padded attention whose input is scaled, so that the scores spread over tens of units."""

    def forward(self, x, key_padding_mask):
        return self.mha(x * SCORE_SCALE, key_padding_mask=key_padding_mask)


SCORE_SCALE = 6.0


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_padded_keys_get_no_weight_next_to_scores_of_tens(causal):
    # A padded key's scaled score is -60 (export/rewrites/kernels.py): its weight must stay
    # invisible where the unpadded scores of a row reach +-20 and more, left padding included.
    torch.manual_seed(0)
    module = Scaled(MultiHeadAttention(embed_dim=D, num_heads=H, causal=causal))
    point = {"batch": 4, "seq": 24}
    x = _inputs(point)["x"]  # the grid point's own input
    with torch.no_grad():
        q = module.mha.q_proj(x * SCORE_SCALE).view(4, 24, H, D // H)
        k = module.mha.k_proj(x * SCORE_SCALE).view(4, 24, H, D // H)
    scores = torch.einsum("bshd,bthd->bhst", q, k) / (D // H) ** 0.5
    assert scores.abs().max() > 20
    spec = spec_from_module(
        module,
        {"x": x[:2, :7], "key_padding_mask": _padding(2, 7)},
        dynamic={
            "x": {0: ("batch", 1, 4), 1: ("seq", 1, 24)},
            "key_padding_mask": {0: "batch", 1: "seq"},
        },
        name="scaled",
    )
    spec = dataclasses.replace(spec, make_inputs=_inputs)
    result = run_pipeline(spec, out=None, grid=[point], variants=("fused",))
    assert "fused" in result.variants, result.status.dropped
    assert all(r.passed for r in result.records if r.variant == "fused")


class RotatedAfterPast(torch.nn.Module):
    """RoPE alone, its positions starting at the past's length, in either layout."""

    def __init__(self, seq_dim: int) -> None:
        super().__init__()
        self.rope = RotaryEmbedding(head_dim=8)
        self.seq_dim = seq_dim

    def forward(self, x, past):
        return self.rope(x, past.shape[2], seq_dim=self.seq_dim)


@pytest.mark.parametrize("seq_dim", [1, 2], ids=["b-s-h-hd", "b-h-s-hd"])
def test_rotary_becomes_onnxruntimes_kernel_and_matches_the_closed_form(seq_dim):
    module = RotatedAfterPast(seq_dim)
    shape = (2, 5, H, 8) if seq_dim == 1 else (2, H, 5, 8)
    x_dims = {0: ("batch", 1, 4), seq_dim: ("seq", 1, 40)}
    spec = spec_from_module(
        module,
        {"x": torch.randn(*shape), "past": torch.zeros(2, H, 3, 8)},
        dynamic={"x": x_dims, "past": {0: "batch", 2: ("past", 0, 40)}},
        name=f"rope-{seq_dim}",
    )
    grid = [{"batch": 3, "seq": 40, "past": 40}, {"batch": 1, "seq": 1, "past": 0}]
    result = run_pipeline(spec, out=None, grid=grid, variants=("fused",))
    assert "fused" in result.variants, result.status.dropped
    assert all(r.passed for r in result.records if r.variant == "fused")
    census = [(n.domain, n.op_type) for n in result.variants["fused"].model.graph.node]
    assert census.count(("com.microsoft", "RotaryEmbedding")) == 1
    assert ("", "Neg") not in census and ("", "Concat") not in census
    # Eager against the closed form: pair (i, i + h_d/2) of position p turns by p * base^(-2i/h_d).
    x = torch.randn(*shape)
    y = module(x, torch.zeros(1, H, 7, 8)).numpy()
    pos = np.arange(7, 12)[:, None] * 10000.0 ** (-np.arange(0, 8, 2) / 8)  # [s, h_d/2]
    cos, sin = np.cos(pos), np.sin(pos)
    if seq_dim == 1:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x[..., :4].numpy(), x[..., 4:].numpy()
    np.testing.assert_allclose(y, np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1),
                               atol=1e-5)


def test_rope_of_attention_reaches_the_kernel_in_the_fused_graph():
    torch.manual_seed(0)
    config, _ = CONFIGS["causal-padding-gqa-rope"]
    module = Padded(MultiHeadAttention(embed_dim=D, num_heads=H, **config))
    with ort_kernels() as route:
        module(torch.randn(2, 7, D), _padding(2, 7))
    assert route.calls == 3  # the attention core and the rotations of q and k


class RotatedPerRow(torch.nn.Module):
    """RoPE at positions given per batch row (as transformers passes position_ids)."""

    def __init__(self, seq_dim: int) -> None:
        super().__init__()
        self.inv_freq = 10000.0 ** (-torch.arange(0, 8, 2) / 8)  # [h_d/2]
        self.seq_dim = seq_dim

    def forward(self, x, positions):
        angles = positions[..., None].float() * self.inv_freq  # [b, s, h_d/2]
        return rotary_kernel(x, angles.cos(), angles.sin(), self.seq_dim)


def _per_row_inputs(seq_dim):
    def make(point, seed=0):
        b, s = point["batch"], point["seq"]
        gen = torch.Generator().manual_seed(seed + 100 * b + s)
        shape = (b, s, H, 8) if seq_dim == 1 else (b, H, s, 8)
        starts = torch.arange(b)[:, None] * 3  # row r starts at position 3r
        return {"x": torch.randn(*shape, generator=gen), "positions": starts + torch.arange(s)}

    return make


@pytest.mark.parametrize("seq_dim", [1, 2], ids=["b-s-h-hd", "b-h-s-hd"])
def test_rotary_with_positions_per_row_matches_the_closed_form(seq_dim):
    module, make = RotatedPerRow(seq_dim), _per_row_inputs(seq_dim)
    spec = spec_from_module(
        module,
        make({"batch": 2, "seq": 5}),
        dynamic={"x": {0: ("batch", 1, 4), seq_dim: ("seq", 1, 30)},
                 "positions": {0: "batch", 1: "seq"}},
        name=f"rope-rows-{seq_dim}",
    )
    spec = dataclasses.replace(spec, make_inputs=make)
    grid = [{"batch": 4, "seq": 30}, {"batch": 1, "seq": 1}]
    result = run_pipeline(spec, out=None, grid=grid, variants=("fused",))
    assert "fused" in result.variants, result.status.dropped
    assert all(r.passed for r in result.records if r.variant == "fused")
    census = [n.op_type for n in result.variants["fused"].model.graph.node]
    assert census.count("RotaryEmbedding") == 1
    feed = make({"batch": 3, "seq": 6})
    pos = feed["positions"].numpy()[..., None] * 10000.0 ** (-np.arange(0, 8, 2) / 8)
    cos, sin = np.cos(pos), np.sin(pos)  # [b, s, h_d/2]
    cos, sin = ((t[:, :, None] if seq_dim == 1 else t[:, None]) for t in (cos, sin))
    x = feed["x"].numpy()
    x1, x2 = x[..., :4], x[..., 4:]
    want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    np.testing.assert_allclose(module(**feed).numpy(), want, atol=1e-5)
