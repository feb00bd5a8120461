"""`attnx triton`: a model repository per bundle, every config.pbtxt parsed with tritonclient's
model_config protobuf and checked against the manifest; wrong configs are refused."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("tritonclient", reason="needs the [serve] extra: pip install 'attnx[serve]'")

from google.protobuf import text_format  # noqa: E402

from export._cli import main  # noqa: E402
from runtime import ArtifactError, InputError, load_bundle  # noqa: E402
from runtime.serve import _triton as triton  # noqa: E402
from runtime.serve._triton import (  # noqa: E402
    check_config,
    check_model_dir,
    plan_model,
    write_repository,
)
from tests.runtime.conftest import make_bundle  # noqa: E402

pb2 = triton.model_config_pb2()


def parse(path: Path):
    return text_format.Parse(path.read_text(), pb2.ModelConfig())


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def batched_on_axis_0(manifest) -> bool:
    """Written out independently of runtime.serve._protocol.batch_dim."""
    return all(s.shape and s.shape[0] == "batch" for s in manifest.inputs + manifest.outputs)


# ---------------------------------------------------------------------------------------------
# Every zoo bundle


@pytest.fixture(scope="module")
def zoo_repo(zoo_base_bundles, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton_zoo")
    code = main(
        [
            "triton",
            *map(str, zoo_base_bundles.values()),
            "--repo",
            str(repo),
            "--warmup",
            "--seq-buckets",
            "1,8",
        ]
    )
    return code, repo


def test_every_zoo_bundle_gets_a_config_that_parses_and_matches(zoo_repo, zoo_base_bundles):
    code, repo = zoo_repo
    assert code == 0
    assert sorted(p.name for p in repo.iterdir()) == sorted(zoo_base_bundles)
    for name, folder in zoo_base_bundles.items():
        bundle = load_bundle(folder)
        m = bundle.manifest
        config = parse(repo / name / "config.pbtxt")  # tritonclient's protobuf, directly
        check_model_dir(repo / name, m)  # and the semantic check
        batched = batched_on_axis_0(m)
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == (m.dims["batch"].max if batched else 0), name
        assert config.HasField("dynamic_batching") == batched
        for entries, specs in ((config.input, m.inputs), (config.output, m.outputs)):
            assert [e.name for e in entries] == [s.name for s in specs]
            for e, s in zip(entries, specs, strict=True):
                shape = s.shape[1:] if batched else s.shape
                assert list(e.dims) == [d if isinstance(d, int) else -1 for d in shape], name
        assert [w.name for w in config.model_warmup] == ["golden0", "golden1", "seq_1", "seq_8"]
        header = (repo / name / "config.pbtxt").read_text().replace("\n# ", " ")
        chosen = re.search(r"\(variant '(\w+)'\)", header)
        variant = next(v for v in m.variants if v.name == chosen.group(1))
        assert "CPUExecutionProvider" in variant.providers
        assert (repo / name / "1" / "model.onnx").read_bytes() == bundle.files[variant.file]


def test_zoo_dims_and_types_written_out(zoo_repo):
    _, repo = zoo_repo

    def dims(model, kind, name):
        config = parse(repo / model / "config.pbtxt")
        entry = next(e for e in getattr(config, kind) if e.name == name)
        return pb2.DataType.Name(entry.data_type), list(entry.dims)

    assert dims("mha_self", "input", "x") == ("TYPE_FP32", [-1, 32])
    assert dims("mha_self", "input", "key_padding_mask") == ("TYPE_BOOL", [-1])
    assert dims("sdpa", "input", "attn_mask") == ("TYPE_BOOL", [1, -1, -1])
    assert dims("kv_cache", "output", "present_key") == ("TYPE_FP32", [2, -1, 8])
    assert dims("decoder_lm", "input", "input_ids") == ("TYPE_INT64", [-1, -1])
    assert dims("decoder_lm", "input", "past_keys") == ("TYPE_FP32", [2, -1, 2, -1, 8])
    assert parse(repo / "decoder_lm" / "config.pbtxt").max_batch_size == 0


def test_cli_warns_about_equal_shapes_and_explains_max_batch_size_0(
    zoo_base_bundles, tmp_path, capsys
):
    code, out, err = run_cli(
        [
            "triton",
            str(zoo_base_bundles["mha_self"]),
            str(zoo_base_bundles["decoder_lm"]),
            "--repo",
            str(tmp_path / "r"),
        ],
        capsys,
    )
    assert code == 0
    assert re.search(
        r"attnx: warning: Triton's dynamic batcher batches only requests with "
        r"equal non-batch shapes, and these dims vary per request: mha_self seq;",
        err,
    )
    assert (
        "attnx: note: decoder_lm: max_batch_size 0 (Triton will not batch it): 'past_keys' "
        "has 'batch' at axis 1, not at axis 0" in err
    )
    assert "mha_self: " in out and out.strip().endswith("checked against its manifest")


# ---------------------------------------------------------------------------------------------
# Files


def test_external_data_lands_beside_the_model_and_onnxruntime_runs_it(tmp_path):
    bundle_dir = make_bundle(tmp_path / "tiny", external=True)
    written = write_repository([bundle_dir], tmp_path / "repo", warmup=True)
    model_dir = written[0].path
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.onnx", "model.onnx.data"]
    assert (model_dir / "1" / "model.onnx.data").read_bytes() == (
        bundle_dir / "model.onnx.data"
    ).read_bytes()
    bundle = load_bundle(bundle_dir)
    golden = bundle.golden[0]
    session = ort.InferenceSession(
        str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (y,) = session.run(["y"], dict(golden.inputs))
    np.testing.assert_allclose(y, golden.outputs["y"], atol=1e-5, rtol=1e-4)
    # Warm-up data: sample 0 of each golden input, raw little-endian, per the config's dims.
    config = parse(model_dir / "config.pbtxt")
    warm = config.model_warmup[0].inputs["x"]
    assert list(warm.dims) == list(golden.inputs["x"].shape[1:])
    raw = (model_dir / "warmup" / warm.input_data_file).read_bytes()
    assert raw == golden.inputs["x"][:1].astype("<f4").tobytes()


def test_options_reach_the_config(zoo_base_bundles, tmp_path):
    repo = tmp_path / "r"
    write_repository(
        [zoo_base_bundles["mha_self"]],
        repo,
        max_batch_size=4,
        kind="gpu",
        instances=3,
        batch_delay_us=250,
    )
    config = parse(repo / "mha_self" / "config.pbtxt")
    assert config.max_batch_size == 4
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    group = config.instance_group[0]
    assert group.count == 3 and pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU"
    write_repository([zoo_base_bundles["mha_self"]], repo, max_batch_size=0)
    config = parse(repo / "mha_self" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [-1, -1, 32]
    assert sorted(p.name for p in repo.iterdir()) == ["mha_self"]  # replaced, no leftovers


def test_seq_buckets_are_listed_and_warmed_up(zoo_base_bundles, tmp_path):
    write_repository([zoo_base_bundles["sdpa"]], tmp_path, seq_buckets=[16, 64])
    text = (tmp_path / "sdpa" / "config.pbtxt").read_text()
    assert "# Padding buckets for 'seq': 16, 64." in text
    config = parse(tmp_path / "sdpa" / "config.pbtxt")
    warm = {w.name: w for w in config.model_warmup}
    assert list(warm) == ["seq_16", "seq_64"]
    mask = warm["seq_64"].inputs["attn_mask"]
    assert mask.zero_data and list(mask.dims)[:2] == [1, 64]


def test_an_opset_23_variant_says_what_triton_needs(served_bundles, tmp_path):
    model = plan_model(load_bundle(served_bundles["sdpa"]), variant="attention23")
    assert model.opsets[""] == 23
    assert (
        "sdpa: variant 'attention23' needs ai.onnx opset 23 in Triton's onnxruntime "
        "backend (--variant base for opset 18)" in model.notes
    )
    write_repository([served_bundles["sdpa"]], tmp_path, variant="attention23")
    assert "# The graph's opsets: ai.onnx 23;" in (tmp_path / "sdpa" / "config.pbtxt").read_text()


def test_a_failed_write_leaves_the_old_folder_and_no_temporary(
    zoo_base_bundles, tmp_path, monkeypatch
):
    bundle = zoo_base_bundles["mha_self"]
    write_repository([bundle], tmp_path)
    before = (tmp_path / "mha_self" / "config.pbtxt").read_text()

    def refuse(*args, **kwargs):
        raise ArtifactError("config.pbtxt: refused on purpose")

    monkeypatch.setattr(triton, "check_model_dir", refuse)
    with pytest.raises(ArtifactError, match="refused on purpose"):
        write_repository([bundle], tmp_path, max_batch_size=2)
    assert [p.name for p in tmp_path.iterdir()] == ["mha_self"]
    assert (tmp_path / "mha_self" / "config.pbtxt").read_text() == before


# ---------------------------------------------------------------------------------------------
# Wrong configs are refused by the same check


@pytest.fixture(scope="module")
def good(zoo_base_bundles, tmp_path_factory):
    """(manifest, generated mha_self config text with golden warm-ups, its folder)."""
    repo = tmp_path_factory.mktemp("good")
    write_repository([zoo_base_bundles["mha_self"]], repo, warmup=True)
    folder = repo / "mha_self"
    return (
        load_bundle(zoo_base_bundles["mha_self"]).manifest,
        (folder / "config.pbtxt").read_text(),
        folder,
    )


WRONG = {
    "dims": (
        ("dims: [ -1, 32 ]", "dims: [ -1, 31 ]"),
        r"input 'x': dims \[-1, 31\], expected \[-1, 32\] for shape \[batch, seq, 32\] "
        r"without the batch axis",
    ),
    "data-type": (
        ("TYPE_BOOL\n", "TYPE_INT8\n"),
        r"input 'key_padding_mask': data_type TYPE_INT8, the manifest says bool "
        r"\(TYPE_BOOL\)",
    ),
    "too-big-batch": (
        ("max_batch_size: 16", "max_batch_size: 64"),
        r"max_batch_size 64 is above the manifest's max for 'batch' \(16\)",
    ),
    "unbatched-dims": (
        ("max_batch_size: 16", "max_batch_size: 0"),
        r"dynamic_batching needs max_batch_size > 0; input 'x': dims \[-1, 32\], "
        r"expected \[-1, -1, 32\]",
    ),
    "negative-batch": (
        ("max_batch_size: 16", "max_batch_size: -1"),
        r"max_batch_size -1 is negative",
    ),
    "typo": (
        ("max_batch_size: 16", "max_batch_sz: 16"),
        r"not a Triton model config: \d+:\d+ : Message type \"inference.ModelConfig\" has "
        r"no field named \"max_batch_sz\"",
    ),
    "bad-enum": (("TYPE_FP32", "TYPE_FP99"), r"has no value named TYPE_FP99"),
    "name": (
        ('name: "mha_self"', 'name: "other"'),
        r"name is 'other', Triton needs the folder's name 'mha_self'",
    ),
    "platform": (
        ('platform: "onnxruntime_onnx"', 'platform: "tensorrt_plan"'),
        r"platform is 'tensorrt_plan' and backend ''; expected platform "
        r"'onnxruntime_onnx'",
    ),
    "unknown-input": (
        ('name: "key_padding_mask"', 'name: "z"'),
        r"input 'z' is not in the manifest \(inputs: x, key_padding_mask\).*input "
        r"'key_padding_mask' of the manifest is missing",
    ),
    "twice": (('name: "key_padding_mask"', 'name: "x"'), r"input 'x' is listed 2 times"),
    "preferred": (
        (
            "max_queue_delay_microseconds: 100",
            "max_queue_delay_microseconds: 100 preferred_batch_size: [ 4, 32 ]",
        ),
        r"preferred_batch_size 32 is not within 1..max_batch_size \(16\)",
    ),
    "instances": (("count: 1", "count: 0"), r"instance_group\[0\]: count 0 \(must be >= 1\)"),
    "instance-kind": (
        ("KIND_CPU", "KIND_MODEL"),
        r"kind KIND_MODEL \(must be one of KIND_AUTO, KIND_CPU, KIND_GPU\)",
    ),
    "warmup-batch": (
        ("\n    batch_size: 1", "\n    batch_size: 17"),
        r"model_warmup 'golden0': batch_size 17 is not within 1..16",
    ),
    "warmup-dims": (
        ("dims: [ 7, 32 ]", "dims: [ 7, 33 ]"),
        r"model_warmup 'golden0': input 'x': dims \[7, 33\] do not fit \[seq, 32\] "
        r"within the manifest's ranges",
    ),
    "warmup-range": (
        ("dims: [ 7 ]", "dims: [ 700 ]"),
        r"input 'key_padding_mask': dims \[700\] do not fit \[seq\]",
    ),
    "warmup-type": (
        ("data_type: TYPE_BOOL dims: [ 7 ]", "data_type: TYPE_FP32 dims: [ 7 ]"),
        r"input 'key_padding_mask': data_type TYPE_FP32, expected TYPE_BOOL",
    ),
    "warmup-inputs": (
        ('inputs { key: "x"', 'inputs { key: "q"'),
        r"model_warmup 'golden0': inputs \['key_padding_mask', 'q'\], the "
        r"model's are \['key_padding_mask', 'x'\]",
    ),
    "warmup-no-data": (
        ('input_data_file: "golden0_x"', ""),
        r"input 'x': no data \(zero_data, random_data or input_data_file\)",
    ),
    "warmup-path": (
        ('input_data_file: "golden0_x"', 'input_data_file: "../golden0_x"'),
        r"input_data_file '../golden0_x' must be a plain file name inside warmup/",
    ),
    "warmup-file-size": (
        ('input_data_file: "golden0_x"', 'input_data_file: "golden1_x"'),
        r"input 'x': warmup/golden1_x is 128 bytes, dims \[7, 32\] of float32 "
        r"need 896 bytes",
    ),
    "warmup-file-missing": (
        ('input_data_file: "golden0_x"', 'input_data_file: "nope"'),
        r"warmup/nope is missing",
    ),
}


@pytest.mark.parametrize("edit, message", list(WRONG.values()), ids=list(WRONG))
def test_a_wrong_config_is_refused(good, edit, message, tmp_path):
    manifest, text, folder = good
    old, new = edit
    assert old in text
    folder_copy = Path(shutil.copytree(folder, tmp_path / "mha_self"))
    (folder_copy / "config.pbtxt").write_text(text.replace(old, new, 1))
    with pytest.raises(ArtifactError, match=message):
        check_model_dir(folder_copy, manifest)
    check_config(text, manifest, name="mha_self", model_dir=folder)  # the original passes


def test_batching_a_model_whose_batch_dim_is_not_first_is_refused(zoo_base_bundles, tmp_path):
    write_repository([zoo_base_bundles["decoder_lm"]], tmp_path)
    manifest = load_bundle(zoo_base_bundles["decoder_lm"]).manifest
    text = (tmp_path / "decoder_lm" / "config.pbtxt").read_text()
    with pytest.raises(
        ArtifactError,
        match=r"max_batch_size 4 > 0 makes Triton stack requests "
        r"along axis 0, but 'past_keys' has 'batch' at axis "
        r"1, not at axis 0; use max_batch_size 0",
    ):
        check_config(
            text.replace("max_batch_size: 0", "max_batch_size: 4"), manifest, name="decoder_lm"
        )


def test_a_folder_without_config_is_refused(good, tmp_path):
    with pytest.raises(ArtifactError, match=r"config.pbtxt: cannot be read \(FileNotFoundError"):
        check_model_dir(tmp_path, good[0])


# ---------------------------------------------------------------------------------------------
# User errors: one line, exit 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--max-batch-size", "99"],
            r"mha_self: --max-batch-size 99 is above the manifest's max "
            r"for 'batch' \(16\)",
        ),
        (["--max-batch-size", "-1"], r"--max-batch-size must be >= 0, got -1"),
        (
            ["--instances", "0"],
            r"--instances must be >= 1 and --batch-delay-us >= 0, got 0 and 100",
        ),
        (
            ["--seq-buckets", "64,500"],
            r"mha_self: --seq-buckets must be increasing sizes within "
            r"'seq''s range 1..256, got 64,500",
        ),
        (["--seq-buckets", "64,32"], r"--seq-buckets must be increasing sizes"),
        (
            ["--seq-buckets", "8", "--seq-dim", "past"],
            r"mha_self: --seq-buckets needs the dim "
            r"'past', the bundle has batch, seq",
        ),
    ],
    ids=[
        "batch-above-max",
        "negative-batch",
        "instances",
        "bucket-range",
        "bucket-order",
        "bucket-dim",
    ],
)
def test_cli_user_errors_are_one_line(zoo_base_bundles, tmp_path, capsys, extra, message):
    code, out, err = run_cli(
        ["triton", str(zoo_base_bundles["mha_self"]), "--repo", str(tmp_path / "r"), *extra], capsys
    )
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("attnx: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_cli_refuses_batching_decoder_lm(zoo_base_bundles, tmp_path, capsys):
    code, _, err = run_cli(
        [
            "triton",
            str(zoo_base_bundles["decoder_lm"]),
            "--repo",
            str(tmp_path),
            "--max-batch-size",
            "4",
        ],
        capsys,
    )
    assert code == 2
    assert (
        "decoder_lm: --max-batch-size 4 needs the batch dim at axis 0 of every input and "
        "output, but 'past_keys' has 'batch' at axis 1, not at axis 0; use "
        "--max-batch-size 0" in err
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seq-buckets", "64,x"], r"expected sizes like 64,128,256, got '64,x'"),
        (["--kind", "tpu"], r"invalid choice: 'tpu'"),
    ],
    ids=["buckets-syntax", "kind"],
)
def test_cli_usage_errors_exit_2(zoo_base_bundles, tmp_path, capsys, argv, message):
    code, _, err = run_cli(
        ["triton", str(zoo_base_bundles["mha_self"]), "--repo", str(tmp_path), *argv], capsys
    )
    assert code == 2 and re.search(message, err)


def test_cli_refuses_a_missing_bundle_and_a_name_given_twice(zoo_base_bundles, tmp_path, capsys):
    code, _, err = run_cli(["triton", str(tmp_path / "nope"), "--repo", str(tmp_path)], capsys)
    assert code == 2 and "not a bundle folder" in err
    copy = shutil.copytree(zoo_base_bundles["mha_self"], tmp_path / "copy")
    code, _, err = run_cli(
        ["triton", str(zoo_base_bundles["mha_self"]), str(copy), "--repo", str(tmp_path / "r")],
        capsys,
    )
    assert (
        code == 2
        and "two bundles are both named 'mha_self'; a Triton repository holds each model name once"
        in err
    )


def test_the_repo_and_the_model_folder_must_be_folders(zoo_base_bundles, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"--repo .*file: exists and is not a folder"):
        write_repository([zoo_base_bundles["mha_self"]], tmp_path / "file")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "mha_self").write_text("x")
    with pytest.raises(InputError, match=r"mha_self exists and is not a model folder"):
        write_repository([zoo_base_bundles["mha_self"]], tmp_path / "r")
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["mha_self"]  # temp folder removed


def test_plan_model_refuses_an_unknown_kind(zoo_base_bundles):
    with pytest.raises(InputError, match=r"--kind must be one of cpu, gpu, got 'tpu'"):
        plan_model(load_bundle(zoo_base_bundles["mha_self"]), kind="tpu")


# ---------------------------------------------------------------------------------------------
# Without tritonclient


def test_missing_tritonclient_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(triton, "_pb2", None)
    monkeypatch.delitem(
        __import__("sys").modules, "tritonclient.grpc.model_config_pb2", raising=False
    )
    monkeypatch.setattr(triton.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        triton.AttnxError,
        match=r"checking Triton configs needs tritonclient's "
        r"model_config protobuf: pip install "
        r"'attnx\[serve\]'",
    ):
        triton.model_config_pb2()


def test_a_broken_model_config_module_is_one_clear_error(monkeypatch, tmp_path):
    import importlib.machinery

    (tmp_path / "tritonclient" / "grpc").mkdir(parents=True)
    (tmp_path / "tritonclient" / "grpc" / "model_config_pb2.py").write_text(
        "raise TypeError('generated for a newer protobuf')\n"
    )
    spec = importlib.machinery.ModuleSpec("tritonclient", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "tritonclient")]
    monkeypatch.setattr(triton, "_pb2", None)
    monkeypatch.delitem(
        __import__("sys").modules, "tritonclient.grpc.model_config_pb2", raising=False
    )
    monkeypatch.setattr(triton.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(
        triton.AttnxError,
        match=r"cannot load model_config_pb2.py from "
        r"tritonclient \(TypeError: generated for a "
        r"newer protobuf\)",
    ):
        triton.model_config_pb2()
