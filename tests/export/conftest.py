import json

import pytest

from export._cli import main
from models import zoo


@pytest.fixture(scope="session")
def zoo_export(tmp_path_factory):
    """`attnx export --all` run once for the session, exactly as the README's main job does.

    Returns (exit code, {name: bundle folder}, parity records as JSON dicts)."""
    out = tmp_path_factory.mktemp("artifacts")
    records = out.parent / "records.json"
    code = main(["export", "--all", "--out", str(out), "--json", str(records)])
    bundles = {name: out / name for name in zoo.names()}
    return code, bundles, json.loads(records.read_text())


@pytest.fixture(scope="session")
def zoo_bundles(zoo_export):
    return zoo_export[1]
