"""Run the application on this machine: a small local Ray, Serve on host:port, a clean stop.

Ray's footprint is kept small: no dashboard, a 256 MiB object store, logical CPUs just enough
for the model replicas (the ingress and Serve's proxy and controller reserve none), usage
statistics off unless the environment turns them on. `serve.shutdown()` and `ray.shutdown()`
run on every way out, so no Ray process outlives the call.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import signal
import socket
import threading
from collections.abc import Callable

from runtime._errors import AttnxError, InputError
from runtime._runner import choose_variant
from runtime._session import resolve_provider

from ._config import APP_NAME, AppConfig

LOCAL_CPUS = 2
OBJECT_STORE_BYTES = 256 * 1024 * 1024
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """Refuse early (one line) when nothing can listen on host:port: Serve's proxy would
    otherwise keep retrying in the background."""
    if not 0 < port < 65536:
        raise InputError(f"--port must be within 1..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise InputError(f"--host {host!r}: cannot resolve ({e.strerror})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def serve_locally(config: AppConfig, *, host: str, port: int,
                  on_ready: Callable[[str], None] = print,
                  stop: threading.Event | None = None, handle_signals: bool = False) -> None:
    """Start Ray and Serve, call on_ready(url), block until `stop` is set (or, with
    handle_signals, SIGINT/SIGTERM arrives), shut down."""
    check_port(host, port)
    provider = resolve_provider(config.provider)  # here, not in a replica's constructor
    for model in config.models:
        choose_variant(model.manifest, provider)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise InputError("attnx serve needs Ray Serve: pip install 'attnx[serve]'") from None
    from ._app import build_app

    app = build_app(config)
    needed = math.ceil(config.replicas * len(config.models) * config.replica_cpus)
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    ray.init(num_cpus=max(LOCAL_CPUS, needed), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, object_store_memory=OBJECT_STORE_BYTES,
             namespace=APP_NAME)
    stop = stop or threading.Event()
    previous = {}
    if handle_signals:  # after ray.init, which installs its own SIGTERM handler
        previous = {s: signal.signal(s, lambda *_: stop.set())
                    for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port},
                    logging_config={"log_level": "WARNING"})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # a replica constructor failed: Ray's text is a traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AttnxError(f"the Serve application did not start: {first}") from None
        on_ready(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
        while not stop.wait(0.5):  # short waits: signal handlers run between them
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)
