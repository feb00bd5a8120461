"""The Open Inference Protocol codec and the batch runner, without Ray: routing, request
decoding (every refusal and its message), response encoding, metadata, body caps."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from runtime import ArtifactError, DimRange, Golden, InputError, Manifest, TensorSpec
from runtime.serve import _protocol as protocol
from runtime.serve._batch import run_batch
from runtime.serve._protocol import (
    Failure,
    RequestError,
    batch_dim,
    decode_infer_request,
    default_max_body_bytes,
    encode_infer_response,
    encode_tensor,
    error_body,
    model_metadata,
    oip_shape,
    parse_json,
    route,
)

D = 4
PATH = re.compile(r"(?:^|[\s'\"(])/[\w.-]+/")  # an absolute file path in a message
DIMS = {"batch": DimRange(1, 4), "seq": DimRange(1, 6)}


def manifest(inputs=None, outputs=None, dims=None) -> Manifest:
    inputs = inputs or (
        TensorSpec("x", "float32", ("batch", "seq", D)),
        TensorSpec("mask", "bool", ("batch", "seq")),
        TensorSpec("ids", "int64", ("batch", "seq")),
    )
    outputs = outputs or (TensorSpec("y", "float32", ("batch", "seq", D)),)
    return Manifest(
        name="tiny",
        source={},
        producer={},
        opset=18,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        dims=dims or DIMS,
        files=(),
        variants=(),
        parity=(),
        golden=Golden("golden.npz", ()),
    )


M = manifest()


def feed(b=2, s=3, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((b, s, D)).astype(np.float32),
        "mask": rng.random((b, s)) > 0.5,
        "ids": rng.integers(-5, 5, (b, s)),
    }


def body(tensors: list[dict], **extra) -> bytes:
    return json.dumps({"inputs": tensors, **extra}).encode()


def tensors(f: dict[str, np.ndarray]) -> list[dict]:
    return [encode_tensor(k, v) for k, v in f.items()]


def refuse(raw: bytes, status: int = 400, **kwargs) -> str:
    with pytest.raises(RequestError) as e:
        decode_infer_request(raw, M, **kwargs)
    assert e.value.status == status
    return e.value.message


# ---------------------------------------------------------------------------------------------
# Routing


@pytest.mark.parametrize(
    "method, path, kind",
    [
        ("GET", "/v2", "server"),
        ("GET", "/v2/health/live", "live"),
        ("GET", "/v2/health/ready/", "ready"),
        ("GET", "/v2/models/tiny", "model"),
        ("GET", "/v2/models/tiny/ready", "model_ready"),
        ("POST", "/v2/models/tiny/infer", "infer"),
        ("POST", "/v2/models/tiny/versions/1/infer", "infer"),
        ("GET", "/v2/models/tiny/versions/1", "model"),
    ],
    ids=[
        "server",
        "live",
        "ready-slash",
        "model",
        "model-ready",
        "infer",
        "versioned-infer",
        "versioned-model",
    ],
)
def test_route_finds_endpoints(method, path, kind):
    found = route(method, path, ["tiny"])
    assert found.kind == kind
    assert found.model == (None if kind in ("server", "live", "ready") else "tiny")


@pytest.mark.parametrize(
    "method, path, status, message",
    [
        ("GET", "/v1/models", 404, r"no such endpoint: '/v1/models'; endpoints: /v2"),
        ("GET", "/v2/models/nope", 404, r"unknown model 'nope'; served models: tiny"),
        ("GET", "/v2/models/tiny/versions/2/ready", 404, r"has no version '2'; served version: 1"),
        ("POST", "/v2/models/tiny/bogus", 404, r"no such endpoint: '/v2/models/tiny/bogus'"),
        ("GET", "/v2/models/tiny/infer", 405, r"takes POST, not 'GET'"),
        ("POST", "/v2/health/live", 405, r"takes GET, not 'POST'"),
        ("DELETE", "/v2/models/tiny", 405, r"takes GET"),
        ("PUT", "/v2/models/tiny/ready", 405, r"takes GET"),
    ],
    ids=[
        "v1",
        "unknown-model",
        "unknown-version",
        "unknown-endpoint",
        "get-infer",
        "post-live",
        "delete-model",
        "put-ready",
    ],
)
def test_route_refuses(method, path, status, message):
    with pytest.raises(RequestError, match=message) as e:
        route(method, path, ["tiny"])
    assert e.value.status == status


def test_route_cuts_long_user_text():
    with pytest.raises(RequestError) as e:
        route("GET", "/v2/models/" + "a" * 500, ["tiny"])
    assert len(e.value.message) < 200 and "..." in e.value.message


# ---------------------------------------------------------------------------------------------
# Decoding


def test_decode_round_trips_every_dtype_exactly():
    f = feed()
    # Values JSON must carry exactly: subnormal, -0.0, the float32 extremes, int64 extremes.
    f["x"].flat[:4] = [1e-45, -0.0, np.finfo(np.float32).max, np.finfo(np.float32).tiny]
    f["ids"].flat[:2] = [np.iinfo(np.int64).min, np.iinfo(np.int64).max]
    req = decode_infer_request(body(tensors(f), id="r1", outputs=[{"name": "y"}]), M)
    assert req.id == "r1" and req.outputs == ("y",)
    assert list(req.feed) == ["x", "mask", "ids"]
    for name, arr in f.items():
        assert req.feed[name].dtype == arr.dtype
        assert req.feed[name].tobytes() == arr.tobytes()  # bit for bit


def test_decode_accepts_nested_data_and_ints_for_floats():
    f = feed(1, 2)
    t = tensors(f)
    t[0]["data"] = np.zeros((1, 2, D), dtype=np.int64).tolist()  # nested, integer values
    req = decode_infer_request(body(t), M)
    assert req.feed["x"].dtype == np.float32 and not req.feed["x"].any()


def _with(name, **changes) -> bytes:
    t = tensors(feed())
    for entry in t:
        if entry["name"] == name:
            entry.update(changes)
    return body(t)


BAD_REQUESTS = {
    "not-json": (b"{", r"not valid JSON \(Expecting property name .* line 1 column 2\)"),
    "not-utf8": (b"\xff\xfe{}", r"not UTF-8 JSON"),
    "nan-literal": (b'{"inputs": [NaN]}', r"NaN is not valid JSON \(numbers must be finite\)"),
    "too-deep": (b"[" * 100_000, r"not valid JSON \(nested too deeply\)"),
    "not-object": (b"[]", r"must be a JSON object with a non-empty 'inputs' list"),
    "no-inputs": (b'{"inputs": []}', r"non-empty 'inputs' list"),
    "nameless": (b'{"inputs": [1]}', r"inputs\[0\]: expected an object with a string 'name'"),
    "unknown-input": (
        body(tensors(feed()) + [{"name": "zz"}]),
        r"Input 'zz': not an input of the model; expected inputs: x, mask, ids",
    ),
    "twice": (body(tensors(feed()) + tensors({"x": feed()["x"]})), r"Input 'x': given twice"),
    "missing": (
        body(tensors({"x": feed()["x"], "ids": feed()["ids"]})),
        r"missing input 'mask'; expected inputs: x, mask, ids",
    ),
    "binary": (
        _with("x", parameters={"binary_data_size": 96}),
        r"Input 'x': binary tensor data is not supported",
    ),
    "wrong-datatype": (
        _with("x", datatype="FP64"),
        r"Input 'x': expected datatype FP32, got 'FP64'",
    ),
    "bad-shape-field": (
        _with("x", shape=[2, "3", 4]),
        r"Input 'x': 'shape' must be a list of non-negative integers",
    ),
    "wrong-static-dim": (_with("x", shape=[2, 3, 5]), r"Input 'x': axis 2 expected 4, got 5"),
    "above-range": (
        _with("x", shape=[2, 7, 4]),
        r"Input 'x': axis 1 \('seq'\) expected 1..6, got 7 \(above the max 6\)",
    ),
    "wrong-rank": (_with("ids", shape=[6]), r"Input 'ids': expected rank 2"),
    "data-not-list": (_with("x", data="abc"), r"Input 'x': 'data' must be a list of values"),
    "count": (
        _with("ids", data=[1, 2, 3]),
        r"Input 'ids': shape \[2, 3\] holds 6 values, "
        r"'data' has 3",
    ),
    "ragged": (_with("ids", data=[[1, 2, 3], [4, 5]]), r"Input 'ids': 'data' is a ragged"),
    "nested-shape": (
        _with("ids", data=[[1, 2], [3, 4], [5, 6]]),
        r"Input 'ids': nested 'data' has shape \[3, 2\], 'shape' says \[2, 3\]",
    ),
    "bool-numbers": (
        _with("mask", data=[1, 0, 1, 0, 1, 0]),
        r"Input 'mask': datatype BOOL needs true/false values",
    ),
    "int-floats": (
        _with("ids", data=[1.5] * 6),
        r"Input 'ids': datatype INT64 needs integers, "
        r"got floats",
    ),
    "float-bools": (
        _with("ids", data=[1, True, 1, 1, 1, 1]),
        r"datatype INT64 needs integers, got true/false values",
    ),
    "float-strings": (_with("x", data=["a"] * 24), r"datatype FP32 needs numbers, got strings"),
    "float-null": (_with("x", data=[None] * 24), r"needs numbers, got values that are not"),
    "int-range": (_with("ids", data=[2**63] * 6), r"Input 'ids': values outside the INT64 range"),
    "float-range": (_with("x", data=[1e39] * 24), r"Input 'x': values outside the FP32 range"),
    "shared-dim": (
        _with("mask", shape=[1, 3], data=[True] * 3),
        r"Input 'mask': axis 0 \('batch'\) expected 2 \(as in Input 'x'\), got 1",
    ),
    "outputs-not-list": (
        body(tensors(feed()), outputs="y"),
        r"'outputs' must be a list of objects with a string 'name'",
    ),
    "unknown-output": (
        body(tensors(feed()), outputs=[{"name": "zz"}]),
        r"unknown output 'zz'; outputs: y",
    ),
    "bad-id": (body(tensors(feed()), id=7), r"'id' must be a string of at most 256"),
}


@pytest.mark.parametrize("raw, message", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_decode_refuses_with_a_message_naming_the_problem(raw, message):
    text = refuse(raw)
    assert re.search(message, text), text
    assert "Traceback" not in text and not PATH.search(text)


def test_decode_reports_every_problem_of_a_request():
    t = tensors(feed())
    t[0]["datatype"] = "FP16"
    t[2]["data"] = [0.5] * 6
    text = refuse(body(t))
    assert "Input 'x': expected datatype FP32" in text and "Input 'ids': datatype INT64" in text


def test_decode_names_a_weight_fed_as_an_input():
    text = refuse(body(tensors(feed()) + [{"name": "W"}]), weights=frozenset({"W"}))
    assert "Input 'W': a weight (initializer) of the model, not an input" in text


def test_decode_turns_the_runtime_validator_error_into_a_400(monkeypatch):
    def fail(*args, **kwargs):
        raise InputError("Input 'x': the validator said no")

    monkeypatch.setattr(protocol, "validate_feed", fail)
    assert refuse(body(tensors(feed()))) == "Input 'x': the validator said no"


def test_parse_json_refuses_infinity():
    with pytest.raises(RequestError, match="Infinity is not valid JSON"):
        parse_json(b'{"a": -Infinity}')


# ---------------------------------------------------------------------------------------------
# Encoding and metadata


def test_encode_response_is_exact_and_honours_the_request():
    y = np.random.default_rng(1).standard_normal((2, 3, D)).astype(np.float32)
    z = np.arange(6).reshape(2, 3)
    raw = encode_infer_response("tiny", {"y": y, "z": z}, requested=["y"], request_id="7")
    doc = json.loads(raw)
    assert doc["model_name"] == "tiny" and doc["model_version"] == "1" and doc["id"] == "7"
    assert [t["name"] for t in doc["outputs"]] == ["y"]
    out = doc["outputs"][0]
    assert out["datatype"] == "FP32" and out["shape"] == [2, 3, D]
    assert np.asarray(out["data"], dtype=np.float32).reshape(2, 3, D).tobytes() == y.tobytes()


def test_encode_refuses_nonfinite_outputs():
    y = np.ones((1, 2), dtype=np.float32)
    y[0, 1] = np.nan
    with pytest.raises(
        RequestError,
        match=r"output 'y' holds 1 NaN/Inf values, which JSON "
        r"cannot carry",
    ) as e:
        encode_infer_response("tiny", {"y": y})
    assert e.value.status == 500


def test_error_body_marks_retryable_errors():
    assert json.loads(error_body("gone", retryable=True)) == {"error": "gone", "retryable": True}
    assert json.loads(error_body("bad")) == {"error": "bad"}


def test_model_metadata_uses_minus_one_for_dynamic_dims():
    meta = model_metadata(M, variant="base", max_batch_size=8)
    assert meta["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, -1, D]}
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, -1, D]}]
    assert meta["attnx"]["dims"] == {"batch": [1, 4], "seq": [1, 6]}
    assert meta["attnx"]["batch_dim"] == "batch" and meta["versions"] == ["1"]
    assert oip_shape(TensorSpec("p", "float32", (2, "batch", "past + seq"))) == [2, -1, -1]


@pytest.mark.parametrize(
    "inputs, outputs, reason",
    [
        ((TensorSpec("x", "float32", (3, "seq")),), None, r"'x' has no symbolic dim at axis 0"),
        (
            None,
            (TensorSpec("p", "float32", (2, "batch", "seq")),),
            r"'p' has 'batch' at axis 1, not at axis 0",
        ),
        (None, (TensorSpec("n", "float32", ("seq",)),), r"'n' has 'batch' nowhere, not at axis 0"),
    ],
    ids=["static-first", "stacked-cache", "no-batch"],
)
def test_batch_dim_says_why_requests_cannot_stack(inputs, outputs, reason):
    dim, why = batch_dim(manifest(inputs, outputs))
    assert dim is None and re.search(reason, why), why
    assert batch_dim(M) == ("batch", "")


def test_default_body_cap_admits_the_largest_request():
    big = manifest(dims={"batch": DimRange(1, 64), "seq": DimRange(1, 4096)})
    elements = 64 * 4096 * (D + 2)
    assert default_max_body_bytes([M, big]) == elements * 32 + 64 * 1024
    assert default_max_body_bytes([M]) == protocol.MIN_BODY_BYTES


# ---------------------------------------------------------------------------------------------
# Batches


class FakeRunner:
    """y = 2x + ids; records each run's batch size."""

    def __init__(self, fail: Exception | None = None):
        self.manifest = M
        self.calls: list[int] = []
        self.fail = fail

    def validate(self, f):
        from runtime import validate_feed

        return validate_feed(M, f)

    def run(self, f):
        if self.fail is not None:
            raise self.fail
        self.calls.append(f["x"].shape[0])
        return {"y": f["x"] * 2 + f["ids"][..., None].astype(np.float32)}


