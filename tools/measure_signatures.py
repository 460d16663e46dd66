#!/usr/bin/env python3
"""Measure how often ``detect.signatures`` flags each family of the labelled text data.

Each text goes through ``sanitize.unicode`` (NFKC, invisible and control stripping, confusable
folding; whitespace untouched) and then the signature detector; a text is flagged when its score
is > 0. Prints one row per family (attack families and benign_chat) with the flag rate on the
raw text and after sanitization, then which rules fired how often.

    python tools/measure_signatures.py                       # /work/shared/data/text
    python tools/measure_signatures.py --data-dir DIR --rules my_rules.yaml
    python tools/measure_signatures.py --corpus 3000         # + benign prose paragraphs
    python tools/measure_signatures.py --show-benign         # ids + reasons of flagged benign rows
    python tools/measure_signatures.py --obfuscate           # + re-detection of obfuscated attacks

``--obfuscate`` takes every attack text the detector flags as-is, disguises it three ways
(Cyrillic/Greek homoglyphs, a zero-width space between letters, fullwidth forms) and reports
how many are still flagged without and with ``sanitize.unicode``: what the sanitizer buys.

The data's attack rows are harmful text: this script never prints them.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import time
from pathlib import Path

from bastion.detectors.signature_decoders import SCHEMES
from bastion.detectors.signature_rules import load_rules
from bastion.detectors.signatures import SignatureDetector
from bastion.transforms.text import UnicodeSanitizer

DEFAULT_DATA_DIR = "/work/shared/data/text"


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def corpus_paragraphs(path: Path, limit: int) -> list[str]:
    """Up to ``limit`` paragraphs (blank-line separated, >= 40 characters) of a .txt.gz corpus."""
    out: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
        block: list[str] = []
        for line in handle:
            if line.strip():
                block.append(line.strip())
                if sum(map(len, block)) < 1000:
                    continue
            text = " ".join(block)
            block = []
            if len(text) >= 40:
                out.append(text)
                if len(out) >= limit:
                    break
    return out


# Latin letters -> look-alikes from other scripts (a fixed, hand-picked set).
HOMOGLYPHS = str.maketrans({
    "a": "\u0430", "c": "\u0441", "e": "\u0435", "i": "\u0456", "o": "\u043e", "p": "\u0440",
    "x": "\u0445", "y": "\u0443", "s": "\u0455", "j": "\u0458", "A": "\u0391", "B": "\u0392",
    "E": "\u0395", "H": "\u0397", "I": "\u0399", "K": "\u039a", "M": "\u039c", "N": "\u039d",
    "O": "\u039f", "P": "\u03a1", "T": "\u03a4", "X": "\u03a7"})
FULLWIDTH = {cp: cp + 0xFEE0 for cp in range(0x21, 0x7F)}
_BETWEEN_LETTERS = re.compile(r"(?<=[A-Za-z])(?=[A-Za-z])")


def obfuscations(text: str) -> dict[str, str]:
    return {"homoglyphs": text.translate(HOMOGLYPHS),
            "zero_width": _BETWEEN_LETTERS.sub("\u200b", text),
            "fullwidth": text.translate(FULLWIDTH)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help=f"folder with the labelled *.jsonl files (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--rules", default=None, help="YAML rule file (default: bundled rules)")
    parser.add_argument("--decode", default=",".join(SCHEMES),
                        help="comma-separated decode schemes (default: all)")
    parser.add_argument("--max-decode-depth", type=int, default=2)
    parser.add_argument("--no-fold", action="store_true", help="do not fold confusables")
    parser.add_argument("--corpus", type=int, default=0, metavar="N",
                        help="also measure N paragraphs of each corpus/*.txt.gz (benign prose)")
    parser.add_argument("--show-benign", action="store_true",
                        help="print id and reasons of every flagged benign row")
    parser.add_argument("--obfuscate", action="store_true",
                        help="also re-detect flagged attacks after homoglyph / zero-width / "
                             "fullwidth obfuscation, without and with sanitize.unicode")
    args = parser.parse_args(argv)

    data_dir = Path(args.data_dir)
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        print(f"no *.jsonl files in {data_dir}", file=sys.stderr)
        return 2
    decode = [s for s in args.decode.split(",") if s]
    detector = SignatureDetector(load_rules(args.rules), decode=decode,
                                 max_decode_depth=args.max_decode_depth)
    sanitizer = UnicodeSanitizer(fold_confusables=not args.no_fold)

    groups: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for path in files:
        for row in read_jsonl(path):
            groups[(row.get("family", path.stem), row.get("label", "?"))].append(row)
    if args.corpus:
        for path in sorted((data_dir / "corpus").glob("*.txt.gz")):
            name = "corpus:" + path.name.split(".")[0]
            groups[(name, "benign")] = [{"id": f"{name}-{i}", "text": text} for i, text in
                                        enumerate(corpus_paragraphs(path, args.corpus))]

    rule_hits: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    obfuscated: dict[tuple[str, str], list[int]] = {}  # (family, kind) -> [n, raw, sanitized]
    rows = []
    started = time.perf_counter()
    for (family, label), items in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        texts = [item["text"] for item in items]
        raw_scores = detector.score(texts)
        clean = [sanitizer.apply_text(text)[0] for text in texts]
        scores = detector.score(clean)
        for item, text, score in zip(items, clean, scores):
            if score > 0:
                reasons = detector.reasons(text)
                for reason in reasons:
                    rule_hits[reason][family] += 1
                if label == "benign" and args.show_benign:
                    print(f"  benign flagged: {item['id']}: {', '.join(reasons)}")
        rows.append((family, label, len(items), int((raw_scores > 0).sum()),
                     int((scores > 0).sum())))
        if args.obfuscate and label == "attack":
            for text, score in zip(texts, raw_scores):
                if score <= 0:
                    continue
                for kind, variant in obfuscations(text).items():
                    tally = obfuscated.setdefault((family, kind), [0, 0, 0])
                    tally[0] += 1
                    tally[1] += int(detector.score([variant])[0] > 0)
                    tally[2] += int(detector.score([sanitizer.apply_text(variant)[0]])[0] > 0)
    elapsed = time.perf_counter() - started

    print(f"\nsignature flag rates (score > 0), data: {data_dir}")
    print(f"{'family':<34} {'label':<7} {'n':>6} {'raw':>8} {'sanitized':>10} {'flagged':>8}")
    for family, label, n, raw, flagged in rows:
        if not n:
            continue
        print(f"{family:<34} {label:<7} {n:>6} {raw / n:>8.1%} {flagged / n:>10.1%} "
              f"{flagged:>8}")
    print(f"({sum(r[2] for r in rows)} texts in {elapsed:.1f} s)\n")

    if obfuscated:
        print("flagged attacks, obfuscated: still flagged without / with sanitize.unicode")
        print(f"{'family':<34} {'obfuscation':<12} {'n':>6} {'raw':>8} {'sanitized':>10}")
        for (family, kind), (n, raw, clean) in sorted(obfuscated.items()):
            print(f"{family:<34} {kind:<12} {n:>6} {raw / n:>8.1%} {clean / n:>10.1%}")
        print()

    families = [r[0] for r in rows]
    print("reasons by family (sanitized texts):")
    for reason in sorted(rule_hits):
        counts = ", ".join(f"{f}={rule_hits[reason][f]}" for f in families if rule_hits[reason][f])
        print(f"  {reason:<40} {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
