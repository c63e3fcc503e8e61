"""Per-tensor bit allocation under a model-wide bits-per-parameter budget.

Two allocators:

* :func:`fisher_allocation` — the paper's closed form.  With squared error
  D_i ~ c rms_i^2 2^(-2 b_i) per element and KL ~ 1/2 sum_i n_i Fbar_i D_i, the
  Lagrangian optimum is b_i = b0 + log2 rms_i + 1/2 log2 Fbar_i; b0 is set (by
  bisection, so that it stays exact under clamping) so the parameter-weighted mean
  equals the budget.  ``uniform_allocation`` is the baseline: every tensor at the budget.
* :func:`global_allocation` — better than the paper (which names it as future work):
  each tensor's *measured* rate-distortion curve, weighted by its Fisher mean, is
  optimised jointly: minimise sum_i Fbar_i SSE_i(b_i) s.t. sum_i n_i b_i <= budget sum n_i,
  by bisection on the Lagrange multiplier and a greedy fill of what is left.  It needs
  no high-rate assumption and sees each format's real overheads.

:func:`round_allocation` maps continuous targets onto each tensor's realisable bit
widths (fixed-length formats come in steps) without exceeding the budget.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

__all__ = [
    "TensorStats",
    "RatePoint",
    "uniform_allocation",
    "fisher_allocation",
    "round_allocation",
    "global_allocation",
    "mean_bits",
]


@dataclasses.dataclass(frozen=True)
class TensorStats:
    numel: int
    rms: float
    fisher_mean: float  # mean over the tensor's elements of the diagonal Fisher


@dataclasses.dataclass(frozen=True)
class RatePoint:
    bits: float  # all-inclusive bits per element at this operating point
    sse: float  # sum of squared weight errors at this point


def mean_bits(bits: Mapping[str, float], numels: Mapping[str, int]) -> float:
    total = sum(numels[n] for n in bits)
    return sum(bits[n] * numels[n] for n in bits) / total


def uniform_allocation(stats: Mapping[str, TensorStats], budget: float) -> dict[str, float]:
    return dict.fromkeys(stats, float(budget))


def fisher_allocation(stats: Mapping[str, TensorStats], budget: float, min_bits: float = 1.0,
                      max_bits: float = 8.0, floors: Mapping[str, float] | None = None) -> dict[str, float]:
    """The paper's rule b_i = b0 + log2 rms_i + 1/2 log2 Fbar_i, clamped, meeting ``budget``.

    ``floors``: per-tensor lower limits above ``min_bits`` (e.g. a small tensor whose scales and
    code tables alone cost more than ``min_bits``)."""
    if not min_bits <= budget <= max_bits:
        raise ValueError(f"budget={budget} must lie in [min_bits={min_bits}, max_bits={max_bits}]")
    offsets = {n: _log_term(s, stats.values()) for n, s in stats.items()}
    low = {n: min(max_bits, max(min_bits, (floors or {}).get(n, min_bits))) for n in stats}
    numels = {n: s.numel for n, s in stats.items()}
    if mean_bits(low, numels) > budget:
        raise ValueError(f"budget={budget} bits is below what these tensors need at the least "
                         f"({mean_bits(low, numels):.3f} bits: min_bits and per-tensor floors); raise it")

    def allocate(b0: float) -> dict[str, float]:
        return {n: min(max_bits, max(low[n], b0 + o)) for n, o in offsets.items()}

    lo, hi = min_bits - max(offsets.values()) - 1, max_bits - min(offsets.values()) + 1
    for _ in range(200):  # the mean is monotone in b0
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_bits(allocate(mid), numels) < budget else (lo, mid)
    return allocate(lo)


def _log_term(s: TensorStats, all_stats) -> float:
    """log2 rms + 1/2 log2 Fbar, with a floor for tensors whose Fisher or rms is zero."""
    floor_f = min((t.fisher_mean for t in all_stats if t.fisher_mean > 0), default=1.0) * 1e-3
    floor_r = min((t.rms for t in all_stats if t.rms > 0), default=1.0) * 1e-3
    return math.log2(max(s.rms, floor_r)) + 0.5 * math.log2(max(s.fisher_mean, floor_f))


def round_allocation(targets: Mapping[str, float], options: Mapping[str, Sequence[float]],
                     numels: Mapping[str, int], budget: float) -> dict[str, float]:
    """Pick each tensor's realisable width: the largest option <= target, then upgrade the
    tensors that lost the most (in parameter-bits) while the budget allows."""
    chosen = {}
    for name, target in targets.items():
        opts = sorted(options[name])
        below = [o for o in opts if o <= target + 1e-12]
        chosen[name] = below[-1] if below else opts[0]
    limit = budget * sum(numels[n] for n in targets)
    used = sum(chosen[n] * numels[n] for n in targets)
    by_loss = sorted(targets, key=lambda n: (targets[n] - chosen[n]) * numels[n], reverse=True)
    for name in by_loss:
        higher = [o for o in sorted(options[name]) if o > chosen[name]]
        if higher and targets[name] > chosen[name] and used + (higher[0] - chosen[name]) * numels[name] <= limit:
            used += (higher[0] - chosen[name]) * numels[name]
            chosen[name] = higher[0]
    return chosen


def global_allocation(curves: Mapping[str, Sequence[RatePoint]], stats: Mapping[str, TensorStats],
                      budget: float) -> dict[str, float]:
    """Minimise sum_i Fbar_i * SSE_i(b_i) subject to the mean bits <= ``budget``."""
    numels = {n: stats[n].numel for n in curves}
    limit = budget * sum(numels.values())
    cheapest = sum(min(p.bits for p in curves[n]) * numels[n] for n in curves)
    if cheapest > limit:
        raise ValueError(f"budget={budget} is below the cheapest measured point of every tensor")
    weight = {n: max(stats[n].fisher_mean, 1e-30) for n in curves}

    def pick(lam: float) -> dict[str, RatePoint]:
        return {n: min(curves[n], key=lambda p: weight[n] * p.sse + lam * numels[n] * p.bits)
                for n in curves}

    def used(choice) -> float:
        return sum(choice[n].bits * numels[n] for n in choice)

    lo, hi = 0.0, 1.0
    while used(pick(hi)) > limit:
        hi *= 4
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if used(pick(mid)) <= limit else (mid, hi)
    choice = pick(hi)
    return {n: p.bits for n, p in _greedy_fill(choice, curves, weight, numels, limit).items()}


def _greedy_fill(choice, curves, weight, numels, limit):
    """Spend what the multiplier search left over on the best distortion-per-bit upgrades."""
    choice = dict(choice)
    spent = sum(choice[n].bits * numels[n] for n in choice)
    while True:
        best, best_gain = None, 0.0
        for n, current in choice.items():
            for p in curves[n]:
                extra = (p.bits - current.bits) * numels[n]
                if extra <= 0 or spent + extra > limit:
                    continue
                gain = weight[n] * (current.sse - p.sse) / extra
                if gain > best_gain:
                    best, best_gain = (n, p), gain
        if best is None:
            return choice
        n, p = best
        spent += (p.bits - choice[n].bits) * numels[n]
        choice[n] = p
