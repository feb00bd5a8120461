"""Triton Inference Server model repositories from bundles (the onnxruntime backend).

    repo/<name>/config.pbtxt          platform "onnxruntime_onnx", dims from the manifest
    repo/<name>/1/model.onnx          the chosen variant (+ its external-data files beside it)
    repo/<name>/warmup/<file>         raw warm-up tensors (golden inputs), with --warmup

Triton's shapes: with max_batch_size > 0 a tensor's full shape is [-1] + dims, so the batch
dim (the symbolic dim at axis 0 of every input and output) is dropped from dims; with
max_batch_size 0 dims are the full shape. Every dim that is not a fixed size is -1. A bundle
whose batch dim is not at axis 0 everywhere (decoder_lm's stacked caches) gets
max_batch_size 0.

Triton's dynamic batcher stacks only requests whose non-batch dims are equal, and Triton does
not know the manifest's dim ranges. Clients that want batching across sequence lengths pad the
sequence dim up to a few bucket sizes (--seq-buckets adds a warm-up per bucket and lists the
buckets in the config's header).

Every config is parsed with the model_config protobuf that tritonclient ships (loaded by file
path: importing tritonclient.grpc would need grpcio) and checked against the manifest: name,
platform, max_batch_size against the batch dim, every input and output with its data type
and dims, dynamic batching, instance groups, warm-ups and their data files. Each model
folder is written into a temporary folder, checked there, then renamed into place.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

from runtime._atomic import replace_dir
from runtime._bundle import Bundle, load_bundle
from runtime._errors import ArtifactError, AttnxError, InputError
from runtime._manifest import PATH_PART_RE, Manifest, TensorSpec
from runtime._runner import choose_variant
from runtime._session import CPU, CUDA

from ._protocol import OIP_DATATYPES, batch_dim

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
MODEL_FILE = "model.onnx"
VERSION_DIR = "1"
WARMUP_DIR = "warmup"
CONFIG_NAME = "config.pbtxt"
KINDS = {"cpu": ("KIND_CPU", CPU), "gpu": ("KIND_GPU", CUDA)}
INSTANCE_KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU")
DEFAULT_BATCH_DELAY_US = 100
DEFAULT_SEQ_DIM = "seq"
PB2_MODULE = "_attnx_triton_model_config_pb2"


@dataclass(frozen=True)
class WarmupInput:
    name: str
    dtype: str
    dims: tuple[int, ...]
    file: str | None  # a file under warmup/, or None for zero data


@dataclass(frozen=True)
class Warmup:
    name: str
    batch_size: int
    inputs: tuple[WarmupInput, ...]
    data: Mapping[str, bytes]  # warmup/ file name -> raw little-endian bytes


@dataclass(frozen=True)
class TritonModel:
    """What one model folder will hold, decided before anything is written."""

    name: str
    variant: str
    opsets: Mapping[str, int]  # of the variant's graph, by domain ("" is ai.onnx)
    max_batch_size: int
    kind: str
    instances: int
    batch_delay_us: int
    warmups: tuple[Warmup, ...]
    seq_dim: str | None
    seq_buckets: tuple[int, ...]
    varying: tuple[str, ...]  # non-batch dims that vary per request (batching needs equal ones)
    notes: tuple[str, ...]  # for stderr: why batching is off, which opset the variant needs


# ---------------------------------------------------------------------------------------------
# The model_config protobuf

_pb2 = None


def model_config_pb2():
    """tritonclient's model_config_pb2, loaded by file path (no grpc import)."""
    global _pb2
    if _pb2 is not None:
        return _pb2
    module = sys.modules.get("tritonclient.grpc.model_config_pb2")
    if module is None:
        spec = importlib.util.find_spec("tritonclient")
        locations = list(spec.submodule_search_locations or []) if spec else []
        path = Path(locations[0]) / "grpc" / "model_config_pb2.py" if locations else None
        if path is None or not path.is_file():
            raise AttnxError(
                "checking Triton configs needs tritonclient's model_config "
                "protobuf: pip install 'attnx[serve]' (or tritonclient)"
            )
        file_spec = importlib.util.spec_from_file_location(PB2_MODULE, path)
        module = importlib.util.module_from_spec(file_spec)
        try:
            file_spec.loader.exec_module(module)
        except Exception as e:  # a protobuf runtime too old for the generated code, mostly
            raise AttnxError(
                f"cannot load {path.name} from tritonclient ({type(e).__name__}: {e})"
            ) from None
    _pb2 = module
    return module


