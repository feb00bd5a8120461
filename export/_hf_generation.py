"""Hugging Face causal LMs exported for generation: one graph with its KV cache.

``text-generation-with-past`` (Optimum's name) exports a causal LM as one graph that serves the
prefill (past length 0) and every decode step:

    inputs   input_ids [batch, seq], attention_mask [batch, total] (total = past + seq; 1 = token,
             0 = padding), position_ids [batch, seq] (where the model takes them),
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
    outputs  logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past + seq,
             head_dim]

The manifest's typed cache names every one of them, so the runtime's Generator guesses nothing.
Inputs follow generation: a batch of prompts is left-padded, position ids count the kept tokens
before each one (transformers' generate), and the past holds ``past`` positions. Grid points keep
past + seq within the model's positions. The decode-loop parity stage (export/_decode.py)
extends the mask and the positions step by step as generate does.

The capture is transformers' exporter, fed a DynamicCache built from the past tensors; its
graph inputs and outputs are then renamed to the names above.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from runtime import Cache, CacheTensor

from ._errors import ExportError
from ._spec import ExportSpec, InputDecl

WITH_PAST = "text-generation-with-past"
MASK, POSITIONS, TOKENS, LOGITS = "attention_mask", "position_ids", "input_ids", "logits"
TOTAL = "total"  # the mask's length: past + seq
# The most positions a cache holds by default: a default grid point at the maximum keeps a
# cache of this length per layer (dims={"past": ...} raises it).
MAX_POSITIONS = 4096
EXAMPLE = {"batch": 2, "seq": 5, "past": 7}
LAYOUT = "[batch, kv_heads, past, head_dim] per layer"


def past_name(layer: int, holds: str) -> str:
    return f"past_key_values.{layer}.{holds}"


def present_name(layer: int, holds: str) -> str:
    return f"present.{layer}.{holds}"


def _cache_names(layers: int, name) -> list[str]:
    return [name(i, h) for i in range(layers) for h in ("key", "value")]


class CachedLM(nn.Module):
    """A causal LM called with flat past tensors; returns (logits, present.0.key,
    present.0.value, ...)."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, **inputs):
        from transformers import DynamicCache

        pasts = [inputs.pop(n) for n in _cache_names(self.layers, past_name)]
        cache = DynamicCache(ddp_cache_data=list(zip(pasts[::2], pasts[1::2], strict=True)))
        out = self.model(**inputs, cache=cache, use_cache=True, return_dict=True)
        presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def spec_for_generation(model: nn.Module, *, dims=None, name=None, tolerance=None, source=None):
    """ExportSpec of a causal LM with its KV cache (see the module docstring)."""
    from ._hf import HF_TOLERANCE, default_dims

    model = model.eval()
    config = model.config
    ranges = _ranges(config, {**default_dims(config), **(dims or {})})
    geometry = _geometry(model)
    layers, kv_heads, head_dim = geometry
    takes_positions = "position_ids" in _forward_params(model)
    make = generation_inputs(config, geometry, takes_positions)
    names = [TOKENS, MASK, *([POSITIONS] if takes_positions else [])]
    shapes = {TOKENS: ("batch", "seq"), MASK: ("batch", TOTAL), POSITIONS: ("batch", "seq")}
    inputs = [InputDecl(n, torch.int64, shapes[n]) for n in names]
    inputs += [InputDecl(n, torch.float32, ("batch", kv_heads, "past", head_dim))
               for n in _cache_names(layers, past_name)]
    outputs = (LOGITS, *_cache_names(layers, present_name))
    example = _fit({"batch": EXAMPLE["batch"], "seq": EXAMPLE["seq"], "past": EXAMPLE["past"]},
                   ranges)
    cls = type(model)
    return ExportSpec(
        name=name or config.model_type,
        module=CachedLM(model, layers),
        inputs=tuple(inputs),
        output_names=outputs,
        dims=ranges,
        example={**example, TOTAL: example["past"] + example["seq"]},
        make_inputs=make,
        tolerance=dict(tolerance or HF_TOLERANCE),
        source=dict(source or {"target": None, "class": f"{cls.__module__}.{cls.__qualname__}",
                               "task": WITH_PAST}),
        value_ranges=_value_ranges(config, ranges, takes_positions),
        cache=_cache(layers, ranges, takes_positions),
        capture_with=capture_with_cache,
        undefined=undefined_with_cache,
        fit_point=lambda point: _fit(point, ranges),
    )


