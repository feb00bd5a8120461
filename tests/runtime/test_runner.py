"""Runner: providers, variant choice, correct results for odd layouts, output checks, threads."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from runtime import (
    ArtifactError,
    AttnxError,
    InputError,
    Manifest,
    ProviderError,
    Runner,
    choose_variant,
    load_bundle,
    resolve_provider,
)
from runtime._session import create_session, execution_providers

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def bundle(_templates):
    return load_bundle(_templates["inline"])


@pytest.fixture(scope="module")
def runner(bundle):
    with Runner(bundle, provider="cpu") as r:
        yield r


@pytest.mark.parametrize("variant", ["base", "alt"])
def test_golden_cases_match(bundle, variant):
    with Runner(bundle, provider="cpu", variant=variant) as r:
        assert r.variant.name == variant and r.provider == CPU and r.session_seconds > 0
        for g in bundle.golden:
            out = r.run(dict(g.inputs))
            assert list(out) == ["y"]
            np.testing.assert_allclose(out["y"], g.outputs["y"], atol=ATOL, rtol=RTOL)


def test_external_data_bundle_runs(tiny_bundle_ext):
    with Runner(tiny_bundle_ext, provider="cpu") as r:
        g = r.bundle.golden[1]
        np.testing.assert_allclose(r.run(dict(g.inputs))["y"], g.outputs["y"], atol=ATOL, rtol=RTOL)


def test_odd_layouts_give_identical_results(runner, bundle):
    g = bundle.golden[0]
    native = runner.run(dict(g.inputs))["y"]
    x = g.inputs["x"]
    for odd in (
        x.astype(">f4"),
        np.asfortranarray(x),
        np.repeat(x, 2, axis=1)[:, ::2],
        x[:, ::-1].copy()[:, ::-1],
    ):
        out = runner.run({**g.inputs, "x": odd})["y"]
        assert np.array_equal(out, native)
    m_big = g.inputs["m"].astype(">f4")
    assert np.array_equal(runner.run({**g.inputs, "m": m_big})["y"], native)


def test_bad_input_never_reaches_onnxruntime(runner, bundle):
    g = bundle.golden[0]
    with pytest.raises(InputError, match=r"Input 'x': axis 1 \('seq'\) expected 1..16, got 0"):
        runner.run({**g.inputs, "x": np.zeros((2, 0, 8), np.float32)})
    with pytest.raises(InputError, match=r"'W' is a weight \(initializer\)"):
        runner.run({**g.inputs, "W": np.eye(8, dtype=np.float32)})


def test_reject_nonfinite_runner(bundle):
    g = bundle.golden[0]
    x = g.inputs["x"].copy()
    x[0, 0, 0] = np.nan
    with Runner(bundle, provider="cpu", reject_nonfinite=True) as r:
        with pytest.raises(InputError, match=r"Input 'x': expected finite values, got 1 NaN/Inf"):
            r.run({**g.inputs, "x": x})
    with Runner(bundle, provider="cpu") as r:
        y = r.run({**g.inputs, "x": x})["y"]
    # One NaN token poisons its whole row (softmax mixes the row), not the other batch item.
    assert np.isnan(y[0, 0]).all() and np.isfinite(y[1]).all()


def test_cuda_on_cpu_only_install_lists_available(bundle, kit):
    if kit.has_cuda():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(
        ProviderError,
        match=r"provider 'cuda' requested but onnxruntime offers "
        r"only .*CPUExecutionProvider",
    ):
        Runner(bundle, provider="cuda")


def test_cpu_and_auto(bundle, kit):
    assert resolve_provider("cpu") == CPU
    assert resolve_provider("auto") == (CUDA if kit.has_cuda() else CPU)
    with Runner(bundle, provider="cpu") as r:
        assert r.session.get_providers() == [CPU]


def test_cuda_sessions_keep_float32_out_of_tf32():
    # TF32 put fp32 variants 4e-4 off torch on an H100 (benchmarks/results/gpu/)
    assert execution_providers(CUDA) == [(CUDA, {"use_tf32": "0"}), CPU]
    assert execution_providers(CPU) == [CPU]


def test_unknown_provider(bundle):
    with pytest.raises(
        ProviderError,
        match=r"unknown provider 'tpu'; choose one of auto, cpu, "
        r"cuda",
    ):
        Runner(bundle, provider="tpu")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_silent_fallback_is_caught(bundle, kit):
    if kit.has_cuda():
        pytest.skip("this onnxruntime has CUDA")
    # onnxruntime alone would quietly build a CPU session here.
    with pytest.raises(
        ProviderError,
        match=r"asked for CUDAExecutionProvider but onnxruntime "
        r"created the session with CPUExecutionProvider",
    ):
        create_session(
            bundle.model_bytes("base"),
            bundle_dir=bundle.dir,
            data_files={},
            provider=CUDA,
            label="model.onnx",
        )


def _with_parity(manifest: Manifest, **passed) -> Manifest:
    parity = tuple(
        dataclasses.replace(r, passed=passed.get(r.variant, r.passed)) for r in manifest.parity
    )
    return dataclasses.replace(manifest, parity=parity)


def test_choose_variant_prefers_fastest_that_passed(bundle):
    m = bundle.manifest
    assert choose_variant(m, CPU).name == "base"
    assert choose_variant(_with_parity(m, base=False), CPU).name == "alt"
    # Never measured on CUDA: allowed (verify checks it there); alt is not meant for CUDA.
    assert choose_variant(m, CUDA).name == "base"


def test_unmeasured_variants_rank_most_rewritten_first(bundle):
    m = bundle.manifest
    both = (CPU, CUDA)
    m = dataclasses.replace(
        m, variants=tuple(dataclasses.replace(v, providers=both) for v in m.variants)
    )
    # No CUDA medians in a bundle exported on a CPU machine: the later-listed variant wins.
    assert [v.name for v in m.variants] == ["base", "alt"]
    assert choose_variant(m, CUDA).name == "alt"


def test_no_variant_passed(bundle):
    m = _with_parity(bundle.manifest, base=False, alt=False)
    with pytest.raises(
        ProviderError,
        match=r"bundle 'tiny' has no variant for "
        r"CPUExecutionProvider that passed parity \(variants: "
        r"base on CPUExecutionProvider/CUDAExecutionProvider",
    ):
        choose_variant(m, CPU)


def test_unknown_variant_lists_known(bundle):
    with pytest.raises(InputError, match=r"unknown variant 'fast'; known variants: base, alt"):
        Runner(bundle, provider="cpu", variant="fast")


def test_variant_for_another_provider(bundle):
    with pytest.raises(
        ProviderError,
        match=r"variant 'alt' is meant for CPUExecutionProvider, "
        r"not CUDAExecutionProvider",
    ):
        choose_variant(bundle.manifest, CUDA, "alt")


def test_closed_runner(bundle):
    r = Runner(bundle, provider="cpu")
    with r:
        pass
    with pytest.raises(AttnxError, match=r"the runner is closed"):
        r.run(dict(bundle.golden[0].inputs))


class _FakeSession:
    def __init__(self, result=None, error=None):
        self.result, self.error = result, error

    def run(self, names, feed):
        if self.error:
            raise self.error
        return self.result


def test_onnxruntime_failure_on_valid_input_names_the_model(bundle):
    r = Runner(bundle, provider="cpu")
    r._session = _FakeSession(error=Fail("boom"))
    with pytest.raises(
        ArtifactError,
        match=r"model.onnx: onnxruntime failed on a valid input: "
        r"boom",
    ):
        r.run(dict(bundle.golden[0].inputs))


@pytest.mark.parametrize(
    "bad,match",
    [
        (
            np.zeros((2, 4, 8), np.float32),
            r"model.onnx: output 'y': axis 1 \('seq'\) expected 5 \(as in Input 'x'\), got 4",
        ),
        (
            np.zeros((2, 5, 8), np.float64),
            r"model.onnx: output 'y': expected dtype float32, got "
            r"float64",
        ),
        (np.zeros((2, 5), np.float32), r"output 'y': expected rank 3"),
    ],
    ids=["shape", "dtype", "rank"],
)
def test_outputs_are_checked_against_the_manifest(bundle, bad, match):
    r = Runner(bundle, provider="cpu")
    r._session = _FakeSession(result=[bad])
    with pytest.raises(ArtifactError, match=match):
        r.run(dict(bundle.golden[0].inputs))


def test_placement_report(runner, bundle):
    placement = runner.placement(dict(bundle.golden[0].inputs))
    assert placement == {n: CPU for n in ("matmul", "unsqueeze", "add", "softmax")}


def test_eight_threads_match_serial(runner, kit):
    feeds = [
        kit.make_inputs({"batch": 1 + i % 4, "seq": 1 + (7 * i) % 16}, seed=i) for i in range(48)
    ]
    serial = [runner.run(f)["y"] for f in feeds]
    results: list = [None] * len(feeds)
    errors = []
    barrier = threading.Barrier(8)

    def work(worker):
        barrier.wait()
        try:
            for i in range(worker, len(feeds), 8):
                results[i] = runner.run(feeds[i])["y"]
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(np.array_equal(a, b) for a, b in zip(results, serial, strict=True))


@pytest.mark.cuda
def test_cuda_io_binding_matches_golden(bundle):
    with Runner(bundle, provider="cuda") as r:
        assert r.session.get_providers()[0] == CUDA
        for g in bundle.golden:
            np.testing.assert_allclose(
                r.run(dict(g.inputs))["y"], g.outputs["y"], atol=ATOL, rtol=RTOL
            )


def _unloadable_fast_alt(folder, producer_ort=None):
    """alt: measured fastest, but with an attribute this onnxruntime does not know (as an
    opset-25 Attention is for onnxruntime 1.31)."""
    import onnx

    from .conftest import read_manifest, resign, write_manifest

    model = onnx.load(folder / "model.alt.onnx")
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("left_window_size", 3))
    onnx.save(model, folder / "model.alt.onnx")
    d = read_manifest(folder)
    d["extra"]["variants"]["alt"]["median_ms"]["CPUExecutionProvider"] = 0.5
    if producer_ort:
        d["producer"]["onnxruntime"] = producer_ort
    write_manifest(folder, d)
    resign(folder)


def test_auto_choice_skips_a_variant_this_onnxruntime_cannot_load(tiny_bundle, caplog):
    _unloadable_fast_alt(tiny_bundle)
    with (
        caplog.at_level("WARNING", logger="attnx.runtime"),
        Runner(tiny_bundle, provider="cpu") as r,
    ):
        assert r.variant.name == "base"
        assert "cannot load it" in r.skipped["alt"]
        np.testing.assert_allclose(
            r.run(dict(r.bundle.golden[0].inputs))["y"],
            r.bundle.golden[0].outputs["y"],
            atol=ATOL,
            rtol=RTOL,
        )
    assert "variant alt skipped" in caplog.text


def test_a_named_variant_that_cannot_load_names_both_onnxruntime_versions(tiny_bundle):
    _unloadable_fast_alt(tiny_bundle, producer_ort="99.0.0")
    with pytest.raises(
        ArtifactError,
        match=r"model.alt.onnx: onnxruntime cannot load it: .*left_window_size.* \(checked with "
        r"onnxruntime 99.0.0 at export; this is onnxruntime \S+: a newer opset may need a "
        r"newer onnxruntime\)",
    ):
        Runner(tiny_bundle, provider="cpu", variant="alt")