def triton_type(dtype: str) -> str:
    return "TYPE_" + OIP_DATATYPES[dtype]


def expected_dims(spec: TensorSpec, batched: bool) -> list[int]:
    """Triton dims of a tensor: the batch axis dropped when batched, -1 for any dim that is
    not a fixed size."""
    shape = spec.shape[1:] if batched else spec.shape
    return [d if isinstance(d, int) else -1 for d in shape]


# ---------------------------------------------------------------------------------------------
# Planning


def plan_model(
    bundle: Bundle,
    *,
    max_batch_size: int | None = None,
    kind: str = "cpu",
    instances: int = 1,
    warmup: bool = False,
    seq_buckets: Sequence[int] = (),
    seq_dim: str = DEFAULT_SEQ_DIM,
    batch_delay_us: int = DEFAULT_BATCH_DELAY_US,
    variant: str | None = None,
) -> TritonModel:
    m = bundle.manifest
    if kind not in KINDS:
        raise InputError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if instances < 1 or batch_delay_us < 0:
        raise InputError(
            f"--instances must be >= 1 and --batch-delay-us >= 0, got "
            f"{instances} and {batch_delay_us}"
        )
    chosen = choose_variant(m, KINDS[kind][1], variant)
    bdim, reason = batch_dim(m)
    notes = []
    if max_batch_size is None:
        max_batch_size = m.dims[bdim].max if bdim and m.dims[bdim].min <= 1 else 0
        if not max_batch_size:
            why = reason or f"{bdim!r} starts at {m.dims[bdim].min}, Triton may send batch 1"
            notes.append(f"{m.name}: max_batch_size 0 (Triton will not batch it): {why}")
    elif max_batch_size < 0:
        raise InputError(f"--max-batch-size must be >= 0, got {max_batch_size}")
    elif max_batch_size > 0:
        if bdim is None:
            raise InputError(
                f"{m.name}: --max-batch-size {max_batch_size} needs the batch dim "
                f"at axis 0 of every input and output, but {reason}; use "
                f"--max-batch-size 0"
            )
        if max_batch_size > m.dims[bdim].max:
            raise InputError(
                f"{m.name}: --max-batch-size {max_batch_size} is above the "
                f"manifest's max for {bdim!r} ({m.dims[bdim].max})"
            )
    batched = max_batch_size > 0
    varying = sorted(
        {d for s in m.inputs for d in s.shape[1:] if isinstance(d, str)} if batched else ()
    )
    opsets = _opsets(bundle, chosen.name)
    if opsets.get("", 0) > m.opset:
        notes.append(
            f"{m.name}: variant {chosen.name!r} needs ai.onnx opset {opsets['']} in "
            f"Triton's onnxruntime backend (--variant base for opset {m.opset})"
        )
    buckets = _check_buckets(m, seq_buckets, seq_dim)
    warmups = _golden_warmups(bundle, batched) if warmup else ()
    warmups += tuple(_bucket_warmup(bundle, batched, seq_dim, b) for b in buckets)
    return TritonModel(
        m.name,
        chosen.name,
        opsets,
        max_batch_size,
        kind,
        instances,
        batch_delay_us,
        warmups,
        seq_dim if buckets else None,
        buckets,
        tuple(varying),
        tuple(notes),
    )


