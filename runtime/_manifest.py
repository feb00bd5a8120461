"""manifest.json: the typed contract between the exporter (writer) and the runtime (reader).

The exporter builds these frozen dataclasses and calls `Manifest.to_json()`; the runtime reads
with `Manifest.loads()`, which trusts nothing: every key, type and cross reference is checked
and a problem raises ArtifactError("manifest.json: <key path>: <what>").

Measured values in parity records (max_abs, max_rel, mean_abs, min_atol) may be NaN or
infinite; strict JSON has no literal for those, so they are written as the strings "nan",
"inf" and "-inf". Tolerances must be finite numbers >= 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import ArtifactError

FORMAT = "attnx.bundle"
# 2: inputs may carry a value_range, and the manifest the machine that measured it.
# 3: the KV cache and the decode-loop parity are typed top-level keys ("cache",
# "decode_parity"); version 2 kept them untyped in "extra", where they are still read from.
# Parity outputs may count the positions they left out ("excluded").
# Older bundles load as they are.
FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.json"
# Far above any real manifest (a large shape grid is well under 1 MiB), far below a memory DoS.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024

SHA256_RE = re.compile(r"[0-9a-f]{64}")
# One path component: no leading dot (no hidden files, no "." or ".."), no separators.
PATH_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
DIM_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Numeric dtypes only: an object/string dtype would let a pickle or a cast in.
DTYPE_NAMES = frozenset(
    ["bool", "float16", "float32", "float64"]
    + [f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)]
)
NONFINITE_TEXT = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@dataclass(frozen=True)
class ValueRange:
    """Allowed values of an integer input, both ends inclusive (token ids: 0..vocab - 1)."""

    min: int
    max: int


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `shape` entries: int (static), dim name, or (outputs only)
    a derived expression such as "past + seq". `value_range`: integer inputs only; ONNX
    Gather wraps a negative index where torch raises, so the validator enforces it."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    value_range: ValueRange | None = None


@dataclass(frozen=True)
class DimRange:
    """Allowed range of a symbolic dim, both ends inclusive."""

    min: int
    max: int


@dataclass(frozen=True)
class Machine:
    """The machine that measured the bundle's parity records and timings (runtime._cpu)."""

    arch: str
    cpu_features: tuple[str, ...]


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Tolerance:
    """Pass rule per element: |actual - expected| <= atol + rtol * |expected|."""

    atol: float
    rtol: float


@dataclass(frozen=True)
class Variant:
    """One graph of the bundle. `tolerance` is keyed by dtype name; `outputs_tolerance` by
    output name and overrides the dtype entry."""

    name: str
    file: str
    providers: tuple[str, ...]
    tolerance: Mapping[str, Tolerance] = field(default_factory=dict)
    outputs_tolerance: Mapping[str, Tolerance] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputParity:
    """Measured agreement of one output with its reference, and whether it passed."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    mean_abs: float
    mismatch_fraction: float
    worst_index: tuple[int, ...]
    nan_count: int
    inf_count: int
    atol: float
    rtol: float
    min_atol: float
    passed: bool
    # Why a record failed without numbers (missing output, shape mismatch); empty otherwise.
    note: str = ""
    # Positions not compared because the model defines no answer there (a causal query whose
    # keys are all padding); format 3 and up.
    excluded: int = 0


@dataclass(frozen=True)
class ParityRecord:
    """All outputs of one variant on one provider at one shape point."""

    variant: str
    provider: str
    point: Mapping[str, int]
    passed: bool
    outputs: tuple[OutputParity, ...]


@dataclass(frozen=True)
class GoldenCase:
    """One golden sample: npz keys of its inputs and reference outputs, by tensor name."""

    point: Mapping[str, int]
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]


@dataclass(frozen=True)
class Golden:
    file: str
    cases: tuple[GoldenCase, ...]


@dataclass(frozen=True)
class CacheTensor:
    """One cache tensor: the past input fed at each step and the present output that becomes
    the next step's past; ``holds`` is "keys" or "values"."""

    past: str
    present: str
    holds: str