def expected(f):
    return f["x"] * 2 + f["ids"][..., None].astype(np.float32)


def test_run_batch_stacks_equal_shapes_and_splits_the_answers():
    feeds = [feed(1, 3, 0), feed(2, 3, 1), feed(1, 5, 2), feed(1, 3, 3)]
    runner = FakeRunner()
    results = run_batch(runner, feeds, batch_dim="batch", max_rows=4)
    assert sorted(runner.calls) == [1, 4]  # seq 3 stacked (1 + 2 + 1 rows), seq 5 alone
    for f, r in zip(feeds, results, strict=True):
        assert r["y"].shape == f["x"].shape and np.array_equal(r["y"], expected(f))


def test_run_batch_never_stacks_beyond_max_rows_or_without_a_batch_dim():
    feeds = [feed(2, 3, i) for i in range(5)]
    runner = FakeRunner()
    run_batch(runner, feeds, batch_dim="batch", max_rows=4)
    assert runner.calls == [4, 4, 2]
    runner = FakeRunner()
    run_batch(runner, feeds, batch_dim=None, max_rows=4)
    assert runner.calls == [2] * 5


def test_run_batch_fails_a_bad_request_alone():
    bad = feed(1, 3)
    bad["x"] = bad["x"].astype(np.float64)
    results = run_batch(FakeRunner(), [feed(1, 3), bad], batch_dim="batch", max_rows=4)
    assert np.array_equal(results[0]["y"], expected(feed(1, 3)))
    assert results[1] == Failure(400, "Input 'x': expected dtype float32, got float64")


