"""Hugging Face models at benchmark size: torch eager, attnx's bundle, Optimum and transformers'
own exporter, on the same inputs, in one process, with the same threads.

    python benchmarks/hf_bench.py                      # bert, gpt2, llama; batch {1, 8} x
                                                       # seq {128, 512, 2048} within positions
    python benchmarks/hf_bench.py --families llama --seq 128,512 --batch 1
    python benchmarks/hf_bench.py --optimum-venv DIR   # the venv Optimum runs in (made if absent)
    python benchmarks/hf_bench.py --check JSON         # shares and paired checks of a recorded run

Each family is a random-weight model built from a config (4 layers, d 512, 8 heads; Llama with
4 kv heads), saved with save_pretrained. The columns, all timed here with onnxruntime under the
attnx Runner's session options (runtime/_session.py) and torch.set_num_threads to match:

- eager: the transformers model itself (sdpa attention, use_cache=False);
- attnx best / base: `attnx export FOLDER` (export/_hf.py), the fastest variant that passed the
  bundle's parity (int8 excluded: lossy) and the base graph;
- optimum, optimum O2: `optimum-cli export onnx --model FOLDER --task T` (and `--optimize O2`),
  run in its own virtual environment because optimum-onnx needs transformers < 4.58; it is a
  peer measured here, never a dependency of attnx;
- transformers: transformers 5.24's experimental `OnnxExporter` with `ort_fusions="cpu"`.

Inputs are attnx's for these models: ids in the vocabulary, padding masks with right- and
left-padded rows (batch 1: no padding). Each point runs in rounds (--rounds, see
timed_rounds): in each, every graph is timed right after a block of eager calls, and the
graphs take turns going first. A cell is the median over rounds of the graph's block medians,
its ratio the median over rounds of graph / the eager block just before it.
Every graph's output is compared with eager's on the positions a model defines (left-padded
causal rows left out); the max abs error is in the JSON. Writes hf_bench.json, hf_bench.md and
hf_bench.png under benchmarks/results/<cpu kind>/.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from bench import attention_flops, gemm_gflops, limit_address_space, median_ms  # noqa: E402
from machine import cpu_kind, results_dir  # noqa: E402

from export._capture import _dynamic_shapes  # noqa: E402
from export._hf import capture_pretrained  # noqa: E402
from export._hf_tasks import spec_from_folder  # noqa: E402
from export._pipeline import run_pipeline  # noqa: E402
from export._variants import CPU, LOSSY  # noqa: E402
from runtime._cpu import cpu_features  # noqa: E402
from runtime._session import new_session, session_options  # noqa: E402

TARGET_RATIO = 0.8
VOCAB = 8192
# optimum-onnx 0.1.0 needs transformers < 4.58; accelerate lets it share GPT-2's tied weights.
OPTIMUM_PINS = ["optimum-onnx[onnxruntime]==0.1.0", "transformers<4.58", "onnx", "accelerate"]
# onnxruntime op types whose kernel time kernel_shares counts as GEMM or as attention.
GEMM_OPS = {"MatMul", "Gemm", "FusedMatMul"}
ATTENTION_KERNELS = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
COLUMNS = ("attnx best", "attnx base", "optimum", "optimum O2", "transformers")
PEERS = ("optimum", "optimum O2", "transformers")


def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        intermediate_size=2048,
        max_position_embeddings=512,
    )
    return transformers.BertModel(config), "feature-extraction"


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=512,
        n_layer=4,
        n_head=8,
        n_positions=1024,
        bos_token_id=0,
        eos_token_id=1,
    )
    return transformers.GPT2LMHeadModel(config), "text-generation"


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1408,
        max_position_embeddings=2048,
    )
    return transformers.LlamaForCausalLM(config), "text-generation"


FAMILIES = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}


# --- the graphs --------------------------------------------------------------------------------


def save_family(family: str, work: Path) -> tuple[Path, str]:
    torch.manual_seed(0)
    model, task = FAMILIES[family]()
    folder = work / "models" / family
    model.eval().save_pretrained(folder)
    return folder, task


def attnx_graphs(folder: Path, task: str, work: Path):
    """(spec, {name: ModelProto} of the CPU variants that passed, export seconds)."""
    spec = spec_from_folder(folder, task)
    grid = [dict(spec.example), {"batch": 1, "seq": 1}, {"batch": 3, "seq": 37}]
    start = time.perf_counter()
    result = run_pipeline(spec, out=work / "attnx", grid=grid)
    seconds = time.perf_counter() - start
    graphs = {n: b.model for n, b in result.variants.items() if CPU in b.providers}
    return spec, graphs, seconds, dict(result.status.dropped)


def transformers_graph(spec, opset: int = 18) -> onnx.ModelProto:
    """transformers' exporter with its own onnxruntime CPU fusions, on the spec's dims."""
    return capture_pretrained(spec, opset, None, _dynamic_shapes(spec), ort_fusions="cpu")


def optimum_venv(path: Path) -> Path:
    """The Optimum environment's python; made (torch's CPU build first) when absent."""
    python = path / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run([*pip, *OPTIMUM_PINS, f"onnxruntime=={ort.__version__}"], check=True)
    return python


def optimum_graphs(python: Path, folder: Path, task: str, work: Path) -> dict[str, Path]:
    """optimum-cli export onnx of the folder, plain and with --optimize O2."""
    cli = python.parent / "optimum-cli"
    made = {}
    for name, extra in (("optimum", []), ("optimum O2", ["--optimize", "O2"])):
        out = work / name.replace(" ", "_") / folder.name
        shutil.rmtree(out, ignore_errors=True)
        cmd = [str(cli), "export", "onnx", "--model", str(folder), "--task", task, *extra, str(out)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"  {name}: export failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        made[name] = out / "model.onnx"
    return made


# --- timing ------------------------------------------------------------------------------------


def make_session(model, threads: int, options=None):
    """A CPU session under the Runner's session options, of a ModelProto or an .onnx path."""
    options = options or session_options(ROOT, threads=threads)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return new_session(data, options, [CPU])


