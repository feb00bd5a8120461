"""Hugging Face transformers models as an export source, like a zoo entry or any nn.Module.

A ``PreTrainedModel`` (or a ``save_pretrained`` folder and a task) becomes an ExportSpec:

- the module is the model called with named inputs, its ModelOutput fields returned as named
  outputs (``last_hidden_state``, ``pooler_output``, ``logits``, ...), ``use_cache=False``;
- inputs mean what they say (``text_inputs``): token ids inside the vocabulary, attention masks
  as padding (every row keeps a token; right and left padding in one batch), token type ids in
  range, ``position_ids`` counting the tokens kept, ``pixel_values`` as images;
- dim ranges come from the model: ``seq`` up to ``max_position_embeddings`` (capped at
  MAX_SEQ), ``batch`` up to MAX_BATCH, so a 100M-parameter model's grid takes minutes;
- the capture is transformers' own ONNX exporter (``transformers.exporters.OnnxExporter``,
  experimental in 5.24), which carries the per-architecture patches, FX fixes and translations
  torch.onnx needs for these models; attnx's stages 2-5 run after it as for any module;
- where left padding leaves a causal query no key to attend to, transformers defines no answer
  (torch and onnxruntime differ by O(1) there): ``undefined_positions`` names those positions
  and parity leaves them out, counting them in each record.

Attention reaches onnxruntime's kernels through transformers' AttentionInterface: for the
``fused`` variant's capture the model runs with the ``attnx`` implementation (``_hf_attention``),
whose core is models._kernels.attention, the zoo's kernel op. It is registered in both of
transformers' registries, attention and mask, because a function known to the first only gets
no mask at all (padding silently dropped).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Mapping

import torch
from torch import nn

from runtime import Tolerance

from ._errors import ExportError
from ._ranges import check_declared
from ._spec import ExportSpec, InputDecl

MAX_BATCH = 8
MAX_SEQ = 2048
EXAMPLE = {"batch": 2, "seq": 16}
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
ATTENTION = "attnx"
# float32, as the zoo's "deep" class: many layers and a vocabulary projection.
HF_TOLERANCE = {"float32": Tolerance(atol=1e-4, rtol=1e-3)}


def is_pretrained(module) -> bool:
    """Whether ``module`` is a transformers PreTrainedModel (never imports transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


class TaskModule(nn.Module):
    """A PreTrainedModel called with named inputs; returns its ModelOutput fields ``outputs`` as
    a tuple, in that order."""

    def __init__(self, model: nn.Module, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, **inputs):
        with kernel_attention(self.model):
            out = self.model(**inputs, use_cache=False, return_dict=True)
        return tuple(out[name] for name in self.outputs)


# --- the spec ------------------------------------------------------------------------------------


def spec_from_pretrained(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor] | None = None,
    *,
    dims: Mapping[str, tuple[int, int]] | None = None,
    name: str | None = None,
    tolerance: Mapping[str, Tolerance] | None = None,
    source: Mapping[str, object] | None = None,
    input_maker: Callable[[Mapping[str, int]], dict[str, torch.Tensor]] | None = None,
    value_ranges: Mapping[str, tuple[int, int] | None] | None = None,
):
    """ExportSpec of a PreTrainedModel, whose inputs are named ``TEXT_INPUTS`` (``batch``,
    ``seq``) or ``pixel_values``. ``example_inputs`` picks the inputs (default: the text inputs
    its forward takes, position_ids left to the model); grid inputs come from ``input_maker``
    (point -> feed) or else from ``text_inputs``."""
    model = model.eval()
    config = model.config
    ranges = {**default_dims(config), **(dims or {})}
    make = input_maker or text_inputs(config, _input_names(model, example_inputs))
    feed = dict(example_inputs) if example_inputs is not None else make(_example(ranges))
    _check_inputs(model, feed)
    outputs = _output_names(model, feed)
    cls = type(model)
    return ExportSpec(
        name=name or config.model_type,
        module=TaskModule(model, outputs),
        inputs=tuple(InputDecl(n, t.dtype, _shape(n, t)) for n, t in feed.items()),
        output_names=outputs,
        dims={d: ranges[d] for d in _used_dims(feed)},
        example={d: _example_size(d, feed) for d in _used_dims(feed)},
        make_inputs=make,
        tolerance=dict(tolerance or HF_TOLERANCE),
        source=dict(source or {"target": None, "class": f"{cls.__module__}.{cls.__qualname__}"}),
        example_inputs=feed,
        value_ranges=_value_ranges(config, feed, value_ranges),
        capture_with=capture_pretrained,
        undefined=undefined_positions if _is_causal(model) else None,
    )


