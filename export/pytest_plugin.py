"""pytest plugin (registered through the `pytest11` entry point): the `attnx_parity` fixture.

Users assert parity of their own modules in their CI:

    def test_my_block_exports(attnx_parity):
        result = attnx_parity(MyBlock(), {"x": torch.randn(2, 7, 64)},
                              dynamic={"x": {0: "batch", 1: ("seq", 1, 512)}})
        assert result.passed

The fixture exports the module, runs the default shape grid, and raises ParityError (listing
every failing output with the minimum tolerance that would have passed) or ExportError (naming
the stage) on a failure. Bundles go to the test's tmp_path unless ``out`` is given. torch is
imported only when the fixture runs. A Hugging Face model needs no example inputs, and
``input_maker=`` (point -> feed) makes the grid's inputs for any module.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def attnx_parity(tmp_path):
    """Callable ``(module, example_inputs, **export_module_kwargs) -> ExportResult``."""
    from export._api import export_module

    def check(module, example_inputs=None, **kwargs):
        kwargs.setdefault("out", tmp_path / "attnx")
        return export_module(module, example_inputs, **kwargs)

    return check
