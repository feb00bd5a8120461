"""manifest.json: round trip and every malformed case of reliability.md §3.8 / §5.12."""

from __future__ import annotations

import copy
import json
import math

import pytest

import runtime._manifest as manifest_module
from runtime import ArtifactError, Manifest, Tolerance, Variant


def test_round_trip_is_exact(manifest_dict):
    m = Manifest.from_dict(manifest_dict)
    assert Manifest.loads(m.to_json()) == m
    assert json.loads(m.to_json()) == m.to_dict()
    assert m.input_names == ["x", "m"] and m.output_names == ["y"]
    assert m.format_version == manifest_module.FORMAT_VERSION


def test_to_json_is_sorted_and_strict(manifest_dict):
    text = Manifest.from_dict(manifest_dict).to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_nonfinite_measurements_round_trip_as_strings(manifest_dict):
    d = copy.deepcopy(manifest_dict)
    out = d["parity"][0]["outputs"][0]
    out.update(max_abs="nan", min_atol="inf", passed=False, note="poisoned")
    m = Manifest.from_dict(d)
    parsed = m.parity[0].outputs[0]
    assert math.isnan(parsed.max_abs) and parsed.min_atol == math.inf
    again = Manifest.loads(m.to_json()).parity[0].outputs[0]
    assert math.isnan(again.max_abs) and again.note == "poisoned"


def test_unknown_variant_lists_known_ones(manifest_dict):
    with pytest.raises(ArtifactError, match=r"unknown variant 'fast'; known variants: base, alt"):
        Manifest.from_dict(manifest_dict).variant("fast")


def test_file_lookup_names_missing_path(manifest_dict):
    with pytest.raises(ArtifactError, match=r"manifest.json: files: no entry for 'nope.onnx'"):
        Manifest.from_dict(manifest_dict).file("nope.onnx")


# Malformed text: (text, message pattern). Each must be an ArtifactError naming manifest.json.
TEXT_CASES = {
    "not_json": ("{not json", r"manifest.json: not valid JSON \(JSONDecodeError"),
    "empty": ("", r"manifest.json: empty file"),
    "whitespace": ("  \n", r"manifest.json: empty file"),
    "bom": ("\ufeff{}", r"manifest.json: not valid JSON .*BOM"),
    "trailing_comma": ('{"a": 1,}', r"manifest.json: not valid JSON"),
    "nan_literal": ('{"atol": NaN}', r"manifest.json: NaN is not valid JSON"),
    "infinity_literal": ('{"atol": -Infinity}', r"manifest.json: -Infinity is not valid JSON"),
    "duplicate_key": ('{"sha256": "a", "sha256": "b"}', r"manifest.json: duplicate key 'sha256'"),
    "deep_nesting": ("[" * 100_000 + "]" * 100_000, r"manifest.json: not valid JSON \(Recursion"),
    "huge_int": ('{"opset": ' + "9" * 5000 + "}", r"manifest.json: not valid JSON \(ValueError"),
    "top_level_list": ("[]", r"manifest.json: expected a JSON object at the top level, got list"),
    "not_utf8": (b"{\xff}", r"manifest.json: not UTF-8 text"),
}


@pytest.mark.parametrize("text,match", TEXT_CASES.values(), ids=TEXT_CASES.keys())
def test_malformed_text(text, match):
    with pytest.raises(ArtifactError, match=match):
        Manifest.loads(text)


def test_oversized_manifest(monkeypatch):
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(ArtifactError, match=r"manifest.json: 101 bytes is over the 100-byte limit"):
        Manifest.loads(" " * 101)


def _set(path, value):
    """A mutation that sets d[path...] = value (value DELETE removes the key)."""

    def mutate(d):
        *head, last = path
        for key in head:
            d = d[key]
        if value is DELETE:
            del d[last]
        else:
            d[last] = value

    return mutate


