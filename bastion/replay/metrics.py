"""The report's numbers: TPR/FPR/AUROC/TPR at a target FPR, overall, per family and per stage."""
from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from bastion.replay.outcome import Outcome


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def _finite(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def auroc(labels: np.ndarray, scores: np.ndarray) -> tuple[float | None, str | None]:
    """AUROC with attack as the positive class, or (None, why it was skipped)."""
    if labels.size == 0:
        return None, "skipped: no records"
    if labels.all():
        return None, "skipped: only attack records (no benign class)"
    if not labels.any():
        return None, "skipped: only benign records (no attack class)"
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(labels, scores)), None


def operating_point(benign: np.ndarray, attack: np.ndarray, target_fpr: float) -> dict:
    """TPR at the largest cut on benign scores whose FPR is <= target: flag ``score > cut``."""
    if benign.size == 0:
        return {"target_fpr": target_fpr, "threshold": None, "fpr": None, "tpr": None,
                "note": "skipped: no benign records to set a threshold"}
    ordered = np.sort(benign)[::-1]
    allowed = int(math.floor(target_fpr * benign.size + 1e-9))
    if allowed >= benign.size:
        cut = -math.inf
    else:
        cut = float(ordered[allowed])
    tpr = float(np.mean(attack > cut)) if attack.size else None
    return {"target_fpr": target_fpr, "threshold": _finite(cut), "rule": "score > threshold",
            "fpr": float(np.mean(benign > cut)), "tpr": tpr,
            **({} if attack.size else {"note": "no attack records"})}


def confusion(labels: np.ndarray, predicted: np.ndarray) -> dict:
    tp = int(np.sum(labels & predicted))
    fn = int(np.sum(labels & ~predicted))
    fp = int(np.sum(~labels & predicted))
    tn = int(np.sum(~labels & ~predicted))
    return {"tp": tp, "fn": fn, "fp": fp, "tn": tn, "tpr": _rate(tp, tp + fn),
            "fpr": _rate(fp, fp + tn), "precision": _rate(tp, tp + fp)}


