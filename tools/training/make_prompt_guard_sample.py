#!/usr/bin/env python3
"""Write bastion/data/prompt_guard_sample.jsonl: a small labelled sample of the prompt-guard
training corpus for the benchmarks and tests (unique prompts of every register and family).

    python3 tools/training/make_prompt_guard_sample.py [--corpus /work/data/text_corpus]

Only rows under permissive licenses (MIT, Apache-2.0, BSD, PSF, public domain, the project's
own generated text) are taken, so the sample ships under the package's license with each row's
license and source recorded. Seeded: the same corpus gives the same file.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import pathlib
import random
import sys

OUT = pathlib.Path(__file__).resolve().parents[2] / "bastion" / "data" / "prompt_guard_sample.jsonl"
PERMISSIVE = ("MIT", "Apache-2.0", "BSD", "PSF", "public domain", "Public Domain", "Unlicense",
              "project")
PER_BENIGN_REGISTER, PER_ATTACK_FAMILY = 30, 40


def permissive(license_text: str) -> bool:
    return (license_text.startswith(PERMISSIVE) and "GPL" not in license_text
            and "garak" not in license_text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=pathlib.Path, default=pathlib.Path("/work/data/text_corpus"))
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    cells: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for path in sorted(args.corpus.glob("*/*.jsonl")):
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            if permissive(row.get("license", "")) and not row["group"].startswith("shared-dev"):
                cells[(row["label"], row["family"])].append(row)
    rng = random.Random(args.seed)
    chosen = []
    for (label, family), rows in sorted(cells.items()):
        rows = sorted(rows, key=lambda r: r["text"])
        rng.shuffle(rows)
        chosen += rows[:PER_BENIGN_REGISTER if label == "benign" else PER_ATTACK_FAMILY]
    with open(OUT, "w", encoding="utf-8") as handle:
        for row in chosen:
            digest = hashlib.sha1(row["text"].encode("utf-8")).hexdigest()[:12]
            record = {"id": f"{row['family']}-{digest}"}
            record.update({k: row[k] for k in ("text", "label", "family", "source", "group",
                                               "license")})
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(chosen)} rows to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
