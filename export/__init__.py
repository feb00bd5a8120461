"""attnx export: torch -> ONNX with a parity grid and artifact bundles.

Public API: export_module, export_entry, run_pipeline, spec_from_module, spec_from_zoo,
ExportSpec, ExportResult, ExportError, default_grid, DEFAULT_OPSET.

Importing this package does not import torch: the names load on first use, so the console
script (export._cli) serves `attnx run/verify/bench/inspect` on a machine without torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "export_module": "export._api",
    "export_entry": "export._api",
    "run_pipeline": "export._pipeline",
    "ExportResult": "export._pipeline",
    "DEFAULT_OPSET": "export._pipeline",
    "spec_from_module": "export._spec",
    "spec_from_zoo": "export._spec",
    "ExportSpec": "export._spec",
    "ExportError": "export._errors",
    "default_grid": "export._grid",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
