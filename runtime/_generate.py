"""Greedy generation with a bundle's KV cache, torch-free.

A cached bundle describes its cache in manifest.json's "cache" (runtime._manifest.Cache,
written by the exporter from the zoo entry's KVCache and checked when the manifest is read),
so nothing here guesses names, axes or limits:

    "tensors":  [{"past": "past_keys", "present": "present_keys", "holds": "keys"}, ...]
    "layout":   "[L, batch, kv_heads, past, head_dim]"; past_axis 3, batch_axis 1
    "keys":     "post-rope" (keys are cached rotated at their own position)
    "position_offset": "past" (new tokens sit at positions past .. past + seq - 1)
    "max_length": the most positions a cache may hold (the "past" dim's declared max)
    "token_input", "logits_output": the LM's token-ids input and logits output
    "graphs":   "single": one graph serves the prefill (past 0) and every decode step (past >= 1)

Cache capacity: the cache never holds more than max_length positions. Feeding `s` tokens on a
cache of `p` positions needs p + s <= max_length; a prompt of P tokens and N new tokens feed
P + N - 1 tokens in all (the last new token is returned, not fed), so generate() accepts
P + N - 1 <= max_length and refuses more with an InputError before running anything.

Buffers: every step runs through onnxruntime's IO binding. The presents stay where the
provider put them (device memory on CUDA, ORT-owned memory on CPU) and are bound as the next
step's pasts without a host round trip; only the token ids go in and the logits come out.
The exported graph concatenates past and new keys, so each present is a fresh buffer (a fixed
-capacity in-place cache would need a different graph, e.g. GroupQueryAttention's shared
buffer).

    with Generator("artifacts/decoder_lm", provider="cpu") as gen:
        new_tokens = gen.generate([5, 17, 2], max_new_tokens=64)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import ArtifactError, InputError
from ._manifest import MANIFEST_NAME, Cache, Manifest
from ._runner import Runner
from ._session import CUDA, ort_errors


def bundle_cache(manifest: Manifest) -> Cache:
    """The manifest's typed cache; ArtifactError when the bundle declares none."""
    if manifest.cache is None:
        raise ArtifactError(f"bundle {manifest.name!r} declares no KV cache (no cache in "
                            f"{MANIFEST_NAME}); it cannot be decoded step by step")
    return manifest.cache


@dataclass(frozen=True)
class Step:
    """One generated token and the logits it was chosen from ([V], float32)."""

    token: int
    logits: np.ndarray


