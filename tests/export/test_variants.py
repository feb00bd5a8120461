"""Optimized variants: each has its own parity records and tolerance, the op census proves the
fusion, a variant that misses is dropped with its reason, and the runner picks the fastest."""

import dataclasses
import json

import pytest

from export import ExportError, run_pipeline, spec_from_zoo
from export._variants import INT8_TOLERANCE, build_variants, op_census
from models import zoo
from runtime import Runner, load_bundle
from runtime._runner import choose_variant


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
    for fastest in names:
        for name in names:
            notes[name]["median_ms"] = {"CPUExecutionProvider": 1.0 if name == fastest else 9.0}
        changed = dataclasses.replace(manifest, extra={**manifest.extra, "variants": notes})
        with Runner(dataclasses.replace(bundle, manifest=changed), provider="cpu") as runner:
            assert runner.variant.name == fastest


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
