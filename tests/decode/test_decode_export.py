"""Export side of cached decoding: the cache description in the manifest and the decode-loop
parity (prefill, then decode steps feeding each present back as the next past)."""

from __future__ import annotations

import json
import re

import onnx
import pytest

from export import ExportError
from export._check import check_bundle
from export._decode import DEFAULT_STEPS, decode_runs, decode_stage, measure_decode
from export._pipeline import ExportStatus
from export._spec import spec_from_zoo
from models import zoo
from runtime import Manifest, ParityError

CACHED = ("kv_cache", "decoder_layer_cached", "decoder_lm")


def _manifest(bundle) -> Manifest:
    return Manifest.loads((bundle / "manifest.json").read_text())


@pytest.mark.parametrize("name", [e.name for e in zoo.entries()])
def test_cached_entries_and_only_they_describe_their_cache(name):
    entry = zoo.get(name)
    has_past = any(s.name.startswith("past") for s in entry.inputs)
    assert (entry.cache is not None) == has_past == (name in CACHED)
    if entry.cache is None:
        assert "cache" not in spec_from_zoo(entry).extra
        return
    cache = spec_from_zoo(entry).extra["cache"]
    inputs = {s.name: s for s in entry.inputs}
    for t in cache["tensors"]:
        shape = inputs[t["past"]].shape
        assert shape[cache["past_axis"]] == "past" and shape[cache["batch_axis"]] == "batch"
        assert t["present"] in entry.outputs
        # The layout string names the same axes as the input's shape.
        words = cache["layout"].strip("[]").split(", ")
        assert len(words) == len(shape) and words[cache["past_axis"]] == "past"
    assert cache["max_length"] == entry.dims["past"][1]
    assert (cache["token_input"], cache["logits_output"]) == (
        ("input_ids", "logits") if name == "decoder_lm" else (None, None)
    )


def test_manifest_documents_the_cache(lm_bundle):
    cache = _manifest(lm_bundle).extra["cache"]
    assert cache == {
        "version": 1,
        "graphs": "single",
        "layout": "[L, batch, kv_heads, past, head_dim]",
        "tensors": [
            {"past": "past_keys", "present": "present_keys", "holds": "keys"},
            {"past": "past_values", "present": "present_values", "holds": "values"},
        ],
        "past_dim": "past",
        "seq_dim": "seq",
        "batch_dim": "batch",
        "past_axis": 3,
        "batch_axis": 1,
        "keys": "post-rope",
        "position_offset": "past",
        "max_length": 256,
        "token_input": "input_ids",
        "logits_output": "logits",
    }


def test_manifest_holds_every_decode_step(lm_bundle):
    decode = _manifest(lm_bundle).extra["decode_parity"]
    assert decode["passed"] and decode["steps"] == DEFAULT_STEPS
    assert all(r["passed"] for r in decode["records"])
    records = [r for r in decode["records"] if r["variant"] == "base"]
    assert len(records) == 3 * (DEFAULT_STEPS + 1)
    by_point = {(r["point"]["run"], r["point"]["step"]): r["point"] for r in records}
    # Prefill at past 0 with one token, then the first decode step at past 1.
    assert by_point[0, 0] == {"run": 0, "step": 0, "batch": 2, "seq": 1, "past": 0}
    assert by_point[0, 1]["past"] == 1 and by_point[0, 1]["seq"] == 1
    assert by_point[1, 0]["seq"] == 7 and by_point[1, 1]["past"] == 7  # multi-token prefill
    # The last run ends with a present of exactly the declared maximum (256 positions).
    last = by_point[2, DEFAULT_STEPS]
    assert last["past"] + last["seq"] == 256
    names = {o["name"] for r in records for o in r["outputs"]}
    assert names == {"logits", "present_keys", "present_values"}


def test_report_line_counts_the_decode_loop(kv_export):
    detail = kv_export.status.stage(4).detail
    steps = re.search(r"decode loop base (\d+)/(\d+) steps passed", detail)
    assert steps and steps[1] == steps[2] == str(3 * (DEFAULT_STEPS + 1)), detail


def test_check_reruns_the_decode_loop(kv_export):
    records = check_bundle(kv_export.bundle)
    steps = [r for r in records if "step" in r.point]
    assert len(steps) == 3 * (DEFAULT_STEPS + 1) and all(r.passed for r in records)
    assert len(records) > len(steps)  # the grid too


def test_decode_parity_of_a_cached_block_uses_fresh_inputs(kv_export):
    spec = spec_from_zoo(zoo.get("kv_cache"))
    records = measure_decode(spec, {"base": kv_export.model}, steps=2)
    assert [r.point["past"] for r in records if r.point["run"] == 0] == [0, 1, 2]
    assert all(r.passed for r in records)
    assert {o.name for r in records for o in r.outputs} == {"y", "present_key", "present_value"}


def test_decode_parity_fails_when_torch_and_the_graph_differ(lm_bundle):
    spec = spec_from_zoo(zoo.get("decoder_lm"))
    model = onnx.load(str(lm_bundle / "model.onnx"))
    spec.module.layers[1].attn.v_proj.weight.data.mul_(1.01)  # torch side only
    status = ExportStatus("decoder_lm")
    with pytest.raises(ParityError, match=r"at run=0, step=0, .*present_values: max_abs") as err:
        decode_stage(spec, {"base": model}, status)
    assert len(err.value.records) > 1  # every failing step, not only the first
    assert "decode_parity" not in spec.extra  # a failing variant leaves no records behind
    assert re.search(r"decode loop base \d+/27 steps passed", status.stage(4).detail)


def test_decode_stage_keeps_the_records_of_each_variant(kv_export):
    spec = spec_from_zoo(zoo.get("kv_cache"))
    status = ExportStatus("kv_cache")
    decode_stage(spec, {"base": kv_export.model}, status)
    decode_stage(spec, {"other": kv_export.model}, status)
    decode_stage(spec, {"base": kv_export.model}, status)  # replaces, never duplicates
    records = spec.extra["decode_parity"]["records"]
    assert [r["variant"] for r in records].count("base") == 27 and len(records) == 54
    json.dumps(spec.extra["decode_parity"], allow_nan=False)  # manifest-ready JSON
    assert decode_stage(spec_from_zoo(zoo.get("mha_self")), {}, status) == []  # no cache


def test_decode_parity_refuses_a_cache_naming_unknown_tensors(lm_bundle):
    spec = spec_from_zoo(zoo.get("decoder_lm"))
    cache = {**spec.extra["cache"], "tensors": [{"past": "past_k", "present": "present_keys"}]}
    with pytest.raises(
        ExportError,
        match=r"stage 4/5 .*the cache description names "
        r"\['past_k'\]",
    ):
        measure_decode(spec, {}, cache=cache)


def test_decode_runs_stay_inside_the_dims():
    spec = spec_from_zoo(zoo.get("decoder_lm"))
    spec.dims = {"batch": (1, 1), "seq": (1, 4), "past": (0, 6)}
    cache = {**spec.extra["cache"], "max_length": 6}
    assert decode_runs(spec, cache, 8) == [
        {"batch": 1, "seq": 1, "past": 0},
        {"batch": 1, "seq": 4, "past": 0},
    ]
