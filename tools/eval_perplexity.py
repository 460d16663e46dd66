#!/usr/bin/env python3
"""Quality of `detect.perplexity` on the dev data; writes docs/quality-perplexity.md.

    python3 tools/eval_perplexity.py \\
        --lm tiny-lm=builtin:tiny-lm \\
        --lm smollm2-fp32=models/smollm2 --lm smollm2-int8=models/smollm2/model_int8.onnx \\
        [--max-per-family 150] [--threads 2] [--cache /tmp/ppl-cache] [--out docs/quality-perplexity.md]

For each LM the per-token NLL of every text is computed once (through
``bastion.detectors.lm.LMRunner``, the code the sidecar runs; cached as .npz under ``--cache``),
then every score (``mean_nll ppl windowed prefix suffix length_per_ppl``, window 16 / stride 8,
prefix/suffix 32 tokens: the stage defaults) is computed from it, plus a ``tokens`` baseline
(the prompt's token count alone) that shows how much of a result is just length.

Attacks: the four attack families in ``--data-dir`` (adv_suffix, jailbreak_template, encoding,
prompt_injection). Benign references, each used on its own:

* ``benign_chat``: the 311 benign dev prompts (short chat questions);
* ``heldout``: prompt-sized passages (1-3 sentences, <= 600 characters) of the tiny LM's
  held-out 5 % of each corpus (``tools/training/train_tiny_lm.py``: ``split_corpus``), never
  seen by its tokenizer or weights; ``--heldout-per-corpus`` from each of the three corpora.

Per (LM, score, benign reference): AUROC of each attack family against that reference, and the
TPR at 1 % FPR where the threshold is calibrated on that benign reference only (the smallest
threshold with at most 1 % of its scores at or above it, as ``bastion calibrate`` does); the
FPR the same threshold gives on the *other* benign reference is reported beside it.
``--max-per-family N`` scores a seeded sample of N texts per family (all LMs see the same
sample), to bound the time the 135M-parameter models take on CPU.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import pathlib
import platform
import random
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools" / "training"))

FAMILIES = ["adv_suffix", "jailbreak_template", "encoding", "prompt_injection"]
SCORES = ["mean_nll", "ppl", "windowed", "prefix", "suffix", "length_per_ppl", "tokens"]
TARGET_FPR = 0.01


def load_jsonl(path: pathlib.Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def load_data(data_dir: pathlib.Path, per_corpus: int, max_per_family: int, seed: int
              ) -> dict[str, list[str]]:
    import train_tiny_lm as training
    sets = {"benign_chat": load_jsonl(data_dir / "benign_chat.jsonl")}
    heldout = []
    for name in training.CORPORA:
        heldout.extend(training.heldout_passages(name, training_seed(), per_corpus))
    sets["heldout"] = heldout
    for family in FAMILIES:
        texts = load_jsonl(data_dir / f"{family}.jsonl")
        if max_per_family and len(texts) > max_per_family:
            texts = random.Random(seed).sample(texts, max_per_family)
        sets[family] = texts
    return sets


def training_seed() -> int:
    return 1234


def nll_for(label: str, model: str, texts: list[str], threads: int, cache: pathlib.Path | None,
            batch: int = 16):
    from bastion.detectors.lm import LMRunner, TokenNLL, resolve_model
    onnx_path, _, _ = resolve_model(model)
    stat = onnx_path.stat()
    key = hashlib.sha256(("\0".join(texts) + f"\0{onnx_path.resolve()}\0{stat.st_size}\0"
                          f"{stat.st_mtime_ns}").encode()).hexdigest()[:16]
    path = cache / f"{label}-{key}.npz" if cache else None
    if path is not None and path.exists():
        data = np.load(path)
        offsets, values = data["offsets"], data["values"]
        return [TokenNLL(values[offsets[i]:offsets[i + 1]], int(data["first"][i]),
                         int(data["tokens"][i])) for i in range(len(texts))], None
    runner = LMRunner(model, threads=threads)
    started = time.perf_counter()
    out = []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together
    results: list = [None] * len(texts)
    for begin in range(0, len(order), batch):
        part = order[begin:begin + batch]
        for index, item in zip(part, runner.token_nll([texts[i] for i in part])):
            results[index] = item
        if begin // batch % 20 == 0:
            print(f"  {label}: {begin + len(part)}/{len(texts)} "
                  f"({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    out = results
    elapsed = time.perf_counter() - started
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        offsets = np.cumsum([0] + [len(i.nll) for i in out])
        np.savez(path, offsets=offsets, values=np.concatenate([i.nll for i in out] + [[]]),
                 first=np.array([i.first for i in out]), tokens=np.array([i.tokens for i in out]))
    return out, elapsed


def score_all(items, score: str) -> np.ndarray:
    from bastion.detectors.lm import analyze
    if score == "tokens":
        return np.array([float(i.tokens) for i in items])
    return np.array([analyze(i, score).score for i in items])


def evaluate(scores: dict[str, np.ndarray]) -> dict:
    from sklearn.metrics import roc_auc_score

    from bastion.calibrate import threshold_at_fpr
    out = {}
    for reference, other in (("benign_chat", "heldout"), ("heldout", "benign_chat")):
        benign = scores[reference]
        threshold = threshold_at_fpr(benign, TARGET_FPR)
        row = {"threshold": threshold, "fpr_self": float(np.mean(benign >= threshold)),
               "fpr_other": float(np.mean(scores[other] >= threshold)), "families": {}}
        for family in FAMILIES:
            attack = scores[family]
            labels = np.r_[np.zeros(len(benign)), np.ones(len(attack))]
            auroc = float(roc_auc_score(labels, np.r_[benign, attack]))
            row["families"][family] = {"auroc": auroc,
                                       "tpr": float(np.mean(attack >= threshold))}
        out[reference] = row
    return out


def markdown(results: dict, meta: dict) -> str:
    lines = ["# Perplexity detector: quality on the dev data", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}). "
             "Do not edit by hand; re-run the command.", "",
             "Each score is computed from per-token NLLs produced by "
             "`bastion.detectors.lm.LMRunner` (the sidecar's code). AUROC: attack family "
             "against the benign reference. TPR@1%: share of the family at or above the "
             "threshold calibrated on the benign reference alone (at most 1 % of it at or "
             "above, as `bastion calibrate --target-fpr 0.01` does). `FPR other` is what that "
             "threshold does to the other benign reference (a transfer check). `tokens` is a "
             "baseline: the prompt's token count alone, no LM.", "",
             "Data (`/work/shared/data/text`, see its README):", ""]
    for name, count in meta["counts"].items():
        lines.append(f"- `{name}`: {count} texts{meta['notes'].get(name, '')}")
    lines += ["", "Benign references:", "",
              "- **benign_chat**: the 311 benign dev prompts (short chat questions, 11-88 "
              "characters); with 311 texts the 1 % threshold is set by the top 3-4 scores, so "
              "it is noisy.",
              "- **heldout**: passages of 1-3 sentences (<= 600 characters) cut from the tiny "
              "LM's held-out 5 % of each corpus (Austen, World English Bible, Python docs; "
              "`split_corpus` in `tools/training/train_tiny_lm.py`), text its tokenizer and "
              "weights never saw. SmolLM2 was trained on web data that may include these "
              "public texts.", ""]
    for label, by_score in results.items():
        info = meta["lms"][label]
        lines += [f"## {label}", "", f"Model: `{info['model']}`; NLL computed in "
                  f"{info['seconds']} ({info['tokens']} tokens).", ""]
        for reference in ("benign_chat", "heldout"):
            other = "heldout" if reference == "benign_chat" else "benign_chat"
            lines += [f"Threshold calibrated on **{reference}** (FPR other = on {other}):", "",
                      "| score | threshold | FPR other | " + " | ".join(
                          f"{f} AUROC | {f} TPR@1%" for f in FAMILIES) + " |",
                      "|---|---:|---:|" + "---:|---:|" * len(FAMILIES)]
            for score, result in by_score.items():
                row = result[reference]
                cells = [f"{row['families'][f]['auroc']:.3f} | {row['families'][f]['tpr']:.3f}"
                         for f in FAMILIES]
                lines.append(f"| {score} | {row['threshold']:.4g} | {row['fpr_other']:.3f} | "
                             + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", action="append", default=[],
                        help="LABEL=MODEL (MODEL as the stage's `model` option); repeatable")
    parser.add_argument("--data-dir", default="/work/shared/data/text")
    parser.add_argument("--heldout-per-corpus", type=int, default=400)
    parser.add_argument("--max-per-family", type=int, default=0,
                        help="seeded sample per attack family (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="/tmp/bastion-ppl-cache")
    parser.add_argument("--out", default="docs/quality-perplexity.md")
    parser.add_argument("--json", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    lms = [tuple(item.split("=", 1)) for item in (args.lm or ["tiny-lm=builtin:tiny-lm"])]

    sets = load_data(pathlib.Path(args.data_dir), args.heldout_per_corpus, args.max_per_family,
                     args.seed)
    names = list(sets)
    texts = [t for name in names for t in sets[name]]
    bounds = np.cumsum([0] + [len(sets[n]) for n in names])
    results, meta_lms = {}, {}
    for label, model in lms:
        print(f"{label}: scoring {len(texts)} texts with {model}", file=sys.stderr)
        items, seconds = nll_for(label, model, texts, args.threads,
                                 pathlib.Path(args.cache) if args.cache else None)
        meta_lms[label] = {"model": model, "tokens": int(sum(i.tokens for i in items)),
                           "seconds": f"{seconds:.0f} s" if seconds is not None else
                           "(cached run)"}
        by_score = {}
        for score in SCORES:
            values = score_all(items, score)
            per_set = {n: values[bounds[i]:bounds[i + 1]] for i, n in enumerate(names)}
            by_score[score] = evaluate(per_set)
        results[label] = by_score
    notes = {}
    if args.max_per_family:
        notes = {f: f" (seeded sample of {args.max_per_family})" for f in FAMILIES
                 if len(load_jsonl(pathlib.Path(args.data_dir) / f"{f}.jsonl"))
                 > args.max_per_family}
    notes["heldout"] = f" ({args.heldout_per_corpus} per corpus)"
    command = "python3 tools/eval_perplexity.py " + " ".join(
        [f"--lm {label}={model}" for label, model in lms]
        + ([f"--max-per-family {args.max_per_family}"] if args.max_per_family else [])
        + ([f"--heldout-per-corpus {args.heldout_per_corpus}"]
           if args.heldout_per_corpus != 400 else []))
    meta = {"command": command, "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, onnxruntime {__import__('onnxruntime').__version__}",
            "counts": {n: len(sets[n]) for n in names}, "notes": notes, "lms": meta_lms}
    report = markdown(results, meta)
    if args.out:
        pathlib.Path(args.out).write_text(report)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "results": results},
                                                      indent=2))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
