"""`attnx serve` for real: Ray Serve on 127.0.0.1 serving mha_self and sdpa (2 replicas each).

One server for the module. The answers are compared bit for bit with a direct Runner; bad
requests get the right status and a clear JSON message; a bounded concurrent load is exact; a
replica killed during load is replaced and no request gets a wrong answer; stopping the server
leaves no process behind and closes the port. Timings are reported, never asserted.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from runtime import Runner, load_bundle
from runtime.serve.client import Client, ServerError
from tests.serve.conftest import SERVED, ServerProcess, report_line

pytestmark = pytest.mark.serve

REPLICAS = 2
BODY_CAP = 200_000
LOAD_CLIENTS, LOAD_REQUESTS = 16, 400
KILL_CLIENTS, KILL_REQUESTS, KILL_AFTER = 16, 600, 120
REPLACE_TIMEOUT_S = 120
# What a response must never show: a traceback, a file of the server, a temp or package path.
LEAKS = re.compile(r"Traceback|File \"|\.py\b|/tmp/|site-packages|/root/|/home/")


@pytest.fixture(scope="module")
def server(served_bundles, tmp_path_factory):
    srv = ServerProcess(
        [served_bundles[n] for n in SERVED],
        replicas=REPLICAS,
        extra=["--max-body-bytes", str(BODY_CAP)],
        log_dir=tmp_path_factory.mktemp("serve_logs"),
    )
    yield srv
    srv.kill()  # a no-op after test_stop...; the safety net when that test did not run


@pytest.fixture(scope="module")
def runners(served_bundles):
    """Direct Runners with the server's settings (1 intra-op thread, NaN/Inf refused)."""
    made = {n: Runner(served_bundles[n], threads=1, reject_nonfinite=True) for n in SERVED}
    yield made
    for r in made.values():
        r.close()


def random_feed(manifest, point: dict[str, int], rng) -> dict[str, np.ndarray]:
    feed = {}
    for spec in manifest.inputs:
        shape = [d if isinstance(d, int) else point[d] for d in spec.shape]
        if spec.dtype == "bool":
            feed[spec.name] = rng.random(shape) > 0.2
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feed


POINTS = [
    {"batch": 1, "seq": 1, "kv_seq": 1},
    {"batch": 2, "seq": 7, "kv_seq": 5},
    {"batch": 1, "seq": 7, "kv_seq": 5},
    {"batch": 3, "seq": 16, "kv_seq": 9},
]


@pytest.fixture(scope="module")
def cases(runners):
    """(model, feed, expected outputs): golden inputs plus random points, for both models."""
    rng = np.random.default_rng(0)
    made = []
    for name, runner in runners.items():
        feeds = [dict(g.inputs) for g in load_bundle(runner.bundle.dir).golden]
        feeds += [random_feed(runner.manifest, p, rng) for p in POINTS for _ in range(3)]
        made += [(name, f, runner.run(f)) for f in feeds]
    return made


def exact(got: dict, want: dict) -> bool:
    return list(got) == list(want) and all(
        got[k].dtype == want[k].dtype
        and got[k].shape == want[k].shape
        and got[k].tobytes() == want[k].tobytes()
        for k in want
    )


# ---------------------------------------------------------------------------------------------
# Endpoints


def test_health_and_metadata(server):
    c = server.client
    assert c.live() and c.ready()
    assert all(c.model_ready(n) for n in SERVED)
    assert c.server_metadata()["name"] == "attnx"
    meta = c.metadata("mha_self")
    assert meta["name"] == "mha_self" and meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, -1, 32]},
        {"name": "key_padding_mask", "datatype": "BOOL", "shape": [-1, -1]},
    ]
    assert c.metadata("sdpa")["attnx"]["dims"]["kv_seq"] == [1, 256]
    assert c.request("GET", "/v2/models/nope/ready")[0] == 404


def test_answers_equal_the_direct_runner_bit_for_bit(server, cases):
    for name, feed, want in cases:
        got = server.client.infer(name, feed)
        assert exact(got, want), (name, {k: v.shape for k, v in feed.items()})


def test_versioned_path_requested_outputs_and_id(server, cases):
    name, feed, want = cases[0]
    body = Client.infer_body(feed, outputs=list(want), request_id="req-1")
    status, raw = server.client.request("POST", f"/v2/models/{name}/versions/1/infer", body)
    doc = json.loads(raw)
    assert status == 200 and doc["id"] == "req-1" and doc["model_name"] == name
    assert [o["name"] for o in doc["outputs"]] == list(want)


def test_concurrent_load_is_exact(server, cases, request):
    picks = [cases[i % len(cases)] for i in range(LOAD_REQUESTS)]

    def one(case):
        name, feed, want = case
        started = time.perf_counter()
        got = server.client.infer(name, feed)
        return exact(got, want), time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        results = list(pool.map(one, picks))
    wall = time.perf_counter() - started
    assert all(ok for ok, _ in results)
    latencies = np.array([s for _, s in results]) * 1e3
    report_line(
        request.config,
        f"load: {LOAD_REQUESTS} requests from {LOAD_CLIENTS} clients, "
        f"{REPLICAS} replicas per model: 0 errors, all exact; "
        f"{LOAD_REQUESTS / wall:.0f} req/s, p50 {np.percentile(latencies, 50):.1f} ms, "
        f"p99 {np.percentile(latencies, 99):.1f} ms",
    )


# ---------------------------------------------------------------------------------------------
# Refusals


def tensor(name, datatype, shape, data):
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def mha_body(**changes) -> bytes:
    x = tensor("x", "FP32", [1, 2, 32], [0.5] * 64)
    mask = tensor("key_padding_mask", "BOOL", [1, 2], [False, True])
    x.update(changes)
    return json.dumps({"inputs": [x, mask]}).encode()


