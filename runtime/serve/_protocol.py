"""Open Inference Protocol (KServe v2) over JSON: routing, request decoding, response encoding.

Ray-free and torch-free: the Ray Serve deployments (`_app`) are thin adapters around these
functions, and the client (`runtime.serve.client`) shares the datatype table.

A request is checked before any tensor is built: the JSON is strict (no NaN/Infinity
literals), every tensor's name, datatype and declared shape are checked against the manifest
(so a huge declared shape is refused before anything is allocated), the values must be of the
datatype's kind (no true/false in a float tensor, no floats in an integer tensor), and then the
runtime's one validator (`validate_feed`) runs on the arrays, refusing NaN/Inf. Every problem
of one request is reported together, naming the input. No message carries a file path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from runtime._errors import AttnxError, InputError
from runtime._manifest import Manifest, TensorSpec
from runtime._validate import shape_problems, validate_feed

# numpy dtype name <-> Open Inference Protocol datatype (Triton's config adds a TYPE_ prefix).
OIP_DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
NUMPY_DTYPES = {v: k for k, v in OIP_DATATYPES.items()}
SERVER_NAME = "attnx"
MODEL_VERSION = "1"
PLATFORM = "onnxruntime_onnx"
MAX_RANK = 32
# JSON text per element, generously: "-0.0012345678901234567," is 24 characters.
JSON_BYTES_PER_ELEMENT = 32
MIN_BODY_BYTES = 1024 * 1024


class RequestError(AttnxError):
    """A request the server answers with an error status: 400, 404, 405, 413 or 500/503."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self):  # keep (status, message) across Ray's pickling
        return (RequestError, (self.status, self.message))


@dataclass(frozen=True)
class Failure:
    """One request of a batch that failed; travels from a model replica back to the ingress."""

    status: int
    message: str


@dataclass(frozen=True)
class Route:
    """What a request asks for. kind: server | live | ready | model | model_ready | infer."""

    kind: str
    model: str | None = None


@dataclass(frozen=True)
class InferRequest:
    feed: dict[str, np.ndarray]
    outputs: tuple[str, ...] | None  # the requested outputs, or None for all
    id: str | None


# ---------------------------------------------------------------------------------------------
# Routing

_GET_ROUTES = {("v2",): "server", ("v2", "health", "live"): "live",
               ("v2", "health", "ready"): "ready"}


def route(method: str, path: str, served: Sequence[str]) -> Route:
    """Map an HTTP method and path to a Route; unknown paths and models are 404s, a wrong
    method 405. `/v2/models/<m>/versions/1/...` is the same as `/v2/models/<m>/...`."""
    parts = tuple(p for p in path.split("/") if p)
    if parts in _GET_ROUTES:
        _method(method, "GET", path)
        return Route(_GET_ROUTES[parts])
    if len(parts) < 3 or parts[:2] != ("v2", "models"):
        raise RequestError(404, f"no such endpoint: {_show(path)}; endpoints: /v2, "
                                f"/v2/health/live, /v2/health/ready, /v2/models/<name>, "
                                f"/v2/models/<name>/ready, /v2/models/<name>/infer")
    model, rest = parts[2], parts[3:]
    if model not in served:
        raise RequestError(404, f"unknown model {_show(model)}; served models: "
                                f"{', '.join(served)}")
    if rest[:1] == ("versions",):
        version = rest[1] if len(rest) > 1 else ""
        if version != MODEL_VERSION:
            raise RequestError(404, f"model {model!r} has no version {_show(version)}; "
                                    f"served version: {MODEL_VERSION}")
        rest = rest[2:]
    if rest == ():
        _method(method, "GET", path)
        return Route("model", model)
    if rest == ("ready",):
        _method(method, "GET", path)
        return Route("model_ready", model)
    if rest == ("infer",):
        _method(method, "POST", path)
        return Route("infer", model)
    raise RequestError(404, f"no such endpoint: {_show(path)}")


def _method(got: str, want: str, path: str) -> None:
    if got != want:
        raise RequestError(405, f"{_show(path)} takes {want}, not {_show(got)}")


def _show(text: str, limit: int = 80) -> str:
    """Quote user text for an error message, cut to `limit` characters."""
    text = str(text)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


# ---------------------------------------------------------------------------------------------
# Metadata


def oip_shape(spec: TensorSpec) -> list[int]:
    """The tensor shape as the protocol writes it: -1 for every dim that is not a fixed size."""
    return [d if isinstance(d, int) else -1 for d in spec.shape]


def server_metadata(version: str) -> dict:
    return {"name": SERVER_NAME, "version": version, "extensions": []}


