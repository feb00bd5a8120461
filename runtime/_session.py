"""onnxruntime sessions: explicit options, explicit providers, no silent fallback.

onnxruntime is imported inside the functions so that reading and checking a bundle works
without it (the base install is numpy + onnx).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ._denormals import SESSION_OPTION, FlushedSession, flushed
from ._errors import ArtifactError, ProviderError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
# Fatal only: onnxruntime's warnings ("falling back to CPU") and its red error lines on stderr
# duplicate what reaches us as an exception anyway, which we re-raise as a typed error.
ORT_LOG_FATAL_ONLY = 4
_ORT_ERROR_NAMES = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError",
                    "RuntimeException", "InvalidProtobuf", "ModelLoaded", "NotImplemented",
                    "InvalidGraph", "EPFail", "NotFound", "ModelRequiresCompilation")


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types onnxruntime raises for bad models or feeds (none subclass each
    other usefully, so they are listed; RuntimeError/ValueError come from its Python layer)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = tuple(getattr(state, n) for n in _ORT_ERROR_NAMES if hasattr(state, n))
    return found + (RuntimeError, ValueError)


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def resolve_provider(choice: str) -> str:
    """'auto' -> CUDA when onnxruntime offers it, else CPU; 'cpu'; 'cuda' (or an error that
    lists what is available: onnxruntime itself would quietly run on CPU)."""
    available = available_providers()
    if choice == "auto":
        return CUDA if CUDA in available else CPU
    if choice == "cpu":
        return CPU
    if choice == "cuda":
        if CUDA not in available:
            raise ProviderError(f"provider 'cuda' requested but onnxruntime offers only "
                                f"{', '.join(available)} (install onnxruntime-gpu, not "
                                f"onnxruntime, for CUDA)")
        return CUDA
    raise ProviderError(f"unknown provider {choice!r}; choose one of "
                        f"{', '.join(PROVIDER_CHOICES)}")


def default_threads() -> int:
    # The CPUs this process may run on, not the machine's count (containers, taskset).
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def session_options(bundle_dir: Path, *, threads: int | None = None, profile_dir=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # One intra-op pool sized to the usable cores: attention is a few large GEMMs, and
    # onnxruntime's default (all physical cores) oversubscribes a CPU-limited container.
    so.intra_op_num_threads = threads or default_threads()
    # The graphs are chains; parallel branches are rare, so a second pool only adds threads.
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Constant folding and fusions are what parity was measured with on the exporting side.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Memory patterns are planned per distinct input shape and kept; with dynamic batch and
    # sequence every new shape re-plans and grows the cache, so plan nothing up front.
    so.enable_mem_pattern = False
    so.log_severity_level = ORT_LOG_FATAL_ONLY
    # Masked attention scores become denormals in onnxruntime's kernels (runtime/_denormals.py);
    # its worker threads flush them with this, the calling thread through new_session.
    so.add_session_config_entry(SESSION_OPTION, "1")
    # External data is handed over from memory (see create_session); should onnxruntime look
    # at the disk anyway, it must look in the bundle, never in the process CWD.
    so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                str(bundle_dir))
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(profile_dir) / "attnx")
    return so


# onnxruntime's CUDA provider multiplies float32 in TF32 (a 10-bit mantissa) by default on
# Ampere and later, while torch keeps float32 matmuls in float32: on an H100 that alone put the
# fp32 variants 4e-4 from torch's goldens, 40x their tolerance. Float32 stays float32; fp16 is
# the variant for speed over precision.
CUDA_OPTIONS = {"use_tf32": "0"}


def execution_providers(provider: str) -> list:
    """The provider list for a session on `provider`; on CUDA, CPU stays as the fallback for
    the nodes CUDA has no kernel for (shape arithmetic, mostly)."""
    return [(CUDA, dict(CUDA_OPTIONS)), CPU] if provider == CUDA else [CPU]


# onnxruntime's SkipLayerNormalization CPU kernel takes 4.5x the time of the Add and
# LayerNormalization it fuses (1.24 against 0.28 ms at [8, 128, 512], Xeon, AVX-512), so the
# load-time fusion stays off; export/rewrites/layer_norms.py undoes onnxscript's.
DISABLED_FUSIONS = ("SkipLayerNormFusion",)


def new_session(model, options, providers) -> FlushedSession:
    """An InferenceSession of ``model`` (bytes or a path) on ``options`` without
    DISABLED_FUSIONS, whose runs flush denormals on the caller's thread (FlushedSession; the
    options flush them on the worker threads). It is created inside ``flushed()`` too, so that
    the once-per-process flag onnxruntime sets on the creating thread is undone."""
    import onnxruntime as ort

    with flushed():
        session = ort.InferenceSession(model, options, providers=providers,
                                       disabled_optimizers=list(DISABLED_FUSIONS))
    return FlushedSession(session)


def create_session(model: bytes, *, bundle_dir: Path, data_files: Mapping[str, bytes],
                   provider: str, label: str, threads: int | None = None, profile_dir=None):
    """A session from verified bytes. `data_files` maps each external-data location to its
    verified bytes, given to onnxruntime from memory so that the files are not read again
    after they were hashed (no check-then-load race)."""
    so = session_options(bundle_dir, threads=threads, profile_dir=profile_dir)
    if data_files:
        names = list(data_files)
        buffers = [data_files[n] for n in names]
        so.add_external_initializers_from_files_in_memory(names, buffers,
                                                           [len(b) for b in buffers])
    try:
        session = new_session(model, so, execution_providers(provider))
    except ort_errors() as e:
        raise ArtifactError(f"{label}: onnxruntime cannot load it: {e}") from None
    if session.get_providers()[0] != provider:
        raise ProviderError(f"asked for {provider} but onnxruntime created the session with "
                            f"{', '.join(session.get_providers())}")
    return session


def read_placement(profile_path: str) -> dict[str, str]:
    """Node name -> provider, from an onnxruntime profile (the one place it reports where each
    node ran)."""
    with open(profile_path) as f:
        events = json.load(f)
    placement = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args:
            name = event["name"].removesuffix("_kernel_time")
            placement[name] = args["provider"]
    return placement


def node_placement(model: bytes, feed, *, bundle_dir: Path, data_files: Mapping[str, bytes],
                   provider: str, label: str) -> dict[str, str]:
    """Run `feed` once in a profiling session and report which provider ran each node."""
    with tempfile.TemporaryDirectory(prefix="attnx-profile-") as tmp:
        session = create_session(model, bundle_dir=bundle_dir, data_files=data_files,
                                 provider=provider, label=label, threads=1, profile_dir=tmp)
        session.run(None, feed)
        return read_placement(session.end_profiling())
