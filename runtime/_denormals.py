"""Denormal floats flushed to zero while onnxruntime computes on the calling thread.

onnxruntime's CPU attention kernels turn every masked score into a denormal: their exp clamps
its argument at -104 and scales by 2^n, so exp(masked - max) is about 1e-45 rather than 0, and
the product with the value block then multiplies denormals, which an Intel core does in
microcode. GroupQueryAttention masks the upper triangle of its diagonal key block that way; on
a Xeon (AVX-512, 2 MB of L2, so key blocks of 1024) it took 1.7x as long at batch 8, seq 512
as with denormals flushed. Flushing changes no result by more than the smallest normal float
(1.2e-38) per operation.

onnxruntime flushes on its own worker threads when the session option
``session.set_denormal_as_zero`` is set, but its intra-op pool also runs work on the thread
that calls ``run``, and that thread it sets only once per process (on whichever thread creates
the first session, and only if that session asked for it). ``flushed()`` sets the calling
thread's SSE control register (MXCSR: flush-to-zero and denormals-are-zero) for the duration of
a call and restores it afterwards, so the caller's own arithmetic outside attnx keeps its
denormals. It works through glibc's fegetenv/fesetenv on x86-64 Linux; elsewhere it does
nothing (``supported()`` says which).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
import sys

FLUSH_TO_ZERO = 0x8000  # MXCSR bit 15
DENORMALS_ARE_ZERO = 0x0040  # MXCSR bit 6
SESSION_OPTION = "session.set_denormal_as_zero"


class _Fenv(ctypes.Structure):
    """glibc's x86-64 fenv_t: the x87 environment (28 bytes), then MXCSR."""

    _fields_ = [("x87", ctypes.c_ubyte * 28), ("mxcsr", ctypes.c_uint32)]


@functools.cache
def _libm():
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    name = ctypes.util.find_library("m")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def supported() -> bool:
    """Whether this platform lets attnx set the calling thread's MXCSR."""
    return _libm() is not None


def mxcsr() -> int | None:
    """The calling thread's MXCSR, or None where it cannot be read."""
    env = _get()
    return None if env is None else env.mxcsr


def _get() -> _Fenv | None:
    libm = _libm()
    env = _Fenv()
    if libm is None or libm.fegetenv(ctypes.byref(env)) != 0:
        return None
    return env


def _set(env: _Fenv) -> None:
    _libm().fesetenv(ctypes.byref(env))


@contextlib.contextmanager
def flushed():
    """Denormals flushed to zero on the calling thread inside the block, as they were after."""
    saved = _get()
    if saved is None:
        yield
        return
    flushing = _Fenv.from_buffer_copy(saved)
    flushing.mxcsr |= FLUSH_TO_ZERO | DENORMALS_ARE_ZERO
    _set(flushing)
    try:
        yield
    finally:
        _set(saved)


class FlushedSession:
    """An onnxruntime InferenceSession whose runs flush denormals on the calling thread; every
    other attribute is the session's own."""

    def __init__(self, session) -> None:
        self._session = session

    def run(self, *args, **kwargs):
        with flushed():
            return self._session.run(*args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        with flushed():
            return self._session.run_with_iobinding(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)
