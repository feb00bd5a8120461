"""The `attnx` console script: the runtime's subcommands plus export's (list, export, check).

There is one parser, built by runtime._cli; this module adds the export half. Nothing here
imports torch at module level, so `attnx run/verify/bench/inspect` work on a torch-free
install; the export subcommands import torch when they run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from runtime import report_json, report_junit
from runtime._cli import main as runtime_main

from ._errors import ExportError, UsageError

DEFAULT_OUT = "artifacts"


def main(argv: list[str] | None = None) -> int:
    try:
        return runtime_main(argv, extra=add_commands)
    except BrokenPipeError:  # `attnx list | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


def add_commands(subparsers) -> None:
    _extend_bench(subparsers.choices["bench"])
    for command in (cmd_list, cmd_export, cmd_check):
        name = command.__name__.removeprefix("cmd_")
        doc = command.__doc__ or ""
        parser = subparsers.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _ARGUMENTS[name](parser)
        parser.set_defaults(func=_with_torch(name, command))


def _with_torch(name: str, command):
    """The export commands need the [export] extra; a runtime-only install says so in one line
    instead of a traceback from deep inside an import."""

    def run(args) -> int:
        need_export_extra(name)
        return command(args)

    run.__doc__ = command.__doc__
    return run


def need_export_extra(command: str) -> None:
    for module in ("torch", "onnxscript"):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UsageError(
                f"`attnx {command}` needs {module} ({err}); install the export extra: "
                "pip install 'attnx[export]'"
            ) from None


def _extend_bench(bench) -> None:
    """`attnx bench --vs-torch`: the runtime's bench, then torch eager on the same inputs."""
    bench.add_argument(
        "--vs-torch",
        action="store_true",
        help="also time torch eager on the same inputs and print the ratio (needs torch; "
        "rebuilds each bundle's source module)",
    )
    runtime_bench = bench.get_default("func")

    def cmd_bench(args) -> int:
        if args.vs_torch:
            need_export_extra("bench --vs-torch")
        code = runtime_bench(args)
        if args.vs_torch:
            for path in args.bundles:
                print(_vs_torch(Path(path), args))
        return code

    cmd_bench.__doc__ = runtime_bench.__doc__
    bench.set_defaults(func=cmd_bench)


def _vs_torch(path: Path, args) -> str:
    import statistics

    import torch

    from runtime import Runner, load_bundle
    from runtime._bench import bench_feed, bench_point
    from runtime._session import CUDA, resolve_provider

    from ._check import spec_from_manifest

    bundle = load_bundle(path)
    spec = spec_from_manifest(bundle.manifest)
    point = bench_point(bundle, dict(args.shape))
    feed = bench_feed(bundle, point)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = _torch_device(resolve_provider(args.provider) == CUDA)
    eager_call = _eager_call(spec, feed, device)

    def median_ms(fn) -> float:
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    eager = median_ms(eager_call)
    with Runner(bundle, provider=args.provider, variant=args.variant, threads=threads) as runner:
        onnx_ms = median_ms(lambda: runner.run(feed))
        variant = runner.variant.name
        provider = "cuda" if runner.provider == CUDA else "cpu"
    where = ", ".join(f"{k}={v}" for k, v in point.items())
    return (
        f"{bundle.manifest.name} vs torch at {where} ({threads} threads): torch eager on "
        f"{device} p50 {eager:.3f} ms, {variant} on {provider} p50 {onnx_ms:.3f} ms, "
        f"ratio {onnx_ms / eager:.2f}x"
    )


def _torch_device(onnx_on_cuda: bool) -> str:
    """Torch runs where onnxruntime runs, so the ratio compares like with like; a CPU-only
    torch against onnxruntime on CUDA is still timed, and the line says so."""
    import torch

    return "cuda" if onnx_on_cuda and torch.cuda.is_available() else "cpu"


def _eager_call(spec, feed: dict, device: str):
    """One eager call doing the Runner's work: numpy in, numpy out. On CUDA that includes the
    copies to and from the device, which also wait for the kernels to finish."""
    import torch

    module = spec.module.to(device)

    def call():
        with torch.no_grad():
            tensors = {k: torch.from_numpy(a).to(device) for k, a in feed.items()}
            out = module(**tensors, **spec.forward_kwargs)
            outs = out if isinstance(out, tuple | list) else (out,)
            return [o.cpu().numpy() for o in outs if isinstance(o, torch.Tensor)]

    return call