@pytest.mark.parametrize(
    "error, status, message",
    [
        (
            ArtifactError("/secret/path/model.onnx: onnxruntime failed on a valid input: boom"),
            500,
            "model 'tiny': onnxruntime failed on a valid input (details in the server log)",
        ),
        (InputError("Input 'x': odd"), 400, "Input 'x': odd"),
    ],
    ids=["artifact-error-hides-path", "input-error"],
)
def test_run_batch_turns_runner_errors_into_failures(error, status, message):
    results = run_batch(
        FakeRunner(fail=error), [feed(1, 3), feed(1, 3, 1)], batch_dim="batch", max_rows=4
    )
    assert results == [Failure(status, message)] * 2


def test_run_batch_on_a_real_runner_is_bit_exact(served_bundles):
    from runtime import Runner, load_bundle

    bundle = load_bundle(served_bundles["mha_self"])
    rng = np.random.default_rng(5)
    feeds = [
        {
            "x": rng.standard_normal((b, s, 32)).astype(np.float32),
            "key_padding_mask": rng.random((b, s)) > 0.8,
        }
        for b, s in [(1, 7), (2, 7), (1, 7), (3, 2), (1, 7)]
    ]
    with Runner(bundle, reject_nonfinite=True) as runner:
        stacked = run_batch(runner, feeds, batch_dim="batch", max_rows=16)
        for f, got in zip(feeds, stacked, strict=True):
            alone = runner.run(f)
            assert got["y"].tobytes() == alone["y"].tobytes()
