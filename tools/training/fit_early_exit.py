#!/usr/bin/env python3
"""Fit the early exit of a fine-tuned prompt-guard checkpoint (bastion/export/early_exit.py).

After ``--layer`` of the model's transformer layers, a logistic regression on the standardised
[CLS] and masked-mean hidden states of that layer scores each window (label: the text's, attack
or benign; the first window of ``--train`` training texts). The gate is the ``--quantile`` of its
scores over the windows of the checkpoint's calibration texts (benign texts it never trained
on): windows below it exit, about ``1 - quantile`` of in-source benign windows run the whole
model. Writes CHECKPOINT/early_exit.json; ``bastion models export classifier`` builds the exit
into the graph when the file is there.

    python3 tools/training/fit_early_exit.py --checkpoint CKPT --corpus CORPUS

Held-out quality and cost of the exit: ``tools/eval_early_exit.py``.
Training-time dependencies only (torch, transformers, scikit-learn).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from train_prompt_guard import calibration_key, read_corpus, windowed_model  # noqa: E402

from bastion.export.early_exit import EXIT_FILE, ExitHead  # noqa: E402

LAYER = 3
QUANTILE = 0.95
TRAIN_TEXTS = 8000
#: The logistic regression's inverse regularisation (scikit-learn's default).
C = 1.0


def window_states(model_dir: pathlib.Path, texts: list[str], layers: tuple[int, ...],
                  max_length: int = 128, max_chunks: int = 8, threads: int = 2,
                  batch_size: int = 64) -> tuple[dict, np.ndarray, np.ndarray]:
    """Per window of ``texts`` (the stage's windowing): {layer: [CLS, masked mean] features},
    the full model's attack probability (1 - P(benign)) and the owning text's index."""
    import torch
    model, count, owner, batches = windowed_model(model_dir, texts, max_length, max_chunks,
                                                  threads, batch_size)
    width_of = model.config.hidden_size
    features = {layer: np.zeros((count, 2 * width_of), np.float32) for layer in layers}
    attack = np.zeros(count, np.float32)
    with torch.no_grad():
        for rows, ids, mask in batches:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            attack[rows] = 1.0 - torch.softmax(out.logits, -1)[:, 0].numpy()
            weights = mask.unsqueeze(-1).float()
            for layer in layers:
                hidden = out.hidden_states[layer]
                mean = (hidden * weights).sum(1) / weights.sum(1)
                features[layer][rows] = torch.cat([hidden[:, 0], mean], -1).numpy()
    return features, attack, owner


def fit_head(features: np.ndarray, labels: np.ndarray, calibration: np.ndarray, layer: int,
             quantile: float, fitted: dict | None = None) -> ExitHead:
    """The exit head: a standardised logistic regression on ``features`` (attack = 1), gated
    at the ``quantile`` of its scores on the ``calibration`` (benign) windows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(features)
    # Many hidden units barely vary (the [CLS] state of a middle layer): standardising them
    # would give weights of 1000 and more, which float32 sums and an int8 graph cannot carry.
    # Units narrower than the median unit are scaled like it.
    scale = np.maximum(scaler.scale_, np.median(scaler.scale_))
    scale = np.where(scale > 0, scale, 1.0)
    model = LogisticRegression(C=C, max_iter=2000).fit((features - scaler.mean_) / scale, labels)
    coef, intercept = model.coef_[0], float(model.intercept_[0])
    gate = float(np.quantile(exit_scores(calibration, scaler.mean_, scale, coef, intercept),
                             quantile))
    return ExitHead(layer=layer, mean=scaler.mean_.tolist(), scale=scale.tolist(),
                    coef=coef.tolist(), intercept=intercept, gate=gate,
                    fitted={"quantile": quantile, "C": C, "train_windows": int(len(labels)),
                            "train_attack_windows": int(labels.sum()),
                            "calibration_windows": int(len(calibration)), **(fitted or {})})


def exit_scores(features: np.ndarray, mean, scale, coef, intercept: float) -> np.ndarray:
    """sigmoid(z) of each row: what the exported graph computes before its gate."""
    z = ((features - np.asarray(mean)) / np.asarray(scale)) @ np.asarray(coef) + intercept
    return 1.0 / (1.0 + np.exp(-z))


def head_scores(head: ExitHead, features: np.ndarray) -> np.ndarray:
    return exit_scores(features, head.mean, head.scale, head.coef, head.intercept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=pathlib.Path, required=True,
                        help="fine-tuned checkpoint (train_prompt_guard.py --out)")
    parser.add_argument("--corpus", type=pathlib.Path, required=True,
                        help="the corpus it was trained on (its calibration split is left out)")
    parser.add_argument("--layer", type=int, default=LAYER)
    parser.add_argument("--quantile", type=float, default=QUANTILE)
    parser.add_argument("--train", type=int, default=TRAIN_TEXTS,
                        help="training texts sampled for the head (first window each)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    meta = json.loads((args.checkpoint / "training.json").read_text())
    share = float(meta.get("calibration_share", 0.15))
    held = set(meta.get("holdout_groups") or [])
    records = [r for r in read_corpus(args.corpus) if r["group"] not in held]
    train_rows = [r for r in records
                  if not (r["label"] == "benign" and calibration_key(r["text"]) < share)]
    train_rows = random.Random(args.seed).sample(train_rows, min(args.train, len(train_rows)))
    with open(args.checkpoint / "calibration.jsonl", encoding="utf-8") as handle:
        calibration = [json.loads(line)["text"] for line in handle if line.strip()]
    max_length = int(meta.get("max_length", 128))
    train_features, _, _ = window_states(args.checkpoint, [r["text"] for r in train_rows],
                                         (args.layer,), max_length, 1, args.threads)
    cal_features, _, _ = window_states(args.checkpoint, calibration, (args.layer,), max_length,
                                       8, args.threads)
    labels = np.array([r["label"] != "benign" for r in train_rows], dtype=int)
    head = fit_head(train_features[args.layer], labels, cal_features[args.layer], args.layer,
                    args.quantile, {"seed": args.seed, "train_texts": len(train_rows),
                                    "calibration_texts": len(calibration)})
    head.save(args.checkpoint / EXIT_FILE)
    print(f"{args.checkpoint / EXIT_FILE}: exit after layer {head.layer}, gate {head.gate:.4f} "
          f"({args.quantile:.0%} of {len(cal_features[args.layer])} calibration windows "
          "below it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
