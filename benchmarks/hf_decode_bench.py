"""Decode-step latency of Hugging Face causal LMs: torch eager with its own cache, attnx's
cached bundle through the torch-free Generator, and Optimum's text-generation-with-past graph,
in one process, with the same threads.

    python benchmarks/hf_decode_bench.py                     # gpt2, llama; past 128, 512, 2048
    python benchmarks/hf_decode_bench.py --families llama --past 512 --batch 1,4
    python benchmarks/hf_decode_bench.py --optimum-venv DIR  # the venv Optimum runs in

Models as in hf_bench.py (random weights, 4 layers, d 512, 8 heads, Llama with 4 kv heads,
vocab 8192), with 4096 positions so that a past of 2048 fits. One decode step at past p: the
prompt (p random tokens, every row kept) is prefilled once, then the same one-token step is
timed again and again from that cache:

- eager: the transformers model called with a DynamicCache of the prefill's tensors (made anew
  each call; its update concatenates, as generate's does), the attention mask and position ids
  generate passes;
- attnx <variant>: `attnx export FOLDER --task text-generation-with-past`, each variant that
  passed parity, stepped by runtime.Generator (IO binding; presents stay in onnxruntime's
  memory) after a checkpoint/rewind to the prefilled cache;
- optimum, optimum O2: `optimum-cli export onnx --task text-generation-with-past` (and
  `--optimize O2`) in Optimum's own environment, its graph stepped with the same IO binding.

Each graph is timed right after a block of eager calls; a cell is its median and the ratio of
that median to the eager block before it. Every graph's step logits are compared with eager's.
Writes hf_decode_bench.{json,md,png} under benchmarks/results/<cpu kind>/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from bench import median_ms  # noqa: E402
from hf_bench import (  # noqa: E402
    make_session,
    optimum_graphs,
    peer_args,
    peer_setup,
    report_header,
)

from export._hf_tasks import spec_from_folder  # noqa: E402
from export._pipeline import run_pipeline  # noqa: E402
from export._variants import CPU, LOSSY  # noqa: E402
from runtime import Generator  # noqa: E402

TASK = "text-generation-with-past"
TARGET_RATIO = 0.8
VOCAB = 8192
POSITIONS = 4096
PEERS = ("optimum", "optimum O2")


def _gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=512, n_layer=4, n_head=8,
                                     n_positions=POSITIONS, bos_token_id=0, eos_token_id=1)
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=512, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4,
                                      intermediate_size=1408, max_position_embeddings=POSITIONS)
    return transformers.LlamaForCausalLM(config)


FAMILIES = {"gpt2": _gpt2, "llama": _llama}


# --- the graphs --------------------------------------------------------------------------------


def save_family(family: str, work: Path) -> Path:
    torch.manual_seed(0)
    folder = work / "models" / family
    FAMILIES[family]().eval().save_pretrained(folder)
    return folder


def attnx_bundle(folder: Path, work: Path) -> tuple[Path, list[str], float, dict]:
    """(bundle folder, CPU variants that passed, export seconds, dropped variants): the default
    decode-loop parity and a short grid (the default one's longest points cost minutes here)."""
    spec = spec_from_folder(folder, TASK)
    grid = [dict(spec.example), {"batch": 1, "seq": 1, "past": 0, "total": 1},
            {"batch": 3, "seq": 1, "past": 37, "total": 38}]
    start = time.perf_counter()
    result = run_pipeline(spec, out=work / "attnx", grid=grid)
    seconds = time.perf_counter() - start
    variants = [n for n, b in result.variants.items() if CPU in b.providers and n not in LOSSY]
    return work / "attnx" / spec.name, variants, seconds, dict(result.status.dropped)


# --- one decode step ---------------------------------------------------------------------------


def _mask_and_positions(batch: int, past: int):
    mask = torch.ones(batch, past + 1, dtype=torch.int64)
    return mask, torch.full((batch, 1), past, dtype=torch.int64)


def eager_step(model, prompt: torch.Tensor, token: torch.Tensor):
    """(step callable, its logits [b, V]) of eager decoding one token after ``prompt``."""
    from transformers import DynamicCache

    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, return_dict=True)
    pasts = [(layer.keys, layer.values) for layer in out.cache.layers]
    mask, positions = _mask_and_positions(*prompt.shape)

    def step():
        with torch.no_grad():
            cache = DynamicCache(ddp_cache_data=pasts)
            return model(input_ids=token, attention_mask=mask, position_ids=positions,
                         cache=cache, use_cache=True, return_dict=True).logits

    return step, step()[:, -1].numpy()


