"""Bundles, a server process and process bookkeeping for the serving tests.

`served_bundles`: mha_self and sdpa exported with every variant (what `attnx export` writes).
`zoo_base_bundles`: every zoo entry, base graph only (the Triton configs depend on the I/O,
which every variant shares); set ATTNX_TEST_ZOO=DIR to reuse an `attnx export --all --out DIR`.
`ServerProcess`: `attnx serve` in a subprocess on 127.0.0.1, with the set of processes it
started, so a test can kill a replica and check that nothing outlives the server.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.serve.client import Client


def pytest_collection_modifyitems(config, items):
    """Serving tests need the [serve] extra; without it they skip, as CUDA tests do."""
    if importlib.util.find_spec("ray") is not None:
        return
    skip = pytest.mark.skip(reason="ray is not installed (pip install 'attnx[serve]')")
    for item in items:
        if item.get_closest_marker("serve"):
            item.add_marker(skip)


SERVED = ("mha_self", "sdpa")
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60
REPLICA_TITLE = "ray::ServeReplica:attnx:"


@pytest.fixture(scope="session")
def served_bundles(tmp_path_factory) -> dict[str, Path]:
    from export import export_entry

    out = tmp_path_factory.mktemp("served")
    return {name: export_entry(name, out=out).bundle for name in SERVED}


@pytest.fixture(scope="session")
def zoo_base_bundles(tmp_path_factory) -> dict[str, Path]:
    from models import zoo

    reuse = os.environ.get("ATTNX_TEST_ZOO")
    if reuse:
        return {name: Path(reuse) / name for name in zoo.names()}
    from export import export_entry

    out = tmp_path_factory.mktemp("zoo_base")
    return {name: export_entry(name, out=out, variants=()).bundle for name in zoo.names()}


# ---------------------------------------------------------------------------------------------
# Processes


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) from /proc/<pid>/stat, or None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every living process below `root` (by parent pid)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            parents[int(entry)] = st
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, (ppid, state, start) in parents.items():
            if ppid == pid and child not in found and state != "Z":
                found[child] = start
                frontier.append(child)
    return found


def alive(processes: dict[int, int]) -> list[int]:
    """The pids of `processes` still running (same start time, not a zombie)."""
    left = []
    for pid, start in processes.items():
        st = _stat(pid)
        if st is not None and st[2] == start and st[1] != "Z":
            left.append(pid)
    return left


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class ServerProcess:
    """`attnx serve ... --port P` in its own process group; .stop() checks the cleanup."""

    def __init__(self, bundles: list[Path], *, replicas: int, extra: list[str] = (), log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"serve_{self.port}.log"
        cmd = [
            sys.executable,
            "-m",
            "runtime",
            "serve",
            *map(str, bundles),
            "--replicas",
            str(replicas),
            "--port",
            str(self.port),
            *extra,
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.client = Client(self.url, timeout_s=60)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.client.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"attnx serve did not become ready:\n{self.log_text()}")
            time.sleep(0.5)
        self.processes = descendants(self.proc.pid)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def replicas(self, model: str) -> list[int]:
        title = f"{REPLICA_TITLE}model_{model}"
        return sorted(pid for pid in descendants(self.proc.pid) if cmdline(pid).startswith(title))

    def stop(self) -> dict:
        """SIGINT, wait, then report what is left: {"exit": code, "left": [...], "port_open"}."""
        self.processes.update(descendants(self.proc.pid))
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        deadline = time.monotonic() + 20
        while alive(self.processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [f"{pid} {cmdline(pid)}" for pid in alive(self.processes)]
        report = {"exit": code, "left": left, "port_open": port_open(self.port)}
        self.kill()
        return report

    def kill(self) -> None:
        """Last resort: nothing of ours may outlive the test session."""
        pids = [*alive(getattr(self, "processes", {}))]
        if self.proc.poll() is None:  # a reaped pid may belong to someone else by now
            pids.insert(0, self.proc.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


# ---------------------------------------------------------------------------------------------
# What the serving tests measured, printed at the end of the run


def pytest_configure(config):
    config._attnx_serve_report = []
    # Ray Serve 2.60's own pydantic models warn at import; nothing of ours to act on.
    config.addinivalue_line(
        "filterwarnings", "ignore:Using extra keyword arguments on `Field`:DeprecationWarning"
    )


def report_line(config, line: str) -> None:
    config._attnx_serve_report.append(line)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = getattr(config, "_attnx_serve_report", [])
    if lines:
        terminalreporter.section("attnx serve")
        for line in lines:
            terminalreporter.write_line(line)
