"""The zoo: every registered entry builds deterministically and runs at two shape points, the
registry covers every block, and a guard fails when an entry is registered without a case here.
"""

from __future__ import annotations

import pytest
import torch

from models import (
    ALiBiBias,
    DecoderLayer,
    DecoderLM,
    Encoder,
    EncoderLayer,
    LearnedPositionalEncoding,
    MultiHeadAttention,
    RotaryEmbedding,
    ScaledDotProductAttention,
    ShawRelativePosition,
    SinusoidalPositionalEncoding,
    T5RelativeBias,
    TransformerXLRelativeBias,
    zoo,
)
from tests.models._helpers import assert_close

# A second point per entry, different from its example (2 batch, 7 seq, 5 kv_seq, 3 past):
# batch 1 and seq 1 somewhere, batch 3 (a fully padded row) elsewhere, lengths past the
# relative encodings' clipping distances, an empty past, the learned table's full length.
# Written out, not derived from zoo.names(): registering an entry without adding it here fails
# test_every_entry_is_covered.
SECOND_POINTS: dict[str, dict[str, int]] = {
    "sinusoidal_pe": {"batch": 1, "seq": 1},
    "learned_pe": {"batch": 3, "seq": 128},
    "sdpa": {"batch": 3, "seq": 1, "kv_seq": 9},
    "mha_self": {"batch": 3, "seq": 11},
    "mha_cross": {"batch": 1, "seq": 1, "kv_seq": 13},
    "causal_self": {"batch": 1, "seq": 9},
    "mha_causal": {"batch": 3, "seq": 1},
    "gqa_rope": {"batch": 1, "seq": 12},
    "mqa_alibi": {"batch": 4, "seq": 9},
    "t5_bidirectional": {"batch": 1, "seq": 40},
    "t5_causal": {"batch": 2, "seq": 40},
    "shaw_relative": {"batch": 1, "seq": 10},
    "xl_relative": {"batch": 3, "seq": 6},
    "sliding_window": {"batch": 2, "seq": 12},
    "kv_cache": {"batch": 1, "seq": 1, "past": 9},
    "encoder_layer": {"batch": 3, "seq": 5},
    "decoder_layer": {"batch": 1, "seq": 1, "kv_seq": 1},
    "decoder_layer_cached": {"batch": 3, "seq": 4, "past": 0},
    "encoder": {"batch": 3, "seq": 9},
    "decoder_lm": {"batch": 1, "seq": 1, "past": 6},
}
COVERED = frozenset(SECOND_POINTS)
NO_WEIGHTS = frozenset({"sinusoidal_pe", "sdpa"})  # entries whose module has no parameters


def _y(width):
    return lambda b, s, p, kv: [(b, s, width)]


def _cached_layer(b, s, p, kv):
    return [(b, s, 32), (b, 2, p + s, 8), (b, 2, p + s, 8)]


# Output shapes per entry as a function of (batch, seq, past, kv_seq), written out.
OUTPUT_SHAPES = {
    **{name: _y(32) for name in COVERED},
    "mqa_alibi": _y(48),
    "sdpa": lambda b, s, p, kv: [(b, 4, s, 8)],
    "kv_cache": _cached_layer,
    "decoder_layer_cached": _cached_layer,
    "decoder_lm": lambda b, s, p, kv: [(b, s, 97), (2, b, 2, p + s, 8), (2, b, 2, p + s, 8)],
}


def run(module, entry, inputs):
    with torch.no_grad():
        out = module(**inputs, **entry.forward_kwargs)
    return out if isinstance(out, tuple) else (out,)


def test_every_entry_is_covered():
    assert set(zoo.names()) - COVERED == set(), "zoo entries without a two-point case here"
    assert COVERED - set(zoo.names()) == set(), "cases for entries no longer in the zoo"


