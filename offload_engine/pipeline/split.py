"""Cutting the layer list into contiguous pipeline stages of balanced cost.

The split minimizes the costliest stage (the pipeline runs at the pace of its slowest stage);
among the splits that reach that minimum it takes the most even one (least sum of squared stage
costs), so a stage is not left idle when the layers allow better. Exact dynamic programming,
deterministic: the same costs always give the same split.
"""
from __future__ import annotations

from typing import Sequence

from ..errors import EngineError
from ..models.base import Layer


def layer_parameters(layers: Sequence[Layer]) -> list[float]:
    """Each layer's parameter count: what it holds and streams (a tied tensor counts in each
    layer that reads it, since every stage keeps its own copy)."""
    return [float(sum({s.key: s.numel() for s in layer.weight_specs()}.values())) for layer in layers]


def balanced_split(costs: Sequence[float], stages: int) -> list[range]:
    """Contiguous ranges of layer indices, one per stage, every stage at least one layer."""
    n = len(costs)
    if stages < 1:
        raise EngineError(f"a pipeline needs at least one stage, got {stages}.")
    if stages > n:
        raise EngineError(f"{stages} pipeline stages for {n} layers: every stage needs at least one layer.",
                          "Use fewer stages (--pipeline).")
    prefix = [0.0]
    for c in costs:
        if c < 0:
            raise EngineError(f"layer costs must be non-negative, got {c}.")
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int) -> float:
        return prefix[b] - prefix[a]

    # best[s][i]: the least achievable largest stage cost for layers [0, i) in s stages.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            best[s][i] = min(max(best[s - 1][a], cost(a, i)) for a in range(s - 1, i))
    bound = best[stages][n] * (1 + 1e-12) + 1e-12  # float sums of the same layers may differ in the last bit

    # Among splits under the bound, the least sum of squares; ties go to the earliest cut.
    even = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    even[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for a in range(s - 1, i):
                c = cost(a, i)
                if c <= bound and even[s - 1][a] + c * c < even[s][i]:
                    even[s][i], cut[s][i] = even[s - 1][a] + c * c, a
    ranges, end = [], n
    for s in range(stages, 0, -1):
        start = cut[s][end]
        ranges.append(range(start, end))
        end = start
    return ranges[::-1]


def stage_split(model, policy, work, stages: int, hardware=None) -> tuple[list[range], list[float], str]:
    """The stages' layer ranges for a model and policy, their costs, and what the costs are:
    the cost model's per-layer decode seconds with a hardware profile, else parameter counts."""
    from ..models import build_layers

    if hardware is not None:
        from offload_engine.policies.cost_model import layer_seconds
        costs, unit = layer_seconds(model, policy, work, hardware), "cost model (seconds per decode step)"
    else:
        costs, unit = layer_parameters(build_layers(model, policy.sep_layer)), "parameters"
    ranges = balanced_split(costs, stages)
    return ranges, [sum(costs[r.start:r.stop]) for r in ranges], unit
