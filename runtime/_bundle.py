"""Bundle reader: trust manifest.json first, then nothing else until it is checked.

Order: manifest schema; every listed file (containment, regular file, no symlink, one hard
link, size, sha256); no unlisted files; every ONNX model (parses, graph I/O matches the
manifest, every external-data reference confined to listed files); golden.npz (zip, no
pickle, numeric dtypes, shapes match the specs).

The bytes that were hashed are the bytes that are used: sessions are created from them (see
_session.create_session), so a file swapped after the check is never read.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from ._errors import ArtifactError, InputError
from ._manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PATH_PART_RE,
    FileEntry,
    Manifest,
)
from ._validate import check_feed, shape_problems

EXTERNAL_DATA_KEYS = frozenset({"location", "offset", "length", "checksum"})
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or an empty archive
NUMERIC_KINDS = "biuf"


@dataclass(frozen=True)
class GoldenSample:
    """One golden case with its arrays (native byte order)."""

    point: Mapping[str, int]
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Bundle:
    """A checked bundle: the manifest, the verified bytes of every file, the golden arrays."""

    manifest: Manifest
    dir: Path
    files: Mapping[str, bytes]
    weights: Mapping[str, frozenset[str]]  # variant -> initializer names
    data_files: Mapping[str, tuple[str, ...]]  # variant -> external-data files it reads
    golden: tuple[GoldenSample, ...]

    def model_bytes(self, variant: str) -> bytes:
        return self.files[self.manifest.variant(variant).file]

    def external_data(self, variant: str) -> dict[str, bytes]:
        return {path: self.files[path] for path in self.data_files[variant]}


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read and check a bundle folder; raises ArtifactError naming the file on any problem."""
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not a bundle folder (no such directory)")
    root = folder.resolve()
    manifest = _read_manifest(folder)
    files = {e.path: _read_verified(folder, root, e) for e in manifest.files}
    _reject_unlisted(folder, manifest)
    weights, data_files = {}, {}
    for variant in manifest.variants:
        model = _parse_model(folder / variant.file, files[variant.file])
        _check_graph_io(folder / variant.file, model, manifest)
        data_files[variant.name] = _check_external_data(folder / variant.file, model, files)
        weights[variant.name] = frozenset(_initializer_names(model.graph))
    golden = _load_golden(folder, manifest, files[manifest.golden.file])
    return Bundle(manifest, folder, files, weights, data_files, golden)


# ---------------------------------------------------------------------------------------------
# Files


def _read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_NAME
    data = _read_plain_file(path, MAX_MANIFEST_BYTES + 1)
    try:
        return Manifest.loads(data)
    except ArtifactError as e:
        raise ArtifactError(f"{folder}/{e}") from None