@dataclass(frozen=True)
class Cache:
    """How a runtime feeds a cached graph step after step, so that it guesses nothing.

    One graph serves the prefill (past length 0) and every decode step (past >= 1); the new
    tokens sit at positions past .. past + seq - 1 (bottom-right causal) and keys are cached
    after RoPE, at their own position. Each past input has the past dim at ``past_axis``, the
    batch dim at ``batch_axis`` and static sizes elsewhere, so an empty cache can be made from
    the manifest alone. ``max_length``: the most positions a cache may hold.
    ``token_input``/``logits_output``: a language model's token ids and logits (None for a block
    that takes hidden states). ``mask_input``: where the graph takes an attention mask, int64
    [batch, past + seq] with 1 at kept tokens and 0 at padding (a batch of prompts of different
    lengths is left-padded); ``position_input``: where it takes position ids, int64 [batch, seq],
    each new token's position counting the kept tokens before it (as transformers' generate
    makes them). None where the graph takes neither: positions are then past .. past + seq - 1.
    """

    tensors: tuple[CacheTensor, ...]
    layout: str
    past_axis: int
    batch_axis: int
    max_length: int
    past_dim: str = "past"
    seq_dim: str = "seq"
    batch_dim: str = "batch"
    token_input: str | None = None
    logits_output: str | None = None
    mask_input: str | None = None
    position_input: str | None = None

    @property
    def pasts(self) -> tuple[str, ...]:
        return tuple(t.past for t in self.tensors)

    @property
    def presents(self) -> tuple[str, ...]:
        return tuple(t.present for t in self.tensors)

    @property
    def is_lm(self) -> bool:
        return self.token_input is not None and self.logits_output is not None


@dataclass(frozen=True)
class DecodeParity:
    """The decode loop checked at export: ``runs`` are the (batch, seq, past) of each run's
    first step, each followed by ``steps`` decode steps; every record's point adds "run" and
    "step" to the dims."""

    steps: int
    runs: tuple[Mapping[str, int], ...]
    records: tuple[ParityRecord, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.records)


