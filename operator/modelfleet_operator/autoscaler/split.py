"""Split an InferenceModel's replicas across the GPU architectures that can serve it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureShare:
    """One GPU architecture that can serve the model: `nodes` eligible nodes, optional capacity cap and
    measured throughput of one replica (requests/s, from its own metrics or the build benchmark)."""

    name: str
    nodes: int
    throughput_per_replica: float | None = None
    max_replicas: int | None = None


def _newest_first(name: str) -> tuple[int, str]:
    """Sort key: smXY by descending compute capability (sm100 before sm90 before sm75), others after."""
    digits = name[2:] if name.startswith("sm") else ""
    return (-int(digits), name) if digits.isdigit() else (1, name)


def split_across_architectures(total: int, architectures: Sequence[ArchitectureShare]) -> dict[str, int]:
    """Split `total` replicas across architectures, weighted by per-replica throughput.

    The rule:
    - architectures with no eligible nodes (or a cap of 0) get 0;
    - weights are the measured per-replica throughput; an architecture without a measurement gets the mean
      of the measured ones (1.0 each if none is measured), so unknown means "average";
    - when `total` ≥ the number of usable architectures, each gets 1 first (so every architecture keeps a
      warm replica and its throughput stays measured) and the rest is split by weight; otherwise the
      `total` highest-weight architectures get 1 each (ties go to the newest architecture: sm90 before
      sm75, the likely faster GPU when nothing is measured yet);
    - shares are rounded by largest remainder (ties by weight, then newest architecture), so they sum to `total`;
    - an architecture's `max_replicas`, if set, caps it; the excess goes to the others by the same rule,
      and replicas nobody can hold are dropped (the sum is then below `total`).
    """
    if total < 0:
        raise ValueError(f"total replicas must be >= 0, got {total}")
    usable = [a for a in architectures if a.nodes > 0 and (a.max_replicas is None or a.max_replicas > 0)]
    result = {a.name: 0 for a in architectures}
    if total == 0 or not usable:
        return result
    measured = [a.throughput_per_replica for a in usable if a.throughput_per_replica]
    default_weight = sum(measured) / len(measured) if measured else 1.0
    weights = {a.name: (a.throughput_per_replica or default_weight) for a in usable}
    caps = {a.name: a.max_replicas for a in usable}
    order = sorted(usable, key=lambda a: (-weights[a.name], _newest_first(a.name)))
    if total < len(usable):
        for a in order[:total]:
            result[a.name] = 1
        return result
    for a in usable:
        result[a.name] = 1
    remaining = total - len(usable)
    open_names = [a.name for a in order if caps[a.name] is None or result[a.name] < (caps[a.name] or 0)]
    while remaining > 0 and open_names:
        weight_sum = sum(weights[n] for n in open_names)
        quotas = {n: remaining * weights[n] / weight_sum for n in open_names}
        floors = {n: math.floor(q) for n, q in quotas.items()}
        leftover = remaining - sum(floors.values())
        by_remainder = sorted(open_names, key=lambda n: (-(quotas[n] - floors[n]), -weights[n], _newest_first(n)))
        for n in by_remainder[:leftover]:
            floors[n] += 1
        placed = 0
        for n in open_names:
            cap = caps[n]
            room = floors[n] if cap is None else min(floors[n], cap - result[n])
            result[n] += room
            placed += room
        remaining -= placed
        open_names = [n for n in open_names if caps[n] is None or result[n] < (caps[n] or 0)]
        if placed == 0:
            break
    return result
