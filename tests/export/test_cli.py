"""The export half of the CLI, called as `main(argv)` and once through the console script."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from export._cli import main
from models import zoo

REPO = Path(__file__).resolve().parents[2]
FACTORIES = "tests.export.factories"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # factories import as tests.export.factories, as a user's would


def _last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_list_names_every_entry(capsys):
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == zoo.names()


def test_export_torch_modules_through_factories(tmp_path, capsys):
    code = main(
        [
            "export",
            f"{FACTORIES}:torch_mha",
            f"{FACTORIES}:torch_encoder_layer",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.strip().splitlines()[-1] == "PASSED"
    assert "[torch_mha] stage 4/5 parity: ok" in out
    manifest = json.loads((tmp_path / "torch_encoder_layer" / "manifest.json").read_text())
    assert manifest["source"]["target"] == f"{FACTORIES}:torch_encoder_layer"
    assert manifest["source"]["class"] == "torch.nn.modules.transformer.TransformerEncoderLayer"
    assert all(r["passed"] for r in manifest["parity"])


def test_check_reruns_parity_and_writes_junit(tmp_path, capsys):
    assert main(["export", "learned_pe", f"{FACTORIES}:torch_mha", "--out", str(tmp_path)]) == 0
    junit = tmp_path / "check.xml"
    bundles = [str(tmp_path / "learned_pe"), str(tmp_path / "torch_mha")]
    assert main(["check", *bundles, "--junit", str(junit)]) == 0
    assert _last_line(capsys) == "PASSED"
    suite = ET.parse(junit).getroot()
    assert int(suite.get("tests")) > 10 and suite.get("failures") == "0"


def test_parity_failure_exits_one_and_does_not_stop_the_others(tmp_path, capsys):
    code = main(["export", f"{FACTORIES}:nan_output", "learned_pe", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.strip().splitlines()[-1] == "FAILED"
    assert "nan_output: parity failed" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learned_pe"]


def test_unknown_entry_is_one_clean_line_and_exit_two(capsys):
    assert main(["export", "no_such_block"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("attnx: error: unknown zoo entry 'no_such_block'; known entries: ")


def test_names_and_all_together_is_a_usage_error(capsys):
    assert main(["export", "learned_pe", "--all"]) == 2
    assert "give zoo entry names or pkg.module:factory targets, or --all" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests.export.factories:bare_module", "returned a module without example inputs"),
        ("tests.export.nowhere:factory", "cannot import 'tests.export.nowhere:factory'"),
        ("tests.export.factories:", "is not of the form pkg.module:factory"),
        ("tests.export.factories:D_MODEL", "'tests.export.factories:D_MODEL' is not callable"),
        ("tests.export.factories:returns_list", "returned list; expected an ExportSpec"),
    ],
    ids=["bare-module", "missing-module", "no-attr", "not-callable", "wrong-return"],
)
def test_bad_factories_exit_two(tmp_path, capsys, target, message):
    assert main(["export", target, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_check_of_a_tampered_bundle_is_an_artifact_error(tmp_path, capsys):
    assert main(["export", "learned_pe", "--out", str(tmp_path)]) == 0
    model = tmp_path / "learned_pe" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0x01
    model.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["check", str(tmp_path / "learned_pe")]) == 2
    assert "model.onnx" in capsys.readouterr().err


def test_console_script_runs_the_same_main(tmp_path):
    script = Path(sys.executable).with_name("attnx")
    if not script.exists():
        pytest.skip("attnx console script not installed (pip install -e .)")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [str(script), "export", "sinusoidal_pe", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "PASSED"
    assert (tmp_path / "sinusoidal_pe" / "manifest.json").exists()


def test_bench_vs_torch_times_both_on_the_same_inputs(tmp_path, capsys):
    assert main(["export", "causal_self", "--out", str(tmp_path), "--variants", "fused"]) == 0
    capsys.readouterr()
    bundle = str(tmp_path / "causal_self")
    # Named: which variant is fastest depends on the CPU, and the test must hold on any.
    args = ["--shape", "seq=33", "--iters", "5", "--warmup", "1", "--variant", "fused"]
    code = main(["bench", bundle, "--vs-torch", *args])
    out = capsys.readouterr().out
    assert code == 0
    last = out.strip().splitlines()[-1]
    assert last.startswith("causal_self vs torch at batch=2, seq=33")
    assert "torch eager on cpu p50" in last and "fused on cpu p50" in last and "ratio" in last


def test_vs_torch_runs_torch_where_onnxruntime_runs(monkeypatch):
    import torch

    from export._cli import _torch_device

    assert _torch_device(onnx_on_cuda=False) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _torch_device(onnx_on_cuda=True) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # a CPU-only torch against onnxruntime on CUDA is still timed, on the CPU
    assert _torch_device(onnx_on_cuda=True) == "cpu"


def test_parallel_export_keeps_the_order_and_the_bundles(tmp_path, capsys):
    targets = ["learned_pe", "sdpa", f"{FACTORIES}:torch_mha"]
    outputs = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        assert main(["export", *targets, "--out", str(out), "--jobs", jobs]) == 0
        printed = capsys.readouterr().out.splitlines()
        stages = [line.split("]")[0].lstrip("[") for line in printed if line.startswith("[")]
        assert stages == sorted(stages, key=["learned_pe", "sdpa", "torch_mha"].index)
        rows = [line.split()[0] for line in printed if line.endswith("PASSED")][:-1]
        assert rows == ["learned_pe", "sdpa", "torch_mha"]
        outputs[jobs] = {
            p.name: [v["name"] for v in json.loads((p / "manifest.json").read_text())["variants"]]
            for p in out.iterdir()
        }
    assert outputs["1"] == outputs["2"]


def test_jobs_must_be_positive(capsys):
    assert main(["export", "sdpa", "--jobs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "attnx: error: --jobs must be >= 1, got 0"
