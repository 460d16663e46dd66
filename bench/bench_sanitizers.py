"""CPU per request of the text sanitizer chain (and the signature detector) on 1 KiB and 16 KiB prompts.

Runs the real pipeline code in-process (no network), so it measures only the stages. The baseline
in the same run is decoding the same request (protobuf parse + tensor decode + UTF-8), the work
every inspected request pays anyway; results are reported as ratios to it.

    python bench/bench_sanitizers.py [--repeat 300] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import random
import sys
import statistics
import time

from bastion.config import parse_config
from bastion.protos import codec, pb
from bastion.proxy.pipeline import RequestContext, build_pipeline
from bastion.traffic import load_text_sample, text_request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from machine import finish  # noqa: E402  (bench/machine.py)

CHAINS = {
    "sanitize.unicode (nfkc, invisible, control)": [{"sanitize.unicode": {"fold_confusables": False}}],
    "sanitize.unicode + fold_confusables": [{"sanitize.unicode": {"fold_confusables": True}}],
    "detect.signatures": [{"detect.signatures": {"threshold": 1}}],
    "sanitize.unicode(+confusables) -> detect.signatures": [
        {"sanitize.unicode": {"fold_confusables": True}},
        {"detect.signatures": {"threshold": 1}}],
}


def prompt_of_size(size: int, rng: random.Random) -> str:
    """Realistic text (bundled benign and attack prompts, concatenated) cut to ``size`` bytes,
    with a few invisible and confusable characters sprinkled in so sanitizers do real work."""
    rows = [r["text"] for r in load_text_sample()]
    parts, total = [], 0
    while total < size:
        text = rng.choice(rows)
        parts.append(text)
        total += len(text.encode())
    text = " ".join(parts).encode()[:size].decode("utf-8", "ignore")
    chars = list(text)
    for _ in range(max(1, size // 512)):
        chars.insert(rng.randrange(len(chars)), rng.choice(["\u200b", "\u202e", "\u0399", "\uff49"]))
    return "".join(chars)


def cpu_per_call(fn, repeat: int) -> float:
    fn()  # warm caches (regex compilation, confusables table)
    samples = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(repeat // 5):
            fn()
        samples.append((time.process_time() - started) / (repeat // 5))
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--json")
    args = parser.parse_args()
    rng = random.Random(0)
    loop = asyncio.new_event_loop()
    results = []
    for size in (1024, 16 * 1024):
        raw = text_request(prompt_of_size(size, rng)).SerializeToString()

        def decode_only():
            request = pb.ModelInferRequest.FromString(raw)
            arrays = codec.decode_request(request)
            arrays["prompt"].reshape(-1)[0].decode("utf-8")

        baseline = cpu_per_call(decode_only, args.repeat)
        results.append({"size": size, "chain": "baseline: parse + decode + UTF-8",
                        "cpu_us": baseline * 1e6, "ratio": 1.0})
        for name, stages in CHAINS.items():
            config = parse_config({"models": {"m": {"inputs": {"prompt": {"kind": "text"}},
                                                    "pipeline": stages}}})
            pipeline = build_pipeline("m", config.models["m"])

            def run_chain():
                request = pb.ModelInferRequest.FromString(raw)
                ctx = RequestContext("r", "m", "", codec.decode_request(request),
                                     {"prompt": "BYTES"})
                loop.run_until_complete(pipeline.run(ctx, stop_on_block=False))

            cost = cpu_per_call(run_chain, args.repeat)
            results.append({"size": size, "chain": name, "cpu_us": cost * 1e6,
                            "ratio": cost / baseline})
    base = {row["size"]: row["cpu_us"] for row in results if row["ratio"] == 1.0}
    table = ["| prompt | chain | CPU per request (us) | added by the stages (us) | x baseline |",
             "|---|---|---:|---:|---:|"]
    table += [f"| {row['size'] // 1024} KiB | {row['chain']} | {row['cpu_us']:.1f} | "
              f"{row['cpu_us'] - base[row['size']]:.1f} | {row['ratio']:.1f} |" for row in results]
    finish(f"{args.repeat} calls per chain", "\n".join(table), results, args.json)


if __name__ == "__main__":
    main()
