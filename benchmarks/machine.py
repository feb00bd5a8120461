"""Which CPU kind a benchmark ran on, and the results folder of that kind.

Kernels differ by instruction set (MLAS picks AVX2, AVX-512, VNNI or AMX code paths), so every
CPU kind keeps its own results under benchmarks/results/<kind>/, named by its family and the
features that pick kernels (e.g. epyc-avx512-vnni, xeon-avx512-vnni-amx, epyc-avx2).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime._cpu import cpu_features  # noqa: E402


def cpu_kind() -> str:
    """A results folder name for this CPU: its family and the features that pick kernels."""
    model = ""
    with open("/proc/cpuinfo") as f:
        for text in f:
            if text.startswith("model name"):
                model = text.split(":", 1)[1].lower()
                break
    family = next((w for w in ("xeon", "epyc", "ryzen", "core") if w in model), "x86")
    features = set(cpu_features())
    isa = ["avx512"] if "avx512f" in features else ["avx2"] if "avx2" in features else []
    isa += ["vnni"] if {"avx512_vnni", "avx_vnni"} & features else []
    isa += ["amx"] if "amx_int8" in features else []
    return "-".join([family, *isa])


def results_dir() -> Path:
    """benchmarks/results/<cpu kind>/: every CPU kind keeps its own results."""
    return ROOT / "benchmarks" / "results" / cpu_kind()
