"""The Ray Serve application: one OIP ingress and one deployment per bundle.

    HTTP proxy -> OIPIngress (routing, body cap, JSON decode + validation, JSON encode)
               -> model_<name> replicas (Runner, @serve.batch stacking, see _batch)

The ingress answers every error itself as JSON {"error": ...}: a model replica that dies
while holding a request becomes a 503 with `"retryable": true` and a Retry-After header (the
request was not answered; inference has no side effects, so sending it again is safe), and an
unexpected exception becomes a 500 whose details stay in the server log. No response carries a
traceback or a file path.

Imported only where Ray runs: the `runtime.serve` package imports this module inside
`app_builder`, so `import runtime` never imports ray.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from starlette.requests import Request
from starlette.responses import Response

from runtime._manifest import Manifest
from runtime._runner import Runner

from ._batch import run_batch
from ._config import attnx_version
from ._protocol import (
    Failure,
    RequestError,
    batch_dim,
    decode_infer_request,
    encode_infer_response,
    error_body,
    model_metadata,
    route,
    server_metadata,
)

logger = logging.getLogger("attnx.serve")

RETRYABLE = (RayActorError, BackPressureError, DeploymentUnavailableError,
             ReplicaUnavailableError)
READY_TIMEOUT_S = 5.0
JSON = "application/json"


@serve.deployment(graceful_shutdown_timeout_s=2, graceful_shutdown_wait_loop_s=0.5)
class ModelServer:
    """One bundle on one Runner; requests arrive one by one and run in stacked batches."""

    def __init__(self, bundle: str, *, provider: str, threads: int, max_batch_size: int,
                 batch_wait_s: float):
        self.runner = Runner(bundle, provider=provider, threads=threads, reject_nonfinite=True)
        manifest = self.runner.manifest
        self.batch_dim, _ = batch_dim(manifest)
        self.max_rows = manifest.dims[self.batch_dim].max if self.batch_dim else 1
        self.infer.set_max_batch_size(max_batch_size)
        self.infer.set_batch_wait_timeout_s(batch_wait_s)

    def info(self) -> dict:
        return {"variant": self.runner.variant.name, "provider": self.runner.provider}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def infer(self, feeds: list[Mapping]) -> list:
        # In a thread: the replica keeps accepting requests (the next batch) while this runs.
        return await asyncio.to_thread(run_batch, self.runner, feeds,
                                       batch_dim=self.batch_dim, max_rows=self.max_rows)


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0},
                  graceful_shutdown_timeout_s=2, graceful_shutdown_wait_loop_s=0.5)
class OIPIngress:
    """Open Inference Protocol over HTTP for every served model."""

    def __init__(self, models: Mapping[str, Mapping], handles: Mapping, *, max_body_bytes: int,
                 version: str):
        self.manifests = {name: Manifest.loads(m["manifest"]) for name, m in models.items()}
        self.weights = {name: frozenset(m["weights"]) for name, m in models.items()}
        self.max_batch_size = {name: m["max_batch_size"] for name, m in models.items()}
        self.handles = dict(handles)
        self.names = list(self.manifests)
        self.max_body_bytes = max_body_bytes
        self.version = version

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._answer(request)
        except RequestError as e:
            return _error(e.status, e.message)
        except RETRYABLE as e:
            logger.warning("retryable failure: %s: %s", type(e).__name__, e)
            return _error(503, "the model replica serving this request stopped or is "
                               "unavailable; the request was not answered, send it again",
                          retryable=True)
        except Exception:
            logger.exception("unexpected error answering %s %s", request.method,
                             request.url.path)
            return _error(500, "internal server error (details in the server log)")

    async def _answer(self, request: Request) -> Response:
        where = route(request.method, request.url.path, self.names)
        if where.kind == "live":
            return Response(status_code=200)
        if where.kind == "ready":
            ready = await asyncio.gather(*(self._ready(n) for n in self.names))
            return Response(status_code=200 if all(ready) else 503)
        if where.kind == "server":
            return _json(server_metadata(self.version))
        name = where.model
        if where.kind == "model_ready":
            return Response(status_code=200 if await self._ready(name) else 503)
        if where.kind == "model":
            info = await self.handles[name].info.remote()
            return _json(model_metadata(self.manifests[name], variant=info["variant"],
                                        max_batch_size=self.max_batch_size[name]))
        body = await self._body(request)
        req = decode_infer_request(body, self.manifests[name], weights=self.weights[name])
        result = await self.handles[name].infer.remote(req.feed)
        if isinstance(result, Failure):
            return _error(result.status, result.message)
        return Response(encode_infer_response(name, result, requested=req.outputs,
                                              request_id=req.id), media_type=JSON)

    async def _ready(self, name: str) -> bool:
        try:
            await asyncio.wait_for(self.handles[name].info.remote(), READY_TIMEOUT_S)
        except (asyncio.TimeoutError, *RETRYABLE):
            return False
        return True

    async def _body(self, request: Request) -> bytes:
        cap = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise RequestError(413, f"request body is {int(declared)} bytes, above the limit "
                                    f"of {cap} bytes")
        if "inference-header-content-length" in request.headers:
            raise RequestError(400, "binary tensor data is not supported; send JSON tensors")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise RequestError(413, f"request body is above the limit of {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def _json(doc: dict) -> Response:
    return Response(json.dumps(doc), media_type=JSON)


def _error(status: int, message: str, *, retryable: bool = False) -> Response:
    headers = {"Retry-After": "1"} if retryable else None
    return Response(error_body(message, retryable=retryable), status_code=status,
                    media_type=JSON, headers=headers)


def build_app(config) -> serve.Application:
    """The application for a checked AppConfig (see runtime.serve._config)."""
    models, handles = {}, {}
    for model in config.models:
        deployment = ModelServer.options(
            name=model.deployment, num_replicas=config.replicas,
            max_ongoing_requests=config.max_ongoing_requests,
            ray_actor_options={"num_cpus": config.replica_cpus})
        handles[model.name] = deployment.bind(
            model.bundle, provider=config.provider, threads=config.threads,
            max_batch_size=config.max_batch_size, batch_wait_s=config.batch_wait_ms / 1e3)
        models[model.name] = {"manifest": model.manifest_json, "weights": model.weights,
                              "max_batch_size": config.max_batch_size}
    # The ingress does the JSON work (more CPU per request than the models): scale it alike.
    ingress = OIPIngress.options(num_replicas=config.replicas)
    return ingress.bind(models, handles, max_body_bytes=config.max_body_bytes,
                        version=attnx_version())
