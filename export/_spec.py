"""What to export: a module, its named inputs with symbolic dims, and how to make inputs.

A zoo entry becomes an ExportSpec through ``spec_from_zoo``; any nn.Module through
``spec_from_module`` (what ``export_module`` and ``attnx export pkg.mod:factory`` use).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from runtime import Cache, CacheTensor, Tolerance

from ._errors import ExportError

# Ranges for dynamic dims that a user declared without one. torch.export needs an upper bound
# to reason about guards; the runtime refuses inputs beyond it.
DEFAULT_DIM_RANGE = (1, 1024)


@dataclass(frozen=True)
class InputDecl:
    """A graph input: name, torch dtype and shape (ints static, strings dim names)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class ExportSpec:
    """Everything the pipeline needs, for a zoo entry or any module."""

    name: str
    module: nn.Module
    inputs: tuple[InputDecl, ...]
    output_names: tuple[str, ...] | None
    dims: Mapping[str, tuple[int, int]]
    example: Mapping[str, int]
    make_inputs: Callable[[Mapping[str, int]], dict[str, torch.Tensor]]
    tolerance: Mapping[str, Tolerance]
    source: Mapping[str, object]
    forward_kwargs: Mapping[str, object] = field(default_factory=dict)
    example_inputs: Mapping[str, torch.Tensor] | None = None
    # Free-form JSON copied into manifest.json's "extra".
    extra: Mapping[str, object] = field(default_factory=dict)
    # How past inputs feed present outputs, for a cached block: the manifest's typed cache,
    # and what the decode-loop parity stage runs.
    cache: Cache | None = None
    # How stage 1 captures the module: (spec, opset, custom translation table, dynamic shapes)
    # -> ModelProto; None: torch.onnx.export of the module (a Hugging Face model goes through
    # transformers' exporter, export/_hf.py).
    capture_with: Callable | None = None
    # (feed, torch outputs) -> {output name: bool mask} of the positions the module defines no
    # answer for (a causal query whose keys are all padding); parity leaves them out.
    undefined: Callable | None = None
    # point -> the nearest point the module accepts (e.g. past + seq within a model's positions);
    # the grid's points go through it. None: every point within the dims' ranges is accepted.
    fit_point: Callable[[Mapping[str, int]], dict[str, int]] | None = None
    # Declared (min, max) values of integer inputs, both inclusive; None: no range. Inputs not
    # named here take the range of the embedding table they index (export/_ranges.py).
    value_ranges: Mapping[str, tuple[int, int] | None] = field(default_factory=dict)

    def undefined_positions(self, feed, outputs) -> dict:
        """Per output, the positions the module defines no answer for (``undefined``)."""
        return {} if self.undefined is None else dict(self.undefined(feed, outputs))

    def example_feed(self) -> dict[str, torch.Tensor]:
        if self.example_inputs is not None:
            return dict(self.example_inputs)
        return self.make_inputs(self.example)


_TORCH_DTYPES = {"float": torch.float32, "ids": torch.int64}


def spec_from_zoo(entry, **overrides) -> ExportSpec:
    """ExportSpec of a models.zoo entry."""
    from models.zoo import TOLERANCE_CLASSES

    module = entry.build(**overrides)
    tolerance = {
        dtype: Tolerance(**values) for dtype, values in TOLERANCE_CLASSES[entry.tolerance].items()
    }
    return ExportSpec(
        name=entry.name,
        module=module,
        inputs=tuple(InputDecl(s.name, s.dtype, tuple(s.shape)) for s in entry.inputs),
        output_names=tuple(entry.outputs),
        dims=dict(entry.dims),
        example=dict(entry.example),
        make_inputs=entry.make_inputs,
        tolerance=tolerance,
        source={
            "target": entry.source(),
            "class": f"{type(module).__module__}.{type(module).__qualname__}",
            "config": {**entry.config, **overrides},
            "description": entry.description,
        },
        forward_kwargs=dict(entry.forward_kwargs),
        cache=None if entry.cache is None else manifest_cache(entry.cache, entry.dims),
    )