class Generator:
    """Greedy decoding of a language-model bundle with its KV cache.

    `source` is a bundle folder, a loaded Bundle or an open Runner (which the generator then
    does not close). provider/variant/threads go to the Runner it opens.

    One prompt (``generate``) or a batch of prompts of different lengths (``generate_batch``):
    a batch is left-padded, as transformers' generate pads it, which needs a bundle whose cache
    names an attention mask input (the graph then also takes position ids where the model
    does, counted from the mask). A bundle without one decodes a batch of equal lengths.

    A Generator holds one batch's cache: use one per request (or per thread). Several
    generators may share one Runner, whose session serves concurrent callers.
    """

    def __init__(self, source: str | os.PathLike | Any, *, provider: str = "auto",
                 variant: str | None = None, threads: int | None = None):
        self._owns_runner = not isinstance(source, Runner)
        runner = (Runner(source, provider=provider, variant=variant, threads=threads)
                  if self._owns_runner else source)
        try:
            self.cache = bundle_cache(runner.manifest)
            if not self.cache.is_lm:
                raise InputError(f"bundle {runner.manifest.name!r} caches a block, not a "
                                 "language model (no token_input/logits_output in "
                                 "its cache); generate needs token ids in and logits out")
        except BaseException:
            if self._owns_runner:
                runner.close()
            raise
        self.runner = runner
        self.manifest: Manifest = runner.manifest
        self._device = "cuda" if runner.provider == CUDA else "cpu"
        self._inputs = {t.name: t for t in self.manifest.inputs}
        logits = next(t for t in self.manifest.outputs if t.name == self.cache.logits_output)
        self.vocab_size = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
        self._errors = ort_errors()
        self._seq = self.manifest.dims[self.cache.seq_dim]
        self._batch = self.manifest.dims[self.cache.batch_dim]
        self._state: list[Any] | None = None
        self._mask = np.ones((1, 0), np.int64)  # [b, length]: 1 at kept positions
        self.length = 0  # positions in the cache

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._state = None
        if self._owns_runner:
            self.runner.close()

    @property
    def max_length(self) -> int:
        """The most positions the cache may hold."""
        return self.cache.max_length

    @property
    def takes_padding(self) -> bool:
        """Whether the bundle takes an attention mask, so that a batch may be left-padded."""
        return self.cache.mask_input is not None

    def reset(self) -> None:
        """Forget the cache: the next step is a prefill (past length 0)."""
        self._state = None
        self._mask = np.ones((1, 0), np.int64)
        self.length = 0

    def checkpoint(self) -> tuple[int, Any, np.ndarray]:
        """The cache as it is now (no copy: steps never modify a cache, they make a new one)."""
        return self.length, self._state, self._mask

    def rewind(self, checkpoint: tuple[int, Any, np.ndarray]) -> None:
        """Go back to a checkpoint() of this generator (to branch, or to time one step)."""
        self.length, self._state, self._mask = checkpoint

    def step(self, ids, attention_mask=None) -> np.ndarray:
        """Feed `ids` after the cached positions and return their logits (float32, a copy).

        `ids` is one sequence's tokens [s] (logits [s, V]) or a batch [b, s] (logits [b, s, V]);
        `attention_mask` [b, s] marks padding among them with 0 (default: every token kept).
        With an empty cache this is the prefill; a later call with several ids is a chunk whose
        queries are bottom-right aligned to the cache."""
        tokens = self._token_array(ids)
        flat = np.asarray(ids).ndim == 1
        batch, seq = tokens.shape
        new_mask = self._new_mask(attention_mask, tokens.shape)
        self._check_step(batch, seq)
        mask = np.concatenate((self._mask if self._state is not None else
                               np.ones((batch, 0), np.int64), new_mask), axis=1)
        session = self.runner.session
        binding = session.io_binding()
        for name, value in self._step_inputs(tokens, mask).items():
            binding.bind_cpu_input(name, value)
        for i, name in enumerate(self.cache.pasts):
            if self._state is None:
                binding.bind_cpu_input(name, self._empty_past(name, batch))
            else:
                binding.bind_ortvalue_input(name, self._state[i])
        names = self.manifest.output_names
        for name in names:
            device = "cpu" if name not in self.cache.presents else self._device
            binding.bind_output(name, device)
        try:
            session.run_with_iobinding(binding)
        except self._errors as e:  # the step matched the manifest: the bundle's fault
            raise ArtifactError(f"{self.runner.label}: onnxruntime failed on a decode step: "
                                f"{e}") from None
        values = dict(zip(names, binding.get_outputs(), strict=True))
        state = [values[name] for name in self.cache.presents]
        self._check_presents(state, seq)
        self._state, self._mask = state, mask
        self.length += seq
        logits = np.array(values[self.cache.logits_output].numpy(), copy=True)
        return logits[0] if flat else logits

    def _check_step(self, batch: int, seq: int) -> None:
        if not self._seq.min <= seq <= self._seq.max:
            raise InputError(f"cannot feed {seq} tokens in one step: the bundle's "
                             f"{self.cache.seq_dim!r} dim allows {self._seq.min}.."
                             f"{self._seq.max}")
        if not self._batch.min <= batch <= self._batch.max:
            raise InputError(f"a batch of {batch} sequences is outside the bundle's "
                             f"{self.cache.batch_dim!r} dim {self._batch.min}..{self._batch.max}")
        if self._state is not None and batch != self._mask.shape[0]:
            raise InputError(f"the cache holds a batch of {self._mask.shape[0]} sequences; "
                             f"this step feeds {batch} (reset() to start another batch)")
        if self.length + seq > self.max_length:
            raise InputError(f"KV cache full: {self.length} cached + {seq} new positions "
                             f"exceed the bundle's maximum length {self.max_length} (the "
                             f"declared max of dim {self.cache.past_dim!r}); reset() or "
                             "export with a larger past range")

    def _new_mask(self, attention_mask, shape: tuple[int, int]) -> np.ndarray:
        if attention_mask is None:
            return np.ones(shape, np.int64)
        mask = np.asarray(attention_mask)
        if mask.shape != shape or (mask.size and mask.dtype.kind not in "iub"):
            raise InputError(f"attention_mask must be integers of the ids' shape {list(shape)}, "
                             f"got {mask.dtype.name} {list(mask.shape)}")
        if not np.isin(mask, (0, 1)).all():
            raise InputError("attention_mask holds values other than 0 and 1")
        if not self.takes_padding and not mask.all():
            raise InputError(f"bundle {self.manifest.name!r} takes no attention mask (its cache "
                             "names no mask_input), so no token can be padding")
        return mask.astype(np.int64)

    def _step_inputs(self, tokens: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Token ids, and the mask over past + new positions and the new tokens' position ids
        (the count of kept tokens before each, 0 at padding) where the graph takes them."""
        feed = {self.cache.token_input: tokens}
        if self.cache.mask_input is not None:
            feed[self.cache.mask_input] = np.ascontiguousarray(mask)
        if self.cache.position_input is not None:
            positions = np.where(mask == 0, 0, mask.cumsum(axis=1) - 1)
            feed[self.cache.position_input] = np.ascontiguousarray(positions[:, -tokens.shape[1]:])
        return feed

    def _check_presents(self, state, seq: int) -> None:
        for name, value in zip(self.cache.presents, state, strict=True):
            got = value.shape()[self.cache.past_axis]
            if got != self.length + seq:
                raise ArtifactError(f"{self.runner.label}: present {name!r} holds {got} "
                                    f"positions on axis {self.cache.past_axis}, expected "
                                    f"{self.length} past + {seq} new = {self.length + seq}")

    def steps(self, prompt_ids: Sequence[int], max_new_tokens: int,
              eos_token_id: int | None = None) -> Iterator[Step]:
        """Check the request, then (lazily) prefill `prompt_ids` on a fresh cache and yield
        each greedy token with the logits it was chosen from, up to `max_new_tokens` or the
        end-of-sequence token (yielded too). A prompt longer than the seq dim's max is
        prefilled in chunks (each chunk attends to the ones before it)."""
        self.check_request(int(np.asarray(prompt_ids).size), max_new_tokens)
        prompt = self._token_array(prompt_ids)
        for tokens, logits in self._greedy(prompt, np.ones_like(prompt), max_new_tokens,
                                           eos_token_id, eos_token_id):
            yield Step(int(tokens[0]), logits[0])

    def _greedy(self, prompt: np.ndarray, mask: np.ndarray, max_new_tokens: int,
                eos: int | None, pad: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(tokens [b], logits [b, V]) of each greedy step after prefilling the left-padded
        `prompt` [b, P]; a row that has produced `eos` gets `pad` from then on, as transformers'
        generate does, and the loop ends when every row has."""
        self.reset()
        chunk = self._seq.max
        for start in range(0, prompt.shape[1], chunk):
            logits = self.step(prompt[:, start:start + chunk], mask[:, start:start + chunk])
        logits = logits[:, -1]
        running = np.ones(prompt.shape[0], bool)
        for i in range(max_new_tokens):
            tokens = logits.argmax(axis=-1)
            if eos is not None:
                tokens = np.where(running, tokens, pad)
                running &= tokens != eos
            yield tokens, logits
            if i + 1 == max_new_tokens or not running.any():
                return
            logits = self.step(tokens[:, None])[:, -1]

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int,
                 eos_token_id: int | None = None) -> list[int]:
        """Greedy decoding: the new token ids (the prompt is not repeated), `max_new_tokens` of
        them or fewer, ending with `eos_token_id` when it comes."""
        return [s.token for s in self.steps(prompt_ids, max_new_tokens, eos_token_id)]

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       eos_token_id: int | None = None,
                       pad_token_id: int | None = None) -> list[list[int]]:
        """Greedy decoding of several prompts at once, left-padded with `pad_token_id` (default
        the end-of-sequence id, else 0) and masked; each row's new tokens, ending with
        `eos_token_id` where it came. Equals transformers' generate on the same padded batch."""
        pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
        prompt, mask = self._left_padded(prompts, pad)
        self.check_request(prompt.shape[1], max_new_tokens)
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for tokens, _ in self._greedy(prompt, mask, max_new_tokens, eos_token_id, pad):
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    rows[row].append(token)
                    done[row] = token == eos_token_id
        return rows

    def _left_padded(self, prompts, pad: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, (str, bytes)) or not len(prompts):
            raise InputError("give at least one prompt (a list of token id lists)")
        if any(not np.asarray(p).size for p in prompts):
            raise InputError("the prompt is empty: give at least one token id")
        arrays = [self._token_array(p)[0] for p in prompts]
        longest = max(len(a) for a in arrays)
        if not self.takes_padding and any(len(a) != longest for a in arrays):
            raise InputError(f"bundle {self.manifest.name!r} takes no attention mask, so its "
                             "prompts cannot be padded: give prompts of one length "
                             f"(got {sorted({len(a) for a in arrays})})")
        tokens = np.full((len(arrays), longest), pad, np.int64)
        mask = np.zeros((len(arrays), longest), np.int64)
        for row, a in enumerate(arrays):
            tokens[row, longest - len(a):], mask[row, longest - len(a):] = a, 1
        if longest > min(map(len, arrays)):
            self._token_array([pad])  # the pad id must be a token id too
        return tokens, mask

    def check_request(self, prompt_length: int, max_new_tokens: int) -> None:
        """InputError unless a prompt of this length and this many new tokens fit the bundle."""
        if prompt_length < 1:
            raise InputError("the prompt is empty: give at least one token id")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (
                max_new_tokens < 0):
            raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        fed = prompt_length + max(max_new_tokens - 1, 0)
        if fed > self.max_length:
            raise InputError(f"a prompt of {prompt_length} tokens and {max_new_tokens} new "
                             f"tokens need a KV cache of {fed} positions, above the bundle's "
                             f"maximum length {self.max_length} (the declared max of dim "
                             f"{self.cache.past_dim!r}); at most "
                             f"{max(self.max_length - prompt_length + 1, 0)} new tokens fit")

    def _token_array(self, ids) -> np.ndarray:
        """[b, s] int64 token ids from [s] or [b, s] integers inside the vocabulary."""
        arr = np.asarray(ids)
        if arr.ndim not in (1, 2) or (arr.size and arr.dtype.kind not in "iu"):
            raise InputError(f"token ids must be a flat sequence of integers (or a batch of "
                             f"them), got {arr.dtype.name} with shape {list(arr.shape)}")
        if arr.size == 0:
            raise InputError("no token ids to feed: give at least one")
        if self.vocab_size is not None and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise InputError(f"token id {bad} is outside the vocabulary 0..{self.vocab_size - 1}")
        arr = arr.astype(np.int64)
        return arr[None] if arr.ndim == 1 else arr

    def _empty_past(self, name: str, batch: int) -> np.ndarray:
        """The prefill's past: size 0 on the past axis, the batch's size on the batch axis, the
        static sizes elsewhere (the manifest reader checked that every other dim is static)."""
        spec = self._inputs[name]
        shape = [0 if a == self.cache.past_axis else batch if a == self.cache.batch_axis else d
                 for a, d in enumerate(spec.shape)]
        return np.zeros(shape, np.dtype(spec.dtype))