def default_dims(config) -> dict[str, tuple[int, int]]:
    """batch 1..MAX_BATCH; seq 1..the model's positions (capped at MAX_SEQ)."""
    positions = _first(config, "max_position_embeddings", "n_positions", default=MAX_SEQ)
    return {"batch": (1, MAX_BATCH), "seq": (1, min(int(positions), MAX_SEQ))}


def _example(ranges) -> dict[str, int]:
    return {d: min(max(size, ranges[d][0]), ranges[d][1]) for d, size in EXAMPLE.items()}


def _first(config, *names: str, default=None):
    for attr in names:
        value = getattr(config, attr, None)
        if value is not None:
            return value
    return default


def _input_names(model, example_inputs) -> tuple[str, ...]:
    if example_inputs is not None:
        return tuple(example_inputs)
    params = inspect.signature(model.forward).parameters
    if "pixel_values" in params and "input_ids" not in params:
        return ("pixel_values",)
    takes = [n for n in TEXT_INPUTS if n in params and n != "position_ids"]
    vocab = getattr(model.config, "type_vocab_size", 0) or 0
    return tuple(n for n in takes if n != "token_type_ids" or vocab > 1)


def _check_inputs(model, feed) -> None:
    params = inspect.signature(model.forward).parameters
    unknown = [n for n in feed if n not in params]
    if unknown:
        raise ExportError(
            f"{type(model).__name__}.forward takes no input {unknown[0]!r}; it takes "
            f"{', '.join(n for n in params if n != 'kwargs')}",
            stage=1,
        )
    for input_name, value in feed.items():
        if not isinstance(value, torch.Tensor):
            raise ExportError(
                f"example input '{input_name}' is a {type(value).__name__}, not a torch.Tensor",
                stage=1,
            )


def _output_names(model, feed) -> tuple[str, ...]:
    """The ModelOutput fields the model returns for these inputs (None fields are dropped)."""
    with torch.no_grad():
        out = model(**feed, use_cache=False, return_dict=True)
    return tuple(k for k, v in out.items() if isinstance(v, torch.Tensor))


def _shape(input_name: str, tensor: torch.Tensor) -> tuple[int | str, ...]:
    if input_name == "pixel_values":
        return ("batch", *tensor.shape[1:])  # channels and image size are the model's
    return ("batch", "seq", *tensor.shape[2:])


def _used_dims(feed) -> list[str]:
    dims = {d for n, t in feed.items() for d in _shape(n, t) if isinstance(d, str)}
    return [d for d in ("batch", "seq") if d in dims]


def _example_size(dim: str, feed) -> int:
    for input_name, tensor in feed.items():
        shape = _shape(input_name, tensor)
        if dim in shape:
            return int(tensor.shape[shape.index(dim)])
    raise AssertionError(dim)


def _value_ranges(config, feed, declared):
    """The attention mask holds 0 and 1; ids take their range from the embedding tables they
    index (export/_ranges.py) unless declared."""
    ranges: dict[str, tuple[int, int] | None] = {}
    if "attention_mask" in feed:
        ranges["attention_mask"] = (0, 1)
    ranges.update(declared or {})
    return check_declared(ranges, {n: t.dtype for n, t in feed.items()})


def _is_causal(model) -> bool:
    return bool(getattr(model.config, "is_decoder", False)) or any(
        getattr(m, "is_causal", False) is True for m in model.modules()
    )


# --- inputs that mean what they say ------------------------------------------------------------


def text_inputs(config, names: tuple[str, ...]):
    """An input maker (point -> feed) for a text model's named inputs.

    input_ids: uniform over the vocabulary. attention_mask: row 0 keeps every token; the other
    rows pad 0..seq-1 tokens, odd rows on the right, even rows on the left, so every batch of 3
    or more holds both. token_type_ids: segment 0 then 1 (type_vocab_size > 1). position_ids:
    the count of kept tokens before each one, as generate() makes them. pixel_values: images in
    [-1, 1] at the config's image size.
    """
    vocab = int(_first(config, "vocab_size", default=2))
    types = int(getattr(config, "type_vocab_size", 1) or 1)

    def make(point: Mapping[str, int]) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(sum(point.values()) * 7919 + len(point))
        batch, seq = point.get("batch", 1), point.get("seq", 1)
        mask = padding_mask(batch, seq, gen)
        made = {
            "input_ids": lambda: torch.randint(0, vocab, (batch, seq), generator=gen),
            "attention_mask": lambda: mask,
            "token_type_ids": lambda: _segments(batch, seq, types),
            "position_ids": lambda: (mask.cumsum(-1) - 1).clamp(min=0),
            "pixel_values": lambda: _images(config, batch, gen),
        }
        unknown = [n for n in names if n not in made]
        if unknown:
            raise ExportError(
                f"no input maker for input {unknown[0]!r}; pass input_maker=(point -> feed)",
                stage=1,
            )
        return {n: made[n]() for n in names}

    return make


