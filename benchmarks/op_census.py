"""The op census of every zoo entry's variant graphs, to show a change left the graphs alone.

    python benchmarks/op_census.py OUT.json             # capture, build variants, count ops
    python benchmarks/op_census.py --compare A.json B.json

Each entry is captured at opset 18 and its variants built as `attnx export` builds them
(export/_variants.py); the census counts op types, Loop and If bodies included. Comparing two
files prints every entry and variant whose census differs, and exits 1 when any does. Takes
about 90 s for the 20 entries on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def census() -> dict[str, dict[str, dict[str, int]]]:
    from export import spec_from_zoo
    from export._capture import capture
    from export._variants import build_variants, op_census
    from models import zoo

    out = {}
    for name in zoo.names():
        spec = spec_from_zoo(zoo.get(name))
        builds = build_variants(spec, capture(spec, 18), 18, None)
        out[name] = {variant: op_census(b.model) for variant, b in builds.items()}
    return out


def compare(a: dict, b: dict) -> list[str]:
    lines = []
    for entry in sorted(set(a) | set(b)):
        left, right = a.get(entry, {}), b.get(entry, {})
        for variant in sorted(set(left) | set(right)):
            if left.get(variant) != right.get(variant):
                lines.append(f"{entry} {variant}: {left.get(variant)} != {right.get(variant)}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="write the census here")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        lines = compare(a, b)
        variants = sum(len(v) for v in a.values())
        print("\n".join(lines) or f"same census: {len(a)} entries, {variants} variant graphs")
        return 1 if lines else 0
    if not args.out:
        parser.error("give OUT.json or --compare A B")
    Path(args.out).write_text(json.dumps(census(), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
