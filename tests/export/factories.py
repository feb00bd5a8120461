"""Factories for `attnx export tests.export.factories:NAME`: torch's own modules, built the way
a user would hand them to attnx."""

import torch
from torch import nn

D_MODEL, HEADS = 32, 4
DYNAMIC = {"x": {0: ("batch", 1, 8), 1: ("seq", 1, 64)}}


class SelfAttention(nn.Module):
    """nn.MultiheadAttention used as self-attention (query = key = value = x)."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def torch_mha():
    torch.manual_seed(0)
    return SelfAttention(), (torch.randn(2, 7, D_MODEL),), DYNAMIC


def torch_encoder_layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        D_MODEL, HEADS, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True
    )
    return {
        "module": layer,
        "example_inputs": {"src": torch.randn(2, 7, D_MODEL)},
        "dynamic": {"src": {0: ("batch", 1, 8), 1: ("seq", 1, 64)}},
        "name": "torch_encoder_layer",
    }


class Nan(nn.Module):
    """Returns NaN for negative inputs: parity must fail, not pass NaN == NaN."""

    def forward(self, x):
        return torch.log(x)


def nan_output():
    return Nan(), (torch.randn(2, 7),), {"x": {0: "batch", 1: "seq"}}


def bare_module():
    return SelfAttention()


def returns_list():
    return [SelfAttention()]
