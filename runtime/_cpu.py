"""The CPU features that decide which kernels onnxruntime's MLAS runs, and so a lossy
variant's numbers and every variant's speed.

int8 is the sharp case: U8S8 products are summed in pairs by VPMADDUBSW (saturating at 32767)
on AVX2 and on AVX-512 without VNNI, by VPDPBUSD (exact) with VNNI, and by AMX tiles where
present. A bundle records the features of the machine that measured its parity and timings;
the runner and `attnx verify` say when a lossy variant runs on a CPU of another kind.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

# The flags (as /proc/cpuinfo spells them) that select MLAS kernels on x86-64.
KERNEL_FEATURES = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
CPUINFO = Path("/proc/cpuinfo")


def cpu_features(cpuinfo: Path = CPUINFO) -> tuple[str, ...]:
    """The KERNEL_FEATURES this CPU has, in that order; () where /proc/cpuinfo has no flags
    line (not Linux, or not x86-64)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            return tuple(f for f in KERNEL_FEATURES if f in flags)
    return ()


def machine_arch() -> str:
    return platform.machine() or "unknown"


def describe_features(features: Sequence[str]) -> str:
    return " ".join(features) if features else "no recorded x86-64 features"
