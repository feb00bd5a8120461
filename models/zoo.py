"""The zoo: named, exportable configurations of every block, as data.

Each entry knows how to build its module with seeded weights, how to make example inputs at any
shape point (a dict of dim name -> size), which dims are dynamic with their ranges, the names of
its inputs and outputs, and its tolerance class. The exporter, the parity grid, the tests and the
benchmarks all read entries from here; benchmarks scale them up through ``scale``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from models._attention import MultiHeadAttention, ScaledDotProductAttention
from models._encodings import (
    ALiBiBias,
    LearnedPositionalEncoding,
    RotaryEmbedding,
    ShawRelativePosition,
    SinusoidalPositionalEncoding,
    T5RelativeBias,
    TransformerXLRelativeBias,
)
from models._layers import DecoderLayer, DecoderLM, Encoder, EncoderLayer

__all__ = [
    "TOLERANCE_CLASSES",
    "InputSpec",
    "SMALL",
    "Size",
    "UnknownEntryError",
    "KVCache",
    "LAYER_CACHE",
    "LM_CACHE",
    "ZooEntry",
    "entries",
    "get",
    "names",
    "scaled",
]

# float32 tolerances per class. "tight" blocks are one attention deep; "deep" ones chain
# layers and a vocabulary projection, so rounding differences accumulate.
TOLERANCE_CLASSES: dict[str, dict[str, dict[str, float]]] = {
    "tight": {"float32": {"atol": 1e-5, "rtol": 1e-4}},
    "deep": {"float32": {"atol": 1e-4, "rtol": 1e-3}},
}

SEED = 0


class UnknownEntryError(LookupError):
    """A zoo lookup named no registered entry."""


@dataclass(frozen=True)
class InputSpec:
    """One model input: ``shape`` holds dim names (dynamic) or ints (static).

    ``kind`` says how example values are made: "float" (standard normal), "ids" (token ids
    below ``high``), "padding" (bool key-padding mask, True = padded), "mask" (bool attention
    mask, True = attend).
    """

    name: str
    shape: tuple[str | int, ...]
    kind: str = "float"
    high: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return {"float": torch.float32, "ids": torch.int64}.get(self.kind, torch.bool)


@dataclass(frozen=True)
class ZooEntry:
    """A named, exportable block configuration."""

    name: str
    description: str
    factory: Callable[..., nn.Module]
    config: Mapping[str, object]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    dims: Mapping[str, tuple[int, int]]
    example: Mapping[str, int]
    tolerance: str = "tight"
    forward_kwargs: Mapping[str, object] = field(default_factory=dict)
    # For entries with past/present tensors: written to the bundle's manifest as its typed
    # cache, so the runtime needs no guesswork.
    cache: KVCache | None = None

    def build(self, seed: int = SEED, **overrides) -> nn.Module:
        """The module with deterministic weights for ``seed``, in eval mode."""
        config = {**self.config, **overrides}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.factory(**config)
        return module.eval()

    def make_inputs(self, point: Mapping[str, int], seed: int = SEED) -> dict[str, torch.Tensor]:
        """Distinct example tensors for every input at ``point`` (dim name -> size)."""
        missing = sorted(
            {d for s in self.inputs for d in s.shape if isinstance(d, str)} - set(point)
        )
        if missing:
            raise ValueError(f"point {dict(point)} lacks dims {missing} of entry '{self.name}'")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + _point_key(point))
        return {spec.name: _make_input(spec, point, gen) for spec in self.inputs}

    def source(self) -> str:
        return f"models.zoo:{self.name}"


def _point_key(point: Mapping[str, int]) -> int:
    key = 0
    for name in sorted(point):
        key = key * 8191 + int(point[name])
    return key % (2**31)


def _make_input(spec: InputSpec, point: Mapping[str, int], gen: torch.Generator) -> torch.Tensor:
    shape = [point[d] if isinstance(d, str) else d for d in spec.shape]
    if spec.kind == "float":
        return torch.randn(shape, generator=gen)
    if spec.kind == "ids":
        return torch.randint(0, spec.high, shape, generator=gen)
    if spec.kind == "padding":
        return _padding_mask(shape)
    if spec.kind == "mask":
        mask = torch.rand(shape, generator=gen) < 0.7
        if shape[0] > 1 and shape[-2] > 1:
            mask[1, ..., 0, :] = False  # a fully masked row, whose output is defined as zeros
        return mask
    raise ValueError(f"unknown input kind '{spec.kind}' for input '{spec.name}'")


def _padding_mask(shape: list[int]) -> torch.Tensor:
    """[b, s_kv] True = padded: row r pads its last 0, s_kv // 2 or all s_kv keys (r mod 3),
    so batches of 3 or more include a fully padded row."""
    b, s_kv = shape
    mask = torch.zeros(b, s_kv, dtype=torch.bool)
    for r in range(b):
        pad = (0, s_kv // 2, s_kv)[r % 3]
        mask[r, s_kv - pad :] = True
    return mask


# --- factories: plain functions of JSON-able configs ------------------------------------------


def _positional(kind: str | None, *, num_heads: int, head_dim: int, **kw) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "rope":
        return RotaryEmbedding(head_dim=head_dim)
    if kind == "alibi":
        return ALiBiBias(num_heads=num_heads)
    if kind == "t5":
        return T5RelativeBias(num_heads=num_heads, **kw)
    if kind == "shaw":
        return ShawRelativePosition(head_dim=head_dim, **kw)
    if kind == "xl":
        return TransformerXLRelativeBias(num_heads=num_heads, head_dim=head_dim)
    raise ValueError(f"unknown positional encoding '{kind}'")


def _layer(cls, *, pos: str | None = None, pos_args: Mapping | None = None, **config):
    """cls(**config) with the positional encoding named by ``pos`` built for its heads."""
    heads = config["num_heads"]
    config = dict(config)
    config["pos_embeddings"] = _positional(
        pos, num_heads=heads, head_dim=config["embed_dim"] // heads, **(pos_args or {})
    )
    return cls(**config)


def _mha(**config) -> nn.Module:
    return _layer(MultiHeadAttention, **config)


def _encoder_layer(**config) -> nn.Module:
    return _layer(EncoderLayer, **config)


def _decoder_layer(**config) -> nn.Module:
    return _layer(DecoderLayer, **config)


# --- KV-cache descriptions ----------------------------------------------------------------------


@dataclass(frozen=True)
class KVCache:
    """How an entry's past inputs become its present outputs, step after step.

    pairs: (past input, present output) per cache tensor, keys first then values.
    layout: the cache tensors' shape in words, e.g. "[L, batch, kv_heads, past, head_dim]".
    past_axis, batch_axis: the axes of the past length and of the batch in each past input (and
        of past + seq, batch in each present output).
    token_input, logits_output: a language model's token-ids input and logits output (None for
        a block that takes hidden states).

    The exporter writes it to the manifest's typed cache, with the "past" dim's declared max as
    the most positions a cache may hold; keys are cached after RoPE and new tokens sit at
    positions past .. past + seq - 1, as MultiHeadAttention computes them.
    """

    pairs: tuple[tuple[str, str], ...]
    layout: str
    past_axis: int
    batch_axis: int
    token_input: str | None = None
    logits_output: str | None = None


# DecoderLM stacks every layer's cache in one tensor.
LM_CACHE = KVCache(
    pairs=(("past_keys", "present_keys"), ("past_values", "present_values")),
    layout="[L, batch, kv_heads, past, head_dim]",
    past_axis=3,
    batch_axis=1,
    token_input="input_ids",
    logits_output="logits",
)
LAYER_CACHE = KVCache(
    pairs=(("past_key", "present_key"), ("past_value", "present_value")),
    layout="[batch, kv_heads, past, head_dim]",
    past_axis=2,
    batch_axis=0,
)


# --- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """Sizes of the zoo's blocks: small by default (the test suite runs in minutes on 2 cores);
    benchmarks build the same entries at ``Size(d=512, heads=8, ...)`` through ``scaled``."""

    d: int = 32
    heads: int = 4
    max_seq: int = 256
    max_batch: int = 16
    vocab: int = 97
    window: int = 4

    @property
    def head_dim(self) -> int:
        return self.d // self.heads


SMALL = Size()
EXAMPLE = {"batch": 2, "seq": 7, "kv_seq": 5, "past": 3}
CACHE_OUT = ("y", "present_key", "present_value")


def _example(*dims: str) -> dict[str, int]:
    return {d: EXAMPLE[d] for d in dims}


def _registry(size: Size = SMALL) -> list[ZooEntry]:
    D, H, HD, vocab = size.d, size.heads, size.head_dim, size.vocab  # noqa: N806
    BATCH, SEQ = (1, size.max_batch), (1, size.max_seq)  # noqa: N806
    X = InputSpec("x", ("batch", "seq", D))  # noqa: N806
    PAD = InputSpec("key_padding_mask", ("batch", "seq"), "padding")  # noqa: N806
    PAST_K = InputSpec("past_key", ("batch", 2, "past", HD))  # noqa: N806
    PAST_V = InputSpec("past_value", ("batch", 2, "past", HD))  # noqa: N806
    cached_dims = {"batch": BATCH, "seq": SEQ, "past": (0, size.max_seq)}
    # Multi-query attention over 1.5x the heads: a head count that is not a power of two.
    mqa_heads = H + H // 2

    def mha_entry(name, description, config, *, inputs=(X, PAD), dims=None, **kw) -> ZooEntry:
        dims = dims or {"batch": BATCH, "seq": SEQ}
        return ZooEntry(
            name=name,
            description=description,
            factory=_mha,
            config={"embed_dim": D, "num_heads": H, **config},
            inputs=inputs,
            outputs=kw.pop("outputs", ("y",)),
            dims=dims,
            example=_example(*dims),
            **kw,
        )

    return [
        ZooEntry(
            name="sinusoidal_pe",
            description="sinusoidal absolute encoding (Vaswani et al.) added to x",
            factory=SinusoidalPositionalEncoding,
            config={"dim": D},
            inputs=(X,),
            outputs=("y",),
            dims={"batch": BATCH, "seq": (1, max(4096, size.max_seq))},
            example=_example("batch", "seq"),
        ),
        ZooEntry(
            name="learned_pe",
            description="learned absolute encoding, a table of max_seq / 2 positions",
            factory=LearnedPositionalEncoding,
            config={"dim": D, "max_len": size.max_seq // 2},
            inputs=(X,),
            outputs=("y",),
            dims={"batch": BATCH, "seq": (1, size.max_seq // 2)},
            example=_example("batch", "seq"),
        ),
        ZooEntry(
            name="sdpa",
            description="scaled dot-product attention with a bool mask",
            factory=ScaledDotProductAttention,
            config={},
            inputs=(
                InputSpec("query", ("batch", H, "seq", HD)),
                InputSpec("key", ("batch", H, "kv_seq", HD)),
                InputSpec("value", ("batch", H, "kv_seq", HD)),
                InputSpec("attn_mask", ("batch", 1, "seq", "kv_seq"), "mask"),
            ),
            outputs=("y",),
            dims={"batch": BATCH, "seq": SEQ, "kv_seq": SEQ},
            example=_example("batch", "seq", "kv_seq"),
        ),
        mha_entry("mha_self", "multi-head self-attention with key padding", {}),
        mha_entry(
            "mha_cross",
            "cross attention over a context of another length and width",
            {"cross_attention": True, "kv_dim": D + D // 2},
            inputs=(
                X,
                InputSpec("context", ("batch", "kv_seq", D + D // 2)),
                InputSpec("key_padding_mask", ("batch", "kv_seq"), "padding"),
            ),
            dims={"batch": BATCH, "seq": SEQ, "kv_seq": SEQ},
        ),
        mha_entry(
            "causal_self",
            "causal self-attention, no padding: the fused variant never builds the s x s mask",
            {"causal": True},
            inputs=(X,),
        ),
        mha_entry("mha_causal", "causal self-attention with key padding", {"causal": True}),
        mha_entry(
            "gqa_rope",
            "grouped-query (4 heads, 2 kv heads) causal attention with RoPE",
            {"num_kv_heads": 2, "causal": True, "pos": "rope"},
        ),
        mha_entry(
            "mqa_alibi",
            "multi-query causal attention with ALiBi over 1.5x the heads (not a power of 2)",
            {
                "embed_dim": HD * mqa_heads,
                "num_heads": mqa_heads,
                "num_kv_heads": 1,
                "causal": True,
                "pos": "alibi",
            },
            inputs=(InputSpec("x", ("batch", "seq", HD * mqa_heads)), PAD),
        ),
        mha_entry(
            "t5_bidirectional",
            "T5 bucketed relative bias, bidirectional buckets",
            {"pos": "t5", "pos_args": {"num_buckets": 16, "max_distance": 32}},
        ),
        mha_entry(
            "t5_causal",
            "T5 bucketed relative bias, causal buckets",
            {
                "causal": True,
                "pos": "t5",
                "pos_args": {"num_buckets": 16, "max_distance": 32, "bidirectional": False},
            },
        ),
        mha_entry(
            "shaw_relative",
            "Shaw et al. relative distance embeddings clipped at +-4, key and value terms",
            {"pos": "shaw", "pos_args": {"max_distance": 4}},
        ),
        mha_entry(
            "xl_relative",
            "Transformer-XL sinusoidal relative attention terms",
            {"causal": True, "pos": "xl"},
        ),
        mha_entry(
            "sliding_window",
            f"causal sliding-window ({size.window}) attention with RoPE",
            {"causal": True, "window": size.window, "pos": "rope"},
        ),
        mha_entry(
            "kv_cache",
            "causal GQA attention with RoPE and a KV cache (past in, present out)",
            {"num_kv_heads": 2, "causal": True, "pos": "rope"},
            inputs=(X, PAST_K, PAST_V),
            outputs=CACHE_OUT,
            dims=cached_dims,
            cache=LAYER_CACHE,
        ),
        ZooEntry(
            name="encoder_layer",
            description="pre-LN encoder layer with ALiBi and key padding",
            factory=_encoder_layer,
            config={"embed_dim": D, "num_heads": H, "ffn_dim": 4 * D, "pos": "alibi"},
            inputs=(X, PAD),
            outputs=("y",),
            dims={"batch": BATCH, "seq": SEQ},
            example=_example("batch", "seq"),
        ),
        ZooEntry(
            name="decoder_layer",
            description="pre-LN decoder layer: causal GQA self-attn with RoPE, cross attention",
            factory=_decoder_layer,
            config={
                "embed_dim": D,
                "num_heads": H,
                "num_kv_heads": 2,
                "ffn_dim": 4 * D,
                "pos": "rope",
                "cross_attention": True,
            },
            inputs=(
                X,
                InputSpec("context", ("batch", "kv_seq", D)),
                InputSpec("context_padding_mask", ("batch", "kv_seq"), "padding"),
            ),
            outputs=("y",),
            dims={"batch": BATCH, "seq": SEQ, "kv_seq": SEQ},
            example=_example("batch", "seq", "kv_seq"),
        ),
        ZooEntry(
            name="decoder_layer_cached",
            description="pre-LN decoder layer with RoPE, GQA and a KV cache",
            factory=_decoder_layer,
            config={
                "embed_dim": D,
                "num_heads": H,
                "num_kv_heads": 2,
                "ffn_dim": 4 * D,
                "pos": "rope",
            },
            inputs=(X, PAST_K, PAST_V),
            outputs=CACHE_OUT,
            dims=cached_dims,
            example=_example("batch", "seq", "past"),
            cache=LAYER_CACHE,
        ),
        ZooEntry(
            name="encoder",
            description="small encoder: embeddings, sinusoidal positions, 2 pre-LN layers",
            factory=Encoder,
            config={
                "vocab_size": vocab,
                "embed_dim": D,
                "num_heads": H,
                "ffn_dim": 4 * D,
                "num_layers": 2,
            },
            inputs=(
                InputSpec("input_ids", ("batch", "seq"), "ids", vocab),
                InputSpec("key_padding_mask", ("batch", "seq"), "padding"),
            ),
            outputs=("hidden",),
            dims={"batch": BATCH, "seq": SEQ},
            example=_example("batch", "seq"),
            tolerance="deep",
        ),
        ZooEntry(
            name="decoder_lm",
            description="small decoder-only LM: 2 layers, RoPE, GQA, KV cache, logits",
            factory=DecoderLM,
            config={
                "vocab_size": vocab,
                "embed_dim": D,
                "num_heads": H,
                "num_kv_heads": 2,
                "ffn_dim": 4 * D,
                "num_layers": 2,
            },
            inputs=(
                InputSpec("input_ids", ("batch", "seq"), "ids", vocab),
                InputSpec("past_keys", (2, "batch", 2, "past", HD)),
                InputSpec("past_values", (2, "batch", 2, "past", HD)),
            ),
            outputs=("logits", "present_keys", "present_values"),
            dims=cached_dims,
            example=_example("batch", "seq", "past"),
            tolerance="deep",
            cache=LM_CACHE,
        ),
    ]


_ENTRIES: dict[str, ZooEntry] = {e.name: e for e in _registry()}


def names() -> list[str]:
    """Registered entry names, in registration order."""
    return list(_ENTRIES)


def entries() -> list[ZooEntry]:
    return list(_ENTRIES.values())


def scaled(size: Size) -> dict[str, ZooEntry]:
    """Every entry built at ``size`` (benchmarks: Size(d=512, heads=8, max_seq=8192, ...))."""
    return {e.name: e for e in _registry(size)}


def get(name: str) -> ZooEntry:
    """The entry called ``name``; an unknown name fails with the list of known names."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise UnknownEntryError(
            f"unknown zoo entry '{name}'; known entries: {', '.join(_ENTRIES)}"
        ) from None
