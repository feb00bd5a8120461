"""runtime.serve.client against a scripted stdlib HTTP server (no Ray): encoding, errors,
retries."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from runtime.serve._protocol import encode_tensor
from runtime.serve.client import Client, ServerError, decode_outputs


class Script:
    """Answers to hand out in order: (status, body bytes); the last one repeats."""

    def __init__(self):
        self.answers: list[tuple[int, bytes]] = [(200, b"")]
        self.seen: list[tuple[str, str, bytes]] = []

    def next(self) -> tuple[int, bytes]:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.fixture
def server():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("content-length") or 0)
            script.seen.append((self.command, self.path, self.rfile.read(length)))
            status, data = script.next()
            if data == b"ECHO":  # outputs = the inputs, as an inference response
                doc = json.loads(script.seen[-1][2])
                data = json.dumps({"model_name": "m", "outputs": doc["inputs"]}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield Client(f"http://127.0.0.1:{httpd.server_address[1]}", timeout_s=10), script
    httpd.shutdown()
    httpd.server_close()


def test_infer_round_trips_arrays_bit_for_bit(server):
    client, script = server
    script.answers = [(200, b"ECHO")]
    rng = np.random.default_rng(0)
    inputs = {
        "x": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "m": rng.random((2, 3)) > 0.5,
        "ids": rng.integers(0, 9, (2, 3)),
        "h": rng.standard_normal(5).astype(np.float16),
    }
    out = client.infer("m", inputs, outputs=["x"], request_id="abc")
    assert list(out) == list(inputs)
    for name, arr in inputs.items():
        assert out[name].dtype == arr.dtype and out[name].tobytes() == arr.tobytes()
    method, path, body = script.seen[-1]
    doc = json.loads(body)
    assert (method, path) == ("POST", "/v2/models/m/infer")
    assert doc["id"] == "abc" and doc["outputs"] == [{"name": "x"}]
    assert doc["inputs"][1] == {
        "name": "m",
        "datatype": "BOOL",
        "shape": [2, 3],
        "data": inputs["m"].ravel().tolist(),
    }


def test_model_names_are_quoted_in_paths(server):
    client, script = server
    script.answers = [(200, b'{"name": "a b"}')]
    assert client.metadata("a b/c") == {"name": "a b"}
    assert script.seen[-1][1] == "/v2/models/a%20b%2Fc"


@pytest.mark.parametrize(
    "status, data, message, retryable",
    [
        (
            400,
            b'{"error": "Input \'x\': axis 2 expected 32, got 31"}',
            r"HTTP 400: Input 'x': axis 2 expected 32, got 31",
            False,
        ),
        (404, b'{"error": "unknown model \'m\'"}', r"HTTP 404: unknown model 'm'", False),
        (503, b'{"error": "replica died", "retryable": true}', r"HTTP 503: replica died", True),
        (502, b"Bad Gateway", r"HTTP 502: Bad Gateway", True),
        (500, b"", r"HTTP 500: \(empty body\)", False),
        (413, b'{"other": 1}', r'HTTP 413: \{"other": 1\}', False),
    ],
    ids=["400", "404", "503", "502-text", "500-empty", "413-odd-json"],
)
def test_errors_carry_status_message_and_retryability(server, status, data, message, retryable):
    client, script = server
    script.answers = [(status, data)]
    with pytest.raises(ServerError, match=message) as e:
        client.infer("m", {"x": np.zeros(2, np.float32)})
    assert e.value.status == status and e.value.retryable is retryable


def test_retryable_errors_are_retried_then_succeed(server):
    client, script = server
    script.answers = [(503, b'{"error": "gone"}'), (503, b'{"error": "gone"}'), (200, b"ECHO")]
    out = client.infer("m", {"x": np.ones(2, np.float32)}, retries=2, retry_wait_s=0.01)
    assert np.array_equal(out["x"], np.ones(2, np.float32))
    assert len(script.seen) == 3


def test_retries_stop_at_the_limit_and_never_retry_a_400(server):
    client, script = server
    script.answers = [(503, b'{"error": "gone"}')]
    with pytest.raises(ServerError, match="gone"):
        client.infer("m", {"x": np.ones(2, np.float32)}, retries=1, retry_wait_s=0.01)
    assert len(script.seen) == 2
    script.answers = [(400, b'{"error": "bad"}')]
    with pytest.raises(ServerError, match="bad"):
        client.infer("m", {"x": np.ones(2, np.float32)}, retries=3, retry_wait_s=0.01)
    assert len(script.seen) == 3


def test_an_answer_that_is_not_json_is_an_error(server):
    client, script = server
    script.answers = [(200, b"<html>")]
    with pytest.raises(ServerError, match=r"the answer is not JSON: b'<html>'"):
        client.server_metadata()


def test_health_checks_are_booleans(server):
    client, script = server
    script.answers = [(200, b"")]
    assert client.live() and client.ready() and client.model_ready("m")
    script.answers = [(503, b"")]
    assert not client.ready() and not client.model_ready("m")
    assert not client.wait_ready(timeout_s=0.3, interval_s=0.05)
    script.answers = [(503, b""), (200, b"")]
    assert client.wait_ready(timeout_s=5, interval_s=0.05)
    assert [p for _, p, _ in script.seen[:4]] == [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/m/ready",
        "/v2/health/ready",
    ]


def test_no_server_is_a_retryable_error_and_not_live():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    client = Client(f"http://127.0.0.1:{port}", timeout_s=2)
    assert not client.live()
    with pytest.raises(ServerError, match=r"no answer \(.*refused") as e:
        client.infer("m", {"x": np.zeros(1, np.float32)})
    assert e.value.retryable and e.value.status is None


def test_inputs_without_a_protocol_datatype_are_refused():
    with pytest.raises(
        ServerError,
        match=r"input 'c': dtype complex64 has no Open Inference "
        r"Protocol datatype",
    ):
        Client.infer_body({"c": np.zeros(2, np.complex64)})


def test_decode_outputs_refuses_unknown_datatypes():
    assert (
        decode_outputs({"outputs": [encode_tensor("y", np.eye(2, dtype=np.float64))]})["y"].dtype
        == np.float64
    )
    with pytest.raises(ServerError, match=r"output 's': unsupported datatype 'BYTES'"):
        decode_outputs(
            {"outputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
        )
