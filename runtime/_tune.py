"""`attnx tune`: rank a bundle's variants on the machine that serves it.

The exporter ranks variants by timings taken where it ran, and onnxruntime's CPU kernels
differ by instruction set (AVX2, AVX-512, VNNI, AMX), so a bundle exported on one CPU kind
would serve another with the first machine's choice. `attnx tune BUNDLE [--shape dim=N ...]`
times every exact variant that passed parity here, at that shape (default: golden case 0's),
and stores the ranking in a per-user cache, never in the bundle, whose hashes must hold:

    $ATTNX_CACHE_DIR, else $XDG_CACHE_HOME/attnx, else ~/.cache/attnx
        tune/<bundle hash>-<cpu key>.json

The bundle hash is the sha256 of its manifest.json (which holds every file's sha256); the
CPU key hashes the architecture and the kernel features (runtime/_cpu.py), so a ranking made
on one CPU kind is never found on another. An entry holds one ranking per shape tuned (a
later run at the same shape replaces it) and a checksum of its own content.

The Runner (variant=None) uses the entry of its bundle and CPU when there is one, the ranking
at the shape nearest the one it is told to expect (`Runner(..., shape=)`), else the first;
`Runner.ranked_by` says which ranking chose. An entry that is malformed or whose checksum
does not match (tampered), or that was made with another onnxruntime or names variants the
bundle does not offer (stale), is ignored with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._atomic import atomic_write_text
from ._cpu import cpu_features
from ._errors import InputError
from ._manifest import MANIFEST_NAME

logger = logging.getLogger("attnx.runtime")

ENTRY_VERSION = 1
TUNE_ITERS = 30


@dataclass(frozen=True)
class Ranking:
    """Variant names fastest first, with their median ms, at one shape."""

    shape: Mapping[str, int]
    median_ms: Mapping[str, float]

    @property
    def order(self) -> list[str]:
        return sorted(self.median_ms, key=self.median_ms.get)


def cache_dir() -> Path:
    explicit = os.environ.get("ATTNX_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnx"


def bundle_hash(bundle_dir: Path) -> str:
    return hashlib.sha256((Path(bundle_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def cpu_key() -> dict[str, Any]:
    """This machine's CPU kind as the cache keys it: architecture and kernel features."""
    return {"arch": platform.machine() or "unknown", "features": list(cpu_features())}


def entry_path(bundle_dir: Path, digest: str | None = None) -> Path:
    """This CPU's tune cache entry for the bundle; ``digest``: its bundle_hash, if known."""
    kind = hashlib.sha256(json.dumps(cpu_key(), sort_keys=True).encode()).hexdigest()[:16]
    digest = digest or bundle_hash(bundle_dir)
    return cache_dir() / "tune" / f"{digest[:32]}-{kind}.json"


def _checksum(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# --- reading --------------------------------------------------------------------------------------


def load_rankings(bundle, variants: Sequence[str]) -> tuple[list[Ranking], Path]:
    """The rankings stored for this bundle on this CPU, or [] (with a warning when an entry
    exists but is tampered or stale). ``variants``: the names the runner may choose from."""
    digest = bundle_hash(bundle.dir)
    path = entry_path(bundle.dir, digest)
    if not path.is_file():
        return [], path
    problem, rankings = _read_entry(path, digest)
    unknown = sorted({n for r in rankings for n in r.median_ms} - set(variants))
    if unknown:
        problem = f"it ranks variants {unknown} that this bundle does not offer here"
    if problem:
        logger.warning("attnx: tune cache entry %s ignored: %s; run `attnx tune %s` again",
                       path, problem, bundle.dir)
        return [], path
    return rankings, path


def _read_entry(path: Path, digest: str) -> tuple[str | None, list[Ranking]]:
    """(None, rankings) of a sound entry for the bundle of sha256 ``digest`` on this CPU with
    this onnxruntime, else (what is wrong with it, [])."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        body, checksum = entry["body"], entry["checksum"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable ({type(err).__name__}: {err})", []
    if not isinstance(body, dict) or _checksum(body) != checksum:
        return "its checksum does not match its content (edited or corrupted)", []
    expected = {"version": ENTRY_VERSION, "bundle": digest, "cpu": cpu_key(),
                "onnxruntime": _onnxruntime_version()}
    for key, want in expected.items():
        if body.get(key) != want:
            return f"made for {key} {body.get(key)!r}, this is {want!r}", []
    try:
        rankings = [Ranking(dict(r["shape"]), {str(k): float(v) for k, v in r["median_ms"].items()})
                    for r in body["rankings"]]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return f"malformed rankings ({type(err).__name__}: {err})", []
    return (None, rankings) if rankings else ("it holds no ranking", [])


def nearest(shapes: Sequence[Mapping[str, int]], shape: Mapping[str, int] | None) -> int:
    """The index of the shape in ``shapes`` nearest ``shape`` (summed |log| size ratios over the
    dims both name); 0 without a shape."""
    if not shape:
        return 0

    def distance(i: int) -> float:
        common = set(shapes[i]) & set(shape)
        return sum(abs(math.log((shapes[i][d] + 1) / (shape[d] + 1))) for d in common)

    return min(range(len(shapes)), key=distance)


# --- tuning --------------------------------------------------------------------------------------


def median_ms(session, arrays, iters: int) -> float:
    """Median ms of ``iters`` session.run calls after one warm-up call (the arena and the
    kernels' first-call work)."""
    session.run(None, arrays)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, arrays)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2] * 1e3


def store(bundle, ranking: Ranking) -> Path:
    """Add ``ranking`` to this machine's entry for the bundle (replacing one at the same shape;
    an entry that is not sound for this bundle, CPU and onnxruntime is replaced whole)."""
    digest = bundle_hash(bundle.dir)
    path = entry_path(bundle.dir, digest)
    kept = _read_entry(path, digest)[1] if path.is_file() else []
    kept = [r for r in kept if dict(r.shape) != dict(ranking.shape)]
    body = {
        "version": ENTRY_VERSION,
        "bundle": digest,
        "bundle_dir": str(Path(bundle.dir).resolve()),
        "cpu": cpu_key(),
        "onnxruntime": _onnxruntime_version(),
        "rankings": [{"shape": dict(r.shape), "median_ms": dict(r.median_ms)}
                     for r in [*kept, ranking]],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"body": body, "checksum": _checksum(body)}, indent=1))
    return path


def check_iters(iters: int) -> None:
    if iters < 1:
        raise InputError(f"--iters must be >= 1, got {iters}")
