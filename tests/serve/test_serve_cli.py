"""`attnx serve` without starting Ray: the cluster config (`serve build` style) and its
application builder, argument checks, user errors (one line, exit 2), and the local lifecycle
(Ray and Serve always shut down) driven through a stand-in `ray` module."""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import types

import pytest
import yaml

import runtime.serve as serving
from export._cli import main
from runtime import InputError, available_providers
from runtime.serve import AppConfig, app_builder, cluster_config, serve_locally
from runtime.serve import _run as run_module
from runtime.serve._config import write_cluster_config

pytestmark = pytest.mark.serve


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def bundles(served_bundles):
    return [str(served_bundles["mha_self"]), str(served_bundles["sdpa"])]


# ---------------------------------------------------------------------------------------------
# The cluster config


def test_config_out_yaml_is_a_valid_serve_deploy_config(bundles, tmp_path, capsys):
    from ray.serve.schema import ServeDeploySchema

    path = tmp_path / "serve.yaml"
    code, out, _ = run_cli(
        [
            "serve",
            *bundles,
            "--replicas",
            "3",
            "--max-batch-size",
            "4",
            "--port",
            "8123",
            "--config-out",
            str(path),
        ],
        capsys,
    )
    assert code == 0 and f"serve deploy {path}" in out
    doc = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(doc)  # what `serve deploy` checks
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 8123
    app = doc["applications"][0]
    assert app["import_path"] == "runtime.serve:app_builder" and app["route_prefix"] == "/"
    assert app["args"]["bundles"] == bundles and app["args"]["replicas"] == 3
    assert app["args"]["max_batch_size"] == 4
    assert {d["name"]: d["num_replicas"] for d in app["deployments"]} == {
        "OIPIngress": 3,
        "model_mha_self": 3,
        "model_sdpa": 3,
    }


def test_the_config_import_path_builds_the_application_ray_expects(bundles, tmp_path):
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    doc = cluster_config(AppConfig.from_args({"bundles": bundles}), host="127.0.0.1", port=8000)
    module, attr = doc["applications"][0]["import_path"].split(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    app = call_user_app_builder_with_args_if_necessary(builder, doc["applications"][0]["args"])
    assert isinstance(app, Application)
    assert builder is app_builder


def test_config_out_json_and_yaml_without_pyyaml(bundles, tmp_path, monkeypatch):
    config = AppConfig.from_args({"bundles": bundles})
    write_cluster_config(config, tmp_path / "serve.json", host="127.0.0.1", port=8000)
    assert json.loads((tmp_path / "serve.json").read_text())["proxy_location"] == "EveryNode"
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(
        InputError,
        match=r"writing YAML needs PyYAML \(it comes with the "
        r"\[serve\] extra\); or write JSON",
    ):
        write_cluster_config(config, tmp_path / "serve.yaml", host="127.0.0.1", port=8000)


def test_default_body_cap_comes_from_the_manifests(bundles):
    config = AppConfig.from_args({"bundles": bundles})
    # sdpa at its max: 3 x [16, 4, 256, 8] floats + a [16, 1, 256, 256] mask, as JSON.
    assert config.max_body_bytes == (3 * 16 * 4 * 256 * 8 + 16 * 256 * 256) * 32 + 64 * 1024
    assert config.names == ["mha_self", "sdpa"] and config.max_ongoing_requests == 32


# ---------------------------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize(
    "args, message",
    [
        ("not a mapping", r"serve arguments must be a mapping, got str"),
        ({"bundles": [], "x": 1}, r"unknown serve argument 'x'; known: bundles, replicas"),
        ({"bundles": []}, r"serve needs 'bundles': a non-empty list of bundle folders"),
        ({"bundles": "a"}, r"serve needs 'bundles'"),
        ({"replicas": 0}, r"replicas must be an integer >= 1, got 0"),
        ({"max_batch_size": 2.0}, r"max_batch_size must be an integer >= 1, got 2.0"),
        ({"threads": True}, r"threads must be an integer >= 1, got True"),
        ({"batch_wait_ms": -1}, r"batch_wait_ms must be a finite number >= 0, got -1"),
        ({"replica_cpus": float("nan")}, r"replica_cpus must be a finite number >= 0, got nan"),
        ({"provider": "tpu"}, r"provider must be one of auto, cpu, cuda, got 'tpu'"),
        ({"max_body_bytes": 0}, r"max_body_bytes must be an integer >= 1, got 0"),
    ],
    ids=[
        "not-mapping",
        "unknown",
        "no-bundles",
        "bundles-str",
        "replicas",
        "batch-float",
        "threads-bool",
        "wait",
        "cpus-nan",
        "provider",
        "body",
    ],
)
def test_app_config_refuses_bad_arguments(bundles, args, message):
    if isinstance(args, dict) and "bundles" not in args:
        args = {"bundles": bundles, **args}
    with pytest.raises(InputError, match=message):
        AppConfig.from_args(args)


