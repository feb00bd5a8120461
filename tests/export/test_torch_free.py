"""Exported zoo bundles run through the `attnx` console script where torch cannot be imported."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRY = "from export._cli import main; raise SystemExit(main())"  # what the console script runs


@pytest.fixture
def no_torch_env(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    for name in ("torch", "onnxscript"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is blocked here')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}


def _attnx(args, env, cwd):
    return subprocess.run(
        [sys.executable, "-c", ENTRY, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_verify_every_zoo_bundle_without_torch(zoo_bundles, no_torch_env, tmp_path):
    proc = _attnx(["verify", *map(str, zoo_bundles.values())], no_torch_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "PASSED"
    blocked = _attnx(["export", "learned_pe"], no_torch_env, tmp_path)
    assert blocked.returncode != 0 and "torch is blocked here" in blocked.stderr


@pytest.mark.parametrize("name", ["decoder_lm", "mha_cross"])
def test_run_reproduces_golden_without_torch(zoo_bundles, no_torch_env, tmp_path, name):
    bundle = zoo_bundles[name]
    with np.load(bundle / "golden.npz", allow_pickle=False) as golden:
        arrays = {k: golden[k] for k in golden.files}
    args = []
    for key, array in arrays.items():
        if key.startswith("case0.in."):
            path = tmp_path / f"{key}.npy"
            np.save(path, array)
            args += ["--input", f"{key.removeprefix('case0.in.')}={path}"]
    out = tmp_path / "out.npz"
    proc = _attnx(["run", str(bundle), *args, "--out", str(out)], no_torch_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    with np.load(out, allow_pickle=False) as got:
        expected = {
            k.removeprefix("case0.out."): v for k, v in arrays.items() if k.startswith("case0.out.")
        }
        assert sorted(got.files) == sorted(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, atol=1e-4, rtol=1e-3)


@pytest.fixture
def without_torch_env(tmp_path):
    """torch and onnxscript absent as on a runtime-only install: importing them raises
    ModuleNotFoundError, as it does where they were never installed."""
    blocker = tmp_path / "absent"
    blocker.mkdir()
    for name in ("torch", "onnxscript"):
        (blocker / f"{name}.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n"
        )
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}


@pytest.mark.parametrize("args", [["export", "learned_pe"], ["list"], ["check", "."]],
                         ids=["export", "list", "check"])
def test_export_commands_without_torch_print_one_line_and_exit_2(without_torch_env, tmp_path,
                                                                  args):
    proc = _attnx(args, without_torch_env, tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"attnx: error: `attnx {args[0]}` needs torch (No module named 'torch'); install the "
        "export extra: pip install 'attnx[export]'"
    ]
