"""Optimized variants: each has its own parity records and tolerance, the op census proves the
fusion, a variant that misses is dropped with its reason, and the runner picks the fastest."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export import ExportError, run_pipeline, spec_from_zoo
from export._variants import INT8_TOLERANCE, build_variants, op_census
from models import zoo
from runtime import Runner, load_bundle
from runtime._runner import choose_variant
from tests.export.conftest import assert_gqa_keeps_present


def _manifest(bundles, name):
    return json.loads((bundles[name] / "manifest.json").read_text())


def test_causal_self_attention_runs_on_a_kernel_that_never_builds_the_mask(zoo_bundles):
    notes = _manifest(zoo_bundles, "causal_self")["extra"]["variants"]
    fused = notes["fused"]["census"]
    assert fused.get("com.microsoft.GroupQueryAttention") == 1
    # No score matrix, no softmax and no s x s mask left in the graph.
    for op in ("Softmax", "Trilu", "Where", "MatMul"):
        assert op not in fused or op == "MatMul" and fused[op] <= 4  # projections only
    assert "Softmax" in notes["base"]["census"]


@pytest.mark.parametrize("name", ["causal_self", "sliding_window", "gqa_rope", "decoder_lm"])
def test_every_group_query_attention_keeps_its_present_outputs(zoo_bundles, name):
    assert assert_gqa_keeps_present(zoo_bundles[name]) > 0


@pytest.mark.parametrize("name", zoo.names())
def test_every_variant_has_its_own_passing_parity_records(zoo_bundles, name):
    manifest = _manifest(zoo_bundles, name)
    variants = {v["name"]: v for v in manifest["variants"]}
    assert "base" in variants
    for variant in variants.values():
        records = [r for r in manifest["parity"] if r["variant"] == variant["name"]]
        if "CPUExecutionProvider" in variant["providers"]:
            assert records and all(r["passed"] for r in records), variant["name"]
        else:
            assert records == []  # fp16 is for CUDA; verified there
    notes = manifest["extra"]["variants"]
    for name_, note in notes.items():
        assert note["census"] != notes["base"]["census"] or name_ == "base"


def test_int8_uses_its_documented_tolerance_and_is_never_picked_automatically(zoo_bundles):
    manifest = _manifest(zoo_bundles, "mha_self")
    int8 = next(v for v in manifest["variants"] if v["name"] == "int8")
    assert int8["tolerance"]["float32"] == {
        "atol": INT8_TOLERANCE.atol,
        "rtol": INT8_TOLERANCE.rtol,
    }
    assert manifest["extra"]["variants"]["int8"]["lossy"] is True
    bundle = load_bundle(zoo_bundles["mha_self"])
    assert choose_variant(bundle.manifest, "CPUExecutionProvider").name != "int8"
    assert choose_variant(bundle.manifest, "CPUExecutionProvider", "int8").name == "int8"


def test_fp16_is_for_cuda_only(zoo_bundles):
    manifest = _manifest(zoo_bundles, "gqa_rope")
    fp16 = next(v for v in manifest["variants"] if v["name"] == "fp16")
    assert fp16["providers"] == ["CUDAExecutionProvider"]
    assert fp16["tolerance"]["float32"]["atol"] == 2e-2


def test_fused_is_for_cpu_and_cuda_gets_base_attention23_fp16(zoo_bundles):
    # onnxruntime's CUDA GroupQueryAttention takes no float32: fused would fall back to the CPU
    manifest = _manifest(zoo_bundles, "gqa_rope")
    providers = {v["name"]: v["providers"] for v in manifest["variants"]}
    assert providers["fused"] == ["CPUExecutionProvider"]
    cuda = [name for name, p in providers.items() if "CUDAExecutionProvider" in p]
    assert cuda == ["base", "attention23", "fp16"]
    bundle = load_bundle(zoo_bundles["gqa_rope"])
    # no CUDA medians from a CPU export: the most rewritten exact variant, attention23
    assert choose_variant(bundle.manifest, "CUDAExecutionProvider").name == "attention23"


def test_runner_picks_the_fastest_variant_that_passed(zoo_bundles):
    bundle = load_bundle(zoo_bundles["gqa_rope"])
    manifest = bundle.manifest
    notes = json.loads(json.dumps(manifest.extra["variants"]))
    names = [
        v.name
        for v in manifest.variants
        if not notes[v.name]["lossy"] and "CPUExecutionProvider" in v.providers
    ]
    assert len(names) >= 2
    points = [t["point"] for t in notes[names[0]]["timings"]]
    assert len(points) == 2 and points[0]["seq"] < points[1]["seq"]  # a short and a long point
    for fastest in names:
        for name in names:
            ms = {"CPUExecutionProvider": 1.0 if name == fastest else 9.0}
            notes[name]["timings"] = [{"point": p, "median_ms": ms} for p in points]
        changed = dataclasses.replace(manifest, extra={**manifest.extra, "variants": notes})
        with Runner(dataclasses.replace(bundle, manifest=changed), provider="cpu") as runner:
            assert runner.variant.name == fastest
    for name in names:  # a bundle without timings at several points: median_ms ranks
        notes[name].pop("timings")
        notes[name]["median_ms"] = {"CPUExecutionProvider": 1.0 if name == names[0] else 9.0}
    changed = dataclasses.replace(manifest, extra={**manifest.extra, "variants": notes})
    with Runner(dataclasses.replace(bundle, manifest=changed), provider="cpu") as runner:
        assert runner.variant.name == names[0]


def test_a_variant_that_misses_is_dropped_with_its_reason(zoo_bundles):
    for name, folder in zoo_bundles.items():
        manifest = _manifest(zoo_bundles, name)
        for variant, reason in manifest["extra"]["dropped_variants"].items():
            assert reason
            assert variant not in {v["name"] for v in manifest["variants"]}
            assert not (folder / f"model.{variant}.onnx").exists()


def test_variants_without_a_fusion_are_not_written(zoo_bundles):
    # No attention and no MatMul: nothing to fuse or quantize; only the fp16 cast remains.
    manifest = _manifest(zoo_bundles, "sinusoidal_pe")
    assert [v["name"] for v in manifest["variants"]] == ["base", "fp16"]


def test_unknown_variant_name_is_refused():
    spec = spec_from_zoo(zoo.get("learned_pe"))
    with pytest.raises(ExportError, match=r"stage 3/5 \(variants\): unknown variants \['int4'\]"):
        build_variants(spec, None, 18, ("int4",))


def test_base_only_export(tmp_path):
    result = run_pipeline(spec_from_zoo(zoo.get("gqa_rope")), out=tmp_path, variants=())
    assert {r.variant for r in result.records} == {"base"}
    assert op_census(result.model)["Softmax"] == 1


def test_scaled_zoo_builds_the_same_entries_bigger():
    big = zoo.scaled(zoo.Size(d=64, heads=8, max_seq=512, vocab=50, window=16))
    assert list(big) == zoo.names()
    entry = big["mqa_alibi"]
    assert entry.config["num_heads"] == 12 and entry.config["embed_dim"] == 96
    x = entry.make_inputs({"batch": 1, "seq": 3})["x"]
    assert tuple(x.shape) == (1, 3, 96)
    assert entry.build()(x).shape == (1, 3, 96)


# --- an optional variant never breaks an export --------------------------------------------


def _refused_by_onnxruntime(spec, base, opset, native=None):
    """A graph onnx accepts and onnxruntime refuses to load: an op it has no kernel for."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    out = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("NoSuchKernel", [out], ["unused"],
                                                  domain="com.microsoft"))
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


