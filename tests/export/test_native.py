"""The attention23 variant's native ONNX ops: rotary embeddings as RotaryEmbedding-23, causal
sliding windows as Attention-25's left_window_size (no s x s mask), each passing parity beyond
the window and with padded, half-padded and fully padded rows."""

import dataclasses

import onnx
import pytest
import torch

from export import run_pipeline, spec_from_module
from export.rewrites.native import attention as lowering
from models import MultiHeadAttention, RotaryEmbedding
from models._kernels import attention
from models._native import onnx_native

from .test_kernels import D, H, Padded, Shape, _inputs, _padding

WINDOW = 5
CONFIGS = {
    "window-rope-padding": dict(
        causal=True, window=WINDOW, pos_embeddings=RotaryEmbedding(head_dim=D // H)
    ),
    "window-gqa-padding": dict(causal=True, window=WINDOW, num_kv_heads=2),
    "rope-padding": dict(causal=True, pos_embeddings=RotaryEmbedding(head_dim=D // H)),
}


def _native_variant(config):
    torch.manual_seed(0)
    module = Padded(MultiHeadAttention(embed_dim=D, num_heads=H, **config))
    spec = spec_from_module(
        module,
        {"x": torch.randn(2, 7, D), "key_padding_mask": _padding(2, 7)},
        dynamic={
            "x": {0: ("batch", 1, 4), 1: ("seq", 1, 24)},
            "key_padding_mask": {0: "batch", 1: "seq"},
        },
        name="native",
    )
    spec = dataclasses.replace(spec, make_inputs=_inputs)
    grid = [{"batch": 4, "seq": 24}, {"batch": 4, "seq": 1}]
    return run_pipeline(spec, out=None, grid=grid, variants=("attention23",))


@pytest.mark.parametrize("name", CONFIGS)
def test_native_variant_matches_torch_beyond_the_window_and_with_padded_rows(name):
    result = _native_variant(CONFIGS[name])
    assert "attention23" in result.variants, result.status.dropped
    records = [r for r in result.records if r.variant == "attention23"]
    assert len(records) == 2 and all(r.passed for r in records)
    model = result.variants["attention23"].model
    nodes = {n.op_type: n for n in model.graph.node}
    opset = next(o.version for o in model.opset_import if o.domain == "")
    assert "Softmax" not in nodes and "Attention" in nodes
    if "window" in name:
        window = {a.name: a.i for a in nodes["Attention"].attribute}
        assert opset == 25
        assert window["left_window_size"] == WINDOW - 1 and window["right_window_size"] == 0
        assert window["is_causal"] == 1
        assert [o for o in nodes["Attention"].output if o] == [nodes["Attention"].output[0]]
    else:
        assert opset == 23
    rope = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rope) == (2 if "rope" in name else 0)
    onnx.checker.check_model(model)


def test_native_routing_keeps_eager_numbers():
    q, k, v = (torch.randn(3, 9, H, 8) for _ in range(3))
    pad = _padding(3, 9)
    rope = RotaryEmbedding(head_dim=8)
    eager = attention(rope(q, seq_dim=1), k, v, key_padding_mask=pad, causal=True, window=3)
    with onnx_native() as route:
        inside = attention(rope(q, seq_dim=1), k, v, key_padding_mask=pad, causal=True, window=3)
        routed_rope = rope(q.transpose(1, 2), 4)
    assert route.windows == 1
    torch.testing.assert_close(inside, eager)
    torch.testing.assert_close(routed_rope, rope(q.transpose(1, 2), 4))


def test_native_lowering_refuses_what_it_does_not_serve():
    with pytest.raises(ValueError, match=r"needs static head counts and head size"):
        lowering(Shape(("b", "s", "h", 8)), Shape(("b", "s", 2, 8)), None)
    with pytest.raises(ValueError, match=r"takes a causal window without score bias"):
        lowering(Shape(("b", "s", 4, 8)), Shape(("b", "s", 4, 8)), None, causal=True)
    with pytest.raises(ValueError, match=r"takes a causal window without score bias"):
        lowering(
            Shape(("b", "s", 4, 8)),
            Shape(("b", "s", 4, 8)),
            None,
            score_bias=object(),
            causal=True,
            window=3,
        )
