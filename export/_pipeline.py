"""The export pipeline: capture, check, variants, parity, write (DESIGN.md section 3).

Each stage is recorded in an ExportStatus; a failure raises ExportError naming the stage
("stage k/5 (name): what; next: hint"), or ParityError listing every failing output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from runtime import (
    AttnxError,
    OutputParity,
    ParityError,
    ParityRecord,
    ToleranceTable,
    check,
    compare,
    parity_record,
)
from runtime._session import ort_errors

from ._capture import capture, check_graph
from ._decode import decode_parity, decode_stage
from ._errors import STAGES, ExportError
from ._grid import default_grid
from ._sessions import PROVIDER, eager_outputs, make_session, to_numpy
from ._spec import ExportSpec
from ._variants import CPU, LOSSY, VariantBuild, build_variants, first_line, time_variants

# Opset 18 is the one torch's ONNX translation library is written at, so the graph needs no
# version conversion, and it runs on every onnxruntime from 1.14 on (Triton images, mobile and
# older deployments included). The native Attention op of opset 23+ comes as a variant.
DEFAULT_OPSET = 18
MIN_OPSET = 18


@dataclass
class StageStatus:
    index: int
    name: str
    state: str = "pending"  # pending | running | ok | failed
    seconds: float = 0.0
    detail: str = ""


@dataclass
class ExportStatus:
    """Per-stage record of one export, for progress lines and the report."""

    name: str
    stages: list[StageStatus] = field(
        default_factory=lambda: [StageStatus(i + 1, n) for i, n in enumerate(STAGES)]
    )
    # Optional variants left out (failed to build, refused by onnxruntime, missed parity), and
    # why; they are not written.
    dropped: dict[str, str] = field(default_factory=dict)

    def stage(self, index: int) -> StageStatus:
        return self.stages[index - 1]


@dataclass
class ExportResult:
    name: str
    status: ExportStatus
    records: list[ParityRecord]
    bundle: Path | None
    opset: int
    seconds: float
    model: onnx.ModelProto | None = None
    variants: dict[str, VariantBuild] = field(default_factory=dict)
    # The decode loop's records of a cached block (points add "run" and "step" to the dims).
    decode_records: list[ParityRecord] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.records) and all(r.passed for r in self.records)


Progress = Callable[[str], None]


def run_pipeline(
    spec: ExportSpec,
    *,
    out: Path | str | None,
    opset: int = DEFAULT_OPSET,
    grid: list[Mapping[str, int]] | None = None,
    progress: Progress | None = None,
    variants: tuple[str, ...] | None = None,
) -> ExportResult:
    """Export ``spec`` and prove parity over ``grid`` (default: default_grid); write the bundle
    to ``out/<name>`` when ``out`` is given. Raises ExportError or ParityError."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is below the minimum {MIN_OPSET}", stage=1)
    status = ExportStatus(spec.name)
    start = time.perf_counter()
    say = progress or (lambda line: None)
    grid = fitted_grid(spec, grid or default_grid(spec.dims, spec.example))

    model = _stage(status, 1, say, lambda: capture(spec, opset))
    _stage(status, 2, say, lambda: check_graph(model, spec))
    builds = _stage(
        status, 3, say, lambda: build_variants(spec, model, opset, variants, status.dropped)
    )
    status.stage(3).detail = ", ".join(builds)
    records, decode = _stage(status, 4, say, lambda: _parity(spec, builds, grid, status))
    bundle = None
    if out is not None:
        from ._writer import write_bundle

        bundle = _stage(
            status,
            5,
            say,
            lambda: write_bundle(
                spec, builds, records, grid, status, Path(out), opset, decode_parity(spec, decode)
            ),
        )
    seconds = time.perf_counter() - start
    return ExportResult(spec.name, status, records, bundle, opset, seconds, model, builds, decode)


def fitted_grid(spec: ExportSpec, grid) -> list[dict[str, int]]:
    """The grid's points as the spec accepts them (spec.fit_point), in order, without
    duplicates."""
    points: list[dict[str, int]] = []
    for point in grid:
        point = dict(point) if spec.fit_point is None else spec.fit_point(point)
        if point not in points:
            points.append(point)
    return points


def _parity(spec, builds, grid, status: ExportStatus):
    """(grid records, decode records) of the variants kept. The base graph must pass the grid
    (and the decode loop, for cached blocks); an optional variant that misses is dropped from
    the bundle with the reason noted, never kept."""
    records = measure_grid(spec, builds, grid)
    base = [r for r in records if r.variant == "base"]
    refused = next((o.note for r in base for o in r.outputs if o.note.startswith(REFUSED)), "")
    if refused:
        raise ExportError(
            f"the base graph: {refused}",
            stage=4,
            hint="try another --opset; the exporter wrote a graph this onnxruntime cannot load",
        )
    status.stage(4).detail = f"{sum(r.passed for r in base)}/{len(base)} points passed"
    check(base)
    decode = decode_stage(spec, {"base": builds["base"].model}, status)
    for name in [n for n in builds if n != "base"]:
        reason, steps = _variant_miss(spec, name, builds[name], records, status)
        if reason:
            status.dropped[name] = reason
            del builds[name]
        decode += steps
    if status.dropped:
        # Variants dropped while building are named too: the detail lists every one left out.
        status.stage(4).detail += "; dropped " + ", ".join(status.dropped)
    time_variants(spec, builds)  # the runner's ranking, from the variants that passed
    return [r for r in records if r.variant in builds], decode


