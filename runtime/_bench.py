"""`attnx bench`: latency of one bundle through the Runner, and the Runner's own overhead.

Figures, not assertions: timed checks do not belong in tests (DESIGN.md §6).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._bundle import Bundle
from ._errors import InputError
from ._manifest import Manifest
from ._runner import Runner

PERCENTILES = (50, 90, 99)
SEED = 0


def bench_point(bundle: Bundle, shape: Mapping[str, int]) -> dict[str, int]:
    """Golden case 0's sizes (else each dim's min), overridden by `shape`."""
    m = bundle.manifest
    point = {d: r.min for d, r in m.dims.items()}
    if m.golden.cases:
        point.update(m.golden.cases[0].point)
    for dim, size in shape.items():
        if dim not in m.dims:
            raise InputError(f"--shape {dim}={size}: unknown dim {dim!r}; dims: "
                             f"{', '.join(m.dims)}")
        point[dim] = size
    return point


def random_feed(manifest: Manifest, point: Mapping[str, int], seed: int = SEED):
    """Standard-normal floats; zeros for integer inputs (valid as token ids or positions);
    all-True booleans (nothing masked)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in manifest.inputs:
        shape = tuple(point[d] if isinstance(d, str) else d for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feed[spec.name] = np.ones(shape, dtype)
        else:
            feed[spec.name] = np.zeros(shape, dtype)
    return feed


def bench_feed(bundle: Bundle, point: Mapping[str, int]):
    """The golden inputs when they are at the bench point (real data), else random ones."""
    for golden in bundle.golden:
        if dict(golden.point) == dict(point):
            return dict(golden.inputs)
    return random_feed(bundle.manifest, point)


def _percentiles(ns: list[int]) -> dict[str, float]:
    ms = np.asarray(ns, dtype=np.float64) / 1e6
    return {f"p{p}_ms": float(np.percentile(ms, p)) for p in PERCENTILES}


def run_bench(runner: Runner, feed, *, warmup: int, iters: int) -> dict[str, Any]:
    for _ in range(warmup):
        runner.run(feed)
    latencies = []
    for _ in range(iters):
        start = time.perf_counter_ns()
        runner.run(feed)
        latencies.append(time.perf_counter_ns() - start)
    mean_s = float(np.mean(latencies)) / 1e9
    return {**_percentiles(latencies), "mean_ms": mean_s * 1e3,
            "throughput_per_s": 1.0 / mean_s if mean_s else float("inf"),
            **runner_overhead(runner, feed, iters=iters)}


def runner_overhead(runner: Runner, feed, *, iters: int) -> dict[str, float]:
    """Runner.run versus a bare session.run on the same (already valid) arrays, interleaved so
    that drift in the machine hits both alike. Reports medians and their difference."""
    session = runner.session
    arrays = runner.validate(feed)
    names = runner.manifest.output_names
    wrapped, bare = [], []
    for _ in range(iters):
        start = time.perf_counter_ns()
        runner.run(feed)
        wrapped.append(time.perf_counter_ns() - start)
        start = time.perf_counter_ns()
        session.run(names, arrays)
        bare.append(time.perf_counter_ns() - start)
    med_wrapped, med_bare = float(np.median(wrapped)) / 1e3, float(np.median(bare)) / 1e3
    return {"runner_median_us": med_wrapped, "session_run_median_us": med_bare,
            "overhead_us": med_wrapped - med_bare}
