"""Decode-step latency and tokens/s: the exported LM bundle (ONNX Runtime) against torch eager
with its own KV cache, at past lengths {128, 512, 2048}, in one process, same threads.

    python benchmarks/decode_bench.py --threads 2

Model: DecoderLM with d 512, 8 heads, 2 kv heads, 4 layers, ffn 2048, vocab 32000 (43.6M
parameters), exported through the attnx pipeline with a past range of [0, 4096] (parity grid
and decode-loop parity included), then timed:

- step: one decode step (1 new token) at exactly past p, repeated from the same cache, median
  of --iters. ONNX through runtime.Generator (IO binding, presents kept in ORT memory) and
  through Runner.run (numpy in/out, validation each call); torch `model(ids, keys, values)`
  under inference_mode. ORT and torch iterations are interleaved so drift hits both alike.
- tokens/s: --new-tokens greedy tokens generated from a cache of p positions (argmax and
  cache feed-back included), median of --gen-runs.
- recompute: one forward pass over all p + 1 tokens without a cache (what decoding without a
  KV cache costs per token), median of --recompute-iters.

The decode step grows with p only through attention (the cache read, and the concat that
writes the present); the table shows its growth next to the recompute's.
Writes decode_bench.json and .md under benchmarks/results/<cpu kind>/ (figures, not
assertions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Both runtimes' worker threads busy-wait after each call by default. On a 2-core machine
# shared by torch, ONNX Runtime and other processes, that wait is timed as the other side's cost
# (measured: a torch decode step went from 8 ms to 130 ms under load, with ORT next to it). So
# neither side spins here: torch's OpenMP sleeps (OMP_WAIT_POLICY=PASSIVE, set before torch
# loads) and ORT's intra-op pool sleeps (session.intra_op.allow_spinning=0, added to the
# Runner's own session options below). Calls are then interleaved one by one, so load from
# other processes hits both alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from export import run_pipeline, spec_from_module  # noqa: E402
from models import DecoderLM  # noqa: E402
from models.zoo import LM_CACHE  # noqa: E402
from runtime import Generator, Runner, _session  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from machine import results_dir  # noqa: E402

_runner_options = _session.session_options


def _no_spinning(*args, **kwargs):
    options = _runner_options(*args, **kwargs)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


_session.session_options = _no_spinning

CONFIG = {"vocab_size": 32000, "embed_dim": 512, "num_heads": 8, "num_kv_heads": 2,
          "ffn_dim": 2048, "num_layers": 4}
SMALL = {"vocab_size": 500, "embed_dim": 64, "num_heads": 4, "num_kv_heads": 2,
         "ffn_dim": 128, "num_layers": 2}
MAX_PAST = 4096
SEED = 0
WARMUP = 5  # rounds dropped before timing (allocator and thread-pool warm-up)
NOISE_MS = 0.01  # step-time differences below this are not read as growth


def build(config) -> DecoderLM:
    torch.manual_seed(SEED)
    return DecoderLM(**config).eval()


def export(model: DecoderLM, config, out: Path, variants) -> tuple[Path, float]:
    """Through the attnx pipeline: capture, check, variants, parity (a small grid plus the
    decode loop), bundle. Returns the bundle and the seconds it took."""
    h_d = config["embed_dim"] // config["num_heads"]
    past = torch.randn(config["num_layers"], 2, config["num_kv_heads"], 3, h_d)
    examples = {"input_ids": torch.randint(0, config["vocab_size"], (2, 7)),
                "past_keys": past, "past_values": past.clone()}
    dynamic = {"input_ids": {0: "batch", 1: "seq"},
               "past_keys": {1: "batch", 3: "past"}, "past_values": {1: "batch", 3: "past"}}
    dims = {"batch": (1, 4), "seq": (1, MAX_PAST), "past": (0, MAX_PAST)}
    spec = spec_from_module(model, examples, dynamic=dynamic, dims=dims, name="decoder_lm_bench",
                            output_names=("logits", "present_keys", "present_values"),
                            tolerance=_deep_tolerance(),
                            source={"target": None, "class": "models.DecoderLM",
                                    "config": dict(config)},
                            cache=LM_CACHE)
    grid = [{"batch": 2, "seq": 7, "past": 3}, {"batch": 1, "seq": 1, "past": 0},
            {"batch": 1, "seq": 1, "past": 1}, {"batch": 1, "seq": 1, "past": 2048},
            {"batch": 3, "seq": 33, "past": 129}]
    start = time.perf_counter()
    result = run_pipeline(spec, out=out, grid=grid, variants=variants,
                          progress=lambda line: print(line, flush=True))
    return result.bundle, time.perf_counter() - start


def _deep_tolerance():
    from models.zoo import TOLERANCE_CLASSES
    from runtime import Tolerance

    return {k: Tolerance(**v) for k, v in TOLERANCE_CLASSES["deep"].items()}


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def interleaved(calls: dict, *, rounds: int, warmup: int) -> dict:
    """Per call name, the median and the 10th percentile of seconds per call. Each round calls
    every runtime once, in turn, so that load from other processes on the shared machine hits
    all of them alike (neither runtime's threads busy-wait: see the top of the file)."""
    samples = {name: [] for name in calls}
    for i in range(rounds + warmup):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            if i >= warmup:
                samples[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(v), float(np.percentile(v, 10)))
            for name, v in samples.items()}


