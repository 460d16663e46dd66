#!/usr/bin/env python3
"""Added latency and throughput of the embedding stages (MiniLM, fp32 vs int8).

    python3 bench/bench_embedding.py --encoder models/minilm [--prompts N] [--threads 1]

Every variant runs the stage's own async path (``await detector.ascore([prompt])``, as the
pipeline's StageRunner does: MicroBatcher -> worker thread -> tokenizer + onnxruntime) on the
same prompts, with the embedding cache off:

* ``tokenize only``: the baseline: a MicroBatcher whose batch function only tokenizes (the
  encoder's own windowing), so the ratios isolate the model.
* ``detect.embedding fp32 / int8``: encoder + Mahalanobis (fitted on the benign prompts).
* ``detect.attack_library fp32 / int8``: encoder + nearest neighbour in the starter library.

Latency: one request in flight, p50 / p99 over the prompts. Throughput: ``--inflight``
concurrent requests (the MicroBatcher gathers them into batches of up to ``--max-batch``).
Prompts: bastion/data/text_sample.jsonl (the dev data's benign and attack texts), cycled to
``--prompts``. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent


class TokenizeOnly:
    """Baseline stage: the encoder's batching and tokenization, no model."""

    def __init__(self, encoder, max_batch: int, max_wait_ms: float):
        from bastion.detectors.batcher import MicroBatcher
        self.encoder = encoder
        self.batcher = MicroBatcher(self._run, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                    threads=1, name="tokenize")

    def _run(self, texts):
        return [len(windows) for windows in self.encoder.tokenize(texts)]

    async def ascore(self, batch):
        return np.array([await self.batcher.submit(t) for t in batch], dtype=np.float64)


async def latency(detector, prompts) -> list[float]:
    out = []
    for prompt in prompts:
        started = time.perf_counter()
        await detector.ascore([prompt])
        out.append(time.perf_counter() - started)
    return out


async def throughput(detector, prompts, inflight: int) -> float:
    queue = list(prompts)
    started = time.perf_counter()

    async def worker():
        while queue:
            await detector.ascore([queue.pop()])
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return len(prompts) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="models/minilm")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--max-chunks", type=int, default=8)
    args = parser.parse_args()

    from bastion.detectors.anomaly_models import Mahalanobis
    from bastion.detectors.attack_library import AttackLibraryDetector
    from bastion.detectors.embedding import EmbeddingAnomalyDetector
    from bastion.detectors.encoder import Encoder, EncoderOptions
    from bastion.detectors.known_attacks import default_library_path

    rows = [json.loads(line) for line in
            open(REPO / "bastion" / "data" / "text_sample.jsonl", encoding="utf-8")]
    texts = [r["text"] for r in rows]
    prompts = [texts[i % len(texts)] for i in range(args.prompts)]
    benign = [r["text"] for r in rows if r.get("label") == "benign"]
    options = EncoderOptions(threads=args.threads, max_batch=args.max_batch,
                             max_wait_ms=args.max_wait_ms, max_chunks=args.max_chunks,
                             cache_size=0)
    folder = pathlib.Path(args.encoder)
    encoders = {"fp32": Encoder(folder / "model.onnx", options),
                "int8": Encoder(folder / "model_int8.onnx", options)}
    tokens = [sum(len(w) for w in windows) for windows in encoders["fp32"].tokenize(prompts)]
    windows = [len(w) for w in encoders["fp32"].tokenize(prompts)]

    variants = {"tokenize only (baseline)": TokenizeOnly(encoders["fp32"], args.max_batch,
                                                         args.max_wait_ms)}
    for name, encoder in encoders.items():
        model = Mahalanobis().fit(np.concatenate(encoder.embed(benign)))
        variants[f"detect.embedding {name}"] = EmbeddingAnomalyDetector(encoder, model, None)
    for name, encoder in encoders.items():
        variants[f"detect.attack_library {name}"] = AttackLibraryDetector(
            encoder, default_library_path(), reload_interval_s=3600)

    results = {}
    for name, detector in variants.items():
        asyncio.run(latency(detector, prompts[:10]))  # warm-up
        lat = asyncio.run(latency(detector, prompts))
        tput = asyncio.run(throughput(detector, prompts, args.inflight))
        results[name] = (statistics.median(lat), float(np.percentile(lat, 99)), tput)
        print(f"{name}: p50 {results[name][0] * 1e3:.2f} ms, p99 {results[name][1] * 1e3:.2f} ms,"
              f" {tput:.1f} prompts/s at {args.inflight} in flight", file=sys.stderr, flush=True)

    base = results["tokenize only (baseline)"]
    import onnxruntime
    print(f"\nbench/bench_embedding.py --prompts {args.prompts} --threads {args.threads} "
          f"--inflight {args.inflight} --max-batch {args.max_batch} --max-wait-ms "
          f"{args.max_wait_ms} --max-chunks {args.max_chunks}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, onnxruntime {onnxruntime.__version__}; prompts: "
          f"bastion/data/text_sample.jsonl cycled, {statistics.median(tokens):.0f} tokens median "
          f"({max(tokens)} max), {np.mean(windows):.2f} windows of <= 256 tokens per prompt on "
          "average\n")
    print("| stage | p50 (1 in flight) | p99 (1 in flight) | throughput "
          f"({args.inflight} in flight) | p50 / baseline | p99 / baseline | throughput / baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (p50, p99, tput) in results.items():
        print(f"| {name} | {p50 * 1e3:.2f} ms | {p99 * 1e3:.2f} ms | {tput:.1f} prompts/s | "
              f"{p50 / base[0]:.1f}x | {p99 / base[1]:.1f}x | {tput / base[2]:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
