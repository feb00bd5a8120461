"""Stage 3: optimized variants of the base graph (DESIGN.md section 6).

Each variant is a separate ONNX file with its own providers, tolerance and parity records:

- ``base``: the exporter's graph at the chosen opset (18 by default).
- ``attention23``: native ONNX ops: captured at opset 23, where torch lowers
  scaled_dot_product_attention to ONNX ``Attention`` (onnxruntime >= 1.23), with rotary
  embeddings as ``RotaryEmbedding``-23 and causal sliding windows as ``Attention``-25's
  ``left_window_size`` (the graph is then opset 25; models/_native.py).
- ``fused``: captured with attnx's kernel routing (models._kernels: pure causal attention ->
  com.microsoft.GroupQueryAttention, which never materializes the s x s mask), then
  onnxscript's onnxruntime fusions (MultiHeadAttention, BiasGelu, RMSNorm...), its
  SkipLayerNormalization turned back into Add and LayerNormalization, which onnxruntime's CPU
  kernels run faster (export/rewrites/layer_norms.py).
  For the CPU: onnxruntime's CUDA GroupQueryAttention takes float16/bfloat16 only, so on CUDA
  the float32 graph's kernels and Loops fall back to the CPU (21.5x torch at seq 4096 on an
  H100, benchmarks/results/gpu/); its fp16 form is the CUDA variant.
- ``tiled``: the fused graph with its causal sliding-window GroupQueryAttention called once per
  tile of queries over the keys the tile's window reaches (export/rewrites/query_tiles.py):
  one call over the prompt scores the causal half whatever the window.
- ``int8``: dynamic int8 quantization of the fused graph's MatMuls (7-bit weights per channel,
  exact on CPUs with and without VNNI), the head-group Loop's projections included.
- ``fp16``: the fused graph in float16 with float32 inputs and outputs, for CUDA only.

A variant is kept only when its op census differs from the graph it was derived from: a
fusion that did not fire is not a variant (trust the census, not the fusion counters).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from runtime import Tolerance

from ._capture import capture
from ._errors import ExportError
from ._sessions import make_session, to_numpy
from ._spec import ExportSpec

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
ALL_PROVIDERS = (CPU, CUDA)
# The fused graph's float32 kernels are CPU kernels (see the module docstring).
FUSED_PROVIDERS = (CPU,)

ATTENTION_OPSET = 23
# Dynamic int8 quantizes activations per tensor at run time; on outputs of order 1-5 it is off
# by about 1e-2 (measured over the zoo grid, see the bundle reports), so it is checked against
# a separate, documented tolerance and never chosen automatically.
INT8_TOLERANCE = Tolerance(atol=0.1, rtol=0.1)
# fp16 keeps an 11-bit mantissa; attention's softmax and long reductions lose a few more bits
# (the same bound as runtime.FLOAT16_TOLERANCE, NVIDIA/TransformerEngine#3409).
FP16_TOLERANCE = Tolerance(atol=2e-2, rtol=1e-2)
# Variants whose numbers are meant to differ from the block's own tolerance class.
LOSSY = ("int8", "fp16")

ATTENTION_OPS = {
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "RotaryEmbedding",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "LayerNormalization",
}


@dataclass
class VariantBuild:
    """A variant's graph and what it is meant for."""

    model: onnx.ModelProto
    providers: tuple[str, ...]
    tolerance: Mapping[str, Tolerance]
    derived_from: str = ""
    census: dict[str, int] = field(default_factory=dict)
    # Median latency in ms by provider at the first timing point: how the runner ranks
    # variants; ``timings`` has it at every timing point ({"point", "median_ms"} each).
    median_ms: dict[str, float] = field(default_factory=dict)
    timings: list[dict] = field(default_factory=list)


TIMING_RUNS = 15
TIMING_SIZE = 32  # every dynamic dim at this size (clipped to its range)
LONG_TIMING_SEQ = 1024  # the second timing point's sequence length


# A decode step's past in the timing point of a cached spec: long enough that reading the cache
# counts, as in a conversation.
DECODE_TIMING_PAST = 512


def timing_point(spec: ExportSpec) -> dict[str, int]:
    """Where the runner's ranking is timed: TIMING_SIZE on every dim; for a cached spec a
    decode step (one sequence, one new token after DECODE_TIMING_PAST positions), since
    generation spends its time there and the variants rank differently on a prefill."""
    point = dict.fromkeys(spec.dims, TIMING_SIZE)
    if spec.cache is not None:
        point.update({spec.cache.batch_dim: 1, spec.cache.seq_dim: 1,
                      spec.cache.past_dim: DECODE_TIMING_PAST})
    return _within(spec, point)


def _within(spec: ExportSpec, point: Mapping[str, int]) -> dict[str, int]:
    """``point`` clipped to the dims' ranges, then to what the spec accepts (fit_point)."""
    clipped = {d: min(spec.dims[d][1], max(spec.dims[d][0], v)) for d, v in point.items()}
    return clipped if spec.fit_point is None else spec.fit_point(clipped)


