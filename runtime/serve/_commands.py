"""The `attnx triton` and `attnx serve` subcommands (registered by runtime._cli).

Heavy imports (ray, tritonclient's protobuf) happen inside the commands. User errors raise
AttnxError, which the one parser's main() prints as one line with exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime._errors import InputError
from runtime._session import PROVIDER_CHOICES

EXIT_OK, EXIT_INTERRUPTED = 0, 130


def add_commands(subparsers) -> None:
    for command, arguments in ((cmd_triton, _triton_args), (cmd_serve, _serve_args)):
        name = command.__name__.removeprefix("cmd_")
        doc = command.__doc__ or ""
        parser = subparsers.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        arguments(parser)
        parser.set_defaults(func=command)


def _sizes(text: str) -> list[int]:
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected sizes like 64,128,256, got {text!r}")
    return [int(p) for p in parts]


def _triton_args(parser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE")
    parser.add_argument(
        "--repo", required=True, metavar="DIR", help="the Triton model repository to write into"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        metavar="N",
        help="0 turns Triton batching off (default: the batch dim's max, or 0 "
        "when the batch dim is not at axis 0 everywhere)",
    )
    parser.add_argument(
        "--instances", type=int, default=1, metavar="N", help="model instances (default: 1)"
    )
    parser.add_argument(
        "--kind",
        choices=("cpu", "gpu"),
        default="cpu",
        help="instance kind, KIND_CPU or KIND_GPU (default: cpu)",
    )
    parser.add_argument(
        "--warmup",
        action="store_true",
        help="warm each instance up with the bundle's golden inputs",
    )
    parser.add_argument(
        "--seq-buckets",
        type=_sizes,
        default=[],
        metavar="N,N,...",
        help="padding buckets for the sequence dim: listed in the config and "
        "warmed up (zero data) one by one",
    )
    parser.add_argument(
        "--seq-dim", default="seq", metavar="DIM", help="the dim --seq-buckets pads (default: seq)"
    )
    parser.add_argument(
        "--batch-delay-us",
        type=int,
        default=100,
        metavar="US",
        help="dynamic batching max_queue_delay_microseconds (default: 100)",
    )
    parser.add_argument(
        "--variant",
        help="variant name (default: best that passed parity on the instance kind's provider)",
    )


def cmd_triton(args) -> int:
    """Write a Triton Inference Server model repository (onnxruntime backend) from bundles.

    DIR/<name>/config.pbtxt and DIR/<name>/1/model.onnx (external data beside it), dims from
    the manifest (-1 for dynamic dims, the batch axis dropped when max_batch_size > 0),
    dynamic batching, an instance group, optional warm-ups. Every config is parsed with
    tritonclient's model_config protobuf and checked against the manifest before it is
    renamed into place.

    Triton batches only requests whose non-batch dims are equal: pad the sequence dim to a
    few sizes (--seq-buckets) to batch requests of different lengths.

    Example: attnx triton artifacts/mha_self --repo models --warmup --seq-buckets 64,128,256
    """
    from ._triton import write_repository

    written = write_repository(
        args.bundles,
        args.repo,
        max_batch_size=args.max_batch_size,
        kind=args.kind,
        instances=args.instances,
        warmup=args.warmup,
        seq_buckets=args.seq_buckets,
        seq_dim=args.seq_dim,
        batch_delay_us=args.batch_delay_us,
        variant=args.variant,
    )
    varying = [f"{w.name} {'/'.join(w.model.varying)}" for w in written if w.model.varying]
    if varying:
        print(
            f"attnx: warning: Triton's dynamic batcher batches only requests with equal "
            f"non-batch shapes, and these dims vary per request: {', '.join(varying)}; pad "
            f"them to a few sizes (--seq-buckets, README 'Serving') to batch requests of "
            f"different lengths",
            file=sys.stderr,
        )
    for note in (n for w in written for n in w.model.notes):
        print(f"attnx: note: {note}", file=sys.stderr)
    for w in written:
        m = w.model
        warm = f", {len(m.warmups)} warm-ups" if m.warmups else ""
        print(
            f"{w.name}: {w.path} (variant {m.variant}, max_batch_size {m.max_batch_size}, "
            f"{m.instances} x {m.kind}{warm})"
        )
    print(
        f"wrote {len(written)} model(s) to {args.repo}; every config.pbtxt parsed with "
        f"tritonclient's model_config protobuf and checked against its manifest"
    )
    return EXIT_OK


def _serve_args(parser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE")
    parser.add_argument(
        "--replicas", type=int, default=1, metavar="N", help="replicas per model (default: 1)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        metavar="B",
        help="requests per batch; 1 turns batching off (default: 8)",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        metavar="MS",
        help="how long a batch waits to fill (default: 5)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="onnxruntime intra-op threads per replica (default: 1)",
    )
    parser.add_argument(
        "--replica-cpus",
        type=float,
        default=1.0,
        metavar="X",
        help="CPUs Ray reserves per model replica (default: 1)",
    )
    parser.add_argument(
        "--provider",
        choices=PROVIDER_CHOICES,
        default="auto",
        help="auto (CUDA if onnxruntime offers it), cpu or cuda",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only)",
    )
    parser.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        metavar="N",
        help="413 above this (default: the largest request the manifests admit, as JSON)",
    )
    parser.add_argument(
        "--config-out",
        metavar="FILE",
        help="write the `serve build`-style config (YAML for .yaml/.yml, else "
        "JSON) for `serve deploy FILE` on a Ray cluster, and exit",
    )


def cmd_serve(args) -> int:
    """Serve bundles over HTTP with Ray Serve, speaking the Open Inference Protocol (KServe v2).

    GET /v2/health/live, /v2/health/ready, /v2/models/<name>, /v2/models/<name>/ready;
    POST /v2/models/<name>/infer with JSON tensors {name, shape, datatype, data}. Requests of
    equal shapes are stacked into batches; every request passes the runtime's validator
    (400 naming the input); 404 for an unknown model, 413 above the body cap. Runs until
    Ctrl-C or SIGTERM, then stops Serve and Ray.

    Example: attnx serve artifacts/mha_self artifacts/sdpa --replicas 2 --port 8000
    """
    from . import AppConfig, serve_locally, write_cluster_config

    config = AppConfig.from_args(
        {
            "bundles": args.bundles,
            "replicas": args.replicas,
            "max_batch_size": args.max_batch_size,
            "batch_wait_ms": args.batch_wait_ms,
            "threads": args.threads,
            "provider": args.provider,
            "replica_cpus": args.replica_cpus,
            "max_body_bytes": args.max_body_bytes,
        }
    )
    if args.config_out:
        if not 0 < args.port < 65536:
            raise InputError(f"--port must be within 1..65535, got {args.port}")
        write_cluster_config(config, Path(args.config_out), host=args.host, port=args.port)
        print(
            f"wrote {args.config_out}: on a Ray cluster whose nodes see the bundle paths, run "
            f"`serve deploy {args.config_out}`"
        )
        return EXIT_OK
    from ._run import check_port, is_loopback

    check_port(args.host, args.port)  # before the warning: a host that fails is one line
    if not is_loopback(args.host):
        print(
            f"attnx: warning: listening on {args.host}: reachable from other machines, "
            f"without authentication",
            file=sys.stderr,
        )
    try:
        serve_locally(
            config,
            host=args.host,
            port=args.port,
            handle_signals=True,
            on_ready=lambda url: print(
                f"serving {', '.join(config.names)} at {url}/v2 ({args.replicas} "
                f"replica(s) each); Ctrl-C or SIGTERM stops",
                flush=True,
            ),
        )
    except KeyboardInterrupt:  # Ctrl-C while starting; Serve and Ray are already stopped
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print("stopped", flush=True)
    return EXIT_OK
