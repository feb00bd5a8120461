"""Attention routing is scoped to one capture in one thread: an export routing cores to
kernels or native ops never changes what another thread's eager run or export sees."""

from __future__ import annotations

import threading

import torch

from export import run_pipeline, spec_from_zoo
from export._variants import op_census
from models import zoo
from models._kernels import ort_kernels, routing
from models._native import native, onnx_native

TIMEOUT_S = 60


def test_a_route_is_restored_on_exit_even_after_an_error():
    try:
        with ort_kernels():
            assert routing() and not native()
            with onnx_native():
                assert native() and not routing()
            assert routing()
            raise ValueError("inside")
    except ValueError:
        pass
    assert not routing() and not native()


def test_another_thread_inside_a_route_does_not_route_this_threads_cores():
    spec = spec_from_zoo(zoo.get("causal_self"))
    feed = spec.example_feed()
    with torch.no_grad():
        expected = spec.module(**feed)
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def exporter():
        with ort_kernels() as route:
            inside.set()
            done.wait(TIMEOUT_S)  # the route stays open while the main thread runs
            seen["calls"] = route.calls

    thread = threading.Thread(target=exporter)
    thread.start()
    assert inside.wait(TIMEOUT_S)
    try:
        assert not routing() and not native()
        with torch.no_grad():
            torch.testing.assert_close(spec.module(**feed), expected, rtol=0, atol=0)
    finally:
        done.set()
        thread.join(TIMEOUT_S)
    assert seen["calls"] == 0  # this thread's core was not counted into the other's route


def test_two_threads_exporting_different_entries_at_once_get_their_own_graphs():
    """causal_self's fused graph (kernel routing) and sliding_window's native graph
    (Attention-25) captured at the same time: each has only its own route's ops."""
    results, errors = {}, []
    start = threading.Barrier(2)

    def export(name, variant):
        try:
            spec = spec_from_zoo(zoo.get(name))
            start.wait(TIMEOUT_S)
            result = run_pipeline(spec, out=None, grid=[dict(spec.example)], variants=(variant,))
            results[name] = op_census(result.variants[variant].model)
        except Exception as err:  # reported below, with the thread's name
            errors.append(f"{name}: {type(err).__name__}: {err}")

    threads = [
        threading.Thread(target=export, args=("causal_self", "fused")),
        threading.Thread(target=export, args=("sliding_window", "attention23")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    fused, native_graph = results["causal_self"], results["sliding_window"]
    assert fused.get("com.microsoft.GroupQueryAttention") == 1 and "Attention" not in fused
    assert native_graph.get("Attention") == 1
    assert not any(op.startswith("com.microsoft.") for op in native_graph)
