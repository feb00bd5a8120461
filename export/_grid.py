"""The default shape grid for parity: sizes that catch specialized dims and baked-in tables.

For each dynamic dim the grid takes its minimum, 1 and 2, an odd size, the export example, a
size beyond the example and the declared maximum (clipped to the range). Instead of the full
cartesian product (which grows as the power of the number of dims), it varies one dim at a time
around the example point and adds two corners: every dim at its smallest, and every dim at its
largest.
"""

from __future__ import annotations

from collections.abc import Mapping

# An odd size that is none of 1, 2 or the usual example sizes.
ODD_SIZE = 5


def dim_values(lo: int, hi: int, example: int) -> list[int]:
    """Grid sizes of one dim with range [lo, hi] and export example size ``example``."""
    beyond = 2 * example + 3  # longer than the example, odd
    candidates = [lo, 1, 2, ODD_SIZE, example, beyond, hi]
    return sorted({v for v in candidates if lo <= v <= hi})


def default_grid(
    dims: Mapping[str, tuple[int, int]], example: Mapping[str, int]
) -> list[dict[str, int]]:
    """Shape points (dim name -> size), example first, without duplicates."""
    base = {d: int(example[d]) for d in dims}
    points = [base]
    for dim, (lo, hi) in dims.items():
        for value in dim_values(lo, hi, base[dim]):
            points.append({**base, dim: value})
    points.append({d: lo for d, (lo, hi) in dims.items()})
    points.append({d: hi for d, (lo, hi) in dims.items()})
    unique: list[dict[str, int]] = []
    for p in points:
        if p not in unique:
            unique.append(p)
    return unique
