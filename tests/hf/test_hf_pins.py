"""What attnx relies on in transformers' experimental exporter (5.24), pinned: a newer release
that moves any of it fails here, by name, before an export fails somewhere deep."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'attnx[hf]'")

import inspect

import torch
import transformers
from transformers import AttentionInterface
from transformers.exporters import OnnxConfig, OnnxExporter, exporter_onnx
from transformers.masking_utils import AttentionMaskInterface

from export._hf import ATTENTION, _register, text_inputs


def test_the_version_is_the_pinned_one():
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    assert (major, minor) == (5, 24)


def test_the_exporter_api_attnx_calls():
    params = list(inspect.signature(OnnxExporter.export_program).parameters)
    assert params == ["self", "model", "sample_inputs", "config"]
    fields = OnnxConfig.__dataclass_fields__
    assert {"dynamic_shapes", "opset_version", "optimize"} <= set(fields)
    # attnx adds its kernel op's translations to this table for a routed capture.
    assert isinstance(exporter_onnx._ONNX_TRANSLATION_TABLE, dict)


def test_attnx_attention_is_registered_in_both_registries():
    _register()
    assert ATTENTION in AttentionInterface._global_mapping
    assert ATTENTION in AttentionMaskInterface._global_mapping


def test_pixel_values_are_images():
    config = transformers.ViTConfig(image_size=32, num_channels=3)
    feed = text_inputs(config, ("pixel_values",))({"batch": 2})
    images = feed["pixel_values"]
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert -1 <= images.min() and images.max() <= 1 and images.std() > 0.3