DELETE = object()
T0 = ("variants", 0, "tolerance", "float32")
# (mutation of a valid manifest dict, message pattern)
DICT_CASES = {
    "missing_opset": (_set(("opset",), DELETE), r"manifest.json: opset: missing required key"),
    "missing_atol": (
        _set((*T0, "atol"), DELETE),
        r"variants\[0\].tolerance.float32.atol: missing required key",
    ),
    "unknown_top_key": (_set(("typo",), 1), r"manifest.json: unknown key\(s\) 'typo'"),
    "opset_string": (_set(("opset",), "18"), r"opset: expected an integer >= 1, got '18'"),
    "opset_bool": (_set(("opset",), True), r"opset: expected an integer >= 1, got True"),
    "opset_float": (_set(("opset",), 18.0), r"opset: expected an integer >= 1, got 18.0"),
    "inputs_not_list": (_set(("inputs",), {}), r"manifest.json: inputs: expected a list, got dict"),
    "dims_not_object": (_set(("dims",), []), r"manifest.json: dims: expected an object, got list"),
    "name_empty": (_set(("name",), ""), r"manifest.json: name: expected a non-empty string"),
    "format_wrong": (_set(("format",), "onnx"), r"format: expected 'attnx.bundle', got 'onnx'"),
    "version_newer": (
        _set(("format_version",), 4),
        r"manifest.json: format_version: bundle format_version 4 is newer than this attnx "
        r"supports \(3\); upgrade attnx",
    ),
    "version_zero": (_set(("format_version",), 0), r"format_version: expected an integer >= 1"),
    "sha_upper": (
        _set(("files", 0, "sha256"), "A" * 64),
        r"files\[0\].sha256: expected 64 lowercase hex digits, got 'AAAA",
    ),
    "sha_short": (_set(("files", 0, "sha256"), "ab"), r"files\[0\].sha256: expected 64 lowercase"),
    "size_negative": (_set(("files", 0, "size"), -1), r"files\[0\].size: expected an integer >= 0"),
    "path_dotdot": (
        _set(("files", 0, "path"), "../x.onnx"),
        r"files\[0\].path: expected a relative path .* got '../x.onnx'",
    ),
    "path_absolute": (
        _set(("files", 0, "path"), "/etc/passwd"),
        r"files\[0\].path: expected a relative path",
    ),
    "path_hidden": (
        _set(("files", 0, "path"), "sub/.hidden"),
        r"files\[0\].path: expected a relative path",
    ),
    "path_backslash": (_set(("files", 0, "path"), "a\\b"), r"files\[0\].path: expected a relative"),
    "path_manifest": (
        _set(("files", 0, "path"), "manifest.json"),
        r"files\[0\].path: 'manifest.json' is listed twice or names the manifest",
    ),
    "atol_negative": (
        _set((*T0, "atol"), -1e-5),
        r"manifest.json: variants\[0\].tolerance.float32.atol: expected a finite "
        r"number >= 0, got -1e-05",
    ),
    "atol_nan": (
        _set((*T0, "atol"), float("nan")),
        r"variants\[0\].tolerance.float32.atol: expected a finite number >= 0, got nan",
    ),
    "rtol_inf": (
        _set((*T0, "rtol"), float("inf")),
        r"variants\[0\].tolerance.float32.rtol: expected a finite number >= 0, got inf",
    ),
    "atol_string": (_set((*T0, "atol"), "1e-5"), r"float32.atol: expected a finite number"),
    "tolerance_bad_dtype": (
        _set(("variants", 0, "tolerance", "complex"), {"atol": 0, "rtol": 0}),
        r"variants\[0\].tolerance.complex: expected a numeric dtype name",
    ),
    "outputs_tolerance_unknown": (
        _set(("variants", 0, "outputs_tolerance", "z"), {"atol": 0, "rtol": 0}),
        r"variants\[0\].outputs_tolerance.z: 'z' is not an output \(outputs: y\)",
    ),
    "unknown_dim_in_input": (
        _set(("inputs", 0, "shape", 1), "sq"),
        r"inputs\[0\].shape\[1\]: dim 'sq' is not declared in dims \(declared: batch, seq\)",
    ),
    "negative_static_dim": (
        _set(("inputs", 0, "shape", 2), -8),
        r"inputs\[0\].shape\[2\]: expected an integer >= 0",
    ),
    "dtype_object": (
        _set(("inputs", 0, "dtype"), "object"),
        r"inputs\[0\].dtype: expected a numeric dtype name .* got 'object'",
    ),
    "dim_max_below_min": (
        _set(("dims", "seq", "max"), 0),
        r"dims.seq: max \(0\) is below min \(1\)",
    ),
    "dim_bad_name": (
        _set(("dims", "a b"), {"min": 1, "max": 2}),
        r"dims.a b: expected a dim name made of letters",
    ),
    "duplicate_tensor_name": (
        _set(("outputs", 0, "name"), "x"),
        r"inputs: tensor names must be unique",
    ),
    "no_outputs": (_set(("outputs",), []), r"manifest.json: outputs: expected at least one"),
    "variant_file_unlisted": (
        _set(("variants", 0, "file"), "model.fast.onnx"),
        r"variants\[0\].file: 'model.fast.onnx' is not listed in files",
    ),
    "variant_no_providers": (
        _set(("variants", 0, "providers"), []),
        r"variants\[0\].providers: expected at least one provider",
    ),
    "variant_duplicate": (
        _set(("variants", 1, "name"), "base"),
        r"variants: expected at least one variant, names unique",
    ),
    "parity_unknown_variant": (
        _set(("parity", 0, "variant"), "gone"),
        r"parity\[0\].variant: 'gone' is not a variant \(base, alt\)",
    ),
    "parity_passed_string": (
        _set(("parity", 0, "passed"), "yes"),
        r"parity\[0\].passed: expected true or false, got 'yes'",
    ),
    "parity_point_unknown_dim": (
        _set(("parity", 0, "point", "heads"), 2),
        r"parity\[0\].point.heads: dim 'heads' is not declared in dims",
    ),
    "parity_max_abs_text": (
        _set(("parity", 0, "outputs", 0, "max_abs"), "big"),
        r"outputs\[0\].max_abs: expected a number or one of 'nan'",
    ),
    "golden_file_unlisted": (
        _set(("golden", "file"), "other.npz"),
        r"golden.file: 'other.npz' is not listed in files",
    ),
    "golden_inputs_keys": (
        _set(("golden", "cases", 0, "inputs"), {"x": "case0.in.x"}),
        r"golden.cases\[0\].inputs: expected keys \['m', 'x'\], got \['x'\]",
    ),
    "producer_not_str": (_set(("producer", "onnx"), 1), r"producer.onnx: expected a non-empty str"),
    "extra_not_object": (_set(("extra",), []), r"manifest.json: extra: expected an object"),
}


@pytest.mark.parametrize("mutate,match", DICT_CASES.values(), ids=DICT_CASES.keys())
def test_malformed_dict(manifest_dict, mutate, match):
    d = copy.deepcopy(manifest_dict)
    mutate(d)
    with pytest.raises(ArtifactError, match=match):
        Manifest.from_dict(d)


@pytest.mark.parametrize(
    "mutate,match",
    [DICT_CASES["missing_opset"], DICT_CASES["sha_upper"]],
    ids=["missing_opset", "sha_upper"],
)
def test_malformed_text_reports_key_path_too(manifest_dict, mutate, match):
    d = copy.deepcopy(manifest_dict)
    mutate(d)
    with pytest.raises(ArtifactError, match=match):
        Manifest.loads(json.dumps(d))


def test_variant_defaults_are_empty_tables():
    v = Variant("base", "model.onnx", ("CPUExecutionProvider",))
    assert dict(v.tolerance) == {} and dict(v.outputs_tolerance) == {}
    assert Tolerance(1e-5, 1e-4).atol == 1e-5
