"""The OIP ingress class with fake model handles (no Ray cluster): how model failures become
responses -- a dead replica is a retryable 503, anything unexpected a 500 without details."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install 'attnx[serve]')")

from ray.exceptions import ActorDiedError  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402
from starlette.requests import Request  # noqa: E402

from runtime import load_bundle  # noqa: E402
from runtime.serve._app import OIPIngress  # noqa: E402
from runtime.serve._protocol import Failure, encode_tensor  # noqa: E402
from tests.runtime.conftest import VOCAB, make_bundle, make_ids_bundle  # noqa: E402

pytestmark = pytest.mark.serve

Ingress = OIPIngress.func_or_class  # the class under Serve's deployment wrapper


class Handle:
    """A DeploymentHandle stand-in: `.infer.remote(feed)` and `.info.remote()` awaitables."""

    def __init__(self, infer=None, info=None):
        self.infer = _Method(infer or (lambda f: {"y": f["x"] * 2}))
        self.info = _Method(info or (lambda: {"variant": "base", "provider": "cpu"}))


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)

        return call()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The runtime tests' tiny bundle: x [batch, seq, 8], m [batch, 8] -> y; weight 'W'."""
    return load_bundle(make_bundle(tmp_path_factory.mktemp("tiny") / "tiny"))


def feed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((2, 3, 8)).astype(np.float32),
        "m": rng.standard_normal((2, 8)).astype(np.float32),
    }


@pytest.fixture
def ingress(tiny):
    def make(**handle) -> Ingress:
        weights = sorted(set().union(*tiny.weights.values()))
        models = {
            "tiny": {"manifest": tiny.manifest.to_json(), "weights": weights, "max_batch_size": 8}
        }
        return Ingress(models, {"tiny": Handle(**handle)}, max_body_bytes=10_000, version="t")

    return make


def call(app: Ingress, method: str, path: str, body: bytes = b"") -> tuple[int, dict, dict]:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": [(b"content-length", str(len(body)).encode())],
    }

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    response = asyncio.run(app(Request(scope, receive)))
    doc = json.loads(response.body) if response.body else {}
    return response.status_code, doc, dict(response.headers)


def infer_body() -> bytes:
    return json.dumps({"inputs": [encode_tensor(k, v) for k, v in feed().items()]}).encode()


def test_an_answer_is_encoded(ingress):
    status, doc, _ = call(ingress(), "POST", "/v2/models/tiny/infer", infer_body())
    assert status == 200
    y = np.asarray(doc["outputs"][0]["data"], np.float32).reshape(doc["outputs"][0]["shape"])
    assert np.array_equal(y, feed()["x"] * 2)


def test_a_failure_from_the_replica_keeps_its_status_and_message(ingress):
    app = ingress(infer=lambda f: Failure(400, "Input 'x': no"))
    assert call(app, "POST", "/v2/models/tiny/infer", infer_body())[:2] == (
        400,
        {"error": "Input 'x': no"},
    )


@pytest.mark.parametrize(
    "error",
    [ActorDiedError(), BackPressureError(num_queued_requests=5, max_queued_requests=5)],
    ids=["replica-died", "back-pressure"],
)
def test_a_dead_or_full_replica_is_a_retryable_503(ingress, error):
    def die(f):
        raise error

    status, doc, headers = call(ingress(infer=die), "POST", "/v2/models/tiny/infer", infer_body())
    assert status == 503 and doc["retryable"] is True and headers["retry-after"] == "1"
    assert doc["error"] == (
        "the model replica serving this request stopped or is unavailable; "
        "the request was not answered, send it again"
    )


def test_an_unexpected_error_is_a_500_with_details_only_in_the_log(ingress, caplog):
    def crash(f):
        raise ZeroDivisionError("secret /srv/models/tiny/model.onnx")

    with caplog.at_level(logging.ERROR, logger="attnx.serve"):
        status, doc, _ = call(ingress(infer=crash), "POST", "/v2/models/tiny/infer", infer_body())
    assert (status, doc) == (500, {"error": "internal server error (details in the server log)"})
    assert "secret /srv/models/tiny/model.onnx" in caplog.text


def test_readiness_follows_the_model_replicas(ingress):
    def gone():
        raise ActorDiedError()

    assert call(ingress(), "GET", "/v2/health/ready")[0] == 200
    assert call(ingress(info=gone), "GET", "/v2/health/ready")[0] == 503
    assert call(ingress(info=gone), "GET", "/v2/models/tiny/ready")[0] == 503
    assert call(ingress(info=gone), "GET", "/v2/health/live")[0] == 200


def test_metadata_reports_the_replica_variant(ingress):
    status, doc, _ = call(ingress(), "GET", "/v2/models/tiny")
    assert status == 200 and doc["attnx"]["variant"] == "base"
    assert call(ingress(), "GET", "/v2")[1] == {"name": "attnx", "version": "t", "extensions": []}


def test_a_weight_name_is_refused_before_the_replica_sees_it(ingress):
    doc = json.loads(infer_body())
    doc["inputs"].append({"name": "W"})  # the MatMul weight
    status, answer, _ = call(ingress(), "POST", "/v2/models/tiny/infer", json.dumps(doc).encode())
    assert status == 400 and "Input 'W': a weight (initializer) of the model" in answer["error"]


def test_a_token_id_outside_the_vocabulary_is_a_400_naming_it(tmp_path):
    bundle = load_bundle(make_ids_bundle(tmp_path / "ids"))
    models = {"ids": {"manifest": bundle.manifest.to_json(), "weights": [], "max_batch_size": 8}}
    app = Ingress(models, {"ids": Handle()}, max_body_bytes=10_000, version="t")
    for bad in (-1, VOCAB):
        ids = np.array([[2, bad]], np.int64)
        body = json.dumps({"inputs": [encode_tensor("ids", ids)]}).encode()
        status, doc, _ = call(app, "POST", "/v2/models/ids/infer", body)
        assert status == 400
        assert doc["error"] == (
            f"Input 'ids': value {bad} at index [0, 1] is outside its range "
            f"0 <= value <= {VOCAB - 1}"
        )
