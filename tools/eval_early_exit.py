#!/usr/bin/env python3
"""Held out: what prompt-guard's early exit (bastion/export/early_exit.py) costs in detection
and saves in compute.

For each fold model of a source-held-out run (``tools/eval_prompt_guard.py --work W``: the
model at W/fold-K never saw fold K's source groups), the exit head is fitted exactly as the
shipped one (``tools/training/fit_early_exit.py``: training texts of the other folds, gate at a
quantile of the exit scores of their benign calibration texts) and judged on fold K's texts:

* the full model's score per text (the worst window's 1 - P(benign)) next to the score with the
  exit (a window below the gate keeps its exit score, every other window the full model's);
* TPR per attack family at the shipped threshold (the llm-prompt profile's file) and at 1 %
  FPR on the held-out benign texts, and the held-out benign FPR at the shipped threshold;
* how many held-out windows run the whole model (benign and attack), hence the encoder cost of a
  benign text relative to the full model: (layer + escalated share x (layers - layer)) / layers.

    python3 tools/eval_early_exit.py --corpus CORPUS --work W \
        [--only-folds 1,2] [--doc docs/quality-early-exit.md]

(the folds are tools/training/folds.json, the ones the fold models in W were trained on).

Features are cached in W/fold-K/exit-L{layer}.npz (about 5 CPU minutes per fold to make).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "training"))
from eval_prompt_guard import FOLDS_FILE, FoldFrame, threshold_at_fpr  # noqa: E402
from fit_early_exit import (LAYER, QUANTILE, TRAIN_TEXTS, fit_head, head_scores,  # noqa: E402
                            window_states)
from generated_doc import write_generated  # noqa: E402
from train_prompt_guard import ATTACK_FAMILIES  # noqa: E402

REPO = HERE.parent
DOC = REPO / "docs" / "quality-early-exit.md"
THRESHOLD_FILE = REPO / "bastion" / "profiles" / "thresholds" / "text-classifier.classifier.json"
MODEL_LAYERS = 6


def fold_features(frame: FoldFrame, k: int, work: pathlib.Path, layer: int, n_train: int,
                  threads: int) -> dict:
    """Layer-``layer`` window features of fold ``k``'s training sample, calibration texts and
    held-out texts, with the full model's window scores; cached."""
    cache = work / f"fold-{k}" / f"exit-L{layer}-{n_train}.npz"
    if cache.exists():
        with np.load(cache) as data:
            return dict(data)
    train_idx = np.where((frame.fold != k) & ~frame.calib)[0]
    train_idx = np.array(sorted(random.Random(k).sample(list(train_idx),
                                                        min(n_train, len(train_idx)))))
    parts = {"train": (train_idx, 1), "cal": (np.where((frame.fold != k) & frame.calib)[0], 8),
             "held": (np.where(frame.fold == k)[0], 8)}
    out = {}
    for name, (index, chunks) in parts.items():
        features, attack, owner = window_states(work / f"fold-{k}",
                                                [frame.texts[i] for i in index], (layer,),
                                                max_chunks=chunks, threads=threads)
        out.update({f"{name}_idx": index, f"{name}_features": features[layer],
                    f"{name}_full": attack, f"{name}_owner": owner})
    np.savez(cache, **out)
    return out


def worst(window_scores: np.ndarray, owner: np.ndarray, texts: int) -> np.ndarray:
    out = np.full(texts, -np.inf)
    np.maximum.at(out, owner, window_scores)
    return out


def judge(frame: FoldFrame, data: dict, layer: int, quantile: float) -> dict:
    """One fold: the held-out texts' scores without and with the exit, and escalation."""
    labels = frame.attack[data["train_idx"]].astype(int)
    head = fit_head(data["train_features"], labels, data["cal_features"], layer, quantile)
    held = data["held_idx"]
    exit_score = head_scores(head, data["held_features"])
    escalated = exit_score >= head.gate
    with_exit = np.where(escalated, data["held_full"], exit_score)
    benign_window = ~frame.attack[held][data["held_owner"]]
    return {"full": worst(data["held_full"], data["held_owner"], len(held)),
            "exit": worst(with_exit, data["held_owner"], len(held)),
            "benign": ~frame.attack[held], "family": frame.family[held],
            "escalated_benign": escalated[benign_window], "escalated_attack":
            escalated[~benign_window], "gate": head.gate}


