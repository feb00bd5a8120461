"""Fuzz driver, run in a subprocess by test_fuzz.py (a native crash kills only this process).

    python fuzz_driver.py TEMPLATE WORK CASES SEED

For each case: copy the TEMPLATE bundle, mutate the bytes of one of its files, re-sign the
manifest for most cases (so that the mutated bytes reach onnx, onnxruntime and numpy instead
of stopping at the hash check), then load, run every CPU variant on every golden case and
compare with the golden outputs. Prints one JSON line per case:
    {"case": i, "file": ..., "mutation": ..., "resigned": ..., "outcome": ...}
where outcome is "ok", a typed error class name, or "UNEXPECTED <type>: <message>".
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import traceback
from pathlib import Path

from runtime import (
    AttnxError,
    Runner,
    ToleranceTable,
    check,
    compare,
    load_bundle,
)
from runtime._runner import variants_for

TARGETS = ("model.onnx", "model.onnx.data", "model.alt.onnx", "golden.npz", "manifest.json")
RESIGN_PROBABILITY = 0.7


def flip_bits(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)


def truncate(data: bytearray, rng: random.Random) -> None:
    del data[rng.randrange(len(data)) :]


def insert(data: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(data) + 1)
    data[i:i] = rng.randbytes(rng.randint(1, 16))


def overwrite(data: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(data))
    n = rng.randint(1, 16)
    data[i : i + n] = rng.randbytes(min(n, len(data) - i))


def duplicate(data: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(data))
    chunk = data[i : i + rng.randint(1, 64)]
    j = rng.randrange(len(data) + 1)
    data[j:j] = chunk


def set_byte(data: bytearray, rng: random.Random) -> None:
    data[rng.randrange(len(data))] = rng.choice([0x00, 0x7F, 0x80, 0xFF])


MUTATIONS = {f.__name__: f for f in (flip_bits, truncate, insert, overwrite, duplicate, set_byte)}


def resign(folder: Path) -> None:
    d = json.loads((folder / "manifest.json").read_text())
    for entry in d["files"]:
        data = (folder / entry["path"]).read_bytes()
        entry["sha256"], entry["size"] = hashlib.sha256(data).hexdigest(), len(data)
    (folder / "manifest.json").write_text(json.dumps(d))


def load_and_run(folder: Path) -> str:
    bundle = load_bundle(folder)
    for variant in variants_for(bundle.manifest, "CPUExecutionProvider"):
        with Runner(bundle, provider="cpu", variant=variant.name) as runner:
            table = ToleranceTable.from_variant(variant)
            for golden in bundle.golden:
                check(compare(runner.run(dict(golden.inputs)), golden.outputs, table))
    return "ok"


def one_case(template: Path, folder: Path, index: int, rng: random.Random) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(template, folder)
    case = {"case": index, "file": None, "mutation": None, "resigned": False}
    if index > 0:  # case 0 is the untouched bundle: it must run
        target = rng.choice([t for t in TARGETS if (folder / t).exists()])
        name = rng.choice(sorted(MUTATIONS))
        data = bytearray((folder / target).read_bytes())
        MUTATIONS[name](data, rng)
        (folder / target).write_bytes(bytes(data))
        resigned = target != "manifest.json" and rng.random() < RESIGN_PROBABILITY
        if resigned:
            resign(folder)
        case.update(file=target, mutation=name, resigned=resigned)
    try:
        case["outcome"] = load_and_run(folder)
    except AttnxError as e:
        case["outcome"] = type(e).__name__
        case["message"] = str(e)[:200]
    except Exception as e:  # noqa: BLE001 - the point: report anything untyped, keep going
        case["outcome"] = f"UNEXPECTED {type(e).__name__}: {str(e)[:300]}"
        case["traceback"] = traceback.format_exc()[-1500:]
    return case


def main() -> None:
    template, work, cases, seed = (
        Path(sys.argv[1]),
        Path(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
    )
    rng = random.Random(seed)
    for i in range(cases):
        print(json.dumps(one_case(template, work / "case", i, rng)), flush=True)
    print(json.dumps({"done": cases}), flush=True)


if __name__ == "__main__":
    main()
