"""Export side of cached decoding: the cache description in the manifest and the decode-loop
parity (prefill, then decode steps feeding each present back as the next past)."""

from __future__ import annotations

import dataclasses
import json
import re

import onnx
import pytest
import torch

from export import ExportError
from export._check import check_bundle
from export._decode import (
    DEFAULT_STEPS,
    decode_parity,
    decode_runs,
    decode_stage,
    measure_decode,
)
from export._pipeline import ExportStatus
from export._spec import spec_from_zoo
from models import zoo
from models.zoo import LM_CACHE
from runtime import Cache, CacheTensor, Manifest, ParityError

CACHED = ("kv_cache", "decoder_layer_cached", "decoder_lm")


def _manifest(bundle) -> Manifest:
    return Manifest.loads((bundle / "manifest.json").read_text())


@pytest.mark.parametrize("name", [e.name for e in zoo.entries()])
def test_cached_entries_and_only_they_describe_their_cache(name):
    entry = zoo.get(name)
    has_past = any(s.name.startswith("past") for s in entry.inputs)
    assert (entry.cache is not None) == has_past == (name in CACHED)
    cache = spec_from_zoo(entry).cache
    if entry.cache is None:
        assert cache is None
        return
    inputs = {s.name: s for s in entry.inputs}
    for t in cache.tensors:
        shape = inputs[t.past].shape
        assert shape[cache.past_axis] == "past" and shape[cache.batch_axis] == "batch"
        assert t.present in entry.outputs
        # The layout string names the same axes as the input's shape.
        words = cache.layout.strip("[]").split(", ")
        assert len(words) == len(shape) and words[cache.past_axis] == "past"
    assert [t.holds for t in cache.tensors] == ["keys", "values"]
    assert cache.max_length == entry.dims["past"][1]
    assert (cache.token_input, cache.logits_output) == (
        ("input_ids", "logits") if name == "decoder_lm" else (None, None)
    )


def test_manifest_documents_the_cache(lm_bundle):
    manifest = _manifest(lm_bundle)
    assert manifest.cache == Cache(
        tensors=(
            CacheTensor("past_keys", "present_keys", "keys"),
            CacheTensor("past_values", "present_values", "values"),
        ),
        layout="[L, batch, kv_heads, past, head_dim]",
        past_axis=3,
        batch_axis=1,
        max_length=256,
        token_input="input_ids",
        logits_output="logits",
    )
    raw = json.loads((lm_bundle / "manifest.json").read_text())
    assert raw["format_version"] == 3 and "cache" not in raw["extra"]
    # What every cache of this format is, written out for a reader of the JSON.
    assert {k: raw["cache"][k] for k in ("graphs", "keys", "position_offset")} == {
        "graphs": "single",
        "keys": "post-rope",
        "position_offset": "past",
    }


def test_manifest_holds_every_decode_step(lm_bundle):
    decode = _manifest(lm_bundle).decode_parity
    assert decode.passed and decode.steps == DEFAULT_STEPS
    assert len(decode.runs) == 3
    records = [r for r in decode.records if r.variant == "base"]
    assert len(records) == 3 * (DEFAULT_STEPS + 1)
    by_point = {(r.point["run"], r.point["step"]): r.point for r in records}
    # Prefill at past 0 with one token, then the first decode step at past 1.
    assert by_point[0, 0] == {"run": 0, "step": 0, "batch": 2, "seq": 1, "past": 0}
    assert by_point[0, 1]["past"] == 1 and by_point[0, 1]["seq"] == 1
    assert by_point[1, 0]["seq"] == 7 and by_point[1, 1]["past"] == 7  # multi-token prefill
    # The last run ends with a present of exactly the declared maximum (256 positions).
    last = by_point[2, DEFAULT_STEPS]
    assert last["past"] + last["seq"] == 256
    names = {o.name for r in records for o in r.outputs}
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
    assert len(err.value.checked) == 27  # passing steps too, for the summary
    assert re.search(r"decode loop base \d+/27 steps passed", status.stage(4).detail)


def test_decode_stage_returns_the_records_of_each_call(kv_export):
    spec = spec_from_zoo(zoo.get("kv_cache"))
    status = ExportStatus("kv_cache")
    base = decode_stage(spec, {"base": kv_export.model}, status)
    other = decode_stage(spec, {"other": kv_export.model}, status)
    assert {r.variant for r in base} == {"base"} and len(base) == len(other) == 27
    assert spec.extra == {}  # the spec carries nothing back
    assert decode_stage(spec_from_zoo(zoo.get("mha_self")), {}, status) == []  # no cache
    parity = decode_parity(spec, base + other)
    assert parity.runs == tuple(decode_runs(spec, spec.cache, DEFAULT_STEPS))
    assert len(parity.records) == 54 and parity.passed
    assert decode_parity(spec_from_zoo(zoo.get("mha_self")), []) is None


def test_decode_parity_refuses_a_cache_naming_unknown_tensors(lm_bundle):
    spec = spec_from_zoo(zoo.get("decoder_lm"))
    tensors = (CacheTensor("past_k", "present_keys", "keys"),)
    cache = dataclasses.replace(spec.cache, tensors=tensors)
    with pytest.raises(
        ExportError,
        match=r"stage 4/5 .*the cache description names "
        r"\['past_k'\]",
    ):
        measure_decode(spec, {}, cache=cache)


def test_decode_runs_stay_inside_the_dims():
    spec = spec_from_zoo(zoo.get("decoder_lm"))
    spec = dataclasses.replace(spec, dims={"batch": (1, 1), "seq": (1, 4), "past": (0, 6)})
    cache = dataclasses.replace(spec.cache, max_length=6)
    assert decode_runs(spec, cache, 8) == [
        {"batch": 1, "seq": 1, "past": 0},
        {"batch": 1, "seq": 4, "past": 0},
    ]


def test_a_module_cache_needs_a_past_dim():
    from export import spec_from_module

    past = torch.zeros(2, 1, 3, 4)
    with pytest.raises(ExportError, match=r"a cache needs a dynamic 'past' dim .*\['batch'\]"):
        spec_from_module(
            torch.nn.Identity(), {"input": past}, dynamic={"input": {0: "batch"}}, cache=LM_CACHE
        )
