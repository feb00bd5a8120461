"""The export pipeline: every zoo entry passes its grid, and every guard fires on purpose."""

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export import ExportError, default_grid, export_module, run_pipeline, spec_from_zoo
from export._pipeline import capture, check_graph, measure_grid
from export._spec import spec_from_module
from models import zoo
from runtime import ParityError, check


def test_export_all_exits_zero(zoo_export):
    assert zoo_export[0] == 0


# Written out, not read from the registry: a zoo entry added without an export test fails
# test_every_zoo_entry_has_an_export_test until it is named here.
EXPORT_TESTED = (
    "sinusoidal_pe",
    "learned_pe",
    "sdpa",
    "mha_self",
    "mha_cross",
    "causal_self",
    "mha_causal",
    "gqa_rope",
    "mqa_alibi",
    "t5_bidirectional",
    "t5_causal",
    "shaw_relative",
    "xl_relative",
    "sliding_window",
    "kv_cache",
    "encoder_layer",
    "decoder_layer",
    "decoder_layer_cached",
    "encoder",
    "decoder_lm",
)


@pytest.mark.parametrize("name", EXPORT_TESTED)
def test_zoo_entry_exports_and_passes_grid(zoo_bundles, name):
    manifest = json.loads((zoo_bundles[name] / "manifest.json").read_text())
    records = manifest["parity"]
    assert records and all(r["passed"] for r in records)
    points = [r["point"] for r in records]
    assert len(points) >= 8
    # Size 1 and lengths beyond the export example are in every grid.
    entry = zoo.get(name)
    for dim, size in entry.example.items():
        sizes = {p[dim] for p in points}
        assert 1 in sizes or entry.dims[dim][0] > 1
        assert max(sizes) > size
        assert entry.dims[dim][1] in sizes


def test_every_zoo_entry_has_an_export_test(zoo_export):
    untested = sorted(set(zoo.names()) - set(EXPORT_TESTED))
    assert not untested, f"zoo entries without an export test: {untested}"
    assert len(set(EXPORT_TESTED)) == len(EXPORT_TESTED)
    # and `attnx export --all` wrote a bundle of that name for each of them
    _, bundles, _ = zoo_export
    for name in EXPORT_TESTED:
        manifest = json.loads((bundles[name] / "manifest.json").read_text())
        assert manifest["name"] == name


def test_grid_covers_batch_one_odd_sizes_beyond_example_and_max():
    grid = default_grid(
        {"batch": (1, 16), "seq": (1, 256), "past": (0, 64)}, {"batch": 2, "seq": 7, "past": 3}
    )
    seqs = {p["seq"] for p in grid}
    assert {1, 2, 5, 7, 17, 256} <= seqs
    assert {1, 2, 16} <= {p["batch"] for p in grid}
    assert {0, 1, 3, 64} <= {p["past"] for p in grid}
    assert grid[0] == {"batch": 2, "seq": 7, "past": 3}
    assert {"batch": 1, "seq": 1, "past": 0} in grid
    assert {"batch": 16, "seq": 256, "past": 64} in grid