def time_steps(gen: Generator, runner: Runner, model, prompt: list[int], iters: int) -> dict:
    """One decode step at exactly past len(prompt): ONNX via Generator (IO binding) and via
    Runner.run (numpy in/out), torch eager with its own cache."""
    gen.reset()
    gen.step(prompt)
    mark = gen.checkpoint()
    token = [int(prompt[-1])]
    keys_np = [v.numpy() for v in mark[1]]  # the same cache as numpy arrays, for Runner.run
    feed = {"input_ids": np.array([token], np.int64), "past_keys": keys_np[0],
            "past_values": keys_np[1]}

    def onnx_step():
        gen.rewind(mark)
        gen.step(token)

    with torch.inference_mode():
        _, keys, values = model(torch.tensor([prompt]), use_cache=True)
        ids = torch.tensor([token])
        # Two passes, each ONNX path alternating with torch alone, so that every timed call
        # follows the other runtime's call (the caches hold the other's weights: symmetric).
        seconds = interleaved({"onnx_step_ms": onnx_step,
                               "torch_step_ms": lambda: model(ids, keys, values)},
                              rounds=iters, warmup=WARMUP)
        seconds.update(interleaved({"onnx_runner_step_ms": lambda: runner.run(feed),
                                    "torch_again": lambda: model(ids, keys, values)},
                                   rounds=iters, warmup=WARMUP))
        seconds.pop("torch_again")
    out = {name: med * 1e3 for name, (med, _) in seconds.items()}
    out.update({f"{name}_p10": p10 * 1e3 for name, (_, p10) in seconds.items()})
    return out


def time_generation(gen: Generator, model, prompt: list[int], new_tokens: int,
                    runs: int) -> dict:
    """Greedy tokens/s from a cache of len(prompt) positions, feed-back and argmax included."""
    gen.reset()
    logits = gen.step(prompt)[-1]
    mark = gen.checkpoint()

    def onnx_run():
        gen.rewind(mark)
        last = logits
        for _ in range(new_tokens):
            last = gen.step([int(np.argmax(last))])[-1]

    with torch.inference_mode():
        t_logits, keys, values = model(torch.tensor([prompt]), use_cache=True)

        def torch_run():
            lg, k, v = t_logits, keys, values
            for _ in range(new_tokens):
                lg, k, v = model(lg[:, -1:].argmax(-1), k, v)

        seconds = interleaved({"onnx": onnx_run, "torch": torch_run}, rounds=runs, warmup=1)
    return {f"{name}_tokens_per_s": new_tokens / med for name, (med, _) in seconds.items()}