def padding_mask(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """int64 [batch, seq], 1 = token, 0 = padding; see text_inputs."""
    mask = torch.ones(batch, seq, dtype=torch.int64)
    for row in range(1, batch):
        pad = int(torch.randint(0, seq, (1,), generator=gen))
        if row % 2:
            mask[row, seq - pad :] = 0
        else:
            mask[row, :pad] = 0
    return mask


def _segments(batch: int, seq: int, types: int) -> torch.Tensor:
    segments = torch.zeros(batch, seq, dtype=torch.int64)
    if types > 1:
        segments[:, seq // 2 :] = 1
    return segments


def _images(config, batch: int, gen: torch.Generator) -> torch.Tensor:
    size = int(_first(config, "image_size", default=224))
    channels = int(_first(config, "num_channels", default=3))
    return torch.rand(batch, channels, size, size, generator=gen) * 2 - 1


def undefined_positions(feed: Mapping[str, torch.Tensor], outputs: Mapping[str, object]):
    """Per output, a bool mask of the positions a causal model defines no answer for: query rows
    whose keys are all padding (left padding). Outputs whose leading dims are not [batch, seq]
    have none."""
    mask = feed.get("attention_mask")
    if mask is None:
        return {}
    no_key = (mask.cumsum(-1) == 0).numpy()  # [b, s]: nothing kept up to here
    masks = {}
    for name, value in outputs.items():
        if tuple(value.shape[:2]) == no_key.shape and no_key.any():
            masks[name] = no_key.reshape(no_key.shape + (1,) * (value.ndim - 2))
    return masks


# --- capture -------------------------------------------------------------------------------------


def capture_pretrained(
    spec, opset: int, custom_translation_table, dynamic_shapes, *, ort_fusions: str | None = None
):
    """Capture through transformers' exporter (its patches, FX fixes, translations and IR fixes),
    with attnx's translations added for the kernel op when routing. ``ort_fusions`` ("cpu",
    ...) runs transformers' own onnxruntime fusions after it, as benchmarks/hf_bench.py does
    for its peer column; attnx's variants never do."""
    import onnx_ir as ir
    from transformers.exporters import OnnxConfig, OnnxExporter, exporter_onnx

    model = spec.module.model
    config = OnnxConfig(
        dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True, ort_fusions=ort_fusions
    )
    feed = {**spec.example_feed(), "use_cache": False, "return_dict": True}
    table = dict(custom_translation_table or {})
    with _added(exporter_onnx._ONNX_TRANSLATION_TABLE, table), kernel_attention(model):
        program, _ = OnnxExporter().export_program(model, feed, config)
    return named_dims(ir.to_proto(program), spec)


def named_dims(model, spec):
    """``model`` with its symbolic dims named as the spec names them (transformers' exporter
    leaves torch's s0, s1, ...), in inputs, outputs and value infos alike."""
    graph_inputs = {v.name: v for v in model.graph.input}
    names = {}
    for decl in spec.inputs:
        dims = graph_inputs[decl.name].type.tensor_type.shape.dim
        for axis, want in enumerate(decl.shape):
            if isinstance(want, str) and dims[axis].dim_param:
                names[dims[axis].dim_param] = want
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    return model


@contextlib.contextmanager
def _added(table: dict, extra: Mapping):
    """``table`` with ``extra``'s entries until the block exits."""
    saved = {k: table[k] for k in extra if k in table}
    table.update(extra)
    try:
        yield
    finally:
        for k in extra:
            table.pop(k, None)
        table.update(saved)


# --- attention through attnx's kernel op --------------------------------------------------------


@contextlib.contextmanager
def kernel_attention(model):
    """While attention cores are routed to kernels (models._kernels.ort_kernels), the model runs
    transformers' attention through attnx's kernel op; otherwise it runs as configured."""
    from models._kernels import routing

    if not routing() or not kernels_serve(model):
        yield
        return
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    try:
        with kernel_rotary(model):
            yield
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def kernel_rotary(model):
    """Within this block, the modeling modules of ``model`` whose rotary embedding is Llama's
    (the same code for apply_rotary_pos_emb, rotate_half and the RotaryEmbedding module: Llama,
    Mistral, Qwen2, Gemma ...) apply it through attnx's rotary kernel op. Partial rotary
    (GPT-NeoX, Phi-3) and other layouts keep their own code."""
    modules = _llama_rotary_modules(model)
    saved = {m: m.apply_rotary_pos_emb for m in modules}
    for m in modules:
        m.apply_rotary_pos_emb = _rotary_pos_emb
    try:
        yield
    finally:
        for m, fn in saved.items():
            m.apply_rotary_pos_emb = fn


def _code(fn):
    """The bytecode and global names of a function under its decorators (None if none)."""
    while hasattr(fn, "__wrapped__"):  # transformers' decorators (dynamic_rope_update)
        fn = fn.__wrapped__
    code = getattr(fn, "__code__", None)
    return None if code is None else (code.co_code, code.co_names)


def _llama_rotary_modules(model) -> list:
    """The modeling modules of model's classes that rotate as Llama does; none unless every
    rotary embedding module of the model computes Llama's tables, cat((freqs, freqs))."""
    from transformers.models.llama import modeling_llama as llama

    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if not rotaries or any(
        _code(type(m).forward) != _code(llama.LlamaRotaryEmbedding.forward) for m in rotaries
    ):
        return []
    found = {sys.modules[type(m).__module__] for m in model.modules()}
    return [
        m for m in found
        if _code(getattr(m, "apply_rotary_pos_emb", None)) == _code(llama.apply_rotary_pos_emb)
        and _code(getattr(m, "rotate_half", None)) == _code(llama.rotate_half)
    ]


def _rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Llama's apply_rotary_pos_emb through models._encodings.rotary_kernel: q, k [b, h, s, h_d]
    (unsqueeze_dim 1) or [b, s, h, h_d] (2); cos, sin [b|1, s, h_d], whose two halves are
    equal (LlamaRotaryEmbedding's cat((freqs, freqs)))."""
    from models._encodings import rotary_kernel

    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]  # [b|1, s, h_d/2]
    if isinstance(cos.shape[0], int) and cos.shape[0] == 1:  # one table for every row
        cos, sin = cos[0], sin[0]  # [s, h_d/2]
    seq_dim = 3 - unsqueeze_dim
    return rotary_kernel(q, cos, sin, seq_dim), rotary_kernel(k, cos, sin, seq_dim)


def kernels_serve(model) -> bool:
    """The kernel op has the model's attention semantics: causal or bidirectional with padding
    (and T5's position bias), no sliding window, no logit soft-capping."""
    config = model.config
    if _first(config, "sliding_window", "attn_logit_softcapping") is not None:
        return False
    return bool(getattr(model, "_supports_attention_backend", False)) or _takes_interface(model)


def _takes_interface(model) -> bool:
    """Models built on AttentionInterface accept set_attn_implementation."""
    return getattr(model, "_can_set_attn_implementation", lambda: False)()


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _hf_attention)
    AttentionMaskInterface.register(ATTENTION, _padding_mask)
    _REGISTERED = True


def _padding_mask(batch_size, q_length, kv_length, *args, attention_mask=None, **kwargs):
    """The mask function of the attnx implementation: the padding alone, bool [b, 1, 1, kv] with
    True where a key is kept (None without padding); causality is the attention module's own
    ``is_causal``, so the kernel skips the masked half instead of reading an s x s mask."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :kv_length]


def _hf_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    is_causal=None,
    position_bias=None,
    **kwargs,
):
    """transformers' attention signature over models._kernels.attention: q [b, h, s, h_d],
    k/v [b, h_kv, s_kv, h_d] -> ([b, s, h, h_d], None)."""
    from models._kernels import attention

    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    head_dim = query.shape[-1]
    if scaling is not None and abs(scaling * head_dim**0.5 - 1) > 1e-12:
        query = query * (scaling * head_dim**0.5)  # the kernel scales by 1 / sqrt(h_d)
    padded = None if attention_mask is None else ~attention_mask[:, 0, 0, :]  # [b, s_kv]
    out = attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        key_padding_mask=padded,
        score_bias=position_bias,
        causal=causal,
    )
    return out, None