def _ranges(config, base: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """batch and seq as without a cache; past 0..positions and total 1..positions, where
    positions are the model's (capped at MAX_POSITIONS) unless ``base`` declares them."""
    from ._hf import _first

    positions = min(int(_first(config, "max_position_embeddings", "n_positions",
                               default=MAX_POSITIONS)), MAX_POSITIONS)
    past = base.get("past", (0, positions))
    total = base.get(TOTAL, (1, past[1] if "past" in base else positions))
    seq = (base["seq"][0], min(base["seq"][1], total[1]))
    return {"batch": base["batch"], "seq": seq, "past": past, TOTAL: total}


def _fit(point: Mapping[str, int], ranges) -> dict[str, int]:
    """``point`` with past cut so that past + seq stays within the model's positions; total
    follows."""
    positions = ranges[TOTAL][1]
    fitted = {d: v for d, v in point.items() if d != TOTAL}
    seq = min(fitted.get("seq", 1), positions)
    fitted["seq"] = seq
    fitted["past"] = max(0, min(fitted.get("past", 0), positions - seq))
    fitted[TOTAL] = fitted["past"] + seq
    return fitted


def _forward_params(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _geometry(model) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the model's cache, read from one forward."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.int64), use_cache=True,
                    return_dict=True)
    cache = getattr(out, "cache", None)
    if cache is None or not getattr(cache, "layers", None):
        raise ExportError(f"{type(model).__name__} returned no KV cache with use_cache=True; "
                          f"{WITH_PAST} needs a causal LM with a cache", stage=1)
    _, kv_heads, _, head_dim = cache.layers[0].keys.shape
    return len(cache.layers), int(kv_heads), int(head_dim)


def _value_ranges(config, ranges, takes_positions: bool):
    from ._hf import _first

    vocab = int(_first(config, "vocab_size", default=2))
    declared = {TOKENS: (0, vocab - 1), MASK: (0, 1)}
    if takes_positions:
        declared[POSITIONS] = (0, ranges[TOTAL][1] - 1)
    return declared


def _cache(layers: int, ranges, takes_positions: bool) -> Cache:
    tensors = tuple(
        CacheTensor(past_name(i, h), present_name(i, h), f"{h}s")
        for i in range(layers) for h in ("key", "value")
    )
    return Cache(tensors=tensors, layout=LAYOUT, past_axis=2, batch_axis=0,
                 max_length=ranges[TOTAL][1], token_input=TOKENS, logits_output=LOGITS,
                 mask_input=MASK, position_input=POSITIONS if takes_positions else None)


# --- inputs as generation makes them ------------------------------------------------------------


def generation_inputs(config, geometry, takes_positions: bool):
    """An input maker (point -> feed) for a cached causal LM: row 0 keeps every position, the
    other rows are left-padded by 0..total-1 positions (a batch of prompts of different
    lengths); ids uniform over the vocabulary; position ids as generate makes them; pasts
    standard normal."""
    from ._hf import _first

    vocab = int(_first(config, "vocab_size", default=2))
    layers, kv_heads, head_dim = geometry

    def make(point: Mapping[str, int]) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(sum(point.values()) * 7919 + len(point))
        batch, seq, past = point["batch"], point["seq"], point["past"]
        mask = left_padding(batch, past + seq, gen)
        feed = {TOKENS: torch.randint(0, vocab, (batch, seq), generator=gen), MASK: mask}
        if takes_positions:
            feed[POSITIONS] = generation_positions(mask)[:, past:]
        for n in _cache_names(layers, past_name):
            feed[n] = torch.randn(batch, kv_heads, past, head_dim, generator=gen)
        return feed

    return make


def left_padding(batch: int, total: int, gen: torch.Generator) -> torch.Tensor:
    """int64 [batch, total]: row 0 full, every other row starts with 0..total-1 padding."""
    mask = torch.ones(batch, total, dtype=torch.int64)
    for row in range(1, batch):
        mask[row, : int(torch.randint(0, total, (1,), generator=gen))] = 0
    return mask


def generation_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from an attention mask as transformers' generate makes them: the count of
    kept tokens before each position, 0 at padding."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def undefined_with_cache(feed, outputs):
    """Per output, the positions a causal LM defines no answer for: those whose keys up to and
    including their own are all padding (left padding). logits: the new positions; presents:
    every position of past + seq, since a step copies its past's undefined positions."""
    mask = feed.get(MASK)
    if mask is None:
        return {}
    no_key = (mask.cumsum(-1) == 0).numpy()  # [b, total]
    if not no_key.any():
        return {}
    seq = feed[TOKENS].shape[1]
    masks = {}
    for name, value in outputs.items():
        if name == LOGITS:
            masks[name] = no_key[:, -seq:, None]  # [b, s, 1]
        elif value.ndim == 4 and value.shape[2] == no_key.shape[1]:
            masks[name] = no_key[:, None, :, None]  # [b, 1, total, 1]
    return masks


# --- capture -------------------------------------------------------------------------------------


def capture_with_cache(spec, opset: int, custom_translation_table, dynamic_shapes):
    """transformers' exporter on the model with a DynamicCache of the example pasts; the graph's
    inputs and outputs renamed to the spec's names."""
    import onnx_ir as ir
    from onnxscript import optimizer
    from transformers import DynamicCache
    from transformers.exporters import OnnxConfig, OnnxExporter, exporter_onnx

    from ._hf import _added, named_dims

    module = spec.module
    model, layers = module.model, module.layers
    feed = spec.example_feed()
    pasts = [feed.pop(n) for n in _cache_names(layers, past_name)]
    cache = DynamicCache(ddp_cache_data=list(zip(pasts[::2], pasts[1::2], strict=True)))
    # Named Dims make torch.export refuse the cache's guards (past >= 2, seq != total, ...):
    # Dim.DYNAMIC lets them through, and the parity grid then proves past 0 and seq 1.
    shapes = {n: _dynamic(dynamic_shapes[n]) for n in feed}
    shapes["cache"] = [_dynamic(dynamic_shapes[n]) for n in _cache_names(layers, past_name)]
    # The exporter's own optimize pass drops the producer of a Slice's start in Llama's rotary
    # code under these dynamic shapes (onnxruntime: "Node input 'val_96' is not a graph input");
    # onnxscript's optimizer run afterwards, on the graph read back from its proto, does not.
    config = OnnxConfig(dynamic_shapes=shapes, opset_version=opset, optimize=False)
    sample = {**feed, "cache": cache, "use_cache": True, "return_dict": True}
    table = dict(custom_translation_table or {})
    with _added(exporter_onnx._ONNX_TRANSLATION_TABLE, table):
        program, _ = OnnxExporter().export_program(model, sample, config)
    program = ir.from_proto(ir.to_proto(program))
    optimizer.optimize(program)
    _rename(program.graph, spec)
    return named_dims(ir.to_proto(program), spec)


def _dynamic(axes: Mapping[int, object]) -> dict[int, object]:
    return dict.fromkeys(axes, torch.export.Dim.DYNAMIC)


_LEAF = re.compile(r"^(?:input\.|output\.)?cache\.layers\.(\d+)\.(keys|values)$")


def _rename(graph, spec) -> None:
    """The exporter's cache leaf names (``[input.]cache.layers.{i}.keys``) to the spec's."""
    for values, name in ((graph.inputs, past_name), (graph.outputs, present_name)):
        for value in values:
            match = _LEAF.match(value.name)
            if match:
                value.name = name(int(match[1]), match[2][:-1])
    got = [v.name for v in graph.outputs]
    if got != list(spec.output_names):
        raise ExportError(f"transformers' exporter gave outputs {got}, expected "
                          f"{list(spec.output_names)}", stage=1)
