#!/usr/bin/env python3
"""Quality of `detect.perplexity` on the dev data; writes docs/quality-perplexity.md.

    python3 tools/eval_perplexity.py --full-lm tiny-lm=builtin:tiny-lm \\
        --lm smollm2-fp32=/tmp/smollm2 --lm smollm2-int8=/tmp/smollm2/model_int8.onnx

(``/tmp/smollm2`` = the folder ``bastion models export smollm2 --out`` wrote.)

For each LM the per-token NLL of every text is computed once (through
``bastion.detectors.lm.LMRunner``, the code the sidecar runs; cached as .npz under ``--cache``),
then every score (``mean_nll ppl windowed prefix suffix length_per_ppl`` with the stage
defaults: window 16, stride 8, prefix/suffix 32 tokens) is computed from it, plus a ``tokens``
baseline (the prompt's token count alone, no LM) that shows how much of a result is length.

Attacks: the four attack families in ``--data-dir``. Benign references, each on its own:

* ``benign_chat``: the 311 benign dev prompts (short chat questions);
* ``heldout``: prompt-sized passages (1-3 sentences, <= 600 characters) of the tiny LM's
  held-out 5 % of each corpus (``split_corpus`` in ``tools/training/train_tiny_lm.py``), never
  seen by its tokenizer or weights;
* ``heldout_docs``: whole held-out documents (paragraphs grouped to ~1500 characters, code
  blocks included): used only to report the FPR of each threshold on longer benign text.

Per (LM, score, benign reference): AUROC of each attack family against that reference, and the
TPR at 1 % FPR where the threshold is calibrated on that benign reference only (the smallest
threshold with at most 1 % of its scores at or above it, exactly as ``bastion calibrate
--target-fpr 0.01`` does); the FPR the same threshold gives on the other references is shown.

Every LM is scored on a common seeded sample (``--max-per-family`` texts per attack family,
``--heldout-per-corpus`` passages and ``--docs-per-corpus`` documents per corpus, all 311
benign_chat prompts), which bounds the time the 135M-parameter models take on CPU. LMs given
with ``--full-lm`` are also scored on all the dev data (every attack, 400 passages and 50
documents per corpus), reported in a second section.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import random
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools" / "training"))

FAMILIES = ["adv_suffix", "jailbreak_template", "encoding", "prompt_injection"]
REFERENCES = ["benign_chat", "heldout"]
SCORES = ["mean_nll", "ppl", "windowed", "prefix", "suffix", "length_per_ppl", "tokens"]
TARGET_FPR = 0.01
FULL = {"heldout_per_corpus": 400, "docs_per_corpus": 50}


# Reading of the recorded run (docs/quality-perplexity.md); re-check it when the numbers change.
FINDINGS = """## Findings

- **Target met by `windowed` on every LM**: adv_suffix TPR >= 0.99 at <= 1 % FPR, whichever
  benign set the threshold came from (one exception: SmolLM2 int8 calibrated on heldout,
  0.988 = 79 of 80). The optimised suffix is a run of tokens no LM predicts; a 16-token
  window over it has a mean NLL far above any window of ordinary text, while whole-prompt
  scores (`mean_nll`, `ppl`, `prefix`) dilute it with the fluent harmful request in front and
  miss half or more. `suffix` helps only when the suffix is longer than 32 tokens. Caveat: the
  260 adv_suffix prompts use only 5 distinct GCG suffixes (see the data README), so the
  evidence is 5 suffixes wide, not 260; other optimised suffixes, or attacks optimised for low
  perplexity, may score lower.
- **Length is a confound**: benign_chat prompts are all short, so the no-LM `tokens` baseline
  "detects" every family against benign_chat. Thresholds calibrated on benign_chat transfer
  to the held-out passages and back for the LM scores (FPR 0.6-1.6 %), but read every
  result against benign_chat together with the heldout columns. `length_per_ppl` (log tokens
  + mean NLL) is dominated by length: its benign_chat-calibrated threshold flags 15-16 % of
  held-out passages and 80-100 % of held-out 1500-character documents with tiny-lm. Do not use it without
  calibrating on benign prompts of the same length as production traffic.
- **tiny-lm vs SmolLM2**: for adversarial suffixes both work (SmolLM2 fp32 AUROC 1.000 vs
  0.997 against benign_chat). tiny-lm also "detects" half of the jailbreak and
  prompt-injection prompts, but that is out-of-domain detection: it was trained on Austen, the
  Bible and Python docs, so modern chat, markdown and role-play text surprise it, and its
  `windowed` threshold flags 1.7-2 % of held-out documents (longer benign text has more
  windows to be unlucky in). SmolLM2, which models modern text well (table above), barely
  separates jailbreak, encoding and prompt-injection prompts from benign text (`windowed`
  AUROC 0.45-0.80; whole-prompt scores 0.2-0.4, i.e. these attacks are *more* predictable than
  the short benign prompts): fluent attacks are not perplexing, the known limit of perplexity
  filters. Use the perplexity stage for optimised-suffix attacks and pair it with the
  signature and embedding detectors for the rest.
