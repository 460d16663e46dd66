"""Score JSONL texts with the peer detectors, offline: one JSON line out per line in.

    /work/peers-venv/bin/python tools/peers/score_peers.py --data X.jsonl --out scores.jsonl
    cat X.jsonl | /work/peers-venv/bin/python tools/peers/score_peers.py > scores.jsonl

Each input line needs a `text`; `id`, `label`, `family` and `source` are copied through when present.
Each output line adds one float per peer, named after it (higher = more likely an attack; the
peers' own probability outputs, see peer_models.py), and `securevector_top_class`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
from typing import IO, Iterable, Iterator

try:
    from . import peer_models
except ImportError:  # run as a script
    import peer_models

PASS_THROUGH = ("id", "label", "family", "source")


def read_records(stream: IO[str]) -> Iterator[dict]:
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record.get("text"), str):
            sys.exit(f"line {number}: no string field 'text'")
        yield record


def score_records(records: Iterable[dict], peers: list[str]) -> Iterator[dict]:
    scorers = {name: peer_models.load_scorer(name) for name in peers}
    for record in records:
        row = {key: record[key] for key in PASS_THROUGH if key in record}
        for name, scorer in scorers.items():
            result = scorer(record["text"])
            row[name] = result["score"]
            row.update({f"{name}_{key}": value for key, value in result.items() if key != "score"})
        yield row


def main() -> None:
    parser = argparse.ArgumentParser(description="Score JSONL texts with jailguard and securevector-guardian-model.")
    parser.add_argument("--data", type=pathlib.Path, help="JSONL input (default: stdin)")
    parser.add_argument("--out", type=pathlib.Path, help="JSONL output (default: stdout)")
    parser.add_argument("--peers", default=",".join(peer_models.PEERS), help="comma-separated subset of: %(default)s")
    args = parser.parse_args()
    peers = [name for name in args.peers.split(",") if name]
    unknown = [name for name in peers if name not in peer_models.PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}; known: {peer_models.PEERS}")
    # stdin/stdout are left open for the interpreter to close
    source = args.data.open(encoding="utf-8") if args.data else contextlib.nullcontext(sys.stdin)
    sink = args.out.open("w", encoding="utf-8") if args.out else contextlib.nullcontext(sys.stdout)
    count = 0
    with source as source, sink as sink:
        for row in score_records(read_records(source), peers):
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    print(f"scored {count} texts with {', '.join(peers)} ({peer_models.versions()})", file=sys.stderr)


if __name__ == "__main__":
    main()
