"""Hugging Face causal LMs exported with their KV cache (text-generation-with-past) from a
save_pretrained folder, checked step by step at export, and generating torch-free token for
token with transformers' own generate(do_sample=False)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'attnx[hf]'")

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from export import ExportError, export_module
from export._cli import main
from export._hf_generation import (
    _rename,
    generation_positions,
    left_padding,
    spec_for_generation,
    undefined_with_cache,
)
from export._hf_tasks import spec_for_task
from runtime import Generator, InputError, load_bundle
from tests.hf.conftest import _gpt2_config, _llama_config, _transformers, build

REPO = Path(__file__).resolve().parents[2]
POSITIONS = 128  # room for a 17-token prompt and 64 new tokens
NEW = 64
PROMPTS = {"1": [5], "3": [5, 17, 2], "17": list(range(3, 20))}
BATCH = [PROMPTS["3"], PROMPTS["17"]]
PAD = 0


def _lm(family: str):
    transformers = _transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        if family == "gpt2":
            config = _gpt2_config()
            config.n_positions = POSITIONS
            return transformers.GPT2LMHeadModel(config).eval()
        config = _llama_config()
        config.max_position_embeddings = POSITIONS
        return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def lms():
    return {family: _lm(family) for family in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def cached_bundles(lms, tmp_path_factory):
    """family -> bundle folder, exported from a save_pretrained folder by the CLI."""
    root = tmp_path_factory.mktemp("hf_generate")
    bundles = {}
    for family, model in lms.items():
        model.save_pretrained(root / family)
        args = ["export", str(root / family), "--task", "text-generation-with-past"]
        assert main([*args, "--out", str(root / "artifacts"), "--variants", "fused"]) == 0
        bundles[family] = root / "artifacts" / family
    return bundles


def _hf_generate(model, prompt, eos=None):
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                         do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


def _hf_generate_batch(model, prompts, eos=None):
    longest = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         eos_token_id=eos, pad_token_id=PAD)
    rows = [r[longest:].tolist() for r in out]
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def _torch_free(code: str, tmp_path) -> object:
    """Run ``code`` (which prints JSON) where torch, onnxscript and transformers cannot be
    imported; returns what it printed."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    for name in ("torch", "onnxscript", "transformers"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is blocked here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_equals_transformers_token_for_token(lms, cached_bundles, family,
                                                               tmp_path):
    model = lms[family]
    eos = _hf_generate(model, PROMPTS["17"])[10]  # a token the batch meets: rows stop early
    code = f"""
import json
from runtime import Generator
with Generator({str(cached_bundles[family])!r}, provider="cpu") as gen:
    singles = {{k: gen.generate(p, {NEW}) for k, p in {PROMPTS!r}.items()}}
    batch = gen.generate_batch({BATCH!r}, {NEW}, pad_token_id={PAD})
    stopped = gen.generate_batch({BATCH!r}, {NEW}, eos_token_id={eos}, pad_token_id={PAD})
print(json.dumps({{"singles": singles, "batch": batch, "stopped": stopped}}))
"""
    got = _torch_free(code, tmp_path)
    for length, prompt in PROMPTS.items():
        assert got["singles"][length] == _hf_generate(model, prompt), f"prompt of {length}"
    assert got["batch"] == _hf_generate_batch(model, BATCH)
    assert got["stopped"] == _hf_generate_batch(model, BATCH, eos)
    assert any(len(row) < NEW for row in got["stopped"])  # the end-of-sequence id was met


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_manifest_describes_the_cache(lms, cached_bundles, family):
    manifest = load_bundle(cached_bundles[family]).manifest
    cache = manifest.cache
    layers = lms[family].config.num_hidden_layers
    assert cache.mask_input == "attention_mask" and cache.position_input == "position_ids"
    assert cache.pasts[:2] == ("past_key_values.0.key", "past_key_values.0.value")
    assert cache.presents[-1] == f"present.{layers - 1}.value" and len(cache.tensors) == 2 * layers
    assert (cache.past_axis, cache.batch_axis, cache.max_length) == (2, 0, POSITIONS)
    assert manifest.source["task"] == "text-generation-with-past"
    spec = {t.name: t.shape for t in manifest.inputs}
    assert spec["attention_mask"] == ("batch", "total")
    kv_heads = 2 if family == "llama" else 4
    assert spec["past_key_values.0.key"] == ("batch", kv_heads, "past", 16)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_decode_loop_was_checked_at_every_past(cached_bundles, family):
    manifest = load_bundle(cached_bundles[family]).manifest
    decode = manifest.decode_parity
    assert decode.passed and {v.name for v in manifest.variants} <= {
        r.variant for r in decode.records
    }
    pasts = {r.point["past"] for r in decode.records}
    assert {0, 1}.issubset(pasts) and any(p % 2 for p in pasts if p > 1)
    assert max(r.point["past"] + r.point["seq"] for r in decode.records) == POSITIONS
    # the left-padded prefill's query rows without a key are left out and counted
    assert any(o.excluded for r in decode.records for o in r.outputs)
    grid_points = {(r.point["past"], r.point["seq"]) for r in manifest.parity}
    assert all(p + s <= POSITIONS for p, s in grid_points) and (0, 1) in grid_points


