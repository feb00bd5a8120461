"""What one served application is: checked arguments, the bundles behind them, and the
`serve build`-style config file that runs the same application on a Ray cluster.

The arguments are a plain JSON-able dict (the `args` of the config file's application); the
application builder `runtime.serve:app_builder` turns them into the Ray Serve application,
on this machine (`attnx serve`) and on a cluster (`serve deploy config.yaml`) alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from runtime._bundle import load_bundle
from runtime._errors import InputError
from runtime._manifest import Manifest
from runtime._session import PROVIDER_CHOICES

from ._protocol import default_max_body_bytes

APP_NAME = "attnx"
INGRESS = "OIPIngress"
IMPORT_PATH = "runtime.serve:app_builder"
DEFAULTS = {"replicas": 1, "max_batch_size": 8, "batch_wait_ms": 5.0, "threads": 1,
            "provider": "auto", "replica_cpus": 1.0, "max_body_bytes": None}
KNOWN_ARGS = ("bundles", *DEFAULTS)
# Queue depth per model replica: enough waiting requests to fill the next batches.
ONGOING_PER_BATCH = 4
MIN_ONGOING = 16


@dataclass(frozen=True)
class ServedModel:
    name: str
    bundle: str
    deployment: str
    manifest: Manifest
    weights: tuple[str, ...]  # initializer names of every variant (refused as inputs)

    @property
    def manifest_json(self) -> str:
        return self.manifest.to_json()


@dataclass(frozen=True)
class AppConfig:
    bundles: tuple[str, ...]
    replicas: int
    max_batch_size: int
    batch_wait_ms: float
    threads: int
    provider: str
    replica_cpus: float
    max_body_bytes: int
    models: tuple[ServedModel, ...]

    @property
    def max_ongoing_requests(self) -> int:
        return max(MIN_ONGOING, ONGOING_PER_BATCH * self.max_batch_size)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    @classmethod
    def from_args(cls, args: Mapping) -> AppConfig:
        """Check the arguments and every bundle (load_bundle: hashes, containment, golden)."""
        if not isinstance(args, Mapping):
            raise InputError(f"serve arguments must be a mapping, got {type(args).__name__}")
        unknown = sorted(set(args) - set(KNOWN_ARGS))
        if unknown:
            raise InputError(f"unknown serve argument {unknown[0]!r}; known: "
                             f"{', '.join(KNOWN_ARGS)}")
        a = {**DEFAULTS, **args}
        bundles = a.get("bundles")
        if (not isinstance(bundles, list | tuple) or not bundles
                or not all(isinstance(b, str) for b in bundles)):
            raise InputError("serve needs 'bundles': a non-empty list of bundle folders")
        replicas = _int(a, "replicas", 1)
        max_batch_size = _int(a, "max_batch_size", 1)
        threads = _int(a, "threads", 1)
        batch_wait_ms = _number(a, "batch_wait_ms")
        replica_cpus = _number(a, "replica_cpus")
        if a["provider"] not in PROVIDER_CHOICES:
            raise InputError(f"provider must be one of {', '.join(PROVIDER_CHOICES)}, got "
                             f"{a['provider']!r}")
        models = tuple(_served(b) for b in bundles)
        names = [m.name for m in models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InputError(f"two bundles are both named {twice[0]!r}; a server serves each "
                             f"model name once")
        body = a["max_body_bytes"]
        if body is None:
            body = default_max_body_bytes([m.manifest for m in models])
        else:
            body = _int(a, "max_body_bytes", 1)
        return cls(tuple(m.bundle for m in models), replicas, max_batch_size, batch_wait_ms,
                   threads, a["provider"], replica_cpus, body, models)

    def to_args(self) -> dict:
        return {"bundles": list(self.bundles), "replicas": self.replicas,
                "max_batch_size": self.max_batch_size, "batch_wait_ms": self.batch_wait_ms,
                "threads": self.threads, "provider": self.provider,
                "replica_cpus": self.replica_cpus, "max_body_bytes": self.max_body_bytes}


def _served(path: str) -> ServedModel:
    bundle = load_bundle(path)
    weights = sorted(set().union(*bundle.weights.values()))
    name = bundle.manifest.name
    return ServedModel(name, str(Path(path).resolve()), f"model_{name}",
                       bundle.manifest, tuple(weights))


def _int(a: Mapping, key: str, minimum: int) -> int:
    value = a[key]
    if type(value) is not int or value < minimum:
        raise InputError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(a: Mapping, key: str) -> float:
    value = a[key]
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise InputError(f"{key} must be a finite number >= 0, got {value!r}")
    return float(value)


def attnx_version() -> str:
    try:
        return metadata.version("attnx")
    except metadata.PackageNotFoundError:
        return "unknown"


def cluster_config(config: AppConfig, *, host: str, port: int) -> dict:
    """The `serve build`-style config: `serve deploy FILE` on a running Ray cluster (VMs, or a
    KubeRay RayService's serveConfigV2) runs the same application. Bundle paths are absolute
    and must exist on every node (a shared volume or the image)."""
    deployments = [{"name": INGRESS, "num_replicas": config.replicas}]
    deployments += [{"name": m.deployment, "num_replicas": config.replicas,
                     "max_ongoing_requests": config.max_ongoing_requests,
                     "ray_actor_options": {"num_cpus": config.replica_cpus}}
                    for m in config.models]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": config.to_args(),
            "deployments": deployments,
        }],
    }


def write_cluster_config(config: AppConfig, path: Path, *, host: str, port: int) -> None:
    """YAML for .yaml/.yml (what `serve build` writes), JSON otherwise."""
    doc = cluster_config(config, host=host, port=port)
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError("writing YAML needs PyYAML (it comes with the [serve] extra); "
                             "or write JSON: --config-out serve.json") from None
        text = yaml.safe_dump(doc, sort_keys=False)
    else:
        text = json.dumps(doc, indent=2) + "\n"
    path.write_text(text, encoding="utf-8")
