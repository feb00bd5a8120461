"""The benchmarks' FLOP count for attention, against closed forms and torch's own counter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench import attention_flops  # noqa: E402

B, H, S, HD = 2, 3, 7, 8


def _qk(s=S, s_kv=S):
    return torch.randn(B, H, s, HD), torch.randn(B, H, s_kv, HD)


def _matmul_flops(q, k, v) -> int:
    """torch's FlopCounterMode over the two matmuls of unmasked attention."""
    counter = FlopCounterMode(display=False)
    with counter:
        (q @ k.transpose(-1, -2)).softmax(-1) @ v
    return counter.get_total_flops()


def test_unmasked_attention_is_torchs_count_of_its_two_matmuls():
    q, k = _qk(S, 11)
    assert attention_flops(q, k) == _matmul_flops(q, k, torch.randn(B, H, 11, HD))


@pytest.mark.parametrize(("s", "s_kv"), [(S, S), (3, 9), (9, 3)], ids=["square", "wide", "tall"])
def test_causal_attention_counts_the_pairs_under_the_diagonal(s, s_kv):
    q, k = _qk(s, s_kv)
    pairs = sum(min(i + 1, s_kv) for i in range(s))  # torch's top-left alignment
    assert attention_flops(q, k, is_causal=True) == 4 * B * H * pairs * HD
    if s == s_kv:
        assert pairs == s * (s + 1) // 2


def test_a_mask_rules_out_what_it_masks():
    q, k = _qk()
    window = torch.ones(S, S, dtype=torch.bool).tril().triu(-2)  # a causal window of 3
    allowed = int(window.sum())
    assert attention_flops(q, k, attn_mask=window) == pytest.approx(4 * B * H * allowed * HD)
    bias = torch.zeros(S, S).masked_fill(~window, float("-inf"))
    assert attention_flops(q, k, bias) == pytest.approx(4 * B * H * allowed * HD)
    alibi = torch.randn(1, H, S, S)  # a finite score bias masks nothing
    assert attention_flops(q, k, alibi) == 4 * B * H * S * S * HD
