"""Serving bundles beyond one process: Ray Serve speaking the Open Inference Protocol.

Public names (ray is imported only inside `app_builder` and `serve_locally`, so importing this
package, like importing `runtime`, stays light):

    app_builder(args: dict) -> ray.serve.Application
        The application builder that `serve deploy` (and `attnx serve`) run: args are
        {"bundles": [...], "replicas", "max_batch_size", "batch_wait_ms", "threads",
         "provider", "replica_cpus", "max_body_bytes"} (see AppConfig).
    AppConfig.from_args(args) -> AppConfig       checks args and loads every bundle
    cluster_config(config, host=, port=) -> dict  the `serve build`-style config
    serve_locally(config, host=, port=, on_ready=, stop=, handle_signals=False)
        Ray and Serve on this machine until `stop` is set (or SIGINT/SIGTERM)

Endpoints (KServe v2): GET /v2, /v2/health/live, /v2/health/ready, /v2/models/<m>,
/v2/models/<m>/ready; POST /v2/models/<m>/infer (also under /v2/models/<m>/versions/1/).
The client is `runtime.serve.client`.
"""

from __future__ import annotations

from ._config import AppConfig, cluster_config, write_cluster_config
from ._run import serve_locally


def app_builder(args: dict):
    """Ray Serve application builder (`import_path: runtime.serve:app_builder`)."""
    from ._app import build_app

    return build_app(AppConfig.from_args(args))


__all__ = ["AppConfig", "app_builder", "cluster_config", "serve_locally", "write_cluster_config"]
