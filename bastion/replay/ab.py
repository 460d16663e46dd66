"""Replay A/B: a defense change judged as a change. The same records go through the baseline
and the candidate (two configs offline, or two live sidecars); per attack family the TPR of
both, their difference and its confidence interval, per benign family the FPR likewise, and the
latency of both. A family whose TPR falls, or whose FPR rises, past the tolerance fails the
comparison: the patch validator a CI job runs on every change to the defense config.

The intervals are paired bootstraps over the family's records (the same records go through
both sides, so their outcomes are paired): a change that moves a few records moves the
difference, not the noise of two independent samples.
"""
from __future__ import annotations

import collections
import math

import numpy as np

from bastion.replay.outcome import Outcome

BOOTSTRAP_ROUNDS = 2000


def paired_interval(a: np.ndarray, b: np.ndarray, confidence: float = 0.95,
                    rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval of mean(b) - mean(a) over paired 0/1 outcomes."""
    if a.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, a.size, size=(rounds, a.size))
    diffs = b[index].mean(axis=1) - a[index].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return float(low), float(high)


def _latency(outcomes: list[Outcome]) -> dict:
    values = np.array([o.latency_ms for o in outcomes if not o.error])
    if not values.size:
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}


def compare(baseline: list[Outcome], candidate: list[Outcome], max_regression: float,
            max_fpr_increase: float, confidence: float = 0.95) -> dict:
    """The A/B report of outcomes of the same records (in the same order) on both sides."""
    if [o.id for o in baseline] != [o.id for o in candidate]:
        raise ValueError("baseline and candidate outcomes are not of the same records")
    groups: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for index, outcome in enumerate(baseline):
        if not outcome.error and not candidate[index].error:
            label = "benign" if outcome.label == "benign" else "attack"
            groups[(label, outcome.family)].append(index)
    rows = []
    for (label, family), indices in sorted(groups.items()):
        a = np.array([baseline[i].detected for i in indices], dtype=float)
        b = np.array([candidate[i].detected for i in indices], dtype=float)
        low, high = paired_interval(a, b, confidence, seed=len(rows))
        diff = float(b.mean() - a.mean())
        if label == "attack":
            regressed = diff < -max_regression
            rule = f"TPR may fall at most {max_regression:g}"
        else:
            regressed = diff > max_fpr_increase
            rule = f"FPR may rise at most {max_fpr_increase:g}"
        rows.append({"label": label, "family": family, "n": len(indices),
                     "metric": "tpr" if label == "attack" else "fpr",
                     "baseline": float(a.mean()), "candidate": float(b.mean()), "diff": diff,
                     "ci_low": low, "ci_high": high, "regressed": bool(regressed), "rule": rule,
                     "changed": int(np.sum(a != b))})
    errors = {"baseline": sum(o.error for o in baseline),
              "candidate": sum(o.error for o in candidate)}
    return {"confidence": confidence, "max_regression": max_regression,
            "max_fpr_increase": max_fpr_increase, "families": rows, "errors": errors,
            "latency": {"baseline": _latency(baseline), "candidate": _latency(candidate)},
            "regressions": [r["family"] for r in rows if r["regressed"]],
            "passed": not any(r["regressed"] for r in rows)}


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.3f}"


def render(report: dict, baseline_name: str, candidate_name: str) -> str:
    """The A/B table as Markdown (report.md, and what the command prints)."""
    confidence = round(report["confidence"] * 100)
    lines = [f"Replay A/B: baseline `{baseline_name}`, candidate `{candidate_name}`", "",
             f"| family | metric | n | baseline | candidate | difference | {confidence} % "
             "interval | records changed | verdict |",
             "|---|---|---:|---:|---:|---:|---|---:|---|"]
    for row in report["families"]:
        verdict = f"**REGRESSION** ({row['rule']})" if row["regressed"] else "ok"
        lines.append(f"| {row['family']} | {row['metric'].upper()} | {row['n']} | "
                     f"{_fmt(row['baseline'])} | {_fmt(row['candidate'])} | {row['diff']:+.3f} | "
                     f"{row['ci_low']:+.3f} .. {row['ci_high']:+.3f} | {row['changed']} | "
                     f"{verdict} |")
    latency = report["latency"]
    lines += ["", f"Latency p50 / p99 (ms): baseline {_fmt(latency['baseline']['p50_ms'])} / "
              f"{_fmt(latency['baseline']['p99_ms'])}, candidate "
              f"{_fmt(latency['candidate']['p50_ms'])} / {_fmt(latency['candidate']['p99_ms'])}",
              f"Errors: baseline {report['errors']['baseline']}, candidate "
              f"{report['errors']['candidate']} (records with an error on either side are left "
              "out of the table)", "",
              "Result: " + ("PASS" if report["passed"] else
                            "FAIL, regressed: " + ", ".join(report["regressions"]))]
    return "\n".join(lines) + "\n"
