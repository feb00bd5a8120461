"""The Python API: export a zoo entry or any nn.Module, prove parity, write a bundle."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import nn

from runtime import Tolerance

from ._errors import ExportError
from ._pipeline import DEFAULT_OPSET, ExportResult, Progress, run_pipeline
from ._spec import spec_from_module, spec_from_zoo


def export_entry(
    name: str,
    *,
    out: Path | str | None = None,
    opset: int = DEFAULT_OPSET,
    grid: list[Mapping[str, int]] | None = None,
    progress: Progress | None = None,
    variants: tuple[str, ...] | None = None,
) -> ExportResult:
    """Export the zoo entry ``name`` and prove parity over its grid; write ``out/<name>``."""
    from models import zoo

    spec = spec_from_zoo(zoo.get(name))
    return run_pipeline(spec, out=out, opset=opset, grid=grid, progress=progress, variants=variants)


def export_module(
    module: nn.Module,
    example_inputs=None,
    *,
    dynamic: Mapping[str, Mapping[int, str | tuple]] | None = None,
    dims: Mapping[str, tuple[int, int]] | None = None,
    out: Path | str | None = None,
    name: str | None = None,
    output_names: tuple[str, ...] | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: Mapping[str, Tolerance] | None = None,
    grid: list[Mapping[str, int]] | None = None,
    progress: Progress | None = None,
    variants: tuple[str, ...] | None = None,
    value_ranges: Mapping[str, tuple[int, int] | None] | None = None,
    cache=None,
    input_maker=None,
    task: str | None = None,
) -> ExportResult:
    """Export any module: ``export_module(m, {"x": x}, dynamic={"x": {0: "batch", 1: "seq"}},
    out="artifacts")``. Raises ExportError (naming the stage) or ParityError.

    ``dynamic`` maps an input name to {axis: dim name} or {axis: (dim name, min, max)};
    ``dims`` gives ranges for names declared without one. Parity runs over the default grid of
    those dims unless ``grid`` is given; ``out`` None skips writing a bundle.
    ``value_ranges`` gives integer inputs their allowed (min, max) values, both inclusive
    (None: no range); an input that indexes an embedding table gets its rows by default.
    ``cache`` (a models.zoo.KVCache) describes past inputs and present outputs: the decode loop
    is checked step by step and the manifest records the layout. ``input_maker`` (point ->
    {name: tensor}) makes the grid's inputs instead of random ones like the examples.

    A Hugging Face ``PreTrainedModel`` needs no ``dynamic``: its inputs have ``batch`` and
    ``seq`` dims with ranges from its config (``dims`` overrides them), example inputs are
    optional, and its ModelOutput fields are the outputs (export/_hf.py). ``task=
    "text-generation-with-past"`` exports a causal LM with its KV cache, for generation
    (export/_hf_generation.py).
    """
    from ._hf import is_pretrained
    from ._hf_tasks import spec_for_task

    if is_pretrained(module):
        if dynamic is not None or output_names is not None or cache is not None:
            raise ExportError(
                "a Hugging Face model takes its dims, outputs and cache from its config; "
                "pass dims= to change the ranges, not dynamic, output_names or cache",
                stage=1,
            )
        spec = spec_for_task(
            module,
            task,
            example_inputs=example_inputs,
            dims=dims,
            name=name,
            tolerance=tolerance,
            input_maker=input_maker,
            value_ranges=value_ranges,
        )
    else:
        if task is not None:
            raise ExportError(f"task {task!r} is for Hugging Face models; {type(module).__name__} "
                              "is not one", stage=1)
        if example_inputs is None:
            raise ExportError(
                "example_inputs are needed for a module that is not a Hugging Face model", stage=1
            )
        spec = spec_from_module(
            module,
            example_inputs,
            dynamic=dynamic,
            dims=dims,
            name=name,
            output_names=output_names,
            tolerance=tolerance,
            value_ranges=value_ranges,
            cache=cache,
            input_maker=input_maker,
        )
    return run_pipeline(spec, out=out, opset=opset, grid=grid, progress=progress, variants=variants)