def summarise(parts: list[dict], threshold: float, layer: int) -> dict:
    full = np.concatenate([p["full"] for p in parts])
    exit_ = np.concatenate([p["exit"] for p in parts])
    benign = np.concatenate([p["benign"] for p in parts])
    family = np.concatenate([p["family"] for p in parts])
    esc_b = np.concatenate([p["escalated_benign"] for p in parts])
    esc_a = np.concatenate([p["escalated_attack"] for p in parts])
    def share(flags: np.ndarray) -> float:
        return float(flags.mean()) if len(flags) else float("nan")

    rows = {}
    for name, score in (("full model", full), (f"early exit after layer {layer}", exit_)):
        at_fpr = threshold_at_fpr(score[benign], 0.01)
        rows[name] = {
            "fpr_at_threshold": share(score[benign] >= threshold),
            "tpr_at_threshold": {f: share(score[family == f] >= threshold)
                                 for f in ATTACK_FAMILIES},
            "tpr_at_1pct": {f: share(score[family == f] >= at_fpr) for f in ATTACK_FAMILIES}}
    share = float(esc_b.mean())
    return {"rows": rows, "benign_texts": int(benign.sum()),
            "attack_texts": int((~benign).sum()), "escalated_benign_windows": share,
            "escalated_attack_windows": float(esc_a.mean()),
            "gates": [p["gate"] for p in parts],
            "benign_cost": (layer + share * (MODEL_LAYERS - layer)) / MODEL_LAYERS}


def render(result: dict, args, folds: list[int], threshold: float, elapsed: float) -> str:
    lines = [f"Command: `python3 tools/eval_early_exit.py --corpus {args.corpus} --work "
             f"{args.work}{'' if args.folds_file == FOLDS_FILE else ' --folds-file FOLDS'}"
             " --only-folds "
             f"{','.join(map(str, folds))} --layer {args.layer} --quantile {args.quantile} "
             f"--train {args.train}` ({elapsed / 60:.1f} min). Held-out texts of folds "
             f"{', '.join(map(str, folds))}: {result['benign_texts']} benign, "
             f"{result['attack_texts']} attacks. Shipped threshold {threshold:.4f}; gates "
             f"{', '.join(f'{g:.3f}' for g in result['gates'])} (one per fold model).", "",
             "| classifier | held-out benign FPR at the shipped threshold | TPR at the shipped "
             "threshold (" + " / ".join(ATTACK_FAMILIES) + ") | TPR at 1 % held-out FPR |",
             "|---|---:|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['fpr_at_threshold']:.2%} | "
                     + " / ".join(f"{row['tpr_at_threshold'][f]:.3f}" for f in ATTACK_FAMILIES)
                     + " | " + " / ".join(f"{row['tpr_at_1pct'][f]:.3f}"
                                          for f in ATTACK_FAMILIES) + " |")
    lines += ["", f"Windows that run the whole model: {result['escalated_benign_windows']:.1%} of "
              f"held-out benign windows (in-source calibration windows: {1 - args.quantile:.0%} "
              f"by construction), {result['escalated_attack_windows']:.1%} of attack windows. "
              f"Encoder cost of a benign text, if cost scales with depth: "
              f"{result['benign_cost']:.2f} of the full model's."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=pathlib.Path, required=True)
    parser.add_argument("--work", type=pathlib.Path, required=True,
                        help="an eval_prompt_guard.py work folder with its fold-K models")
    parser.add_argument("--folds-file", type=pathlib.Path, default=FOLDS_FILE,
                        help="group -> fold (default: the committed tools/training/folds.json)")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--only-folds", default="")
    parser.add_argument("--layer", type=int, default=LAYER)
    parser.add_argument("--quantile", type=float, default=QUANTILE)
    parser.add_argument("--train", type=int, default=TRAIN_TEXTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=None,
                        help="default: the llm-prompt profile's shipped threshold")
    parser.add_argument("--doc", type=pathlib.Path, default=DOC)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    started = time.time()
    folds = ([int(k) for k in args.only_folds.split(",")] if args.only_folds
             else list(range(args.folds)))
    threshold = (args.threshold if args.threshold is not None
                 else json.loads(THRESHOLD_FILE.read_text())["threshold"])
    frame = FoldFrame.load(args.corpus, args.folds_file, args.folds)
    parts = [judge(frame, fold_features(frame, k, args.work, args.layer, args.train,
                                        args.threads), args.layer, args.quantile)
             for k in folds]
    result = summarise(parts, threshold, args.layer)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    block = render(result, args, folds, threshold, time.time() - started)
    write_generated(args.doc, block, "Quality: prompt-guard's early exit, held out")
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