def model_metadata(manifest: Manifest, *, variant: str, max_batch_size: int) -> dict:
    """The protocol's model metadata, plus an `attnx` object with the symbolic shapes, the
    dim ranges and how the server batches."""
    def tensor(spec: TensorSpec) -> dict:
        return {"name": spec.name, "datatype": OIP_DATATYPES[spec.dtype],
                "shape": oip_shape(spec)}

    return {
        "name": manifest.name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [tensor(s) for s in manifest.inputs],
        "outputs": [tensor(s) for s in manifest.outputs],
        "attnx": {
            "variant": variant,
            "opset": manifest.opset,
            "shapes": {s.name: list(s.shape) for s in manifest.inputs + manifest.outputs},
            "dims": {k: [r.min, r.max] for k, r in manifest.dims.items()},
            "batch_dim": batch_dim(manifest)[0],
            "max_batch_size": max_batch_size,
        },
    }


def batch_dim(manifest: Manifest) -> tuple[str | None, str]:
    """The symbolic dim at axis 0 of every input and output, along which requests can be
    stacked into one batch, and "" -- or None and the reason there is none."""
    specs = list(manifest.inputs) + list(manifest.outputs)
    first = specs[0].shape[0] if specs[0].shape else None
    if not isinstance(first, str) or first not in manifest.dims:
        return None, f"{specs[0].name!r} has no symbolic dim at axis 0"
    for spec in specs[1:]:
        if not spec.shape or spec.shape[0] != first:
            where = list(spec.shape).index(first) if first in spec.shape else None
            at = f"at axis {where}" if where is not None else "nowhere"
            return None, f"{spec.name!r} has {first!r} {at}, not at axis 0"
    return first, ""


def default_max_body_bytes(manifests: Sequence[Manifest]) -> int:
    """A body cap that admits the largest request any served model accepts (every dynamic dim
    at its max) in JSON, and not much more."""
    most = 0
    for m in manifests:
        elements = sum(math.prod(d if isinstance(d, int) else m.dims[d].max for d in s.shape)
                       for s in m.inputs)
        most = max(most, elements)
    return max(MIN_BODY_BYTES, most * JSON_BYTES_PER_ELEMENT + 64 * 1024)