def latency(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    array = np.asarray(values, dtype=np.float64)
    return {"n": int(array.size), "p50_ms": float(np.percentile(array, 50)),
            "p99_ms": float(np.percentile(array, 99)), "mean_ms": float(array.mean()),
            "max_ms": float(array.max())}


@dataclasses.dataclass
class Scored:
    """Labels and scores of one slice (the arrays the plots are drawn from)."""
    labels: np.ndarray    # bool, True = attack
    scores: np.ndarray

    @property
    def benign(self) -> np.ndarray:
        return self.scores[~self.labels]

    @property
    def attack(self) -> np.ndarray:
        return self.scores[self.labels]


def overall_scores(outcomes: list[Outcome], thresholds: dict[str, float]) -> tuple[np.ndarray, str]:
    """One score per record for the overall ROC: the largest score/threshold over stages with a
    known positive threshold (a detected record counts at least 1), else detected as 0/1."""
    usable = {s: t for s, t in thresholds.items() if t and t > 0}
    if usable and any(s in o.scores for o in outcomes for s in usable):
        values = []
        for o in outcomes:
            ratio = max((o.scores[s] / t for s, t in usable.items() if s in o.scores), default=0.0)
            values.append(max(ratio, 1.0) if o.detected else ratio)
        return (np.asarray(values, dtype=np.float64),
                "max over stages of score / threshold (a detected record counts at least 1)")
    return (np.asarray([float(o.detected) for o in outcomes], dtype=np.float64),
            "detected (0/1): no per-stage scores with known thresholds")


def _family_order(outcomes: list[Outcome]) -> list[str]:
    labels = collections.defaultdict(set)
    for o in outcomes:
        labels[o.family].add(o.label)
    return sorted(labels, key=lambda f: ("attack" in labels[f], f))


def compute_report(outcomes: list[Outcome], thresholds: dict[str, float], target_fpr: float,
                   stage_order: list[str] | None = None) -> tuple[dict, dict[str, Scored]]:
    """The report's numbers, and the per-slice score arrays (``overall`` and each stage).
    Stages are listed in ``stage_order`` (the pipeline's, when known), then the rest by name."""
    valid = [o for o in outcomes if not o.error]
    labels = np.asarray([o.label == "attack" for o in valid], dtype=bool)
    detected = np.asarray([o.detected for o in valid], dtype=bool)
    scores, score_kind = overall_scores(valid, thresholds)
    arrays = {"overall": Scored(labels, scores)}

    def summary(mask: np.ndarray, rows: list[Outcome], benign_reference: Scored) -> dict:
        sub_labels, sub_scores = labels[mask], scores[mask]
        entry = {"records": int(mask.sum()) + sum(o.error for o in rows),
                 "benign": int((~sub_labels).sum()), "attack": int(sub_labels.sum()),
                 **confusion(sub_labels, detected[mask])}
        entry["detected"] = int(detected[mask].sum())
        if sub_labels.any() and not (~sub_labels).any() and benign_reference.benign.size:
            # an attack-only slice (a family): separated from all benign records
            value, note = auroc(np.concatenate([np.zeros(benign_reference.benign.size, bool),
                                                np.ones(sub_labels.sum(), bool)]),
                                np.concatenate([benign_reference.benign, sub_scores]))
            note = note or "vs all benign records"
        else:
            value, note = auroc(sub_labels, sub_scores)
        entry["auroc"], entry["auroc_note"] = value, note
        point = operating_point(benign_reference.benign, sub_scores[sub_labels], target_fpr)
        entry["tpr_at_fpr"] = point
        errors = collections.Counter(o.status for o in rows if o.error)
        entry["errors"] = sum(errors.values())
        entry["errors_by_code"] = dict(sorted(errors.items()))
        entry["latency"] = latency([o.latency_ms for o in rows if not o.error])
        return entry

    overall = summary(np.ones(len(valid), bool), outcomes, arrays["overall"])
    overall["score"] = score_kind

    order = list(stage_order or []) + [s for s in thresholds if s not in (stage_order or [])]
    stage_ids = sorted({s for o in valid for s in o.scores} | set(thresholds),
                       key=lambda s: (order.index(s) if s in order else len(order), s))
    stages = {}
    for stage in stage_ids:
        have = np.asarray([stage in o.scores for o in valid], dtype=bool)
        stage_labels = labels[have]
        stage_scores = np.asarray([o.scores[stage] for o in valid if stage in o.scores],
                                  dtype=np.float64)
        arrays[stage] = Scored(stage_labels, stage_scores)
        threshold = thresholds.get(stage)
        entry = {"threshold": threshold, "scored": int(have.sum()),
                 "benign": int((~stage_labels).sum()), "attack": int(stage_labels.sum())}
        if threshold is not None:
            entry.update(confusion(stage_labels, stage_scores >= threshold))
        else:
            entry.update({"tp": None, "fn": None, "fp": None, "tn": None, "tpr": None,
                          "fpr": None, "precision": None,
                          "note": "no threshold known (pass --admin or --config)"})
        entry["auroc"], entry["auroc_note"] = auroc(stage_labels, stage_scores)
        entry["tpr_at_fpr"] = operating_point(arrays[stage].benign, arrays[stage].attack,
                                              target_fpr)
        entry["score_mean"] = {"benign": _finite(arrays[stage].benign.mean())
                               if arrays[stage].benign.size else None,
                               "attack": _finite(arrays[stage].attack.mean())
                               if arrays[stage].attack.size else None}
        stages[stage] = entry

    families = {}
    for family in _family_order(outcomes):
        rows = [o for o in outcomes if o.family == family]
        mask = np.asarray([o.family == family for o in valid], dtype=bool)
        entry = summary(mask, rows, arrays["overall"])
        entry["label"] = ("attack" if entry["attack"] and not entry["benign"] else
                          "benign" if entry["benign"] and not entry["attack"] else
                          "mixed" if entry["benign"] else
                          next((o.label for o in rows), "?"))
        per_stage = {}
        for stage in stage_ids:
            fam = [o for o in valid if o.family == family and stage in o.scores]
            if not fam:
                continue
            values = np.asarray([o.scores[stage] for o in fam], dtype=np.float64)
            fam_labels = np.asarray([o.label == "attack" for o in fam], dtype=bool)
            threshold = thresholds.get(stage)
            item = {"scored": len(fam)}
            if threshold is not None:
                hit = values >= threshold
                item["tpr"] = _rate(int(hit[fam_labels].sum()), int(fam_labels.sum()))
                item["fpr"] = _rate(int(hit[~fam_labels].sum()), int((~fam_labels).sum()))
            if fam_labels.all() and arrays[stage].benign.size:
                item["auroc"], note = auroc(
                    np.concatenate([np.zeros(arrays[stage].benign.size, bool),
                                    np.ones(values.size, bool)]),
                    np.concatenate([arrays[stage].benign, values]))
            else:
                item["auroc"], note = auroc(fam_labels, values)
            if note:
                item["auroc_note"] = note
            per_stage[stage] = item
        entry["stages"] = per_stage
        families[family] = entry

    modes = collections.Counter(o.mode or "none" for o in outcomes)
    verdicts = collections.Counter(o.verdict or ("error" if o.error else "none")
                                   for o in outcomes)
    report = {"overall": overall, "families": families, "stages": stages,
              "annotations": {"modes": dict(modes), "verdicts": dict(verdicts)}}
    return report, arrays