def test_a_variant_onnxruntime_refuses_to_load_is_dropped_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setattr("export._variants._fused", _refused_by_onnxruntime)
    spec = spec_from_zoo(zoo.get("learned_pe"))
    result = run_pipeline(spec, out=tmp_path, variants=("fused",))
    assert set(result.variants) == {"base"} and result.passed
    manifest = json.loads((tmp_path / "learned_pe" / "manifest.json").read_text())
    reason = manifest["extra"]["dropped_variants"]["fused"]
    assert "onnxruntime refused to load the graph" in reason and "NoSuchKernel" in reason
    assert [v["name"] for v in manifest["variants"]] == ["base"]
    assert "dropped fused" in result.status.stage(4).detail


def test_a_variant_that_fails_to_build_is_dropped_with_its_reason(tmp_path, monkeypatch):
    def broken(model):
        raise RuntimeError("quantizer exploded\nsecond line")

    monkeypatch.setattr("export._variants._int8", broken)
    spec = spec_from_zoo(zoo.get("mha_self"))
    result = run_pipeline(spec, out=tmp_path, grid=[dict(spec.example)], variants=("int8",))
    assert "int8" not in result.variants and "base" in result.variants
    manifest = json.loads((tmp_path / "mha_self" / "manifest.json").read_text())
    assert manifest["extra"]["dropped_variants"] == {
        "int8": "failed to build: RuntimeError: quantizer exploded"
    }


