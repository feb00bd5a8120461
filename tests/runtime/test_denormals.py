"""Denormals flushed to zero inside onnxruntime's calls, kept outside them."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import Runner, _denormals
from runtime._denormals import DENORMALS_ARE_ZERO, FLUSH_TO_ZERO, SESSION_OPTION, flushed
from runtime._session import session_options

from .conftest import D, reference, weight

TINY = np.finfo(np.float32).tiny  # the smallest normal float32
FLAGS = FLUSH_TO_ZERO | DENORMALS_ARE_ZERO
needs_mxcsr = pytest.mark.skipif(
    not _denormals.supported(), reason="sets MXCSR through glibc on x86-64 Linux only"
)


def denormal_product() -> np.float32:
    return np.float32(1e-30) * np.float32(1e-10)  # 1e-40, below TINY


@pytest.fixture
def unflushed_thread():
    """This thread without FTZ/DAZ for the test, whatever an earlier session left (onnxruntime
    sets them for good on the thread that creates a process's first session, if it asks)."""
    saved = _denormals._get()
    clear = _denormals._Fenv.from_buffer_copy(saved)
    clear.mxcsr &= ~FLAGS
    _denormals._set(clear)
    yield
    _denormals._set(saved)


@needs_mxcsr
def test_flushed_sets_and_restores_the_calling_threads_mxcsr(unflushed_thread):
    assert denormal_product() > 0
    with flushed():
        assert _denormals.mxcsr() & FLAGS == FLAGS
        assert denormal_product() == 0
    assert _denormals.mxcsr() & FLAGS == 0
    assert denormal_product() > 0


@needs_mxcsr
def test_flushed_restores_after_an_exception(unflushed_thread):
    with pytest.raises(KeyError), flushed():
        raise KeyError("inside")
    assert _denormals.mxcsr() & FLAGS == 0


@needs_mxcsr
def test_runner_flushes_on_the_calling_thread_only_while_it_runs(tiny_bundle, unflushed_thread):
    # softmax(x @ W + m) with a score 90 below the row's largest: exp(-90) / sum is a denormal,
    # which numpy keeps and onnxruntime, run on this thread for so small a tensor, flushes.
    x = np.zeros((1, 1, D), np.float32)
    m = np.zeros((1, D), np.float32)
    m[0, 1] = -90.0
    want = reference(x, m, weight())
    assert 0 < want[0, 0, 1] < TINY
    with Runner(tiny_bundle) as runner:
        got = runner.run({"x": x, "m": m})["y"]
    assert got[0, 0, 1] == 0.0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=TINY)
    assert denormal_product() > 0  # the caller's own arithmetic is as it was


def test_the_runners_session_options_flush_the_worker_threads(tmp_path):
    assert session_options(tmp_path).get_session_config_entry(SESSION_OPTION) == "1"


def test_without_mxcsr_access_flushed_changes_nothing(monkeypatch):
    monkeypatch.setattr(_denormals, "_libm", lambda: None)
    assert not _denormals.supported()
    assert _denormals.mxcsr() is None
    with flushed():
        assert denormal_product() > 0
