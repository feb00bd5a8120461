"""onnxruntime's CPU GroupQueryAttention on one prompt against the same kernel over query tiles.

    python benchmarks/kernel_tiles.py            # batch 1, 8 heads of 64, seq 2048 and 4096

Times one kernel call over the whole prompt (causal, and with a causal window of 64 and 256
keys) against the ``tiled`` variant's Loop (export/rewrites/query_tiles.py), which calls the
kernel once per tile of queries with the keys before the tile as its past. A window as long
as the longest sequence is plain causal attention, so the tiles' cost without a window is
measured too (the rewrite itself only takes windowed kernels: without one the tiles do not pay).

Each graph runs in a session configured as the Runner configures its own, 2 threads; the
sessions are timed in turns, a block of calls each, and each cell is the median over blocks.
Writes kernel_tiles.md and kernel_tiles.json under benchmarks/results/<cpu kind>/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import session  # noqa: E402
from machine import cpu_kind, results_dir  # noqa: E402

from export.rewrites.query_tiles import tile_queries  # noqa: E402
from runtime._cpu import cpu_features  # noqa: E402

HEADS, HEAD_DIM = 8, 64
CAUSAL = 8192  # a window no sequence here outgrows: plain causal attention
FLOAT = onnx.TensorProto.FLOAT


def kernel_graph(window: int) -> onnx.ModelProto:
    """q, k, v [b, s, h * h_d] -> one GroupQueryAttention, its lengths built as
    export/rewrites/kernels.py builds them."""
    make = helper.make_node

    def const(name, value):
        array = numpy_helper.from_array(np.array(value, np.int64), name)
        return make("Constant", [], [name], value=array)

    i32 = onnx.TensorProto.INT32
    nodes = [
        const("one", [1]),
        const("zero", [0]),
        const("two", [2]),
        make("Shape", ["q"], ["shape"]),
        make("Slice", ["shape", "zero", "one"], ["batch"]),
        make("Slice", ["shape", "one", "two"], ["n"]),
        make("Sub", ["n", "one"], ["last"]),
        make("Expand", ["last", "batch"], ["last_rows"]),
        make("Cast", ["last_rows"], ["seqlens"], to=i32),
        make("Squeeze", ["n", "zero"], ["n0"]),
        make("Cast", ["n0"], ["total"], to=i32),
        make(
            "GroupQueryAttention",
            ["q", "k", "v", "", "", "seqlens", "total"],
            ["y", "present_key", "present_value"],
            domain="com.microsoft",
            num_heads=HEADS,
            kv_num_heads=HEADS,
            scale=HEAD_DIM**-0.5,
            local_window_size=window,
        ),
    ]
    width = HEADS * HEAD_DIM
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "kernel",
        [value(n, FLOAT, ["b", "s", width]) for n in "qkv"],
        [value("y", FLOAT, ["b", "s", width])],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def graphs(tile: int) -> dict[str, onnx.ModelProto]:
    return {
        "one call, causal": kernel_graph(-1),
        "one call, window 256": kernel_graph(256),
        "one call, window 64": kernel_graph(64),
        "tiles, causal": tile_queries(kernel_graph(CAUSAL), tile=tile),
        "tiles, window 256": tile_queries(kernel_graph(256), tile=tile),
        "tiles, window 64": tile_queries(kernel_graph(64), tile=tile),
    }


def check_tiles(sessions, feed) -> None:
    """Refuse to time tiles that do not compute what their one call computes."""
    for name in sessions:
        if not name.startswith("tiles"):
            continue
        one = name.replace("tiles", "one call")
        tiles, reference = (sessions[n].run(None, feed)[0] for n in (name, one))
        if not np.allclose(tiles, reference, atol=1e-5, rtol=1e-4):
            worst = float(np.abs(tiles - reference).max())
            raise RuntimeError(f"'{name}' differs from '{one}' by up to {worst:.3g}")


def block_ms(run, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(seq: int, tile: int, blocks: int, threads: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((1, seq, HEADS * HEAD_DIM), dtype=np.float32) for n in "qkv"}
    sessions = {name: session(model, threads)[0] for name, model in graphs(tile).items()}
    check_tiles(sessions, feed)
    cells: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(blocks):
        for name, sess in sessions.items():
            cells[name].append(block_ms(lambda s=sess: s.run(None, feed), 3))
    return {name: round(statistics.median(ms), 2) for name, ms in cells.items()}


def markdown(rows: dict[int, dict[str, float]], meta: dict) -> str:
    names = list(next(iter(rows.values())))
    lines = [
        "# GroupQueryAttention: one call against query tiles",
        "",
        f"Command: `{meta['command']}`  ",
        f"CPU kind: {meta['cpu_kind']} ({meta['cpu_features']}); {meta['threads']} threads; "
        f"batch 1, {HEADS} heads of {HEAD_DIM}, tiles of {meta['tile']} rows.",
        "",
        "Median ms over blocks of 3 calls, sessions taken in turns; in brackets the ratio to "
        "one causal call at the same length.",
        "",
        "| seq | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for seq, cells in rows.items():
        base = cells["one call, causal"]
        text = [f"{cells[n]:.1f} ({cells[n] / base:.2f}x)" for n in names]
        lines.append(f"| {seq} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="2048,4096")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = {}
    for seq in (int(s) for s in args.seq.split(",")):
        rows[seq] = measure(seq, args.tile, args.blocks, args.threads)
        print(seq, rows[seq], flush=True)
    meta = run_meta("kernel_tiles.py", argv, args.threads) | {"tile": args.tile}
    write_results("kernel_tiles", rows, meta, markdown(rows, meta), args.out)
    return 0


def run_meta(script: str, argv, threads: int) -> dict:
    """The command, the CPU kind and its kernel features, and the threads of a kernel run."""
    return {
        "command": " ".join([f"python benchmarks/{script}", *(argv or sys.argv[1:])]),
        "cpu_kind": cpu_kind(),
        "cpu_features": " ".join(cpu_features()),
        "threads": threads,
    }


def write_results(name: str, rows: dict, meta: dict, report: str, out: str | None) -> None:
    """NAME.json (meta and rows) and NAME.md under out, by default the CPU kind's folder."""
    folder = Path(out) if out else results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (folder / f"{name}.md").write_text(report)
    print(f"wrote {folder / name}.json, .md")


if __name__ == "__main__":
    raise SystemExit(main())