def _opsets(bundle: Bundle, variant: str) -> dict[str, int]:
    """Opset per domain of a variant's graph ("" is ai.onnx)."""
    model = onnx.load_model_from_string(bundle.model_bytes(variant))
    return {o.domain if o.domain != "ai.onnx" else "": o.version for o in model.opset_import}


def _check_buckets(m: Manifest, buckets: Sequence[int], seq_dim: str) -> tuple[int, ...]:
    if not buckets:
        return ()
    if seq_dim not in m.dims:
        raise InputError(
            f"{m.name}: --seq-buckets needs the dim {seq_dim!r}, the bundle has "
            f"{', '.join(m.dims)} (choose one with --seq-dim)"
        )
    r = m.dims[seq_dim]
    if list(buckets) != sorted(set(buckets)) or not r.min <= buckets[0] <= buckets[-1] <= r.max:
        raise InputError(
            f"{m.name}: --seq-buckets must be increasing sizes within "
            f"{seq_dim!r}'s range {r.min}..{r.max}, got "
            f"{','.join(map(str, buckets))}"
        )
    return tuple(buckets)


def _golden_warmups(bundle: Bundle, batched: bool) -> tuple[Warmup, ...]:
    warmups = []
    for i, case in enumerate(bundle.golden):
        inputs, data = [], {}
        for spec in bundle.manifest.inputs:
            arr = case.inputs[spec.name]
            arr = arr[:1] if batched else arr  # one sample; Triton repeats it batch_size times
            file = f"golden{i}_{spec.name}"
            data[file] = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            dims = arr.shape[1:] if batched else arr.shape
            inputs.append(WarmupInput(spec.name, spec.dtype, tuple(dims), file))
        warmups.append(Warmup(f"golden{i}", 1, tuple(inputs), data))
    return tuple(warmups)


def _bucket_warmup(bundle: Bundle, batched: bool, seq_dim: str, size: int) -> Warmup:
    m = bundle.manifest
    point = dict(bundle.golden[0].point) if bundle.golden else {}
    point[seq_dim] = size
    inputs = []
    for spec in m.inputs:
        shape = [d if isinstance(d, int) else point.get(d, m.dims[d].min) for d in spec.shape]
        dims = shape[1:] if batched else shape
        inputs.append(WarmupInput(spec.name, spec.dtype, tuple(dims), None))
    return Warmup(f"{seq_dim}_{size}", 1, tuple(inputs), {})


# ---------------------------------------------------------------------------------------------
# config.pbtxt


def config_text(m: Manifest, model: TritonModel) -> str:
    batched = model.max_batch_size > 0
    lines = _header(m, model) + [
        f"name: {_q(model.name)}",
        f"platform: {_q(PLATFORM)}",
        f"max_batch_size: {model.max_batch_size}",
        "version_policy: { latest: { num_versions: 1 } }",
        *_tensors("input", m.inputs, batched),
        *_tensors("output", m.outputs, batched),
    ]
    if batched:
        lines += [
            "dynamic_batching {",
            f"  max_queue_delay_microseconds: {model.batch_delay_us}",
            "}",
        ]
    lines += [
        "instance_group [",
        "  {",
        f"    count: {model.instances}",
        f"    kind: {KINDS[model.kind][0]}",
        "  }",
        "]",
    ]
    if model.warmups:
        lines += ["model_warmup ["]
        for k, w in enumerate(model.warmups):
            lines += ["  {", f"    name: {_q(w.name)}", f"    batch_size: {w.batch_size}"]
            for x in w.inputs:
                source = (
                    f"input_data_file: {_q(x.file)}" if x.file is not None else "zero_data: true"
                )
                lines += [
                    f"    inputs {{ key: {_q(x.name)} value: {{ data_type: "
                    f"{triton_type(x.dtype)} dims: {_list(x.dims)} {source} }} }}"
                ]
            lines += ["  }" + ("," if k < len(model.warmups) - 1 else "")]
        lines += ["]"]
    return "\n".join(lines) + "\n"