def _read_plain_file(path: Path, limit: int) -> bytes:
    """Read at most `limit` bytes of a regular, unlinked-elsewhere file, never following a link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such file") from None
    if stat.S_ISLNK(st.st_mode):
        raise ArtifactError(f"{path}: is a symbolic link; bundle files must be regular files")
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{path}: is not a regular file")
    if st.st_nlink != 1:
        # onnxruntime 1.32 follows a hard link to a file outside the bundle (reliability.md §2a).
        raise ArtifactError(f"{path}: has {st.st_nlink} hard links; bundle files must have "
                            f"exactly one")
    # O_NOFOLLOW closes the window between the lstat above and the open.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_ino != st.st_ino:
            raise ArtifactError(f"{path}: changed while being read")
        return f.read(limit)


def _read_verified(folder: Path, root: Path, entry: FileEntry) -> bytes:
    path = folder / entry.path
    if not path.resolve().is_relative_to(root):
        raise ArtifactError(f"{path}: resolves outside the bundle folder")
    data = _read_plain_file(path, entry.size + 1)  # never read more than the manifest promises
    if len(data) != entry.size:
        got = f"{len(data)}" if len(data) <= entry.size else f"more than {entry.size}"
        raise ArtifactError(f"{path}: size is {got} bytes, {MANIFEST_NAME} says {entry.size}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise ArtifactError(f"{path}: sha256 is {digest}, {MANIFEST_NAME} says {entry.sha256}")
    return data


def _reject_unlisted(folder: Path, manifest: Manifest) -> None:
    listed = {e.path for e in manifest.files} | {MANIFEST_NAME}
    for dirpath, dirnames, filenames in os.walk(folder):  # never follows directory links
        here = Path(dirpath)
        for name in dirnames:
            if (here / name).is_symlink():
                raise ArtifactError(f"{here / name}: is a symbolic link; not allowed in a bundle")
        for name in filenames:
            rel = (here / name).relative_to(folder).as_posix()
            if rel not in listed:
                raise ArtifactError(f"{here / name}: not listed in {MANIFEST_NAME} files "
                                    f"(a bundle holds only what its manifest lists)")


# ---------------------------------------------------------------------------------------------
# ONNX models


def _parse_model(path: Path, data: bytes) -> onnx.ModelProto:
    if not data:
        # onnx.load returns an empty ModelProto for an empty file, without an error.
        raise ArtifactError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from None
    if not model.graph.node or not model.opset_import:
        raise ArtifactError(f"{path}: not an ONNX model (no graph nodes or no opset)")
    bad = _non_utf8_field(model)
    if bad:
        raise ArtifactError(f"{path}: not an ONNX model (field {bad} is not valid UTF-8)")
    return model


def _non_utf8_field(message: Message) -> str:
    """The first string field holding bytes that are not UTF-8, or "". protobuf hands such
    a field to Python as `bytes` instead of `str`, which every later check would trip on."""
    for field, value in message.ListFields():
        # `is_repeated` in protobuf >= 5.28 (where `label` is gone); `label` before that.
        repeated = (field.is_repeated if hasattr(field, "is_repeated")
                    else field.label == FieldDescriptor.LABEL_REPEATED)
        values = value if repeated else [value]
        if field.type == FieldDescriptor.TYPE_STRING:
            if any(isinstance(v, bytes) for v in values):
                return f"{message.DESCRIPTOR.name}.{field.name}"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for v in values:
                bad = _non_utf8_field(v)
                if bad:
                    return bad
    return ""


def _initializer_names(graph: onnx.GraphProto) -> list[str]:
    return [t.name for t in graph.initializer] + [s.values.name for s in graph.sparse_initializer]


def _elem_dtype(elem_type: int) -> str:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return f"onnx type {elem_type}"


def _check_graph_io(path: Path, model: onnx.ModelProto, manifest: Manifest) -> None:
    weights = set(_initializer_names(model.graph))
    sides = (("inputs", [v for v in model.graph.input if v.name not in weights], manifest.inputs),
             ("outputs", list(model.graph.output), manifest.outputs))
    for side, graph_values, specs in sides:
        got = sorted(v.name for v in graph_values)
        want = sorted(s.name for s in specs)
        if got != want:
            raise ArtifactError(f"{path}: graph {side} {got} do not match {MANIFEST_NAME} "
                                f"{side} {want}")
        by_name = {v.name: v for v in graph_values}
        for spec in specs:
            tensor_type = by_name[spec.name].type.tensor_type
            dtype = _elem_dtype(tensor_type.elem_type)
            rank = len(tensor_type.shape.dim)
            if dtype != spec.dtype or rank != len(spec.shape):
                raise ArtifactError(f"{path}: graph {side[:-1]} {spec.name!r} is {dtype} rank "
                                    f"{rank}, {MANIFEST_NAME} says {spec.dtype} rank "
                                    f"{len(spec.shape)}")


def _node_tensors(nodes) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            graphs = [attr.g] if attr.HasField("g") else []
            for g in graphs + list(attr.graphs):
                yield from _graph_tensors(g)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _check_external_data(path: Path, model: onnx.ModelProto,
                         files: Mapping[str, bytes]) -> tuple[str, ...]:
    locations = []
    for tensor in _all_tensors(model):
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        if not external and not tensor.external_data:
            continue
        location = _check_external_tensor(path, tensor, files)
        if location not in locations:
            locations.append(location)
    return tuple(locations)


def _check_external_tensor(path: Path, tensor: onnx.TensorProto,
                           files: Mapping[str, bytes]) -> str:
    where = f"{path}: tensor {tensor.name!r}: external data"
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in EXTERNAL_DATA_KEYS:
            # onnxruntime only says "model format error!"; onnx used to setattr() these keys.
            raise ArtifactError(f"{where}: unknown key {entry.key!r}")
        if entry.key in entries:
            raise ArtifactError(f"{where}: duplicate key {entry.key!r}")
        entries[entry.key] = entry.value
    location = entries.get("location", "")
    if not all(PATH_PART_RE.fullmatch(p) for p in location.split("/")):
        raise ArtifactError(f"{where}: location {location!r} must be a relative path inside "
                            f"the bundle (no '..', no absolute path)")
    if location not in files:
        raise ArtifactError(f"{where}: location {location!r} is not listed in {MANIFEST_NAME}")
    size = len(files[location])
    offset = _ext_int(where, entries, "offset", 0)
    length = _ext_int(where, entries, "length", max(size - offset, 0))
    if offset + length > size:
        raise ArtifactError(f"{where}: offset {offset} + length {length} is past the end of "
                            f"{location!r} ({size} bytes)")
    return location


def _ext_int(where: str, entries: Mapping[str, str], key: str, default: int) -> int:
    if key not in entries:
        return default
    text = entries[key]
    if not text.isdigit() or len(text) > 20:
        raise ArtifactError(f"{where}: {key} must be a non-negative integer, got {text[:40]!r}")
    return int(text)


# ---------------------------------------------------------------------------------------------
# golden.npz


_GOLDEN_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error,
                  NotImplementedError, OverflowError)


def _load_golden(folder: Path, manifest: Manifest, data: bytes) -> tuple[GoldenSample, ...]:
    path = folder / manifest.golden.file
    if not data.startswith(ZIP_MAGIC):
        # np.load would fall back to unpickling and say "pickled data", which misleads.
        raise ArtifactError(f"{path}: not a zip/npz archive")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return tuple(_golden_case(path, manifest, archive, i)
                         for i in range(len(manifest.golden.cases)))
    except _GOLDEN_ERRORS as e:
        raise ArtifactError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _golden_case(path: Path, manifest: Manifest, archive: zipfile.ZipFile,
                 index: int) -> GoldenSample:
    case = manifest.golden.cases[index]
    inputs = {name: _npz_array(path, archive, key) for name, key in case.inputs.items()}
    outputs = {name: _npz_array(path, archive, key) for name, key in case.outputs.items()}
    try:
        inputs, sizes = check_feed(manifest, inputs)
    except InputError as e:
        raise ArtifactError(f"{path}: golden.cases[{index}]: {e}") from None
    for spec in manifest.outputs:
        arr = outputs[spec.name]
        label = f"{path}: golden.cases[{index}]: output {spec.name!r}"
        problems = shape_problems(label, spec, arr.shape, manifest.dims, sizes)
        if arr.dtype.name != spec.dtype:
            problems.insert(0, f"{label}: expected dtype {spec.dtype}, got {arr.dtype.name}")
        if problems:
            raise ArtifactError("; ".join(problems))
    return GoldenSample(dict(case.point), inputs, outputs)


def _npz_array(path: Path, archive: zipfile.ZipFile, key: str) -> np.ndarray:
    member = key + ".npy"
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise ArtifactError(f"{path}: key {key!r} is missing") from None
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
    if dtype.kind not in NUMERIC_KINDS or dtype.hasobject:
        raise ArtifactError(f"{path}: key {key!r} has dtype {dtype}, not a numeric dtype "
                            f"(object arrays would need pickle)")
    # A header can claim 10**12 elements; refuse before numpy allocates them.
    if math.prod(shape) * dtype.itemsize > info.file_size:
        raise ArtifactError(f"{path}: key {key!r} claims shape {list(shape)}, more than the "
                            f"{info.file_size} bytes stored")
    with archive.open(info) as f:
        arr = np.lib.format.read_array(f, allow_pickle=False)
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))
