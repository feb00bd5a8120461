"""attnx runtime: read, check and run artifact bundles with ONNX Runtime, without torch.

Public names (everything else is private):

Errors (runtime._errors)
    AttnxError, ArtifactError, InputError, ProviderError, ParityError(message, records)

Manifest types (runtime._manifest; frozen dataclasses, exact manifest.json schema)
    Manifest(name, source, producer, opset, inputs, outputs, dims, files, variants, parity,
             golden, extra={}, format="attnx.bundle", format_version=FORMAT_VERSION)
        .from_dict(d) / .loads(text) -> Manifest   strict: ArtifactError("manifest.json: key: ...")
        .to_dict() / .to_json()                       sorted keys, indent 2, strict JSON
        .input_names, .output_names, .variant(name), .file(path)
    TensorSpec(name, dtype, shape)     shape entries: int | dim name | (outputs) expression
    DimRange(min, max)    FileEntry(path, sha256, size)    Tolerance(atol, rtol)
    Variant(name, file, providers, tolerance={}, outputs_tolerance={})
    OutputParity(name, dtype, shape, max_abs, max_rel, mean_abs, mismatch_fraction, worst_index,
                 nan_count, inf_count, atol, rtol, min_atol, passed, note="")
    ParityRecord(variant, provider, point, passed, outputs)
    GoldenCase(point, inputs, outputs)  Golden(file, cases)
    FORMAT_VERSION, MANIFEST_NAME

Parity (runtime._parity; numpy only)
    measure(name, actual, expected, *, atol, rtol) -> OutputParity
    ToleranceTable(by_dtype={}, by_output={}); .from_variant(variant); .lookup(name, dtype)
    compare(actual, expected, table=None) -> list[OutputParity]
    parity_record(variant, provider, point, outputs) -> ParityRecord   (passed derived)
    check(records) -> None, raises ParityError listing every failing output
    describe(output_parity) -> str
    report_text / report_markdown / report_json / report_junit(records) -> str
    FLOAT32_TOLERANCE, FLOAT16_TOLERANCE, FLOAT64_TOLERANCE, EXACT, DEFAULT_TOLERANCES
"""

from __future__ import annotations

import onnx as _onnx

from ._errors import ArtifactError, AttnxError, InputError, ParityError, ProviderError
from ._manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    DimRange,
    FileEntry,
    Golden,
    GoldenCase,
    Manifest,
    OutputParity,
    ParityRecord,
    TensorSpec,
    Tolerance,
    Variant,
)
from ._parity import (
    DEFAULT_TOLERANCES,
    EXACT,
    FLOAT16_TOLERANCE,
    FLOAT32_TOLERANCE,
    FLOAT64_TOLERANCE,
    ToleranceTable,
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
from ._versions import check_versions, installed_onnxruntime

check_versions(_onnx.__version__, installed_onnxruntime())

__all__ = [
    "DEFAULT_TOLERANCES",
    "EXACT",
    "FLOAT16_TOLERANCE",
    "FLOAT32_TOLERANCE",
    "FLOAT64_TOLERANCE",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ArtifactError",
    "AttnxError",
    "DimRange",
    "FileEntry",
    "Golden",
    "GoldenCase",
    "InputError",
    "Manifest",
    "OutputParity",
    "ParityError",
    "ParityRecord",
    "ProviderError",
    "TensorSpec",
    "Tolerance",
    "ToleranceTable",
    "Variant",
    "check",
    "compare",
    "describe",
    "measure",
    "parity_record",
    "report_json",
    "report_junit",
    "report_markdown",
    "report_text",
]