def _list_args(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _export_args(parser) -> None:
    parser.add_argument(
        "targets",
        nargs="*",
        metavar="NAME|pkg.module:factory|DIR",
        help="zoo entries, factories or save_pretrained folders of Hugging Face models",
    )
    parser.add_argument("--all", action="store_true", help="export every zoo entry")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="targets exported at once, each process on its own share of the cores (default: "
        "one per usable core; 1 exports one after another in this process)",
    )
    parser.add_argument(
        "--task",
        choices=sorted(_TASK_CHOICES),
        help="for a Hugging Face folder: feature-extraction (hidden states), text-generation "
        "(logits) or text-generation-with-past (logits and KV cache, for attnx generate); "
        "default: from the config's architectures",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="bundle folder (default: artifacts)")
    parser.add_argument("--opset", type=int, default=None, help="ai.onnx opset (default: 18)")
    parser.add_argument(
        "--variants",
        metavar="V,V",
        help="optimized variants to build besides base (default: "
        "attention23,fused,tiled,int8,fp16; 'none' for base only)",
    )
    parser.add_argument("--junit", metavar="FILE", help="write parity results as JUnit XML")
    parser.add_argument("--json", metavar="FILE", help="write parity records as JSON")


def _check_args(parser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE")
    parser.add_argument("--junit", metavar="FILE", help="write parity results as JUnit XML")
    parser.add_argument("--json", action="store_true", help="print parity records as JSON")


_ARGUMENTS = {"list": _list_args, "export": _export_args, "check": _check_args}


def cmd_list(args) -> int:
    """List the zoo: the named blocks `attnx export` knows."""
    import json

    from models import zoo

    rows = [
        {
            "name": e.name,
            "inputs": ", ".join(s.name for s in e.inputs),
            "dims": ", ".join(f"{d}[{lo},{hi}]" for d, (lo, hi) in e.dims.items()),
            "tolerance": e.tolerance,
            "description": e.description,
        }
        for e in zoo.entries()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(_table(rows, ["name", "inputs", "dims", "tolerance", "description"]))
    return 0


def cmd_export(args) -> int:
    """Export zoo entries or pkg.module:factory targets to ONNX bundles, proving parity.

    Each target goes through capture, check, variants, parity and write; a parity miss or an
    export error of one target does not stop the others. Exit 0 when all passed, 1 on a
    parity failure, 2 on an export or usage error.
    """
    from models import zoo

    if args.all == bool(args.targets):
        raise UsageError("give zoo entry names or pkg.module:factory targets, or --all (not both)")
    targets = zoo.names() if args.all else args.targets
    if args.task is not None and not all(_is_folder(t) for t in targets):
        other = next(t for t in targets if not _is_folder(t))
        raise UsageError(f"--task is for Hugging Face model folders; {other!r} is not one")
    for target in targets:
        if ":" not in target and not _is_folder(target):
            try:
                zoo.get(target)  # fail fast on a typo, listing the known names
            except zoo.UnknownEntryError as err:
                raise UsageError(str(err)) from None
    jobs = _jobs(args.jobs, len(targets))
    bar = _Progress(len(targets)) if args.all and sys.stderr.isatty() else None
    quiet = bar is not None
    if jobs == 1:
        results = []
        for i, target in enumerate(targets):
            if bar:
                bar.update(i, target)
            say = None if quiet else (lambda line: print(line, flush=True))
            results.append(_export_one(target, args, say=say))
    else:
        results = _export_parallel(targets, args, jobs, bar)
    if bar:
        bar.done()
    return _finish(results, args)


def _jobs(asked: int | None, targets: int) -> int:
    from runtime._session import default_threads

    if asked is not None and asked < 1:
        raise UsageError(f"--jobs must be >= 1, got {asked}")
    return max(1, min(asked or default_threads(), targets))


def _core_groups(jobs: int) -> list[list[int]]:
    """The usable cores dealt out to ``jobs`` workers (each at least one)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < jobs:
        return [[] for _ in range(jobs)]  # fewer cores than jobs: no pinning
    return [cores[i::jobs] for i in range(jobs)]


def _export_parallel(targets: list[str], args, jobs: int, bar) -> list[dict]:
    """Export ``targets`` in ``jobs`` worker processes, each pinned to its own cores (so torch
    and onnxruntime size their thread pools to them and the variant timings do not compete);
    progress lines and results come back in target order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    groups = context.Queue()
    for group in _core_groups(jobs):
        groups.put(group)
    plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
    results = []
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_pin, initargs=(groups,))
    with pool:
        futures = [pool.submit(_export_quietly, t, plain) for t in targets]
        for i, (target, future) in enumerate(zip(targets, futures, strict=True)):
            if bar:
                bar.update(i, target)
            row, lines = future.result()
            for line in [] if bar else lines:
                print(line, flush=True)
            results.append(row)
    return results


def _pin(groups) -> None:
    """Worker start: take a share of the cores; torch's pool follows (onnxruntime's sessions size
    theirs from the affinity, runtime._session.default_threads)."""
    cores = groups.get()
    if cores:
        os.sched_setaffinity(0, cores)
        import torch

        torch.set_num_threads(len(cores))


def _export_quietly(target: str, args) -> tuple[dict, list[str]]:
    lines: list[str] = []
    return _export_one(target, args, say=lines.append), lines


def _export_one(target: str, args, *, say) -> dict:
    from ._pipeline import DEFAULT_OPSET, run_pipeline

    start = time.perf_counter()
    row = {"name": target, "records": [], "error": "", "state": "FAILED", "kind": "export"}
    try:
        spec = _spec_for(target, args.task)
        row["name"] = spec.name
        result = run_pipeline(
            spec,
            out=Path(args.out),
            opset=args.opset or DEFAULT_OPSET,
            progress=say,
            variants=_variant_names(args.variants),
        )
        row.update(records=result.records, state="PASSED", bundle=str(result.bundle))
    except ExportError as err:
        row["error"] = str(err)
    except Exception as err:
        from runtime import ParityError

        if not isinstance(err, ParityError):
            raise
        records = list(err.checked)  # the summary counts passing points too
        row.update(error=str(err).splitlines()[0], kind="parity", records=records)
    row["seconds"] = time.perf_counter() - start
    return row


def _variant_names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    if text.strip() == "none":
        return ()
    return tuple(v.strip() for v in text.split(",") if v.strip())


# Optimum's task names are accepted too (export/_hf.py).
_TASK_CHOICES = ("feature-extraction", "text-generation", "text-generation-with-past",
                 "default", "causal-lm", "causal-lm-with-past")


def _is_folder(target: str) -> bool:
    """A Hugging Face save_pretrained folder (a folder named like a zoo entry needs its
    config.json to count)."""
    from models import zoo

    folder = Path(target)
    return folder.is_dir() and ((folder / "config.json").is_file() or target not in zoo.names())


def _spec_for(target: str, task: str | None = None):
    from models import zoo

    from ._factory import spec_from_factory
    from ._spec import spec_from_zoo

    if _is_folder(target):
        from ._hf_tasks import spec_from_folder

        return spec_from_folder(target, task)
    if ":" not in target:
        return spec_from_zoo(zoo.get(target))
    return spec_from_factory(target)


def cmd_check(args) -> int:
    """Re-run parity of bundles against torch: rebuild each bundle's source module, and compare
    every variant over the bundle's shape grid. Exit 1 on a parity miss."""
    from ._check import check_bundle

    results = []
    for path in args.bundles:
        start = time.perf_counter()
        row = {"name": Path(path).name, "records": [], "error": "", "state": "FAILED"}
        try:
            row["records"] = check_bundle(Path(path))
            row["state"] = "PASSED" if all(r.passed for r in row["records"]) else "FAILED"
            row["kind"] = "parity"
        except ExportError as err:
            row.update(error=str(err), kind="export")
        row["seconds"] = time.perf_counter() - start
        results.append(row)
    if args.json:
        print(report_json([r for row in results for r in row["records"]]))
        args.json = None
    return _finish(results, args)


def _finish(results: list[dict], args) -> int:
    records = [r for row in results for r in row["records"]]
    if getattr(args, "junit", None):
        Path(args.junit).write_text(report_junit(records), encoding="utf-8")
    if isinstance(getattr(args, "json", None), str):
        Path(args.json).write_text(report_json(records), encoding="utf-8")
    rows = [_summary(row) for row in results]
    print()
    print(_table(rows, ["name", "points", "variants", "worst max_abs", "seconds", "result"]))
    for row in results:
        if row["error"]:
            print(f"{row['name']}: {row['error']}", file=sys.stderr)
    if all(row["state"] == "PASSED" for row in results):
        print("PASSED")
        return 0
    print("FAILED")
    return 2 if any(row.get("kind") == "export" and row["error"] for row in results) else 1


def _summary(row: dict) -> dict:
    from ._variants import LOSSY

    records = row["records"]
    # int8/fp16 have their own looser tolerance; the column shows the exact variants' error.
    strict = [o.max_abs for r in records if r.variant not in LOSSY for o in r.outputs]
    worst = max(strict, default=float("nan"))
    passed = sum(r.passed for r in records)
    return {
        "name": row["name"],
        "points": f"{passed}/{len(records)}",
        "variants": ",".join(dict.fromkeys(r.variant for r in records)) or "-",
        "worst max_abs": f"{worst:.2e}",
        "seconds": f"{row['seconds']:.1f}",
        "result": row["state"],
    }


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in columns}
    head = "  ".join(c.ljust(widths[c]) for c in columns)
    rule = "  ".join("-" * widths[c] for c in columns)
    body = ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join([head, rule, *body])


class _Progress:
    """A one-line progress bar on a terminal (stderr), for --all."""

    def __init__(self, total: int) -> None:
        self.total = total

    def update(self, done: int, label: str) -> None:
        width = 30
        filled = width * done // self.total
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r[{bar}] {done}/{self.total} {label:<24}")
        sys.stderr.flush()

    def done(self) -> None:
        self.update(self.total, "")
        sys.stderr.write("\n")