def _variant_miss(spec, name, build: VariantBuild, records, status):
    """(why an optional variant fails (first failing line) or "", its decode records when it
    passes)."""
    failing = [r for r in records if r.variant == name and not r.passed]
    try:
        check(failing)
        if CPU in build.providers and name not in LOSSY:
            # The decode loop is checked at the block's own tolerance; lossy variants skip it.
            return "", decode_stage(spec, {name: build.model}, status)
    except ParityError as err:
        return str(err).splitlines()[1].strip(), []
    return "", []


# What a stage was doing when something untyped escaped it, and what to try next.
STAGE_FAILURES = {
    1: ("capturing the module failed", "run torch.export.export on the module for the trace"),
    2: ("checking the graph failed", "try another --opset"),
    3: ("building the variants failed", "export with --variants base"),
    4: (
        "running the parity grid failed",
        "run the module and the base graph at the failing shape by hand",
    ),
    5: ("writing the bundle failed", "check that the output folder is writable and has space"),
}


def _stage(status: ExportStatus, index: int, say: Progress, work):
    stage = status.stage(index)
    stage.state = "running"
    t0 = time.perf_counter()
    try:
        result = work()
    except Exception as err:
        stage.state = "failed"
        stage.seconds = time.perf_counter() - t0
        say(_line(status, index))
        if isinstance(err, AttnxError):
            raise
        what, hint = STAGE_FAILURES[index]
        raise ExportError(f"{what}: {first_line(err)}", stage=index, hint=hint) from err
    stage.state = "ok"
    stage.seconds = time.perf_counter() - t0
    say(_line(status, index))
    return result


def _line(status: ExportStatus, index: int) -> str:
    s = status.stage(index)
    detail = f" {s.detail}" if s.detail else ""
    head = f"[{status.name}] stage {index}/{len(STAGES)} {s.name}"
    return f"{head}: {s.state} ({s.seconds:.1f}s){detail}"


# --- stage 4: parity ----------------------------------------------------------------------------


def measure_grid(
    spec: ExportSpec,
    variants: Mapping[str, onnx.ModelProto | VariantBuild],
    grid: list[Mapping[str, int]],
) -> list[ParityRecord]:
    """One ParityRecord per CPU variant and grid point: ONNX Runtime against torch eager, at
    each variant's own tolerance (the spec's for plain graphs)."""
    records = []
    for variant, model in variants.items():
        tolerance = spec.tolerance
        if isinstance(model, VariantBuild):
            if CPU not in model.providers:
                continue  # fp16 is for CUDA; `attnx verify --provider cuda` checks it there
            model, tolerance = model.model, model.tolerance
        table = ToleranceTable(by_dtype=dict(tolerance))
        try:
            session = make_session(model)
        except ort_errors() as err:
            records.append(_refused(spec, variant, grid[0], table, err))
            continue
        names = [o.name for o in session.get_outputs()]
        for point in grid:
            feed = spec.make_inputs(point)
            expected = eager_outputs(spec, feed, names)
            try:
                actual = dict(zip(names, session.run(None, to_numpy(feed)), strict=True))
            except ort_errors() as err:
                outputs = _run_failed(expected, table, err)
                records.append(parity_record(variant, PROVIDER, point, outputs))
                continue
            outputs = compare(actual, expected, table, spec.undefined_positions(feed, expected))
            records.append(parity_record(variant, PROVIDER, point, outputs))
    return records


REFUSED = "onnxruntime refused to load the graph"


def _refused(spec, variant: str, point, table: ToleranceTable, err: BaseException) -> ParityRecord:
    """A failing record for a graph that onnxruntime refused to load: for an optional variant
    the reason it is dropped, for the base graph the reason the export fails."""
    expected = eager_outputs(spec, spec.make_inputs(point), [])
    outputs = _run_failed(expected, table, err, REFUSED)
    return parity_record(variant, PROVIDER, point, outputs)


def _run_failed(
    expected, table: ToleranceTable, err: BaseException, what: str = "onnxruntime failed"
) -> list[OutputParity]:
    """Failing records for every output of a run that onnxruntime refused."""
    reason = f"{what}: {str(err).splitlines()[0][:240]}"
    nan = float("nan")
    outputs = []
    for name, ref in expected.items():
        tol = table.lookup(name, str(ref.dtype))
        outputs.append(
            OutputParity(
                name,
                str(ref.dtype),
                tuple(ref.shape),
                nan,
                nan,
                nan,
                1.0,
                (),
                0,
                0,
                tol.atol,
                tol.rtol,
                nan,
                False,
                reason,
            )
        )
    return outputs