def timing_points(spec: ExportSpec) -> list[dict[str, int]]:
    """timing_point, then a long one, since the fastest variant changes with length: one
    sequence of LONG_TIMING_SEQ tokens (clipped to the ranges) on every dim named like a
    sequence, or for a cached spec a prefill of TIMING_SIZE tokens on an empty cache."""
    short = timing_point(spec)
    if spec.cache is not None:
        long = {**short, spec.cache.seq_dim: TIMING_SIZE, spec.cache.past_dim: 0}
    else:
        long = {d: LONG_TIMING_SEQ if "seq" in d else 1 for d in spec.dims}
    long = _within(spec, long)
    return [short] if long == short else [short, long]


def time_variants(spec: ExportSpec, builds: Mapping[str, VariantBuild]) -> None:
    """Median CPU latency of every CPU variant on the same inputs at each timing point, for
    the runner's ranking."""
    from runtime._tune import median_ms

    feeds = [(point, to_numpy(spec.make_inputs(point))) for point in timing_points(spec)]
    for build in builds.values():
        if CPU not in build.providers:
            continue
        session = make_session(build.model)  # one per variant, timed at every point
        for point, feed in feeds:
            ms = median_ms(session, feed, TIMING_RUNS)
            build.timings.append({"point": dict(point), "median_ms": {CPU: ms}})
            build.median_ms.setdefault(CPU, ms)


def op_census(model: onnx.ModelProto) -> dict[str, int]:
    """Node counts by op type ("domain.Op" outside the default domain), incl. subgraphs."""
    counts: collections.Counter[str] = collections.Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            counts[f"{domain}.{node.op_type}" if domain else node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)
    return dict(sorted(counts.items()))


def build_variants(
    spec: ExportSpec,
    base: onnx.ModelProto,
    opset: int,
    names: tuple[str, ...] | None,
    dropped: dict[str, str] | None = None,
) -> dict[str, VariantBuild]:
    """The base graph plus every requested variant whose census differs from its source. An
    optional variant that fails to build is left out with the reason in ``dropped``."""
    wanted = DEFAULT_VARIANTS if names is None else names
    unknown = sorted(set(wanted) - set(DEFAULT_VARIANTS) - {"base"})
    if unknown:
        raise ExportError(
            f"unknown variants {unknown}; known: {', '.join(('base', *DEFAULT_VARIANTS))}",
            stage=3,
        )
    failed: dict[str, str] = {}
    tolerance = dict(spec.tolerance)
    builds = {"base": VariantBuild(base, ALL_PROVIDERS, tolerance, census=op_census(base))}
    has_softmax = any(n.op_type == "Softmax" for n in base.graph.node)
    if "attention23" in wanted and opset < ATTENTION_OPSET and has_softmax:
        native = _attempt(failed, "attention23", lambda: _native(spec))
        if native is not None:
            _keep(builds, "attention23", VariantBuild(native, ALL_PROVIDERS, tolerance, "base"))
    kernels, native = base, builds.get("attention23")
    if {"fused", "tiled", "int8", "fp16"} & set(wanted):
        source = None if native is None else native.model
        routed = _attempt(failed, "fused", lambda: _fused(spec, base, opset, source))
        kernels = base if routed is None else routed
        fused = _attempt(failed, "fused", lambda: _long(spec, kernels))
        if fused is not None:
            _keep(builds, "fused", VariantBuild(fused, FUSED_PROVIDERS, tolerance, "base"))
        if "tiled" in wanted and routed is not None and fused is not None:
            tiled = _attempt(failed, "tiled", lambda: _tiled(fused))
            if tiled is not None:
                build = VariantBuild(tiled, FUSED_PROVIDERS, tolerance, "fused")
                _keep(builds, "tiled", build, against=builds.get("fused"))
    source = builds.get("fused", builds["base"])
    if "int8" in wanted:
        # The head-group rewrite quantizes the projections it takes over (gathered weights are
        # no constant MatMul operand for the quantizer); the quantizer takes the rest.
        int8 = _attempt(failed, "int8", lambda: _int8(_long(spec, kernels, int8=True)))
        if int8 is not None:
            build = VariantBuild(int8, (CPU,), _lossy(spec, INT8_TOLERANCE), "fused")
            _keep(builds, "int8", build, against=source)
    if "fp16" in wanted:
        fp16 = _attempt(failed, "fp16", lambda: _fp16(source.model))
        if fp16 is not None:
            build = VariantBuild(fp16, (CUDA,), _lossy(spec, FP16_TOLERANCE), "fused")
            _keep(builds, "fp16", build, against=source)
    if "fused" not in wanted:
        builds.pop("fused", None)
    if dropped is not None:
        dropped.update({name: why for name, why in failed.items() if name in wanted})
    return builds


