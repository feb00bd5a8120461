"""Bounded fuzz: byte mutations of the tiny bundle end in a typed error or a correct run."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import runtime

CASES = 300
SEED = 20260
DRIVER = Path(__file__).with_name("fuzz_driver.py")
REPO = Path(runtime.__file__).resolve().parents[1]
TYPED = {"ArtifactError", "InputError", "ParityError", "ProviderError"}


def test_mutated_bundles_never_crash(_templates, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            str(DRIVER),
            str(_templates["external"]),
            str(tmp_path),
            str(CASES),
            str(SEED),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    last = lines[-1] if lines else None
    # A signal (negative return code) means onnx/onnxruntime/numpy crashed on some case.
    assert proc.returncode == 0, f"driver died after {last}: {proc.stderr[-2000:]}"
    assert lines[-1] == {"done": CASES}
    cases = lines[:-1]
    assert cases[0]["outcome"] == "ok"  # the untouched bundle runs
    unexpected = [c for c in cases if c["outcome"] not in TYPED | {"ok"}]
    assert unexpected == [], json.dumps(unexpected[:3], indent=1)
    outcomes = collections.Counter(c["outcome"] for c in cases)
    # The fuzzer must reach past the hash check, or it tests nothing but sha256.
    deep = [
        c
        for c in cases
        if c["resigned"] and c["outcome"] == "ArtifactError" and "sha256" not in c["message"]
    ]
    assert outcomes["ArtifactError"] > CASES // 2 and len(deep) > CASES // 10, outcomes
