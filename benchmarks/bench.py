"""Benchmark every zoo entry at benchmark scale: torch eager against each ONNX variant.

    python benchmarks/bench.py                         # all entries, batch {1, 8} x seq
                                                       # {128, 512, 2048, 4096}
    python benchmarks/bench.py --entries causal_self,mha_self --seq 128,512
    python benchmarks/bench.py --memory                # peak memory, causal self-attention

Everything is measured in one process with the same inputs and the same thread count: torch
eager (torch.set_num_threads) and every CPU variant (onnxruntime intra-op threads). Each timing
is a median; ratios are variant / eager (below 1 is faster). FLOPs come from torch's
FlopCounterMode on the eager forward; the GEMM ceiling is a 4096^3 matmul measured in the same
run. Writes bench.json, bench.md and bench_latency_vs_seq.png under
benchmarks/results/<cpu kind>/ (bench.cpu_kind: family and kernel ISA, e.g. epyc-avx512-vnni).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from machine import cpu_kind, results_dir  # noqa: E402

from export import run_pipeline, spec_from_zoo  # noqa: E402
from export._variants import CPU, LOSSY  # noqa: E402
from models import zoo  # noqa: E402
from runtime._cpu import cpu_features  # noqa: E402
from runtime._parity import measure  # noqa: E402
from runtime._session import new_session, session_options  # noqa: E402

BENCH_SIZE = zoo.Size(d=512, heads=8, max_seq=8192, max_batch=8, vocab=4096, window=256)
TARGET_RATIO = 0.8  # the best passing variant at most 0.8x eager ...
TARGET_GEMM = 0.85  # ... or at 85% of the measured GEMM rate
GEMM_N = 4096
VARIANT_COLORS = {"base": "C0", "attention23": "C1", "fused": "C3", "tiled": "C4", "int8": "C2"}
SLOW_RATIO = 3.0  # a variant whose first call takes this many times eager's (and over the
# timing budget) is timed once: at batch 8, seq 4096 such calls take 10-20 s each


def median_ms(
    fn, budget_s: float, min_reps: int = 3, max_reps: int = 25, long_reps: int = 2
) -> float:
    """Median wall time of fn() after one warm-up call; reps fit in about budget_s, and a call
    longer than the whole budget gets long_reps more."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    reps = int(min(max_reps, max(min_reps, budget_s / max(first, 1e-6))))
    if first > budget_s:
        reps = long_reps  # seconds-long calls: a few timed calls after the warm-up
    times = [first]
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3  # the warm-up call is never counted


def gemm_gflops(threads: int) -> float:
    torch.set_num_threads(threads)
    a = torch.randn(GEMM_N, GEMM_N)
    b = torch.randn(GEMM_N, GEMM_N)
    ms = median_ms(lambda: a @ b, budget_s=3.0, min_reps=5)
    return 2 * GEMM_N**3 / (ms / 1e3) / 1e9


def attention_flops(q, k, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs) -> float:
    """FLOPs of one scaled_dot_product_attention call that the block must do: q k^T and p v (2
    matmuls, 2 FLOPs per multiply-add) over the query-key pairs its mask allows. A causal call
    allows about half of the s x s_kv square (row i sees min(i + 1, s_kv) keys, torch's
    top-left alignment); a boolean mask, or a float mask's -inf, rules out what it masks
    (a sliding window, key padding); a finite score bias (ALiBi, T5) rules out nothing."""
    s, s_kv = q.shape[-2], k.shape[-2]
    if is_causal:
        pairs = float(sum(min(i + 1, s_kv) for i in range(s)))
    elif attn_mask is not None:
        allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
        pairs = float(allowed.float().mean()) * s * s_kv  # a broadcast mask's mean is its own
    else:
        pairs = float(s * s_kv)
    return 4 * q.shape[:-2].numel() * pairs * q.shape[-1]


