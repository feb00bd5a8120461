"""Hugging Face models through the whole pipeline: the default grid, the bundle, the torch-free
Runner at shapes no grid point used, and the kernels their attention reached.

References are transformers' own models (random weights, built from configs); the Runner's
answers are compared with them, not with anything attnx computed.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'attnx[hf]'")

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export import ExportError, export_module
from export._hf import (
    MAX_BATCH,
    MAX_SEQ,
    padding_mask,
    spec_from_pretrained,
    text_inputs,
    undefined_positions,
)
from runtime import load_bundle
from tests.export.conftest import assert_gqa_keeps_present
from tests.hf.conftest import BUILDERS, CAUSAL, POSITIONS, VOCAB, build

REPO = Path(__file__).resolve().parents[2]
FAMILIES = sorted(BUILDERS)
# The kernel the fused variant's attention reached, by family (DESIGN.md section 9).
KERNELS = {
    "bert": "com.microsoft.MultiHeadAttention",
    "t5_encoder": "com.microsoft.MultiHeadAttention",
    "gpt2": "com.microsoft.GroupQueryAttention",
    "gpt2_lm": "com.microsoft.GroupQueryAttention",
    "llama": "com.microsoft.GroupQueryAttention",
    "llama_lm": "com.microsoft.GroupQueryAttention",
}
OUTPUTS = {
    "bert": ("last_hidden_state", "pooler_output"),
    "gpt2": ("last_hidden_state",),
    "llama": ("last_hidden_state",),
    "t5_encoder": ("last_hidden_state",),
    "gpt2_lm": ("logits",),
    "llama_lm": ("logits",),
}
# Shapes no default grid point uses: batch 3 holds a full, a right- and a left-padded row.
NEW_POINTS = [{"batch": 3, "seq": 11}, {"batch": 4, "seq": 37}]


@pytest.mark.parametrize("family", FAMILIES)
def test_default_grid_passes_at_float32_tolerance(hf_exports, family):
    result = hf_exports[family]
    assert result.passed and result.records
    points = {tuple(sorted(r.point.items())) for r in result.records}
    assert (("batch", 1), ("seq", 1)) in points
    # The model's positions (T5's relative buckets have no limit: attnx's cap), a cheap batch.
    longest = MAX_SEQ if family == "t5_encoder" else POSITIONS
    assert (("batch", MAX_BATCH), ("seq", longest)) in points
    assert result.variants["base"].tolerance["float32"].atol == 1e-4
    manifest = load_bundle(result.bundle).manifest
    assert manifest.output_names == list(OUTPUTS[family])
    assert [t.name for t in manifest.inputs][:2] == ["input_ids", "attention_mask"]
    ids = manifest.inputs[0]
    assert (ids.value_range.min, ids.value_range.max) == (0, VOCAB - 1)
    mask = manifest.inputs[1]
    assert (mask.value_range.min, mask.value_range.max) == (0, 1)
    assert manifest.outputs[0].shape[:2] == ("batch", "seq")


@pytest.mark.parametrize("family", FAMILIES)
def test_undefined_positions_are_left_out_and_counted(hf_exports, family):
    """Left padding leaves a causal query no key: those positions are left out (and counted),
    never compared under a looser tolerance. Encoders define every position."""
    excluded = [o.excluded for r in hf_exports[family].records for o in r.outputs]
    if family in CAUSAL:
        assert max(excluded) > 0
    else:
        assert set(excluded) == {0}
    base = [r for r in hf_exports[family].records if r.variant == "base"]
    assert all(o.atol == 1e-4 for r in base for o in r.outputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_reaches_the_kernel(hf_exports, family):
    variants = hf_exports[family].variants
    base, fused = variants["base"].census, variants["fused"].census
    assert base.get("Softmax", 0) == 2 and KERNELS[family] not in base
    assert fused.get(KERNELS[family]) == 2, fused
    assert "Softmax" not in fused
    manifest = load_bundle(hf_exports[family].bundle).manifest
    assert manifest.extra["variants"]["fused"]["census"][KERNELS[family]] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_llamas_rotary_embedding_reaches_the_kernel(hf_exports, family):
    """Llama's rotate-half becomes onnxruntime's RotaryEmbedding in the fused graph, for q and k
    of each of its 2 layers; the other families have no rotary embedding."""
    variants = hf_exports[family].variants
    fused = variants["fused"].census.get("com.microsoft.RotaryEmbedding", 0)
    assert fused == (4 if family.startswith("llama") else 0)
    if family.startswith("llama"):
        assert variants["base"].census.get("Neg", 0) == 4 and "Neg" not in variants["fused"].census


def _neox():
    import transformers

    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=POSITIONS, rotary_pct=0.5,
    )
    return transformers.GPTNeoXModel(config)


def test_only_llamas_rotary_code_is_routed(hf_models):
    """GPT-NeoX rotates part of each head: its own apply_rotary_pos_emb stays; so do models
    without rotary embeddings. Llama's modeling module is swapped in the block and restored."""
    from transformers.models.llama import modeling_llama

    from export._hf import _llama_rotary_modules, kernel_rotary

    assert _llama_rotary_modules(hf_models["llama"]) == [modeling_llama]
    assert _llama_rotary_modules(_neox()) == []
    assert _llama_rotary_modules(hf_models["gpt2"]) == []
    original = modeling_llama.apply_rotary_pos_emb
    with kernel_rotary(hf_models["llama"]):
        assert modeling_llama.apply_rotary_pos_emb is not original
    assert modeling_llama.apply_rotary_pos_emb is original


