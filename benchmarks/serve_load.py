"""Load on `attnx serve` (Ray Serve, Open Inference Protocol over HTTP/JSON), 127.0.0.1 only.

    python benchmarks/serve_load.py                    # exports mha_self and sdpa first
    python benchmarks/serve_load.py --bundles DIR      # or serve DIR/mha_self and DIR/sdpa

For 1 and then 2 replicas per model: start `python -m runtime serve` in a subprocess, warm up,
then --clients concurrent clients (threads, one urllib request at a time each) send
--requests requests, mixed over both models and several shapes (batch 1-3, seq 1-32).
Every answer is compared bit for bit with a direct Runner (1 intra-op thread, as each replica
runs). Then, with 2 replicas, the same load again while one mha_self replica is killed
(SIGKILL) after --kill-after answers: each request either succeeds exactly or fails with a
retryable error (503 / no answer); the counts and the time until Ray has replaced the
replica are recorded.

The clients run on the same machine as the server and share its cores, so the figures are a
floor for what the server alone would do. Writes serve_load.json and .md
under benchmarks/results/<cpu kind>/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime import Runner, load_bundle  # noqa: E402
from runtime.serve.client import Client, ServerError  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from machine import results_dir  # noqa: E402

MODELS = ("mha_self", "sdpa")
POINTS = [
    {"batch": 1, "seq": 1, "kv_seq": 1},
    {"batch": 1, "seq": 8, "kv_seq": 8},
    {"batch": 2, "seq": 8, "kv_seq": 16},
    {"batch": 1, "seq": 32, "kv_seq": 32},
    {"batch": 3, "seq": 16, "kv_seq": 5},
]
FEEDS_PER_POINT = 4
REPLICA_TITLE = "ray::ServeReplica:attnx:model_"
START_TIMEOUT_S, REPLACE_TIMEOUT_S = 180, 120


def export_bundles(out: Path) -> dict[str, Path]:
    from export import export_entry

    return {name: export_entry(name, out=out).bundle for name in MODELS}


def make_cases(bundles: dict[str, Path]) -> list[tuple[str, dict, dict]]:
    rng = np.random.default_rng(0)
    cases = []
    for name, folder in bundles.items():
        bundle = load_bundle(folder)
        with Runner(bundle, threads=1, reject_nonfinite=True) as runner:
            for point in POINTS:
                for _ in range(FEEDS_PER_POINT):
                    feed = {}
                    for spec in bundle.manifest.inputs:
                        shape = [d if isinstance(d, int) else point[d] for d in spec.shape]
                        feed[spec.name] = (
                            rng.random(shape) > 0.2
                            if spec.dtype == "bool"
                            else rng.standard_normal(shape).astype(spec.dtype)
                        )
                    cases.append((name, feed, runner.run(feed)))
    order = rng.permutation(len(cases))
    return [cases[i] for i in order]


def exact(got: dict, want: dict) -> bool:
    return list(got) == list(want) and all(
        got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes() for k in want
    )


# ---------------------------------------------------------------------------------------------
# The server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(text[text.rindex(")") + 2 :].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, p in parents.items() if p == pid]
        found += kids
        frontier += kids
    return found


def replicas(root: int, model: str) -> list[int]:
    pids = []
    for pid in children(root):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if title.startswith(REPLICA_TITLE + model):
            pids.append(pid)
    return sorted(pids)


class Server:
    def __init__(self, bundles: dict[str, Path], replicas_per_model: int, args):
        self.port = free_port()
        self.command = [
            sys.executable,
            "-m",
            "runtime",
            "serve",
            *map(str, bundles.values()),
            "--replicas",
            str(replicas_per_model),
            "--port",
            str(self.port),
            "--max-batch-size",
            str(args.max_batch_size),
        ]
        self.log = tempfile.NamedTemporaryFile(prefix="serve_load_", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            self.command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
        )
        self.client = Client(f"http://127.0.0.1:{self.port}", timeout_s=60)
        started = time.monotonic()
        while not self.client.ready():
            if self.proc.poll() is not None or time.monotonic() - started > START_TIMEOUT_S:
                self.proc.kill()
                raise SystemExit(f"serve did not start; see {self.log.name}")
            time.sleep(0.5)
        self.start_s = time.monotonic() - started

    def stop(self) -> float:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        return time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# Load


def load(client: Client, cases, *, clients: int, requests: int, on_answer=None) -> dict:
    outcomes, latencies = [], []
    lock = threading.Lock()

    def one(i: int):
        name, feed, want = cases[i % len(cases)]
        started = time.perf_counter()
        try:
            outcome = "ok" if exact(client.infer(name, feed), want) else "wrong"
        except ServerError as e:
            outcome = f"retryable {e.status}" if e.retryable else f"error {e.status}: {e}"
        elapsed = time.perf_counter() - started
        with lock:
            outcomes.append(outcome)
            if outcome == "ok":
                latencies.append(elapsed)
            if on_answer is not None:
                on_answer(len(outcomes))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1e3
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    return {
        "requests": requests,
        "clients": clients,
        "wall_s": round(wall, 2),
        "throughput_per_s": round(requests / wall, 1),
        "outcomes": counts,
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p90_ms": round(float(np.percentile(ms, 90)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
    }


def run_plain(bundles, cases, replicas_per_model: int, args) -> dict:
    server = Server(bundles, replicas_per_model, args)
    try:
        load(server.client, cases, clients=args.clients, requests=args.warmup)
        result = load(server.client, cases, clients=args.clients, requests=args.requests)
    finally:
        stop_s = server.stop()
    result.update(
        replicas=replicas_per_model,
        start_s=round(server.start_s, 1),
        stop_s=round(stop_s, 1),
        command=" ".join(server.command[1:]),
    )
    print(
        f"{replicas_per_model} replica(s): {result['throughput_per_s']} req/s, p50 "
        f"{result['p50_ms']} ms, p99 {result['p99_ms']} ms, outcomes {result['outcomes']}",
        flush=True,
    )
    return result


def run_kill(bundles, cases, args) -> dict:
    server = Server(bundles, 2, args)
    before = replicas(server.proc.pid, "mha_self")
    killed = {}

    def on_answer(count: int):
        if count == args.kill_after and not killed:
            os.kill(before[0], signal.SIGKILL)
            killed["at"] = time.monotonic()

    try:
        load(server.client, cases, clients=args.clients, requests=args.warmup)
        result = load(
            server.client, cases, clients=args.clients, requests=args.requests, on_answer=on_answer
        )
        replaced_s, after = None, []
        while time.monotonic() - killed["at"] < REPLACE_TIMEOUT_S:
            after = replicas(server.proc.pid, "mha_self")
            if len(after) == 2 and before[0] not in after and server.client.model_ready("mha_self"):
                replaced_s = time.monotonic() - killed["at"]
                break
            time.sleep(0.2)
        name, feed, want = cases[0]
        result["after_replacement_exact"] = exact(server.client.infer(name, feed), want)
    finally:
        server.stop()
    result.update(
        replicas=2,
        killed_pid=before[0],
        killed_after=args.kill_after,
        replicas_before=before,
        replicas_after=after,
        replaced_within_s=None if replaced_s is None else round(replaced_s, 1),
    )
    print(
        f"kill: outcomes {result['outcomes']}, replaced within {result['replaced_within_s']} "
        f"s ({before} -> {after})",
        flush=True,
    )
    return result


# ---------------------------------------------------------------------------------------------
# Report


def markdown(report: dict) -> str:
    rows = [
        f"| {r['replicas']} | {r['requests']} | {r['clients']} | {r['throughput_per_s']} | "
        f"{r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} | "
        f"{r['outcomes']} |"
        for r in report["runs"]
    ]
    k = report["kill"]
    env = report["environment"]
    return "\n".join(
        [
            "# attnx serve under load (127.0.0.1)",
            "",
            f"Machine: {env['cpus']} CPUs, Python {env['python']}, ray {env['ray']}, onnxruntime "
            f"{env['onnxruntime']}. Models: {', '.join(MODELS)} ({len(report['shapes'])} shapes, "
            f"batch 1-3, seq 1-32), every answer compared bit for bit with a direct Runner. "
            f"Clients share the machine with the server.",
            "",
            "| replicas per model | requests | clients | req/s | p50 ms | p90 ms | p99 ms | max ms "
            "| outcomes |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Replica kill: SIGKILL of one of 2 mha_self replicas after {k['killed_after']} "
            f"answers of {k['requests']}: outcomes {k['outcomes']} (no wrong answer: "
            f"{'wrong' not in k['outcomes']}); Ray replaced the replica within "
            f"{k['replaced_within_s']} s; an answer after the replacement is exact: "
            f"{k['after_replacement_exact']}. {k['throughput_per_s']} req/s, p99 {k['p99_ms']} ms "
            f"during that run.",
            "",
            f"Command: `python benchmarks/serve_load.py {' '.join(report['argv'])}`".rstrip() + "",
            "",
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", type=Path, help="folder with mha_self/ and sdpa/")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--kill-after", type=int, default=500)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results/<cpu kind>)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundles = (
            {n: args.bundles / n for n in MODELS} if args.bundles else export_bundles(Path(tmp))
        )
        cases = make_cases(bundles)
        runs = [run_plain(bundles, cases, n, args) for n in (1, 2)]
        kill = run_kill(bundles, cases, args)
    report = {
        "argv": sys.argv[1:] if argv is None else argv,
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "ray": metadata.version("ray"),
            "onnxruntime": metadata.version("onnxruntime"),
        },
        "shapes": POINTS,
        "runs": runs,
        "kill": kill,
    }
    args.out = args.out or results_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "serve_load.md").write_text(markdown(report))
    print(f"wrote {args.out / 'serve_load.json'} and serve_load.md")
    bad = [r for r in [*runs, kill] if any(k.startswith(("wrong", "error")) for k in r["outcomes"])]
    plain_errors = [r for r in runs if r["outcomes"] != {"ok": r["requests"]}]
    return 1 if bad or plain_errors else 0


if __name__ == "__main__":
    sys.exit(main())
