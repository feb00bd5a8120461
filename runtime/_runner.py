"""Runner: one checked bundle, one session, any number of calling threads.

    with Runner("artifacts/mha_rope", provider="cpu") as r:
        out = r.run({"x": x})          # {"y": array}

Thread safety: onnxruntime's InferenceSession.run is thread-safe, and run() keeps all its
state in locals (the feed, the bound sizes, a per-call IO binding on CUDA).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import numpy as np

from ._bundle import Bundle, load_bundle
from ._cpu import KERNEL_FEATURES, cpu_features, describe_features
from ._errors import ArtifactError, AttnxError, InputError, ProviderError
from ._manifest import Manifest, Variant
from ._session import CPU, CUDA, create_session, node_placement, ort_errors, resolve_provider
from ._validate import Sizes, check_feed, shape_problems

logger = logging.getLogger("attnx.runtime")


def variants_for(manifest: Manifest, provider: str) -> list[Variant]:
    """Variants meant for `provider`, in manifest order."""
    return [v for v in manifest.variants if provider in v.providers]


def passed_on(manifest: Manifest, variant: Variant, provider: str) -> bool:
    """Every parity record of this variant on this provider passed. A provider that was never
    measured (no records, e.g. CUDA for a bundle exported on a CPU machine) counts as passed:
    `attnx verify` is how that is checked on the target machine."""
    return all(r.passed for r in manifest.parity
               if r.variant == variant.name and r.provider == provider)


def rank_variants(manifest: Manifest, candidates: list[Variant], provider: str,
                  shape: Mapping[str, int] | None = None) -> list[Variant]:
    """Fastest first, by the median latency the exporter measured for `provider` on the same
    inputs for every variant, at its timing point nearest `shape` (manifest
    extra.variants.<name>.timings; median_ms, the first point's, in older bundles). Variants
    without a measurement (CUDA, for a bundle exported on a CPU machine) come after the
    measured ones, the last-listed first: the exporter lists variants from the plain graph to
    the most rewritten, and on an H100 attention23 ran causal_self at 0.92x torch where base
    ran at 1.62x (benchmarks/results/gpu/)."""
    notes = manifest.extra.get("variants", {}) if isinstance(manifest.extra, Mapping) else {}
    order = {v.name: i for i, v in enumerate(manifest.variants)}
    point = export_timing_point(manifest, shape)

    def key(variant: Variant) -> tuple[float, int]:
        measured = _measured(notes.get(variant.name, {}), point, provider)
        if isinstance(measured, int | float):
            return float(measured), 0
        return float("inf"), -order[variant.name]

    return sorted(candidates, key=key)


def export_timing_point(manifest: Manifest, shape: Mapping[str, int] | None):
    """The exporter's timing point nearest `shape` (its first without one); None for a bundle
    that recorded a single point."""
    from ._tune import nearest

    notes = manifest.extra.get("variants", {}) if isinstance(manifest.extra, Mapping) else {}
    points = [t.get("point") for n in notes.values() if isinstance(n, Mapping)
              for t in n.get("timings", []) if isinstance(t, Mapping)]
    unique = dict.fromkeys(tuple(sorted(p.items())) for p in points if isinstance(p, Mapping))
    points = [dict(p) for p in unique]
    return points[nearest(points, shape)] if points else None


def _measured(note: Mapping, point, provider: str):
    if point is not None:
        for timing in note.get("timings", []):
            if isinstance(timing, Mapping) and dict(timing.get("point", {})) == point:
                return timing.get("median_ms", {}).get(provider)
    return note.get("median_ms", {}).get(provider)


def is_lossy(manifest: Manifest, variant: Variant) -> bool:
    """int8/fp16 variants pass parity only at their own looser tolerance; the runner never
    picks them unless asked by name."""
    notes = manifest.extra.get("variants", {}) if isinstance(manifest.extra, Mapping) else {}
    return bool(notes.get(variant.name, {}).get("lossy", False))


def measured_elsewhere(manifest: Manifest, variant: Variant, provider: str) -> str:
    """One line when a lossy variant runs on a CPU whose kernel features differ from those of
    the machine that measured its parity (int8 sums saturate without VNNI); "" otherwise."""
    if provider != CPU or not is_lossy(manifest, variant):
        return ""
    here = cpu_features()
    if manifest.machine is None:
        there = "an unrecorded CPU"
    else:
        recorded = tuple(f for f in manifest.machine.cpu_features if f in KERNEL_FEATURES)
        if recorded == here:
            return ""
        there = f"a CPU with {describe_features(recorded)}"
    return (f"variant {variant.name!r} of {manifest.name!r} is lossy and its parity was "
            f"measured on {there}; this CPU has {describe_features(here)}")


def choose_variant(manifest: Manifest, provider: str, name: str | None = None) -> Variant:
    return candidate_variants(manifest, provider, name)[0]


def candidate_variants(manifest: Manifest, provider: str, name: str | None = None,
                       shape: Mapping[str, int] | None = None) -> list[Variant]:
    """The named variant alone, or every exact variant for `provider` that passed parity,
    fastest first by the exporter's timings (at its point nearest `shape`): the runner takes
    the first one this onnxruntime can load."""
    if name is not None:
        known = [v.name for v in manifest.variants]
        if name not in known:
            raise InputError(f"unknown variant {name!r}; known variants: {', '.join(known)}")
        variant = manifest.variant(name)
        if provider not in variant.providers:
            raise ProviderError(f"variant {name!r} is meant for {', '.join(variant.providers)}"
                                f", not {provider}")
        return [variant]
    usable = [v for v in variants_for(manifest, provider)
              if passed_on(manifest, v, provider) and not is_lossy(manifest, v)]
    if not usable:
        raise ProviderError(f"bundle {manifest.name!r} has no variant for {provider} that "
                            f"passed parity (variants: " + ", ".join(
                                f"{v.name} on {'/'.join(v.providers)}"
                                for v in manifest.variants) + ")")
    return rank_variants(manifest, usable, provider, shape)


def _export_ranking(manifest: Manifest, shape) -> str:
    point = export_timing_point(manifest, shape)
    at = f" at {', '.join(f'{d}={n}' for d, n in point.items())}" if point else ""
    return f"the exporter's timings{at}"


def tuned_order(bundle: Bundle, candidates: list[Variant], shape) -> tuple[list[Variant], str]:
    """`candidates` in the order `attnx tune` measured on this CPU (those it did not time after,
    in their own order), and what ranked them; unchanged without a usable tune entry."""
    from ._tune import load_rankings, nearest

    rankings, path = load_rankings(bundle, [v.name for v in candidates])
    if not rankings:
        return candidates, ""
    ranking = rankings[nearest([r.shape for r in rankings], shape)]
    place = {name: i for i, name in enumerate(ranking.order)}
    ordered = sorted(candidates, key=lambda v: place.get(v.name, len(place)))
    at = ", ".join(f"{d}={n}" for d, n in ranking.shape.items())
    return ordered, f"attnx tune on this CPU at {at} ({path})"


def _version_hint(manifest: Manifest) -> str:
    """Why a variant that passed parity where it was exported may not load here. The module's
    own version: a distribution's metadata can belong to another copy on the path."""
    import onnxruntime

    exported = manifest.producer.get("onnxruntime")
    if exported and onnxruntime.__version__ != exported:
        return (f" (checked with onnxruntime {exported} at export; this is onnxruntime "
                f"{onnxruntime.__version__}: a newer opset may need a newer onnxruntime)")
    return ""


class Runner:
    """Run a bundle with onnxruntime. `bundle` is a folder or an already loaded Bundle.

    provider: "auto" | "cpu" | "cuda"; variant: a name, or None for the preferred variant
    that passed parity on the provider: ranked by `attnx tune` on this CPU where it was run
    (runtime/_tune.py), else by the exporter's timings, at the shape nearest `shape` (the
    dims the caller expects, e.g. {"seq": 2048}); `ranked_by` says which ranking chose it.
    threads: intra-op threads (default: usable CPUs);
    reject_nonfinite: refuse NaN/Inf inputs (InputError); note_cpu: log one warning line when
    a lossy variant runs on a CPU of another kind than the one that measured its parity.
    """

    def __init__(self, bundle: str | os.PathLike | Bundle, *, provider: str = "auto",
                 variant: str | None = None, threads: int | None = None,
                 reject_nonfinite: bool = False, note_cpu: bool = True,
                 shape: Mapping[str, int] | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.manifest = self.bundle.manifest
        self.provider = resolve_provider(provider)
        self.reject_nonfinite = reject_nonfinite
        self._output_names = self.manifest.output_names
        self.skipped: dict[str, str] = {}  # variant -> why this onnxruntime could not load it
        candidates = candidate_variants(self.manifest, self.provider, variant, shape)
        self.ranked_by = "named by the caller" if variant is not None else _export_ranking(
            self.manifest, shape)
        if variant is None and self.provider == CPU:
            candidates, tuned = tuned_order(self.bundle, candidates, shape)
            self.ranked_by = tuned or self.ranked_by
        logger.info("attnx: %s: variants ranked by %s", self.manifest.name, self.ranked_by)
        for i, chosen in enumerate(candidates):
            try:
                self._open(chosen, threads)
                break
            except ArtifactError as err:
                if i == len(candidates) - 1:
                    raise ArtifactError(f"{err}{_version_hint(self.manifest)}") from None
                self.skipped[chosen.name] = str(err)
                logger.warning("attnx: variant %s skipped: %s", chosen.name, err)
        self._errors = ort_errors()
        elsewhere = measured_elsewhere(self.manifest, self.variant, self.provider)
        if elsewhere and note_cpu:
            logger.warning("attnx: %s; `attnx verify %s` re-checks it here", elsewhere,
                           self.bundle.dir)

    def _open(self, variant: Variant, threads: int | None) -> None:
        self.variant = variant
        self.label = str(self.bundle.dir / variant.file)
        self._weights = self.bundle.weights[variant.name]
        started = time.perf_counter()
        self._session = create_session(
            self.bundle.model_bytes(variant.name), bundle_dir=self.bundle.dir,
            data_files=self.bundle.external_data(variant.name), provider=self.provider,
            label=self.label, threads=threads)
        self.session_seconds = time.perf_counter() - started

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._session = None

    @property
    def session(self):
        """The onnxruntime session (for benchmarks that call session.run directly)."""
        if self._session is None:
            raise AttnxError("the runner is closed")
        return self._session

    def validate(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays, _ = check_feed(self.manifest, feed, reject_nonfinite=self.reject_nonfinite,
                               weights=self._weights)
        return arrays

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate `feed`, run it, check the outputs; returns {output name: array}."""
        session = self.session
        arrays, sizes = check_feed(self.manifest, feed, reject_nonfinite=self.reject_nonfinite,
                                   weights=self._weights)
        try:
            if self.provider == CUDA:
                values = self._run_bound(session, arrays)
            else:
                values = session.run(self._output_names, arrays)
        except self._errors as e:
            # The feed matched the manifest, so this is the bundle's fault, not the caller's.
            raise ArtifactError(f"{self.label}: onnxruntime failed on a valid input: {e}") from None
        outputs = dict(zip(self._output_names, values, strict=True))
        self._check_outputs(outputs, sizes)
        return outputs

    def _run_bound(self, session, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        # IO binding: inputs copied to the device once, outputs allocated there by onnxruntime
        # (no host round trip between nodes). One binding per call keeps run() thread-safe.
        binding = session.io_binding()
        for name, arr in arrays.items():
            binding.bind_cpu_input(name, arr)
        for name in self._output_names:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _check_outputs(self, outputs: dict[str, np.ndarray], sizes: Sizes) -> None:
        problems = []
        for spec in self.manifest.outputs:
            arr = outputs[spec.name]
            label = f"{self.label}: output {spec.name!r}"
            if arr.dtype.name != spec.dtype:
                problems.append(f"{label}: expected dtype {spec.dtype}, got {arr.dtype.name}")
            problems += shape_problems(label, spec, arr.shape, self.manifest.dims, dict(sizes),
                                       check_ranges=False)
        if problems:
            raise ArtifactError("; ".join(problems))

    def placement(self, feed: Mapping[str, np.ndarray]) -> dict[str, str]:
        """Which provider ran each node, from one profiled run of `feed` (a separate session)."""
        return node_placement(
            self.bundle.model_bytes(self.variant.name), self.validate(feed),
            bundle_dir=self.bundle.dir, data_files=self.bundle.external_data(self.variant.name),
            provider=self.provider, label=self.label)
