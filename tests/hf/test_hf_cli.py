"""`attnx export DIR` of a save_pretrained folder, `attnx check` of its bundle, and the
folder's errors: one line each."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'attnx[hf]'")

import pytest

from export import ExportError
from export._cli import main
from export._hf_tasks import load_pretrained, resolve_task
from runtime import load_bundle
from tests.hf.conftest import build


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_folders")
    made = {}
    for family in ("bert", "llama_lm", "t5_encoder"):
        build(family).save_pretrained(root / family)
        made[family] = root / family
    return made


def test_export_a_folder_then_check_it(folders, tmp_path, capsys):
    out = tmp_path / "artifacts"
    code = main(["export", str(folders["llama_lm"]), "--out", str(out), "--variants", "fused"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed.strip().endswith("PASSED")
    manifest = load_bundle(out / "llama_lm").manifest
    assert manifest.source["task"] == "text-generation"  # from the config's architectures
    assert manifest.source["target"] == f"hf:{folders['llama_lm'].resolve()}"
    assert manifest.output_names == ["logits"]
    assert [v.name for v in manifest.variants] == ["base", "fused"]
    assert main(["check", str(out / "llama_lm")]) == 0  # rebuilt from the folder
    assert capsys.readouterr().out.strip().endswith("PASSED")


def test_the_task_picks_the_head(folders, tmp_path, capsys):
    out = tmp_path / "artifacts"
    args = ["export", str(folders["llama_lm"]), "--task", "feature-extraction", "--out", str(out)]
    assert main([*args, "--variants", "none"]) == 0
    manifest = load_bundle(out / "llama_lm").manifest
    assert manifest.output_names == ["last_hidden_state"]
    assert manifest.source["task"] == "feature-extraction"
    assert "LlamaModel" in manifest.source["class"]


def test_task_names_and_errors(folders, tmp_path, capsys):
    model, task = load_pretrained(folders["bert"])
    assert task == "feature-extraction" and type(model).__name__ == "BertModel"
    assert resolve_task("causal-lm", model.config) == "text-generation"  # Optimum's name
    with pytest.raises(ExportError, match=r"unknown task 'summarization'; known tasks: feature"):
        resolve_task("summarization", model.config)
    with pytest.raises(ExportError, match=r"holds no config.json: not a save_pretrained folder"):
        load_pretrained(tmp_path)
    with pytest.raises(ExportError, match=r"cannot load .*t5_encoder for text-generation"):
        load_pretrained(folders["t5_encoder"], "text-generation")


def test_a_task_for_a_zoo_entry_is_one_line(folders, capsys):
    assert main(["export", "mha_self", "--task", "text-generation"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "attnx: error: --task is for Hugging Face model folders; 'mha_self' is not one"