def test_the_base_graph_refused_by_onnxruntime_is_an_export_error(monkeypatch):
    import export._pipeline as pipeline

    capture = pipeline.capture
    monkeypatch.setattr(
        pipeline, "capture", lambda spec, opset, **kw: _refused_by_onnxruntime(
            spec, capture(spec, opset, **kw), opset)
    )
    spec = spec_from_zoo(zoo.get("learned_pe"))
    with pytest.raises(
        ExportError,
        match=r"stage 4/5 \(parity\): the base graph: onnxruntime refused to load the graph: "
        r".*NoSuchKernel.*; next: try another --opset",
    ):
        run_pipeline(spec, out=None, variants=())


@pytest.mark.parametrize("stage, target", [(2, "check_graph"), (4, "measure_grid")])
def test_an_untyped_failure_inside_a_stage_is_an_export_error_naming_it(monkeypatch, stage,
                                                                         target):
    from export._pipeline import STAGE_FAILURES

    def fail(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(f"export._pipeline.{target}", fail)
    spec = spec_from_zoo(zoo.get("learned_pe"))
    what, hint = STAGE_FAILURES[stage]
    with pytest.raises(ExportError, match=rf"stage {stage}/5 .*: {what}: KeyError: 'boom'; "
                       rf"next: {hint}") as caught:
        run_pipeline(spec, out=None, variants=())
    assert isinstance(caught.value.__cause__, KeyError)  # the trace stays for the API user


# --- int8 on every x86-64 CPU --------------------------------------------------------------


def _int8_weights(model):
    """Every int8 weight a quantized MatMul multiplies by, Loop bodies included."""
    found = []

    def visit(graph, inits):
        inits = {**inits, **{t.name: t for t in graph.initializer}}
        for node in graph.node:
            if node.op_type in ("DynamicQuantizeMatMul", "MatMulInteger"):
                tensor = inits.get(node.input[1])
                if tensor is not None and tensor.data_type == onnx.TensorProto.INT8:
                    found.append(numpy_helper.to_array(tensor))
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    visit(sub, inits)

    visit(model.graph, {})
    return found


def vpmaddubsw_dot(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """uint8 a [m, k] @ int8 w [k, n] as MLAS computes it on AVX2 and on AVX-512 without VNNI:
    products summed in adjacent pairs with int16 saturation (VPMADDUBSW), then in int32."""
    products = a.astype(np.int64)[:, :, None] * w.astype(np.int64)[None, :, :]  # [m, k, n]
    pairs = products.reshape(a.shape[0], -1, 2, w.shape[1]).sum(axis=2)
    return np.clip(pairs, -32768, 32767).sum(axis=1)


def test_full_range_int8_weights_saturate_without_vnni_and_7_bit_weights_do_not():
    a = np.full((1, 64), 255, np.uint8)  # the largest activation DynamicQuantizeLinear writes
    for bound, exact in ((127, False), (64, True)):
        w = np.full((64, 3), bound, np.int8)
        reference = a.astype(np.int64) @ w.astype(np.int64)
        assert np.array_equal(vpmaddubsw_dot(a, w), reference) == exact
        assert np.array_equal(vpmaddubsw_dot(a, -w), -reference) == exact


@pytest.mark.parametrize("name", ["mha_self", "causal_self", "decoder_lm", "gqa_rope"])
def test_int8_weights_are_exact_on_cpus_without_vnni(zoo_bundles, name):
    """The one int8 scheme holds on every x86-64 CPU: weights within 7 bits, so no pair of
    uint8 x int8 products reaches VPMADDUBSW's int16 limit."""
    weights = _int8_weights(onnx.load(zoo_bundles[name] / "model.int8.onnx"))
    assert weights, "no quantized MatMul in the int8 graph"
    for w in weights:
        assert np.abs(w.astype(np.int64)).max() <= 64
        a = np.full((1, w.shape[-2] - w.shape[-2] % 2), 255, np.uint8)
        w2 = w.reshape(-1, *w.shape[-2:])[0][: a.shape[1]]
        assert np.array_equal(vpmaddubsw_dot(a, w2), a.astype(np.int64) @ w2.astype(np.int64))


# Every entry with a MatMul on weights: int8 is kept for all of them, on any x86-64 CPU.
INT8_ENTRIES = sorted(set(zoo.names()) - {"sinusoidal_pe", "learned_pe", "sdpa"})


@pytest.mark.parametrize("name", INT8_ENTRIES)
def test_int8_is_kept_and_passes_its_tolerance_over_the_grid(zoo_bundles, name):
    manifest = _manifest(zoo_bundles, name)
    assert "int8" in {v["name"] for v in manifest["variants"]}, manifest["extra"][
        "dropped_variants"
    ]
    records = [r for r in manifest["parity"] if r["variant"] == "int8"]
    assert len(records) >= 8 and all(r["passed"] for r in records)
    assert all(o["atol"] == INT8_TOLERANCE.atol for r in records for o in r["outputs"])