@dataclass(frozen=True)
class Manifest:
    name: str
    source: Mapping[str, Any]
    producer: Mapping[str, str]
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: Mapping[str, DimRange]
    files: tuple[FileEntry, ...]
    variants: tuple[Variant, ...]
    parity: tuple[ParityRecord, ...]
    golden: Golden
    extra: Mapping[str, Any] = field(default_factory=dict)
    machine: Machine | None = None
    cache: Cache | None = None
    decode_parity: DecodeParity | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Check and convert a parsed manifest; raises ArtifactError naming the key path."""
        return _parse_manifest(d)

    @classmethod
    def loads(cls, text: str | bytes) -> Manifest:
        """Strictly parse manifest.json text (see reliability.md §3.8)."""
        return _parse_manifest(_strict_json(text))

    def to_dict(self) -> dict[str, Any]:
        return _manifest_to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, allow_nan=False) + "\n"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.variants)
        raise ArtifactError(f"unknown variant {name!r}; known variants: {known}")

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise ArtifactError(f"{MANIFEST_NAME}: files: no entry for {path!r}")


# ---------------------------------------------------------------------------------------------
# Strict JSON


def _fail(where: str, what: str) -> ArtifactError:
    prefix = f"{MANIFEST_NAME}: {where}: " if where else f"{MANIFEST_NAME}: "
    return ArtifactError(prefix + what)


def _reject_constant(name: str):
    raise _fail("", f"{name} is not valid JSON (numbers must be finite)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # json keeps the last value silently; a duplicate sha256 key could hide a swap.
            raise _fail("", f"duplicate key {key!r}")
        out[key] = value
    return out


def _strict_json(text: str | bytes) -> Any:
    if len(text) > MAX_MANIFEST_BYTES:
        raise _fail("", f"{len(text)} bytes is over the {MAX_MANIFEST_BYTES}-byte limit")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _fail("", f"not UTF-8 text ({e})") from None
    if not text.strip():
        raise _fail("", "empty file")
    try:
        return json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates
        )
    # ValueError covers JSONDecodeError and over-long integers; RecursionError is absurd nesting.
    except (ValueError, RecursionError) as e:
        raise _fail("", f"not valid JSON ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# Field readers: each checks one value and names its key path in the error.


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"expected an object, got {type(value).__name__}")
    return value


def _keys(value: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()):
    d = _obj(value, where)
    for key in required:
        if key not in d:
            raise _fail(_join(where, key), "missing required key")
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        raise _fail(where, f"unknown key(s) {', '.join(map(repr, unknown))}")
    return d


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(where, f"expected a non-empty string, got {_show(value)}")
    return value


def _int(value: Any, where: str, minimum: int = 0) -> int:
    # bool is an int subclass in Python; true/false is never a count.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(where, f"expected an integer >= {minimum}, got {_show(value)}")
    return value


def _any_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"expected an integer, got {_show(value)}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"expected true or false, got {_show(value)}")
    return value


def _nonneg(value: Any, where: str) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise _fail(where, f"expected a finite number >= 0, got {_show(value)}")
    return float(value)


def _measured(value: Any, where: str) -> float:
    if isinstance(value, str) and value in NONFINITE_TEXT:
        return NONFINITE_TEXT[value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _fail(where, f"expected a number or one of 'nan', 'inf', '-inf', got {_show(value)}")


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(where, f"expected a list, got {type(value).__name__}")
    return value


def _dtype(value: Any, where: str) -> str:
    if value not in DTYPE_NAMES:
        raise _fail(where, f"expected a numeric dtype name ({', '.join(sorted(DTYPE_NAMES))})"
                    f", got {_show(value)}")
    return value


def _rel_path(value: Any, where: str) -> str:
    path = _str(value, where)
    parts = path.split("/")
    if not all(PATH_PART_RE.fullmatch(p) for p in parts):
        raise _fail(where, f"expected a relative path of plain names (no '..', no absolute "
                           f"path, no hidden or empty parts), got {_show(path)}")
    return path


def _point(value: Any, where: str, dims: Mapping[str, DimRange]) -> dict[str, int]:
    d = _obj(value, where)
    for name, size in d.items():
        if name not in dims:
            raise _fail(_join(where, name), f"dim {name!r} is not declared in dims")
        _int(size, _join(where, name))
    return dict(d)


def _names_map(value: Any, where: str, expected: list[str]) -> dict[str, str]:
    d = _obj(value, where)
    if sorted(d) != sorted(expected):
        raise _fail(where, f"expected keys {sorted(expected)}, got {sorted(d)}")
    return {k: _str(v, _join(where, k)) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------
# Sections


def _tensor(value: Any, where: str, dims: Mapping[str, DimRange], is_input: bool) -> TensorSpec:
    d = _keys(value, where, ("name", "dtype", "shape"), ("value_range",) if is_input else ())
    shape = []
    for i, entry in enumerate(_list(d["shape"], f"{where}.shape")):
        at = f"{where}.shape[{i}]"
        if isinstance(entry, str) and is_input:
            if entry not in dims:
                declared = ", ".join(dims) or "none"
                raise _fail(at, f"dim {entry!r} is not declared in dims (declared: {declared})")
            shape.append(entry)
        elif isinstance(entry, str):
            shape.append(_str(entry, at))  # outputs may use derived expressions
        else:
            shape.append(_int(entry, at))
    dtype = _dtype(d["dtype"], f"{where}.dtype")
    value_range = None
    if "value_range" in d:
        value_range = _value_range(d["value_range"], f"{where}.value_range", dtype)
    return TensorSpec(_str(d["name"], f"{where}.name"), dtype, tuple(shape), value_range)


def _value_range(value: Any, where: str, dtype: str) -> ValueRange:
    if "int" not in dtype:
        raise _fail(where, f"only integer inputs take a value range, not {dtype}")
    d = _keys(value, where, ("min", "max"))
    lo, hi = _any_int(d["min"], f"{where}.min"), _any_int(d["max"], f"{where}.max")
    if hi < lo:
        raise _fail(where, f"max ({hi}) is below min ({lo})")
    return ValueRange(lo, hi)


def _machine(value: Any) -> Machine:
    d = _keys(value, "machine", ("arch", "cpu_features"))
    features = _list(d["cpu_features"], "machine.cpu_features")
    return Machine(_str(d["arch"], "machine.arch"), tuple(
        _str(f, f"machine.cpu_features[{i}]") for i, f in enumerate(features)))


def _dims(value: Any) -> dict[str, DimRange]:
    out = {}
    for name, entry in _obj(value, "dims").items():
        at = f"dims.{name}"
        if not DIM_NAME_RE.fullmatch(name):
            raise _fail(at, "expected a dim name made of letters, digits and '_'")
        d = _keys(entry, at, ("min", "max"))
        lo, hi = _int(d["min"], f"{at}.min"), _int(d["max"], f"{at}.max")
        if hi < lo:
            raise _fail(at, f"max ({hi}) is below min ({lo})")
        out[name] = DimRange(lo, hi)
    return out


def _files(value: Any) -> tuple[FileEntry, ...]:
    out, seen = [], set()
    for i, entry in enumerate(_list(value, "files")):
        at = f"files[{i}]"
        d = _keys(entry, at, ("path", "sha256", "size"))
        path = _rel_path(d["path"], f"{at}.path")
        if path in seen or path == MANIFEST_NAME:
            raise _fail(f"{at}.path", f"{path!r} is listed twice or names the manifest")
        seen.add(path)
        sha = d["sha256"]
        if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
            raise _fail(f"{at}.sha256", f"expected 64 lowercase hex digits, got {_show(sha)}")
        out.append(FileEntry(path, sha, _int(d["size"], f"{at}.size")))
    return tuple(out)


def _tolerance(value: Any, where: str) -> Tolerance:
    d = _keys(value, where, ("atol", "rtol"))
    return Tolerance(_nonneg(d["atol"], f"{where}.atol"), _nonneg(d["rtol"], f"{where}.rtol"))


def _variant(value: Any, where: str, files: set[str], outputs: list[str]) -> Variant:
    d = _keys(value, where, ("name", "file", "providers"), ("tolerance", "outputs_tolerance"))
    file = _str(d["file"], f"{where}.file")
    if file not in files:
        raise _fail(f"{where}.file", f"{file!r} is not listed in files")
    providers = _list(d["providers"], f"{where}.providers")
    if not providers:
        raise _fail(f"{where}.providers", "expected at least one provider")
    tolerance = {
        _dtype(k, f"{where}.tolerance.{k}"): _tolerance(v, f"{where}.tolerance.{k}")
        for k, v in _obj(d.get("tolerance", {}), f"{where}.tolerance").items()
    }
    per_output = {}
    for k, v in _obj(d.get("outputs_tolerance", {}), f"{where}.outputs_tolerance").items():
        at = f"{where}.outputs_tolerance.{k}"
        if k not in outputs:
            raise _fail(at, f"{k!r} is not an output (outputs: {', '.join(outputs)})")
        per_output[k] = _tolerance(v, at)
    return Variant(
        _str(d["name"], f"{where}.name"),
        file,
        tuple(_str(p, f"{where}.providers[{i}]") for i, p in enumerate(providers)),
        tolerance,
        per_output,
    )


_OUTPUT_PARITY_KEYS = (
    "name", "dtype", "shape", "max_abs", "max_rel", "mean_abs", "mismatch_fraction",
    "worst_index", "nan_count", "inf_count", "atol", "rtol", "min_atol", "passed",
)


def _output_parity(value: Any, where: str) -> OutputParity:
    d = _keys(value, where, _OUTPUT_PARITY_KEYS, ("note", "excluded"))
    at = lambda k: f"{where}.{k}"  # noqa: E731 - a key-path shorthand, local to this reader
    return OutputParity(
        name=_str(d["name"], at("name")),
        dtype=_str(d["dtype"], at("dtype")),
        shape=tuple(_int(s, f"{at('shape')}[{i}]") for i, s in enumerate(
            _list(d["shape"], at("shape")))),
        max_abs=_measured(d["max_abs"], at("max_abs")),
        max_rel=_measured(d["max_rel"], at("max_rel")),
        mean_abs=_measured(d["mean_abs"], at("mean_abs")),
        mismatch_fraction=_nonneg(d["mismatch_fraction"], at("mismatch_fraction")),
        worst_index=tuple(_int(s, f"{at('worst_index')}[{i}]") for i, s in enumerate(
            _list(d["worst_index"], at("worst_index")))),
        nan_count=_int(d["nan_count"], at("nan_count")),
        inf_count=_int(d["inf_count"], at("inf_count")),
        atol=_nonneg(d["atol"], at("atol")),
        rtol=_nonneg(d["rtol"], at("rtol")),
        min_atol=_measured(d["min_atol"], at("min_atol")),
        passed=_bool(d["passed"], at("passed")),
        note=_str(d["note"], at("note")) if "note" in d else "",
        excluded=_int(d["excluded"], at("excluded")) if "excluded" in d else 0,
    )


def _parity(value: Any, where: str, variants: list[str], dims) -> ParityRecord:
    d = _keys(value, where, ("variant", "provider", "point", "passed", "outputs"))
    variant = _str(d["variant"], f"{where}.variant")
    if variant not in variants:
        raise _fail(f"{where}.variant", f"{variant!r} is not a variant ({', '.join(variants)})")
    outputs = tuple(_output_parity(o, f"{where}.outputs[{i}]")
                    for i, o in enumerate(_list(d["outputs"], f"{where}.outputs")))
    return ParityRecord(variant, _str(d["provider"], f"{where}.provider"),
                        _point(d["point"], f"{where}.point", dims),
                        _bool(d["passed"], f"{where}.passed"), outputs)


def _golden(value: Any, files: set[str], dims, inputs: list[str], outputs: list[str]) -> Golden:
    d = _keys(value, "golden", ("file", "cases"))
    file = _str(d["file"], "golden.file")
    if file not in files:
        raise _fail("golden.file", f"{file!r} is not listed in files")
    cases = []
    for i, case in enumerate(_list(d["cases"], "golden.cases")):
        at = f"golden.cases[{i}]"
        c = _keys(case, at, ("point", "inputs", "outputs"))
        cases.append(GoldenCase(_point(c["point"], f"{at}.point", dims),
                                _names_map(c["inputs"], f"{at}.inputs", inputs),
                                _names_map(c["outputs"], f"{at}.outputs", outputs)))
    return Golden(file, tuple(cases))


_CACHE_KEYS = ("tensors", "layout", "past_axis", "batch_axis", "max_length", "past_dim",
               "seq_dim", "batch_dim", "token_input", "logits_output")
_CACHE_OPTIONAL = ("mask_input", "position_input")
# What every cache of this format is: written out so that a reader of the JSON sees it, and
# checked so that a cache of another kind is refused rather than fed wrongly.
CACHE_FIXED = {"graphs": "single", "keys": "post-rope", "position_offset": "past"}
CACHE_HOLDS = ("keys", "values")


def _cache(value: Any, where: str, inputs: Mapping[str, TensorSpec],
           outputs: Mapping[str, TensorSpec], dims: Mapping[str, DimRange],
           legacy: bool) -> Cache:
    # Version 2 kept the cache in extra with a version of its own (1).
    d = _keys(value, where, _CACHE_KEYS + tuple(CACHE_FIXED) + (("version",) if legacy else ()),
              _CACHE_OPTIONAL)
    if legacy and d["version"] != 1:
        raise _fail(f"{where}.version", f"expected 1, got {_show(d['version'])}")
    for key, want in CACHE_FIXED.items():
        if d[key] != want:
            raise _fail(f"{where}.{key}", f"this attnx feeds one graph for prefill and decode, "
                        f"positions continuing from the past, keys cached after RoPE; expected "
                        f"{want!r}, got {_show(d[key])}")
    names = {}
    for key in ("past_dim", "seq_dim", "batch_dim"):
        names[key] = _str(d[key], f"{where}.{key}")
        if names[key] not in dims:
            raise _fail(f"{where}.{key}", f"{names[key]!r} is not a dim of the bundle "
                        f"({', '.join(dims)})")
    tensors = _list(d["tensors"], f"{where}.tensors")
    if not tensors:
        raise _fail(f"{where}.tensors", "expected at least one {past, present, holds} object")
    cache = Cache(
        tensors=tuple(_cache_tensor(t, f"{where}.tensors[{i}]", inputs, outputs)
                      for i, t in enumerate(tensors)),
        layout=_str(d["layout"], f"{where}.layout"),
        past_axis=_int(d["past_axis"], f"{where}.past_axis"),
        batch_axis=_int(d["batch_axis"], f"{where}.batch_axis"),
        max_length=_int(d["max_length"], f"{where}.max_length", minimum=1),
        token_input=_tensor_name(d["token_input"], f"{where}.token_input", inputs, "an input",
                                 optional=True),
        logits_output=_tensor_name(d["logits_output"], f"{where}.logits_output", outputs,
                                   "an output", optional=True),
        mask_input=_tensor_name(d.get("mask_input"), f"{where}.mask_input", inputs, "an input",
                                optional=True),
        position_input=_tensor_name(d.get("position_input"), f"{where}.position_input", inputs,
                                    "an input", optional=True),
        **names,
    )
    past_max = dims[cache.past_dim].max
    if cache.max_length > past_max:
        raise _fail(f"{where}.max_length", f"{cache.max_length} exceeds {past_max}, the "
                    f"{cache.past_dim!r} dim's max")
    for i, t in enumerate(cache.tensors):
        _check_past_shape(inputs[t.past], f"{where}.tensors[{i}].past", cache)
    if cache.mask_input is not None:
        _check_step_input(inputs[cache.mask_input], f"{where}.mask_input", cache, None)
    if cache.position_input is not None:
        _check_step_input(inputs[cache.position_input], f"{where}.position_input", cache,
                          cache.seq_dim)
    return cache


def _check_step_input(spec: TensorSpec, where: str, cache: Cache, length: str | None) -> None:
    """A mask or position input: int64 [batch, length], length a dynamic dim (``length``
    where given; the mask's counts past + seq positions, a dim of its own)."""
    shape = list(spec.shape)
    fits = (len(shape) == 2 and shape[0] == cache.batch_dim and isinstance(shape[1], str)
            and (length is None or shape[1] == length))
    if spec.dtype != "int64" or not fits:
        want = f"[{cache.batch_dim!r}, {length!r}]" if length else f"[{cache.batch_dim!r}, a dim]"
        raise _fail(where, f"input {spec.name!r} ({spec.dtype} {shape}) must be int64 {want}")


def _cache_tensor(value: Any, where: str, inputs, outputs) -> CacheTensor:
    d = _keys(value, where, ("past", "present", "holds"))
    if d["holds"] not in CACHE_HOLDS:
        raise _fail(f"{where}.holds", f"expected one of {CACHE_HOLDS}, got {_show(d['holds'])}")
    return CacheTensor(_tensor_name(d["past"], f"{where}.past", inputs, "an input"),
                       _tensor_name(d["present"], f"{where}.present", outputs, "an output"),
                       d["holds"])


def _tensor_name(value: Any, where: str, tensors: Mapping[str, TensorSpec], kind: str,
                 optional: bool = False) -> str | None:
    """A name of one of ``tensors``; None where ``optional`` (the model has no such tensor)."""
    if value is None and optional:
        return None
    name = _str(value, where)
    if name not in tensors:
        raise _fail(where, f"{name!r} is not {kind} of the bundle ({', '.join(tensors)})")
    return name


def _check_past_shape(spec: TensorSpec, where: str, cache: Cache) -> None:
    """The past input has the past dim at past_axis, the batch dim at batch_axis and static
    sizes elsewhere (so that an empty cache can be made from the manifest alone)."""
    shape = list(spec.shape)
    for axis, dim in ((cache.past_axis, cache.past_dim), (cache.batch_axis, cache.batch_dim)):
        if axis >= len(shape) or shape[axis] != dim:
            raise _fail(where, f"axis {axis} of input {spec.name!r} (shape {shape}) is not the "
                        f"{dim!r} dim")
    for axis, dim in enumerate(shape):
        if isinstance(dim, str) and axis not in (cache.past_axis, cache.batch_axis):
            raise _fail(where, f"input {spec.name!r} (shape {shape}) has the dynamic dim "
                        f"{dim!r} at axis {axis}; a cache may vary only in batch and past")


# Decode records add these to the dims of their point; any count is allowed.
DECODE_POINT = {"run": DimRange(0, 2**31), "step": DimRange(0, 2**31)}


def _decode_parity(value: Any, where: str, variants: list[str], dims) -> DecodeParity:
    d = _keys(value, where, ("steps", "runs", "records"), ("passed",))
    if "passed" in d:  # written by version 2, derived from the records since
        _bool(d["passed"], f"{where}.passed")
    at = {**dims, **DECODE_POINT}
    return DecodeParity(
        steps=_int(d["steps"], f"{where}.steps", minimum=1),
        runs=tuple(_point(r, f"{where}.runs[{i}]", dims)
                   for i, r in enumerate(_list(d["runs"], f"{where}.runs"))),
        records=tuple(_parity(r, f"{where}.records[{i}]", variants, at)
                      for i, r in enumerate(_list(d["records"], f"{where}.records"))),
    )


_TOP_KEYS = ("format", "format_version", "name", "source", "producer", "opset", "inputs",
             "outputs", "dims", "files", "variants", "parity", "golden")


def _parse_manifest(d: Any) -> Manifest:
    if not isinstance(d, dict):
        raise _fail("", f"expected a JSON object at the top level, got {type(d).__name__}")
    # The version is checked before the rest: a newer format may legitimately differ anywhere.
    if "format_version" in d:
        version = _int(d["format_version"], "format_version", minimum=1)
        if version > FORMAT_VERSION:
            raise _fail("format_version", f"bundle format_version {version} is newer than this "
                        f"attnx supports ({FORMAT_VERSION}); upgrade attnx")
    d = _keys(d, "", _TOP_KEYS, ("extra", "machine", "cache", "decode_parity"))
    if d["format"] != FORMAT:
        raise _fail("format", f"expected {FORMAT!r}, got {_show(d['format'])}")
    dims = _dims(d["dims"])
    inputs = tuple(_tensor(t, f"inputs[{i}]", dims, True)
                   for i, t in enumerate(_list(d["inputs"], "inputs")))
    outputs = tuple(_tensor(t, f"outputs[{i}]", dims, False)
                    for i, t in enumerate(_list(d["outputs"], "outputs")))
    names = [t.name for t in inputs + outputs]
    if len(set(names)) != len(names):
        raise _fail("inputs", f"tensor names must be unique across inputs and outputs: {names}")
    if not inputs or not outputs:
        raise _fail("inputs" if not inputs else "outputs", "expected at least one tensor")
    files = _files(d["files"])
    paths = {f.path for f in files}
    out_names = [t.name for t in outputs]
    variants = tuple(_variant(v, f"variants[{i}]", paths, out_names)
                     for i, v in enumerate(_list(d["variants"], "variants")))
    variant_names = [v.name for v in variants]
    if not variants or len(set(variant_names)) != len(variant_names):
        raise _fail("variants", f"expected at least one variant, names unique: {variant_names}")
    producer = _obj(d["producer"], "producer")
    for k, v in producer.items():
        _str(v, f"producer.{k}")
    extra = dict(_obj(d.get("extra", {}), "extra"))
    legacy = d["format_version"] < 3
    raw_cache, cache_at = _typed_key(d, extra, "cache", legacy)
    raw_decode, decode_at = _typed_key(d, extra, "decode_parity", legacy)
    return Manifest(
        name=_str(d["name"], "name"),
        source=_obj(d["source"], "source"),
        producer=producer,
        opset=_int(d["opset"], "opset", minimum=1),
        inputs=inputs,
        outputs=outputs,
        dims=dims,
        files=files,
        variants=variants,
        parity=tuple(_parity(p, f"parity[{i}]", variant_names, dims)
                     for i, p in enumerate(_list(d["parity"], "parity"))),
        golden=_golden(d["golden"], paths, dims, [t.name for t in inputs], out_names),
        extra=extra,
        machine=_machine(d["machine"]) if "machine" in d else None,
        cache=None if raw_cache is None else _cache(
            raw_cache, cache_at, {t.name: t for t in inputs}, {t.name: t for t in outputs}, dims,
            legacy=cache_at.startswith("extra.")),
        decode_parity=None if raw_decode is None else _decode_parity(
            raw_decode, decode_at, variant_names, dims),
        format=d["format"],
        format_version=_int(d["format_version"], "format_version", minimum=1),
    )


def _typed_key(d: dict[str, Any], extra: dict[str, Any], key: str, legacy: bool):
    """(raw value, key path) of a typed top-level key; a version-2 manifest kept it in extra,
    from where it is taken out."""
    if key in d:
        return d[key], key
    if legacy and key in extra:
        return extra.pop(key), f"extra.{key}"
    return None, key


# ---------------------------------------------------------------------------------------------
# Writing


def _number(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _tol_dict(t: Tolerance) -> dict[str, float]:
    return {"atol": t.atol, "rtol": t.rtol}


def _output_parity_dict(o: OutputParity) -> dict[str, Any]:
    d = {
        "name": o.name, "dtype": o.dtype, "shape": list(o.shape),
        "max_abs": _number(o.max_abs), "max_rel": _number(o.max_rel),
        "mean_abs": _number(o.mean_abs), "mismatch_fraction": o.mismatch_fraction,
        "worst_index": list(o.worst_index), "nan_count": o.nan_count,
        "inf_count": o.inf_count, "atol": o.atol, "rtol": o.rtol,
        "min_atol": _number(o.min_atol), "passed": o.passed,
    }
    if o.note:
        d["note"] = o.note
    if o.excluded:
        d["excluded"] = o.excluded
    return d


def parity_record_dict(r: ParityRecord) -> dict[str, Any]:
    return {"variant": r.variant, "provider": r.provider, "point": dict(r.point),
            "passed": r.passed, "outputs": [_output_parity_dict(o) for o in r.outputs]}


def _tensor_dict(t: TensorSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
    if t.value_range is not None:
        d["value_range"] = {"min": t.value_range.min, "max": t.value_range.max}
    return d


def _cache_dict(c: Cache) -> dict[str, Any]:
    return {
        "tensors": [{"past": t.past, "present": t.present, "holds": t.holds} for t in c.tensors],
        "layout": c.layout, "past_axis": c.past_axis, "batch_axis": c.batch_axis,
        "max_length": c.max_length, "past_dim": c.past_dim, "seq_dim": c.seq_dim,
        "batch_dim": c.batch_dim, "token_input": c.token_input,
        "logits_output": c.logits_output, **CACHE_FIXED,
        **{k: getattr(c, k) for k in _CACHE_OPTIONAL if getattr(c, k) is not None},
    }


def _decode_parity_dict(p: DecodeParity) -> dict[str, Any]:
    return {"steps": p.steps, "runs": [dict(r) for r in p.runs],
            "records": [parity_record_dict(r) for r in p.records]}


def _optional_dict(m: Manifest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m.machine is not None:
        out["machine"] = {"arch": m.machine.arch, "cpu_features": list(m.machine.cpu_features)}
    if m.cache is not None:
        out["cache"] = _cache_dict(m.cache)
    if m.decode_parity is not None:
        out["decode_parity"] = _decode_parity_dict(m.decode_parity)
    return out


def _manifest_to_dict(m: Manifest) -> dict[str, Any]:
    return {
        "format": m.format,
        "format_version": m.format_version,
        "name": m.name,
        "source": dict(m.source),
        "producer": dict(m.producer),
        "opset": m.opset,
        "inputs": [_tensor_dict(t) for t in m.inputs],
        "outputs": [_tensor_dict(t) for t in m.outputs],
        "dims": {k: {"min": r.min, "max": r.max} for k, r in m.dims.items()},
        "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in m.files],
        "variants": [
            {"name": v.name, "file": v.file, "providers": list(v.providers),
             "tolerance": {k: _tol_dict(t) for k, t in v.tolerance.items()},
             "outputs_tolerance": {k: _tol_dict(t) for k, t in v.outputs_tolerance.items()}}
            for v in m.variants
        ],
        "parity": [parity_record_dict(r) for r in m.parity],
        "golden": {"file": m.golden.file, "cases": [
            {"point": dict(c.point), "inputs": dict(c.inputs), "outputs": dict(c.outputs)}
            for c in m.golden.cases]},
        "extra": dict(m.extra),
        **_optional_dict(m),
    }
