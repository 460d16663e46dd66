#!/usr/bin/env python3
"""CPU per prompt of the shipped llm-prompt profile vs pass-through vs jailguard, in one run.

    python3 bench/bench_text_profile.py [--data prompts.jsonl] [--n 300] [--variant auto]
        [--peers-python /work/peers-venv/bin/python]

Every prompt is unique and scored once (the encoder's cache cannot hide the model's cost).
Bastion's rows run the request path in-process exactly as the sidecar does (bastion.replay's
OfflinePipeline: decode the ModelInferRequest, every stage, the policy), one request at a time,
with onnxruntime on one intra-op thread, and count this process's CPU time (time.process_time):

* ``pass-through``: the same model with an empty pipeline (decode + policy only): the baseline;
* ``llm-prompt profile``: deploy/profiles/llm-prompt.yaml (the bundled classifier + rules), also
  split into the sample's benign and attack prompts (per-prompt CPU of the same run: with the
  classifier's early exit, a benign prompt usually leaves after half the layers and an attack
  rarely does);
* ``llm-prompt profile, early exit off``: the same with ``early_exit: false`` (every window runs
  the whole model), what the exit saves;
* ``detect.ngram alone``: the bundled n-gram model as the only stage (what it would add).

jailguard (``tools/peers``) scores the same prompts in a fresh process of its own venv, measured
the same way: as shipped (its onnxruntime takes one thread per core, all counted) and with its
encoder work on one thread (``jailguard_1thread``), the like-for-like reference.
Prints a Markdown table with the ratios; the CPU model is printed with it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import sys
import time

from machine import cpu_model  # bench/machine.py: this script's folder is on sys.path

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "bastion" / "data" / "prompt_guard_sample.jsonl"
PROFILE = REPO / "deploy" / "profiles" / "llm-prompt.yaml"
MODEL = "text-classifier"


def unique_prompts(path: pathlib.Path, n: int) -> tuple[list[str], list[str]]:
    """The first ``n`` unique texts of a JSONL file and their labels."""
    seen, texts, labels = set(), [], []
    for line in open(path, encoding="utf-8"):
        if line.strip():
            row = json.loads(line)
            if row["text"] not in seen:
                seen.add(row["text"])
                texts.append(row["text"])
                labels.append(row.get("label", "benign"))
    if len(texts) < n:
        print(f"note: {path} has {len(texts)} unique prompts (asked for {n})", file=sys.stderr)
    return texts[:n], labels[:n]


def pipeline_cpu_ms(config_data: dict, texts: list[str], warmup: list[str]) -> list[float]:
    """ms of this process's CPU for each prompt through the model's request path."""
    from bastion.config import parse_config
    from bastion.corpus import CorpusRecord, text_payload
    from bastion.replay import OfflinePipeline

    config = parse_config(config_data, "bench", base_dir=PROFILE.parent)
    runner = OfflinePipeline(config, MODEL)

    def records(batch):
        return [CorpusRecord(model=MODEL, label="benign", family="bench",
                             payload=text_payload(MODEL, t, "prompt", f"r{i}"), id=f"r{i}")
                for i, t in enumerate(batch)]

    async def run(batch):
        for record in records(batch):
            await runner.inspect(record)

    asyncio.run(run(warmup))
    todo = records(texts)

    async def measured():
        costs = []
        for record in todo:
            started = time.process_time()
            await runner.inspect(record)
            costs.append((time.process_time() - started) * 1000)
        return costs

    return asyncio.run(measured())


def main(argv: list[str] | None = None) -> int:
    import yaml
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--variant", default="auto", choices=("auto", "fp32", "int8"))
    parser.add_argument("--peers-python", default="/work/peers-venv/bin/python")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    texts, labels = unique_prompts(args.data, args.n)
    warmup = [f"Warm-up request {i}: summarise the attached note in two sentences." for i in range(8)]

    def profile_with(**classifier: object) -> dict:
        profile = yaml.safe_load(PROFILE.read_text())
        for entry in profile["models"][MODEL]["pipeline"]:
            (name, options), = entry.items()
            if name == "detect.classifier":
                options.update(variant=args.variant, threads=1, **classifier)
        return profile

    profile = profile_with()
    model = profile["models"][MODEL]
    empty = {"models": {MODEL: {**model, "pipeline": []}}}
    ngram = {"models": {MODEL: {**model, "pipeline": [{"detect.ngram": {"threshold": 0.5}}]}}}

    def mean(costs: list[float], label: str | None = None) -> float:
        chosen = [c for c, k in zip(costs, labels) if label is None or k == label]
        return sum(chosen) / max(1, len(chosen))

    per_prompt = pipeline_cpu_ms(profile, texts, warmup)
    no_exit = pipeline_cpu_ms(profile_with(early_exit=False), texts, warmup)
    counts = {label: labels.count(label) for label in ("benign", "attack")}
    rows = [("pass-through (decode + policy)", mean(pipeline_cpu_ms(empty, texts, warmup))),
            (f"llm-prompt profile ({args.variant})", mean(per_prompt)),
            (f"  its {counts['benign']} benign prompts", mean(per_prompt, "benign")),
            (f"  its {counts['attack']} attack prompts", mean(per_prompt, "attack")),
            (f"llm-prompt profile ({args.variant}), early exit off", mean(no_exit)),
            ("  benign prompts, early exit off", mean(no_exit, "benign")),
            ("  attack prompts, early exit off", mean(no_exit, "attack")),
            ("detect.ngram alone (not in the profile)",
             mean(pipeline_cpu_ms(ngram, texts, warmup)))]
    if args.peers_python and pathlib.Path(args.peers_python).exists():
        sys.path.insert(0, str(REPO / "tools" / "peers"))
        os.environ.setdefault("BASTION_PEERS_PYTHON", args.peers_python)
        from bench_peer_cpu import peer_cpu_ms
        for peer in ("jailguard", "jailguard_1thread"):
            rows.append((peer, peer_cpu_ms(peer, texts)))
    by_name = dict(rows)
    profile_ms = rows[1][1]
    print(f"{len(texts)} unique prompts from {args.data.name}; CPU: {cpu_model()}; "
          f"{os.cpu_count()} cores")
    print("| path | CPU ms / prompt | x pass-through | profile / this |")
    print("|---|---:|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {ms / rows[0][1]:.1f} | {profile_ms / ms:.2f} |")
    if "jailguard" in by_name:
        benign_ms = rows[2][1]
        for peer in ("jailguard", "jailguard_1thread"):
            print(f"\nprofile / {peer} = {profile_ms / by_name[peer]:.2f} (all prompts), "
                  f"{benign_ms / by_name[peer]:.2f} (the profile's benign prompts)", end="")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