def test_bundle_files_match_manifest_hashes(zoo_bundles):
    folder = zoo_bundles["kv_cache"]
    manifest = json.loads((folder / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert listed == on_disk
    assert {"model.onnx", "model.fused.onnx", "golden.npz", "report.md"} <= listed
    assert {v["file"] for v in manifest["variants"]} <= listed
    for entry in manifest["files"]:
        data = (folder / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["size"]
    assert manifest["outputs"][1]["shape"] == ["batch", 2, "past + seq", 8]
    assert manifest["dims"]["past"] == {"min": 0, "max": 256}
    assert set(manifest["producer"]) == {"attnx", "torch", "onnx", "onnxscript", "onnxruntime"}


@pytest.mark.parametrize("name", ["gqa_rope", "decoder_lm", "sdpa"])
def test_golden_reproduces_torch_outputs(zoo_bundles, name):
    folder = zoo_bundles[name]
    manifest = json.loads((folder / "manifest.json").read_text())
    module = zoo.get(name).build()
    cases = manifest["golden"]["cases"]
    assert len(cases) >= 2 and cases[0]["point"] != cases[1]["point"]
    with np.load(folder / "golden.npz", allow_pickle=False) as golden:
        for case in cases:
            feed = {n: torch.from_numpy(golden[k]) for n, k in case["inputs"].items()}
            with torch.no_grad():
                out = module(**feed)
            out = out if isinstance(out, tuple) else (out,)
            keys = list(case["outputs"].values())
            assert len(keys) == len(out)
            for key, tensor in zip(keys, out, strict=True):
                np.testing.assert_array_equal(golden[key], tensor.numpy())


def test_report_lists_stages_and_parity(zoo_bundles):
    report = (zoo_bundles["mha_self"] / "report.md").read_text()
    assert "| 1. capture | ok" in report
    assert "batch=1, seq=1" in report


# --- guards -----------------------------------------------------------------------------------


class Attention(nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


QKV_DYNAMIC = {n: {2: "seq"} for n in "qkv"}


def test_aliased_example_inputs_are_refused():
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ExportError, match=r"stage 1/5 \(capture\).*'q' and 'k' share memory"):
        export_module(Attention(), (q, q, q), dynamic=QKV_DYNAMIC)


def test_views_of_one_tensor_are_aliases_too():
    qkv = torch.randn(3, 1, 2, 6, 8)
    with pytest.raises(ExportError, match="share memory.*pytorch#139646"):
        export_module(Attention(), (qkv[0], qkv[1], qkv[2]), dynamic=QKV_DYNAMIC)


def test_miswired_graph_is_caught_by_the_unread_input_check():
    # Bypass the aliasing guard the way a user calling torch.onnx directly would.
    q = torch.randn(1, 2, 6, 8)
    program = torch.onnx.export(Attention(), (q, q, q), dynamo=True, verbose=False)
    spec = spec_from_module(Attention(), (q, q.clone(), q.clone()))
    with pytest.raises(ExportError, match=r"stage 2/5 \(check\).*\['k', 'q'\] are never read"):
        check_graph(program.model_proto, spec)


class FrozenTable(nn.Module):
    """A positional table built for exactly the example length."""

    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(length, dim))

    def forward(self, x):
        return x + self.table


def test_module_that_only_works_at_its_example_length_is_refused():
    x = torch.randn(2, 7, 8)
    # torch 2.13 specializes the dim silently instead of raising; the check stage catches it.
    with pytest.raises(
        ExportError,
        match=r"stage 2/5 \(check\): input 'x' axis 1 was declared "
        r"dynamic \('seq'\) but the saved graph fixes it to 7",
    ):
        export_module(FrozenTable(7, 8), (x,), dynamic={"x": {0: "batch", 1: "seq"}})


def test_example_of_size_one_on_a_dynamic_dim_is_refused():
    x = torch.randn(1, 7, 8)
    with pytest.raises(ExportError, match=r"example size of dim 'batch'.*is 1.*pytorch#148629"):
        export_module(FrozenTable(7, 8), (x,), dynamic={"x": {0: "batch"}})


def _captured(name):
    spec = spec_from_zoo(zoo.get(name))
    return spec, capture(spec, 18)


def test_perturbed_weight_fails_parity_naming_output_and_min_tolerance():
    spec, model = _captured("mha_self")
    with torch.no_grad():
        spec.module.out_proj.weight[0, 0] += 1e-2
    records = measure_grid(spec, {"base": model}, default_grid(spec.dims, spec.example)[:3])
    with pytest.raises(ParityError) as err:
        check(records)
    message = str(err.value)
    assert "parity failed: 3 of 3 records" in message
    assert message.count("y:") == 3
    assert "max_abs" in message and "max_rel" in message and "passes with atol >=" in message


def test_missing_output_fails_parity():
    spec, model = _captured("kv_cache")
    model.graph.output.pop()  # the graph no longer returns present_value
    records = measure_grid(spec, {"base": model}, [dict(spec.example)])
    with pytest.raises(ParityError, match="present_value.*missing"):
        check(records)


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


def test_nan_output_fails_even_when_both_sides_agree():
    with pytest.raises(ParityError, match=r"log: .*nan [1-9]"):
        export_module(Log(), (torch.randn(2, 7),), dynamic={"x": {0: "batch", 1: "seq"}})


def test_failed_export_leaves_nothing_in_the_output_dir(tmp_path):
    out = tmp_path / "artifacts"
    with pytest.raises(ParityError):
        export_module(Log(), (torch.randn(2, 7),), dynamic={"x": {1: "seq"}}, out=out)
    assert not out.exists() or list(out.iterdir()) == []


def test_failure_while_writing_leaves_previous_bundle_intact(tmp_path, monkeypatch):
    import export._writer as writer

    result = run_pipeline(spec_from_zoo(zoo.get("learned_pe")), out=tmp_path)
    before = (result.bundle / "manifest.json").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "_write_golden", broken)
    with pytest.raises(
        ExportError, match=r"stage 5/5 \(write\): writing the bundle failed: OSError: disk full"
    ):
        run_pipeline(spec_from_zoo(zoo.get("learned_pe")), out=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["learned_pe"]
    assert (result.bundle / "manifest.json").read_bytes() == before


def test_declared_dims_are_symbolic_in_the_saved_graph(zoo_bundles):
    model = onnx.load(str(zoo_bundles["mha_cross"] / "model.onnx"))
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    assert dims == {
        "x": ["batch", "seq", 32],
        "context": ["batch", "kv_seq", 48],
        "key_padding_mask": ["batch", "kv_seq"],
    }


def test_opset_below_minimum_is_refused():
    with pytest.raises(ExportError, match="opset 17 is below the minimum 18"):
        run_pipeline(spec_from_zoo(zoo.get("learned_pe")), out=None, opset=17)


def test_a_file_where_the_bundle_goes_is_refused_and_kept(tmp_path):
    (tmp_path / "learned_pe").write_text("not a bundle")
    with pytest.raises(
        ExportError,
        match=r"stage 5/5 \(write\): .*learned_pe exists and is not a "
        "bundle folder",
    ):
        run_pipeline(spec_from_zoo(zoo.get("learned_pe")), out=tmp_path, variants=())
    assert (tmp_path / "learned_pe").read_text() == "not a bundle"
    assert [p.name for p in tmp_path.iterdir()] == ["learned_pe"]
