"""Multi-step decode parity: the cached graph run as a decoder runs it.

The shape grid checks one forward pass at a time. Generation instead feeds each step's present
back as the next past, hundreds of times, so this stage runs that loop twice, side by side:
torch eager with its own cache, and ONNX Runtime with its own cache (its presents, never
torch's), each step on the same new inputs, comparing every output and every present at every
step. Three runs per variant (DEFAULT_STEPS decode steps each):

- prompt 1: prefill at past 0 with one token, then decode steps at past 1, 2, ...
- prompt ODD_PROMPT: a multi-token prefill, then decode steps;
- near the max: a cache of max_length - steps - 1 positions (random, the same on both sides),
  then decode steps until the present holds exactly max_length positions.

For a language model (the cache description names a token input and a logits output) the
decode steps feed torch's greedy tokens to both sides, so a near-tie in the logits cannot make
the two runs diverge; other cached blocks get fresh inputs from the spec at each step.

Records are ParityRecords whose point adds "run", "step" to the dims (batch, seq, past); the
writer puts them in the manifest's typed DecodeParity, and `attnx check` reports them with the
grid's records.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import torch

from runtime import Cache, DecodeParity, ParityRecord, ToleranceTable, check, compare, parity_record

from ._errors import ExportError
from ._sessions import PROVIDER, eager_outputs, make_session, to_numpy
from ._spec import ExportSpec

DEFAULT_STEPS = 8
ODD_PROMPT = 7
# Batch 2 catches a batch-axis mix-up in the cache that batch 1 cannot.
DECODE_BATCH = 2


def decode_runs(spec: ExportSpec, cache: Cache, steps: int) -> list[dict[str, int]]:
    """(batch, seq, past) of each run's first step, as described in the module docstring."""
    (b_lo, b_hi), (s_lo, s_hi) = spec.dims[cache.batch_dim], spec.dims[cache.seq_dim]
    batch = min(max(DECODE_BATCH, b_lo), b_hi)
    starts = [(1, 0), (min(ODD_PROMPT, s_hi), 0), (1, max(cache.max_length - steps - 1, 0))]
    runs = []
    for seq, past in starts:
        run = {"batch": batch, "seq": max(seq, s_lo), "past": past}
        if run not in runs:
            runs.append(run)
    return runs


def measure_decode(
    spec: ExportSpec,
    variants: Mapping[str, onnx.ModelProto],
    *,
    cache: Cache | None = None,
    steps: int = DEFAULT_STEPS,
) -> list[ParityRecord]:
    """Decode-loop parity records of every variant; [] when the spec declares no cache."""

    cache = cache if cache is not None else spec.cache
    if cache is None:
        return []
    _check_names(spec, cache)
    table = ToleranceTable(by_dtype=dict(spec.tolerance))
    records = []
    for variant, model in variants.items():
        session = make_session(model)
        for i, run in enumerate(decode_runs(spec, cache, steps)):
            for step, outputs in enumerate(_decode_loop(spec, cache, session, run, steps)):
                actual, expected, point, undefined = outputs
                records.append(
                    parity_record(
                        variant,
                        PROVIDER,
                        {"run": i, "step": step, **point},
                        compare(actual, expected, table, undefined),
                    )
                )
    return records


def decode_stage(spec: ExportSpec, variants: Mapping[str, onnx.ModelProto], status) -> list:
    """The pipeline's hook in stage 4: for a spec with a cache, measure the decode loop of
    `variants` and raise ParityError listing every failing step; the stage's detail counts the
    steps. Returns the records ([] without a cache)."""
    records = measure_decode(spec, variants)
    if not records:
        return []
    stage = status.stage(4)
    try:
        check(records)
    finally:
        passed = sum(r.passed for r in records)
        note = f"decode loop {', '.join(variants)} {passed}/{len(records)} steps passed"
        stage.detail = f"{stage.detail}; {note}" if stage.detail else note
    return records


def decode_parity(spec: ExportSpec, records: list[ParityRecord]) -> DecodeParity | None:
    """The manifest's DecodeParity of a cached spec's decode records; None without a cache."""
    if spec.cache is None:
        return None
    runs = decode_runs(spec, spec.cache, DEFAULT_STEPS)
    return DecodeParity(DEFAULT_STEPS, tuple(runs), tuple(records))


def _check_names(spec: ExportSpec, cache: Cache) -> None:
    inputs = {d.name for d in spec.inputs}
    outputs = set(spec.output_names or ())
    wanted = [*cache.pasts, cache.token_input]
    missing = sorted(n for n in wanted if n is not None and n not in inputs)
    produced = [*cache.presents, cache.logits_output]
    missing += sorted(n for n in produced if n is not None and outputs and n not in outputs)
    if missing:
        raise ExportError(
            f"the cache description names {missing}, which are not among the inputs "
            f"{sorted(inputs)} or outputs {sorted(outputs)} of '{spec.name}'",
            stage=4,
            hint="fix the entry's cache (models.zoo.KVCache)",
        )


def _decode_loop(spec: ExportSpec, cache: Cache, session, run: Mapping[str, int], steps: int):
    """Yield (ORT outputs, torch outputs, point, undefined positions) for the first step and
    `steps` decode steps, each side feeding its own presents back as its next pasts; a mask
    and position ids, where the graph takes them, continue from the step before."""

    names = [o.name for o in session.get_outputs()]
    pairs = [(t.past, t.present) for t in cache.tensors]
    token, logits = cache.token_input, cache.logits_output
    batch, seq, past = run["batch"], run["seq"], run["past"]
    torch_cache: dict[str, torch.Tensor] | None = None
    ort_cache: dict[str, np.ndarray] | None = None
    before: dict[str, torch.Tensor] = {}
    next_ids = None
    for _ in range(steps + 1):
        point = {cache.batch_dim: batch, cache.seq_dim: seq, cache.past_dim: past}
        feed = spec.make_inputs(point)
        if next_ids is not None:
            feed[token] = next_ids
        feed.update(_continued(cache, before, seq))
        before = feed
        ort_feed = to_numpy(feed)
        if torch_cache is not None:
            feed.update(torch_cache)
            ort_feed.update(ort_cache)
        expected = eager_outputs(spec, feed, names)
        actual = dict(zip(names, session.run(None, ort_feed), strict=True))
        yield actual, expected, point, spec.undefined_positions(feed, expected)
        torch_cache = {p: torch.from_numpy(expected[q]) for p, q in pairs}
        ort_cache = {p: actual[q] for p, q in pairs}
        if token is not None and logits is not None:
            next_ids = torch.from_numpy(expected[logits][:, -1:].argmax(-1))  # [b, 1]
        past, seq = past + seq, 1


def _continued(cache: Cache, before: Mapping[str, torch.Tensor], seq: int):
    """The step's mask and positions as generation continues them from the step ``before``
    (its mask plus ``seq`` kept positions; positions on from its last); {} on the first step."""
    out = {}
    if not before:
        return out
    if cache.mask_input is not None:
        mask = before[cache.mask_input]
        out[cache.mask_input] = torch.cat((mask, mask.new_ones(mask.shape[0], seq)), dim=1)
    if cache.position_input is not None:
        last = before[cache.position_input][:, -1:]
        out[cache.position_input] = last + torch.arange(1, seq + 1)
    return out
