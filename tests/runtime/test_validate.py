"""The input validator: every bad request is an InputError naming input, axis, expected, actual."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import InputError, load_bundle, validate_feed

D = 8
WEIGHTS = frozenset({"W", "axes"})


@pytest.fixture(scope="module")
def manifest(_templates):
    return load_bundle(_templates["inline"]).manifest


def feed(batch=2, seq=5, seed=0, **override):
    rng = np.random.default_rng(seed)
    f = {
        "x": rng.standard_normal((batch, seq, D)).astype(np.float32),
        "m": rng.standard_normal((batch, D)).astype(np.float32),
    }
    f.update(override)
    return f


def test_good_feed_passes_unchanged(manifest):
    f = feed()
    out = validate_feed(manifest, f, weights=WEIGHTS)
    assert out.keys() == f.keys() and out["x"] is f["x"]  # no copy when nothing to fix


BAD = {
    "float64": (feed(x=np.zeros((2, 5, D))), r"^Input 'x': expected dtype float32, got float64$"),
    "int64": (feed(m=np.zeros((2, D), np.int64)), r"Input 'm': expected dtype float32, got int64"),
    "float16": (feed(x=np.zeros((2, 5, D), np.float16)), r"expected dtype float32, got float16"),
    "bool": (feed(x=np.zeros((2, 5, D), bool)), r"Input 'x': expected dtype float32, got bool"),
    "object": (feed(x=np.empty((2, 5, D), object)), r"expected dtype float32, got object"),
    "list": (
        feed(x=[[[0.0] * D] * 5] * 2),
        r"Input 'x': expected a numpy.ndarray of float32, got list \(convert with "
        r"np.asarray\(value, dtype=np.float32\)\)",
    ),
    "numpy_scalar": (
        feed(m=np.float32(1.0)),
        r"Input 'm': expected a numpy.ndarray of float32, "
        r"got float32",
    ),
    "rank2": (
        feed(x=np.zeros((2, 5), np.float32)),
        r"Input 'x': expected rank 3 \[batch, seq, 8\], got rank 2 with shape \[2, 5\]",
    ),
    "rank4": (feed(x=np.zeros((2, 5, D, 1), np.float32)), r"expected rank 3 .* got rank 4"),
    "static_dim": (
        feed(x=np.zeros((2, 5, 7), np.float32)),
        r"^Input 'x': axis 2 expected 8, got 7$",
    ),
    "T0": (
        feed(seq=0),
        r"^Input 'x': axis 1 \('seq'\) expected 1..16, got 0 \(below the min "
        r"1\)$",
    ),
    "B0": (
        feed(batch=0),
        r"Input 'x': axis 0 \('batch'\) expected 1..4, got 0 \(below the min "
        r"1\)",
    ),
    "T_beyond_max": (
        feed(seq=17),
        r"Input 'x': axis 1 \('seq'\) expected 1..16, got 17 \(above "
        r"the max 16\)",
    ),
    "B_beyond_max": (feed(batch=5), r"axis 0 \('batch'\) expected 1..4, got 5 \(above the max"),
    "shared_dim": (
        feed(m=np.zeros((3, D), np.float32)),
        r"^Input 'm': axis 0 \('batch'\) expected 2 \(as in Input 'x'\), got 3$",
    ),
    "missing": ({"x": feed()["x"]}, r"^missing input 'm'; expected inputs: x, m$"),
    "unknown": (feed(z=np.zeros(1, np.float32)), r"^unknown input 'z'; expected inputs: x, m$"),
    "initializer": (
        feed(W=np.eye(D, dtype=np.float32)),
        r"^'W' is a weight \(initializer\) of the model, not an input; expected "
        r"inputs: x, m$",
    ),
    "not_a_mapping": (
        [feed()["x"]],
        r"expected a mapping of input name -> numpy.ndarray, "
        r"got list",
    ),
}


@pytest.mark.parametrize("bad,match", BAD.values(), ids=BAD.keys())
def test_bad_feed(manifest, bad, match):
    with pytest.raises(InputError, match=match):
        validate_feed(manifest, bad, weights=WEIGHTS)


def test_every_problem_is_reported_at_once(manifest):
    bad = {"x": np.zeros((2, 0, D), np.float64), "m": [1.0], "z": np.zeros(1)}
    with pytest.raises(InputError) as info:
        validate_feed(manifest, bad, weights=WEIGHTS)
    assert str(info.value) == "unknown input 'z'; expected inputs: x, m"  # names first
    bad.pop("z")
    with pytest.raises(InputError) as info:
        validate_feed(manifest, bad, weights=WEIGHTS)
    msg = str(info.value)
    assert "Input 'x': expected dtype float32, got float64" in msg
    assert "Input 'm': expected a numpy.ndarray" in msg


def test_bounds_are_inclusive(manifest):
    validate_feed(manifest, feed(batch=1, seq=1))
    validate_feed(manifest, feed(batch=4, seq=16))


def test_nonfinite_is_rejected_only_when_asked(manifest):
    f = feed()
    f["x"][0, 1, 2] = np.nan
    f["m"][1, 3] = np.inf
    validate_feed(manifest, f)  # accepted by default (the output will show it)
    with pytest.raises(InputError) as info:
        validate_feed(manifest, f, reject_nonfinite=True)
    msg = str(info.value)
    assert "Input 'x': expected finite values, got 1 NaN/Inf, first at index [0, 1, 2]" in msg
    assert "Input 'm': expected finite values, got 1 NaN/Inf, first at index [1, 3]" in msg


def test_big_endian_is_converted_to_native(manifest):
    f = feed()
    big = f["x"].astype(">f4")
    out = validate_feed(manifest, {**f, "x": big})
    assert out["x"].dtype == np.float32 and out["x"].dtype.isnative
    assert np.array_equal(out["x"], f["x"])


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x[:, ::-1],
        lambda x: np.asfortranarray(x),
        lambda x: np.repeat(x, 2, axis=2)[:, :, ::2],
    ],
    ids=["negative_stride", "fortran", "strided"],
)
def test_non_contiguous_is_made_contiguous(manifest, make):
    f = feed()
    odd = make(f["x"])
    assert not odd.flags.c_contiguous
    out = validate_feed(manifest, {**f, "x": odd})
    assert out["x"].flags.c_contiguous and np.array_equal(out["x"], odd)
