"""`attnx inspect`: what a bundle holds, read from the checked manifest and model bytes."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import onnx

from ._bundle import Bundle
from ._manifest import TensorSpec

DEFAULT_DOMAINS = ("", "ai.onnx")


def op_census(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type over the graph, its subgraphs and its local functions;
    non-default domains are spelled `domain::Op` (com.microsoft::MultiHeadAttention)."""
    counts: Counter[str] = Counter()

    def visit(nodes) -> None:
        for node in nodes:
            default = node.domain in DEFAULT_DOMAINS
            counts[node.op_type if default else f"{node.domain}::{node.op_type}"] += 1
            for attr in node.attribute:
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(g.node)

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)
    return dict(sorted(counts.items()))


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements in all initializers (shapes only: external data need not be loaded)."""
    return sum(math.prod(t.dims) for t in model.graph.initializer)


def _tensor(spec: TensorSpec, bundle: Bundle) -> dict[str, Any]:
    dims = {d: [bundle.manifest.dims[d].min, bundle.manifest.dims[d].max]
            for d in spec.shape if isinstance(d, str) and d in bundle.manifest.dims}
    return {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape), "dims": dims}


def _parity_summary(bundle: Bundle, variant: str) -> list[dict[str, Any]]:
    by_provider: dict[str, list] = {}
    for r in bundle.manifest.parity:
        if r.variant == variant:
            by_provider.setdefault(r.provider, []).append(r)
    return [{"provider": p, "records": len(rs), "passed": sum(r.passed for r in rs),
             "worst_max_abs": max((o.max_abs for r in rs for o in r.outputs), default=0.0)}
            for p, rs in by_provider.items()]


def inspect_bundle(bundle: Bundle) -> dict[str, Any]:
    m = bundle.manifest
    variants = []
    for v in m.variants:
        model = onnx.load_model_from_string(bundle.files[v.file])
        data = bundle.external_data(v.name)
        variants.append({
            "name": v.name, "file": v.file, "providers": list(v.providers),
            "bytes": len(bundle.files[v.file]) + sum(map(len, data.values())),
            "external_data": list(bundle.data_files[v.name]),
            "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "ops": op_census(model), "parameters": parameter_count(model),
            "tolerance": {k: [t.atol, t.rtol] for k, t in v.tolerance.items()},
            "outputs_tolerance": {k: [t.atol, t.rtol] for k, t in v.outputs_tolerance.items()},
            "parity": _parity_summary(bundle, v.name),
        })
    return {
        "name": m.name, "dir": str(bundle.dir), "format_version": m.format_version,
        "opset": m.opset, "source": dict(m.source), "producer": dict(m.producer),
        "inputs": [_tensor(t, bundle) for t in m.inputs],
        "outputs": [_tensor(t, bundle) for t in m.outputs],
        "dims": {k: [r.min, r.max] for k, r in m.dims.items()},
        "variants": variants,
        "golden": [dict(c.point) for c in m.golden.cases],
    }


def format_inspect(info: dict[str, Any]) -> str:
    lines = [f"{info['name']}  ({info['dir']}; format {info['format_version']}, "
             f"opset {info['opset']})",
             "source:   " + ", ".join(f"{k}={v}" for k, v in info["source"].items()),
             "producer: " + ", ".join(f"{k} {v}" for k, v in info["producer"].items())]
    width = max(12, *(len(t["name"]) for t in info["inputs"] + info["outputs"]))
    for side in ("inputs", "outputs"):
        lines.append(f"{side}:")
        for t in info[side]:
            shape = "[" + ", ".join(map(str, t["shape"])) + "]"
            ranges = ", ".join(f"{d} in {lo}..{hi}" for d, (lo, hi) in t["dims"].items())
            lines.append(f"  {t['name']:<{width}} {t['dtype']:<8} {shape}  {ranges}".rstrip())
    lines.append("variants:")
    for v in info["variants"]:
        lines.append(f"  {v['name']}: {v['file']}, {v['bytes']} bytes, {v['parameters']} "
                     f"parameters, providers {', '.join(v['providers'])}")
        lines.append("    ops: " + ", ".join(f"{op} {n}" for op, n in v["ops"].items()))
        tol = ", ".join(f"{k} atol {a:g} rtol {r:g}" for k, (a, r) in v["tolerance"].items())
        lines.append(f"    tolerance: {tol or 'defaults'}")
        for p in v["parity"]:
            lines.append(f"    parity on {p['provider']}: {p['passed']}/{p['records']} passed, "
                         f"worst max_abs {p['worst_max_abs']:.3g}")
    points = "; ".join(", ".join(f"{k}={n}" for k, n in p.items()) for p in info["golden"])
    lines.append(f"golden: {len(info['golden'])} cases ({points})")
    return "\n".join(lines)
