"""Value ranges of integer inputs, for the manifest (runtime enforces them).

Token ids index an embedding table. torch's embedding raises on an id outside the table;
ONNX Gather wraps a negative index and onnxruntime fails deep in the graph one past the end,
so a wrong id either returns plausible logits or blames the bundle. The range comes from the
table an input indexes in the exported graph, or from the user's declaration.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

import onnx
from onnx import helper

from ._errors import ExportError

# Ops that hand their first input's values on unchanged (possibly reshaped or retyped).
VALUE_PRESERVING = {"Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand"}
INTEGER_TYPES = {
    onnx.TensorProto.INT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.UINT64,
}


def embedding_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """{integer input: (0, rows - 1)} for each input whose values index the rows of a weight
    table (Gather on axis 0 of an initializer); the smallest table where it indexes several."""
    graph = model.graph
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    tables = {t.name: t.dims[0] for t in graph.initializer if t.dims}
    ranges = {}
    for value in graph.input:
        if value.type.tensor_type.elem_type not in INTEGER_TYPES:
            continue
        rows = _indexed_rows(value.name, consumers, tables)
        if rows:
            ranges[value.name] = (0, min(rows) - 1)
    return ranges


def _indexed_rows(name: str, consumers, tables: Mapping[str, int]) -> list[int]:
    rows, todo, seen = [], [name], {name}
    while todo:
        current = todo.pop()
        for node in consumers.get(current, ()):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Gather" and node.input[1] == current:
                axis = next((helper.get_attribute_value(a) for a in node.attribute
                             if a.name == "axis"), 0)
                if axis == 0 and node.input[0] in tables:
                    rows.append(tables[node.input[0]])
            elif node.op_type in VALUE_PRESERVING and node.input[0] == current:
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        todo.append(out)
    return rows


def value_ranges(
    model: onnx.ModelProto, declared: Mapping[str, tuple[int, int] | None]
) -> dict[str, tuple[int, int]]:
    """The embedding ranges, overridden by the user's declarations (None: no range)."""
    ranges = {**embedding_ranges(model), **declared}
    return {name: r for name, r in ranges.items() if r is not None}


def check_declared(
    declared: Mapping[str, tuple[int, int] | None], dtypes: Mapping[str, object]
) -> dict[str, tuple[int, int] | None]:
    """Declared value ranges name integer inputs and read (min, max), both inclusive."""
    out: dict[str, tuple[int, int] | None] = {}
    for name, bounds in declared.items():
        if name not in dtypes:
            raise ExportError(
                f"value_ranges names '{name}', which is not an input ({', '.join(dtypes)})",
                stage=1,
            )
        dtype = dtypes[name]
        if getattr(dtype, "is_floating_point", True) or str(dtype) == "torch.bool":
            raise ExportError(
                f"value_ranges['{name}']: only integer inputs take a value range, not {dtype}",
                stage=1,
            )
        if bounds is None:
            out[name] = None
            continue
        if not isinstance(bounds, tuple | list) or len(bounds) != 2:
            raise ExportError(
                f"value_ranges['{name}'] is {bounds!r}; expected (min, max) or None",
                stage=1,
            )
        lo, hi = (int(b) for b in bounds)
        if hi < lo:
            raise ExportError(
                f"value_ranges['{name}']: max ({hi}) is below min ({lo})",
                stage=1,
                hint="give (min, max), both inclusive: token ids are (0, vocab - 1)",
            )
        out[name] = (lo, hi)
    return out
