#!/usr/bin/env python3
"""Does detect.ngram hold on unseen benign sources if its threshold is set on out-of-source
scores? Cross-fitted calibration, measured with tools/eval_prompt_guard.py's folds.

    python3 tools/eval_ngram_crossfit.py --corpus CORPUS --work WORK [--folds-file FOLDS]

WORK is an eval_prompt_guard.py work folder (its fold classifiers' cached scores,
``fold-K/scores.npz``, are read for the profile rows); FOLDS its folds.json. Per outer fold:
the n-gram model is fitted on the training groups; three inner models, each without a third of
those groups (dealt as the outer folds are), score that third's calibration texts, and the
threshold is set on those out-of-source scores with the per-source split budget. Prints, per
system, the held-out pooled benign FPR, the hard-negative FPR, TPR per family at the calibrated
threshold and the benign groups above 2 %.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "training"))

from eval_prompt_guard import FOLDS_FILE, FoldFrame, assign_folds, text_digest  # noqa: E402
from train_prompt_guard import ATTACK_FAMILIES  # noqa: E402
from train_prompt_ngram import fit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=pathlib.Path, required=True)
    parser.add_argument("--work", type=pathlib.Path, required=True)
    parser.add_argument("--folds-file", type=pathlib.Path, default=FOLDS_FILE,
                        help="group -> fold (default: the committed tools/training/folds.json)")
    parser.add_argument("--target-fpr", type=float, default=0.01)
    args = parser.parse_args(argv)
    from bastion.calibration_budget import pool_sources, split_budget

    frame = FoldFrame.load(args.corpus, args.folds_file)
    records, texts, groups, family = frame.records, frame.texts, frame.groups, frame.family
    fold, calib, attack, rule_flags = frame.fold, frame.calib, frame.attack, frame.rule_flags
    n_folds = frame.n_folds
    digests = [text_digest(t) for t in texts]

    def classifier(k: int, index: np.ndarray) -> np.ndarray:
        with np.load(args.work / f"fold-{k}" / "scores.npz") as data:
            known = dict(zip(data["digests"].tolist(), data["scores"].tolist()))
        return np.array([known[digests[i]] for i in index])

    systems = ("n-gram, calibrated in-source", "n-gram, cross-fitted calibration",
               "profile (classifier + rules)", "profile + n-gram (cross-fitted)")
    flags = {name: np.zeros(len(records), dtype=bool) for name in systems}
    for k in range(n_folds):
        train_index = np.where((fold != k) & ~calib)[0]
        held = np.where(fold == k)[0]
        cal = np.where((fold != k) & calib)[0]
        model = fit([records[i] for i in train_index])
        ngram_held = model.predict_proba([texts[i] for i in held])[:, 1]
        ngram_cal = model.predict_proba([texts[i] for i in cal])[:, 1]
        inner = assign_folds([records[i] for i in np.where(fold != k)[0]], 3)
        ngram_cross = np.full(len(cal), np.nan)
        for j in range(3):
            inner_model = fit([records[i] for i in train_index if inner[groups[i]] != j])
            part = np.array([inner[groups[i]] == j for i in cal])
            ngram_cross[part] = inner_model.predict_proba([texts[i] for i in cal[part]])[:, 1]
        clf_held, clf_cal = classifier(k, held), classifier(k, cal)
        budget = pool_sources(list(groups[cal]))
        none = np.zeros(len(cal), dtype=bool)
        t_in = split_budget({"n": ngram_cal}, none, args.target_fpr, budget).thresholds["n"]
        t_cross = split_budget({"n": ngram_cross}, none, args.target_fpr, budget).thresholds["n"]
        t_profile = split_budget({"c": clf_cal}, rule_flags[cal], args.target_fpr,
                                 budget).thresholds["c"]
        joint = split_budget({"c": clf_cal, "n": ngram_cross}, rule_flags[cal], args.target_fpr,
                             budget).thresholds
        flags[systems[0]][held] = ngram_held >= t_in
        flags[systems[1]][held] = ngram_held >= t_cross
        flags[systems[2]][held] = (clf_held >= t_profile) | rule_flags[held]
        flags[systems[3]][held] = ((clf_held >= joint["c"]) | (ngram_held >= joint["n"])
                                   | rule_flags[held])
        print(f"fold {k}: n-gram threshold {t_in:.3f} in-source, {t_cross:.3f} cross-fitted",
              file=sys.stderr, flush=True)

    benign = ~attack
    print("| system | pooled benign FPR | hard negatives | "
          + " | ".join(ATTACK_FAMILIES) + " | benign groups over 2 % |")
    print("|---|---:|---:|" + "---:|" * len(ATTACK_FAMILIES) + "---|")
    for name, flagged in flags.items():
        over = sorted(((g, flagged[benign & (groups == g)].mean()) for g in set(groups[benign])),
                      key=lambda item: -item[1])
        over = ", ".join(f"{g} {v:.1%}" for g, v in over if v > 0.02) or "none"
        tpr = " | ".join(f"{flagged[attack & (family == f)].mean():.2f}" for f in ATTACK_FAMILIES)
        print(f"| {name} | {flagged[benign].mean():.2%} | "
              f"{flagged[benign & (family == 'hard_negative')].mean():.1%} | {tpr} | {over} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
