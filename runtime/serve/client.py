"""A small Open Inference Protocol (KServe v2) client over HTTP/JSON: stdlib + numpy.

Talks to `attnx serve`, to Triton Inference Server, and to any other server of the protocol.

    from runtime.serve.client import Client
    client = Client("http://127.0.0.1:8000")
    client.wait_ready(timeout_s=60)
    outputs = client.infer("mha_self", {"x": x, "key_padding_mask": mask})   # {"y": array}

Arrays go out as JSON lists of their exact values (a float32 is written as the shortest decimal
that reads back to the same float32), so outputs arrive bit for bit. A failed request raises
ServerError with the HTTP status and the server's message; `retryable` is True for 502/503/504
(a replica died or is overloaded: the request was not answered) and for connection failures.
`infer(..., retries=N)` sends such a request again up to N times.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence

import numpy as np

from runtime._errors import AttnxError

from ._protocol import NUMPY_DTYPES, OIP_DATATYPES, encode_tensor

RETRYABLE_STATUS = (502, 503, 504)
MESSAGE_CHARS = 500


class ServerError(AttnxError):
    """The server refused or failed a request (status None: no HTTP answer at all)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class Client:
    """One server at `url` (scheme, host and port; the /v2 paths are added)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    # -- health and metadata -------------------------------------------------------------------

    def live(self) -> bool:
        return self._ok("/v2/health/live")

    def ready(self) -> bool:
        return self._ok("/v2/health/ready")

    def model_ready(self, name: str) -> bool:
        return self._ok(f"/v2/models/{_quote(name)}/ready")

    def wait_ready(self, timeout_s: float = 60.0, *, interval_s: float = 0.25) -> bool:
        """Poll /v2/health/ready until it answers 200 or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.ready():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval_s)

    def server_metadata(self) -> dict:
        return self._json("GET", "/v2")

    def metadata(self, name: str) -> dict:
        return self._json("GET", f"/v2/models/{_quote(name)}")

    # -- inference -----------------------------------------------------------------------------

    def infer(
        self,
        name: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        request_id: str | None = None,
        retries: int = 0,
        retry_wait_s: float = 0.2,
    ) -> dict[str, np.ndarray]:
        """Run model `name` on numpy `inputs`; returns {output name: array}."""
        body = self.infer_body(inputs, outputs=outputs, request_id=request_id)
        path = f"/v2/models/{_quote(name)}/infer"
        for attempt in range(retries + 1):
            try:
                doc = self._json("POST", path, body)
                break
            except ServerError as e:
                if not e.retryable or attempt == retries:
                    raise
                time.sleep(retry_wait_s * (attempt + 1))
        return decode_outputs(doc)

    @staticmethod
    def infer_body(
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        request_id: str | None = None,
    ) -> bytes:
        tensors = []
        for tensor_name, value in inputs.items():
            arr = np.asarray(value)
            if arr.dtype.name not in OIP_DATATYPES:
                raise ServerError(
                    f"input {tensor_name!r}: dtype {arr.dtype} has no Open "
                    f"Inference Protocol datatype"
                )
            tensors.append(encode_tensor(tensor_name, arr))
        doc: dict = {"inputs": tensors}
        if outputs is not None:
            doc["outputs"] = [{"name": n} for n in outputs]
        if request_id is not None:
            doc["id"] = request_id
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()

    # -- HTTP ----------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """(status, body) of one HTTP exchange; connection failures raise ServerError."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(
                f"{method} {self.url}{path}: no answer ({reason})", retryable=True
            ) from None

    def _ok(self, path: str) -> bool:
        try:
            status, _ = self.request("GET", path)
        except ServerError:
            return False
        return status == 200

    def _json(self, method: str, path: str, body: bytes | None = None) -> dict:
        status, data = self.request(method, path, body)
        if status != 200:
            raise ServerError(
                f"{method} {path}: HTTP {status}: {_message(data)}",
                status=status,
                retryable=status in RETRYABLE_STATUS,
            )
        try:
            return json.loads(data)
        except ValueError:
            raise ServerError(
                f"{method} {path}: the answer is not JSON: {data[:MESSAGE_CHARS]!r}", status=status
            ) from None


def decode_outputs(doc: Mapping) -> dict[str, np.ndarray]:
    """{name: array} from an inference response's `outputs`."""
    result = {}
    for tensor in doc.get("outputs", []):
        dtype = NUMPY_DTYPES.get(tensor.get("datatype"))
        if dtype is None:
            raise ServerError(
                f"output {tensor.get('name')!r}: unsupported datatype {tensor.get('datatype')!r}"
            )
        result[tensor["name"]] = np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])
    return result


def _message(data: bytes) -> str:
    try:
        doc = json.loads(data)
    except ValueError:
        return data[:MESSAGE_CHARS].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return doc["error"]
    return json.dumps(doc)[:MESSAGE_CHARS]


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


__all__ = ["Client", "ServerError", "decode_outputs"]