def _header(m: Manifest, model: TritonModel) -> list[str]:
    def shape(spec: TensorSpec) -> str:
        return f"{spec.name} [{', '.join(map(str, spec.shape))}]"

    opsets = ", ".join(
        f"{domain or 'ai.onnx'} {version}" for domain, version in sorted(model.opsets.items())
    )

    text = [
        f"Triton model configuration generated by attnx {_version()} from bundle "
        f"{m.name!r} (variant {model.variant!r}); checked with tritonclient's model_config "
        f"protobuf against the manifest.",
        f"The graph's opsets: {opsets}; Triton's onnxruntime backend must run them.",
        f"Shapes: {', '.join(shape(s) for s in m.inputs)} -> "
        f"{', '.join(shape(s) for s in m.outputs)}.",
        f"Dim ranges: {', '.join(f'{k} {r.min}..{r.max}' for k, r in m.dims.items())}. "
        f"Triton does not check them (every such dim is -1 here): keep requests inside them.",
    ]
    if model.max_batch_size > 0:
        text.append(
            "Triton's dynamic batcher stacks requests along axis 0 only when all their "
            "other dims are equal."
        )
    if model.seq_buckets:
        text.append(
            f"Padding buckets for {model.seq_dim!r}: "
            f"{', '.join(map(str, model.seq_buckets))}. Pad {model.seq_dim!r} up to the "
            f"next bucket so that requests share shapes (where the block masks padded "
            f"keys, e.g. key_padding_mask True there, or is causal), and drop the "
            f"padded positions of the outputs. Each bucket has a zero-data warm-up."
        )
    return [f"# {line}" for paragraph in text for line in _wrap(paragraph)]


def _wrap(text: str, width: int = 96) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line] if line else lines


def _tensors(kind: str, specs: Sequence[TensorSpec], batched: bool) -> list[str]:
    lines = [f"{kind} ["]
    for k, spec in enumerate(specs):
        shape = spec.shape[1:] if batched else spec.shape
        lines += [
            "  {",
            f"    name: {_q(spec.name)}",
            f"    data_type: {triton_type(spec.dtype)}",
            f"    dims: {_list(expected_dims(spec, batched))}  # [{', '.join(map(str, shape))}]",
            "  }" + ("," if k < len(specs) - 1 else ""),
        ]
    return lines + ["]"]


def _list(values) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _version() -> str:
    try:
        return metadata.version("attnx")
    except metadata.PackageNotFoundError:
        return "(unknown version)"


# ---------------------------------------------------------------------------------------------
# Checking


def check_model_dir(model_dir: str | os.PathLike, manifest: Manifest, *, name: str | None = None):
    """Parse `model_dir`/config.pbtxt and check it against `manifest` (and the warm-up files
    against their dims). Returns the parsed ModelConfig; raises ArtifactError listing every
    problem. `name` is the model name Triton will see (default: the folder's name)."""
    folder = Path(model_dir)
    path = folder / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    return check_config(text, manifest, name=name or folder.name, model_dir=folder, where=str(path))


