"""CPU cost per prompt of the peer detectors: CPU seconds (time.process_time) of a process that does
nothing else, over unique prompts, one call per prompt (as a gateway scores requests), after the
model is loaded and warmed up on prompts outside the measured set.

    /work/peers-venv/bin/python tools/peers/bench_peer_cpu.py [--n 300] [--peers jailguard,securevector,jailguard_1thread]

Importable, from any interpreter (the dev venv included) for a run next to Bastion's profile:

    from tools.peers.bench_peer_cpu import peer_cpu_ms, sample_prompts
    texts = sample_prompts(300)
    peer_cpu_ms("jailguard", texts)  # -> ms CPU per prompt

Each measurement runs in a fresh worker process of the peers venv (BASTION_PEERS_PYTHON, default
/work/peers-venv/bin/python, or this interpreter if it has the peers), so process_time counts the
peer's own threads and nothing of the caller. Threads: securevector is pure Python (one thread);
jailguard's ONNX Runtime pool is not configurable from Python (it takes one pinned thread per
physical core; the CPU of all of them is counted); `jailguard_1thread` runs the same encoder work on
one onnxruntime thread as a reference (see peer_models.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import random
import subprocess
import sys
import time

try:
    from . import peer_models
except ImportError:  # run as a script
    import peer_models

DATA_DIR = pathlib.Path("/work/shared/data/text")
DEFAULT_PEERS_PYTHON = "/work/peers-venv/bin/python"
WARMUP = [f"Warm-up request number {i}: summarise the attached note in two sentences." for i in range(5)]
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def sample_prompts(n: int = 300, seed: int = 0, data_dir: pathlib.Path = DATA_DIR) -> list[str]:
    """n unique texts drawn round-robin from every *.jsonl (seeded shuffle per file), so short chat
    questions and long jailbreak / injection documents are both in the mix."""
    pools = []
    for path in sorted(data_dir.glob("*.jsonl")):
        texts = [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]
        random.Random(f"{seed}:{path.name}").shuffle(texts)
        pools.append(texts)
    chosen: list[str] = []
    seen: set[str] = set()
    while len(chosen) < n and any(pools):
        for pool in pools:
            while pool:
                text = pool.pop()
                if text not in seen:
                    seen.add(text)
                    chosen.append(text)
                    break
            if len(chosen) == n:
                break
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} unique texts in {data_dir}")
    return chosen


def measure_here(name: str, texts: list[str]) -> dict:
    """Load, warm up, then time one call per text in this process."""
    if len(set(texts)) != len(texts):
        raise ValueError("texts must be unique (a cache would hide the cost)")
    scorer = peer_models.load_scorer(name)
    for text in WARMUP:
        scorer(text)
    wall, cpu = time.perf_counter(), time.process_time()
    for text in texts:
        scorer(text)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"peer": name, "prompts": len(texts), "cpu_ms": 1000 * cpu / len(texts),
            "wall_ms": 1000 * wall / len(texts), "max_tokens": peer_models.MAX_TOKENS[name]}


def peers_python() -> str:
    override = os.environ.get("BASTION_PEERS_PYTHON")
    if override:
        return override
    if importlib.util.find_spec("jailguard") and importlib.util.find_spec("svguardian"):
        return sys.executable
    return DEFAULT_PEERS_PYTHON


def peer_cpu_profile(name: str, texts: list[str]) -> dict:
    """measure_here in a fresh worker process; returns its dict (cpu_ms, wall_ms, max_tokens, ...)."""
    env = {**os.environ, **SINGLE_THREAD_ENV}
    done = subprocess.run([peers_python(), str(pathlib.Path(__file__).resolve()), "--worker", name],
                          input=json.dumps(texts), capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} worker failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peer_cpu_ms(name: str, texts: list[str]) -> float:
    """ms of CPU per prompt for one peer over these (unique) texts."""
    return peer_cpu_profile(name, texts)["cpu_ms"]


def token_lengths(texts: list[str]) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(peer_models.encoder_dir() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU ms per prompt of the peer detectors.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one peer, texts on stdin
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers", default=",".join(peer_models.PEERS + peer_models.COST_REFERENCES))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure_here(args.worker, json.load(sys.stdin))))
        return
    texts = sample_prompts(args.n, args.seed)
    lengths = sorted(token_lengths(texts))
    chars = sorted(len(t) for t in texts)
    print(f"{len(texts)} unique prompts from {DATA_DIR}: chars median {chars[len(chars) // 2]} max {chars[-1]}; "
          f"MiniLM tokens median {lengths[len(lengths) // 2]} max {lengths[-1]}, "
          f"{sum(n > peer_models.JAILGUARD_SEQUENCE for n in lengths)} over {peer_models.JAILGUARD_SEQUENCE}")
    print(f"versions {peer_models.versions()}")
    print(f"{'peer':18s} {'cpu ms/prompt':>13s} {'wall ms/prompt':>14s}  truncates to")
    for name in args.peers.split(","):
        row = peer_cpu_profile(name, texts)
        limit = f"{row['max_tokens']} tokens" if row["max_tokens"] else "no truncation"
        print(f"{name:18s} {row['cpu_ms']:13.2f} {row['wall_ms']:14.2f}  {limit}")


if __name__ == "__main__":
    main()
