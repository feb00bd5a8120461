"""The one input validator, shared by the Python API, the CLI and the servers.

onnxruntime alone silently casts lists, reads big-endian arrays as garbage, fails deep inside
a Reshape at T=0, runs B=0 and T beyond the exported range, and lets an initializer name in
the feed override a weight (reliability.md §2b). Every one of those is refused here, before
onnxruntime sees the feed, with a message naming the input, the axis, the expected and the
actual value. All problems of one feed are reported together.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from ._errors import InputError
from ._manifest import DimRange, Manifest, TensorSpec, ValueRange

Sizes = dict[str, tuple[int, str]]  # dim name -> (size, the input that fixed it)


def validate_feed(manifest: Manifest, feed: Mapping[str, np.ndarray], *,
                  reject_nonfinite: bool = False,
                  weights: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Check `feed` against the manifest inputs and return it normalized (native byte order,
    C-contiguous). `weights` are the model's initializer names, refused by name."""
    arrays, _ = check_feed(manifest, feed, reject_nonfinite=reject_nonfinite, weights=weights)
    return arrays


def check_feed(manifest: Manifest, feed: Mapping[str, np.ndarray], *,
               reject_nonfinite: bool = False,
               weights: Collection[str] = ()) -> tuple[dict[str, np.ndarray], Sizes]:
    """validate_feed, also returning the size bound to each symbolic dim (for output checks)."""
    if not isinstance(feed, Mapping):
        raise InputError(f"expected a mapping of input name -> numpy.ndarray, "
                         f"got {type(feed).__name__}")
    problems = _name_problems(manifest.input_names, feed, weights)
    if problems:
        raise InputError("; ".join(problems))
    sizes: Sizes = {}
    arrays = {}
    for spec in manifest.inputs:
        arr = _check_input(spec, feed[spec.name], manifest.dims, sizes, problems,
                           reject_nonfinite)
        if arr is not None:
            arrays[spec.name] = arr
    if problems:
        raise InputError("; ".join(problems))
    return arrays, sizes


def _name_problems(expected: list[str], feed: Mapping, weights: Collection[str]) -> list[str]:
    known = ", ".join(expected)
    problems = []
    for name in feed:
        if name in expected:
            continue
        if name in weights:
            # onnxruntime would let this override the weight silently (reliability.md §2b).
            problems.append(f"{name!r} is a weight (initializer) of the model, not an input; "
                            f"expected inputs: {known}")
        else:
            problems.append(f"unknown input {name!r}; expected inputs: {known}")
    problems += [f"missing input {name!r}; expected inputs: {known}"
                 for name in expected if name not in feed]
    return problems


def _check_input(spec: TensorSpec, arr, dims: Mapping[str, DimRange], sizes: Sizes,
                 problems: list[str], reject_nonfinite: bool) -> np.ndarray | None:
    label = f"Input {spec.name!r}"
    if not isinstance(arr, np.ndarray):
        # onnxruntime casts lists silently (1e40 -> inf); make the caller choose the dtype.
        problems.append(f"{label}: expected a numpy.ndarray of {spec.dtype}, got "
                        f"{type(arr).__name__} (convert with np.asarray(value, "
                        f"dtype=np.{spec.dtype}))")
        return None
    if arr.dtype.newbyteorder("=") != np.dtype(spec.dtype):
        problems.append(f"{label}: expected dtype {spec.dtype}, got {arr.dtype.name}")
        return None
    before = len(problems)
    problems += shape_problems(label, spec, arr.shape, dims, sizes)
    if len(problems) > before:
        return None
    if not arr.dtype.isnative:
        # onnxruntime reads the bytes as little-endian: a '>f4' array becomes NaN/garbage.
        arr = arr.astype(arr.dtype.newbyteorder("="))
    arr = np.ascontiguousarray(arr)
    if reject_nonfinite and arr.dtype.kind == "f":
        problems += _nonfinite_problems(label, arr)
    if spec.value_range is not None:
        problems += _value_problems(label, arr, spec.value_range)
    return arr


def _value_problems(label: str, arr: np.ndarray, allowed: ValueRange) -> list[str]:
    """ONNX Gather wraps a negative index and fails deep inside onnxruntime on one past the
    table, where torch's embedding raises: both are the caller's error, named here."""
    outside = (arr < allowed.min) | (arr > allowed.max)
    if arr.size == 0 or not outside.any():
        return []
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(outside)), arr.shape))
    count = int(outside.sum())
    more = f" ({count} values outside)" if count > 1 else ""
    return [f"{label}: value {arr[first].item()} at index {list(first)} is outside its range "
            f"{allowed.min} <= value <= {allowed.max}{more}"]


def shape_problems(label: str, spec: TensorSpec, shape: tuple[int, ...],
                   dims: Mapping[str, DimRange], sizes: Sizes,
                   *, check_ranges: bool = True) -> list[str]:
    """Rank, static dims, dim ranges and shared-dim agreement. Records newly bound dims in
    `sizes`. Dims that are expressions ("past + seq") are not checked."""
    if len(shape) != len(spec.shape):
        return [f"{label}: expected rank {len(spec.shape)} {_shape_text(spec.shape)}, got rank "
                f"{len(shape)} with shape {list(shape)}"]
    problems = []
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if isinstance(want, int):
            if got != want:
                problems.append(f"{label}: axis {axis} expected {want}, got {got}")
            continue
        if want in sizes:
            size, owner = sizes[want]
            if got != size:
                problems.append(f"{label}: axis {axis} ({want!r}) expected {size} (as in "
                                f"{owner}), got {got}")
            continue
        if want not in dims:
            continue  # a derived output expression
        r = dims[want]
        if check_ranges and not r.min <= got <= r.max:
            side = f"above the max {r.max}" if got > r.max else f"below the min {r.min}"
            problems.append(f"{label}: axis {axis} ({want!r}) expected {r.min}..{r.max}, "
                            f"got {got} ({side})")
            continue
        sizes[want] = (got, label)
    return problems


def _nonfinite_problems(label: str, arr: np.ndarray) -> list[str]:
    finite = np.isfinite(arr)
    if finite.all():
        return []
    first = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), arr.shape))
    return [f"{label}: expected finite values, got {int((~finite).sum())} NaN/Inf, first at "
            f"index {list(first)}"]


def _shape_text(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"