def check_config(
    text: str,
    manifest: Manifest,
    *,
    name: str,
    model_dir: Path | None = None,
    where: str = CONFIG_NAME,
):
    from google.protobuf import text_format

    pb2 = model_config_pb2()
    try:
        config = text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ArtifactError(f"{where}: not a Triton model config: {e}") from None
    problems = []
    if config.name != name:
        problems.append(f"name is {config.name!r}, Triton needs the folder's name {name!r}")
    if config.platform != PLATFORM and config.backend != BACKEND:
        problems.append(
            f"platform is {config.platform!r} and backend {config.backend!r}; "
            f"expected platform {PLATFORM!r} (or backend {BACKEND!r})"
        )
    batched = _check_batching(config, manifest, problems)
    _check_tensors("input", config.input, manifest.inputs, batched, pb2, problems)
    _check_tensors("output", config.output, manifest.outputs, batched, pb2, problems)
    for i, group in enumerate(config.instance_group):
        kind = pb2.ModelInstanceGroup.Kind.Name(group.kind)
        if group.count < 1 or kind not in INSTANCE_KINDS:
            problems.append(
                f"instance_group[{i}]: count {group.count} (must be >= 1), kind "
                f"{kind} (must be one of {', '.join(INSTANCE_KINDS)})"
            )
    for warmup in config.model_warmup:
        _check_warmup(warmup, manifest, config.max_batch_size, batched, pb2, model_dir, problems)
    if problems:
        raise ArtifactError(f"{where}: " + "; ".join(problems))
    return config


def _check_batching(config, m: Manifest, problems: list[str]) -> bool:
    mbs = config.max_batch_size
    bdim, reason = batch_dim(m)
    if mbs < 0:
        problems.append(f"max_batch_size {mbs} is negative")
    elif mbs > 0 and bdim is None:
        problems.append(
            f"max_batch_size {mbs} > 0 makes Triton stack requests along axis 0, "
            f"but {reason}; use max_batch_size 0"
        )
    elif mbs > 0 and mbs > m.dims[bdim].max:
        problems.append(
            f"max_batch_size {mbs} is above the manifest's max for {bdim!r} ({m.dims[bdim].max})"
        )
    batched = mbs > 0 and bdim is not None
    if config.HasField("dynamic_batching"):
        if not batched:
            problems.append("dynamic_batching needs max_batch_size > 0")
        for size in config.dynamic_batching.preferred_batch_size:
            if not 1 <= size <= max(mbs, 0):
                problems.append(
                    f"dynamic_batching: preferred_batch_size {size} is not within "
                    f"1..max_batch_size ({mbs})"
                )
    return batched


def _check_tensors(
    kind: str, entries, specs: Sequence[TensorSpec], batched: bool, pb2, problems: list[str]
) -> None:
    names = [e.name for e in entries]
    by_name = {s.name: s for s in specs}
    for name in sorted(set(names)):
        if names.count(name) > 1:
            problems.append(f"{kind} {name!r} is listed {names.count(name)} times")
    for name in names:
        if name not in by_name:
            problems.append(
                f"{kind} {name!r} is not in the manifest ({kind}s: {', '.join(by_name)})"
            )
    for spec in specs:
        if spec.name not in names:
            problems.append(f"{kind} {spec.name!r} of the manifest is missing")
            continue
        entry = next(e for e in entries if e.name == spec.name)
        got_type = pb2.DataType.Name(entry.data_type)
        if got_type != triton_type(spec.dtype):
            problems.append(
                f"{kind} {spec.name!r}: data_type {got_type}, the manifest says "
                f"{spec.dtype} ({triton_type(spec.dtype)})"
            )
        want = expected_dims(spec, batched)
        if list(entry.dims) != want:
            problems.append(
                f"{kind} {spec.name!r}: dims {list(entry.dims)}, expected {want} "
                f"for shape [{', '.join(map(str, spec.shape))}]"
                + (" without the batch axis" if batched else "")
            )


