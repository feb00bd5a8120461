"""Stage 5: write the artifact bundle atomically (DESIGN.md section 4).

Everything is written into a hidden temporary folder beside the destination and renamed into
place at the end, so a failed or interrupted export leaves nothing partial behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

from runtime import (
    DecodeParity,
    DimRange,
    FileEntry,
    Golden,
    GoldenCase,
    Machine,
    Manifest,
    ParityRecord,
    TensorSpec,
    ValueRange,
    Variant,
    report_markdown,
)
from runtime._atomic import replace_dir
from runtime._cpu import cpu_features, describe_features, machine_arch

from ._errors import ExportError
from ._ranges import value_ranges
from ._sessions import eager_outputs, to_numpy
from ._spec import ExportSpec
from ._variants import LOSSY, VariantBuild, timing_point

# Protobuf cannot serialize a model above 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = 1536 * 1024 * 1024


def write_bundle(
    spec: ExportSpec,
    variants: Mapping[str, VariantBuild],
    records: list[ParityRecord],
    grid: list[Mapping[str, int]],
    status,
    out: Path,
    opset: int,
    decode: DecodeParity | None = None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    final = out / spec.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".tmp", dir=out))
    try:
        files = {}
        for name, build in variants.items():
            files.update(_save_model(build.model, tmp, _model_file(name)))
        golden = _write_golden(spec, variants["base"].model, grid, tmp / "golden.npz")
        files["golden.npz"] = None
        manifest = _manifest(spec, variants, records, golden, tmp, list(files), opset, status)
        manifest = replace(manifest, cache=spec.cache, decode_parity=decode)
        report = _report(spec, manifest, status)
        (tmp / "report.md").write_text(report, encoding="utf-8")
        report_entry = _file_entry(tmp, "report.md")
        manifest = replace(manifest, files=(*manifest.files, report_entry))
        (tmp / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _model_file(variant: str) -> str:
    return "model.onnx" if variant == "base" else f"model.{variant}.onnx"


def _save_model(model: onnx.ModelProto, folder: Path, filename: str) -> dict[str, None]:
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size < EXTERNAL_DATA_BYTES:
        (folder / filename).write_bytes(model.SerializeToString())
        return {filename: None}
    data = f"{filename}.data"
    onnx.save_model(
        model, folder / filename, save_as_external_data=True, location=data, size_threshold=1024
    )
    return {filename: None, data: None}


def _write_golden(spec, model, grid, path: Path) -> Golden:
    """Inputs and torch outputs at the example point (grid[0]) and the grid's smallest point."""

    names = [o.name for o in model.graph.output]
    points = [grid[0], min(grid[1:] or grid, key=lambda p: sum(p.values()))]
    arrays: dict[str, np.ndarray] = {}
    cases = []
    for i, point in enumerate(points):
        feed = spec.make_inputs(point)
        outputs = eager_outputs(spec, feed, names)
        inputs = {n: f"case{i}.in.{n}" for n in feed}
        results = {n: f"case{i}.out.{n}" for n in outputs}
        arrays.update({inputs[n]: a for n, a in to_numpy(feed).items()})
        arrays.update({results[n]: a for n, a in outputs.items()})
        cases.append(GoldenCase(point=dict(point), inputs=inputs, outputs=results))
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return Golden(file="golden.npz", cases=tuple(cases))


def _tensor_specs(graph_values) -> tuple[TensorSpec, ...]:
    specs = []
    for value in graph_values:
        t = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
        specs.append(TensorSpec(value.name, dtype, shape))
    return tuple(specs)


