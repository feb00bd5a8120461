"""Routing to native ONNX ops for the ``attention23`` export variant.

Inside ``onnx_native()``, rotary embeddings emit ``torch.onnx.ops.rotary_embedding`` (exported
as ONNX RotaryEmbedding-23) and a causal sliding window the kernel op ``attnx::attention``,
which export/_native_onnx.py lowers to ONNX Attention-25 with ``left_window_size``. Outside it
(eager, and every other export) the modules run their plain torch code; the torch.onnx ops'
own eager code computes the same numbers.
"""

from __future__ import annotations

import contextlib

_NATIVE = False
_WINDOWS = [0]


@contextlib.contextmanager
def onnx_native():
    """Yields a one-item list counting the windowed attention cores routed so far: a graph
    with one needs opset 25."""
    global _NATIVE
    previous, _NATIVE = _NATIVE, True
    _WINDOWS[0] = 0
    try:
        yield _WINDOWS
    finally:
        _NATIVE = previous


def native() -> bool:
    """Whether modules emit native ONNX ops (inside ``onnx_native()``)."""
    return _NATIVE


def count_window() -> None:
    _WINDOWS[0] += 1
