"""onnxruntime sessions and the arrays that cross between torch and them, for the export side.

Sessions take the Runner's own options (runtime/_session.py), so parity and variant timings are
measured under the settings that serve the bundle.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch

from ._spec import ExportSpec

PROVIDER = "CPUExecutionProvider"


def make_session(model: onnx.ModelProto):
    """A CPU session on the Runner's options: its graph optimizations, threads and arena, so
    the fusions that change rounding are part of what parity checks. The models here carry
    their weights inline; the folder onnxruntime would read external data from is empty."""
    from runtime._session import new_session, session_options

    with tempfile.TemporaryDirectory(prefix="attnx-session-") as folder:
        options = session_options(Path(folder))
        return new_session(model.SerializeToString(), options, [PROVIDER])


def eager_outputs(
    spec: ExportSpec, feed: Mapping[str, torch.Tensor], names: list[str]
) -> dict[str, np.ndarray]:
    """torch eager outputs, named by the spec's declared outputs, else like the graph's outputs
    (extras get output_<i>), so a missing graph output shows up by name."""
    with torch.no_grad():
        out = spec.module(**feed, **spec.forward_kwargs)
    tensors = list(out) if isinstance(out, tuple | list) else [out]
    names = list(spec.output_names or names)
    result = {}
    for i, tensor in enumerate(tensors):
        key = names[i] if i < len(names) else f"output_{i}"
        result[key] = tensor.detach().cpu().numpy()
    return result


def to_numpy(feed: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy() for name, t in feed.items()}