def graph_feed(session, feed: dict) -> dict[str, np.ndarray]:
    """The inputs this graph takes, from the point's feed; position_ids (which Optimum's decoder
    graphs take) count every position, as transformers' forward does without them, so every
    graph computes the function eager does; token_type_ids are zeros where the feed has none."""
    mask = feed["attention_mask"].numpy()
    extra = {
        "position_ids": np.broadcast_to(np.arange(mask.shape[1]), mask.shape),
        "token_type_ids": np.zeros_like(mask),
    }
    out = {}
    for value in session.get_inputs():
        source = feed[value.name].numpy() if value.name in feed else extra[value.name]
        out[value.name] = source.astype(np.int64)
    return out


def model_flops(spec, feed) -> int:
    """FLOPs of one eager forward: FlopCounterMode for the matmuls, plus attention counted by
    bench.attention_flops (FlopCounterMode sees no CPU SDPA kernel): about half the scores
    under a causal mask, none of a padded key's."""
    from torch.utils.flop_counter import FlopCounterMode

    sdpa = torch.nn.functional.scaled_dot_product_attention
    extra = [0.0]

    def counted(q, k, v, *args, **kwargs):
        extra[0] += attention_flops(q, k, *args, **kwargs)
        return sdpa(q, k, v, *args, **kwargs)

    counter = FlopCounterMode(display=False)
    torch.nn.functional.scaled_dot_product_attention = counted
    try:
        with counter, torch.no_grad():
            spec.module(**feed)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return int(counter.get_total_flops() + extra[0])


def max_abs(got: np.ndarray, want: np.ndarray, undefined) -> float:
    keep = ~np.broadcast_to(undefined, want.shape) if undefined is not None else slice(None)
    return float(np.abs(got.astype(np.float64) - want)[keep].max())