def generate(source, prompt_ids: Sequence[int], max_new_tokens: int, *,
             provider: str = "auto", threads: int | None = None) -> list[int]:
    """Greedy decoding of `max_new_tokens` tokens after `prompt_ids` with an LM bundle (a
    folder, a Bundle or a Runner); returns the new token ids. See Generator."""
    with Generator(source, provider=provider, threads=threads) as gen:
        return gen.generate(prompt_ids, max_new_tokens)


# ---------------------------------------------------------------------------------------------
# `attnx generate` (registered by runtime._cli)


def _token_ids(text: str) -> list[int]:
    import argparse

    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None


def generate_args(parser) -> None:
    from ._session import PROVIDER_CHOICES

    parser.add_argument("bundle", metavar="BUNDLE")
    parser.add_argument("--prompt-ids", type=_token_ids, required=True, action="append",
                        metavar="1,2,3", help="a prompt's token ids, comma-separated; repeat it "
                        "for a batch of prompts (left-padded; the bundle needs a mask input)")
    parser.add_argument("--max-new-tokens", type=int, required=True, metavar="N")
    parser.add_argument("--eos-id", type=int, default=None, metavar="ID",
                        help="end-of-sequence token id: a prompt stops once it is generated")
    parser.add_argument("--pad-id", type=int, default=None, metavar="ID",
                        help="token id that pads a batch's shorter prompts (default: --eos-id, "
                        "else 0)")
    parser.add_argument("--variant", help="variant name (default: best that passed parity)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op threads (default: usable CPUs)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto",
                        help="auto (CUDA if onnxruntime offers it), cpu or cuda (default: auto)")


