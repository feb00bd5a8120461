"""Torch-free greedy generation (runtime.Generator) against torch's own cached decoding.

torch is used here only to compute the references; the generator itself never imports it
(test_generate_cli_runs_without_torch).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export._cli import main
from runtime import (
    ArtifactError,
    Generator,
    InputError,
    Manifest,
    Runner,
    ToleranceTable,
    available_providers,
    check,
    compare,
    generate,
)

NEW_TOKENS = 64
PROMPTS = {"len1": [5], "len6": [11, 3, 90, 42, 7, 64], "len23": list(range(40, 86, 2))}
REPO = Path(__file__).resolve().parents[2]


def _table(gen: Generator) -> ToleranceTable:
    """The tolerance of the variant the generator runs (the runner picks it)."""
    return ToleranceTable.from_variant(gen.runner.variant)


@torch.no_grad()
def torch_steps(module, prompt: list[int], new_tokens: int):
    """torch's own cached decoding, step by step: (tokens, last-position logits per step)."""
    logits, keys, values = module(torch.tensor([prompt]), use_cache=True)
    tokens, per_step = [], []
    for i in range(new_tokens):
        last = logits[0, -1]
        per_step.append(last.numpy().copy())
        tokens.append(int(last.argmax()))
        if i + 1 < new_tokens:
            logits, keys, values = module(torch.tensor([[tokens[-1]]]), keys, values)
    return tokens, per_step


@pytest.mark.parametrize("prompt", list(PROMPTS.values()), ids=list(PROMPTS))
def test_generate_equals_torch_token_for_token(lm_bundle, lm_module, prompt):
    expected = lm_module.generate(torch.tensor([prompt]), NEW_TOKENS)[0, len(prompt) :].tolist()
    ref_tokens, ref_logits = torch_steps(lm_module, prompt, NEW_TOKENS)
    assert ref_tokens == expected  # the step-by-step reference is torch's generate
    with Generator(lm_bundle, provider="cpu") as gen:
        steps = list(gen.steps(prompt, NEW_TOKENS))
        assert gen.length == len(prompt) + NEW_TOKENS - 1
    assert [s.token for s in steps] == expected
    table = _table(gen)
    for k, (step, ref) in enumerate(zip(steps, ref_logits, strict=True)):
        records = compare({"logits": step.logits}, {"logits": ref}, table)
        assert records[0].passed, (k, records)
    assert generate(lm_bundle, prompt, NEW_TOKENS, provider="cpu") == expected


def test_past_length_zero_then_one(lm_bundle, lm_module):
    with Generator(lm_bundle, provider="cpu") as gen, torch.no_grad():
        first = gen.step([17])  # prefill: past length 0
        assert gen.length == 1
        second = gen.step([4])  # decode: past length 1
        assert gen.length == 2
        full = lm_module(torch.tensor([[17, 4]])).numpy()[0]  # no cache at all
    table = _table(gen)
    check(compare({"logits": np.concatenate([first, second])}, {"logits": full}, table))


def test_rewind_to_a_checkpoint_branches_the_cache(lm_bundle):
    with Generator(lm_bundle, provider="cpu") as gen:
        gen.step([1, 2, 3])
        mark = gen.checkpoint()
        a = gen.step([4])
        gen.step([5])
        gen.rewind(mark)
        assert gen.length == 3
        np.testing.assert_array_equal(gen.step([4]), a)


