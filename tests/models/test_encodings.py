"""Positional encodings against closed-form numpy references and published reference code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import (
    ALiBiBias,
    LearnedPositionalEncoding,
    RotaryEmbedding,
    ShawRelativePosition,
    SinusoidalPositionalEncoding,
    T5RelativeBias,
    TransformerXLRelativeBias,
    alibi_slopes,
    relative_distances,
    t5_bucket,
)
from models._encodings import skew, skew_distances, unskew
from tests.models._helpers import (
    assert_close,
    build,
    hf_relative_position_bucket,
    np_rope,
    np_sinusoid,
    np_xl_terms,
    paper_get_slopes,
    randn,
    to_numpy,
)

D = 16  # model dim for the absolute encodings
HD = 8  # head dim
LONG = 600  # longer than any zoo example and than any table a sketch would precompute

# --- sinusoidal absolute ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("s", "offset", "dim"),
    [(7, 0, D), (5, 11, D), (1, 0, 4), (1, 99, 6), (LONG, 0, D), (9, LONG, D)],
    ids=["s7", "s5-offset11", "s1-d4", "s1-offset99-d6", "long600", "offset600"],
)
def test_sinusoidal_matches_closed_form(s, offset, dim):
    pe = SinusoidalPositionalEncoding(dim=dim)
    expected = np_sinusoid(np.arange(offset, offset + s), dim)
    # float32 angles lose ~6e-8 * position in the argument, so long positions get a looser atol.
    atol = 1e-6 + 1e-7 * (offset + s)
    assert_close(pe.table(s, offset), expected, atol=atol, rtol=0)
    x = randn(2, s, dim)
    assert_close(pe(x, offset), to_numpy(x) + expected[None], atol=atol, rtol=0)


def test_sinusoidal_first_rows_written_out():
    # d = 4: columns sin(p), cos(p), sin(p / 100), cos(p / 100).
    expected = [
        [0.0, 1.0, 0.0, 1.0],
        [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)],
        [math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)],
    ]
    assert_close(SinusoidalPositionalEncoding(dim=4).table(3), expected, atol=1e-7, rtol=0)


def test_sinusoidal_offset_is_the_tail_of_a_longer_table():
    pe = SinusoidalPositionalEncoding(dim=D)
    assert_close(pe.table(4, offset=6), pe.table(10)[6:], atol=1e-6, rtol=0)
    assert not torch.allclose(pe.table(4, offset=6), pe.table(4))


# --- learned absolute ---------------------------------------------------------------------------


def test_learned_adds_rows_of_its_table():
    pe = build(LearnedPositionalEncoding, dim=D, max_len=12)
    x = randn(2, 5, D)
    table = to_numpy(pe.embedding.weight)
    assert_close(pe(x), to_numpy(x) + table[None, :5], atol=1e-6)
    assert_close(pe(x, offset=7), to_numpy(x) + table[None, 7:12], atol=1e-6)
    assert_close(pe(randn(1, 12, D)), to_numpy(randn(1, 12, D)) + table[None], atol=1e-6)


@pytest.mark.parametrize(
    ("s", "offset", "needed"),
    [(13, 0, 13), (LONG, 0, LONG), (6, 7, 13)],
    ids=["one-past", "long600", "offset-overflow"],
)
def test_learned_beyond_max_len_raises_naming_it(s, offset, needed):
    pe = build(LearnedPositionalEncoding, dim=D, max_len=12)
    with pytest.raises(ValueError, match=rf"positions up to {needed} exceed .*max_len \(12\)"):
        pe(randn(1, s, D), offset=offset)


# --- ALiBi --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (8, [2.0**-i for i in range(1, 9)]),
        (4, [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]),
        (1, [2.0**-8]),
        # 6 heads: the 4-head slopes, then the odd-indexed slopes of 8 heads (2^-1, 2^-3).
        (6, [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]),
        # 12 heads: the 8-head slopes, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 (16-head, every other).
        (12, [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]),
    ],
    ids=["h8", "h4", "h1", "h6", "h12"],
)
def test_alibi_slopes_written_out(n, expected):
    assert_close(alibi_slopes(n), expected, atol=0, rtol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 8, 12, 16, 20, 24, 32], ids=lambda n: f"h{n}")
def test_alibi_slopes_match_paper_code(n):
    assert_close(alibi_slopes(n), paper_get_slopes(n), atol=0, rtol=1e-12)


@pytest.mark.parametrize(
    ("heads", "s", "s_kv"),
    [(8, 6, 6), (6, 3, 7), (12, 1, 1), (4, LONG, LONG)],
    ids=["h8-square", "h6-bottom-right", "h12-s1", "h4-long600"],
)
def test_alibi_bias_is_minus_slope_times_distance(heads, s, s_kv):
    q, k = torch.zeros(1, heads, s, HD), torch.zeros(1, heads, s_kv, HD)
    bias = ALiBiBias(num_heads=heads).score_bias(q, k)
    i = np.arange(s)[:, None] + (s_kv - s)  # bottom-right: query i sits at s_kv - s + i
    j = np.arange(s_kv)[None, :]
    slopes = np.array(paper_get_slopes(heads))
    expected = -slopes[:, None, None] * np.abs(i - j)[None]
    assert_close(bias, expected[None], atol=1e-6 * max(s_kv, 1), rtol=1e-6)


# --- T5 buckets ---------------------------------------------------------------------------------


DISTANCES = list(range(-40, 41))  # key - query

# num_buckets=16, max_distance=32, bidirectional: 8 buckets per direction, max_exact=4.
# Past keys (d <= 0) use buckets 0..7, future keys (d > 0) 8 + the same ids.
# |d| >= 4 gets 4 + floor(ln(|d|/4) / ln(32/4) * 4), capped at 7. By hand:
#   |d|=6: ln 1.5 / ln 8 * 4 = 0.405 / 2.079 * 4 = 0.78 -> 4
#   |d|=7: ln 1.75 / ln 8 * 4 = 1.08 -> 5;  |d|=11: ln 2.75 / ln 8 * 4 = 1.95 -> 5
#   |d|=12: ln 3 / ln 8 * 4 = 2.11 -> 6;    |d|=19: ln 4.75 / ln 8 * 4 = 2.997 -> 6
#   |d|=20: ln 5 / ln 8 * 4 = 3.10 -> 7;    |d|>=32: 4 + 4 = 8, capped -> 7
T5_BIDIRECTIONAL = (
    [7] * 21  # d = -40 .. -20
    + [6] * 8  # -19 .. -12
    + [5] * 5  # -11 .. -7
    + [4] * 3  # -6 .. -4
    + [3, 2, 1, 0]  # -3 .. 0
    + [9, 10, 11]  # 1 .. 3
    + [12] * 3  # 4 .. 6
    + [13] * 5  # 7 .. 11
    + [14] * 8  # 12 .. 19
    + [15] * 21  # 20 .. 40
)

# num_buckets=16, max_distance=32, causal: all 16 buckets for the past, max_exact=8; future
# keys (d > 0) and d = 0 share bucket 0. n = -d >= 8 gets 8 + floor(ln(n/8) / ln 4 * 8):
#   n=9: ln 1.125 / ln 4 * 8 = 0.68 -> 8;  n=10: 1.29 -> 9;  n=12: ln 1.5 / ln 4 * 8 = 2.34 -> 10
#   n=16: ln 2 / ln 4 * 8 = 4 exactly -> 12;  n=19: 4.99 -> 12;  n=20: 5.29 -> 13
#   n=23: ln 2.875 / ln 4 * 8 = 6.09 -> 14;  n=26: 6.80 -> 14;  n=27: 7.02 -> 15
T5_CAUSAL = (
    [15] * 14  # d = -40 .. -27
    + [14] * 4  # -26 .. -23
    + [13] * 3  # -22 .. -20
    + [12] * 4  # -19 .. -16
    + [11, 11, 10, 10, 9, 9, 8, 8]  # -15 .. -8
    + [7, 6, 5, 4, 3, 2, 1]  # -7 .. -1
    + [0] * 41  # 0 .. 40
)


@pytest.mark.parametrize(
    ("bidirectional", "expected"),
    [(True, T5_BIDIRECTIONAL), (False, T5_CAUSAL)],
    ids=["bidirectional", "causal"],
)
def test_t5_bucket_hand_checked_table(bidirectional, expected):
    assert len(expected) == len(DISTANCES)
    got = t5_bucket(
        torch.tensor(DISTANCES), bidirectional=bidirectional, num_buckets=16, max_distance=32
    )
    assert got.tolist() == expected
    reference = [hf_relative_position_bucket(d, bidirectional, 16, 32) for d in DISTANCES]
    assert reference == expected  # the table and the transcription agree with each other


@pytest.mark.parametrize(
    ("bidirectional", "num_buckets", "max_distance"),
    [(True, 32, 128), (False, 32, 128), (True, 8, 20), (False, 6, 7), (True, 64, 300)],
    ids=["bi-32-128", "causal-32-128", "bi-8-20", "causal-6-7", "bi-64-300"],
)
def test_t5_bucket_matches_reference_transcription(bidirectional, num_buckets, max_distance):
    distances = list(range(-LONG, LONG + 1))
    got = t5_bucket(
        torch.tensor(distances),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    expected = [
        hf_relative_position_bucket(d, bidirectional, num_buckets, max_distance) for d in distances
    ]
    assert got.tolist() == expected
    assert 0 <= min(expected) and max(expected) < num_buckets


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_t5_bias_looks_up_bucket_rows_at_long_length(bidirectional):
    t5 = build(
        T5RelativeBias, num_heads=4, num_buckets=16, max_distance=32, bidirectional=bidirectional
    )
    s = LONG
    bias = t5.score_bias(torch.zeros(1, 4, s, HD), torch.zeros(1, 4, s, HD))
    table = to_numpy(t5.embedding.weight)  # [buckets, h]
    ids = {d: hf_relative_position_bucket(d, bidirectional, 16, 32) for d in range(-s + 1, s)}
    dist = np.arange(s)[None, :] - np.arange(s)[:, None]  # key - query
    bucket = np.vectorize(ids.__getitem__)(dist)
    assert_close(bias, table[bucket].transpose(2, 0, 1)[None], atol=0, rtol=0)


# --- Shaw relative positions --------------------------------------------------------------------

# k = 2: id = clip(j - i, -2, 2) + 2.
SHAW_5x5 = [
    [2, 3, 4, 4, 4],  # query 0: distances 0..4
    [1, 2, 3, 4, 4],
    [0, 1, 2, 3, 4],
    [0, 0, 1, 2, 3],
    [0, 0, 0, 1, 2],  # query 4: distances -4..0
]
# 2 queries over 5 keys, bottom-right: the queries sit at positions 3 and 4.
SHAW_2x5 = [[0, 0, 1, 2, 3], [0, 0, 0, 1, 2]]


@pytest.mark.parametrize(
    ("s", "s_kv", "expected"), [(5, 5, SHAW_5x5), (2, 5, SHAW_2x5)], ids=["5x5", "2x5"]
)
def test_shaw_clipped_index_table(s, s_kv, expected):
    assert ShawRelativePosition(head_dim=HD, max_distance=2).index(s, s_kv).tolist() == expected


def test_shaw_index_stays_in_table_at_long_length():
    shaw = ShawRelativePosition(head_dim=HD, max_distance=3)
    ids = shaw.index(LONG, LONG)
    assert ids.min().item() == 0 and ids.max().item() == 6  # 2k, never negative
    assert ids[-1, 0].item() == 0 and ids[0, -1].item() == 6  # far distances reuse end rows
    assert ids.diagonal().eq(3).all()


@pytest.mark.parametrize(("s", "s_kv"), [(5, 5), (2, 5), (1, 1), (1, 4), (4, 4), (3, 7)])
def test_skew_places_each_distance_where_index_says(s, s_kv):
    shaw = ShawRelativePosition(head_dim=HD, max_distance=2)
    per_distance = skew_distances(s, s_kv).clamp(-2, 2) + 2  # [s + s_kv]
    table = per_distance.expand(s, -1).float()  # [s, s + s_kv]
    assert skew(table, s_kv).long().tolist() == shaw.index(s, s_kv).tolist()
    # unskew puts each key's value back in its distance column, zeros elsewhere
    per_key = torch.arange(1, s * s_kv + 1, dtype=torch.float32).reshape(s, s_kv)
    back = unskew(per_key)
    assert back.shape == (s, s + s_kv)
    assert torch.equal(skew(back, s_kv), per_key)
    assert back.sum() == per_key.sum()  # nothing else leaks in
    assert back[:, -1].eq(0).all()  # the spare column stays zero


@pytest.mark.parametrize(("s", "s_kv"), [(5, 5), (1, 1), (1, 4), (3, 7)])
def test_skew_never_reads_the_spare_column(s, s_kv):
    assert skew_distances(s, s_kv).tolist() == list(range(1 - s_kv, s + 1))
    table = torch.arange(s * (s + s_kv), dtype=torch.float32).reshape(s, s + s_kv)
    table[:, -1] = float("nan")
    assert not skew(table, s_kv).isnan().any()


def test_relative_distances_bottom_right():
    assert relative_distances(2, 4).tolist() == [[-2, -1, 0, 1], [-3, -2, -1, 0]]
    assert relative_distances(1, 1).tolist() == [[0]]


# --- Transformer-XL -----------------------------------------------------------------------------


@pytest.mark.parametrize(("s", "s_kv"), [(5, 5), (2, 6), (1, 1)], ids=["5x5", "2x6", "1x1"])
def test_transformer_xl_terms_match_numpy(s, s_kv):
    h = 2
    xl = build(TransformerXLRelativeBias, num_heads=h, head_dim=HD)
    with torch.no_grad():  # make u and v big enough to matter
        xl.u.copy_(randn(h, HD, seed=5))
        xl.v.copy_(randn(h, HD, seed=6))
    q, k = randn(2, h, s, HD, seed=1), randn(2, h, s_kv, HD, seed=2)
    expected = np_xl_terms(
        to_numpy(q), to_numpy(k), to_numpy(xl.r_proj.weight), to_numpy(xl.u), to_numpy(xl.v), h
    )
    assert_close(xl.score_bias(q, k), expected, atol=1e-5, rtol=1e-5)


# --- RoPE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("s", "offset"),
    [(6, 0), (3, 9), (1, 0), (LONG, 0), (4, LONG)],
    ids=["s6", "s3-offset9", "s1", "long600", "offset600"],
)
def test_rope_matches_rotate_half_closed_form(s, offset):
    x = randn(2, 3, s, HD)
    got = RotaryEmbedding(head_dim=HD)(x, offset)
    expected = np_rope(to_numpy(x), np.arange(offset, offset + s))
    assert_close(got, expected, atol=1e-6 + 2e-7 * (offset + s), rtol=0)


@pytest.mark.parametrize("s", [1, 7, LONG], ids=["s1", "s7", "long600"])
def test_rope_preserves_norms(s):
    x = randn(2, 3, s, HD)
    y = RotaryEmbedding(head_dim=HD)(x, 5)
    assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, x, atol=1e-3)  # it did rotate (positions 5.., none at 0)


def test_rope_dot_product_depends_only_on_distance():
    rope = RotaryEmbedding(head_dim=HD)
    q, k = randn(1, 1, 1, HD, seed=1), randn(1, 1, 1, HD, seed=2)

    def score(m: int, n: int) -> float:
        return (rope(q, m) * rope(k, n)).sum().item()

    same_distance = [score(m, m - 3) for m in (3, 4, 10, 57, 300)]
    assert_close(same_distance, [same_distance[0]] * 5, atol=1e-4, rtol=1e-4)
    assert_close([score(0, 0), score(9, 9), score(123, 123)], [score(5, 5)] * 3, atol=1e-4)
    # ...and it does depend on the distance: m - n = 3 and m - n = 4 differ.
    assert abs(score(10, 7) - score(10, 6)) > 1e-2


def test_rope_offset_is_the_tail_of_a_longer_sequence():
    rope = RotaryEmbedding(head_dim=HD)
    x = randn(2, 3, 9, HD)
    assert_close(rope(x[:, :, 4:], 4), rope(x)[:, :, 4:], atol=1e-6)
    assert_close(rope(x[:, :, 4:], torch.tensor(4)), rope(x)[:, :, 4:], atol=1e-6)
    assert not torch.allclose(rope(x[:, :, 4:], 0), rope(x)[:, :, 4:], atol=1e-3)