def attnx_step(bundle: Path, variant: str, threads: int, prompt: np.ndarray, token: np.ndarray):
    """(step callable, logits [b, V], generator) of the Generator decoding one token after the
    prefilled ``prompt``, rewound to the prefilled cache before each step."""
    gen = Generator(bundle, provider="cpu", variant=variant, threads=threads)
    gen.step(prompt)
    mark = gen.checkpoint()

    def step():
        gen.rewind(mark)
        return gen.step(token)

    return step, step()[:, -1], gen


def ort_step(graph: Path, threads: int, prompt: np.ndarray, token: np.ndarray):
    """(step callable, logits [b, V], session) of an Optimum graph decoding one token after
    ``prompt``, its presents bound as the pasts with IO binding (as the Generator binds)."""
    session = make_session(graph, threads)
    names = [i.name for i in session.get_inputs()]
    pasts = [n for n in names if n.startswith("past_key_values.")]
    batch, past = prompt.shape
    empty = {}
    for value in session.get_inputs():
        if value.name in pasts:
            shape = [batch, value.shape[1], 0, value.shape[3]]
            empty[value.name] = np.zeros(shape, np.float32)
    prefill = {"input_ids": prompt, "attention_mask": np.ones_like(prompt),
               "position_ids": np.broadcast_to(np.arange(past), prompt.shape).copy(), **empty}
    outputs = [o.name for o in session.get_outputs()]
    first = dict(zip(outputs, session.run(None, {n: prefill[n] for n in names}), strict=True))
    state = {n: ort.OrtValue.ortvalue_from_numpy(first[n.replace("past_key_values", "present")])
             for n in pasts}
    mask, positions = (t.numpy() for t in _mask_and_positions(batch, past))

    def step():
        binding = session.io_binding()
        feed = {"input_ids": token, "attention_mask": mask, "position_ids": positions}
        for n in names:
            if n in state:
                binding.bind_ortvalue_input(n, state[n])
            else:
                binding.bind_cpu_input(n, feed[n])
        for n in outputs:
            binding.bind_output(n, "cpu")
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    return step, step()[:, -1], session


# --- the benchmark -----------------------------------------------------------------------------


def bench_point(family, model, bundle, variants, peers, batch, past, args) -> dict:
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(past)
    prompt = torch.randint(0, VOCAB, (batch, past), generator=gen)
    token = torch.randint(0, VOCAB, (batch, 1), generator=gen)
    eager, want = eager_step(model, prompt, token)
    row = {"family": family, "batch": batch, "past": past, "ms": {}, "ratio": {},
           "max_abs": {}, "failed": {}}
    graphs = {f"attnx {v}": ("attnx", v) for v in variants}
    graphs.update({name: ("ort", path) for name, path in peers.items()})
    eager_blocks = []
    for name, (kind, what) in graphs.items():
        holder = None
        try:
            if kind == "attnx":
                step, got, holder = attnx_step(bundle, what, args.threads, prompt.numpy(),
                                               token.numpy())
            else:
                step, got, holder = ort_step(what, args.threads, prompt.numpy(), token.numpy())
            row["max_abs"][name] = float(np.abs(got - want).max())
            eager_ms = median_ms(eager, args.budget / 2)
            graph_ms = median_ms(step, args.budget / 2)
        except (MemoryError, ort.capi.onnxruntime_pybind11_state.Fail) as err:
            row["failed"][name] = str(err).splitlines()[0][:200]
            continue
        finally:
            if isinstance(holder, Generator):
                holder.close()
            holder = None  # one session alive at a time
        eager_blocks.append(eager_ms)
        row["ms"][name] = graph_ms
        row["ratio"][name] = graph_ms / eager_ms
    row["eager_ms"] = statistics.median(eager_blocks) if eager_blocks else median_ms(eager, 1.0)
    return summarize(row, variants)


def summarize(row: dict, variants: list[str]) -> dict:
    mine = [f"attnx {v}" for v in variants if f"attnx {v}" in row["ms"]]
    if not mine:
        row.update(best="none", meets_target=False)
        return row
    best = min(mine, key=lambda n: row["ms"][n])
    peers = [row["ms"][p] for p in PEERS if p in row["ms"]]
    row["best"] = best
    row["tokens_per_s"] = {n: 1e3 * row["batch"] / ms for n, ms in row["ms"].items()}
    row["eager_tokens_per_s"] = 1e3 * row["batch"] / row["eager_ms"]
    row["meets_target"] = row["ratio"][best] <= TARGET_RATIO and all(
        row["ms"][best] <= p for p in peers)
    return row