- **tiny-lm is int8 by default** (`builtin:tiny-lm` = `model_int8.onnx`, static
  quantization with activation ranges fixed on training text): every number matches its
  float32 original (`tiny-lm-fp32` = `builtin:tiny-lm/model.onnx`) to within 0.04 (at most 3
  of 80 prompts crossing a threshold), and its scores do not depend on batching.
- **SmolLM2 int8** (`quantize_dynamic`, down_proj kept in float32) loses little here:
  adv_suffix AUROC 0.996-0.999 vs 0.996-1.000 for fp32, bits per character +0.02-0.04. But
  dynamic quantization scales activations per batch tensor, so its scores depend on what a
  prompt is batched with (up to 0.34 on a `windowed` score in a 24-prompt check; these
  numbers were computed in batches of 16 sorted by length). Prefer fp32, or
  `bastion models export smollm2 --int8 weight-only`, where thresholds must hold under load.
  It took 78 % of the fp32 time in this run (shared machine; see bench/bench_perplexity.py).
"""


def load_jsonl(path: pathlib.Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def load_sets(data_dir: pathlib.Path, heldout_per_corpus: int, docs_per_corpus: int,
              max_per_family: int, seed: int) -> dict[str, list[str]]:
    import train_tiny_lm as training
    sets = {"benign_chat": load_jsonl(data_dir / "benign_chat.jsonl"),
            "heldout": [], "heldout_docs": []}
    for name in training.CORPORA:
        sets["heldout"].extend(training.heldout_passages(name, 1234, heldout_per_corpus))
        sets["heldout_docs"].extend(training.heldout_documents(name, 1234, docs_per_corpus))
    for family in FAMILIES:
        texts = load_jsonl(data_dir / f"{family}.jsonl")
        if max_per_family and len(texts) > max_per_family:
            texts = random.Random(seed).sample(texts, max_per_family)
        sets[family] = texts
    return sets


def nll_for(label: str, model: str, texts: list[str], threads: int,
            cache: pathlib.Path | None, batch: int = 16):
    """Per-token NLL of each text (cached by texts + model file); (items, seconds or None)."""
    from bastion.detectors.encoder import sha256_file
    from bastion.detectors.lm import LMRunner, TokenNLL, resolve_model
    onnx_path, tokenizer_path, config = resolve_model(model)
    settings = {k: config.get(k) for k in ("context", "overlap", "prefix", "pad_id")}
    identity = "\0".join([sha256_file(onnx_path), sha256_file(tokenizer_path),
                          json.dumps(settings, sort_keys=True)])
    key = hashlib.sha256(("\0".join(texts) + "\0" + identity).encode()).hexdigest()[:16]
    path = cache / f"{label}-{key}.npz" if cache else None
    if path is not None and path.exists():
        data = np.load(path)
        offsets, values = data["offsets"], data["values"]
        seconds = float(data["seconds"]) if "seconds" in data.files else None
        return [TokenNLL(values[offsets[i]:offsets[i + 1]], int(data["first"][i]),
                         int(data["tokens"][i])) for i in range(len(texts))], seconds
    runner = LMRunner(model, threads=threads)
    started = time.perf_counter()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together
    results: list = [None] * len(texts)
    for begin in range(0, len(order), batch):
        part = order[begin:begin + batch]
        for index, item in zip(part, runner.token_nll([texts[i] for i in part])):
            results[index] = item
        if begin // batch % 10 == 0:
            print(f"  {label}: {begin + len(part)}/{len(texts)} "
                  f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        offsets = np.cumsum([0] + [len(i.nll) for i in results])
        np.savez(path, offsets=offsets,
                 values=np.concatenate([i.nll for i in results] + [np.zeros(0)]),
                 first=np.array([i.first for i in results]),
                 tokens=np.array([i.tokens for i in results]), seconds=elapsed)
    return results, elapsed


def score_all(items, score: str) -> np.ndarray:
    from bastion.detectors.perplexity import analyze
    if score == "tokens":
        return np.array([float(i.tokens) for i in items])
    return np.array([analyze(i, score).score for i in items])


def evaluate(scores: dict[str, np.ndarray]) -> dict:
    from sklearn.metrics import roc_auc_score

    from bastion.calibrate import threshold_at_fpr
    out = {}
    for reference in REFERENCES:
        benign = scores[reference]
        threshold = threshold_at_fpr(benign, TARGET_FPR)
        row = {"threshold": threshold,
               "fpr": {name: float(np.mean(scores[name] >= threshold))
                       for name in ("benign_chat", "heldout", "heldout_docs")},
               "families": {}}
        for family in FAMILIES:
            attack = scores[family]
            labels = np.r_[np.zeros(len(benign)), np.ones(len(attack))]
            row["families"][family] = {
                "auroc": float(roc_auc_score(labels, np.r_[benign, attack])),
                "tpr": float(np.mean(attack >= threshold))}
        out[reference] = row
    return out


def fit(by_set: dict[str, list], sets: dict[str, list[str]]) -> dict[str, float]:
    """Bits per character of each benign set (and of each corpus's held-out passages):
    comparable across tokenizers, unlike per-token perplexity."""
    import train_tiny_lm as training
    out = {}
    groups = {"benign_chat": (by_set["benign_chat"], sets["benign_chat"])}
    per = len(sets["heldout"]) // len(training.CORPORA)
    for k, name in enumerate(training.CORPORA):
        groups[f"heldout {name}"] = (by_set["heldout"][k * per:(k + 1) * per],
                                     sets["heldout"][k * per:(k + 1) * per])
    groups["heldout_docs"] = (by_set["heldout_docs"], sets["heldout_docs"])
    for name, (items, texts) in groups.items():
        nats = sum(float(i.nll.sum()) for i in items)
        out[name] = nats / max(1, sum(len(t) for t in texts)) / np.log(2)
    return out


def results_for(items_by_set: dict[str, list]) -> dict:
    by_score = {}
    for score in SCORES:
        by_score[score] = evaluate({name: score_all(items, score)
                                    for name, items in items_by_set.items()})
    return by_score


def tables(label: str, by_score: dict, info: str) -> list[str]:
    lines = [f"### {label}", "", info, ""]
    for reference in REFERENCES:
        others = [n for n in ("benign_chat", "heldout", "heldout_docs") if n != reference]
        lines += [f"Threshold calibrated on **{reference}** (1 % FPR there); FPR of that "
                  f"threshold on {' / '.join(others)}; per family AUROC / TPR@1%:", "",
                  "| score | threshold | FPR " + " | FPR ".join(others) + " | "
                  + " | ".join(FAMILIES) + " |",
                  "|---|---:|" + "---:|" * len(others) + "---:|" * len(FAMILIES)]
        for score, result in by_score.items():
            row = result[reference]
            cells = [f"{row['families'][f]['auroc']:.3f} / **{row['families'][f]['tpr']:.3f}**"
                     if f == "adv_suffix" else
                     f"{row['families'][f]['auroc']:.3f} / {row['families'][f]['tpr']:.3f}"
                     for f in FAMILIES]
            lines.append(f"| {score} | {row['threshold']:.4g} | "
                         + " | ".join(f"{row['fpr'][o]:.3f}" for o in others) + " | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return lines


def summary(label: str, by_score: dict) -> str:
    parts = []
    for reference in REFERENCES:
        row = by_score["windowed"][reference]
        parts.append(f"calibrated on {reference}: adv_suffix TPR "
                     f"{row['families']['adv_suffix']['tpr']:.3f} (AUROC "
                     f"{row['families']['adv_suffix']['auroc']:.3f}), FPR on held-out "
                     f"documents {row['fpr']['heldout_docs']:.3f}")
    return f"- **{label}**, `windowed`: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", action="append", default=[],
                        help="LABEL=MODEL scored on the common sample; repeatable")
    parser.add_argument("--full-lm", action="append", default=[],
                        help="LABEL=MODEL scored on the sample and on all the dev data")
    parser.add_argument("--data-dir", default="/work/shared/data/text")
    parser.add_argument("--max-per-family", type=int, default=80)
    parser.add_argument("--heldout-per-corpus", type=int, default=150)
    parser.add_argument("--docs-per-corpus", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="/tmp/bastion-ppl-cache")
    parser.add_argument("--out", default="docs/quality-perplexity.md")
    parser.add_argument("--json", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    split = lambda items: [tuple(item.split("=", 1)) for item in items]  # noqa: E731
    full_lms, sample_lms = split(args.full_lm), split(args.lm)
    if not full_lms and not sample_lms:
        full_lms = [("tiny-lm", "builtin:tiny-lm")]
    data_dir = pathlib.Path(args.data_dir)
    cache = pathlib.Path(args.cache) if args.cache else None

    sample = load_sets(data_dir, args.heldout_per_corpus, args.docs_per_corpus,
                       args.max_per_family, args.seed)
    full = load_sets(data_dir, FULL["heldout_per_corpus"], FULL["docs_per_corpus"], 0, 0)

    def run(label: str, model: str, sets: dict[str, list[str]]):
        names = list(sets)
        texts = [t for n in names for t in sets[n]]
        print(f"{label}: {len(texts)} texts with {model}", file=sys.stderr, flush=True)
        items, seconds = nll_for(label, model, texts, args.threads, cache)
        bounds = np.cumsum([0] + [len(sets[n]) for n in names])
        by_set = {n: items[bounds[i]:bounds[i + 1]] for i, n in enumerate(names)}
        tokens = sum(i.tokens for i in items)
        took = (f"NLL in {seconds:.0f} s, {args.threads} threads, shared machine"
                if seconds is not None else "cached")
        fit_table[label] = fit(by_set, sets)
        return results_for(by_set), f"`{model}`: {len(texts)} texts, {tokens} tokens ({took})."

    sample_results, full_results, fit_table = {}, {}, {}
    for label, model in full_lms + sample_lms:
        sample_results[label] = run(label, model, sample)
    sample_fit = dict(fit_table)
    for label, model in full_lms:
        full_results[label] = run(label, model, full)

    date = datetime.date.today().isoformat()
    ort_version = __import__("onnxruntime").__version__
    command = "python3 tools/eval_perplexity.py " + " ".join(
        [f"--full-lm {a}={b}" for a, b in full_lms] + [f"--lm {a}={b}" for a, b in sample_lms])
    counts = lambda sets: ", ".join(f"{n} {len(t)}" for n, t in sets.items())  # noqa: E731
    lines = ["# Perplexity detector (`detect.perplexity`): quality on the dev data", "",
             f"Generated by `{command}` on {date} ({platform.machine()}, {os.cpu_count()} CPUs, "
             f"onnxruntime {ort_version}, {args.threads} threads). The tables below are the "
             "script's output; re-run it rather than editing them.", "",
             "## Headline", ""]
    lines += [summary(label + " (common sample)", r) for label, (r, _) in sample_results.items()]
    lines += [summary(label + " (all dev data)", r) for label, (r, _) in full_results.items()]
    lines += ["", "## Method", "",
              "- Scores come from per-token NLLs computed by `bastion.detectors.lm.LMRunner` "
              "(the sidecar's code) with the stage defaults: window 16 / stride 8, prefix and "
              "suffix 32 tokens. `tokens` is a baseline with no LM: the prompt's length in "
              "tokens.",
              "- **Thresholds are calibrated on benign data only**, one benign reference at a "
              "time, at 1 % FPR on it (`threshold_at_fpr` of `bastion calibrate`). TPR@1% is "
              "the share of an attack family at or above that threshold. The other columns "
              "give the FPR the same threshold has on the other benign sets (a transfer check).",
              "- Benign references: **benign_chat**, the 311 benign dev prompts (short chat "
              "questions, 11-88 characters; at 1 % the threshold is set by its top 3 scores, "
              "so it is noisy); **heldout**, passages of 1-3 sentences (<= 600 characters) "
              "cut from the tiny LM's held-out 5 % of each corpus (Austen, World English "
              "Bible, Python docs; `split_corpus` in `tools/training/train_tiny_lm.py`), text "
              "its tokenizer and weights never saw; **heldout_docs** (FPR only): whole "
              "held-out documents of about 1500 characters, code blocks included. SmolLM2 was "
              "trained on web-scale data that may include these public texts.",
              "- SmolLM2 models: `HF_HUB_OFFLINE=1 bastion models export smollm2 --out "
              "/tmp/smollm2` (fp32 `model.onnx`, int8 `model_int8.onnx`; see "
              "`bastion/export/smollm2.py`). The models are scored with `lm.json` as exported "
              "(context 512 tokens, prefix `<|im_start|>user\\n`); tiny-lm with context 256, "
              "prefix `<|endoftext|>`.",
              f"- Common sample (every LM): {counts(sample)} (seed {args.seed}).",
              f"- All dev data: {counts(full)}.", ""]
    lines += ["## How well each LM models benign text", "",
              "Bits per character (total NLL / characters / ln 2; comparable across "
              "tokenizers, lower = the LM finds the text more predictable), common sample. "
              "The first token of a text is scored after the LM's prefix (`<|endoftext|>` "
              "for tiny-lm, `<|im_start|>user\\n` for SmolLM2).", "",
              "| LM | " + " | ".join(next(iter(sample_fit.values()))) + " |",
              "|---|" + "---:|" * len(next(iter(sample_fit.values())))]
    for label, values in sample_fit.items():
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values.values()) + " |")
    lines += ["", FINDINGS, ""]
    lines += ["## All LMs on the common sample", ""]
    for label, (result, info) in sample_results.items():
        lines += tables(label, result, info)
    if full_results:
        lines += ["## All dev data", ""]
        for label, (result, info) in full_results.items():
            lines += tables(label, result, info)
    report = "\n".join(lines) + "\n"
    if args.out:
        pathlib.Path(args.out).write_text(report)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"sample": {k: v[0] for k, v in sample_results.items()},
             "full": {k: v[0] for k, v in full_results.items()}}, indent=2))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