def time_recompute(runner: Runner, model, prompt: list[int], iters: int) -> dict:
    """One forward pass over all len(prompt) tokens with no cache (past 0)."""
    past = runner.manifest.inputs[1]
    shape = [0 if d == "past" else 1 if d == "batch" else d for d in past.shape]
    empty = np.zeros(shape, np.float32)
    feed = {"input_ids": np.array([prompt], np.int64), "past_keys": empty,
            "past_values": empty.copy()}
    session, names = runner.session, runner.manifest.output_names
    arrays = runner.validate(feed)
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        seconds = interleaved({"onnx_recompute_ms": lambda: session.run(names[:1], arrays),
                               "torch_recompute_ms": lambda: model(ids)},
                              rounds=iters, warmup=1)
    return {name: med * 1e3 for name, (med, _) in seconds.items()}


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return {"cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__}


def notes(doc: dict) -> list[str]:
    """Facts computed from the rows (the interpretation is in the README's Decoding section)."""
    cfg, rows = doc["config"], doc["rows"]
    lm_head_mb = cfg["vocab_size"] * cfg["embed_dim"] * 4 / 2**20
    read_mb = doc["weight_mb"] - lm_head_mb  # all weights but the embedding table
    out = []
    for variant in doc["variants"]:
        mine = [r for r in rows if r["variant"] == variant]
        ratios = [r["ratio"] for r in mine]
        met = "met" if max(ratios) <= 0.8 else "missed"
        out.append(f"- {variant}: ONNX/torch step ratio {min(ratios):.2f}..{max(ratios):.2f} "
                   f"over p = {', '.join(str(r['past']) for r in mine)}: target 0.8 {met}.")
    top = rows[-1]
    out.append(f"- Every decode step reads {read_mb:.0f} MB of fp32 weights (all but the "
               f"embedding table, of which it gathers one row; the LM head alone is "
               f"{lm_head_mb:.0f} MB) against {top['kv_mb']:.1f} MB of cache at p = "
               f"{top['past']}: at batch 1 the step is a chain of matrix-vector products bound "
               "by memory bandwidth, the same work in both runtimes.")
    return out


def markdown(doc: dict) -> str:
    lines = [
        "# Decode step: ONNX bundle vs torch eager",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {doc['machine']['cpu']}; torch {doc['machine']['torch']}, onnxruntime "
        f"{doc['machine']['onnxruntime']}; {doc['threads']} threads for both (torch "
        "set_num_threads, ORT intra-op)  ",
        f"Model: DecoderLM {doc['config']} ({doc['parameters'] / 1e6:.1f}M parameters, "
        f"{doc['weight_mb']:.0f} MB fp32), batch 1; bundle past range [0, {MAX_PAST}]  ",
        f"No busy-waiting on either side (torch OMP_WAIT_POLICY={doc['omp_wait_policy']}, ORT "
        "intra-op allow_spinning=0 on top of the Runner's options), calls interleaved. Load "
        f"average (1 min) {doc['load_average_1min']['start']:.1f} at the start, "
        f"{doc['load_average_1min']['end']:.1f} at the end (the machine is shared)  ",
        f"Export (capture, variants {', '.join(doc['variants'])}, grid + decode-loop parity, "
        f"write): {doc['export_s']:.0f} s",
        "",
        "Medians. `step` = one decode step at exactly past p, ONNX through runtime.Generator "
        "(IO binding), each call right after the other runtime's (so both start with the "
        "other's weights in cache); `ratio` = ONNX / torch step (target <= 0.8); `runner` = "
        "the same step through Runner.run (numpy in/out); tok/s = "
        f"{doc['new_tokens']} consecutive greedy tokens from a cache of p (argmax and feed-back "
        "included); `recompute` = one pass over all p + 1 tokens without a cache.",
        "",
        "| variant | past p | ONNX step ms | torch step ms | ratio | ONNX runner ms | "
        "ONNX tok/s | torch tok/s | ONNX recompute ms | torch recompute ms | KV MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['variant']} | {r['past']} | {r['onnx_step_ms']:.2f} | "
            f"{r['torch_step_ms']:.2f} | {r['ratio']:.2f} | {r['onnx_runner_step_ms']:.2f} | "
            f"{r['onnx_tokens_per_s']:.1f} | {r['torch_tokens_per_s']:.1f} | "
            f"{r['onnx_recompute_ms']:.1f} | {r['torch_recompute_ms']:.1f} | "
            f"{r['kv_mb']:.1f} |")
    lines += ["", "Growth from the shortest to the longest past:", ""]
    for v, g in doc["growth"].items():
        lines.append(
            f"- {v}: decode step {g['onnx_step_ms']:+.2f} ms ONNX, {g['torch_step_ms']:+.2f} ms "
            f"torch for +{g['past_delta']} cached positions; a recompute grows "
            f"{g['onnx_recompute_ms']:+.0f} ms ONNX, {g['torch_recompute_ms']:+.0f} ms torch"
            + (f" ({g['recompute_over_step']:.0f}x the ONNX step's growth)"
               if g["onnx_step_ms"] > NOISE_MS else " (the step's growth is within noise)"))
    lines += ["", "## Reading", "", *doc["notes"], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pasts", default="128,512,2048")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--gen-runs", type=int, default=5)
    parser.add_argument("--recompute-iters", type=int, default=3)
    parser.add_argument("--variants", default="base,fused,attention23",
                        help="bundle variants to time (those the bundle kept)")
    parser.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--bundle", metavar="DIR/decoder_lm_bench",
                        help="keep the exported bundle here, or reuse it if it exists")
    parser.add_argument("--out", default=None,
                        help="results folder (default: benchmarks/results/<cpu kind>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    config = SMALL if args.small else CONFIG
    pasts = [int(p) for p in args.pasts.split(",")]
    wanted = tuple(v for v in args.variants.split(",") if v != "base")
    model = build(config)
    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
        if args.bundle and (Path(args.bundle) / "manifest.json").exists():
            bundle, export_s = Path(args.bundle), float("nan")  # reuse: export not timed
        else:
            target = Path(args.bundle).parent if args.bundle else Path(tmp)
            bundle, export_s = export(model, config, target, wanted)
        rows = []
        with Runner(bundle, provider="cpu") as probe:
            kept = [v.name for v in probe.manifest.variants]
        variants = [v for v in ["base", *wanted] if v in kept]
        for variant in variants:
            with Runner(bundle, provider="cpu", variant=variant, threads=args.threads) as runner:
                gen = Generator(runner)
                for p in pasts:
                    prompt = rng.integers(0, config["vocab_size"], p).tolist()
                    print(f"{variant}: past {p}", flush=True)
                    row = {"variant": variant, "past": p,
                           "session_creation_ms": runner.session_seconds * 1e3}
                    row.update(time_steps(gen, runner, model, prompt, args.iters))
                    row.update(time_generation(gen, model, prompt, args.new_tokens,
                                               args.gen_runs))
                    row.update(time_recompute(runner, model, prompt + [1], args.recompute_iters))
                    row["ratio"] = row["onnx_step_ms"] / row["torch_step_ms"]
                    h_d = config["embed_dim"] // config["num_heads"]
                    row["kv_mb"] = (2 * config["num_layers"] * config["num_kv_heads"] * p * h_d
                                    * 4 / 2**20)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    growth = {}
    for variant in variants:
        lo, hi = [r for r in rows if r["variant"] == variant][0], \
            [r for r in rows if r["variant"] == variant][-1]
        g = {k: hi[k] - lo[k] for k in ("onnx_step_ms", "torch_step_ms", "onnx_recompute_ms",
                                        "torch_recompute_ms")}
        g["past_delta"] = hi["past"] - lo["past"]
        g["recompute_over_step"] = g["onnx_recompute_ms"] / max(g["onnx_step_ms"], 1e-9)
        growth[variant] = g
    params = sum(p.numel() for p in model.parameters())
    doc = {"command": "python benchmarks/decode_bench.py " + " ".join(argv or sys.argv[1:]),
           "machine": machine(), "threads": args.threads, "config": config,
           "parameters": params, "weight_mb": params * 4 / 2**20, "variants": variants,
           "export_s": export_s, "new_tokens": args.new_tokens, "iters": args.iters,
           "rows": rows, "growth": growth, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
           "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]}}
    doc["notes"] = notes(doc)
    out = Path(args.out) if args.out else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    stem = "decode_bench_small" if args.small else "decode_bench"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
