"""Dependency floors, checked when `runtime` is imported.

onnx >= 1.21 closes the 2026 external-data symlink/hard-link CVEs (CVE-2026-27489, -34446,
-34447); onnxruntime >= 1.24 checks external-data paths itself (microsoft/onnxruntime#26776).
onnxruntime is looked up by its distribution metadata, not imported, so that reading a
manifest works (and stays fast) without it.
"""

from __future__ import annotations

import re
from importlib import metadata

ONNX_FLOOR = (1, 21)
ONNXRUNTIME_FLOOR = (1, 24)
# Both wheels provide the same `onnxruntime` module.
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def parse_version(text: str) -> tuple[int, ...]:
    """Leading numeric release parts: '1.24.0.dev2025+cu12' -> (1, 24, 0)."""
    match = re.match(r"\d+(\.\d+)*", text.strip())
    if not match:
        raise ImportError(f"attnx cannot read the version string {text!r}")
    return tuple(int(p) for p in match.group(0).split("."))


def check_floor(package: str, installed: str, floor: tuple[int, ...]) -> None:
    if parse_version(installed) < floor:
        need = ".".join(map(str, floor))
        raise ImportError(f"attnx needs {package} >= {need} (installed: {installed}); "
                          f"upgrade with: pip install -U '{package}>={need}'")


def installed_onnxruntime() -> tuple[str, str] | None:
    for dist in ONNXRUNTIME_DISTRIBUTIONS:
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_versions(onnx_version: str, onnxruntime: tuple[str, str] | None) -> None:
    check_floor("onnx", onnx_version, ONNX_FLOOR)
    if onnxruntime is not None:
        check_floor(onnxruntime[0], onnxruntime[1], ONNXRUNTIME_FLOOR)
