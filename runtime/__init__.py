"""attnx runtime: read, check and run artifact bundles with ONNX Runtime, without torch.

Public names (everything else is private):

Errors (runtime._errors)
    AttnxError, ArtifactError, InputError, ProviderError, ParityError(message, records)

Manifest types (runtime._manifest; frozen dataclasses, exact manifest.json schema)
    Manifest(name, source, producer, opset, inputs, outputs, dims, files, variants, parity,
             golden, extra={}, machine=None, format="attnx.bundle",
             format_version=FORMAT_VERSION)
        .from_dict(d) / .loads(text) -> Manifest   strict: ArtifactError("manifest.json: key: ...")
        .to_dict() / .to_json()                       sorted keys, indent 2, strict JSON
        .input_names, .output_names, .variant(name), .file(path)
    TensorSpec(name, dtype, shape, value_range=None)
                           shape entries: int | dim name | (outputs) expression
    DimRange(min, max)    ValueRange(min, max)    FileEntry(path, sha256, size)
    Machine(arch, cpu_features)    Tolerance(atol, rtol)
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

Bundles and running (onnxruntime imported lazily, only when a session is made)
    load_bundle(path) -> Bundle(manifest, dir, files, weights, data_files, golden)
        .model_bytes(variant), .external_data(variant); golden: tuple[GoldenSample]
    GoldenSample(point, inputs, outputs)          arrays by tensor name
    validate_feed(manifest, feed, *, reject_nonfinite=False, weights=()) -> dict[str, ndarray]
    Runner(bundle_path_or_Bundle, *, provider="auto", variant=None, threads=None,
           reject_nonfinite=False, note_cpu=True)  context manager
        .run(feed) -> dict[str, ndarray]; .validate(feed); .placement(feed) -> {node: provider}
        .manifest, .variant, .provider, .session, .session_seconds, .close()
    choose_variant(manifest, provider, name=None) -> Variant
    resolve_provider("auto" | "cpu" | "cuda") -> provider name; available_providers()

Generation with a KV cache (runtime._generate; the layout is the manifest's typed Cache)
    Generator(bundle_or_runner, *, provider="auto", variant=None, threads=None)  context manager
        .generate(prompt_ids, max_new_tokens) -> list[int]   greedy; the new tokens only
        .steps(prompt_ids, max_new_tokens) -> iterator of Step(token, logits)
        .step(ids) -> logits [len(ids), V]; .reset(); .checkpoint() / .rewind(c); .length;
        .max_length; .cache
    generate(bundle_or_runner, prompt_ids, max_new_tokens, *, provider, threads) -> list[int]
    Manifest.cache -> Cache(tensors, layout, past_axis, batch_axis, max_length, ...) or None
    Manifest.decode_parity -> DecodeParity(steps, runs, records) or None

CLI (runtime._cli): main(argv=None, *, extra=None) -> int; add_commands(subparsers)
"""

from __future__ import annotations

import onnx as _onnx

from ._bundle import Bundle, GoldenSample, load_bundle
from ._errors import ArtifactError, AttnxError, InputError, ParityError, ProviderError
from ._generate import Generator, Step, generate
from ._manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Cache,
    CacheTensor,
    DecodeParity,
    DimRange,
    FileEntry,
    Golden,
    GoldenCase,
    Machine,
    Manifest,
    OutputParity,
    ParityRecord,
    TensorSpec,
    Tolerance,
    ValueRange,
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
from ._runner import Runner, choose_variant
from ._session import available_providers, resolve_provider
from ._validate import validate_feed
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
    "Bundle",
    "Cache",
    "CacheTensor",
    "DecodeParity",
    "Generator",
    "Step",
    "generate",
    "GoldenSample",
    "Runner",
    "AttnxError",
    "DimRange",
    "FileEntry",
    "Golden",
    "GoldenCase",
    "InputError",
    "Machine",
    "Manifest",
    "OutputParity",
    "ParityError",
    "ParityRecord",
    "ProviderError",
    "TensorSpec",
    "Tolerance",
    "ToleranceTable",
    "ValueRange",
    "Variant",
    "available_providers",
    "check",
    "choose_variant",
    "compare",
    "describe",
    "load_bundle",
    "measure",
    "parity_record",
    "report_json",
    "report_junit",
    "report_markdown",
    "report_text",
    "resolve_provider",
    "validate_feed",
]