def manifest_cache(kv, dims: Mapping[str, tuple[int, int]]) -> Cache:
    """The manifest's Cache of a models.zoo.KVCache: the most positions a cache may hold is the
    declared max of the "past" dim."""
    if "past" not in dims:
        raise ExportError(
            f"a cache needs a dynamic 'past' dim on its past inputs; the dims are {sorted(dims)}",
            stage=1,
            hint="declare the past length as 'past' in dynamic, e.g. {3: ('past', 0, 512)}",
        )
    holds = ("keys", "values")
    return Cache(
        tensors=tuple(
            CacheTensor(past, present, holds[i * len(holds) // len(kv.pairs)])
            for i, (past, present) in enumerate(kv.pairs)
        ),
        layout=kv.layout,
        past_axis=kv.past_axis,
        batch_axis=kv.batch_axis,
        max_length=dims["past"][1],
        token_input=kv.token_input,
        logits_output=kv.logits_output,
    )


def spec_from_module(
    module: nn.Module,
    example_inputs,
    *,
    dynamic: Mapping[str, Mapping[int, str | tuple]] | None = None,
    dims: Mapping[str, tuple[int, int]] | None = None,
    name: str | None = None,
    output_names: tuple[str, ...] | None = None,
    tolerance: Mapping[str, Tolerance] | None = None,
    source: Mapping[str, object] | None = None,
    value_ranges: Mapping[str, tuple[int, int] | None] | None = None,
    cache=None,
    input_maker: Callable[[Mapping[str, int]], dict[str, torch.Tensor]] | None = None,
) -> ExportSpec:
    """ExportSpec of any module.

    Args:
        example_inputs: a dict of input name -> tensor, or a tuple in forward() order (names
            are taken from forward's signature).
        dynamic: per input, axis -> dim name, or axis -> (dim name, min, max). A dim name shared
            by several inputs is one symbolic size.
        dims: ranges of dim names declared without one (default DEFAULT_DIM_RANGE).
        value_ranges: per integer input, (min, max) values, both inclusive, or None for no
            range; by default an input that indexes an embedding table gets its rows.
        cache: a models.zoo.KVCache for a module with past inputs and present outputs; the
            decode loop is then checked too, and the bundle can be decoded step by step.
        input_maker: point (dim name -> size) -> {input name: tensor}, the grid's inputs.

    Inputs at other shapes are made like the examples: floats standard normal, integers
    uniform in their declared range, else in [0, max(example) + 1), booleans True with the
    example's fraction of True.
    """
    from ._ranges import check_declared

    feed = _named_inputs(module, example_inputs)
    declared = check_declared(value_ranges or {}, {n: t.dtype for n, t in feed.items()})
    ranges, axes = _parse_dynamic(dynamic or {}, dims or {}, feed)
    example = {}
    for input_name, input_axes in axes.items():
        for axis, dim in input_axes.items():
            example.setdefault(dim, int(feed[input_name].shape[axis]))
    decls = tuple(
        InputDecl(n, t.dtype, tuple(axes.get(n, {}).get(i, size) for i, size in enumerate(t.shape)))
        for n, t in feed.items()
    )
    module = module.eval()
    cls = type(module)
    return ExportSpec(
        name=name or cls.__name__.lower(),
        module=module,
        inputs=decls,
        output_names=tuple(output_names) if output_names else None,
        dims=ranges,
        example=example,
        make_inputs=input_maker or _like_examples(decls, feed, declared),
        tolerance=dict(tolerance or {}),
        source=dict(source or {"target": None, "class": f"{cls.__module__}.{cls.__qualname__}"}),
        example_inputs=feed,
        value_ranges=declared,
        cache=None if cache is None else manifest_cache(cache, ranges),
    )


def _named_inputs(module: nn.Module, example_inputs) -> dict[str, torch.Tensor]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        feed = dict(example_inputs)
    else:
        params = list(inspect.signature(module.forward).parameters)
        if len(example_inputs) > len(params):
            raise ExportError(
                f"{len(example_inputs)} example inputs but forward() takes {len(params)}: "
                f"{', '.join(params)}",
                stage=1,
            )
        feed = dict(zip(params, example_inputs, strict=False))
    for input_name, value in feed.items():
        if not isinstance(value, torch.Tensor):
            raise ExportError(
                f"example input '{input_name}' is a {type(value).__name__}, not a torch.Tensor",
                stage=1,
            )
    return feed


def _parse_dynamic(dynamic, dims, feed):
    ranges: dict[str, tuple[int, int]] = {}
    axes: dict[str, dict[int, str]] = {}
    for input_name, spec in dynamic.items():
        if input_name not in feed:
            raise ExportError(
                f"dynamic names input '{input_name}', which is not among the example inputs "
                f"({', '.join(feed)})",
                stage=1,
            )
        rank = feed[input_name].dim()
        for axis, dim in spec.items():
            if not 0 <= axis < rank:
                raise ExportError(
                    f"dynamic axis {axis} of input '{input_name}' is out of range for rank {rank}",
                    stage=1,
                )
            if isinstance(dim, tuple):
                dim, lo, hi = dim
                ranges[dim] = (int(lo), int(hi))
            axes.setdefault(input_name, {})[axis] = dim
            ranges.setdefault(dim, tuple(dims.get(dim, DEFAULT_DIM_RANGE)))
    return ranges, axes


def _like_examples(decls, feed, value_ranges):
    def make(point: Mapping[str, int]) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(sum(point.values()) * 7919 + len(point))
        out = {}
        for decl in decls:
            shape = [point[d] if isinstance(d, str) else d for d in decl.shape]
            bounds = value_ranges.get(decl.name)
            out[decl.name] = _random_like(feed[decl.name], shape, gen, bounds)
        return out

    return make


def _random_like(example: torch.Tensor, shape, gen, bounds=None) -> torch.Tensor:
    if example.dtype == torch.bool:
        return torch.rand(shape, generator=gen) < example.float().mean().item()
    if example.dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(example.dtype)
    if bounds is not None:
        return torch.randint(bounds[0], bounds[1] + 1, shape, generator=gen, dtype=example.dtype)
    high = int(example.max().item()) + 1 if example.numel() else 1
    return torch.randint(0, max(high, 1), shape, generator=gen, dtype=example.dtype)