def _manifest(spec, variants, records, golden, folder, files, opset, status) -> Manifest:
    base = variants["base"].model
    ranges = value_ranges(base, spec.value_ranges)
    inputs = tuple(
        TensorSpec(
            d.name,
            str(d.dtype).removeprefix("torch."),
            tuple(d.shape),
            ValueRange(*ranges[d.name]) if d.name in ranges else None,
        )
        for d in spec.inputs
    )
    return Manifest(
        name=spec.name,
        source=_jsonable(spec.source),
        producer=_producer(),
        opset=opset,
        inputs=inputs,
        outputs=_tensor_specs(base.graph.output),
        dims={name: DimRange(lo, hi) for name, (lo, hi) in spec.dims.items()},
        files=tuple(_file_entry(folder, f) for f in files),
        variants=tuple(
            Variant(
                name=name,
                file=_model_file(name),
                providers=build.providers,
                tolerance=dict(build.tolerance),
            )
            for name, build in variants.items()
        ),
        parity=tuple(records),
        golden=golden,
        extra=_jsonable(
            {
                **spec.extra,
                "variants": _variant_notes(variants, spec),
                "dropped_variants": dict(status.dropped),
            }
        ),
        # The machine whose onnxruntime measured the parity records and the timings.
        machine=Machine(machine_arch(), cpu_features()),
    )


def _variant_notes(variants: Mapping[str, VariantBuild], spec) -> dict:
    """What the runtime and `attnx inspect` need beyond the Variant schema: lossy variants are
    never chosen automatically; census and source say what each variant changed."""
    return {
        name: {
            "lossy": name in LOSSY,
            "derived_from": build.derived_from,
            "census": build.census,
            "median_ms": build.median_ms,
            "timing_point": timing_point(spec),
            "timings": build.timings,
        }
        for name, build in variants.items()
    }


def _file_entry(folder: Path, name: str) -> FileEntry:
    data = (folder / name).read_bytes()
    return FileEntry(path=name, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _producer() -> dict[str, str]:
    versions = {"torch": torch.__version__, "onnx": onnx.__version__}
    for dist in ("attnx", "onnxscript", "onnxruntime"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    return versions


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _report(spec: ExportSpec, manifest: Manifest, status) -> str:
    def shape(t):
        return "[" + ", ".join(str(d) for d in t.shape) + "]"

    lines = [
        f"# {manifest.name}",
        "",
        f"Source: `{manifest.source.get('target') or manifest.source.get('class')}`  ",
        f"Opset: {manifest.opset}  ",
        "Producer: " + ", ".join(f"{k} {v}" for k, v in sorted(manifest.producer.items())),
        "",
        "## Inputs and outputs",
        "",
        "| tensor | dtype | shape |",
        "|---|---|---|",
        *[f"| in `{t.name}` | {t.dtype} | {shape(t)} |" for t in manifest.inputs],
        *[f"| out `{t.name}` | {t.dtype} | {shape(t)} |" for t in manifest.outputs],
        "",
        "Dynamic dims: "
        + ", ".join(f"`{n}` in [{r.min}, {r.max}]" for n, r in manifest.dims.items()),
        "",
        *_ranges_lines(manifest),
        f"Measured on: {manifest.machine.arch}, {describe_features(manifest.machine.cpu_features)}",
        "",
        "## Export stages",
        "",
        "| stage | state | seconds | detail |",
        "|---|---|---|---|",
        *[
            f"| {s.index}. {s.name} | {s.state if s.index < 5 else 'ok'} | {s.seconds:.2f} | "
            f"{s.detail} |"
            for s in status.stages
        ],
        "",
        "## Parity (ONNX Runtime vs torch eager)",
        "",
        report_markdown(manifest.parity),
    ]
    return "\n".join(lines) + "\n"


def _ranges_lines(manifest: Manifest) -> list[str]:
    ranged = [t for t in manifest.inputs if t.value_range is not None]
    if not ranged:
        return []
    text = ", ".join(f"`{t.name}` in [{t.value_range.min}, {t.value_range.max}]" for t in ranged)
    return [f"Value ranges: {text}", ""]


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.is_symlink() or final.is_file():
        raise ExportError(f"{final} exists and is not a bundle folder", stage=5)
    replace_dir(tmp, final)
