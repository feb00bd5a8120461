"""Every test sees an empty per-user tune cache of its own (runtime/_tune.py): a ranking
that `attnx tune` stored on the developer's machine must not choose a test's variant."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _own_tune_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATTNX_CACHE_DIR", str(tmp_path_factory.mktemp("attnx-cache")))
