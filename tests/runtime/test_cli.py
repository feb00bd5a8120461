"""The runtime CLI, called through main(argv) directly, plus a torch-free subprocess run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime import ParityError
from runtime._cli import main

REPO = Path(runtime.__file__).resolve().parents[1]


def _inputs(folder: Path, bundle: Path, case: int = 0, **override) -> list[str]:
    with np.load(bundle / "golden.npz") as z:
        arrays = {"x": z[f"case{case}.in.x"], "m": z[f"case{case}.in.m"]}
    arrays.update(override)
    args = []
    for name, arr in arrays.items():
        np.save(folder / f"{name}.npy", arr, allow_pickle=True)
        args += ["--input", f"{name}={folder / f'{name}.npy'}"]
    return args


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # exactly one clean line, no traceback
    return err.strip()


def test_inspect(tiny_bundle, capsys):
    assert main(["inspect", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    assert "x            float32  [batch, seq, 8]  batch in 1..4, seq in 1..16" in out
    assert "ops: Add 1, MatMul 1, Softmax 1, Unsqueeze 1" in out
    assert "parity on CPUExecutionProvider: 1/1 passed" in out
    assert main(["inspect", str(tiny_bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["opset"] == 18 and info["dims"] == {"batch": [1, 4], "seq": [1, 16]}
    assert info["variants"][0]["parameters"] == 8 * 8 + 1
    assert info["variants"][0]["ops"] == {"Add": 1, "MatMul": 1, "Softmax": 1, "Unsqueeze": 1}


def test_verify_passes(tiny_bundle, tiny_bundle_ext, tmp_path, capsys):
    junit = tmp_path / "verify.xml"
    assert (
        main(
            [
                "verify",
                str(tiny_bundle),
                str(tiny_bundle_ext),
                "--provider",
                "cpu",
                "--junit",
                str(junit),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "PASSED"
    assert out.count("base     CPUExecutionProvider") == 4
    root = ET.parse(junit).getroot()
    assert [s.get("tests") for s in root.findall("testsuite")] == ["4", "4"]


def test_verify_json_keeps_stdout_pure(tiny_bundle, capsys):
    assert main(["verify", str(tiny_bundle), "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["passed"] is True and len(doc["bundles"][0]["records"]) == 4
    assert captured.err.splitlines()[-1] == "PASSED"


def test_verify_fails_on_a_parity_miss(kit, tiny_bundle, tmp_path, capsys):
    with np.load(tiny_bundle / "golden.npz") as z:
        arrays = dict(z)
    arrays["case1.out.y"] = arrays["case1.out.y"] + np.float32(1e-3)
    np.savez(tiny_bundle / "golden.npz", **arrays)
    kit.resign(tiny_bundle)
    junit = tmp_path / "verify.xml"
    assert main(["verify", str(tiny_bundle), "--junit", str(junit)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "FAILED"
    assert lines[-2].startswith(
        "tiny: alt on CPUExecutionProvider at batch=1, seq=3: y: max_abs 0.001"
    )
    assert "passes with atol >= 0.001" in lines[-2]
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "2" and len(suite.findall("testcase/failure")) == 2


def test_verify_tampered_bundle_is_one_error_line(tiny_bundle, capsys):
    (tiny_bundle / "model.onnx").write_bytes(b"\0" + (tiny_bundle / "model.onnx").read_bytes())
    assert main(["verify", str(tiny_bundle)]) == 2
    assert _error_line(capsys).startswith(f"attnx: error: {tiny_bundle}/model.onnx: size is ")


def test_verify_without_a_variant_for_the_provider(kit, tiny_bundle, capsys, monkeypatch):
    monkeypatch.setattr(
        "runtime._session.available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    d = kit.read_manifest(tiny_bundle)
    d["variants"][0]["providers"] = ["CPUExecutionProvider"]
    kit.write_manifest(tiny_bundle, d)
    assert main(["verify", str(tiny_bundle), "--provider", "cuda"]) == 2
    assert _error_line(capsys) == (
        f"attnx: error: {tiny_bundle}: no variant of 'tiny' is meant for CUDAExecutionProvider"
    )


def test_run_prints_and_saves(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out.npz"
    assert (
        main(
            [
                "run",
                str(tiny_bundle),
                *_inputs(tmp_path, tiny_bundle),
                "--out",
                str(out),
                "--provider",
                "cpu",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "tiny: variant base on CPUExecutionProvider",
        "y: float32 [2, 5, 8]",
        f"wrote {out}",
    ]
    with np.load(out) as got, np.load(tiny_bundle / "golden.npz") as golden:
        np.testing.assert_allclose(got["y"], golden["case0.out.y"], atol=1e-5, rtol=1e-4)


def test_run_flags_nonfinite_outputs(tiny_bundle, tmp_path, capsys):
    x = np.zeros((1, 3, 8), np.float32)
    x[0, 0, 0] = np.nan
    assert main(["run", str(tiny_bundle), *_inputs(tmp_path, tiny_bundle, case=1, x=x)]) == 0
    assert "y: float32 [1, 3, 8]  (8 non-finite values)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override,match",
    [
        (
            {"x": np.zeros((2, 5, 8))},
            r"attnx: error: Input 'x': expected dtype float32, got float64",
        ),
        (
            {"x": np.zeros((2, 0, 8), np.float32)},
            r"Input 'x': axis 1 \('seq'\) expected 1..16, got 0",
        ),
        (
            {"x": np.array([object()], dtype=object)},
            r"--input x: cannot read .*x.npy: Object arrays "
            r"cannot be loaded",
        ),
    ],
    ids=["dtype", "T0", "pickled_npy"],
)
def test_run_bad_inputs(tiny_bundle, tmp_path, capsys, override, match):
    args = _inputs(tmp_path, tiny_bundle, **override)
    assert main(["run", str(tiny_bundle), *args]) == 2
    assert re.search(match, _error_line(capsys))


@pytest.mark.parametrize(
    "args,match",
    [
        (["--input", "x"], r"attnx: error: --input expects NAME=FILE.npy, got 'x'"),
        (["--input", "x=/no/such.npy"], r"attnx: error: --input x: cannot read /no/such.npy"),
        (["--provider", "cuda"], r"attnx: error: provider 'cuda' requested but onnxruntime offers"),
        (["--variant", "fast"], r"attnx: error: unknown variant 'fast'; known variants: base, alt"),
    ],
    ids=["no_equals", "missing_file", "cuda", "variant"],
)
def test_run_usage_errors(kit, tiny_bundle, capsys, args, match):
    if args[-1] == "cuda" and kit.has_cuda():
        pytest.skip("this onnxruntime has CUDA")
    assert main(["run", str(tiny_bundle), *args]) == 2
    assert re.match(match, _error_line(capsys))


def test_run_refuses_npz_input(tiny_bundle, tmp_path, capsys):
    np.savez(tmp_path / "x.npz", x=np.zeros(1))
    assert main(["run", str(tiny_bundle), "--input", f"x={tmp_path / 'x.npz'}"]) == 2
    assert "is an .npz archive; give one .npy per input" in _error_line(capsys)


def test_bench(tiny_bundle, capsys):
    assert main(["bench", str(tiny_bundle), "--iters", "5", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "tiny: variant base on CPUExecutionProvider at batch=2, seq=5" in out
    assert "latency p50" in out and "runner overhead" in out and "session creation" in out
    assert (
        main(
            [
                "bench",
                str(tiny_bundle),
                "--iters",
                "5",
                "--shape",
                "seq=1",
                "--json",
                "--variant",
                "alt",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    (result,) = json.loads(capsys.readouterr().out)
    assert result["point"] == {"batch": 2, "seq": 1} and result["variant"] == "alt"
    assert result["nodes_by_provider"] == {"CPUExecutionProvider": 4}
    assert {
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "throughput_per_s",
        "session_creation_ms",
        "overhead_us",
    } <= result.keys()


@pytest.mark.parametrize(
    "args,code,match",
    [
        (
            ["--shape", "heads=2"],
            2,
            r"attnx: error: --shape heads=2: unknown dim 'heads'; dims: "
            r"batch, seq",
        ),
        (["--shape", "seq=17"], 2, r"attnx: error: Input 'x': axis 1 \('seq'\) expected 1..16"),
        (["--iters", "0"], 2, r"attnx: error: --iters must be >= 1 and --warmup >= 0, got 0"),
    ],
    ids=["unknown_dim", "beyond_max", "zero_iters"],
)
def test_bench_errors(tiny_bundle, capsys, args, code, match):
    assert main(["bench", str(tiny_bundle), *args]) == code
    assert re.match(match, _error_line(capsys))


def test_argparse_errors_return_codes(capsys):
    assert main([]) == 2
    assert main(["bench", "b", "--shape", "seq"]) == 2
    assert "expected dim=N, got 'seq'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "run" in capsys.readouterr().out


def test_extra_commands_share_the_parser_and_error_policy(capsys):
    def extra(subparsers):
        for name, error in (
            ("ok", None),
            ("miss", ParityError("parity failed: y", [])),
            ("bug", KeyError("internal")),
        ):
            p = subparsers.add_parser(name)
            p.set_defaults(func=_raiser(error))

    assert main(["ok"], extra=extra) == 0
    assert main(["miss"], extra=extra) == 1
    assert capsys.readouterr().out.splitlines() == ["parity failed: y", "FAILED"]
    with pytest.raises(KeyError, match="internal"):  # a bug keeps its traceback
        main(["bug"], extra=extra)


def _raiser(error):
    def command(args):
        if error is not None:
            raise error
        return 0

    return command


# ---------------------------------------------------------------------------------------------
# Torch-free


def _blocked_env(tmp_path: Path) -> dict[str, str]:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    for name in ("torch", "onnxscript"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is blocked here')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), str(REPO)])
    return env


def _python(args: list[str], env, cwd: Path, timeout: int = 60) -> subprocess.CompletedProcess:
    """`python ARGS` in a subprocess with env, text output captured."""
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_cli_works_where_torch_cannot_be_imported(tiny_bundle_ext, tmp_path):
    env = _blocked_env(tmp_path)
    sanity = _python(["-c", "import torch"], env, tmp_path)
    assert "torch is blocked here" in sanity.stderr  # the blocker works

    verify = _python(["-m", "runtime", "verify", str(tiny_bundle_ext)], env, tmp_path, 120)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.splitlines()[-1] == "PASSED"

    out = tmp_path / "out.npz"
    inputs = _inputs(tmp_path, tiny_bundle_ext)
    args = ["-m", "runtime", "run", str(tiny_bundle_ext), *inputs, "--out", str(out)]
    run = _python(args, env, tmp_path, 120)
    assert run.returncode == 0, run.stderr
    assert "y: float32 [2, 5, 8]" in run.stdout and out.exists()


def test_importing_runtime_imports_no_torch(tmp_path):
    code = (
        "import sys, runtime, runtime._cli, runtime._bench, runtime._inspect, "
        "runtime._runner\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxscript'))\n"
        "print(bad)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = _python(["-c", code], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_reading_and_inspecting_needs_no_onnxruntime(tiny_bundle_ext, tmp_path):
    env = _blocked_env(tmp_path)
    (tmp_path / "blocker" / "onnxruntime.py").write_text("raise ImportError('ort blocked')\n")
    code = (
        f"import runtime; b = runtime.load_bundle({str(tiny_bundle_ext)!r}); "
        f"print(b.manifest.name, len(b.golden))"
    )
    read = _python(["-c", code], env, tmp_path)
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == "tiny 2"
    inspect = _python(["-m", "runtime", "inspect", str(tiny_bundle_ext)], env, tmp_path)
    assert inspect.returncode == 0, inspect.stderr
    assert "ops: Add 1, MatMul 1, Softmax 1, Unsqueeze 1" in inspect.stdout
