"""Parity measurement and policy (numpy only)."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from runtime import (
    EXACT,
    FLOAT16_TOLERANCE,
    FLOAT32_TOLERANCE,
    Manifest,
    ParityError,
    Tolerance,
    ToleranceTable,
    Variant,
    check,
    compare,
    describe,
    measure,
    parity_record,
    report_json,
    report_junit,
    report_markdown,
    report_text,
)

RNG = np.random.default_rng(7)
REF = RNG.standard_normal((2, 3, 4)).astype(np.float32)
TABLE = ToleranceTable()


def test_identical_passes_with_zero_error():
    o = measure("y", REF, REF.copy(), atol=1e-5, rtol=1e-4)
    assert o.passed and o.max_abs == 0 and o.max_rel == 0 and o.min_atol == 0
    assert o.mismatch_fraction == 0 and o.nan_count == 0 and o.shape == (2, 3, 4)


def test_perturbed_element_is_measured_exactly():
    got = REF.copy()
    got[1, 2, 3] += 0.5
    o = measure("y", got, REF, atol=1e-5, rtol=1e-4)
    diff = abs(float(got[1, 2, 3]) - float(REF[1, 2, 3]))
    assert not o.passed
    assert o.max_abs == pytest.approx(diff)
    assert o.max_rel == pytest.approx(diff / abs(float(REF[1, 2, 3])))
    assert o.worst_index == (1, 2, 3)
    assert o.mismatch_fraction == pytest.approx(1 / REF.size)
    assert o.min_atol == pytest.approx(diff - 1e-4 * abs(float(REF[1, 2, 3])))
    # min_atol is the boundary: it passes at min_atol and fails just below it.
    assert measure("y", got, REF, atol=o.min_atol * (1 + 1e-9), rtol=1e-4).passed
    assert not measure("y", got, REF, atol=o.min_atol * (1 - 1e-6), rtol=1e-4).passed


def test_rule_is_relative_to_expected():
    # |a - b| <= atol + rtol * |b| with b the expected side.
    assert measure("y", np.array([1.0]), np.array([1.1]), atol=0, rtol=0.095).passed
    assert not measure("y", np.array([1.1]), np.array([1.0]), atol=0, rtol=0.095).passed


@pytest.mark.parametrize("side", ["actual", "expected"])
def test_nan_on_either_side_fails(side):
    bad = REF.copy()
    bad[0, 1, 2] = np.nan
    a, b = (bad, REF) if side == "actual" else (REF, bad)
    o = measure("y", a, b, atol=1e9, rtol=1e9)
    assert not o.passed and o.nan_count == 1 and o.worst_index == (0, 1, 2)
    assert o.min_atol == math.inf  # no tolerance rescues NaN
    assert o.max_abs == 0  # measured over the elements that are numbers


def test_equal_infinities_match_and_unequal_fail():
    inf = np.array([np.inf, -np.inf, 1.0])
    assert measure("y", inf, inf.copy(), atol=0, rtol=0).passed
    o = measure("y", np.array([np.inf, 1.0]), np.array([1.0, 1.0]), atol=1, rtol=1)
    assert not o.passed and o.inf_count == 1 and o.max_abs == math.inf


def test_shape_mismatch_is_a_failing_record_not_a_crash():
    o = measure("y", REF[:, :2], REF, atol=1, rtol=1)
    assert not o.passed and "shape [2, 2, 4] differs from expected [2, 3, 4]" in o.note


def test_empty_arrays_pass():
    o = measure("y", np.zeros((0, 4)), np.zeros((0, 4)), atol=0, rtol=0)
    assert o.passed and o.max_abs == 0 and o.worst_index == ()


def test_default_table_by_dtype():
    assert TABLE.lookup("y", "float32") == FLOAT32_TOLERANCE == Tolerance(1e-5, 1e-4)
    assert TABLE.lookup("y", "float16") == FLOAT16_TOLERANCE == Tolerance(2e-2, 1e-2)
    assert TABLE.lookup("ids", "int64") == EXACT == TABLE.lookup("mask", "bool")


def test_table_from_variant_overrides_dtype_then_output():
    v = Variant(
        "fp16",
        "m.onnx",
        ("CUDAExecutionProvider",),
        {"float32": Tolerance(1e-3, 0)},
        {"y": Tolerance(0.5, 0.5)},
    )
    table = ToleranceTable.from_variant(v)
    assert table.lookup("y", "float32") == Tolerance(0.5, 0.5)
    assert table.lookup("z", "float32") == Tolerance(1e-3, 0)
    assert table.lookup("z", "float16") == FLOAT16_TOLERANCE


def test_int_outputs_must_match_exactly():
    (o,) = compare({"ids": np.array([1, 2, 4])}, {"ids": np.array([1, 2, 3])})
    assert not o.passed and o.atol == 0 and o.max_abs == 1


def test_compare_matches_names_never_zips():
    actual = {"extra": REF, "y": REF}
    records = compare(actual, {"y": REF, "k": REF}, TABLE)
    by_name = {r.name: r for r in records}
    assert [r.name for r in records] == ["y", "k", "extra"]
    assert by_name["y"].passed
    assert by_name["k"].note == "missing from the actual outputs" and not by_name["k"].passed
    assert by_name["extra"].note == "not among the expected outputs"


def test_check_passes_silently():
    assert check(compare({"y": REF}, {"y": REF})) is None


def test_check_lists_every_failing_output_at_once():
    got_y, got_z = REF + 1e-2, REF.copy()
    got_z[0, 0, 0] = np.nan
    records = compare(
        {"y": got_y, "z": got_z, "w": REF}, {"y": REF, "z": REF, "w": REF, "k": REF}, TABLE
    )
    with pytest.raises(ParityError) as info:
        check(records)
    msg = str(info.value)
    assert msg.startswith("parity failed: 3 of 4 outputs")
    assert "y: max_abs 0.01, max_rel" in msg and "passes with atol >= 0.01" in msg
    assert "z: max_abs 0, max_rel 0, mismatch 4.17%, worst at [0, 0, 0], nan 1" in msg
    assert "passes with atol >= inf" in msg
    assert "k: missing from the actual outputs" in msg
    assert "w:" not in msg
    assert [r.name for r in info.value.records] == ["y", "z", "k"]


def test_check_of_parity_records_names_variant_provider_point():
    bad = parity_record(
        "fp16", "CUDAExecutionProvider", {"batch": 1, "seq": 3}, compare({"y": REF + 1}, {"y": REF})
    )
    good = parity_record(
        "base", "CPUExecutionProvider", {"batch": 1, "seq": 3}, compare({"y": REF}, {"y": REF})
    )
    assert good.passed and not bad.passed
    with pytest.raises(
        ParityError,
        match=r"(?s)1 of 2 records.*fp16 on CUDAExecutionProvider "
        r"at batch=1, seq=3: y: max_abs 1,",
    ) as info:
        check([good, bad])
    assert info.value.records == (bad,)


def _records():
    ok = parity_record(
        "base", "CPUExecutionProvider", {"batch": 2, "seq": 5}, compare({"y": REF}, {"y": REF})
    )
    fail = parity_record(
        "alt", "CPUExecutionProvider", {"batch": 1, "seq": 3}, compare({"y": REF + 1}, {"y": REF})
    )
    missing = parity_record(
        "alt", "CPUExecutionProvider", {"batch": 1, "seq": 1}, compare({}, {"y": REF})
    )
    return [ok, fail, missing]


def test_text_and_markdown_reports():
    text = report_text(_records())
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["variant", "provider", "point", "output"]
    assert len(lines) == 2 + 3 and "FAIL" in lines[3] and lines[2].endswith("pass")
    md = report_markdown(_records())
    assert md.splitlines()[0].startswith("| variant | provider |")
    assert "| FAIL: missing from the actual outputs |" in md


def test_json_report_is_strict_and_round_trips_nonfinite():
    doc = json.loads(report_json(_records()), parse_constant=pytest.fail)
    assert doc["passed"] is False and len(doc["records"]) == 3
    missing = doc["records"][2]["outputs"][0]
    assert missing["max_abs"] == "inf" and missing["note"] == "missing from the actual outputs"


def test_junit_xml_parses_and_holds_the_failure():
    root = ET.fromstring(report_junit(_records(), suite="tiny"))
    assert root.tag == "testsuite" and root.get("tests") == "3" and root.get("failures") == "2"
    cases = root.findall("testcase")
    assert [c.find("failure") is None for c in cases] == [True, False, False]
    failure = cases[1].find("failure")
    assert failure.get("type") == "ParityError" and "max_abs 1," in failure.get("message")
    assert cases[1].get("classname") == "tiny.alt.CPUExecutionProvider"


def test_describe_uses_note_when_present():
    (o,) = compare({}, {"y": REF})
    assert describe(o) == "y: missing from the actual outputs"


def test_records_survive_the_manifest(manifest_dict):
    m = Manifest.from_dict(manifest_dict)
    assert m.parity[0].passed and m.parity[0].outputs[0].name == "y"
