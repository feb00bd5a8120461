"""Run a batch of requests on one Runner: stack those that can share a session.run call.

Requests are stacked along the batch dim (the symbolic dim at axis 0 of every input and
output) only when all their other dims are equal, as Triton's dynamic batcher does; the
stack never exceeds the batch dim's max. Requests that cannot be stacked run one by one.
One bad request fails alone: each is validated before it joins a stack.

Stacking is exact for the zoo on CPU: every row of a stacked run equals the row run alone,
bit for bit (tests/serve checks the served answers against a direct Runner). A model whose
kernels change with the batch size may differ in the last bits; `--max-batch-size 1` turns
stacking off.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from runtime._errors import ArtifactError, InputError

from ._protocol import Failure

logger = logging.getLogger("attnx.serve")

Result = dict[str, np.ndarray] | Failure


def run_batch(runner, feeds: Sequence[Mapping[str, np.ndarray]], *, batch_dim: str | None,
              max_rows: int) -> list[Result]:
    """Outputs (or a Failure) for each feed, in order. `runner` is a runtime Runner."""
    results: list[Result | None] = [None] * len(feeds)
    groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
    for i, feed in enumerate(feeds):
        try:
            arrays = runner.validate(feed)
        except InputError as e:
            results[i] = Failure(400, str(e))
            continue
        key = (i,) if batch_dim is None else tuple(
            (name, arr.shape[1:]) for name, arr in arrays.items())
        groups.setdefault(key, []).append((i, arrays))
    for members in groups.values():
        for chunk in _chunks(members, max_rows):
            _run_chunk(runner, chunk, results)
    return results  # type: ignore[return-value]


def _chunks(members: list[tuple[int, dict]], max_rows: int):
    chunk, rows = [], 0
    for member in members:
        n = _rows(member[1])
        if chunk and rows + n > max_rows:
            yield chunk
            chunk, rows = [], 0
        chunk.append(member)
        rows += n
    if chunk:
        yield chunk


def _rows(arrays: Mapping[str, np.ndarray]) -> int:
    return next(iter(arrays.values())).shape[0]


def _run_chunk(runner, chunk: list[tuple[int, dict]], results: list) -> None:
    if len(chunk) == 1:
        feed = chunk[0][1]
    else:
        feed = {name: np.concatenate([arrays[name] for _, arrays in chunk])
                for name in chunk[0][1]}
    try:
        outputs = runner.run(feed)
    except InputError as e:  # not expected after validate(); still the caller's problem
        for i, _ in chunk:
            results[i] = Failure(400, str(e))
        return
    except ArtifactError as e:
        # The message names the bundle path: log it, answer without it.
        logger.error("model %r failed on a valid input: %s", runner.manifest.name, e)
        for i, _ in chunk:
            results[i] = Failure(500, f"model {runner.manifest.name!r}: onnxruntime failed on "
                                      f"a valid input (details in the server log)")
        return
    if len(chunk) == 1:
        results[chunk[0][0]] = outputs
        return
    offsets = np.cumsum([_rows(arrays) for _, arrays in chunk])[:-1]
    pieces = {name: np.split(arr, offsets) for name, arr in outputs.items()}
    for k, (i, _) in enumerate(chunk):
        results[i] = {name: np.ascontiguousarray(parts[k]) for name, parts in pieces.items()}
