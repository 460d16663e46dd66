#!/usr/bin/env python3
"""Does the llm-prompt profile hold on unseen benign sources when the classifier's threshold is
set on out-of-source scores? Cross-fitted calibration, measured with the fold models of
tools/eval_prompt_guard.py (no training here: their cached scores are read).

    python3 tools/eval_classifier_crossfit.py --corpus CORPUS --work WORK [--json OUT]

WORK is an eval_prompt_guard.py work folder: ``folds.json`` and each fold model's cached scores
``fold-K/scores.npz`` (its held-out groups and the other folds' calibration split).

Two ways to set the profile's classifier threshold, both with the shipped budget (the rules'
flags count against it; at most ``--target-fpr`` pooled and ``--source-tolerance`` x that per
source group):

* **in-source** (what ``bastion calibrate`` on the project's corpus does, and what
  eval_prompt_guard.py reports): the fold model's scores of benign texts held back from
  training but drawn from the *same* source groups it trained on;
* **cross-fitted**: the scores that fold models gave benign groups they never saw (each of
  fold j's held-out benign texts scored by fold j's model).

Each is judged on the outer fold k's held-out groups with fold k's model; the cross-fitted
threshold for fold k comes from the other folds only, so no number here was seen by the
threshold it judges. The last line is the threshold cross-fitted on all folds: what the shipped
model's threshold file takes (``--write``), with what the shipped model flags of its own
calibration split at that threshold.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "training"))

from eval_prompt_guard import FoldFrame, text_digest  # noqa: E402
from train_prompt_guard import ATTACK_FAMILIES  # noqa: E402


def fold_scores(work: pathlib.Path, k: int, digests: list[str]) -> np.ndarray:
    """Fold k's model's score of each digest (NaN where that model never scored the text)."""
    with np.load(work / f"fold-{k}" / "scores.npz") as data:
        known = dict(zip(data["digests"].tolist(), data["scores"].tolist()))
    return np.array([known.get(d, np.nan) for d in digests])


def crossfit_threshold(held_scores: np.ndarray, rule_flags: np.ndarray, groups: np.ndarray,
                       target: float, tolerance: float) -> float:
    """The classifier threshold set on out-of-source benign scores with the shipped budget."""
    from bastion.calibration_budget import pool_sources, split_budget
    return split_budget({"c": held_scores}, rule_flags, target, pool_sources(list(groups)),
                        source_factor=tolerance).thresholds["c"]


def summarize(flagged: np.ndarray, attack: np.ndarray, family: np.ndarray,
              groups: np.ndarray) -> dict:
    def rate(rows: np.ndarray) -> float:  # NaN where no row (a family the corpus lacks)
        return float(flagged[rows].mean()) if rows.any() else float("nan")

    benign = ~attack
    kits = sorted(set(zip(family[attack].tolist(), groups[attack].tolist())))
    return {"pooled_fpr": rate(benign),
            "hard_negative_fpr": rate(benign & (family == "hard_negative")),
            "tpr": {f: rate(attack & (family == f)) for f in ATTACK_FAMILIES},
            "benign_groups": {g: rate(benign & (groups == g))
                              for g in sorted(set(groups[benign].tolist()))},
            # Which unseen attack kits a family's TPR is lost on: "family/group" -> TPR.
            "attack_groups": {f"{f}/{g}": rate(attack & (family == f) & (groups == g))
                              for f, g in kits}}


def render_kits(row: dict, counts: dict[str, int]) -> str:
    lines = ["| family | attack group (held out) | n | TPR |", "|---|---|---:|---:|"]
    for key, tpr in row["attack_groups"].items():
        fam, group = key.split("/", 1)
        lines.append(f"| {fam} | {group} | {counts[key]} | {tpr:.2f} |")
    return "\n".join(lines)


def render(results: dict, tolerance: float) -> str:
    lines = ["| threshold set on | pooled benign FPR | hard negatives | "
             + " | ".join(ATTACK_FAMILIES) + f" | benign groups over {tolerance:g} % |",
             "|---|---:|---:|" + "---:|" * len(ATTACK_FAMILIES) + "---|"]
    for name, row in results.items():
        over = sorted(((g, v) for g, v in row["benign_groups"].items() if v > tolerance / 100),
                      key=lambda item: -item[1])
        over_text = ", ".join(f"{g} {v:.1%}" for g, v in over) or "none"
        tpr = " | ".join(f"{row['tpr'][f]:.2f}" for f in ATTACK_FAMILIES)
        lines.append(f"| {name} | {row['pooled_fpr']:.2%} | {row['hard_negative_fpr']:.1%} | "
                     f"{tpr} | {over_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=pathlib.Path, required=True)
    parser.add_argument("--work", type=pathlib.Path, required=True)
    parser.add_argument("--target-fpr", type=float, default=0.01)
    parser.add_argument("--source-tolerance", type=float, default=2.0)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--fixed", type=float, action="append", default=[],
                        help="also judge this fixed threshold on every fold (e.g. the shipped "
                             "one); repeatable")
    parser.add_argument("--partial", action="store_true",
                        help="judge only the folds whose models have scored (a preview)")
    parser.add_argument("--per-kit", action="store_true",
                        help="also print the cross-fitted threshold's TPR per held-out attack "
                             "group (which kits a family's misses come from)")
    parser.add_argument("--write", type=pathlib.Path, default=None,
                        help="threshold file to update with the all-folds cross-fitted "
                             "threshold (the shipped profile's)")
    args = parser.parse_args(argv)
    from bastion.calibration_budget import pool_sources, split_budget

    frame = FoldFrame.load(args.corpus, args.work / "folds.json")
    groups, family, fold, n_folds = frame.groups, frame.family, frame.fold, frame.n_folds
    calib, attack, rule_flags = frame.calib, frame.attack, frame.rule_flags
    digests = [text_digest(t) for t in frame.texts]

    present = [k for k in range(n_folds) if (args.work / f"fold-{k}" / "scores.npz").exists()]
    if len(present) < n_folds and not args.partial:
        raise SystemExit(f"folds {sorted(set(range(n_folds)) - set(present))} have no scores "
                         "yet (--partial: judge the present folds only)")
    keep = np.isin(fold, present)  # with --partial: the groups of folds not scored are left out
    groups, family, fold = groups[keep], family[keep], fold[keep]
    calib, attack, rule_flags = calib[keep], attack[keep], rule_flags[keep]
    digests = [d for d, k in zip(digests, keep) if k]
    per_fold = {k: fold_scores(args.work, k, digests) for k in present}
    # Each text's score by the model that never saw its group.
    held_score = np.full(len(fold), np.nan)
    for k in present:
        held_score[fold == k] = per_fold[k][fold == k]
    if np.isnan(held_score).any():
        raise SystemExit(f"{int(np.isnan(held_score).sum())} held-out texts have no fold score: "
                         "run tools/eval_prompt_guard.py on every fold first")

    systems = ("in-source calibration split (the protocol's)", "cross-fitted (other folds' "
               "unseen groups)")
    flags = {name: np.zeros(len(fold), dtype=bool) for name in systems}
    thresholds: dict[str, list[float]] = {name: [] for name in systems}
    for k in present:
        held = fold == k
        cal = (fold != k) & calib
        t_in = split_budget({"c": per_fold[k][cal]}, rule_flags[cal], args.target_fpr,
                            pool_sources(list(groups[cal])),
                            source_factor=args.source_tolerance).thresholds["c"]
        others = (fold != k) & ~attack
        t_cross = crossfit_threshold(held_score[others], rule_flags[others], groups[others],
                                     args.target_fpr, args.source_tolerance)
        for name, t in zip(systems, (t_in, t_cross)):
            flags[name][held] = (held_score[held] >= t) | rule_flags[held]
            thresholds[name].append(t)
        print(f"fold {k}: threshold {t_in:.4f} in-source, {t_cross:.4f} cross-fitted",
              file=sys.stderr, flush=True)

    for value in args.fixed:  # a threshold set elsewhere (the shipped one), on the same rows
        name = f"fixed {value:g}"
        flags[name] = (held_score >= value) | rule_flags
        thresholds[name] = [value] * len(present)
    results = {name: summarize(flags[name], attack, family, groups) for name in flags}
    benign = ~attack
    final = crossfit_threshold(held_score[benign], rule_flags[benign], groups[benign],
                               args.target_fpr, args.source_tolerance)
    print(render(results, args.source_tolerance))
    print("\nthresholds per outer fold: " + "; ".join(
        f"{name}: {', '.join(f'{t:.4f}' for t in ts)}" for name, ts in thresholds.items()))
    print(f"cross-fitted on all folds (for the shipped model): {final:.6f}")
    if args.per_kit:
        counts = collections.Counter(f"{f}/{g}" for f, g in zip(family[attack], groups[attack]))
        print("\n" + render_kits(results[systems[1]], counts))
    report = {"results": results, "thresholds": thresholds, "all_folds_threshold": final,
              "target_fpr": args.target_fpr, "source_tolerance": args.source_tolerance,
              "benign_texts": int(benign.sum()), "attack_texts": int(attack.sum())}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.write:
        write_threshold(args.write, final, report, argv)
    return 0


def write_threshold(path: pathlib.Path, threshold: float, report: dict,
                    argv: list[str] | None) -> None:
    """Set a stage's threshold file to the cross-fitted threshold. What ``bastion calibrate``
    recorded there (its in-source threshold, observed FPR, command) is kept whole under
    ``in_source``, so an operator can see both and go back."""
    old = json.loads(path.read_text()) if path.exists() else {}
    in_source = old.get("in_source", {}) if old.get("method") == "cross-fitted" else old
    data = {
        "threshold": threshold,
        "method": "cross-fitted",
        "model": in_source.get("model"),
        "stage": in_source.get("stage"),
        "target_fpr": report["target_fpr"],
        "budget": "per-source",
        "source_tolerance": report["source_tolerance"],
        "crossfit": {"command": "python3 tools/eval_classifier_crossfit.py "
                                + " ".join(argv if argv is not None else sys.argv[1:]),
                     "benign_texts": report["benign_texts"],
                     "held_out": report["results"],
                     "created": datetime.datetime.now(datetime.timezone.utc)
                     .isoformat(timespec="seconds")},
        "in_source": in_source,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
