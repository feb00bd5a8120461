"""Bundles for the decode tests, exported once per session (decoder_lm ~8 s on 2 cores).

`lm_bundle`: the zoo's decoder_lm through the full pipeline (grid + decode-loop parity).
`kv_export`: the zoo's kv_cache (a cached block, not an LM), base graph only, one-point grid.
"""

from __future__ import annotations

import pytest

from export import export_entry, run_pipeline, spec_from_zoo
from models import zoo


@pytest.fixture(scope="session")
def lm_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode_artifacts")
    return export_entry("decoder_lm", out=out).bundle


@pytest.fixture(scope="session")
def kv_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("kv_artifacts")
    entry = zoo.get("kv_cache")
    return run_pipeline(spec_from_zoo(entry), out=out, grid=[dict(entry.example)], variants=())


@pytest.fixture(scope="session")
def lm_module():
    return zoo.get("decoder_lm").build()