def test_check_rebuilds_the_cached_model_from_its_folder(cached_bundles, capsys):
    assert main(["check", str(cached_bundles["llama"])]) == 0
    assert capsys.readouterr().out.strip().endswith("PASSED")


def test_a_request_beyond_the_cache_is_refused_before_running(cached_bundles, capsys):
    bundle = str(cached_bundles["gpt2"])
    with Generator(bundle, provider="cpu") as gen:
        with pytest.raises(InputError, match=r"need a KV cache of 129 positions, above the "
                           r"bundle's maximum length 128 .* at most 112 new tokens fit"):
            gen.generate_batch([PROMPTS["3"], PROMPTS["17"]], 113)
        assert gen.length == 0
    args = ["generate", bundle, "--prompt-ids", "1,2", "--max-new-tokens", "200"]
    assert main([*args, "--provider", "cpu"]) == 2
    assert "maximum length 128" in capsys.readouterr().err


def test_generate_cli_takes_a_batch(lms, cached_bundles, capsys):
    args = ["generate", str(cached_bundles["llama"]), "--max-new-tokens", "8", "--pad-id", "0"]
    args += ["--prompt-ids", "5,17,2", "--prompt-ids", ",".join(map(str, PROMPTS["17"]))]
    assert main([*args, "--provider", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "2 prompts of 3, 17 tokens" in lines[0]
    expected = _hf_generate_batch(lms["llama"], BATCH)
    assert lines[1:] == [",".join(map(str, row[:8])) for row in expected]


def test_step_by_step_with_a_mask_equals_the_cached_forward(lms, cached_bundles):
    model = lms["gpt2"]
    ids = torch.tensor([[0, 0, 7, 8], [3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, position_ids=generation_positions(mask),
                      use_cache=True)
        mask2 = torch.cat((mask, torch.ones(2, 1, dtype=torch.int64)), 1)
        second = model(input_ids=torch.tensor([[9], [10]]), attention_mask=mask2,
                       position_ids=generation_positions(mask2)[:, -1:], cache=first.cache)
    with Generator(cached_bundles["gpt2"], provider="cpu") as gen:
        got_first = gen.step(ids.numpy(), mask.numpy())
        got_second = gen.step([[9], [10]])
    np.testing.assert_allclose(got_first[1], first.logits[1].numpy(), atol=1e-4)
    np.testing.assert_allclose(got_first[0, 2:], first.logits[0, 2:].numpy(), atol=1e-4)
    np.testing.assert_allclose(got_second, second.logits.numpy(), atol=1e-4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda g: g.step([[1, 2]], [[1, 2]]), r"attention_mask holds values other than 0 and 1"),
        (lambda g: g.step([[1, 2]], [[1]]), r"attention_mask must be integers of the ids' shape"),
        (lambda g: g.step([[1]] * 9), r"a batch of 9 sequences is outside the bundle's 'batch'"),
        (lambda g: (g.step([[1], [2]]), g.step([[3]])),
         r"the cache holds a batch of 2 sequences; this step feeds 1"),
        (lambda g: g.generate_batch([], 4), r"give at least one prompt"),
        (lambda g: g.generate_batch([[1], []], 4), r"the prompt is empty"),
    ],
    ids=["mask-values", "mask-shape", "batch-range", "batch-change", "no-prompts", "empty"],
)
def test_bad_batches_are_input_errors(cached_bundles, call, message):
    with Generator(cached_bundles["gpt2"], provider="cpu") as gen, pytest.raises(
        InputError, match=message
    ):
        call(gen)


def test_a_bundle_without_a_mask_refuses_padding(tmp_path):
    from export import export_entry

    export_entry("decoder_lm", out=tmp_path, variants=())
    with Generator(tmp_path / "decoder_lm", provider="cpu") as gen:
        with pytest.raises(InputError, match=r"takes no attention mask, so its prompts cannot "
                           r"be padded: give prompts of one length \(got \[1, 2\]\)"):
            gen.generate_batch([[1], [1, 2]], 2)
        with pytest.raises(InputError, match=r"takes no attention mask \(its cache names no "
                           r"mask_input\), so no token can be padding"):
            gen.step([[1, 2]], [[0, 1]])
        rows = gen.generate_batch([[1, 2], [3, 4]], 3)  # equal lengths need no mask
        assert rows == [gen.generate([1, 2], 3), gen.generate([3, 4], 3)]


# --- the spec -----------------------------------------------------------------------------------


def test_generation_inputs_are_left_padded_with_positions_as_generate_makes_them():
    mask = left_padding(4, 9, torch.Generator().manual_seed(0))
    assert mask[0].all() and (mask.sum(1) >= 1).all()
    assert all((row.cumsum(0) > 0).int().diff().ge(0).all() for row in mask)  # pads lead
    positions = generation_positions(torch.tensor([[0, 0, 1, 1, 1]]))
    assert positions.tolist() == [[0, 0, 0, 1, 2]]


def test_undefined_positions_with_a_cache():
    feed = {"input_ids": torch.zeros(2, 2, dtype=torch.int64),
            "attention_mask": torch.tensor([[1, 1, 1], [0, 0, 1]])}
    outputs = {"logits": np.zeros((2, 2, 5)), "present.0.key": np.zeros((2, 4, 3, 8))}
    masks = undefined_with_cache(feed, outputs)
    assert masks["logits"][:, :, 0].tolist() == [[False, False], [True, False]]
    assert masks["present.0.key"][:, 0, :, 0].tolist() == [[False] * 3, [True, True, False]]
    full = {"input_ids": feed["input_ids"], "attention_mask": torch.ones(2, 3, dtype=torch.int64)}
    assert undefined_with_cache(full, outputs) == {}


def test_grid_points_keep_past_plus_seq_within_the_positions(lms):
    spec = spec_for_generation(lms["gpt2"])
    assert spec.fit_point({"batch": 2, "seq": 100, "past": 128}) == {
        "batch": 2, "seq": 100, "past": 28, "total": 128
    }
    assert spec.dims["total"] == (1, POSITIONS) and spec.cache.max_length == POSITIONS


def test_with_past_arguments_are_checked(lms):
    bert = build("bert")
    with pytest.raises(ExportError, match=r"BertModel returned no KV cache with use_cache=True"):
        spec_for_generation(bert)
    with pytest.raises(ExportError, match=r"text-generation-with-past makes its own inputs "
                       r"\(generation's padding, positions and past\); drop input_maker"):
        spec_for_task(lms["gpt2"], "text-generation-with-past", input_maker=lambda p: {})
    with pytest.raises(ExportError, match=r"task 'text-generation-with-past' is for Hugging "
                       r"Face models; Linear is not one"):
        export_module(torch.nn.Linear(2, 2), (torch.zeros(2, 2),),
                      task="text-generation-with-past")


def test_unexpected_exporter_outputs_are_an_export_error():
    import onnx_ir as ir

    graph = ir.Graph([], [ir.Value(name="cache.layers.0.keys")], nodes=[])
    spec = type("Spec", (), {"output_names": ("logits", "present.0.key")})()
    with pytest.raises(ExportError, match=r"transformers' exporter gave outputs "
                       r"\['present.0.key'\], expected \['logits', 'present.0.key'\]"):
        _rename(graph, spec)
