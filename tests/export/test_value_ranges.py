"""Value ranges of integer inputs: found from the embedding table the ids index, or declared by
the user; written to the manifest and enforced by the runtime's validator, where torch's
embedding would raise and ONNX Gather would wrap or fail deep inside onnxruntime."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from export import ExportError, export_module
from models import zoo
from runtime import InputError, Runner

VOCAB, D = 13, 8
DYNAMIC = {"ids": {0: ("batch", 1, 4), 1: ("seq", 1, 16)}}


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.proj = nn.Linear(D, D)

    def forward(self, ids):
        return self.proj(self.embed(ids))


class Offsets(nn.Module):
    """An integer input that indexes nothing: no range is found for it."""

    def forward(self, x, offset):
        return x + offset.to(x.dtype)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))


def _export(tmp_path, module=None, feed=None, **kwargs):
    result = export_module(
        module or Embed(),
        feed or {"ids": _ids()},
        dynamic=kwargs.pop("dynamic", DYNAMIC),
        out=tmp_path,
        name="embed",
        variants=(),
        **kwargs,
    )
    return json.loads((result.bundle / "manifest.json").read_text()), result.bundle


def test_the_range_of_ids_comes_from_the_embedding_they_index(tmp_path):
    manifest, _ = _export(tmp_path)
    assert manifest["inputs"][0]["value_range"] == {"min": 0, "max": VOCAB - 1}


def test_a_declared_range_wins_and_none_removes_it(tmp_path):
    manifest, _ = _export(tmp_path / "a", value_ranges={"ids": (0, 9)})
    assert manifest["inputs"][0]["value_range"] == {"min": 0, "max": 9}
    manifest, _ = _export(tmp_path / "b", value_ranges={"ids": None})
    assert "value_range" not in manifest["inputs"][0]


def test_grid_inputs_stay_inside_a_declared_range(tmp_path):
    # A range above the table would make torch's embedding raise on the grid's inputs; one
    # inside it keeps every grid point valid, and the export passes.
    manifest, _ = _export(tmp_path, value_ranges={"ids": (2, 4)})
    assert manifest["parity"] and all(r["passed"] for r in manifest["parity"])


def test_an_integer_input_that_indexes_nothing_has_no_range(tmp_path):
    feed = {"x": torch.randn(2, 5), "offset": torch.tensor([[1], [2]])}
    dynamic = {"x": {0: ("batch", 1, 4), 1: ("seq", 1, 16)}, "offset": {0: ("batch", 1, 4)}}
    manifest, bundle = _export(tmp_path, Offsets(), feed, dynamic=dynamic)
    assert all("value_range" not in t for t in manifest["inputs"])
    with Runner(bundle, provider="cpu") as runner:
        x = np.zeros((1, 3), np.float32)
        out = runner.run({"x": x, "offset": np.array([[-7]], np.int64)})
        assert out[next(iter(out))].tolist() == [[-7.0, -7.0, -7.0]]


@pytest.mark.parametrize(
    "declared, match",
    [
        ({"tokens": (0, 3)}, r"value_ranges names 'tokens', which is not an input \(ids\)"),
        ({"ids": (5, 2)}, r"value_ranges\['ids'\]: max \(2\) is below min \(5\)"),
        ({"ids": 7}, r"value_ranges\['ids'\] is 7; expected \(min, max\) or None"),
    ],
    ids=["unknown-input", "reversed", "not-a-pair"],
)
def test_bad_declarations_are_export_errors(tmp_path, declared, match):
    with pytest.raises(ExportError, match=r"stage 1/5 \(capture\): " + match):
        _export(tmp_path, value_ranges=declared)


def test_a_float_input_takes_no_range(tmp_path):
    feed = {"x": torch.randn(2, 5), "offset": torch.tensor([[1], [2]])}
    with pytest.raises(ExportError, match=r"value_ranges\['x'\]: only integer inputs take a "
                       r"value range, not torch.float32"):
        _export(tmp_path, Offsets(), feed, value_ranges={"x": (0, 1)})


@pytest.mark.parametrize("bad", [-1, 97, 102], ids=["negative", "vocab", "vocab+5"])
def test_the_zoo_lm_refuses_ids_outside_its_vocabulary(zoo_bundles, bad):
    vocab = zoo.get("decoder_lm").config["vocab_size"]
    assert vocab == 97
    bundle = zoo_bundles["decoder_lm"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["inputs"][0]["value_range"] == {"min": 0, "max": vocab - 1}
    past = np.zeros((2, 1, 2, 0, 8), np.float32)
    feed = {"input_ids": np.array([[3, bad]], np.int64), "past_keys": past, "past_values": past}
    message = (f"Input 'input_ids': value {bad} at index [0, 1] is outside its range "
               f"0 <= value <= {vocab - 1}")
    with Runner(bundle, provider="cpu") as runner:
        with pytest.raises(InputError, match=re.escape(message)):
            runner.run(feed)
