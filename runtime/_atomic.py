"""Atomic folder writes, shared by the bundle writer (export/) and the Triton repository writer."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final`` (same parent). An existing ``final`` is
    moved aside first and removed after, so a reader sees the old folder or the new one, never
    a mix. The caller checks that ``final`` is a folder (or absent) first."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.rmdir(old)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
