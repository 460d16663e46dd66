#!/usr/bin/env python3
"""Fit Bastion's bundled n-gram prompt-attack model (``detect.ngram``) on CPU, in about a minute.

    python3 tools/training/train_prompt_ngram.py --corpus /work/data/text_corpus \
        [--out bastion/models/prompt-ngram/ngram.npz]

The corpus and its split are the bundled classifier's (``train_prompt_guard.py``): the same
JSONL files, the same 15 % of benign texts kept out for calibration (by text hash, so
``bastion calibrate`` sets both stages' thresholds on texts neither model saw), the same sample
weights (benign vs attack mass 1.5 : 1, every source's mass ^ 0.5). Binary labels: attack of
any family vs benign. Deterministic (liblinear, no sampling).

Needs scikit-learn only (a runtime dependency of the sidecar already); no torch.
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from train_prompt_guard import calibration_key, read_corpus, sample_weights  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[2] / "bastion" / "models" / "prompt-ngram" / \
    "ngram.npz"


def fit(records: list[dict], benign_weight: float = 1.5, **settings):
    from bastion.detectors.ngram_model import NgramClassifier
    weights = sample_weights(records, benign_weight)
    labels = np.array([r["label"] != "benign" for r in records], dtype=int)
    return NgramClassifier(**settings).fit([r["text"] for r in records], labels, weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=pathlib.Path, default=pathlib.Path("/work/data/text_corpus"))
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    parser.add_argument("--benign-weight", type=float, default=1.5)
    parser.add_argument("--calibration-share", type=float, default=0.15)
    args = parser.parse_args(argv)
    started = time.time()
    records = [r for r in read_corpus(args.corpus)
               if not (r["label"] == "benign"
                       and calibration_key(r["text"]) < args.calibration_share)]
    counts = collections.Counter(r["label"] for r in records)
    model = fit(records, args.benign_weight)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out, trained_on={"texts": len(records), **counts,
                                     "calibration_share": args.calibration_share,
                                     "benign_weight": args.benign_weight})
    print(json.dumps({"out": str(args.out), "texts": len(records), **counts,
                      "seconds": round(time.time() - started, 1)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