def bench_point(spec, point, models, args) -> dict:
    """Eager and every graph at one point, in rounds (see timed_rounds). One session is alive
    at a time, so each arena holds one peak; a graph that fails here (out of memory under the
    address-space cap) is noted."""
    torch.set_num_threads(args.threads)
    feed = spec.make_inputs(point)
    model = spec.module.model
    output = spec.output_names[0]

    def eager():
        with torch.no_grad():
            return model(**feed, use_cache=False, return_dict=True)[output]

    want = eager().numpy()
    undefined = spec.undefined(feed, {output: want}).get(output) if spec.undefined else None
    row = {"point": point, "ms": {}, "pair_ratio": {}, "max_abs": {}, "failed": {}}
    row["gflop"] = model_flops(spec, feed) / 1e9

    def graph_call(name):
        session = make_session(models[name], args.threads)
        inputs = graph_feed(session, feed)
        first = session.get_outputs()[0].name
        if name not in row["max_abs"]:
            got = session.run([first], inputs)[0]
            row["max_abs"][name] = max_abs(got, want, undefined)
        return functools.partial(session.run, [first], inputs)

    pairs = timed_rounds(eager, graph_call, list(models), args.rounds, args.budget, row["failed"])
    eager_samples = []
    for name, rounds in pairs.items():
        eager_samples += [e for e, _ in rounds]
        row["ms"][name] = statistics.median(g for _, g in rounds)
        row["pair_ratio"][name] = statistics.median(g / e for e, g in rounds)
    row["eager_ms"] = statistics.median(eager_samples)
    return row


def timed_rounds(eager, graph_call, names, rounds: int, budget_s: float, failed: dict) -> dict:
    """{graph: [(eager ms, graph ms) per round]}. In each round every graph is timed right after
    its own block of eager calls (paired_ms), and the order of the graphs turns by one from
    round to round, so a drift in the machine's speed falls on every graph alike and graphs
    can be compared by their own medians. graph_call(name) makes the graph's session and
    returns its call; the session goes before the next graph's is made."""
    pairs = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name in failed:
                continue
            try:
                eager_ms, graph_ms = paired_ms(eager, graph_call(name), budget_s / rounds)
            except (MemoryError, ort.capi.onnxruntime_pybind11_state.Fail) as err:
                failed[name] = str(err).splitlines()[0][:200]
                pairs.pop(name, None)
                continue
            pairs[name].append((eager_ms, graph_ms))
    return pairs


def paired_ms(eager, graph, budget_s: float) -> tuple[float, float]:
    """(eager ms, graph ms): a block of eager calls, then a block of graph calls, each a median
    after a warm-up call (bench.median_ms), half the budget each. Blocks, not alternate calls:
    torch's and onnxruntime's thread pools each spin a while after a call, so alternating
    calls would time each side against the other's spinning threads. A call longer than the
    block's budget is timed once after its warm-up: the rounds give its median."""
    return (
        median_ms(eager, budget_s / 2, long_reps=1),
        median_ms(graph, budget_s / 2, long_reps=1),
    )


def kernel_shares(model, feed: dict, threads: int) -> dict[str, float]:
    """Shares of one call's kernel time (onnxruntime's profiler, after a warm-up call) in GEMMs
    (MatMul, Gemm, FusedMatMul), in attention kernels, and in everything else."""
    options = session_options(ROOT, threads=threads)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="attnx-hf-profile-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = make_session(model, threads, options)
        inputs = graph_feed(session, feed)
        session.run(None, inputs)
        session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    return shares_of_last_run(events)


