"""Users' bundles go where the zoo's go: the BERT and Llama bundles behind `attnx serve` (answers
equal to a direct Runner's, bit for bit) and in a checked Triton model repository."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'attnx[hf]'")
pytest.importorskip("ray", reason="needs the [serve] extra: pip install 'attnx[serve]'")
pytest.importorskip("tritonclient", reason="needs the [serve] extra: pip install 'attnx[serve]'")

from google.protobuf import text_format  # noqa: E402

from export._cli import main  # noqa: E402
from export._hf import spec_from_pretrained  # noqa: E402
from runtime import Runner, load_bundle  # noqa: E402
from runtime.serve import _triton as triton  # noqa: E402
from tests.serve.conftest import ServerProcess  # noqa: E402

pytestmark = pytest.mark.serve

SERVED = ("bert", "llama_lm")
POINTS = [{"batch": 1, "seq": 1}, {"batch": 3, "seq": 11}, {"batch": 2, "seq": 40}]


@pytest.fixture(scope="module")
def bundles(hf_exports):
    return {family: hf_exports[family].bundle for family in SERVED}


@pytest.fixture(scope="module")
def cases(bundles, hf_models):
    """(model, feed, the Runner's answer with the server's settings)."""
    made = []
    for family, bundle in bundles.items():
        spec = spec_from_pretrained(hf_models[family])
        with Runner(bundle, threads=1, reject_nonfinite=True) as runner:
            for point in POINTS:
                feed = {k: v.numpy() for k, v in spec.make_inputs(point).items()}
                made.append((family, feed, runner.run(feed)))
    return made


def test_served_answers_equal_the_runner_bit_for_bit(bundles, cases, tmp_path):
    server = ServerProcess(list(bundles.values()), replicas=1, log_dir=tmp_path)
    try:
        for family, feed, want in cases:
            got = server.client.infer(family, feed)
            assert list(got) == list(want)
            for name in want:
                assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
                assert got[name].tobytes() == want[name].tobytes(), (family, name)
        meta = server.client.metadata("llama_lm")
        assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask"]
    finally:
        report = server.stop()
    assert report["exit"] == 0 and not report["left"]


def test_triton_writes_a_checked_repository(bundles, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["triton", *map(str, bundles.values()), "--repo", str(repo), "--warmup"]) == 0
    out = capsys.readouterr().out
    pb2 = triton.model_config_pb2()
    for family, bundle in bundles.items():
        manifest = load_bundle(bundle).manifest
        triton.check_model_dir(repo / family, manifest)
        config = text_format.Parse((repo / family / "config.pbtxt").read_text(), pb2.ModelConfig())
        assert config.max_batch_size == manifest.dims["batch"].max
        assert [e.name for e in config.input] == [t.name for t in manifest.inputs]
        assert all(list(e.dims) == [-1] for e in config.input)  # seq, without the batch
        assert f"{family}: " in out
