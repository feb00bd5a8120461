"""`attnx check`: re-run a bundle's parity against torch, rebuilding its source module."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnx

from runtime import Manifest, ParityRecord, Tolerance
from runtime._bundle import load_bundle

from ._decode import measure_decode
from ._errors import ExportError
from ._factory import spec_from_factory
from ._grid import default_grid
from ._pipeline import fitted_grid, measure_grid
from ._spec import ExportSpec, spec_from_zoo
from ._variants import CPU

ZOO_PREFIX = "models.zoo:"
HF_PREFIX = "hf:"  # a save_pretrained folder (export/_hf.py)


def check_bundle(path: Path) -> list[ParityRecord]:
    """Parity records of every variant of the bundle at ``path`` over its default grid."""
    bundle = load_bundle(path)  # hashes, containment and schema first: never run a bad bundle
    manifest = bundle.manifest
    spec = spec_from_manifest(manifest)
    example = dict(manifest.golden.cases[0].point)
    grid = fitted_grid(
        spec, default_grid({n: (r.min, r.max) for n, r in manifest.dims.items()}, example)
    )
    records = []
    for variant in manifest.variants:
        if CPU not in variant.providers:
            # torch runs on the CPU here; an fp16 graph for CUDA is checked on CUDA by
            # `attnx verify --provider cuda` (onnxruntime 1.32 even crashes creating a CPU
            # session for some fp16 graphs).
            continue
        model = onnx.load(str(Path(path) / variant.file))
        tolerance = {k: Tolerance(t.atol, t.rtol) for k, t in variant.tolerance.items()}
        at = replace(spec, tolerance=tolerance, cache=manifest.cache)
        records += measure_grid(at, {variant.name: model}, grid)
        records += measure_decode(at, {variant.name: model})
    return records


def spec_from_manifest(manifest: Manifest) -> ExportSpec:
    """Rebuild the torch module a bundle was exported from, from its manifest's source."""
    target = manifest.source.get("target")
    if not isinstance(target, str) or ":" not in target:
        raise ExportError(
            f"bundle '{manifest.name}' has no importable source target (got {target!r})",
            stage=4,
            hint="bundles exported from a Python object can only be checked with export_module",
        )
    if target.startswith(ZOO_PREFIX):
        from models import zoo

        entry = zoo.get(target.removeprefix(ZOO_PREFIX))
        return spec_from_zoo(entry, **dict(manifest.source.get("config") or {}))

    if target.startswith(HF_PREFIX):
        from ._hf_tasks import spec_from_folder

        return spec_from_folder(target.removeprefix(HF_PREFIX), manifest.source.get("task"))
    return spec_from_factory(target)