def eager_flops(module, feed, forward_kwargs) -> int:
    """FLOPs of one eager forward: FlopCounterMode for matmuls, plus scaled_dot_product_attention
    counted by attention_flops (FlopCounterMode counts no CPU SDPA kernel)."""
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
            module(**feed, **forward_kwargs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return int(counter.get_total_flops() + extra[0])


def session(model, threads: int):
    """A session configured as attnx's Runner configures its own (runtime/_session.py: the
    default arena, no memory patterns, all graph optimizations), so that the timings are what
    a user of the Runner gets. One session is alive at a time, so each arena holds one peak."""
    options = session_options(ROOT, threads=threads)
    start = time.perf_counter()
    sess = new_session(model.SerializeToString(), options, [CPU])
    return sess, (time.perf_counter() - start) * 1e3


def point_for(entry, batch: int, seq: int) -> dict[str, int]:
    point = {"batch": batch, "seq": seq, "kv_seq": seq, "past": 0}
    return {d: min(point[d], hi) for d, (lo, hi) in entry.dims.items() if d in point}


def bench_entry(entry, batches, seqs, threads: int, budget_s: float, gemm: float) -> list[dict]:
    spec = spec_from_zoo(entry)
    start = time.perf_counter()
    result = run_pipeline(spec, out=None, grid=small_grid(spec))  # parity at benchmark scale
    export_s = time.perf_counter() - start
    builds = {n: b for n, b in result.variants.items() if CPU in b.providers}
    session_ms = {name: session(b.model, threads)[1] for name, b in builds.items()}
    rows = []
    seen = set()
    for batch in batches:
        for seq in seqs:
            point = point_for(entry, batch, seq)
            key = tuple(sorted(point.items()))
            if key in seen:
                continue
            seen.add(key)
            rows.append(
                bench_point(entry, spec, point, builds, threads, budget_s, gemm)
                | {"export_s": round(export_s, 2), "session_ms": session_ms}
            )
            print(_line(rows[-1]), flush=True)
    return rows


def small_grid(spec) -> list[dict[str, int]]:
    """Parity at benchmark scale on the example and the smallest sizes: the full grid of a
    d_model 512 block up to seq 8192 would take longer than the benchmark."""
    return [dict(spec.example), {d: max(lo, 1) for d, (lo, hi) in spec.dims.items()}]


def row_parity(out, reference, tol) -> tuple[float, bool]:
    """(max abs error, passed) of out against reference, one batch row at a time: measure()
    compares in float64, and decoder_lm's [8, 4096, 4096] logits would need 1 GiB at once."""
    pairs = zip(out, reference, strict=True)
    rows = [measure("y", o, r, atol=tol.atol, rtol=tol.rtol) for o, r in pairs]
    return max(p.max_abs for p in rows), all(p.passed for p in rows)


def write_bundles(entries, folder: Path) -> int:
    for entry in entries:
        spec = spec_from_zoo(entry)
        result = run_pipeline(spec, out=folder, grid=small_grid(spec))
        print(f"{entry.name}: {', '.join(result.variants)} -> {folder / entry.name}")
    return 0


def bench_point(entry, spec, point, builds, threads, budget_s, gemm) -> dict:
    torch.set_num_threads(threads)
    feed = spec.make_inputs(point)
    arrays = {k: v.numpy() for k, v in feed.items()}
    try:
        with torch.no_grad():
            reference = spec.module(**feed, **spec.forward_kwargs)
            reference = reference[0] if isinstance(reference, tuple) else reference
            eager = median_ms(lambda: spec.module(**feed, **spec.forward_kwargs), budget_s)
    except (RuntimeError, MemoryError) as err:  # past the address-space cap: out of memory
        return {
            "entry": entry.name,
            "point": point,
            "eager_ms": None,
            "skipped": f"torch eager: {_first_line(err)}",
            "meets_target": False,
        }
    flops = eager_flops(spec.module, feed, spec.forward_kwargs)
    variants, errors, passed, once, failed = {}, {}, {}, [], {}
    for name, build in builds.items():
        try:
            sess = session(build.model, threads)[0]  # one session alive at a time: memory
            start = time.perf_counter()
            out = sess.run(None, arrays)[0]
        except Exception as err:  # noqa: BLE001 (onnxruntime raises its own types)
            failed[name] = _first_line(err)
            continue
        first_ms = (time.perf_counter() - start) * 1e3
        if first_ms > max(SLOW_RATIO * eager, 1e3 * budget_s):
            variants[name] = first_ms  # far off the pace: one call says enough
            once.append(name)
        else:
            try:
                variants[name] = median_ms(lambda s=sess: s.run(None, arrays), budget_s)
            except Exception as err:  # noqa: BLE001 (a later call can still run out of memory)
                failed[name] = _first_line(err)
        del sess  # its arena goes before the parity copies, and before the next session
        try:
            errors[name], passed[name] = row_parity(
                out, reference.numpy(), build.tolerance["float32"]
            )
        except MemoryError as err:  # the float64 copies, near the address-space cap
            variants.pop(name, None)
            failed[name] = f"parity check: {_first_line(err)}"
        del out
    # The best is the fastest variant that is exact to the block's own tolerance here too.
    strict = {n: ms for n, ms in variants.items() if n not in LOSSY and passed[n]}
    best = min(strict, key=strict.get) if strict else None
    best_ms = strict[best] if best else float("inf")  # nothing ran exactly: a miss
    best_gflops = flops / (best_ms / 1e3) / 1e9
    ratio = best_ms / eager
    return {
        "entry": entry.name,
        "point": point,
        "eager_ms": round(eager, 3),
        "variants_ms": {n: round(ms, 3) for n, ms in variants.items()},
        "ratios": {n: round(ms / eager, 3) for n, ms in variants.items()},
        "timed_once": once,
        "failed": failed,
        "max_abs_error": errors,
        "parity_passed": passed,
        "best": best,
        "best_ratio": round(ratio, 3) if best else None,
        "gflop": round(flops / 1e9, 3),
        "eager_gflops": round(flops / (eager / 1e3) / 1e9, 1),
        "best_gflops": round(best_gflops, 1),
        "best_pct_gemm": round(100 * best_gflops / gemm, 1),
        "meets_target": bool(ratio <= TARGET_RATIO or best_gflops >= TARGET_GEMM * gemm),
    }


def _best_text(row: dict) -> str:
    if row["best"] is None:
        return "no exact variant ran"
    return f"{row['best']} {row['best_ratio']:.2f}x"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def limit_address_space(fraction: float = 0.8) -> int:
    """Cap this process's address space at a fraction of RAM, so a grid point too big for the
    machine fails its allocation (and is reported) instead of waking the OOM killer."""
    import resource

    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    cap = int(total * fraction)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return cap


def _line(row: dict) -> str:
    if row.get("eager_ms") is None:
        return f"{row['entry']:<20} {row['point']}  skipped: {row['skipped']}"
    point = ",".join(f"{k}={v}" for k, v in row["point"].items())
    ratios = " ".join(f"{n}={r:.2f}" for n, r in row["ratios"].items())
    mark = "ok" if row["meets_target"] else "MISS"
    return (
        f"{row['entry']:<20} {point:<30} eager {row['eager_ms']:9.2f} ms  {ratios}  "
        f"best {_best_text(row)} {row['best_pct_gemm']:.0f}%GEMM {mark}"
    )


# --- peak memory, each measurement in a fresh process ------------------------------------------


def memory_child(entry_name: str, variant: str, batch: int, seq: int, threads: int) -> None:
    entry = zoo.scaled(BENCH_SIZE)[entry_name]
    spec = spec_from_zoo(entry)
    feed = spec.make_inputs(point_for(entry, batch, seq))
    torch.set_num_threads(threads)
    if variant == "eager":
        run = lambda: spec.module(**feed, **spec.forward_kwargs)  # noqa: E731
    else:
        result = run_pipeline(spec, out=None, grid=[dict(spec.example)], variants=(variant,))
        if variant not in result.variants:
            print(json.dumps({"error": f"variant {variant} not built"}))
            return
        sess, _ = session(result.variants[variant].model, threads)
        arrays = {k: v.numpy() for k, v in feed.items()}
        run = lambda: sess.run(None, arrays)  # noqa: E731
    with torch.no_grad():
        base, peak = rss_during(run)
    print(json.dumps({"peak_above_baseline_mib": round((peak - base) / 2**20, 1)}))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_during(run) -> tuple[int, int]:
    """(RSS just before, highest RSS sampled every 0.5 ms during) one call of run().

    The baseline is taken after inputs, weights and the session exist, so the difference is
    what one call adds. ru_maxrss cannot serve: its high-water mark may come from building the
    model or exporting it, before the call."""
    import ctypes
    import threading

    # Hand memory that earlier work freed back to the OS first: a call that reuses freed, still
    # resident heap pages would otherwise not show them (building and exporting the model in
    # the same process frees hundreds of MiB).
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return base, max(peak[0], _rss_bytes())


def memory_table(entry: str, seqs, threads: int) -> list[dict]:
    rows = []
    for seq in seqs:
        for variant in ("eager", "base", "attention23", "fused"):
            cmd = [
                sys.executable,
                __file__,
                "--memory-child",
                entry,
                variant,
                "1",
                str(seq),
                str(threads),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
            line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "{}"
            row = {"entry": entry, "seq": seq, "batch": 1, "variant": variant, **json.loads(line)}
            rows.append(row)
            print(row, flush=True)
    return rows


def bench_entry_alone(name: str, args, gemm: float) -> list[dict]:
    """bench_entry in a fresh process. In one long process, the heap and onnxruntime's arenas
    left by earlier entries crowd the address-space cap: decoder_lm at batch 8, seq 4096 could
    not load a session after 19 entries, though alone it runs every variant."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.json"
        cmd = [
            sys.executable,
            __file__,
            "--entry-child",
            name,
            str(path),
            str(gemm),
            "--batch",
            args.batch,
            "--seq",
            args.seq,
            "--threads",
            str(args.threads),
            "--budget-s",
            str(args.budget_s),
        ]
        code = subprocess.run(cmd).returncode
        if code != 0:
            raise SystemExit(f"bench.py: the process timing {name} exited with {code}")
        return json.loads(path.read_text())


def entry_child(args) -> None:
    name, path, gemm = args.entry_child
    limit_address_space()
    rows = bench_entry(
        zoo.scaled(BENCH_SIZE)[name],
        [int(b) for b in args.batch.split(",")],
        [int(s) for s in args.seq.split(",")],
        args.threads,
        args.budget_s,
        float(gemm),
    )
    Path(path).write_text(json.dumps(rows))


# --- reports -------------------------------------------------------------------------------------


def markdown(rows: list[dict], memory: list[dict], meta: dict) -> str:
    names = ["base", "attention23", "fused", "tiled", "int8"]
    lines = [
        "# attnx benchmark: torch eager vs ONNX Runtime variants",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']} ({meta.get('cpu_kind', 'cpu kind not recorded')}; features "
        f"{meta.get('features') or 'not recorded'}); torch {meta['torch']}, onnxruntime "
        f"{meta['onnxruntime']}, {meta['threads']} threads for both.  ",
        f"GEMM ceiling ({GEMM_N}^3 fp32 matmul, same run): {meta['gemm_gflops']:.0f} GFLOP/s.  ",
        f"Model size: d_model {BENCH_SIZE.d}, {BENCH_SIZE.heads} heads (mqa_alibi: "
        f"{BENCH_SIZE.heads * 3 // 2} heads, d {BENCH_SIZE.head_dim * (BENCH_SIZE.heads * 3 // 2)})"
        f", vocab {BENCH_SIZE.vocab}, window {BENCH_SIZE.window}; cached entries at past 0.",
        "",
        "Cells are median ms and the ratio to eager (below 1.00 is faster). *best* is the fastest "
        "variant at the block's own tolerance (int8 is shown but never counted as best). Target: "
        f"best <= {TARGET_RATIO}x eager, or >= {TARGET_GEMM:.0%} of the GEMM rate. "
        f"¹ first call over {SLOW_RATIO:g}x eager and over the timing budget: timed once, not a "
        "median. "
        "² output outside the block's tolerance at this point: never counted as best. "
        "³ onnxruntime failed at this point (the reason is in the JSON; out of memory under the "
        "benchmark's address-space cap of 80% of RAM).",
        "",
        "| entry | point | eager ms | "
        + " | ".join(names)
        + " | best | GFLOP/s (% GEMM) | target |",
        "|---|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for r in rows:
        point = ", ".join(f"{k}={v}" for k, v in r["point"].items() if k in ("batch", "seq"))
        if r.get("eager_ms") is None:
            lines.append(
                f"| {r['entry']} | {point} | - | "
                + " | ".join("-" for _ in names)
                + f" | not run: {r['skipped']} | - | **MISS** |"
            )
            continue
        cells = []
        for n in names:
            ms = r["variants_ms"].get(n)
            if n in r.get("failed", {}):
                cells.append("failed³")
                continue
            if ms is None:
                cells.append("-")
                continue
            mark = ("¹" if n in r.get("timed_once", ()) else "") + (
                "" if r.get("parity_passed", {}).get(n, True) else "²"
            )
            cells.append(f"{ms:.2f} ({r['ratios'][n]:.2f}x){mark}")
        mark = "yes" if r["meets_target"] else "**MISS**"
        lines.append(
            f"| {r['entry']} | {point} | {r['eager_ms']:.2f} | "
            + " | ".join(cells)
            + f" | {_best_text(r)} | {r['best_gflops']:.0f} "
            f"({r['best_pct_gemm']:.0f}%) | {mark} |"
        )
    if rows:
        met = sum(r["meets_target"] for r in rows)
        lines += ["", f"{met} of {len(rows)} points meet the target."]
        lines += ["", "Export time (s) and session creation (ms) per entry:", ""]
        lines += ["| entry | export s | session ms per variant |", "|---|---|---|"]
        for entry in dict.fromkeys(r["entry"] for r in rows):
            r = next(x for x in rows if x["entry"] == entry)
            sessions = ", ".join(f"{n} {ms:.0f}" for n, ms in r["session_ms"].items())
            lines.append(f"| {entry} | {r['export_s']:.1f} | {sessions} |")
    if memory:
        lines += ["", "## Peak memory above baseline (one call, fresh process each)", ""]
        lines += ["| entry | batch | seq | variant | MiB |", "|---|---|---|---|---|"]
        for m in memory:
            mib = m.get("peak_above_baseline_mib", m.get("error", "-"))
            lines.append(f"| {m['entry']} | {m['batch']} | {m['seq']} | {m['variant']} | {mib} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    order = {name: i for i, name in enumerate(zoo.names())}
    entries = sorted(dict.fromkeys(r["entry"] for r in rows), key=order.get)
    cols = 4
    nrows = (len(entries) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, entry in zip(axes.flat, entries, strict=False):
        sel = [r for r in rows if r["entry"] == entry and r["point"].get("batch") == 1]
        sel = [r for r in sel if r.get("eager_ms") is not None]
        if not sel:  # e.g. --batch 8 alone: the plot shows batch 1
            ax.axis("off")
            continue
        seqs = [r["point"]["seq"] for r in sel]
        ax.plot(seqs, [r["eager_ms"] for r in sel], "k-o", label="torch eager")
        for name, color in VARIANT_COLORS.items():
            ys = [r.get("variants_ms", {}).get(name) for r in sel]
            if any(y is not None for y in ys):
                ax.plot(seqs, ys, "-o", color=color, label=name, markersize=3)
        ax.set_title(f"{entry} (batch 1)", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length", fontsize=8)
        ax.set_ylabel("ms", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(entries) :]:
        ax.axis("off")
    # One legend for every panel: a variant keeps its colour wherever it appears.
    handles = [Line2D([], [], color="k", marker="o", label="torch eager")] + [
        Line2D([], [], color=c, marker="o", markersize=3, label=n)
        for n, c in VARIANT_COLORS.items()
    ]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default=",".join(zoo.names()))
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--seq", default="128,512,2048,4096")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--budget-s", type=float, default=1.0, help="timing budget per cell")
    parser.add_argument("--memory", action="store_true", help="peak memory of causal_self")
    parser.add_argument("--memory-seq", default="4096,8192")
    parser.add_argument("--out", default=None,
                        help="results folder (default: benchmarks/results/<cpu kind>)")
    parser.add_argument("--name", default="bench", help="result file stem")
    parser.add_argument(
        "--update",
        action="store_true",
        help="re-measure the named entries in an existing result file, keeping the others",
    )
    parser.add_argument(
        "--bundles",
        metavar="DIR",
        help="write the named entries at benchmark size as bundles to DIR (for `attnx bench "
        "--vs-torch` elsewhere, e.g. on CUDA) and time nothing",
    )
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--entry-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        entry, variant, batch, seq, threads = args.memory_child
        memory_child(entry, variant, int(batch), int(seq), int(threads))
        return 0
    if args.entry_child:
        entry_child(args)
        return 0
    registry = zoo.scaled(BENCH_SIZE)
    names = [n for n in args.entries.split(",") if n]
    unknown = [n for n in names if n not in registry]
    if unknown:
        parser.error(f"unknown entries {unknown}; known: {', '.join(registry)}")
    if args.bundles:
        return write_bundles([registry[n] for n in names], Path(args.bundles))
    out = Path(args.out) if args.out else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    limit_address_space()
    earlier = _earlier(out / f"{args.name}.json", names) if args.update else {}
    gemm_before = gemm_gflops(args.threads)
    memory = (
        memory_table("causal_self", [int(s) for s in args.memory_seq.split(",")], args.threads)
        if args.memory
        else earlier.get("memory", [])
    )
    rows = list(earlier.get("rows", []))
    args.earlier_meta = earlier.get("meta")
    for name in names:
        rows += bench_entry_alone(name, args, gemm_before)
        # Written after every entry, so a long run that is stopped keeps what it measured.
        write(out, args, argv, rows, memory, gemm_before, gemm_before)
    gemm_after = gemm_gflops(args.threads)
    write(out, args, argv, rows, memory, gemm_before, gemm_after)
    wrote = f"{out / args.name}.json, .md"
    if rows and importlib.util.find_spec("matplotlib") is None:
        print("no plot: matplotlib is not installed (pip install 'attnx[plot]')")
    elif rows:
        plot(rows, out / f"{args.name}_latency_vs_seq.png")
        wrote += ", _latency_vs_seq.png"
    print(f"wrote {wrote}")
    return 0


def _earlier(path: Path, names: list[str]) -> dict:
    """The result file's rows for entries other than names (which are measured again)."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    earlier["rows"] = [r for r in earlier["rows"] if r["entry"] not in names]
    return earlier


def write(out: Path, args, argv, rows, memory, gemm_before: float, gemm_after: float) -> None:
    order = {name: i for i, name in enumerate(zoo.names())}
    rows = sorted(rows, key=lambda r: order[r["entry"]])  # stable: grid order within an entry
    command = "python benchmarks/bench.py " + " ".join(argv or sys.argv[1:])
    earlier = getattr(args, "earlier_meta", None)
    if earlier:  # an --update run: the table holds rows of both runs, each against its GEMM
        command = f"{earlier['command']}; then {command}"
        gemm_before = max(gemm_before, earlier["gemm_gflops"])
    meta = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "cpu_kind": cpu_kind(),
        "features": " ".join(cpu_features()),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "gemm_gflops": max(gemm_before, gemm_after),
        "gemm_gflops_before_after": [round(gemm_before, 1), round(gemm_after, 1)],
    }
    (out / f"{args.name}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "memory": memory}, indent=1)
    )
    (out / f"{args.name}.md").write_text(markdown(rows, memory, meta))


if __name__ == "__main__":
    raise SystemExit(main())
