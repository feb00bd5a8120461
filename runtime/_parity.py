"""Parity: measurement (numbers) separate from policy (pass/fail), numpy only.

The exporter reuses this module to compare ONNX Runtime against torch, and `attnx verify`
uses it to compare a bundle against its golden outputs.

Rule, elementwise, in float64: |actual - expected| <= atol + rtol * |expected| (numpy's
isclose rule; equal infinities match). NaN on either side is a mismatch.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._errors import ParityError
from ._manifest import OutputParity, ParityRecord, Tolerance, Variant, parity_record_dict

# fp32 kernels reorder sums (blocked GEMM, fused softmax); 1e-5 absolute and 1e-4 relative
# covers that for attention outputs of order 1 while still catching a wrong mask or scale.
FLOAT32_TOLERANCE = Tolerance(atol=1e-5, rtol=1e-4)
# fp16 has an 11-bit mantissa (eps 9.8e-4); attention's softmax and long reductions lose a
# few more bits. Loose bounds of this size are what NVIDIA/TransformerEngine#3409 uses for
# fp16 attention kernels.
FLOAT16_TOLERANCE = Tolerance(atol=2e-2, rtol=1e-2)
# float64 references are only reordered sums, nowhere near fp32 error.
FLOAT64_TOLERANCE = Tolerance(atol=1e-10, rtol=1e-9)
# Integers and booleans (token ids, masks, lengths) must match exactly.
EXACT = Tolerance(atol=0.0, rtol=0.0)

DEFAULT_TOLERANCES: Mapping[str, Tolerance] = {
    "float16": FLOAT16_TOLERANCE,
    "float32": FLOAT32_TOLERANCE,
    "float64": FLOAT64_TOLERANCE,
}


@dataclass(frozen=True)
class ToleranceTable:
    """Tolerances keyed by dtype name, with per-output overrides.

    Lookup order: `by_output[name]`, then `by_dtype[dtype]`, then DEFAULT_TOLERANCES, then
    EXACT (every non-float dtype).
    """

    by_dtype: Mapping[str, Tolerance] = field(default_factory=dict)
    by_output: Mapping[str, Tolerance] = field(default_factory=dict)

    @classmethod
    def from_variant(cls, variant: Variant) -> ToleranceTable:
        return cls(dict(variant.tolerance), dict(variant.outputs_tolerance))

    def lookup(self, name: str, dtype: str) -> Tolerance:
        if name in self.by_output:
            return self.by_output[name]
        if dtype in self.by_dtype:
            return self.by_dtype[dtype]
        return DEFAULT_TOLERANCES.get(dtype, EXACT)


# ---------------------------------------------------------------------------------------------
# Measurement


def measure(name: str, actual, expected, *, atol: float, rtol: float,
            leave_out=None) -> OutputParity:
    """Measure one output against its reference. Never raises on bad numbers or shapes: a
    shape mismatch or NaN is a failing record. ``leave_out`` (bool, broadcast to the shape)
    marks positions the model defines no answer for; they are not compared, and counted."""
    a = np.asarray(actual)
    b = np.asarray(expected)
    if a.shape != b.shape:
        return _failed(name, str(a.dtype), a.shape, atol, rtol,
                       f"shape {list(a.shape)} differs from expected {list(b.shape)}")
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    excluded = 0
    if leave_out is not None:
        left = np.broadcast_to(np.asarray(leave_out, dtype=bool), a.shape)
        a64, b64, excluded = np.where(left, 0.0, a64), np.where(left, 0.0, b64), int(left.sum())
    nan = np.isnan(a64) | np.isnan(b64)
    inf = np.isinf(a64) | np.isinf(b64)
    same_inf = inf & (a64 == b64)  # numpy's rule: equal infinities are close
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(same_inf, 0.0, np.abs(a64 - b64))
        scale = np.abs(b64)
        excess = np.where(same_inf, 0.0, diff - rtol * scale)  # > atol means a mismatch
    # inf - rtol * inf is NaN (one side infinite): infinitely far off, not "unknown".
    excess = np.where(np.isnan(excess) & ~nan, np.inf, excess)
    bad = nan | (excess > atol)
    valid = ~nan
    size = a64.size
    return OutputParity(
        name=name,
        dtype=str(a.dtype),
        shape=tuple(int(s) for s in a.shape),
        max_abs=_max(diff, valid),
        max_rel=_max(_relative(diff, scale), valid),
        mean_abs=float(diff[valid].mean()) if valid.any() else _empty_or_nan(size),
        mismatch_fraction=float(bad.sum() / size) if size else 0.0,
        worst_index=_worst(excess, nan),
        nan_count=int(nan.sum()),
        inf_count=int(inf.sum()),
        atol=float(atol),
        rtol=float(rtol),
        min_atol=_min_atol(excess, nan),
        passed=not bad.any(),
        excluded=excluded,
    )


def _relative(diff: np.ndarray, scale: np.ndarray) -> np.ndarray:
    # |a-b| / |b|; where b == 0 the error is 0 if a == 0 too, else infinitely relative.
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), np.inf)
    rel = np.where(np.isnan(rel), np.inf, rel)  # inf / inf: one side infinite
    return np.where(diff == 0, 0.0, rel)


def _max(values: np.ndarray, valid: np.ndarray) -> float:
    if not valid.any():
        return _empty_or_nan(values.size)
    return float(values[valid].max())


def _empty_or_nan(size: int) -> float:
    return 0.0 if size == 0 else float("nan")


def _worst(excess: np.ndarray, nan: np.ndarray) -> tuple[int, ...]:
    if excess.size == 0:
        return ()
    flat = int(np.argmax(nan)) if nan.any() else int(np.argmax(excess))
    return tuple(int(i) for i in np.unravel_index(flat, excess.shape))


def _min_atol(excess: np.ndarray, nan: np.ndarray) -> float:
    # The smallest atol for which every element passes at this rtol; no atol rescues NaN.
    if nan.any():
        return float("inf")
    return max(float(excess.max()), 0.0) if excess.size else 0.0


def _failed(name, dtype, shape, atol, rtol, note) -> OutputParity:
    inf = float("inf")
    return OutputParity(name=name, dtype=dtype, shape=tuple(int(s) for s in shape),
                        max_abs=inf, max_rel=inf, mean_abs=inf, mismatch_fraction=1.0,
                        worst_index=(), nan_count=0, inf_count=0, atol=float(atol),
                        rtol=float(rtol), min_atol=inf, passed=False, note=note)


# ---------------------------------------------------------------------------------------------
# Policy


def compare(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
            table: ToleranceTable | None = None,
            leave_out: Mapping[str, np.ndarray] | None = None) -> list[OutputParity]:
    """One record per output, in expected order, then unexpected extras. A missing or extra
    output is a failing record: outputs are matched by name, never zipped. ``leave_out``: per
    output, the positions not compared (see measure)."""
    table = table or ToleranceTable()
    leave_out = leave_out or {}
    records = []
    for name, ref in expected.items():
        ref = np.asarray(ref)
        tol = table.lookup(name, str(ref.dtype))
        if name not in actual:
            records.append(_failed(name, str(ref.dtype), ref.shape, tol.atol, tol.rtol,
                                   "missing from the actual outputs"))
            continue
        records.append(measure(name, actual[name], ref, atol=tol.atol, rtol=tol.rtol,
                               leave_out=leave_out.get(name)))
    for name in sorted(set(actual) - set(expected)):
        got = np.asarray(actual[name])
        tol = table.lookup(name, str(got.dtype))
        records.append(_failed(name, str(got.dtype), got.shape, tol.atol, tol.rtol,
                               "not among the expected outputs"))
    return records


def parity_record(variant: str, provider: str, point: Mapping[str, int],
                  outputs: Sequence[OutputParity]) -> ParityRecord:
    """A ParityRecord whose `passed` is derived from its outputs (never set by hand)."""
    return ParityRecord(variant, provider, dict(point), all(o.passed for o in outputs),
                        tuple(outputs))


def check(records: Iterable[OutputParity | ParityRecord]) -> None:
    """Raise ParityError listing every failing output at once; return None if all passed."""
    records = list(records)
    failing = [r for r in records if not r.passed]
    if not failing:
        return
    lines = [line for r in failing for line in _failure_lines(r)]
    noun = "output" if isinstance(failing[0], OutputParity) else "record"
    head = f"parity failed: {len(failing)} of {len(records)} {noun}s"
    raise ParityError("\n".join([head, *lines]), failing, records)


def _failure_lines(r: OutputParity | ParityRecord) -> list[str]:
    if isinstance(r, OutputParity):
        return ["  " + describe(r)]
    where = f"{r.variant} on {r.provider} at {_point_text(r.point)}"
    return [f"  {where}: {describe(o)}" for o in r.outputs if not o.passed]


def describe(o: OutputParity) -> str:
    """One line: the output, its numbers, its tolerance and the atol that would have passed."""
    if o.note:
        return f"{o.name}: {o.note}"
    left = f"; {o.excluded} undefined positions left out" if o.excluded else ""
    return (f"{o.name}: max_abs {o.max_abs:.3g}, max_rel {o.max_rel:.3g}, "
            f"mismatch {o.mismatch_fraction:.2%}, worst at {list(o.worst_index)}, "
            f"nan {o.nan_count}, inf {o.inf_count}; atol {o.atol:g}, rtol {o.rtol:g}; "
            f"passes with atol >= {o.min_atol:.3g}{left}")


def _point_text(point: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "-"


# ---------------------------------------------------------------------------------------------
# Reports


_COLUMNS = ("variant", "provider", "point", "output", "max_abs", "max_rel", "min_atol",
            "atol", "rtol", "result")


def _rows(records: Iterable[ParityRecord]) -> list[tuple[str, ...]]:
    rows = []
    for r in records:
        for o in r.outputs:
            result = "pass" if o.passed else ("FAIL: " + o.note if o.note else "FAIL")
            rows.append((r.variant, r.provider, _point_text(r.point), o.name,
                         f"{o.max_abs:.3g}", f"{o.max_rel:.3g}", f"{o.min_atol:.3g}",
                         f"{o.atol:g}", f"{o.rtol:g}", result))
    return rows


def report_text(records: Iterable[ParityRecord]) -> str:
    """A plain-text console table, one row per record and output."""
    rows = [_COLUMNS, *_rows(records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_markdown(records: Iterable[ParityRecord]) -> str:
    rows = _rows(records)
    out = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(out)


def report_json(records: Iterable[ParityRecord]) -> str:
    """Strict JSON (non-finite numbers as "nan"/"inf" strings, as in manifest.json)."""
    records = list(records)
    doc = {"passed": all(r.passed for r in records),
           "records": [parity_record_dict(r) for r in records]}
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False)


def report_junit(records: Iterable[ParityRecord], *, suite: str = "attnx.parity") -> str:
    """JUnit XML for CI: one testcase per record and output; a miss is a <failure>."""
    records = list(records)
    cases = [(r, o) for r in records for o in r.outputs]
    failures = sum(not o.passed for _, o in cases)
    root = ET.Element("testsuite", name=suite, tests=str(len(cases)),
                      failures=str(failures), errors="0")
    for r, o in cases:
        case = ET.SubElement(root, "testcase", classname=f"{suite}.{r.variant}.{r.provider}",
                             name=f"{o.name}[{_point_text(r.point)}]")
        if not o.passed:
            ET.SubElement(case, "failure", message=describe(o), type="ParityError").text = (
                describe(o))
    return ET.tostring(root, encoding="unicode", xml_declaration=True)