def _check_warmup(
    warmup, m: Manifest, mbs: int, batched: bool, pb2, model_dir: Path | None, problems: list[str]
) -> None:
    label = f"model_warmup {warmup.name!r}"
    if not 1 <= warmup.batch_size <= max(mbs, 1):
        problems.append(f"{label}: batch_size {warmup.batch_size} is not within 1..{max(mbs, 1)}")
    specs = {s.name: s for s in m.inputs}
    if sorted(warmup.inputs) != sorted(specs):
        problems.append(f"{label}: inputs {sorted(warmup.inputs)}, the model's are {sorted(specs)}")
    for name, x in warmup.inputs.items():
        spec = specs.get(name)
        if spec is None:
            continue
        if pb2.DataType.Name(x.data_type) != triton_type(spec.dtype):
            problems.append(
                f"{label}: input {name!r}: data_type "
                f"{pb2.DataType.Name(x.data_type)}, expected "
                f"{triton_type(spec.dtype)}"
            )
        shape = spec.shape[1:] if batched else spec.shape
        dims = list(x.dims)
        fits = len(dims) == len(shape) and all(
            d == s if isinstance(s, int) else m.dims[s].min <= d <= m.dims[s].max
            for d, s in zip(dims, shape, strict=False)
        )
        if not fits:
            problems.append(
                f"{label}: input {name!r}: dims {dims} do not fit "
                f"[{', '.join(map(str, shape))}] within the manifest's ranges"
            )
        source = x.WhichOneof("input_data_type")
        if source is None:
            problems.append(
                f"{label}: input {name!r}: no data (zero_data, random_data or input_data_file)"
            )
        elif source == "input_data_file":
            _check_warmup_file(
                label, name, x.input_data_file, dims, spec.dtype, model_dir, problems
            )


def _check_warmup_file(
    label: str,
    name: str,
    file: str,
    dims: list[int],
    dtype: str,
    model_dir: Path | None,
    problems: list[str],
) -> None:
    if not PATH_PART_RE.fullmatch(file):
        problems.append(
            f"{label}: input {name!r}: input_data_file {file!r} must be a plain "
            f"file name inside {WARMUP_DIR}/"
        )
        return
    if model_dir is None:
        return
    path = model_dir / WARMUP_DIR / file
    want = math.prod(dims) * np.dtype(dtype).itemsize
    size = path.stat().st_size if path.is_file() else None
    if size != want:
        got = "missing" if size is None else f"{size} bytes"
        problems.append(
            f"{label}: input {name!r}: {WARMUP_DIR}/{file} is {got}, dims {dims} "
            f"of {dtype} need {want} bytes"
        )


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class Written:
    name: str
    path: Path
    model: TritonModel


def write_repository(
    bundles: Sequence[str | os.PathLike], repo: str | os.PathLike, **options
) -> list[Written]:
    """Write one checked model folder per bundle into `repo` (see plan_model for options).
    Every bundle is loaded and planned before anything is written."""
    loaded = [load_bundle(b) for b in bundles]
    names = [b.manifest.name for b in loaded]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(
            f"two bundles are both named {twice[0]!r}; a Triton repository holds "
            f"each model name once"
        )
    plans = [plan_model(b, **options) for b in loaded]
    model_config_pb2()  # fail before writing when tritonclient is missing
    root = Path(repo)
    if root.exists() and not root.is_dir():
        raise InputError(f"--repo {root}: exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    return [_write_model(b, plan, root) for b, plan in zip(loaded, plans, strict=True)]


def _write_model(bundle: Bundle, model: TritonModel, root: Path) -> Written:
    final = root / model.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}.", suffix=".tmp", dir=root))
    try:
        version = tmp / VERSION_DIR
        version.mkdir()
        (version / MODEL_FILE).write_bytes(bundle.model_bytes(model.variant))
        for rel, data in bundle.external_data(model.variant).items():
            (version / rel).parent.mkdir(parents=True, exist_ok=True)
            (version / rel).write_bytes(data)
        if model.warmups:
            (tmp / WARMUP_DIR).mkdir()
            for w in model.warmups:
                for file, data in w.data.items():
                    (tmp / WARMUP_DIR / file).write_bytes(data)
        (tmp / CONFIG_NAME).write_text(config_text(bundle.manifest, model), encoding="utf-8")
        check_model_dir(tmp, bundle.manifest, name=model.name)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Written(model.name, final, model)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise InputError(f"{final} exists and is not a model folder")
    replace_dir(tmp, final)