@pytest.mark.parametrize("name", sorted(COVERED))
def test_entry_builds_deterministically(name):
    entry = zoo.get(name)
    first, again = entry.build().state_dict(), entry.build().state_dict()
    assert list(first) == list(again)
    assert all(torch.equal(first[k], again[k]) for k in first)
    module = entry.build()
    assert not module.training
    if name in NO_WEIGHTS:
        assert list(module.parameters()) == []
        return
    other = entry.build(seed=1).state_dict()
    assert list(other) == list(first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_build_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    zoo.get("decoder_lm").build(seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("name", sorted(COVERED))
def test_entry_runs_at_two_points(name):
    entry = zoo.get(name)
    points = [dict(entry.example), SECOND_POINTS[name]]
    assert points[0] != points[1]
    module, twin = entry.build(), entry.build()
    for point in points:
        assert set(point) == set(entry.dims)
        for dim, size in point.items():
            low, high = entry.dims[dim]
            assert low <= size <= high, f"{dim}={size} outside {entry.dims[dim]}"
        inputs = entry.make_inputs(point)
        assert list(inputs) == [spec.name for spec in entry.inputs]
        again = entry.make_inputs(point)
        assert all(torch.equal(inputs[k], again[k]) for k in inputs)
        for spec in entry.inputs:
            assert inputs[spec.name].dtype == spec.dtype
        outs = run(module, entry, inputs)
        assert len(outs) == len(entry.outputs)
        b, s = point["batch"], point.get("seq")
        expected = OUTPUT_SHAPES[name](b, s, point.get("past", 0), point.get("kv_seq"))
        assert [tuple(o.shape) for o in outs] == expected
        for out_name, out in zip(entry.outputs, outs, strict=True):
            assert torch.isfinite(out).all(), f"{name}.{out_name} at {point} is not finite"
        for out, twin_out in zip(outs, run(twin, entry, inputs), strict=True):
            assert torch.equal(out, twin_out)


@pytest.mark.parametrize("name", sorted(COVERED))
def test_entry_rows_are_independent_of_the_batch(name):
    """Row 0 of a batch-3 run equals a batch-1 run on row 0's inputs (no mixing across rows)."""
    entry = zoo.get(name)
    point = {**entry.example, "batch": 3}
    inputs = entry.make_inputs(point)
    alone = {
        spec.name: inputs[spec.name].narrow(spec.shape.index("batch"), 0, 1)
        for spec in entry.inputs
    }
    module = entry.build()
    assert_close(run(module, entry, alone)[0], run(module, entry, inputs)[0][:1], atol=1e-5)


def test_entry_metadata_is_consistent():
    for entry in zoo.entries():
        assert entry.tolerance in zoo.TOLERANCE_CLASSES
        assert "float32" in zoo.TOLERANCE_CLASSES[entry.tolerance]
        names = [spec.name for spec in entry.inputs]
        assert len(set(names)) == len(names) and len(set(entry.outputs)) == len(entry.outputs)
        used = {d for spec in entry.inputs for d in spec.shape if isinstance(d, str)}
        assert used == set(entry.dims) == set(entry.example), entry.name
        assert entry.source() == f"models.zoo:{entry.name}"
        assert zoo.get(entry.name) is entry


def test_registry_covers_every_block():
    entries = zoo.entries()
    assert len(entries) >= 14
    built = {entry.name: entry.build() for entry in entries}
    modules = [m for module in built.values() for m in module.modules()]

    def has(cls, where=lambda m: True):
        return any(isinstance(m, cls) and where(m) for m in modules)

    for cls in (
        SinusoidalPositionalEncoding,
        LearnedPositionalEncoding,
        ShawRelativePosition,
        RotaryEmbedding,
        ALiBiBias,
        TransformerXLRelativeBias,
        ScaledDotProductAttention,
        EncoderLayer,
        DecoderLayer,
        Encoder,
        DecoderLM,
    ):
        assert has(cls), cls.__name__
    assert has(T5RelativeBias, lambda m: m.bidirectional)
    assert has(T5RelativeBias, lambda m: not m.bidirectional)
    assert has(MultiHeadAttention, lambda m: 1 < m.num_kv_heads < m.num_heads)  # GQA
    assert has(MultiHeadAttention, lambda m: m.num_kv_heads == 1 < m.num_heads)  # MQA
    assert has(MultiHeadAttention, lambda m: m.causal)
    assert has(MultiHeadAttention, lambda m: m.window is not None)
    assert has(MultiHeadAttention, lambda m: m.cross_attention)
    assert has(MultiHeadAttention, lambda m: m.num_heads & (m.num_heads - 1))  # not a power of 2
    kinds = {spec.kind for entry in entries for spec in entry.inputs}
    assert {"padding", "mask", "ids", "float"} <= kinds  # key padding and attention masks
    cached = [e.name for e in entries if any(s.name.startswith("past") for s in e.inputs)]
    assert {"kv_cache", "decoder_layer_cached", "decoder_lm"} <= set(cached)
    for name in cached:
        assert any(out.startswith("present") for out in zoo.get(name).outputs)