def bench_family(family: str, args, work: Path, python: Path | None) -> list[dict]:
    folder = save_family(family, work)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    print(f"[{family}] exporting with attnx", flush=True)
    bundle, variants, export_s, dropped = attnx_bundle(folder, work)
    print(f"  attnx: {', '.join(variants)} in {export_s:.0f} s; dropped {dropped or 'none'}")
    peers = {} if python is None else optimum_graphs(python, folder, TASK, work)
    rows = []
    for batch in args.batch:
        for past in args.past:
            row = bench_point(family, model, bundle, variants, peers, batch, past, args)
            row["export_s"], row["dropped"] = export_s, dropped
            rows.append(row)
            print("  " + line(row), flush=True)
    return rows


def line(row: dict) -> str:
    cells = ", ".join(f"{n} {ms:.2f} ms ({row['ratio'][n]:.2f}x)" for n, ms in row["ms"].items())
    verdict = "meets" if row["meets_target"] else "MISSES"
    return (f"{row['family']} b{row['batch']} past {row['past']}: eager {row['eager_ms']:.2f} "
            f"ms; {cells}; best={row['best']} {verdict}")


def columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(n for r in rows for n in [*r["ms"], *r["failed"]]))


def markdown(rows: list[dict], meta: dict) -> str:
    cols = columns(rows)
    lines = [
        *report_header("Decode step of Hugging Face causal LMs: torch eager, attnx, Optimum", meta),
        "Models: random weights, 4 layers, d 512, 8 heads (Llama: 4 kv heads), vocab 8192. A "
        "cell: the median ms of one decode step (one new token per row) after a prefilled "
        "past, and its ratio to the eager block timed just before it (below 1.00 is faster); "
        "*tokens/s* = batch / step time. *best*: attnx's fastest variant that passed parity "
        f"(int8 excluded). Target: best <= {TARGET_RATIO}x eager and <= every Optimum column.",
        "",
        "| family | batch | past | eager ms | " + " | ".join(cols)
        + " | best | best tokens/s (eager) | target |",
        "|---|---|---|---|" + "---|" * len(cols) + "---|---|---|",
    ]
    for r in rows:
        cells = [f"{r['ms'][c]:.2f} ({r['ratio'][c]:.2f}x)" if c in r["ms"]
                 else "failed" if c in r["failed"] else "-" for c in cols]
        rate = (f"{r['tokens_per_s'][r['best']]:.0f} ({r['eager_tokens_per_s']:.0f})"
                if r["best"] != "none" else "-")
        lines.append(
            f"| {r['family']} | {r['batch']} | {r['past']} | {r['eager_ms']:.2f} | "
            + " | ".join(cells) + f" | {r['best'].removeprefix('attnx ')} | {rate} | "
            + ("yes" if r["meets_target"] else "**MISS**") + " |")
    met = sum(r["meets_target"] for r in rows)
    worst = {c: max(r["max_abs"].get(c, 0.0) for r in rows) for c in cols}
    lines += ["", f"{met} of {len(rows)} points meet the target.", "",
              "Largest max abs error of a step's logits against eager: "
              + ", ".join(f"{c} {v:.2g}" for c, v in worst.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    cols = columns(rows)
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        mine = [r for r in rows if r["family"] == family]
        x = np.arange(len(mine))
        width = 0.8 / max(len(cols), 1)
        for i, col in enumerate(cols):
            values = [r["ratio"].get(col, np.nan) for r in mine]
            ax.bar(x + (i - len(cols) / 2) * width, values, width, label=col)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(TARGET_RATIO, color="k", lw=0.8, ls="--")
        ax.set_xticks(x, [f"b{r['batch']} past {r['past']}" for r in mine], rotation=30)
        ax.set_title(f"{family}: decode step")
        ax.set_ylabel("time / torch eager")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--batch", default="1")
    parser.add_argument("--past", default="128,512,2048")
    peer_args(parser, name="hf_decode_bench", budget=3.0)
    args = parser.parse_args()
    args.batch = [int(b) for b in args.batch.split(",")]
    args.past = [int(p) for p in args.past.split(",")]
    out, python, meta = peer_setup(args, "hf_decode_bench.py")
    rows = []
    with tempfile.TemporaryDirectory(prefix="attnx-hf-decode-") as tmp:
        for family in args.families.split(","):
            rows += bench_family(family, args, Path(tmp), python)
            (out / f"{args.name}.json").write_text(
                json.dumps({"meta": meta, "rows": rows}, indent=1))
            (out / f"{args.name}.md").write_text(markdown(rows, meta))
    plot(rows, out / f"{args.name}.png")
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
