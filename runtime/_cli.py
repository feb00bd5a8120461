"""The runtime half of the one `attnx` parser: run, verify, bench, inspect (no torch needed).

`main(argv, extra=...)` builds the parser; export._cli passes `extra` to add its own
subcommands, so there is exactly one parser. Exit codes: 0 success, 1 parity failure,
2 user or artifact error (one line `attnx: error: ...` on stderr). Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ._errors import AttnxError, InputError, ParityError, ProviderError
from ._generate import cmd_generate, generate_args
from ._parity import (
    ToleranceTable,
    compare,
    describe,
    parity_record,
    report_junit,
    report_text,
)
from ._session import PROVIDER_CHOICES

EXIT_OK, EXIT_PARITY, EXIT_ERROR = 0, 1, 2


def main(argv: list[str] | None = None, *,
         extra: Callable[[argparse._SubParsersAction], None] | None = None) -> int:
    parser = build_parser(extra)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on usage errors and --help; tests call main()
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    try:
        return args.func(args)
    except ParityError as e:
        print(e)
        print("FAILED")
        return EXIT_PARITY
    except AttnxError as e:
        message = " ".join(str(e).split("\n"))
        print(f"attnx: error: {message}", file=sys.stderr)
        return EXIT_ERROR


def build_parser(extra=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnx", description="Export attention blocks to ONNX, prove parity, run them.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_commands(subparsers)
    if extra is not None:
        extra(subparsers)
    return parser


def add_commands(subparsers) -> None:
    for command in (cmd_run, cmd_verify, cmd_bench, cmd_inspect, cmd_generate, cmd_tune):
        name = command.__name__.removeprefix("cmd_")
        doc = command.__doc__ or ""
        parser = subparsers.add_parser(name, help=doc.splitlines()[0], description=doc,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        _ARGUMENTS[name](parser)
        parser.set_defaults(func=command)
    from .serve._commands import add_commands as add_serving_commands  # triton, serve

    add_serving_commands(subparsers)


def _provider_arg(parser) -> None:
    parser.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto",
                        help="auto (CUDA if onnxruntime offers it), cpu or cuda (default: auto)")


def _run_args(parser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                        help="an input array (repeat for each input)")
    parser.add_argument("--out", metavar="FILE.npz", help="save the outputs here")
    parser.add_argument("--variant", help="variant name (default: best that passed parity)")
    _provider_arg(parser)


def _verify_args(parser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE")
    parser.add_argument("--json", action="store_true",
                        help="print JSON on stdout (the PASSED/FAILED line goes to stderr)")
    parser.add_argument("--junit", metavar="FILE", help="write JUnit XML here")
    _provider_arg(parser)


def _shape(text: str) -> tuple[str, int]:
    name, sep, size = text.partition("=")
    if not sep or not size.isdigit():
        raise argparse.ArgumentTypeError(f"expected dim=N, got {text!r}")
    return name, int(size)


def _bench_args(parser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE")
    parser.add_argument("--shape", type=_shape, action="append", default=[], metavar="DIM=N",
                        help="a dim size (default: golden case 0's sizes)")
    parser.add_argument("--variant", help="variant name (default: best that passed parity)")
    parser.add_argument("--warmup", type=int, default=10, metavar="N")
    parser.add_argument("--iters", type=int, default=100, metavar="N")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op threads (default: usable CPUs)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    _provider_arg(parser)


def _inspect_args(parser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _tune_args(parser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE")
    parser.add_argument("--shape", type=_shape, action="append", default=[], metavar="DIM=N",
                        help="a dim size to time at (default: golden case 0's sizes)")
    from ._tune import TUNE_ITERS

    parser.add_argument("--iters", type=int, default=TUNE_ITERS, metavar="N",
                        help=f"timed runs per variant (default: {TUNE_ITERS}; the median is kept)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op threads (default: usable CPUs)")
    parser.add_argument("--json", action="store_true", help="print JSON")


_ARGUMENTS = {"run": _run_args, "verify": _verify_args, "bench": _bench_args,
              "inspect": _inspect_args, "generate": generate_args, "tune": _tune_args}


# ---------------------------------------------------------------------------------------------
# run


def _read_inputs(specs: list[str]) -> dict[str, np.ndarray]:
    feed = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise InputError(f"--input expects NAME=FILE.npy, got {spec!r}")
        try:
            arr = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise InputError(f"--input {name}: cannot read {file}: {e}") from None
        if not isinstance(arr, np.ndarray):
            arr.close()
            raise InputError(f"--input {name}: {file} is an .npz archive; give one .npy per input")
        feed[name] = arr
    return feed


def cmd_run(args) -> int:
    """Run a bundle on input arrays (.npy files) and print or save the outputs.

    Example: attnx run artifacts/mha_rope --input x=x.npy --out y.npz
    """
    from ._runner import Runner

    feed = _read_inputs(args.input)
    with Runner(args.bundle, provider=args.provider, variant=args.variant) as runner:
        outputs = runner.run(feed)
        print(f"{runner.manifest.name}: variant {runner.variant.name} on {runner.provider}")
    for name, arr in outputs.items():
        bad = int(arr.size - np.isfinite(arr).sum()) if arr.dtype.kind == "f" else 0
        note = f"  ({bad} non-finite values)" if bad else ""
        print(f"{name}: {arr.dtype} {list(arr.shape)}{note}")
    if args.out:
        np.savez(args.out, **outputs)
        print(f"wrote {args.out}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# verify


def _verify_bundle(path: str, provider_choice: str):
    from ._bundle import load_bundle
    from ._runner import Runner, measured_elsewhere, variants_for
    from ._session import resolve_provider

    bundle = load_bundle(path)
    provider = resolve_provider(provider_choice)
    variants = variants_for(bundle.manifest, provider)
    if not variants:
        raise ProviderError(f"{path}: no variant of {bundle.manifest.name!r} is meant for "
                            f"{provider}")
    records = []
    for variant in variants:
        table = ToleranceTable.from_variant(variant)
        elsewhere = measured_elsewhere(bundle.manifest, variant, provider)
        if elsewhere:
            print(f"note: {elsewhere}: re-checked here against the golden outputs",
                  file=sys.stderr)
        with Runner(bundle, provider=provider_choice, variant=variant.name,
                    note_cpu=False) as runner:
            for golden in bundle.golden:
                outputs = runner.run(dict(golden.inputs))
                records.append(parity_record(variant.name, provider, golden.point,
                                             compare(outputs, golden.outputs, table)))
    return bundle, records


def _junit(groups) -> str:
    root = ET.Element("testsuites")
    for bundle, records in groups:
        suite = f"attnx.verify.{bundle.manifest.name}"
        root.append(ET.fromstring(report_junit(records, suite=suite)))
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


def _json(groups) -> str:
    from ._manifest import parity_record_dict

    return json.dumps({
        "passed": all(r.passed for _, records in groups for r in records),
        "bundles": [{"name": b.manifest.name, "dir": str(b.dir),
                     "passed": all(r.passed for r in records),
                     "records": [parity_record_dict(r) for r in records]}
                    for b, records in groups]}, indent=2, sort_keys=True, allow_nan=False)


def cmd_verify(args) -> int:
    """Check bundles against their golden outputs, with every variant meant for the provider.

    Compares with each variant's manifest tolerance. The last line is PASSED or FAILED;
    exit 1 when any output misses its tolerance.
    """
    groups = [_verify_bundle(path, args.provider) for path in args.bundles]
    if args.junit:
        Path(args.junit).write_text(_junit(groups), encoding="utf-8")
    verdict_stream = sys.stderr if args.json else sys.stdout
    if args.json:
        print(_json(groups))
    else:
        for bundle, records in groups:
            print(f"{bundle.manifest.name} ({bundle.dir})")
            print(report_text(records))
    failing = [(b, r, o) for b, records in groups for r in records for o in r.outputs
               if not o.passed]
    for b, r, o in failing:
        point = ", ".join(f"{k}={v}" for k, v in r.point.items())
        print(f"{b.manifest.name}: {r.variant} on {r.provider} at {point}: {describe(o)}",
              file=verdict_stream)
    print("FAILED" if failing else "PASSED", file=verdict_stream)
    return EXIT_PARITY if failing else EXIT_OK


# ---------------------------------------------------------------------------------------------
# bench


def _bench_one(path: str, args) -> dict:
    from ._bench import bench_feed, bench_point, run_bench
    from ._bundle import load_bundle
    from ._runner import Runner

    start = time.perf_counter()
    bundle = load_bundle(path)
    load_s = time.perf_counter() - start
    point = bench_point(bundle, dict(args.shape))
    feed = bench_feed(bundle, point)
    with Runner(bundle, provider=args.provider, variant=args.variant,
                threads=args.threads) as runner:
        figures = run_bench(runner, feed, warmup=args.warmup, iters=args.iters)
        placement = runner.placement(feed)
        result = {"name": bundle.manifest.name, "variant": runner.variant.name,
                  "provider": runner.provider, "point": point, "ranked_by": runner.ranked_by,
                  "load_bundle_ms": load_s * 1e3,
                  "session_creation_ms": runner.session_seconds * 1e3,
                  "iters": args.iters, "warmup": args.warmup, **figures}
    result["nodes_by_provider"] = {p: list(placement.values()).count(p)
                                   for p in sorted(set(placement.values()))}
    return result


def _format_bench(r: dict) -> str:
    point = ", ".join(f"{k}={v}" for k, v in r["point"].items())
    nodes = ", ".join(f"{n} on {p}" for p, n in r["nodes_by_provider"].items())
    return "\n".join([
        f"{r['name']}: variant {r['variant']} on {r['provider']} at {point} (ranked by "
        f"{r['ranked_by']})",
        f"  load+check {r['load_bundle_ms']:.1f} ms, session creation "
        f"{r['session_creation_ms']:.1f} ms; nodes: {nodes}",
        f"  latency p50 {r['p50_ms']:.3f} ms, p90 {r['p90_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms"
        f" ({r['iters']} iters after {r['warmup']} warm-up); {r['throughput_per_s']:.0f} runs/s",
        f"  runner overhead {r['overhead_us']:.1f} us per call (median Runner.run "
        f"{r['runner_median_us']:.1f} us vs bare session.run {r['session_run_median_us']:.1f} us)",
    ])


def cmd_bench(args) -> int:
    """Time bundles: warm-up, p50/p90/p99 latency, throughput, session-creation time, and the
    runner's overhead over a bare onnxruntime session.run on the same inputs.

    Inputs are the golden inputs at golden case 0's sizes, or random ones at --shape sizes.
    """
    if args.iters < 1 or args.warmup < 0:
        raise InputError(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and "
                         f"{args.warmup}")
    results = [_bench_one(path, args) for path in args.bundles]
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        print("\n".join(_format_bench(r) for r in results))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# inspect


def cmd_inspect(args) -> int:
    """Show what bundles hold: opset, inputs/outputs with symbolic dims and ranges, op census
    and parameter count per variant, tolerances and parity records."""
    from ._bundle import load_bundle
    from ._inspect import format_inspect, inspect_bundle

    infos = [inspect_bundle(load_bundle(path)) for path in args.bundles]
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2, sort_keys=True))
    else:
        print("\n\n".join(format_inspect(info) for info in infos))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# tune


def cmd_tune(args) -> int:
    """Rank a bundle's variants by timing them on this machine (CPU), for the Runner to use.

    Times every exact variant that passed parity at --shape (default: golden case 0's sizes)
    and stores the ranking in the per-user tune cache (ATTNX_CACHE_DIR, else
    ~/.cache/attnx/tune), keyed by the bundle's hash and this CPU kind; never in the bundle.
    A Runner on this CPU then takes the fastest; on another CPU kind it is not used.

    Example: attnx tune artifacts/causal_self --shape batch=1 --shape seq=2048
    """
    from ._bench import bench_feed, bench_point
    from ._bundle import load_bundle
    from ._tune import check_iters

    check_iters(args.iters)
    results = []
    for path in args.bundles:
        bundle = load_bundle(path)
        point = bench_point(bundle, dict(args.shape))
        ranking, stored = _tune_one(bundle, bench_feed(bundle, point), point, args)
        results.append({"name": bundle.manifest.name, "shape": point,
                        "median_ms": dict(ranking.median_ms), "ranking": ranking.order,
                        "stored": str(stored)})
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
        return EXIT_OK
    for r in results:
        at = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
        times = ", ".join(f"{n} {r['median_ms'][n]:.3f} ms" for n in r["ranking"])
        print(f"{r['name']} at {at}: {times}; fastest {r['ranking'][0]}")
        print(f"  stored in {r['stored']}")
    return EXIT_OK


def _tune_one(bundle, feed, point, args):
    """Time each exact CPU variant that passed parity on ``feed`` and store the ranking at
    ``point`` in the tune cache; (ranking, the entry's path)."""
    from ._runner import Runner, candidate_variants
    from ._tune import Ranking, median_ms, store

    times = {}
    for variant in candidate_variants(bundle.manifest, "CPUExecutionProvider"):
        with Runner(bundle, provider="cpu", variant=variant.name, threads=args.threads,
                    note_cpu=False) as runner:
            times[variant.name] = median_ms(runner.session, runner.validate(feed), args.iters)
    ranking = Ranking(dict(point), times)
    return ranking, store(bundle, ranking)
