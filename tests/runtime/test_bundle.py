"""Bundle reader: every bad bundle on disk ends in an ArtifactError naming the file."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from runtime import ArtifactError, Runner, load_bundle

RNG_SEED = 99
D = 8


def _set_location(kit, bundle: Path, location: str, *, extra_key=None) -> None:
    def edit(model):
        (w,) = [t for t in model.graph.initializer if t.name == "W"]
        for entry in w.external_data:
            if entry.key == "location":
                entry.value = location
        if extra_key:
            entry = w.external_data.add()
            entry.key, entry.value = extra_key

    kit.rewrite_model(bundle / "model.onnx", edit)
    kit.resign(bundle)


@pytest.fixture
def session_spy(monkeypatch):
    """Records every InferenceSession that would be created."""
    calls = []
    real = onnxruntime.InferenceSession

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    return calls


def test_good_bundles_load(tiny_bundle, tiny_bundle_ext):
    b = load_bundle(tiny_bundle)
    assert b.weights["base"] == {"W", "axes"} and b.data_files == {"base": (), "alt": ()}
    assert [g.point for g in b.golden] == [{"batch": 2, "seq": 5}, {"batch": 1, "seq": 3}]
    assert b.golden[0].inputs["x"].shape == (2, 5, D)
    ext = load_bundle(tiny_bundle_ext)
    assert ext.data_files["base"] == ("model.onnx.data",)
    assert (
        ext.external_data("base")["model.onnx.data"]
        == (tiny_bundle_ext / "model.onnx.data").read_bytes()
    )


def test_flipped_bit_is_refused_before_any_session(tiny_bundle, session_spy):
    path = tiny_bundle / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(
        ArtifactError,
        match=r"model.onnx: sha256 is [0-9a-f]{64}, "
        r"manifest.json says [0-9a-f]{64}",
    ):
        Runner(tiny_bundle, provider="cpu")
    assert session_spy == []


def test_flipped_bit_in_external_data(tiny_bundle_ext, session_spy):
    path = tiny_bundle_ext / "model.onnx.data"
    data = bytearray(path.read_bytes())
    data[3] ^= 0x40  # an exponent bit of W[0, 0]
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model.onnx.data: sha256 is"):
        Runner(tiny_bundle_ext, provider="cpu")
    assert session_spy == []


def test_truncated_model_fails_on_size(tiny_bundle):
    path = tiny_bundle / "model.onnx"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    with pytest.raises(
        ArtifactError,
        match=rf"model.onnx: size is {size // 2} bytes, "
        rf"manifest.json says {size}",
    ):
        load_bundle(tiny_bundle)


def test_longer_file_fails_on_size(tiny_bundle):
    path = tiny_bundle / "golden.npz"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match=rf"golden.npz: size is more than {size} bytes"):
        load_bundle(tiny_bundle)


def test_truncated_at_opset_boundary_even_when_resigned(kit, tiny_bundle, session_spy):
    # The one truncation that still parses: everything but the trailing opset_import field.
    path = tiny_bundle / "model.onnx"
    model = __import__("onnx").load(str(path))
    del model.opset_import[:]
    cut = len(model.SerializeToString())
    path.write_bytes(path.read_bytes()[:cut])
    kit.resign(tiny_bundle)
    with pytest.raises(
        ArtifactError,
        match=r"model.onnx: not an ONNX model \(no graph nodes "
        r"or no opset\)",
    ):
        Runner(tiny_bundle, provider="cpu")
    assert session_spy == []


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", r"model.onnx: empty file, not an ONNX model"),
        (
            np.random.default_rng(RNG_SEED).bytes(4096),
            r"model.onnx: not an ONNX model \(DecodeError",
        ),
        (b"<html><body>404</body></html>\n", r"model.onnx: not an ONNX model"),
    ],
    ids=["empty", "random_bytes", "html"],
)
def test_garbage_model_with_matching_hash(kit, tiny_bundle, session_spy, content, match):
    (tiny_bundle / "model.onnx").write_bytes(content)
    kit.resign(tiny_bundle)  # a manifest generated over garbage
    with pytest.raises(ArtifactError, match=match):
        Runner(tiny_bundle, provider="cpu")
    assert session_spy == []


def test_model_onnxruntime_rejects_is_wrapped(kit, tiny_bundle):
    kit.rewrite_model(
        tiny_bundle / "model.onnx", lambda m: m.opset_import[0].__setattr__("version", 99)
    )
    kit.resign(tiny_bundle)
    with pytest.raises(ArtifactError, match=r"model.onnx: onnxruntime cannot load it: .*opset"):
        Runner(tiny_bundle, provider="cpu", variant="base")


@pytest.mark.parametrize(
    "location",
    ["../outside.data", "/etc/passwd", "sub/../../x.data", "./model.onnx.data", ""],
    ids=["dotdot", "absolute", "nested_dotdot", "dot", "empty"],
)
def test_external_location_must_stay_inside(kit, tiny_bundle_ext, location, session_spy):
    shutil.copy(tiny_bundle_ext / "model.onnx.data", tiny_bundle_ext.parent / "outside.data")
    _set_location(kit, tiny_bundle_ext, location)
    with pytest.raises(
        ArtifactError,
        match=rf"model.onnx: tensor 'W': external data: location "
        rf"'{location}' must be a relative path inside",
    ):
        Runner(tiny_bundle_ext, provider="cpu")
    assert session_spy == []


def test_external_location_must_be_listed(kit, tiny_bundle_ext):
    shutil.copy(tiny_bundle_ext / "model.onnx.data", tiny_bundle_ext / "other.data")
    _set_location(kit, tiny_bundle_ext, "other.data")
    with pytest.raises(ArtifactError, match=r"other.data: not listed in manifest.json files"):
        load_bundle(tiny_bundle_ext)
    (tiny_bundle_ext / "other.data").unlink()
    with pytest.raises(
        ArtifactError,
        match=r"location 'other.data' is not listed in "
        r"manifest.json",
    ):
        load_bundle(tiny_bundle_ext)


@pytest.mark.parametrize(
    "key,match",
    [
        (("__class__", "x"), r"external data: unknown key '__class__'"),
        (("location", "model.onnx.data"), r"external data: duplicate key 'location'"),
        (("offset", "-8"), r"external data: offset must be a non-negative integer, got '-8'"),
        (
            ("length", "999999999"),
            r"external data: offset 0 \+ length 999999999 is past the end "
            r"of 'model.onnx.data' \(256 bytes\)",
        ),
    ],
    ids=["unknown_key", "duplicate_key", "negative_offset", "length_past_eof"],
)
def test_external_data_entries(kit, tiny_bundle_ext, key, match):
    def edit(model):
        (w,) = [t for t in model.graph.initializer if t.name == "W"]
        kept = [
            (e.key, e.value)
            for e in w.external_data
            if e.key != key[0] or key[0] in ("location", "__class__")
        ]
        del w.external_data[:]
        for k, v in [*kept, key]:
            entry = w.external_data.add()
            entry.key, entry.value = k, v

    kit.rewrite_model(tiny_bundle_ext / "model.onnx", edit)
    kit.resign(tiny_bundle_ext)
    with pytest.raises(ArtifactError, match=match):
        load_bundle(tiny_bundle_ext)


def test_offset_past_eof(kit, tiny_bundle_ext):
    def edit(model):
        (w,) = [t for t in model.graph.initializer if t.name == "W"]
        del w.external_data[:]
        for k, v in [("location", "model.onnx.data"), ("offset", "4096")]:
            entry = w.external_data.add()
            entry.key, entry.value = k, v

    kit.rewrite_model(tiny_bundle_ext / "model.onnx", edit)
    kit.resign(tiny_bundle_ext)
    with pytest.raises(ArtifactError, match=r"offset 4096 \+ length 0 is past the end"):
        load_bundle(tiny_bundle_ext)


def test_symlinked_data_file(tiny_bundle_ext, session_spy):
    outside = tiny_bundle_ext.parent / "outside.data"
    shutil.copy(tiny_bundle_ext / "model.onnx.data", outside)  # same bytes: the hash matches
    (tiny_bundle_ext / "model.onnx.data").unlink()
    (tiny_bundle_ext / "model.onnx.data").symlink_to(outside)
    with pytest.raises(ArtifactError, match=r"model.onnx.data: resolves outside the bundle"):
        Runner(tiny_bundle_ext, provider="cpu")
    assert session_spy == []


def test_symlink_inside_the_bundle(tiny_bundle_ext):
    # Even a link that stays inside is refused: only regular files are trusted.
    data = tiny_bundle_ext / "model.onnx.data"
    data.rename(tiny_bundle_ext / "real.data")
    data.symlink_to(tiny_bundle_ext / "real.data")
    with pytest.raises(ArtifactError, match=r"model.onnx.data: is a symbolic link"):
        load_bundle(tiny_bundle_ext)


def test_hard_link_to_outside_file(tiny_bundle_ext, session_spy):
    outside = tiny_bundle_ext.parent / "outside.data"
    shutil.copy(tiny_bundle_ext / "model.onnx.data", outside)
    (tiny_bundle_ext / "model.onnx.data").unlink()
    os.link(outside, tiny_bundle_ext / "model.onnx.data")  # onnxruntime 1.32 would follow this
    with pytest.raises(
        ArtifactError,
        match=r"model.onnx.data: has 2 hard links; bundle files "
        r"must have exactly one",
    ):
        Runner(tiny_bundle_ext, provider="cpu")
    assert session_spy == []


def test_symlinked_folder(tiny_bundle, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tiny_bundle / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ArtifactError, match=r"sub: is a symbolic link; not allowed in a bundle"):
        load_bundle(tiny_bundle)


def test_listed_file_behind_a_folder_link(kit, tiny_bundle, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tiny_bundle / "golden.npz", tmp_path / "elsewhere" / "golden.npz")
    (tiny_bundle / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    d = kit.read_manifest(tiny_bundle)
    d["files"].append({**d["files"][0], "path": "sub/golden.npz"})
    kit.write_manifest(tiny_bundle, d)
    kit.resign(tiny_bundle)
    with pytest.raises(ArtifactError, match=r"sub/golden.npz: resolves outside the bundle"):
        load_bundle(tiny_bundle)


def test_missing_file(tiny_bundle):
    (tiny_bundle / "golden.npz").unlink()
    with pytest.raises(ArtifactError, match=r"golden.npz: no such file"):
        load_bundle(tiny_bundle)


def test_listed_path_that_is_a_folder(tiny_bundle):
    (tiny_bundle / "golden.npz").unlink()
    (tiny_bundle / "golden.npz").mkdir()
    with pytest.raises(ArtifactError, match=r"golden.npz: is not a regular file"):
        load_bundle(tiny_bundle)


def test_unlisted_file(tiny_bundle):
    (tiny_bundle / "notes.txt").write_text("hello")
    with pytest.raises(ArtifactError, match=r"notes.txt: not listed in manifest.json files"):
        load_bundle(tiny_bundle)


def test_not_a_folder(tmp_path):
    with pytest.raises(ArtifactError, match=r"nope: not a bundle folder"):
        load_bundle(tmp_path / "nope")


def test_missing_manifest(tiny_bundle):
    (tiny_bundle / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest.json: no such file"):
        load_bundle(tiny_bundle)


def test_malformed_manifest_names_folder_and_key(kit, tiny_bundle):
    d = kit.read_manifest(tiny_bundle)
    del d["opset"]
    kit.write_manifest(tiny_bundle, d)
    with pytest.raises(ArtifactError, match=rf"^{tiny_bundle}/manifest.json: opset: missing"):
        load_bundle(tiny_bundle)


def test_file_swapped_during_read(tiny_bundle, monkeypatch):
    real = os.fstat

    def other_inode(fd):
        st = real(fd)
        return os.stat_result((st.st_mode, st.st_ino + 1, *tuple(st)[2:]))

    monkeypatch.setattr(os, "fstat", other_inode)
    with pytest.raises(ArtifactError, match=r"manifest.json: changed while being read"):
        load_bundle(tiny_bundle)


def test_graph_outputs_must_match_manifest(kit, tiny_bundle):
    kit.rewrite_model(
        tiny_bundle / "model.alt.onnx",
        lambda m: (
            m.graph.output[0].__setattr__("name", "z"),
            m.graph.node[-1].output.__setitem__(0, "z"),
        ),
    )
    kit.resign(tiny_bundle)
    with pytest.raises(
        ArtifactError,
        match=r"model.alt.onnx: graph outputs \['z'\] do not match "
        r"manifest.json outputs \['y'\]",
    ):
        load_bundle(tiny_bundle)


def test_graph_input_dtype_must_match_manifest(kit, tiny_bundle):
    d = kit.read_manifest(tiny_bundle)
    d["inputs"][0]["dtype"] = "float16"
    kit.write_manifest(tiny_bundle, d)
    with pytest.raises(
        ArtifactError,
        match=r"model.onnx: graph input 'x' is float32 rank 3, "
        r"manifest.json says float16 rank 3",
    ):
        load_bundle(tiny_bundle)


# ---------------------------------------------------------------------------------------------
# golden.npz


def _rewrite_golden(kit, bundle: Path, **changes) -> None:
    with np.load(bundle / "golden.npz") as z:
        arrays = dict(z)
    arrays.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del arrays[key]
    np.savez(bundle / "golden.npz", **arrays)
    kit.resign(bundle)


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    marker: Path

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_object_array_in_golden_runs_no_code(kit, tiny_bundle, tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    obj = np.empty(1, dtype=object)
    obj[0] = payload
    pickle.dumps(obj)  # sanity: the payload pickles
    _rewrite_golden(kit, tiny_bundle, **{"case0.out.y": obj})
    with pytest.raises(
        ArtifactError,
        match=r"golden.npz: key 'case0.out.y' has dtype object, "
        r"not a numeric dtype",
    ):
        load_bundle(tiny_bundle)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content,match",
    [
        (np.random.default_rng(RNG_SEED).bytes(512), r"golden.npz: not a zip/npz archive"),
        (b"PK\x03\x04" + b"\0" * 60, r"golden.npz: cannot be read \(BadZipFile"),
    ],
    ids=["random_bytes", "truncated_zip"],
)
def test_golden_garbage(kit, tiny_bundle, content, match):
    (tiny_bundle / "golden.npz").write_bytes(content)
    kit.resign(tiny_bundle)
    with pytest.raises(ArtifactError, match=match):
        load_bundle(tiny_bundle)


def test_golden_missing_key(kit, tiny_bundle):
    _rewrite_golden(kit, tiny_bundle, **{"case1.in.m": None})
    with pytest.raises(ArtifactError, match=r"golden.npz: key 'case1.in.m' is missing"):
        load_bundle(tiny_bundle)


def test_golden_shape_differs_from_spec(kit, tiny_bundle):
    _rewrite_golden(kit, tiny_bundle, **{"case0.out.y": np.zeros((2, 4, D), np.float32)})
    with pytest.raises(
        ArtifactError,
        match=r"golden.cases\[0\]: output 'y': axis 1 \('seq'\) "
        r"expected 5 \(as in Input 'x'\), got 4",
    ):
        load_bundle(tiny_bundle)


def test_golden_input_dtype_differs_from_spec(kit, tiny_bundle):
    _rewrite_golden(kit, tiny_bundle, **{"case0.in.x": np.zeros((2, 5, D), np.float64)})
    with pytest.raises(
        ArtifactError,
        match=r"golden.cases\[0\]: Input 'x': expected dtype "
        r"float32, got float64",
    ):
        load_bundle(tiny_bundle)


def test_golden_output_dtype_differs_from_spec(kit, tiny_bundle):
    _rewrite_golden(kit, tiny_bundle, **{"case0.out.y": np.zeros((2, 5, D), np.float16)})
    with pytest.raises(ArtifactError, match=r"output 'y': expected dtype float32, got float16"):
        load_bundle(tiny_bundle)


def test_golden_header_claiming_a_huge_array(kit, tiny_bundle):
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
    header["shape"] = (10**12,)
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(b"\0" * 64)
    with np.load(tiny_bundle / "golden.npz") as z:
        arrays = dict(z)
    with zipfile.ZipFile(tiny_bundle / "golden.npz", "w") as archive:
        for k, v in arrays.items():
            if k != "case0.out.y":
                with archive.open(k + ".npy", "w") as f:
                    np.lib.format.write_array(f, v)
        archive.writestr("case0.out.y.npy", buf.getvalue())
    kit.resign(tiny_bundle)
    with pytest.raises(ArtifactError, match=r"key 'case0.out.y' claims shape \[1000000000000\]"):
        load_bundle(tiny_bundle)


def test_big_endian_golden_is_normalized(kit, tiny_bundle):
    with np.load(tiny_bundle / "golden.npz") as z:
        big = z["case0.in.x"].astype(">f4")
    _rewrite_golden(kit, tiny_bundle, **{"case0.in.x": big})
    b = load_bundle(tiny_bundle)
    x = b.golden[0].inputs["x"]
    assert x.dtype.isnative and np.array_equal(x, big)
    with Runner(b, provider="cpu") as r:
        y = r.run(dict(b.golden[0].inputs))["y"]
    np.testing.assert_allclose(y, b.golden[0].outputs["y"], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Paths and races


def test_odd_folder_name_and_other_cwd(_templates, tmp_path, monkeypatch):
    # Regression: external data loaded from bytes must not resolve against the CWD.
    bundle = Path(shutil.copytree(_templates["external"], tmp_path / "my bündle dir"))
    monkeypatch.chdir(tmp_path)
    b = load_bundle(bundle)
    with Runner(b, provider="cpu") as r:
        y = r.run(dict(b.golden[0].inputs))["y"]
    np.testing.assert_allclose(y, b.golden[0].outputs["y"], atol=1e-5, rtol=1e-4)


def test_data_swapped_after_check_is_never_read(tiny_bundle_ext):
    b = load_bundle(tiny_bundle_ext)
    (tiny_bundle_ext / "model.onnx.data").write_bytes(b"\0" * 256)  # after the hash check
    with Runner(b, provider="cpu", variant="base") as r:
        y = r.run(dict(b.golden[0].inputs))["y"]
    np.testing.assert_allclose(y, b.golden[0].outputs["y"], atol=1e-5, rtol=1e-4)


def test_non_utf8_string_in_model(kit, tiny_bundle):
    # protobuf hands invalid UTF-8 in a string field to Python as bytes (found by the fuzzer).
    path = tiny_bundle / "model.alt.onnx"
    data = path.read_bytes()
    assert data.count(b"softmax") == 1  # the node name; the op type is "Softmax"
    path.write_bytes(data.replace(b"softmax", b"softma\xff"))
    kit.resign(tiny_bundle)
    with pytest.raises(
        ArtifactError,
        match=r"model.alt.onnx: not an ONNX model \(field "
        r"NodeProto.name is not valid UTF-8\)",
    ):
        load_bundle(tiny_bundle)