# ---------------------------------------------------------------------------------------------
# Requests


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def parse_json(body: bytes) -> object:
    try:
        text = body.decode("utf-8")  # json.loads(bytes) would guess UTF-16/32 from the bytes
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8 JSON") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"request body is not valid JSON ({e.msg} at line {e.lineno} "
                                f"column {e.colno})") from None
    except ValueError as e:
        raise RequestError(400, f"request body is not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError(400, "request body is not valid JSON (nested too deeply)") from None


def decode_infer_request(body: bytes, manifest: Manifest, *, weights: frozenset[str] = frozenset(),
                         reject_nonfinite: bool = True) -> InferRequest:
    """Check and decode an inference request body into a feed for `manifest`; raises
    RequestError(400) listing every problem."""
    doc = parse_json(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise RequestError(400, "request body must be a JSON object with a non-empty 'inputs' "
                                "list of tensors {name, shape, datatype, data}")
    specs = {s.name: s for s in manifest.inputs}
    known = ", ".join(specs)
    problems: list[str] = []
    feed: dict[str, np.ndarray] = {}
    sizes: dict = {}
    for i, tensor in enumerate(doc["inputs"]):
        name = tensor.get("name") if isinstance(tensor, dict) else None
        if not isinstance(name, str):
            problems.append(f"inputs[{i}]: expected an object with a string 'name'")
            continue
        spec = specs.get(name)
        if spec is None:
            what = "a weight (initializer) of the model, not an input" if name in weights \
                else "not an input of the model"
            problems.append(f"Input {_show(name)}: {what}; expected inputs: {known}")
            continue
        if name in feed:
            problems.append(f"Input {name!r}: given twice")
            continue
        arr = _decode_tensor(tensor, spec, manifest, sizes, problems)
        if arr is not None:
            feed[name] = arr
    problems += [f"missing input {name!r}; expected inputs: {known}" for name in specs
                 if name not in feed and not any(p.startswith(f"Input {name!r}")
                                                 for p in problems)]
    if problems:
        raise RequestError(400, "; ".join(problems))
    try:
        feed = validate_feed(manifest, feed, reject_nonfinite=reject_nonfinite, weights=weights)
    except InputError as e:
        raise RequestError(400, str(e)) from None
    return InferRequest(feed, _requested_outputs(doc.get("outputs"), manifest),
                        _request_id(doc.get("id")))


def _decode_tensor(tensor: dict, spec: TensorSpec, manifest: Manifest, sizes: dict,
                   problems: list[str]) -> np.ndarray | None:
    label = f"Input {spec.name!r}"
    want = OIP_DATATYPES[spec.dtype]
    params = tensor.get("parameters")
    if isinstance(params, dict) and "binary_data_size" in params:
        problems.append(f"{label}: binary tensor data is not supported; send the values in "
                        f"'data' as JSON")
        return None
    datatype, shape, data = tensor.get("datatype"), tensor.get("shape"), tensor.get("data")
    if datatype != want:
        problems.append(f"{label}: expected datatype {want}, got {_show(datatype)}")
        return None
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(type(d) is int and d >= 0 for d in shape)):
        problems.append(f"{label}: 'shape' must be a list of non-negative integers, got "
                        f"{_show(json.dumps(shape))}")
        return None
    before = len(problems)
    # Declared shape first: a huge declared shape is refused here, before any allocation.
    problems += shape_problems(label, spec, tuple(shape), manifest.dims, sizes)
    if len(problems) > before:
        return None
    if not isinstance(data, list):
        problems.append(f"{label}: 'data' must be a list of values in row-major order")
        return None
    return _to_array(label, data, shape, spec.dtype, want, problems)


def _to_array(label: str, data: list, shape: list[int], dtype: str, datatype: str,
              problems: list[str]) -> np.ndarray | None:
    count = math.prod(shape)
    flat = not data or not isinstance(data[0], list)
    if flat and len(data) != count:
        problems.append(f"{label}: shape {shape} holds {count} values, 'data' has {len(data)}")
        return None
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    try:
        arr = np.asarray(data)
    except ValueError:
        problems.append(f"{label}: 'data' is a ragged nested list")
        return None
    if arr.size != count or (arr.ndim > 1 and list(arr.shape) != shape):
        problems.append(f"{label}: nested 'data' has shape {list(arr.shape)}, 'shape' says "
                        f"{shape}")
        return None
    kind = np.dtype(dtype).kind
    if kind == "b":
        if arr.dtype != np.bool_:
            problems.append(f"{label}: datatype {datatype} needs true/false values")
            return None
        return arr.reshape(shape)
    if arr.dtype.kind not in ("iu" if kind in "iu" else "iuf") or _has_bool(data):
        need = "integers" if kind in "iu" else "numbers"
        problems.append(f"{label}: datatype {datatype} needs {need}, got "
                        f"{_kind_name(arr, data)}")
        return None
    if kind in "iu":
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            problems.append(f"{label}: values outside the {datatype} range "
                            f"[{info.min}, {info.max}]")
            return None
        return arr.astype(dtype).reshape(shape)
    with np.errstate(over="ignore"):
        out = arr.astype(dtype).reshape(shape)
    if not np.isfinite(out).all():  # JSON has no inf/NaN, so this is an overflow
        problems.append(f"{label}: values outside the {datatype} range")
        return None
    return out


def _has_bool(data: list) -> bool:
    stack = [data]
    while stack:
        for v in stack.pop():
            if v is True or v is False:
                return True
            if isinstance(v, list):
                stack.append(v)
    return False


def _kind_name(arr: np.ndarray, data: list) -> str:
    if arr.dtype.kind == "f":
        return "floats"
    if arr.dtype.kind == "b" or _has_bool(data):
        return "true/false values"
    if arr.dtype.kind in "US":
        return "strings"
    return "values that are not numbers (null, objects, or integers beyond 64 bits)"


def _requested_outputs(value, manifest: Manifest) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = manifest.output_names
    if not isinstance(value, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in value):
        raise RequestError(400, "'outputs' must be a list of objects with a string 'name'")
    unknown = [o["name"] for o in value if o["name"] not in names]
    if unknown:
        raise RequestError(400, f"unknown output {_show(unknown[0])}; outputs: "
                                f"{', '.join(names)}")
    return tuple(o["name"] for o in value)


def _request_id(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise RequestError(400, "'id' must be a string of at most 256 characters")
    return value


# ---------------------------------------------------------------------------------------------
# Responses


def encode_tensor(name: str, arr: np.ndarray) -> dict:
    return {"name": name, "datatype": OIP_DATATYPES[arr.dtype.name], "shape": list(arr.shape),
            "data": arr.ravel().tolist()}


def encode_infer_response(model: str, outputs: Mapping[str, np.ndarray], *,
                          requested: Sequence[str] | None = None,
                          request_id: str | None = None) -> bytes:
    """The response body. Float values go out as the shortest decimal that reads back to the
    same float, so a float32 output arrives bit for bit. Non-finite values have no JSON form:
    a 500 that says so."""
    names = list(requested) if requested is not None else list(outputs)
    tensors = []
    for name in names:
        arr = outputs[name]
        if arr.dtype.kind == "f":
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise RequestError(500, f"model {model!r}: output {name!r} holds {bad} NaN/Inf "
                                        f"values, which JSON cannot carry")
        tensors.append(encode_tensor(name, arr))
    doc = {"model_name": model, "model_version": MODEL_VERSION, "outputs": tensors}
    if request_id is not None:
        doc["id"] = request_id
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def error_body(message: str, *, retryable: bool = False) -> bytes:
    doc = {"error": message}
    if retryable:
        doc["retryable"] = True
    return json.dumps(doc).encode()