def shares_of_last_run(events: list[dict]) -> dict[str, float]:
    """{gemm, attention, other}: shares of the kernel time of the last model_run in a profile."""
    runs = [e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    start = max(runs, default=0)
    totals = dict.fromkeys(("gemm", "attention", "other"), 0.0)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if event["ts"] < start:
            continue
        op = event["args"]["op_name"]
        kind = "gemm" if op in GEMM_OPS else "attention" if op in ATTENTION_KERNELS else "other"
        totals[kind] += event["dur"]
    whole = sum(totals.values()) or 1.0
    return {kind: value / whole for kind, value in totals.items()}


def exact_variants(row: dict) -> list[str]:
    """The attnx variants timed at this point that keep float32 parity (int8 is lossy)."""
    return [n for n in row["ms"] if n.startswith("attnx:") and n[6:] not in LOSSY]


def summarize(row: dict, attnx_variants: list[str], gemm: float) -> dict:
    if not attnx_variants:
        row.update(attnx_best_variant="none", columns={}, ratios={}, meets_target=False)
        row.update(best_gflops=0.0, best_pct_gemm=0.0)
        return row
    ratio = row["pair_ratio"]
    # The fastest by its own median: the rounds spread every graph over the point's time.
    best = min(attnx_variants, key=lambda n: row["ms"][n])
    row["attnx_best_variant"] = best
    row["best_gflops"] = row["gflop"] / (row["ms"][best] / 1e3)
    row["best_pct_gemm"] = 100 * row["best_gflops"] / gemm
    keys = {"attnx best": best, "attnx base": "attnx:base", **{p: p for p in PEERS}}
    keys = {col: key for col, key in keys.items() if key in ratio}
    row["columns"] = {col: row["ms"][key] for col, key in keys.items()}
    # Each ratio is taken against the eager calls paired with that graph's own calls.
    row["ratios"] = {col: ratio[key] for col, key in keys.items()}
    # Graphs against each other by their own times (the same inputs, one after the other);
    # against eager by the paired ratio.
    peers = [row["columns"][p] for p in PEERS if p in row["columns"]]
    row["meets_target"] = row["ratios"]["attnx best"] <= TARGET_RATIO and all(
        row["columns"]["attnx best"] <= p for p in peers
    )
    return row


def family_graphs(family: str, work: Path, python: Path | None):
    """(spec, task, {column key: graph}, export seconds, dropped variants) of one family."""
    folder, task = save_family(family, work)
    print(f"[{family}] exporting with attnx", flush=True)
    spec, graphs, export_s, dropped = attnx_graphs(folder, task, work)
    models = {f"attnx:{n}": g for n, g in graphs.items()}
    print(f"[{family}] exporting with transformers' exporter", flush=True)
    models["transformers"] = transformers_graph(spec)
    if python is not None:
        print(f"[{family}] exporting with optimum", flush=True)
        models.update(optimum_graphs(python, folder, task, work))
    return spec, task, models, export_s, dropped


def bench_family(family: str, args, work: Path, python: Path | None, gemm: float) -> list[dict]:
    spec, task, models, export_s, dropped = family_graphs(family, work, python)
    limit = spec.dims["seq"][1]
    rows = []
    for batch in args.batch:
        for seq in [s for s in args.seq if s <= limit]:
            point = {"batch": batch, "seq": seq}
            row = bench_point(spec, point, models, args)
            row = summarize(row, exact_variants(row), gemm) | {"family": family, "task": task}
            row["export_s"], row["dropped"] = round(export_s, 1), dropped
            check_best(row, spec, models, args)
            print(f"  {line(row)}", flush=True)
            rows.append(row)
    return rows


def check_best(row: dict, spec, models: dict, args) -> None:
    """The best graph's kernel-time shares, and a paired check against every peer whose median
    came out faster: calls alternated one by one (paired_check)."""
    best = row["attnx_best_variant"]
    if best == "none":
        return
    feed = spec.make_inputs(row["point"])
    if row.get("best_shares_variant") != best:
        row["best_shares"] = kernel_shares(models[best], feed, args.threads)
        row["best_shares_variant"] = best
    mine = row["columns"]["attnx best"]
    faster = [p for p in PEERS if row["columns"].get(p, float("inf")) < mine]
    if not faster:
        return
    try:
        row["peer_check"] = paired_check(feed, models, best, faster, args)
    except (MemoryError, ort.capi.onnxruntime_pybind11_state.Fail) as err:
        row["failed"]["peer check"] = str(err).splitlines()[0][:200]  # sessions alive at once


def paired_check(feed: dict, models: dict, best: str, peers: list[str], args) -> dict:
    """{peer: [q1, median, q3] of best's time / the peer's over rounds of one call each}. All the
    sessions are alive and called one after another, the order turned each round, so both
    sides of a ratio ran within a second of each other."""
    calls = {}
    for name in (best, *peers):
        session = make_session(models[name], args.threads)
        inputs = graph_feed(session, feed)
        calls[name] = functools.partial(session.run, [session.get_outputs()[0].name], inputs)
        calls[name]()  # warm-up: the arena's first allocation
    times = alternated(calls, args.check_rounds)
    return {
        peer: statistics.quantiles(
            [b / p for b, p in zip(times[best], times[peer], strict=True)], n=4
        )
        for peer in peers
    }


def alternated(calls: dict, rounds: int) -> dict[str, list[float]]:
    """{name: seconds of each round's call}, every call once a round, the order turned by one."""
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def check_recorded(path: Path, args, python: Path | None) -> None:
    """check_best on every row of a recorded run, the graphs made again as the run made them
    (the same seeded models and exporters), then the report written anew."""
    record = json.loads(path.read_text())
    families = dict.fromkeys(r["family"] for r in record["rows"])
    with tempfile.TemporaryDirectory(prefix="attnx-hf-check-") as tmp:
        for family in families:
            spec, _, models, _, _ = family_graphs(family, Path(tmp), python)
            for row in (r for r in record["rows"] if r["family"] == family):
                summarize(row, exact_variants(row), record["meta"]["gemm_gflops"])
                check_best(row, spec, models, args)
                print(f"  {line(row)}", flush=True)
    record["meta"]["check_command"] = "python benchmarks/hf_bench.py " + " ".join(sys.argv[1:])
    path.write_text(json.dumps(record, indent=1))
    render(path)


# --- reports -----------------------------------------------------------------------------------


def line(row: dict) -> str:
    ratios = row["ratios"]
    cells = ", ".join(f"{k} {v:.1f} ms ({ratios[k]:.2f}x)" for k, v in row["columns"].items())
    p = row["point"]
    return (
        f"{row['family']} b{p['batch']} s{p['seq']}: eager {row['eager_ms']:.1f} ms; {cells}; "
        f"best={row['attnx_best_variant']} {'meets' if row['meets_target'] else 'MISSES'}"
    )


def report_header(title: str, meta: dict) -> list[str]:
    """A report's title, command and machine lines (CPU kind and kernel features), then a blank."""
    return [
        f"# {title}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']} ({meta['cpu_kind']}; features {meta['features']}); "
        f"{meta['threads']} threads on every side; torch {meta['torch']}, transformers "
        f"{meta['transformers']}, onnxruntime {meta['onnxruntime']}; Optimum: {meta['optimum']}.",
        "",
    ]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        *report_header(
            "Hugging Face models: torch eager, attnx, Optimum, transformers' exporter", meta
        ),
        "Models: random weights, 4 layers, d 512, 8 heads (Llama: 4 kv heads), vocab 8192; "
        "inputs with right- and left-padded rows at batch 8. Every onnxruntime session, the "
        "peers' too, runs on the Runner's session options (denormals flushed to zero; "
        "runtime/_denormals.py); torch eager on torch's defaults. Cells: median ms over "
        f"{meta.get('rounds', 1)} rounds (ratio to the eager block timed just before each, "
        "median over rounds; below 1.00 is faster); *eager ms* is the median over those "
        "blocks. *best*: attnx's fastest variant that passed its parity "
        f"(int8 excluded). Target: best <= {TARGET_RATIO}x eager and <= every peer column.",
        "",
        f"GEMM ceiling (4096^3 fp32 matmul, same run): {meta['gemm_gflops']:.0f} GFLOP/s; "
        "*GFLOP/s* is attnx best's rate on the FLOPs the model must do (causal attention: "
        "half the scores). *GEMM / attention / other*: shares of attnx best's kernel time in "
        "onnxruntime's profiler (MatMul, Gemm, FusedMatMul / attention kernels / the rest); "
        "*GEMM alone*: the ratio to eager its GEMMs alone take, which no change outside "
        "the GEMMs can go below. *paired check*: where a peer's median came out below attnx "
        "best's, attnx best's time over the peer's with the two sessions called one after "
        "the other, round after round: the median and quartiles of that ratio (above 1.00: "
        "the peer is faster)."
        + (
            f" Shares and paired checks: `{meta['check_command']}`."
            if "check_command" in meta
            else ""
        )
        + "".join(f" Points measured again and replaced: `{c}`." for c in meta.get("reruns", [])),
        "",
        "| family | batch | seq | eager ms | "
        + " | ".join(COLUMNS)
        + " | best | GFLOP/s (% GEMM) | GEMM / attention / other | GEMM alone | target "
        "| paired check |",
        "|---|---|---|---|" + "---|" * len(COLUMNS) + "---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{r['columns'][c]:.1f} ({r['ratios'][c]:.2f}x)"
            if c in r["columns"]
            else _missing(r, c)
            for c in COLUMNS
        ]
        p = r["point"]
        lines.append(
            f"| {r['family']} | {p['batch']} | {p['seq']} | {r['eager_ms']:.1f} | "
            + " | ".join(cells)
            + f" | {r['attnx_best_variant'].removeprefix('attnx:')} | "
            + f"{r['best_gflops']:.0f} ({r['best_pct_gemm']:.0f}%) | "
            + _bound(r)
            + ("yes" if r["meets_target"] else "**MISS**")
            + f" | {_paired(r)} |"
        )
    met = sum(r["meets_target"] for r in rows)
    lines += ["", f"{met} of {len(rows)} points meet the target.", ""]
    worst = {c: max(r["max_abs"].get(k, 0.0) for r in rows) for c, k in _error_keys(rows)}
    lines.append(
        "Largest max abs error against eager over all points: "
        + ", ".join(f"{c} {v:.2g}" for c, v in worst.items())
        + "."
    )
    return "\n".join(lines) + "\n"


