"""How alike are the layer sets that different calibration seeds remove? (Jaccard similarity of removed sets.)"""

from __future__ import annotations

import itertools
import math
from typing import Any, Collection


def jaccard(a: Collection[int], b: Collection[int]) -> float:
    """|A & B| / |A | B|; 1 for two empty sets."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def mean_jaccard(removed_sets: list[Collection[int]]) -> float:
    """Mean Jaccard over all pairs of sets (1 = every seed removed the same layers); NaN for fewer than 2 sets."""
    pairs = list(itertools.combinations(removed_sets, 2))
    return sum(jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else math.nan


def stability(removed_sets: list[set[int]]) -> dict[str, Any]:
    """mean_jaccard, distinct_sets and the layers every set holds (removed_by_every_seed)."""
    return {"mean_jaccard": mean_jaccard(removed_sets),
            "distinct_sets": len({frozenset(s) for s in removed_sets}),
            "removed_by_every_seed": sorted(set.intersection(*map(set, removed_sets))) if removed_sets else []}