def cmd_generate(args) -> int:
    """Greedy generation with a language-model bundle and its KV cache (no torch needed).

    Prefills the prompt (past length 0), then runs one decode step per new token, feeding each
    step's present keys/values back as the next past. Prints the new token ids, one line per
    prompt. Several --prompt-ids make a batch, left-padded as transformers' generate pads it.

    Example: attnx generate artifacts/decoder_lm --prompt-ids 1,2,3 --max-new-tokens 16
    """
    import json
    import time

    prompts = args.prompt_ids
    with Generator(args.bundle, provider=args.provider, variant=args.variant,
                   threads=args.threads) as gen:
        start = time.perf_counter()
        rows = gen.generate_batch(prompts, args.max_new_tokens, args.eos_id, args.pad_id)
        seconds = time.perf_counter() - start
        result = {"name": gen.manifest.name, "variant": gen.runner.variant.name,
                  "provider": gen.runner.provider, "prompt_lengths": [len(p) for p in prompts],
                  "tokens": rows if len(rows) > 1 else rows[0], "cache_length": gen.length,
                  "ms": seconds * 1e3,
                  "tokens_per_s": sum(map(len, rows)) / seconds if seconds else None}
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    counts = "prompt" if len(prompts) == 1 else f"{len(prompts)} prompts"
    print(f"{result['name']}: variant {result['variant']} on {result['provider']}; {counts} of "
          f"{', '.join(map(str, result['prompt_lengths']))} tokens, {sum(map(len, rows))} new "
          f"tokens in {result['ms']:.1f} ms")
    for row in rows:
        print(",".join(map(str, row)))
    return 0