def _attempt(failed: dict[str, str], name: str, make):
    """make(), or None with the reason in ``failed``: an optional variant never breaks the
    export, whatever its exporter, rewriter or quantizer raises."""
    try:
        return make()
    except Exception as err:  # noqa: BLE001 - recorded in the manifest, not swallowed
        failed.setdefault(name, f"failed to build: {first_line(err)}")
        return None


def first_line(err: BaseException, limit: int = 300) -> str:
    text = next((line for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text.strip()[:limit]}" if text else type(err).__name__


DEFAULT_VARIANTS = ("attention23", "fused", "tiled", "int8", "fp16")


def _keep(builds, name, build: VariantBuild, against: VariantBuild | None = None) -> None:
    build.census = op_census(build.model)
    reference = against or builds["base"]
    if build.census != reference.census:
        builds[name] = build


def _lossy(spec: ExportSpec, tol: Tolerance) -> dict[str, Tolerance]:
    return {dtype: tol for dtype in {*spec.tolerance, "float32"}}


def _native(spec: ExportSpec) -> onnx.ModelProto:
    """Native ONNX ops (models/_native.py): Attention-23 from torch's scaled_dot_product_attention,
    RotaryEmbedding-23, and Attention-25 for causal windows (opset 25 where one occurs)."""
    import torch

    from models._native import onnx_native

    from .rewrites.native import WINDOW_OPSET, translation_table
    from .rewrites.shared_kv import share_kv_heads

    with onnx_native() as route, torch.no_grad():
        spec.module(**spec.example_feed(), **spec.forward_kwargs)
    opset = WINDOW_OPSET if route.windows else ATTENTION_OPSET
    with onnx_native():
        model = capture(spec, opset, custom_translation_table=translation_table())
    return share_kv_heads(model)  # Attention takes fewer kv heads than q heads as they are


def _fused(spec: ExportSpec, base: onnx.ModelProto, opset: int,
           native: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The kernel-routed capture (or, without a kernel-served core, a copy of the base graph)
    with onnxscript's onnxruntime fusions. A cached graph without a kernel-served core (a
    Hugging Face causal LM with its cache) takes them on its ``native`` (attention23) graph
    instead: on the base graph they turn attention into MultiHeadAttention with past, which
    onnxruntime's CPU kernel runs slower than the native Attention op once the past is long
    (tiny Llama's decode step at past 2048: 11.8 ms against 8.3 ms, hf_decode_bench)."""
    import onnx_ir as ir
    import torch
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from models._kernels import ort_kernels

    from .rewrites.batch_rows import rows_for_cached_prompts
    from .rewrites.kernels import translation_table
    from .rewrites.layer_norms import unfuse_skip_layer_norms

    with ort_kernels() as route, torch.no_grad():
        spec.module(**spec.example_feed(), **spec.forward_kwargs)
    if route.calls:  # only modules with a kernel-served core are captured again
        with ort_kernels():
            model = capture(spec, opset, custom_translation_table=translation_table())
    else:  # the fusions below would otherwise rewrite the base graph's own nodes
        model = onnx.ModelProto()
        model.CopyFrom(native if spec.cache is not None and native is not None else base)
    graph = ir.from_proto(model)
    optimize_for_ort(graph)
    model = unfuse_skip_layer_norms(ir.to_proto(graph))
    return rows_for_cached_prompts(model)


def _long(spec: ExportSpec, model: onnx.ModelProto, *, int8: bool = False) -> onnx.ModelProto:
    """model with long causal self-attention over head groups (export/rewrites/head_groups.py), its
    q/k/v projections quantized with ``int8``. The Loop only serves sequences of LOOP_MIN_SEQ
    tokens or more: a block declared shorter would carry it as dead code."""
    from .rewrites.head_groups import LOOP_MIN_SEQ, group_heads

    longest = max((hi for dim, (_, hi) in spec.dims.items() if "seq" in dim), default=0)
    return group_heads(model, int8=int8) if longest >= LOOP_MIN_SEQ else model


def _tiled(fused: onnx.ModelProto) -> onnx.ModelProto:
    """The fused graph with its windowed GroupQueryAttention called once per tile of queries
    (export/rewrites/query_tiles.py)."""
    from .rewrites.query_tiles import tile_queries

    return tile_queries(fused)


def _int8(model: onnx.ModelProto) -> onnx.ModelProto | None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not any(n.op_type == "MatMul" for n in model.graph.node):
        return None
    with _quiet_root(), tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model, source)
        # reduce_range: 7-bit weights, exact on CPUs without VNNI (export/rewrites/head_groups.py,
        # WEIGHT_MAX); the same graph then runs the same numbers on every x86-64 CPU.
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            op_types_to_quantize=["MatMul"],
            extra_options={"MatMulConstBOnly": True},
        )
        return onnx.load(target)


@contextlib.contextmanager
def _quiet_root():
    """onnxruntime.quantization logs advice on the root logger at WARNING for every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the converter rewrites its argument in place
    # Inputs and outputs stay float32 so the runner's validator and golden data need no change.
    return convert_float_to_float16(copy, keep_io_types=True, disable_shape_infer=True)