@pytest.mark.parametrize("family", [f for f in FAMILIES if "GroupQuery" in KERNELS[f]])
def test_group_query_attention_keeps_its_present_outputs(hf_exports, family):
    assert assert_gqa_keeps_present(hf_exports[family].bundle) > 0


def _reference(model, feed) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(**feed, use_cache=False, return_dict=True)
    return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def test_bundles_run_torch_free_at_new_shapes(hf_models, hf_exports, tmp_path):
    """Every variant the runner would choose from, on CPU, in a process where torch cannot be
    imported, against transformers' model at shapes the grid never used."""
    cases = []
    for family in FAMILIES:
        spec = spec_from_pretrained(hf_models[family])
        grid = {tuple(sorted(r.point.items())) for r in hf_exports[family].records}
        for i, point in enumerate(NEW_POINTS):
            assert tuple(sorted(point.items())) not in grid
            feed = spec.make_inputs(point)
            path = tmp_path / f"{family}_{i}.npz"
            np.savez(path, **{k: v.numpy() for k, v in feed.items()})
            cases.append((family, str(hf_exports[family].bundle), str(path), feed))
    script = tmp_path / "run.py"
    script.write_text(_RUN_TORCH_FREE)
    listing = tmp_path / "cases.json"
    listing.write_text(json.dumps([c[:3] for c in cases]))
    proc = subprocess.run(
        [sys.executable, str(script), str(listing), str(tmp_path)],
        env=_no_torch_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    for family, _, path, feed in cases:
        want = _reference(hf_models[family], feed)
        undefined = undefined_positions(feed, want) if family in CAUSAL else {}
        with np.load(path.replace(".npz", ".out.npz")) as got:
            for key in got.files:
                variant, name = key.split("/")
                keep = ~np.broadcast_to(undefined.get(name, False), want[name].shape)
                tol = 0.1 if variant == "int8" else 1e-4
                np.testing.assert_allclose(
                    got[key][keep], want[name][keep], atol=tol, rtol=tol * 10, err_msg=key
                )


_RUN_TORCH_FREE = """
import json, sys
import numpy as np
assert "torch" not in sys.modules
from runtime import Runner, load_bundle

for family, bundle, path in json.load(open(sys.argv[1])):
    feed = dict(np.load(path))
    out = {}
    for variant in load_bundle(bundle).manifest.variants:
        if "CPUExecutionProvider" not in variant.providers:
            continue
        with Runner(bundle, provider="cpu", variant=variant.name) as runner:
            for name, value in runner.run(feed).items():
                out[f"{variant.name}/{name}"] = value
    np.savez(path.replace(".npz", ".out.npz"), **out)
try:
    import torch  # noqa: F401
except ImportError:
    print("torch is not importable here")
else:
    raise SystemExit("torch was importable")
"""


def _no_torch_env(tmp_path: Path) -> dict[str, str]:
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    for name in ("torch", "onnxscript", "transformers"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is blocked here')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}


# --- inputs that mean what they say -------------------------------------------------------------


def test_padding_masks_keep_a_token_and_pad_both_sides():
    gen = torch.Generator().manual_seed(3)
    masks = [padding_mask(5, 9, gen) for _ in range(20)]
    for mask in masks:
        assert (mask.sum(-1) >= 1).all() and mask[0].all()  # every row keeps a token
        assert set(mask.unique().tolist()) <= {0, 1}
    right = [m[r] for m in masks for r in (1, 3) if not m[r].all()]
    left = [m[r] for m in masks for r in (2, 4) if not m[r].all()]
    assert right and all(row[0] == 1 and row[-1] == 0 for row in right)
    assert left and all(row[0] == 0 and row[-1] == 1 for row in left)
    assert padding_mask(3, 1, gen).tolist() == [[1], [1], [1]]


def test_text_inputs_follow_the_config():
    config = build("bert").config
    names = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    feed = text_inputs(config, names)({"batch": 6, "seq": 13})
    assert list(feed) == list(names)
    assert 0 <= feed["input_ids"].min() and feed["input_ids"].max() < VOCAB
    assert set(feed["token_type_ids"].unique().tolist()) == {0, 1}
    mask = feed["attention_mask"]
    expected = np.maximum(np.cumsum(mask.numpy(), -1) - 1, 0)  # positions of the kept tokens
    assert (feed["position_ids"].numpy() == expected).all()
    with pytest.raises(ExportError, match=r"no input maker for input 'labels'; pass input_maker"):
        text_inputs(config, ("labels",))({"batch": 1, "seq": 2})


def test_undefined_positions_are_the_rows_before_the_first_token():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]])
    outputs = {"logits": np.zeros((3, 4, 5)), "pooled": np.zeros((3, 8))}
    undefined = undefined_positions({"attention_mask": mask}, outputs)
    assert list(undefined) == ["logits"]
    assert undefined["logits"][..., 0].tolist() == [
        [False] * 4,
        [True, True, False, False],
        [False] * 4,  # right padding: padded queries still see the tokens before them
    ]
    assert undefined_positions({}, outputs) == {}