def test_the_same_model_twice_is_refused(bundles, tmp_path):
    import shutil

    copy = shutil.copytree(bundles[0], tmp_path / "copy")
    with pytest.raises(
        InputError,
        match=r"two bundles are both named 'mha_self'; a server "
        r"serves each model name once",
    ):
        AppConfig.from_args({"bundles": [bundles[0], str(copy)]})


# ---------------------------------------------------------------------------------------------
# User errors before Ray starts


def test_a_port_in_use_is_one_line(bundles, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, out, err = run_cli(["serve", *bundles, "--port", str(port)], capsys)
    assert code == 2 and out == ""
    assert err.strip() == f"attnx: error: cannot listen on 127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "0"], r"--port must be within 1..65535, got 0"),
        (["--port", "70000", "--config-out", "x.json"], r"--port must be within 1..65535"),
        (["--host", "no-such-host.invalid"], r"--host 'no-such-host.invalid': cannot resolve"),
        (["--replicas", "0"], r"replicas must be an integer >= 1, got 0"),
    ],
    ids=["port-0", "port-config", "host", "replicas"],
)
def test_serve_user_errors_are_one_line(bundles, capsys, argv, message):
    code, _, err = run_cli(["serve", *bundles, *argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_a_missing_bundle_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["serve", str(tmp_path / "nope")], capsys)
    assert code == 2 and "not a bundle folder" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(
    "CUDAExecutionProvider" in available_providers(),
    reason="cuda is available here; the point is a machine without it",
)
def test_cuda_without_cuda_is_refused_before_ray_starts(bundles, capsys):
    code, _, err = run_cli(
        ["serve", *bundles, "--provider", "cuda", "--port", str(free_port())], capsys
    )
    assert code == 2 and "provider 'cuda' requested but onnxruntime offers only" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The command and the local lifecycle, with stand-ins for Ray


def test_serve_command_warns_off_loopback_and_handles_ctrl_c(bundles, capsys, monkeypatch):
    calls = []

    def fake(config, **kwargs):
        calls.append(kwargs)
        kwargs["on_ready"]("http://0.0.0.0:8000")

    monkeypatch.setattr(serving, "serve_locally", fake)
    code, out, err = run_cli(
        ["serve", *bundles, "--host", "0.0.0.0", "--port", str(free_port())], capsys
    )
    assert code == 0 and calls[0]["host"] == "0.0.0.0" and calls[0]["handle_signals"]
    assert (
        err == "attnx: warning: listening on 0.0.0.0: reachable from other machines, "
        "without authentication\n"
    )
    assert out.splitlines() == [
        "serving mha_self, sdpa at http://0.0.0.0:8000/v2 (1 "
        "replica(s) each); Ctrl-C or SIGTERM stops",
        "stopped",
    ]

    def interrupted(config, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(serving, "serve_locally", interrupted)
    code, _, err = run_cli(["serve", *bundles, "--port", str(free_port())], capsys)
    assert code == 130 and err == "interrupted\n"


class FakeRay:
    """`ray` and `ray.serve` stand-ins that record calls; serve.run may fail on purpose."""

    def __init__(self, run_error: Exception | None = None):
        self.calls: list[tuple] = []
        self.ray = types.ModuleType("ray")
        self.serve = types.ModuleType("ray.serve")
        self.ray.serve = self.serve
        self.ray.init = lambda **kw: self.calls.append(("ray.init", kw))
        self.ray.shutdown = lambda: self.calls.append(("ray.shutdown",))
        self.serve.start = lambda **kw: self.calls.append(("serve.start", kw))
        self.serve.shutdown = lambda: self.calls.append(("serve.shutdown",))

        def run(app, **kw):
            self.calls.append(("serve.run", kw))
            if run_error is not None:
                raise run_error

        self.serve.run = run

    def install(self, monkeypatch):
        app = types.ModuleType("runtime.serve._app")
        app.build_app = lambda config: "the app"
        monkeypatch.setitem(sys.modules, "ray", self.ray)
        monkeypatch.setitem(sys.modules, "ray.serve", self.serve)
        monkeypatch.setitem(sys.modules, "runtime.serve._app", app)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def test_serve_locally_starts_small_and_always_shuts_down(bundles, monkeypatch):
    fake = FakeRay()
    fake.install(monkeypatch)
    stop = threading.Event()
    urls = []

    def ready(url):
        urls.append(url)
        stop.set()

    config = AppConfig.from_args({"bundles": bundles, "replicas": 2})
    serve_locally(config, host="127.0.0.1", port=free_port(), on_ready=ready, stop=stop)
    assert fake.names() == [
        "ray.init",
        "serve.start",
        "serve.run",
        "serve.shutdown",
        "ray.shutdown",
    ]
    init = fake.calls[0][1]
    assert init["num_cpus"] == 4 and init["include_dashboard"] is False
    assert init["object_store_memory"] == run_module.OBJECT_STORE_BYTES
    assert fake.calls[1][1]["http_options"]["host"] == "127.0.0.1"
    assert urls[0].startswith("http://127.0.0.1:")


def test_an_application_that_does_not_start_is_one_line_and_shuts_down(bundles, monkeypatch):
    fake = FakeRay(RuntimeError("Deploying app 'attnx' failed with exception:\nTraceback ..."))
    fake.install(monkeypatch)
    config = AppConfig.from_args({"bundles": bundles})
    with pytest.raises(
        serving._run.AttnxError,
        match=r"^the Serve application did not start: "
        r"Deploying app 'attnx' failed with "
        r"exception:$",
    ):
        serve_locally(config, host="127.0.0.1", port=free_port())
    assert fake.names()[-2:] == ["serve.shutdown", "ray.shutdown"]


def test_serve_without_ray_says_which_extra(bundles, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    config = AppConfig.from_args({"bundles": bundles})
    with pytest.raises(
        InputError,
        match=r"attnx serve needs Ray Serve: pip install "
        r"'attnx\[serve\]'",
    ):
        serve_locally(config, host="127.0.0.1", port=free_port())


def test_signals_stop_the_server_and_handlers_are_restored(bundles, monkeypatch):
    import signal

    fake = FakeRay()
    fake.install(monkeypatch)
    before = signal.getsignal(signal.SIGTERM)
    config = AppConfig.from_args({"bundles": bundles})
    serve_locally(
        config,
        host="127.0.0.1",
        port=free_port(),
        handle_signals=True,
        on_ready=lambda url: signal.raise_signal(signal.SIGTERM),
    )
    assert fake.names()[-2:] == ["serve.shutdown", "ray.shutdown"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_serving_modules_stay_light_to_import(tmp_path):
    """`import runtime` (and the CLI) must not pull in ray, tritonclient or starlette."""
    import subprocess

    code = (
        "import sys, runtime, runtime.serve, runtime.serve.client, runtime.serve._triton\n"
        "import runtime._cli\n"
        "runtime._cli.build_parser()\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'tritonclient', "
        "'starlette', 'torch', 'onnxscript', 'grpc'})\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert out.stdout.strip() == "[]"
