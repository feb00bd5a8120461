"""A tiny bundle built without torch: onnx.helper graph, numpy golden outputs, our manifest types.

Graph (opset 18), b batch, s sequence, d = 8:
    x [b, s, d], m [b, d]  ->  y = softmax(x @ W + m[:, None, :], axis=-1)  [b, s, d]
`m` shares the `batch` dim with `x`, so shared-dim checks have something to test.

Variants: "base" = model.onnx (providers CPU, CUDA), "alt" = model.alt.onnx (CPU only).
`make_bundle(dir, external=True)` stores base's weights in model.onnx.data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime import (
    DimRange,
    FileEntry,
    Golden,
    GoldenCase,
    Manifest,
    TensorSpec,
    Tolerance,
    ToleranceTable,
    ValueRange,
    Variant,
    compare,
    parity_record,
)

D = 8
OPSET = 18
SEED = 1234
DIMS = {"batch": DimRange(1, 4), "seq": DimRange(1, 16)}
GOLDEN_POINTS = ({"batch": 2, "seq": 5}, {"batch": 1, "seq": 3})
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def weight() -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal((D, D)).astype(np.float32)


def build_model(w: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", D])
    m = helper.make_tensor_value_info("m", TensorProto.FLOAT, ["batch", D])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", D])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
        helper.make_node("Unsqueeze", ["m", "axes"], ["mu"], name="unsqueeze"),  # [b, 1, d]
        helper.make_node("Add", ["h", "mu"], ["s"], name="add"),
        helper.make_node("Softmax", ["s"], ["y"], name="softmax", axis=-1),
    ]
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]
    graph = helper.make_graph(nodes, "tiny", [x, m], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def reference(x: np.ndarray, m: np.ndarray, w: np.ndarray) -> np.ndarray:
    s = x.astype(np.float64) @ w.astype(np.float64) + m.astype(np.float64)[:, None, :]
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def make_inputs(point: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, s = point["batch"], point["seq"]
    return {
        "x": rng.standard_normal((b, s, D)).astype(np.float32),
        "m": rng.standard_normal((b, D)).astype(np.float32),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_entries(folder: Path) -> tuple[FileEntry, ...]:
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    return tuple(
        FileEntry(p.relative_to(folder).as_posix(), sha256(p), p.stat().st_size) for p in paths
    )


def make_bundle(folder: Path, *, external: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    w = weight()
    model = build_model(w)
    if external:
        onnx.save_model(
            model,
            folder / "model.onnx",
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
            size_threshold=64,
        )  # W (256 B) external, axes inline
    else:
        onnx.save_model(model, folder / "model.onnx")
    onnx.save_model(build_model(w), folder / "model.alt.onnx")

    arrays, cases = {}, []
    for i, point in enumerate(GOLDEN_POINTS):
        feed = make_inputs(point, seed=i)
        arrays.update({f"case{i}.in.{k}": v for k, v in feed.items()})
        arrays[f"case{i}.out.y"] = reference(feed["x"], feed["m"], w)
        keys = {k: f"case{i}.in.{k}" for k in feed}
        cases.append(GoldenCase(point, keys, {"y": f"case{i}.out.y"}))
    np.savez(folder / "golden.npz", **arrays)

    tolerance = {"float32": Tolerance(1e-5, 1e-4)}
    variants = (
        Variant("base", "model.onnx", (CPU, CUDA), tolerance, {}),
        Variant("alt", "model.alt.onnx", (CPU,), tolerance, {}),
    )
    manifest = Manifest(
        name="tiny",
        source={
            "target": "tests.runtime.conftest:build_model",
            "class": "onnx.helper",
            "config": {"d": D},
        },
        producer={"attnx": "0.1.0", "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        opset=OPSET,
        inputs=(
            TensorSpec("x", "float32", ("batch", "seq", D)),
            TensorSpec("m", "float32", ("batch", D)),
        ),
        outputs=(TensorSpec("y", "float32", ("batch", "seq", D)),),
        dims=DIMS,
        files=file_entries(folder),
        variants=variants,
        parity=tuple(_parity(folder, v, arrays, cases) for v in variants),
        golden=Golden("golden.npz", tuple(cases)),
        # as the exporter writes them: CPU medians, none for CUDA (exported without a GPU)
        extra={"variants": {"base": {"median_ms": {CPU: 1.0}}, "alt": {"median_ms": {CPU: 2.0}}}},
    )
    (folder / "manifest.json").write_text(manifest.to_json())
    return folder


VOCAB = 11


def make_ids_bundle(folder: Path) -> Path:
    """An embedding lookup: ids [batch, seq] (int64, 0 <= id < VOCAB) -> y [batch, seq, D],
    as an exporter writes it: the ids input carries its value range."""
    folder.mkdir(parents=True, exist_ok=True)
    table = np.random.default_rng(SEED).standard_normal((VOCAB, D)).astype(np.float32)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", D])
    node = helper.make_node("Gather", ["E", "ids"], ["y"], name="embed", axis=0)
    graph = helper.make_graph([node], "ids", [ids], [y], [numpy_helper.from_array(table, "E")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.save_model(model, folder / "model.onnx")
    feed = np.array([[0, 3, VOCAB - 1]], np.int64)
    np.savez(folder / "golden.npz", **{"case0.in.ids": feed, "case0.out.y": table[feed]})
    case = GoldenCase({"batch": 1, "seq": 3}, {"ids": "case0.in.ids"}, {"y": "case0.out.y"})
    manifest = Manifest(
        name="ids",
        source={"target": "tests.runtime.conftest:make_ids_bundle", "class": "onnx.helper"},
        producer={"attnx": "0.1.0", "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        opset=OPSET,
        inputs=(TensorSpec("ids", "int64", ("batch", "seq"), ValueRange(0, VOCAB - 1)),),
        outputs=(TensorSpec("y", "float32", ("batch", "seq", D)),),
        dims=DIMS,
        files=file_entries(folder),
        variants=(Variant("base", "model.onnx", (CPU,), {"float32": Tolerance(0.0, 0.0)}),),
        parity=(),
        golden=Golden("golden.npz", (case,)),
    )
    (folder / "manifest.json").write_text(manifest.to_json())
    return folder


def _parity(folder, variant, arrays, cases):
    session = ort.InferenceSession(str(folder / variant.file), providers=[CPU])
    case = cases[0]
    feed = {k: arrays[key] for k, key in case.inputs.items()}
    (y,) = session.run(["y"], feed)
    records = compare(
        {"y": y}, {"y": arrays[case.outputs["y"]]}, ToleranceTable.from_variant(variant)
    )
    return parity_record(variant.name, CPU, case.point, records)


# ---------------------------------------------------------------------------------------------
# Tampering helpers


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def write_manifest(folder: Path, d: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(d, indent=2))


def resign(folder: Path) -> None:
    """Recompute sha256 and size of every listed file that still exists (a "manifest generated
    over garbage"), so that tests reach the checks behind the hash check."""
    d = read_manifest(folder)
    for entry in d["files"]:
        path = folder / entry["path"]
        if path.is_file():
            entry["sha256"], entry["size"] = sha256(path), path.stat().st_size
    write_manifest(folder, d)


@pytest.fixture(scope="session")
def _templates(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("templates")
    return {
        "inline": make_bundle(root / "inline"),
        "external": make_bundle(root / "external", external=True),
    }


@pytest.fixture
def tiny_bundle(_templates, tmp_path) -> Path:
    """A fresh copy of the inline tiny bundle, free to tamper with."""
    return Path(shutil.copytree(_templates["inline"], tmp_path / "bundle"))


@pytest.fixture
def tiny_bundle_ext(_templates, tmp_path) -> Path:
    """A fresh copy of the tiny bundle whose base weights live in model.onnx.data."""
    return Path(shutil.copytree(_templates["external"], tmp_path / "bundle_ext"))


@pytest.fixture
def manifest_dict(_templates) -> dict:
    return read_manifest(_templates["inline"])


def rewrite_model(path: Path, edit) -> None:
    """Apply `edit(model)` to a saved model without touching its external data, and write the
    bytes directly (onnx.save would refuse some of the broken models the tests need)."""
    model = onnx.load(str(path), load_external_data=False)
    edit(model)
    path.write_bytes(model.SerializeToString())


def has_cuda() -> bool:
    return CUDA in ort.get_available_providers()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="onnxruntime has no CUDAExecutionProvider here")
    for item in items:
        if item.get_closest_marker("cuda") and not has_cuda():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The builder and tampering helpers, for test modules (pytest's importlib mode does not
    let them import this conftest)."""
    return SimpleNamespace(
        D=D,
        CPU=CPU,
        CUDA=CUDA,
        make_bundle=make_bundle,
        make_ids_bundle=make_ids_bundle,
        VOCAB=VOCAB,
        make_inputs=make_inputs,
        reference=reference,
        weight=weight,
        read_manifest=read_manifest,
        write_manifest=write_manifest,
        resign=resign,
        rewrite_model=rewrite_model,
        has_cuda=has_cuda,
        sha256=sha256,
    )
