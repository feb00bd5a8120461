"""Routing to native ONNX ops for the ``attention23`` export variant.

Inside ``onnx_native()``, rotary embeddings emit ``torch.onnx.ops.rotary_embedding`` (exported
as ONNX RotaryEmbedding-23) and a causal sliding window the kernel op ``attnx::attention``,
which export/rewrites/native.py lowers to ONNX Attention-25 with ``left_window_size``. Outside it
(eager, and every other export) the modules run their plain torch code; the torch.onnx ops'
own eager code computes the same numbers.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Route:
    """Where attention cores go during one capture, and what went there.

    target: "kernels" (onnxruntime kernel ops, the fused variant) or "native" (ONNX
    Attention and RotaryEmbedding, the attention23 variant); calls: attention cores and rotary
    embeddings routed to a kernel op; windows: causal windows routed (a native graph with one
    needs opset 25).
    """

    target: str
    calls: int = 0
    windows: int = 0


# Per thread and per asyncio task: two exports at once each see only their own route.
_ROUTE: contextvars.ContextVar[Route | None] = contextvars.ContextVar("attnx_route", default=None)


@contextlib.contextmanager
def routed(target: str) -> Iterator[Route]:
    """Route attention cores to ``target`` until the block exits, in this thread only."""
    route = Route(target)
    token = _ROUTE.set(route)
    try:
        yield route
    finally:
        _ROUTE.reset(token)


def kernel_route() -> Route | None:
    """The Route inside ``models._kernels.ort_kernels()``, else None."""
    route = _ROUTE.get()
    return route if route is not None and route.target == "kernels" else None


def onnx_native():
    """Route to native ONNX ops; yields the Route, whose ``windows`` counts the windowed
    attention cores routed so far."""
    return routed("native")


def native() -> bool:
    """Whether modules emit native ONNX ops (inside ``onnx_native()``)."""
    route = _ROUTE.get()
    return route is not None and route.target == "native"


def count_window() -> None:
    _ROUTE.get().windows += 1