REFUSALS = {
    "malformed-json": (
        "POST",
        "/v2/models/mha_self/infer",
        b'{"inputs": [',
        400,
        r"request body is not valid JSON \(Expecting value at line 1 column 13\)",
    ),
    "wrong-dtype": (
        "POST",
        "/v2/models/mha_self/infer",
        mha_body(datatype="FP64"),
        400,
        r"Input 'x': expected datatype FP32, got 'FP64'",
    ),
    "wrong-values": (
        "POST",
        "/v2/models/mha_self/infer",
        mha_body(data=[1] * 63 + [True]),
        400,
        r"Input 'x': datatype FP32 needs numbers, got true/false values",
    ),
    "wrong-shape": (
        "POST",
        "/v2/models/mha_self/infer",
        mha_body(shape=[1, 2, 31], data=[0.5] * 62),
        400,
        r"Input 'x': axis 2 expected 32, got 31",
    ),
    "seq-above-max": (
        "POST",
        "/v2/models/mha_self/infer",
        mha_body(shape=[1, 300, 32], data=[0.0] * 9600),
        400,
        r"Input 'x': axis 1 \('seq'\) expected 1..256, got 300 \(above the max",
    ),
    "unknown-model": (
        "POST",
        "/v2/models/nope/infer",
        mha_body(),
        404,
        r"unknown model 'nope'; served models: mha_self, sdpa",
    ),
    "unknown-endpoint": ("GET", "/v2/repository/index", b"", 404, r"no such endpoint"),
    "get-infer": ("GET", "/v2/models/mha_self/infer", b"", 405, r"takes POST, not 'GET'"),
    "oversize": (
        "POST",
        "/v2/models/mha_self/infer",
        b" " * (BODY_CAP + 1),
        413,
        rf"request body is {BODY_CAP + 1} bytes, above the limit of {BODY_CAP} bytes",
    ),
}


@pytest.mark.parametrize(
    "method, path, body, status, message", list(REFUSALS.values()), ids=list(REFUSALS)
)
def test_bad_requests_get_the_right_status_and_a_clear_message(
    server, served_bundles, method, path, body, status, message
):
    got, raw = server.client.request(method, path, body or None)
    assert got == status
    text = json.loads(raw)["error"]
    assert re.search(message, text), text
    assert not LEAKS.search(raw.decode())
    assert not any(str(folder) in raw.decode() for folder in served_bundles.values())


def test_oversize_chunked_body_without_length_is_refused(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    chunks = (b" " * 50_000 for _ in range(6))
    conn.request("POST", "/v2/models/mha_self/infer", body=chunks, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413
    assert (
        json.loads(response.read())["error"]
        == f"request body is above the limit of {BODY_CAP} bytes"
    )
    conn.close()


def test_binary_tensor_extension_is_refused(server):
    req = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    req.request(
        "POST",
        "/v2/models/mha_self/infer",
        body=b"{}",
        headers={"Inference-Header-Content-Length": "2"},
    )
    response = req.getresponse()
    assert response.status == 400
    assert (
        "binary tensor data is not supported; send JSON tensors"
        in json.loads(response.read())["error"]
    )
    req.close()


# ---------------------------------------------------------------------------------------------
# A replica dies during load


def test_a_replica_killed_during_load_is_replaced_and_no_answer_is_wrong(server, cases, request):
    mha = [c for c in cases if c[0] == "mha_self"]
    before = server.replicas("mha_self")
    assert len(before) == REPLICAS
    victim = before[0]
    outcomes: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def one(i):
        name, feed, want = mha[i % len(mha)]
        try:
            got = server.client.infer(name, feed)
            outcome = "ok" if exact(got, want) else "WRONG"
        except ServerError as e:
            outcome = f"retryable {e.status}" if e.retryable else f"ERROR {e}"
        with lock:
            outcomes.append(outcome)
            if len(outcomes) == KILL_AFTER:
                os.kill(victim, signal.SIGKILL)
                killed.set()
        return outcome

    with ThreadPoolExecutor(KILL_CLIENTS) as pool:
        list(pool.map(one, range(KILL_REQUESTS)))
    assert killed.is_set()
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    started = time.monotonic()
    while time.monotonic() - started < REPLACE_TIMEOUT_S:
        now = server.replicas("mha_self")
        if len(now) == REPLICAS and victim not in now and server.client.model_ready("mha_self"):
            break
        time.sleep(0.5)
    replaced = server.replicas("mha_self")
    report_line(
        request.config,
        f"replica kill: SIGKILL of 1 of {REPLICAS} mha_self replicas "
        f"after {KILL_AFTER} of {KILL_REQUESTS} requests ({KILL_CLIENTS} clients): "
        f"{counts}; replicas {before} -> {replaced}",
    )
    assert not [k for k in counts if k.startswith(("WRONG", "ERROR"))], counts
    assert all(k in ("ok", "retryable 503") for k in counts), counts
    assert len(replaced) == REPLICAS and victim not in replaced, (before, replaced)
    name, feed, want = mha[0]
    assert exact(server.client.infer(name, feed), want)


# ---------------------------------------------------------------------------------------------
# Stop


def test_stop_leaves_no_process_behind_and_closes_the_port(server, request):
    started = time.monotonic()
    report = server.stop()
    report_line(
        request.config,
        f"stop: exit {report['exit']} in "
        f"{time.monotonic() - started:.1f} s, {len(server.processes)} processes "
        f"tracked, {len(report['left'])} left",
    )
    assert report == {"exit": 0, "left": [], "port_open": False}, report
    assert "stopped" in server.log_text()
