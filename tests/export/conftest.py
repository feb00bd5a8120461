import pytest

from export import export_entry
from models import zoo


@pytest.fixture(scope="session")
def zoo_bundles(tmp_path_factory):
    """Every zoo entry exported once for the session: name -> ExportResult."""
    out = tmp_path_factory.mktemp("artifacts")
    return {name: export_entry(name, out=out) for name in zoo.names()}
