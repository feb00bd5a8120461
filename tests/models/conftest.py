"""Puts the repository root on sys.path when `models` is not installed (pytest runs with
--import-mode=importlib, which does not add the rootdir), and seeds torch for every test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:
    import models  # noqa: F401
except ImportError:  # a plain checkout: no `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