def test_chunk_of_queries_is_bottom_right_aligned(lm_bundle, lm_module):
    """q_len 4 < kv_len 10 through onnxruntime: the chunk's queries sit at positions 6..9,
    so its logits equal rows 6..9 of a full causal pass (top-left alignment would let the
    chunk's first query see only key 0)."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    with Generator(lm_bundle, provider="cpu") as gen, torch.no_grad():
        gen.step(prompt[:6])
        chunk = gen.step(prompt[6:])
        assert chunk.shape == (4, 97) and gen.length == 10
        full = lm_module(torch.tensor([prompt])).numpy()[0]
        alone = lm_module(torch.tensor([prompt[6:]])).numpy()[0]
    table = _table(gen)
    check(compare({"logits": chunk}, {"logits": full[6:]}, table))
    assert not compare({"logits": chunk}, {"logits": alone}, table)[0].passed


def _short_seq_bundle(lm_bundle, tmp_path, seq_max: int) -> Path:
    """A copy whose manifest allows at most `seq_max` tokens per step (manifest.json is not
    among the hashed files; the graph itself takes any length)."""
    copy = tmp_path / "short"
    shutil.copytree(lm_bundle, copy)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["dims"]["seq"]["max"] = seq_max
    (copy / "manifest.json").write_text(json.dumps(doc))
    return copy


def test_a_prompt_longer_than_one_step_is_prefilled_in_chunks(lm_bundle, lm_module, tmp_path):
    prompt = list(range(1, 21))
    expected = lm_module.generate(torch.tensor([prompt]), 8)[0, 20:].tolist()
    with Generator(_short_seq_bundle(lm_bundle, tmp_path, 8), provider="cpu") as gen:
        assert gen.generate(prompt, 8) == expected
        with pytest.raises(
            InputError,
            match=r"cannot feed 9 tokens in one step: the bundle's "
            r"'seq' dim allows 1\.\.8",
        ):
            gen.step(list(range(9)))


def test_cache_reaching_the_declared_maximum(lm_bundle, lm_module):
    prompt = list(range(3, 97)) * 2 + list(range(12))  # 200 tokens
    fits = 256 - len(prompt) + 1  # 57 new tokens: 256 positions fed
    with Generator(lm_bundle, provider="cpu") as gen:
        assert gen.max_length == 256
        tokens = gen.generate(prompt, fits)
        assert gen.length == 256  # the cache is exactly full
        with pytest.raises(
            InputError,
            match=r"KV cache full: 256 cached \+ 1 new positions "
            r"exceed the bundle's maximum length 256 \(the declared max of dim "
            r"'past'\)",
        ):
            gen.step([tokens[-1]])
        with pytest.raises(
            InputError,
            match=r"a prompt of 200 tokens and 58 new tokens need a "
            r"KV cache of 257 positions, above the bundle's maximum length 256 "
            r".*at most 57 new tokens fit",
        ):
            gen.generate(prompt, fits + 1)
        assert gen.length == 256  # a refused request runs nothing
    expected = lm_module.generate(torch.tensor([prompt]), fits)[0, len(prompt) :].tolist()
    assert tokens == expected
    # Below the generator, the runner's validator refuses a past beyond the max by name.
    past = np.zeros((2, 1, 2, 257, 8), np.float32)
    with (
        Runner(lm_bundle, provider="cpu") as runner,
        pytest.raises(
            InputError, match=r"'past_keys': axis 3 \('past'\) expected 0\.\.256, got 257"
        ),
    ):
        runner.run(
            {"input_ids": np.zeros((1, 1), np.int64), "past_keys": past, "past_values": past.copy()}
        )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda g: g.generate([], 4), r"the prompt is empty: give at least one token id"),
        (lambda g: g.generate([1], -1), r"max_new_tokens must be an integer >= 0, got -1"),
        (lambda g: g.generate([1], True), r"max_new_tokens must be an integer >= 0, got True"),
        (lambda g: g.generate([1, 97], 2), r"token id 97 is outside the vocabulary 0\.\.96"),
        (lambda g: g.step([-1]), r"token id -1 is outside the vocabulary 0\.\.96"),
        (
            lambda g: g.step([[[1, 2]]]),
            r"token ids must be a flat sequence of integers \(or a batch of them\), got int64 "
            r"with shape \[1, 1, 2\]",
        ),
        (lambda g: g.step([0.5]), r"token ids must be a flat sequence of integers .*got float64"),
        (lambda g: g.step([]), r"no token ids to feed: give at least one"),
    ],
    ids=[
        "empty-prompt",
        "negative-new",
        "bool-new",
        "vocab-high",
        "vocab-low",
        "3d",
        "float",
        "empty-step",
    ],
)
def test_bad_requests_are_input_errors(lm_bundle, call, message):
    with Generator(lm_bundle, provider="cpu") as gen:
        with pytest.raises(InputError, match=message):
            call(gen)
        assert gen.length == 0


def test_zero_new_tokens_only_prefills(lm_bundle):
    with Generator(lm_bundle, provider="cpu") as gen:
        assert gen.generate([1, 2, 3], 0) == []
        assert gen.length == 3


def test_a_runner_is_reused_and_left_open(lm_bundle):
    with Runner(lm_bundle, provider="cpu") as runner:
        with Generator(runner) as gen:
            tokens = gen.generate([1, 2], 4)
        assert runner.session is not None  # the generator did not close it
        assert generate(runner, [1, 2], 4) == tokens


def test_a_cached_block_is_not_a_language_model(kv_export):
    with pytest.raises(
        InputError,
        match=r"bundle 'kv_cache' caches a block, not a language "
        r"model",
    ):
        Generator(kv_export.bundle, provider="cpu")


class _FailingSession:
    """Wraps a real session; run_with_iobinding fails as onnxruntime does on a broken graph."""

    def __init__(self, session):
        self._session = session

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run_with_iobinding(self, binding):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Concat: inputs mismatch")


def test_an_onnxruntime_failure_names_the_bundle(lm_bundle):
    with Generator(lm_bundle, provider="cpu") as gen:
        gen.runner._session = _FailingSession(gen.runner._session)
        with pytest.raises(
            ArtifactError,
            match=r"model[.\w]*\.onnx: onnxruntime failed on a "
            r"decode step: .*Concat",
        ):
            gen.step([1])


def test_a_present_that_does_not_grow_is_refused(tmp_path):
    """A graph whose present is its past (a cache that silently stops growing)."""
    from export import run_pipeline, spec_from_module
    from models.zoo import LM_CACHE

    class Stuck(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(11, 5)

        def forward(self, input_ids, past_keys, past_values):
            return self.embed(input_ids), past_keys * 1.0, past_values * 1.0

    past = torch.zeros(1, 2, 1, 3, 4)
    dims = {
        "input_ids": {0: "batch", 1: ("seq", 1, 8)},
        "past_keys": {1: "batch", 3: ("past", 0, 8)},
        "past_values": {1: "batch", 3: "past"},
    }
    ids = torch.tensor([[1, 2], [3, 4]])
    spec = spec_from_module(
        Stuck(),
        {"input_ids": ids, "past_keys": past, "past_values": past.clone()},
        dynamic=dims,
        dims={"batch": (1, 2)},
        name="stuck",
        output_names=("logits", "present_keys", "present_values"),
        cache=LM_CACHE,
    )
    bundle = run_pipeline(spec, out=tmp_path, grid=[{"batch": 2, "seq": 2, "past": 3}]).bundle
    with (
        Generator(bundle, provider="cpu") as gen,
        pytest.raises(
            ArtifactError,
            match=r"present 'present_keys' holds 0 positions on axis 3, expected "
            r"0 past \+ 2 new = 2",
        ),
    ):
        gen.step([1, 2])


# --- the cache description, read strictly ---------------------------------------------------


def _raw(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _with_cache(raw: dict, **changes) -> dict:
    return {**raw, "cache": {**raw["cache"], **changes}}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": 1}, r"cache: unknown key\(s\) 'version'"),
        ({"graphs": "two"}, r"cache\.graphs: .*expected 'single', got 'two'"),
        ({"position_offset": 0}, r"cache\.position_offset: .*got 0"),
        ({"past_dim": "time"}, r"cache\.past_dim: 'time' is not a dim of the bundle"),
        ({"seq_dim": ["seq"]}, r"cache\.seq_dim: expected a non-empty string, got \['seq'\]"),
        ({"tensors": []}, r"cache\.tensors: expected at least one"),
        (
            {"tensors": [{"past": "kv", "present": "present_keys", "holds": "keys"}]},
            r"cache\.tensors\[0\]\.past: 'kv' is not an input of the bundle",
        ),
        (
            {"tensors": [{"past": "past_keys", "present": ["x"], "holds": "keys"}]},
            r"cache\.tensors\[0\]\.present: expected a non-empty string, got \['x'\]",
        ),
        (
            {"tensors": [{"past": "past_keys", "present": "logits", "holds": "queries"}]},
            r"cache\.tensors\[0\]\.holds: expected one of \('keys', 'values'\), got 'queries'",
        ),
        (
            {"past_axis": 2},
            r"cache\.tensors\[0\]\.past: axis 2 of input 'past_keys' \(shape "
            r"\[2, 'batch', 2, 'past', 8\]\) is not the 'past' dim",
        ),
        ({"batch_axis": 9}, r"cache\.tensors\[0\]\.past: axis 9 .* is not the 'batch' dim"),
        ({"batch_axis": True}, r"cache\.batch_axis: expected an integer >= 0, got True"),
        ({"max_length": 257}, r"cache\.max_length: 257 exceeds 256, the 'past' dim's max"),
        ({"max_length": 0}, r"cache\.max_length: expected an integer >= 1, got 0"),
        ({"token_input": "ids"}, r"cache\.token_input: 'ids' is not an input"),
        ({"logits_output": "scores"}, r"cache\.logits_output: 'scores' is not an output"),
        ({"mask_input": "mask"}, r"cache\.mask_input: 'mask' is not an input"),
        (
            {"mask_input": "past_keys"},
            r"cache\.mask_input: input 'past_keys' \(float32 \[2, 'batch', 2, 'past', 8\]\) "
            r"must be int64 \['batch', a dim\]",
        ),
        (
            {"position_input": "past_values"},
            r"cache\.position_input: input 'past_values' .* must be int64 \['batch', 'seq'\]",
        ),
    ],
    ids=[
        "version",
        "graphs",
        "offset",
        "past-dim",
        "unhashable-dim",
        "no-tensors",
        "past-name",
        "present-name",
        "holds",
        "past-axis",
        "batch-axis",
        "bool-axis",
        "max-length",
        "zero-length",
        "token",
        "logits",
        "mask-name",
        "mask-shape",
        "positions-shape",
    ],
)
def test_a_malformed_cache_names_its_key(lm_bundle, changes, message):
    raw = _raw(lm_bundle)
    assert Manifest.from_dict(raw).cache.is_lm
    with pytest.raises(ArtifactError, match=r"manifest\.json: " + message):
        Manifest.from_dict(_with_cache(raw, **changes))


def test_cache_missing_or_incomplete(lm_bundle, tmp_path):
    raw = _raw(lm_bundle)
    bare = tmp_path / "decoder_lm"
    shutil.copytree(lm_bundle, bare)
    (bare / "manifest.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "cache"}))
    with pytest.raises(ArtifactError, match=r"bundle 'decoder_lm' declares no KV cache"):
        Generator(bare, provider="cpu")
    with pytest.raises(ArtifactError, match=r"manifest\.json: cache: expected an object, got list"):
        Manifest.from_dict({**raw, "cache": []})
    cache = dict(raw["cache"])
    del cache["max_length"]
    with pytest.raises(ArtifactError, match=r"cache\.max_length: missing required key"):
        Manifest.from_dict({**raw, "cache": cache})


def test_a_cache_that_varies_in_another_dim_is_refused(lm_bundle):
    raw = _raw(lm_bundle)
    inputs = [
        {**t, "shape": [2, "batch", 2, "past", "seq"]} if t["name"] == "past_keys" else t
        for t in raw["inputs"]
    ]
    with pytest.raises(
        ArtifactError,
        match=r"cache\.tensors\[0\]\.past: input "
        r"'past_keys' .* has the dynamic dim 'seq' at axis 4; a cache may vary "
        r"only in batch and past",
    ):
        Manifest.from_dict({**raw, "inputs": inputs})


def _as_version_2(raw: dict) -> dict:
    """The manifest as format version 2 wrote it: cache and decode parity inside extra."""
    old = {k: v for k, v in raw.items() if k not in ("cache", "decode_parity")}
    decode = {**raw["decode_parity"], "passed": True}
    extra = {**raw["extra"], "cache": {**raw["cache"], "version": 1}, "decode_parity": decode}
    return {**old, "format_version": 2, "extra": extra}


def test_a_version_2_manifest_keeps_its_cache_and_decode_parity(lm_bundle):
    raw = _raw(lm_bundle)
    new, old = Manifest.from_dict(raw), Manifest.from_dict(_as_version_2(raw))
    assert old.format_version == 2
    assert old.cache == new.cache and old.decode_parity == new.decode_parity
    assert "cache" not in old.extra and "decode_parity" not in old.extra
    legacy = _as_version_2(raw)
    legacy["extra"]["cache"]["version"] = 2
    with pytest.raises(ArtifactError, match=r"extra\.cache\.version: expected 1, got 2"):
        Manifest.from_dict(legacy)
    legacy = _as_version_2(raw)
    legacy["extra"]["cache"]["past_dim"] = "time"
    with pytest.raises(ArtifactError, match=r"extra\.cache\.past_dim: 'time' is not a dim"):
        Manifest.from_dict(legacy)


def test_a_version_2_bundle_generates_as_before(lm_bundle, tmp_path):
    """Rewrite the bundle's manifest in format 2 (hashes still hold: the manifest is not a
    listed file) and generate from it."""
    old = tmp_path / "decoder_lm"
    shutil.copytree(lm_bundle, old)
    (old / "manifest.json").write_text(json.dumps(_as_version_2(_raw(lm_bundle))))
    with Generator(lm_bundle, provider="cpu") as new_gen, Generator(old, provider="cpu") as gen:
        assert gen.manifest.format_version == 2
        assert gen.generate([5, 17, 2], 6) == new_gen.generate([5, 17, 2], 6)


def test_decode_parity_is_read_strictly(lm_bundle):
    raw = _raw(lm_bundle)
    record = {**raw["decode_parity"]["records"][0], "variant": "int4"}
    bad = {**raw, "decode_parity": {**raw["decode_parity"], "records": [record]}}
    with pytest.raises(ArtifactError, match=r"decode_parity\.records\[0\]\.variant: 'int4' is not"):
        Manifest.from_dict(bad)
    point = {**raw["decode_parity"]["runs"][0], "time": 3}
    bad = {**raw, "decode_parity": {**raw["decode_parity"], "runs": [point]}}
    with pytest.raises(ArtifactError, match=r"decode_parity\.runs\[0\]\.time: dim 'time'"):
        Manifest.from_dict(bad)
    bad = {**raw, "decode_parity": {**raw["decode_parity"], "steps": 0}}
    with pytest.raises(ArtifactError, match=r"decode_parity\.steps: expected an integer >= 1"):
        Manifest.from_dict(bad)


# --- the CLI ---------------------------------------------------------------------------------


def test_generate_cli(lm_bundle, lm_module, capsys):
    expected = lm_module.generate(torch.tensor([[1, 2, 3]]), 16)[0, 3:].tolist()
    args = [
        "generate",
        str(lm_bundle),
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "16",
        "--provider",
        "cpu",
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == ",".join(map(str, expected))
    header = r"decoder_lm: variant \w+ on CPUExecutionProvider; prompt of 3 tokens"
    assert re.match(header, lines[0])
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == expected and result["cache_length"] == 18


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--prompt-ids", "1,x", "--max-new-tokens", "2"],
            r"argument --prompt-ids: expected comma-separated integers, got '1,x'",
        ),
        (["--prompt-ids", "", "--max-new-tokens", "2"], r"attnx: error: the prompt is empty"),
        (
            ["--prompt-ids", "1", "--max-new-tokens", "300"],
            r"attnx: error: .*above the bundle's maximum length 256",
        ),
    ],
    ids=["not-ints", "empty", "too-long"],
)
def test_generate_cli_errors_exit_2(lm_bundle, capsys, args, message):
    assert main(["generate", str(lm_bundle), *args, "--provider", "cpu"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_generate_cli_runs_without_torch(lm_bundle, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    for name in ("torch", "onnxscript"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is blocked here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    code = "from export._cli import main; raise SystemExit(main())"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "generate",
            str(lm_bundle),
            "--prompt-ids",
            "5",
            "--max-new-tokens",
            "8",
            "--provider",
            "cpu",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == ",".join(
        map(str, generate(lm_bundle, [5], 8, provider="cpu"))
    )


# --- CUDA: presents stay on the device between steps ----------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in available_providers(),
    reason="onnxruntime has no CUDAExecutionProvider here",
)
def test_generate_on_cuda_keeps_the_cache_on_the_device(lm_bundle, lm_module):
    prompt = PROMPTS["len6"]
    ref_tokens, ref_logits = torch_steps(lm_module, prompt, NEW_TOKENS)
    with Generator(lm_bundle, provider="cuda") as gen:
        steps = list(gen.steps(prompt, NEW_TOKENS))
        assert all(v.device_name().lower() == "cuda" for v in gen._state)
    assert [s.token for s in steps] == ref_tokens
    table = _table(gen)
    for step, ref in zip(steps, ref_logits, strict=True):
        assert compare({"logits": step.logits}, {"logits": ref}, table)[0].passed
