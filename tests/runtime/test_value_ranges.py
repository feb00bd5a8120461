"""Integer inputs with a value range: the manifest declares it, the one validator enforces it
(ONNX Gather wraps a negative id where torch's embedding raises), old bundles still load."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from runtime import InputError, Manifest, Runner, ValueRange
from runtime._cli import main
from runtime._errors import ArtifactError


@pytest.fixture
def ids_bundle(kit, tmp_path):
    return kit.make_ids_bundle(tmp_path / "ids")


def _message(value, index, vocab) -> str:
    return (
        f"Input 'ids': value {value} at index {index} is outside its range "
        f"0 <= value <= {vocab - 1}"
    )


@pytest.mark.parametrize("bad", [-1, "vocab", "vocab+5"], ids=["negative", "vocab", "beyond"])
def test_the_runner_refuses_ids_outside_the_vocabulary(kit, ids_bundle, bad):
    value = {"vocab": kit.VOCAB, "vocab+5": kit.VOCAB + 5}.get(bad, bad)
    ids = np.array([[0, 2, 4], [1, value, 3]], np.int64)
    with Runner(ids_bundle, provider="cpu") as runner:
        with pytest.raises(InputError, match=re.escape(_message(value, [1, 1], kit.VOCAB))):
            runner.run({"ids": ids})


def test_ids_inside_the_range_run_and_match_the_table(kit, ids_bundle):
    ids = np.array([[0, kit.VOCAB - 1]], np.int64)
    with Runner(ids_bundle, provider="cpu") as runner:
        y = runner.run({"ids": ids})["y"]
    with np.load(ids_bundle / "golden.npz") as golden:
        table_rows = golden["case0.out.y"][0]  # rows 0, 3, VOCAB - 1
    np.testing.assert_array_equal(y[0, 0], table_rows[0])
    np.testing.assert_array_equal(y[0, 1], table_rows[2])


def test_every_value_outside_is_counted(kit, ids_bundle):
    ids = np.array([[-3, 1, -2, kit.VOCAB]], np.int64)
    with Runner(ids_bundle, provider="cpu") as runner:
        with pytest.raises(InputError, match=r"value -3 at index \[0, 0\].*\(3 values outside\)"):
            runner.run({"ids": ids})


def test_attnx_run_refuses_a_negative_id_in_one_line(kit, ids_bundle, tmp_path, capsys):
    path = tmp_path / "ids.npy"
    np.save(path, np.array([[1, -1]], np.int64))
    code = main(["run", str(ids_bundle), "--input", f"ids={path}", "--provider", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"attnx: error: {_message(-1, [0, 1], kit.VOCAB)}"]


def test_the_manifest_round_trips_a_value_range(ids_bundle):
    manifest = Manifest.loads((ids_bundle / "manifest.json").read_text())
    assert manifest.inputs[0].value_range == ValueRange(0, 10)
    assert Manifest.loads(manifest.to_json()) == manifest


def _edit(ids_bundle, edit) -> str:
    d = json.loads((ids_bundle / "manifest.json").read_text())
    edit(d)
    return json.dumps(d)


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda d: d["inputs"][0]["value_range"].update(min=5, max=2),
            r"inputs\[0\]\.value_range: max \(2\) is below min \(5\)",
        ),
        (
            lambda d: d["inputs"][0]["value_range"].update(max=1.5),
            r"inputs\[0\]\.value_range\.max: expected an integer, got 1\.5",
        ),
        (
            lambda d: d["inputs"][0].update(dtype="float32"),
            r"inputs\[0\]\.value_range: only integer inputs take a value range, not float32",
        ),
        (
            lambda d: d["outputs"][0].update(value_range={"min": 0, "max": 1}),
            r"outputs\[0\]: unknown key\(s\) 'value_range'",
        ),
    ],
    ids=["reversed", "not-an-integer", "float-input", "on-an-output"],
)
def test_malformed_value_ranges_are_refused(ids_bundle, edit, match):
    with pytest.raises(ArtifactError, match=match):
        Manifest.loads(_edit(ids_bundle, edit))


def test_a_version_1_bundle_without_ranges_still_loads_and_runs(ids_bundle):
    def as_version_1(d):
        d["format_version"] = 1
        del d["inputs"][0]["value_range"]

    (ids_bundle / "manifest.json").write_text(_edit(ids_bundle, as_version_1))
    with Runner(ids_bundle, provider="cpu") as runner:
        assert runner.manifest.format_version == 1
        assert runner.manifest.inputs[0].value_range is None
        assert runner.manifest.machine is None
        runner.run({"ids": np.array([[1, 2]], np.int64)})
