"""Latency and throughput of `detect.perplexity` (ONNX causal LM + MicroBatcher) on this machine.

    python bench/bench_perplexity.py [--lm tiny-lm=builtin:tiny-lm] \\
        [--lm smollm2-fp32=models/smollm2 --lm smollm2-int8=models/smollm2/model_int8.onnx] \\
        [--lengths 32,128,512] [--seconds 5] [--min-calls 30] [--threads 1] [--json out.json]

For each LM and prompt length (in the LM's own tokens; prompts are cut from the bundled held-out
passages, so they are ordinary English):

* **1 in flight**: one request at a time, awaited before the next. `model` is the bare
  ``LMRunner.token_nll`` call (tokenize + onnxruntime + NLL); `stage` is
  ``PerplexityDetector.ascore`` through its MicroBatcher as the sidecar runs it, with the
  default ``max_wait_ms: 2`` (a lone request waits that long for company) and with
  ``max_wait_ms: 0``. p50 / p99 in ms.
* **16 in flight**: 16 concurrent callers, each awaiting ``ascore`` in a loop for
  ``--seconds``, through the MicroBatcher (max_batch 16, max_wait_ms 2): prompts/s and the
  mean batch size it formed.
* **baseline** (same run): tokenization alone (``tokenizers`` encode of the same prompt), the
  work any text detector pays; `x tok` columns are ratios to it.

Prints a Markdown table. Timings are wall clock on a shared machine: compare within one run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from bastion.detectors.lm import LMRunner
from bastion.detectors.perplexity import PerplexityDetector


def prompts_of(runner: LMRunner, length: int, count: int = 32) -> list[str]:
    """``count`` different prompts of about ``length`` tokens (cut from held-out passages)."""
    sample = Path(__file__).resolve().parent.parent / "bastion" / "lm" / "tiny-lm" / \
        "heldout_sample.jsonl"
    texts = [json.loads(line)["text"] for line in sample.read_text().splitlines() if line]
    ids = runner.encode([" ".join(texts)])[0]
    out = []
    for i in range(count):
        start = (i * 997) % max(1, len(ids) - length)
        out.append(runner.tokenizer.decode(ids[start:start + length]).strip())
    return out


def percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def time_calls(fn, items: list, seconds: float, min_calls: int = 30) -> list[float]:
    samples, deadline, i = [], time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline or len(samples) < min_calls:
        item = items[i % len(items)]
        started = time.perf_counter()
        fn(item)
        samples.append(time.perf_counter() - started)
        i += 1
    return samples


async def time_async(fn, items: list, seconds: float, min_calls: int = 30) -> list[float]:
    samples, deadline, i = [], time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline or len(samples) < min_calls:
        item = items[i % len(items)]
        started = time.perf_counter()
        await fn(item)
        samples.append(time.perf_counter() - started)
        i += 1
    return samples


async def throughput(detector: PerplexityDetector, items: list, seconds: float,
                     in_flight: int = 16) -> tuple[float, float]:
    done = 0
    deadline = time.perf_counter() + seconds
    batches0, items0 = detector.batcher.batches, detector.batcher.items

    async def worker(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < deadline:
            await detector.ascore([items[i % len(items)]])
            done += 1
            i += in_flight

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(in_flight)))
    elapsed = time.perf_counter() - started
    batches = detector.batcher.batches - batches0
    return done / elapsed, (detector.batcher.items - items0) / max(1, batches)


def bench_lm(label: str, model: str, lengths: list[int], seconds: float, threads: int,
             min_calls: int = 30) -> list:
    runner = LMRunner(model, threads=threads)
    rows = []
    for length in lengths:
        items = prompts_of(runner, length)
        tokens = statistics.mean(len(ids) for ids in runner.encode(items))
        runner.token_nll(items[:4])  # warm-up
        tok = percentiles(time_calls(lambda t: runner.encode([t]), items, seconds / 4))
        model_samples = time_calls(lambda t: runner.token_nll([t]), items, seconds, min_calls)
        model_t = percentiles(model_samples)
        stage = PerplexityDetector(runner, max_batch=16, max_wait_ms=2.0)
        stage0 = PerplexityDetector(runner, max_batch=16, max_wait_ms=0.0)

        async def run_all():
            await stage.ascore(items[:2])
            s2 = percentiles(await time_async(lambda t: stage.ascore([t]), items, seconds,
                                              min_calls))
            s0 = percentiles(await time_async(lambda t: stage0.ascore([t]), items, seconds,
                                              min_calls))
            rate, batch = await throughput(stage, items, seconds)
            return s2, s0, rate, batch

        s2, s0, rate, batch = asyncio.run(run_all())
        stage.close()
        stage0.close()
        # Tokenization-only throughput baseline: 16 prompts per encode_batch call.
        chunks = [items[i:i + 16] for i in range(0, len(items), 16)]
        tok_batch = time_calls(lambda c: runner.encode(c), chunks, seconds / 4)
        tok_rate = 16 / statistics.median(tok_batch)
        rows.append({"lm": label, "tokens": tokens, "tokenize_p50_ms": tok[0] * 1e3,
                     "model_p50_ms": model_t[0] * 1e3, "model_p99_ms": model_t[1] * 1e3,
                     "stage_p50_ms": s2[0] * 1e3, "stage_p99_ms": s2[1] * 1e3,
                     "stage0_p50_ms": s0[0] * 1e3, "stage0_p99_ms": s0[1] * 1e3,
                     "rate16": rate, "mean_batch": batch, "tokenize_rate": tok_rate,
                     "calls": len(model_samples)})
        print(f"{label} {length}: model p50 {model_t[0] * 1e3:.2f} ms, stage p50 "
              f"{s2[0] * 1e3:.2f} ms, 16 in flight {rate:.3g}/s", flush=True)
    return rows


def rate(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def table(rows: list[dict]) -> str:
    lines = ["| LM | tokens | tokenize p50 (baseline) | model p50 / p99 | stage p50 / p99 "
             "(max_wait 2 ms) | stage p50 / p99 (max_wait 0) | model p50 x tok | 16 in flight "
             "| mean batch | tokenize-only rate | calls |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['lm']} | {r['tokens']:.0f} | {r['tokenize_p50_ms'] * 1e3:.0f} µs | "
            f"{r['model_p50_ms']:.2f} / {r['model_p99_ms']:.2f} ms | "
            f"{r['stage_p50_ms']:.2f} / {r['stage_p99_ms']:.2f} ms | "
            f"{r['stage0_p50_ms']:.2f} / {r['stage0_p99_ms']:.2f} ms | "
            f"{r['model_p50_ms'] / r['tokenize_p50_ms']:.0f}x | {rate(r['rate16'])} prompts/s | "
            f"{r['mean_batch']:.1f} | {r['tokenize_rate']:.0f} prompts/s | {r['calls']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", action="append", default=[], help="LABEL=MODEL; repeatable")
    parser.add_argument("--lengths", default="32,128,512")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--min-calls", type=int, default=30,
                        help="at least this many timed calls per latency figure")
    parser.add_argument("--json")
    args = parser.parse_args()
    lms = [tuple(x.split("=", 1)) for x in (args.lm or ["tiny-lm=builtin:tiny-lm"])]
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for label, model in lms:
        rows.extend(bench_lm(label, model, lengths, args.seconds, args.threads, args.min_calls))
    load = os.getloadavg()
    print()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, onnxruntime "
          f"{__import__('onnxruntime').__version__}, intra-op threads {args.threads}, load "
          f"average {load[0]:.1f} at the end")
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