def test_default_dims_come_from_the_model(hf_models):
    spec = spec_from_pretrained(hf_models["gpt2_lm"])
    assert spec.dims == {"batch": (1, 8), "seq": (1, POSITIONS)}
    assert spec.example == {"batch": 2, "seq": 16}
    spec = spec_from_pretrained(hf_models["llama"], dims={"seq": (1, 32)})
    assert spec.dims["seq"] == (1, 32)


def test_a_users_input_maker_reaches_the_grid(hf_models, attnx_parity):
    """Through the pytest fixture: an input maker without padding is what parity runs on."""
    seen = []

    def no_padding(point):
        seen.append(dict(point))
        ids = torch.randint(0, VOCAB, (point["batch"], point["seq"]))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    result = attnx_parity(
        hf_models["llama_lm"],
        input_maker=no_padding,
        grid=[{"batch": 2, "seq": 16}, {"batch": 3, "seq": 5}],
        variants=(),
    )
    assert result.passed and {"batch": 3, "seq": 5} in seen
    assert all(o.excluded == 0 for r in result.records for o in r.outputs)


def test_example_inputs_pick_the_inputs(hf_models):
    ids = torch.randint(0, VOCAB, (2, 9))
    result = export_module(hf_models["bert"], {"input_ids": ids}, variants=(), grid=None)
    assert [d.name for d in spec_from_pretrained(hf_models["bert"], {"input_ids": ids}).inputs] == [
        "input_ids"
    ]
    assert result.passed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dynamic": {"input_ids": {0: "b"}}}, r"takes its dims, outputs and cache from"),
        ({"example_inputs": {"labels": torch.zeros(2, 3)}}, r"forward takes no input 'labels'"),
        ({"example_inputs": {"input_ids": [[1, 2]]}}, r"'input_ids' is a list, not a torch"),
    ],
    ids=["dynamic", "unknown-input", "not-a-tensor"],
)
def test_bad_hf_arguments_are_refused(hf_models, kwargs, message):
    with pytest.raises(ExportError, match=message):
        export_module(hf_models["bert"], **kwargs)


def test_a_plain_module_still_needs_examples():
    with pytest.raises(ExportError, match=r"example_inputs are needed for a module that is not"):
        export_module(torch.nn.Linear(2, 2))
