"""Stages 1 and 2: capture a module with torch.onnx (dynamo) and check the graph it wrote."""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from collections.abc import Mapping

import onnx
import torch

from ._errors import ExportError
from ._spec import ExportSpec

# torch.export keeps process-wide tracing state: two captures in two threads at once failed
# now and then with a TorchExportError (tests/export/test_routing.py), so captures take turns.
# Attention routing is per thread (models/_native.py), so everything else runs concurrently.
_CAPTURE_LOCK = threading.Lock()


def capture(spec: ExportSpec, opset: int, custom_translation_table=None) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=True) with dynamic_shapes built from the spec's dims."""
    feed = spec.example_feed()
    _check_examples(spec, feed)
    dynamic_shapes = _dynamic_shapes(spec)
    log = io.StringIO()
    try:
        with _CAPTURE_LOCK, _quiet(log):
            if spec.capture_with is not None:
                return spec.capture_with(spec, opset, custom_translation_table, dynamic_shapes)
            program = torch.onnx.export(
                spec.module,
                (),
                kwargs={**feed, **spec.forward_kwargs},
                dynamic_shapes=dynamic_shapes,
                output_names=list(spec.output_names) if spec.output_names else None,
                opset_version=opset,
                custom_translation_table=custom_translation_table,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    except Exception as err:  # torch raises many types; all mean "this module did not export"
        raise _capture_error(err) from err
    return program.model_proto


def _check_examples(spec: ExportSpec, feed: Mapping[str, torch.Tensor]) -> None:
    declared = [d.name for d in spec.inputs]
    if sorted(feed) != sorted(declared):
        raise ExportError(
            f"example inputs {sorted(feed)} differ from the declared inputs {sorted(declared)}",
            stage=1,
        )
    for decl in spec.inputs:
        for axis, dim in enumerate(decl.shape):
            if isinstance(dim, str) and feed[decl.name].shape[axis] < 2:
                raise ExportError(
                    f"example size of dim '{dim}' (input '{decl.name}', axis {axis}) is "
                    f"{feed[decl.name].shape[axis]}; torch.export specializes sizes 0 and 1 "
                    "(pytorch#148629)",
                    stage=1,
                    hint="use an example of size >= 2 on every dynamic dim",
                )
    _check_aliasing(feed)


def _check_aliasing(feed: Mapping[str, torch.Tensor]) -> None:
    """Refuse example inputs that share memory: torch.onnx wires such inputs to one graph input
    and silently ignores the others (pytorch#139646)."""
    seen: dict[int, str] = {}
    for name, tensor in feed.items():
        if tensor.numel() == 0:
            continue
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            raise ExportError(
                f"example inputs '{seen[ptr]}' and '{name}' share memory; torch.onnx miswires "
                "aliased inputs (pytorch#139646)",
                stage=1,
                hint=f"pass distinct tensors, e.g. {name}.clone()",
            )
        seen[ptr] = name


def _dynamic_shapes(spec: ExportSpec) -> dict[str, dict[int, object]]:
    dims = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, hi) in spec.dims.items()}
    return {
        decl.name: {axis: dims[d] for axis, d in enumerate(decl.shape) if isinstance(d, str)}
        for decl in spec.inputs
    }


@contextlib.contextmanager
def _quiet(log: io.StringIO):
    """Keep the exporters' progress prints and warnings off the user's console (torch.onnx's,
    and transformers' exporter's version-drift notes)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _capture_error(err: Exception) -> ExportError:
    text = str(err)
    first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)
    if "Constraints violated" in text or "specializ" in text or "Not all values of" in text:
        return ExportError(
            f"a dynamic dim was specialized: {first[:300]}",
            stage=1,
            hint="the module bakes in an example size (a table or reshape built for exactly "
            "that length, or int() of a size); compute it from the input's shape in forward",
        )
    return ExportError(
        f"torch.onnx.export failed: {type(err).__name__}: {first[:300]}",
        stage=1,
        hint="run torch.export.export on the module to see the full trace",
    )


# --- stage 2: check -----------------------------------------------------------------------------


def check_graph(model: onnx.ModelProto, spec: ExportSpec) -> None:
    """Full ONNX check; graph inputs map one-to-one to the module's inputs and are all read;
    declared dynamic dims are symbolic; outputs match the declared names."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"onnx.checker rejected the graph: {err}", stage=2) from err
    graph_inputs = [i.name for i in model.graph.input]
    declared = [d.name for d in spec.inputs]
    if graph_inputs != declared:
        raise ExportError(
            f"graph inputs {graph_inputs} do not map one-to-one to the module inputs {declared}",
            stage=2,
            hint="inputs that torch found unused or constant are dropped; pass only inputs "
            "that forward() reads",
        )
    unread = sorted(set(graph_inputs) - _read_names(model.graph))
    if unread:
        raise ExportError(
            f"graph inputs {unread} are never read by the graph",
            stage=2,
            hint="aliased example inputs miswire the graph (pytorch#139646); pass distinct tensors",
        )
    _check_symbolic(model, spec)
    if spec.output_names is not None:
        outputs = [o.name for o in model.graph.output]
        if outputs != list(spec.output_names):
            raise ExportError(
                f"graph outputs {outputs} differ from the declared outputs "
                f"{list(spec.output_names)}",
                stage=2,
            )


def _read_names(graph: onnx.GraphProto) -> set[str]:
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.type in (5, 10) else []:
                names |= _read_names(sub)
    return names


def _check_symbolic(model: onnx.ModelProto, spec: ExportSpec) -> None:
    by_name = {i.name: i for i in model.graph.input}
    for decl in spec.inputs:
        dims = by_name[decl.name].type.tensor_type.shape.dim
        for axis, want in enumerate(decl.shape):
            if isinstance(want, str) and not dims[axis].dim_param:
                raise ExportError(
                    f"input '{decl.name}' axis {axis} was declared dynamic ('{want}') but the "
                    f"saved graph fixes it to {dims[axis].dim_value}",
                    stage=2,
                    hint="torch specialized the dim; see the export log",
                )