def _bound(row: dict) -> str:
    """The best graph's kernel time by kind, and the ratio to eager its GEMMs alone take."""
    shares = row.get("best_shares")
    if not shares:
        return "- | - | "
    kinds = " / ".join(f"{100 * shares[k]:.0f}%" for k in ("gemm", "attention", "other"))
    return f"{kinds} | {shares['gemm'] * row['ratios']['attnx best']:.2f}x | "


def _paired(row: dict) -> str:
    """best / peer over alternated calls, median (quartiles), for each peer that came out faster."""
    checks = row.get("peer_check", {})
    return (
        "; ".join(f"{p}: {m:.2f} ({lo:.2f}-{hi:.2f})" for p, (lo, m, hi) in checks.items()) or "-"
    )


def _cell(row: dict, column: str) -> str:
    return f"{row['columns'][column]:.1f} ({row['ratios'][column]:.2f}x)"


def _missing(row: dict, column: str) -> str:
    """A cell without a time: "failed" (out of memory under the cap; reason in the JSON)."""
    keys = {"attnx best": "attnx:", "attnx base": "attnx:base"}
    key = keys.get(column, column)
    return "failed" if any(k.startswith(key) for k in row.get("failed", {})) else "-"


def _error_keys(rows):
    names = dict.fromkeys(k for r in rows for k in r["max_abs"])
    return [(n.removeprefix("attnx:"), n) for n in names]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        mine = [r for r in rows if r["family"] == family]
        labels = [f"b{r['point']['batch']} s{r['point']['seq']}" for r in mine]
        x = np.arange(len(mine))
        width = 0.8 / len(COLUMNS)
        for i, col in enumerate(COLUMNS):
            values = [r["ratios"].get(col, np.nan) for r in mine]
            ax.bar(x + (i - len(COLUMNS) / 2) * width, values, width, label=col)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(TARGET_RATIO, color="k", lw=0.8, ls="--")
        ax.set_xticks(x, labels, rotation=30)
        ax.set_title(family)
        ax.set_ylabel("time / torch eager")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def optimum_versions(python: Path | None) -> str:
    if python is None:
        return "not run"
    code = (
        "import importlib.metadata as m; print(', '.join(f'{d} {m.version(d)}' for d in "
        "('optimum-onnx', 'optimum', 'transformers', 'torch', 'onnxruntime')))"
    )
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


