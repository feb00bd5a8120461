"""Dependency floors: onnx >= 1.21, onnxruntime >= 1.24, checked at import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime._versions import check_floor, check_versions, installed_onnxruntime, parse_version

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1.23.2", (1, 23, 2)),
        ("1.24.0.dev20250101", (1, 24, 0)),
        ("1.32.0+cu12", (1, 32, 0)),
        ("2", (2,)),
    ],
)
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_unreadable_version():
    with pytest.raises(ImportError, match=r"attnx cannot read the version string 'dev'"):
        parse_version("dev")


def test_floors_pass_on_this_install():
    check_versions("1.21.0", ("onnxruntime", "1.24.0"))
    check_versions("1.23.2", None)  # onnxruntime is optional: reading a manifest needs onnx only
    assert installed_onnxruntime()[0] in ("onnxruntime", "onnxruntime-gpu")


@pytest.mark.parametrize(
    "onnx_version,ort,match",
    [
        ("1.20.1", None, r"attnx needs onnx >= 1.21 \(installed: 1.20.1\)"),
        (
            "1.23.2",
            ("onnxruntime", "1.23.2"),
            r"attnx needs onnxruntime >= 1.24 \(installed: 1.23.2\)",
        ),
        ("1.23.2", ("onnxruntime-gpu", "1.19.0"), r"attnx needs onnxruntime-gpu >= 1.24"),
    ],
    ids=["old_onnx", "old_ort", "old_ort_gpu"],
)
def test_old_versions_are_refused(onnx_version, ort, match):
    with pytest.raises(ImportError, match=match):
        check_versions(onnx_version, ort)


def test_check_floor_names_the_upgrade():
    with pytest.raises(ImportError, match=r"pip install -U 'onnx>=1.21'"):
        check_floor("onnx", "1.16.0", (1, 21))


def test_import_fails_cleanly_with_an_old_onnx():
    code = "import onnx; onnx.__version__ = '1.20.0'; import runtime"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 1
    assert "ImportError: attnx needs onnx >= 1.21 (installed: 1.20.0)" in proc.stderr
