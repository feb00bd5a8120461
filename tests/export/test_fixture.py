"""The `attnx_parity` pytest fixture, used exactly as a user's CI would use it."""

import pytest
import torch
from torch import nn

from runtime import ParityError


class GatedBlock(nn.Module):
    """A user's own block: a gated projection with a residual."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return x + value * torch.sigmoid(gate)


def test_my_block_exports_with_parity(attnx_parity):
    torch.manual_seed(0)
    result = attnx_parity(
        GatedBlock(),
        {"x": torch.randn(2, 7, 16)},
        dynamic={"x": {0: "batch", 1: ("seq", 1, 64)}},
    )
    assert result.passed
    assert (result.bundle / "manifest.json").exists()
    assert {r.point["seq"] for r in result.records} >= {1, 7, 64}


class Drifts(nn.Module):
    """Exports fine but computes differently in the graph: a real parity miss."""

    def forward(self, x):
        if torch.compiler.is_exporting():
            return x * 1.001
        return x


def test_fixture_raises_parity_error_on_a_miss(attnx_parity):
    with pytest.raises(ParityError, match=r"(?s)parity failed: 6 of 6 records.* y: max_abs"):
        attnx_parity(
            Drifts(), {"x": torch.randn(2, 7)}, dynamic={"x": {1: "seq"}}, output_names=("y",)
        )