def render(path: Path) -> None:
    """The report of a recorded run, summarized again (the measurements are not touched)."""
    record = json.loads(path.read_text())
    meta, rows = record["meta"], record["rows"]
    for row in rows:
        summarize(row, exact_variants(row), meta["gemm_gflops"])
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    path.with_suffix(".md").write_text(markdown(rows, meta))
    plot(rows, path.with_suffix(".png"))


def peer_args(parser, *, name: str, budget: float) -> None:
    """The options both Hugging Face benchmarks take: threads, timing budget, Optimum's venv,
    where the results go."""
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--budget", type=float, default=budget, help="seconds of timing per cell")
    parser.add_argument("--optimum-venv", default=str(ROOT.parent / "optimum-venv"))
    parser.add_argument("--no-optimum", action="store_true", help="leave the Optimum columns out")
    parser.add_argument("--out", default=None, help="results folder (default: per CPU kind)")
    parser.add_argument("--name", default=name)


def peer_setup(args, script: str) -> tuple[Path, Path | None, dict]:
    """(results folder, Optimum's python or None, the run's facts) for either benchmark; caps
    the address space."""
    out = Path(args.out) if args.out else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    python = None if args.no_optimum else optimum_venv(Path(args.optimum_venv))
    limit_address_space()
    meta = {
        "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "cpu_kind": cpu_kind(),
        "features": " ".join(cpu_features()),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": ort.__version__,
        "optimum": optimum_versions(python),
    }
    return out, python, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--seq", default="128,512,2048")
    peer_args(parser, name="hf_bench", budget=4.0)
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds over the graphs at each point (timed_rounds)"
    )
    parser.add_argument(
        "--check-rounds", type=int, default=15, help="rounds of the paired check (paired_check)"
    )
    parser.add_argument(
        "--render", metavar="JSON", help="only rewrite the .md and .png of a recorded JSON"
    )
    parser.add_argument(
        "--check", metavar="JSON", help="run check_best on a recorded run's rows, then render it"
    )
    parser.add_argument(
        "--into",
        metavar="JSON",
        help="replace these points' rows of a recorded run, then render it",
    )
    args = parser.parse_args()
    if args.render:
        render(Path(args.render))
        return
    if args.check:
        _, python, _ = peer_setup(args, "hf_bench.py")
        check_recorded(Path(args.check), args, python)
        return
    args.batch = [int(b) for b in args.batch.split(",")]
    args.seq = [int(s) for s in args.seq.split(",")]
    out, python, meta = peer_setup(args, "hf_bench.py")
    rows = []
    gemm = gemm_gflops(args.threads)
    meta["gemm_gflops"], meta["rounds"] = gemm, args.rounds
    with tempfile.TemporaryDirectory(prefix="attnx-hf-bench-") as tmp:
        # With --into the run's own files stay in the temporary folder: the recorded run may
        # be the very file this run would write.
        own = Path(tmp) if args.into else out
        for family in args.families.split(","):
            rows += bench_family(family, args, Path(tmp), python, gemm)
            # Written after each family: a long run that stops keeps what it measured.
            (own / f"{args.name}.json").write_text(
                json.dumps({"meta": meta, "rows": rows}, indent=1)
            )
            (own / f"{args.name}.md").write_text(markdown(rows, meta))
        print(markdown(rows, meta))
        if args.into:
            merge_into(Path(args.into), rows, meta["command"])
        else:
            plot(rows, out / f"{args.name}.png")


def merge_into(path: Path, rows: list[dict], command: str) -> None:
    """The recorded run at path with the rows of the same family and point replaced by rows,
    the command that measured them kept in its meta, and its report written anew."""
    record = json.loads(path.read_text())
    fresh = {(r["family"], json.dumps(r["point"], sort_keys=True)): r for r in rows}
    record["rows"] = [
        fresh.pop((r["family"], json.dumps(r["point"], sort_keys=True)), r) for r in record["rows"]
    ]
    record["rows"] += list(fresh.values())
    record["meta"].setdefault("reruns", []).append(command)
    path.write_text(json.dumps(record, indent=1))
    render(path)


if __name__ == "__main__":
    main()
