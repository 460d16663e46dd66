"""Sharing one false-positive budget among a pipeline's stages (pure numpy, no I/O).

A benign text is a false positive of the pipeline when *any* stage acts on it, so stages each
calibrated at the target FPR add up to several times the target. The ``split`` method finds one
common per-stage exceedance level r: every calibrated stage's threshold is its own (1 - r)
quantile on the benign calibration scores, and r is the largest level at which the union of all
flags (fixed-threshold stages and refused texts included) stays within the budget.

Taking the max of per-stage rank-normalised scores and thresholding that one fused score at the
target gives the same decisions (each stage at the same quantile), so ``split`` covers it.

The budget is ``pooled`` (the share of all calibration texts) or ``per-source`` (the pooled
budget, and every benign source within the target on its own, so no kind of traffic carries the
whole budget; thresholds that hold on every known source transfer better to sources never seen).
A source with fewer than 1/target texts cannot show the target rate; it may have one flag.
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

MIN_SOURCE_ROWS = 50   # smaller sources are pooled as OTHER_SOURCE
OTHER_SOURCE = "other"


def threshold_allowing(scores: np.ndarray, allowed: int) -> float:
    """The smallest threshold with at most ``allowed`` of ``scores`` at or above it (stages act
    on score >= threshold), placed strictly above the cut so ties never exceed the count."""
    ordered = np.sort(scores)
    if allowed >= len(ordered):
        return float(ordered[0])
    cut = ordered[len(ordered) - allowed - 1]
    return float(np.nextafter(cut, np.inf))


def pool_sources(sources: list[str], min_rows: int = MIN_SOURCE_ROWS) -> np.ndarray:
    """Each row's budget group: its source, or OTHER_SOURCE for sources under ``min_rows``."""
    counts = collections.Counter(sources)
    return np.array([s if counts[s] >= min_rows else OTHER_SOURCE for s in sources], dtype=object)


def flag_rates(flagged: np.ndarray, groups: np.ndarray) -> dict[str, tuple[int, int]]:
    """{group: (flagged, rows)}, groups sorted by name."""
    return {g: (int(flagged[groups == g].sum()), int((groups == g).sum()))
            for g in sorted(set(groups.tolist()))}


@dataclasses.dataclass
class SplitResult:
    exceedance: float               # the common per-stage level r
    thresholds: dict[str, float]    # per calibrated stage
    flagged: np.ndarray             # [n] bool: any stage (or a fixed flag) acts
    met: bool                       # False: fixed flags alone exceed the budget


def split_budget(scores: dict[str, np.ndarray], fixed_flags: np.ndarray, target: float,
                 groups: np.ndarray | None = None, source_factor: float = 1.0) -> SplitResult:
    """Thresholds for ``scores`` ({stage: [n] benign scores, NaN = not scored}) so the union of
    their flags and ``fixed_flags`` is <= ``target``: of all rows, or with ``groups`` of every
    group's rows at most ``source_factor`` x ``target`` (the pooled rate stays <= target).
    Binary search over r = k / n (flags only grow with r)."""
    n = len(fixed_flags)
    finite = {stage: s[np.isfinite(s)] for stage, s in scores.items()}
    empty = [stage for stage, s in finite.items() if len(s) == 0]
    if empty:
        raise ValueError(f"no benign scores for stage(s) {', '.join(empty)}")

    def at(k: int) -> tuple[dict[str, float], np.ndarray]:
        thresholds, flagged = {}, fixed_flags.copy()
        for stage, values in finite.items():
            allowed = (k * len(values)) // n  # the same level r = k / n for every stage
            thresholds[stage] = threshold_allowing(values, allowed)
            with np.errstate(invalid="ignore"):
                flagged |= scores[stage] >= thresholds[stage]  # NaN never acts
        return thresholds, flagged

    def within(flagged: np.ndarray) -> bool:
        if int(flagged.sum()) > target * n + 1e-9:  # 0.29 * 100 < 29
            return False
        if groups is None:
            return True
        # A source too small to measure the target (fewer than 1/target texts) may still have
        # one false positive: otherwise one benign outlier in a 60-text source would pin every
        # threshold above the highest benign score of all sources.
        cap = target * source_factor
        return all(f <= max(cap * rows, 1) + 1e-9
                   for f, rows in flag_rates(flagged, groups).values())

    low, high = 0, n  # invariant: the answer is the largest feasible k in [low, high]
    if not within(at(0)[1]):
        thresholds, flagged = at(0)
        return SplitResult(0.0, thresholds, flagged, met=False)
    while low < high:
        middle = (low + high + 1) // 2
        if within(at(middle)[1]):
            low = middle
        else:
            high = middle - 1
    thresholds, flagged = at(low)
    return SplitResult(low / n, thresholds, flagged, met=True)
